"""Eager PyTorch backend: the reference, and the fallback for any missing engine.

On CUDA: fp16/bf16 weights, channels-last UNet and VAE, PyTorch SDPA attention
(diffusers' default attention processor), all under inference_mode. The eager-only
options live here: attention slicing, the UNet-only CUDA graphs, and the fp32 VAE
decoder the pipeline retries with when a lower precision overflows.
"""

from __future__ import annotations

import copy
import threading

import torch

from ..networks import NETWORKS, TextEncoder, VaeDecoder
from . import Networks, record


class EagerBackend(Networks):
    def __init__(self, ckpt, family, device: torch.device, dtype: torch.dtype, clip_skip: int = 0,
                 cuda_graphs: bool = False, attention_slicing: bool = False):
        self.ckpt, self.specs, self.device, self.dtype = ckpt, family.specs, device, dtype
        self.clip_skip = clip_skip
        if attention_slicing:  # attention computed in slices (diffusers' "auto"): less memory, slower
            ckpt.unet.set_attention_slice("auto")
        self.modules = {k: m.to(device=device, dtype=dtype).eval() for k, m in family.modules(ckpt, clip_skip).items()}
        if device.type == "cuda":
            for k in ("unet", "vae_encoder", "vae_decoder"):
                self.modules[k].to(memory_format=torch.channels_last)
        self._graphed_unet = None
        if cuda_graphs:  # one graph per input shape, captured on first use
            from .cuda_graphs import GraphedCall

            names = self.specs["unet"].input_names
            self._graphed_unet = GraphedCall(
                lambda *args: self._forward("unet", dict(zip(names, args, strict=True))))
        self.backends = {k: "eager" for k in NETWORKS}
        self._vae_fp32: VaeDecoder | None = None
        self._lock = threading.Lock()

    def _forward(self, network: str, args: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return self.modules[network](**args)

    def run(self, network: str, inputs: dict[str, torch.Tensor], ran: dict | None = None) -> torch.Tensor:
        record(ran, network, "eager")
        args = self.specs[network].cast(inputs, self.device, self.dtype)
        if network == "unet" and self._graphed_unet is not None and not torch.cuda.is_current_stream_capturing():
            return self._graphed_unet(*args.values())  # inside a whole-step capture the UNet is captured with it
        return self._forward(network, args).float()

    def text_encoder_for(self, clip_skip: int | None):
        """The text encoder giving the embeddings of CLIP layer -(clip_skip + 1) (None: the
        load-time clip_skip); any clip_skip runs here, on the same weights."""
        if clip_skip is None or clip_skip == self.clip_skip:
            return self.text_encoder
        module = TextEncoder(self.modules["text_encoder"].clip, clip_skip)

        def encode(input_ids: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor:
            record(ran, "text_encoder", "eager")
            args = self.specs["text_encoder"].cast({"input_ids": input_ids}, self.device, self.dtype)
            with torch.inference_mode():
                return module(**args).float()

        return encode

    def vae_decoder_fp32(self, latent: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor:
        with self._lock:  # built once, on the first overflow
            if self._vae_fp32 is None:
                self._vae_fp32 = VaeDecoder(copy.deepcopy(self.ckpt.vae)).to(self.device, torch.float32).eval()
        record(ran, "vae_decoder", "eager-fp32")
        with torch.inference_mode():
            return self._vae_fp32(latent.to(self.device, torch.float32))
