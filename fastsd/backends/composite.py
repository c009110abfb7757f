"""A backend made of engines per network, tried in order for each call: the first whose
shape profile fits the call's shapes runs it; eager PyTorch runs what none fits."""

from __future__ import annotations

import logging
import threading
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..engines import check_entry, weights_at_load
from ..errors import InvalidArgumentError
from ..networks import IP_TOKENS, SD_NETWORKS, NetworkSpec
from ..phases import ENGINE_FILES, ENGINE_LOAD, phase
from . import Networks, record
from .kind import EngineKind, RefitUnsupported, Runner

log = logging.getLogger(__name__)


class LazyRunner:
    """One store entry's engine for one network: its profile is known from the manifest,
    the engine itself is loaded the first time a call fits it (a fallback entry that no
    call needs costs nothing, not even checking its files). Its files are checked against the
    manifest right before it loads (hashed, unless that very file was hashed before: see
    check_entry); one that fails that, or will not load, is refused from then on."""

    def __init__(self, kind: EngineKind, entry: Path, graph: str, spec: NetworkSpec, device, dtype, profile,
                 fingerprint: str, facts: dict, weights: dict | None = None):
        self.name, self.kind, self.entry, self.path = kind.name, kind, entry, entry / graph
        self.spec, self.device, self.dtype, self.profile = spec, device, dtype, profile
        self.fingerprint, self.facts = fingerprint, facts
        self.weights = weights  # the network's weights as loaded: given to an engine whose files hold a donor's
        self.size = 0  # the bytes of its files, where known (the order first choices load in)
        self.runner: Runner | None = None
        self.failed: str | None = None
        self.stale: str | None = None  # why the engine does not hold the network's weights now (a LoRA it cannot take)
        self._pending: dict = {}  # weights set before the engine loaded: given to it when it does
        self.ip_held: tuple = ()  # the IP-Adapters (fingerprints) whose projections its files hold
        self.ip_now: tuple = ()  # ... and those it holds now (after refits)
        self._lock = threading.Lock()

    def fits(self, inputs) -> str | None:
        return self.failed or self.stale or self.spec.refuses(self.profile, inputs)

    def load(self) -> bool:
        with self._lock:
            if self.runner is None and self.failed is None:
                with phase(ENGINE_FILES):
                    manifest, problems = check_entry(self.entry, self.fingerprint, self.facts,
                                                     networks=(self.spec.name,))
                try:
                    if problems:
                        raise ValueError(problems[self.spec.name])
                    held = manifest["networks"][self.spec.name]
                    given = {}
                    if weights_at_load(held):  # its files hold the refit donor's weights: never run those
                        if self.weights is None:
                            raise ValueError("its engine takes the checkpoint's weights when it loads, and this "
                                             "pipeline gave none")
                        given["weights"] = self.weights
                    with phase(ENGINE_LOAD):
                        self.runner = self.kind.load(self.path, self.spec, self.device, self.dtype, self.profile,
                                                     held, **given)
                except Exception as e:  # noqa: BLE001 - changed files, no usable provider, an unloadable artifact
                    self._fail(e)
                    log.warning("%s %s: %s; trying the next engine, else eager", self.name, self.spec.name,
                                self.failed)
                if self.runner is not None and self._pending:
                    self._refit(self._pending, False)
            return self.runner is not None and self.stale is None

    def set_weights(self, weights: dict, at_base: bool, held: tuple | None = None) -> None:
        """Refit the engine to the network's weights now (see Runner.set_weights); one that
        cannot take them serves no call until the weights are the entry's own again. Before
        the engine is loaded, the weights wait for it (every change passes the new tensors,
        so the latest of each is what it gets). `held`: the weights are these IP-Adapters'
        projections, which only a UNet built with their inputs takes, and needs only where it
        holds others now."""
        if held is not None:
            if not self.spec_takes_ip or tuple(held) == self.ip_now:
                return
            self.ip_now = tuple(held)
        elif at_base:
            self.ip_now = self.ip_held
        with self._lock:
            self._pending = {} if at_base else {**self._pending, **weights}
            if self.runner is not None and self.failed is None:
                self._refit(weights, at_base)

    @property
    def spec_takes_ip(self) -> bool:
        return any(n.startswith(IP_TOKENS) for n in self.spec.input_names)

    def _refit(self, weights: dict, at_base: bool) -> None:
        try:
            self.runner.set_weights(weights, at_base)
            self.stale = None
        except RefitUnsupported as e:
            self.stale = None if at_base else f"{self.entry.name}: holds the checkpoint's weights, not the " \
                                              f"LoRA-fused ones ({e})"
        except Exception as e:  # noqa: BLE001 - a refit that failed part way: its weights are unknown
            self._fail(e)
            self.runner = None
            log.warning("%s %s: refit failed (%s); running it in eager PyTorch", self.name, self.spec.name,
                        self.failed)

    def _fail(self, e: Exception) -> None:
        self.failed = f"{self.entry.name}: " + (str(e).splitlines()[0] if str(e) else type(e).__name__)

    def __call__(self, **inputs):
        return self.runner(**inputs)  # the runner fills the residuals a call without ControlNet leaves out


