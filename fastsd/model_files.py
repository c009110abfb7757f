"""What every checkpoint loader shares: the loaded types (`Checkpoint`, `ModelInfo`),
safetensors header checks, the content fingerprint, the tokenizer, and assembling a
`Checkpoint` from loaded parts. checkpoint.py (folders, hub ids) and single_file.py
(original-layout files) both build on this module; neither imports the other's caller."""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .components import Config, Deferred, config_of
from .errors import CheckpointError
from .hashing import DigestCache
from .paths import cache_dir
from .status import LONG_BYTES, file_bytes, gigabytes, say

log = logging.getLogger(__name__)

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


NETWORK_PARTS = ("text_encoder", "text_encoder_2", "unet", "vae")  # a checkpoint's modules


def _network(name: str) -> property:
    def get(self):
        return self.module(name)

    def put(self, value) -> None:
        self._put(name, value)

    return property(get, put, doc=f"The {name} module (built now where it was deferred; see components.py).")


class Checkpoint:
    """A loaded checkpoint: its ModelInfo, tokenizers, and per network its config (`configs`,
    plain values with diffusers' defaults filled in) and PyTorch module (`unet`: diffusers'
    UNet2DConditionModel, `vae`: AutoencoderKL, `text_encoder`: CLIPTextModel, SD-XL's
    `text_encoder_2`: CLIPTextModelWithProjection). A network given as a `Deferred` is built the
    first time its module is read; `configs`, `built` and `token_table` never build one."""

    def __init__(self, info: ModelInfo, tokenizer, text_encoder, unet, vae, tokenizer_2=None, text_encoder_2=None):
        self.info, self.tokenizer, self.tokenizer_2 = info, tokenizer, tokenizer_2
        self.configs: dict[str, Config] = {}
        self._parts: dict[str, Any] = {}
        self._tables: dict[str, Any] = {}  # token tables read from files (deferred text encoders)
        self._lock = threading.RLock()
        for name, value in zip(NETWORK_PARTS, (text_encoder, text_encoder_2, unet, vae), strict=True):
            self._put(name, value)

    text_encoder = _network("text_encoder")
    text_encoder_2 = _network("text_encoder_2")
    unet = _network("unet")
    vae = _network("vae")

    def _put(self, name: str, value) -> None:
        """Set a network's module (or Deferred); None drops the module and keeps its config."""
        with self._lock:
            self._parts[name] = value
            self._tables.pop(name, None)
            if value is not None:
                self.configs[name] = value.config if isinstance(value, Deferred) else config_of(value)

    def module(self, name: str):
        """The network's module, built now if it was deferred (None: the checkpoint has none)."""
        with self._lock:
            part = self._parts.get(name)
            if isinstance(part, Deferred):
                from .phases import CHECKPOINT, phase

                log.info("building the %s's PyTorch module", name)
                with phase(CHECKPOINT):  # reading the checkpoint, whenever it happens
                    part = part.build().eval().requires_grad_(False)
                self._parts[name] = part
            return part

    def built(self, name: str):
        """The network's module if it is built, else None (nothing is built)."""
        part = self._parts.get(name)
        return None if isinstance(part, Deferred) else part

    def as_loaded(self, name: str):
        """The network's module if built, else a function building a fresh one from its files:
        what keeps the weights as loaded where the live module may be cast later."""
        part = self._parts.get(name)
        return part.build if isinstance(part, Deferred) else part

    def token_table(self, name: str):
        """A text encoder's token embedding (nn.Embedding): the module's where it is built, else
        read from its weights file without building it."""
        with self._lock:
            part = self._parts.get(name)
            if not isinstance(part, Deferred):
                return getattr(part, "text_model", part).embeddings.token_embedding
            if name not in self._tables and part.token_table is not None:
                self._tables[name] = part.token_table()
            if self._tables.get(name) is None:  # not readable from the files: the module's
                return self.module(name).text_model.embeddings.token_embedding
            return self._tables[name]

    def replaced(self, **changes) -> Checkpoint:
        """A copy with some of info, tokenizers and networks replaced (the others shared)."""
        values = {"info": self.info, "tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2,
                  **{n: self._parts.get(n) for n in NETWORK_PARTS}, **changes}
        return Checkpoint(**values)


SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _read_header(f, size: int) -> tuple[dict, int]:
    """(header, offset of the data) of an open .safetensors file of `size` bytes (ValueError,
    struct.error or UnicodeDecodeError where its header is unreadable)."""
    (n,) = struct.unpack("<Q", f.read(8))
    if n <= 0 or 8 + n > size:
        raise ValueError("header length past end of file")
    return json.loads(f.read(n)), 8 + n


