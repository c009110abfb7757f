"""fastsd: an optimized Stable Diffusion inference runtime."""

from . import errors
from .pipeline import Pipeline, PipelineOutput

__version__ = "0.1.0"
__all__ = ["Pipeline", "PipelineOutput", "errors", "__version__"]
