"""fastsd: an optimized Stable Diffusion inference runtime.

`Pipeline`, `MemoryOptions` and `PipelineOutput` load on first use, so `import fastsd` (and
`fastsd --help`) do not import torch."""

from . import errors
from .version import __version__

__all__ = ["MemoryOptions", "Pipeline", "PipelineOutput", "errors", "__version__"]


def __getattr__(name: str):
    if name in ("MemoryOptions", "Pipeline", "PipelineOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'fastsd' has no attribute {name!r}")
