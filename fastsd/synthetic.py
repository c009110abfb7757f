"""Random-weight checkpoints of the real SD architectures, made offline.

`synthetic:NAME` models are built once into the cache dir (diffusers format) and
reused. The compute of a full-size one equals the real checkpoint's, so latency
figures hold; the images are noise. The tokenizer is a byte-level CLIP BPE with no
merges (one token per character): same tokenizer class and special tokens as SD's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .archs import ARCHS, CONTROLNET_KEYS, arch
from .components import loading_bars
from .errors import ModelNotFoundError
from .paths import cache_dir
from .status import say

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_VERSION = 2  # bump when what build() writes changes (2: text encoders' final LayerNorm bias)
MAX_TOKENS = 77  # CLIP context length (tokenizer model_max_length)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 / CLIP)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tokenizer(out: Path, pad_token: str) -> None:
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad_token,
            model_max_length=MAX_TOKENS,
        )
        tok.save_pretrained(str(out))


def build(
    out: Path,
    arch_name: str = "tiny",
    *,
    seed: int = 0,
    unet_in_channels: int | None = None,  # 9 for an inpainting UNet
    scheduler: dict | None = None,  # overrides merged into the scheduler config
    vae_scaling_factor: float | None = None,
) -> Path:
    """Write a random-weight checkpoint of `arch_name` to `out` (diffusers format), atomically."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    loading_bars()  # the libraries' bars over writing the files, off where the CLI asked
    spec = arch(arch_name)
    if unet_in_channels is not None:
        spec["unet"]["in_channels"] = unet_in_channels
    if vae_scaling_factor is not None:
        spec["vae"]["scaling_factor"] = vae_scaling_factor
    sched = dict(spec["scheduler"], **(scheduler or {}))
    ids = {"bos_token_id": len(_bytes_to_unicode()) * 2, "eos_token_id": len(_bytes_to_unicode()) * 2 + 1}
    makers = {"unet": lambda: UNet2DConditionModel(**spec["unet"]), "vae": lambda: AutoencoderKL(**spec["vae"]),
              "text_encoder": lambda: _trained_norm(CLIPTextModel(CLIPTextConfig(**spec["text_encoder"], **ids)))}
    if "text_encoder_2" in spec:  # SD-XL: the second tower returns its projected pooled output too
        makers["text_encoder_2"] = lambda: _trained_norm(
            CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"], **ids)))
    with _atomic_folder(Path(out)) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for k, (name, make) in enumerate(makers.items(), 1):  # in this order: the weights depend on it
                say("synthetic %s: making and writing its %s (%d of %d)", arch_name, name, k, len(makers))
                make().save_pretrained(tmp / name)
        write_tokenizer(tmp / "tokenizer", spec["pad_token"])
        if "text_encoder_2" in spec:
            write_tokenizer(tmp / "tokenizer_2", spec["pad_token_2"])
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(sched["_class_name"], spec), indent=2))
    return Path(out)


def _trained_norm(clip):
    """A text encoder whose final LayerNorm has a random scale and shift, as a trained one has
    (freshly made, it has none, so every token's embedding averages exactly zero and A1111's
    prompt weighting, which rescales to a chunk's mean, would divide by rounding noise)."""
    import torch

    norm = getattr(clip, "text_model", clip).final_layer_norm
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.5)
    return clip


