"""Build-time tools: export a checkpoint's networks to ONNX (and, later, compiled engines)
into the engine store. The runtime (`fastsd`) only loads finished artifacts."""

from .onnx_export import export_checkpoint

__all__ = ["export_checkpoint"]
