"""SD-XL: fastsd vs diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline on tiny random-weight
SD-XL checkpoints (two text encoders of different widths, a 9-channel inpainting variant),
same generator, max abs difference <= 1e-3; engines within 1e-3 of eager."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DIFFUSERS_SCHEDULERS

from fastsd import Pipeline
from fastsd.errors import CheckpointError, InvalidArgumentError
from fastsd.synthetic import build

TOL = 1e-3
SCHEDULERS = list(DIFFUSERS_SCHEDULERS)  # every sampler: SD-XL's config has "leading" spacing, steps_offset 1
# every sampler with SD-XL's default guidance (None: 5.0, CFG); without CFG (1.0) a sampler with
# noise drawn per step, a multistep one and Heun's two calls a step (CFG off is not a sampler's path)
XL_CASES = [(s, None) for s in SCHEDULERS] + [(s, 1.0) for s in ("euler_a", "dpmpp_2m", "heun")]
_REFS: dict = {}
WORST: dict[str, float] = {}


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    paths = {"xl": build(root / "xl", "tiny-xl", seed=4), "xl9": build(root / "xl9", "tiny-xl", seed=5,
                                                                       unet_in_channels=9)}
    # a checkpoint that keeps real negative embeddings (SD-XL inpainting checkpoints say so)
    paths["xl_nozeros"] = build(root / "xl_nozeros", "tiny-xl", seed=4)
    # v-prediction with "trailing" spacing (as SD-XL v / zero-SNR fine-tunes ship)
    paths["xlv"] = build(root / "xlv", "tiny-xl", seed=6,
                         scheduler={"prediction_type": "v_prediction", "timestep_spacing": "trailing"})
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
    cls, options = DIFFUSERS_SCHEDULERS[scheduler]
    ref.scheduler = getattr(diffusers, cls).from_config(cfg, **options)
    seed = kw.pop("seed", 0)
    ours = xl_pipes(name)(scheduler=scheduler, generator=torch.Generator().manual_seed(seed), output_type="np", **kw)
    theirs = ref(generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    assert ours.images.shape == theirs.shape
    diff = float(np.abs(ours.images - theirs).max())
    WORST[mode] = max(WORST.get(mode, 0.0), diff)
    return diff, ours


# ---- txt2img ------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler,guidance", XL_CASES)
def test_txt2img(xl, xl_pipes, scheduler, guidance):
    kw = {} if guidance is None else {"guidance_scale": guidance}
    diff, out = run_both(xl, xl_pipes, "xl", "txt2img", scheduler, prompt="a red fox in snow", num_inference_steps=4,
                         height=24, width=40, **kw)
    assert out.images.shape == (1, 24, 40, 3)
    assert diff <= TOL


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("scheduler", ["euler_karras", "heun", "dpmpp_2m", "dpmpp_2m_sde_karras", "unipc", "lcm"])
def test_v_prediction_samplers(xl, xl_pipes, init_image, scheduler, mode):
    kw = dict(image=init_image, strength=0.7) if mode == "img2img" else dict(height=24, width=40)
    diff, _ = run_both(xl, xl_pipes, "xlv", mode, scheduler, prompt="a red fox in snow", num_inference_steps=5,
                       **kw)
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


def test_clip_skip(xl, xl_pipes):
    """clip_skip=1: both encoders' hidden states from layer -3, as diffusers' SD-XL pipeline
    (compared without a negative prompt: diffusers skips layers for the prompts only)."""
    diff, out = run_both(xl, xl_pipes, "xl", "txt2img", "ddim", prompt="a fox", clip_skip=1, num_inference_steps=3,
                         height=16, width=16)
    assert diff <= TOL
    plain = xl_pipes("xl")("a fox", scheduler="ddim", seed=0, num_inference_steps=3, height=16, width=16,
                           output_type="np").images
    assert np.abs(out.images - plain).max() > 10 * TOL


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_micro_conditioning_edits(xl, xl_pipes, init_image, mask_image, mode):
    """img2img / inpaint lay out negative time ids their own way (each negative size defaults
    to the prompt's, the crop is the prompt's even when a negative one is given): matched per
    pipeline."""
    kw = {"image": init_image} | ({"mask_image": mask_image} if mode == "inpaint" else {"strength": 0.7})
    diff, _ = run_both(xl, xl_pipes, "xl", mode, "euler", prompt=["a fox", "a cat"], num_inference_steps=4,
                       crops_coords_top_left=(16, 32), negative_original_size=(128, 96), num_images_per_prompt=2,
                       negative_crops_coords_top_left=(8, 8),
                       negative_prompt="dark", **kw)
    assert diff <= TOL


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
    assert pipe.check_call("x", num_inference_steps=10).guidance_scale == 5.0
    assert pipe.check_call("x", image=init_image, num_inference_steps=10).strength == 0.3
    assert pipes("eps").check_call("x", num_inference_steps=10).guidance_scale == 7.5


def test_sd_refuses_xl_arguments(pipes):
    with pytest.raises(InvalidArgumentError, match="prompt_2 applies to SD-XL"):
        pipes("eps")("a fox", prompt_2="b", num_inference_steps=2)
    with pytest.raises(InvalidArgumentError, match="original_size"):
        pipes("eps").check_call("a fox", original_size=(64, 64))


def test_xl_argument_errors(xl_pipes):
    pipe = xl_pipes("xl")
    with pytest.raises(InvalidArgumentError, match="prompt_2 has 2 texts for 3 prompts"):
        pipe.check_call(["a", "b", "c"], prompt_2=["x", "y"])
    with pytest.raises(InvalidArgumentError, match="original_size must be two integers"):
        pipe.check_call("a", original_size=(64,))
    with pytest.raises(InvalidArgumentError, match="crops_coords_top_left"):
        pipe.check_call("a", crops_coords_top_left=(-1, 0))


# ---- img2img and inpaint -----------------------------------------------------------------


@pytest.mark.parametrize("scheduler,guidance", XL_CASES)
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


def test_single_file_matches_folder(tmp_path):
    """An SD-XL file in Stability's layout (conditioner.embedders.{0,1}, label_emb) loads offline
    into the same networks: the architecture comes from the tensors' shapes."""
    import shutil

    from safetensors.torch import save_file

    from fastsd.checkpoint import load_checkpoint
    from fastsd.single_file import to_original_layout

    folder = build(tmp_path / "folder", "tiny-xl", vae_scaling_factor=0.13025)  # the carried SD-XL scale
    single = tmp_path / "single"
    single.mkdir()
    state = to_original_layout(load_checkpoint(str(folder)), "sdxl")
    assert "conditioner.embedders.1.model.text_projection" in state and any("label_emb" in k for k in state)
    save_file(state, str(single / "model.safetensors"))
    shutil.copytree(folder / "tokenizer", single / "tokenizer")
    kw = dict(num_inference_steps=3, height=32, width=24, output_type="np", negative_prompt="x", seed=0)
    a = Pipeline.from_pretrained(str(folder))("a cat", **kw).images
    with pytest.raises(CheckpointError, match="tokenizer_2"):
        Pipeline.from_pretrained(str(single / "model.safetensors"))
    shutil.copytree(folder / "tokenizer_2", single / "tokenizer_2")
    pipe = Pipeline.from_pretrained(str(single / "model.safetensors"))
    assert pipe.family.name == "sdxl" and pipe.info.sample_size == 128  # carried SD-XL config: 1024 px
    assert np.abs(pipe("a cat", **kw).images - a).max() <= 1e-5
    assert pipe.ckpt.unet.config.transformer_layers_per_block == [1, 2]