@contextmanager
def _atomic_folder(out: Path):
    """A temporary folder beside `out` to write into; it replaces `out` when the block ends
    without an error, and is removed when it raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Tiny autoencoders (TAESD, diffusers' AutoencoderTiny): `synthetic:taesd` has the released
# taesd / taesdxl architecture (diffusers' defaults: factor 8, 4 latent channels);
# `synthetic:taesd-tiny` matches the tiny test checkpoints (factor 2).
TINY_VAES = {
    "taesd": {},
    "taesd-tiny": {"encoder_block_out_channels": [16, 16], "decoder_block_out_channels": [16, 16],
                   "num_encoder_blocks": [1, 1], "num_decoder_blocks": [1, 1]},
}


def build_tiny_vae(out: Path, name: str = "taesd", *, seed: int = 0) -> Path:
    """Write a random-weight tiny autoencoder (a diffusers AutoencoderTiny folder) atomically."""
    import torch
    from diffusers import AutoencoderTiny

    with _atomic_folder(Path(out)) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            AutoencoderTiny(**TINY_VAES[name]).save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())  # as released TAESD configs: without the
        config.pop("block_out_channels", None)  # key AutoencoderTiny registers itself (and warns about on load)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(out)


CONTROLNET = "controlnet-"  # synthetic:controlnet-<arch>: a ControlNet for that architecture's UNet


def build_controlnet(out: Path, arch_name: str = "tiny", *, seed: int = 0) -> Path:
    """Write a random-weight ControlNet for `arch_name`'s UNet (a diffusers ControlNetModel
    folder) atomically. Its conditioning embedding reads the image at the VAE's factor (tiny
    architectures: 2), and the layers a trained ControlNet starts from zero (the zero
    convolutions) are random too, so its residuals change the image."""
    import torch
    from diffusers import ControlNetModel


    spec = arch(arch_name)
    factor = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    widths = {8: [16, 32, 96, 256], 2: [8, 16]}[factor]
    config = {k: v for k, v in spec["unet"].items() if k in CONTROLNET_KEYS}
    with _atomic_folder(Path(out)) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ControlNetModel(**config, conditioning_embedding_out_channels=widths)
            with torch.no_grad():
                for p in model.parameters():
                    if not p.any():
                        p.normal_(0.0, 0.05)
            model.save_pretrained(tmp)
    return Path(out)


IP_ADAPTER, IP_ADAPTER_PLUS = "ip-adapter-", "ip-adapter-plus-"  # synthetic:ip-adapter[-plus]-<arch>
IMAGE_ENCODERS = {  # CLIP vision towers: h94/IP-Adapter's models/image_encoder (ViT-H/14), and a tiny one
    "vit-h": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, projection_dim=16),
}
PLUS_RESAMPLERS = {"vit-h": dict(hidden_dims=768, heads=12, num_queries=16),  # h94's ip-adapter-plus_sd15
                   "tiny": dict(hidden_dims=64, heads=1, num_queries=4)}


def build_ip_adapter(out: Path, arch_name: str = "tiny", plus: bool = False, *, seed: int = 0) -> Path:
    """Write a random-weight IP-Adapter for `arch_name`'s UNet in the reference layout (as
    h94/IP-Adapter's files: ip-adapter[-plus].safetensors with image_proj.* and ip_adapter.N.*
    keys) with its CLIP image encoder in image_encoder/ (ViT-H/14 for full-size architectures;
    a tiny tower for tiny ones), atomically."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    loading_bars()
    unet_config, tower = arch(arch_name)["unet"], "tiny" if arch_name.startswith("tiny") else "vit-h"
    vision, width = IMAGE_ENCODERS[tower], unet_config["cross_attention_dim"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    layers = [unet.get_submodule(n[:-len(".processor")]) for n in unet.attn_processors if n.endswith("attn2.processor")]
    with _atomic_folder(Path(out)) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).save_pretrained(tmp / "image_encoder")
        if plus:
            proj = _reference_resampler(IPAdapterPlusImageProjection(
                embed_dims=vision["hidden_size"], output_dims=width, **PLUS_RESAMPLERS[tower]).state_dict())
        else:
            proj = {k.replace("image_embeds.", "proj."): v for k, v in ImageProjection(
                cross_attention_dim=width, image_embed_dim=vision["projection_dim"], num_image_text_embeds=4
            ).state_dict().items()}
        weights = {f"image_proj.{k}": v.contiguous() for k, v in proj.items()}
        for i, attn in enumerate(layers):
            for part in ("to_k_ip", "to_v_ip"):
                weights[f"ip_adapter.{2 * i + 1}.{part}.weight"] = torch.nn.Linear(
                    attn.to_k.in_features, attn.to_k.out_features, bias=False).weight.detach()
        save_file(weights, str(tmp / f"ip-adapter{'-plus' if plus else ''}.safetensors"))
    return Path(out)


