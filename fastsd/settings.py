"""Per-call settings: validated once into a frozen Request before any work is done.

`make_request` takes a call's arguments by their API names (fastsd/arguments.py describes
each), runs the table's checks, then the rules that relate arguments to each other and to
the checkpoint, and builds the Request by keyword.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

import torch

from . import arguments
from .arguments import GROUP, SEED_LIMIT, bad_value, check_value, check_values
from .image_prompts import ip_options
from .images import batch_shape, check_images, check_rgb, control_size
from .schedulers import (
    SAMPLERS,
    SchedulerChoice,
    SchedulerConfig,
    check_run,
    choose_scheduler,
    first_step,
    start_index,
    strength_args,
)

log = logging.getLogger(__name__)

MAX_SIDE = 2048  # pixels a side a call may ask for by default (Pipeline.max_side, --max-side; as the server's)
IMG2IMG_STRENGTH = 0.8  # StableDiffusionImg2ImgPipeline's default (SD-XL's: the family's)
INPAINT_STRENGTH = 1.0  # StableDiffusionInpaintPipeline's default
TXT2IMG, IMG2IMG, INPAINT = 0, 1, 2  # a call's mode


@dataclass(frozen=True)
class Defaults:
    """A model family's defaults for a call's None (diffusers' defaults of its pipelines)."""

    guidance_scale: float = 7.5  # txt2img and img2img
    inpaint_guidance_scale: float = 7.5
    img2img_strength: float = IMG2IMG_STRENGTH
    inpaint_strength: float = INPAINT_STRENGTH
    takes_xl: bool = False  # takes the SD-XL arguments (the table's "xl" group)
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
    prompt_syntax: str = "plain"  # "plain" (diffusers') | "a1111" (fastsd/prompts.py)
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
    # IP-Adapters (one entry per adapter loaded, or none: a call without an image prompt)
    ip_images: tuple = ()  # each adapter's images (a list of PIL images) or CLIP pixel values (N, 3, S, S)
    ip_embeds: tuple = ()  # or each adapter's precomputed features, as diffusers' ip_adapter_image_embeds

    guidance_embedded: bool = False  # the UNet takes the guidance scale as an input (LCM-distilled): no CFG

    @property
    def do_cfg(self) -> bool:  # <= 1, or a guidance-distilled UNet: one UNet batch, no guidance (as diffusers)
        return self.guidance_scale > 1.0 and not self.guidance_embedded

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.n

    @property
    def loop_steps(self) -> int:
        """UNet calls the denoising loop makes (Heun: two per step but the last; img2img: fewer)."""
        return SAMPLERS[self.scheduler].loop_steps(self.steps) - self.start

    @property
    def sampler_steps(self) -> int:
        """The sampler's steps the loop runs, as diffusers' progress bar counts them: `steps`, or
        fewer for img2img; PNDM's extra first call and Heun's second calls are not steps."""
        return max(self.steps - self.start // SAMPLERS[self.scheduler].order, 1)

    def steps_done(self, calls: int) -> int:
        """The sampler steps done after `calls` UNet calls of the loop (0 .. sampler_steps)."""
        return calls * self.sampler_steps // self.loop_steps

    @property
    def start(self) -> int:
        """The schedule index the loop starts at (img2img / inpaint: past the first steps)."""
        return start_index(self.scheduler, self.steps, self.strength, self.guidance_embedded)

    @property
    def schedule_args(self) -> dict:
        """The sampler's schedule() arguments besides config and steps: custom timesteps or
        sigmas, and the strength where it compresses the schedule (strength_args)."""
        custom = {k: v for k, v in (("timesteps", self.timesteps), ("sigmas", self.sigmas)) if v is not None}
        return {**custom, **strength_args(self.scheduler, self.strength, self.guidance_embedded)}

    def settings(self) -> dict[str, Any]:
        """The call's settings with every default resolved, by API name (PNG metadata, echoes)."""
        one = len(self.prompts) == 1
        out = {"prompt": None if self.prompt_embeds is not None else self.prompts[0] if one else self.prompts,
               "negative_prompt": (self.negative_prompts[0] if one else self.negative_prompts)
               if self.negative_given else None,
               "num_inference_steps": self.steps, "scheduler": self.scheduler, "guidance_scale": self.guidance_scale,
               "guidance_rescale": self.guidance_rescale, "eta": self.eta,
               "strength": self.strength if self.image is not None else None, "height": self.height,
               "width": self.width, "num_images_per_prompt": self.n, "timesteps": self.timesteps,
               "sigmas": self.sigmas, "clip_skip": self.clip_skip, "prompt_syntax": self.prompt_syntax}
        if self.prompts_2 is not None or self.negative_prompts_2 is not None:
            out.update(prompt_2=self.prompts_2 and (self.prompts_2[0] if one else self.prompts_2),
                       negative_prompt_2=self.negative_prompts_2 and (self.negative_prompts_2[0] if one
                                                                      else self.negative_prompts_2))
        if self.control_images:
            out.update(controlnet_conditioning_scale=self.control_scales, control_guidance_start=self.control_start,
                       control_guidance_end=self.control_end)
        return out


def check_seed(seed) -> int | None:
    """A seed in [0, 2**32): torch's CPU generator, which fastsd draws noise from as
    diffusers does, seeds its mt19937 with the low 32 bits only, so seeds s and s + 2**32
    would give the same image; larger seeds are refused rather than aliased."""
    return check_value("seed", seed)


def draw_seed(count: int = 1) -> int:
    """fastsd's one seed policy: a seed from the OS (never torch's global generator) such that
    seed, seed + 1, ..., seed + count - 1 (a request's images) are all valid seeds."""
    return secrets.randbelow(SEED_LIMIT - count + 1)


def check_max_side(value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8):
        raise bad_value("max_side", f"must be an integer >= 8 (pixels) or None (no limit), got {value!r}")
    return value


def check_size(value, factor: int, name: str, max_side: int | None = None, given: bool = True) -> int:
    """A side in pixels: a positive multiple of the VAE factor, at most `max_side`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
        raise bad_value(name, f"must be a positive multiple of {factor}, got {value!r}")
    if max_side is not None and value > max_side:
        where = "" if given else " (from the input image)"
        raise bad_value(name, f"{value}{where} is over this pipeline's max_side of {max_side} pixels a side: pass a "
                              "smaller size, or raise the limit (pipe.max_side = N, from_pretrained(max_side=N), "
                              "--max-side N; None: no limit)")
    return value


def _embeds(value, what: str, width: int | None, tokens: int | None = None):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.ndim != 3 or not value.is_floating_point():
        raise bad_value(what, "must be a float tensor (batch, tokens, features), got "
                              f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if width is not None and value.shape[-1] != width:
        raise bad_value(what, f"has {value.shape[-1]} features; this checkpoint's UNet takes {width}")
    if tokens is not None and (value.shape[1] == 0 or value.shape[1] % tokens):
        raise bad_value(what, f"has {value.shape[1]} tokens; this checkpoint's text encoder gives {tokens} (or "
                              f"{tokens} per chunk of a long prompt)")
    if not torch.isfinite(value).all():
        raise bad_value(what, "holds NaN or infinite values")
    return value


def _texts(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _prompts(v: dict, info, text_width: int | None) -> dict:
    """prompts, negative prompts and their embeddings."""
    prompt_embeds = _embeds(v["prompt_embeds"], "prompt_embeds", text_width, info.max_tokens)
    negative_embeds = _embeds(v["negative_prompt_embeds"], "negative_prompt_embeds", text_width, info.max_tokens)
    if prompt_embeds is not None:
        if v["prompt"] is not None:
            raise bad_value("prompt", "and prompt_embeds: pass one, not both", "prompt_embeds")
        prompts = [""] * prompt_embeds.shape[0]
    elif v["prompt"] is None:
        raise bad_value("prompt", "must be a string or a non-empty list of strings (or pass prompt_embeds)")
    else:
        prompts = _texts(v["prompt"])
    if v["negative_prompt"] is not None and negative_embeds is not None:
        raise bad_value("negative_prompt", "and negative_prompt_embeds: pass one, not both", "negative_prompt_embeds")
    if negative_embeds is not None and (prompt_embeds is None or negative_embeds.shape != prompt_embeds.shape):
        raise bad_value("negative_prompt_embeds", "needs prompt_embeds of the same shape, got "
                                                  f"{tuple(negative_embeds.shape)}", "prompt_embeds")
    negatives = [""] * len(prompts) if v["negative_prompt"] is None else _texts(v["negative_prompt"])
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise bad_value("negative_prompt", f"has {len(negatives)} texts for {len(prompts)} prompts")
    return {"prompts": prompts, "negative_prompts": negatives, "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_embeds, "negative_given": v["negative_prompt"] is not None}


def _xl_options(v: dict, p: dict, defaults: Defaults) -> dict:
    """The SD-XL arguments checked into Request fields (refused for families without them)."""
    given = [k for k in GROUP["xl"] if v.get(k) is not None]
    if not defaults.takes_xl:
        if given:
            raise bad_value(given[0], "applies to SD-XL checkpoints; this one is SD 1.x/2.x")
        return {}
    out: dict[str, Any] = {}
    for name, texts, what in (("prompts_2", p["prompts"], "prompt_2"),
                              ("negative_prompts_2", p["negative_prompts"], "negative_prompt_2")):
        if v[what] is None or v[what] == "":  # diffusers: `prompt_2 or prompt`
            continue
        items = _texts(v[what])
        if len(items) == 1 and len(texts) > 1:
            items = items * len(texts)
        if len(items) != len(texts):
            raise bad_value(what, f"has {len(items)} texts for {len(texts)} prompts")
        out[name] = items
    for name, embeds, what in (("pooled_prompt_embeds", p["prompt_embeds"], "prompt_embeds"),
                               ("negative_pooled_prompt_embeds", p["negative_prompt_embeds"],
                                "negative_prompt_embeds")):
        value = v[name]
        if embeds is not None and value is None:
            raise bad_value(what, f"needs {name} too on SD-XL (the second text encoder's pooled output)", name)
        if value is not None:
            if embeds is None:
                raise bad_value(name, f"goes with {what}", what)
            if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != embeds.shape[0] or \
                    not value.is_floating_point() or not torch.isfinite(value).all():
                raise bad_value(name, f"must be a finite float tensor (batch {embeds.shape[0]}, features)")
            out[name] = value
    for name in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                 "negative_crops_coords_top_left", "negative_target_size"):
        out[name] = v[name]
    return out


def _per_controlnet(value, count: int, what: str) -> tuple[float, ...]:
    """A number, or a list of one per ControlNet (as diffusers), as a tuple of `count`."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(items) != count:
        raise bad_value(what, f"has {len(items)} values for {count} ControlNets")
    return tuple(items)


def _control_options(v: dict, count: int, prompts: int, mode: int, defaults: Defaults) -> dict:
    """The ControlNet arguments checked into Request fields: one image input per ControlNet
    (several ControlNets: a list of them, in load order), each 1 image or one per prompt;
    scales (None: the mode's default) and the guidance window as diffusers checks them."""
    image = v["control_image"]
    if image is None:
        unset = {"controlnet_conditioning_scale": None, "control_guidance_start": 0.0, "control_guidance_end": 1.0}
        given = [k for k, default in unset.items() if v[k] != default]
        if given:
            raise bad_value(given[0], "applies to calls with a control_image", "control_image")
        return {}
    if count == 0:
        raise bad_value("control_image", "needs a ControlNet: Pipeline.from_pretrained(..., controlnet=...)")
    if count > 1 and (not isinstance(image, (list, tuple)) or len(image) != count):
        raise bad_value("control_image", f"must be a list of {count} images with {count} ControlNets (one per "
                                         "ControlNet, in load order)")
    images = tuple(check_images(i, "control_image") for i in (image if count > 1 else [image]))
    for checked in images:
        n_images = batch_shape(checked, "control_image")[0]
        check_rgb(checked, "control_image")
        if n_images not in (1, prompts):
            raise bad_value("control_image", f"holds {n_images} images for {prompts} prompts: pass one, or one per "
                                             "prompt")
    scale = v["controlnet_conditioning_scale"]
    scale = defaults.control_scale[mode] if scale is None else scale
    start = _per_controlnet(v["control_guidance_start"], count, "control_guidance_start")
    end = _per_controlnet(v["control_guidance_end"], count, "control_guidance_end")
    for s, e in zip(start, end, strict=True):
        if s >= e:
            raise bad_value("control_guidance_start", f"{s:g} must be below control_guidance_end {e:g}",
                            "control_guidance_end")
    return {"control_images": images, "control_start": start, "control_end": end,
            "control_scales": _per_controlnet(scale, count, "controlnet_conditioning_scale")}


def _schedule(v: dict) -> dict:
    """The sampler, its config and the step count (a custom schedule sets the count)."""
    timesteps, sigmas = v["timesteps"], v["sigmas"]
    steps = v["num_inference_steps"]
    if timesteps is not None and sigmas is not None:
        raise bad_value("timesteps", "and sigmas: pass one, not both", "sigmas")
    if timesteps is not None or sigmas is not None:
        steps = len(timesteps) if timesteps is not None else len(sigmas) - 1  # as diffusers' retrieve_timesteps
        if steps < 1:
            raise bad_value("sigmas", "needs at least two values (the last is where sampling ends)")
    choice: SchedulerChoice = choose_scheduler(v["scheduler"], {})  # raises where the default is not runnable
    if (timesteps is not None or sigmas is not None) and not SAMPLERS[choice.name].custom_schedule:
        raise bad_value("timesteps" if timesteps is not None else "sigmas",
                        f"is not taken by the {choice.name!r} sampler (as its diffusers class); use 'euler'")
    return {"steps": steps, "scheduler": choice.name, "scheduler_config": choice.settings, "timesteps": timesteps,
            "sigmas": sigmas, "eta": v["eta"]}


def _image_inputs(v: dict, batch: int, mode: int, defaults: Defaults, control: dict, info) -> dict:
    """image, mask and strength checked; with the default size they give (None: the checkpoint's)."""
    image, mask, strength = v["image"], v["mask_image"], v["strength"]
    size = control_size(control["control_images"][0], info.vae_factor) if control and mode == TXT2IMG else None
    if image is None:
        if strength is not None and strength != 1.0:
            raise bad_value("strength", "applies to img2img/inpaint only: pass an image too", "image")
        return {"image": None, "mask_image": None, "strength": 1.0, "size": size}
    image = check_images(image, "image")
    count, image_h, image_w = batch_shape(image, "image")
    if count > batch or batch % count:
        raise bad_value("image", f"holds {count} images, which cannot be spread over {batch} images "
                                 "(len(prompt) x num_images_per_prompt must be a multiple of it)")
    if strength is None:  # diffusers' defaults: img2img 0.8, inpainting 1.0 (SD-XL: 0.3, 0.9999)
        strength = defaults.img2img_strength if mode == IMG2IMG else defaults.inpaint_strength
    if mode == IMG2IMG or control:  # img2img, ControlNet inpaint: the image's size (inpaint: the checkpoint's)
        size = (image_h // info.vae_factor * info.vae_factor, image_w // info.vae_factor * info.vae_factor)
    if mode == IMG2IMG:
        if v["latents"] is not None:
            raise bad_value("latents", "applies to txt2img and inpaint (diffusers' img2img takes none)")
    else:
        mask = check_images(mask, "mask_image")
        masks, mask_h, mask_w = batch_shape(mask, "mask_image", mask=True)
        if masks > batch or batch % masks:
            raise bad_value("mask_image", f"holds {masks} masks, which cannot be spread over {batch} images")
        if (mask_h, mask_w) != (image_h, image_w):
            log.warning("mask size %dx%d differs from the image's %dx%d; resizing it", mask_w, mask_h,
                        image_w, image_h)
    return {"image": image, "mask_image": mask, "strength": strength, "size": size}


def _latents(latents, shape: tuple[int, ...]):
    if latents is None:
        return None
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise bad_value("latents", f"must be a tensor of shape {shape} for this call, got {got}")
    if not torch.isfinite(latents).all():
        raise bad_value("latents", "holds NaN or infinite values")
    return latents


def make_request(info, values: dict[str, Any], *, text_width: int | None = None, defaults: Defaults = Defaults(),
                 controlnets: int = 0, max_side: int | None = None, ip_adapters: int = 0) -> Request:
    """The call's Request from its arguments (API names; any left out take the table's
    defaults): the table's checks, then the rules between arguments and the checkpoint."""
    v = check_values({**arguments.defaults(), **values})
    if v["mask_image"] is not None and v["image"] is None:
        raise bad_value("mask_image", "needs an image to inpaint", "image")
    mode = TXT2IMG if v["image"] is None else IMG2IMG if v["mask_image"] is None else INPAINT
    prompts = _prompts(v, info, text_width)
    xl = _xl_options(v, prompts, defaults)
    if v["control_image"] is not None and defaults.controlled is not None:  # the family's ControlNet pipelines'
        defaults = defaults.controlled
    control = _control_options(v, controlnets, len(prompts["prompts"]), mode, defaults)
    schedule = _schedule(v)
    guidance = v["guidance_scale"]
    if guidance is None:  # the family's default for the mode (SD-XL inpaint: 7.5, else 5.0)
        guidance = defaults.guidance_scale if mode != INPAINT else defaults.inpaint_guidance_scale
    batch = len(prompts["prompts"]) * v["num_images_per_prompt"]
    images = _image_inputs(v, batch, mode, defaults, control, info)
    steps, strength = schedule["steps"], images["strength"]
    embedded = bool(getattr(info, "guidance_embedding_dim", 0))
    compressed = strength_args(schedule["scheduler"], strength, embedded)  # LCM img2img: all steps, fewer timesteps
    if strength == 0.0 or (first_step(steps, strength) >= steps and not compressed):
        raise bad_value("strength", f"{strength:g} with {steps} steps denoises nothing: raise strength or "
                                    "num_inference_steps", "num_inference_steps")
    custom = {k: schedule[k] for k in ("timesteps", "sigmas") if schedule[k] is not None}
    check_run(schedule["scheduler"], schedule["scheduler_config"], steps, schedule["eta"],
              start_index(schedule["scheduler"], steps, strength, embedded), **custom, **compressed)
    default_h, default_w = images.pop("size") or (info.default_size, info.default_size)
    h = check_size(default_h if v["height"] is None else v["height"], info.vae_factor, "height", max_side,
                   v["height"] is not None)
    w = check_size(default_w if v["width"] is None else v["width"], info.vae_factor, "width", max_side,
                   v["width"] is not None)
    f = info.vae_factor
    latents = _latents(v["latents"], (batch, info.latent_channels, h // f, w // f))
    if embedded and (any(prompts["negative_prompts"]) or v["negative_prompt_embeds"] is not None):
        log.warning("this UNet is guidance-distilled (LCM: it takes the guidance scale as an input) and runs "
                    "without classifier-free guidance: the negative prompt has no effect")
    ip = ip_options(v, ip_adapters, len(prompts["prompts"]), guidance > 1.0 and not embedded)
    return Request(**prompts, **xl, **control, **ip, **schedule, **images, guidance_scale=guidance,
                   guidance_embedded=embedded,
                   guidance_rescale=v["guidance_rescale"], height=h, width=w, n=v["num_images_per_prompt"],
                   output_type=v["output_type"], clip_skip=v["clip_skip"], latents=latents,
                   prompt_syntax=v["prompt_syntax"])
