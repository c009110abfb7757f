"""LoRA (fused, as diffusers' fuse_lora) against diffusers' load_lora_weights + set_adapters on
tiny SD and tiny SD-XL, for diffusers/PEFT files and kohya files (SD-XL's in the original
sgm layout); several at once, scale changes, exact restore on unload; on ONNX Runtime and
compiled engines by refit; and a new checkpoint of an exported architecture refitted."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import copy_entries

from fastsd import Pipeline
from fastsd.errors import InvalidArgumentError, ModelNotFoundError, UnsupportedError
from fastsd.synthetic import build

TOL = 1e-3
KW = dict(num_inference_steps=3, output_type="np", guidance_scale=7.5)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, ckpts):
    root = tmp_path_factory.mktemp("lora-models")
    return {"sd": ckpts["eps"], "xl": build(root / "xl", "tiny-xl", seed=6),
            "sd_b": build(root / "sd_b", "tiny", seed=7)}


def _diffusers(path):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = json.loads((path / "model_index.json").read_text())
        cls = getattr(diffusers, index["_class_name"])
        pipe = cls.from_pretrained(str(path), **({"safety_checker": None} if "safety_checker" in index else {}))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peft_lora(path, out, seed: int, rank: int = 4, alpha: float = 8.0):
    """A diffusers/PEFT LoRA file (UNet and every text encoder), as diffusers' save_lora_weights writes it."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = _diffusers(path)
    torch.manual_seed(seed)
    layers, metadata = {}, {}
    for name, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
        inject_adapter_in_model(config, model)
        layers[f"{name}_lora_layers"] = {k: v * 0.5 for k, v in get_peft_model_state_dict(model).items()}
        metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(str(out), safe_serialization=True, **layers, **metadata)
    return out / "pytorch_lora_weights.safetensors"


