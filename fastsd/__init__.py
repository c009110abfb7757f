"""fastsd: an optimized Stable Diffusion inference runtime."""

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .pipeline import MemoryOptions, Pipeline, PipelineOutput  # noqa: E402

__all__ = ["MemoryOptions", "Pipeline", "PipelineOutput", "errors", "__version__"]
