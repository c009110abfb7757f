"""Image prompts on a pipeline: the IP-Adapter methods (diffusers' load_ip_adapter,
set_ip_adapter_scale, unload_ip_adapter) and what a call's `ip_adapter_image` /
`ip_adapter_image_embeds` give the UNet (fastsd/ip_adapter.py has the adapters themselves).

A call's image prompt is encoded once, before the loop, as diffusers' StableDiffusion
pipelines encode it: the image through the CLIP image encoder (the pooled embedding, or for
Plus / Full-face the penultimate hidden states), the unconditional one a zero embedding (or a
black image's hidden states), both through the adapter's projection as one batch of
[uncond x rows; cond x rows]. The UNet gets the tokens and each adapter's per-layer scales.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .arguments import bad_value
from .errors import CheckpointError, InvalidArgumentError
from .image_encoders import ImageEncoders, encoder_names
from .images import load_image
from .ip_adapter import (
    PLAIN,
    PLUS,
    LoadedEncoder,
    adapter_file,
    clip_pixels,
    cross_attention_layers,
    install,
    ip_weights,
    layer_scales,
    layer_weights,
    load_image_encoder,
    projection,
    projection_widths,
    read_adapter,
    variant_of,
)
from .model_files import fingerprint
from .networks import IP_SCALE, IP_TOKENS, with_ip_inputs

log = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    """One IP-Adapter of a pipeline: its projection, image encoder and scale per layer."""

    source: str
    fingerprint: str  # of its weight file
    variant: str  # ip_adapter.PLAIN | PLUS | FULL
    projection: torch.nn.Module
    encoder: LoadedEncoder
    tokens: int  # image tokens per image prompt
    scale: torch.Tensor  # (L,) float32: its scale at each cross-attention layer
    network: str = "image_encoder"  # its encoder's network (image_encoder_2, ... for another encoder)

    def describe(self) -> dict:
        return {"source": self.source, "variant": self.variant, "tokens": self.tokens,
                "image_encoder": self.encoder.source, "fingerprint": self.fingerprint}


def _as_list(value, count: int, what: str) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) == 1:
        items = items * count
    if len(items) != count:
        raise InvalidArgumentError(f"{len(items)} values for {count} IP-Adapters", what)
    return items


def read_adapters(paths, subfolder, weight_name, image_encoder, unet, width: int, allow_pickle: bool,
                  local_files_only: bool) -> list[tuple]:
    """Each adapter read and checked against the UNet (its layers) and its image encoder (its
    width): (LoadedAdapter without a scale, per-layer projections). Nothing changes yet."""
    paths = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    if not paths:
        raise InvalidArgumentError("no IP-Adapter given", "pretrained_model_name_or_path_or_dict")
    names = _as_list(weight_name, len(paths), "weight_name")
    subs = _as_list(subfolder, len(paths), "subfolder")
    encoders = _as_list(image_encoder, len(paths), "image_encoder")
    loaded, seen = [], {}
    for path, sub, name, enc in zip(paths, subs, names, encoders, strict=True):
        if isinstance(path, dict):
            raise InvalidArgumentError("fastsd loads IP-Adapters from files (a state dict cannot be fingerprinted "
                                       "for the engine store): save it as .safetensors",
                                       "pretrained_model_name_or_path_or_dict")
        file = adapter_file(path, sub, name, local_files_only)
        proj_sd, layers = read_adapter(file, allow_pickle)
        variant = variant_of(proj_sd, layers, file)
        proj = projection(variant, proj_sd)
        per_layer = layer_weights(layers, unet, file)
        reads, out_width = projection_widths(variant, proj)
        if out_width != width:
            raise CheckpointError(f"the IP-Adapter {file.name} gives {out_width}-wide image tokens; this UNet "
                                  f"attends to {width}-wide text (an adapter for another model family?)")
        key = (str(enc) if isinstance(enc, (str, Path)) else id(enc)) if enc is not None else str(file.parent)
        if key not in seen:  # adapters sharing an encoder (the same files) share one
            new = load_image_encoder(enc, file, sub, allow_pickle, local_files_only)
            seen[key] = next((e for e in seen.values() if e.fingerprint == new.fingerprint), new)
        encoder = seen[key]
        config = encoder.model.config
        feature = int(config.projection_dim) if variant == PLAIN else int(config.hidden_size)
        if reads != feature:
            raise CheckpointError(f"the IP-Adapter {file.name} reads {reads}-wide image "
                                  f"features; the image encoder {encoder.source} gives {feature} (pass the encoder "
                                  "it was trained with: image_encoder=)")
        tokens = _token_count(variant, proj, config)
        loaded.append((LoadedAdapter(str(path), fingerprint([file], file.parent), variant, proj, encoder, tokens,
                                     torch.zeros(0)), per_layer))
    return loaded


def _token_count(variant: str, proj, config) -> int:
    if variant == PLAIN:
        return proj.num_image_text_embeds
    if variant == PLUS:
        return proj.latents.shape[1]
    return (int(config.image_size) // int(config.patch_size)) ** 2 + 1  # every patch token and the class token


def ip_facts(family, spec) -> dict:
    """A UNet engine's manifest facts about its IP-Adapter inputs: each adapter's token count,
    the cross-attention layers, and the adapters whose projections its files hold."""
    adapters = getattr(family, "ip_adapters", ())
    if not adapters or not any(n.startswith(IP_TOKENS) for n in spec.input_names):
        return {}
    layers = next(t.shape[0] for t in spec.inputs if t.name.startswith(IP_SCALE))
    return {"ip_tokens": [a.tokens for a in adapters], "ip_layers": layers,
            "ip_adapters": [a.fingerprint for a in adapters]}


def attach_adapters(ckpt, family, paths, allow_pickle: bool = False) -> tuple[LoadedAdapter, ...]:
    """IP-Adapters (files or folders with one adapter each) installed in the checkpoint's UNet
    and the family's UNet spec, for a build: its UNet takes their inputs."""
    unet = ckpt.unet
    loaded = read_adapters(list(paths), None, None, None, unet, ckpt.info.cross_attention_dim, allow_pickle, False)
    install(unet, [layers for _, layers in loaded])
    family.ip_adapters = tuple(a for a, _ in loaded)
    family.specs["unet"] = with_ip_inputs(family.specs["unet"], tuple(a.tokens for a in family.ip_adapters),
                                          len(cross_attention_layers(unet)))
    family.image_encoders = distinct_encoders(family.ip_adapters)
    family.specs.update((n, e.spec(n)) for n, e in family.image_encoders.items())
    family.networks = tuple(n for n in family.networks if n not in family.image_encoders) + tuple(
        family.image_encoders)
    return family.ip_adapters


