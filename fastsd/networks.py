"""The networks as modules whose inputs and outputs carry the ONNX names.

These are the contract every backend implements (docs/ARCHITECTURE.md): the eager backend runs
them directly; exporters trace them. diffusers/transformers classes only hold weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .catalog import NETWORKS  # noqa: F401 - every network fastsd knows (re-exported)

SD_NETWORKS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")  # a model family has its own subset


def positions(x: torch.Tensor) -> torch.Tensor:
    """CLIP's position ids (1, L), 0 .. L-1, for a sequence x (B, L, ...), computed: the values
    of CLIP's own position_ids buffer, which a network then does not read, so an exported
    graph's constants are its weights alone."""
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0)


def _causal_mask(h: torch.Tensor) -> torch.Tensor:
    """CLIP's causal attention as an additive mask (1, 1, L, L): 0 on and below the diagonal,
    the dtype's lowest value above it (what transformers' CLIP builds)."""
    n = torch.arange(h.shape[1], device=h.device)
    mask = torch.zeros(h.shape[1], h.shape[1], dtype=h.dtype, device=h.device)
    return mask.masked_fill(n[None, :] > n[:, None], torch.finfo(h.dtype).min)[None, None]


def _tower(clip):
    return getattr(clip, "text_model", clip)  # transformers 5 flattens CLIPTextModel


_TWO_MASKS: dict[type, bool] = {}  # per CLIP layer class: whether it takes transformers 4's two masks


