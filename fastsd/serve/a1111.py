"""AUTOMATIC1111's web API (/sdapi/v1) on fastsd's server, so that the tools written for
the web UI (Open WebUI, SillyTavern, the `webuiapi` client, ...) work unchanged.

Field names, defaults and response shapes are the web UI's (modules/api/models.py and
processing.py of AUTOMATIC1111 1.10): txt2img and img2img answer {images, parameters, info}
with `info` the JSON string the web UI returns (seeds and the "parameters" infotexts).
Requests join the same batcher, limits, metrics and access control as OpenAI's API.

A field fastsd does not implement is taken at the web UI's default (or at any value the web
UI itself ignores in that request: eta for samplers without noise, s_tmin with no churn,
...) and refused at any other value with a 422 naming it: never silently ignored. Fields
that are not the web UI's are ignored as the web UI ignores them (SillyTavern sends its own
`url` and `auth`), except SD.Next's `clip_skip`, which is honoured.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, PngImagePlugin

from ..arguments import MAX_GUIDANCE, SEED_LIMIT
from ..errors import FastSDError, InvalidArgumentError
from ..hires import Hires, check_hires
from ..images import as_rgb
from ..settings import check_size, draw_seed
from ..upscale import LATENT_MODES, RESAMPLERS, model_files
from ..version import __version__
from .a1111_images import FILL, ORIGINAL, InpaintPlan, plan_inpaint
from .api import APIError, ImageRequest, decode_base64, read_upload

log = logging.getLogger("fastsd.serve")

A1111_VERSION = "v1.10.1"  # the web UI whose API this follows
# display name, aliases, fastsd sampler, its Karras-schedule variant (None: fastsd has none)
SAMPLERS = (
    ("DPM++ 2M", ("k_dpmpp_2m",), "dpmpp_2m", "dpmpp_2m_karras"),
    ("DPM++ 2M SDE", ("k_dpmpp_2m_sde_ka",), "dpmpp_2m_sde", "dpmpp_2m_sde_karras"),
    ("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_a", None),
    ("Euler", ("k_euler",), "euler", "euler_karras"),
    ("Heun", ("k_heun",), "heun", None),
    ("DDIM", ("ddim",), "ddim", None),
    ("PLMS", ("plms",), "pndm", None),
    ("UniPC", ("unipc",), "unipc", None),
    ("LCM", ("k_lcm",), "lcm", None),
)
SCHEDULES = (("automatic", "Automatic"), ("karras", "Karras"))
NOISY = ("euler_a", "dpmpp_2m_sde", "dpmpp_2m_sde_karras")  # eta scales their noise: the web UI's 1.0 only
DEFAULT_SAMPLER = "Euler"  # the web UI's API default (sampler_index)
SAME = ("", "Use same sampler", "Use same scheduler", "Use same checkpoint")
ENDPOINTS = tuple(f"/sdapi/v1/{p}" for p in (
    "txt2img", "img2img", "options", "sd-models", "samplers", "schedulers", "upscalers", "latent-upscale-modes",
    "sd-vae", "loras", "embeddings", "scripts", "progress", "interrupt", "skip"))  # for /metrics' labels


class A1111Error(Exception):
    """A refused /sdapi request: 422 names the field as FastAPI's validation errors do."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def body(self) -> dict:
        if self.status == 422:
            return {"detail": [{"loc": ["body", *(self.field or "body").split(".")], "msg": self.message,
                                "type": "value_error"}]}
        return {"error": "HTTPException", "detail": self.message, "body": "", "errors": self.message}


def _bad(name: str, message: str) -> A1111Error:
    return A1111Error(422, f"{name}: {message}", name)


# ---- fields --------------------------------------------------------------------------------

_COMMON = ("prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
           "seed_resize_from_w", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps",
           "cfg_scale", "width", "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid",
           "eta", "denoising_strength", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise",
           "override_settings", "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at",
           "disable_extra_networks", "firstpass_image", "comments", "script_name", "script_args", "send_images",
           "save_images", "alwayson_scripts", "force_task_id", "infotext", "token_merging_ratio",
           "token_merging_ratio_hr")
TXT2IMG_FIELDS = _COMMON + ("enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
                            "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
                            "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
                            "hr_additional_modules", "hr_cfg", "hr_distilled_cfg")
