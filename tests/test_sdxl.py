"""SD-XL: fastsd vs diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline on tiny random-weight
SD-XL checkpoints (two text encoders of different widths, a 9-channel inpainting variant),
same generator, max abs difference <= 1e-3; engines within 1e-3 of eager."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastsd import Pipeline
from fastsd.errors import CheckpointError, InvalidArgumentError
from fastsd.synthetic import build

TOL = 1e-3
SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler"}
_REFS: dict = {}
WORST: dict[str, float] = {}


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    paths = {"xl": build(root / "xl", "tiny-xl", seed=4), "xl9": build(root / "xl9", "tiny-xl", seed=5,
                                                                       unet_in_channels=9)}
    # a checkpoint that keeps real negative embeddings (SD-XL inpainting checkpoints say so)
    paths["xl_nozeros"] = build(root / "xl_nozeros", "tiny-xl", seed=4)
    index = paths["xl_nozeros"] / "model_index.json"
    index.write_text(json.dumps(dict(json.loads(index.read_text()), force_zeros_for_empty_prompt=False)))
    return paths


@pytest.fixture(scope="module")
def xl_pipes(xl):
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = Pipeline.from_pretrained(str(xl[name]), device="cpu")
        return cache[name]

    return get


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print("\nworst SD-XL parity difference per mode:", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})


def reference(path, mode):
    import diffusers

    cls = {"txt2img": diffusers.StableDiffusionXLPipeline, "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[mode]
    key = (str(path), mode)
    if key not in _REFS:
        pipe = cls.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        _REFS[key] = (pipe, dict(pipe.scheduler.config))
    return _REFS[key]


def run_both(xl, xl_pipes, name, mode, scheduler="euler", **kw):
    import diffusers

    ref, cfg = reference(xl[name], mode)
    ref.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(cfg)
    seed = kw.pop("seed", 0)
    ours = xl_pipes(name)(scheduler=scheduler, generator=torch.Generator().manual_seed(seed), output_type="np", **kw)
    theirs = ref(generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    assert ours.images.shape == theirs.shape
    diff = float(np.abs(ours.images - theirs).max())
    WORST[mode] = max(WORST.get(mode, 0.0), diff)
    return diff, ours


# ---- txt2img ------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [None, 1.0])  # None: SD-XL's default 5.0 (CFG); 1.0: no CFG
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_txt2img(xl, xl_pipes, scheduler, guidance):
    kw = {} if guidance is None else {"guidance_scale": guidance}
    diff, out = run_both(xl, xl_pipes, "xl", "txt2img", scheduler, prompt="a red fox in snow", num_inference_steps=4,
                         height=24, width=40, **kw)
    assert out.images.shape == (1, 24, 40, 3)
    assert diff <= TOL


def test_txt2img_negative_and_second_prompts_batch(xl, xl_pipes):
    diff, out = run_both(xl, xl_pipes, "xl", "txt2img", "euler_a", prompt=["a fox", "a boat at dusk"],
                         prompt_2=["oil painting", ""], negative_prompt=["blurry", "dark"],
                         negative_prompt_2="low quality", num_images_per_prompt=2, num_inference_steps=3,
                         guidance_scale=6.0, height=32, width=24, seed=3)
    assert out.images.shape == (4, 32, 24, 3)
    assert diff <= TOL


@pytest.mark.parametrize("name", ["xl", "xl_nozeros"])
def test_force_zeros_for_empty_prompt(xl, xl_pipes, name):
    """No negative_prompt: zero negatives where the checkpoint says force_zeros_for_empty_prompt,
    even with a negative_prompt_2; encoded "" otherwise. Both as diffusers."""
    diff, out = run_both(xl, xl_pipes, name, "txt2img", "ddim", prompt="a fox", negative_prompt_2="blurry",
                         num_inference_steps=3, height=16, width=16)
    assert diff <= TOL
    assert xl_pipes(name).info.force_zeros_for_empty_prompt == (name == "xl")


def test_micro_conditioning(xl, xl_pipes):
    diff, out = run_both(xl, xl_pipes, "xl", "txt2img", "euler", prompt="a fox", num_inference_steps=3, height=16,
                         width=24, original_size=(512, 768), crops_coords_top_left=(16, 32), target_size=(64, 64),
                         negative_original_size=(128, 128), negative_target_size=(256, 256))
    assert diff <= TOL
    plain = xl_pipes("xl")("a fox", num_inference_steps=3, height=16, width=24, seed=0, output_type="np").images
    assert np.abs(out.images - plain).max() > 10 * TOL  # the time ids reach the UNet


def test_prompt_embeds_with_pooled(xl, xl_pipes):
    ref, cfg = reference(xl["xl"], "txt2img")
    emb, neg, pooled, neg_pooled = ref.encode_prompt("a fox", negative_prompt="dark", device="cpu",
                                                     num_images_per_prompt=1, do_classifier_free_guidance=True)
    kw = dict(num_inference_steps=3, height=16, width=16, output_type="np", scheduler="ddim")
    ours = xl_pipes("xl")(prompt_embeds=emb, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                          negative_pooled_prompt_embeds=neg_pooled, seed=1, **kw).images
    text = xl_pipes("xl")("a fox", negative_prompt="dark", seed=1, **kw).images
    assert np.abs(ours - text).max() <= TOL
    with pytest.raises(InvalidArgumentError, match="pooled_prompt_embeds"):
        xl_pipes("xl")(prompt_embeds=emb, **kw)


def test_family_defaults(xl_pipes, pipes, init_image):
    """guidance_scale and strength None mean each family's diffusers default."""
    pipe = xl_pipes("xl")
    req, _ = pipe._request("x", None, None, None, None, 10, None, None, 0.0, None, None, 1, "np", 0.0, None, None,
                           None, None, None, None, {})
    assert req.guidance_scale == 5.0
    req, _ = pipe._request("x", None, init_image, None, None, 10, None, None, 0.0, None, None, 1, "np", 0.0, None,
                           None, None, None, None, None, {})
    assert req.strength == 0.3
    req, _ = pipes("eps")._request("x", None, None, None, None, 10, None, None, 0.0, None, None, 1, "np", 0.0, None,
                                   None, None, None, None, None, {})
    assert req.guidance_scale == 7.5


