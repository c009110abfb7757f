"""IP-Adapter (image prompts): parity with diffusers' load_ip_adapter / ip_adapter_image on
the same random-weight adapters and image encoders (IP-Adapter and Plus, SD and SD-XL,
txt2img / img2img / inpaint, two adapters, per-block scales, ControlNet), engines, the CLI, the
server and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd import Pipeline
from fastsd.errors import CheckpointError, InvalidArgumentError, PickleRefusedError
from fastsd.synthetic import build, build_controlnet, build_ip_adapter

TOL = 1e-3
STEPS = 4
PLAIN, PLUS = "ip-adapter.safetensors", "ip-adapter-plus.safetensors"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Random-weight adapters in h94/IP-Adapter's layout, each with its image encoder."""
    root = tmp_path_factory.mktemp("ip-adapters")
    return {"plain": build_ip_adapter(root / "plain", "tiny", seed=5),
            "plus": build_ip_adapter(root / "plus", "tiny", plus=True, seed=6),
            "xl": build_ip_adapter(root / "xl", "tiny-xl", seed=7)}


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return build(tmp_path_factory.mktemp("xl") / "xl", "tiny-xl")


@pytest.fixture(scope="module")
def prompt_image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (36, 52, 3), dtype=np.uint8))


_REFS: dict = {}


def theirs(cls: str, model, folders: list, names: list, controlnet=None):
    """diffusers' pipeline `cls` with the adapters loaded (its image encoder: the first's)."""
    import diffusers

    key = (cls, str(model), tuple(map(str, folders)), tuple(names), str(controlnet))
    if key not in _REFS:
        extra = {} if "XL" in cls else {"safety_checker": None, "requires_safety_checker": False}
        if controlnet is not None:
            extra["controlnet"] = diffusers.ControlNetModel.from_pretrained(str(controlnet))
        pipe = getattr(diffusers, cls).from_pretrained(str(model), **extra)
        pipe.load_ip_adapter([str(f) for f in folders], subfolder=[""] * len(folders), weight_name=names)
        pipe.set_progress_bar_config(disable=True)
        _REFS[key] = pipe
    return _REFS[key]


def ours(model, folders: list, names: list, **kw) -> Pipeline:
    key = ("ours", str(model), tuple(map(str, folders)), tuple(names), tuple(sorted(kw.items())))
    if key not in _REFS:
        pipe = Pipeline.from_pretrained(str(model), **kw)
        pipe.load_ip_adapter([str(f) for f in folders], weight_name=names,
                             image_encoder=str(folders[0] / "image_encoder"))
        _REFS[key] = pipe
    return _REFS[key]


