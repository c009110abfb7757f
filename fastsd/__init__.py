"""fastsd: an optimized Stable Diffusion inference runtime."""

from . import errors
from .pipeline import MemoryOptions, Pipeline, PipelineOutput
from .version import __version__

__all__ = ["MemoryOptions", "Pipeline", "PipelineOutput", "errors", "__version__"]
