"""ControlNets: loading them (diffusers folders, single files, the hub cache, objects,
`synthetic:controlnet-<arch>`) and checking that one fits the loaded checkpoint.

A ControlNet is its own network with its own weights: its engines live in the store under
its own fingerprint (entry network "controlnet"), so one built for a ControlNet serves it
beside any checkpoint of the architecture it was trained for. What it computes feeds the
UNet's optional residual inputs (`networks.residual_specs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archs import CONTROLNET_KEYS
from .checkpoint import component_folder, component_weights, load_component, resolve_component, state_digest
from .errors import CheckpointError, InvalidArgumentError, ModelNotFoundError
from .model_files import PICKLE_SUFFIXES, architecture_hash, check_finite, check_safetensors, fingerprint
from .single_file import gather_weights, read_state_dict, unet_key

log = logging.getLogger(__name__)

CONTROLNET_FILES = ["config.json", "*.safetensors", "controlnet/config.json", "controlnet/*.safetensors"]
LDM_PREFIX = "control_model."  # original-layout ControlNet files (lllyasviel's): keys under this, or bare
CONTROLNET_CLASS = "ControlNetModel"
# what must equal the UNet's for the residuals to fit its skip connections and its embeddings
MATCHING = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
            "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


@dataclass
class LoadedControlNet:
    """A ControlNet and what identifies it (the store keys its engines by `fingerprint`)."""

    model: Any  # diffusers ControlNetModel, fp32, eval
    fingerprint: str  # content hash of its weights and config
    source: str  # what the user passed
    architecture: str  # hash of its config: equal means same shapes (refittable engines)

    @property
    def config(self):
        return self.model.config


def load_controlnet(value, unet_config=None, allow_pickle: bool = False,
                    local_files_only: bool = False) -> LoadedControlNet:
    """A ControlNet from a diffusers ControlNetModel, a diffusers folder (config.json +
    weights, or a pipeline folder's controlnet/), a hub id in the hub cache, a single file
    (.safetensors; .pth/.ckpt only with `allow_pickle`) in diffusers' or the original
    layout (`control_model.*` keys, or bare), or `synthetic:controlnet-<arch>`. A single
    file's architecture is the base UNet's (`unet_config`), as the residuals must fit it."""
    from diffusers import ControlNetModel

    if isinstance(value, ControlNetModel):
        model = value.float().eval().requires_grad_(False)
        return LoadedControlNet(model, state_digest(model), f"a {type(value).__name__} object",
                                architecture_hash(model.config))
    if not isinstance(value, (str, Path)):
        raise InvalidArgumentError(f"a ControlNet must be a folder, a file, a hub id or a diffusers ControlNetModel, "
                                   f"not {type(value).__name__}")
    path = resolve_component(value, "ControlNet", CONTROLNET_FILES, local_files_only)
    if path.is_dir():
        folder, config = component_folder(path, "controlnet", "ControlNet")
        if config.get("_class_name", CONTROLNET_CLASS) != CONTROLNET_CLASS:
            raise CheckpointError(f"{folder} holds a {config.get('_class_name')}, not a ControlNetModel")
        weights, variant = component_weights(folder, sorted(p for p in folder.iterdir() if p.is_file()), None,
                                              allow_pickle)
        model = load_component(ControlNetModel, folder, variant, allow_pickle).float()
        fp = fingerprint([folder / "config.json", *weights], folder)
    elif path.is_file():
        model = _from_single_file(path, unet_config, allow_pickle)
        fp = fingerprint([path], path.parent)
    else:
        raise ModelNotFoundError(f"ControlNet not found: {path} (no such file or directory)")
    model = model.eval().requires_grad_(False)
    return LoadedControlNet(model, fp, str(value), architecture_hash(model.config))


def _from_single_file(path: Path, unet_config, allow_pickle: bool):
    """A ControlNetModel from one file: its config is the base UNet's with the conditioning
    embedding's sizes read from the file; weights renamed from the original layout."""
    from diffusers import ControlNetModel

    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: a ControlNet file must be .safetensors (or a diffusers folder)")
    if path.suffix == ".safetensors":
        check_safetensors(path)
    if unet_config is None:
        raise InvalidArgumentError(f"{path}: a single-file ControlNet is loaded for a checkpoint (its architecture "
                                   "is the UNet's)")
    sd = read_state_dict(path, allow_pickle)
    if any(k.startswith(LDM_PREFIX) for k in sd):
        sd = {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    original = "time_embed.0.weight" in sd
    if not original and "time_embedding.linear_1.weight" not in sd:
        raise CheckpointError(f"{path} is not a ControlNet (no time embedding weights in either layout)")
    try:  # the conditioning embedding: conv_in, pairs of (conv, stride-2 conv to the next width), conv_out
        if original:  # input_hint_block: convs at even indices (SiLUs between)
            convs = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.")
                            and k.endswith(".weight")})
            first, inner = sd["input_hint_block.0.weight"], [sd[f"input_hint_block.{i}.weight"] for i in convs[1:-1]]
        else:
            count = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
            first = sd["controlnet_cond_embedding.conv_in.weight"]
            inner = [sd[f"controlnet_cond_embedding.blocks.{i}.weight"] for i in range(count)]
        in_channels = sd["input_blocks.0.0.weight" if original else "conv_in.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete ControlNet ({e.args[0]} missing)") from None
    config = {k: v for k, v in dict(unet_config).items() if k in CONTROLNET_KEYS}
    config.update(conditioning_channels=int(first.shape[1]), in_channels=int(in_channels),
                  conditioning_embedding_out_channels=[int(first.shape[0])] + [int(w.shape[0]) for w in inner[1::2]])
    model = ControlNetModel(**config)
    layers = config.get("layers_per_block", 2)
    rename = (lambda k: (controlnet_key(k, layers, len(inner)), None)) if original else (lambda k: (k, None))
    gather_weights(model, sd, rename, f"ControlNet ({path.name})")
    check_finite(model, str(path))
    return model


