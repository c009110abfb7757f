"""Per-call settings: validated once into a frozen Request before any work is done."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError
from .images import _as_pil
from .schedulers import SchedulerChoice, SchedulerConfig, choose_scheduler, first_step

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_GUIDANCE = 100.0  # front ends stop at 30; far beyond, fp16 latents overflow to NaN
MAX_ETA = 1.0  # DDIM: eta > 1 takes the square root of a negative variance
SEED_LIMIT = 2**64  # torch.Generator seeds are unsigned 64-bit
IMG2IMG_STRENGTH = 0.8  # StableDiffusionImg2ImgPipeline's default
INPAINT_STRENGTH = 1.0  # StableDiffusionInpaintPipeline's default


@dataclass(frozen=True)
class Request:
    prompts: list[str]
    negative_prompts: list[str]
    image: Any  # PIL image or None
    mask_image: Any  # PIL image or None
    strength: float
    steps: int
    guidance_scale: float
    scheduler: str  # the fastsd sampler
    scheduler_config: SchedulerConfig
    eta: float
    height: int
    width: int
    n: int  # images per prompt
    output_type: str

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0  # <= 1: one UNet batch, no guidance (as diffusers)


def _prompt_list(prompt, what: str) -> list[str]:
    items = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
        raise InvalidArgumentError(f"{what} must be a string or a non-empty list of strings")
    for p in items:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: not text any tokenizer can read
            raise InvalidArgumentError(f"{what} is not valid Unicode text (lone surrogate {p[e.start]!r} "
                                       f"at position {e.start})") from None
    return list(items)


def check_seed(seed) -> int | None:
    """A seed torch.Generator.manual_seed takes without wrapping: an integer in [0, 2**64)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _size(value, default: int, factor: int, what: str) -> int:
    size = default if value is None else value
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % factor:
        raise InvalidArgumentError(f"{what} must be a positive multiple of {factor}, got {value!r}")
    return size


def _number(value, what: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgumentError(f"{what} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidArgumentError(f"{what} must be in {bounds}, got {value}")
    return float(value)


def make_request(info, prompt, negative_prompt, image, mask_image, strength, steps, guidance_scale,
                 scheduler, eta, height, width, n, output_type) -> Request:
    prompts = _prompt_list(prompt, "prompt")
    negatives = [""] * len(prompts) if negative_prompt is None else _prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise InvalidArgumentError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    if mask_image is not None and image is None:
        raise InvalidArgumentError("mask_image needs an image to inpaint")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")
    choice: SchedulerChoice = choose_scheduler(scheduler, {})  # raises where the default is not runnable
    if output_type not in OUTPUT_TYPES:
        raise InvalidArgumentError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    guidance = _number(guidance_scale, "guidance_scale", lo=0.0, hi=MAX_GUIDANCE)
    eta = _number(eta, "eta", lo=0.0, hi=MAX_ETA)
    if image is None:
        if strength is not None and strength != 1.0:
            raise InvalidArgumentError("strength applies to img2img/inpaint only: pass an image too")
        strength = 1.0
        default_h = default_w = info.default_size
    else:
        image = _as_pil(image, "image")
        if strength is None:  # diffusers' defaults: img2img 0.8, inpainting 1.0
            strength = IMG2IMG_STRENGTH if mask_image is None else INPAINT_STRENGTH
        strength = _number(strength, "strength", lo=0.0, hi=1.0)
        default_h, default_w = (image.height // info.vae_factor * info.vae_factor,
                                image.width // info.vae_factor * info.vae_factor)
        if mask_image is not None:
            mask_image = _as_pil(mask_image, "mask_image")
            if mask_image.size != image.size:
                log.warning("mask size %dx%d differs from the image's %dx%d; resizing it",
                            *mask_image.size, *image.size)
    if strength == 0.0 or first_step(steps, strength) >= steps:
        raise InvalidArgumentError(f"strength {strength} with {steps} steps denoises nothing: "
                                   "raise strength or num_inference_steps")
    h = _size(height, default_h, info.vae_factor, "height")
    w = _size(width, default_w, info.vae_factor, "width")
    return Request(prompts, negatives, image, mask_image, strength, steps, guidance, choice.name, choice.settings,
                   eta, h, w, n, output_type)
