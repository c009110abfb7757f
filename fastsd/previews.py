"""A call's per-step callbacks (diffusers' two kinds) and live previews (TAESD decodes of
each step's clean-latent estimate). A mixin of Pipeline (fastsd/pipeline.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import images as imgs
from .errors import InvalidArgumentError
from .schedulers import SAMPLERS


@dataclass
class Preview:
    """A call's previews: every `every` loop steps, the preview VAE decodes x0; `seconds` adds up."""

    every: int
    seconds: float = 0.0


class Previews:
    """Pipeline's preview VAE and the loop's step callback."""

    def load_preview_vae(self, vae) -> None:
        """Use a tiny autoencoder (TAESD; anything from_pretrained's vae= takes) to decode live
        previews; it runs in eager PyTorch beside the pipeline's own networks (TAESD's decoder
        is about 1 M parameters)."""
        from .checkpoint import check_vae_fits, is_tiny_vae, load_vae
        from .networks import TinyVaeDecoder

        model, _, source = load_vae(vae)
        if not is_tiny_vae(model):
            raise InvalidArgumentError(f"preview_vae must be a tiny autoencoder (TAESD, diffusers' AutoencoderTiny); "
                                       f"{source} is an {type(model).__name__}")
        check_vae_fits(model, self.info, source, "preview VAE")
        self._preview_vae = model
        self._preview = TinyVaeDecoder(model).to(self.device, self.dtype).eval()

    @property
    def preview_vae(self):
        """The preview VAE (an AutoencoderTiny), or None."""
        return self._preview_vae

    def _check_preview(self, every, on_step_end) -> "Preview | None":
        if every is None:
            return None
        if self._preview is None:
            raise InvalidArgumentError("preview_every needs a preview VAE: Pipeline.from_pretrained(..., "
                                       "preview_vae='madebyollin/taesd') or pipe.load_preview_vae(...)")
        if on_step_end is None:
            raise InvalidArgumentError("preview_every delivers previews to callback_on_step_end (its "
                                       "callback_kwargs['preview']); pass one")
        return Preview(every)

    def _preview_images(self, x0: torch.Tensor) -> list:
        scale = float(self._preview_vae.config.scaling_factor)
        shift = float(getattr(self._preview_vae.config, "shift_factor", None) or 0.0)
        with torch.inference_mode():
            images = self._preview((x0 / scale + shift).to(self.device, self.dtype)).float()
        return imgs.to_pil(imgs.to_numpy((images / 2 + 0.5).clamp(0, 1)))

    def _step_callback(self, callback, callback_steps, on_step_end, tensor_inputs, req, preview: Preview | None = None):
        """One per-step callback of the loop, callback(k, t, latents) -> new latents or None,
        from diffusers' two kinds: the legacy callback(step, t, latents) every `callback_steps`
        loop steps that complete a sampler step (Heun: every second UNet call, step = k // 2),
        and callback_on_step_end(pipe, k, t, {"latents": ...}) -> dict after every UNet call,
        whose "latents" replace the loop's. Also returns the progress bar (None unless enabled),
        which counts the sampler's steps (req.sampler_steps), as diffusers' does, not UNet calls."""
        total, order = req.loop_steps, SAMPLERS[req.scheduler].order
        names = [tensor_inputs] if isinstance(tensor_inputs, str) else list(tensor_inputs or ())
        if any(n != "latents" for n in names):
            raise InvalidArgumentError(f"callback_on_step_end_tensor_inputs: fastsd passes only 'latents', "
                                       f"not {', '.join(repr(n) for n in names if n != 'latents')}")
        bar = self._progress_bar(req.sampler_steps)
        if callback is None and on_step_end is None and bar is None:
            return None, None

        def step_callback(k, t, latents, x0=None):
            if bar is not None:
                bar.update(req.steps_done(k + 1) - bar.n)
            completes = (k + 1) % order == 0 or k == total - 1
            if callback is not None and completes and k % callback_steps == 0:
                callback(k // order, t, latents)
            if on_step_end is not None:
                kwargs = {n: latents for n in names}
                if preview is not None and x0 is not None and (k + 1) % preview.every == 0:
                    t0 = time.perf_counter()
                    kwargs["preview"] = self._preview_images(x0)
                    preview.seconds += time.perf_counter() - t0
                got = on_step_end(self, k, torch.tensor(t), kwargs)
                if isinstance(got, dict) and got.get("latents") is not None:
                    if not isinstance(got["latents"], torch.Tensor) or got["latents"].shape != latents.shape:
                        raise InvalidArgumentError(f"callback_on_step_end returned latents that are not a tensor of "
                                                   f"shape {tuple(latents.shape)}")
                    return got["latents"]
            return None

        return step_callback, bar
