"""fastsd.Pipeline: txt2img, img2img and inpaint over any backend.

encode prompt -> prepare latents -> denoise loop -> decode. Random draws happen in the
same order and shapes as diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline, so the
same generator gives the same image.
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import images as imgs
from .backends import Backend, on_work_stream
from .backends.registry import BACKEND_NAMES
from .backends.select import make_backend
from .budget import check_fits, widths_of
from .checkpoint import check_clip_skip, load_checkpoint
from .devices import parse_device
from .engines import DTYPES, default_engine_dir
from .errors import InvalidArgumentError, NumericalError
from .families import family_for
from .loop import StepGraphs, StepInputs, StepKey, initial_state, make_step, run_steps, step_rows
from .model_files import Checkpoint
from .schedulers import (
    PREDICTION_TYPES,
    SAMPLERS,
    SchedulerChoice,
    add_noise,
    choose_scheduler,
    default_scheduler,
    first_step,
    pipeline_scheduler_config,
)
from .settings import SEED_LIMIT, Request, check_seed, make_request
from .tiling import decode_sliced, decode_tiled

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class MemoryOptions:
    """Load-time memory savers for small GPUs (each costs some speed)."""

    attention_slicing: bool = False  # eager UNet: attention in slices (diffusers' "auto"); set when loading
    vae_slicing: bool = False  # decode a batch one image at a time
    vae_tiling: bool = False  # decode in overlapping latent tiles (large images)
    tile: int = 64  # latent pixels per tile (512 px for SD)
    tile_overlap: int = 16  # latent pixels shared by neighbouring tiles


@dataclass
class PipelineOutput:
    images: Any  # list[PIL.Image] ("pil"), np.ndarray NHWC float32 ("np"), latents tensor ("latent")
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    backends: dict[str, str] = field(default_factory=dict)  # network -> backend that ran it in this call
    seed: int | None = None  # the seed used; None when the caller passed a generator


@dataclass
class _Latents:
    """Initial latents plus what inpainting needs inside the loop."""

    x: torch.Tensor  # (B, C, h, w)
    start: int  # first schedule index to run
    conditioning: torch.Tensor | None = None  # 9-channel UNets: (B or 2B, 1 + C, h, w)
    x0: torch.Tensor | None = None  # 4-channel inpaint: clean image latents
    noise: torch.Tensor | None = None  # 4-channel inpaint: the noise that made x
    mask: torch.Tensor | None = None  # 4-channel inpaint: (B, 1, h, w), 1 = repaint
    step_noise: torch.Tensor | None = None  # (steps, B, C, h, w): fresh noise of each step, if the sampler takes it


@dataclass
class _Call:
    """One call's own state: its settings, its generator, and what ran each network."""

    req: Request
    gen: torch.Generator
    ran: dict[str, str] = field(default_factory=dict)


