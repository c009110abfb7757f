"""Pipeline.from_pretrained: load a checkpoint (and its ControlNets, VAE, preview VAE) and
the backend that runs it, after checking every loading argument."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import status
from .backends import Backend
from .backends.eager import Fp32VaeDecoder
from .backends.preload import Preload
from .backends.registry import BACKEND_NAMES, ENGINE_KINDS
from .backends.select import ahead, base_weights, make_backend
from .checkpoint import check_clip_skip, early_fingerprint, load_checkpoint
from .controlnet import load_controlnets
from .devices import parse_device
from .engines import DTYPES, QUANTIZED, compute_dtype, default_engine_dir
from .errors import InvalidArgumentError
from .families import family_for
from .schedulers import PREDICTION_TYPES
from .settings import MAX_SIDE, check_max_side
from .surface import dtype_name


@dataclass(frozen=True)
class MemoryOptions:
    """Load-time memory savers for small GPUs (each costs some speed)."""

    attention_slicing: bool = False  # eager UNet: attention in slices (diffusers' "auto"); set when loading
    vae_slicing: bool = False  # decode a batch one image at a time
    vae_tiling: bool = False  # decode in overlapping latent tiles (large images)
    tile: int | None = None  # latent pixels per tile; None: the VAE's sample size (64 for SD), as diffusers
    tile_overlap: int | None = None  # latent pixels shared by neighbouring tiles; None: a quarter tile


def check_memory(memory: MemoryOptions | None) -> None:
    if memory is None:
        return
    if memory.tile is not None and (isinstance(memory.tile, bool) or not isinstance(memory.tile, int)
                                    or memory.tile < 1):
        raise InvalidArgumentError(f"tile must be a positive integer (latent pixels), got {memory.tile!r}")
    if memory.tile_overlap is not None and not 0 <= memory.tile_overlap < (memory.tile or 10**9):
        raise InvalidArgumentError(f"tile_overlap must be in [0, tile={memory.tile}), got {memory.tile_overlap}")


def _check_loading(backend, device, dtype, torch_dtype, cuda_graphs, variant, allow_pickle, use_safetensors,
                   safety_checker, feature_extractor, unsupported: dict) -> tuple[torch.device, str]:
    """The loading arguments checked before anything is read: the device and the precision's name."""
    if unsupported:
        raise InvalidArgumentError(f"from_pretrained does not support the argument {next(iter(unsupported))!r}")
    for name, value in (("safety_checker", safety_checker), ("feature_extractor", feature_extractor)):
        if value is not None:
            raise InvalidArgumentError(f"fastsd runs no safety checker: pass {name}=None (or leave it out)")
    if use_safetensors is False and not allow_pickle:
        raise InvalidArgumentError("use_safetensors=False loads pickle files, which run code: pass allow_pickle=True")
    name = dtype_name(dtype, torch_dtype)
    if backend not in BACKEND_NAMES:
        raise InvalidArgumentError(f"must be one of {', '.join(BACKEND_NAMES)}, got {backend!r}", "backend")
    dev = parse_device(device)
    if cuda_graphs and dev.type != "cuda":
        raise InvalidArgumentError("cuda_graphs needs a CUDA device")
    if variant is not None and not isinstance(variant, str):
        raise InvalidArgumentError(f"must be a string such as 'fp16', got {variant!r}", "variant")
    check_quantized(name, backend, dev)
    return dev, name or ("fp16" if dev.type == "cuda" else "fp32")


def check_quantized(precision: str | None, backend: str, device: torch.device) -> None:
    """A quantized precision (int8) is that of entries some engine kinds build: refused
    where none of those kinds could serve it (other precisions pass)."""
    if precision not in QUANTIZED:
        return
    kinds = [k for k in ENGINE_KINDS.values() if precision in k.quantizes]
    if backend not in ("auto", *(k.name for k in kinds)):
        raise InvalidArgumentError(f"{precision} is the precision of {' or '.join(k.name for k in kinds)} entries "
                                   f"(`{kinds[0].build_command} --dtype {precision}`); backend={backend!r} runs "
                                   f"{', '.join(DTYPES)}", "dtype")
    if not any(device.type in k.devices for k in kinds):
        raise InvalidArgumentError(f"{precision} engines run on the {' or '.join(kinds[0].devices)}, not "
                                   f"{device.type}", "dtype")