class CompositeBackend(Networks):
    def __init__(self, engines: dict[str, list], make_eager: Callable, vae_fp32: Callable, clip_skip: int = 0,
                 networks: tuple[str, ...] = SD_NETWORKS):
        """`engines`: per network, its engines fastest first (LazyRunner or any Runner), all
        built for `clip_skip`; `vae_fp32`: the pipeline's fp32 VAE decoder; `networks`: the
        model family's."""
        self.vae_fp32 = vae_fp32
        self.engines = {n: list(r) for n, r in engines.items() if r}
        self.clip_skip = clip_skip
        self._make_eager, self._eager = make_eager, None
        self.backends = {n: self.engines[n][0].name if n in self.engines else "eager"
                         for n in networks}  # what serves calls that fit the first engine (fixed at load)
        self._warned: set = set()
        self._lock = threading.Lock()

    @property
    def eager(self):
        with self._lock:
            if self._eager is None:  # built only when some network needs it
                self._eager = self._make_eager()
            return self._eager

    def run(self, network: str, inputs: dict, ran: dict | None = None):
        refusals = []
        for engine in self.engines.get(network, ()):
            why = engine.fits(inputs)
            if why is None and (not isinstance(engine, LazyRunner) or engine.load()):
                record(ran, network, engine.name)
                return engine(**inputs)
            refusals.append(f"{engine.name}: {why or engine.fits(inputs)}")
        if refusals:
            why = "; ".join(refusals)
            with self._lock:
                first = (network, why) not in self._warned
                self._warned.add((network, why))
            if first:
                log.warning("no %s engine fits this call (%s); running it in eager PyTorch", network, why)
        return self.eager.run(network, inputs, ran)

    def set_weights(self, network: str, weights: dict, at_base: bool, held: tuple | None = None) -> None:
        """The network's weights changed (a LoRA loaded, re-scaled or unloaded; IP-Adapters
        loaded: `held`): refit its engines; the eager modules share the weights already."""
        for engine in list(self.engines.get(network, ())):
            try:
                if isinstance(engine, LazyRunner):
                    engine.set_weights(weights, at_base, held)  # it handles refusals itself
                elif held is None:
                    engine.set_weights(weights, at_base)
            except RefitUnsupported as e:
                log.warning("%s %s cannot take the new weights (%s); it is dropped", engine.name, network, e)
                self.engines[network].remove(engine)

    def text_encoders_for(self, clip_skip: int | None) -> dict:
        """The text encoders for a call's clip_skip: engines bake theirs in, so another one
        runs in eager PyTorch where no text-encoder engine is loaded, and is refused where one is."""
        names = [n for n in self.backends if n.startswith("text_encoder")]
        if clip_skip is None or clip_skip == self.clip_skip:
            return {n: partial(self._text, n) for n in names}
        engine = next((n for n in names if self.engines.get(n)), None)
        if engine is not None:
            raise InvalidArgumentError(
                f"clip_skip={clip_skip}: the {engine} runs on a {self.backends[engine]} engine built "
                f"with clip_skip={self.clip_skip}; load the pipeline with clip_skip={clip_skip} (engines built "
                "for it, or eager) to use another")
        return self.eager.text_encoders_for(clip_skip)

    def _text(self, network: str, inputs: dict, *, ran: dict | None = None):
        """The text encoder on `inputs` (the spec's, by name), in pieces its first engine's batch
        takes where there are more rows (a long prompt's chunks go in as rows)."""
        profile = getattr(next(iter(self.engines.get(network, ())), None), "profile", None)
        rows = next(iter(inputs.values())).shape[0]
        most = None if profile is None else profile.max_batch * 2
        if most is None or rows <= most:
            return self.run(network, inputs, ran)
        parts = [self.run(network, {k: v[i:i + most] for k, v in inputs.items()}, ran) for i in range(0, rows, most)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(p) for p in zip(*parts, strict=True))
        return torch.cat(parts)

    def vae_decoder_fp32(self, latent, *, ran: dict | None = None):
        """The fp32 VAE decoder alone: no eager backend (every network on the device) for it."""
        record(ran, "vae_decoder", "eager-fp32")
        return self.vae_fp32(latent)
