"""Will a call fit in memory? A lower bound on its peak, checked before anything is allocated.

The bound counts only tensors every backend must hold at once (the widest UNet and VAE
activations at full resolution, and the output images), so a call it refuses cannot run
on the device; calls it accepts may still be tight. The point is a clear error for
sizes and batches no machine can hold (a 10^6 x 10^6 image, a million images per
prompt), instead of a multi-terabyte allocation or the OOM killer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError

GIB = 2**30
UNET_LIVE = 4  # tensors of the first block's width alive at once (input, skip, resnet hidden, output)
VAE_LIVE = 2  # input and output of the decoder's last convolutions
TEXT_LIVE = 4  # hidden state, attention input, MLP hidden (4x) counted as 2 more


@dataclass(frozen=True)
class Widths:
    """Channel counts that size the largest activations."""

    unet: int  # unet.config.block_out_channels[0]
    vae: int  # vae.config.block_out_channels[0] (the decoder's last up block runs at full size)
    text: int  # text encoder hidden size


def widths_of(ckpt) -> Widths:
    configs = ckpt.configs
    return Widths(int(configs["unet"]["block_out_channels"][0]), int(configs["vae"]["block_out_channels"][0]),
                  int(configs["text_encoder"]["hidden_size"]))


def available_bytes(device: torch.device) -> int:
    """Memory a call may still take on `device` (GPU: free plus torch's cached; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_bytes(info, widths: Widths, req, itemsize: int, memory) -> int:
    """Lower bound on the peak memory of request `req` (see the module docstring)."""
    images = len(req.prompts) * req.n
    rows = images * (2 if req.do_cfg else 1)  # CFG: UNet and text encoder run on [uncond; cond]
    h, w = req.height // info.vae_factor, req.width // info.vae_factor
    unet = rows * widths.unet * h * w * itemsize * UNET_LIVE
    text = rows * info.max_tokens * widths.text * itemsize * TEXT_LIVE
    decode_batch = 1 if memory.vae_slicing or memory.vae_tiling else images
    decode_h, decode_w = req.height, req.width
    if memory.vae_tiling:
        decode_h = min(decode_h, (memory.tile or info.sample_size) * info.vae_factor)
        decode_w = min(decode_w, (memory.tile or info.sample_size) * info.vae_factor)
    vae = decode_batch * widths.vae * decode_h * decode_w * itemsize * VAE_LIVE
    output = images * 3 * req.height * req.width * 4 * 2  # float32 images and their numpy copy
    if req.output_type == "latent" and req.image is None:  # no VAE at all
        vae = output = 0
    return max(unet, vae, text) + output


def check_fits(info, widths: Widths, req, dtype: torch.dtype, device: torch.device, memory) -> None:
    need = peak_bytes(info, widths, req, torch.finfo(dtype).bits // 8, memory)
    have = available_bytes(device)
    if need > have:
        images = len(req.prompts) * req.n
        raise InvalidArgumentError(
            f"{images} image(s) of {req.width}x{req.height} need at least {need / GIB:.1f} GiB on {device.type}, "
            f"{have / GIB:.1f} GiB is available: lower the size or the number of images"
            + ("" if memory.vae_tiling else ", or enable VAE tiling"))