def _reference_resampler(sd: dict) -> dict:
    """A diffusers IPAdapterPlusImageProjection's weights in the reference Resampler's names."""
    import torch

    names = (("ln0.", "0.norm1."), ("ln1.", "0.norm2."), ("attn.to_q.", "0.to_q."), ("attn.to_out.0.", "0.to_out."),
             ("ff.0.", "1.0."), ("ff.1.net.0.proj.", "1.1."), ("ff.1.net.2.", "1.3."))
    out = {}
    for k, v in sd.items():
        if not k.startswith("layers."):
            out[k] = v
            continue
        head, rest = k.split(".", 2)[:2], k.split(".", 2)[2]
        if rest.startswith("attn.to_v."):
            continue
        if rest.startswith("attn.to_k."):
            out[f"{'.'.join(head)}.0.to_kv.weight"] = torch.cat([v, sd[k.replace("to_k.", "to_v.")]])
            continue
        new = next(n + rest[len(o):] for o, n in names if rest.startswith(o))
        out[f"{'.'.join(head)}.{new}"] = v
    return out


def _model_index(scheduler_class: str, spec: dict) -> dict:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if "text_encoder_2" in spec:  # as stabilityai/stable-diffusion-xl-base-1.0's model_index.json
        for k in ("feature_extractor", "safety_checker", "requires_safety_checker"):
            index.pop(k)
        index.update(_class_name="StableDiffusionXLPipeline",
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"],
                     force_zeros_for_empty_prompt=spec["force_zeros_for_empty_prompt"])
    return index


def synthetic_names() -> dict[str, list[str]]:
    """Every `synthetic:NAME` there is, by what it is."""
    return {"checkpoints": list(ARCHS), "tiny autoencoders": list(TINY_VAES),
            "ControlNets": [CONTROLNET + a for a in ARCHS],
            "IP-Adapters": [p + a for a in ("tiny", "tiny2", "tiny-xl", "sd15") for p in (IP_ADAPTER, IP_ADAPTER_PLUS)]}


def synthetic_path(model: str, build_missing: bool = True) -> Path:
    """The folder of `synthetic:NAME`, built on first use (unless not `build_missing`)."""
    name = model[len(SYNTHETIC_PREFIX):]
    names = synthetic_names()
    controlnets, adapters = names["ControlNets"], names["IP-Adapters"]
    if not any(name in group for group in names.values()):
        raise ModelNotFoundError(f"unknown synthetic model {name!r}; choose one of "
                                 f"{', '.join(n for group in names.values() for n in group)}")
    path = cache_dir() / "synthetic" / f"{name}-v{SYNTHETIC_VERSION}"
    if name in adapters:
        plus = name.startswith(IP_ADAPTER_PLUS)
        if not (path / "image_encoder" / "config.json").exists() and build_missing:
            say("building the synthetic IP-Adapter %s at %s (random weights, once)", name, path)
            build_ip_adapter(path, name[len(IP_ADAPTER_PLUS if plus else IP_ADAPTER):], plus)
        return path
    if name in controlnets:
        if not (path / "config.json").exists() and build_missing:
            say("building the synthetic ControlNet %s at %s (random weights, once)", name, path)
            build_controlnet(path, name[len(CONTROLNET):])
        return path
    if name in TINY_VAES:
        if not (path / "config.json").exists() and build_missing:
            say("building the synthetic tiny autoencoder %s at %s (random weights, once)", name, path)
            build_tiny_vae(path, name)
        return path
    if not (path / "model_index.json").exists() and build_missing:
        say("building the synthetic checkpoint %s at %s (random weights, once; a full-size one takes minutes "
            "and several GB)", name, path)
        build(path, name)
    return path