def distinct_encoders(adapters) -> dict:
    """The adapters' image encoders by network name (adapters sharing one share the network)."""
    by_print = {a.encoder.fingerprint: a.encoder for a in adapters}
    return dict(zip(encoder_names(len(by_print)), by_print.values(), strict=True))


class ImagePromptMethods:
    """Pipeline's IP-Adapter methods (a mixin of fastsd/pipeline.py's Pipeline)."""

    _ip: tuple[LoadedAdapter, ...] = ()
    _image_encoders: ImageEncoders | None = None  # the adapters' image encoder networks
    _store: tuple | None = None  # (backend, engine_dir) from_pretrained loaded from: where their engines are

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, subfolder=None, weight_name=None,
                        image_encoder=None, image_encoder_folder=None, allow_pickle: bool | None = None,
                        local_files_only: bool = False) -> None:
        """Load IP-Adapters (replacing any loaded): a file, or a folder / hub id with `subfolder`
        and `weight_name` (as diffusers: h94/IP-Adapter, subfolder="models",
        weight_name="ip-adapter_sd15.safetensors"); lists load several. The CLIP image encoder
        is `image_encoder` (a folder, hub id or CLIPVisionModelWithProjection), else
        `image_encoder_folder` of the repository, else the image_encoder/ folder beside the file
        or its folder. Plain, Plus and Full-face adapters; Face-ID ones are refused. Their
        projections become UNet weights (engines built with IP-Adapter inputs are refitted);
        calls then take `ip_adapter_image` (one per adapter). Scale 1.0 until set_ip_adapter_scale."""
        allow_pickle = getattr(self, "_allow_pickle", False) if allow_pickle is None else allow_pickle
        t0 = time.perf_counter()
        paths = pretrained_model_name_or_path_or_dict
        if image_encoder is None and image_encoder_folder is not None:
            base = paths[0] if isinstance(paths, (list, tuple)) else paths
            sub = subfolder[0] if isinstance(subfolder, (list, tuple)) else subfolder
            image_encoder = Path(base) / (image_encoder_folder if "/" in image_encoder_folder or not sub
                                          else Path(sub) / image_encoder_folder)
        unet = self.ckpt.unet
        loaded = read_adapters(paths, subfolder, weight_name, image_encoder, unet, self.info.cross_attention_dim,
                               allow_pickle, local_files_only)
        names = cross_attention_layers(unet)
        encoders = distinct_encoders([a for a, _ in loaded])
        network = {e.fingerprint: n for n, e in encoders.items()}
        networks = ImageEncoders(encoders, self.device, self.dtype, self._store, self.precision)
        with self._weights_lock.exclusive("load_ip_adapter"):
            install(unet, [layers for _, layers in loaded])
            self._ip = tuple(replace(a, scale=layer_scales(1.0, names), network=network[a.encoder.fingerprint],
                                     projection=a.projection.to(self.device, self.dtype)) for a, _ in loaded)
            self._image_encoders = networks
            self._ip_specs()
            self._ip_refit()
        log.info("IP-Adapter %s loaded in %.2fs", ", ".join(a.source for a in self._ip), time.perf_counter() - t0)

    def set_ip_adapter_scale(self, scale) -> None:
        """Each adapter's scale: a number, diffusers' per-block dict ({"down": {"block_2": [0.0,
        1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}: InstantStyle's), or a list, one per adapter."""
        if not self._ip:
            raise InvalidArgumentError("no IP-Adapter is loaded: pipe.load_ip_adapter(...) first", "scale")
        names = cross_attention_layers(self.ckpt.unet)
        scales = _as_list(scale, len(self._ip), "scale")
        self._ip = tuple(replace(a, scale=layer_scales(s, names)) for a, s in zip(self._ip, scales, strict=True))

    def unload_ip_adapter(self) -> None:
        """Remove the IP-Adapters: the UNet's cross-attention layers are their own again."""
        if not self._ip:
            return
        with self._weights_lock.exclusive("unload_ip_adapter"):
            install(self.ckpt.unet, [])
            self._ip, self._image_encoders = (), None
            self._ip_specs()
            self._reset_graphs()

    @property
    def ip_adapters(self) -> list[dict]:
        return [a.describe() for a in self._ip]

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds=None, device=None,
                                        num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True):
        """diffusers' method: each adapter's image features, (n, m, ...) or with guidance (2n, m,
        ...) [uncond; cond], to pass back as ip_adapter_image_embeds (embeds given: repeated so)."""
        req = ip_options({"ip_adapter_image": ip_adapter_image, "ip_adapter_image_embeds": ip_adapter_image_embeds},
                         len(self._ip), 1, do_classifier_free_guidance)
        out = []
        for k, adapter in enumerate(self._ip):
            if ip_adapter_image_embeds is not None:
                cond, uncond = _given_embeds(req["ip_embeds"][k], do_classifier_free_guidance)
            else:
                cond, uncond = self._encode(adapter, req["ip_images"][k], do_classifier_free_guidance, None)
            rows = [cond] * num_images_per_prompt
            if do_classifier_free_guidance:
                rows = [uncond] * num_images_per_prompt + rows
            out.append(torch.cat(rows).to(device or self.device))
        return out

    def _ip_moved(self) -> None:
        """After pipe.to(): the adapters' projections and image encoders on the new device and
        dtype (the UNet's processors moved with it), the new backend's engines given them."""
        if not self._ip:
            return
        self._ip = tuple(replace(a, projection=a.projection.to(self.device, self.dtype)) for a in self._ip)
        self._image_encoders = ImageEncoders(self._image_encoders.encoders, self.device, self.dtype,
                                             self._store, self.precision)
        self._ip_refit()

    def _ip_specs(self) -> None:
        self.family.specs["unet"] = with_ip_inputs(self.family.specs["unet"], tuple(a.tokens for a in self._ip),
                                                   len(cross_attention_layers(self.ckpt.unet)))

    def _ip_refit(self) -> None:
        """Engines built with IP-Adapter inputs take the loaded adapters' projections (by refit);
        others hold no such weights and are left as they are."""
        if self._ip:
            self.backend.set_weights("unet", ip_weights(self.ckpt.unet), False, tuple(a.fingerprint for a in self._ip))
        self._reset_graphs()

    def _ip_inputs(self, req, rows: int, device: torch.device, ran: dict | None = None) -> dict[str, torch.Tensor]:
        """The UNet's ip_tokens_k / ip_scale_k for a call with an image prompt (none without):
        (rows, tokens, D) each, [uncond; cond] halves with CFG."""
        if not req.ip_images and not req.ip_embeds:
            return {}
        if len(req.ip_images or req.ip_embeds) != len(self._ip):  # load_ip_adapter ran since the call was checked
            raise InvalidArgumentError(f"the call has {len(req.ip_images or req.ip_embeds)} image prompts; "
                                       f"{len(self._ip)} IP-Adapters are loaded now", "ip_adapter_image")
        out = {}
        for k, adapter in enumerate(self._ip):
            if req.ip_embeds:
                cond, uncond = _given_embeds(req.ip_embeds[k], req.do_cfg)
            else:
                cond, uncond = self._encode(adapter, req.ip_images[k], req.do_cfg, ran)
            half = rows // 2 if req.do_cfg else rows
            embeds = _rows(cond, half, req.n)
            if req.do_cfg:
                embeds = torch.cat([_rows(uncond, half, req.n), embeds])
            b, m = embeds.shape[:2]
            with torch.inference_mode():
                tokens = adapter.projection(embeds.to(self.device, self.dtype).flatten(0, 1))  # (b*m, T, D)
            out[f"{IP_TOKENS}{k}"] = tokens.reshape(b, m * tokens.shape[1], tokens.shape[2]).float()
            out[f"{IP_SCALE}{k}"] = adapter.scale.to(device)
        return out

    def _encode(self, adapter: LoadedAdapter, image, cfg: bool, ran: dict | None) -> tuple:
        """(cond, uncond) image features (1, m, ...) of one adapter's m images: the pooled
        embeddings (uncond: zeros), or for Plus / Full-face the penultimate hidden states
        (uncond: a black image's), as diffusers' encode_image."""
        encoders, size = self._image_encoders, adapter.encoder.size
        pixels = image if isinstance(image, torch.Tensor) else torch.cat([clip_pixels(i, size) for i in image])
        pixels = pixels.to(self.device)
        embeds, hidden = encoders.run(adapter.network, pixels, ran)
        if adapter.variant == PLAIN:
            return embeds[None], (torch.zeros_like(embeds)[None] if cfg else None)
        uncond = encoders.uncond(adapter.network, pixels).expand_as(hidden) if cfg else None
        return hidden[None], (None if uncond is None else uncond[None])


