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
# integer dtypes an array or tensor image may have -> what their values are divided by
INT_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.bool_): 1.0,
              torch.uint8: 255.0, torch.uint16: 65535.0, torch.bool: 1.0}
RANGE_SLACK = 1e-3  # float images may stray this far outside their range (rounding in the caller's arithmetic)
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


# ---- images as diffusers takes them: PIL, paths, numpy arrays, tensors, or lists of one kind ----


def check_images(value, what: str):
    """`value` read and checked as diffusers' VaeImageProcessor takes it: a PIL image (or a
    path), a numpy array (H, W, C) / (N, H, W, C) in [0, 1] (uint8: [0, 255]), a tensor
    (C, H, W) / (N, C, H, W) in [0, 1] (or [-1, 1]), masks also (H, W) / (N, H, W), or a
    list of one of these kinds. Returns a list (paths loaded), or the array / tensor."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ImageError(f"{what} is an empty list")
    items = [load_image(i) if isinstance(i, (str, Path)) else i for i in items]
    kinds = {type(i) for i in items}
    if all(isinstance(i, Image.Image) for i in items):
        return items
    if len(kinds) > 1 or not isinstance(items[0], (np.ndarray, torch.Tensor)):
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise ImageError(f"{what} must be a PIL image, a path, a numpy array, a torch tensor or a list of one "
                         f"of these kinds, not {names}")
    for i in items:
        size = i.numel() if isinstance(i, torch.Tensor) else i.size
        if i.ndim not in (2, 3, 4) or size == 0:
            raise ImageError(f"{what}: an array or tensor of shape {tuple(i.shape)} is not an image")
        _check_values(i, what)
    return items if len(items) > 1 else items[0]


def _check_values(item, what: str) -> None:
    """An array or tensor is read by its dtype: uint8 in [0, 255], uint16 in [0, 65535], bool
    as 0 / 1, floats as they are, which must then lie in [0, 1] (`image` also [-1, 1]).
    Other integer types, and floats beyond that range (8-bit values as floats), are refused:
    they cannot be read unambiguously. A tensor with neither 1 nor 3 channels is not
    range-checked (image latents; other channel counts are refused later)."""
    tensor = isinstance(item, torch.Tensor)
    if item.dtype in INT_SCALES:
        return
    if not (item.is_floating_point() if tensor else np.issubdtype(item.dtype, np.floating)):
        raise ImageError(f"{what} is an array of {item.dtype}; pass uint8 (0-255), uint16 (0-65535), bool, or "
                         "floats in [0, 1]")
    data = item.float() if tensor else np.asarray(item, dtype=np.float32)
    if not (torch.isfinite(data).all() if tensor else np.isfinite(data).all()):
        raise ImageError(f"{what} holds NaN or infinite values")
    if tensor and item.ndim >= 3 and item.shape[-3] not in (1, 3):
        return
    lo = -1.0 if what == "image" else 0.0
    low, high = (float(data.min()), float(data.max()))
    if low < lo - RANGE_SLACK or high > 1.0 + RANGE_SLACK:
        raise ImageError(f"{what} has float values in [{low:g}, {high:g}]; float images must lie in [{lo:g}, 1] "
                         "(divide 8-bit values by 255, or pass a uint8 array)")


def batch_shape(images, what: str, mask: bool = False) -> tuple[int, int, int]:
    """(count, height, width) of a checked input (the first image's size); arrays that do not
    stack into one batch are an ImageError here, before any work."""
    if isinstance(images, list) and isinstance(images[0], Image.Image):
        return len(images), images[0].height, images[0].width
    try:
        t = _to_float_tensor(images, mask)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ImageError(f"{what}: the arrays do not form one batch ({str(e).splitlines()[0]})") from None
    return t.shape[0], t.shape[-2], t.shape[-1]


def _to_float_tensor(items, mask: bool) -> torch.Tensor:
    """numpy or torch input -> (N, C, H, W) float32, as VaeImageProcessor.preprocess stacks it."""
    if isinstance(items, list):
        four = items[0].ndim == 4
        items = (np.concatenate(items) if four else np.stack(items)) if isinstance(items[0], np.ndarray) else \
            (torch.cat(items) if four else torch.stack(items))
    if isinstance(items, np.ndarray):
        a = items.astype(np.float32) / INT_SCALES.get(items.dtype, 1.0)
        if mask and a.ndim == 3:  # grayscale: (H, W, 1) is one mask, (N, H, W) a batch
            a = a[None] if a.shape[-1] == 1 else a[..., None]
        a = a[None] if a.ndim == 3 else a[None, ..., None] if a.ndim == 2 else a
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    t = items.float() / INT_SCALES.get(items.dtype, 1.0)
    if mask and t.ndim == 3:
        t = t.unsqueeze(1)
    return t[None, None] if t.ndim == 2 else t[None] if t.ndim == 3 else t


def image_batch(images, height: int, width: int, latent_channels: int) -> tuple[torch.Tensor, bool]:
    """A checked image input -> ((N, 3, H, W) float32 in [-1, 1], False), or, for a tensor
    with the latent channel count, (those latents, True), as VaeImageProcessor.preprocess."""
    if isinstance(images, list) and isinstance(images[0], Image.Image):
        return torch.cat([image_to_tensor(im, height, width) for im in images]), False
    t = _to_float_tensor(images, mask=False)
    if t.shape[1] == latent_channels and isinstance(images if not isinstance(images, list) else images[0],
                                                    torch.Tensor):
        return t, True
    if t.shape[1] != 3:
        raise ImageError(f"image has {t.shape[1]} channels; fastsd takes RGB images (3 channels)"
                         f" or latents ({latent_channels} channels)")
    t = torch.nn.functional.interpolate(t, size=(height, width))  # nearest, as diffusers resizes arrays
    return (t if t.min() < 0 else 2.0 * t - 1.0), False


def check_rgb(images, what: str) -> None:
    """An array or tensor input must hold RGB images (PIL images are converted)."""
    if isinstance(images, list) and isinstance(images[0], Image.Image):
        return
    channels = _to_float_tensor(images, mask=False).shape[1]
    if channels != 3:
        raise ImageError(f"{what} has {channels} channels; it must be RGB (3 channels)")


def control_size(images, factor: int) -> tuple[int, int]:
    """The size a checked control image input sets (its first image's, rounded down to a
    multiple of the VAE factor), as diffusers' get_default_height_width."""
    _, height, width = batch_shape(images, "control_image")
    if height < factor or width < factor:
        raise ImageError(f"control_image is {width}x{height}; it must be at least {factor}x{factor}")
    return height // factor * factor, width // factor * factor


def control_batch(images, height: int, width: int) -> torch.Tensor:
    """A checked control image input (arrays already found RGB by `check_rgb`) -> (N, 3, H, W)
    float32 in [0, 1], as the ControlNet pipelines' VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False): RGB, resized, not normalized."""
    if isinstance(images, list) and isinstance(images[0], Image.Image):
        return torch.cat([image_to_tensor(im, height, width, normalize=False) for im in images])
    t = _to_float_tensor(images, mask=False)
    return torch.nn.functional.interpolate(t, size=(height, width))  # nearest, as diffusers resizes arrays


def mask_batch(masks, height: int, width: int) -> torch.Tensor:
    """A checked mask input -> (N, 1, H, W) float32 in {0, 1}, 1 (white) = repaint."""
    if isinstance(masks, list) and isinstance(masks[0], Image.Image):
        return torch.cat([mask_to_tensor(m, height, width) for m in masks])
    t = _to_float_tensor(masks, mask=True)
    if t.shape[1] != 1:
        raise ImageError(f"mask_image has {t.shape[1]} channels; a mask is single-channel")
    t = torch.nn.functional.interpolate(t, size=(height, width))
    return (t >= MASK_THRESHOLD).float()


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


def as_rgb(im: Image.Image) -> Image.Image:
    """An image as 8-bit RGB, read by its value range (16-bit and float modes scaled, not
    clamped): every front end (Python API, CLI, server) reads images through this."""
    return _eight_bit(im).convert("RGB")


def as_mask(im: Image.Image) -> Image.Image:
    """A mask as 8-bit grayscale, read by its value range as `as_rgb` reads images."""
    return _eight_bit(im).convert("L")


def image_to_tensor(image, height: int, width: int, normalize: bool = True) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1] (not `normalize`: in [0, 1])."""
    im = _resized(as_rgb(_as_pil(image, "image")), height, width)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0 if normalize else x


def mask_to_tensor(mask, height: int, width: int) -> torch.Tensor:
    """PIL mask -> (1, 1, H, W) float32 in {0, 1}; 1 (white) = repaint."""
    im = as_mask(_as_pil(mask, "mask_image"))
    m = torch.from_numpy(np.asarray(_resized(im, height, width), dtype=np.float32) / 255.0)
    return (m >= MASK_THRESHOLD).float()[None, None]


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) float32 numpy."""
    return images.permute(0, 2, 3, 1).float().cpu().numpy()


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]
