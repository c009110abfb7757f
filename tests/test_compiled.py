"""The `compiled` backend (AOTInductor packages): build, keying, loading, fallbacks (CPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import copy_entries
from fastsd.export.compiled import build_compiled

from fastsd import Pipeline
from fastsd.cli import main

TOL = 1e-3
KW = dict(num_inference_steps=3, output_type="np", seed=5)


@pytest.fixture(scope="module")
def store(eps_compiled, tmp_path_factory):
    """build_compiled(eps, networks=("text_encoder", "unet", "vae_decoder")), as the session built it
    (the UNet with the ControlNet residual inputs, which calls without a ControlNet fill with zeros)."""
    return copy_entries(eps_compiled, tmp_path_factory.mktemp("compiled"), "compiled-*")


def entry(store):
    return next(store.glob("*/compiled-fp32-*"))


def test_compiled_matches_eager(ckpts, pipes, store):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", engine_dir=str(store))
    out = pipe("a lighthouse", **KW)
    assert out.backends == {"text_encoder": "compiled", "unet": "compiled", "vae_decoder": "compiled"}
    assert pipe.backend.backends["vae_encoder"] == "eager"  # not built: img2img would encode in eager
    assert np.abs(out.images - pipes("eps")("a lighthouse", **KW).images).max() <= TOL
    manifest = json.loads((entry(store) / "manifest.json").read_text())
    assert manifest["exporter"] == "AOTInductor" and manifest["torch"] and manifest["device_key"].startswith("cpu:")
    assert manifest["profile"]["static"] and manifest["profile"]["opt_size"] == 32


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_sde_karras", "unipc", "heun", "lcm"])
def test_new_samplers_compiled_match_eager(ckpts, pipes, store, scheduler):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", engine_dir=str(store))
    kw = dict(KW, scheduler=scheduler)
    out = pipe("a lighthouse", **kw)
    assert out.backends["unet"] == "compiled"
    assert np.abs(out.images - pipes("eps")("a lighthouse", **kw).images).max() <= TOL


LONG = "a (red:1.3) fox, " + "in the deep snow, " * 10  # 148 prompt tokens: 3 chunks (comma backtrack)
ENGINE_TOL = 2e-3


def test_long_weighted_prompt_runs_on_the_packages(ckpts, pipes, store):
    """A 150-token weighted prompt (a1111): the text encoder's package takes its chunks as rows,
    the UNet's its 231-token text (the text axis is dynamic up to 3 chunks); within 2e-3 of eager."""
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", engine_dir=str(store))
    kw = dict(KW, prompt_syntax="a1111", negative_prompt="[ugly]")
    out = pipe(LONG, **kw)
    assert out.backends == {"text_encoder": "compiled", "unet": "compiled", "vae_decoder": "compiled"}
    assert np.abs(out.images - pipes("eps")(LONG, **kw).images).max() <= ENGINE_TOL
    assert json.loads((entry(store) / "manifest.json").read_text())["profile"]["max_chunks"] == 3


def test_textual_inversion_runs_on_the_text_encoder_package(ckpts, store, tmp_path):
    """The text encoder's package takes token embeddings: a textual inversion needs no rebuild."""
    from safetensors.torch import save_file

    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", engine_dir=str(store))
    eager = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")
    width = pipe.text_encoder.config.hidden_size
    save_file({"mytok": torch.randn(3, width, generator=torch.Generator().manual_seed(6))},
              str(tmp_path / "emb.safetensors"))
    for p in (pipe, eager):
        p.load_textual_inversion(str(tmp_path / "emb.safetensors"))
    kw = dict(KW, prompt_syntax="a1111")
    out = pipe("a (mytok:1.2) fox", **kw)
    assert out.backends["text_encoder"] == "compiled"
    assert np.abs(out.images - eager("a (mytok:1.2) fox", **kw).images).max() <= ENGINE_TOL


def test_other_size_runs_eager(ckpts, store, caplog):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", engine_dir=str(store))
    out = pipe("x", height=24, width=24, **KW)
    assert out.backends["unet"] == "eager" and out.backends["text_encoder"] == "compiled"
    assert "not the engine's static 32x32" in caplog.text


@pytest.mark.parametrize("fact,value", [("torch", "1.0.0"), ("device_key", "cuda:NVIDIA H100:sm_90")])
def test_package_for_other_torch_or_device_refused(ckpts, store, tmp_path, fact, value, caplog):
    copy = shutil.copytree(store, tmp_path / "s")
    m = next(copy.glob("*/compiled-fp32-*")) / "manifest.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), fact: value}))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", engine_dir=str(copy), fallback=True)
    assert set(pipe.backend.backends.values()) == {"eager"}
    assert f"built for {fact}={value}" in caplog.text


def test_auto_mixes_engine_kinds_per_network(ckpts, store, tmp_path):
    """auto: per network, the fastest kind with a valid engine (compiled before onnxruntime)."""
    pytest.importorskip("onnxruntime")
    from fastsd.export import export_checkpoint

    mixed = shutil.copytree(store, tmp_path / "mixed")
    export_checkpoint(str(ckpts["eps"]), engine_dir=mixed, networks=("unet", "vae_encoder"))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="auto", engine_dir=str(mixed))
    assert pipe.backend.backends == {"text_encoder": "compiled", "unet": "compiled", "vae_encoder": "onnxruntime",
                                     "vae_decoder": "compiled"}
    # per call, the fastest engine whose profile fits: the static compiled UNet at its size,
    # the dynamic ONNX UNet at another; eager only where no engine fits (the VAE decoder)
    size = json.loads((entry(mixed) / "manifest.json").read_text())["profile"]["opt_size"]
    assert pipe("x", height=size, width=size, **KW).backends["unet"] == "compiled"
    other = pipe("x", height=size + 8, width=size - 8, **KW).backends
    assert other == {"text_encoder": "compiled", "unet": "onnxruntime", "vae_decoder": "eager"}