def test_fp16_safe_vae_replaces_the_checkpoints(xl, xl_pipes, tmp_path):
    """vae= takes a diffusers VAE folder or a .safetensors file (diffusers or original keys);
    the output is diffusers' with the same VAE, and engines are kept apart (new fingerprint)."""
    import diffusers
    from safetensors.torch import save_file

    from fastsd.single_file import VAE_PREFIX, to_original_layout

    other = diffusers.AutoencoderKL.from_pretrained(str(build(tmp_path / "other", "tiny-xl", seed=9) / "vae"))
    other.save_pretrained(tmp_path / "vae")
    kw = dict(num_inference_steps=3, height=24, width=24, output_type="np", scheduler="euler")
    pipe = Pipeline.from_pretrained(str(xl["xl"]), vae=str(tmp_path / "vae"))
    ours = pipe("a fox", seed=0, **kw).images
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(xl["xl"]), vae=other)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a fox", generator=torch.Generator().manual_seed(0), num_inference_steps=3, height=24, width=24,
                 output_type="np").images
    assert np.abs(ours - theirs).max() <= TOL
    assert pipe.info.fingerprint != xl_pipes("xl").info.fingerprint
    assert np.abs(ours - xl_pipes("xl")("a fox", seed=0, **kw).images).max() > 10 * TOL
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "diffusers_keys.safetensors"))
    original = {k[len(VAE_PREFIX):]: v for k, v in to_original_layout(pipe.ckpt, "sdxl").items()
                if k.startswith(VAE_PREFIX)}
    save_file(original, str(tmp_path / "sdxl_vae.safetensors"))  # as sdxl-vae-fp16-fix ships it: bare keys
    for f in ("diffusers_keys.safetensors", "sdxl_vae.safetensors"):
        again = Pipeline.from_pretrained(str(xl["xl"]), vae=str(tmp_path / f))("a fox", seed=0, **kw).images
        assert np.abs(again - ours).max() <= 1e-6
    wrong = diffusers.AutoencoderKL(latent_channels=8, norm_num_groups=32, block_out_channels=[32, 64],
                                    down_block_types=["DownEncoderBlock2D"] * 2,
                                    up_block_types=["UpDecoderBlock2D"] * 2)
    with pytest.raises(CheckpointError, match="latent channels"):
        Pipeline.from_pretrained(str(xl["xl"]), vae=wrong)
    with pytest.raises(Exception, match="not found"):
        Pipeline.from_pretrained(str(xl["xl"]), vae=str(tmp_path / "missing"))