def from_pretrained(cls, model: str, backend: str = "auto", device: str | None = None,
                    dtype: str | None = None, engine_dir: str | None = None,
                    allow_pickle: bool = False, prediction_type: str | None = None,
                    clip_skip: int = 0, memory: MemoryOptions | None = None,
                    cuda_graphs: bool = False, *, torch_dtype=None, variant: str | None = None,
                    safety_checker=None, requires_safety_checker: bool | None = None,
                    feature_extractor=None, use_safetensors: bool | None = None,
                    local_files_only: bool = False, vae=None, preview_vae=None, controlnet=None,
                    max_side: int | None = MAX_SIDE, lora_dir=None, upscaler_dir=None, fallback: bool | None = None,
                    **unsupported):
    """Load `model` (see the README). `allow_pickle` permits .ckpt/.bin files;
    `prediction_type` ("epsilon" | "v_prediction") overrides the checkpoint's scheduler
    config, for single files whose config cannot be known (SD 2.x 512-base vs 768-v);
    `clip_skip` = k takes text embeddings from CLIP layer -(k + 1) by default (engines
    bake it in; a call may ask another where the text encoder runs eagerly).
    diffusers' loading arguments work as there: `torch_dtype` (torch.float16, ...; same as
    dtype="fp16"), `variant` ("fp16": model.fp16.safetensors), `safety_checker=None` (fastsd
    has none), `use_safetensors`, `local_files_only`, `vae` (a VAE folder, .safetensors file or
    AutoencoderKL replacing the checkpoint's, e.g. an fp16-safe SD-XL VAE, or a tiny
    autoencoder such as TAESD for fast decoding, as diffusers' vae=AutoencoderTiny);
    `preview_vae` (a TAESD folder, hub id in the hub cache, synthetic:taesd or an
    AutoencoderTiny) decodes live previews (see __call__'s preview_every); `controlnet` (a
    diffusers folder, a single file, a hub id in the hub cache, synthetic:controlnet-<arch>,
    a ControlNetModel, or a list of these: multi-ControlNet) lets calls pass control_image;
    `max_side`: the pixels a side a call may ask for (None: no limit); `lora_dir`: the folder
    (searched below too) whose NAME.safetensors files `<lora:NAME:W>` prompt tags name, with
    prompt_syntax="a1111"; `upscaler_dir`: the folder whose upscaler models (ESRGAN, ...)
    hires_fix's hr_upscaler names by file stem; `fallback`: whether a backend that serves no
    network here runs eager PyTorch (with a warning) or raises EngineUnavailableError (None:
    True for "auto", False for an engine kind asked for by name, so a script that asks for
    onnxruntime never measures eager unawares); others raise InvalidArgumentError."""
    dev, dtype = _check_loading(backend, device, dtype, torch_dtype, cuda_graphs, variant, allow_pickle,
                                use_safetensors, safety_checker, feature_extractor, unsupported)
    check_memory(memory)
    max_side = check_max_side(max_side)
    for name, folder in (("lora_dir", lora_dir), ("upscaler_dir", upscaler_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise InvalidArgumentError(f"no folder {folder}", name)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InvalidArgumentError(f"must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}",
                                   "prediction_type")
    if fallback is not None and not isinstance(fallback, bool):
        raise InvalidArgumentError(f"must be True, False or None, got {fallback!r}", "fallback")
    fallback = backend in ("auto", "eager") if fallback is None else fallback
    store = Path(engine_dir) if engine_dir is not None else default_engine_dir()
    preloading = _load_ahead(model, backend, dev, dtype, store, clip_skip, allow_pickle, variant, vae)
    try:
        with status.slow("loading %s (backend %s, %s %s): its weights and engines", model, backend, dev, dtype):
            return _from_pretrained(cls, model, backend, dev, dtype, store, allow_pickle, prediction_type, clip_skip,
                                    memory, cuda_graphs, variant, local_files_only, vae, preview_vae, controlnet,
                                    max_side, lora_dir, upscaler_dir, fallback)
    finally:
        if preloading is not None:
            preloading.release()


def _load_ahead(model, backend: str, dev: torch.device, precision: str, store: Path, clip_skip: int,
                allow_pickle: bool, variant, vae) -> Preload | None:
    """Engines loaded on a background thread while the checkpoint's modules are built (see
    backends/preload.py), where the checkpoint is a folder whose fingerprint its files give
    (no VAE replacing its own) and engines may serve it on this device."""
    if backend == "eager" or dev.type != "cpu" or vae is not None or not isinstance(model, (str, Path)):
        return None

    def find() -> list:
        fingerprint = early_fingerprint(str(model), allow_pickle, variant)
        return [] if fingerprint is None else ahead(fingerprint, backend, dev, precision, store, clip_skip)

    return Preload(find)


def _from_pretrained(cls, model, backend, dev, dtype, store, allow_pickle, prediction_type, clip_skip, memory,
                     cuda_graphs, variant, local_files_only, vae, preview_vae, controlnet, max_side, lora_dir,
                     upscaler_dir, fallback):
    ckpt = load_checkpoint(model, allow_pickle=allow_pickle, variant=variant, local_files_only=local_files_only,
                           vae=vae)
    check_clip_skip(ckpt, clip_skip)
    if prediction_type is not None:
        ckpt.info = replace(ckpt.info, scheduler=dict(ckpt.info.scheduler, prediction_type=prediction_type))
    family = family_for(ckpt, load_controlnets(controlnet, ckpt, allow_pickle, local_files_only))
    vae_fp32 = Fp32VaeDecoder(ckpt.as_loaded("vae"))  # as loaded, before any cast
    weights = base_weights(ckpt, family, store)

    def remake(dev: torch.device, precision: str, graphs: bool, slicing: bool) -> Backend:
        check_quantized(precision, backend, dev)
        return make_backend(ckpt, family, backend, dev, compute_dtype(precision), store, clip_skip, graphs,
                            attention_slicing=slicing, vae_fp32=vae_fp32, precision=precision, weights=weights,
                            fallback=fallback)

    pipe = cls(ckpt, remake(dev, dtype, cuda_graphs, bool(memory and memory.attention_slicing)), dev,
               compute_dtype(dtype), memory, cuda_graphs, family)
    pipe._remake, pipe.clip_skip, pipe.max_side, pipe.precision = remake, clip_skip, max_side, dtype
    pipe.lora_dir = None if lora_dir is None else Path(lora_dir)
    pipe.upscaler_dir, pipe._allow_pickle = upscaler_dir, allow_pickle
    pipe._store = (backend, store)  # where networks loaded later (IP-Adapters' image encoders) find engines
    pipe._tiling()  # the tile geometry, checked against this VAE now (not at the first decode)
    if preview_vae is not None:
        pipe.load_preview_vae(preview_vae)
    return pipe