def compare(cls, model, folders, names, scale=1.0, seed=0, pipe=None, controlnet=None, **kw):
    """max |fastsd - diffusers| for the same call (diffusers' argument names) and fastsd's output."""
    import diffusers
    from conftest import DIFFUSERS_SCHEDULERS

    ref = theirs(cls, model, folders, names, controlnet)
    ref.set_ip_adapter_scale(scale)
    scheduler = kw.pop("scheduler", None)
    own, config = _REFS.setdefault(("scheduler", id(ref)), (type(ref.scheduler), dict(ref.scheduler.config)))
    if scheduler is None:
        ref.scheduler = own.from_config(config)
    else:
        name, options = DIFFUSERS_SCHEDULERS[scheduler]
        ref.scheduler = getattr(diffusers, name).from_config(config, **options)
    pipe = pipe or ours(model, folders, names)
    pipe.set_ip_adapter_scale(scale)
    mine = dict(kw)
    if "ControlNetPipeline" in cls:
        mine["control_image"] = mine.pop("image")
    a = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", scheduler=scheduler, **mine)
    b = ref(generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    assert a.images.shape == b.shape
    return float(np.abs(a.images - b).max()), a


# ---- parity with diffusers (eager fp32) ------------------------------------------------------


@pytest.mark.parametrize("guidance, scheduler", [(7.5, None), (1.0, None), (7.5, "euler_a"), (5.0, "dpmpp_2m")])
def test_txt2img_parity(ckpts, adapters, prompt_image, guidance, scheduler):
    diff, out = compare("StableDiffusionPipeline", ckpts["eps"], [adapters["plain"]], [PLAIN], scale=0.7,
                        prompt="a cat", ip_adapter_image=prompt_image, num_inference_steps=STEPS,
                        guidance_scale=guidance, scheduler=scheduler)
    assert diff <= TOL and out.backends["unet"] == "eager" and "image_encoder" in out.timings
    plain = ours(ckpts["eps"], [adapters["plain"]], [PLAIN])("a cat", num_inference_steps=STEPS, output_type="np",
                                                            guidance_scale=guidance, seed=0)
    assert np.abs(out.images - plain.images).max() > 0.01  # the image prompt changes the image


def test_img2img_and_inpaint_parity(ckpts, adapters, prompt_image, init_image, mask_image):
    kw = dict(prompt="a cat", ip_adapter_image=prompt_image, image=init_image, num_inference_steps=STEPS)
    diff, _ = compare("StableDiffusionImg2ImgPipeline", ckpts["eps"], [adapters["plain"]], [PLAIN], scale=0.6,
                      strength=0.7, **kw)
    assert diff <= TOL
    diff, _ = compare("StableDiffusionInpaintPipeline", ckpts["eps"], [adapters["plain"]], [PLAIN], scale=0.6,
                      mask_image=mask_image, **kw)
    assert diff <= TOL


def test_plus_parity(ckpts, adapters, prompt_image):
    """IP-Adapter Plus: the penultimate hidden states through the resampler; the unconditional
    prompt a black image's."""
    diff, _ = compare("StableDiffusionPipeline", ckpts["eps"], [adapters["plus"]], [PLUS], scale=0.8, prompt="a cat",
                      ip_adapter_image=prompt_image, num_inference_steps=STEPS)
    assert diff <= TOL


def test_two_adapters_and_per_block_scales(ckpts, adapters, prompt_image, init_image):
    folders, names = [adapters["plain"], adapters["plus"]], [PLAIN, PLUS]
    images = [prompt_image, init_image]
    diff, _ = compare("StableDiffusionPipeline", ckpts["eps"], folders, names, scale=[0.5, 0.9], prompt="a cat",
                      ip_adapter_image=images, num_inference_steps=STEPS)
    assert diff <= TOL
    style = {"up": {"block_1": [0.0, 1.0]}, "mid": 0.3}  # InstantStyle's per-block form
    diff, _ = compare("StableDiffusionPipeline", ckpts["eps"], folders, names, scale=[style, 0.6], prompt="a cat",
                      ip_adapter_image=images, num_inference_steps=STEPS)
    assert diff <= TOL


def test_scale_zero_is_the_plain_pipeline(ckpts, adapters, prompt_image, pipes):
    pipe = ours(ckpts["eps"], [adapters["plain"]], [PLAIN])
    pipe.set_ip_adapter_scale(0.0)
    got = pipe("a cat", ip_adapter_image=prompt_image, num_inference_steps=STEPS, seed=2, output_type="np")
    want = pipes("eps")("a cat", num_inference_steps=STEPS, seed=2, output_type="np")
    assert np.array_equal(got.images, want.images)
    diff, _ = compare("StableDiffusionPipeline", ckpts["eps"], [adapters["plain"]], [PLAIN], scale=0.0,
                      prompt="a cat", ip_adapter_image=prompt_image, num_inference_steps=STEPS)
    assert diff <= TOL


def test_sdxl_parity(xl, adapters, prompt_image, init_image):
    diff, _ = compare("StableDiffusionXLPipeline", xl, [adapters["xl"]], [PLAIN], scale=0.7, prompt="a cat",
                      ip_adapter_image=prompt_image, num_inference_steps=STEPS)
    assert diff <= TOL
    diff, _ = compare("StableDiffusionXLImg2ImgPipeline", xl, [adapters["xl"]], [PLAIN], scale=0.7, prompt="a cat",
                      ip_adapter_image=prompt_image, image=init_image, strength=0.6, num_inference_steps=STEPS)
    assert diff <= TOL


def test_with_controlnet_parity(ckpts, adapters, prompt_image, init_image, tmp_path_factory):
    cn = build_controlnet(tmp_path_factory.mktemp("ip-cn") / "cn", "tiny", seed=8)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), controlnet=str(cn))
    pipe.load_ip_adapter(str(adapters["plain"]), weight_name=PLAIN)
    diff, out = compare("StableDiffusionControlNetPipeline", ckpts["eps"], [adapters["plain"]], [PLAIN], scale=0.7,
                        pipe=pipe, controlnet=cn, prompt="a cat", image=init_image, ip_adapter_image=prompt_image,
                        num_inference_steps=STEPS)
    assert diff <= TOL and out.backends["controlnet"] == "eager"


