"""Eager PyTorch backend: the reference, and the fallback for any missing engine.

On CUDA: fp16/bf16 weights, channels-last UNet and VAE, PyTorch SDPA attention
(diffusers' default attention processor), all under inference_mode.
"""

from __future__ import annotations

import torch

from ..networks import NETWORKS, wrap


class EagerBackend:
    def __init__(self, ckpt, device: torch.device, dtype: torch.dtype, clip_skip: int = 0,
                 cuda_graphs: bool = False):
        self.device, self.dtype = device, dtype
        self.modules = {k: m.to(device=device, dtype=dtype).eval() for k, m in wrap(ckpt, clip_skip).items()}
        if device.type == "cuda":
            for k in ("unet", "vae_encoder", "vae_decoder"):
                self.modules[k].to(memory_format=torch.channels_last)
        self._graphed_unet = None
        if cuda_graphs:  # one graph per (batch, height, width), captured on first use
            from .cuda_graphs import GraphedCall

            self._graphed_unet = GraphedCall(self._unet_fp)
        self.backends = {k: "eager" for k in NETWORKS}

    def _run(self, name: str, *args: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.modules[name](*args).float()

    def text_encoder(self, input_ids):
        return self._run("text_encoder", input_ids.to(self.device))

    def _unet_fp(self, sample, timestep, encoder_hidden_states):
        with torch.inference_mode():
            return self.modules["unet"](sample, timestep, encoder_hidden_states)

    def unet(self, sample, timestep, encoder_hidden_states):
        args = (sample.to(self.dtype), timestep.float().contiguous(), encoder_hidden_states.to(self.dtype))
        if self._graphed_unet is not None and not torch.cuda.is_current_stream_capturing():
            return self._graphed_unet(*args)  # inside a whole-step capture the UNet is captured with it
        return self._run("unet", *args)

    def vae_encoder(self, images):
        return self._run("vae_encoder", images.to(self.dtype))

    def vae_decoder(self, latent):
        return self._run("vae_decoder", latent.to(self.dtype))
