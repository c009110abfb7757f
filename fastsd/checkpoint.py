"""Find, validate, fingerprint and load a checkpoint into its four networks.

Accepts a diffusers folder (model_index.json), a single SD 1.x/2.x `.safetensors`
file (original layout, see `single_file.py`), a hub id resolved through the local hub
cache, or `synthetic:NAME`. Everything the runtime needs to know about the model is read
from the checkpoint's own configs into a frozen `ModelInfo`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InvalidArgumentError, ModelNotFoundError, PickleRefusedError
from .hashing import DigestCache
from .synthetic import SYNTHETIC_PREFIX, synthetic_path

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
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


# ---- resolving ----------------------------------------------------------------------


def resolve(model: str) -> Path:
    """Local path of `model` (a folder or a single file); hub ids come from the hub cache."""
    model = str(model)
    if model.startswith(SYNTHETIC_PREFIX):
        return synthetic_path(model)
    path = Path(model).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(model) and not model.endswith(WEIGHT_SUFFIXES):
        return _hub_snapshot(model)
    raise ModelNotFoundError(f"model not found: {model} (no such file or directory)")


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
    cache = os.environ.get("HF_HUB_CACHE")  # read now, not at huggingface_hub's import
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, cache_dir=cache))
    except Exception:  # noqa: BLE001 - any miss here means "not in the cache"
        pass
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise ModelNotFoundError(f"{repo_id} is not in the hub cache and HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line for the user
        raise ModelNotFoundError(
            f"{repo_id} is not in the hub cache and could not be downloaded "
            f"(offline, or no such repo: {type(e).__name__})"
        ) from None


# ---- validation and fingerprint -----------------------------------------------------


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


def fingerprint(files: list[Path], root: Path) -> str:
    """Content hash over files (names relative to root). Per-file digests are cached by
    (path, inode, size, mtime, ctime), so only the first load of a checkpoint reads every byte."""
    cache = DigestCache("blake2b")
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(files):
        rel = f.name if f == root else str(f.relative_to(root))
        h.update(f"{rel}={cache.digest(f)};".encode())
    cache.save()
    return h.hexdigest()


def _folder_files(root: Path, allow_pickle: bool) -> list[Path]:
    """The files of a diffusers folder that define the model, validated."""
    if not (root / "model_index.json").is_file():
        raise CheckpointError(f"{root} is not a diffusers checkpoint folder (no model_index.json)")
    _check_json(root / "model_index.json")
    files = [root / "model_index.json"]
    for comp in COMPONENTS:
        d = root / comp
        if not d.is_dir():
            raise CheckpointError(f"{root} is missing the {comp}/ folder")
        comp_files = sorted(p for p in d.iterdir() if p.is_file())
        for cfg in (p for p in comp_files if p.suffix == ".json"):
            _check_json(cfg)
        weights = [p for p in comp_files if p.suffix == ".safetensors"]
        pickles = [p for p in comp_files if p.suffix in PICKLE_SUFFIXES]
        if comp in ("unet", "vae", "text_encoder"):
            if not weights and not pickles:
                raise CheckpointError(f"{d} holds no weights")
            if not weights and not allow_pickle:
                raise PickleRefusedError(f"{d} has only pickle weights ({pickles[0].name}); "
                                         "pass allow_pickle=True (--allow-pickle) if you trust it")
        for w in weights:
            check_safetensors(w)
        files += [p for p in comp_files if p.suffix in (".json", ".txt") or p in weights or
                  (not weights and p in pickles)]
    return files


def _check_json(path: Path) -> None:
    """A config file that parses as a JSON object (libraries report a broken one as a
    failed download, which misleads)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"invalid config file {path}: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"invalid config file {path}: not a JSON object")


# ---- loading ------------------------------------------------------------------------


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


def load_checkpoint(model: str, *, allow_pickle: bool = False) -> Checkpoint:
    """Load `model` in fp32 on the CPU; the backend moves and casts what it runs."""
    path = resolve(model)
    if path.is_file():
        from .single_file import load_single_file

        return load_single_file(path, source=str(model), allow_pickle=allow_pickle)
    files = _folder_files(path, allow_pickle)
    parts = _load_folder(path, allow_pickle)
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return make_checkpoint(parts, sched, fingerprint(files, path), str(model))


def _load_folder(root: Path, allow_pickle: bool) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kw = {"local_files_only": True}
    safe = None if allow_pickle else True
    tokenizer = load_tokenizer(root / "tokenizer")
    parts = {"tokenizer": tokenizer}
    for name, cls in (("text_encoder", CLIPTextModel), ("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        try:
            model, loading = cls.from_pretrained(str(root), subfolder=name, use_safetensors=safe,
                                                 output_loading_info=True, **kw)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load checkpoint {root}: {first}") from None
        missing = sorted(k for k in loading.get("missing_keys", ()) if not k.endswith("position_ids"))
        if missing:  # the libraries would fill these with random values and only log it
            raise CheckpointError(f"{root / name} is incomplete: {len(missing)} weight(s) missing, "
                                  f"e.g. {missing[0]}")
        parts[name] = model
    return parts


def architecture_hash(*configs) -> str:
    """Hash of the configs that fix every weight's name and shape (not the weights)."""
    clean = [{k: v for k, v in dict(c).items() if not k.startswith("_") and k not in IGNORED_CONFIG_KEYS}
             for c in configs]
    return hashlib.blake2b(json.dumps(clean, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def check_clip_skip(ckpt: Checkpoint, clip_skip) -> None:
    layers = ckpt.text_encoder.config.num_hidden_layers
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise InvalidArgumentError(f"clip_skip must be an integer in [0, {layers - 1}], got {clip_skip!r}")


def make_checkpoint(parts: dict, scheduler: dict, fp: str, source: str) -> Checkpoint:
    unet, vae, tok = parts["unet"], parts["vae"], parts["tokenizer"]
    for m in (parts["text_encoder"], unet, vae):
        m.eval().requires_grad_(False)
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
        architecture=architecture_hash(unet.config, vae.config, parts["text_encoder"].config.to_dict()),
    )
    if info.unet_in_channels not in (info.latent_channels, 2 * info.latent_channels + 1):
        raise CheckpointError(f"unsupported UNet with {info.unet_in_channels} input channels")
    return Checkpoint(info, tok, parts["text_encoder"], unet, vae)