def test_precomputed_embeds_equal_the_image(ckpts, adapters, prompt_image):
    """ip_adapter_image_embeds as diffusers' prepare_ip_adapter_image_embeds gives them."""
    ref = theirs("StableDiffusionPipeline", ckpts["eps"], [adapters["plus"]], [PLUS])
    embeds = ref.prepare_ip_adapter_image_embeds(prompt_image, None, torch.device("cpu"), 1, True)
    pipe = ours(ckpts["eps"], [adapters["plus"]], [PLUS])
    pipe.set_ip_adapter_scale(1.0)
    kw = dict(num_inference_steps=STEPS, seed=1, output_type="np")
    a = pipe("a cat", ip_adapter_image_embeds=embeds, **kw).images
    b = pipe("a cat", ip_adapter_image=prompt_image, **kw).images
    assert np.abs(a - b).max() <= 1e-5
    mine = pipe.prepare_ip_adapter_image_embeds(prompt_image, None, torch.device("cpu"), 1, True)
    assert len(mine) == 1 and mine[0].shape == embeds[0].shape and torch.allclose(mine[0], embeds[0], atol=1e-6)


def test_unload_restores_the_plain_pipeline(ckpts, adapters, prompt_image, pipes):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]))
    kw = dict(num_inference_steps=STEPS, seed=3, output_type="np")
    before = pipe("a cat", **kw).images
    pipe.load_ip_adapter(str(adapters["plain"] / PLAIN))  # the file itself: its image_encoder/ beside it
    assert pipe.ip_adapters[0]["tokens"] == 4 and pipe.ip_adapters[0]["variant"] == "ip-adapter"
    assert np.array_equal(pipe("a cat", **kw).images, before)  # no image prompt: the plain call
    assert not np.array_equal(pipe("a cat", ip_adapter_image=prompt_image, **kw).images, before)
    pipe.unload_ip_adapter()
    assert np.array_equal(pipe("a cat", **kw).images, before) and pipe.ip_adapters == []
    with pytest.raises(InvalidArgumentError, match="needs an IP-Adapter") as e:
        pipe("a cat", ip_adapter_image=prompt_image, **kw)
    assert e.value.param == "ip_adapter_image"


def test_moving_the_pipeline_moves_the_adapters(ckpts, adapters, prompt_image):
    """pipe.to(another dtype): the projections, the image encoder and the UNet's processors
    follow; the image stays the image (within bf16's rounding)."""
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]))
    pipe.load_ip_adapter(str(adapters["plain"]), weight_name=PLAIN)
    kw = dict(num_inference_steps=2, seed=5, output_type="np", ip_adapter_image=prompt_image)
    want = pipe("a cat", **kw).images
    pipe.to(torch.bfloat16)
    got = pipe("a cat", **kw)
    assert got.backends["image_encoder"] == "eager" and np.abs(got.images - want).max() < 0.1
    encoder = pipe._image_encoders.backend.eager.modules["image_encoder"]
    assert {next(m.parameters()).dtype for m in (encoder, pipe._ip[0].projection)} == {torch.bfloat16}


# ---- bad input ------------------------------------------------------------------------------


