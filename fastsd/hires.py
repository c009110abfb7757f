"""The hires fix (AUTOMATIC1111's "Hires. fix"): a txt2img pass at the size asked, an
upscale, and an img2img pass at the larger size that adds detail. A mixin of Pipeline.

    out = pipe.hires_fix("a castle", width=512, height=512, hr_scale=2.0, hr_upscaler="Latent",
                         denoising_strength=0.7, seed=1)          # a 1024x1024 image

is, exactly, these three steps with one generator that both passes draw from in turn:

    g = torch.Generator().manual_seed(1)
    lat = pipe("a castle", width=512, height=512, generator=g, output_type="latent").images
    lat = upscale_latents(lat, 128, 128, "Latent")               # or the image, resized or through a model
    out = pipe("a castle", image=lat, strength=0.7, generator=g)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidArgumentError
from .settings import check_seed, draw_seed
from .upscale import (
    LATENT_MODES,
    RESAMPLERS,
    ModelUpscaler,
    cover,
    crop_center,
    load_model_upscaler,
    model_files,
    upscale_latents,
)

DEFAULT_STRENGTH = 0.7  # the web UI's hires denoising strength


@dataclass(frozen=True)
class Hires:
    """A hires fix's settings (the web UI's field names in comments)."""

    scale: float = 2.0  # hr_scale
    resize_x: int = 0  # hr_resize_x: the final width (0: from scale, or height's aspect)
    resize_y: int = 0  # hr_resize_y
    upscaler: str = "Latent"  # hr_upscaler: a latent mode, a resampler, or a model upscaler's name
    steps: int | None = None  # hr_second_pass_steps (0/None: the first pass's)
    strength: float = DEFAULT_STRENGTH  # denoising_strength
    prompt: object = None  # hr_prompt (None/"": the prompt)
    negative_prompt: object = None  # hr_negative_prompt
    scheduler: object = None  # hr_sampler_name (None: the first pass's)

    def call_kwargs(self, count: int) -> dict:
        """Pipeline.hires_fix's keywords for a batch of `count` images."""
        def per(text):
            return None if text is None else [text] * count

        return {"hr_scale": self.scale, "hr_resize_x": self.resize_x, "hr_resize_y": self.resize_y,
                "hr_upscaler": self.upscaler, "hr_second_pass_steps": self.steps, "denoising_strength": self.strength,
                "hr_prompt": per(self.prompt), "hr_negative_prompt": per(self.negative_prompt),
                "hr_scheduler": self.scheduler}

    def target(self, width: int, height: int, factor: int) -> tuple[int, int, int, int]:
        """(final width, height; the size upscaled to before a centre crop), multiples of factor."""
        if self.resize_x or self.resize_y:
            w = self.resize_x or round(self.resize_y * width / height)
            h = self.resize_y or round(self.resize_x * height / width)
        else:
            w, h = int(width * self.scale), int(height * self.scale)
        w, h = max(factor, w // factor * factor), max(factor, h // factor * factor)
        cw, ch = cover(width, height, w, h)
        cw, ch = -(-cw // factor) * factor, -(-ch // factor) * factor
        return w, h, cw, ch


def check_hires(h: Hires, upscalers: dict[str, Path]) -> None:
    """The settings checked (InvalidArgumentError naming the field)."""
    if isinstance(h.scale, bool) or not isinstance(h.scale, (int, float)) or not 1.0 <= h.scale <= 8.0:
        raise InvalidArgumentError(f"must be a number in [1, 8], got {h.scale!r}", "hr_scale")
    for name, v in (("hr_resize_x", h.resize_x), ("hr_resize_y", h.resize_y)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidArgumentError(f"must be an integer >= 0 (pixels; 0: from hr_scale), got {v!r}", name)
    if h.steps is not None and (isinstance(h.steps, bool) or not isinstance(h.steps, int) or h.steps < 0):
        raise InvalidArgumentError(f"must be an integer >= 0, got {h.steps!r}",
                                   "hr_second_pass_steps")
    if isinstance(h.strength, bool) or not isinstance(h.strength, (int, float)) or not 0.0 < h.strength <= 1.0:
        raise InvalidArgumentError(f"must be a number in (0, 1] for the hires fix, got "
                                   f"{h.strength!r}", "denoising_strength")
    if not isinstance(h.upscaler, (str, ModelUpscaler)) or (
            isinstance(h.upscaler, str) and h.upscaler not in LATENT_MODES and h.upscaler not in RESAMPLERS
            and h.upscaler not in upscalers and not Path(h.upscaler).is_file()):
        names = [*LATENT_MODES, *RESAMPLERS, *upscalers]
        raise InvalidArgumentError(f"must be one of {', '.join(names)} (or an upscaler model file), got "
                                   f"{h.upscaler!r}", "hr_upscaler")


class HiresMethods:
    """Pipeline.hires_fix and the upscalers it uses."""

    upscaler_dir: str | None = None  # where model upscalers are found by name
    _upscalers: dict

    def upscaler(self, name_or_path) -> ModelUpscaler:
        """A model upscaler by its name in `upscaler_dir` or a file path (loaded once, kept)."""
        if isinstance(name_or_path, ModelUpscaler):
            return name_or_path
        files = model_files(self.upscaler_dir)
        path = files.get(name_or_path) or Path(name_or_path)
        key = str(Path(path).resolve())
        cache = self.__dict__.setdefault("_upscalers", {})
        if key not in cache:
            cache[key] = load_model_upscaler(path, allow_pickle=getattr(self, "_allow_pickle", False))
            cache[key].model.to(self.device)
        return cache[key]

    def hires_fix(self, prompt=None, *, hr_scale: float = 2.0, hr_resize_x: int = 0, hr_resize_y: int = 0,
                  hr_upscaler="Latent", hr_second_pass_steps: int | None = None,
                  denoising_strength: float = DEFAULT_STRENGTH, hr_prompt=None, hr_negative_prompt=None,
                  hr_scheduler=None, hr_tile: int | None = None, **kwargs):
        """Generate at the call's size, upscale by `hr_scale` (or to hr_resize_x x hr_resize_y,
        centre-cropped where the aspect differs), then repaint at that size with img2img at
        `denoising_strength`; returns the second pass's PipelineOutput (timings of both).

        `hr_upscaler`: "Latent" (and the web UI's other latent modes: the first pass's latents
        are resized), "None" / "Lanczos" / "Nearest" (its image is resized), or a model
        upscaler: a name in `pipe.upscaler_dir`, a weights file (ESRGAN and the other
        architectures spandrel detects; .safetensors, pickles with allow_pickle), or
        `pipe.upscaler(...)`'s result; `hr_tile`: its tile size in pixels (0: untiled).
        `hr_second_pass_steps` (None/0: `num_inference_steps`), `hr_prompt`,
        `hr_negative_prompt`, `hr_scheduler` change the second pass; the rest of `kwargs` are
        the first pass's __call__ arguments (txt2img), and the second pass's too. Both passes
        draw from one generator: `generator`, or one seeded with `seed` (drawn when absent)."""
        h = Hires(hr_scale, hr_resize_x, hr_resize_y, hr_upscaler, hr_second_pass_steps or None,
                  denoising_strength, hr_prompt or None, hr_negative_prompt or None, hr_scheduler)
        check_hires(h, model_files(self.upscaler_dir))
        for name in ("image", "mask_image", "control_image", "latents"):
            if kwargs.get(name) is not None:
                raise InvalidArgumentError("is not taken: hires_fix is txt2img", name)
        output_type = kwargs.pop("output_type", "pil")
        generator, seed = kwargs.pop("generator", None), kwargs.pop("seed", None)
        if generator is None:
            seed = check_seed(seed)
            seed = draw_seed() if seed is None else seed
            generator = torch.Generator().manual_seed(seed)
        elif seed is not None:
            raise InvalidArgumentError("and generator: pass one, not both", "seed")
        latent = isinstance(h.upscaler, str) and h.upscaler in LATENT_MODES
        model = None if isinstance(h.upscaler, str) and (latent or h.upscaler in RESAMPLERS) else \
            self.upscaler(h.upscaler)
        t0 = time.perf_counter()
        first = self(prompt, generator=generator, output_type="latent" if latent else "pil", **kwargs)
        t1 = time.perf_counter()
        upscaled, (w, h_px) = self._hires_upscale(first.images, h, latent, model, hr_tile)
        t2 = time.perf_counter()
        second = self(**_second_pass(h, prompt, kwargs, len(upscaled)), image=upscaled, strength=h.strength,
                      generator=generator, output_type=output_type, height=h_px, width=w)
        t3 = time.perf_counter()
        timings = {k: v if k == "unet_per_step" else v + first.timings.get(k, 0.0)  # per step: the second's
                   for k, v in second.timings.items()}
        timings.update(first_pass=t1 - t0, upscale=t2 - t1, second_pass=t3 - t2, total=t3 - t0)
        second.timings = timings
        second.backends = {**first.backends, **second.backends}
        second.seed = seed
        up = h.upscaler.name if isinstance(h.upscaler, ModelUpscaler) else str(h.upscaler)
        second.settings = dict(second.settings, seed=seed, width=w, height=h_px,
                               first_pass={"width": first.settings.get("width"),
                                           "height": first.settings.get("height"),
                                           "num_inference_steps": first.settings.get("num_inference_steps")},
                               hires={"scale": h.scale, "resize_x": h.resize_x, "resize_y": h.resize_y,
                                      "upscaler": up, "steps": second.settings.get("num_inference_steps"),
                                      "strength": h.strength})
        return second

    def _hires_upscale(self, first, h: Hires, latent: bool, model: ModelUpscaler | None, tile: int | None):
        """The first pass's output upscaled for the second: latents, or a list of images."""
        factor = self.info.vae_factor
        if latent:
            width, height = first.shape[-1] * factor, first.shape[-2] * factor
            w, hh, cw, ch = h.target(width, height, factor)
            up = upscale_latents(first.float(), ch // factor, cw // factor, h.upscaler)
            return crop_center(up, hh // factor, w // factor).to(first.dtype), (w, hh)
        width, height = first[0].size
        w, hh, cw, ch = h.target(width, height, factor)
        if model is not None:
            images = [model(im, cw, ch, tile) for im in first]
        else:
            images = [im.resize((cw, ch), RESAMPLERS[h.upscaler]) for im in first]
        return [crop_center(im, hh, w) for im in images], (w, hh)


def _second_pass(h: Hires, prompt, kwargs: dict, count: int) -> dict:
    """The second pass's arguments: the first's, less its size, inputs and embeddings, with the
    hires prompts, steps and sampler (prompts: one per first-pass image)."""
    out = {k: v for k, v in kwargs.items() if k not in (
        "width", "height", "num_images_per_prompt", "image", "mask_image", "control_image", "latents",
        "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")}
    n = kwargs.get("num_images_per_prompt", 1)
    out["prompt"] = _per_image(h.prompt if h.prompt is not None else prompt, n, count)
    negative = h.negative_prompt if h.negative_prompt is not None else kwargs.get("negative_prompt")
    out["negative_prompt"] = _per_image(negative, n, count)
    if h.steps:
        out["num_inference_steps"] = h.steps
    if h.scheduler is not None:
        out["scheduler"] = h.scheduler
    return out


def _per_image(text, n: int, count: int):
    """Prompts for the second pass, one per first-pass image (`count`; a list of prompts gives
    n images each, prompt-major, as diffusers orders them)."""
    if text is None or isinstance(text, str):
        return text if count == 1 or text is None else [text] * count
    return [t for t in text for _ in range(n)]
