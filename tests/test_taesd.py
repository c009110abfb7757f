"""TAESD (diffusers' AutoencoderTiny) as the pipeline's VAE and as the live-preview decoder:
parity with diffusers' pipelines given vae=AutoencoderTiny, engines of it, previews."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastsd import Pipeline
from fastsd.cli import main
from fastsd.errors import CheckpointError, InvalidArgumentError
from fastsd.synthetic import build_tiny_vae

TOL = 1e-3


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """A random-weight TAESD of the tiny checkpoints' factor (2), as a diffusers folder."""
    return build_tiny_vae(tmp_path_factory.mktemp("taesd") / "taesd-tiny", "taesd-tiny", seed=4)


@pytest.fixture(scope="module")
def tiny_pipe(ckpts, taesd):
    return Pipeline.from_pretrained(str(ckpts["eps"]), vae=str(taesd))


def _reference(ckpts, taesd, mode):
    import diffusers

    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[mode]
    ref = cls.from_pretrained(str(ckpts["eps"]), vae=diffusers.AutoencoderTiny.from_pretrained(str(taesd)),
                              safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_tiny_vae_matches_diffusers(ckpts, taesd, tiny_pipe, init_image, mask_image, mode):
    """vae=TAESD decodes (and encodes: no posterior draw) as a diffusers pipeline whose vae is
    an AutoencoderTiny: same generator, same images."""
    import diffusers

    ref = _reference(ckpts, taesd, mode)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    kw = dict(prompt="a fox", num_inference_steps=4, output_type="np", height=40, width=48)
    if mode != "txt2img":
        kw.update(image=init_image, strength=0.7)
    if mode == "inpaint":
        kw.update(mask_image=mask_image)
    ours = tiny_pipe(scheduler="euler_a", generator=torch.Generator().manual_seed(2), **kw).images
    theirs = ref(generator=torch.Generator().manual_seed(2), **kw).images
    assert np.abs(ours - theirs).max() <= TOL
    assert tiny_pipe.info.tiny_vae and tiny_pipe.info.fingerprint != Pipeline.from_pretrained(
        str(ckpts["eps"])).info.fingerprint  # engines of the tiny VAE are kept apart


def test_tiny_vae_from_object_and_errors(ckpts, taesd, tiny_pipe):
    import diffusers

    obj = diffusers.AutoencoderTiny.from_pretrained(str(taesd))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), vae=obj)
    kw = dict(prompt="a fox", num_inference_steps=2, output_type="np", height=16, width=16, seed=0)
    assert np.array_equal(pipe(**kw).images, tiny_pipe(**kw).images)
    with pytest.raises(CheckpointError, match="factor 8"):  # the released TAESD's factor, not the tiny UNet's 2
        Pipeline.from_pretrained(str(ckpts["eps"]), vae="synthetic:taesd")


def test_tiny_vae_from_the_hub_cache(ckpts, taesd, tiny_pipe, tmp_path, monkeypatch):
    """A hub id resolves in the hub cache for a one-model repo (TAESD's layout: config.json and
    weights at the root), for vae= and preview_vae= alike; a missing one is a clear error."""
    import shutil

    from fastsd.errors import ModelNotFoundError

    repo = tmp_path / "hub" / "models--madebyollin--taesd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(taesd, repo / "snapshots" / "0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), vae="madebyollin/taesd", preview_vae="madebyollin/taesd")
    assert pipe.info.fingerprint == tiny_pipe.info.fingerprint and pipe.preview_vae is not None
    with pytest.raises(ModelNotFoundError, match="madebyollin/taesdxl"):
        pipe.load_preview_vae("madebyollin/taesdxl")


def test_tiny_vae_engines_match_eager(ckpts, taesd, tiny_pipe, init_image, tmp_path):
    """The tiny VAE's encoder and decoder export like the full VAE's (their own spec: the
    encoder gives latents) and run within 1e-3 of eager. ONNX Runtime only: the compiled kind
    builds from the same specs (test_compiled and test_sdxl run it on the full VAE's), and a
    TAESD package pair cost 15 s of this suite."""
    pytest.importorskip("onnxruntime")
    from fastsd.export import export_checkpoint

    entry = export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path, vae=str(taesd),
                              networks=("vae_encoder", "vae_decoder"))
    assert entry.parent.name == tiny_pipe.info.fingerprint  # engines of the tiny VAE are kept apart
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["networks"]["vae_encoder"]
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), vae=str(taesd), backend="onnxruntime", engine_dir=str(tmp_path))
    kw = dict(prompt="a lighthouse", image=init_image, strength=0.6, num_inference_steps=3, output_type="np",
              seed=3, height=32, width=32)
    out = pipe(**kw)
    assert out.backends["vae_encoder"] == out.backends["vae_decoder"] == "onnxruntime"
    assert np.abs(out.images - tiny_pipe(**kw).images).max() <= TOL


