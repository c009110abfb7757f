"""A backend made of one runner per network: an engine where a valid one exists, eager
PyTorch for the rest and for any call whose shapes the engine was not built for."""

from __future__ import annotations

import logging
from typing import Callable

from ..networks import NETWORKS

log = logging.getLogger(__name__)


class CompositeBackend:
    def __init__(self, engines: dict, make_eager: Callable):
        self.engines, self._make_eager, self._eager = engines, make_eager, None
        self.backends = {n: engines[n].name if n in engines else "eager" for n in NETWORKS}
        self._warned: set = set()

    @property
    def eager(self):
        if self._eager is None:  # built only when some network needs it
            self._eager = self._make_eager()
        return self._eager

    def _run(self, network: str, *inputs):
        engine = self.engines.get(network)
        if engine is not None:
            why = engine.refuses(*inputs)
            if why is None:
                self.backends[network] = engine.name
                return engine(*inputs)
            if (network, why) not in self._warned:
                self._warned.add((network, why))
                log.warning("%s engine refused this call (%s); running it in eager PyTorch", network, why)
        self.backends[network] = "eager"
        return getattr(self.eager, network)(*inputs)

    def text_encoder(self, input_ids):
        return self._run("text_encoder", input_ids)

    def unet(self, sample, timestep, encoder_hidden_states):
        return self._run("unet", sample, timestep, encoder_hidden_states)

    def vae_encoder(self, images):
        return self._run("vae_encoder", images)

    def vae_decoder(self, latent):
        return self._run("vae_decoder", latent)
