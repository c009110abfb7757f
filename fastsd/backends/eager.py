"""Eager PyTorch backend: the reference, and the fallback for any missing engine.

On CUDA: fp16/bf16 weights, channels-last UNet and VAE, PyTorch SDPA attention
(diffusers' default attention processor), all under inference_mode. The eager-only
options live here: attention slicing, the UNet-only CUDA graphs, and the fp32 VAE
decoder the pipeline retries with when a lower precision overflows.
"""

from __future__ import annotations

import copy
import threading
from functools import partial

import torch

from ..networks import vae_modules
from . import Networks, as_float, record
from .cuda_graphs import capturing


class EagerBackend(Networks):
    def __init__(self, ckpt, family, device: torch.device, dtype: torch.dtype, clip_skip: int = 0,
                 cuda_graphs: bool = False, attention_slicing: bool = False):
        self.ckpt, self.specs, self.device, self.dtype = ckpt, family.specs, device, dtype
        self.clip_skip = clip_skip
        if attention_slicing:  # attention computed in slices (diffusers' "auto"): less memory, slower
            ckpt.unet.set_attention_slice("auto")
        self.modules = {k: m.to(device=device, dtype=dtype).eval() for k, m in family.modules(ckpt, clip_skip).items()}
        if device.type == "cuda":
            for k in self.modules:
                if k in ("unet", "vae_encoder", "vae_decoder") or k.startswith("controlnet"):
                    self.modules[k].to(memory_format=torch.channels_last)
        self._graphed_unet = None
        if cuda_graphs:  # one graph per input shape, captured on first use outside a whole-step capture
            from .cuda_graphs import GraphedCall

            self._graphed_unet = GraphedCall(lambda *args: self._forward("unet", args))
        self.backends = {k: "eager" for k in family.networks}
        self._vae_fp32 = None
        self._with_inputs: dict = {}  # (network, input names) -> its spec with those optional inputs
        self._lock = threading.Lock()

    def _forward(self, network: str, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.inference_mode():
            return self.modules[network](*args)

    def run(self, network: str, inputs: dict[str, torch.Tensor], ran: dict | None = None) -> torch.Tensor:
        record(ran, network, "eager")
        spec = self.specs[network]
        if len(inputs) != len(spec.inputs):  # the UNet given ControlNet residuals too
            key = (network, frozenset(inputs))
            if key not in self._with_inputs:
                self._with_inputs[key] = spec.with_inputs(inputs)
            spec = self._with_inputs[key]
        args = tuple(spec.cast(inputs, self.device, self.dtype).values())
        if network == "unet" and self._graphed_unet is not None and not capturing():
            return self._graphed_unet(*args)  # a whole step being captured (or warmed up) holds the UNet
        return as_float(self._forward(network, args))

    def set_weights(self, network: str, weights: dict, at_base: bool) -> None:
        """Nothing to do: the modules are the checkpoint's, whose weights were changed (on a
        GPU in place, where a captured UNet graph reads them)."""

    def text_encoders_for(self, clip_skip: int | None) -> dict:
        """The text encoders giving the embeddings of the CLIP layer clip_skip selects (None:
        the load-time clip_skip); any clip_skip runs here, on the same weights."""
        names = [n for n in self.modules if n.startswith("text_encoder")]
        if clip_skip is None or clip_skip == self.clip_skip:
            return {n: partial(self._text, n, self.modules[n]) for n in names}
        return {n: partial(self._text, n, self.modules[n].with_clip_skip(clip_skip)) for n in names}

    def _text(self, network: str, module, input_ids: torch.Tensor, *, ran: dict | None = None):
        record(ran, network, "eager")
        args = self.specs[network].cast({"input_ids": input_ids}, self.device, self.dtype)
        with torch.inference_mode():
            return as_float(module(**args))

    def vae_decoder_fp32(self, latent: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor:
        with self._lock:  # built once, on the first overflow
            if self._vae_fp32 is None:
                self._vae_fp32 = vae_modules(copy.deepcopy(self.ckpt.vae))[1].to(self.device, torch.float32).eval()
        record(ran, "vae_decoder", "eager-fp32")
        with torch.inference_mode():
            return self._vae_fp32(latent.to(self.device, torch.float32))