def _layer(layer, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One CLIP encoder layer, as transformers 4 (attention_mask, causal_attention_mask) and 5
    (one attention_mask) call it."""
    two = _TWO_MASKS.get(type(layer))
    if two is None:
        import inspect

        two = _TWO_MASKS[type(layer)] = "causal_attention_mask" in inspect.signature(layer.forward).parameters
    if two:
        out = layer(h, None, mask)
    else:
        out = layer(h, mask)
    return out[0] if isinstance(out, tuple) else out


class TextEncoder(nn.Module):
    """inputs_embeds (B, 77, D): the prompt's token embeddings (the runtime looks the ids up in
    the token table, textual inversions' vectors included) -> text_embeddings (B, 77, D): the
    last hidden state, or with clip_skip = k the output of layer -(k + 1), through the final
    LayerNorm (as diffusers). CLIP's own forward, from the embeddings on: position embeddings,
    causal self-attention layers (only as many as the output needs), final LayerNorm."""

    def __init__(self, clip, clip_skip: int = 0):
        super().__init__()
        self.clip, self.clip_skip = clip, clip_skip

    def _layers(self, inputs_embeds: torch.Tensor, count: int) -> torch.Tensor:
        tower = _tower(self.clip)
        h = tower.embeddings(inputs_embeds=inputs_embeds, position_ids=positions(inputs_embeds))
        mask = _causal_mask(h)
        for layer in tower.encoder.layers[:count]:
            h = _layer(layer, h, mask)
        return h

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        tower = _tower(self.clip)
        return tower.final_layer_norm(self._layers(inputs_embeds, len(tower.encoder.layers) - self.clip_skip))

    def with_clip_skip(self, clip_skip: int) -> "TextEncoder":
        return type(self)(self.clip, clip_skip)


class XLTextEncoder(TextEncoder):
    """SD-XL's text encoders: inputs_embeds (B, 77, D) -> text_embeddings (B, 77, D), the hidden
    state of layer -(clip_skip + 2) as it is (no final LayerNorm), as StableDiffusionXLPipeline;
    the second encoder (CLIPTextModelWithProjection) also takes eos_mask (B, 77), 1 at the token
    its pooled output is read at (the end of text) and 0 elsewhere, and also gives text_embeds
    (B, P), the projection of the final LayerNorm's output there."""

    def forward(self, inputs_embeds: torch.Tensor, eos_mask: torch.Tensor | None = None):
        tower = _tower(self.clip)
        count = len(tower.encoder.layers)
        hidden = self._layers(inputs_embeds, count - self.clip_skip - 1)
        projection = getattr(self.clip, "text_projection", None)
        if projection is None:
            return hidden
        h, mask = hidden, _causal_mask(hidden)
        for layer in tower.encoder.layers[count - self.clip_skip - 1:]:
            h = _layer(layer, h, mask)
        last = tower.final_layer_norm(h)
        pooled = (eos_mask.to(last.dtype)[:, :, None] * last).sum(dim=1)
        return hidden, projection(pooled)


def _residual_kwargs(residuals) -> dict:
    """ControlNet residuals (down ..., mid) as diffusers' UNet takes them (none: no ControlNet)."""
    if not residuals:
        return {}
    return {"down_block_additional_residuals": tuple(residuals[:-1]), "mid_block_additional_residual": residuals[-1]}


def _ip_kwargs(named: dict) -> dict:
    """IP-Adapter image tokens and per-layer scales (ip_tokens_k, ip_scale_k), as the
    cross-attention processors of fastsd/ip_adapter.py read them (none: no image prompt)."""
    count = sum(1 for n in named if n.startswith(IP_TOKENS))
    if not count:
        return {}
    tokens = tuple(named[f"{IP_TOKENS}{k}"] for k in range(count))
    scales = tuple(named[f"{IP_SCALE}{k}"] for k in range(count))
    return {"cross_attention_kwargs": {"ip_hidden_states": (tokens, scales)}}


class UNet(nn.Module):
    """sample (B, C_in, h, w), timestep (B,) float32, encoder_hidden_states (B, 77 * k, D)
    -> noise prediction (B, C_latent, h, w) (eps or v, per the scheduler config). After the
    family's inputs, a guidance-distilled UNet's timestep_cond (B, time_cond_proj_dim), the
    guidance scale's embedding; then optionally the ControlNet residuals (down_residual_0 ...,
    mid_residual), added to the skip connections and the mid block's output, and the
    IP-Adapters' image tokens and scales (ip_tokens_k, ip_scale_k). Positional inputs past the
    family's are read as residuals; a module `with_names(spec.input_names)` reads them by name."""

    extra: tuple[str, ...] = ()  # the family's inputs after encoder_hidden_states

    def __init__(self, unet, names: tuple[str, ...] | None = None):
        super().__init__()
        self.unet, self.names = unet, names
        self.guidance_embedded = getattr(unet.config, "time_cond_proj_dim", None) is not None

    def with_names(self, names) -> "UNet":
        """The same network (same weights) taking its inputs in the order of `names`."""
        return type(self)(self.unet, tuple(names))

    def _named(self, args: tuple) -> tuple[dict, list]:
        if self.names is not None:
            named = dict(zip(self.names, args, strict=True))
            return named, [t for n, t in named.items() if n.startswith(RESIDUAL_PREFIXES)]
        fixed = ("sample", "timestep", "encoder_hidden_states", *self.extra) + (
            ("timestep_cond",) if self.guidance_embedded else ())
        return dict(zip(fixed, args[:len(fixed)], strict=True)), list(args[len(fixed):])

    def added(self, named: dict) -> dict | None:
        """diffusers' added_cond_kwargs of the family's inputs (SD: none)."""
        return None

    def forward(self, *args):
        named, residuals = self._named(args)
        return self.unet(named["sample"], named["timestep"], named["encoder_hidden_states"],
                         timestep_cond=named.get("timestep_cond"), added_cond_kwargs=self.added(named),
                         return_dict=False, **_residual_kwargs(residuals), **_ip_kwargs(named))[0]


class XLUNet(UNet):
    """SD-XL's UNet: also text_embeds (B, P), the pooled text embedding, and time_ids (B, 6),
    (original h, w, crop top, left, target h, w), through its "text_time" added embedding."""

    extra = ("text_embeds", "time_ids")

    def added(self, named: dict) -> dict:
        return {"text_embeds": named["text_embeds"], "time_ids": named["time_ids"]}


class ControlNet(nn.Module):
    """A ControlNet: sample (B, C, h, w) (the 4-channel latents, scaled as the UNet's),
    timestep (B,), encoder_hidden_states (B, 77, D), controlnet_cond (B, 3, H, W) in [0, 1],
    conditioning_scale (1,) float32, and the family's extra UNet inputs (SD-XL: text_embeds,
    time_ids) -> the residuals the UNet takes (down_residual_0 ..., mid_residual), each
    already multiplied by the scale."""

    def __init__(self, controlnet, extra: tuple[str, ...] = ()):
        super().__init__()
        self.controlnet, self.extra = controlnet, extra

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *extra):
        added = dict(zip(self.extra, extra, strict=True)) or None
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale.to(sample.dtype), added_cond_kwargs=added, return_dict=False)
        return (*down, mid)


