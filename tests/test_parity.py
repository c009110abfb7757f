"""fastsd vs diffusers: same weights, same generator, same images (max abs diff <= 1e-3).

The reference is diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline with its scheduler
swapped for XScheduler.from_config(checkpoint scheduler config).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DIFFUSERS_SCHEDULERS

from fastsd.images import image_to_tensor, mask_to_tensor

TOL = 1e-3
_REF_CACHE: dict = {}
WORST: dict[str, float] = {}  # mode -> worst difference seen, printed at the end


def reference(path, mode):
    import diffusers

    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[mode]
    key = (str(path), mode)
    if key not in _REF_CACHE:
        pipe = cls.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        _REF_CACHE[key] = (pipe, dict(pipe.scheduler.config))
    return _REF_CACHE[key]


def run_both(ckpts, pipes, variant, mode, scheduler, **kw):
    import diffusers

    ref, sched_cfg = reference(ckpts[variant], mode)
    cls, options = DIFFUSERS_SCHEDULERS[scheduler]
    ref.scheduler = getattr(diffusers, cls).from_config(sched_cfg, **options)
    seed = kw.pop("seed", 0)
    ours = pipes(variant)(scheduler=scheduler, generator=torch.Generator().manual_seed(seed),
                          output_type="np", **kw)
    kw.pop("eta", None) if scheduler != "ddim" else None
    theirs = ref(generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    assert ours.images.shape == theirs.shape
    diff = float(np.abs(ours.images - theirs).max())
    WORST[mode] = max(WORST.get(mode, 0.0), diff)
    return diff, ours


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print("\nworst parity difference per mode:", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})


SCHEDULERS = ["ddim", "pndm", "euler", "euler_a"]
NEW_SCHEDULERS = ["euler_karras", "heun", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras",
                  "unipc", "lcm"]
GUIDANCE = [7.5, 1.0]  # with and without CFG
# Sweeps are cut where a case would run a code path another case runs: each sampler's own
# arithmetic (eps and v, with and without noise) is swept in txt2img; img2img and inpaint sweep
# every sampler once for what they add per sampler (the start index, the re-noising of the
# original), with CFG off, v-prediction and the 9-channel UNet crossed with a few samplers,
# as those paths do not depend on the sampler.
CROSS = ["euler_a", "dpmpp_2m", "heun"]  # noise drawn per step, a multistep history, two UNet calls a step


def test_every_sampler_is_in_the_parity_suite():
    from fastsd.schedulers import SAMPLER_NAMES

    assert sorted(SCHEDULERS + NEW_SCHEDULERS) == sorted(SAMPLER_NAMES)


@pytest.mark.parametrize("variant,scheduler,guidance",
                         [(v, s, 7.5) for v in ("eps", "v") for s in SCHEDULERS + NEW_SCHEDULERS]
                         + [(v, s, 1.0) for v in ("eps", "v") for s in CROSS])
def test_txt2img(ckpts, pipes, variant, scheduler, guidance):
    diff, out = run_both(ckpts, pipes, variant, "txt2img", scheduler, prompt="a red fox in snow",
                         num_inference_steps=5, guidance_scale=guidance, height=24, width=40)
    assert out.images.shape == (1, 24, 40, 3)
    assert diff <= TOL


@pytest.mark.parametrize("guidance", GUIDANCE)
@pytest.mark.parametrize("variant", ["eps", "v"])
def test_txt2img_ddim_bit_exact(ckpts, pipes, variant, guidance):
    """Same float32 tables and the same text-encoder calls as diffusers: eager DDIM is the
    same arithmetic, so the images are identical, not just close."""
    diff, _ = run_both(ckpts, pipes, variant, "txt2img", "ddim", prompt=["a red fox", "snow"],
                       negative_prompt=["blurry", "dark"], num_inference_steps=8, guidance_scale=guidance,
                       height=24, width=40)
    assert diff == 0.0


@pytest.mark.parametrize("variant", ["eps", "inpaint9"])
def test_inpaint_default_strength(ckpts, pipes, init_image, mask_image, variant):
    """strength=None is diffusers' inpainting default (1.0), not img2img's 0.8."""
    diff, _ = run_both(ckpts, pipes, variant, "inpaint", "ddim", prompt="a stone wall", image=init_image,
                       mask_image=mask_image, num_inference_steps=6, height=40, width=48)
    assert diff <= TOL


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "lcm", "dpmpp_2m_sde", *CROSS])  # batches of noise and history
def test_txt2img_batch_negative(ckpts, pipes, scheduler):
    diff, out = run_both(ckpts, pipes, "eps", "txt2img", scheduler, prompt=["a fox", "a boat at dusk"],
                         negative_prompt=["blurry", "dark"], num_images_per_prompt=2, num_inference_steps=4,
                         guidance_scale=5.0, height=32, width=24, seed=7)
    assert out.images.shape == (4, 32, 24, 3)
    assert diff <= TOL


@pytest.mark.parametrize("scheduler", SCHEDULERS + NEW_SCHEDULERS)
def test_default_spacing_per_sampler(ckpts, pipes, scheduler):
    """A config without timestep_spacing gets each sampler's own default, as from_config does."""
    diff, _ = run_both(ckpts, pipes, "defaults", "txt2img", scheduler, prompt="x", num_inference_steps=6,
                       height=16, width=16)
    assert diff <= TOL