def test_adapters_that_do_not_fit_are_refused(ckpts, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe = Pipeline.from_pretrained(str(ckpts["eps"]))
    with pytest.raises(CheckpointError, match="cross-attention layers"):  # SD-XL's adapter on SD
        pipe.load_ip_adapter(str(adapters["xl"]), weight_name=PLAIN)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    other = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, image_size=32, patch_size=8,
                                                           projection_dim=24))
    with pytest.raises(CheckpointError, match="reads 16-wide image features; the image encoder .* gives 24"):
        pipe.load_ip_adapter(str(adapters["plain"]), weight_name=PLAIN, image_encoder=other)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / PLAIN).write_bytes((adapters["plain"] / PLAIN).read_bytes())
    with pytest.raises(CheckpointError, match="no image encoder"):
        pipe.load_ip_adapter(str(lone / PLAIN))
    faceid = load_file(str(adapters["plain"] / PLAIN))
    faceid["ip_adapter.1.to_k_lora.down.weight"] = torch.zeros(4, 4)
    save_file(faceid, str(lone / "faceid.safetensors"))
    with pytest.raises(CheckpointError, match="Face-ID"):
        pipe.load_ip_adapter(str(lone / "faceid.safetensors"), image_encoder=str(adapters["plain"] / "image_encoder"))
    torch.save({"image_proj": {}, "ip_adapter": {}}, lone / "old.bin")
    with pytest.raises(PickleRefusedError):
        pipe.load_ip_adapter(str(lone / "old.bin"))
    with pytest.raises(CheckpointError, match="3 weight files .* pass weight_name="):
        pipe.load_ip_adapter(str(lone))
    assert pipe.ip_adapters == []  # nothing half-loaded


@pytest.mark.parametrize("kw, match", [
    (dict(ip_adapter_image=[Image.new("RGB", (8, 8))] * 2), "2 entries for 1 IP-Adapters"),
    (dict(ip_adapter_image=3), "must be a PIL image"),
    (dict(ip_adapter_image_embeds=[torch.zeros(3, 1, 16)]), "has 3 rows"),
    (dict(ip_adapter_image_embeds=torch.zeros(2, 1, 16)), "list of 1 tensors"),
])
def test_bad_calls_are_refused_before_work(ckpts, adapters, kw, match):
    pipe = ours(ckpts["eps"], [adapters["plain"]], [PLAIN])
    with pytest.raises(InvalidArgumentError, match=match):
        pipe.check_call("a cat", **kw)
    with pytest.raises(InvalidArgumentError, match="pass one, not both"):
        pipe.check_call("a cat", ip_adapter_image=Image.new("RGB", (8, 8)),
                        ip_adapter_image_embeds=[torch.zeros(2, 1, 16)])
    with pytest.raises(InvalidArgumentError, match="per-block IP-Adapter scales take the keys"):
        pipe.set_ip_adapter_scale({"left": 1.0})
    with pytest.raises(InvalidArgumentError, match="2 values for 1 IP-Adapters"):
        pipe.set_ip_adapter_scale([1.0, 0.5])


# ---- engines ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ip_store(ckpts, adapters, tmp_path_factory):
    """The eps checkpoint's UNet exported (ONNX fp32) with the plain adapter's inputs, and the
    adapter's image encoder (the text encoder and VAE run eager beside them)."""
    pytest.importorskip("onnxruntime")
    from fastsd.export import export_checkpoint

    store = tmp_path_factory.mktemp("ip-engines")
    export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("unet", "image_encoder"),
                      ip_adapters=(str(adapters["plain"]),))
    return store


