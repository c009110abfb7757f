"""Find, validate, fingerprint and load a checkpoint into its networks (SD-XL: two text encoders).

Accepts a diffusers folder (model_index.json), a single SD 1.x/2.x/SD-XL `.safetensors`
file (original layout, see `single_file.py`), a hub id resolved through the local hub
cache, or `synthetic:NAME`. Everything the runtime needs to know about the model is read
from the checkpoint's own configs into a frozen `ModelInfo`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import replace
from functools import partial
from pathlib import Path

from .components import (
    READ_KEYS,
    Deferred,
    check_unchanged,
    config_of,
    loaded_key,
    loading_bars,
    model_class,
    record_loaded,
    recorded_configs,
)
from .errors import CheckpointError, FastSDError, InvalidArgumentError, ModelNotFoundError, PickleRefusedError
from .hashing import DigestCache, prefetch
from .model_files import (
    PICKLE_SUFFIXES,
    Checkpoint,
    check_finite,
    check_safetensors,
    fingerprint,
    load_tokenizer,
    make_checkpoint,
    read_token_table,
)
from .synthetic import SYNTHETIC_PREFIX, synthetic_path

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")


# ---- resolving ----------------------------------------------------------------------


def model_source(model: str) -> str:
    """What `model` names: "synthetic", "path" (an existing file or folder) or "hub" (an id);
    ModelNotFoundError if none. Nothing is built, read or downloaded."""
    model = str(model)
    if model.startswith(SYNTHETIC_PREFIX):
        return "synthetic"
    if Path(model).expanduser().exists():
        return "path"
    if HUB_ID.match(model) and not model.endswith(WEIGHT_SUFFIXES):
        return "hub"
    raise ModelNotFoundError(f"model not found: {model} (no such file or directory)")


CHECKPOINT_FILES = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]  # variants included
COMPONENT_FILES = ["config.json", "*.safetensors", "vae/config.json", "vae/*.safetensors"]  # a VAE repo, or a vae/


def resolve(model: str, local_files_only: bool = False, patterns: list[str] = CHECKPOINT_FILES) -> Path:
    """Local path of `model` (a folder or a single file); hub ids come from the hub cache
    (downloaded where missing, unless offline or `local_files_only`)."""
    model = str(model)
    source = model_source(model)
    if source == "synthetic":
        return synthetic_path(model)
    if source == "path":
        return Path(model).expanduser()
    return _hub_snapshot(model, local_files_only, patterns)


def _hub_snapshot(repo_id: str, local_files_only: bool = False, patterns: list[str] = CHECKPOINT_FILES) -> Path:
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE")  # read now, not at huggingface_hub's import
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, cache_dir=cache))
    except Exception:  # noqa: BLE001 - any miss here means "not in the cache"
        pass
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") or local_files_only:
        why = "local_files_only is set" if local_files_only else "HF_HUB_OFFLINE is set"
        raise ModelNotFoundError(f"{repo_id} is not in the hub cache and {why}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line for the user
        raise ModelNotFoundError(
            f"{repo_id} is not in the hub cache and could not be downloaded "
            f"(offline, or no such repo: {type(e).__name__})"
        ) from None


def peek_vae_factor(model: str) -> int | None:
    """The VAE factor (image pixels per latent pixel) from configs alone, where that is
    cheap: synthetic names, diffusers folders, hub ids already cached; 8 for single files
    (every SD 1.x/2.x layout). None where it cannot be known without loading."""
    model = str(model)
    if model.startswith(SYNTHETIC_PREFIX):
        from .archs import ARCHS, arch

        name = model[len(SYNTHETIC_PREFIX):]
        config = arch(name).get("vae", {}) if name in ARCHS else {}
    else:
        path = Path(model).expanduser()
        if path.is_file():
            return 8
        if not path.is_dir():
            if not HUB_ID.match(model):
                return None
            try:
                path = _hub_snapshot(model, local_files_only=True)
            except FastSDError:
                return None
        try:
            config = json.loads((path / "vae" / "config.json").read_text())
        except (OSError, ValueError):
            return None
    channels = config.get("block_out_channels") if isinstance(config, dict) else None
    return 2 ** (len(channels) - 1) if isinstance(channels, list) and channels else None


# ---- validation and fingerprint -----------------------------------------------------


_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def _variant_of(path: Path) -> str | None:
    """'fp16' for model.fp16.safetensors (and its shards), None for model.safetensors."""
    parts = path.name.split(".")
    return _SHARD.sub("", parts[-2]) if len(parts) >= 3 else None


def _weights_of(d: Path, files: list[Path], variant: str | None) -> tuple[list[Path], str | None]:
    """The weight files of one component folder for `variant`, and the variant they are.
    Without a variant: the plain files, or, where the folder holds only one variant (an
    fp16-only download), that one."""
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES]
    by_variant: dict[str | None, list[Path]] = {}
    for p in weights:
        by_variant.setdefault(_variant_of(p), []).append(p)
    if variant is not None:
        if variant not in by_variant:
            have = ", ".join(sorted(str(v) for v in by_variant if v)) or "none"
            raise CheckpointError(f"{d} has no {variant!r} variant weights (variants there: {have})")
        return by_variant[variant], variant
    if None in by_variant or not by_variant:
        return by_variant.get(None, []), None
    if len(by_variant) == 1:
        only = next(iter(by_variant))
        log.info("%s holds only %r variant weights; loading those", d, only)
        return by_variant[only], only
    raise CheckpointError(f"{d} holds only variant weights ({', '.join(sorted(by_variant))}); pass variant= "
                          "(--variant) to choose one")


def _folder_files(root: Path, allow_pickle: bool, variant: str | None = None) -> tuple[list[Path], dict]:
    """The files of a diffusers folder that define the model, validated, and the variant
    each weighted component loads (None: the plain files)."""
    if not (root / "model_index.json").is_file():
        raise CheckpointError(f"{root} is not a diffusers checkpoint folder (no model_index.json)")
    index = _check_json(root / "model_index.json")
    files = [root / "model_index.json"]
    variants = {}
    if index.get("text_encoder_2") and not (index.get("text_encoder") or [None])[0]:
        raise CheckpointError(f"{root} is an SD-XL refiner (no first text encoder); fastsd runs SD-XL base "
                              "checkpoints")
    for comp in XL_COMPONENTS if index.get("text_encoder_2") else COMPONENTS:
        d = root / comp
        if not d.is_dir():
            raise CheckpointError(f"{root} is missing the {comp}/ folder")
        comp_files = sorted(p for p in d.iterdir() if p.is_file())
        for cfg in (p for p in comp_files if p.suffix == ".json"):
            config = _check_json(cfg)
            if cfg.name in ("config.json", "scheduler_config.json"):
                check_config(cfg, config, comp)
        chosen: list[Path] = []
        if comp in WEIGHTED:
            chosen, variants[comp] = component_weights(d, comp_files, variant, allow_pickle)
        files += [p for p in comp_files if p.suffix in (".json", ".txt")] + chosen
    return files, variants


def component_weights(d: Path, files: list[Path], variant: str | None,
                       allow_pickle: bool) -> tuple[list[Path], str | None]:
    """The weight files one component folder loads (safetensors checked against their
    headers; pickle files only with `allow_pickle`), and their variant."""
    chosen, variant = _weights_of(d, files, variant)
    if not chosen:
        raise CheckpointError(f"{d} holds no weights")
    weights = [p for p in chosen if p.suffix == ".safetensors"]
    if not weights and not allow_pickle:
        raise PickleRefusedError(f"{d} has only pickle weights ({chosen[0].name}); "
                                 "pass allow_pickle=True (--allow-pickle) if you trust it")
    for w in weights:
        check_safetensors(w)
    return weights or chosen, variant


# ---- config values fastsd reads: type and range, checked before any library sees them ----------

def _int(lo: int = 1):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo,
            f"an integer >= {lo}")


def _ints(lo: int = 1):
    test, _ = _int(lo)
    return (lambda v: isinstance(v, list) and len(v) > 0 and all(test(x) for x in v),
            f"a non-empty list of integers >= {lo}")


def _int_or_ints(lo: int = 1):
    one, many = _int(lo)[0], _ints(lo)[0]
    return (lambda v: one(v) or many(v), f"an integer >= {lo} or a list of them")


_NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number")
_POSITIVE = (lambda v: _NUMBER[0](v) and v > 0, "a finite number > 0")
_TEXT = (lambda v: isinstance(v, str), "a string")
_TEXTS = (lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v),
          "a non-empty list of strings")
_NUMBERS = (lambda v: isinstance(v, list) and len(v) > 0 and all(_NUMBER[0](x) for x in v),
            "a non-empty list of finite numbers")
# component -> key -> (test, what it must be); a key listed in REQUIRED must be present
_UNET = {"sample_size": _int(), "in_channels": _int(), "out_channels": _int(), "cross_attention_dim": _int(),
         "block_out_channels": _ints(), "layers_per_block": _int_or_ints(), "attention_head_dim": _int_or_ints(),
         "num_attention_heads": _int_or_ints(), "transformer_layers_per_block": _int_or_ints(),
         "norm_num_groups": _int(), "down_block_types": _TEXTS, "up_block_types": _TEXTS,
         "addition_time_embed_dim": _int(), "projection_class_embeddings_input_dim": _int()}
CONFIG_SCHEMA = {
    "unet": _UNET,
    "controlnet": {**{k: v for k, v in _UNET.items() if k not in ("sample_size", "out_channels", "up_block_types")},
                   "conditioning_channels": _int()},
    "vae": {"in_channels": _int(), "out_channels": _int(), "latent_channels": _int(), "block_out_channels": _ints(),
            "layers_per_block": _int(), "norm_num_groups": _int(), "scaling_factor": _POSITIVE,
            "shift_factor": _NUMBER, "sample_size": _int()},
    "text_encoder": {"hidden_size": _int(), "num_hidden_layers": _int(), "max_position_embeddings": _int(),
                     "projection_dim": _int(), "intermediate_size": _int(), "num_attention_heads": _int(),
                     "vocab_size": _int()},
    "scheduler": {"num_train_timesteps": _int(), "beta_start": _POSITIVE, "beta_end": _POSITIVE,
                  "beta_schedule": _TEXT, "prediction_type": _TEXT, "timestep_spacing": _TEXT,
                  "steps_offset": _int(0), "trained_betas": _NUMBERS, "original_inference_steps": _int(),
                  "timestep_scaling": _NUMBER, "clip_sample_range": _POSITIVE},
}
CONFIG_SCHEMA["text_encoder_2"] = CONFIG_SCHEMA["text_encoder"]
REQUIRED = {"unet": ("sample_size", "in_channels", "block_out_channels", "cross_attention_dim"),
            "controlnet": ("block_out_channels", "cross_attention_dim"),
            "vae": ("latent_channels", "block_out_channels"),
            "text_encoder": ("hidden_size", "num_hidden_layers"),
            "text_encoder_2": ("hidden_size", "num_hidden_layers")}


def check_config(path: Path, config: dict, component: str) -> None:
    """The values fastsd (and the model classes it builds) read from a component's config,
    checked for type and range, the file named: a CheckpointError, never a TypeError deep
    in a library. Null means "the library's default" except for required keys."""
    if component == "vae" and config.get("_class_name") == TINY_VAE:
        return  # AutoencoderTiny: its own keys
    schema = CONFIG_SCHEMA.get(component, {})
    for key in REQUIRED.get(component, ()):
        if config.get(key) is None:
            raise CheckpointError(f"{path}: '{key}' is missing; a {component} config needs it")
    for key, (test, what) in schema.items():
        value = config.get(key)
        if value is not None and not test(value):
            raise CheckpointError(f"{path}: '{key}' must be {what}, got {value!r}")


def _check_json(path: Path) -> dict:
    """A config file that parses as a JSON object (libraries report a broken one as a
    failed download, which misleads); returns it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"invalid config file {path}: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"invalid config file {path}: not a JSON object")
    return value


