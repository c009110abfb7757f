"""ControlNet: parity with diffusers' StableDiffusion(XL)ControlNet{,Img2Img,Inpaint}Pipeline
(one and several ControlNets, guidance windows), engines (ONNX Runtime, compiled), loading
from folders / single files / the hub cache, the CLI, the server and bad input."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import copy_entries
from PIL import Image

from fastsd import Pipeline
from fastsd.errors import CheckpointError, FastSDError, InvalidArgumentError, ModelNotFoundError
from fastsd.synthetic import build, build_controlnet

TOL = 1e-3
STEPS = 5


@pytest.fixture(scope="module")
def cns(tmp_path_factory):
    """Two ControlNets for the tiny SD architecture, one for tiny SD-XL (random weights, the
    zero convolutions too, so their residuals change the image)."""
    root = tmp_path_factory.mktemp("controlnets")
    return {"a": build_controlnet(root / "a", "tiny", seed=5), "b": build_controlnet(root / "b", "tiny", seed=6),
            "xl": build_controlnet(root / "xl", "tiny-xl", seed=7)}


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    return {"xl": build(root / "xl", "tiny-xl"), "xl9": build(root / "xl9", "tiny-xl", unet_in_channels=9, seed=3)}


@pytest.fixture(scope="module")
def control():
    rng = np.random.default_rng(1)
    return (Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)))  # grayscale: converted to RGB


_PIPES: dict = {}


def ours(model, *controlnets, **kw) -> Pipeline:
    key = (str(model), tuple(map(str, controlnets)), tuple(sorted(kw.items())))
    if key not in _PIPES:
        _PIPES[key] = Pipeline.from_pretrained(str(model), controlnet=[str(c) for c in controlnets] or None, **kw)
    return _PIPES[key]


def theirs(cls: str, model, *controlnets):
    import diffusers

    key = (cls, str(model), tuple(map(str, controlnets)))
    if key not in _PIPES:
        nets = [diffusers.ControlNetModel.from_pretrained(str(c)) for c in controlnets]
        extra = {} if "XL" in cls else {"safety_checker": None, "requires_safety_checker": False}
        pipe = getattr(diffusers, cls).from_pretrained(str(model), controlnet=nets[0] if len(nets) == 1 else nets,
                                                       **extra)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = (pipe, dict(pipe.scheduler.config))
    return _PIPES[key]


def compare(cls, model, controlnets, scheduler=None, seed=0, backend_pipe=None, **kw) -> tuple[float, object]:
    """max |fastsd - diffusers| for the same call; kw in diffusers' names (txt2img: image= is
    the control image), fastsd's are derived."""
    import diffusers
    from conftest import DIFFUSERS_SCHEDULERS

    ref, config = theirs(cls, model, *controlnets)
    mine = dict(kw)
    if cls.endswith("ControlNetPipeline"):
        mine["control_image"] = mine.pop("image")
    if scheduler is not None:
        name, options = DIFFUSERS_SCHEDULERS[scheduler]
        ref.scheduler = getattr(diffusers, name).from_config(config, **options)
        mine["scheduler"] = scheduler
    else:
        ref.scheduler = type(ref.scheduler).from_config(config)
    pipe = backend_pipe or ours(model, *controlnets)
    a = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **mine)
    b = ref(generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    assert a.images.shape == b.shape
    return float(np.abs(a.images - b).max()), a


# ---- parity with diffusers (eager) ----------------------------------------------------------------


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_karras", "unipc"])
def test_txt2img_parity(ckpts, cns, control, scheduler, guidance):
    diff, out = compare("StableDiffusionControlNetPipeline", ckpts["eps"], [cns["a"]], scheduler, prompt="a fox",
                        image=control[0], num_inference_steps=STEPS, guidance_scale=guidance)
    assert diff <= TOL
    assert out.images.shape == (1, 40, 48, 3)  # txt2img takes its size from the control image
    assert out.backends["controlnet"] == "eager"


def test_v_prediction_batch_parity(ckpts, cns, control):
    """Two prompts with a control image each, two images per prompt, negatives."""
    diff, out = compare("StableDiffusionControlNetPipeline", ckpts["v"], [cns["a"]], "ddim", seed=3,
                        prompt=["a fox", "a cat"], negative_prompt=["blur", "dark"], image=list(control),
                        num_images_per_prompt=2, num_inference_steps=STEPS, height=32, width=40)
    assert diff <= TOL and out.images.shape == (4, 32, 40, 3)


@pytest.mark.parametrize("scheduler", ["euler", "heun"])
def test_multi_controlnet_window_parity(ckpts, cns, control, scheduler):
    """Residuals summed; per-ControlNet scales and guidance windows, counted over the loop's
    UNet calls as diffusers' controlnet_keep (Heun: 2n - 1 of them)."""
    diff, _ = compare("StableDiffusionControlNetPipeline", ckpts["eps"], [cns["a"], cns["b"]], scheduler,
                      prompt="a fox", image=list(control), num_inference_steps=6,
                      controlnet_conditioning_scale=[0.7, 1.4], control_guidance_start=[0.0, 0.3],
                      control_guidance_end=[0.6, 1.0])
    assert diff <= TOL


def test_img2img_parity(ckpts, cns, control, init_image):
    """Default strength 0.8 and conditioning scale 0.8, as StableDiffusionControlNetImg2ImgPipeline."""
    diff, out = compare("StableDiffusionControlNetImg2ImgPipeline", ckpts["eps"], [cns["a"]], "dpmpp_2m_sde",
                        prompt="a fox", image=init_image, control_image=control[0], num_inference_steps=6)
    assert diff <= TOL and out.images.shape == (1, 40, 48, 3)


@pytest.mark.parametrize("variant,strength", [("eps", 0.7), ("eps", 1.0), ("inpaint9", 1.0)])
def test_inpaint_parity(ckpts, cns, control, init_image, mask_image, variant, strength):
    """Conditioning scale 0.5 by default; the output takes the image's size; a 9-channel
    UNet's ControlNet reads the 4-channel latents."""
    diff, out = compare("StableDiffusionControlNetInpaintPipeline", ckpts[variant], [cns["a"]], "euler_a",
                        prompt="a fox", image=init_image, mask_image=mask_image, control_image=control[0],
                        strength=strength, num_inference_steps=6)
    assert diff <= TOL and out.images.shape == (1, 40, 48, 3)


@pytest.mark.parametrize("guidance", [None, 1.0])
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint", "inpaint9"])
def test_sdxl_parity(xl, cns, control, init_image, mask_image, mode, guidance):
    """SD-XL: the ControlNet takes the pooled text and time ids too; the family's ControlNet
    pipelines' defaults (img2img strength 0.8, inpaint guidance 5.0 and scale 1.0)."""
    cls = {"txt2img": "StableDiffusionXLControlNetPipeline", "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
           "inpaint": "StableDiffusionXLControlNetInpaintPipeline",
           "inpaint9": "StableDiffusionXLControlNetInpaintPipeline"}[mode]
    kw = {"image": control[0]} if mode == "txt2img" else {"image": init_image, "control_image": control[0]}
    if mode.startswith("inpaint"):
        kw["mask_image"] = mask_image
    if guidance is not None:
        kw["guidance_scale"] = guidance
    diff, _ = compare(cls, xl["xl9" if mode == "inpaint9" else "xl"], [cns["xl"]], prompt="a fox",
                      num_inference_steps=STEPS, **kw)
    assert diff <= TOL


def test_controlnet_changes_the_image_and_calls_without_it_do_not_run_it(ckpts, cns, control):
    """A pipeline with a ControlNet serves calls without control_image exactly as one without."""
    pipe, plain = ours(ckpts["eps"], cns["a"]), ours(ckpts["eps"])
    kw = dict(num_inference_steps=3, seed=2, output_type="np", height=40, width=48)
    guided, unguided, base = pipe("a fox", control_image=control[0], **kw), pipe("a fox", **kw), plain("a fox", **kw)
    assert np.array_equal(unguided.images, base.images) and "controlnet" not in unguided.backends
    assert np.abs(guided.images - base.images).max() > 0.02
    zero = pipe("a fox", control_image=control[0], controlnet_conditioning_scale=0.0, **kw)
    assert np.array_equal(zero.images, base.images)  # scale 0: the ControlNet is skipped, nothing changes


def test_steps_outside_the_window_skip_the_controlnet(ckpts, cns, control):
    """Outside every guidance window the ControlNet is not called (its residuals would be zeros)."""
    pipe = ours(ckpts["eps"], cns["a"])
    calls = []
    run = pipe.backend.run

    def counting(network, inputs, ran=None):
        calls.append(network)
        return run(network, inputs, ran)

    pipe.backend.run = counting
    try:
        pipe("a fox", control_image=control[0], num_inference_steps=8, scheduler="euler", control_guidance_start=0.25,
             control_guidance_end=0.75, seed=0)
    finally:
        del pipe.backend.run
    assert calls.count("controlnet") == 4  # steps 2..5 of 8


# ---- loading -------------------------------------------------------------------------------------


def _images(pipe, control_image, **kw):
    return pipe("a fox", control_image=control_image, num_inference_steps=3, seed=1, output_type="np", **kw).images


def test_single_files_load_as_the_folder(ckpts, cns, control, tmp_path):
    """A ControlNet as one .safetensors file, in the original layout (control_model.* keys, as
    lllyasviel's releases) and in diffusers' layout, gives the folder's images."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from fastsd.controlnet import controlnet_key

    model = ControlNetModel.from_pretrained(str(cns["a"]))
    sd = model.state_dict()
    hint = len(model.controlnet_cond_embedding.blocks)
    layers = model.config.layers_per_block
    save_file({"control_model." + controlnet_key(k, layers, hint): v.contiguous() for k, v in sd.items()},
              str(tmp_path / "original.safetensors"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "diffusers.safetensors"))
    want = _images(ours(ckpts["eps"], cns["a"]), control[0])
    for name in ("original", "diffusers"):
        pipe = Pipeline.from_pretrained(str(ckpts["eps"]), controlnet=str(tmp_path / f"{name}.safetensors"))
        assert np.array_equal(_images(pipe, control[0]), want), name
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), controlnet=model)  # a diffusers object
    assert np.array_equal(_images(pipe, control[0]), want)
    assert isinstance(pipe.controlnet, ControlNetModel)


def test_hub_cache(ckpts, cns, control, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny-controlnet"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(cns["a"], repo / "snapshots" / "0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), controlnet="acme/tiny-controlnet")
    assert np.array_equal(_images(pipe, control[0]), _images(ours(ckpts["eps"], cns["a"]), control[0]))
    with pytest.raises(ModelNotFoundError, match="acme/other"):
        Pipeline.from_pretrained(str(ckpts["eps"]), controlnet="acme/other")


def test_controlnets_that_do_not_fit_are_refused(ckpts, cns, tmp_path):
    with pytest.raises(CheckpointError, match="does not fit"):
        Pipeline.from_pretrained(str(ckpts["eps"]), controlnet=str(cns["xl"]))  # an SD-XL ControlNet on SD
    config = json.loads((cns["a"] / "config.json").read_text())
    shuffle = tmp_path / "shuffle"
    shutil.copytree(cns["a"], shuffle)
    (shuffle / "config.json").write_text(json.dumps(dict(config, global_pool_conditions=True)))
    with pytest.raises(CheckpointError, match="guess mode"):
        Pipeline.from_pretrained(str(ckpts["eps"]), controlnet=str(shuffle))
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        Pipeline.from_pretrained(str(ckpts["eps"]), controlnet=str(ckpts["eps"] / "vae" /
                                                                  "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelNotFoundError):
        Pipeline.from_pretrained(str(ckpts["eps"]), controlnet=str(tmp_path / "missing"))
    with pytest.raises(InvalidArgumentError, match="ControlNet must be"):
        Pipeline.from_pretrained(str(ckpts["eps"]), controlnet=3)


@pytest.mark.parametrize("kw,match", [
    ({"control_image": "CTL"}, "needs a ControlNet"),
    ({"controlnet_conditioning_scale": 0.5}, "applies to calls with a control_image"),
    ({"control_guidance_end": 0.5}, "applies to calls with a control_image"),
])
def test_bad_calls_without_controlnet(ckpts, control, kw, match):
    kw = {k: control[0] if v == "CTL" else v for k, v in kw.items()}
    with pytest.raises(InvalidArgumentError, match=match):
        ours(ckpts["eps"])("a fox", **kw)


@pytest.mark.parametrize("kw,match", [
    ({"control_image": "CTL"}, "list of 2 images"),
    ({"control_image": ["CTL"]}, "list of 2 images"),
    ({"control_image": ["CTL", "CTL"], "controlnet_conditioning_scale": [1.0, 1.0, 1.0]}, "3 values for 2"),
    ({"control_image": ["CTL", "CTL"], "controlnet_conditioning_scale": float("nan")}, "finite"),
    ({"control_image": ["CTL", "CTL"], "controlnet_conditioning_scale": 11.0}, r"must be in \[0, 10\], got 11"),
    ({"control_image": ["CTL", "CTL"], "control_guidance_start": 0.6, "control_guidance_end": 0.5}, "below"),
    ({"control_image": ["CTL", "CTL"], "control_guidance_end": 1.5}, r"control_guidance_end must be in \[0, 1\]"),
    ({"control_image": ["CTL", [object()]]}, "control_image must be"),
    ({"control_image": ["CTL", np.zeros((16, 16, 4), np.float32)]}, "RGB"),
    ({"control_image": [["CTL"] * 3, "CTL"]}, "control_image holds 3 images for 1 prompts"),
])
def test_bad_control_arguments(ckpts, cns, control, kw, match):
    kw = {k: ([[control[0] if x == "CTL" else x for x in i] if isinstance(i, list) else control[0] if
               isinstance(i, str) else i for i in v] if isinstance(v, list) else control[0] if v == "CTL" else v)
          for k, v in kw.items()}
    pipe = ours(ckpts["eps"], cns["a"], cns["b"])
    with pytest.raises(FastSDError, match=match):
        pipe("a fox", num_inference_steps=2, **kw)
    with pytest.raises(FastSDError, match=match):  # check_call (the server's) finds it too, running nothing
        pipe.check_call("a fox", num_inference_steps=2, **kw)


# ---- engines -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_store(ckpts, cns, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from fastsd.export import export_checkpoint

    store = tmp_path_factory.mktemp("cn-engines")
    lines = []
    export_checkpoint(str(ckpts["eps"]), engine_dir=store, controlnets=(str(cns["a"]), str(cns["b"])),
                      progress=lines.append)
    assert any(line.startswith("controlnet_2: refitted from") for line in lines), lines  # same architecture
    return store


def test_onnxruntime_engines_match_diffusers(ckpts, cns, control, ort_store, init_image, mask_image):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=ort_store,
                                    controlnet=[str(cns["a"]), str(cns["b"])])
    diff, out = compare("StableDiffusionControlNetPipeline", ckpts["eps"], [cns["a"], cns["b"]], "euler",
                        backend_pipe=pipe, prompt="a fox", image=list(control), num_inference_steps=STEPS,
                        control_guidance_end=[1.0, 0.5])
    assert diff <= TOL
    assert {out.backends[n] for n in ("unet", "controlnet", "controlnet_2")} == {"onnxruntime"}
    diff, out = compare("StableDiffusionControlNetInpaintPipeline", ckpts["eps"], [cns["a"], cns["b"]], "euler_a",
                        backend_pipe=pipe, prompt="a fox", image=init_image, mask_image=mask_image,
                        control_image=list(control), strength=0.7, num_inference_steps=STEPS)
    assert diff <= TOL and out.backends["controlnet_2"] == "onnxruntime"
    diff, out = compare("StableDiffusionControlNetImg2ImgPipeline", ckpts["eps"], [cns["a"], cns["b"]], "unipc",
                        backend_pipe=pipe, prompt="a fox", image=init_image, control_image=list(control),
                        num_inference_steps=STEPS)
    assert diff <= TOL and out.backends["vae_encoder"] == out.backends["controlnet"] == "onnxruntime"
    # the UNet engine with residual inputs serves calls without a ControlNet (zeros): as eager
    plain = pipe("a fox", num_inference_steps=3, seed=4, output_type="np")
    eager = ours(ckpts["eps"])("a fox", num_inference_steps=3, seed=4, output_type="np")
    assert plain.backends["unet"] == "onnxruntime" and np.abs(plain.images - eager.images).max() <= TOL
    # a long weighted prompt (a1111: 3 chunks, 231 tokens) takes the same text axis in the ControlNets
    long = dict(prompt="a (red:1.3) fox, " + "in the deep snow, " * 10, prompt_syntax="a1111",
                control_image=list(control),
                num_inference_steps=2, seed=4, output_type="np")
    out, want = pipe(**long), ours(ckpts["eps"], cns["a"], cns["b"])(**long)
    assert {out.backends[n] for n in ("unet", "controlnet", "controlnet_2")} == {"onnxruntime"}
    assert np.abs(out.images - want.images).max() <= 2e-3


def test_openvino_engines_match_diffusers(ckpts, cns, control, ort_store, init_image):
    """OpenVINO entries compiled from the module's ONNX graphs: the UNet with residual inputs
    and each ControlNet's own entry, as diffusers' ControlNet pipeline."""
    pytest.importorskip("openvino")
    from fastsd.export.openvino import build_openvino

    build_openvino(str(ckpts["eps"]), engine_dir=ort_store, networks=("unet", "controlnet", "controlnet_2"),
                   controlnets=(str(cns["a"]), str(cns["b"])))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="openvino", engine_dir=ort_store,
                                    controlnet=[str(cns["a"]), str(cns["b"])])
    diff, out = compare("StableDiffusionControlNetImg2ImgPipeline", ckpts["eps"], [cns["a"], cns["b"]], "unipc",
                        backend_pipe=pipe, prompt="a fox", image=init_image, control_image=list(control),
                        num_inference_steps=STEPS)
    assert diff <= 2e-3 and {out.backends[n] for n in ("unet", "controlnet", "controlnet_2")} == {"openvino"}


def test_unet_engine_without_residual_inputs(ckpts, eps_onnx, cns, control, tmp_path, caplog):
    """A UNet engine exported without ControlNet keeps serving calls without one; a call with
    a ControlNet runs its UNet in eager PyTorch (never the engine, which would drop the
    residuals), and says why."""
    pytest.importorskip("onnxruntime")
    copy_entries(eps_onnx, tmp_path, "onnxruntime-*")  # the session's plain export of eps
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=tmp_path,
                                    controlnet=str(cns["a"]))
    plain = pipe("a fox", num_inference_steps=2, seed=0)
    assert plain.backends["unet"] == "onnxruntime"
    with caplog.at_level("WARNING"):
        got = pipe("a fox", control_image=control[0], num_inference_steps=2, seed=0, output_type="np")
    assert got.backends["unet"] == "eager" and "without the ControlNet residual inputs" in caplog.text
    want = ours(ckpts["eps"], cns["a"])("a fox", control_image=control[0], num_inference_steps=2, seed=0,
                                        output_type="np")
    assert np.abs(got.images - want.images).max() <= TOL


def test_no_refit_from_a_graph_without_the_residual_inputs(ckpts, eps_onnx, cns, tmp_path):
    """A UNet exported with the ControlNet residual inputs is never written by refit from a
    donor graph that lacks them (here: a record listing no inputs, as entries made before
    inputs were recorded); it is exported, and its graph takes the residuals."""
    pytest.importorskip("onnxruntime")
    import onnx
    from fastsd.export import export_checkpoint

    from fastsd.engines import MANIFEST

    (donor,) = copy_entries(eps_onnx, tmp_path, "onnxruntime-*").glob("*/onnxruntime-*")
    manifest = json.loads((donor / MANIFEST).read_text())
    del manifest["networks"]["unet"]["inputs"]
    (donor / MANIFEST).write_text(json.dumps(manifest))
    lines = []
    entry = export_checkpoint(str(ckpts["v"]), engine_dir=tmp_path, networks=("unet",),  # same architecture
                              controlnets=(str(cns["a"]),), progress=lines.append)
    assert any(line.startswith("unet: exported") for line in lines), lines
    graph = onnx.load(str(entry / "unet.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input][-1] == "mid_residual"


def test_compiled_engines_match_diffusers(ckpts, cns, control, init_image, mask_image, eps_compiled, tmp_path):
    """The session's compiled UNet (built with the residual inputs, at 32x32) and this
    ControlNet compiled beside it: txt2img and inpaint at 32x32 within 1e-3 of diffusers."""
    from fastsd.backends.kind import export_module

    copy_entries(eps_compiled, tmp_path, "compiled-*")
    export_module("compiled").build_compiled(str(ckpts["eps"]), engine_dir=tmp_path, networks=("controlnet",),
                                             controlnets=(str(cns["a"]),))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", engine_dir=tmp_path,
                                    controlnet=str(cns["a"]))
    image, mask, hint = (im.crop((0, 0, 32, 32)) for im in (init_image, mask_image, control[0]))  # the packages' size
    diff, out = compare("StableDiffusionControlNetPipeline", ckpts["eps"], [cns["a"]], "dpmpp_2m",
                        backend_pipe=pipe, prompt="a fox", image=hint, num_inference_steps=STEPS)
    assert diff <= TOL and out.backends["unet"] == out.backends["controlnet"] == "compiled"
    diff, out = compare("StableDiffusionControlNetInpaintPipeline", ckpts["eps"], [cns["a"]], "euler",
                        backend_pipe=pipe, prompt="a fox", image=image, mask_image=mask,
                        control_image=hint, strength=0.7, num_inference_steps=STEPS)
    assert diff <= TOL and out.backends["unet"] == out.backends["controlnet"] == "compiled"
    assert out.images.shape[1:3] == (32, 32)


def test_controlnet_entry_is_keyed_by_its_weights(ckpts, cns, ort_store):
    from fastsd.controlnet import load_controlnet
    from fastsd.engines import list_entries

    rows = {r["checkpoint"]: r for r in list_entries(ort_store)}
    fingerprint = load_controlnet(str(cns["a"])).fingerprint
    assert rows[fingerprint]["networks"] == ["controlnet"] and not rows[fingerprint]["problems"]
    unet = next(r for r in rows.values() if "unet" in r["networks"])
    assert unet["manifest"]["networks"]["unet"]["inputs"][-1] == "mid_residual"


@pytest.mark.gpu
def test_cuda_graphs_with_controlnet(ckpts, cns, control):
    """The whole-step CUDA graph runs the ControlNets inside the step (at scale 0 outside the
    window, as diffusers): the same images as the plain loop."""
    kw = dict(control_image=control[0], num_inference_steps=6, control_guidance_end=0.5, seed=0, output_type="np")
    plain = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda", dtype="fp32", controlnet=str(cns["a"]))
    graphed = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda", dtype="fp32", controlnet=str(cns["a"]),
                                       cuda_graphs=True)
    assert np.abs(graphed("a fox", **kw).images - plain("a fox", **kw).images).max() <= TOL


# ---- CLI and server ----------------------------------------------------------------------------------


def test_cli_generate_and_export(ckpts, cns, control, tmp_path, capsys):
    from fastsd.cli import main

    control[0].save(tmp_path / "edges.png")
    out = tmp_path / "o.png"
    args = ["generate", "a fox", "--model", str(ckpts["eps"]), "--steps", "2", "--no-progress", "--seed", "3",
            "--out", str(out), "--controlnet", str(cns["a"]), "--control-image", str(tmp_path / "edges.png"),
            "--control-scale", "0.9"]
    assert main(args) == 0
    assert "controlnet=eager" in capsys.readouterr().out
    im = Image.open(out)
    settings = json.loads(im.text["fastsd"])
    assert im.size == (48, 40) and settings["controlnets"][0]["model"] == str(cns["a"])
    assert settings["controlnet_conditioning_scale"] == [0.9]
    want = ours(ckpts["eps"], cns["a"])("a fox", control_image=control[0], controlnet_conditioning_scale=0.9,
                                        num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(want.images[0]))
    for bad in (["--control-image", str(tmp_path / "edges.png")],  # no --controlnet
                ["--controlnet", str(cns["a"])],  # no --control-image
                ["--controlnet", str(cns["a"]), "--control-image", str(tmp_path / "missing.png")],
                ["--controlnet", str(cns["a"]), "--control-image", str(tmp_path / "edges.png"),
                 "--control-scale", "1", "--control-scale", "2"]):
        assert main(["generate", "a fox", "--model", str(ckpts["eps"]), "--steps", "2", "--no-progress",
                     "--out", str(tmp_path / "bad.png"), *bad]) == 2
        assert not (tmp_path / "bad.png").exists()
    pytest.importorskip("onnxruntime")
    assert main(["export", "--model", str(ckpts["eps"]), "--engine-dir", str(tmp_path / "store"), "--networks",
                 "controlnet", "--controlnet", str(cns["b"])]) == 0
    assert list((tmp_path / "store").glob("*/onnxruntime-fp32/controlnet.onnx"))


def test_server_takes_a_control_image(ckpts, cns, control):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fastsd.serve import ServeOptions, create_app

    pipe = ours(ckpts["eps"], cns["a"])
    buf = io.BytesIO()
    control[0].save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    with TestClient(create_app(ServeOptions(model=str(ckpts["eps"])), pipeline=pipe)) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a fox", "seed": 7, "num_inference_steps": 2,
                                                   "control_image": "data:image/png;base64," + b64,
                                                   "controlnet_conditioning_scale": 0.8})
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
        assert r.json()["size"] == "48x40"
        want = pipe("a fox", control_image=control[0], controlnet_conditioning_scale=0.8, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(7))
        assert np.abs(got.astype(int) - np.asarray(want.images[0]).astype(int)).max() <= 1
        for body, param in (({"control_image": "not base64!"}, "control_image"),
                            ({"control_image": [b64, b64]}, None),
                            ({"control_guidance_start": 0.5}, "control_guidance_start")):
            r = c.post("/v1/images/generations", json={"prompt": "a fox", "num_inference_steps": 2, **body})
            assert r.status_code == 400 and r.json()["error"]["message"], r.text
            if param:
                assert r.json()["error"]["param"] == param
    with TestClient(create_app(ServeOptions(model=str(ckpts["eps"])), pipeline=ours(ckpts["eps"]))) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a fox", "control_image": b64})
        assert r.status_code == 400 and "needs a ControlNet" in r.json()["error"]["message"]


def test_bench_with_controlnet(ckpts, cns, tmp_path, capsys):
    """`fastsd bench --controlnet`: fastsd and diffusers' ControlNet pipeline side by side."""
    from fastsd.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--model", str(ckpts["eps"]), "--controlnet", str(cns["a"]), "--backends",
                 "eager,diffusers", "--steps", "2", "--warmup", "0", "--runs", "1", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == {"eager", "diffusers"} and report["config"]["controlnets"] == [str(cns["a"])]
    assert rows["eager"]["ran"]["controlnet"] == "eager"
    assert rows["diffusers"]["stages"]["unet"]["median"] > 0
    assert "+ ControlNet" in (out / "bench.md").read_text()


def test_profile_shapes_with_residuals(ckpts, cns):
    """TensorRT profiles of the UNet with residual inputs and of the ControlNet: each residual
    at its level's size (ceil(h / 2**level), as stride-2 convolutions leave it)."""
    from fastsd.engines import Profile

    pipe = ours(ckpts["eps"], cns["a"])
    profile = Profile.for_model(pipe.info)  # tiny: 16..64 px, VAE factor 2, 1..4 images
    unet = pipe.family.specs["unet"].with_inputs(["down_residual_3", "mid_residual", "down_residual_0"])
    assert unet.input_names[-3:] == ("down_residual_0", "down_residual_3", "mid_residual")
    shapes = unet.profile_shapes(profile)
    assert shapes["down_residual_0"] == ((1, 32, 8, 8), (2, 32, 16, 16), (8, 32, 32, 32))
    assert shapes["mid_residual"] == ((1, 64, 4, 4), (2, 64, 8, 8), (8, 64, 16, 16))
    cn = pipe.family.specs["controlnet"]
    shapes = cn.profile_shapes(profile)
    assert shapes["controlnet_cond"] == ((1, 3, 16, 16), (2, 3, 32, 32), (8, 3, 64, 64))
    assert shapes["conditioning_scale"] == ((1,), (1,), (1,))
    assert cn.output_names == tuple(t.name for t in pipe.family.specs["unet"].optional_inputs)
    assert cn.shapes(2, 18, 22)["down_residual_3"] == (2, 64, 5, 6)  # 9x11 latents -> ceil: 5x6


def test_edits_take_control_image_files(ckpts, cns, control, init_image):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fastsd.serve import ServeOptions, create_app

    pipe = ours(ckpts["eps"], cns["a"])

    def png(im):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    with TestClient(create_app(ServeOptions(model=str(ckpts["eps"])), pipeline=pipe)) as c:
        r = c.post("/v1/images/edits", data={"prompt": "a fox", "seed": "5", "num_inference_steps": "2",
                                             "controlnet_conditioning_scale": "0.6"},
                   files=[("image", ("in.png", png(init_image))), ("control_image", ("c.png", png(control[0])))])
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
        want = pipe("a fox", image=init_image, control_image=control[0], controlnet_conditioning_scale=0.6,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(5))
        assert np.abs(got.astype(int) - np.asarray(want.images[0]).astype(int)).max() <= 1
        r = c.post("/v1/images/edits", data={"prompt": "a fox"},
                   files=[("image", ("in.png", png(init_image))), ("control_image", ("c.png", b"not an image"))])
        assert r.status_code == 400 and r.json()["error"]["param"] == "control_image"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_controlnet(ckpts, cns, control, tmp_path):
    """TensorRT engines for the UNet with residual inputs and the ControlNet (own entry), built
    from the fp16 ONNX graphs, against eager fp16."""
    import tensorrt as trt
    from fastsd.export import export_checkpoint
    from fastsd.export.tensorrt import build_mode, build_tensorrt

    source = build_mode(trt)[1]
    export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path, dtype=source, controlnets=(str(cns["a"]),))
    build_tensorrt(str(ckpts["eps"]), engine_dir=tmp_path, controlnets=(str(cns["a"]),))
    kw = dict(control_image=control[0], num_inference_steps=4, output_type="np", seed=0)
    out = Pipeline.from_pretrained(str(ckpts["eps"]), backend="tensorrt", engine_dir=str(tmp_path),
                                   controlnet=str(cns["a"]))("a fox", **kw)
    assert out.backends["unet"] == out.backends["controlnet"] == "tensorrt"
    eager = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda", controlnet=str(cns["a"]))("a fox", **kw)
    assert np.abs(out.images - eager.images).max() < 0.05


