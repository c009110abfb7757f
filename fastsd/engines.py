"""The engine store: engine_dir/<checkpoint fingerprint>/<backend>-<precision>/.

An entry is a folder of network files plus manifest.json (written last). Entries are
built in a hidden staging folder beside their final place and renamed into it only when
complete, so an interrupted build never leaves something the runtime would pick up.
The runtime validates an entry against the loaded checkpoint before using any file.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .hashing import DigestCache
from .networks import NETWORKS

log = logging.getLogger(__name__)

ENGINE_FORMAT = 1  # bump when what an entry holds changes meaning
MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"
FACT_DEFAULTS = {"clip_skip": 0}  # what entries written before a fact was recorded were built with
MAX_BATCH = 4  # default profile: images per call (CFG doubles text encoder / UNet batches)


def cfg_batch_factor(network: str) -> int:
    """CFG runs the text encoder and the UNet on a batch of 2 per image."""
    return 2 if network in ("text_encoder", "unet") else 1


def default_engine_dir() -> Path:
    return Path(os.environ.get("FASTSD_ENGINE_DIR", "engines"))


@dataclass(frozen=True)
class Profile:
    """Shapes an entry serves: image batch and pixel sizes (min/opt/max, TensorRT style)."""

    min_batch: int
    opt_batch: int
    max_batch: int
    min_size: int  # pixels, for height and width alike (dynamic profiles)
    opt_size: int  # height the graph was traced at (the static height)
    max_size: int
    static: bool  # built for exactly opt_size x opt_width
    opt_width: int  # width the graph was traced at (the static width)

    @classmethod
    def for_model(cls, info, static: tuple[int, int] | None = None, max_batch: int = MAX_BATCH) -> "Profile":
        if static is not None:
            h, w = static
            return cls(1, 1, max_batch, min(h, w), h, max(h, w), True, w)
        d, f = info.default_size, info.vae_factor
        return cls(1, 1, max_batch, max(f, d // 2 // f * f), d, 2 * d, False, d)

    def refuses(self, network: str, batch: int, height: int, width: int) -> str | None:
        """Why a call of `batch` at height x width is outside this profile (None if it fits)."""
        doubled = cfg_batch_factor(network)
        if not self.min_batch <= batch <= self.max_batch * doubled:
            return f"batch {batch} outside the engine's 1..{self.max_batch * doubled}"
        if network == "text_encoder":
            return None
        if self.static:
            if (height, width) != (self.opt_size, self.opt_width):
                return f"size {height}x{width} is not the engine's static {self.opt_size}x{self.opt_width}"
            return None
        if not (self.min_size <= height <= self.max_size and self.min_size <= width <= self.max_size):
            return f"size {height}x{width} outside the engine's {self.min_size}..{self.max_size}"
        return None


def entry_dir(engine_dir: Path, fingerprint: str, backend: str, precision: str) -> Path:
    return Path(engine_dir) / fingerprint / f"{backend}-{precision}"


class Staging:
    """A hidden folder an entry is built in; `commit` writes the manifest and swaps it in."""

    def __init__(self, final: Path):
        self.final = final
        self.dir = final.parent / f"{STAGING_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        self.networks: dict[str, dict] = {}

    def __enter__(self) -> "Staging":
        self.dir.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir.exists():  # not committed: failed or interrupted
            shutil.rmtree(self.dir, ignore_errors=True)

    def add(self, network: str, files: list[str], **facts) -> None:
        self.networks[network] = {"files": files, **facts}

    def commit(self, manifest: dict) -> Path:
        digests = DigestCache("sha256")
        for net in self.networks.values():
            net["sha256"] = {f: digests.digest(self.dir / f) for f in net.pop("files")}
        digests.save()
        manifest = {**manifest, "networks": self.networks, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.dir / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, self.dir / MANIFEST)
        retired = None
        if self.final.exists():
            retired = self.final.parent / f"{RETIRED_PREFIX}{self.final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, retired)
        os.replace(self.dir, self.final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        return self.final


def base_manifest(info, backend: str, precision: str, profile: Profile, **facts) -> dict:
    return {
        "format": ENGINE_FORMAT, "fastsd": __version__, "backend": backend, "precision": precision,
        "checkpoint": info.fingerprint, "source": info.source, "architecture": info.architecture,
        "profile": asdict(profile),
        "host": {"machine": platform.machine(), "python": platform.python_version()}, **facts,
    }


def read_manifest(entry: Path) -> dict | None:
    try:
        return json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def check_entry(entry: Path, fingerprint: str, runtime_facts: dict | None = None) -> tuple[dict, dict[str, str]]:
    """Validate an entry: returns (manifest or {}, {network: problem}) for networks it cannot serve.
    A network absent from the result's problems is usable."""
    manifest = read_manifest(entry)
    if manifest is None:
        return {}, {n: f"no engine entry at {entry}" for n in NETWORKS}
    problems = {}
    whole = _entry_problem(manifest, fingerprint, runtime_facts or {})
    digests = DigestCache("sha256")
    for n in NETWORKS:
        net = manifest.get("networks", {}).get(n)
        if whole:
            problems[n] = whole
        elif net is None:
            problems[n] = "not in the engine entry"
        else:
            for f, want in net.get("sha256", {}).items():
                path = entry / f
                if not path.is_file():
                    problems[n] = f"engine file {f} is missing"
                elif digests.digest(path) != want:
                    problems[n] = f"engine file {f} does not match its manifest hash (modified or corrupt)"
    digests.save()
    return manifest, problems


