"""TensorRT: the code shared with other backends runs everywhere (profiles -> min/opt/max
shapes, refit bookkeeping in the store, fallbacks); building and running engines needs
tensorrt and a GPU, and those tests skip without them."""

from __future__ import annotations

import numpy as np
import pytest

from fastsd import Pipeline
from fastsd.checkpoint import load_checkpoint
from fastsd.cli import main
from fastsd.engines import Profile, Staging, base_manifest, entry_dir, refit_source, trt_shapes


@pytest.fixture(scope="module")
def info(ckpts):
    return load_checkpoint(str(ckpts["eps"])).info


def test_dynamic_profile_shapes(info):
    p = Profile.for_model(info)  # tiny: default 32 px, VAE factor 2, profile 16..64 px, 1..4 images
    s = trt_shapes("unet", info, p)
    assert s["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))  # CFG doubles the batch
    assert s["timestep"] == ((1,), (2,), (8,))
    assert s["encoder_hidden_states"] == ((1, 77, 64), (2, 77, 64), (8, 77, 64))
    assert trt_shapes("vae_decoder", info, p)["latent"] == ((1, 4, 8, 8), (1, 4, 16, 16), (4, 4, 32, 32))
    assert trt_shapes("text_encoder", info, p)["input_ids"] == ((1, 77), (2, 77), (8, 77))


def test_static_profile_shapes(info):
    s = trt_shapes("vae_encoder", info, Profile.for_model(info, (24, 40)))
    assert s["images"] == ((1, 3, 24, 40), (1, 3, 24, 40), (4, 3, 24, 40))


def _plan_entry(root, info, fingerprint, refittable=True):
    from dataclasses import replace

    donor_info = replace(info, fingerprint=fingerprint)
    with Staging(entry_dir(root, fingerprint, "tensorrt", "fp16")) as stage:
        (stage.dir / "unet.plan").write_bytes(b"plan bytes")
        stage.add("unet", ["unet.plan"])
        return stage.commit(base_manifest(donor_info, "tensorrt", "fp16", Profile.for_model(info),
                                          refittable=refittable, weights=fingerprint))


def test_refit_source_same_architecture_only(info, ckpts, tmp_path):
    donor = _plan_entry(tmp_path, info, "aaaaaaaaaaaaaaaa")
    assert refit_source(tmp_path, info, "tensorrt", "fp16") == donor
    other_arch = load_checkpoint(str(ckpts["inpaint9"])).info
    assert refit_source(tmp_path, other_arch, "tensorrt", "fp16") is None
    assert refit_source(tmp_path, info, "tensorrt", "fp32") is None
    (donor / "unet.plan").write_bytes(b"corrupt")  # a damaged donor is never refitted from
    assert refit_source(tmp_path, info, "tensorrt", "fp16") is None


def test_refit_source_skips_own_and_non_refittable(info, tmp_path):
    _plan_entry(tmp_path, info, info.fingerprint)
    _plan_entry(tmp_path, info, "bbbbbbbbbbbbbbbb", refittable=False)
    assert refit_source(tmp_path, info, "tensorrt", "fp16") is None


def test_without_tensorrt(ckpts, tmp_path, caplog, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="tensorrt", device="cpu", engine_dir=str(tmp_path))
    assert set(pipe.backend.backends.values()) == {"eager"}
    assert "need the tensorrt package" in caplog.text
    assert main(["build", "--model", str(ckpts["eps"]), "--backend", "tensorrt", "--engine-dir", str(tmp_path)]) == 2
    assert "tensorrt package" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_build_refit_and_run(ckpts, tmp_path):
    """Build fp16 engines, run them against eager fp16, then refit them to other weights."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from export import export_checkpoint
    from export.tensorrt import build_tensorrt

    store = tmp_path / "engines"
    export_checkpoint(str(ckpts["eps"]), engine_dir=store)
    built = build_tensorrt(str(ckpts["eps"]), engine_dir=store)
    kw = dict(num_inference_steps=4, output_type="np", seed=0)
    trt_pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="tensorrt", engine_dir=str(store))
    out = trt_pipe("a fox", **kw)
    assert set(out.backends.values()) == {"tensorrt"}
    eager = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")("a fox", **kw)
    assert np.abs(out.images - eager.images).max() < 0.05
    other = shutil.copytree(ckpts["eps"], tmp_path / "other")
    unet = load_checkpoint(str(other)).unet
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in unet.state_dict().items()},
              str(other / "unet" / "diffusion_pytorch_model.safetensors"))
    export_checkpoint(str(other), engine_dir=store)
    refitted = build_tensorrt(str(other), engine_dir=store)
    assert refitted != built
    assert (refitted / "manifest.json").read_text().count(built.parent.name) == 1  # refitted_from
