"""The engine kinds fastsd knows, fastest first (the order `auto` tries them in, fastsd/catalog.py's).
Adding a kind: its `About` in catalog.KINDS, its module (with a `KIND`) and its name here."""

from __future__ import annotations

from ..catalog import KINDS
from . import compiled, onnxruntime, openvino, tensorrt
from .kind import EngineKind

_MODULES = {m.KIND.name: m.KIND for m in (tensorrt, openvino, compiled, onnxruntime)}
ENGINE_KINDS: dict[str, EngineKind] = {name: _MODULES[name] for name in KINDS}  # openvino (CPU only) ahead of
# the kinds that also serve the CPU
BACKEND_NAMES = ("auto", *ENGINE_KINDS, "eager")
