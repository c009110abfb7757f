"""The denoiser contract and its small wrappers: CFG and inpaint blending.

A denoiser maps (x, t[, control scales]) -> model output (eps or v) for a batch of latents
x (B, C, h, w) already scaled for the model input, and a 0-d timestep t; with ControlNets,
the step's scale of each (a (K,) tensor), or None where the step runs without them.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[..., torch.Tensor]  # (x, t[, control scales: (K,) or None]) -> model output


def unet_denoiser(unet, unet_inputs: dict[str, torch.Tensor], conditioning: torch.Tensor | None = None,
                  control: Callable | None = None) -> Denoiser:
    """Bind the UNet to its conditioning inputs (the model family's: text embeddings and
    whatever else its UNet takes); 9-channel inpainting UNets also get the (mask,
    masked-image latents) conditioning concatenated on channels. `control(x, t, scales)`
    gives the ControlNet residuals the UNet adds (from the 4-channel latents)."""

    def denoise(x, t, scales=None):
        residuals = {} if control is None or scales is None else control(x, t, scales)
        if conditioning is not None:
            x = torch.cat([x, conditioning], dim=1)  # (B, 4 + 1 + 4, h, w)
        return unet(sample=x, timestep=t.expand(x.shape[0]), **unet_inputs, **residuals)

    return denoise


def control_residuals(controlnet: Callable, names: tuple[str, ...], images: tuple[torch.Tensor, ...],
                      unet_inputs: dict[str, torch.Tensor], residuals: tuple[str, ...]) -> Callable:
    """control(x, t, scales) -> the UNet's residual inputs: each ControlNet `names[j]` run by
    `controlnet(name, inputs)` on the latents, the text (and family) inputs and its
    conditioning image `images[j]` at scale `scales[j]`, their residuals summed in order (as
    diffusers' MultiControlNetModel)."""

    def control(x, t, scales):
        total = None
        for j, (name, image) in enumerate(zip(names, images, strict=True)):
            out = controlnet(name, {"sample": x, "timestep": t.expand(x.shape[0]), "controlnet_cond": image,
                                    "conditioning_scale": scales[j:j + 1], **unet_inputs})
            total = list(out) if total is None else [a + b for a, b in zip(total, out, strict=True)]
        return dict(zip(residuals, total, strict=True))

    return control


def cfg_denoiser(denoise: Denoiser, guidance_scale: float, guidance_rescale: float = 0.0) -> Denoiser:
    """Classifier-free guidance as one batch of 2 (uncond first), Ho & Salimans 2022, eq. (6);
    with `guidance_rescale`, the guided output's std is pulled back towards the text-conditioned
    one's (Lin et al. 2023, "Common diffusion noise schedules...", section 3.4, eq. (15)-(16),
    as diffusers' rescale_noise_cfg)."""

    def guided(x, t, *control):
        out_uncond, out_text = denoise(torch.cat([x, x]), t, *control).chunk(2)
        out = out_uncond + guidance_scale * (out_text - out_uncond)
        if guidance_rescale > 0:
            dims = list(range(1, out.ndim))
            rescaled = out * (out_text.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
            out = guidance_rescale * rescaled + (1 - guidance_rescale) * out
        return out

    return guided


def blend(x: torch.Tensor, x_orig_noised: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Latent inpainting: keep the (noised) original outside the mask (mask 1 = repaint)."""
    return (1 - mask) * x_orig_noised + mask * x


def guidance_embedding(w: float, width: int, rows: int) -> torch.Tensor:
    """The embedding a guidance-distilled (LCM) UNet takes as timestep_cond: sinusoidal
    features of 1000 w (w = guidance_scale - 1), float32, built as diffusers builds it (VDM's
    embedding; LatentConsistencyModelPipeline.get_guidance_scale_embedding). (rows, width)."""
    w_rows = torch.tensor(w).repeat(rows) * 1000.0
    half = width // 2
    scale = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -scale)
    emb = w_rows.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if width % 2 else emb
