"""Exceptions raised for bad input. The CLI turns each into one line and exit code 2."""


class FastSDError(Exception):
    """Base class of every error fastsd raises for bad input or an unusable file."""


class ModelNotFoundError(FastSDError):
    """The model path does not exist, or a hub id is neither cached nor downloadable."""


class CheckpointError(FastSDError):
    """A file or folder that is not a usable Stable Diffusion checkpoint (or is corrupt)."""


class PickleRefusedError(CheckpointError):
    """A pickle (.ckpt/.bin/.pt) checkpoint was given without allow_pickle=True."""


class InvalidArgumentError(FastSDError, ValueError):
    """A call argument out of range or of the wrong kind."""


class ImageError(FastSDError):
    """An input image or mask that cannot be read."""


class OutputPathError(FastSDError):
    """An output path in a missing directory, or an existing file without overwrite."""


class NumericalError(FastSDError):
    """The arithmetic overflowed (NaN or infinite latents or pixels): no image is returned."""


class UnsupportedError(FastSDError, AttributeError):
    """A diffusers pipeline method or component fastsd does not have (an AttributeError too,
    so hasattr() still answers False)."""
