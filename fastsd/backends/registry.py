"""The engine kinds fastsd knows, fastest first (the order `auto` tries them in).
Adding a kind: its module (with a `KIND`) and one line here."""

from __future__ import annotations

from . import compiled, onnxruntime, tensorrt
from .kind import EngineKind

ENGINE_KINDS: dict[str, EngineKind] = {k.name: k for k in (
    tensorrt.KIND,
    compiled.KIND,
    onnxruntime.KIND,
)}
BACKEND_NAMES = ("auto", *ENGINE_KINDS, "eager")
