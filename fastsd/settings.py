"""Per-call settings: validated once into a frozen Request before any work is done."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgumentError
from .images import batch_shape, check_images, check_rgb, control_size
from .schedulers import SAMPLERS, SchedulerChoice, SchedulerConfig, check_run, choose_scheduler, first_step, start_index

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_GUIDANCE = 100.0  # front ends stop at 30; far beyond, fp16 latents overflow to NaN
MAX_ETA = 1.0  # DDIM: eta > 1 takes the square root of a negative variance
SEED_LIMIT = 2**32  # torch's CPU generator (mt19937, diffusers' noise source) reads a seed's low 32 bits
MAX_SIDE = 2048  # pixels a side a call may ask for by default (Pipeline.max_side, --max-side; as the server's)
IMG2IMG_STRENGTH = 0.8  # StableDiffusionImg2ImgPipeline's default (SD-XL's: the family's)
INPAINT_STRENGTH = 1.0  # StableDiffusionInpaintPipeline's default
CONTROL_ARGUMENTS = ("control_image", "controlnet_conditioning_scale", "control_guidance_start",
                     "control_guidance_end")
MAX_CONTROL_SCALE = 10.0  # front ends stop at 2; far beyond, residuals swamp the UNet's own activations
XL_ARGUMENTS = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                "negative_crops_coords_top_left", "negative_target_size")


@dataclass(frozen=True)
class Defaults:
    """A model family's defaults for a call's None (diffusers' defaults of its pipelines)."""

    guidance_scale: float = 7.5  # txt2img and img2img
    inpaint_guidance_scale: float = 7.5
    img2img_strength: float = IMG2IMG_STRENGTH
    inpaint_strength: float = INPAINT_STRENGTH
    takes_xl: bool = False  # takes the SD-XL arguments (XL_ARGUMENTS)
    control_scale: tuple[float, float, float] = (1.0, 0.8, 0.5)  # ControlNet scale: txt2img, img2img, inpaint
    controlled: "Defaults | None" = None  # the defaults of the family's ControlNet pipelines, where they differ


@dataclass(frozen=True)
class Request:
    prompts: list[str]  # with prompt_embeds: one "" per embedding (only their count is used)
    negative_prompts: list[str]
    image: Any  # checked image input (list of PIL images, array or tensor) or None
    mask_image: Any  # checked mask input or None
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
    guidance_rescale: float = 0.0  # Lin et al. 2023, section 3.4 (diffusers' rescale_noise_cfg)
    timesteps: tuple[float, ...] | None = None  # custom schedule (samplers that take one)
    sigmas: tuple[float, ...] | None = None
    clip_skip: int | None = None  # None: the load-time setting (checked against the checkpoint by the caller)
    prompt_embeds: Any = None  # (B, 77, D) tensors instead of prompts
    negative_prompt_embeds: Any = None
    latents: Any = None  # (B*n, C, h, w): the initial noise instead of drawing it
    # SD-XL (the family reads these; other families refuse them in make_request)
    negative_given: bool = False  # negative_prompt was passed (SD-XL zeroes the negatives otherwise)
    prompts_2: list[str] | None = None  # second text encoder's texts (None: the first ones)
    negative_prompts_2: list[str] | None = None
    pooled_prompt_embeds: Any = None  # (B, P) with prompt_embeds
    negative_pooled_prompt_embeds: Any = None
    original_size: tuple[int, int] | None = None  # micro-conditioning; None: (height, width)
    crops_coords_top_left: tuple[int, int] | None = None  # None: (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    # ControlNets (one entry per ControlNet loaded, or none: a call without ControlNet)
    control_images: tuple = ()  # checked image inputs
    control_scales: tuple[float, ...] = ()  # controlnet_conditioning_scale
    control_start: tuple[float, ...] = ()  # control_guidance_start: the fraction of steps before it is off
    control_end: tuple[float, ...] = ()  # control_guidance_end: the fraction after which it is off

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0  # <= 1: one UNet batch, no guidance (as diffusers)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.n


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
    """A seed in [0, 2**32): torch's CPU generator, which fastsd draws noise from as
    diffusers does, seeds its mt19937 with the low 32 bits only, so seeds s and s + 2**32
    would give the same image; larger seeds are refused rather than aliased."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2**32), got {seed!r} (torch's CPU generator "
                                   "reads 32 bits of a seed)")
    return int(seed)


def check_max_side(value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8):
        raise InvalidArgumentError(f"max_side must be an integer >= 8 (pixels) or None (no limit), got {value!r}")
    return value


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


def _embeds(value, what: str, width: int | None, tokens: int | None = None):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.ndim != 3 or not value.is_floating_point():
        raise InvalidArgumentError(f"{what} must be a float tensor (batch, tokens, features), got "
                                   f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if width is not None and value.shape[-1] != width:
        raise InvalidArgumentError(f"{what} has {value.shape[-1]} features; this checkpoint's UNet takes {width}")
    if tokens is not None and value.shape[1] != tokens:
        raise InvalidArgumentError(f"{what} has {value.shape[1]} tokens; this checkpoint's text encoder "
                                   f"gives {tokens}")
    if not torch.isfinite(value).all():
        raise InvalidArgumentError(f"{what} holds NaN or infinite values")
    return value


def _pair(value, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    items = value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value
    if not isinstance(items, (list, tuple)) or len(items) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= 10**6 for v in items):
        raise InvalidArgumentError(f"{what} must be two integers in [0, 10**6] (height, width / top, left), "
                                   f"got {value!r}")
    return int(items[0]), int(items[1])


def _xl_options(xl: dict, prompts: list[str], negatives: list[str], prompt_embeds, negative_prompt_embeds,
                defaults: Defaults) -> dict:
    """The SD-XL arguments checked into Request fields (refused for families without them)."""
    given = [k for k in XL_ARGUMENTS if xl.get(k) is not None]
    if not defaults.takes_xl:
        if given:
            raise InvalidArgumentError(f"{given[0]} applies to SD-XL checkpoints; this one is SD 1.x/2.x")
        return {}
    out: dict[str, Any] = {}
    for name, texts, what in (("prompts_2", prompts, "prompt_2"), ("negative_prompts_2", negatives,
                                                                    "negative_prompt_2")):
        if xl.get(what) is None or xl[what] == "":  # diffusers: `prompt_2 or prompt`
            continue
        items = _prompt_list(xl[what], what)
        if len(items) == 1 and len(texts) > 1:
            items = items * len(texts)
        if len(items) != len(texts):
            raise InvalidArgumentError(f"{len(items)} texts in {what} for {len(texts)} prompts")
        out[name] = items
    for name, embeds, what in (("pooled_prompt_embeds", prompt_embeds, "prompt_embeds"),
                               ("negative_pooled_prompt_embeds", negative_prompt_embeds, "negative_prompt_embeds")):
        value = xl.get(name)
        if embeds is not None and value is None:
            raise InvalidArgumentError(f"{what} needs {name} too on SD-XL (the second text encoder's pooled output)")
        if value is not None:
            if embeds is None:
                raise InvalidArgumentError(f"{name} goes with {what}")
            if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != embeds.shape[0] or \
                    not value.is_floating_point() or not torch.isfinite(value).all():
                raise InvalidArgumentError(f"{name} must be a finite float tensor (batch {embeds.shape[0]}, features)")
            out[name] = value
    for name in XL_ARGUMENTS[4:]:
        out[name] = _pair(xl.get(name), name)
    return out


def _schedule_list(value, what: str):
    if value is None:
        return None
    items = value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value
    if not isinstance(items, (list, tuple)) or not items or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in items):
        raise InvalidArgumentError(f"{what} must be a non-empty list of finite numbers >= 0")
    return tuple(float(v) for v in items)


def _per_controlnet(value, count: int, what: str, lo: float, hi: float) -> tuple[float, ...]:
    """A number, or a list of one per ControlNet (as diffusers), checked into a tuple of `count`."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(items) != count:
        raise InvalidArgumentError(f"{what}: {len(items)} values for {count} ControlNets")
    return tuple(_number(v, what, lo=lo, hi=hi) for v in items)


def _control_options(control: dict, count: int, prompts: int, mode: int, defaults: Defaults) -> dict:
    """The ControlNet arguments checked into Request fields: one image input per ControlNet
    (several ControlNets: a list of them, in load order), each 1 image or one per prompt;
    scales (None: the mode's default) and the guidance window as diffusers checks them.
    `mode`: 0 txt2img, 1 img2img, 2 inpaint."""
    image = control.get("control_image")
    if image is None:
        unset = {"controlnet_conditioning_scale": None, "control_guidance_start": 0.0, "control_guidance_end": 1.0}
        given = [k for k, default in unset.items() if control.get(k, default) != default]
        if given:
            raise InvalidArgumentError(f"{given[0]} applies to calls with a control_image")
        return {}
    if count == 0:
        raise InvalidArgumentError("control_image needs a ControlNet: Pipeline.from_pretrained(..., controlnet=...)")
    if count > 1 and (not isinstance(image, (list, tuple)) or len(image) != count):
        raise InvalidArgumentError(f"with {count} ControlNets, control_image must be a list of {count} images "
                                   "(one per ControlNet, in load order)")
    images = tuple(check_images(i, "control_image") for i in (image if count > 1 else [image]))
    for checked in images:
        n_images = batch_shape(checked, "control_image")[0]
        check_rgb(checked, "control_image")
        if n_images not in (1, prompts):
            raise InvalidArgumentError(f"{n_images} control images for {prompts} prompts: pass one, or one per prompt")
    scale = control.get("controlnet_conditioning_scale")
    scale = defaults.control_scale[mode] if scale is None else scale
    start = _per_controlnet(control.get("control_guidance_start", 0.0), count, "control_guidance_start", 0.0, 1.0)
    end = _per_controlnet(control.get("control_guidance_end", 1.0), count, "control_guidance_end", 0.0, 1.0)
    for s, e in zip(start, end, strict=True):
        if s >= e:
            raise InvalidArgumentError(f"control_guidance_start {s} must be below control_guidance_end {e}")
    return {"control_images": images, "control_start": start, "control_end": end,
            "control_scales": _per_controlnet(scale, count, "controlnet_conditioning_scale", 0.0, MAX_CONTROL_SCALE)}


def make_request(info, prompt, negative_prompt, image, mask_image, strength, steps, guidance_scale,
                 scheduler, eta, height, width, n, output_type, *, guidance_rescale=0.0, timesteps=None, sigmas=None,
                 clip_skip=None, prompt_embeds=None, negative_prompt_embeds=None, latents=None,
                 text_width: int | None = None, defaults: Defaults = Defaults(), xl: dict | None = None,
                 control: dict | None = None, controlnets: int = 0, max_side: int | None = None) -> Request:
    prompt_embeds = _embeds(prompt_embeds, "prompt_embeds", text_width, info.max_tokens)
    negative_prompt_embeds = _embeds(negative_prompt_embeds, "negative_prompt_embeds", text_width, info.max_tokens)
    if prompt_embeds is not None:
        if prompt is not None:
            raise InvalidArgumentError("pass prompt or prompt_embeds, not both")
        prompts = [""] * prompt_embeds.shape[0]
    elif prompt is None:
        raise InvalidArgumentError("prompt must be a string or a non-empty list of strings (or pass prompt_embeds)")
    else:
        prompts = _prompt_list(prompt, "prompt")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise InvalidArgumentError("pass negative_prompt or negative_prompt_embeds, not both")
    if negative_prompt_embeds is not None:
        if prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape:
            raise InvalidArgumentError("negative_prompt_embeds needs prompt_embeds of the same shape, got "
                                       f"{tuple(negative_prompt_embeds.shape)}")
    negatives = [""] * len(prompts) if negative_prompt is None else _prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise InvalidArgumentError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    xl_fields = _xl_options(xl or {}, prompts, negatives, prompt_embeds, negative_prompt_embeds, defaults)
    if mask_image is not None and image is None:
        raise InvalidArgumentError("mask_image needs an image to inpaint")
    mode = 0 if image is None else 1 if mask_image is None else 2
    controlled = (control or {}).get("control_image") is not None
    if controlled and defaults.controlled is not None:  # the family's ControlNet pipelines' defaults
        defaults = defaults.controlled
    control_fields = _control_options(control or {}, controlnets, len(prompts), mode, defaults)
    timesteps, sigmas = _schedule_list(timesteps, "timesteps"), _schedule_list(sigmas, "sigmas")
    if timesteps is not None and sigmas is not None:
        raise InvalidArgumentError("pass timesteps or sigmas, not both")
    if timesteps is not None or sigmas is not None:
        steps = len(timesteps) if timesteps is not None else len(sigmas) - 1  # as diffusers' retrieve_timesteps
        if steps < 1:
            raise InvalidArgumentError("sigmas needs at least two values (the last is where sampling ends)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")
    choice: SchedulerChoice = choose_scheduler(scheduler, {})  # raises where the default is not runnable
    if (timesteps is not None or sigmas is not None) and not SAMPLERS[choice.name].custom_schedule:
        raise InvalidArgumentError(f"scheduler {choice.name!r} does not take custom timesteps or sigmas (as its "
                                   "diffusers class); use 'euler'")
    if output_type not in OUTPUT_TYPES:
        raise InvalidArgumentError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    if guidance_scale is None:  # the family's default for the mode (SD-XL inpaint: 7.5, else 5.0)
        guidance_scale = defaults.guidance_scale if mask_image is None else defaults.inpaint_guidance_scale
    guidance = _number(guidance_scale, "guidance_scale", lo=0.0, hi=MAX_GUIDANCE)
    rescale = _number(guidance_rescale, "guidance_rescale", lo=0.0, hi=1.0)
    eta = _number(eta, "eta", lo=0.0, hi=MAX_ETA)
    default_h = default_w = info.default_size
    if control_fields and mode == 0:  # diffusers' ControlNet pipeline: the control image's size
        default_h, default_w = control_size(control_fields["control_images"][0], info.vae_factor)
    if image is None:
        if strength is not None and strength != 1.0:
            raise InvalidArgumentError("strength applies to img2img/inpaint only: pass an image too")
        strength = 1.0
    else:
        image = check_images(image, "image")
        count, image_h, image_w = batch_shape(image, "image")
        if count > len(prompts) * n or (len(prompts) * n) % count:
            raise InvalidArgumentError(f"{count} images cannot be spread over {len(prompts) * n} images "
                                       "(len(prompt) x num_images_per_prompt must be a multiple of it)")
        if strength is None:  # diffusers' defaults: img2img 0.8, inpainting 1.0 (SD-XL: 0.3, 0.9999)
            strength = defaults.img2img_strength if mask_image is None else defaults.inpaint_strength
        strength = _number(strength, "strength", lo=0.0, hi=1.0)
        if mask_image is None or control_fields:  # img2img, ControlNet inpaint: the image's size (inpaint: the
            default_h = image_h // info.vae_factor * info.vae_factor  # checkpoint's, as diffusers)
            default_w = image_w // info.vae_factor * info.vae_factor
        if mask_image is None:
            if latents is not None:
                raise InvalidArgumentError("latents applies to txt2img and inpaint (diffusers' img2img takes none)")
        else:
            mask_image = check_images(mask_image, "mask_image")
            masks, mask_h, mask_w = batch_shape(mask_image, "mask_image", mask=True)
            if masks > len(prompts) * n or (len(prompts) * n) % masks:
                raise InvalidArgumentError(f"{masks} masks cannot be spread over {len(prompts) * n} images")
            if (mask_h, mask_w) != (image_h, image_w):
                log.warning("mask size %dx%d differs from the image's %dx%d; resizing it", mask_w, mask_h,
                            image_w, image_h)
    if strength == 0.0 or first_step(steps, strength) >= steps:
        raise InvalidArgumentError(f"strength {strength} with {steps} steps denoises nothing: "
                                   "raise strength or num_inference_steps")
    custom = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
    check_run(choice.name, choice.settings, steps, eta, start_index(choice.name, steps, strength), **custom)
    h = _size(height, default_h, info.vae_factor, "height")
    w = _size(width, default_w, info.vae_factor, "width")
    if max_side is not None and max(h, w) > max_side:
        given = "asked for" if (height, width) != (None, None) else "from the input image"
        raise InvalidArgumentError(f"{w}x{h} ({given}) is over this pipeline's max_side of {max_side} pixels a side: "
                                   "pass a smaller size, or raise the limit (pipe.max_side = N, "
                                   "from_pretrained(max_side=N), --max-side N; None: no limit)")
    if latents is not None:
        shape = (len(prompts) * n, info.latent_channels, h // info.vae_factor, w // info.vae_factor)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InvalidArgumentError(f"latents must be a tensor of shape {shape} for this call, got {got}")
        if not torch.isfinite(latents).all():
            raise InvalidArgumentError("latents holds NaN or infinite values")
    return Request(prompts, negatives, image, mask_image, strength, steps, guidance, choice.name, choice.settings,
                   eta, h, w, n, output_type, rescale, timesteps, sigmas, clip_skip, prompt_embeds,
                   negative_prompt_embeds, latents, negative_prompt is not None, **xl_fields, **control_fields)
