"""Image and mask conversion between PIL, numpy and the networks' tensors.

Matches diffusers' VaeImageProcessor on the paths SD pipelines use: Lanczos resize,
[0, 255] -> [-1, 1] for images, grayscale binarized at 0.5 for masks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

log = logging.getLogger(__name__)
MASK_THRESHOLD = 0.5  # mask pixels >= this repaint
WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # single-channel modes wider than 8 bits


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except Image.DecompressionBombError:
        limit = Image.MAX_IMAGE_PIXELS * 2
        raise ImageError(f"image {path} is too large to read safely (over {limit} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None


def _as_pil(image, what: str) -> Image.Image:
    if isinstance(image, (str, Path)):
        return load_image(image)
    if not isinstance(image, Image.Image):
        raise ImageError(f"{what} must be a PIL image or a path, not {type(image).__name__}")
    return image


def _resized(im: Image.Image, height: int, width: int) -> Image.Image:
    return im if im.size == (width, height) else im.resize((width, height), Image.LANCZOS)


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images as 8-bit grayscale, scaled by their value
    range (PIL's convert clamps them, so a 16-bit mid-gray would come out white):
    16-bit modes by 65535; float by 1 when their values lie in [0, 1], else by 255;
    32-bit integers by 255, or by 65535 when larger values occur."""
    if im.mode not in WIDE_MODES:
        return im
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        scale = 65535.0
    elif im.mode == "F":
        scale = 1.0 if a.size and np.nanmin(a) >= 0.0 and np.nanmax(a) <= 1.0 else 255.0
    else:
        scale = 65535.0 if a.size and a.max() > 255 else 255.0
    a = np.nan_to_num(a / scale, nan=0.0).clip(0.0, 1.0)
    return Image.fromarray((a * 255.0).round().astype(np.uint8), mode="L")


def image_to_tensor(image, height: int, width: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    im = _resized(_eight_bit(_as_pil(image, "image")).convert("RGB"), height, width)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


def mask_to_tensor(mask, height: int, width: int) -> torch.Tensor:
    """PIL mask -> (1, 1, H, W) float32 in {0, 1}; 1 (white) = repaint."""
    im = _eight_bit(_as_pil(mask, "mask_image"))
    m = torch.from_numpy(np.asarray(_resized(im.convert("L"), height, width), dtype=np.float32) / 255.0)
    return (m >= MASK_THRESHOLD).float()[None, None]


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1]."""
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]