# ---- loading ------------------------------------------------------------------------


def load_checkpoint(model: str, *, allow_pickle: bool = False, variant: str | None = None,
                    local_files_only: bool = False, vae=None) -> Checkpoint:
    """Load `model` in fp32 on the CPU; the backend moves and casts what it runs. `variant`
    picks a diffusers folder's variant weights (model.fp16.safetensors for "fp16"); `vae`
    (a folder, a .safetensors file or an AutoencoderKL) replaces the checkpoint's VAE."""
    from .phases import CHECKPOINT, phase

    with phase(CHECKPOINT):
        ckpt = _load_checkpoint(model, allow_pickle, variant, local_files_only)
        return ckpt if vae is None else with_vae(ckpt, vae)


_LOADED_FIRST = ("text_encoder", "text_encoder_2", "unet", "vae")  # _load_folder's order: each waits for its files


def _load_order(files: list[Path]) -> list[Path]:
    """A folder's files in the order the load checks them (small files first, then each
    component's weights as `_load_folder` builds it)."""
    def rank(f: Path) -> int:
        return _LOADED_FIRST.index(f.parent.name) + 1 if f.parent.name in _LOADED_FIRST and \
            f.suffix in WEIGHT_SUFFIXES else 0
    return sorted(files, key=rank)


