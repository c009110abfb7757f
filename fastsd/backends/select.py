"""Choosing what runs each network: engines from the store where valid, else eager.

Per network, the first engine kind (in the order asked for) with a valid entry for the
loaded checkpoint, precision, settings and this machine wins; eager PyTorch runs the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..engines import NOT_IN_ENTRY, Profile, check_entry, entry_dir, graph_file
from ..networks import NETWORKS
from . import onnxruntime as ort_backend
from . import tensorrt as trt_backend
from .compiled import runtime_facts as compiled_facts
from .composite import CompositeBackend
from .eager import EagerBackend

log = logging.getLogger(__name__)

PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
AUTO_ORDER = ("tensorrt", "compiled", "onnxruntime")  # fastest first


def _available(kind: str) -> str | None:
    """Why engines of `kind` cannot run in this installation (None if they can)."""
    if kind == "onnxruntime" and not ort_backend.available():
        return "onnxruntime is not installed (pip install 'fastsd[onnx]')"
    if kind == "tensorrt" and not trt_backend.available():
        return "TensorRT engines need the tensorrt package and a CUDA device"
    return None


def _runner(kind, path, network, ckpt, device, dtype, profile):
    if kind == "onnxruntime":
        return ort_backend.OrtRunner(path, network, ckpt.info, device, profile, use_tensorrt=device.type == "cuda")
    if kind == "tensorrt":
        return trt_backend.TrtRunner(path, network, ckpt.info, device, profile)
    from .compiled import CompiledRunner

    return CompiledRunner(path, network, ckpt.info, device, profile, dtype)


def _engines(kind, ckpt, device, dtype, engine_dir: Path, clip_skip: int, loud: bool,
             wanted: tuple[str, ...] = NETWORKS) -> dict:
    """Runners of `kind` for the `wanted` networks that have a valid engine."""
    why = _available(kind)
    if why:
        if loud:
            log.warning("%s: %s; falling back to eager", kind, why)
        return {}
    entry = entry_dir(engine_dir, ckpt.info.fingerprint, kind, PRECISIONS[dtype])
    facts = {"clip_skip": clip_skip}
    if kind == "compiled":
        facts.update(compiled_facts(device))
    elif kind == "tensorrt":
        facts.update(trt_backend.runtime_facts())
    manifest, problems = check_entry(entry, ckpt.info.fingerprint, facts, verify=True, networks=wanted)
    _warn_unusable(kind, problems, loud, entry.is_dir())
    engines = {}
    for n in wanted:
        if n in problems:
            continue
        graph = graph_file(n, manifest["networks"][n])
        try:
            engines[n] = _runner(kind, entry / graph, n, ckpt, device, dtype, Profile(**manifest["profile"]))
        except Exception as e:  # noqa: BLE001 - no usable provider, or an artifact that will not load
            log.warning("%s %s: cannot load the engine (%s); falling back to eager", kind, n,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
    return engines


def _warn_unusable(kind: str, problems: dict[str, str], loud: bool, exists: bool) -> None:
    """One warning per distinct reason. Under auto (not `loud`), only for an entry that
    exists, and not for networks it does not hold: both are the normal case there."""
    by_reason: dict[str, list[str]] = {}
    for n, why in problems.items():
        if loud or (exists and why != NOT_IN_ENTRY):
            by_reason.setdefault(why, []).append(n)
    for why, nets in by_reason.items():
        log.warning("%s %s: %s; falling back to eager", kind, ", ".join(nets), why)


def make_backend(ckpt, backend: str, device: torch.device, dtype: torch.dtype, engine_dir: Path,
                 clip_skip: int = 0, cuda_graphs: bool = False):
    """The backend for `backend` ("auto" | "tensorrt" | "compiled" | "onnxruntime" | "eager")."""
    make_eager = lambda: EagerBackend(ckpt, device, dtype, clip_skip, cuda_graphs)  # noqa: E731
    if backend == "eager":
        return make_eager()
    kinds = AUTO_ORDER if backend == "auto" else (backend,)
    engines: dict = {}
    for kind in kinds:  # a slower kind only loads what a faster one left unserved
        wanted = tuple(n for n in NETWORKS if n not in engines)
        if wanted:
            engines.update(_engines(kind, ckpt, device, dtype, engine_dir, clip_skip, backend != "auto", wanted))
    return CompositeBackend(engines, make_eager) if engines else make_eager()
