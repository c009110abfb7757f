"""IP-Adapter: image prompts (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt
Adapter for Text-to-Image Diffusion Models"), in diffusers' names and arithmetic.

An adapter is a file of two parts: `image_proj`, which turns a CLIP vision encoder's output
into a few image tokens (IP-Adapter: a linear layer of the pooled embedding; Plus: a
perceiver resampler over the penultimate hidden states; Full-face: an MLP over them), and
`ip_adapter`, a key and a value projection per cross-attention layer of the UNet, through
which every such layer also attends to the image tokens (decoupled cross-attention, eq. (5)):
out = Attention(Q, K_text, V_text) + scale * Attention(Q, K_image, V_image).

Those projections become UNet weights (`IPAttention`, installed as the cross-attention
processors); the image tokens and each layer's scale are UNet inputs (`ip_tokens_k`,
`ip_scale_k`: networks.ip_adapter_specs), so an engine built with them serves any image prompt,
and another adapter of the same shapes by refit. The image encoder and the projections run
once per call. Face-ID adapters (insightface embeddings, LoRAs) are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from .checkpoint import component_folder, component_weights, load_component, resolve_component
from .errors import CheckpointError, InvalidArgumentError, PickleRefusedError
from .model_files import PICKLE_SUFFIXES, architecture_hash, fingerprint
from .networks import image_encoder_spec
from .single_file import read_state_dict

ADAPTER_FILES = ["*.safetensors", "*.bin", "image_encoder/*", "*/image_encoder/*", "*/*.safetensors"]
PLAIN, PLUS, FULL = "ip-adapter", "ip-adapter-plus", "ip-adapter-full-face"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics (CLIPImageProcessor's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DIM_HEAD = 64  # the resampler's attention head width (as diffusers reads the head count)


# ---- files ---------------------------------------------------------------------------------

def adapter_file(value, subfolder: str | None, weight_name: str | None, local_files_only: bool) -> Path:
    """The adapter's weight file: `value` itself, or in the folder (or hub id's snapshot)
    `value`/`subfolder`, the file `weight_name` or its one .safetensors / .bin file."""
    path = resolve_component(value, "IP-Adapter", ADAPTER_FILES, local_files_only)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if weight_name is not None:
            path = folder / weight_name
        else:
            found = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
            if len(found) != 1:
                raise CheckpointError(f"{folder} holds {len(found)} weight files "
                                      f"({', '.join(p.name for p in found[:5]) or 'none'}): pass weight_name=")
            path = found[0]
    if not path.is_file():
        raise CheckpointError(f"IP-Adapter file not found: {path}")
    return path


def read_adapter(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) weights of an adapter file (safetensors; .bin only with
    allow_pickle), each by its key without the part's prefix."""
    if path.suffix == ".safetensors":
        flat = read_state_dict(path, allow_pickle)  # checked against its header; a corrupt file: CheckpointError
        parts: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
        for key, t in flat.items():
            part, _, rest = key.partition(".")
            if part in parts:
                parts[part][rest] = t
    elif path.suffix in PICKLE_SUFFIXES or path.suffix == ".bin":
        if not allow_pickle:
            raise PickleRefusedError(f"{path} is a pickle file, which runs code when read; pass allow_pickle=True "
                                     "(--allow-pickle) if you trust it")
        parts = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{path}: an IP-Adapter file must be .safetensors (or .bin with allow_pickle)")
    if not isinstance(parts, dict) or not parts.get("image_proj") or not parts.get("ip_adapter"):
        raise CheckpointError(f"{path} is not an IP-Adapter (no image_proj and ip_adapter weights)")
    return dict(parts["image_proj"]), dict(parts["ip_adapter"])


def variant_of(proj: dict, layers: dict, path: Path) -> str:
    """Which projection the file holds; Face-ID adapters are refused (they read insightface
    face embeddings and carry LoRAs, which fastsd does not run)."""
    if "perceiver_resampler.proj_in.weight" in proj or any("lora" in k for k in layers) or (
            "norm.weight" in proj and "proj.0.weight" in proj and "proj.3.weight" not in proj):
        raise CheckpointError(f"{path} is a Face-ID IP-Adapter, which needs insightface face embeddings and its "
                              "LoRA; fastsd runs IP-Adapter, Plus and Full-face (CLIP image) adapters")
    if "proj.weight" in proj:
        return PLAIN
    if "proj.3.weight" in proj:
        return FULL
    if "latents" in proj and "proj_in.weight" in proj:
        return PLUS
    raise CheckpointError(f"{path}: unknown IP-Adapter projection (keys {sorted(proj)[:4]})")