def _local_path(model: str, hub: bool) -> Path | None:
    """Where `model` is on this machine without building (a synthetic model) or downloading
    anything; a hub id only with `hub` (from the hub cache). None where it is not."""
    source = model_source(model)
    if source == "hub":
        return _hub_snapshot(model, local_files_only=True) if hub else None
    return Path(model).expanduser() if source == "path" else synthetic_path(model, build_missing=False)


def prefetch_checkpoint(model: str, allow_pickle: bool = False, variant: str | None = None) -> None:
    """Start hashing a local checkpoint's files in the background (`hashing.prefetch`), before
    the libraries that load it are imported: its fingerprint, on first sight seconds of
    reading, overlaps with them. Best effort and silent: anything unusual is left to the load,
    which reports it; hub ids and synthetic models not built yet are not looked up here."""
    try:
        path = _local_path(model, hub=False)
        if path is None or not path.exists():
            return
        files = [path] if path.is_file() else _load_order(_folder_files(path, allow_pickle, variant)[0])
        prefetch(files, "blake2b")
    except Exception:  # noqa: BLE001 - the load itself says what is wrong
        return


def early_fingerprint(model: str, allow_pickle: bool = False, variant: str | None = None) -> str | None:
    """The fingerprint `load_checkpoint` gives a diffusers folder (a synthetic model already
    built, a hub id already in the hub cache), from its files alone, before any module is
    built: what engines are loaded ahead by (backends/preload.py). None where it cannot be
    known so (single files, anything the load itself would refuse)."""
    try:
        path = _local_path(model, hub=True)
        if path is None or not path.is_dir():
            return None
        return fingerprint(_folder_files(path, allow_pickle, variant)[0], path, timed=False)
    except Exception:  # noqa: BLE001 - the load itself says what is wrong
        return None