# ---- engines ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_store(xl, tmp_path_factory):
    from fastsd.export import export_checkpoint

    store = tmp_path_factory.mktemp("xl-engines")
    export_checkpoint(str(xl["xl"]), engine_dir=store)
    # the 9-channel UNet only: xl9's text encoders and VAE are xl's graphs with other weights
    export_checkpoint(str(xl["xl9"]), engine_dir=store, networks=("unet",))
    return store


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_onnxruntime_matches_eager(xl, xl_pipes, xl_store, init_image, mask_image, mode):
    import onnx

    graph = onnx.load(str(next(xl_store.rglob("text_encoder_2.onnx"))), load_external_data=False)
    assert [o.name for o in graph.graph.output] == ["text_embeddings", "text_embeds"]
    kw = dict(num_inference_steps=3, seed=2, output_type="np", negative_prompt="dark", prompt_2="fog")
    kw.update({"txt2img": dict(height=24, width=40), "img2img": dict(image=init_image, strength=0.7),
               "inpaint": dict(image=init_image, mask_image=mask_image)}[mode])
    for name in (["xl", "xl9"] if mode == "inpaint" else ["xl"]):
        engine = Pipeline.from_pretrained(str(xl[name]), backend="onnxruntime", engine_dir=str(xl_store))
        out = engine("a fox", **kw)
        if name == "xl":
            assert set(out.backends.values()) == {"onnxruntime"} and "text_encoder_2" in out.backends
        assert out.backends["unet"] == "onnxruntime"
        assert np.abs(out.images - xl_pipes(name)("a fox", **kw).images).max() <= TOL


def test_openvino_matches_eager(xl, xl_pipes, xl_store, init_image, mask_image):
    """OpenVINO fp32 entries compiled from the module's ONNX graphs (both text encoders, their
    two outputs, the added-conditioning UNet, the 9-channel inpainting UNet): as eager."""
    pytest.importorskip("openvino")
    from fastsd.export.openvino import build_openvino

    build_openvino(str(xl["xl"]), engine_dir=xl_store)
    build_openvino(str(xl["xl9"]), engine_dir=xl_store, networks=("unet",))
    kw = dict(num_inference_steps=3, seed=2, output_type="np", negative_prompt="dark", prompt_2="fog")
    for name, extra in (("xl", dict(height=24, width=40)), ("xl9", dict(image=init_image, mask_image=mask_image))):
        out = Pipeline.from_pretrained(str(xl[name]), backend="openvino", engine_dir=str(xl_store))("a fox", **kw,
                                                                                                   **extra)
        want = {"text_encoder", "text_encoder_2", "unet", "vae_decoder"} if name == "xl" else {"unet"}
        assert {out.backends[n] for n in want} == {"openvino"}
        assert np.abs(out.images - xl_pipes(name)("a fox", **kw, **extra).images).max() <= 2e-3