def test_ddim_eta(ckpts, pipes):
    diff, _ = run_both(ckpts, pipes, "eps", "txt2img", "ddim", prompt="rain", eta=0.7, num_inference_steps=5,
                       height=16, width=16)
    assert diff <= TOL


@pytest.mark.parametrize("variant,scheduler,guidance",
                         [("eps", s, 7.5) for s in SCHEDULERS + NEW_SCHEDULERS]
                         + [(v, s, g) for s in CROSS for v in ("eps", "v") for g in GUIDANCE if (v, g) != ("eps", 7.5)])
def test_img2img(ckpts, pipes, init_image, variant, scheduler, guidance):
    diff, out = run_both(ckpts, pipes, variant, "img2img", scheduler, prompt="an oil painting",
                         image=init_image, strength=0.6, num_inference_steps=8, guidance_scale=guidance)
    assert out.images.shape == (1, 40, 48, 3)
    assert diff <= TOL


def test_img2img_batch(ckpts, pipes, init_image):
    diff, out = run_both(ckpts, pipes, "eps", "img2img", "euler_a", prompt=["a", "b"], image=init_image,
                         num_images_per_prompt=2, strength=0.75, num_inference_steps=4)
    assert out.images.shape == (4, 40, 48, 3)
    assert diff <= TOL


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("variant,scheduler,guidance",
                         [(v, s, 7.5) for v in ("eps", "inpaint9") for s in SCHEDULERS]
                         + [(v, "euler_a", g) for v, g in (("eps", 1.0), ("inpaint9", 1.0), ("v", 7.5))])
def test_inpaint(ckpts, pipes, init_image, mask_image, variant, scheduler, guidance, strength):
    diff, out = run_both(ckpts, pipes, variant, "inpaint", scheduler, prompt="a stone wall", image=init_image,
                         mask_image=mask_image, strength=strength, num_inference_steps=6,
                         guidance_scale=guidance, height=40, width=48)
    assert out.images.shape == (1, 40, 48, 3)
    assert diff <= TOL


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("variant,scheduler", [("eps", s) for s in NEW_SCHEDULERS]
                         + [("inpaint9", s) for s in CROSS if s in NEW_SCHEDULERS])  # 9 channels: no blending
def test_inpaint_new_samplers(ckpts, pipes, init_image, mask_image, variant, scheduler, strength):
    """Latent blending re-noises the original to each next step with the sampler's own noising
    (VP for DPM-Solver/UniPC, DDPM for LCM, sigma for Heun's interleaved steps)."""
    diff, _ = run_both(ckpts, pipes, variant, "inpaint", scheduler, prompt="a stone wall", image=init_image,
                       mask_image=mask_image, num_inference_steps=6, guidance_scale=7.5, strength=strength,
                       height=40, width=48)
    assert diff <= TOL


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_karras", "dpmpp_2m_sde", "unipc", "lcm"])
def test_many_steps(ckpts, pipes, scheduler):
    """20+ steps: the multistep samplers' second-order middle (lower-order steps only at the
    ends), LCM's skipping over its 50-step grid."""
    diff, _ = run_both(ckpts, pipes, "eps", "txt2img", scheduler, prompt="a lake", num_inference_steps=23,
                       height=16, width=16)
    assert diff <= TOL


def test_inpaint_batch_nonsquare(ckpts, pipes, init_image, mask_image):
    diff, out = run_both(ckpts, pipes, "inpaint9", "inpaint", "ddim", prompt=["a", "b"], image=init_image,
                         mask_image=mask_image, num_images_per_prompt=2, num_inference_steps=4,
                         height=40, width=48, eta=0.5, strength=0.9)
    assert out.images.shape == (4, 40, 48, 3)
    assert diff <= TOL


