"""What every checkpoint loader shares: the loaded types (`Checkpoint`, `ModelInfo`),
safetensors header checks, the content fingerprint, the tokenizer, and assembling a
`Checkpoint` from loaded parts. checkpoint.py (folders, hub ids) and single_file.py
(original-layout files) both build on this module; neither imports the other's caller."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .hashing import DigestCache
from .paths import cache_dir

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


IGNORED_CONFIG_KEYS = ("name_or_path", "transformers_version", "torch_dtype", "dtype", "scaling_factor",
                       "sample_size", "force_upcast", "output_hidden_states", "architectures")


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime reads from a checkpoint's configs (never hard-coded)."""

    vae_scale: float  # vae.config.scaling_factor: latents = scale * (z - shift)
    vae_shift: float  # vae.config.shift_factor (0 for SD 1.x/2.x)
    vae_factor: int  # image pixels per latent pixel: 2 ** (len(vae block_out_channels) - 1)
    latent_channels: int  # vae.config.latent_channels
    unet_in_channels: int  # 4, or 9 for inpainting UNets
    sample_size: int  # unet.config.sample_size (latent pixels)
    cross_attention_dim: int
    max_tokens: int  # tokenizer.model_max_length (77)
    scheduler: dict  # the raw scheduler config
    fingerprint: str  # content hash of every weight and config file
    source: str  # what the user passed
    architecture: str = ""  # hash of the network configs: equal means same shapes (refittable engines)
    family: str = "sd"  # "sd" (SD 1.x/2.x) or "sdxl" (two text encoders, text_time added embedding)
    force_zeros_for_empty_prompt: bool = False  # SD-XL: zero negative embeddings when no negative_prompt
    tiny_vae: bool = False  # the VAE is a tiny autoencoder (TAESD): the encoder gives latents, no distribution
    guidance_embedding_dim: int = 0  # unet.config.time_cond_proj_dim: a guidance-distilled UNet (LCM) takes the
    # guidance scale as an embedding of this width (timestep_cond) and runs without CFG; 0: a plain UNet

    @property
    def default_size(self) -> int:
        return self.sample_size * self.vae_factor


@dataclass
class Checkpoint:
    info: ModelInfo
    tokenizer: Any
    text_encoder: Any  # transformers CLIPTextModel
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    tokenizer_2: Any = None  # SD-XL's second tokenizer and text encoder (CLIPTextModelWithProjection)
    text_encoder_2: Any = None


SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: Path) -> dict:
    """Parse a .safetensors header and check it describes the file exactly (every tensor's
    dtype, shape and byte range, nothing past the end); returns the header."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(n))
        end = _check_header(header, size - 8 - n)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None
    if 8 + n + end != size:
        raise CheckpointError(f"truncated or corrupt safetensors file {path}: "
                              f"{size} bytes, header says {8 + n + end}")
    return header


def _check_header(header, data_bytes: int) -> int:
    """Validate a parsed header (ValueError on anything malformed); returns the data's end."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= t.keys():
            raise ValueError(f"tensor {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
        if dtype not in SAFETENSORS_DTYPES or not ints(shape) or not ints(offsets) or len(offsets) != 2:
            raise ValueError(f"tensor {name!r} has a malformed dtype, shape or data_offsets")
        begin, stop = offsets
        count = 1
        for d in shape:
            count *= d
        if stop - begin != count * SAFETENSORS_DTYPES[dtype] or stop > data_bytes:
            raise ValueError(f"tensor {name!r}: bytes {begin}..{stop} do not hold a {dtype} tensor of shape {shape}")
        end = max(end, stop)
    return end


def fingerprint(files: list[Path], root: Path, timed: bool = True) -> str:
    """Content hash over files (names relative to root). Per-file digests are cached by the
    file's identity (fastsd/hashing.py), so only the first load of a checkpoint reads every byte.
    `timed`: counted in the process's fingerprint phase (fastsd/phases.py; not on other threads)."""
    from .phases import FINGERPRINT, phase

    if not timed:
        return _fingerprint(files, root)
    with phase(FINGERPRINT):
        return _fingerprint(files, root)


def _fingerprint(files: list[Path], root: Path) -> str:
    cache = DigestCache("blake2b")
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(files):
        rel = f.name if f == root else str(f.relative_to(root))
        h.update(f"{rel}={cache.digest(f)};".encode())
    cache.save()
    return h.hexdigest()


def load_tokenizer(folder: Path):
    """A CLIP tokenizer from a folder that really holds one (transformers would otherwise
    hand back an empty tokenizer without complaint)."""
    from transformers import CLIPTokenizer

    has_files = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    if not has_files:
        raise CheckpointError(f"{folder} holds no CLIP tokenizer (vocab.json + merges.txt or tokenizer.json)")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from None


def architecture_hash(*configs) -> str:
    """Hash of the configs that fix every weight's name and shape (not the weights)."""
    clean = [{k: v for k, v in dict(c).items() if not k.startswith("_") and k not in IGNORED_CONFIG_KEYS}
             for c in configs]
    return hashlib.blake2b(json.dumps(clean, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def architecture_of(unet, vae, text_encoder, text_encoder_2=None) -> str:
    """The architecture hash of a checkpoint's networks (SD-XL: the second encoder too)."""
    text = [t.config.to_dict() for t in (text_encoder, text_encoder_2) if t is not None]
    return architecture_hash(unet.config, vae.config, *text)


def make_checkpoint(parts: dict, scheduler: dict, fp: str, source: str,
                    pipeline_config: dict | None = None) -> Checkpoint:
    """A Checkpoint from loaded parts (tokenizer, text_encoder, unet, vae; SD-XL also
    tokenizer_2 and text_encoder_2). `pipeline_config` is model_index.json's settings
    (force_zeros_for_empty_prompt; diffusers' default True for SD-XL where absent)."""
    unet, vae, tok = parts["unet"], parts["vae"], parts["tokenizer"]
    text_2 = parts.get("text_encoder_2")
    for m in (parts["text_encoder"], unet, vae, text_2):
        if m is not None:
            m.eval().requires_grad_(False)
    xl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if xl != (text_2 is not None):
        raise CheckpointError("an SD-XL UNet (text_time added embedding) needs text_encoder_2 and tokenizer_2, "
                              "and only it takes them" if xl else
                              "text_encoder_2 is given but the UNet is not an SD-XL one (no text_time embedding)")
    if xl:
        want = unet.config.addition_time_embed_dim * 6 + text_2.config.projection_dim
        if unet.config.projection_class_embeddings_input_dim != want:
            raise CheckpointError(f"the UNet's added embedding takes "
                                  f"{unet.config.projection_class_embeddings_input_dim} features, but 6 time ids "
                                  f"and text_encoder_2's pooled output make {want}")
        width = parts["text_encoder"].config.hidden_size + text_2.config.hidden_size
        if width != unet.config.cross_attention_dim:
            raise CheckpointError(f"the two text encoders give {width} features; the UNet takes "
                                  f"{unet.config.cross_attention_dim}")
    info = ModelInfo(
        vae_scale=float(vae.config.scaling_factor),
        vae_shift=float(getattr(vae.config, "shift_factor", None) or 0.0),
        vae_factor=2 ** (len(vae.config.block_out_channels) - 1),
        latent_channels=int(vae.config.latent_channels),
        unet_in_channels=int(unet.config.in_channels),
        sample_size=int(unet.config.sample_size),
        cross_attention_dim=int(unet.config.cross_attention_dim),
        max_tokens=int(min(tok.model_max_length, parts["text_encoder"].config.max_position_embeddings)),
        scheduler=scheduler,
        fingerprint=fp,
        source=source,
        architecture=architecture_of(unet, vae, parts["text_encoder"], text_2),
        family="sdxl" if xl else "sd",
        force_zeros_for_empty_prompt=xl and bool((pipeline_config or {}).get("force_zeros_for_empty_prompt", True)),
        guidance_embedding_dim=int(getattr(unet.config, "time_cond_proj_dim", None) or 0),
    )
    if info.unet_in_channels not in (info.latent_channels, 2 * info.latent_channels + 1):
        raise CheckpointError(f"unsupported UNet with {info.unet_in_channels} input channels")
    return Checkpoint(info, tok, parts["text_encoder"], unet, vae, parts.get("tokenizer_2"), text_2)


FINITE_TABLE = "finite-weights.json"  # in the cache folder: digests of weight files found finite


def _finite_digests() -> set[str]:
    try:
        table = json.loads((cache_dir() / FINITE_TABLE).read_text())
    except (OSError, ValueError):
        return set()
    return set(table.get("blake2b", ())) if isinstance(table, dict) and table.get("format") == 1 else set()


def _record_finite(digests: list[str]) -> None:
    """Remember these files' digests as finite (atomically; a read-only cache costs speed only)."""
    try:
        path = cache_dir() / FINITE_TABLE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": 1, "blake2b": sorted(_finite_digests() | set(digests))}))
        os.replace(tmp, path)
    except OSError:
        pass


def check_finite(model, source: str, files: list[Path] = ()) -> None:
    """Refuse weights holding NaN or infinity (a corrupt or badly merged file): every later
    call would fail with a NumericalError blaming its settings. One sum per tensor (fast; a
    finite sum proves finite values), the exact check only where a sum is not finite.
    `files`: the weight files the model was loaded from, and only from. Files whose content
    was found finite before (by digest, itself cached by the file's identity: fastsd/hashing.py)
    are not checked again, so their memory-mapped weights are not read at load: a network that
    engines serve keeps its PyTorch weights on disk, out of the process's memory."""
    import torch

    digests = []
    if files:
        cache = DigestCache("blake2b")
        digests = [cache.digest(Path(f)) for f in files]
        cache.save()
        if set(digests) <= _finite_digests():
            return
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and t.numel() and not torch.isfinite(t.sum(dtype=torch.float32)):
                if not torch.isfinite(t).all():
                    raise CheckpointError(f"{source}: weight {name} holds NaN or infinite values (a corrupt or "
                                          "badly merged file)")
    if digests:
        _record_finite(digests)
