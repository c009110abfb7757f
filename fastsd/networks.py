"""The four networks as modules whose inputs and outputs carry the ONNX names.

These are the contract every backend implements (DESIGN.md): the eager backend runs
them directly; exporters trace them. diffusers/transformers classes only hold weights.
"""

from __future__ import annotations

import torch
from torch import nn

NETWORKS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


class TextEncoder(nn.Module):
    """input_ids (B, 77) int64 -> text_embeddings (B, 77, D)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip(input_ids).last_hidden_state


class UNet(nn.Module):
    """sample (B, C_in, h, w), timestep (B,) float32, encoder_hidden_states (B, 77, D)
    -> noise prediction (B, C_latent, h, w) (eps or v, per the scheduler config)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> latent distribution moments (B, 2*C, H/f, W/f):
    mean and log-variance of the diagonal Gaussian, concatenated on channels."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, images):
        h = self.encoder(images)
        return h if self.quant_conv is None else self.quant_conv(h)


class VaeDecoder(nn.Module):
    """latent (B, C, h, w), already divided by the scaling factor -> images (B, 3, H, W) in ~[-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, latent):
        z = latent if self.post_quant_conv is None else self.post_quant_conv(latent)
        return self.decoder(z)


def wrap(ckpt) -> dict[str, nn.Module]:
    """The four ONNX-named modules of a loaded checkpoint (sharing its weights)."""
    return {
        "text_encoder": TextEncoder(ckpt.text_encoder),
        "unet": UNet(ckpt.unet),
        "vae_encoder": VaeEncoder(ckpt.vae),
        "vae_decoder": VaeDecoder(ckpt.vae),
    }