_PLUS_KEYS = {"0.norm1": "ln0", "0.norm2": "ln1", "0.to_q": "attn.to_q", "0.to_out": "attn.to_out.0",
              "1.0": "ff.0", "1.1": "ff.1.net.0.proj", "1.3": "ff.1.net.2"}  # a resampler layer's parts


def _plus_names(sd: dict) -> dict:
    """A reference Resampler's weights under diffusers' IPAdapterPlusImageProjection names
    (layers.i.0: attention, its key and value projections as one to_kv; layers.i.1: feed-forward)."""
    renamed = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(layers\.\d+)\.(\d\.\w+)\.(weight|bias)", k)
        if m and m[2] == "0.to_kv":
            renamed[f"{m[1]}.attn.to_k.{m[3]}"], renamed[f"{m[1]}.attn.to_v.{m[3]}"] = v.chunk(2)
        elif m and m[2] in _PLUS_KEYS:
            renamed[f"{m[1]}.{_PLUS_KEYS[m[2]]}.{m[3]}"] = v
        else:
            renamed[k] = v
    return renamed


def projection(variant: str, sd: dict) -> nn.Module:
    """The image projection as diffusers' module of the variant (fp32), its weights renamed from
    the adapter file's (the reference implementation's) layout."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterFullImageProjection, IPAdapterPlusImageProjection

    if variant == PLAIN:
        width = sd["norm.weight"].shape[0]
        module = ImageProjection(image_embed_dim=sd["proj.weight"].shape[1], cross_attention_dim=width,
                                 num_image_text_embeds=sd["proj.weight"].shape[0] // width)
        renamed = {k.replace("proj.", "image_embeds.", 1) if k.startswith("proj.") else k: v for k, v in sd.items()}
    elif variant == FULL:
        module = IPAdapterFullImageProjection(cross_attention_dim=sd["proj.3.weight"].shape[0],
                                              image_embed_dim=sd["proj.0.weight"].shape[1])
        names = {"proj.0.": "ff.net.0.proj.", "proj.2.": "ff.net.2.", "proj.3.": "norm."}
        renamed = {names.get(k[:7], k[:7]) + k[7:]: v for k, v in sd.items()}
    else:
        renamed = _plus_names(sd)
        depth = len({k.split(".")[1] for k in renamed if k.startswith("layers.")})
        module = IPAdapterPlusImageProjection(
            embed_dims=sd["proj_in.weight"].shape[1], output_dims=sd["proj_out.weight"].shape[0],
            hidden_dims=sd["latents"].shape[2], depth=depth, dim_head=DIM_HEAD,
            heads=renamed["layers.0.attn.to_q.weight"].shape[0] // DIM_HEAD, num_queries=sd["latents"].shape[1])
    try:
        module.load_state_dict(renamed, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"the IP-Adapter's {variant} projection does not load: {first}") from None
    return module.float().eval().requires_grad_(False)


def projection_widths(variant: str, proj: nn.Module) -> tuple[int, int]:
    """(the width of the image features a projection reads, the width of the tokens it gives)."""
    if variant == PLAIN:
        return proj.image_embeds.in_features, proj.norm.normalized_shape[0]
    if variant == FULL:
        return proj.ff.net[0].proj.in_features, proj.norm.normalized_shape[0]
    return proj.proj_in.in_features, proj.proj_out.out_features


# ---- the image encoder ---------------------------------------------------------------------

@dataclass
class LoadedEncoder:
    """A CLIP image encoder (transformers' CLIPVisionModelWithProjection) and what identifies
    it: the store keeps its engines under its own fingerprint (network "image_encoder")."""

    model: Any
    fingerprint: str  # content hash of its files
    source: str  # what the user passed (or where it was found)

    @property
    def config(self):
        return self.model.config

    @property
    def size(self) -> int:
        return int(self.config.image_size)

    @property
    def architecture(self) -> str:
        return architecture_hash(self.config.to_dict())

    def spec(self, name: str = "image_encoder"):
        """Its NetworkSpec (network `name`: image_encoder, image_encoder_2, ...)."""
        c = self.config
        return image_encoder_spec(name, self.size, int(c.projection_dim), (self.size // int(c.patch_size)) ** 2 + 1,
                                  int(c.hidden_size))


def load_image_encoder(value, adapter: Path, subfolder: str | None, allow_pickle: bool,
                       local_files_only: bool) -> LoadedEncoder:
    """The CLIP image encoder: `value` (a folder, a hub id, or a CLIPVisionModelWithProjection),
    else the adapter's own: image_encoder/ beside its file or in the folder given."""
    from transformers import CLIPVisionModelWithProjection

    from .checkpoint import state_digest

    if isinstance(value, CLIPVisionModelWithProjection):
        model = value.float().eval().requires_grad_(False)
        return LoadedEncoder(model, state_digest(model), f"a {type(value).__name__} object")
    if value is None:
        near = [adapter.parent / "image_encoder", adapter.parent.parent / "image_encoder"]
        if subfolder:
            near.insert(0, adapter.parent.parent / subfolder / "image_encoder")
        found = next((p for p in near if (p / "config.json").is_file()), None)
        if found is None:
            raise CheckpointError(f"no image encoder for the IP-Adapter {adapter.name}: none in "
                                  f"{', '.join(str(p) for p in near[:2])}; pass image_encoder= (a CLIP vision model "
                                  "folder, e.g. h94/IP-Adapter's models/image_encoder)")
        value = found
    if not isinstance(value, (str, Path)):
        raise InvalidArgumentError(f"image_encoder must be a folder, a hub id or a CLIPVisionModelWithProjection, "
                                   f"not {type(value).__name__}", "image_encoder")
    path = resolve_component(value, "image encoder", ["config.json", "*.safetensors", "image_encoder/*"],
                             local_files_only)
    folder, config = component_folder(path, "image_encoder", "CLIP image encoder")
    if config.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise CheckpointError(f"{folder} holds a {config.get('model_type')}, not a CLIP vision model")
    weights, variant = component_weights(folder, sorted(p for p in folder.iterdir() if p.is_file()), None,
                                         allow_pickle)
    model = load_component(CLIPVisionModelWithProjection, folder, variant, allow_pickle, weights)
    return LoadedEncoder(model.float().eval().requires_grad_(False),
                         fingerprint([folder / "config.json", *weights], folder), str(value))


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """(1, 3, size, size) float32: the image as CLIPImageProcessor(size, crop_size=size) gives
    it (its PIL backend): RGB, shorter side resized to `size` (bicubic), center crop, [0, 1],
    normalised by CLIP's mean and std."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    image = image.resize((size, new_long) if w <= h else (new_long, size), resample=Image.BICUBIC)
    array = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8
    top, left = (array.shape[1] - size) // 2, (array.shape[2] - size) // 2
    array = (array[:, top:top + size, left:left + size].astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.array(CLIP_MEAN, np.float32)[:, None, None], np.array(CLIP_STD, np.float32)[:, None, None]
    return torch.from_numpy((array - mean) / std)[None]


# ---- the UNet side: decoupled cross-attention --------------------------------------------

class IPAttention(nn.Module):
    """A cross-attention layer's processor with the adapters' key and value projections: with
    `ip_hidden_states` = (tokens per adapter, scales per adapter (L,)), it adds each adapter's
    attention over its image tokens, times that adapter's scale at this layer (`index`), to the
    text attention before the output projection (as diffusers' IPAdapterAttnProcessor2_0);
    without, it is the layer's own processor."""

    def __init__(self, index: int, plain, projections: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.index = index
        object.__setattr__(self, "plain", plain)  # the layer's own processor (not a submodule)
        self.to_k_ip = nn.ModuleList(_linear(k) for k, _ in projections)
        self.to_v_ip = nn.ModuleList(_linear(v) for _, v in projections)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_hidden_states=None, **kwargs):
        if ip_hidden_states is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        tokens, scales = ip_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = encoder_hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        out = _attend(query, key, value, attn.heads, head_dim)
        for image, scale, to_k, to_v in zip(tokens, scales, self.to_k_ip, self.to_v_ip, strict=True):
            out = out + scale[self.index] * _attend(query, to_k(image), to_v(image), attn.heads, head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight.data = weight.detach()
    return layer.requires_grad_(False)


def _attend(query, key, value, heads: int, head_dim: int) -> torch.Tensor:
    """Scaled dot-product attention of (B, heads, N, d) queries over (B, M, heads * d) keys and
    values -> (B, N, heads * d)."""
    batch = query.shape[0]
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


def cross_attention_layers(unet) -> list[str]:
    """The processor names of the UNet's cross-attention layers, in diffusers' order (the
    adapter file numbers them 1, 3, 5, ...: every attention layer, self-attention even)."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


def _attention(unet, name: str):
    return unet.get_submodule(name[:-len(".processor")])


def layer_weights(layers: dict, unet, path: Path) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per cross-attention layer of `unet`, the adapter's (to_k_ip, to_v_ip) weights, checked
    against the layer's shapes: an adapter for another model family or width is refused."""
    names = cross_attention_layers(unet)
    held = sorted({int(k.split(".")[0]) for k in layers if k.split(".")[0].isdigit()})
    if held != list(range(1, 2 * len(names), 2)):
        raise CheckpointError(f"the IP-Adapter {path.name} is made for a UNet with {len(held)} cross-attention "
                              f"layers; this checkpoint's has {len(names)} (an adapter for another model family?)")
    out = []
    for i, name in enumerate(names):
        attn = _attention(unet, name)
        pair = []
        for part, ref in (("to_k_ip", attn.to_k), ("to_v_ip", attn.to_v)):
            w = layers.get(f"{2 * i + 1}.{part}.weight")
            if w is None or tuple(w.shape) != tuple(ref.weight.shape):
                got = None if w is None else tuple(w.shape)
                raise CheckpointError(f"the IP-Adapter {path.name}'s {part} of layer {name} is {got}; this UNet's "
                                      f"is {tuple(ref.weight.shape)} (an adapter for another model family or width)")
            pair.append(w.float())
        out.append(pair)
    return out


def install(unet, per_adapter: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Make the UNet's cross-attention layers IPAttention with these adapters' projections (in
    the UNet's dtype and device); none: each layer's own processor back."""
    param = next(unet.parameters())
    procs = dict(unet.attn_processors)
    for i, name in enumerate(cross_attention_layers(unet)):
        plain = procs[name].plain if isinstance(procs[name], IPAttention) else procs[name]
        if not per_adapter:
            procs[name] = plain
            continue
        pairs = [tuple(w.to(param.device, param.dtype) for w in layers[i]) for layers in per_adapter]
        procs[name] = IPAttention(i, plain, pairs)
    unet.set_attn_processor(procs)


def is_ip_weight(name: str) -> bool:
    """Whether a UNet network weight is an IP-Adapter's key or value projection."""
    return ".processor.to_k_ip." in name or ".processor.to_v_ip." in name


def ip_weights(unet) -> dict[str, torch.Tensor]:
    """The adapters' projections in the UNet network's weights, by the names engines know them
    (networks.UNet holds diffusers' UNet as `unet`)."""
    return {f"unet.{n}": p.detach() for n, p in unet.named_parameters() if is_ip_weight(n)}


def layer_scales(scale, names: list[str], what: str = "scale") -> torch.Tensor:
    """(L,) float32: one adapter's scale at each cross-attention layer `names`, from a number or
    diffusers' per-block dict ({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [...]},
    "mid": s}: a part's number applies to all its blocks, a block's number to all its attention
    layers, a list one per attention layer; what a dict leaves out is 0, as diffusers)."""
    if not isinstance(scale, dict):
        return torch.full((len(names),), _number(scale, what), dtype=torch.float32)
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise InvalidArgumentError(f"per-block IP-Adapter scales take the keys down, mid, up; not {sorted(unknown)}",
                                   what)
    return torch.tensor([_block_scale(scale, n, names, what) for n in names], dtype=torch.float32)


def _block_scale(scale: dict, name: str, names: list[str], what: str) -> float:
    part = name.split(".")[0]
    if part == "mid_block":
        mid = scale.get("mid", 0.0)
        return _number(mid[0] if isinstance(mid, list) and len(mid) == 1 else mid, what)
    key = "down" if part == "down_blocks" else "up"
    value = scale.get(key, 0.0)
    if not isinstance(value, dict):
        return _number(value, what)
    block, attention = name.split(".")[1], int(name.split(".")[3])
    value = value.get(f"block_{block}", 0.0)
    if not isinstance(value, list):
        return _number(value, what)
    count = len({n.split(".")[3] for n in names if n.startswith(f"{part}.{block}.")})
    if len(value) == 1:
        return _number(value[0], what)
    if len(value) != count:
        raise InvalidArgumentError(f"{key} block_{block} has {count} attention layers; {len(value)} scales given",
                                   what)
    return _number(value[attention], what)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < float("inf"):
        raise InvalidArgumentError(f"an IP-Adapter scale must be a finite number (or diffusers' per-block dict), "
                                   f"got {value!r}", what)
    return float(value)