def test_build_cli(ckpts, tmp_path, capsys):
    assert main(["build", "--model", str(ckpts["eps"]), "--backend", "tensorrt", "--engine-dir", str(tmp_path)]) == 2
    assert "TensorRT" in capsys.readouterr().err
    assert main(["build", "--model", str(ckpts["eps"]), "--backend", "vulkan"]) == 2
    assert main(["build", "--model", str(ckpts["eps"]), "--backend", "compiled", "--static", "9x9",
                 "--engine-dir", str(tmp_path)]) == 2
    assert "multiples of 2" in capsys.readouterr().err
    assert not list(tmp_path.rglob("manifest.json"))  # refused before any build
    # a build through the CLI that succeeds: test_lora's test_frozen_engine_leaves_lora_networks_to_eager


def test_packages_load_single_threaded_on_the_device_one_call_at_a_time(ckpts, monkeypatch, tmp_path):
    """AOTInductor's default container synchronises threads with CUDA events, illegal while a
    CUDA graph is captured: packages load with run_single_threaded=True (and the device's
    index), and the runner's lock lets one call in at a time."""
    import threading
    import time

    import torch

    from fastsd.backends.compiled import CompiledRunner
    from fastsd.checkpoint import load_checkpoint
    from fastsd.families import family_for

    loads, inside, overlaps = [], [], []

    class Model:
        def __call__(self, *args):
            inside.append(1)
            overlaps.append(len(inside) > 1)
            time.sleep(0.02)
            inside.pop()
            return [args[0] * 2]

    def load(path, run_single_threaded=False, device_index=-1):
        loads.append((run_single_threaded, device_index))
        return Model()

    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)
    spec = family_for(load_checkpoint(str(ckpts["eps"]))).specs["vae_decoder"]
    runner = CompiledRunner(tmp_path / "vae_decoder.pt2", spec, torch.device("cpu"), None, torch.float32)
    assert loads == [(True, -1)]
    latent = torch.ones(1, 4, 8, 8)
    threads = [threading.Thread(target=lambda: runner(latent=latent)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 4 and not any(overlaps)
    assert torch.equal(runner(latent=latent), latent * 2)


@pytest.mark.gpu
def test_compiled_on_cuda_captures_whole_steps(ckpts, tmp_path):
    """Compiled fp16 packages on CUDA inside whole-step graphs: loaded single-threaded, the
    step captures (no refusal) and replays within fp16 noise of the plain compiled loop."""
    build_compiled(str(ckpts["eps"]), engine_dir=tmp_path, dtype="fp16", device="cuda", networks=("unet",))
    kw = dict(num_inference_steps=4, seed=0, output_type="np")
    plain = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", device="cuda", engine_dir=str(tmp_path))
    graphed = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", device="cuda",
                                       engine_dir=str(tmp_path), cuda_graphs=True)
    want, got = plain("a cat", **kw), graphed("a cat", **kw)
    assert got.backends["unet"] == "compiled" and not graphed._graphs.refused and len(graphed._graphs.graphs) == 1
    assert np.abs(got.images - want.images).max() < 1e-2
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_every_network_compiles_and_loads_on_cuda(ckpts, tmp_path):
    """Every network of the checkpoint, built and loaded on CUDA in a process of its own (a
    loader that crashes fails this test, not the run). Found on an H200 with torch 2.11: the
    full-size SD 1.5 build died of SIGSEGV loading its first package (the text encoder's)."""
    import subprocess
    import sys

    build = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "fastsd", "build", "--model", str(ckpts["eps"]),
                            "--backend", "compiled", "--device", "cuda", "--engine-dir", str(tmp_path)],
                           capture_output=True, text=True)
    # faulthandler's trace, without its list of loaded extension modules (which fills the message)
    trace = "\n".join(line for line in build.stderr.splitlines() if not line.startswith("Extension modules"))
    assert build.returncode == 0, trace[-3000:]
    run = subprocess.run([sys.executable, "-c", (
        "import json, sys; from fastsd import Pipeline; "
        "pipe = Pipeline.from_pretrained(sys.argv[1], backend='compiled', device='cuda', engine_dir=sys.argv[2]); "
        "print(json.dumps(pipe('a cat', num_inference_steps=2, seed=0, output_type='np').backends))"),
        str(ckpts["eps"]), str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    ran = json.loads(run.stdout.strip().splitlines()[-1])
    assert ran["unet"] == ran["text_encoder"] == ran["vae_decoder"] == "compiled", ran


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_compiled_loads_on_the_pipelines_device(ckpts, tmp_path):
    """On a machine of several GPUs, a pipeline on cuda:1 loads and runs its packages there."""
    build_compiled(str(ckpts["eps"]), engine_dir=tmp_path, dtype="fp16", device="cuda:1", networks=("unet",))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="compiled", device="cuda:1", engine_dir=str(tmp_path))
    before = torch.cuda.memory_allocated(0)
    out = pipe("a cat", num_inference_steps=2, seed=0, output_type="latent")
    assert out.backends["unet"] == "compiled" and out.images.device == torch.device("cuda", 1)
    assert torch.cuda.memory_allocated(0) == before