def _load_checkpoint(model: str, allow_pickle: bool, variant: str | None, local_files_only: bool) -> Checkpoint:
    path = resolve(model, local_files_only)
    if path.is_file():
        if variant is not None:
            raise InvalidArgumentError(f"variant={variant!r} applies to diffusers folders, not the single file {path}")
        from .single_file import load_single_file

        prefetch([path], "blake2b")
        return load_single_file(path, source=str(model), allow_pickle=allow_pickle)
    files, variants = _folder_files(path, allow_pickle, variant)
    prefetch(_load_order(files), "blake2b")  # hashed while the modules are built
    parts, built = _load_folder(path, allow_pickle, variants, files)
    digests: dict[Path, str] = {}
    fp = fingerprint(files, path, digests=digests)
    record_loaded({loaded_key(n, variants.get(n), _named(digests, _files_of(path / n, files))): config_of(parts[n])
                   for n in built})
    sched = _check_json(path / "scheduler" / "scheduler_config.json")
    index = json.loads((path / "model_index.json").read_text())
    return make_checkpoint(parts, sched, fp, str(model), index)


def _files_of(folder: Path, files: list[Path]) -> list[Path]:
    """A network's files among a folder's validated ones: its config and the weights it loads."""
    return [f for f in files if f.parent == folder and (f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES)]


def _named(digests: dict[Path, str], files: list[Path]) -> dict[str, str]:
    return {f.name: digests[f] for f in files}


