"""fastsd.Pipeline: txt2img, img2img and inpaint over any backend.

encode prompt -> prepare latents -> denoise loop -> decode. Random draws happen in the
same order and shapes as diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline, so the
same generator gives the same image.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import images as imgs
from .backends import BACKEND_NAMES, on_work_stream
from .backends.select import make_backend
from .budget import check_fits, widths_of
from .checkpoint import Checkpoint, check_clip_skip, load_checkpoint
from .engines import default_engine_dir
from .errors import InvalidArgumentError, NumericalError
from .loop import StepGraphs, StepInputs, StepKey, make_step, run_steps, step_rows
from .networks import VaeDecoder
from .schedulers import PREDICTION_TYPES, SAMPLERS, SchedulerConfig, add_noise, first_step
from .settings import Request, check_seed, make_request
from .tiling import decode_sliced, decode_tiled

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHOWN_CHARS = 100  # of dropped prompt text in the truncation warning


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return repr(text) if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class MemoryOptions:
    """Load-time memory savers for small GPUs (each costs some speed)."""

    attention_slicing: bool = False  # eager UNet: attention computed in slices (diffusers' "auto")
    vae_slicing: bool = False  # decode a batch one image at a time
    vae_tiling: bool = False  # decode in overlapping latent tiles (large images)
    tile: int = 64  # latent pixels per tile (512 px for SD)
    tile_overlap: int = 16  # latent pixels shared by neighbouring tiles


@dataclass
class PipelineOutput:
    images: Any  # list[PIL.Image] ("pil"), np.ndarray NHWC float32 ("np"), latents tensor ("latent")
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    backends: dict[str, str] = field(default_factory=dict)  # network -> backend that ran it


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


def parse_device(device) -> torch.device:
    """"cpu", "cuda" or "cuda:N" (None: cuda if available), checked against this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