IMG2IMG_FIELDS = _COMMON + ("init_images", "resize_mode", "image_cfg_scale", "mask", "mask_blur_x", "mask_blur_y",
                            "mask_blur", "mask_round", "inpainting_fill", "inpaint_full_res",
                            "inpaint_full_res_padding", "inpainting_mask_invert", "initial_noise_multiplier",
                            "latent_mask", "include_init_images")


def _off(v) -> bool:
    return v is None or v is False or v == 0 or v == "" or v == [] or v == {}


# field -> (accepted, what fastsd says about other values): the web UI's default, or the values
# that have no effect there either
_DEFAULT_ONLY = {
    "styles": (lambda v, b: _off(v), "prompt styles are not supported: put the style's words in the prompt"),
    "subseed_strength": (lambda v, b: _off(v), "variation seeds are not supported"),
    "subseed": (lambda v, b: True, ""),  # no effect without subseed_strength
    "seed_resize_from_h": (lambda v, b: v is None or v <= 0, "seed resize is not supported"),
    "seed_resize_from_w": (lambda v, b: v is None or v <= 0, "seed resize is not supported"),
    "restore_faces": (lambda v, b: _off(v), "face restoration is not supported"),
    "tiling": (lambda v, b: _off(v), "tiling (seamless textures) is not supported"),
    "s_min_uncond": (lambda v, b: _off(v), "negative guidance minimum sigma is not supported"),
    "s_churn": (lambda v, b: _off(v), "sigma churn is not supported"),
    "s_tmax": (lambda v, b: True, ""),  # only with s_churn
    "s_tmin": (lambda v, b: True, ""),
    "s_noise": (lambda v, b: v is None or v == 1, "only the samplers' own noise (s_noise 1) is supported"),
    "refiner_checkpoint": (lambda v, b: v in (None, "", "None"), "refiner checkpoints are not supported"),
    "refiner_switch_at": (lambda v, b: True, ""),  # only with a refiner
    "disable_extra_networks": (lambda v, b: _off(v), "fastsd always applies <lora:...> tags"),
    "firstpass_image": (lambda v, b: _off(v), "a given first-pass image is not supported"),
    "script_name": (lambda v, b: _off(v), "scripts are not supported"),
    "script_args": (lambda v, b: True, ""),  # only with a script
    "alwayson_scripts": (lambda v, b: _off(v) or all(_off(x.get("args")) or x.get("args") == [False]
                                                      for x in v.values() if isinstance(x, dict)),
                         "extension scripts are not supported"),
    "infotext": (lambda v, b: _off(v), "reading settings from an infotext is not supported: send the fields"),
    "token_merging_ratio": (lambda v, b: _off(v), "token merging is not supported"),
    "token_merging_ratio_hr": (lambda v, b: _off(v), "token merging is not supported"),
    "firstphase_width": (lambda v, b: _off(v), "deprecated by the web UI: use width"),
    "firstphase_height": (lambda v, b: _off(v), "deprecated by the web UI: use height"),
    "hr_additional_modules": (lambda v, b: _off(v), "additional modules are not supported"),
    "hr_cfg": (lambda v, b: True, ""),  # Forge's; the web UI has none
    "hr_distilled_cfg": (lambda v, b: True, ""),
    "resize_mode": (lambda v, b: _off(v), "only resize mode 0 (just resize) is supported"),
    "image_cfg_scale": (lambda v, b: True, ""),  # InstructPix2Pix models only
    "mask_round": (lambda v, b: v is None or v is True or v == 1, "only the web UI's rounded latent mask"),
    "initial_noise_multiplier": (lambda v, b: v is None or v == 1, "only the initial noise multiplier 1"),
    "latent_mask": (lambda v, b: _off(v), "a separate latent mask is not supported"),
    "include_init_images": (lambda v, b: True, ""),  # excluded from the web UI's request model
    "do_not_save_samples": (lambda v, b: True, ""),  # the API decides by save_images
    "do_not_save_grid": (lambda v, b: True, ""),
    "comments": (lambda v, b: True, ""),
    "force_task_id": (lambda v, b: v is None or isinstance(v, str), "must be a string"),
}


