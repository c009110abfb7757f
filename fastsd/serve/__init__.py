"""fastsd serve: OpenAI's images API over a fastsd Pipeline, with dynamic batching, on
uvicorn (one process) or Ray Serve (one replica per GPU). Needs the `serve` extra
(and `ray` for Ray Serve)."""

from .api import APIError, ImageRequest, Limits
from .app import ServeOptions, create_app

__all__ = ["APIError", "ImageRequest", "Limits", "ServeOptions", "create_app"]
