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

from ..engines import (
    NOT_IN_ENTRY,
    Profile,
    check_entry,
    compute_dtype,
    graph_file,
    kind_entries,
    manifest_problem,
    precision_of,
    read_manifest,
    record_bytes,
    takes_weights_at_load,
    weights_at_load,
)
from ..errors import EngineUnavailableError
from ..hashing import prefetch
from ..networks import NETWORKS, record_ip_inputs, weights_of
from ..phases import ENGINE_FILES, phase
from .composite import CompositeBackend, LazyRunner
from .eager import EagerBackend, Fp32VaeDecoder
from .kind import EngineKind
from .registry import ENGINE_KINDS

log = logging.getLogger(__name__)
_told: set = set()  # (store, checkpoint, networks) already logged as running eager for want of an engine
_told_lock = threading.Lock()


def base_weights(ckpt, family, engine_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per network, its weights as the checkpoint holds them now (references, no copy): what
    an engine whose files hold a refit donor's weights is given when it loads. Taken before
    anything casts or fuses the live ones (a cast or, on the CPU, a LoRA replaces a weight's
    storage; these keep the loaded values), and only where the store has such an engine for
    the checkpoint or its ControlNets (they keep the loaded weights alive beside a cast copy)."""
    fingerprints = [ckpt.info.fingerprint, *(cn.fingerprint for cn in getattr(family, "controlnets", {}).values())]
    if not takes_weights_at_load(engine_dir, fingerprints):
        return {}
    return {n: {k: t.detach() for k, t in weights_of(m).items()} for n, m in family.modules(ckpt).items()}


FALLING_BACK, NOT_USED = "falling back to eager", "not used"  # what a warning says happens instead


def _kinds(backend: str) -> tuple[EngineKind, ...]:
    """The engine kinds `backend` ("auto" or a kind's name) tries, fastest first."""
    return tuple(ENGINE_KINDS.values()) if backend == "auto" else (ENGINE_KINDS[backend],)


def _cannot_run(kind: EngineKind, device: torch.device) -> str | None:
    """Why `kind`'s engines cannot run on `device` with this installation (None: they can)."""
    return kind.unavailable() or (None if device.type in kind.devices else
                                  f"its engines run on the {' or '.join(kind.devices)}, not {device.type}")


def _engines(kind: EngineKind, fingerprint: str, specs: dict, device, dtype, engine_dir: Path, facts: dict,
             loud: bool, what: str = "this checkpoint", precision: str | None = None,
             weights: dict | None = None, then: str = FALLING_BACK) -> dict[str, list[LazyRunner]]:
    """Per network, candidates of `kind` among the entries of `fingerprint` (the checkpoint's,
    or a ControlNet's): one per valid entry that holds it. `specs` maps each network's name in
    the pipeline to its spec, whose name is the one in the entry (controlnet_2 -> controlnet).
    `precision`: the entries' (a quantized one, e.g. int8), where it is not `dtype`'s name.
    `weights`: `base_weights`, for the engines that take them at load; `then`: what the
    warnings say happens instead (eager, or nothing: a backend that may not fall back)."""
    facts = {**facts, **kind.runtime_facts(device)}
    precision = precision or precision_of(dtype)
    entries = kind_entries(engine_dir, fingerprint, kind.name, precision)
    if not entries and loud:
        log.warning("%s: no %s entry for %s in %s; %s (build one with `%s`)",
                    kind.name, precision, what, engine_dir, then, kind.build_command)
    found: dict[str, list[LazyRunner]] = {}
    for entry in entries:  # files are checked against the manifest when an engine loads (LazyRunner.load)
        stored = {n: spec.name for n, spec in specs.items()}
        with phase(ENGINE_FILES):
            manifest, problems = check_entry(entry, fingerprint, facts, networks=tuple(set(stored.values())))
        _warn_unusable(f"{kind.name} ({entry.name})", problems, loud, True, then)
        for n, spec in specs.items():
            record = manifest.get("networks", {}).get(spec.name)
            if spec.name in problems or record is None:
                continue
            if spec.name.startswith("text_encoder") and "inputs_embeds" not in record.get("inputs", ()):
                _warn_unusable(f"{kind.name} ({entry.name})", {n: "built to take token ids (before fastsd's text "
                               "encoders took token embeddings); rebuild the entry to run it there"}, True, True)
                continue
            try:  # a UNet built with the ControlNet residual or IP-Adapter inputs takes those too
                spec = record_ip_inputs(spec, record).with_inputs(record.get("inputs", spec.input_names))
            except ValueError as e:
                _warn_unusable(f"{kind.name} ({entry.name})", {n: str(e)}, True, True)
                continue
            runner = LazyRunner(kind, entry, graph_file(spec.name, record), spec, device, dtype,
                                Profile(**manifest["profile"]), fingerprint, facts, (weights or {}).get(n))
            runner.size = record_bytes(entry, record)
            runner.ip_held = runner.ip_now = tuple(record.get("ip_adapters", ()))
            found.setdefault(n, []).append(runner)
    return found


def _warn_unusable(kind: str, problems: dict, loud: bool, exists: bool, then: str = FALLING_BACK) -> None:
    """One warning per distinct reason. Under auto (not `loud`), only for an entry that
    exists, and not for networks it does not hold: both are the normal case there."""
    by_reason: dict[str, list[str]] = {}
    for n, why in problems.items():
        if loud or (exists and why.code != NOT_IN_ENTRY):
            by_reason.setdefault(str(why), []).append(n)
    for why, nets in by_reason.items():
        log.warning("%s %s: %s; %s", kind, ", ".join(nets), why, then)


def candidates(ckpt, family, backend: str, device: torch.device, dtype: torch.dtype, engine_dir: Path,
               clip_skip: int = 0, precision: str | None = None,
               weights: dict | None = None, fallback: bool = True) -> dict[str, list[LazyRunner]]:
    """Per network, the store's engines that may serve it ("auto": every available kind,
    fastest first), from the manifests alone: nothing is loaded and no file is hashed yet.
    `precision`: the entries' where it is a quantized one (int8; `dtype` is then what the
    networks they do not hold run at); `weights`: `base_weights` (taken now where not given);
    `fallback`: whether the warnings may say eager runs instead (see make_backend)."""
    weights = weights if weights is not None else base_weights(ckpt, family, engine_dir)
    engines: dict[str, list[LazyRunner]] = {}
    loud, specs, then = backend != "auto", family.specs, FALLING_BACK if fallback else NOT_USED
    owned = getattr(family, "controlnets", {})  # networks with store entries of their own (ControlNets)
    for kind in _kinds(backend):  # fastest kind first
        why = _cannot_run(kind, device)
        if why:
            if loud:
                log.warning("%s: %s; %s", kind.name, why, then)
            continue
        found = _engines(kind, ckpt.info.fingerprint, {n: s for n, s in specs.items() if n not in owned}, device,
                         dtype, engine_dir, {"clip_skip": clip_skip}, loud, precision=precision, weights=weights,
                         then=then)
        for n, runners in found.items():
            engines.setdefault(n, []).extend(runners)
    for n, cn in owned.items():  # each kind's unavailability is said above, once
        engines |= owned_engines(cn, {n: specs[n]}, backend, device, dtype, engine_dir, f"the ControlNet {cn.source}",
                                 precision, weights, then)
    return engines


def owned_engines(owner, specs: dict, backend: str, device: torch.device, dtype: torch.dtype, engine_dir: Path,
                  what: str, precision: str | None = None, weights: dict | None = None,
                  then: str = FALLING_BACK) -> dict[str, list[LazyRunner]]:
    """Per network of `specs`, the engines of the entries keyed by `owner.fingerprint` (a
    network with entries of its own: a ControlNet, an IP-Adapter's image encoder), fastest
    kind first; none for "eager". `weights`, `then`: as for candidates and _engines."""
    if backend == "eager":
        return {}
    out: dict[str, list[LazyRunner]] = {}
    for kind in _kinds(backend):
        if _cannot_run(kind, device):
            continue
        found = _engines(kind, owner.fingerprint, specs, device, dtype, engine_dir, {}, backend != "auto", what,
                         precision, weights, then)
        for n, runners in found.items():
            out.setdefault(n, []).extend(runners)
    return out


def ahead(fingerprint: str, backend: str, device: torch.device, precision: str, engine_dir: Path,
          clip_skip: int = 0) -> list[tuple]:
    """(key, make) of each engine a pipeline of this checkpoint will load first (see
    candidates: per network, the first valid entry of the first kind that has one), from the
    manifests and the entries' recorded digests: what `preload.Preload` makes ahead, largest
    first (make_backend loads smallest first: the two meet in the middle). Engines given the
    checkpoint's weights at load, and kinds that make nothing ahead, are left out."""
    jobs, claimed = [], set()
    for kind in _kinds(backend):
        if kind.preload is None or _cannot_run(kind, device):
            continue
        facts = {"clip_skip": clip_skip, **kind.runtime_facts(device)}
        for entry in kind_entries(engine_dir, fingerprint, kind.name, precision):
            raw = read_manifest(entry)
            if manifest_problem(raw, entry) is not None:
                continue  # the pipeline's own load says why
            networks = tuple(n for n in NETWORKS if n in raw["networks"] and n not in claimed)
            # files not hashed yet (a store just built or copied): one read, which the pipeline's check shares
            prefetch([entry / f for n in networks for f in raw["networks"][n]["sha256"]], "sha256")
            manifest, problems = check_entry(entry, fingerprint, facts, networks) if networks else ({}, {})
            for n in (n for n in networks if n not in problems):
                claimed.add(n)
                record = manifest["networks"][n]
                if not weights_at_load(record):
                    job = kind.preload(entry / graph_file(n, record), device, compute_dtype(precision), record)
                    jobs.append((record_bytes(entry, record), job))
    return [job for _, job in sorted(jobs, key=lambda j: -j[0]) if job is not None]


def _no_engine(backend: str, device: torch.device, engine_dir: Path) -> str:
    """Why `backend` serves no network here, and what to do."""
    kinds = _kinds(backend)
    why = next((w for w in (_cannot_run(kind, device) for kind in kinds) if w), None) or (
        f"no usable engine for this checkpoint in {engine_dir} (built by `{kinds[0].build_command}`; "
        "the warnings above say why an entry was not used)")
    return (f"backend={backend!r} serves no network of this checkpoint: {why}. Pass fallback=True "
            "(CLI: --allow-fallback) to run eager PyTorch instead")


def make_backend(ckpt, family, backend: str, device: torch.device, dtype: torch.dtype, engine_dir: Path,
                 clip_skip: int = 0, cuda_graphs: bool = False, attention_slicing: bool = False,
                 vae_fp32: Fp32VaeDecoder | None = None, precision: str | None = None, weights: dict | None = None,
                 fallback: bool = True):
    """The backend for `backend` ("auto", "eager" or an engine kind's name) over the
    networks of the checkpoint's model `family`. `vae_fp32`: the pipeline's fp32 VAE decoder
    (one is made here, from the checkpoint's weights before any cast, where none is given);
    `precision`: the engines' where it is a quantized one, `weights`: the networks' weights as
    loaded (see candidates); `fallback`: False refuses a backend where no engine serves any network
    (EngineUnavailableError) rather than running every network in eager PyTorch."""
    vae_fp32 = vae_fp32 or Fp32VaeDecoder(ckpt.as_loaded("vae"))

    def make_eager():
        return EagerBackend(ckpt, family, device, dtype, clip_skip, cuda_graphs, attention_slicing, vae_fp32)

    if backend == "eager":
        return make_eager()
    engines = candidates(ckpt, family, backend, device, dtype, engine_dir, clip_skip, precision, weights, fallback)
    # the first choice loads now (its failure is known at load time), smallest first: engines
    # loaded ahead come largest first, so the two threads meet in the middle (see ahead)
    for runners in sorted(engines.values(), key=lambda rs: rs[0].size if rs else 0):
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
    if not any(engines.values()):
        if not fallback:
            raise EngineUnavailableError(_no_engine(backend, device, engine_dir))
        return make_eager()
    return CompositeBackend(engines, make_eager, vae_fp32, clip_skip, family.networks)
