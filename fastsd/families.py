"""Model families: what differs between SD 1.x/2.x and its successors lives here.

A family owns prompt encoding (tokenizers, text encoders, pooled embeddings) and the
extra inputs its UNet takes; the pipeline asks it for the UNet's conditioning inputs and
never branches on the family. Today: Stable Diffusion 1.x/2.x (one CLIP tokenizer and
text encoder; the UNet takes only the text embeddings). SD-XL adds a second encoder and
`text_embeds` / `time_ids` through `extra_unet_inputs` and `encode`.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
from torch import nn

from .networks import NetworkSpec, TensorSpec, UNet, network_specs, wrap

log = logging.getLogger(__name__)

SHOWN_CHARS = 100  # of dropped prompt text in the truncation warning


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return repr(text) if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


class StableDiffusion:
    """SD 1.x / 2.x (epsilon or v), inpainting variants included."""

    name = "sd"
    extra_unet_inputs: tuple[TensorSpec, ...] = ()  # only sample, timestep, encoder_hidden_states
    unet_module: type[nn.Module] = UNet  # forward arguments: the UNet spec's inputs, in order

    def __init__(self, info, tokenizer):
        self.info, self.tokenizer = info, tokenizer
        self.specs: dict[str, NetworkSpec] = network_specs(info, self.extra_unet_inputs)
        self._lock = threading.Lock()  # tokenizers keep truncation/padding state between calls

    def modules(self, ckpt, clip_skip: int = 0) -> dict[str, nn.Module]:
        """The four networks as modules named and ordered like their specs."""
        return wrap(ckpt, clip_skip, self.unet_module)

    def token_ids(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """(len(texts), 77) int64, truncated with a warning that shows what was dropped."""
        n = self.info.max_tokens
        with self._lock:
            ids = self.tokenizer(texts, padding="max_length", max_length=n, truncation=True,
                                 return_tensors="pt").input_ids
            for text in dict.fromkeys(texts):  # each distinct prompt once, in order
                full = self.tokenizer(text, truncation=False, verbose=False).input_ids  # [BOS, ..., EOS]
                if len(full) > n:
                    dropped = self.tokenizer.decode(full[n - 1:-1])
                    log.warning("prompt longer than %d tokens was truncated; %d tokens dropped: %s",
                                n, len(full) - n, _shorten(dropped))
        return ids.to(device)

    def encode(self, text_encoder: Callable, prompts: list[str], negatives: list[str], do_cfg: bool, n: int,
               device: torch.device, prompt_embeds: torch.Tensor | None = None,
               negative_prompt_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs: encoder_hidden_states (B*n, 77, D), or with CFG
        (2*B*n, 77, D) [uncond; cond]. Prompts and negatives are encoded in two calls, as
        diffusers does (CPU kernels round a batch of 2B differently). Embeddings given by
        the caller are used as they are (diffusers' prompt_embeds / negative_prompt_embeds)."""
        if prompt_embeds is not None:
            emb = prompt_embeds.to(device).float()
        else:
            emb = text_encoder(self.token_ids(prompts, device))
        if do_cfg:
            if negative_prompt_embeds is not None:
                neg = negative_prompt_embeds.to(device).float()
            else:
                neg = text_encoder(self.token_ids(negatives, device))
            emb = torch.cat([neg, emb])
        return {"encoder_hidden_states": emb.repeat_interleave(n, dim=0)}  # per prompt: n copies, as diffusers


def family_for(ckpt) -> StableDiffusion:
    """The family of a loaded checkpoint (every checkpoint fastsd loads today is SD 1.x/2.x)."""
    return StableDiffusion(ckpt.info, ckpt.tokenizer)
