"""The stages around the denoising loop: the random draws (in diffusers' order and
shapes, so the same generator gives the same image), the initial latents of txt2img,
img2img and inpainting, the ControlNets' per-step scales and images, and the VAE decode
(fp32 retry, slicing, tiling). A mixin of Pipeline (fastsd/pipeline.py)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from . import images as imgs
from .errors import InvalidArgumentError, NumericalError
from .families import controlnet_names
from .previews import Preview
from .schedulers import add_noise
from .settings import Request
from .tiling import decode_sliced, decode_tiled, encode_tiled

log = logging.getLogger(__name__)


@dataclass
class Latents:
    """Initial latents plus what inpainting needs inside the loop."""

    x: torch.Tensor  # (B, C, h, w)
    start: int  # first schedule index to run
    conditioning: torch.Tensor | None = None  # 9-channel UNets: (B or 2B, 1 + C, h, w)
    x0: torch.Tensor | None = None  # 4-channel inpaint: clean image latents
    noise: torch.Tensor | None = None  # 4-channel inpaint: the noise that made x
    mask: torch.Tensor | None = None  # 4-channel inpaint: (B, 1, h, w), 1 = repaint
    step_noise: torch.Tensor | None = None  # (steps, B, C, h, w): fresh noise of each step, if the sampler takes it


@dataclass
class Call:
    """One call's own state: its settings, its generator, and what ran each network."""

    req: Request
    gen: torch.Generator | list[torch.Generator]
    text_encoders: dict[str, Callable]  # the backend's, for the call's clip_skip
    ran: dict[str, str] = field(default_factory=dict)
    preview: "Preview | None" = None  # live previews of this call