class ImageEncoder(nn.Module):
    """A CLIP vision encoder (transformers' CLIPVisionModelWithProjection): pixel_values (B, 3,
    S, S), CLIP-normalised -> image_embeds (B, P), the projected pooled output, and
    image_hidden_states (B, tokens, H), the penultimate layer's hidden states (IP-Adapter
    Plus reads those, the plain adapter the embeddings), from one forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values, output_hidden_states=True)
        return out.image_embeds, out.hidden_states[-2]


class VaeEncoder(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> latent distribution moments (B, 2*C, H/f, W/f):
    mean and log-variance of the diagonal Gaussian, concatenated on channels."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, images):
        h = self.encoder(images)
        return h if self.quant_conv is None else self.quant_conv(h)


class VaeDecoder(nn.Module):
    """latent (B, C, h, w), already divided by the scaling factor -> images (B, 3, H, W) in ~[-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, latent):
        z = latent if self.post_quant_conv is None else self.post_quant_conv(latent)
        return self.decoder(z)


class TinyVaeEncoder(nn.Module):
    """A tiny autoencoder's (TAESD) encoder: images (B, 3, H, W) in [-1, 1] -> latents
    (B, C, H/f, W/f) directly (no distribution; it maps [-1, 1] to TAESD's [0, 1] itself)."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, images):
        return self.encoder(images)


class TinyVaeDecoder(nn.Module):
    """A tiny autoencoder's decoder: latent (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]
    (it soft-clamps the latents, tanh(x / 3) * 3, and rescales from [0, 1] itself)."""

    def __init__(self, vae):
        super().__init__()
        self.decoder = vae.decoder

    def forward(self, latent):
        return self.decoder(latent)


def vae_modules(vae) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) network modules of an AutoencoderKL or a tiny autoencoder."""
    from .checkpoint import is_tiny_vae

    if is_tiny_vae(vae):
        return TinyVaeEncoder(vae), TinyVaeDecoder(vae)
    return VaeEncoder(vae), VaeDecoder(vae)


