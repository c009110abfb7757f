"""What every builder shares: checking a build's arguments and the store, loading the
checkpoint, and the one build loop (staging folder, per-network timing and size, the
progress line, the manifest) that turns networks into a store entry."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from fastsd.checkpoint import check_clip_skip, load_checkpoint
from fastsd.engines import Profile, Staging, base_manifest, default_engine_dir, entry_dir, writable_store
from fastsd.errors import InvalidArgumentError
from fastsd.families import family_for
from fastsd.networks import NETWORKS

# make(network, staging folder) -> (files written, extra manifest facts of the network, note for the progress line)
MakeNetwork = Callable[[str, Path], tuple[list[str], dict, str]]


def parse_static(text: str | None, factor: int) -> tuple[int, int] | None:
    """'512x768' -> (512, 768): height x width, each a positive multiple of the VAE factor."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidArgumentError(f"--static takes HxW, e.g. 512x512, got {text!r}") from None
    if min(h, w) <= 0 or h % factor or w % factor:
        raise InvalidArgumentError(f"static size {h}x{w}: both must be positive multiples of {factor}")
    return h, w


def load_for_build(model: str, networks: tuple[str, ...] | None, allow_pickle: bool, clip_skip: int,
                   engine_dir: str | Path | None, vae: str | None = None):
    """Check a build's arguments and the store, then load the checkpoint (with `vae`
    replacing its VAE). Returns (checkpoint, its model family, store root, the networks to
    build: `networks`, or None for all of the family's)."""
    if networks is not None:
        unknown = set(networks) - set(NETWORKS)
        if unknown:
            raise InvalidArgumentError(f"unknown networks {sorted(unknown)}; choose from {', '.join(NETWORKS)}")
        if not networks:
            raise InvalidArgumentError(f"no networks to build; choose from {', '.join(NETWORKS)}")
    root = writable_store(Path(engine_dir) if engine_dir else default_engine_dir())
    ckpt = load_checkpoint(model, allow_pickle=allow_pickle, vae=vae)
    check_clip_skip(ckpt, clip_skip)
    family = family_for(ckpt)
    if networks is None:
        networks = family.networks
    other = [n for n in networks if n not in family.networks]
    if other:
        raise InvalidArgumentError(f"this checkpoint has no {', '.join(other)}; its networks are "
                                   f"{', '.join(family.networks)}")
    return ckpt, family, root, tuple(networks)


def build_entry(root: Path, info, kind: str, precision: str, profile: Profile, networks: tuple[str, ...],
                make: MakeNetwork, facts: dict, progress: Callable[[str], None], verb: str = "built") -> Path:
    """Make each network's files in a staging folder (timed), then commit the entry with
    its manifest; an interrupted or failed build leaves nothing behind. Returns the entry."""
    with Staging(entry_dir(root, info.fingerprint, kind, precision, profile)) as stage:
        for name in networks:
            t0 = time.perf_counter()
            files, extra, note = make(name, stage.dir)
            seconds = time.perf_counter() - t0
            size = sum((stage.dir / f).stat().st_size for f in files)
            stage.add(name, files, export_seconds=round(seconds, 2), bytes=size, **extra)
            how = f"refitted from {extra['refitted_from']}'s engine" if extra.get("refitted_from") else verb
            progress(f"{name}: {how} in {seconds:.1f}s, {size / 2**20:.1f} MiB ({', '.join(files)}){note}")
        return stage.commit(base_manifest(info, kind, precision, profile, **facts))