class Pipeline:
    def __init__(self, ckpt: Checkpoint, backend: Backend, device: torch.device, dtype: torch.dtype,
                 memory: MemoryOptions | None = None, cuda_graphs: bool = False, family=None):
        if cuda_graphs and device.type != "cuda":
            raise InvalidArgumentError("cuda_graphs needs a CUDA device")
        self.ckpt, self.info = ckpt, ckpt.info
        self.family = family or family_for(ckpt)  # the one the backend was made for, when given
        self._graphs = StepGraphs() if cuda_graphs else None  # whole-step graphs, one per shape and setting
        self.backend, self.device, self.dtype = backend, device, dtype
        self._widths = widths_of(ckpt)
        self.memory = memory or MemoryOptions()
        self._scheduler = default_scheduler(pipeline_scheduler_config(self.info.scheduler))

    @property
    def scheduler(self) -> SchedulerChoice:
        """The sampler a call with scheduler=None runs (at load: the checkpoint's own). `.name`
        is fastsd's name, `.config` a diffusers config: `pipe.scheduler =
        EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)` works as in diffusers."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        """A fastsd sampler name or a diffusers scheduler object (mapped by class and config);
        one fastsd cannot run raises InvalidArgumentError and leaves the scheduler as it was."""
        self._scheduler = choose_scheduler(value, self._scheduler.config)

    @classmethod
    def from_pretrained(cls, model: str, backend: str = "auto", device: str | None = None,
                        dtype: str | None = None, engine_dir: str | None = None,
                        allow_pickle: bool = False, prediction_type: str | None = None,
                        clip_skip: int = 0, memory: MemoryOptions | None = None,
                        cuda_graphs: bool = False) -> "Pipeline":
        """Load `model` (see DESIGN.md). `allow_pickle` permits .ckpt/.bin files;
        `prediction_type` ("epsilon" | "v_prediction") overrides the checkpoint's scheduler
        config, for single files whose config cannot be known (SD 2.x 512-base vs 768-v);
        `clip_skip` = k takes text embeddings from CLIP layer -(k + 1) (as diffusers'
        per-call clip_skip; a load-time setting here because exported engines bake it in)."""
        if backend not in BACKEND_NAMES:
            raise InvalidArgumentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
        dev = parse_device(device)
        if cuda_graphs and dev.type != "cuda":
            raise InvalidArgumentError("cuda_graphs needs a CUDA device")
        dtype = dtype or ("fp16" if dev.type == "cuda" else "fp32")
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        ckpt = load_checkpoint(model, allow_pickle=allow_pickle)
        check_clip_skip(ckpt, clip_skip)
        if prediction_type is not None:
            if prediction_type not in PREDICTION_TYPES:
                raise InvalidArgumentError(f"unknown prediction_type {prediction_type!r}; "
                                           f"choose one of {', '.join(PREDICTION_TYPES)}")
            ckpt.info = replace(ckpt.info, scheduler=dict(ckpt.info.scheduler, prediction_type=prediction_type))
        store = Path(engine_dir) if engine_dir is not None else default_engine_dir()
        if memory is not None and not 0 <= memory.tile_overlap < memory.tile:
            raise InvalidArgumentError(f"tile_overlap must be in [0, tile={memory.tile}), got {memory.tile_overlap}")
        family = family_for(ckpt)
        backend_ = make_backend(ckpt, family, backend, dev, DTYPES[dtype], store, clip_skip,
                                cuda_graphs, attention_slicing=bool(memory and memory.attention_slicing))
        return cls(ckpt, backend_, dev, DTYPES[dtype], memory, cuda_graphs, family)

    def __call__(self, prompt, negative_prompt=None, image=None, mask_image=None, strength=None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, scheduler=None,
                 eta: float = 0.0, generator: torch.Generator | None = None, seed: int | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", callback: Callable | None = None) -> PipelineOutput:
        choice = self._scheduler if scheduler is None else choose_scheduler(scheduler, self._scheduler.config)
        req = make_request(self.info, prompt, negative_prompt, image, mask_image, strength, num_inference_steps,
                           guidance_scale, choice, eta, height, width, num_images_per_prompt, output_type)
        check_fits(self.info, self._widths, req, self.dtype, self.device, self.memory)
        gen, seed = self._generator(generator, seed)
        with on_work_stream(self.device):  # on CUDA: fastsd's one work stream, shared with the engines
            out = self._generate(_Call(req, gen), callback)
        out.seed = seed
        return out

    def _generate(self, call: _Call, callback) -> PipelineOutput:
        req, timings = call.req, {}
        t_start = time.perf_counter()
        with self._timed(timings, "text_encoder"):
            unet_inputs = self.family.encode(partial(self.backend.text_encoder, ran=call.ran), req.prompts,
                                             req.negative_prompts, req.do_cfg, req.n, self.device)
        cfg = req.scheduler_config
        sampler = SAMPLERS[req.scheduler]
        sched = sampler.schedule(cfg, req.steps, self.device)
        with self._timed(timings, "vae_encoder"):
            lat = self._prepare_latents(call, sched)
            if sampler.draws_noise(req.eta):  # every step's noise, drawn now in diffusers' order
                lat.step_noise = self._randn_steps(lat.x.shape, len(sched) - lat.start, call.gen)
        with self._timed(timings, "unet"):
            x = self._denoise(call, lat, unet_inputs, sched, cfg, callback)
        if not torch.isfinite(x).all():  # one check after the loop, none inside it
            raise NumericalError(f"the latents became NaN or infinite while denoising in {self.dtype} "
                                 f"(guidance_scale {req.guidance_scale}); try a lower guidance_scale or dtype='fp32'")
        timings["unet_per_step"] = timings["unet"] / max(len(sched) - lat.start, 1)
        with self._timed(timings, "vae_decoder"):
            out = x if req.output_type == "latent" else self._decode(x, call.ran)
        timings["vae"] = timings["vae_encoder"] + timings["vae_decoder"]
        timings["total"] = time.perf_counter() - t_start
        if req.output_type == "pil":
            out = imgs.to_pil(out)
        return PipelineOutput(out, timings, {n: call.ran[n] for n in self.backend.backends if n in call.ran})

    # ---- stages ---------------------------------------------------------------------

    @staticmethod
    def _generator(generator, seed) -> tuple[torch.Generator, int | None]:
        """The call's generator and its seed. Without either, the seed comes from the OS
        (torch's global generator is never read nor re-seeded)."""
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise InvalidArgumentError(f"generator must be a torch.Generator, not {type(generator).__name__}")
            return generator, None
        seed = check_seed(seed)
        seed = secrets.randbelow(SEED_LIMIT) if seed is None else seed
        return torch.Generator().manual_seed(seed), seed

    @contextmanager
    def _timed(self, timings: dict, stage: str):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[stage] = time.perf_counter() - t0

    def _draw(self, shape, gen: torch.Generator) -> torch.Tensor:
        """As diffusers' randn_tensor: draw on the generator's device in the model dtype."""
        rand_device = "cpu" if gen.device.type == "cpu" else self.device
        return torch.randn(shape, generator=gen, device=rand_device, dtype=self.dtype)

    def _randn(self, shape, gen: torch.Generator) -> torch.Tensor:
        return self._draw(shape, gen).to(self.device).float()

    def _randn_steps(self, shape, steps: int, gen: torch.Generator) -> torch.Tensor:
        """`steps` draws of `shape`, one after the other as a sampler draws them in diffusers'
        loop (the generator is used for nothing else in between), moved to the device at once."""
        return torch.stack([self._draw(shape, gen) for _ in range(steps)]).to(self.device).float()

    def _encode_image(self, images: torch.Tensor, gen: torch.Generator, ran: dict | None = None) -> torch.Tensor:
        """Sample scaled latents from the VAE posterior (one draw of the mean's shape)."""
        moments = self.backend.vae_encoder(images.to(self.device), ran=ran)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        z = mean + std * self._randn(mean.shape, gen)
        return self.info.vae_scale * (z - self.info.vae_shift)

    def _prepare_latents(self, call: _Call, sched) -> _Latents:
        req, gen = call.req, call.gen
        b = len(req.prompts) * req.n
        f, c = self.info.vae_factor, self.info.latent_channels
        shape = (b, c, req.height // f, req.width // f)
        start = first_step(req.steps, req.strength)
        if req.image is None and self.info.unet_in_channels == c:  # txt2img
            return _Latents(self._randn(shape, gen) * sched.init_noise_sigma, start)
        image = (imgs.image_to_tensor(req.image, req.height, req.width) if req.image is not None
                 else torch.zeros(1, 3, req.height, req.width))
        if req.mask_image is None and self.info.unet_in_channels == c:  # img2img
            x0 = self._encode_image(image, gen, call.ran).expand(b, -1, -1, -1)
            return _Latents(add_noise(sched, x0, self._randn(shape, gen), start), start)
        return self._prepare_inpaint(call, sched, image, shape, start)

    def _prepare_inpaint(self, call: _Call, sched, image, shape, start) -> _Latents:
        """As StableDiffusionInpaintPipeline: image latents, noise, masked-image latents."""
        req, gen = call.req, call.gen
        b, c, h, w = shape
        nine = self.info.unet_in_channels != c
        full = req.strength == 1.0
        mask = (imgs.mask_to_tensor(req.mask_image, req.height, req.width) if req.mask_image is not None
                else torch.ones(1, 1, req.height, req.width))  # 9-channel UNet without mask: repaint all
        x0 = None if (nine and full) else self._encode_image(image, gen, call.ran).expand(b, -1, -1, -1)
        noise = self._randn(shape, gen)
        x = noise * sched.init_noise_sigma if full else add_noise(sched, x0, noise, start)
        mask_lat = F.interpolate(mask, size=(h, w)).to(self.device).expand(b, -1, -1, -1)  # nearest
        if not nine:  # diffusers encodes the masked image here even for 4-channel UNets:
            self._randn((1, c, h, w), gen)  # consume the same draw, skip the unused encode
            return _Latents(x, start, x0=x0, noise=noise, mask=mask_lat)
        masked = self._encode_image(image * (mask < imgs.MASK_THRESHOLD), gen, call.ran).expand(b, -1, -1, -1)
        cond = torch.cat([mask_lat, masked], dim=1)
        return _Latents(x, start, conditioning=torch.cat([cond, cond]) if req.do_cfg else cond)

    def _denoise(self, call: _Call, lat: _Latents, unet_inputs: dict, sched, cfg, callback):
        """The loop (see fastsd/loop.py): rows and noise are ready before it starts."""
        req = call.req
        rows = step_rows(sched, req.scheduler, cfg, req.eta, lat.start)
        inputs = StepInputs(unet_inputs, lat.conditioning, lat.x0, lat.noise, lat.mask)
        shapes = tuple((n, tuple(t.shape)) for n, t in {"x": lat.x, **inputs.tensors()}.items())
        key = StepKey(req.scheduler, cfg, req.guidance_scale, req.do_cfg, lat.step_noise is not None, shapes)
        host_t = sched.host_timesteps[lat.start:]
        state = initial_state(req.scheduler, lat.x)
        if self._graphs is not None:
            x = self._graphs.run(self.backend.unet, key, inputs, state, rows, lat.step_noise, host_t, callback,
                                 call.ran)
            if x is not None:
                return x
        step = make_step(partial(self.backend.unet, ran=call.ran), key, inputs)
        return run_steps(step, state, rows, lat.step_noise, host_t, callback)

    def _decode(self, latents: torch.Tensor, ran: dict) -> np.ndarray:
        z = latents / self.info.vae_scale + self.info.vae_shift
        images = self._decode_with(partial(self.backend.vae_decoder, ran=ran), z)
        if not torch.isfinite(images).all():
            log.warning("VAE decode overflowed in %s (NaN/inf); decoding again in fp32", self.dtype)
            images = self._decode_with(partial(self.backend.vae_decoder_fp32, ran=ran), z)
            if not torch.isfinite(images).all():
                raise NumericalError("the VAE decoder gave NaN or infinite pixels even in fp32")
        return imgs.to_numpy(images)

    def _decode_with(self, decoder, z: torch.Tensor) -> torch.Tensor:
        m = self.memory
        if m.vae_tiling:
            return decode_tiled(decoder, z, self.info.vae_factor, m.tile, m.tile_overlap)
        return decode_sliced(decoder, z) if m.vae_slicing else decoder(z)
