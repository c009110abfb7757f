"""VAE memory options over any backend's vae_decoder: slicing (one image at a time) and
tiling (overlapping latent tiles, decoded separately and blended with linear ramps)."""

from __future__ import annotations

from typing import Callable

import torch

Decoder = Callable[[torch.Tensor], torch.Tensor]  # latent (B, C, h, w) -> images (B, 3, h*f, w*f)


def decode_sliced(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    """Batch decode one image at a time: peak activation memory of batch 1."""
    return torch.cat([decoder(z[i:i + 1]) for i in range(z.shape[0])])


def _blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Blend the top `extent` rows of tile b with the bottom of tile a, linearly, in place."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
    return b


def _blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, stride: int, blend: int,
          keep: int) -> torch.Tensor:
    """Run `fn` over `tile`-sized tiles of x starting every `stride` input pixels; each output
    tile is blended with its upper and left neighbours over `blend` output pixels, then
    cropped to `keep` (diffusers' AutoencoderKL tiled_encode / tiled_decode, same order and
    arithmetic, so `vae.enable_tiling()` gives diffusers' images)."""
    rows = [[fn(x[:, :, i:i + tile, j:j + tile]).clone() for j in range(0, x.shape[3], stride)]  # blended in place
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, t in enumerate(row):
            if i > 0:
                t = _blend_v(rows[i - 1][j], t, blend)
            if j > 0:
                t = _blend_h(row[j - 1], t, blend)
            kept.append(t[:, :, :keep, :keep])
        out_rows.append(torch.cat(kept, dim=3))
    return torch.cat(out_rows, dim=2)


def decode_tiled(decoder: Decoder, z: torch.Tensor, factor: int, tile: int, overlap: int) -> torch.Tensor:
    """Decode latents (B, C, h, w) in tiles of `tile` latent pixels overlapping by `overlap`,
    so peak memory depends on the tile, not the image. Latents no larger than a tile are
    decoded whole. tile = vae sample_size / factor, overlap = tile / 4 is diffusers' tiling."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    if z.shape[2] <= tile and z.shape[3] <= tile:
        return decoder(z)
    return tiled(decoder, z, tile, tile - overlap, overlap * factor, (tile - overlap) * factor)


def encode_tiled(encoder: Decoder, images: torch.Tensor, factor: int, tile: int, overlap: int) -> torch.Tensor:
    """The VAE encoder over tiles of `tile` latent pixels (tile * factor image pixels)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    if images.shape[2] <= tile * factor and images.shape[3] <= tile * factor:
        return encoder(images)
    return tiled(encoder, images, tile * factor, (tile - overlap) * factor, overlap, tile - overlap)