def wrap(ckpt, clip_skip: int = 0, unet_module: type[nn.Module] | None = None,
         text_module: type[TextEncoder] = TextEncoder) -> dict[str, nn.Module]:
    """The ONNX-named modules of a loaded checkpoint (sharing its weights). A model family
    whose UNet takes more inputs passes its own `unet_module` (forward arguments named as
    its spec's inputs), one whose text encoders give other outputs its `text_module`."""
    out = {"text_encoder": text_module(ckpt.text_encoder, clip_skip)}
    if getattr(ckpt, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = text_module(ckpt.text_encoder_2, clip_skip)
    encoder, decoder = vae_modules(ckpt.vae)
    out.update(unet=(unet_module or UNet)(ckpt.unet), vae_encoder=encoder, vae_decoder=decoder)
    return out


# ---- NetworkSpec: one per network, the contract every exporter and runner reads ------------

FLOAT, FLOAT32, INT64 = "float", "float32", "int64"  # tensor kinds: the engine's precision, always fp32, ids
BATCH, LATENT_H, LATENT_W, PIXEL_H, PIXEL_W = "B", "h", "w", "H", "W"  # dynamic axis symbols
TOKENS = "T"  # the text sequence the UNet attends to: 77 per chunk of a long prompt (fastsd/prompts.py)


def latent_axis(axis: str, halvings: int) -> str:
    """The symbol of a latent axis after `halvings` stride-2 convolutions: "h", "h/2", "h/4" ..."""
    return axis if halvings == 0 else f"{axis}/{2 ** halvings}"


def _size(axis: str, sizes: dict[str, int]) -> int:
    """An axis' size: given, or "h/4" = ceil(h / 4) (what stride-2 convolutions with padding
    1 leave of h, however many in a row)."""
    if "/" not in axis:
        return sizes[axis]
    base, by = axis.split("/")
    return -(-sizes[base] // int(by))


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, its shape (ints are fixed, letters are the dynamic
    axes: B batch, h x w latent pixels, H x W image pixels) and its kind of dtype."""

    name: str
    shape: tuple[int | str, ...]
    kind: str = FLOAT  # FLOAT: the engine's precision; FLOAT32: fp32 in every graph; INT64
    sample: float | None = None  # value of the sample input (None: random normal, or zeros for ids)
    optional: bool = False  # a call may leave it out: zeros are the same (ControlNet residuals)

    def shape_for(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(_size(d, sizes) if isinstance(d, str) else d for d in self.shape)

    def dtype(self, precision: torch.dtype) -> torch.dtype:
        return {FLOAT: precision, FLOAT32: torch.float32, INT64: torch.int64}[self.kind]


@dataclass(frozen=True)
class NetworkSpec:
    """Names, dtypes, dynamic axes, CFG doubling, sample inputs and profile shapes of one
    network, in one place (the TensorRT demo's BaseModel, without the building)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cfg_doubled: bool  # CFG runs it on a batch of 2 per image (text encoder, UNet)
    vae_factor: int  # image pixels per latent pixel
    optional_inputs: tuple[TensorSpec, ...] = ()  # inputs an engine may be built with too (the UNet's
    # ControlNet residuals): not in `inputs`, which are the plain graph's; see `with_inputs`
    chunk_tokens: int = 77  # the text encoder's sequence; the T axis is a multiple of it

    def with_inputs(self, names) -> "NetworkSpec":
        """The spec of the network taking `names`: its inputs plus those optional ones named
        (in their order). A name it cannot take is a ValueError."""
        names = set(names)
        unknown = names - set(self.input_names) - {t.name for t in self.optional_inputs}
        if unknown:
            raise ValueError(f"{self.name} takes no input {sorted(unknown)[0]!r}")
        extra = tuple(t for t in self.optional_inputs if t.name in names)
        return replace(self, inputs=self.inputs + extra, optional_inputs=()) if extra else self

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def sized(self) -> bool:
        """Whether its shapes depend on the image size (all but the text encoder)."""
        return any(d in (LATENT_H, PIXEL_H) for t in self.inputs for d in t.shape)

    def dynamic_axes(self, static: bool = False) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes per tensor; `static` keeps only the batch and text axes dynamic."""
        return {t.name: {a: d for a, d in enumerate(t.shape)
                         if isinstance(d, str) and (d in (BATCH, TOKENS) or not static)}
                for t in self.inputs + self.outputs}

    @property
    def takes_text(self) -> bool:
        """Whether it attends to the text (the T axis: UNet, ControlNet)."""
        return any(TOKENS in t.shape for t in self.inputs)

    def shapes(self, batch: int, height: int, width: int, chunks: int = 1) -> dict[str, tuple[int, ...]]:
        """Every input and output shape for `batch` rows at height x width image pixels (and a
        text of `chunks` chunks)."""
        f = self.vae_factor
        sizes = {BATCH: batch, PIXEL_H: height, PIXEL_W: width, LATENT_H: height // f, LATENT_W: width // f,
                 TOKENS: chunks * self.chunk_tokens}
        return {t.name: t.shape_for(sizes) for t in self.inputs + self.outputs}

    def _sizes(self, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for t in self.inputs:
            if t.name in inputs:
                sizes.update((d, n) for d, n in zip(t.shape, inputs[t.name].shape, strict=True) if isinstance(d, str))
        return sizes

    def dims(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
        """(batch, height, width in image pixels, text chunks) of a call (height and width 0
        for the text encoder; chunks 1 for networks without the text axis)."""
        return self._dims(self._sizes(inputs))

    def _dims(self, sizes: dict[str, int]) -> tuple[int, int, int, int]:
        f = self.vae_factor
        return (sizes[BATCH], sizes.get(PIXEL_H, sizes.get(LATENT_H, 0) * f),
                sizes.get(PIXEL_W, sizes.get(LATENT_W, 0) * f), -(-sizes.get(TOKENS, 1) // self.chunk_tokens))

    def sample_inputs(self, batch: int, height: int, width: int, precision: torch.dtype,
                      chunks: int = 1) -> tuple[torch.Tensor, ...]:
        """Inputs to trace or check the network with, in input order."""
        shapes, out = self.shapes(batch, height, width, chunks), []
        for t in self.inputs:
            if t.kind == INT64:
                out.append(torch.zeros(shapes[t.name], dtype=torch.int64))
            elif t.sample is not None:
                out.append(torch.full(shapes[t.name], t.sample, dtype=t.dtype(precision)))
            else:
                out.append(torch.randn(shapes[t.name], generator=torch.Generator().manual_seed(0)).to(
                    t.dtype(precision)))
        return tuple(out)

    def cast(self, inputs: dict[str, torch.Tensor], device: torch.device,
             precision: torch.dtype) -> dict[str, torch.Tensor]:
        """The inputs in spec order, each in its dtype on `device` (contiguous)."""
        return {t.name: inputs[t.name].to(device, t.dtype(precision)).contiguous() for t in self.inputs}

    def refuses(self, profile, inputs: dict[str, torch.Tensor]) -> str | None:
        """The one shape check of every engine: why a call is outside the engine's shape
        profile, or gives an input the engine does not take (None if the engine serves it)."""
        unknown = [n for n in inputs if n not in self.input_names]
        if unknown:
            if unknown[0].startswith(RESIDUAL_PREFIXES):
                return "built without the ControlNet residual inputs (export it with --controlnet)"
            if unknown[0].startswith(IP_PREFIXES):
                return "built without the inputs of this many IP-Adapters (export it with --ip-adapter)"
            return f"it takes no input {unknown[0]!r}"
        for t in self.inputs:  # fixed axes (an IP-Adapter's token count)
            shape = inputs[t.name].shape if t.name in inputs else None
            if shape is not None and any(isinstance(d, int) and d != n for d, n in zip(t.shape, shape, strict=False)):
                return f"its input {t.name} is {tuple(t.shape)}, not {tuple(shape)}"
        sizes = self._sizes(inputs)
        batch, height, width, _ = self._dims(sizes)
        most = profile.max_batch * (2 if self.cfg_doubled else 1)
        if not profile.min_batch <= batch <= most:
            return f"batch {batch} outside the engine's 1..{most}"
        tokens = sizes.get(TOKENS)
        if tokens is not None and (tokens % self.chunk_tokens or tokens > profile.max_chunks * self.chunk_tokens):
            return (f"a text of {tokens} tokens; the engine takes {self.chunk_tokens} per chunk, up to "
                    f"{profile.max_chunks} chunk{'s' if profile.max_chunks > 1 else ''} (a longer prompt)")
        if not self.sized:
            return None
        if profile.static:
            if (height, width) != (profile.opt_size, profile.opt_width):
                return f"size {height}x{width} is not the engine's static {profile.opt_size}x{profile.opt_width}"
            return None
        if not (profile.min_size <= height <= profile.max_size and profile.min_size <= width <= profile.max_size):
            return f"size {height}x{width} outside the engine's {profile.min_size}..{profile.max_size}"
        return None

    def profile_shapes(self, profile) -> dict[str, tuple[tuple, tuple, tuple]]:
        """TensorRT optimization-profile shapes (min, opt, max) of each input."""
        doubled = 2 if self.cfg_doubled else 1
        lo_h, lo_w, hi_h, hi_w = profile.min_size, profile.min_size, profile.max_size, profile.max_size
        if profile.static:
            lo_h = hi_h = profile.opt_size
            lo_w = hi_w = profile.opt_width
        lo = self.shapes(profile.min_batch, lo_h, lo_w)
        opt = self.shapes(profile.opt_batch * doubled, profile.opt_size, profile.opt_width)
        hi = self.shapes(profile.max_batch * doubled, hi_h, hi_w, profile.max_chunks)
        return {name: (lo[name], opt[name], hi[name]) for name in self.input_names}


DOWN_RESIDUAL, MID_RESIDUAL = "down_residual_", "mid_residual"  # the ControlNet residuals' names
RESIDUAL_PREFIXES = (DOWN_RESIDUAL, MID_RESIDUAL)
IP_TOKENS, IP_SCALE = "ip_tokens_", "ip_scale_"  # the IP-Adapters' UNet inputs, one of each per adapter
IP_PREFIXES = (IP_TOKENS, IP_SCALE)


def ip_adapter_specs(tokens: tuple[int, ...], layers: int, width: int) -> tuple[TensorSpec, ...]:
    """The UNet inputs of IP-Adapters giving `tokens[k]` image tokens each (optional inputs):
    ip_tokens_k (B, tokens[k], width), the projected image prompt, and ip_scale_k (layers,)
    float32, its scale at each of the UNet's `layers` cross-attention layers (zeros: no image
    prompt, exactly)."""
    out: tuple[TensorSpec, ...] = ()
    for k, n in enumerate(tokens):
        out += (TensorSpec(f"{IP_TOKENS}{k}", (BATCH, n, width), optional=True),
                TensorSpec(f"{IP_SCALE}{k}", (layers,), FLOAT32, sample=1.0, optional=True))
    return out


def with_ip_inputs(spec, tokens: tuple[int, ...], layers: int):
    """The UNet spec whose optional inputs are the ControlNet residuals, then the inputs of
    adapters giving `tokens` image tokens each (none: no adapter)."""
    residuals = tuple(t for t in spec.optional_inputs if not t.name.startswith(IP_PREFIXES))
    width = spec.inputs[2].shape[-1]  # encoder_hidden_states (B, T, D): the tokens' width
    return replace(spec, optional_inputs=residuals + ip_adapter_specs(tokens, layers, width))


def record_ip_inputs(spec, record: dict):
    """The UNet spec with the IP-Adapter inputs an engine's manifest record says it takes."""
    if not record.get("ip_tokens"):
        return spec
    return with_ip_inputs(spec, tuple(record["ip_tokens"]), int(record["ip_layers"]))


def image_encoder_spec(name: str, size: int, embeds: int, tokens: int, hidden: int) -> NetworkSpec:
    """A CLIP vision encoder's: pixel_values (B, 3, size, size), CLIP-normalised -> image_embeds
    (B, embeds), the projected pooled output, and image_hidden_states (B, tokens, hidden), the
    penultimate layer's hidden states (what IP-Adapter Plus reads)."""
    return NetworkSpec(name, (TensorSpec("pixel_values", (BATCH, 3, size, size)),),
                       (TensorSpec("image_embeds", (BATCH, embeds)),
                        TensorSpec("image_hidden_states", (BATCH, tokens, hidden))), False, 1)


def guidance_embedding_spec(width: int) -> TensorSpec:
    """A guidance-distilled UNet's input: the guidance scale's embedding (fastsd.guidance.guidance_embedding)."""
    return TensorSpec("timestep_cond", (BATCH, width))


def residual_specs(unet_config) -> tuple[TensorSpec, ...]:
    """The ControlNet residuals a UNet of this config takes (optional inputs, in diffusers'
    order): one per skip connection of its down path (conv_in's output, each down block's
    resnets, then its downsampler, all but the last level), then the mid block's output."""
    chans = list(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    layers = [layers] * len(chans) if isinstance(layers, int) else list(layers)
    skips = [(chans[0], 0)]
    for level, width in enumerate(chans):
        skips += [(width, level)] * layers[level]
        if level < len(chans) - 1:
            skips.append((width, level + 1))
    skips.append((chans[-1], len(chans) - 1))

    def spec(name: str, width: int, level: int) -> TensorSpec:
        return TensorSpec(name, (BATCH, width, latent_axis(LATENT_H, level), latent_axis(LATENT_W, level)),
                          optional=True)

    return tuple(spec(f"{DOWN_RESIDUAL}{k}" if k < len(skips) - 1 else MID_RESIDUAL, w, lv)
                 for k, (w, lv) in enumerate(skips))


def controlnet_spec(info, extra_unet_inputs: tuple[TensorSpec, ...], residuals: tuple[TensorSpec, ...],
                    conditioning_channels: int = 3) -> NetworkSpec:
    """A ControlNet's spec: the UNet's sample (latent channels: a 9-channel UNet's ControlNet
    takes the 4-channel latents), timestep, text and family inputs, plus the conditioning
    image and its scale; the residuals out, as the UNet takes them."""
    text = (BATCH, TOKENS, info.cross_attention_dim)
    inputs = (TensorSpec("sample", (BATCH, info.latent_channels, LATENT_H, LATENT_W)),
              TensorSpec("timestep", (BATCH,), FLOAT32, sample=500.0),
              TensorSpec("encoder_hidden_states", text),
              TensorSpec("controlnet_cond", (BATCH, conditioning_channels, PIXEL_H, PIXEL_W), sample=0.5),
              TensorSpec("conditioning_scale", (1,), FLOAT32, sample=1.0)) + tuple(extra_unet_inputs)
    outputs = tuple(replace(t, optional=False) for t in residuals)
    return NetworkSpec("controlnet", inputs, outputs, True, info.vae_factor, chunk_tokens=info.max_tokens)


def network_specs(info, extra_unet_inputs: tuple[TensorSpec, ...] = (),
                  text_encoders: dict[str, tuple[int, int]] | None = None,
                  residuals: tuple[TensorSpec, ...] = ()) -> dict[str, NetworkSpec]:
    """The networks' specs for a checkpoint. `extra_unet_inputs` are the model family's UNet
    inputs after sample, timestep, encoder_hidden_states; `residuals` the ControlNet
    residuals the UNet may also take (`residual_specs`); `text_encoders` maps each text
    encoder to (hidden width, pooled width or 0): one with a pooled output also returns
    text_embeds (B, pooled). Default: SD's one encoder."""
    f, c = info.vae_factor, info.latent_channels
    text = (BATCH, TOKENS, info.cross_attention_dim)
    latent = TensorSpec("latent", (BATCH, c, LATENT_H, LATENT_W))
    images = TensorSpec("images", (BATCH, 3, PIXEL_H, PIXEL_W))
    specs = {}
    for name, (width, pooled) in (text_encoders or {"text_encoder": (info.cross_attention_dim, 0)}).items():
        outputs = (TensorSpec("text_embeddings", (BATCH, info.max_tokens, width)),)
        if pooled:
            outputs += (TensorSpec("text_embeds", (BATCH, pooled)),)
        inputs = (TensorSpec("inputs_embeds", (BATCH, info.max_tokens, width)),)
        if pooled:  # where the pooled output is read: the end of text (fastsd.families.eos_mask)
            inputs += (TensorSpec("eos_mask", (BATCH, info.max_tokens), sample=1.0 / info.max_tokens),)
        specs[name] = NetworkSpec(name, inputs, outputs, True, f)
    return specs | {
        "unet": NetworkSpec("unet", (TensorSpec("sample", (BATCH, info.unet_in_channels, LATENT_H, LATENT_W)),
                                     TensorSpec("timestep", (BATCH,), FLOAT32, sample=500.0),
                                     TensorSpec("encoder_hidden_states", text)) + tuple(extra_unet_inputs),
                            (latent,), True, f, optional_inputs=tuple(residuals), chunk_tokens=info.max_tokens),
        "vae_encoder": NetworkSpec("vae_encoder", (images,), (  # a tiny autoencoder's gives the latents
            TensorSpec("latents", (BATCH, c, LATENT_H, LATENT_W)) if getattr(info, "tiny_vae", False) else
            TensorSpec("latent_moments", (BATCH, 2 * c, LATENT_H, LATENT_W)),), False, f),
        "vae_decoder": NetworkSpec("vae_decoder", (latent,), (images,), False, f),
    }


def weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A network module's weights (parameters and buffers) by the names its ONNX graph and
    compiled package give them."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """How far a network output is from a reference: max |got - want| / max |want|, in
    float64; inf where `got` holds NaN or inf (which no bound may let through)."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
