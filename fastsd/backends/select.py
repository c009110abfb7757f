"""Choosing what runs each network: engines from the store where valid, else eager."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..engines import Profile, check_entry, entry_dir
from ..networks import NETWORKS
from . import onnxruntime as ort_backend
from .composite import CompositeBackend
from .eager import EagerBackend

log = logging.getLogger(__name__)

PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ENGINE_BACKENDS = ("tensorrt", "onnxruntime")  # fastest first, for "auto"


def _ort_engines(ckpt, device, precision: str, engine_dir: Path, loud: bool, clip_skip: int) -> dict:
    entry = entry_dir(engine_dir, ckpt.info.fingerprint, "onnxruntime", precision)
    manifest, problems = check_entry(entry, ckpt.info.fingerprint, {"clip_skip": clip_skip})
    engines = {}
    for n in NETWORKS:
        if n in problems:
            if loud:
                log.warning("onnxruntime %s: %s; falling back to eager", n, problems[n])
            continue
        graph = next(f for f in manifest["networks"][n]["sha256"] if f.endswith(".onnx"))
        try:
            engines[n] = ort_backend.OrtRunner(entry / graph, n, ckpt.info, device, Profile(**manifest["profile"]))
        except Exception as e:  # noqa: BLE001 - no usable provider, or a graph ORT cannot load
            log.warning("onnxruntime %s: cannot start a session (%s); falling back to eager", n,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
    return engines


def make_backend(ckpt, backend: str, device: torch.device, dtype: torch.dtype, engine_dir: Path,
                 clip_skip: int = 0):
    """The backend for `backend` ("auto" | "tensorrt" | "onnxruntime" | "eager")."""
    make_eager = lambda: EagerBackend(ckpt, device, dtype, clip_skip)  # noqa: E731
    if backend == "eager":
        return make_eager()
    precision = PRECISIONS[dtype]
    if backend == "tensorrt":
        log.warning("the TensorRT backend is not in this build; every network falls back to eager")
        return make_eager()
    if not ort_backend.available():
        if backend == "onnxruntime":
            log.warning("onnxruntime is not installed (pip install fastsd[onnx]); falling back to eager")
        return make_eager()
    engines = _ort_engines(ckpt, device, precision, engine_dir, backend == "onnxruntime", clip_skip)
    if not engines:
        return make_eager()
    return CompositeBackend(engines, make_eager)