class Pipeline:
    def __init__(self, ckpt: Checkpoint, backend, device: torch.device, dtype: torch.dtype,
                 memory: MemoryOptions | None = None, cuda_graphs: bool = False):
        if cuda_graphs and device.type != "cuda":
            raise InvalidArgumentError("cuda_graphs needs a CUDA device")
        self.ckpt, self.info, self.tokenizer = ckpt, ckpt.info, ckpt.tokenizer
        self._graphs = StepGraphs() if cuda_graphs else None  # whole-step graphs, one per shape and setting
        self.backend, self.device, self.dtype = backend, device, dtype
        self._widths = widths_of(ckpt)
        self._tokenizer_lock = threading.Lock()  # tokenizers keep truncation/padding state between calls
        self.memory = memory or MemoryOptions()
        if self.memory.attention_slicing:
            ckpt.unet.set_attention_slice("auto")
        self._vae_fp32: VaeDecoder | None = None

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
        backend_ = make_backend(ckpt, backend, dev, DTYPES[dtype], store, clip_skip, cuda_graphs)
        return cls(ckpt, backend_, dev, DTYPES[dtype], memory, cuda_graphs)

    def __call__(self, prompt, negative_prompt=None, image=None, mask_image=None, strength=None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, scheduler: str = "ddim",
                 eta: float = 0.0, generator: torch.Generator | None = None, seed: int | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", callback: Callable | None = None) -> PipelineOutput:
        req = make_request(self.info, prompt, negative_prompt, image, mask_image, strength, num_inference_steps,
                           guidance_scale, scheduler, eta, height, width, num_images_per_prompt, output_type)
        check_fits(self.info, self._widths, req, self.dtype, self.device, self.memory)
        gen = self._generator(generator, seed)
        with on_work_stream(self.device):  # on CUDA: fastsd's one work stream, shared with the engines
            return self._generate(req, gen, callback)

    def _generate(self, req: Request, gen: torch.Generator, callback) -> PipelineOutput:
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        with self._timed(timings, "text_encoder"):
            text_embeddings = self._encode_prompts(req)
        cfg = SchedulerConfig.from_dict(self.info.scheduler, req.scheduler)
        sampler = SAMPLERS[req.scheduler]
        sched = sampler.schedule(cfg, req.steps, self.device)
        with self._timed(timings, "vae_encoder"):
            lat = self._prepare_latents(req, sched, gen)
            if sampler.draws_noise(req.eta):  # every step's noise, drawn now in diffusers' order
                lat.step_noise = self._randn_steps(lat.x.shape, len(sched) - lat.start, gen)
        with self._timed(timings, "unet"):
            x = self._denoise(req, lat, text_embeddings, sched, cfg, callback)
        if not torch.isfinite(x).all():  # one check after the loop, none inside it
            raise NumericalError(f"the latents became NaN or infinite while denoising in {self.dtype} "
                                 f"(guidance_scale {req.guidance_scale}); try a lower guidance_scale or dtype='fp32'")
        timings["unet_per_step"] = timings["unet"] / max(len(sched) - lat.start, 1)
        with self._timed(timings, "vae_decoder"):
            out = x if req.output_type == "latent" else self._decode(x)
        timings["vae"] = timings["vae_encoder"] + timings["vae_decoder"]
        timings["total"] = time.perf_counter() - t_start
        if req.output_type == "pil":
            out = imgs.to_pil(out)
        return PipelineOutput(out, timings, dict(self.backend.backends))

    # ---- stages ---------------------------------------------------------------------

    @staticmethod
    def _generator(generator, seed) -> torch.Generator:
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise InvalidArgumentError(f"generator must be a torch.Generator, not {type(generator).__name__}")
            return generator
        seed = check_seed(seed)
        return torch.Generator().manual_seed(seed if seed is not None else torch.seed())

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

    def _token_ids(self, texts: list[str]) -> torch.Tensor:
        n = self.info.max_tokens
        with self._tokenizer_lock:
            ids = self.tokenizer(texts, padding="max_length", max_length=n, truncation=True,
                                 return_tensors="pt").input_ids
            for text in dict.fromkeys(texts):  # each distinct prompt once, in order
                full = self.tokenizer(text, truncation=False, verbose=False).input_ids  # [BOS, ..., EOS]
                if len(full) > n:
                    dropped = self.tokenizer.decode(full[n - 1:-1])
                    log.warning("prompt longer than %d tokens was truncated; %d tokens dropped: %s",
                                n, len(full) - n, _shorten(dropped))
        return ids.to(self.device)

    def _encode_prompts(self, req: Request) -> torch.Tensor:
        """(B*n, 77, D) text embeddings, or (2*B*n, 77, D) [uncond; cond] with CFG."""
        texts = (req.negative_prompts + req.prompts) if req.do_cfg else req.prompts
        emb = self.backend.text_encoder(self._token_ids(texts))
        return emb.repeat_interleave(req.n, dim=0)  # per prompt: n copies, as diffusers

    def _encode_image(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Sample scaled latents from the VAE posterior (one draw of the mean's shape)."""
        moments = self.backend.vae_encoder(images.to(self.device))
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        z = mean + std * self._randn(mean.shape, gen)
        return self.info.vae_scale * (z - self.info.vae_shift)

    def _prepare_latents(self, req: Request, sched, gen) -> _Latents:
        b = len(req.prompts) * req.n
        f, c = self.info.vae_factor, self.info.latent_channels
        shape = (b, c, req.height // f, req.width // f)
        start = first_step(req.steps, req.strength)
        if req.image is None and self.info.unet_in_channels == c:  # txt2img
            return _Latents(self._randn(shape, gen) * sched.init_noise_sigma, start)
        image = (imgs.image_to_tensor(req.image, req.height, req.width) if req.image is not None
                 else torch.zeros(1, 3, req.height, req.width))
        if req.mask_image is None and self.info.unet_in_channels == c:  # img2img
            x0 = self._encode_image(image, gen).expand(b, -1, -1, -1)
            return _Latents(add_noise(sched, x0, self._randn(shape, gen), start), start)
        return self._prepare_inpaint(req, sched, gen, image, shape, start)

    def _prepare_inpaint(self, req: Request, sched, gen, image, shape, start) -> _Latents:
        """As StableDiffusionInpaintPipeline: image latents, noise, masked-image latents."""
        b, c, h, w = shape
        nine = self.info.unet_in_channels != c
        full = req.strength == 1.0
        mask = (imgs.mask_to_tensor(req.mask_image, req.height, req.width) if req.mask_image is not None
                else torch.ones(1, 1, req.height, req.width))  # 9-channel UNet without mask: repaint all
        x0 = None if (nine and full) else self._encode_image(image, gen).expand(b, -1, -1, -1)
        noise = self._randn(shape, gen)
        x = noise * sched.init_noise_sigma if full else add_noise(sched, x0, noise, start)
        mask_lat = F.interpolate(mask, size=(h, w)).to(self.device).expand(b, -1, -1, -1)  # nearest
        if not nine:  # diffusers encodes the masked image here even for 4-channel UNets:
            self._randn((1, c, h, w), gen)  # consume the same draw, skip the unused encode
            return _Latents(x, start, x0=x0, noise=noise, mask=mask_lat)
        masked = self._encode_image(image * (mask < imgs.MASK_THRESHOLD), gen).expand(b, -1, -1, -1)
        cond = torch.cat([mask_lat, masked], dim=1)
        return _Latents(x, start, conditioning=torch.cat([cond, cond]) if req.do_cfg else cond)

    def _denoise(self, req: Request, lat: _Latents, text_embeddings, sched, cfg, callback):
        """The loop (see fastsd/loop.py): rows and noise are ready before it starts."""
        rows = step_rows(sched, req.scheduler, cfg, req.eta)[lat.start:]
        inputs = StepInputs(text_embeddings, lat.conditioning, lat.x0, lat.noise, lat.mask)
        shapes = tuple((n, tuple(t.shape)) for n, t in {"x": lat.x, **inputs.tensors()}.items())
        key = StepKey(req.scheduler, cfg, req.guidance_scale, req.do_cfg, lat.step_noise is not None, shapes)
        host_t = sched.host_timesteps[lat.start:]
        if self._graphs is not None:
            x = self._graphs.run(self.backend.unet, key, inputs, lat.x, rows, lat.step_noise, host_t, callback)
            if x is not None:
                return x
        step = make_step(self.backend.unet, key, inputs)
        return run_steps(step, lat.x, rows, lat.step_noise, host_t, callback)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        z = latents / self.info.vae_scale + self.info.vae_shift
        images = self._decode_with(self.backend.vae_decoder, z)
        if not torch.isfinite(images).all():
            log.warning("VAE decode overflowed in %s (NaN/inf); decoding again in fp32", self.dtype)
            images = self._decode_with(self._decoder_fp32(), z)
            if not torch.isfinite(images).all():
                raise NumericalError("the VAE decoder gave NaN or infinite pixels even in fp32")
        return imgs.to_numpy(images)

    def _decode_with(self, decoder, z: torch.Tensor) -> torch.Tensor:
        m = self.memory
        if m.vae_tiling:
            return decode_tiled(decoder, z, self.info.vae_factor, m.tile, m.tile_overlap)
        return decode_sliced(decoder, z) if m.vae_slicing else decoder(z)

    def _decoder_fp32(self):
        if self._vae_fp32 is None:
            self._vae_fp32 = VaeDecoder(copy.deepcopy(self.ckpt.vae)).to(self.device, torch.float32).eval()

        def decode(z):
            with torch.inference_mode():
                return self._vae_fp32(z.float())

        return decode
