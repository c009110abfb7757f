"""The IP-Adapters' CLIP image encoders as networks of a pipeline: image_encoder,
image_encoder_2, ... (one per distinct encoder). Each runs as the backend runs the
checkpoint's networks (a CompositeBackend of their own): on the first engine of its own store
entries (keyed by the encoder's weights, as a ControlNet's) whose profile fits the call, else
in eager PyTorch."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from .backends import as_float, record
from .backends.composite import CompositeBackend
from .backends.select import owned_engines
from .networks import ImageEncoder


def encoder_names(count: int) -> tuple[str, ...]:
    """The networks of `count` image encoders: image_encoder, image_encoder_2, ..."""
    return tuple("image_encoder" if i == 0 else f"image_encoder_{i + 1}" for i in range(count))


class EagerEncoders:
    """The image encoders in eager PyTorch, on the pipeline's device and dtype."""

    def __init__(self, modules: dict, device: torch.device, dtype: torch.dtype):
        self.modules, self.device, self.dtype = modules, device, dtype

    def run(self, network: str, inputs: dict, ran: dict | None = None):
        record(ran, network, "eager")
        with torch.inference_mode():
            return as_float(self.modules[network](inputs["pixel_values"].to(self.device, self.dtype)))


class ImageEncoders:
    """The pipeline's image encoder networks, by name."""

    def __init__(self, encoders: dict, device: torch.device, dtype: torch.dtype, store: tuple | None,
                 precision: str | None = None):
        """`encoders`: name -> ip_adapter.LoadedEncoder; `store`: (backend, engine_dir) the
        engines come from (None: eager only)."""
        modules = {n: ImageEncoder(e.model).to(device, dtype).eval() for n, e in encoders.items()}
        engines = {}
        for name, encoder in encoders.items() if store is not None else ():
            engines |= owned_engines(encoder, {name: encoder.spec()}, store[0], device, dtype, Path(store[1]),
                                     f"the image encoder {encoder.source}", precision)
        eager = EagerEncoders(modules, device, dtype)
        self.encoders, self.networks = dict(encoders), tuple(encoders)
        self.backend = CompositeBackend(engines, lambda: eager, None, networks=self.networks)
        self._uncond: dict = {}  # (network, what serves it) -> the hidden states of a black image
        self._lock = threading.Lock()

    def run(self, name: str, pixels: torch.Tensor, ran: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds, image_hidden_states) of CLIP pixel values (B, 3, S, S), float32."""
        return self.backend.run(name, {"pixel_values": pixels}, ran)

    def uncond(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The penultimate hidden states of an all-zero image (IP-Adapter Plus' unconditional
        image prompt), once per network and what serves it."""
        zeros = {"pixel_values": torch.zeros_like(like[:1])}
        key = (name, next((e.name for e in self.backend.engines.get(name, ()) if e.fits(zeros) is None), "eager"))
        with self._lock:
            hidden = self._uncond.get(key)
        if hidden is None:
            hidden = self.run(name, zeros["pixel_values"])[1]
            with self._lock:
                self._uncond[key] = hidden
        return hidden
