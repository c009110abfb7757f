"""The engine kinds fastsd knows, fastest first (the order `auto` tries them in).
Adding a kind: its module (with a `KIND`) and one line here."""

from __future__ import annotations

from . import compiled, onnxruntime, openvino, tensorrt
from .kind import EngineKind

ENGINE_KINDS: dict[str, EngineKind] = {k.name: k for k in (
    tensorrt.KIND,
    openvino.KIND,  # CPU only: ahead of the kinds that also serve the CPU
    compiled.KIND,
    onnxruntime.KIND,
)}
BACKEND_NAMES = ("auto", *ENGINE_KINDS, "eager")
