"""The four networks as modules whose inputs and outputs carry the ONNX names.

These are the contract every backend implements (DESIGN.md): the eager backend runs
them directly; exporters trace them. diffusers/transformers classes only hold weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NETWORKS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


class TextEncoder(nn.Module):
    """input_ids (B, 77) int64 -> text_embeddings (B, 77, D): the last hidden state, or with
    clip_skip = k the output of layer -(k + 1) through the final LayerNorm (as diffusers)."""

    def __init__(self, clip, clip_skip: int = 0):
        super().__init__()
        self.clip, self.clip_skip = clip, clip_skip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.clip_skip == 0:
            return self.clip(input_ids).last_hidden_state
        hidden = self.clip(input_ids, output_hidden_states=True).hidden_states[-(self.clip_skip + 1)]
        tower = getattr(self.clip, "text_model", self.clip)  # transformers 5 flattens CLIPTextModel
        return tower.final_layer_norm(hidden)


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


def wrap(ckpt, clip_skip: int = 0) -> dict[str, nn.Module]:
    """The four ONNX-named modules of a loaded checkpoint (sharing its weights)."""
    return {
        "text_encoder": TextEncoder(ckpt.text_encoder, clip_skip),
        "unet": UNet(ckpt.unet),
        "vae_encoder": VaeEncoder(ckpt.vae),
        "vae_decoder": VaeDecoder(ckpt.vae),
    }


# ---- export spec: ONNX names, dynamic axes, shapes -------------------------------------

INT_INPUTS = ("input_ids",)  # int64; every other input is a float tensor
FP32_INPUTS = ("timestep",)  # stays float32 in fp16 graphs (the time embedding upcasts it)


@dataclass(frozen=True)
class Spec:
    """How one network is exported and bound: names in order, and which axes are dynamic."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict  # tensor name -> {axis: symbol}


SPECS = {
    "text_encoder": Spec("text_encoder", ("input_ids",), ("text_embeddings",),
                         {"input_ids": {0: "B"}, "text_embeddings": {0: "B"}}),
    "unet": Spec("unet", ("sample", "timestep", "encoder_hidden_states"), ("latent",),
                 {"sample": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"}, "encoder_hidden_states": {0: "B"},
                  "latent": {0: "B", 2: "h", 3: "w"}}),
    "vae_encoder": Spec("vae_encoder", ("images",), ("latent_moments",),
                        {"images": {0: "B", 2: "H", 3: "W"}, "latent_moments": {0: "B", 2: "h", 3: "w"}}),
    "vae_decoder": Spec("vae_decoder", ("latent",), ("images",),
                        {"latent": {0: "B", 2: "h", 3: "w"}, "images": {0: "B", 2: "H", 3: "W"}}),
}


def io_shapes(name: str, info, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every input and output of network `name` for a call of `batch` items at
    height x width pixels (the UNet's batch includes the CFG doubling)."""
    f, c = info.vae_factor, info.latent_channels
    h, w = height // f, width // f
    tokens, dim = info.max_tokens, info.cross_attention_dim
    return {
        "text_encoder": {"input_ids": (batch, tokens), "text_embeddings": (batch, tokens, dim)},
        "unet": {"sample": (batch, info.unet_in_channels, h, w), "timestep": (batch,),
                 "encoder_hidden_states": (batch, tokens, dim), "latent": (batch, c, h, w)},
        "vae_encoder": {"images": (batch, 3, height, width), "latent_moments": (batch, 2 * c, h, w)},
        "vae_decoder": {"latent": (batch, c, h, w), "images": (batch, 3, height, width)},
    }[name]


def call_dims(network: str, info, first: torch.Tensor) -> tuple[int, int, int]:
    """(batch, height, width in pixels) of a call, from its first input (0, 0 for text)."""
    if network == "text_encoder":
        return first.shape[0], 0, 0
    if network == "vae_encoder":
        return first.shape[0], first.shape[2], first.shape[3]
    return first.shape[0], first.shape[2] * info.vae_factor, first.shape[3] * info.vae_factor


def sample_inputs(name: str, info, batch: int, height: int, width: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Example inputs to trace network `name` with, in its ONNX input order."""
    shapes = io_shapes(name, info, batch, height, width)
    out = []
    for inp in SPECS[name].inputs:
        if inp in INT_INPUTS:
            out.append(torch.zeros(shapes[inp], dtype=torch.int64))
        elif inp in FP32_INPUTS:
            out.append(torch.full(shapes[inp], 500.0))
        else:
            out.append(torch.randn(shapes[inp], generator=torch.Generator().manual_seed(0)).to(dtype))
    return tuple(out)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """How far a network output is from a reference: max |got - want| / max |want|, in
    float64; inf where `got` holds NaN or inf (which no bound may let through)."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
