"""The openvino engine kind: entries compiled from the ONNX graphs, against eager PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import copy_entries, engine_vs_module

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from fastsd.export.openvino import CALIBRATION_PROMPTS, build_openvino  # noqa: E402

from fastsd import Pipeline  # noqa: E402
from fastsd.backends.kind import RefitUnsupported  # noqa: E402
from fastsd.backends.openvino import OvRunner, has_bf16  # noqa: E402
from fastsd.backends.select import candidates  # noqa: E402
from fastsd.checkpoint import load_checkpoint  # noqa: E402
from fastsd.cli import main  # noqa: E402
from fastsd.engines import Profile, entry_dir  # noqa: E402
from fastsd.errors import InvalidArgumentError  # noqa: E402
from fastsd.families import family_for  # noqa: E402
from fastsd.networks import SD_NETWORKS  # noqa: E402

TOL = 2e-3  # engines vs eager fp32 (the project's engine bound)
KW = dict(num_inference_steps=4, output_type="np", seed=1)


@pytest.fixture(scope="module")
def store(ckpts, eps_onnx, tmp_path_factory):
    """eps's fp32 ONNX entry (the session's, copied) and the OpenVINO fp32 and bf16 entries compiled from it."""
    root = copy_entries(eps_onnx, tmp_path_factory.mktemp("ov-engines"), "onnxruntime-fp32")
    lines = []
    for dtype in ("fp32", "bf16"):
        build_openvino(str(ckpts["eps"]), engine_dir=root, dtype=dtype, progress=lines.append)
    assert not any("exporting" in line for line in lines), lines  # the ONNX entry was there: compiled, not exported
    return root


def _entry(ckpts, store, precision):
    ckpt = load_checkpoint(str(ckpts["eps"]))
    entry = entry_dir(store, ckpt.info.fingerprint, "openvino", precision)
    return ckpt, entry, json.loads((entry / "manifest.json").read_text())


@pytest.mark.parametrize("network", SD_NETWORKS)
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 8e-2)])
def test_each_network_matches_pytorch(ckpts, store, network, precision, tol):
    """Each compiled network alone vs its fp32 PyTorch module, at a batch and size other than the trace's."""
    ckpt, entry, manifest = _entry(ckpts, store, precision)
    spec = family_for(ckpt).specs[network]
    runner = OvRunner(entry / f"{network}.onnx", spec, torch.device("cpu"), Profile(**manifest["profile"]), precision,
                      manifest["networks"][network])
    got, want = engine_vs_module(ckpt, network, runner)
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got - want).abs().max() / max(1.0, want.abs().max())
    assert err <= tol
    if precision == "bf16" and has_bf16() and network == "unet":
        assert err > 1e-5  # bf16 ran: fp32 would agree to ~1e-6


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_pipeline_matches_eager(ckpts, pipes, store, init_image, mask_image, mode):
    kw = dict(KW, scheduler="euler_a")
    if mode != "txt2img":
        kw.update(image=init_image, strength=0.9)
    if mode == "inpaint":
        kw.update(mask_image=mask_image)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="openvino", engine_dir=str(store))
    out, want = pipe("a lighthouse", **kw), pipes("eps")("a lighthouse", **kw)
    assert np.abs(out.images - want.images).max() <= TOL
    used = {"text_encoder", "unet", "vae_decoder"} | ({"vae_encoder"} if mode != "txt2img" else set())
    assert {out.backends[n] for n in used} == {"openvino"}


def test_bf16_runs_end_to_end_beside_eager_bf16(ckpts, pipes, store, init_image):
    """dtype="bf16" on the CPU: the openvino-bf16 entry serves every network; eager runs bf16
    weights. Both stay near the fp32 image (tiny random networks: the deviation is measured
    in benchmarks/precision.py at full size)."""
    want = pipes("eps")("a lighthouse", **KW).images
    ov = Pipeline.from_pretrained(str(ckpts["eps"]), backend="openvino", dtype="bf16", engine_dir=str(store))
    out = ov("a lighthouse", **KW)
    assert set(out.backends.values()) == {"openvino"}
    eager = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager", dtype="bf16")("a lighthouse", **KW)
    for got in (out.images, eager.images):
        assert np.isfinite(got).all() and 0 < np.abs(got - want).max() <= 0.1
    img2img = ov("a lighthouse", image=init_image, strength=0.6, **KW)
    assert img2img.backends["vae_encoder"] == "openvino" and np.isfinite(img2img.images).all()


