"""Single-file SD 1.x / 2.x / SD-XL checkpoints in the original (CompVis / Stability) layout.

Loaded offline: the architecture is the carried SD 1.x or 2.x config (archs.py) with
every size read from the tensors' shapes, and the weights are renamed to diffusers'
layout by the rules below (one function per network, diffusers key -> original key,
so the same rules also write such a file). SD-XL files hold both text towers under
`conditioner.embedders.{0,1}` and the UNet's added embedding as `label_emb`. The CLIP
tokenizers are not in the file: they are taken from `tokenizer/` (and SD-XL's
`tokenizer_2/`) folders beside it, or from the hub cache.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from .archs import arch
from .errors import CheckpointError, PickleRefusedError
from .model_files import (
    PICKLE_SUFFIXES,
    Checkpoint,
    check_finite,
    check_safetensors,
    fingerprint,
    load_tokenizer,
    make_checkpoint,
)

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
XL_TEXT_PREFIX = "conditioner.embedders.0.transformer."  # CLIP ViT-L, transformers' layout
XL_TEXT_2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG, with its text_projection
HEAD_DIM = 64  # SD 2.x attention and both CLIP text towers use 64-wide heads
TOKENIZER_REPOS = {"sd15": ("openai/clip-vit-large-patch14", ""),
                   "sd21": ("stabilityai/stable-diffusion-2-1", "tokenizer"),
                   "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
                   "sdxl_2": ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2")}

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


# ---- key rules: diffusers key -> original key ---------------------------------------


def _rename_head(rest: str, table: dict) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key(key: str, layers: int, up_attn: list[bool]) -> str:
    step = layers + 1  # blocks per level in input_blocks/output_blocks
    for new, old in _UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _rename_head(rest, _UNET_RESNET) if kind == "resnets" else rest
        return f"input_blocks.{step * i + j + 1}.{0 if kind == 'resnets' else 1}.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{step * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], _UNET_RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _rename_head(rest, _UNET_RESNET) if kind == "resnets" else rest
        return f"output_blocks.{step * i + j}.{0 if kind == 'resnets' else 1}.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{step * i + layers}.{2 if up_attn[i] else 1}.{m[2]}"
    raise CheckpointError(f"no original-layout name for UNet weight {key}")


def vae_key(key: str, n_blocks: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTN)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):  # up levels run in reverse
        rest = _rename_head(m[3], {"conv_shortcut": "nin_shortcut"})
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{rest}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


TEXT_PROJECTION_T = "text_projection.T"  # OpenCLIP applies x @ P; transformers' Linear holds P.T


def openclip_key(key: str) -> tuple[str, int | None]:
    """SD 2.x / SD-XL OpenCLIP text tower: original key, and which third of a fused
    in_proj (q, k, v) it is (the projection maps to its transpose, TEXT_PROJECTION_T)."""
    key = key.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "text_projection.weight": TEXT_PROJECTION_T}
    if key in fixed:
        return fixed[key], None
    if key.startswith("final_layer_norm."):
        return "ln_final." + key.split(".", 1)[1], None
    if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", "qkv".index(m[2])
    if m := re.match(r"encoder\.layers\.(\d+)\.(.*)", key):
        return f"transformer.resblocks.{m[1]}.{_rename_head(m[2], _CLIP_LAYER)}", None
    raise CheckpointError(f"no original-layout name for text encoder weight {key}")


# ---- architecture from shapes -------------------------------------------------------


def family(sd: dict) -> str:
    if any(k.startswith(XL_TEXT_2_PREFIX) for k in sd):
        if not any(k.startswith(XL_TEXT_PREFIX) for k in sd):
            raise CheckpointError("an SD-XL refiner (one text encoder) single file; fastsd runs SD-XL base checkpoints")
        return "sdxl"
    if any(k.startswith(SD2_TEXT_PREFIX) for k in sd):
        return "sd21"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in sd):
        return "sd15"
    raise CheckpointError("not an SD 1.x/2.x/SD-XL single-file checkpoint (no cond_stage_model or conditioner "
                          "weights; other layouts need a diffusers folder)")


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in sd if (m := rx.match(k))})


def unet_config(sd: dict, fam: str) -> dict:
    cfg = arch(fam)["unet"]
    g = lambda k: sd[UNET_PREFIX + k]  # noqa: E731
    n_blocks = _count(sd, re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    n_inputs = _count(sd, re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.")
    layers = (n_inputs - n_blocks) // n_blocks
    step = layers + 1
    chans = [g(f"input_blocks.{step * i + 1}.0.out_layers.3.weight").shape[0] for i in range(n_blocks)]
    down_attn = [UNET_PREFIX + f"input_blocks.{step * i + 1}.1.proj_in.weight" in sd for i in range(n_blocks)]
    up_attn = [UNET_PREFIX + f"output_blocks.{step * i}.1.proj_in.weight" in sd for i in range(n_blocks)]
    to_k = next(v for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    proj_in = g("middle_block.1.proj_in.weight")
    cfg.update(
        in_channels=g("input_blocks.0.0.weight").shape[1],
        out_channels=g("out.2.weight").shape[0],
        block_out_channels=chans,
        layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        cross_attention_dim=to_k.shape[1],
        use_linear_projection=proj_in.ndim == 2,
    )
    if fam in ("sd21", "sdxl"):
        cfg["attention_head_dim"] = [max(1, c // HEAD_DIM) for c in chans]
    if fam == "sdxl":  # transformer depth per level, and the "text_time" added embedding
        depth = [_count(sd, re.escape(UNET_PREFIX) + rf"input_blocks\.{step * i + 1}\.1\.transformer_blocks\.(\d+)\.")
                 or 1 for i in range(n_blocks)]
        added, pooled = g("label_emb.0.0.weight").shape[1], sd[XL_TEXT_2_PREFIX + "text_projection"].shape[1]
        cfg.update(transformer_layers_per_block=depth, projection_class_embeddings_input_dim=added,
                   addition_time_embed_dim=(added - pooled) // 6)  # 6 time ids, then the pooled text
    return cfg


def vae_config(sd: dict, fam: str) -> dict:
    cfg = arch(fam)["vae"]
    n = _count(sd, re.escape(VAE_PREFIX) + r"encoder\.down\.(\d+)\.")
    cfg.update(
        in_channels=sd[VAE_PREFIX + "encoder.conv_in.weight"].shape[1],
        out_channels=sd[VAE_PREFIX + "decoder.conv_out.weight"].shape[0],
        latent_channels=sd[VAE_PREFIX + "decoder.conv_in.weight"].shape[1],
        block_out_channels=[sd[VAE_PREFIX + f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(n)],
        layers_per_block=_count(sd, re.escape(VAE_PREFIX) + r"encoder\.down\.0\.block\.(\d+)\."),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
    )
    return cfg


def _clip_base(sd: dict, prefix: str) -> str:
    """Where a transformers-layout CLIP text tower's keys start (with or without text_model.)."""
    return prefix + ("text_model." if prefix + "text_model.embeddings.token_embedding.weight" in sd else "")


