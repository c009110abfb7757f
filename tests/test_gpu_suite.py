"""The one-command GPU suite's parts that run anywhere: its refusal without CUDA, and the
fp16-vs-fp32 per-network check (run here on the CPU with the tiny checkpoint)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def precision():
    spec = importlib.util.spec_from_file_location("fastsd_precision", ROOT / "benchmarks" / "precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_suite_fails_fast_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    out = tmp_path / "gpu"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "tests", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "gpu_suite: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine"]
    assert not out.exists()
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "everything", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part 'everything'" in bad.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_suite_says_in_one_line_what_it_could_not_get(tmp_path):
    """On a GPU machine the suite first brings what fastsd needs (carried wheels, else the
    registries) and says in one line what is missing and what that skips. Here a stand-in
    python claims CUDA; this machine lacks tensorrt and onnxruntime-gpu."""
    import sys

    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    'case "$*" in *torch.cuda.is_available*) exit 0;; esac\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "gpu"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "check", str(out)],
                         capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                           "PYTHON": str(fake)})
    assert run.returncode == 0, run.stderr
    said = [line for line in run.stdout.splitlines() if "could not get" in line or "every optional" in line]
    assert len(said) == 1
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "tensorrt" in said[0] and "TensorRT tests" in said[0]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "onnxruntime-gpu" in said[0]
    assert (out / "summary.md").is_file()


def test_precision_check_per_network(precision, ckpts, tmp_path, monkeypatch):
    assert precision.main(["--model", str(ckpts["eps"]), "--device", "cpu", "--dtype", "fp16",
                           "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "precision.json").read_text())
    assert report["tf32"] == {"matmul_allow_tf32": False, "cudnn_allow_tf32": False}  # a true fp32 reference
    assert "cudnn_allow_tf32 False" in (tmp_path / "precision.md").read_text()
    assert [r["network"] for r in report["rows"]] == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    for row in report["rows"]:
        assert row["finite"] and 0 < row["relative_error"] <= row["bound"]  # fp16 differs, within its bound
    monkeypatch.setitem(precision.BOUNDS, "fp16", dict.fromkeys(precision.BOUNDS["fp16"], 1e-9))
    assert precision.main(["--model", str(ckpts["eps"]), "--device", "cpu", "--out", str(tmp_path)]) == 1
    assert "| NO |" in (tmp_path / "precision.md").read_text()


def test_precision_bf16_on_the_cpu_with_openvino_and_whole_generations(precision, ckpts, eps_onnx, tmp_path):
    """The CPU rows: bf16 per network on eager and on the OpenVINO bf16 entry, and whole
    generations (latents and images against eager fp32, PSNR) for a sampler."""
    pytest.importorskip("openvino")
    from conftest import copy_entries
    from fastsd.export.openvino import build_openvino

    store = copy_entries(eps_onnx, tmp_path / "store", "onnxruntime-fp32")
    build_openvino(str(ckpts["eps"]), engine_dir=store, dtype="bf16")
    assert precision.main(["--model", str(ckpts["eps"]), "--device", "cpu", "--dtype", "bf16", "--backends",
                           "eager,openvino", "--engine-dir", str(store), "--generations", "euler_a", "--steps", "3",
                           "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "precision.json").read_text())
    assert {r["layout"] for r in report["rows"]} == {"contiguous", "openvino"} and len(report["rows"]) == 8
    gens = report["generations"]
    assert [(g["backend"], g["sampler"]) for g in gens] == [("eager", "euler_a"), ("openvino", "euler_a")]
    for g in gens:
        assert 0 < g["latent_rel_l2"] < 0.5 and 0 < g["image_max_abs"] < 0.5 and 15 < g["psnr_db"] < 100
    assert "PSNR dB" in (tmp_path / "out" / "precision.md").read_text()


def test_fp32_reference_without_tf32(precision, monkeypatch):
    """cuDNN convolutions default to TF32: the reference switches it off, and restores it."""
    seen = []
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    with precision.true_fp32() as flags:
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
    assert seen == [(False, False)] and flags == {"matmul_allow_tf32": False, "cudnn_allow_tf32": False}
    assert torch.backends.cudnn.allow_tf32 is True


def test_relative_error_counts_nan_as_failure(precision):
    ref = torch.ones(3)
    assert precision.relative_error(ref * 1.001, ref) == pytest.approx(1e-3, rel=1e-3)
    assert precision.relative_error(ref * float("nan"), ref) == float("inf")