class _Body:
    def __init__(self, data: dict):
        self.data = data

    def get(self, name: str, default=None):
        v = self.data.get(name)
        return default if v is None else v

    def integer(self, name: str, default, lo: int | None = None, hi: int | None = None) -> int:
        v = self.get(name, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
            raise _bad(name, f"must be an integer{bounds}, got {v!r}")
        return v

    def number(self, name: str, default, lo: float, hi: float, lo_open: bool = False) -> float:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi or (lo_open and v == lo):
            raise _bad(name, f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")
        return float(v)

    def text(self, name: str, default: str = "", limit: int | None = None) -> str:
        v = self.get(name, default)
        if not isinstance(v, str):
            raise _bad(name, f"must be a string, got {type(v).__name__}")
        if limit is not None and len(v) > limit:
            raise _bad(name, f"is {len(v)} characters long; this server takes at most {limit}")
        return v

    def flag(self, name: str, default: bool) -> bool:
        v = self.get(name, default)
        if v in (0, 1) and not isinstance(v, float):
            return bool(v)
        raise _bad(name, f"must be true or false, got {v!r}")


def sampler_for(name, schedule, field_name: str = "sampler_name") -> tuple[str, str, str]:
    """(fastsd sampler, the web UI's sampler name, its schedule label) for a sampler_name
    ("DPM++ 2M", "DPM++ 2M Karras", an alias) and a scheduler ("Automatic", "Karras")."""
    if not isinstance(name, str) or not name:
        name = DEFAULT_SAMPLER
    karras = False
    wanted = name.strip()
    if wanted.lower().endswith(" karras"):
        wanted, karras = wanted[:-7].strip(), True
    entry = next((e for e in SAMPLERS if wanted.lower() in (e[0].lower(), *e[1])), None)
    if entry is None:
        raise _bad(field_name, f"unknown sampler {name!r}; fastsd has: {', '.join(e[0] for e in SAMPLERS)} (and "
                               f"'... Karras' for {', '.join(e[0] for e in SAMPLERS if e[3])})")
    sched_field = "hr_scheduler" if field_name.startswith("hr_") else "scheduler"
    if schedule not in (None, "") and not (isinstance(schedule, str) and schedule.lower() in
                                           ("automatic", "karras", "use same scheduler")):
        raise _bad(sched_field, f"unknown schedule {schedule!r}; fastsd has: Automatic, Karras")
    if isinstance(schedule, str) and schedule.lower() == "karras":
        karras = True
    if karras and entry[3] is None:
        raise _bad(sched_field, f"the {entry[0]} sampler has no Karras schedule in fastsd (Karras works with "
                                f"{', '.join(e[0] for e in SAMPLERS if e[3])})")
    return (entry[3] if karras else entry[2]), entry[0], "Karras" if karras else "Automatic"


@dataclass
class Parsed:
    """One /sdapi request, checked: the server request and how to answer it."""

    req: ImageRequest
    mode: str
    batch_size: int
    n_iter: int
    sampler: str  # the web UI's name
    schedule: str
    clip_stop: int
    send_images: bool
    save_images: bool
    parameters: dict
    plans: list[InpaintPlan] = field(default_factory=list)
    denoising: float | None = None
    hires: Hires | None = None
    hires_size: tuple[int, int] | None = None


@dataclass
class Context:
    factor: int
    limits: Any
    names: tuple[str, ...]  # what sd_model_checkpoint / hr_checkpoint_name may say
    options: dict  # the current /sdapi/v1/options
    upscaler_dir: str | None
    clip_layers: int
    load_upscaler: Any = None  # a model upscaler by name, loaded (and kept) before a request is queued


def _check_defaults(data: dict, known: tuple[str, ...]) -> None:
    for name, (ok, why) in _DEFAULT_ONLY.items():
        if name in known and name in data:
            try:
                accepted = ok(data[name], data)
            except (TypeError, AttributeError, ValueError):  # a value of another kind than the field's
                accepted = False
            if not accepted:
                raise _bad(name, f"{why}; fastsd takes only the web UI's default here, got {data[name]!r}")


def _sizes(b: _Body, ctx: Context) -> dict[str, int]:
    sizes = {}
    for name in ("width", "height"):
        v = b.integer(name, 512, 1)
        try:
            sizes[name] = check_size(v, ctx.factor, name, ctx.limits.max_side)
        except InvalidArgumentError as e:
            raise _bad(name, e.detail) from None
    return sizes


def _sampling(b: _Body, ctx: Context) -> tuple[list, str, str, int]:
    """The call settings of steps, CFG, sampler, eta and clip skip; the sampler's and schedule's
    web UI names; the clip stop."""
    data = b.data
    steps = b.integer("steps", 50, 1, ctx.limits.max_steps)
    cfg = b.number("cfg_scale", 7.0, 0.0, MAX_GUIDANCE)
    name = data.get("sampler_name") or data.get("sampler_index")
    sampler, label, schedule = sampler_for(name, data.get("scheduler"),
                                           "sampler_name" if data.get("sampler_name") else "sampler_index")
    settings: list[tuple[str, Any]] = [("num_inference_steps", steps), ("guidance_scale", cfg), ("scheduler", sampler)]
    if data.get("eta") is not None:
        eta = b.number("eta", 0.0, 0.0, 1.0)
        if sampler == "ddim":
            settings.append(("eta", eta))
        elif sampler in NOISY and eta != 1.0:
            raise _bad("eta", f"the {label} sampler runs with its full noise (eta 1) in fastsd, got {eta:g}")
    clip_stop = _overrides(b, ctx)
    if clip_stop > 1:
        settings.append(("clip_skip", clip_stop - 1))
    return settings, label, schedule, clip_stop


def parse(data, mode: str, ctx: Context) -> Parsed:
    if not isinstance(data, dict):
        raise A1111Error(422, "the request body must be a JSON object", "body")
    b = _Body(data)
    known = TXT2IMG_FIELDS if mode == "txt2img" else IMG2IMG_FIELDS
    _check_defaults(data, known)
    lim = ctx.limits
    prompt = b.text("prompt", "", lim.max_prompt_chars)
    negative = b.text("negative_prompt", "", lim.max_prompt_chars)
    batch_size, n_iter = b.integer("batch_size", 1, 1), b.integer("n_iter", 1, 1)
    n = batch_size * n_iter
    if n > lim.max_n:
        raise _bad("batch_size", f"batch_size x n_iter is {n}; this server makes at most {lim.max_n} images a request")
    seed = b.integer("seed", -1, -1, SEED_LIMIT - n)
    seed = draw_seed(n) if seed == -1 else seed
    sizes = _sizes(b, ctx)
    settings, sampler_label, schedule, clip_stop = _sampling(b, ctx)
    denoising = image = mask = hires = hires_size = None
    plans: list[InpaintPlan] = []
    if mode == "img2img":
        denoising = b.number("denoising_strength", 0.75, 0.0, 1.0, lo_open=True)
        settings.append(("strength", denoising))
        image, mask, plans = _init_images(b, sizes["width"], sizes["height"], lim)
    else:
        hires, hires_size = _hires(b, ctx, sizes, sampler_label, schedule)
        denoising = None if hires is None else hires.strength
    settings.append(("prompt_syntax", "a1111"))
    send, save = b.flag("send_images", True), b.flag("save_images", False)
    req = ImageRequest(prompt, negative, n, sizes["width"], sizes["height"], seed, tuple(settings), "png", 100,
                       image, mask, hires=hires)
    parameters = {k: data.get(k) for k in known if k not in ("init_images", "mask")}
    parameters.update(prompt=prompt, negative_prompt=negative, seed=seed, batch_size=batch_size, n_iter=n_iter,
                      steps=dict(settings)["num_inference_steps"], cfg_scale=dict(settings)["guidance_scale"],
                      sampler_name=sampler_label, scheduler=schedule, send_images=send, save_images=save, **sizes)
    if mode == "img2img":
        parameters.update(init_images=None, mask=None, denoising_strength=denoising)
    return Parsed(req, mode, batch_size, n_iter, sampler_label, schedule, clip_stop, send, save, parameters, plans,
                  denoising, hires, hires_size)


def _overrides(b: _Body, ctx: Context) -> int:
    """override_settings (and SD.Next's clip_skip): the request's clip stop."""
    over = b.get("override_settings", {})
    if not isinstance(over, dict):
        raise _bad("override_settings", f"must be an object, got {type(over).__name__}")
    clip_stop = ctx.options["CLIP_stop_at_last_layers"]
    for key, value in over.items():
        name = f"override_settings.{key}"
        if value is None:
            continue
        if key == "CLIP_stop_at_last_layers":
            clip_stop = _clip_stop(value, name, ctx)
        elif key == "sd_model_checkpoint":
            if value not in ctx.names:
                raise A1111Error(422, f"{name}: this server runs only {ctx.names[0]!r}, got {value!r}", name)
        elif key == "sd_vae":
            if value not in ("Automatic", "None"):
                raise _bad(name, f"this server has no VAE files to choose from (Automatic, None), got {value!r}")
        elif key in ctx.options and ctx.options[key] == value:
            continue
        else:
            raise _bad(name, f"fastsd cannot change the setting {key!r} per request")
    if "clip_skip" in b.data and b.data["clip_skip"] is not None:  # SD.Next's field, as SillyTavern sends it
        stop = _clip_stop(b.data["clip_skip"], "clip_skip", ctx)
        if "CLIP_stop_at_last_layers" in over and over["CLIP_stop_at_last_layers"] not in (None, stop):
            raise _bad("clip_skip", "differs from override_settings.CLIP_stop_at_last_layers")
        clip_stop = stop
    return clip_stop


def _clip_stop(value, name: str, ctx: Context) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ctx.clip_layers:
        raise _bad(name, f"must be an integer in [1, {ctx.clip_layers}] (1: CLIP's last layer), got {value!r}")
    return value


def _hires(b: _Body, ctx: Context, sizes: dict, sampler_label: str, schedule: str):
    if not b.flag("enable_hr", False):
        return None, None
    up = b.get("hr_upscaler", "Latent") or "Latent"
    files = model_files(ctx.upscaler_dir)
    if not isinstance(up, str) or (up not in LATENT_MODES and up not in RESAMPLERS and up not in files):
        raise _bad("hr_upscaler", f"unknown upscaler {up!r}; this server has: "
                                  f"{', '.join([*LATENT_MODES, *RESAMPLERS, *files])}")
    ckpt = b.get("hr_checkpoint_name")
    if ckpt is not None and ckpt not in SAME and ckpt not in ctx.names:
        raise _bad("hr_checkpoint_name", f"this server runs only {ctx.names[0]!r}, got {ckpt!r}")
    hr_sampler = b.get("hr_sampler_name")
    hr_schedule = b.get("hr_scheduler")
    scheduler = None
    if (hr_sampler not in (None, *SAME)) or (hr_schedule not in (None, *SAME)):
        scheduler, _, _ = sampler_for(hr_sampler if hr_sampler not in (None, *SAME) else sampler_label,
                                      hr_schedule if hr_schedule not in (None, *SAME) else schedule,
                                      "hr_sampler_name")
    h = Hires(scale=b.number("hr_scale", 2.0, 1.0, 8.0), resize_x=b.integer("hr_resize_x", 0, 0),
              resize_y=b.integer("hr_resize_y", 0, 0), upscaler=up,
              steps=b.integer("hr_second_pass_steps", 0, 0, ctx.limits.max_steps) or None,
              strength=b.number("denoising_strength", 0.75, 0.0, 1.0, lo_open=True),
              prompt=b.text("hr_prompt", "", ctx.limits.max_prompt_chars) or None,
              negative_prompt=b.text("hr_negative_prompt", "", ctx.limits.max_prompt_chars) or None,
              scheduler=scheduler)
    try:
        check_hires(h, files)
        if up in files and ctx.load_upscaler is not None:
            ctx.load_upscaler(up)
    except InvalidArgumentError as e:
        raise _bad(e.param or "enable_hr", e.detail) from None
    except FastSDError as e:  # the model file cannot be loaded (spandrel, its architecture)
        raise _bad("hr_upscaler", str(e)) from None
    w, hh, _, _ = h.target(sizes["width"], sizes["height"], ctx.factor)
    if max(w, hh) > ctx.limits.max_side:
        raise _bad("hr_scale", f"the hires size {w}x{hh} is over this server's {ctx.limits.max_side} pixels a side")
    return h, (w, hh)


def decode_image(text, name: str, limits) -> Image.Image:
    """A base64 image (or data URL), checked as uploads are: 422 naming the field."""
    if not isinstance(text, str) or not text:
        raise _bad(name, "must be a base64-encoded image (or a data URL)")
    try:
        return read_upload(decode_base64(text, name), name, limits)
    except APIError as e:
        raise _bad(name, e.message.removeprefix(f"'{name}' ")) from None


def _init_images(b: _Body, width: int, height: int, limits):
    images = b.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise _bad("init_images", "must be a list of one base64-encoded image")
    image = as_rgb(decode_image(images[0], "init_images", limits))
    if b.get("mask") is None:
        return image, None, []
    mask = decode_image(b.get("mask"), "mask", limits)
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1] != (255, 255):  # the web UI reads alpha masks so
        mask = mask.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    blur = b.get("mask_blur")
    blur_x = b.integer("mask_blur", 4, 0, 64) if blur is not None else b.integer("mask_blur_x", 4, 0, 64)
    blur_y = blur_x if blur is not None else b.integer("mask_blur_y", 4, 0, 64)
    fill = b.integer("inpainting_fill", FILL, 0, 3)
    if fill not in (FILL, ORIGINAL):
        raise _bad("inpainting_fill", f"fastsd runs 0 (fill) and 1 (original); latent noise (2) and latent nothing "
                                      f"(3) are not supported, got {fill}")
    plan = plan_inpaint(image, mask, width, height, invert=b.integer("inpainting_mask_invert", 0, 0, 1) == 1,
                        blur_x=blur_x, blur_y=blur_y, full_res=b.flag("inpaint_full_res", True),
                        padding=b.integer("inpaint_full_res_padding", 0, 0, 4096), fill=fill)
    return plan.image, plan.mask, [plan]


# ---- answers -------------------------------------------------------------------------------


def infotext(p: Parsed, seed: int, model: tuple[str, str], extra: dict | None = None) -> str:
    """The web UI's "parameters" text of one image."""
    r = p.req
    items = {"Steps": dict(r.settings)["num_inference_steps"], "Sampler": p.sampler, "Schedule type": p.schedule,
             "CFG scale": dict(r.settings)["guidance_scale"], "Seed": seed, "Size": f"{r.width}x{r.height}",
             "Model hash": model[1], "Model": model[0]}
    if p.denoising is not None:
        items["Denoising strength"] = p.denoising
    if p.clip_stop > 1:
        items["Clip skip"] = p.clip_stop
    if p.hires is not None:
        h = p.hires
        if h.resize_x or h.resize_y:
            items["Hires resize"] = f"{p.hires_size[0]}x{p.hires_size[1]}"
        else:
            items["Hires upscale"] = h.scale
        if h.steps:
            items["Hires steps"] = h.steps
        items["Hires upscaler"] = h.upscaler
        if h.prompt:
            items["Hires prompt"] = json.dumps(h.prompt)
    items.update(extra or {})
    items["Version"] = f"fastsd {__version__}"
    line = ", ".join(f"{k}: {_value(v)}" for k, v in items.items())
    negative = f"\nNegative prompt: {r.negative_prompt}" if r.negative_prompt else ""
    return f"{r.prompt}{negative}\n{line}"


def _value(v) -> str:
    text = str(v)
    return json.dumps(text) if ("," in text or ":" in text) and not text.startswith('"') else text


def png_bytes(im: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    im.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def save_pngs(folder: str, blobs: list[bytes], seeds: list[int]) -> list[str]:
    """Write each PNG under a new name (NNNNN-SEED.png, never over another file), whole or not at all."""
    from ..files import created_mode

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    count = len(list(root.glob("*.png")))
    written = []
    for blob, seed in zip(blobs, seeds, strict=True):
        tmp = root / f".fastsd-{os.getpid()}-{time.monotonic_ns()}.tmp"
        tmp.write_bytes(blob)
        os.chmod(tmp, created_mode())
        try:
            while True:
                path = root / f"{count:05d}-{seed}.png"
                count += 1
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    continue
        finally:
            tmp.unlink(missing_ok=True)
        written.append(str(path))
    return written


def info_json(p: Parsed, seeds: list[int], infotexts: list[str], model: tuple[str, str]) -> str:
    r = p.req
    all_seeds = [r.seed + i for i in range(r.n)]
    return json.dumps({
        "prompt": r.prompt, "all_prompts": [r.prompt] * r.n, "negative_prompt": r.negative_prompt,
        "all_negative_prompts": [r.negative_prompt] * r.n, "seed": r.seed, "all_seeds": all_seeds,
        "subseed": -1, "all_subseeds": [-1] * r.n, "subseed_strength": 0, "width": r.width, "height": r.height,
        "sampler_name": p.sampler, "cfg_scale": dict(r.settings)["guidance_scale"],
        "steps": dict(r.settings)["num_inference_steps"], "batch_size": p.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model[0], "sd_model_hash": model[1], "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": p.denoising,
        "extra_generation_params": {"Schedule type": p.schedule}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": p.clip_stop, "is_using_inpainting_conditioning": False, "version": f"fastsd {__version__}",
        "images_seeds": seeds})


# ---- routes --------------------------------------------------------------------------------


def model_identity(state) -> tuple[str, str, str]:
    """(model name, short hash, title "name [hash]") as the web UI lists checkpoints."""
    name = state.options.served_names[0]
    digest = str(state.pipe.info.fingerprint)
    short = digest[:10]
    return name, short, f"{name} [{short}]"


def default_options(state) -> dict:
    name, short, title = model_identity(state)
    o = state.options
    return {"sd_model_checkpoint": title, "sd_checkpoint_hash": str(state.pipe.info.fingerprint),
            "CLIP_stop_at_last_layers": 1 + int(state.pipe.clip_skip or 0), "sd_vae": "Automatic",
            "samples_save": o.output_dir is not None, "samples_format": "png", "outdir_samples": o.output_dir or "",
            "enable_pnginfo": True, "eta_ddim": 0.0, "eta_ancestral": 1.0,
            "live_previews_enable": state.pipe.preview_vae is not None,
            "show_progress_every_n_steps": o.preview_every if state.pipe.preview_vae is not None else -1,
            "upscaler_for_img2img": None, "sd_vae_overrides_per_model_preferences": True}


class _Api:
    """What the /sdapi routes share: readiness, the request context, bodies, generation."""

    def __init__(self, state):
        self.state = state

    def ready(self) -> None:
        try:
            self.state.check_ready()
        except APIError as e:
            raise A1111Error(e.status, e.message) from None
        if self.state.a1111 is None:
            self.state.a1111 = default_options(self.state)

    def context(self) -> Context:
        state = self.state
        names = (*state.options.served_names, *model_identity(state)[::2])
        layers = state.pipe.ckpt.configs["text_encoder"]["num_hidden_layers"]
        return Context(state.pipe.info.vae_factor, state.options.limits, names, state.a1111,
                       state.options.upscaler_dir, layers, state.pipe.upscaler)

    @staticmethod
    async def body(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise A1111Error(422, f"the request body is not valid JSON ({e})", "body") from None

    async def generate(self, request: Request, mode: str) -> dict:
        self.ready()
        t0, state = time.perf_counter(), self.state
        data = await self.body(request)
        p = parse(data, mode, self.context())
        if data.get("override_settings_restore_afterwards") is False:  # the web UI keeps the overrides
            kept = {k: v for k, v in data["override_settings"].items() if k in ("CLIP_stop_at_last_layers", "sd_vae")
                    and v is not None} if isinstance(data.get("override_settings"), dict) else {}
            state.a1111.update(kept)
        try:
            images = await state.images(request, p.req)
        except APIError as e:
            field = {"prompt": "prompt", "negative_prompt": "negative_prompt", "image": "init_images",
                     "mask": "mask", "num_inference_steps": "steps", "guidance_scale": "cfg_scale",
                     "strength": "denoising_strength", "scheduler": "sampler_name",
                     "clip_skip": "override_settings.CLIP_stop_at_last_layers"}.get(e.param or "", e.param)
            raise A1111Error(422 if e.status == 400 else e.status, e.message, field) from None
        name, short, _ = model_identity(state)
        kept = [(i, im) for i, im in enumerate(images) if im is not None]
        finals = [p.plans[0].apply(im) if p.plans else im for _, im in kept]
        seeds = [p.req.seed + i for i, _ in kept]
        texts = [infotext(p, s, (name, short)) for s in seeds]
        blobs = await asyncio.to_thread(lambda: [png_bytes(im, t) for im, t in zip(finals, texts, strict=True)])
        if p.save_images and state.options.output_dir is not None and blobs:
            await asyncio.to_thread(save_pngs, state.options.output_dir, blobs, seeds)
        state.metrics.images.inc(len(blobs))
        state.metrics.stage.labels("request").observe(time.perf_counter() - t0)
        return {"images": [base64.b64encode(x).decode("ascii") for x in blobs] if p.send_images else [],
                "parameters": p.parameters, "info": info_json(p, seeds, texts, (name, short))}

    def set_options(self, data) -> None:
        """POST /sdapi/v1/options: what fastsd can set; any other key only at its current value
        (Open WebUI posts the whole object back)."""
        if not isinstance(data, dict):
            raise A1111Error(422, "the options are a JSON object", "body")
        ctx, current = self.context(), self.state.a1111
        update = {}
        for key, value in data.items():
            if key == "sd_model_checkpoint":
                if value not in ctx.names:
                    raise A1111Error(422, f"sd_model_checkpoint: this server runs only {ctx.names[-1]!r}, got "
                                          f"{value!r}", key)
                value = current[key]
            elif key == "CLIP_stop_at_last_layers":
                value = _clip_stop(value, key, ctx)
            elif key == "sd_vae":
                if value not in ("Automatic", "None"):
                    raise _bad(key, f"this server has no VAE files to choose from (Automatic, None), got {value!r}")
            elif key not in current or current[key] != value:
                raise _bad(key, f"fastsd cannot change the setting {key!r}" + (
                    f" (it is {current[key]!r})" if key in current else " (fastsd has no such setting)"))
            update[key] = value
        current.update(update)


def register(app: FastAPI, state) -> None:
    """The /sdapi/v1 routes on the app (its state: fastsd/serve/app.py's _State)."""
    a = _Api(state)

    @app.exception_handler(A1111Error)
    async def a1111_error(request: Request, e: A1111Error):
        return JSONResponse(e.body(), status_code=e.status)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await a.generate(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await a.generate(request, "img2img")

    @app.get("/sdapi/v1/options")
    async def get_options():
        a.ready()
        return state.a1111

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        a.ready()
        a.set_options(await a.body(request))
        return None

    _listings(app, state, a)
    _progress_routes(app, state)


def _listings(app: FastAPI, state, a: _Api) -> None:
    """Models, samplers, schedulers, upscalers, VAEs, LoRAs, embeddings and scripts."""

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        a.ready()
        name, short, title = model_identity(state)
        return [{"title": title, "model_name": name, "hash": short, "sha256": str(state.pipe.info.fingerprint),
                 "filename": str(state.options.model), "config": None}]

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": n, "aliases": list(al), "options": {}} for n, al, _, _ in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": n, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for n, label in SCHEDULES]

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        files = model_files(state.options.upscaler_dir)
        plain = [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                 for n in RESAMPLERS]
        return plain + [{"name": n, "model_name": n, "model_path": str(p), "model_url": None, "scale": 4}
                        for n, p in files.items()]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_modes():
        return [{"name": n} for n in LATENT_MODES]

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return []

    @app.get("/sdapi/v1/loras")
    async def loras():
        found = {name: str(path) for name, path in state.options.loras}
        if state.options.lora_dir is not None:
            for path in sorted(Path(state.options.lora_dir).rglob("*.safetensors")):
                found.setdefault(path.stem, str(path))
        return [{"name": n, "alias": n, "path": p, "metadata": {}} for n, p in found.items()]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        a.ready()
        width = state.pipe.info.cross_attention_dim
        loaded = {e["token"]: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                               "vectors": e["vectors"]} for e in state.pipe.textual_inversions}
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}


def _progress_routes(app: FastAPI, state) -> None:
    """progress (with the live preview when a preview VAE is loaded), interrupt and skip."""

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        run = state.progress.current
        queued = state.batcher.queued_requests
        if run is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": _job_state(None, queued, state.progress),
                    "current_image": None, "textinfo": None}
        elapsed = time.time() - run.started
        frac = run.fraction
        image = None
        if run.preview is not None and not skip_current_image:
            buf = io.BytesIO()
            run.preview.save(buf, "PNG")
            image = base64.b64encode(buf.getvalue()).decode("ascii")
        return {"progress": frac, "eta_relative": (elapsed / frac - elapsed) if frac > 0 else 0.0,
                "state": _job_state(run, queued, state.progress), "current_image": image, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        if state.progress.stop("interrupt"):
            log.info("fastsd serve: interrupted the running batch")
        return None

    @app.post("/sdapi/v1/skip")
    async def skip():
        if state.progress.stop("skip"):
            log.info("fastsd serve: skipped the running batch")
        return None


def _job_state(run, queued: int, progress) -> dict:
    return {"skipped": bool(run and run.stop == "skip"), "interrupted": bool(run and run.stop == "interrupt"),
            "stopping_generation": False, "job": "" if run is None else "fastsd batch",
            "job_count": queued + (run is not None), "job_timestamp": progress.timestamp, "job_no": 0,
            "sampling_step": 0 if run is None else run.done, "sampling_steps": 0 if run is None else run.steps}