def text_config(sd: dict, fam: str, second: bool = False) -> dict:
    """The text tower's config: SD 1.x / SD-XL's first (transformers' layout), SD 2.x's
    OpenCLIP (its last layer unused, so one fewer), SD-XL's second (`second`: OpenCLIP bigG,
    every layer, with the projection)."""
    cfg = arch(fam)["text_encoder_2" if second else "text_encoder"]
    if fam in ("sd15", "sdxl") and not second:
        base = _clip_base(sd, SD1_TEXT_PREFIX if fam == "sd15" else XL_TEXT_PREFIX)
        tok, pos = sd[base + "embeddings.token_embedding.weight"], sd[base + "embeddings.position_embedding.weight"]
        layers = _count(sd, re.escape(base) + r"encoder\.layers\.(\d+)\.")
        inter = sd[base + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    else:  # OpenCLIP: SD 2.x's diffusers tower stops at the penultimate layer, so one layer fewer
        prefix = XL_TEXT_2_PREFIX if second else SD2_TEXT_PREFIX
        tok, pos = sd[prefix + "token_embedding.weight"], sd[prefix + "positional_embedding"]
        layers = _count(sd, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.") - (0 if second else 1)
        inter = sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    hidden = tok.shape[1]
    cfg.update(vocab_size=tok.shape[0], hidden_size=hidden, max_position_embeddings=pos.shape[0],
               num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=max(1, hidden // HEAD_DIM),
               projection_dim=sd[XL_TEXT_2_PREFIX + "text_projection"].shape[1] if second else hidden)
    return cfg


# ---- loading ------------------------------------------------------------------------


def _squeezed(shape) -> tuple[int, ...]:
    """A shape without trailing 1s: (C, C, 1, 1) and (C, C) are the same weight."""
    dims = list(shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def gather_weights(model, source: dict, key_of, what: str) -> None:
    """Fill `model` from `source` via key_of(model_key) -> source key (or (key, qkv third))."""
    target = model.state_dict()
    out = {}
    for k, t in target.items():
        src_key, third = key_of(k)
        if src_key not in source:
            if k.endswith("position_ids"):
                out[k] = t
                continue
            raise CheckpointError(f"{what} weight {src_key} is missing from the checkpoint")
        v = source[src_key]
        if third is not None:
            v = v.chunk(3, dim=0)[third]
        if _squeezed(v.shape) != _squeezed(t.shape):  # exact, up to 1x1 conv <-> linear (VAE attention)
            raise CheckpointError(f"{what} weight {src_key} has shape {tuple(v.shape)}, expected {tuple(t.shape)}")
        out[k] = v.reshape(t.shape).to(t.dtype)
    model.load_state_dict(out, strict=True)


def read_state_dict(path: Path, allow_pickle: bool) -> dict:
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleRefusedError(f"{path} is a pickle checkpoint, which can run code when loaded; "
                                     "pass allow_pickle=True (--allow-pickle) if you trust it")
        log.warning("loading pickle checkpoint %s (allowed by the caller)", path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"cannot read pickle checkpoint {path}: {type(e).__name__}") from None
        return obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path} is not a checkpoint (expected .safetensors or a diffusers folder)")
    check_safetensors(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None


def _tokenizer(path: Path, fam: str, folder: str = "tokenizer"):
    """The tokenizer folder beside the file, else the family's tokenizer in the hub cache."""
    local = path.parent / folder
    if local.is_dir():
        return load_tokenizer(local), local
    repo, sub = TOKENIZER_REPOS[fam]
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*" if sub else "*.json", "*.txt"],
                                      local_files_only=True))
        return load_tokenizer(snap / sub), None
    except Exception:  # noqa: BLE001 - not cached, or cached without tokenizer files
        raise CheckpointError(f"{path.name} has no tokenizer: put a diffusers {folder}/ folder beside it, "
                              f"or have {repo} in the hub cache") from None


def load_single_file(path: Path, *, source: str, allow_pickle: bool) -> Checkpoint:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = read_state_dict(path, allow_pickle)
    fam = family(sd)
    tok, tok_dir = _tokenizer(path, fam)
    tok_2, tok_2_dir = _tokenizer(path, "sdxl_2", "tokenizer_2") if fam == "sdxl" else (None, None)
    try:
        ucfg, vcfg, tcfg = unet_config(sd, fam), vae_config(sd, fam), text_config(sd, fam)
        tcfg_2 = text_config(sd, fam, second=True) if fam == "sdxl" else None
    except (KeyError, StopIteration, IndexError, AttributeError) as e:
        missing = e.args[0] if isinstance(e, KeyError) else "an attention weight"
        raise CheckpointError(f"{path.name} is incomplete: {missing} is missing, so its architecture "
                              "cannot be inferred") from None
    unet, vae = UNet2DConditionModel(**ucfg), AutoencoderKL(**vcfg)
    text = CLIPTextModel(CLIPTextConfig(**tcfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    up_attn = [t.startswith("CrossAttn") for t in ucfg["up_block_types"]]
    gather_weights(unet, sd, lambda k: (UNET_PREFIX + unet_key(k, ucfg["layers_per_block"], up_attn), None), "UNet")
    gather_weights(vae, sd, lambda k: (VAE_PREFIX + vae_key(k, len(vcfg["block_out_channels"])), None), "VAE")
    if fam in ("sd15", "sdxl"):
        base = _clip_base(sd, SD1_TEXT_PREFIX if fam == "sd15" else XL_TEXT_PREFIX)
        gather_weights(text, sd, lambda k: (base + k.removeprefix("text_model."), None), "text encoder")
    else:
        gather_weights(text, sd, lambda k: (lambda o: (SD2_TEXT_PREFIX + o[0], o[1]))(openclip_key(k)), "text encoder")
    parts = {"tokenizer": tok, "text_encoder": text, "unet": unet, "vae": vae}
    if fam == "sdxl":
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**tcfg_2, bos_token_id=tok_2.bos_token_id,
                                                            eos_token_id=tok_2.eos_token_id))
        source_2 = {k[len(XL_TEXT_2_PREFIX):]: v for k, v in sd.items() if k.startswith(XL_TEXT_2_PREFIX)}
        source_2[TEXT_PROJECTION_T] = source_2["text_projection"].t()
        gather_weights(text_2, source_2, openclip_key, "text encoder 2")
        parts.update(tokenizer_2=tok_2, text_encoder_2=text_2)

    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        if name in parts:
            check_finite(parts[name], f"{path} ({name})")
    files = [path] + [p for d in (tok_dir, tok_2_dir) if d for p in sorted(d.iterdir()) if p.is_file()]
    log.info("loaded %s as an %s single-file checkpoint", path.name, fam)
    return make_checkpoint(parts, arch(fam)["scheduler"], fingerprint(files, path.parent), source)


def to_original_layout(ckpt: Checkpoint, fam: str) -> dict:
    """The inverse of load_single_file's renaming: a state dict in the original layout."""
    ucfg = ckpt.unet.config
    up_attn = [t.startswith("CrossAttn") for t in ucfg.up_block_types]
    out = {UNET_PREFIX + unet_key(k, ucfg.layers_per_block, up_attn): v for k, v in ckpt.unet.state_dict().items()}
    n_vae = len(ckpt.vae.config.block_out_channels)
    for k, v in ckpt.vae.state_dict().items():
        out[VAE_PREFIX + vae_key(k, n_vae)] = v[..., None, None] if ".mid_block.attentions." in k and v.ndim == 2 else v
    text = {k: v for k, v in ckpt.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if fam in ("sd15", "sdxl"):
        prefix = SD1_TEXT_PREFIX if fam == "sd15" else XL_TEXT_PREFIX
        out.update({prefix + "text_model." + k.removeprefix("text_model."): v for k, v in text.items()})
        if fam == "sdxl":
            text_2 = {k: v for k, v in ckpt.text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
            out.update(_openclip_layout(text_2, XL_TEXT_2_PREFIX))
        return {k: v.contiguous() for k, v in out.items()}
    out.update(_openclip_layout(text, SD2_TEXT_PREFIX))
    layer = re.compile(re.escape(SD2_TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    last = max(int(m[1]) for k in out if (m := layer.match(k)))
    for k in [k for k in out if k.startswith(f"{SD2_TEXT_PREFIX}transformer.resblocks.{last}.")]:  # unused 24th layer
        out[k.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.")] = out[k].clone()
    return {k: v.contiguous() for k, v in out.items()}


def _openclip_layout(text: dict, prefix: str) -> dict:
    """A transformers CLIP text tower's state dict in OpenCLIP's layout (fused q/k/v, the
    projection transposed)."""
    out, fused = {}, {}
    for k, v in text.items():
        key, third = openclip_key(k)
        if key == TEXT_PROJECTION_T:
            out[prefix + "text_projection"] = v.t()
        elif third is None:
            out[prefix + key] = v
        else:
            fused.setdefault(key, [None] * 3)[third] = v
    out.update({prefix + k: torch.cat(v) for k, v in fused.items()})
    return out
