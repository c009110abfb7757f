"""Choosing what runs each network: engines from the store where valid, else eager.

Per network, every valid entry (of the kinds asked for, for the loaded checkpoint,
precision, settings and this machine) is a candidate, fastest kind first and within a
kind static profiles before the dynamic one; each call runs on the first candidate whose
profile fits its shapes, and on eager PyTorch when none does.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ..engines import NOT_IN_ENTRY, PRECISIONS, Profile, check_entry, graph_file, kind_entries
from .composite import CompositeBackend, LazyRunner
from .eager import EagerBackend
from .kind import EngineKind
from .registry import ENGINE_KINDS

log = logging.getLogger(__name__)
_told: set = set()  # (store, checkpoint, networks) already logged as running eager for want of an engine
_told_lock = threading.Lock()


def _engines(kind: EngineKind, ckpt, specs: dict, device, dtype, engine_dir: Path, clip_skip: int,
             loud: bool) -> dict[str, list[LazyRunner]]:
    """Per network, candidates of `kind`: one per valid entry that holds it."""
    why = kind.unavailable()
    if why:
        if loud:
            log.warning("%s: %s; falling back to eager", kind.name, why)
        return {}
    facts = {"clip_skip": clip_skip, **kind.runtime_facts(device)}
    precision = PRECISIONS[dtype]
    entries = kind_entries(engine_dir, ckpt.info.fingerprint, kind.name, precision)
    if not entries and loud:
        log.warning("%s: no %s entry for this checkpoint in %s; falling back to eager (build one with `%s`)",
                    kind.name, precision, engine_dir, kind.build_command)
    found: dict[str, list[LazyRunner]] = {}
    for entry in entries:  # files are re-hashed from disk when an engine loads (LazyRunner.load)
        manifest, problems = check_entry(entry, ckpt.info.fingerprint, facts, networks=tuple(specs))
        _warn_unusable(f"{kind.name} ({entry.name})", problems, loud, True)
        for n in specs:
            if n in problems or n not in manifest.get("networks", {}):
                continue
            graph = graph_file(n, manifest["networks"][n])
            found.setdefault(n, []).append(LazyRunner(kind, entry, graph, specs[n], device, dtype,
                                                      Profile(**manifest["profile"]), ckpt.info.fingerprint, facts))
    return found


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
    engines: dict[str, list[LazyRunner]] = {}
    for kind in kinds:  # fastest kind first
        for n, runners in _engines(kind, ckpt, specs, device, dtype, engine_dir, clip_skip, backend != "auto").items():
            engines.setdefault(n, []).extend(runners)
    for runners in engines.values():  # the first choice loads now: its failure is known at load time
        while runners and not runners[0].load():
            runners.pop(0)
    missing = [n for n in family.networks if not engines.get(n)]
    if backend == "auto" and missing:
        key = (str(Path(engine_dir).resolve()), ckpt.info.fingerprint, tuple(missing))
        with _told_lock:
            first, _ = key not in _told, _told.add(key)
        if first:  # a warning where engines exist for other networks, a note (-v) where none do
            level = logging.WARNING if len(missing) < len(family.networks) else logging.INFO
            log.log(level, "no engine in %s for %s of this checkpoint: running %s in eager PyTorch (build engines "
                    "with `fastsd export --model ...` or `fastsd build`)", engine_dir, ", ".join(missing),
                    "it" if len(missing) == 1 else "them")
    return CompositeBackend(engines, make_eager, clip_skip, family.networks) if any(engines.values()) else make_eager()
