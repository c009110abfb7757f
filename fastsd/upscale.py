"""Upscalers for the hires fix: AUTOMATIC1111's latent modes and plain resamplers (no
weights), and super-resolution models (ESRGAN, Real-ESRGAN, SwinIR, ...: the architectures
spandrel detects from a weights file, as ComfyUI and Forge load them), run in tiles so a
large image fits in memory.

Names are the web UI's: "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent
(bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)" act on the first pass's
latents; "None", "Lanczos", "Nearest" resize its image (the web UI's "None" is a plain
Lanczos resize too); a model upscaler is named by its file's stem in an upscaler folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import CheckpointError, FastSDError, InvalidArgumentError
from .images import as_rgb, image_to_tensor, to_numpy, to_pil

# name -> (torch interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
RESAMPLERS: dict[str, Image.Resampling] = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                                           "Nearest": Image.Resampling.NEAREST}
MODEL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
TILE = 192  # input pixels per tile side (the web UI's ESRGAN tile default)
TILE_PAD = 16  # context on each side of a tile, cut from its output (more than the models' receptive radius)


def upscale_latents(latents: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Latents resized to (height, width) latent pixels by a latent mode's interpolation."""
    how, antialias = LATENT_MODES[mode]
    kw = {"align_corners": False} if how in ("bilinear", "bicubic") else {}
    return F.interpolate(latents, size=(height, width), mode=how, antialias=antialias, **kw)


def crop_center(t, height: int, width: int):
    """The centre (height, width) of a [..., H, W] tensor or a PIL image (hr_resize_x and
    hr_resize_y of another aspect than the first pass: upscale to cover, then crop)."""
    if isinstance(t, Image.Image):
        left, top = (t.width - width) // 2, (t.height - height) // 2
        return t.crop((left, top, left + width, top + height))
    top, left = (t.shape[-2] - height) // 2, (t.shape[-1] - width) // 2
    return t[..., top:top + height, left:left + width]


def cover(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int]:
    """The smallest size of src's aspect that covers dst."""
    scale = max(dst_w / src_w, dst_h / src_h)
    return max(dst_w, math.ceil(src_w * scale)), max(dst_h, math.ceil(src_h * scale))


@dataclass
class ModelUpscaler:
    """A super-resolution model (spandrel's ImageModelDescriptor) and its file."""

    name: str
    path: Path
    model: object  # spandrel.ImageModelDescriptor
    tile: int = TILE
    tile_pad: int = TILE_PAD

    @property
    def scale(self) -> int:
        return int(self.model.scale)

    def __call__(self, image: Image.Image, width: int, height: int, tile: int | None = None) -> Image.Image:
        """`image` through the model (applied until it reaches the target, as the web UI does
        for targets past one pass), then resized to exactly (width, height) with Lanczos.
        `tile`: input pixels per tile side (0: the whole image at once; None: this upscaler's)."""
        tile = self.tile if tile is None else tile
        im = as_rgb(image)
        for _ in range(4):
            if im.width >= width and im.height >= height:
                break
            y = self.run(image_to_tensor(im, im.height, im.width, normalize=False), tile)
            im = to_pil(to_numpy(y.clamp(0, 1)))[0]
        return im if im.size == (width, height) else im.resize((width, height), Image.Resampling.LANCZOS)

    def run(self, x: torch.Tensor, tile: int = 0) -> torch.Tensor:
        """[1, 3, H, W] in [0, 1] -> [1, 3, H*s, W*s]; with tile > 0, in tiles of tile x tile
        input pixels, each read with tile_pad pixels of context that are cut from its output,
        so the tiles meet without seams (equal to the whole-image run up to rounding)."""
        model, s = self.model, self.scale
        device = next(model.model.parameters()).device
        dtype = next(model.model.parameters()).dtype
        with torch.inference_mode():
            if tile <= 0 or (x.shape[-1] <= tile and x.shape[-2] <= tile):
                return model(x.to(device, dtype)).float().cpu()
            _, _, h, w = x.shape
            out = torch.zeros(1, 3, h * s, w * s)
            p = self.tile_pad
            for top in range(0, h, tile):
                for left in range(0, w, tile):
                    bottom, right = min(top + tile, h), min(left + tile, w)
                    t0, l0 = max(top - p, 0), max(left - p, 0)
                    t1, l1 = min(bottom + p, h), min(right + p, w)
                    y = model(x[..., t0:t1, l0:l1].to(device, dtype)).float().cpu()
                    out[..., top * s:bottom * s, left * s:right * s] = y[
                        ..., (top - t0) * s:(bottom - t0) * s, (left - l0) * s:(right - l0) * s]
            return out


def model_files(folder: str | Path | None) -> dict[str, Path]:
    """The upscaler model files of a folder, by stem (what the web UI lists them as)."""
    if folder is None:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise InvalidArgumentError(f"the upscaler folder {root} does not exist")
    return {p.stem: p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES}


def import_spandrel():
    """spandrel, or a FastSDError that says why not (absent, or its torchvision does not fit
    the installed torch: PyPI's torchvision is built for CUDA torch)."""
    try:
        import spandrel
    except ImportError as e:
        raise FastSDError(f"model upscalers need spandrel ({e.name} is missing): pip install 'fastsd[upscale]'; with "
                          "a CPU-only torch, install the matching CPU torchvision from PyTorch's index first") from None
    except Exception as e:  # noqa: BLE001 - torchvision built for another torch fails at import
        raise FastSDError(f"model upscalers need spandrel, which could not be imported ({type(e).__name__}: {e}); "
                          "its torchvision must be the build for the installed torch (CPU torch: PyTorch's CPU "
                          "index)") from None
    return spandrel


def load_model_upscaler(path: str | Path, *, allow_pickle: bool = False, device=None) -> ModelUpscaler:
    """A super-resolution model from a weights file, its architecture detected by spandrel.
    Pickled files (.pth, .pt, .ckpt, .bin) can run code when read: refused unless allow_pickle."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"upscaler model {path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise InvalidArgumentError(f"upscaler model {path.name} is a pickle file, which can run code when loaded; "
                                   "convert it to .safetensors, or pass allow_pickle=True (--allow-pickle) if you "
                                   "trust it")
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_file(str(path))
    except Exception as e:  # noqa: BLE001 - spandrel's errors for files it cannot read or place
        raise CheckpointError(f"upscaler model {path.name}: not a model spandrel can load ({e})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3 or (
            descriptor.output_channels != 3) or descriptor.scale < 1:
        raise CheckpointError(f"upscaler model {path.name} is a {descriptor.architecture.name} model that does not "
                             "map RGB images to RGB images")
    descriptor.eval()
    return ModelUpscaler(path.stem, path, descriptor)