def _entry_problem(manifest: dict, fingerprint: str, runtime_facts: dict) -> str | None:
    if manifest.get("format") != ENGINE_FORMAT:
        return f"engine format {manifest.get('format')} (this fastsd reads {ENGINE_FORMAT})"
    if manifest.get("fastsd") != __version__:
        return f"built by fastsd {manifest.get('fastsd')} (this is {__version__}); rebuild it"
    if manifest.get("checkpoint") != fingerprint:
        return f"built from other weights ({manifest.get('checkpoint')}, loaded {fingerprint})"
    for key, value in runtime_facts.items():
        built = manifest.get(key, FACT_DEFAULTS.get(key))
        if built != value:
            return f"built for {key}={built}, running with {value}"
    return None


def list_entries(engine_dir: Path) -> list[dict]:
    """Every entry in the store with its size and whether its files are intact."""
    rows = []
    root = Path(engine_dir)
    for entry in sorted(root.glob("*/*")):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        manifest = read_manifest(entry) or {}
        _, problems = check_entry(entry, manifest.get("checkpoint", entry.parent.name))
        problems = {n: p for n, p in problems.items() if n in manifest.get("networks", {})}
        size = sum(p.stat().st_size for p in entry.iterdir() if p.is_file())
        rows.append({"path": entry, "checkpoint": entry.parent.name, "kind": entry.name, "manifest": manifest,
                     "source": manifest.get("source", "?"), "fastsd": manifest.get("fastsd", "?"),
                     "size": size, "networks": sorted(manifest.get("networks", {})),
                     "problems": sorted(set(problems.values())) if manifest else ["no manifest"]})
    return rows


def prune(engine_dir: Path, everything: bool = False, dry_run: bool = False) -> list[Path]:
    """Remove leftovers of interrupted builds and entries that can never be used (no
    manifest, other format or fastsd version, files not matching their hashes); with
    `everything`, all entries. Returns what was (or would be) removed."""
    root = Path(engine_dir)
    doomed = [p for p in root.glob("*/.*") if p.name.startswith((STAGING_PREFIX, RETIRED_PREFIX))]
    for row in list_entries(root):
        if everything or any("other weights" not in p for p in row["problems"]):
            doomed.append(row["path"])
    if not dry_run:
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        for d in root.glob("*"):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return doomed


def trt_shapes(network: str, info, profile: Profile) -> dict[str, tuple[tuple, tuple, tuple]]:
    """TensorRT optimization-profile shapes (min, opt, max) of each input of `network`."""
    from .networks import SPECS, io_shapes

    doubled = cfg_batch_factor(network)
    lo = io_shapes(network, info, profile.min_batch, profile.min_size, profile.min_size)
    opt = io_shapes(network, info, profile.opt_batch * doubled, profile.opt_size, profile.opt_width)
    hi = io_shapes(network, info, profile.max_batch * doubled, profile.max_size, profile.max_size)
    if profile.static:
        lo = io_shapes(network, info, profile.min_batch, profile.opt_size, profile.opt_width)
        hi = io_shapes(network, info, profile.max_batch * doubled, profile.opt_size, profile.opt_width)
    return {name: (lo[name], opt[name], hi[name]) for name in SPECS[network].inputs}


def refit_source(engine_dir: Path, info, backend: str, precision: str) -> Path | None:
    """An intact entry built for another checkpoint of the same architecture, whose
    refittable engines can take this checkpoint's weights instead of a rebuild."""
    for row in list_entries(engine_dir):
        manifest = row["manifest"]
        if (row["kind"] == f"{backend}-{precision}" and row["checkpoint"] != info.fingerprint and not row["problems"]
                and manifest.get("refittable") and manifest.get("architecture") == info.architecture):
            return row["path"]
    return None
