"""Choosing what runs each network: engines from the store where valid, else eager.

Per network, the first engine kind (in the order asked for) with a valid entry for the
loaded checkpoint, precision, settings and this machine wins; eager PyTorch runs the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..engines import NOT_IN_ENTRY, PRECISIONS, Profile, check_entry, entry_dir, graph_file
from ..networks import NETWORKS
from .composite import CompositeBackend
from .eager import EagerBackend
from .kind import EngineKind
from .registry import ENGINE_KINDS

log = logging.getLogger(__name__)


def _engines(kind: EngineKind, ckpt, specs: dict, device, dtype, engine_dir: Path, clip_skip: int, loud: bool,
             wanted: tuple[str, ...] = NETWORKS) -> dict:
    """Runners of `kind` for the `wanted` networks that have a valid engine."""
    why = kind.unavailable()
    if why:
        if loud:
            log.warning("%s: %s; falling back to eager", kind.name, why)
        return {}
    entry = entry_dir(engine_dir, ckpt.info.fingerprint, kind.name, PRECISIONS[dtype])
    facts = {"clip_skip": clip_skip, **kind.runtime_facts(device)}
    manifest, problems = check_entry(entry, ckpt.info.fingerprint, facts, verify=True, networks=wanted)
    _warn_unusable(kind.name, problems, loud, entry.is_dir())
    engines = {}
    for n in wanted:
        if n in problems:
            continue
        graph = graph_file(n, manifest["networks"][n])
        try:
            engines[n] = kind.load(entry / graph, specs[n], device, dtype, Profile(**manifest["profile"]))
        except Exception as e:  # noqa: BLE001 - no usable provider, or an artifact that will not load
            log.warning("%s %s: cannot load the engine (%s); falling back to eager", kind.name, n,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
    return engines


def _warn_unusable(kind: str, problems: dict, loud: bool, exists: bool) -> None:
    """One warning per distinct reason. Under auto (not `loud`), only for an entry that
    exists, and not for networks it does not hold: both are the normal case there."""
    by_reason: dict[str, list[str]] = {}
    for n, why in problems.items():
        if loud or (exists and why.code != NOT_IN_ENTRY):
            by_reason.setdefault(str(why), []).append(n)
    for why, nets in by_reason.items():
        log.warning("%s %s: %s; falling back to eager", kind, ", ".join(nets), why)


def make_backend(ckpt, family, backend: str, device: torch.device, dtype: torch.dtype, engine_dir: Path,
                 clip_skip: int = 0, cuda_graphs: bool = False, attention_slicing: bool = False):
    """The backend for `backend` ("auto", "eager" or an engine kind's name) over the
    networks of the checkpoint's model `family`."""
    specs = family.specs

    def make_eager():
        return EagerBackend(ckpt, family, device, dtype, clip_skip, cuda_graphs, attention_slicing)

    if backend == "eager":
        return make_eager()
    kinds = tuple(ENGINE_KINDS.values()) if backend == "auto" else (ENGINE_KINDS[backend],)
    engines: dict = {}
    for kind in kinds:  # a slower kind only loads what a faster one left unserved
        wanted = tuple(n for n in NETWORKS if n not in engines)
        if wanted:
            engines.update(_engines(kind, ckpt, specs, device, dtype, engine_dir, clip_skip, backend != "auto",
                                    wanted))
    return CompositeBackend(engines, make_eager) if engines else make_eager()
