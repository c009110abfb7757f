"""Exceptions raised for bad input. The CLI turns each into one line and exit code 2."""

import re
from typing import Callable


class FastSDError(Exception):
    """Base class of every error fastsd raises for bad input or an unusable file."""


class ModelNotFoundError(FastSDError):
    """The model path does not exist, or a hub id is neither cached nor downloadable."""


class CheckpointError(FastSDError):
    """A file or folder that is not a usable Stable Diffusion checkpoint (or is corrupt)."""


class PickleRefusedError(CheckpointError):
    """A pickle (.ckpt/.bin/.pt) checkpoint was given without allow_pickle=True."""


class InvalidArgumentError(FastSDError, ValueError):
    """A call argument out of range or of the wrong kind. `param` is the argument's API name
    (None where the error is not about one argument); the message is the name followed by
    the detail. `named(label)` is the same message with each argument named as a front end's
    user typed it (the CLI's flag, the server's field): `also` lists other arguments the
    detail mentions by name."""

    def __init__(self, message: str, param: str | None = None, *, also: tuple[str, ...] = ()):
        self.param, self.detail, self.also = param, message, tuple(also)
        super().__init__(self.named(str))

    def named(self, label: Callable[[str], str]) -> str:
        text = self.detail
        for name in self.also:
            text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", lambda _m, n=name: label(n), text)
        return text if self.param is None else f"{label(self.param)} {text}"


class EngineUnavailableError(FastSDError):
    """An engine kind asked for by name (backend="onnxruntime", ...) has no engine that serves
    any network of the checkpoint here, and running eager PyTorch instead was not allowed
    (from_pretrained(fallback=True), the CLI's --allow-fallback)."""


class ImageError(FastSDError):
    """An input image or mask that cannot be read."""


class OutputPathError(FastSDError):
    """An output path in a missing directory, or an existing file without overwrite."""


class NumericalError(FastSDError):
    """The arithmetic overflowed (NaN or infinite latents or pixels): no image is returned."""


class UnsupportedError(FastSDError, AttributeError):
    """A diffusers pipeline method or component fastsd does not have (an AttributeError too,
    so hasattr() still answers False)."""