def test_streamed_export_names_every_weight(xl, xl_store):
    """Every network is exported without weights and gets them tensor by tensor in one
    external-data file, each under its parameter's name, transposed Linear weights folded
    (what keeps SD-XL's 10 GB UNet export within memory, and what refit relies on). The
    9-channel UNet of the module's store; test_onnxruntime_matches_eager[inpaint] runs it."""
    import onnx

    from fastsd.checkpoint import load_checkpoint
    from fastsd.families import family_for

    ckpt = load_checkpoint(str(xl["xl9"]))
    entry = next((xl_store / ckpt.info.fingerprint).glob("onnxruntime-fp32*"))
    graph = onnx.load(str(entry / "unet.onnx"), load_external_data=False).graph
    external = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    params = {n for n, _ in family_for(ckpt).modules(ckpt)["unet"].named_parameters()}
    assert external and external <= params  # every weight by its parameter's name
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in external]
    assert [i.name for i in graph.input] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]


def test_compiled_matches_eager(xl, xl_pipes, tmp_path, init_image, mask_image):
    """AOTInductor packages of the second text encoder (two outputs), the UNet (two extra
    inputs) and the VAE encoder, at the 40x48 of the test images: txt2img, img2img and inpaint
    on the engines, within 1e-3 of eager. (The VAE decoder's package is SD's build, run in
    test_compiled; the 9-channel XL UNet runs on ONNX Runtime above and the compiled kind
    builds it from the same spec. This is the suite's compiled UNet without the ControlNet
    residual inputs; the session's SD one has them. Each UNet package costs ~35 s of this suite.)"""
    from fastsd.export.compiled import build_compiled

    build_compiled(str(xl["xl"]), engine_dir=tmp_path, static="40x48",
                   networks=("text_encoder_2", "unet", "vae_encoder"))
    kw = dict(num_inference_steps=3, seed=2, output_type="np", negative_prompt="dark", height=40, width=48)
    engine = Pipeline.from_pretrained(str(xl["xl"]), backend="compiled", engine_dir=str(tmp_path))
    for mode, extra in (("txt2img", {}), ("img2img", dict(image=init_image, strength=0.7)),
                        ("inpaint", dict(image=init_image, mask_image=mask_image))):
        out = engine(["a fox", "a cat"], **kw, **extra)
        assert out.backends["unet"] == "compiled" and out.backends["text_encoder_2"] == "compiled", mode
        if mode != "txt2img":
            assert out.backends["vae_encoder"] == "compiled", mode
        want = xl_pipes("xl")(["a fox", "a cat"], **kw, **extra).images
        assert np.abs(out.images - want).max() <= TOL, mode


def test_exported_text_encoders_hold_no_buffers(ckpts, xl):
    """What AOTInductor compiles holds the weights and nothing else: the text encoders' position
    ids are computed in the graph, not read from CLIP's buffer, their inputs are floating point
    (token embeddings and the end-of-text mask: packages with an int64 input crashed the loader
    on an H200 with torch 2.11), the graph gives the module's own output, and the module keeps
    its buffer."""
    from fastsd.export.common import build_spec
    from fastsd.export.compiled import export_program

    from fastsd.checkpoint import load_checkpoint
    from fastsd.families import family_for

    for path in (ckpts["eps"], xl["xl"]):
        ckpt = load_checkpoint(str(path))
        family = family_for(ckpt)
        modules = family.modules(ckpt)
        for name in [n for n in family.networks if n.startswith("text_encoder")]:
            module, spec = modules[name].eval(), build_spec(family, name)
            ids = torch.randint(0, 100, (2, ckpt.info.max_tokens), generator=torch.Generator().manual_seed(0))
            ids[:, 20] = ckpt.tokenizer.eos_token_id
            args = tuple(family.text_inputs(name, ids).values())
            assert all(a.is_floating_point() for a in args), name
            program = export_program(module, spec, args)
            assert {s.kind.name for s in program.graph_signature.input_specs} == {"PARAMETER", "USER_INPUT"}, name
            assert list(module.buffers()), name  # put back after the export
            with torch.no_grad():
                want, got = module(*args), program.module()(*args)
            want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
            assert len(want) == len(got) and all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), name


def test_export_refuses_networks_the_family_lacks(ckpts, tmp_path):
    from fastsd.export import export_checkpoint

    with pytest.raises(InvalidArgumentError, match="no text_encoder_2"):
        export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path, networks=("text_encoder_2",))


# ---- bench and CLI -----------------------------------------------------------------------