def test_inpaint_keeps_unmasked_region(pipes, init_image, mask_image):
    """4-channel latent blending: outside the mask the final latents are the image's own."""
    pipe = pipes("eps")
    out = pipe("x", image=init_image, mask_image=mask_image, num_inference_steps=4, height=40, width=48,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    # the first draw of an inpaint run with strength < 1 samples the image latents
    x0 = pipe._encode_image(image_to_tensor(init_image, 40, 48), torch.Generator().manual_seed(0))
    outside = F.interpolate(mask_to_tensor(mask_image, 40, 48), size=(20, 24)) == 0
    assert outside.any()
    assert (out.images - x0).abs()[outside.expand_as(out.images)].max() < 1e-5


def test_clip_skip(ckpts):
    """clip_skip=1: embeddings from the penultimate CLIP layer through the final LayerNorm.
    Reference: diffusers fed with those embeddings computed by transformers directly."""
    import diffusers

    from fastsd import Pipeline

    ref, cfg = reference(ckpts["eps"], "txt2img")
    ref.scheduler = diffusers.DDIMScheduler.from_config(cfg)

    def embed(text):
        ids = ref.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = ref.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
            return getattr(ref.text_encoder, "text_model", ref.text_encoder).final_layer_norm(hidden)

    kw = dict(num_inference_steps=3, height=16, width=16, output_type="np")
    ours = Pipeline.from_pretrained(str(ckpts["eps"]), clip_skip=1)("a fox", generator=torch.Generator().manual_seed(0),
                                                                    scheduler="ddim", **kw).images
    theirs = ref(prompt_embeds=embed("a fox"), negative_prompt_embeds=embed(""),
                 generator=torch.Generator().manual_seed(0), **kw).images
    plain = ref("a fox", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(ours - theirs).max() <= TOL
    assert np.abs(ours - plain).max() > 10 * TOL  # it changes the image


# ---- the scheduler a diffusers user gets ------------------------------------------------


def test_default_scheduler_is_the_checkpoints(ckpts, pipes):
    """scheduler=None runs the checkpoint's own scheduler (PNDM/PLMS for SD 1.5), as a plain
    diffusers pipeline does: no scheduler swap on either side."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(ckpts["eps"]), safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "PNDMScheduler"
    pipe = pipes("eps")
    assert pipe.scheduler.name == "pndm"
    kw = dict(prompt="a fox", num_inference_steps=6, height=16, width=24, output_type="np")
    ours = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    theirs = ref(generator=torch.Generator().manual_seed(3), **kw).images
    ddim = pipe(generator=torch.Generator().manual_seed(3), scheduler="ddim", **kw).images
    assert np.abs(ours - theirs).max() <= TOL
    assert np.abs(ours - ddim).max() > 10 * TOL  # not DDIM under another name


def test_scheduler_object_is_honoured(ckpts):
    """pipe.scheduler = XScheduler.from_config(pipe.scheduler.config, ...) as in diffusers:
    the class and its options (timestep spacing, prediction type) are what runs."""
    import diffusers

    from fastsd import Pipeline

    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(ckpts["eps"]), safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]))
    kw = dict(prompt="a fox", num_inference_steps=5, height=16, width=16, output_type="np")
    for cls, options in [("EulerAncestralDiscreteScheduler", {}),
                         ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
                         ("DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": True})]:
        ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **options)
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **options)
        assert pipe.scheduler.config["_class_name"] == cls
        ours = pipe(generator=torch.Generator().manual_seed(1), **kw).images
        theirs = ref(generator=torch.Generator().manual_seed(1), **kw).images
        assert np.abs(ours - theirs).max() <= TOL, cls
    pipe.scheduler = "pndm"
    assert pipe.scheduler.name == "pndm" and pipe.scheduler.config["_class_name"] == "PNDMScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"  # attribute access, as diffusers' FrozenDict


def test_scheduler_fastsd_cannot_run_is_an_error(ckpts):
    import diffusers

    from fastsd import Pipeline
    from fastsd.errors import InvalidArgumentError

    pipe = Pipeline.from_pretrained(str(ckpts["eps"]))
    with pytest.raises(InvalidArgumentError, match="KDPM2DiscreteScheduler"):
        pipe.scheduler = diffusers.KDPM2DiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(InvalidArgumentError, match="use_karras_sigmas"):
        pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    with pytest.raises(InvalidArgumentError, match="skip_prk_steps"):
        pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=False)
    with pytest.raises(InvalidArgumentError, match="scheduler must be one of fastsd's samplers"):
        pipe("x", scheduler="dpm_fast", num_inference_steps=1)
    assert pipe.scheduler.name == "pndm"  # a refused scheduler leaves the old one
