"""The IP-Adapters' CLIP image encoders as networks of a pipeline: image_encoder,
image_encoder_2, ... (one per distinct encoder), each run on the first engine of its own store
entries (keyed by the encoder's weights, as a ControlNet's) whose profile fits the call, else
in eager PyTorch, as the backend runs the checkpoint's networks."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends import as_float, record
from .backends.select import owned_engines
from .networks import ImageEncoder

log = logging.getLogger(__name__)


def encoder_names(count: int) -> tuple[str, ...]:
    """The networks of `count` image encoders: image_encoder, image_encoder_2, ..."""
    return tuple("image_encoder" if i == 0 else f"image_encoder_{i + 1}" for i in range(count))


@dataclass
class EncoderNetwork:
    """One image encoder network: the loaded encoder, its eager module (on the pipeline's
    device and dtype) and its engines, fastest first."""

    encoder: object  # ip_adapter.LoadedEncoder
    module: torch.nn.Module
    engines: list = field(default_factory=list)
    uncond: dict = field(default_factory=dict)  # what served it -> the hidden states of a black image


class ImageEncoders:
    """The pipeline's image encoder networks, by name."""

    def __init__(self, encoders: dict, device: torch.device, dtype: torch.dtype, store: tuple | None,
                 precision: str | None = None):
        """`encoders`: name -> LoadedEncoder; `store`: (backend, engine_dir) the engines come from
        (None: eager only)."""
        self.device, self.dtype = device, dtype
        self.networks: dict[str, EncoderNetwork] = {}
        self._warned: set = set()
        self._lock = threading.Lock()
        for name, encoder in encoders.items():
            module = ImageEncoder(encoder.model).to(device, dtype).eval()
            engines = []
            if store is not None:
                backend, engine_dir = store
                engines = owned_engines(encoder, {name: encoder.spec()}, backend, device, dtype, Path(engine_dir),
                                        f"the image encoder {encoder.source}", precision).get(name, [])
            self.networks[name] = EncoderNetwork(encoder, module, engines)

    def run(self, name: str, pixels: torch.Tensor, ran: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds, image_hidden_states) of CLIP pixel values (B, 3, S, S), float32."""
        net = self.networks[name]
        inputs = {"pixel_values": pixels}
        refusals = []
        for engine in net.engines:
            why = engine.fits(inputs)
            if why is None and engine.load():
                record(ran, name, engine.name)
                return as_float(engine(**inputs))
            refusals.append(f"{engine.name}: {why or engine.fits(inputs)}")
        if refusals:
            with self._lock:
                first = (name, tuple(refusals)) not in self._warned
                self._warned.add((name, tuple(refusals)))
            if first:
                log.warning("no %s engine fits this call (%s); running it in eager PyTorch", name, "; ".join(refusals))
        record(ran, name, "eager")
        with torch.inference_mode():
            return as_float(net.module(pixels.to(self.device, self.dtype)))

    def uncond(self, name: str, like: torch.Tensor, ran: dict | None = None) -> torch.Tensor:
        """The penultimate hidden states of an all-zero image (IP-Adapter Plus' unconditional
        image prompt), once per network and what serves it."""
        net = self.networks[name]
        seen: dict = {}
        hidden = None
        key = next((e.name for e in net.engines if e.fits({"pixel_values": like[:1]}) is None), "eager")
        with self._lock:
            hidden = net.uncond.get(key)
        if hidden is None:
            hidden = self.run(name, torch.zeros_like(like[:1]), seen)[1]
            with self._lock:
                net.uncond[key] = hidden
        record(ran, name, seen.get(name, key))
        return hidden