def controlnet_key(key: str, layers: int, hint_blocks: int) -> str:
    """diffusers ControlNet key -> original-layout key (without `control_model.`)."""

    fixed = {"controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * (hint_blocks + 1)}",
             "controlnet_mid_block": "middle_block_out.0"}
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if key.startswith("controlnet_cond_embedding.blocks."):
        i, rest = key[len("controlnet_cond_embedding.blocks."):].split(".", 1)
        return f"input_hint_block.{2 * (int(i) + 1)}.{rest}"
    if key.startswith("controlnet_down_blocks."):
        i, rest = key[len("controlnet_down_blocks."):].split(".", 1)
        return f"zero_convs.{i}.0.{rest}"
    return unet_key(key, layers, [])


def check_controlnet_fits(cn: LoadedControlNet, unet_config, info) -> None:
    """Refuse a ControlNet whose residuals or inputs would not fit the checkpoint's UNet
    (another model family or width), or that runs in a mode fastsd does not (guess mode)."""
    cfg, unet = dict(cn.config), dict(unet_config)
    for key in MATCHING:
        mine, theirs = cfg.get(key), unet.get(key)
        if isinstance(mine, (list, tuple)) or isinstance(theirs, (list, tuple)):
            mine = list(mine) if isinstance(mine, (list, tuple)) else mine
            theirs = list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        if key == "layers_per_block" and isinstance(theirs, list) and isinstance(mine, int):
            mine = [mine] * len(theirs)
        if mine != theirs:
            raise CheckpointError(f"the ControlNet {cn.source} does not fit this checkpoint's UNet: its {key} is "
                                  f"{mine}, the UNet's {theirs} (a ControlNet for another model family?)")
    if cfg.get("in_channels") != info.latent_channels:
        raise CheckpointError(f"the ControlNet {cn.source} takes {cfg.get('in_channels')}-channel latents; this "
                              f"checkpoint's are {info.latent_channels}-channel")
    factor = 2 ** (len(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)) - 1)
    if factor != info.vae_factor:
        raise CheckpointError(f"the ControlNet {cn.source} reads its image at 1/{factor} of the latents' "
                              f"resolution; this checkpoint's VAE factor is {info.vae_factor}")
    if cfg.get("global_pool_conditions"):
        raise CheckpointError(f"the ControlNet {cn.source} pools its conditions (global_pool_conditions, guess "
                              "mode: e.g. shuffle); fastsd runs ControlNets without guess mode")
    if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise CheckpointError(f"the ControlNet {cn.source} reads BGR images; fastsd feeds RGB")


def load_controlnets(value, ckpt, allow_pickle: bool = False, local_files_only: bool = False) -> list:
    """The ControlNets of from_pretrained's `controlnet=` (one, a list of them, or None), each
    loaded and checked to fit the checkpoint `ckpt`."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise InvalidArgumentError("controlnet= is an empty list")
    out = []
    for item in items:
        cn = load_controlnet(item, ckpt.configs["unet"], allow_pickle, local_files_only)
        check_controlnet_fits(cn, ckpt.configs["unet"], ckpt.info)
        log.info("ControlNet %s loaded", cn.source)
        out.append(cn)
    return out
