"""Steps that take seconds say what they do (fastsd/status.py): building a synthetic model,
reading files seen for the first time, optimising or compiling a large graph at load. The
size threshold is lowered here so the tiny test models count as large."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import copy_entries

import fastsd.engines
import fastsd.hashing
import fastsd.model_files
import fastsd.status
from fastsd.checkpoint import load_checkpoint
from fastsd.engines import check_entry, read_manifest
from fastsd.synthetic import synthetic_path


@pytest.fixture()
def lines(caplog, tmp_path, monkeypatch):
    """The status lines logged, with a cache of its own (nothing hashed yet) and every file large."""
    monkeypatch.setenv("FASTSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fastsd.hashing, "SETTLED", -1.0)
    monkeypatch.setattr(fastsd.status, "_said", set())
    for module in (fastsd.model_files, fastsd.engines):
        monkeypatch.setattr(module, "LONG_BYTES", 1)
    caplog.set_level(logging.INFO, logger=fastsd.status.LOGGER)

    def said() -> list[str]:
        out = [r.getMessage() for r in caplog.records if r.name == fastsd.status.LOGGER]
        caplog.clear()
        return out

    return said


def test_a_synthetic_build_says_so(lines):
    synthetic_path("synthetic:tiny")
    said = lines()
    assert said[0].startswith("building the synthetic checkpoint tiny")
    assert said[1:] == [f"synthetic tiny: making and writing its {n} ({k} of 3)"  # minutes each, full size
                        for k, n in enumerate(("unet", "vae", "text_encoder"), 1)]
    synthetic_path("synthetic:tiny")  # built: nothing to say
    assert lines() == []


def test_an_export_says_each_step_of_a_large_network(ckpts, tmp_path, lines, monkeypatch):
    """A full-size UNet's export takes minutes in each of its steps: each says what it does
    (networks under LONG_BYTES, a GiB, say only the line `fastsd export` prints per network)."""
    pytest.importorskip("onnxruntime")
    from fastsd.export import export_checkpoint, onnx_export

    monkeypatch.setattr(onnx_export, "LONG_BYTES", 2 << 20)  # the tiny UNet's 6 MB are "large", its text encoder's
    export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path / "s", networks=("text_encoder", "unet"))  # 0.5 MB not
    said = lines()
    assert not [x for x in said if x.startswith("text_encoder: ")]
    assert [x for x in said if x.startswith("unet: ")] == [
        "unet: tracing it into an ONNX graph", "unet: simplifying the graph (onnxslim)",
        "unet: writing the graph and its weights",
        "unet: optimising the graph for this CPU (ONNX Runtime; loads then take a fraction of the time)"]
    assert any(x.startswith("recording the digests of the entry's ") for x in said)  # engines.LONG_BYTES is 1 here


def test_a_first_fingerprint_says_so_once(ckpts, lines):
    load_checkpoint(str(ckpts["eps"]))
    assert [line for line in lines() if "seen for the first time (its fingerprint" in line]
    load_checkpoint(str(ckpts["eps"]))  # its digests recorded: nothing read
    assert lines() == []


def test_engine_files_not_read_before_say_so_once(eps_onnx, tmp_path, lines):
    store = copy_entries(eps_onnx, tmp_path / "store", "onnxruntime-fp32")
    entry = next(store.glob("*/onnxruntime-fp32"))
    fingerprint = read_manifest(entry)["checkpoint"]
    check_entry(entry, fingerprint)
    assert [line for line in lines() if line.startswith("checking ") and str(entry) in line]
    check_entry(entry, fingerprint)
    assert lines() == []


def test_optimising_and_compiling_at_load_say_so(eps_onnx, lines, monkeypatch):
    pytest.importorskip("onnxruntime")
    from fastsd.backends import onnxruntime as ort_kind

    monkeypatch.setattr(ort_kind, "LONG_BYTES", 1)
    graph = next(eps_onnx.glob("*/onnxruntime-fp32/unet.onnx"))
    ort_kind.new_session(graph, 1, ["CPUExecutionProvider"], optimised=True)
    assert lines() == []
    ort_kind.new_session(graph, 1, ["CPUExecutionProvider"])
    assert lines() == ["ONNX Runtime is optimising unet.onnx for this CPU at load (seconds; `fastsd export` on "
                       "this machine keeps an optimised copy for the checkpoint's own weights)"]
    pytest.importorskip("openvino")
    from fastsd.backends import openvino as ov_kind

    monkeypatch.setattr(ov_kind, "LONG_BYTES", 1)
    ov_kind.read_graph(graph)
    assert lines() == ["OpenVINO is compiling unet.onnx"]


def test_the_cli_shows_status_lines_without_verbose(tmp_path):
    env = dict(os.environ, FASTSD_CACHE=str(tmp_path / "cache"))
    args = ["generate", "a", "--model", "synthetic:tiny", "--steps", "1", "--no-progress", "--out",
            str(tmp_path / "x.png")]
    out = subprocess.run([sys.executable, "-m", "fastsd", *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    first = out.stderr.splitlines()[0]
    assert first.startswith("fastsd: building the synthetic checkpoint tiny at "), out.stderr
    assert "INFO" not in out.stderr and "it/s]" not in out.stderr, out.stderr


def test_a_slow_step_says_what_it_is_only_when_slow(lines):
    """status.slow: said once the block has run `after` seconds with nothing said (another
    line said restarts the wait); a quick block says nothing. from_pretrained and builds use it."""
    import time

    with fastsd.status.slow("loading %s", "m", after=0.2):
        time.sleep(0.5)
    assert lines() == ["loading m"]
    with fastsd.status.slow("loading %s", "m", after=0.3):
        pass
    time.sleep(0.4)
    assert lines() == []
    with fastsd.status.slow("loading %s", "m", after=0.4):
        time.sleep(0.25)
        fastsd.status.say("reading the weights")
        time.sleep(0.25)  # 0.5 s in, but only 0.25 s since a line was said
    assert lines() == ["reading the weights"]
    with fastsd.status.slow("loading %s", "m", after=0.2):
        fastsd.status.say("reading the weights")
        time.sleep(0.5)
    assert lines() == ["reading the weights", "loading m"]


def test_loading_a_model_says_so_when_it_takes_seconds(ckpts, lines, monkeypatch):
    from fastsd import Pipeline

    monkeypatch.setattr(fastsd.status, "SLOW_SECONDS", 0.0)
    Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")
    said = [x for x in lines() if x.startswith("loading ")]
    assert said[0] == f"loading {ckpts['eps']} (backend eager, cpu fp32): its weights and engines"
    assert all("(still, " in x for x in said[1:])


def test_a_long_silence_is_said_again(lines):
    import time

    with fastsd.status.slow("loading %s", "m", after=0.2):
        time.sleep(1.2)  # said at 0.2 s, again 0.4 s later (twice as long), and every 0.4 s: 0.6, 1.0
    said = lines()
    assert said[0] == "loading m" and len(said) == 3, said
    with fastsd.status.slow("loading %s", "m", after=0.2) as over:
        over.set()  # the step is over (a build's first line): nothing more to say
        time.sleep(0.3)
    assert lines() == []
    assert all(re.fullmatch(r"loading m \(still, \d+ s so far\)", x) for x in said[1:]), said


def test_an_inner_slow_step_leaves_the_speaking_to_the_outer(lines):
    """The CLI's block (from launch: imports, then the library's load) speaks; from_pretrained's
    own block inside it stays quiet, so a slow load is said once, not twice."""
    import time

    with fastsd.status.slow("loading %s", "outer", after=0.2):
        with fastsd.status.slow("loading %s", "inner", after=0.2):
            time.sleep(0.35)
    assert lines() == ["loading outer"]
