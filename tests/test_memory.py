"""Memory options: VAE slicing and tiling (over any decoder), attention slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastsd import MemoryOptions, Pipeline
from fastsd.errors import InvalidArgumentError
from fastsd.tiling import decode_sliced, decode_tiled

KW = dict(num_inference_steps=2, output_type="np", seed=3)


def local_decoder(z):
    """A purely local stand-in decoder: tiling must reproduce it exactly."""
    return F.interpolate(z[:, :3] * 2 + 1, scale_factor=4, mode="nearest")


@pytest.mark.parametrize("h,w,tile,overlap", [(20, 33, 8, 3), (16, 16, 8, 0), (7, 9, 16, 4), (24, 12, 10, 9)])
def test_tiling_blends_exactly_for_a_local_decoder(h, w, tile, overlap):
    z = torch.randn(2, 4, h, w)
    assert torch.allclose(decode_tiled(local_decoder, z, 4, tile, overlap), local_decoder(z), atol=1e-6)


def test_tiling_bad_overlap():
    with pytest.raises(ValueError):
        decode_tiled(local_decoder, torch.randn(1, 4, 8, 8), 4, 8, 8)


def test_slicing_matches_batch(pipes):
    pipe = pipes("eps")
    z = torch.randn(3, 4, 16, 16)
    assert torch.allclose(decode_sliced(pipe.backend.vae_decoder, z), pipe.backend.vae_decoder(z), atol=1e-5)


@pytest.mark.parametrize("options", [MemoryOptions(vae_slicing=True), MemoryOptions(attention_slicing=True),
                                     MemoryOptions(vae_tiling=True, tile=64, tile_overlap=8)])
def test_options_keep_the_image(ckpts, pipes, options):
    """Slicing changes nothing; a tile covering the whole latent changes nothing."""
    plain = pipes("eps")(["a", "b"], **KW).images
    got = Pipeline.from_pretrained(str(ckpts["eps"]), memory=options)(["a", "b"], **KW).images
    assert np.abs(got - plain).max() < 1e-4


def test_tiled_large_image(ckpts, pipes):
    """A large image decoded in 16-latent tiles agrees with the plain decode: the tiny VAE's
    mid-block attention is global, so tiles differ near seams (measured: mean 0.03, correlation
    0.97), but a misplaced or dropped tile is far off (a tile-sized shift: mean 0.18)."""
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), memory=MemoryOptions(vae_tiling=True, tile=16,
                                                                            tile_overlap=4))
    kw = dict(num_inference_steps=1, output_type="np", height=96, width=80, seed=0)
    tiled, plain = pipe("a", **kw).images, pipes("eps")("a", **kw).images
    assert tiled.shape == plain.shape == (1, 96, 80, 3)
    assert np.abs(tiled - plain).mean() < 0.3 * plain.std()
    assert np.corrcoef(tiled.ravel(), plain.ravel())[0, 1] > 0.9


def test_bad_memory_options(ckpts):
    with pytest.raises(InvalidArgumentError, match="tile_overlap"):
        Pipeline.from_pretrained(str(ckpts["eps"]), memory=MemoryOptions(tile=8, tile_overlap=8))
    # an overlap past the default tile (the VAE's sample size): refused at load, and before a
    # call's work where tiling is switched on later, not at the decode after the whole loop
    with pytest.raises(InvalidArgumentError, match=r"tile_overlap 100 must be in \[0, tile="):
        Pipeline.from_pretrained(str(ckpts["eps"]), memory=MemoryOptions(vae_tiling=True, tile_overlap=100))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), memory=MemoryOptions(tile_overlap=100))
    pipe.enable_vae_tiling()
    pipe._generate = None  # not reached
    with pytest.raises(InvalidArgumentError, match="tile_overlap 100"):
        pipe("a", num_inference_steps=2)