def test_controlnet_with_non_finite_weights_is_refused(ckpts, tmp_path):
    """A ControlNet folder whose weights hold NaN is refused at load, naming it."""
    from safetensors.torch import load_file, save_file

    from fastsd.errors import CheckpointError

    folder = build_controlnet(tmp_path / "cn", "tiny", seed=5)
    f = next(folder.glob("*.safetensors"))
    sd = load_file(str(f))
    sd["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"cn: weight conv_in.weight holds NaN or infinite"):
        Pipeline.from_pretrained(str(ckpts["eps"]), controlnet=str(folder))


def test_numpy_control_images_are_read_by_dtype_and_range(ckpts, cns, control):
    """A uint16 control array is scaled by 65535 (the image its uint8 twin gives; it ran
    unscaled, 257x too bright); a float array in [0, 255] and an int64 array cannot be read
    unambiguously and are refused before any work (they ran unscaled)."""
    from fastsd.errors import ImageError

    pipe = ours(ckpts["eps"], cns["a"])
    eight = np.asarray(control[0])
    sixteen = eight.astype(np.uint16) * 257  # the same values on a 16-bit scale
    assert np.array_equal(_images(pipe, sixteen), _images(pipe, eight))
    assert np.array_equal(_images(pipe, eight.astype(np.float32) / 255), _images(pipe, eight))
    with pytest.raises(ImageError, match=r"control_image has float values in \[0, 25\d\]"):
        pipe.check_call("a fox", control_image=eight.astype(np.float32))
    with pytest.raises(ImageError, match="control_image is an array of int64"):
        pipe.check_call("a fox", control_image=eight.astype(np.int64))
    with pytest.raises(ImageError, match=r"image has float values in \[-3, 1\]"):
        pipe.check_call("a fox", image=np.full((40, 48, 3), -3.0, np.float32) + np.eye(40, 48)[..., None] * 4)