def test_onnxruntime_engine_takes_the_image_prompt(ckpts, adapters, ip_store, prompt_image, pipes):
    import json

    entries = {e.name: e for e in ip_store.glob("*/onnxruntime-fp32/unet.onnx")}, list(
        ip_store.glob("*/onnxruntime-fp32/image_encoder.onnx"))
    assert len(entries[0]) == 1 and len(entries[1]) == 1  # the image encoder in an entry of its own
    entry = next(iter(entries[0].values())).parent
    assert entries[1][0].parent.parent != entry.parent
    record = json.loads((entry / "manifest.json").read_text())["networks"]["unet"]
    assert record["ip_tokens"] == [4] and "ip_tokens_0" in record["inputs"] and "ip_scale_0" in record["inputs"]
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=ip_store)
    kw = dict(num_inference_steps=STEPS, seed=1, output_type="np")
    plain = pipe("a cat", **kw)  # no adapter loaded: the engine runs with zero scales
    assert plain.backends["unet"] == "onnxruntime"
    assert np.abs(plain.images - pipes("eps")("a cat", **kw).images).max() <= 2e-3
    pipe.load_ip_adapter(str(adapters["plain"]), weight_name=PLAIN)
    (unet,) = pipe.backend.engines["unet"]
    assert unet.ip_now == unet.ip_held and unet.runner._overrides == {}  # the adapter its files hold: no refit
    pipe.set_ip_adapter_scale(0.7)
    diff, out = compare("StableDiffusionPipeline", ckpts["eps"], [adapters["plain"]], [PLAIN], scale=0.7, pipe=pipe,
                        prompt="a cat", ip_adapter_image=prompt_image, num_inference_steps=STEPS)
    assert out.backends["unet"] == out.backends["image_encoder"] == "onnxruntime" and diff <= 2e-3
    # another adapter of the same shapes (the Plus one gives 4 tokens too): a refit, not a rebuild
    pipe.load_ip_adapter(str(adapters["plus"]), weight_name=PLUS)
    assert unet.ip_now != unet.ip_held and any(".to_k_ip." in n for n in unet.runner._overrides)  # refitted
    got = pipe("a cat", ip_adapter_image=prompt_image, **kw)
    want = ours(ckpts["eps"], [adapters["plus"]], [PLUS])
    want.set_ip_adapter_scale(1.0)
    assert got.backends["unet"] == "onnxruntime" and got.backends["image_encoder"] == "eager"  # Plus' own encoder
    assert np.abs(got.images - want("a cat", ip_adapter_image=prompt_image, **kw).images).max() <= 2e-3


def test_engine_without_the_inputs_runs_the_call_eager(ckpts, adapters, eps_onnx, prompt_image, tmp_path, caplog):
    """A UNet engine exported without IP-Adapter inputs serves plain calls; a call with an image
    prompt runs its UNet in eager PyTorch, and says why."""
    from conftest import copy_entries

    copy_entries(eps_onnx, tmp_path, "onnxruntime-*")
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=tmp_path)
    pipe.load_ip_adapter(str(adapters["plain"]), weight_name=PLAIN)
    kw = dict(num_inference_steps=2, seed=0, output_type="np")
    assert pipe("a cat", **kw).backends["unet"] == "onnxruntime"
    with caplog.at_level("WARNING"):
        got = pipe("a cat", ip_adapter_image=prompt_image, **kw)
    assert got.backends["unet"] == "eager" and "without the inputs of this many IP-Adapters" in caplog.text
    want = ours(ckpts["eps"], [adapters["plain"]], [PLAIN])
    want.set_ip_adapter_scale(1.0)
    assert np.abs(got.images - want("a cat", ip_adapter_image=prompt_image, **kw).images).max() <= TOL


def test_compiled_engine_takes_the_image_prompt(ckpts, adapters, prompt_image, tmp_path):
    """An AOTInductor UNet package with the adapter's inputs: within 2e-3 of eager."""
    from fastsd.export.compiled import build_compiled

    build_compiled(str(ckpts["eps"]), engine_dir=tmp_path, networks=("unet",), ip_adapters=(str(adapters["plain"]),))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", engine_dir=tmp_path)
    pipe.load_ip_adapter(str(adapters["plain"]), weight_name=PLAIN)
    pipe.set_ip_adapter_scale(0.8)
    kw = dict(num_inference_steps=STEPS, seed=2, output_type="np")
    got = pipe("a cat", ip_adapter_image=prompt_image, **kw)
    want = ours(ckpts["eps"], [adapters["plain"]], [PLAIN])
    want.set_ip_adapter_scale(0.8)
    assert got.backends["unet"] == "compiled"
    assert np.abs(got.images - want("a cat", ip_adapter_image=prompt_image, **kw).images).max() <= 2e-3