def test_auto_prefers_openvino_on_the_cpu(ckpts, store):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="auto", engine_dir=str(store))
    assert pipe.backend.backends == {n: "openvino" for n in SD_NETWORKS}


def test_tampered_graph_is_refused(ckpts, store, tmp_path, caplog):
    copy_entries(store, tmp_path, "openvino-fp32")
    data_file = next(tmp_path.glob("*/openvino-fp32/unet.onnx.data"))
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data_file.unlink()  # a new inode: the linked file of the module's store is not touched
    data_file.write_bytes(bytes(data))
    out = Pipeline.from_pretrained(str(ckpts["eps"]), backend="openvino", engine_dir=str(tmp_path))("a", **KW)
    assert out.backends["unet"] == "eager" and "unet.onnx.data does not match its manifest hash" in caplog.text


def test_cli_build_exports_first_where_graphs_are_missing(ckpts, pipes, tmp_path, capsys):
    """`fastsd build --backend openvino` on an empty store exports the ONNX graph, then compiles
    it (here: a static UNet); the graph files are shared with the ONNX entry, not copied."""
    assert main(["build", "--backend", "openvino", "--model", str(ckpts["eps"]), "--static", "32x32",
                 "--networks", "unet", "--engine-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "exporting them first" in printed and "unet: compiled in" in printed
    (entry,) = tmp_path.glob("*/openvino-fp32-32x32")
    onnx_data = entry.parent / "onnxruntime-fp32-32x32" / "unet.onnx.data"
    assert (entry / "unet.onnx.data").stat().st_ino == onnx_data.stat().st_ino
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="openvino", engine_dir=str(tmp_path))
    kw = dict(KW, height=32, width=32)
    out = pipe("a", **kw)
    assert out.backends["unet"] == "openvino" and out.backends["text_encoder"] == "eager"
    assert np.abs(out.images - pipes("eps")("a", **kw).images).max() <= TOL
    assert pipe("a", **dict(KW, height=24, width=40)).backends["unet"] == "eager"  # outside the static profile


@pytest.mark.parametrize("args,message", [
    (["--dtype", "fp16"], "OpenVINO engines run in fp32, bf16, int8, not fp16"),
    (["--device", "cuda"], "OpenVINO engines run on the CPU, not cuda"),
])
def test_cli_build_errors(ckpts, tmp_path, capsys, args, message):
    assert main(["build", "--backend", "openvino", "--model", str(ckpts["eps"]), "--engine-dir", str(tmp_path),
                 *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*/*"))


def test_openvino_entries_serve_the_cpu_only(ckpts, store, caplog):
    """On a CUDA device the kind is skipped before any entry is read (said where it was asked for)."""
    ckpt = load_checkpoint(str(ckpts["eps"]))
    found = candidates(ckpt, family_for(ckpt), "openvino", torch.device("cuda"), torch.float32, store)
    assert found == {} and "its engines run on the cpu, not cuda" in caplog.text
    on_cpu = candidates(ckpt, family_for(ckpt), "openvino", torch.device("cpu"), torch.float32, store)
    assert set(on_cpu) == set(SD_NETWORKS)


def test_without_openvino_nothing_changes(ckpts, store, capsys, monkeypatch):
    """Where openvino cannot be imported, `fastsd info` says what the kind needs and auto runs
    the ONNX Runtime entry beside the OpenVINO ones, silently."""
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino: ImportError
    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  openvino: "))
    assert "not available: openvino is not installed (pip install 'fastsd[openvino]')" in line
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="auto", engine_dir=str(store))
    assert set(pipe.backend.backends.values()) == {"onnxruntime"}


def test_new_checkpoint_of_a_known_architecture_is_refitted_then_compiled(ckpts, pipes, store, tmp_path, capsys):
    """Another checkpoint of eps's architecture (v): its ONNX graphs come by refit from eps's
    entry (weights written, no export), then OpenVINO compiles them."""
    copy_entries(store, tmp_path, "onnxruntime-fp32")
    assert main(["build", "--backend", "openvino", "--model", str(ckpts["v"]), "--engine-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "exporting them first" in printed and printed.count("refitted from") == 4
    assert printed.count(": compiled in") == 4
    kw = dict(KW, scheduler="euler")
    out = Pipeline.from_pretrained(str(ckpts["v"]), backend="openvino", engine_dir=str(tmp_path))("a", **kw)
    assert set(out.backends.values()) == {"openvino"}
    assert np.abs(out.images - pipes("v")("a", **kw).images).max() <= TOL


def test_new_checkpoint_refits_an_openvino_entry_of_its_architecture(ckpts, pipes, store, tmp_path, capsys):
    """Another checkpoint of eps's architecture (v) where the store holds eps's OpenVINO entry:
    its files are hard-linked and v's weights given when the engines load; no ONNX export and
    no compile at build."""
    copy_entries(store, tmp_path, "openvino-fp32")
    assert main(["build", "--backend", "openvino", "--model", str(ckpts["v"]), "--engine-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("refitted from") == 4 and "exporting" not in printed and ": compiled in" not in printed
    assert not list(tmp_path.glob("*/onnxruntime-*"))
    kw = dict(KW, scheduler="euler")
    out = Pipeline.from_pretrained(str(ckpts["v"]), backend="openvino", engine_dir=str(tmp_path))("a", **kw)
    assert set(out.backends.values()) == {"openvino"}
    assert np.abs(out.images - pipes("v")("a", **kw).images).max() <= TOL


def test_compiled_models_take_torchs_thread_count(ckpts, store):
    """torch.set_num_threads limits OpenVINO's inference threads too; an explicit count wins."""
    ckpt, entry, manifest = _entry(ckpts, store, "fp32")
    spec = family_for(ckpt).specs["text_encoder"]
    before = torch.get_num_threads()
    try:
        for torch_threads, threads, want in ((1, 0, 1), (2, 0, 2), (1, 2, 2)):
            torch.set_num_threads(torch_threads)
            runner = OvRunner(entry / "text_encoder.onnx", spec, torch.device("cpu"), Profile(**manifest["profile"]),
                              "fp32", manifest["networks"]["text_encoder"], threads=threads)
            assert int(runner.compiled.get_property("INFERENCE_NUM_THREADS")) == want
            assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    finally:
        torch.set_num_threads(before)


def test_build_for_another_clip_skip_exports_its_graphs(ckpts, store, tmp_path, capsys):
    """An ONNX entry exported for another clip_skip is not compiled as if it were this one's."""
    copy_entries(store, tmp_path, "onnxruntime-fp32")
    assert main(["build", "--backend", "openvino", "--model", str(ckpts["eps"]), "--clip-skip", "1", "--networks",
                 "text_encoder", "--engine-dir", str(tmp_path)]) == 0
    assert "exporting them first" in capsys.readouterr().out
    (manifest,) = [json.loads(p.read_text()) for p in tmp_path.glob("*/openvino-fp32/manifest.json")]
    assert manifest["clip_skip"] == 1 and list(manifest["networks"]) == ["text_encoder"]


@pytest.fixture(scope="module")
def int8_store(ckpts, store):
    """The int8 entry, built beside the module's bf16 entry (which its calibration runs on)."""
    pytest.importorskip("nncf")
    lines = []
    build_openvino(str(ckpts["eps"]), engine_dir=store, dtype="int8", progress=lines.append)
    assert not any("building the bf16 entry" in line for line in lines), lines  # it was there: reused
    assert sum(line.startswith("calibrating: generation") for line in lines) == len(CALIBRATION_PROMPTS)
    return store


def test_int8_entry_quantizes_the_unet_and_runs_end_to_end(ckpts, pipes, int8_store, init_image):
    """The UNet is quantized (OpenVINO IR whose convolutions run on int8 kernels); the other
    networks are the bf16 entry's graphs. dtype="int8" runs every network on it, near the fp32
    image (tiny random networks quantize coarsely: the full-size deviation is in the README)."""
    ckpt, entry, manifest = _entry(ckpts, int8_store, "int8")
    unet = manifest["networks"]["unet"]
    assert sorted(unet["sha256"]) == ["unet.bin", "unet.xml"] and unet["quantized"] == "int8"
    assert unet["calibration"]["samples"] == len(CALIBRATION_PROMPTS) * 6 - 1  # PNDM: steps + 1 UNet calls each
    assert manifest["refittable"] is False and "onnx" in "".join(manifest["networks"]["vae_decoder"]["sha256"])
    spec = family_for(ckpt).specs["unet"]
    runner = OvRunner(entry / "unet.xml", spec, torch.device("cpu"), Profile(**manifest["profile"]), "bf16", unet)
    kinds = {(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
             for op in runner.compiled.get_runtime_model().get_ops()}
    assert {p for t, p in kinds if t == "Convolution"} & {"u8", "i8"}, kinds  # int8 kernels, not bf16 ones
    with pytest.raises(RefitUnsupported, match="quantized to int8"):
        runner.set_weights({}, False)

    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="openvino", dtype="int8", engine_dir=str(int8_store))
    assert (pipe.precision, pipe.dtype) == ("int8", torch.bfloat16)
    out = pipe("a lighthouse", **KW)
    assert set(out.backends.values()) == {"openvino"}
    want = pipes("eps")("a lighthouse", **KW).images
    bf16 = Pipeline.from_pretrained(str(ckpts["eps"]), backend="openvino", dtype="bf16", engine_dir=str(int8_store))
    assert 0 < np.abs(out.images - want).max() <= 0.15
    assert np.abs(out.images - bf16("a lighthouse", **KW).images).max() > 0  # the int8 UNet ran, not the bf16 one
    assert pipe("a lighthouse", image=init_image, strength=0.6, **KW).backends["vae_encoder"] == "openvino"
    pipe.to(dtype="bf16")  # another precision: the bf16 entry
    assert (pipe.precision, pipe.dtype, pipe.backend.backends["unet"]) == ("bf16", torch.bfloat16, "openvino")
    auto = Pipeline.from_pretrained(str(ckpts["eps"]), dtype="int8", engine_dir=str(int8_store))
    assert set(auto.backend.backends.values()) == {"openvino"}


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_int8_is_refused_where_no_engine_runs_it(ckpts, backend, capsys):
    with pytest.raises(InvalidArgumentError, match="int8 is the precision of openvino entries"):
        Pipeline.from_pretrained(str(ckpts["eps"]), backend=backend, dtype="int8")
    assert main(["generate", "a", "--model", str(ckpts["eps"]), "--backend", backend, "--dtype", "int8",
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "int8 is the precision of openvino entries" in err and len(err.strip().splitlines()) == 1


def test_int8_build_without_nncf_says_what_it_needs(ckpts, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nncf", None)
    assert main(["build", "--backend", "openvino", "--dtype", "int8", "--model", str(ckpts["eps"]),
                 "--engine-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nncf, which is not installed (pip install 'fastsd[int8]')" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*/*"))


def test_compiled_models_are_made_ahead_once(ckpts, pipes, store, monkeypatch):
    """from_pretrained compiles each network's model on the preload thread while it builds the
    checkpoint's modules (fastsd/backends/preload.py); the images are those of eager."""
    import threading

    import fastsd.loading
    from fastsd.backends import openvino as ov_kind
    from fastsd.backends import preload

    where, compile_model, load = [], ov_kind.compile_model, fastsd.loading.load_checkpoint
    monkeypatch.setattr(ov_kind, "compile_model", lambda *a: where.append(threading.current_thread().name)
                        or compile_model(*a))

    def late(*args, **kw):  # deterministic: the modules are built once the thread is done
        for t in threading.enumerate():
            if t.name == "fastsd-preload":
                t.join()
        return load(*args, **kw)

    monkeypatch.setattr(fastsd.loading, "load_checkpoint", late)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="openvino", engine_dir=str(store))
    assert where == ["fastsd-preload"] * len(SD_NETWORKS)
    assert np.abs(pipe("a", **KW).images - pipes("eps")("a", **KW).images).max() <= TOL
    assert not preload._made and preload._running == 0
