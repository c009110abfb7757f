"""`fastsd generate`: success, every input error (exit 2, one line, no file), atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastsd import Pipeline
from fastsd.cli import main, write_pngs
from fastsd.errors import OutputPathError


@pytest.fixture
def model(ckpts):
    return str(ckpts["eps"])


def gen(model, out, *extra):
    return ["generate", "a lighthouse", "--model", model, "--steps", "2", "--no-progress", "--out", str(out), *extra]


def test_generate_writes_png_with_settings(model, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(gen(model, out, "--seed", "5", "--negative-prompt", "fog", "--scheduler", "euler")) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "unet" in printed and "ms/step" in printed
    im = Image.open(out)
    settings = json.loads(im.text["fastsd"])
    assert settings["prompt"] == "a lighthouse" and settings["seed"] == 5 and settings["scheduler"] == "euler"
    assert settings["negative_prompt"] == "fog" and settings["steps"] == 2
    assert (settings["width"], settings["height"]) == im.size == (32, 32)
    assert settings["model_fingerprint"] == Pipeline.from_pretrained(model).info.fingerprint
    assert "Seed: 5" in im.text["parameters"]
    # the settings reproduce the image
    again = Pipeline.from_pretrained(model)(settings["prompt"], negative_prompt=settings["negative_prompt"],
                                            num_inference_steps=settings["steps"], seed=settings["seed"],
                                            scheduler=settings["scheduler"], guidance_scale=settings["guidance"])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(im.convert("RGB")))
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]  # no temp file left


def test_generate_n_images_img2img_inpaint(model, tmp_path, init_image, mask_image):
    init_image.save(tmp_path / "in.png")
    mask_image.save(tmp_path / "mask.png")
    out = tmp_path / "edit.png"
    assert main(gen(model, out, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                    "--n", "2", "--strength", "0.9")) == 0
    assert Image.open(tmp_path / "edit-0.png").size == (32, 32)  # inpaint: the checkpoint's size, as diffusers
    assert Image.open(tmp_path / "edit-1.png").size == (32, 32)
    assert not out.exists()


def test_random_seed_is_recorded(model, tmp_path):
    """Without --seed each run draws its own seed, and the recorded one reproduces the image."""
    assert main(gen(model, tmp_path / "a.png")) == 0
    assert main(gen(model, tmp_path / "b.png")) == 0
    seeds = [json.loads(Image.open(tmp_path / f).text["fastsd"])["seed"] for f in ("a.png", "b.png")]
    assert seeds[0] != seeds[1]
    again = Pipeline.from_pretrained(model)("a lighthouse", num_inference_steps=2, seed=seeds[0])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(tmp_path / "a.png").convert("RGB")))


@pytest.mark.parametrize("extra,match", [
    (["--height", "33"], "height must be a positive multiple of 2"),
    (["--width", "-8"], "width must be a positive multiple"),
    (["--steps", "0"], "num_inference_steps must be an integer >= 1"),
    (["--guidance", "-2"], "guidance_scale must be in"),
    (["--scheduler", "plms"], "unknown scheduler"),
    (["--strength", "0.5"], "strength applies to img2img"),
    (["--mask", "MASK"], "mask_image needs an image"),
    (["--image", "IMG", "--strength", "1.5"], "strength must be in"),
    (["--image", "IMG", "--strength", "0"], "denoises nothing"),
    (["--image", "BAD"], "cannot read image"),
    (["--image", "NOFILE"], "image not found"),
    (["--backend", "openvino"], "unknown backend"),
    (["--n", "0"], "--n must be >= 1"),
])
def test_generate_input_errors(model, tmp_path, init_image, mask_image, capsys, extra, match):
    init_image.save(tmp_path / "in.png")
    mask_image.save(tmp_path / "mask.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    subst = {"IMG": str(tmp_path / "in.png"), "MASK": str(tmp_path / "mask.png"), "BAD": str(tmp_path / "bad.png"),
             "NOFILE": str(tmp_path / "nope.png")}
    out = tmp_path / "out.png"
    assert main(gen(model, out, *[subst.get(x, x) for x in extra])) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", ["missing_model", "not_checkpoint", "pickle", "corrupt", "missing_dir", "exists",
                                  "not_png"])
def test_generate_file_errors(model, tmp_path, capsys, case):
    out = tmp_path / "out.png"
    model_arg = model
    if case == "missing_model":
        model_arg = str(tmp_path / "nothing")
    elif case == "not_checkpoint":
        model_arg = str(tmp_path)
    elif case == "pickle":
        (tmp_path / "m.ckpt").write_bytes(b"\x80\x04")
        model_arg = str(tmp_path / "m.ckpt")
    elif case == "corrupt":
        model_arg = str(shutil.copytree(model, tmp_path / "c"))
        w = tmp_path / "c" / "unet" / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif case == "missing_dir":
        out = tmp_path / "no" / "such" / "dir" / "out.png"
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "not_png":
        out = tmp_path / "out.jpg"
    assert main(gen(model_arg, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsd: error: ") and err.count("\n") == 1
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()


def test_overwrite(model, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    assert main(gen(model, out, "--overwrite")) == 0
    assert Image.open(out).size == (32, 32)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    class Boom:
        def save(self, f, **kw):
            f.write(b"half")
            raise OSError("disk full")

    with pytest.raises(OutputPathError, match="disk full"):
        write_pngs([Boom()], [tmp_path / "x.png"], {"prompt": "p", "steps": 1, "scheduler": "ddim", "guidance": 1,
                                                    "seed": 1, "width": 8, "height": 8, "model_fingerprint": "f"},
                   False)
    assert list(tmp_path.iterdir()) == []


def test_console_script_bad_input_no_traceback(model, tmp_path):
    """The installed `fastsd` entry point: one line on stderr and exit code 2."""
    exe = shutil.which("fastsd") or None
    cmd = [exe] if exe else [sys.executable, "-m", "fastsd"]
    r = subprocess.run(cmd + gen(model, tmp_path / "o.png", "--height", "7"), capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["fastsd: error: height must be a positive multiple of 2, got 7"]


def test_info(capsys):
    import importlib.util

    import torch

    from fastsd import __version__

    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"fastsd {__version__} | python ") and lines[0].endswith(f"torch {torch.__version__}")
    for mod in ("diffusers", "onnxruntime", "tensorrt"):
        line = next(x for x in lines if x.startswith(mod))
        if importlib.util.find_spec(mod) is None:
            assert line == f"{mod}: not installed"
        else:
            assert line == f"{mod} {__import__(mod).__version__}"