# ---- CLI and server ----------------------------------------------------------------------


def test_cli_generate_and_export(ckpts, adapters, prompt_image, tmp_path, capsys):
    import json

    from fastsd.cli import main

    prompt_image.save(tmp_path / "style.png")
    out = tmp_path / "o.png"
    base = ["generate", "a cat", "--model", str(ckpts["eps"]), "--steps", "2", "--no-progress", "--seed", "3"]
    assert main([*base, "--out", str(out), "--ip-adapter", str(adapters["plain"]), "--ip-image",
                 str(tmp_path / "style.png"), "--ip-scale", "0.6"]) == 0
    assert "image_encoder" in capsys.readouterr().out
    im = Image.open(out)
    settings = json.loads(im.text["fastsd"])
    assert settings["ip_adapters"] == [{"model": str(adapters["plain"]), "image": str(tmp_path / "style.png"),
                                        "scale": 0.6}]
    want = ours(ckpts["eps"], [adapters["plain"]], [PLAIN])
    want.set_ip_adapter_scale(0.6)
    want = want("a cat", ip_adapter_image=prompt_image, num_inference_steps=2, prompt_syntax="a1111",
                generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(want.images[0]))
    for bad in (["--ip-image", str(tmp_path / "style.png")],  # no --ip-adapter
                ["--ip-adapter", str(adapters["plain"])],  # no --ip-image
                ["--ip-adapter", str(adapters["plain"]), "--ip-image", str(tmp_path / "missing.png")],
                ["--ip-adapter", str(adapters["plain"]), "--ip-image", str(tmp_path / "style.png"),
                 "--ip-scale", "1", "--ip-scale", "2"],
                ["--ip-adapter", str(adapters["xl"]), "--ip-image", str(tmp_path / "style.png")]):  # SD-XL's
        assert main([*base, "--out", str(tmp_path / "bad.png"), *bad]) == 2
        assert not (tmp_path / "bad.png").exists()
    pytest.importorskip("onnxruntime")
    assert main(["export", "--model", str(ckpts["eps"]), "--engine-dir", str(tmp_path / "store"), "--networks",
                 "unet", "--ip-adapter", str(adapters["plain"])]) == 0
    (entry,) = (tmp_path / "store").glob("*/onnxruntime-fp32")
    assert json.loads((entry / "manifest.json").read_text())["networks"]["unet"]["ip_tokens"] == [4]