def _given_embeds(embeds: torch.Tensor, cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """diffusers' ip_adapter_image_embeds entry: (2b, m, ...) [uncond; cond] with CFG, else (b, m, ...)."""
    if not cfg:
        return embeds, None
    uncond, cond = embeds.chunk(2)
    return cond, uncond


def _rows(features: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """Image features of 1 row (repeated) or one per prompt (each n times) spread over `rows`."""
    if features.shape[0] == 1:
        return features.expand(rows, *features.shape[1:])
    return features.repeat_interleave(n, dim=0)


# ---- the call's arguments --------------------------------------------------------------------

def _images(item, what: str):
    """One adapter's image prompt: a PIL image, path or uint8 array (or a list of them: several
    images, their tokens concatenated, as diffusers), or CLIP pixel values (N, 3, S, S)."""
    if isinstance(item, torch.Tensor):
        if item.ndim != 4 or item.shape[1] != 3 or not torch.isfinite(item).all():
            raise bad_value(what, f"a tensor is taken as CLIP pixel values (N, 3, S, S); got {tuple(item.shape)}")
        return item.float()
    items = list(item) if isinstance(item, (list, tuple)) else [item]
    if not items:
        raise bad_value(what, "an empty list of images")
    out = []
    for i in items:
        if isinstance(i, (str, Path)):
            i = load_image(i)
        if isinstance(i, np.ndarray) and i.dtype == np.uint8 and i.ndim in (2, 3):
            i = Image.fromarray(i)
        if not isinstance(i, Image.Image):
            raise bad_value(what, f"must be a PIL image, a path or a uint8 array (or a list of them), not "
                                  f"{type(i).__name__}")
        out.append(i)
    return out


def ip_options(v: dict, count: int, prompts: int, cfg: bool) -> dict:
    """ip_adapter_image / ip_adapter_image_embeds checked into Request fields: one entry per
    loaded adapter (a list for several; one adapter also takes the entry alone)."""
    image, embeds = v.get("ip_adapter_image"), v.get("ip_adapter_image_embeds")
    if image is None and embeds is None:
        return {}
    what = "ip_adapter_image" if image is not None else "ip_adapter_image_embeds"
    if image is not None and embeds is not None:
        raise bad_value("ip_adapter_image", "and ip_adapter_image_embeds: pass one, not both",
                        "ip_adapter_image_embeds")
    if count == 0:
        raise bad_value(what, "needs an IP-Adapter: pipe.load_ip_adapter(...) first")
    if image is not None:
        items = list(image) if isinstance(image, (list, tuple)) else [image]  # as diffusers: a list is per adapter
        if len(items) != count:
            raise bad_value(what, f"holds {len(items)} entries for {count} IP-Adapters: one per adapter (a list of "
                                  "images for one adapter goes inside its entry)")
        return {"ip_images": tuple(_images(i, what) for i in items)}
    if not isinstance(embeds, (list, tuple)) or len(embeds) != count:
        raise bad_value(what, f"must be a list of {count} tensors (one per IP-Adapter)")
    for e in embeds:
        if not isinstance(e, torch.Tensor) or e.ndim not in (3, 4) or not torch.isfinite(e).all():
            raise bad_value(what, "each entry must be a finite 3-D or 4-D tensor ((batch, images, width) or "
                                  "(batch, images, tokens, width)), as diffusers' prepare_ip_adapter_image_embeds")
        rows = e.shape[0] // 2 if cfg else e.shape[0]
        if (cfg and e.shape[0] % 2) or rows not in (1, prompts):
            raise bad_value(what, f"has {e.shape[0]} rows: {'2 x ' if cfg else ''}1 or one per prompt "
                                  f"({'[uncond; cond] with guidance' if cfg else 'no guidance'})")
    return {"ip_embeds": tuple(e.float() for e in embeds)}
