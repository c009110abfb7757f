"""A checkpoint's networks built on first use.

A network whose files this machine has loaded before (the same bytes by digest, the same
model class, the same library version) is not built when its checkpoint loads: it is a
`Deferred`, which holds its config as the library resolved it then (its defaults filled
in), remembered in <cache>/loaded-components.json, and builds the PyTorch module the first
time something reads it (`Checkpoint.unet`, ...). Everything fastsd needs to know to load a
pipeline (ModelInfo, the specs, the architecture hash, the text encoders' token tables)
comes from configs and file headers, so a pipeline whose engines serve every network never
imports diffusers' or transformers' model classes nor maps their weights.

A record is written only after the network was built from those files and checked (no
missing weight, every weight finite), so a deferred network is one whose files are known
to load; a build checks that its files are still the ones the checkpoint's fingerprint
covers (fastsd/hashing.py: a changed file has a new identity and is hashed again) and
refuses with CheckpointError where one changed since the load. The records are a cache in
the user's own folder, trusted as the digest cache beside them is (docs/engine-store.md);
a missing, unreadable or foreign table costs a build at load, never a wrong config.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from importlib import import_module, metadata
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError
from .files import atomic_write
from .hashing import DigestCache
from .paths import cache_dir

LOADED_TABLE = "loaded-components.json"
TABLE_FORMAT = 1
MOST_RECORDS = 256  # the oldest records are dropped past this many (each a config of a few KB)
CLASSES = {"text_encoder": ("transformers", "CLIPTextModel"),
           "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
           "unet": ("diffusers", "UNet2DConditionModel"),
           "vae": ("diffusers", "AutoencoderKL")}
_TEXT_KEYS = ("hidden_size", "num_hidden_layers", "max_position_embeddings", "projection_dim", "eos_token_id")
READ_KEYS = {  # what fastsd reads from a network's config before building it: a record must hold them all
    "unet": ("sample_size", "in_channels", "cross_attention_dim", "block_out_channels", "layers_per_block",
             "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
             "time_cond_proj_dim"),
    "vae": ("scaling_factor", "shift_factor", "block_out_channels", "latent_channels", "sample_size", "force_upcast"),
    "text_encoder": _TEXT_KEYS, "text_encoder_2": _TEXT_KEYS}


class Config(dict):
    """A network's config as plain JSON values, its keys readable as attributes too (as
    diffusers' configs are): `config["sample_size"]`, `config.sample_size`, `config.get(...)`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def config_of(module) -> Config:
    """The config a built diffusers or transformers module holds (defaults filled in), in the
    form a record keeps it: what the runtime reads either way is the same."""
    config = module.config
    raw = dict(config) if isinstance(config, dict) else config.to_dict()
    return Config(json.loads(json.dumps(raw, default=str)))


def model_class(network: str):
    """The diffusers / transformers class of a checkpoint folder's network (imported now)."""
    library, name = CLASSES[network]
    return getattr(import_module(library), name)


_quiet_bars = False  # set by the CLI: no library bars over loading a model


def quiet_loading_bars() -> None:
    """diffusers' and transformers' progress bars off for the models fastsd loads from now on
    (the CLI, which says what it does itself), without importing either library now: each is
    quieted once imported, when fastsd loads a model with it (`loading_bars`)."""
    global _quiet_bars
    _quiet_bars = True
    loading_bars()


def loading_bars() -> None:
    """Apply `quiet_loading_bars` to the libraries imported so far (called before each load)."""
    if _quiet_bars:
        for name in ("diffusers.utils.logging", "transformers.utils.logging"):
            if name in sys.modules:
                sys.modules[name].disable_progress_bar()


@dataclass
class Deferred:
    """A network not built yet: its config, how to build it, and (a text encoder) how to read
    its token table without building it."""

    config: Config
    build: Callable[[], Any]
    token_table: Callable[[], Any] | None = None


# ---- the record of networks loaded before ------------------------------------------------


def loaded_key(network: str, variant: str | None, digests: dict[str, str]) -> str:
    """The record's key for a network's files (name -> digest: its config.json and weights),
    its class and the installed version of the library that builds it."""
    library, name = CLASSES[network]
    try:
        version = metadata.version(library)
    except metadata.PackageNotFoundError:
        version = "?"
    text = json.dumps([library, version, name, variant, sorted(digests.items())])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _table() -> dict:
    try:
        table = json.loads((cache_dir() / LOADED_TABLE).read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(table, dict) and table.get("format") == TABLE_FORMAT and isinstance(table.get("records"), dict)
    return table["records"] if ok else {}


def recorded_configs() -> dict[str, Config]:
    """The configs recorded (key -> config) of the files built on this machine before."""
    return {k: Config(v) for k, v in _table().items() if isinstance(v, dict)}


def record_loaded(records: dict[str, Config]) -> None:
    """Remember networks just built (key -> config), atomically; a read-only cache costs speed only."""
    if not records:
        return
    try:
        table = {k: v for k, v in _table().items() if k not in records} | records
        table = dict(list(table.items())[-MOST_RECORDS:])
        path = cache_dir() / LOADED_TABLE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"format": TABLE_FORMAT, "records": table}).encode())
    except OSError:
        pass


def check_unchanged(digests: dict[Path, str], what: str) -> None:
    """Each file still holds the bytes its digest was taken of at load (cheap where unchanged:
    the digest cache knows the file's identity), else CheckpointError."""
    cache = DigestCache("blake2b")
    try:
        for path, digest in digests.items():
            if cache.digest(path) != digest:
                raise CheckpointError(f"{path} changed since the checkpoint was loaded; load it again to use "
                                      f"the {what}")
    except OSError as e:
        raise CheckpointError(f"cannot read {e.filename or what} since the checkpoint was loaded: {e.strerror}") \
            from None
    finally:
        cache.save()