def test_server_takes_an_image_prompt(ckpts, adapters, prompt_image):
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient

    from fastsd.serve import ServeOptions, create_app

    pipe = ours(ckpts["eps"], [adapters["plain"]], [PLAIN])
    pipe.set_ip_adapter_scale(1.0)
    buf = io.BytesIO()
    prompt_image.save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    with TestClient(create_app(ServeOptions(model=str(ckpts["eps"])), pipeline=pipe)) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat", "seed": 7, "num_inference_steps": 2,
                                                   "ip_adapter_image": b64})
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
        want = pipe("a cat", ip_adapter_image=prompt_image, num_inference_steps=2, prompt_syntax="a1111",
                    generator=torch.Generator().manual_seed(7))
        assert np.abs(got.astype(int) - np.asarray(want.images[0]).astype(int)).max() <= 1
        files = {"image": ("i.png", buf.getvalue(), "image/png"),
                 "ip_adapter_image": ("s.png", buf.getvalue(), "image/png")}
        r = c.post("/v1/images/edits", data={"prompt": "a cat", "num_inference_steps": "2"}, files=files)
        assert r.status_code == 200, r.text
        for body in ({"ip_adapter_image": "not base64!"}, {"ip_adapter_image": [b64, b64]}):
            r = c.post("/v1/images/generations", json={"prompt": "a cat", "num_inference_steps": 2, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == "ip_adapter_image", r.text
    with TestClient(create_app(ServeOptions(model=str(ckpts["eps"])), pipeline=Pipeline.from_pretrained(
            str(ckpts["eps"])))) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat", "ip_adapter_image": b64})
        assert r.status_code == 400 and "needs an IP-Adapter" in r.json()["error"]["message"]


def test_lora_beside_an_adapter_on_the_engine(ckpts, adapters, ip_store, prompt_image, tmp_path):
    """A LoRA fused and unloaded on a UNet engine refitted to another adapter: the engine keeps
    that adapter's projections (the LoRA's unload puts the entry's own weights back, then the
    loaded adapter's), and its images stay within 2e-3 of eager."""
    from test_lora import peft_lora

    lora = str(peft_lora(ckpts["eps"], tmp_path, seed=3))
    kw = dict(num_inference_steps=3, seed=4, output_type="np", ip_adapter_image=prompt_image)
    pipes = [Pipeline.from_pretrained(str(ckpts["eps"]), backend=b, engine_dir=ip_store)
             for b in ("onnxruntime", "eager")]
    for pipe in pipes:
        pipe.load_ip_adapter(str(adapters["plus"]), weight_name=PLUS)
        pipe.load_lora(lora)
    got, want = (pipe("a cat", **kw) for pipe in pipes)
    assert got.backends["unet"] == "onnxruntime" and np.abs(got.images - want.images).max() <= 2e-3
    for pipe in pipes:
        pipe.unload_lora()
    (unet,) = pipes[0].backend.engines["unet"]
    assert unet.ip_now == (pipes[0].ip_adapters[0]["fingerprint"],)
    got, want = (pipe("a cat", **kw) for pipe in pipes)
    assert got.backends["unet"] == "onnxruntime" and np.abs(got.images - want.images).max() <= 2e-3


def test_openvino_engine_takes_the_image_prompt(ckpts, adapters, ip_store, prompt_image, tmp_path):
    """OpenVINO compiled from the ONNX UNet with the adapter's inputs (built with the same
    --ip-adapter, as the export's record asks), and the image encoder's own entry."""
    pytest.importorskip("openvino")
    import shutil

    from fastsd.export.openvino import build_openvino

    from fastsd.errors import FastSDError

    store = tmp_path / "store"
    shutil.copytree(ip_store, store)
    with pytest.raises(FastSDError, match="same --ip-adapter"):
        build_openvino(str(ckpts["eps"]), engine_dir=store, networks=("unet",))
    build_openvino(str(ckpts["eps"]), engine_dir=store, networks=("unet", "image_encoder"),
                   ip_adapters=(str(adapters["plain"]),))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="openvino", engine_dir=store)
    pipe.load_ip_adapter(str(adapters["plain"]), weight_name=PLAIN)
    kw = dict(num_inference_steps=STEPS, seed=2, output_type="np", ip_adapter_image=prompt_image)
    got = pipe("a cat", **kw)
    want = ours(ckpts["eps"], [adapters["plain"]], [PLAIN])
    want.set_ip_adapter_scale(1.0)
    assert got.backends["unet"] == got.backends["image_encoder"] == "openvino"
    assert np.abs(got.images - want("a cat", **kw).images).max() <= 2e-3


@pytest.mark.gpu
def test_cuda_graphs_with_an_image_prompt(ckpts, adapters, prompt_image):
    """The whole-step CUDA graph takes the image tokens and scales as static inputs: the same
    images as the plain loop, and a new image prompt (same shapes) replays the same graph."""
    kw = dict(num_inference_steps=4, seed=0, output_type="np")
    pipes = [Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda", dtype="fp32", cuda_graphs=graphs)
             for graphs in (False, True)]
    for pipe in pipes:
        pipe.load_ip_adapter(str(adapters["plain"]), weight_name=PLAIN)
    plain, graphed = pipes
    for image in (prompt_image, prompt_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        want = plain("a cat", ip_adapter_image=image, **kw).images
        assert np.abs(graphed("a cat", ip_adapter_image=image, **kw).images - want).max() <= TOL
    assert len(graphed._graphs.graphs) == 1 and not graphed._graphs.refused
