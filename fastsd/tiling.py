"""VAE memory options over any backend's vae_decoder: slicing (one image at a time) and
tiling (overlapping latent tiles, decoded separately and blended with linear ramps)."""

from __future__ import annotations

from typing import Callable

import torch

Decoder = Callable[[torch.Tensor], torch.Tensor]  # latent (B, C, h, w) -> images (B, 3, h*f, w*f)


def decode_sliced(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    """Batch decode one image at a time: peak activation memory of batch 1."""
    return torch.cat([decoder(z[i:i + 1]) for i in range(z.shape[0])])


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, overlap: int, left: bool, right: bool) -> torch.Tensor:
    """1D blending weights: rising over `overlap` where a neighbour tile overlaps."""
    w = torch.ones(n)
    ramp = torch.linspace(0, 1, overlap + 2)[1:-1] if overlap > 0 else torch.empty(0)
    if left and overlap:
        w[:overlap] = ramp
    if right and overlap:
        w[n - overlap:] = ramp.flip(0)
    return w


def decode_tiled(decoder: Decoder, z: torch.Tensor, factor: int, tile: int, overlap: int) -> torch.Tensor:
    """Decode latents (B, C, h, w) in tiles of `tile` latent pixels overlapping by `overlap`,
    so peak memory depends on the tile, not the image (4K images on small GPUs)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    b, _, h, w = z.shape
    out, weight = None, torch.zeros(1, 1, h * factor, w * factor, device=z.device)
    rows, cols = _starts(h, tile, tile - overlap), _starts(w, tile, tile - overlap)
    for y in rows:
        for x in cols:
            th, tw = min(tile, h), min(tile, w)
            img = decoder(z[:, :, y:y + th, x:x + tw])  # (B, 3, th*f, tw*f)
            if out is None:
                out = torch.zeros(b, img.shape[1], h * factor, w * factor, device=z.device, dtype=img.dtype)
            o = overlap * factor
            wy = _ramp(th * factor, o, y > 0, y + th < h).to(z.device)
            wx = _ramp(tw * factor, o, x > 0, x + tw < w).to(z.device)
            win = (wy[:, None] * wx[None, :])[None, None]
            ys, xs = slice(y * factor, (y + th) * factor), slice(x * factor, (x + tw) * factor)
            out[:, :, ys, xs] += img * win
            weight[:, :, ys, xs] += win
    return out / weight