def test_sd_refuses_xl_arguments(pipes):
    with pytest.raises(InvalidArgumentError, match="prompt_2 applies to SD-XL"):
        pipes("eps")("a fox", prompt_2="b", num_inference_steps=2)
    with pytest.raises(InvalidArgumentError, match="original_size"):
        pipes("eps").check_call("a fox", original_size=(64, 64))


def test_xl_argument_errors(xl_pipes):
    pipe = xl_pipes("xl")
    with pytest.raises(InvalidArgumentError, match="2 texts in prompt_2 for 3 prompts"):
        pipe.check_call(["a", "b", "c"], prompt_2=["x", "y"])
    with pytest.raises(InvalidArgumentError, match="original_size must be two integers"):
        pipe.check_call("a", original_size=(64,))
    with pytest.raises(InvalidArgumentError, match="crops_coords_top_left"):
        pipe.check_call("a", crops_coords_top_left=(-1, 0))


# ---- img2img and inpaint -----------------------------------------------------------------


@pytest.mark.parametrize("guidance", [None, 1.0])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_img2img(xl, xl_pipes, init_image, scheduler, guidance):
    kw = {} if guidance is None else {"guidance_scale": guidance}
    diff, out = run_both(xl, xl_pipes, "xl", "img2img", scheduler, prompt="an oil painting", image=init_image,
                         num_inference_steps=10, **kw)  # default strength 0.3: 3 steps
    assert out.images.shape == (1, 40, 48, 3)
    assert diff <= TOL


def test_img2img_batch_strength(xl, xl_pipes, init_image):
    diff, out = run_both(xl, xl_pipes, "xl", "img2img", "euler_a", prompt=["a", "b"], image=init_image,
                         num_images_per_prompt=2, strength=0.7, num_inference_steps=4)
    assert out.images.shape == (4, 40, 48, 3)
    assert diff <= TOL


@pytest.mark.parametrize("strength", [None, 1.0, 0.6])  # None: SD-XL inpaint's 0.9999
@pytest.mark.parametrize("guidance", [None, 1.0])
@pytest.mark.parametrize("name", ["xl", "xl9"])
def test_inpaint(xl, xl_pipes, init_image, mask_image, name, guidance, strength):
    kw = {k: v for k, v in (("guidance_scale", guidance), ("strength", strength)) if v is not None}
    diff, out = run_both(xl, xl_pipes, name, "inpaint", "euler", prompt="a stone wall", image=init_image,
                         mask_image=mask_image, num_inference_steps=5, height=40, width=48, **kw)
    assert out.images.shape == (1, 40, 48, 3)
    assert diff <= TOL


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler_a"])
def test_inpaint_samplers_batch(xl, xl_pipes, init_image, mask_image, scheduler):
    diff, out = run_both(xl, xl_pipes, "xl9", "inpaint", scheduler, prompt=["a", "b"], image=init_image,
                         mask_image=mask_image, num_images_per_prompt=2, num_inference_steps=4, height=40, width=48)
    assert out.images.shape == (4, 40, 48, 3)
    assert diff <= TOL


def test_inpaint_default_size_is_the_checkpoints(xl, xl_pipes, init_image, mask_image):
    diff, out = run_both(xl, xl_pipes, "xl", "inpaint", "ddim", prompt="x", image=init_image, mask_image=mask_image,
                         num_inference_steps=3)
    assert out.images.shape == (1, 32, 32, 3)  # tiny-xl: sample size 16 x factor 2, as diffusers
    assert diff <= TOL


# ---- loading ---------------------------------------------------------------------------


def test_refiner_folder_refused(xl, tmp_path):
    import shutil

    folder = shutil.copytree(xl["xl"], tmp_path / "refiner")
    index = folder / "model_index.json"
    index.write_text(json.dumps(dict(json.loads(index.read_text()), text_encoder=[None, None],
                                     tokenizer=[None, None])))
    with pytest.raises(CheckpointError, match="refiner"):
        Pipeline.from_pretrained(str(folder))


def test_missing_second_encoder_refused(xl, tmp_path):
    import shutil

    folder = shutil.copytree(xl["xl"], tmp_path / "broken")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match="text_encoder_2"):
        Pipeline.from_pretrained(str(folder))
