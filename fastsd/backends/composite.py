"""A backend made of one runner per network: an engine where a valid one exists, eager
PyTorch for the rest and for any call whose shapes the engine was not built for."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ..networks import NETWORKS
from . import Networks, record
from .kind import Runner

log = logging.getLogger(__name__)


class CompositeBackend(Networks):
    def __init__(self, engines: dict[str, Runner], make_eager: Callable):
        self.engines, self._make_eager, self._eager = engines, make_eager, None
        self.backends = {n: engines[n].name if n in engines else "eager" for n in NETWORKS}  # fixed at load
        self._warned: set = set()
        self._lock = threading.Lock()

    @property
    def eager(self):
        with self._lock:
            if self._eager is None:  # built only when some network needs it
                self._eager = self._make_eager()
            return self._eager

    def run(self, network: str, inputs: dict, ran: dict | None = None):
        engine = self.engines.get(network)
        if engine is not None:
            why = engine.fits(inputs)
            if why is None:
                record(ran, network, engine.name)
                return engine(**inputs)
            with self._lock:
                first = (network, why) not in self._warned
                self._warned.add((network, why))
            if first:
                log.warning("%s engine refused this call (%s); running it in eager PyTorch", network, why)
        return self.eager.run(network, inputs, ran)

    def vae_decoder_fp32(self, latent, *, ran: dict | None = None):
        return self.eager.vae_decoder_fp32(latent, ran=ran)
