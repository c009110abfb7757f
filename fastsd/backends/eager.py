"""Eager PyTorch backend: the reference, and the fallback for any missing engine.

On CUDA: fp16/bf16 weights, channels-last UNet and VAE, PyTorch SDPA attention
(diffusers' default attention processor), all under inference_mode. The eager-only
options live here: attention slicing, the UNet-only CUDA graphs. `Fp32VaeDecoder` is the
VAE decoder in fp32, from the checkpoint's own weights, that every backend decodes with
where a lower precision overflows, or up front where the VAE's config says force_upcast.
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch

from ..networks import vae_modules
from . import Networks, as_float, record
from .cuda_graphs import capturing


@contextmanager
def _conv_search(on: bool) -> Iterator[None]:
    """cuDNN's algorithm search (`cudnn.benchmark`) for the block, where shapes are static (CUDA
    graphs): each new shape's convolutions are timed once and the fastest kept (restored after)."""
    if not on:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def channels_last(network: str) -> bool:
    """Whether eager runs `network` channels-last on CUDA (the convolutional ones: cuDNN's
    NHWC kernels are the fast ones on tensor cores)."""
    return network in ("unet", "vae_encoder", "vae_decoder") or network.startswith("controlnet")


class Fp32VaeDecoder:
    """The VAE decoder in fp32 made from the weights as loaded: made for a pipeline before any
    backend casts the checkpoint's modules, it keeps those weights (the fp32 tensors on the CPU:
    references, no copy, while nothing casts the live ones) and builds the fp32 module on the
    device of the first latents it decodes (again if they come on another device), once. A VAE
    not built yet (`Checkpoint.as_loaded`: a function building one from its files) is built
    for it then, apart from the live one, which may have been cast meanwhile."""

    def __init__(self, vae):
        self.vae, self.weights = None, None
        self._source = vae if callable(vae) and not isinstance(vae, torch.nn.Module) else None
        if self._source is None:
            self._keep(vae)
        self._module, self._lock = None, threading.Lock()

    def _keep(self, vae) -> None:
        self.vae = vae
        self.weights = {k: v.detach() for k, v in vae_modules(vae)[1].state_dict().items()}

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        with self._lock:
            if self.vae is None:
                self._keep(self._source().float().eval().requires_grad_(False))
            if self._module is None or next(self._module.parameters()).device != latent.device:
                module = copy.deepcopy(vae_modules(self.vae)[1]).to(latent.device, torch.float32)
                module.load_state_dict(self.weights)  # the original values, not a cast copy's
                self._module = module.eval()
        with torch.inference_mode():
            return self._module(latent.float())


class EagerBackend(Networks):
    def __init__(self, ckpt, family, device: torch.device, dtype: torch.dtype, clip_skip: int = 0,
                 cuda_graphs: bool = False, attention_slicing: bool = False, vae_fp32: Fp32VaeDecoder | None = None):
        """`vae_fp32`: the pipeline's fp32 VAE decoder (made here, before the cast, if not given)."""
        self.vae_fp32 = vae_fp32 or Fp32VaeDecoder(ckpt.as_loaded("vae"))
        self.ckpt, self.specs, self.device, self.dtype = ckpt, family.specs, device, dtype
        self.clip_skip = clip_skip
        if attention_slicing:  # attention computed in slices (diffusers' "auto"): less memory, slower
            ckpt.unet.set_attention_slice("auto")
        self.modules = {k: m.to(device=device, dtype=dtype).eval() for k, m in family.modules(ckpt, clip_skip).items()}
        if device.type == "cuda":
            for k in self.modules:
                if channels_last(k):
                    self.modules[k].to(memory_format=torch.channels_last)
        self.static_shapes = cuda_graphs  # graphs replay one shape: a one-time cuDNN search per shape pays
        self._graphed: dict = {}  # UNet module -> its graphs, one per input shape, captured on first use
        self.backends = {k: "eager" for k in family.networks}
        self._with_inputs: dict = {}  # (network, input names) -> its spec and module with those optional inputs

    def _forward(self, module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.inference_mode(), _conv_search(self.static_shapes):
            return module(*args)

    def _graphed_unet(self, module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The UNet as CUDA graphs (cuda_graphs, outside a whole-step capture): one per shape."""
        if module not in self._graphed:
            from .cuda_graphs import GraphedCall

            self._graphed[module] = GraphedCall(lambda *a: self._forward(module, a))
        return self._graphed[module](*args)

    def run(self, network: str, inputs: dict[str, torch.Tensor], ran: dict | None = None) -> torch.Tensor:
        record(ran, network, "eager")
        spec, module = self.specs[network], self.modules[network]
        if len(inputs) != len(spec.inputs):  # the UNet given ControlNet residuals or image tokens too
            key = (network, frozenset(inputs))
            if key not in self._with_inputs:
                named = spec.with_inputs(inputs)
                self._with_inputs[key] = (named, module.with_names(named.input_names) if hasattr(module, "with_names")
                                          else module)
            spec, module = self._with_inputs[key]
        args = tuple(spec.cast(inputs, self.device, self.dtype).values())
        if network == "unet" and self.static_shapes and not capturing():
            return self._graphed_unet(module, args)  # a whole step being captured (or warmed up) holds the UNet
        return as_float(self._forward(module, args))

    def set_weights(self, network: str, weights: dict, at_base: bool, held: tuple | None = None) -> None:
        """Nothing to do: the modules are the checkpoint's, whose weights were changed (on a
        GPU in place, where a captured UNet graph reads them)."""

    def text_encoders_for(self, clip_skip: int | None) -> dict:
        """The text encoders giving the embeddings of the CLIP layer clip_skip selects (None:
        the load-time clip_skip); any clip_skip runs here, on the same weights."""
        names = [n for n in self.modules if n.startswith("text_encoder")]
        if clip_skip is None or clip_skip == self.clip_skip:
            return {n: partial(self._text, n, self.modules[n]) for n in names}
        return {n: partial(self._text, n, self.modules[n].with_clip_skip(clip_skip)) for n in names}

    def _text(self, network: str, module, inputs: dict[str, torch.Tensor], *, ran: dict | None = None):
        record(ran, network, "eager")
        args = self.specs[network].cast(inputs, self.device, self.dtype)
        with torch.inference_mode():
            return as_float(module(**args))

    def vae_decoder_fp32(self, latent: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor:
        record(ran, "vae_decoder", "eager-fp32")
        return self.vae_fp32(latent.to(self.device))