class Stages:
    """Pipeline's stages before and after the loop."""

    @contextmanager
    def _timed(self, timings: dict, stage: str):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[stage] = time.perf_counter() - t0

    def _draw(self, shape, gen) -> torch.Tensor:
        """As diffusers' randn_tensor: draw on the generator's device in the model dtype; with a
        list of generators, image i draws from generator i."""
        first = gen[0] if isinstance(gen, list) else gen
        rand_device = "cpu" if first.device.type == "cpu" else self.device
        if isinstance(gen, list):
            one = (1, *shape[1:])
            return torch.cat([torch.randn(one, generator=gen[i], device=rand_device, dtype=self.dtype)
                              for i in range(shape[0])])
        return torch.randn(shape, generator=gen, device=rand_device, dtype=self.dtype)

    def _randn(self, shape, gen) -> torch.Tensor:
        return self._draw(shape, gen).to(self.device).float()

    def _randn_steps(self, shape, steps: int, gen, last: bool = True) -> torch.Tensor:
        """`steps` draws of `shape`, one after the other as a sampler draws them in diffusers'
        loop (the generator is used for nothing else in between), moved to the device at once.
        `last` False: the last step draws none (LCM), its noise is zeros."""
        draws = [self._draw(shape, gen).to(self.device).float() for _ in range(steps if last else steps - 1)]
        draws += [] if last else [torch.zeros(shape, device=self.device)]
        return torch.stack(draws)

    def _encode_image(self, images: torch.Tensor, gen, ran: dict | None = None) -> torch.Tensor:
        """Sample scaled latents from the VAE posterior (one draw of the mean's shape; with a
        list of generators, image i from generator i). A tiny autoencoder (TAESD) gives the
        latents themselves: no draw, as diffusers' retrieve_latents."""
        encoder, tiling = partial(self.backend.vae_encoder, ran=ran), self._tiling()
        images = images.to(self.device)
        moments = encoder(images) if tiling is None else encode_tiled(encoder, images, self.info.vae_factor, *tiling)
        if self.info.tiny_vae:
            z = moments.float()
        else:
            mean, logvar = moments.chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * self._randn(mean.shape, gen)
        return self.info.vae_scale * (z - self.info.vae_shift)

    @staticmethod
    def _spread(t: torch.Tensor, b: int) -> torch.Tensor:
        """`t` repeated to batch `b` (copies of the whole batch, as diffusers repeats it); the
        Request has checked that image and mask counts divide the batch."""
        return t if t.shape[0] == b else t.repeat(b // t.shape[0], 1, 1, 1)

    def _prepare_latents(self, call: Call, sched) -> Latents:
        req, gen = call.req, call.gen
        b = req.batch
        f, c = self.info.vae_factor, self.info.latent_channels
        shape = (b, c, req.height // f, req.width // f)
        start = req.start
        if req.image is None and self.info.unet_in_channels == c:  # txt2img
            noise = self._randn(shape, gen) if req.latents is None else req.latents.to(self.device).float()
            return Latents(noise * sched.init_noise_sigma, start)
        if req.image is None:  # a 9-channel UNet without an image: repaint everything
            return self._prepare_inpaint(call, sched, torch.zeros(1, 3, req.height, req.width), shape, start)
        image, is_latent = imgs.image_batch(req.image, req.height, req.width, c)
        if req.mask_image is None and self.info.unet_in_channels == c:  # img2img
            if is_latent:  # latents given as the image: used as they are (diffusers)
                x0 = image.to(self.device).float()
            else:
                if isinstance(gen, list):  # one encode per image, each with its own generator
                    image = self._spread(image, b)
                x0 = self._encode_image(image, gen, call.ran)
            x0 = self._spread(x0, b)
            return Latents(add_noise(sched, x0, self._randn(x0.shape, gen), start), start)
        if is_latent:
            raise InvalidArgumentError("inpainting takes RGB images, not latents")
        return self._prepare_inpaint(call, sched, image, shape, start)

    def _prepare_inpaint(self, call: Call, sched, image, shape, start) -> Latents:
        """As StableDiffusionInpaintPipeline: image latents, noise, masked-image latents."""
        req, gen = call.req, call.gen
        b, c, h, w = shape
        nine = self.info.unet_in_channels != c
        full = req.strength == 1.0
        mask = (imgs.mask_batch(req.mask_image, req.height, req.width) if req.mask_image is not None
                else torch.ones(1, 1, req.height, req.width))  # 9-channel UNet without mask: repaint all
        needs_x0 = not nine or (req.latents is None and not full)
        x0 = self._spread(self._encode_image(image, gen, call.ran), b) if needs_x0 else None
        if req.latents is None:
            noise = self._randn(shape, gen)
            x = noise * sched.init_noise_sigma if full else add_noise(sched, x0, noise, start)
        else:  # given latents are the noise, scaled as pure noise whatever the strength (diffusers)
            noise = req.latents.to(self.device).float()
            x = noise * sched.init_noise_sigma
        mask_lat = self._spread(F.interpolate(mask, size=(h, w)), b).to(self.device)  # nearest
        masked_image = image * (mask < imgs.MASK_THRESHOLD)
        if not nine:  # diffusers encodes the masked image here even for 4-channel UNets:
            if not self.info.tiny_vae:  # consume the same draws (a tiny VAE draws none), skip the unused encode
                self._randn((masked_image.shape[0], c, h, w), gen)
            return Latents(x, start, x0=x0, noise=noise, mask=mask_lat)
        masked = self._spread(self._encode_image(masked_image, gen, call.ran), b)
        cond = torch.cat([mask_lat, masked], dim=1)
        return Latents(x, start, conditioning=torch.cat([cond, cond]) if req.do_cfg else cond)

    @staticmethod
    def _control(req: Request, steps: int) -> tuple[tuple[str, ...], torch.Tensor, tuple[bool, ...] | None]:
        """The ControlNets a call runs, their scale at each of its `steps` loop steps ((steps, K)
        float32: the scale inside the guidance window, 0 outside, as diffusers' controlnet_keep:
        step i of N is kept where i / N >= start and (i + 1) / N <= end), and whether any runs
        at each step (where none does, the step skips them: zero residuals change nothing;
        None without ControlNets)."""
        names = controlnet_names(len(req.control_images))
        keep = [[1.0 - float(i / steps < s or (i + 1) / steps > e) for s, e in zip(req.control_start,
                                                                                   req.control_end, strict=True)]
                for i in range(steps)]
        scales = torch.tensor([[c * k for c, k in zip(req.control_scales, row, strict=True)] for row in keep],
                              dtype=torch.float32).reshape(steps, len(names))
        return names, scales, tuple(bool((row != 0).any()) for row in scales) if names else None

    def _control_images(self, req: Request) -> tuple[torch.Tensor, ...]:
        """Each ControlNet's conditioning image at the call's size, in [0, 1], one per image of
        the batch ([uncond; cond] with CFG), as diffusers' prepare_image."""
        out = []
        for images in req.control_images:
            t = imgs.control_batch(images, req.height, req.width)
            t = t.repeat_interleave(req.batch if t.shape[0] == 1 else req.n, dim=0)
            out.append((torch.cat([t, t]) if req.do_cfg else t).to(self.device))
        return tuple(out)

    def _decode(self, latents: torch.Tensor, ran: dict, timings: dict) -> torch.Tensor:
        """(B, 3, H, W) float32 in [0, 1] on the device (diffusers' "pt" output). In fp16, a VAE
        whose config says force_upcast (SD-XL's) decodes in fp32 up front, as diffusers; one that
        overflows (NaN/inf pixels) decodes again in fp32. timings["vae_decoder_fp32"]: the
        seconds of an fp32 decode, when there was one."""
        z = latents / self.info.vae_scale + self.info.vae_shift
        fp32 = partial(self.backend.vae_decoder_fp32, ran=ran)
        if self.dtype == torch.float16 and self.ckpt.configs["vae"].get("force_upcast", False):
            with self._timed(timings, "vae_decoder_fp32"):
                images = self._decode_with(fp32, z)
        else:
            images = self._decode_with(partial(self.backend.vae_decoder, ran=ran), z)
            if not torch.isfinite(images).all():
                log.warning("VAE decode overflowed in %s (NaN/inf); decoding again in fp32", self.dtype)
                with self._timed(timings, "vae_decoder_fp32"):
                    images = self._decode_with(fp32, z)
        if not torch.isfinite(images).all():
            raise NumericalError("the VAE decoder gave NaN or infinite pixels even in fp32")
        return (images / 2 + 0.5).clamp(0, 1)

    def _tiling(self) -> tuple[int, int] | None:
        """(tile, overlap) in latent pixels when VAE tiling is on (MemoryOptions.vae_tiling or
        diffusers' pipe.vae.enable_tiling()): by default diffusers' own geometry, the VAE's
        sample size and a quarter of it."""
        m, vae = self.memory, self.ckpt.built("vae")  # pipe.vae.enable_tiling() builds it
        if not (m.vae_tiling or getattr(vae, "use_tiling", False)):
            return None
        size = self.ckpt.configs["vae"]["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        tile = m.tile or max(int(size / self.info.vae_factor), 1)
        overlap = m.tile_overlap if m.tile_overlap is not None else tile - int(tile * 0.75)
        if not 0 <= overlap < tile:
            raise InvalidArgumentError(f"tile_overlap {overlap} must be in [0, tile={tile})")
        return tile, overlap

    def _decode_with(self, decoder, z: torch.Tensor) -> torch.Tensor:
        tiling = self._tiling()
        if self.memory.vae_slicing or getattr(self.ckpt.built("vae"), "use_slicing", False):  # one image at a time
            return decode_sliced(lambda one: self._decode_one(decoder, one, tiling), z)
        return self._decode_one(decoder, z, tiling)

    def _decode_one(self, decoder, z: torch.Tensor, tiling) -> torch.Tensor:
        return decoder(z) if tiling is None else decode_tiled(decoder, z, self.info.vae_factor, *tiling)