def check_safetensors(path: Path) -> dict:
    """Parse a .safetensors header and check it describes the file exactly (every tensor's
    dtype, shape and byte range, nothing past the end); returns the header."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header, start = _read_header(f, size)
        end = _check_header(header, size - start)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None
    if start + end != size:
        raise CheckpointError(f"truncated or corrupt safetensors file {path}: "
                              f"{size} bytes, header says {start + end}")
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


# a CLIP text encoder's token table in its file: as trained checkpoints name it, as transformers >= 5 saves it
TOKEN_TABLES = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")


def read_token_table(files: list[Path]):
    """A CLIP text encoder's token table (nn.Embedding, float32) from its .safetensors files
    (checked at load: check_safetensors), memory-mapped copy-on-write: the rows a prompt uses
    are read, nothing else, and the encoder is not built. None where no file names it as
    expected (the encoder is then built for it)."""
    import torch
    from torch import nn

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for path in files:
        with open(path, "rb") as f:
            header, start = _read_header(f, path.stat().st_size)
            entry = next((header[k] for k in TOKEN_TABLES if k in header), None)
            if entry is None or entry["dtype"] not in dtypes:
                continue
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (begin, end), dtype = entry["data_offsets"], dtypes[entry["dtype"]]
        table = torch.frombuffer(buffer, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        return nn.Embedding.from_pretrained(table.view(*entry["shape"]).float(), freeze=True)
    return None


def fingerprint(files: list[Path], root: Path, timed: bool = True, digests: dict | None = None) -> str:
    """Content hash over files (names relative to root). Per-file digests are cached by the
    file's identity (fastsd/hashing.py), so only the first load of a checkpoint reads every byte.
    `timed`: counted in the process's fingerprint phase (fastsd/phases.py; not on other threads);
    `digests`: filled with each file's digest."""
    from .phases import FINGERPRINT, phase

    cache = DigestCache("blake2b")
    if not timed:
        return _fingerprint(files, root, digests, cache)
    unread = file_bytes(f for f in files if cache.recorded(f) is None)
    if unread >= LONG_BYTES:
        say("reading %s of %s seen for the first time (its fingerprint; once)", gigabytes(unread), root)
    with phase(FINGERPRINT):
        return _fingerprint(files, root, digests, cache)


def _fingerprint(files: list[Path], root: Path, digests: dict | None, cache: DigestCache) -> str:
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(files):
        rel = f.name if f == root else str(f.relative_to(root))
        digest = cache.digest(f)
        if digests is not None:
            digests[f] = digest
        h.update(f"{rel}={digest};".encode())
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


def architecture_of(configs: dict) -> str:
    """The architecture hash of a checkpoint's networks from their configs (`Checkpoint.configs`;
    SD-XL: the second encoder too)."""
    text = [configs[t] for t in ("text_encoder", "text_encoder_2") if t in configs]
    return architecture_hash(configs["unet"], configs["vae"], *text)


def make_checkpoint(parts: dict, scheduler: dict, fp: str, source: str,
                    pipeline_config: dict | None = None) -> Checkpoint:
    """A Checkpoint from loaded parts (tokenizer, text_encoder, unet, vae; SD-XL also
    tokenizer_2 and text_encoder_2), each network a module or a `Deferred`. `pipeline_config`
    is model_index.json's settings (force_zeros_for_empty_prompt; diffusers' default True for
    SD-XL where absent)."""
    for name in NETWORK_PARTS:
        if parts.get(name) is not None and not isinstance(parts[name], Deferred):
            parts[name].eval().requires_grad_(False)
    ckpt = Checkpoint(None, parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"],
                      parts.get("tokenizer_2"), parts.get("text_encoder_2"))
    cfg = ckpt.configs
    unet, vae, text, text_2 = cfg["unet"], cfg["vae"], cfg["text_encoder"], cfg.get("text_encoder_2")
    xl = unet.get("addition_embed_type") == "text_time"
    if xl != (text_2 is not None):
        raise CheckpointError("an SD-XL UNet (text_time added embedding) needs text_encoder_2 and tokenizer_2, "
                              "and only it takes them" if xl else
                              "text_encoder_2 is given but the UNet is not an SD-XL one (no text_time embedding)")
    if xl:
        want = unet["addition_time_embed_dim"] * 6 + text_2["projection_dim"]
        if unet["projection_class_embeddings_input_dim"] != want:
            raise CheckpointError(f"the UNet's added embedding takes "
                                  f"{unet['projection_class_embeddings_input_dim']} features, but 6 time ids "
                                  f"and text_encoder_2's pooled output make {want}")
        width = text["hidden_size"] + text_2["hidden_size"]
        if width != unet["cross_attention_dim"]:
            raise CheckpointError(f"the two text encoders give {width} features; the UNet takes "
                                  f"{unet['cross_attention_dim']}")
    ckpt.info = ModelInfo(
        vae_scale=float(vae["scaling_factor"]),
        vae_shift=float(vae.get("shift_factor") or 0.0),
        vae_factor=2 ** (len(vae["block_out_channels"]) - 1),
        latent_channels=int(vae["latent_channels"]),
        unet_in_channels=int(unet["in_channels"]),
        sample_size=int(unet["sample_size"]),
        cross_attention_dim=int(unet["cross_attention_dim"]),
        max_tokens=int(min(parts["tokenizer"].model_max_length, text["max_position_embeddings"])),
        scheduler=scheduler,
        fingerprint=fp,
        source=source,
        architecture=architecture_of(cfg),
        family="sdxl" if xl else "sd",
        force_zeros_for_empty_prompt=xl and bool((pipeline_config or {}).get("force_zeros_for_empty_prompt", True)),
        guidance_embedding_dim=int(unet.get("time_cond_proj_dim") or 0),
    )
    if ckpt.info.unet_in_channels not in (ckpt.info.latent_channels, 2 * ckpt.info.latent_channels + 1):
        raise CheckpointError(f"unsupported UNet with {ckpt.info.unet_in_channels} input channels")
    return ckpt


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
