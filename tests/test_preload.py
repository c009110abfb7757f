"""Engines loaded ahead (fastsd/backends/preload.py): while from_pretrained builds the
checkpoint's modules, a background thread makes the sessions the pipeline will load."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import copy_entries

pytest.importorskip("onnxruntime")

import fastsd.loading  # noqa: E402
from fastsd import Pipeline  # noqa: E402
from fastsd.backends import onnxruntime as ort_kind  # noqa: E402
from fastsd.backends import preload  # noqa: E402
from fastsd.checkpoint import early_fingerprint, load_checkpoint, prefetch_checkpoint  # noqa: E402
from fastsd.networks import SD_NETWORKS  # noqa: E402


def made_where(monkeypatch, module, name: str) -> list[str]:
    """The threads `module.name` (what makes an engine) runs on, as it runs."""
    where, real = [], getattr(module, name)

    def spy(*args, **kw):
        where.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return where


def after_preload(monkeypatch) -> None:
    """The checkpoint's modules built only once the preload thread is done: deterministic."""
    real = fastsd.loading.load_checkpoint

    def late(*args, **kw):
        for t in threading.enumerate():
            if t.name == "fastsd-preload":
                t.join()
        return real(*args, **kw)

    monkeypatch.setattr(fastsd.loading, "load_checkpoint", late)


def test_sessions_are_made_ahead_once_and_run_the_same(ckpts, eps_onnx, tmp_path, monkeypatch):
    store = copy_entries(eps_onnx, tmp_path, "onnxruntime-fp32")
    kw = dict(backend="onnxruntime", engine_dir=str(store))
    call = dict(num_inference_steps=2, output_type="np", seed=0)
    monkeypatch.setattr(fastsd.loading, "_load_ahead", lambda *a: None)
    plain = Pipeline.from_pretrained(str(ckpts["eps"]), **kw)("a", **call).images
    monkeypatch.undo()
    where = made_where(monkeypatch, ort_kind, "new_session")
    after_preload(monkeypatch)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), **kw)
    assert where == ["fastsd-preload"] * len(SD_NETWORKS)  # each network's session, made once, ahead
    assert all(r.cpu_graph is not None for r in (pipe.backend.engines[n][0].runner for n in SD_NETWORKS))
    assert np.array_equal(pipe("a", **call).images, plain)
    assert not preload._made and not preload._claimed and preload._running == 0  # nothing kept after the load


def test_nothing_is_made_ahead_for_other_settings(ckpts, eps_onnx, tmp_path, monkeypatch):
    """Another precision, a replaced VAE or the eager backend: no entry of those, nothing ahead."""
    store = copy_entries(eps_onnx, tmp_path, "onnxruntime-fp32")
    where = made_where(monkeypatch, ort_kind, "new_session")
    after_preload(monkeypatch)
    Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager", engine_dir=str(store))
    Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store), fallback=True,
                             dtype="bf16")
    assert "fastsd-preload" not in where


def test_a_runner_first_at_a_key_makes_it_and_the_thread_skips_it():
    go, making_b, made = threading.Event(), threading.Event(), []

    def make(key):
        made.append(key)
        if key == "b":
            making_b.set()
            time.sleep(0.2)
        return f"engine {key}"

    def find():
        go.wait(10)
        return [(k, lambda k=k: make(k)) for k in ("a", "b", "c")] + [("d", lambda: 1 / 0)]

    ahead = preload.Preload(find)
    try:
        assert preload.take("a") is None  # claimed by the runner: it makes its own
        go.set()
        assert making_b.wait(10)
        assert preload.take("b") == "engine b"  # being made: waited for
        ahead.thread.join(10)
        assert preload.take("d") is None  # failed ahead: the runner loads (and reports) it itself
        assert made == ["b", "c"]
    finally:
        ahead.release()
    assert preload.take("c") is None and not preload._made and not preload._claimed  # dropped at release


def test_early_fingerprint_is_the_loads(ckpts, tmp_path, monkeypatch):
    assert early_fingerprint(str(ckpts["eps"])) == load_checkpoint(str(ckpts["eps"])).info.fingerprint
    assert early_fingerprint(str(tmp_path / "nothing")) is None
    monkeypatch.setenv("FASTSD_CACHE", str(tmp_path / "cache"))
    assert early_fingerprint("synthetic:tiny") is None  # not built: nothing is built for it
    prefetch_checkpoint("synthetic:tiny")  # nor by the CLI's hashing ahead (the load builds it, after the checks)
    assert not (tmp_path / "cache" / "synthetic").exists()


def test_engine_files_not_hashed_yet_are_read_once(ckpts, eps_onnx, tmp_path, monkeypatch):
    """A store whose files have no digest records (just built, or copied from elsewhere): the
    preload's check and the pipeline's share one read of each file (hashing.prefetch)."""
    from fastsd import hashing

    store = copy_entries(eps_onnx, tmp_path / "engines", "onnxruntime-fp32")
    monkeypatch.setenv("FASTSD_CACHE", str(tmp_path / "cache"))  # no digest recorded for anything
    read, real = [], hashing.digest_file
    monkeypatch.setattr(hashing, "digest_file", lambda path, algo: read.append(str(path)) or real(path, algo))
    after_preload(monkeypatch)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    assert set(pipe.backend.backends.values()) == {"onnxruntime"}
    engine_files = [p for p in read if p.startswith(str(store))]
    assert engine_files and len(engine_files) == len(set(engine_files)), sorted(engine_files)