def _load_folder(root: Path, allow_pickle: bool, variants: dict, files: list[Path] = ()) -> tuple[dict, list[str]]:
    """The folder's components, and the networks among them built now. `files`: its validated
    files (`_folder_files`); a network whose files were built on this machine before (by
    digest, as far as the digest cache already knows them: nothing is read for this) is
    deferred (components.py), the others are built and checked now."""
    parts = {"tokenizer": load_tokenizer(root / "tokenizer")}
    networks = ["text_encoder", "unet", "vae"]
    if "text_encoder_2" in variants:  # SD-XL
        parts["tokenizer_2"] = load_tokenizer(root / "tokenizer_2")
        networks.insert(1, "text_encoder_2")
    known, records, built = DigestCache("blake2b"), recorded_configs(), []
    for name in networks:
        mine = _files_of(root / name, files)
        weights = [f for f in mine if f.suffix in WEIGHT_SUFFIXES]
        parts[name] = _deferred(name, root / name, variants.get(name), allow_pickle, mine, known, records)
        if parts[name] is None:
            parts[name] = load_component(model_class(name), root / name, variants.get(name), allow_pickle, weights)
            built.append(name)
    return parts, built


def _deferred(name: str, folder: Path, variant: str | None, allow_pickle: bool, files: list[Path],
              known: DigestCache, records: dict) -> Deferred | None:
    """The network as a Deferred where its files (config and safetensors weights, digests
    already recorded) were built on this machine before (`records`: components.recorded_configs);
    None where it must be built now."""
    digests = {f: known.recorded(f) for f in files}
    if any(d is None for d in digests.values()) or any(f.suffix in PICKLE_SUFFIXES for f in files):
        return None
    config = records.get(loaded_key(name, variant, {f.name: d for f, d in digests.items()}))
    if config is None or not _recorded_usable(name, config, folder):
        return None
    weights = [f for f in files if f.suffix in WEIGHT_SUFFIXES]

    def build():
        check_unchanged(digests, name)
        return load_component(model_class(name), folder, variant, allow_pickle, weights)

    table = partial(read_token_table, weights) if name.startswith("text_encoder") else None
    return Deferred(config, build, table)


def _recorded_usable(name: str, config: dict, folder: Path) -> bool:
    """Whether a recorded config holds, well typed, every value fastsd reads before a build (a
    hand-edited or damaged record costs a build, never an error or a wrong value)."""
    if any(key not in config for key in READ_KEYS[name]):
        return False
    try:
        check_config(folder / "config.json", config, name)
    except CheckpointError:
        return False
    return True