def test_bench_against_diffusers_sdxl_one_backend_at_a_time(xl, tmp_path):
    """`fastsd bench` on an SD-XL checkpoint times diffusers' StableDiffusionXLPipeline as the
    baseline; --sequential runs each backend's process on its own (how full-size SD-XL fits a
    24 GiB CPU machine)."""
    pytest.importorskip("matplotlib")
    from fastsd.bench import default_config, run_bench
    from fastsd.bench.runner import one_at_a_time

    cfg = default_config(str(xl["xl"]), torch.device("cpu"), backends=("eager", "diffusers"), steps=(2,), warmup=0,
                         runs=2, engine_dir=str(tmp_path), sequential=True)
    result = run_bench(cfg, progress=lambda line: None)
    assert [r["backend"] for r in result.rows] == ["eager", "diffusers"]
    assert all(r["stages"]["text_encoder"]["median"] > 0 for r in result.rows)
    assert "vs_diffusers" in result.rows[0]
    assert any("one after another" in n for n in result.notes) and result.config["sequential"]
    from fastsd.bench import markdown

    assert "backends one after another" in markdown(result) and "runs interleaved" not in markdown(result)
    many = default_config("m", torch.device("cpu"), backends=("eager", "onnxruntime", "diffusers"))
    assert one_at_a_time(many, xl["xl"], torch.device("cpu")) is None  # tiny: side by side
    import fastsd.bench.runner as runner

    original = runner.weight_bytes
    try:
        runner.weight_bytes = lambda path: 14 * 2**40  # full-size SD-XL x 4 copies would not fit anywhere
        assert "would hold" in one_at_a_time(many, xl["xl"], torch.device("cpu"))
    finally:
        runner.weight_bytes = original


def test_cli_generate_sdxl(xl, tmp_path, capsys):
    import json as _json

    from PIL import Image

    from fastsd.cli import main

    out = tmp_path / "xl.png"
    assert main(["generate", "a fox", "--model", str(xl["xl"]), "--prompt-2", "oil painting", "--steps", "3",
                 "--height", "24", "--width", "32", "--seed", "5", "--out", str(out), "--no-progress"]) == 0
    assert "text_encoder_2=eager" in capsys.readouterr().out
    png = Image.open(out)
    settings = _json.loads(png.info["fastsd"])
    assert png.size == (32, 24) and settings["guidance_scale"] == 5.0 and settings["prompt_2"] == "oil painting"
    want = Pipeline.from_pretrained(str(xl["xl"]))("a fox", prompt_2="oil painting", num_inference_steps=3,
                                                   height=24, width=32, seed=5).images[0]
    assert np.abs(np.asarray(png, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1
    assert main(["generate", "a fox", "--model", str(xl["xl"]), "--prompt-2", "x", "--steps", "2",
                 "--out", str(tmp_path / "b.png"), "--vae", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_generator_per_image(xl, xl_pipes, init_image, mask_image):
    """A list of generators (one per image) draws as diffusers' SD-XL inpaint pipeline does."""
    import diffusers

    ref, cfg = reference(xl["xl9"], "inpaint")
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(cfg)
    kw = dict(prompt=["a", "b"], image=init_image, mask_image=mask_image, num_inference_steps=3, height=40,
              width=48, strength=0.8, output_type="np")
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    ours = xl_pipes("xl9")(scheduler="euler_a", generator=gens(), **kw).images
    theirs = ref(generator=gens(), **kw).images
    assert np.abs(ours - theirs).max() <= TOL


def test_force_upcast_vae_decodes_in_fp32_from_the_original_weights(xl, xl_pipes):
    """SD-XL's VAE says force_upcast: in fp16 it decodes in fp32 up front (as diffusers), with
    the weights as loaded (not an upcast of the fp16-cast ones), and out says so; in bf16 (as
    diffusers) and fp32 it decodes in the pipeline's precision."""
    import torch

    kw = dict(num_inference_steps=2, seed=0, height=32, width=32)
    half = Pipeline.from_pretrained(str(xl["xl"]), device="cpu", dtype="fp16")
    assert half.vae.config.force_upcast and next(half.vae.decoder.parameters()).dtype == torch.float16
    out = half("a lighthouse", output_type="np", **kw)
    assert out.backends["vae_decoder"] == "eager-fp32" and out.timings["vae_decoder_fp32"] > 0
    latents = half("a lighthouse", output_type="latent", **kw).images
    full = xl_pipes("xl")
    want = full._decode(latents, {}, {})
    assert torch.equal(half._decode(latents, {}, {}), want)  # bit for bit the fp32 pipeline's decode
    bf16 = Pipeline.from_pretrained(str(xl["xl"]), device="cpu", dtype="bf16")("a lighthouse", output_type="np", **kw)
    assert bf16.backends["vae_decoder"] == "eager" and "vae_decoder_fp32" not in bf16.timings
    assert "vae_decoder_fp32" not in full("a lighthouse", output_type="np", **kw).timings
