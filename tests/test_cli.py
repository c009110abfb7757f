"""`fastsd generate`: success, every input error (exit 2, one line, no file), atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import copy_entries
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
    assert settings["negative_prompt"] == "fog" and settings["num_inference_steps"] == 2
    assert settings["guidance_scale"] == 7.5 and settings["eta"] == 0.0 and settings["strength"] is None
    assert (settings["width"], settings["height"]) == im.size == (32, 32)
    assert settings["model_fingerprint"] == Pipeline.from_pretrained(model).info.fingerprint
    assert "Seed: 5" in im.text["parameters"]
    # the settings reproduce the image
    again = Pipeline.from_pretrained(model)(settings["prompt"], negative_prompt=settings["negative_prompt"],
                                            num_inference_steps=settings["num_inference_steps"],
                                            seed=settings["seed"], scheduler=settings["scheduler"],
                                            guidance_scale=settings["guidance_scale"])
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
    (["--height", "33"], "--height must be a positive multiple of 2"),
    (["--width", "-8"], "--width must be a positive multiple"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--guidance", "-2"], "--guidance must be in"),
    (["--scheduler", "plms"], "--scheduler must be one of fastsd's samplers"),
    (["--strength", "0.5"], "--strength applies to img2img"),
    (["--mask", "MASK"], "--mask needs an --image to inpaint"),
    (["--image", "IMG", "--strength", "1.5"], "--strength must be in"),
    (["--image", "IMG", "--strength", "0"], "denoises nothing"),
    (["--image", "BAD"], "cannot read image"),
    (["--image", "NOFILE"], "image not found"),
    (["--backend", "vulkan"], "--backend must be one of auto, "),
    (["--n", "0"], "--n must be an integer >= 1"),
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
        write_pngs([Boom()], [tmp_path / "x.png"], {"prompt": "p", "num_inference_steps": 1, "scheduler": "ddim",
                                                    "guidance_scale": 1,
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
    assert r.stderr.strip().splitlines() == ["fastsd: error: --height must be a positive multiple of 2, got 7"]


def test_console_script_generate_ends_at_once_with_its_output(model, tmp_path):
    """`generate` ends without Python's teardown once written (os._exit): its image is whole,
    its lines reach a pipe, its exit code is 0."""
    exe = shutil.which("fastsd") or None
    cmd = [exe] if exe else [sys.executable, "-m", "fastsd"]
    r = subprocess.run(cmd + gen(model, tmp_path / "o.png"), capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"wrote {tmp_path / 'o.png'}" and lines[-1].startswith("backends:")
    from PIL import Image

    with Image.open(tmp_path / "o.png") as im:
        im.load()


def test_info(capsys):
    import importlib.util

    import torch

    from fastsd import __version__

    assert main(["info", "-v"]) == 0  # -v after the subcommand too
    lines = capsys.readouterr().out.splitlines()
    assert any(x.startswith("engine store: ") and "FASTSD_ENGINE_DIR" in x for x in lines)
    for kind in ("tensorrt", "compiled", "onnxruntime"):
        state = next(x for x in lines if x.startswith(f"  {kind}: "))
        assert "available (" in state or "not available: " in state
        assert next(x for x in lines[lines.index(state) + 1:] if x.startswith("    needs: "))
    assert "  cpu: " in "\n".join(lines)
    assert lines[0].startswith(f"fastsd {__version__} | python ") and \
        lines[0].endswith(f"torch {torch.__version__.split('+')[0]}") or lines[0].endswith(f"torch {torch.__version__}")
    for mod in ("diffusers", "onnxruntime", "tensorrt"):
        line = next(x for x in lines if x.startswith(mod))
        if importlib.util.find_spec(mod) is None:
            assert line == f"{mod}: not installed"
        else:
            assert line.startswith(f"{mod} ") and __import__(mod).__version__.startswith(line.split()[1])


def test_listings_import_no_torch(eps_onnx, tmp_path):
    """`fastsd info` and `fastsd engines list` read the store and the installation without
    importing torch, diffusers or transformers (each took seconds to import; listing a store of
    entries must not): measured in a fresh interpreter, over a store holding an entry."""
    store = tmp_path / "store"
    copy_entries(eps_onnx, store, "onnxruntime-fp32")
    code = ("import sys, time\n"
            "from fastsd.cli import main\n"
            "t = time.perf_counter()\n"
            "assert main(['engines', 'list', '--engine-dir', sys.argv[1]]) == 0\n"
            "assert main(['info']) == 0\n"
            "print('seconds', round(time.perf_counter() - t, 3), file=sys.stderr)\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "onnxruntime-fp32" in r.stdout and " ok" in r.stdout and "engine store: " in r.stdout
    print(r.stderr)


# ---- the command line itself ----------------------------------------------------------------

SUBCOMMANDS = ["generate", "export", "build", "engines", "bench", "serve", "info"]


def test_help_imports_no_torch():
    """`fastsd --help` and every subcommand's help answer without importing torch (the slow
    part of every other command); the time each takes is printed."""
    code = ("import sys, time\n"
            "from fastsd.cli import main\n"
            "for argv in [['--help']] + [[c, '--help'] for c in sys.argv[1:]]:\n"
            "    t = time.perf_counter()\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, argv\n"
            "    print(argv, round(time.perf_counter() - t, 3), file=sys.stderr)\n"
            "assert 'torch' not in sys.modules, 'help imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code, *SUBCOMMANDS], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    print(r.stderr)


def test_every_option_has_help():
    import argparse

    from fastsd.cli import _parser

    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subs.choices) == sorted(SUBCOMMANDS)
    for name, sub in subs.choices.items():
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"


def test_verbose_before_or_after_the_subcommand():
    from fastsd.cli import _parser

    for argv, want in ((["info"], False), (["-v", "info"], True), (["info", "-v"], True),
                       (["generate", "x", "--model", "m", "--verbose"], True)):
        assert _parser().parse_args(argv).verbose is want, argv


def test_argument_errors_are_one_line(capsys):
    for argv in (["generate", "x"], ["generate", "x", "--model", "m", "--steps", "many"], ["nosuch"],
                 ["engines", "clean"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fastsd: error: "), err


def test_cheap_checks_come_before_the_model_loads(model, tmp_path, monkeypatch, capsys):
    import fastsd.pipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before a cheap check")

    monkeypatch.setattr(fastsd.pipeline.Pipeline, "from_pretrained", no_load)
    for extra in (["--scheduler", "nope"], ["--height", "33"], ["--steps", "0"], ["--guidance", "nan"],
                  ["--n", "0"], ["--seed", "-1"]):
        assert main(gen(model, tmp_path / "o.png", *extra)) == 2
        assert "--" in capsys.readouterr().err.split("error: ", 1)[1]


def test_explicit_backend_without_engines(model, tmp_path, capsys, caplog):
    """--backend onnxruntime with no engine for the checkpoint: one line and exit 2 (no image,
    no eager run); --allow-fallback runs eager with the warning; auto falls back by itself."""
    store = ["--engine-dir", str(tmp_path / "store")]
    assert main(gen(model, tmp_path / "a.png", "--backend", "onnxruntime", *store)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastsd: error: backend='onnxruntime' serves no network" in err
    assert "--allow-fallback" in err and not (tmp_path / "a.png").exists()
    assert main(gen(model, tmp_path / "b.png", "--backend", "onnxruntime", "--allow-fallback", *store)) == 0
    assert "falling back to eager" in caplog.text and "unet=eager" in capsys.readouterr().out
    assert main(gen(model, tmp_path / "c.png", *store)) == 0


def test_api_names_become_flags():
    """Errors carry the argument; the CLI names it by the flag (no message parsing)."""
    from fastsd.cli import flag_label
    from fastsd.errors import InvalidArgumentError

    e = InvalidArgumentError("0.5 must be below control_guidance_end 0.3", "control_guidance_start",
                             also=("control_guidance_end",))
    assert e.named(flag_label) == "--control-start 0.5 must be below --control-end 0.3"
    assert str(e) == "control_guidance_start 0.5 must be below control_guidance_end 0.3"
    assert InvalidArgumentError("x", "guidance_scale").named(flag_label) == "--guidance x"
    assert InvalidArgumentError("x", "dtype").named(flag_label) == "--dtype x"  # a load flag
    assert InvalidArgumentError("the checkpoint is broken: height").named(flag_label) == \
        "the checkpoint is broken: height"
def test_outputs_honour_the_umask(model, tmp_path):
    from fastsd.files import atomic_write

    old = os.umask(0o027)
    try:
        assert main(gen(model, tmp_path / "img.png", "--seed", "1")) == 0
        atomic_write(tmp_path / "report.json", b"{}")
    finally:
        os.umask(old)
    for name in ("img.png", "report.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