def load_component(cls, folder: Path, variant: str | None, allow_pickle: bool, weights: list[Path] = ()):
    """One diffusers/transformers component from its folder, refused when weights are missing
    or not finite (`weights`: the files it loads, whose finite check is remembered)."""
    loading_bars()
    try:
        model, loading = cls.from_pretrained(str(folder), use_safetensors=None if allow_pickle else True,
                                             variant=variant, output_loading_info=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {folder}: {first}") from None
    missing = sorted(k for k in loading.get("missing_keys", ()) if not k.endswith("position_ids"))
    if missing:  # the libraries would fill these with random values and only log it
        raise CheckpointError(f"{folder} is incomplete: {len(missing)} weight(s) missing, e.g. {missing[0]}")
    check_finite(model, str(folder), weights)
    return model


TINY_VAE = "AutoencoderTiny"


def state_digest(model) -> str:
    """The fingerprint of a model given as an object: its weights' names and bytes."""
    import torch

    digest = hashlib.blake2b(digest_size=8)
    for k, t in sorted(model.state_dict().items()):
        digest.update(k.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_component(value, what: str, patterns: list[str], local_files_only: bool = False) -> Path:
    """The local path of a component (a VAE, a ControlNet): a folder, a file, or a hub id's
    snapshot in the hub cache; ModelNotFoundError naming `what` where there is none."""
    try:
        return resolve(str(value), local_files_only, patterns=patterns)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{what} {value} not found: {str(e).split(': ', 1)[-1]}") from None


def component_folder(path: Path, sub: str, what: str) -> tuple[Path, dict]:
    """(folder, parsed config.json) of a component folder, or of a pipeline folder's `sub`/."""
    folder = path / sub if (path / sub / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{path} is not a {what} folder (no config.json)")
    config = _check_json(folder / "config.json")
    check_config(folder / "config.json", config, sub)
    return folder, config


def is_tiny_vae(model) -> bool:
    """Whether a VAE is a tiny autoencoder (TAESD: diffusers' AutoencoderTiny)."""
    return type(model).__name__ == TINY_VAE


def load_vae(vae, like=None, allow_pickle: bool = False) -> tuple:
    """(model, fingerprint, source) of a VAE: an AutoencoderKL or AutoencoderTiny object, a
    diffusers VAE folder (config.json + weights, or a checkpoint folder's vae/; its config's
    class says which), a hub id in the hub cache (madebyollin/taesd), `synthetic:taesd`, or a
    .safetensors file of an AutoencoderKL shaped as `like` (a config) in diffusers' or the
    original layout (keys bare or under first_stage_model.)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from .single_file import VAE_PREFIX, gather_weights, vae_key

    if isinstance(vae, (AutoencoderKL, AutoencoderTiny)):
        model = vae.float().eval().requires_grad_(False)
        return model, state_digest(model), f"an {type(vae).__name__} object"
    if not isinstance(vae, (str, Path)):
        raise InvalidArgumentError(f"a VAE must be a folder, file, hub id or an AutoencoderKL / AutoencoderTiny, "
                                   f"not {type(vae).__name__}")
    path = resolve_component(vae, "VAE", COMPONENT_FILES)
    if path.is_dir():
        folder, config = component_folder(path, "vae", "VAE")
        cls = AutoencoderTiny if config.get("_class_name") == TINY_VAE else AutoencoderKL
        weights, variant = component_weights(folder, sorted(p for p in folder.iterdir() if p.is_file()), None,
                                              allow_pickle)
        model = load_component(cls, folder, variant, allow_pickle).float()  # fp16-only too
        fp = fingerprint([folder / "config.json", *weights], folder)
    elif path.is_file():
        if path.suffix != ".safetensors" or like is None:
            raise CheckpointError(f"{path}: a VAE file must be .safetensors (or pass a diffusers VAE folder)")
        from safetensors.torch import load_file

        check_safetensors(path)
        sd = load_file(str(path))
        model = AutoencoderKL(**{k: v for k, v in like.items() if not k.startswith("_")})
        if any(k.startswith(VAE_PREFIX) for k in sd):
            sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
        n = len(model.config.block_out_channels)
        original = any(k.startswith("encoder.down.") for k in sd)
        gather_weights(model, sd, lambda k: (vae_key(k, n) if original else k, None), f"VAE ({path.name})")
        check_finite(model, str(path))
        fp = fingerprint([path], path.parent)
    else:
        raise ModelNotFoundError(f"VAE not found: {path} (no such file or directory)")
    return model.eval().requires_grad_(False), fp, str(vae)


def check_vae_fits(model, info, source: str, what: str = "VAE") -> None:
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    if (model.config.latent_channels, factor) != (info.latent_channels, info.vae_factor):
        raise CheckpointError(f"the {what} {source} has {model.config.latent_channels} latent channels and factor "
                              f"{factor}; the checkpoint's UNet needs {info.latent_channels} and {info.vae_factor}")


def with_vae(ckpt: Checkpoint, vae) -> Checkpoint:
    """`ckpt` with its VAE replaced: an fp16-safe SD-XL VAE, or a tiny autoencoder (TAESD) for
    fast decoding (and encoding, as a diffusers pipeline whose vae is an AutoencoderTiny).
    `vae` is anything `load_vae` takes. Its latent channels and factor must match the UNet's;
    the fingerprint covers both, so engines are kept apart from the original VAE's."""
    from .model_files import architecture_of

    model, vae_fp, source = load_vae(vae, ckpt.configs["vae"])
    check_vae_fits(model, ckpt.info, source)
    info = replace(ckpt.info, vae_scale=float(model.config.scaling_factor),
                   vae_shift=float(getattr(model.config, "shift_factor", None) or 0.0),
                   tiny_vae=is_tiny_vae(model),
                   fingerprint=hashlib.blake2b(f"{ckpt.info.fingerprint}+vae:{vae_fp}".encode(),
                                               digest_size=8).hexdigest(),
                   architecture=architecture_of({**ckpt.configs, "vae": config_of(model)}))
    log.info("VAE replaced by %s", source)
    return ckpt.replaced(info=info, vae=model)


def check_clip_skip(ckpt: Checkpoint, clip_skip) -> None:
    layers = ckpt.configs["text_encoder"]["num_hidden_layers"]
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise InvalidArgumentError(f"must be an integer in [0, {layers - 1}], got {clip_skip!r}", "clip_skip")