# ---- live previews ---------------------------------------------------------------------------


def test_previews_every_k_steps(ckpts, pipes, taesd):
    """Every k-th step's clean-latent estimate, decoded by TAESD, reaches callback_on_step_end;
    the final one is the final latents' decode (DPM-Solver's last step is its x0), and the
    image itself is the one without previews."""
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), preview_vae=str(taesd))
    seen = {}

    def on_step_end(p, step, t, kwargs):
        if "preview" in kwargs:
            seen[step] = kwargs["preview"]
        return {}

    kw = dict(prompt=["a fox", "a boat"], num_inference_steps=6, scheduler="dpmpp_2m", height=24, width=40, seed=1)
    out = pipe(output_type="latent", preview_every=2, callback_on_step_end=on_step_end, **kw)
    assert sorted(seen) == [1, 3, 5] and all(len(v) == 2 and v[0].size == (40, 24) for v in seen.values())
    assert out.timings["preview"] > 0
    plain = pipes("eps")(output_type="latent", **kw).images
    assert torch.equal(out.images, plain)  # previews change nothing
    tiny = Pipeline.from_pretrained(str(ckpts["eps"]), vae=str(taesd))
    want = tiny(**kw).images[0]  # the same run, decoded by TAESD at the end
    assert np.abs(np.asarray(seen[5][0], dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "heun", "lcm", "unipc"])
def test_preview_x0_is_the_samplers_estimate(ckpts, taesd, scheduler):
    """The preview's x0 comes from the UNet's own output at that step (VP weights of its input),
    for every sampler, v-prediction included: previews sharpen towards the final image."""
    pipe = Pipeline.from_pretrained(str(ckpts["v"]), preview_vae=str(taesd))
    got = []
    pipe("a fox", num_inference_steps=5, scheduler=scheduler, seed=0, height=16, width=16, output_type="latent",
         preview_every=1, callback_on_step_end=lambda p, s, t, kw: got.append(np.asarray(kw["preview"][0])) or {})
    assert len(got) == (9 if scheduler == "heun" else 5)
    final = np.asarray(got[-1], dtype=np.float32)
    first = np.abs(np.asarray(got[0], dtype=np.float32) - final).mean()
    assert np.abs(np.asarray(got[-2], dtype=np.float32) - final).mean() <= first


def test_preview_errors(ckpts, pipes, taesd):
    kw = dict(prompt="x", num_inference_steps=2, height=16, width=16, seed=0)
    with pytest.raises(InvalidArgumentError, match="preview VAE"):
        pipes("eps")(preview_every=1, callback_on_step_end=lambda *a: {}, **kw)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), preview_vae=str(taesd))
    with pytest.raises(InvalidArgumentError, match="callback_on_step_end"):
        pipe(preview_every=1, **kw)
    with pytest.raises(InvalidArgumentError, match="preview_every"):
        pipe(preview_every=0, callback_on_step_end=lambda *a: {}, **kw)
    with pytest.raises(InvalidArgumentError, match="tiny autoencoder"):
        pipe.load_preview_vae(str(ckpts["eps"]))  # a checkpoint's AutoencoderKL is no preview VAE
    with pytest.raises(CheckpointError, match="factor 8"):
        pipe.load_preview_vae("synthetic:taesd")


def test_cli_preview(ckpts, taesd, tmp_path, capsys):
    from PIL import Image

    out, prev = tmp_path / "out.png", tmp_path / "preview.png"
    base = ["generate", "a fox", "--model", str(ckpts["eps"]), "--steps", "4", "--seed", "1", "--height", "24",
            "--width", "32", "--scheduler", "unipc", "--no-progress", "--preview-vae", str(taesd)]
    assert main(base + ["--out", str(out), "--preview", str(prev)]) == 0
    assert "previews: " in capsys.readouterr().out
    assert Image.open(prev).size == (32, 24) == Image.open(out).size
    assert not list(tmp_path.glob(".*.tmp"))  # written by atomic replace
    assert main(base + ["--out", str(out), "--overwrite", "--preview", str(prev), "--preview-every", "0"]) == 2
    assert main(base + ["--out", str(out), "--overwrite", "--preview", str(out)]) == 2
    assert "must not be the output" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b.png")]) == 2  # --preview-vae without --preview