def kohya_lora(path, out, seed: int, rank: int = 4, alpha: float = 2.0, text: bool = True):
    """A kohya/A1111 LoRA file: lora_unet_* (SD-XL: the original sgm layout's names), lora_te_*
    (SD-XL: lora_te1_* / lora_te2_*), lora_down / lora_up / alpha; conv LoRAs with 3x3 down
    factors. Beside it, `twin.safetensors`: the same factors in diffusers/PEFT naming."""
    from safetensors.torch import save_file

    from fastsd.checkpoint import load_checkpoint
    from fastsd.lora import _sgm_names

    ckpt = load_checkpoint(str(path))
    gen = torch.Generator().manual_seed(seed)
    xl = ckpt.text_encoder_2 is not None
    sgm = {v: k for k, v in _sgm_names(ckpt.unet).items()}
    kohya, twin = {}, {}

    def add(prefix: str, name: str, network: str, module_name: str, module):
        w = module.weight
        down = torch.randn((rank, *w.shape[1:]), generator=gen) * 0.3
        up = torch.randn((w.shape[0], rank, *([1] * (w.ndim - 2))), generator=gen) * 0.3
        key = prefix + name.replace(".", "_")
        kohya.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                      f"{key}.alpha": torch.tensor(alpha)})
        twin.update({f"{network}.{module_name}.lora_A.weight": down, f"{network}.{module_name}.lora_B.weight": up})

    for name, module in ckpt.unet.named_modules():
        targeted = any(name.endswith("." + t) for t in UNET_TARGETS) and "attentions" in name
        if targeted or name.endswith("resnets.0.conv1"):
            add("lora_unet_", sgm[name] if xl else name, "unet", name, module)
    encoders = [("lora_te1_" if xl else "lora_te_", "text_encoder", ckpt.text_encoder)]
    encoders += [("lora_te2_", "text_encoder_2", ckpt.text_encoder_2)] if xl else []
    for prefix, network, model in encoders if text else ():
        for name, module in model.named_modules():
            if any(name.endswith("." + t) for t in TEXT_TARGETS):
                add(prefix, "text_model." + name.removeprefix("text_model."), network, name, module)
    out.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(out / "kohya.safetensors"))
    meta = {n: {"r": rank, "lora_alpha": alpha} for n in ("unet", "text_encoder", "text_encoder_2")}
    save_file(twin, str(out / "twin.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    return out / "kohya.safetensors"


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        ("sd", "peft"): peft_lora(models["sd"], root / "sd-peft", 1),
        ("sd", "peft2"): peft_lora(models["sd"], root / "sd-peft2", 2, rank=2, alpha=1.0),
        ("sd", "kohya"): kohya_lora(models["sd"], root / "sd-kohya", 3, text=False),
        ("sd", "kohya-te"): kohya_lora(models["sd"], root / "sd-kohya-te", 3),
        ("xl", "peft"): peft_lora(models["xl"], root / "xl-peft", 4),
        ("xl", "kohya"): kohya_lora(models["xl"], root / "xl-kohya", 5, text=False),
        ("xl", "kohya-te"): kohya_lora(models["xl"], root / "xl-kohya-te", 5),
    }


def _run(pipe, seed=0, **kw):
    return pipe("a red fox", generator=torch.Generator().manual_seed(seed), **{**KW, **kw}).images


@pytest.mark.parametrize("family,fmt", [("sd", "peft"), ("sd", "kohya"), ("xl", "peft"), ("xl", "kohya")])
def test_lora_matches_diffusers(models, files, family, fmt):
    ref = _diffusers(models[family])
    ref.load_lora_weights(str(files[family, fmt]), adapter_name="a")
    ref.set_adapters(["a"], [0.8])
    want = _run(ref)
    pipe = Pipeline.from_pretrained(str(models[family]), device="cpu", backend="eager")
    pipe.scheduler = "ddim"
    base = _run(pipe)
    assert pipe.load_lora(files[family, fmt], scale=0.8) == files[family, fmt].stem
    got = _run(pipe)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(got - base).max() > 100 * TOL  # the LoRA does change the image
    networks = {"unet"} | ({"text_encoder"} | ({"text_encoder_2"} if family == "xl" else set()) if fmt == "peft"
                           else set())
    assert set(pipe.loras[0]["networks"]) == networks and pipe.loras[0]["scale"] == 0.8
    pipe.unload_lora()
    assert np.array_equal(_run(pipe), base)


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_kohya_text_encoder_keys(models, files, family):
    """kohya's text-encoder keys (lora_te_ / lora_te1_ / lora_te2_) fuse the same update as the
    same factors under diffusers/PEFT names (diffusers itself cannot be the oracle here: with
    transformers 5 its kohya text-encoder conversion loads the wrong keys)."""
    pipe = Pipeline.from_pretrained(str(models[family]), device="cpu", backend="eager")
    kohya = files[family, "kohya-te"]
    pipe.load_lora(kohya)
    fused = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    assert set(pipe.loras[0]["networks"]) >= {"text_encoder", "unet"}
    got = _run(pipe)
    pipe.unload_lora()
    pipe.load_lora(kohya.parent / "twin.safetensors")
    assert all(torch.equal(fused[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert np.array_equal(_run(pipe), got)
    pipe.unload_lora()


def test_two_loras_scales_and_exact_unload(models, files):
    ref = _diffusers(models["sd"])
    ref.load_lora_weights(str(files["sd", "peft"]), adapter_name="a")
    ref.load_lora_weights(str(files["sd", "kohya"]), adapter_name="b")
    pipe = Pipeline.from_pretrained(str(models["sd"]), device="cpu", backend="eager")
    pipe.scheduler = "ddim"
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = _run(pipe)
    pipe.load_lora(files["sd", "peft"], scale=0.8, name="a")
    pipe.load_lora(files["sd", "kohya"], scale=0.5, name="b")
    ref.set_adapters(["a", "b"], [0.8, 0.5])
    assert np.abs(_run(pipe) - _run(ref)).max() <= TOL
    pipe.set_lora_scale("a", 0.3)
    ref.set_adapters(["a", "b"], [0.3, 0.5])
    assert np.abs(_run(pipe) - _run(ref)).max() <= TOL
    pipe.unload_lora("a")
    ref.set_adapters(["b"], [0.5])
    assert np.abs(_run(pipe) - _run(ref)).max() <= TOL
    assert [lora["name"] for lora in pipe.loras] == ["b"]
    pipe.unload_lora()
    assert pipe.loras == []
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # bit for bit
    assert np.array_equal(_run(pipe), base)


def test_bad_loras_are_clear_errors(models, files, tmp_path):
    from safetensors.torch import save_file

    pipe = Pipeline.from_pretrained(str(models["sd"]), device="cpu", backend="eager")
    with pytest.raises(InvalidArgumentError, match="does not match this model.*e.g. text_encoder_2"):
        pipe.load_lora(files["xl", "kohya-te"])  # an SD-XL LoRA on SD 1.x
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InvalidArgumentError, match="unet.nothing_here"):
        pipe.load_lora(tmp_path / "wrong.safetensors")
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "notlora.safetensors"))
    with pytest.raises(InvalidArgumentError, match="not LoRA weights fastsd reads, e.g. model.weight"):
        pipe.load_lora(tmp_path / "notlora.safetensors")
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(4, 2, 1, 1),
               "lora_unet_conv_in.dora_scale": torch.zeros(4)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(InvalidArgumentError, match="DoRA"):
        pipe.load_lora(tmp_path / "dora.safetensors")
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 5, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(InvalidArgumentError, match="another model"):
        pipe.load_lora(tmp_path / "shape.safetensors")
    with pytest.raises(ModelNotFoundError):
        pipe.load_lora(tmp_path / "missing.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match="safetensors"):
        pipe.load_lora(tmp_path / "x.ckpt")
    with pytest.raises(InvalidArgumentError, match="finite number"):
        pipe.load_lora(files["sd", "peft"], scale=float("nan"))
    with pytest.raises(InvalidArgumentError, match="no LoRA named 'x'"):
        pipe.set_lora_scale("x", 1.0)
    pipe.load_lora(files["sd", "peft"], name="a")
    with pytest.raises(InvalidArgumentError, match="already loaded"):
        pipe.load_lora(files["sd", "kohya"], name="a")
    with pytest.raises(InvalidArgumentError, match="inside a pipeline call"):
        pipe("x", num_inference_steps=1, output_type="latent", callback=lambda *a: pipe.unload_lora())
    with pytest.raises(UnsupportedError, match="pipe.load_lora"):
        pipe.load_lora_weights(str(files["sd", "peft"]))
    pipe.unload_lora()


@pytest.fixture(scope="module")
def engine_store(eps_onnx, eps_compiled, tmp_path_factory):
    """models["sd"]'s ONNX export and compiled packages at 32x32 (the session's, copied)."""
    store = copy_entries(eps_onnx, tmp_path_factory.mktemp("lora-engines"), "onnxruntime-*")
    return copy_entries(eps_compiled, store, "compiled-fp32-32x32")


@pytest.fixture(scope="module")
def openvino_store(engine_store, models, tmp_path_factory):
    """models["sd"]'s OpenVINO fp32 entry, compiled from the module's ONNX graphs."""
    pytest.importorskip("openvino")
    from fastsd.export.openvino import build_openvino

    store = copy_entries(engine_store, tmp_path_factory.mktemp("lora-openvino"), "onnxruntime-fp32")
    build_openvino(str(models["sd"]), engine_dir=store)
    return store


@pytest.mark.parametrize("backend", ["onnxruntime", "compiled", "openvino"])
def test_lora_on_engines_by_refit(models, files, request, backend):
    size = dict(height=32, width=32)
    ref = _diffusers(models["sd"])
    ref.load_lora_weights(str(files["sd", "peft"]), adapter_name="a")
    ref.load_lora_weights(str(files["sd", "kohya"]), adapter_name="b")
    ref.set_adapters(["a", "b"], [0.7, 1.0])
    store = request.getfixturevalue("openvino_store" if backend == "openvino" else "engine_store")
    pipe = Pipeline.from_pretrained(str(models["sd"]), device="cpu", backend=backend, engine_dir=str(store))
    pipe.scheduler = "ddim"
    base = pipe("a red fox", seed=1, **KW, **size)
    pipe.load_lora(files["sd", "peft"], scale=0.7)
    pipe.load_lora(files["sd", "kohya"])
    out = pipe("a red fox", generator=torch.Generator().manual_seed(1), **KW, **size)
    assert out.backends["unet"] == backend and out.backends["text_encoder"] == backend
    assert np.abs(out.images - _run(ref, seed=1, **size)).max() <= TOL
    pipe.unload_lora()
    again = pipe("a red fox", seed=1, **KW, **size)
    assert again.backends == base.backends and np.array_equal(again.images, base.images)


def test_frozen_engine_leaves_lora_networks_to_eager(models, files, tmp_path, caplog, capsys):
    """A frozen package (weights folded into the code; built here with `fastsd build --frozen`)
    cannot take a LoRA: the network a LoRA touches runs eager while the LoRA is loaded, and
    the package again once it is unloaded. The text encoder's package: the same frozen build
    as the UNet's, at a third of the build time."""
    from fastsd.cli import main

    assert main(["build", "--model", str(models["sd"]), "--backend", "compiled", "--frozen", "--static", "32x32",
                 "--networks", "text_encoder", "--engine-dir", str(tmp_path)]) == 0
    assert "text_encoder: compiled in" in capsys.readouterr().out
    assert not list(tmp_path.rglob(".staging-*"))
    manifest = json.loads(next(tmp_path.glob("*/compiled-fp32-32x32/manifest.json")).read_text())
    assert manifest["refittable"] is False and manifest["networks"]["text_encoder"]["weights_layout"] == "frozen"
    pipe = Pipeline.from_pretrained(str(models["sd"]), device="cpu", backend="compiled", engine_dir=str(tmp_path))
    eager = Pipeline.from_pretrained(str(models["sd"]), device="cpu", backend="eager")
    kw = dict(num_inference_steps=2, output_type="np", seed=3, height=32, width=32)
    plain = pipe("a", **kw)
    assert plain.backends["text_encoder"] == "compiled"
    assert np.abs(plain.images - eager("a", **kw).images).max() <= TOL
    for p in (pipe, eager):
        p.load_lora(files["sd", "peft"])
    with caplog.at_level(logging.WARNING):
        out = pipe("a", **kw)
    assert out.backends["text_encoder"] == "eager" and "not the LoRA-fused ones" in caplog.text
    assert np.abs(out.images - eager("a", **kw).images).max() <= TOL
    pipe.unload_lora()
    assert pipe("a", **kw).backends["text_encoder"] == "compiled"


@pytest.mark.parametrize("backend", ["onnxruntime", "compiled"])
def test_new_checkpoint_refits_existing_entry(models, files, engine_store, tiny_controlnet, tmp_path, backend,
                                              capsys):
    """A second checkpoint of an exported architecture: the donor's graphs / packages are
    shared (hard-linked, no weights written) and the checkpoint's own weights are given to the
    engines at load; the result runs like eager on the new weights, takes a LoRA and returns
    to the checkpoint's weights (not the donor's) when it is unloaded, and outlives the donor
    entry. The donor is the module's entry of the first checkpoint, built as this command
    builds it (the compiled UNet with the residual inputs of the session's tiny ControlNet)."""
    from fastsd.cli import main
    from fastsd.engines import list_entries

    command = (["export"] if backend == "onnxruntime"
               else ["build", "--backend", "compiled", "--static", "32x32", "--networks", "text_encoder,unet",
                     "--controlnet", str(tiny_controlnet)])
    for donor in engine_store.glob("*/onnxruntime-*" if backend == "onnxruntime" else "*/compiled-fp32-32x32"):
        shutil.copytree(donor, tmp_path / donor.parent.name / donor.name)
    capsys.readouterr()
    assert main([*command, "--model", str(models["sd_b"]), "--engine-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    rows = {r["checkpoint"]: r for r in list_entries(tmp_path)}
    donor = next(fp for fp, r in rows.items() if r["manifest"]["source"] == str(models["sd"]))
    assert printed.count(f"refitted from {donor}'s engine") == (4 if backend == "onnxruntime" else 2)
    new = next(r for fp, r in rows.items() if fp != donor)
    assert new["manifest"]["weights"] == new["checkpoint"] and not new["problems"]
    assert all(rec["refitted_from"] == donor for rec in new["manifest"]["networks"].values())
    kw = dict(num_inference_steps=2, output_type="np", seed=2, height=32, width=32)
    pipe = Pipeline.from_pretrained(str(models["sd_b"]), device="cpu", backend=backend, engine_dir=str(tmp_path))
    out = pipe("a", **kw)
    assert {out.backends[n] for n in new["manifest"]["networks"] if n in out.backends} == {backend}
    eager = Pipeline.from_pretrained(str(models["sd_b"]), device="cpu", backend="eager")
    assert np.abs(out.images - eager("a", **kw).images).max() <= TOL
    assert main(["engines", "list", "--engine-dir", str(tmp_path)]) == 0
    assert f"(refit of {donor}: files shared, weights at load)" in capsys.readouterr().out
    for rec in new["manifest"]["networks"].values():
        assert rec["weights_at_load"] is True
        assert all((new["path"] / f).stat().st_ino == (rows[donor]["path"] / f).stat().st_ino for f in rec["sha256"])
    for p in (pipe, eager):
        p.load_lora(files["sd", "peft"])
    lora = pipe("a", **kw)
    assert lora.backends == out.backends and np.abs(lora.images - eager("a", **kw).images).max() <= TOL
    pipe.unload_lora()
    assert np.array_equal(pipe("a", **kw).images, out.images)  # the checkpoint's weights, not the donor's
    shutil.rmtree(rows[donor]["path"])
    again = Pipeline.from_pretrained(str(models["sd_b"]), device="cpu", backend=backend, engine_dir=str(tmp_path))
    assert np.array_equal(again("a", **kw).images, out.images)
    from fastsd.backends.select import candidates
    from fastsd.families import family_for

    unet = candidates(again.ckpt, family_for(again.ckpt), backend, torch.device("cpu"), torch.float32, tmp_path,
                      weights={})["unet"][0]
    assert not unet.load() and "takes the checkpoint's weights when it loads" in unet.failed
    if backend == "onnxruntime":  # (a compiled build from scratch is the path every other compiled test takes)
        assert main([*command, "--model", str(models["sd_b"]), "--engine-dir", str(tmp_path), "--no-refit"]) == 0
        assert "refitted" not in capsys.readouterr().out


def test_cli_generate_with_loras(models, files, tmp_path, capsys):
    from PIL import Image

    from fastsd.cli import main

    out = tmp_path / "x.png"
    argv = ["generate", "a red fox", "--model", str(models["sd"]), "--steps", "2", "--seed", "3", "--scheduler",
            "ddim", "--out", str(out), "--no-progress", "--lora", f"{files['sd', 'peft']}:0.6",
            "--lora", str(files["sd", "kohya"])]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "lora pytorch_lora_weights: scale 0.6" in printed and "lora kohya: scale 1" in printed
    pipe = Pipeline.from_pretrained(str(models["sd"]), device="cpu", backend="eager")
    pipe.load_lora(files["sd", "peft"], scale=0.6)
    pipe.load_lora(files["sd", "kohya"])
    want = pipe("a red fox", num_inference_steps=2, seed=3, scheduler="ddim", output_type="np").images[0]
    got = np.asarray(Image.open(out)).astype(float) / 255
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6
    assert main([*argv[:-2], "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("case,tensors,message", [
    ("rank0", {"down": torch.zeros(0, 4, 3, 3), "up": torch.zeros(32, 0, 1, 1)}, "rank of at least 1"),
    ("alpha2", {"down": torch.zeros(2, 4, 3, 3), "up": torch.zeros(32, 2, 1, 1), "alpha": torch.ones(2)},
     "alpha has 2 values"),
    ("down1d", {"down": torch.zeros(2), "up": torch.zeros(32, 2, 1, 1)}, r"down factor is \(2,\)"),
    ("nan", {"down": torch.full((2, 4, 3, 3), float("nan")), "up": torch.zeros(32, 2, 1, 1)},
     "down tensor holds NaN or infinite"),
    ("inf_alpha", {"down": torch.zeros(2, 4, 3, 3), "up": torch.zeros(32, 2, 1, 1),
                   "alpha": torch.tensor(float("inf"))}, "alpha tensor holds NaN or infinite"),
])
def test_malformed_lora_factors_are_refused_at_load(models, tmp_path, capsys, case, tensors, message):
    """Rank 0, a 2-element alpha, a 1-D factor, NaN or infinite values: refused when the file
    is read, naming it (was ZeroDivisionError / ValueError / IndexError, or a LoRA that loads
    and makes every later call fail with a NumericalError): in the API, the CLI (one line,
    exit 2) and a server's start."""
    from safetensors.torch import save_file

    from fastsd.checkpoint import load_checkpoint
    from fastsd.cli import main
    from fastsd.families import family_for
    from fastsd.lora import read_lora

    names = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}
    path = tmp_path / f"{case}.safetensors"
    save_file({f"lora_unet_conv_in.{names[k]}": v for k, v in tensors.items()}, str(path))
    ckpt = load_checkpoint(str(models["sd"]))
    with pytest.raises(InvalidArgumentError, match=f"LoRA {case}.safetensors: unet conv_in: .*{message}"):
        read_lora(path, family_for(ckpt).modules(ckpt), "x", 1.0)
    argv = ["generate", "a fox", "--model", str(models["sd"]), "--steps", "1", "--out", str(tmp_path / "o.png"),
            "--no-progress", "--lora", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{case}.safetensors" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_a_server_with_a_non_finite_lora_fails_its_start(models, tmp_path):
    """`fastsd serve --lora bad.safetensors`: the start check reads each LoRA and refuses one
    holding NaN, naming it (it passed, and every request naming it then failed)."""
    pytest.importorskip("fastapi")
    from safetensors.torch import save_file

    from fastsd.serve import ServeOptions

    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.full((2, 4, 3, 3), float("nan")),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, str(path))
    with pytest.raises(InvalidArgumentError, match="LoRA bad.safetensors: unet conv_in: its down tensor holds NaN"):
        ServeOptions(model=str(models["sd"]), loras=(("bad", str(path)),)).load()


# ---- <lora:NAME:W> prompt tags --------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_dir(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-dir")
    (folder / "styles").mkdir()
    shutil.copy(files[("sd", "kohya-te")], folder / "detail.safetensors")
    shutil.copy(files[("sd", "peft")], folder / "styles" / "Ink.safetensors")  # a folder below, any case
    return folder


def test_lora_tags_are_the_loras_loaded_for_that_call(models, files, lora_dir):
    """a1111 syntax: <lora:NAME:W> tags are cut out of the prompt and the LoRAs of lora_dir
    fused for that call: the image equals load_lora with those scales on the cut prompt; the
    next call without tags is the base model again, bit for bit; explicit LoRAs stay."""
    pipe = Pipeline.from_pretrained(str(models["sd"]), device="cpu", lora_dir=str(lora_dir))
    kw = dict(KW, seed=1, prompt_syntax="a1111")
    base = pipe("a red fox, ", **kw).images
    out = pipe("a red fox, <lora:detail:0.7><lora:ink>", negative_prompt="<lora:detail:0.7>blurry", **kw)
    assert out.settings["prompt"] == "a red fox, <lora:detail:0.7><lora:ink>"
    assert out.settings["lora_tags"] == [{"name": "detail", "scale": 0.7}, {"name": "ink", "scale": 1.0}]
    assert pipe.loras == []  # tag LoRAs are the call's, not listed as loaded
    ref = Pipeline.from_pretrained(str(models["sd"]), device="cpu")
    ref.load_lora(files[("sd", "kohya-te")], scale=0.7)
    ref.load_lora(files[("sd", "peft")], scale=1.0)
    want = ref("a red fox, ", negative_prompt="blurry", **kw).images
    assert np.abs(out.images - want).max() <= 1e-6
    assert np.abs(out.images - base).max() > 1e-3
    assert np.array_equal(pipe("a red fox, ", **kw).images, base)
    # plain syntax: the tag is text, as in diffusers (no LoRA)
    plain = pipe("a red fox, <lora:detail:0.7>", **dict(kw, prompt_syntax="plain"))
    assert "lora_tags" not in plain.settings and pipe.loras == []


def test_lora_tags_in_threads_each_get_their_own(models, lora_dir):
    import threading

    pipe = Pipeline.from_pretrained(str(models["sd"]), device="cpu", lora_dir=str(lora_dir))
    kw = dict(KW, num_inference_steps=1, seed=2, prompt_syntax="a1111")
    prompts = ["a fox <lora:detail:0.5>", "a fox <lora:ink:1.2>", "a fox"]
    want = {p: pipe(p, **kw).images for p in prompts}
    got: dict = {}
    barrier = threading.Barrier(3)

    def worker(p):
        barrier.wait()
        got[p] = [pipe(p, **kw).images for _ in range(2)]

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in prompts:
        assert all(np.array_equal(g, want[p]) for g in got[p]), p


def test_lora_tag_errors(models, lora_dir):
    pipe = Pipeline.from_pretrained(str(models["sd"]), device="cpu", lora_dir=str(lora_dir))
    kw = dict(KW, num_inference_steps=1, prompt_syntax="a1111")
    with pytest.raises(InvalidArgumentError, match="no LoRA named 'missing'.*Ink, detail") as e:
        pipe("a fox <lora:missing:1>", **kw)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidArgumentError, match="not a number"):
        pipe.check_call("a fox <lora:detail:strong>", prompt_syntax="a1111")
    with pytest.raises(InvalidArgumentError, match="hypernet"):
        pipe.check_call("a fox <hypernet:x:1>", prompt_syntax="a1111")
    with pytest.raises(InvalidArgumentError, match="different LoRAs"):
        pipe.check_call(["a <lora:detail>", "b"], prompt_syntax="a1111")
    with pytest.raises(InvalidArgumentError, match="two weights"):
        pipe.check_call("a <lora:detail:1> b <lora:detail:0.5>", prompt_syntax="a1111")
    bare = Pipeline.from_pretrained(str(models["sd"]), device="cpu")
    with pytest.raises(InvalidArgumentError, match="needs a LoRA folder"):
        bare("a fox <lora:detail>", **kw)
    with pytest.raises(InvalidArgumentError, match="no folder"):
        Pipeline.from_pretrained(str(models["sd"]), device="cpu", lora_dir=str(lora_dir / "nope"))
