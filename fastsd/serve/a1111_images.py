"""AUTOMATIC1111's img2img image handling, as the web UI does it around its sampler: the
mask inverted and blurred, "only masked" inpainting (a crop around the mask, scaled to the
asked size, and pasted back), the masked area's "fill" before encoding, and the final
overlay that keeps every unmasked pixel of the original. Written for fastsd from the web
UI's documented behaviour; the pipeline call in between is fastsd's ordinary inpaint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..images import as_mask, as_rgb

FILL, ORIGINAL = 0, 1  # inpainting_fill values fastsd runs (2 latent noise, 3 latent nothing: refused)
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # (blur radius, repeats), coarse to fine


@dataclass
class InpaintPlan:
    """What goes into the pipeline (image, mask at the asked size) and how its output becomes
    the answer (pasted into the crop box, under the original's unmasked pixels)."""

    image: Image.Image
    mask: Image.Image
    overlay: Image.Image  # RGBA: the original where it is kept, transparent where repainted
    box: tuple[int, int, int, int] | None  # only masked: (x1, y1, x2, y2) in the original

    def apply(self, generated: Image.Image) -> Image.Image:
        im = generated
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            base = Image.new("RGBA", self.overlay.size)
            base.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            im = base
        im = im.convert("RGBA")
        im.alpha_composite(self.overlay)
        return im.convert("RGB")


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A Gaussian blur of the mask, sigma blur_x across and blur_y down (0: none)."""
    if blur_x <= 0 and blur_y <= 0:
        return mask
    return mask.filter(ImageFilter.GaussianBlur((max(blur_x, 0), max(blur_y, 0))))


def crop_region(mask: np.ndarray, pad: int) -> tuple[int, int, int, int]:
    """The box around the mask's non-zero pixels, `pad` pixels wider each way, inside the image."""
    h, w = mask.shape
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(rows):
        return 0, 0, w, h
    return (max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w),
            min(int(rows[-1]) + 1 + pad, h))


def expand_region(box: tuple[int, int, int, int], width: int, height: int, image_w: int,
                  image_h: int) -> tuple[int, int, int, int]:
    """The box grown (about its centre, then shifted inside the image) to the aspect of width x height."""
    x1, y1, x2, y2 = box
    ratio = width / height
    bw, bh = x2 - x1, y2 - y1
    if bw / bh < ratio:
        grow = round(bh * ratio) - bw
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
        if x2 > image_w:
            x1, x2 = x1 - (x2 - image_w), image_w
        if x1 < 0:
            x2, x1 = min(x2 - x1, image_w), 0
    else:
        grow = round(bw / ratio) - bh
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
        if y2 > image_h:
            y1, y2 = y1 - (y2 - image_h), image_h
        if y1 < 0:
            y2, y1 = min(y2 - y1, image_h), 0
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area painted with the colours around it: the unmasked pixels, blurred at
    falling radii (premultiplied by their alpha, so masked pixels add nothing) and laid over
    each other, coarse to fine; the web UI's "fill", which gives the sampler the surrounding
    colours instead of what was under the mask."""
    keep = ImageOps.invert(mask.convert("L"))
    src = Image.new("RGBa", image.size)
    src.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, repeats in FILL_PASSES:
        layer = src.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def plan_inpaint(image: Image.Image, mask: Image.Image, width: int, height: int, *, invert: bool, blur_x: int,
                 blur_y: int, full_res: bool, padding: int, fill: int) -> InpaintPlan:
    """The web UI's img2img-with-mask steps before and after sampling, for one image."""
    image, mask = as_rgb(image), as_mask(mask)  # 16-bit and float images read by their range, as everywhere
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.LANCZOS)
    if invert:
        mask = ImageOps.invert(mask)
    mask = blur_mask(mask, blur_x, blur_y)
    box = None
    if full_res:
        overlay_mask = mask
        box = expand_region(crop_region(np.asarray(mask) > 0, padding), width, height, *image.size)
        image_in = image.crop(box).resize((width, height), Image.Resampling.LANCZOS)
        mask_in = mask.crop(box).resize((width, height), Image.Resampling.LANCZOS)
        base = image
    else:
        base = image.resize((width, height), Image.Resampling.LANCZOS)
        mask_in = mask.resize((width, height), Image.Resampling.LANCZOS)
        overlay_mask = Image.fromarray(np.clip(np.asarray(mask_in).astype(np.float32) * 2, 0, 255).astype(np.uint8))
        image_in = base
    overlay = Image.new("RGBa", base.size)
    overlay.paste(base.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask))
    if fill == FILL:
        image_in = fill_masked(image_in, mask_in)
    return InpaintPlan(image_in, mask_in, overlay.convert("RGBA"), box)
