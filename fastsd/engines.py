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
import re
import tempfile
import time
import uuid
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no store locks
    fcntl = None

from .catalog import CPU_GRAPH, GRAPH_SUFFIXES, KINDS, NETWORKS
from .errors import OutputPathError
from .hashing import DigestCache, link_files, remove_tree
from .paths import default_engine_dir  # noqa: F401 - re-exported: callers take the default from here
from .status import LONG_BYTES, file_bytes, gigabytes, say, say_once
from .version import __version__

log = logging.getLogger(__name__)

ENGINE_FORMAT = 2  # bump when what an entry holds changes meaning (2: UNet graphs take any latent size)
MANIFEST = "manifest.json"
ENTRY_MARKER = ".fastsd-entry"  # written first into every folder the store makes: proof that prune may remove it
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"
FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")  # checkpoint fingerprints: 8-byte blake2b, hex
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # precision name -> torch dtype's name
# quantized precisions (entries of kinds that quantize at build) -> the precision of what they do not quantize
QUANTIZED = {"int8": "bf16"}
PRECISION_NAMES = (*DTYPES, *QUANTIZED)
# entry folders: <kind>-<precision> (dynamic shapes) or <kind>-<precision>-<H>x<W> (static)
KIND = re.compile(rf"^({'|'.join(KINDS)})-({'|'.join(PRECISION_NAMES)})(?:-([1-9][0-9]*)x([1-9][0-9]*))?$")
SAFE_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a plain name inside the entry: no "/", "..", or "~"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_FIELDS = {"format": int, "fastsd": str, "backend": str, "precision": str, "checkpoint": str,
                   "profile": dict, "networks": dict}
FACT_DEFAULTS = {"clip_skip": 0}  # what entries written before a fact was recorded were built with
PER_BUILD = ("networks", "created", "source")  # manifest keys that may differ between builds of one entry
MAX_BATCH = 4  # default profile: images per call (CFG doubles text encoder / UNet batches)
MAX_CHUNKS = 3  # default profile: prompt chunks of 77 tokens the UNet takes (231 tokens; fastsd/prompts.py)

# Why an entry cannot serve a network: a code to decide on, with the text users read.
NO_ENTRY, UNFINISHED, INVALID, FORMAT, VERSION = "no-entry", "unfinished", "invalid", "format", "version"
OTHER_WEIGHTS, OTHER_FACTS, NOT_IN_ENTRY = "other-weights", "other-facts", "not-in-entry"
FILE_MISSING, FILE_CHANGED = "file-missing", "file-changed"


class Problem(str):
    """The text of a problem (what users read), carrying its `code` (what code decides on)."""

    code: str

    def __new__(cls, code: str, text: str) -> "Problem":
        problem = super().__new__(cls, text)
        problem.code = code
        return problem


def writable_store(root: Path) -> Path:
    """`root`, created if missing, after checking that entries can be written into it."""
    if root.exists() and not root.is_dir():
        raise OutputPathError(f"engine store {root} is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=STAGING_PREFIX + "probe-", dir=root)
        os.rmdir(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write to the engine store {root}: {e.strerror or e}") from None
    return root


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
    max_chunks: int = 1  # the longest text the UNet takes, in chunks of 77 tokens (entries made before
    # prompts past 77 tokens have no such field: they take one chunk)

    def describe(self) -> str:
        size = (f"static {self.opt_size}x{self.opt_width}" if self.static
                else f"dynamic {self.min_size}-{self.max_size} px")
        return f"{size}, batch {self.min_batch}-{self.max_batch}, text up to {self.max_chunks} chunk(s) of 77 tokens"

    @classmethod
    def for_model(cls, info, static: tuple[int, int] | None = None, max_batch: int = MAX_BATCH,
                  max_chunks: int = MAX_CHUNKS) -> "Profile":
        if static is not None:
            h, w = static
            return cls(1, 1, max_batch, min(h, w), h, max(h, w), True, w, max_chunks)
        d, f = info.default_size, info.vae_factor
        return cls(1, 1, max_batch, max(f, d // 2 // f * f), d, 2 * d, False, d, max_chunks)


def entry_name(backend: str, precision: str, profile: Profile | None = None) -> str:
    """The entry's folder name: entries of other profiles (dynamic, each static size) coexist."""
    size = f"-{profile.opt_size}x{profile.opt_width}" if profile is not None and profile.static else ""
    return f"{backend}-{precision}{size}"


def entry_dir(engine_dir: Path, fingerprint: str, backend: str, precision: str, profile: Profile | None = None) -> Path:
    return Path(engine_dir) / fingerprint / entry_name(backend, precision, profile)


def kind_entries(engine_dir: Path, fingerprint: str, backend: str, precision: str) -> list[Path]:
    """The checkpoint's entries of one kind and precision, whatever their profile: static
    ones first (a graph built for one size is the faster one where it fits), largest first."""
    folder = Path(engine_dir) / fingerprint
    try:
        names = [d.name for d in folder.iterdir() if _real_dir(d)]
    except OSError:
        return []
    found = []
    for name in names:
        m = KIND.match(name)
        if m and (m.group(1), m.group(2)) == (backend, precision):
            found.append((0 if m.group(3) else 1, -int(m.group(3) or 0) * int(m.group(4) or 0), name))
    return [folder / name for *_, name in sorted(found)]


def _lock_folder(folder: Path, exclusive: bool) -> int | None:
    """A lock on a checkpoint folder of the store (flock on the folder itself), or None
    when an exclusive one is held elsewhere. Writers hold it shared from before their
    staging folder exists until it is committed or removed; prune holds it exclusive (not
    waiting) while it decides and removes, so it never touches a build in progress. A
    shared lock waits for prune, and re-creates the folder if prune removed it meanwhile.
    Without fcntl (Windows) there is no lock: -1."""
    if fcntl is None:
        return -1
    while True:
        if not exclusive:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(folder, os.O_RDONLY)
        except FileNotFoundError:
            if exclusive:
                return None
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(folder).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same or exclusive:
            return fd
        os.close(fd)  # prune removed the (empty) folder while this waited: make it again


def _unlock(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


class Staging:
    """A hidden folder an entry is built in; `commit` writes the manifest and swaps it in.
    The checkpoint folder stays locked (shared) while it exists, so prune leaves it alone."""

    def __init__(self, final: Path):
        self.final = final
        self.dir = final.parent / f"{STAGING_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        self.networks: dict[str, dict] = {}
        self._lock: int | None = None

    def __enter__(self) -> "Staging":
        self._lock = _lock_folder(self.final.parent, exclusive=False)
        try:
            self.dir.mkdir()
            (self.dir / ENTRY_MARKER).write_text("fastsd engine entry\n")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.dir.exists():  # not committed: failed or interrupted
                remove_tree(self.dir)
        finally:
            _unlock(self._lock)
            self._lock = None

    def add(self, network: str, files: list[str], **facts) -> None:
        self.networks[network] = {"files": files, **facts}

    def commit(self, manifest: dict) -> Path:
        digests = DigestCache("sha256")
        size = file_bytes(self.dir / f for net in self.networks.values() for f in net["files"])
        if size >= LONG_BYTES:
            say("recording the digests of the entry's %s of files (what a load checks them against)", gigabytes(size))
        for net in self.networks.values():
            net["sha256"] = {f: digests.digest(self.dir / f) for f in net.pop("files")}
        digests.save()
        self._keep_other_networks(manifest)
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
            remove_tree(retired)
        return self.final

    def _keep_other_networks(self, manifest: dict) -> None:
        """Building a subset of networks keeps the intact others of the entry it replaces,
        when that entry was built the same way (same checkpoint, profile and settings)."""
        keep = tuple(n for n in NETWORKS if n not in self.networks)
        old, problems = check_entry(self.final, manifest["checkpoint"], networks=keep)
        others = {n: r for n, r in old.get("networks", {}).items() if n in keep and n not in problems}
        if not others:
            return
        same = {k: v for k, v in old.items() if k not in PER_BUILD} == {
            k: v for k, v in manifest.items() if k not in PER_BUILD}
        if not same:
            log.warning("%s: replacing an entry built with other settings; networks dropped: %s",
                        self.final, ", ".join(sorted(others)))
            return
        for n, record in others.items():  # the old entry is retired below; a hard link keeps the file (and its digest)
            link_files(self.final, self.dir, record["sha256"])
            self.networks[n] = record


def base_manifest(info, backend: str, precision: str, profile: Profile, **facts) -> dict:
    return {
        "format": ENGINE_FORMAT, "fastsd": __version__, "backend": backend, "precision": precision,
        "checkpoint": info.fingerprint, "source": info.source, "architecture": info.architecture,
        "profile": asdict(profile),
        "host": {"machine": platform.machine(), "python": platform.python_version()}, **facts,
    }


# ---- what an entry may contain ---------------------------------------------------------

def compute_dtype(precision: str):
    """The torch dtype a precision's unquantized networks, and eager PyTorch, run at."""
    import torch  # here: listing the store does not import torch

    return getattr(torch, DTYPES[QUANTIZED.get(precision, precision)])


def precision_of(dtype) -> str | None:
    """The precision name of a torch dtype, None for one fastsd does not run at."""
    import torch

    return next((name for name, t in DTYPES.items() if getattr(torch, t) == dtype), None)


WEIGHTS_AT_LOAD = "weights_at_load"  # a network record's flag: see weights_at_load()


def weights_at_load(record: dict) -> bool:
    """Whether a network's engine files hold another checkpoint's weights (a refit shares the
    donor entry's files, hard-linked) and the loaded checkpoint's own weights, named as its
    parameters, are given to the engine when it loads: such an engine never runs without them."""
    return record.get(WEIGHTS_AT_LOAD) is True


def shared_files(record: dict) -> list[str]:
    """A network's files that another entry may share (hard-link: a refit, an OpenVINO entry
    built from an ONNX one): all but its CPU-optimised ONNX Runtime graph, which holds this
    checkpoint's weights laid out for one machine (fastsd/backends/onnxruntime.py)."""
    own = (record.get(CPU_GRAPH) or {}).get("file")
    return sorted(f for f in record["sha256"] if own is None or f not in (own, own + ".data"))


def takes_weights_at_load(engine_dir: Path, fingerprints) -> bool:
    """Whether any entry of these checkpoints (or ControlNets) in the store has a network whose
    weights are given at load (from the manifests alone)."""
    for fp in fingerprints:
        folder = Path(engine_dir) / fp
        for entry in (_entries_in(folder) if _real_dir(folder) else ()):
            manifest = read_manifest(entry)
            networks = manifest.get("networks") if isinstance(manifest, dict) else None
            if isinstance(networks, dict) and any(isinstance(r, dict) and weights_at_load(r)
                                                  for r in networks.values()):
                return True
    return False


def record_bytes(entry: Path, record: dict) -> int:
    """The bytes of a network's files in an entry (how long its engine takes to load, roughly)."""
    return file_bytes(entry / f for f in record["sha256"])


def graph_file(network: str, record: dict) -> str:
    """The graph (or engine) file of a validated manifest's network record."""
    return next(f for f in record["sha256"] if f in {network + s for s in GRAPH_SUFFIXES})


def _profile_problem(profile) -> str | None:
    names = {f.name: f.type for f in fields(Profile)}
    required = {f.name for f in fields(Profile) if f.default is MISSING}
    if not isinstance(profile, dict) or not required <= set(profile) <= set(names):
        return "profile fields are not those of a shape profile"
    for key, value in profile.items():
        want_bool = names[key] in (bool, "bool")
        if isinstance(value, bool) != want_bool or not isinstance(value, int) or (not want_bool and value < 1):
            return f"profile field {key!r} has an invalid value {value!r}"
    p = Profile(**profile)
    if not (p.min_batch <= p.opt_batch <= p.max_batch and p.min_size <= p.max_size):
        return "profile bounds are out of order"
    return None


def _network_problem(network: str, record) -> str | None:
    if network not in NETWORKS:
        return f"unknown network {network!r}"
    hashes = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(hashes, dict) or not hashes:
        return f"{network}: no file hashes"
    for name, digest in hashes.items():
        if not (isinstance(name, str) and SAFE_FILE.match(name) and name.startswith(network + ".")):
            return f"{network}: file name {name!r} is not one of this network's files in the entry"
        if not (isinstance(digest, str) and SHA256.match(digest)):
            return f"{network}: {name} has no valid sha256"
    if not isinstance(record.get(WEIGHTS_AT_LOAD, False), bool):
        return f"{network}: {WEIGHTS_AT_LOAD} is not true or false"
    cpu = record.get(CPU_GRAPH)
    if cpu is not None and not (isinstance(cpu, dict) and cpu.get("file") in hashes and
                                isinstance(cpu.get("for"), str)):
        return f"{network}: {CPU_GRAPH} does not name one of its files and the machine it was made for"
    if sum(name in {network + s for s in GRAPH_SUFFIXES} for name in hashes) != 1:
        return f"{network}: no graph file ({network}.onnx / .pt2 / .plan)"
    return None


def manifest_problem(manifest, entry: Path) -> str | None:
    """Why `manifest` is not a well-formed manifest of the entry folder `entry` (None if it is).
    Beyond types: file names are plain names of the network's own files, and every file in
    the folder is hashed by the manifest, so nothing the runtime loads goes unverified."""
    if not isinstance(manifest, dict):
        return "the manifest is not a JSON object"
    for key, kind in MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"manifest field {key!r} is missing or not a {kind.__name__}"
    why = _profile_problem(manifest["profile"])
    name = None if why else entry_name(manifest["backend"], manifest["precision"], Profile(**manifest["profile"]))
    if name is not None and name != entry.name:
        return f"the manifest describes a {name} entry, not {entry.name}"
    if why is None:
        why = next(filter(None, (_network_problem(n, r) for n, r in manifest["networks"].items())), None)
    if why is not None:
        return why
    hashed = [f for r in manifest["networks"].values() for f in r["sha256"]]
    if len(hashed) != len(set(hashed)):
        return "a file is claimed by two networks"
    try:
        present = {p.name for p in entry.iterdir() if p.name not in (MANIFEST, ENTRY_MARKER)}
    except OSError as e:
        return f"cannot list the entry ({e.strerror})"
    unhashed = sorted(present - set(hashed))
    if unhashed:
        return f"{unhashed[0]} is in the entry but not hashed by its manifest"
    return None


def read_manifest(entry: Path):
    """The parsed manifest.json of `entry` (any JSON value), or None if absent or not JSON."""
    try:
        return json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def check_entry(entry: Path, fingerprint: str, runtime_facts: dict | None = None,
                networks: tuple[str, ...] = NETWORKS) -> tuple[dict, dict[str, str]]:
    """Validate an entry for `networks`: returns (manifest or {}, {network: problem}) for those
    it cannot serve. A network of `networks` absent from the problems is usable. Each of their
    files must have its manifest's sha256: read and hashed where this file (its device, inode,
    size, mtime and ctime) was not hashed before, else the digest recorded for exactly that
    file (a rewrite in place moves its ctime, a replacement its inode: see fastsd/hashing.py).
    Files of other networks are not read."""
    raw = read_manifest(entry)
    if raw is None:
        why = (Problem(UNFINISHED, "the entry has no manifest (unfinished)") if entry.is_dir()
               else Problem(NO_ENTRY, f"no engine entry at {entry}"))
        return {}, {n: why for n in networks}
    why = manifest_problem(raw, entry)
    if why is not None:
        return {}, {n: Problem(INVALID, f"invalid manifest ({why})") for n in networks}
    manifest: dict = raw
    problems = {}
    whole = _entry_problem(manifest, fingerprint, runtime_facts or {})
    digests = DigestCache("sha256")
    if not whole:
        _say_unread(entry, manifest, networks, digests)
    for n in networks:
        net = manifest["networks"].get(n)
        if whole:
            problems[n] = whole
        elif net is None:
            problems[n] = Problem(NOT_IN_ENTRY, "not in the engine entry")
        else:
            for f, want in net["sha256"].items():
                path = entry / f
                if path.is_symlink() or not path.is_file():
                    problems[n] = Problem(FILE_MISSING, f"engine file {f} is missing")
                elif digests.digest(path) != want:
                    problems[n] = Problem(FILE_CHANGED,
                                          f"engine file {f} does not match its manifest hash (modified or corrupt)")
    digests.save()
    return manifest, problems


def _say_unread(entry: Path, manifest: dict, networks, digests: DigestCache) -> None:
    """One line where the networks' files not hashed before take long to read (once per entry)."""
    files = [entry / f for n in networks for f in manifest["networks"].get(n, {}).get("sha256", {})]
    unread = file_bytes(f for f in files if digests.recorded(f) is None)
    if unread >= LONG_BYTES:
        say_once(("engine files", str(entry)), "checking %s of engine files in %s not read before (their manifest "
                 "hashes; once)", gigabytes(unread), entry)


def _entry_problem(manifest: dict, fingerprint: str, runtime_facts: dict) -> Problem | None:
    if manifest.get("format") != ENGINE_FORMAT:
        return Problem(FORMAT, f"engine format {manifest.get('format')} (this fastsd reads {ENGINE_FORMAT}); "
                               "rebuild it")
    if manifest.get("fastsd") != __version__:
        return Problem(VERSION, f"built by fastsd {manifest.get('fastsd')} (this is {__version__}); rebuild it")
    if manifest.get("checkpoint") != fingerprint:
        return Problem(OTHER_WEIGHTS, f"built from other weights ({manifest.get('checkpoint')}, loaded {fingerprint})")
    for key, value in runtime_facts.items():
        built = manifest.get(key, FACT_DEFAULTS.get(key))
        if built != value:
            return Problem(OTHER_FACTS, f"built for {key}={built}, running with {value}")
    return None


# ---- walking the store: only what fastsd made -----------------------------------------

def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Folders of the store named like a checkpoint fingerprint (symlinks are not followed)."""
    try:
        return sorted(d for d in root.iterdir() if FINGERPRINT.match(d.name) and _real_dir(d))
    except OSError:  # no store yet, or not a folder
        return []


def _is_fastsd_folder(folder: Path) -> bool:
    """Provably made by fastsd: our marker file, or a manifest that names this folder's checkpoint."""
    marker = folder / ENTRY_MARKER
    if marker.is_file() and not marker.is_symlink():
        return True
    manifest = read_manifest(folder)
    return (isinstance(manifest, dict) and not (folder / MANIFEST).is_symlink()
            and isinstance(manifest.get("format"), int) and manifest.get("checkpoint") == folder.parent.name)


def _entries(root: Path) -> list[Path]:
    return [e for d in _checkpoint_dirs(root) for e in _entries_in(d)]


def _entries_in(folder: Path) -> list[Path]:
    return [e for e in sorted(folder.iterdir()) if KIND.match(e.name) and _real_dir(e) and _is_fastsd_folder(e)]


def list_entries(engine_dir: Path) -> list[dict]:
    """Every fastsd entry in the store with its size and whether its files are intact."""
    return [_row(entry) for entry in _entries(Path(engine_dir))]


def _row(entry: Path) -> dict:
    manifest, problems = check_entry(entry, entry.parent.name)  # manifest is {} unless valid
    if manifest:
        problems = {n: p for n, p in problems.items() if n in manifest["networks"]}
    size = sum(p.lstat().st_size for p in entry.iterdir() if p.is_file() and not p.is_symlink())
    profile = Profile(**manifest["profile"]).describe() if manifest else "?"
    return {"path": entry, "checkpoint": entry.parent.name, "kind": entry.name, "manifest": manifest,
            "profile": profile,
            "source": str(manifest.get("source", "?")), "fastsd": str(manifest.get("fastsd", "?")),
            "size": size, "networks": sorted(manifest.get("networks", {})),
            "problems": sorted(set(problems.values()))}  # Problems: text with a code


def _leftovers(folder: Path) -> list[Path]:
    """Staging and retired folders of interrupted builds: ours by marker or manifest, or empty."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith((STAGING_PREFIX, RETIRED_PREFIX)) and _real_dir(p):
            if _is_fastsd_folder(p) or not any(p.iterdir()):
                out.append(p)
    return out


def prune(engine_dir: Path, everything: bool = False, dry_run: bool = False) -> list[Path]:
    """Remove leftovers of interrupted builds and entries that can never be used (no
    manifest, invalid manifest, other format or fastsd version, files not matching their
    hashes); with `everything`, all entries. Only folders fastsd provably made, directly
    under <store>/<fingerprint>/, are candidates; symlinks are never followed. A checkpoint
    folder a build is writing in (locked) is left alone, said in a warning.
    Returns what was (or would be) removed."""
    root = Path(engine_dir)
    real_root = root.resolve()
    removed = []
    for folder in _checkpoint_dirs(root):
        lock = _lock_folder(folder, exclusive=True)
        if lock is None:
            log.warning("%s: a build is writing there now; pruning leaves it alone", folder)
            continue
        try:
            doomed = _leftovers(folder) + [
                entry for entry in _entries_in(folder)
                if everything or any(p.code != OTHER_WEIGHTS for p in _row(entry)["problems"])]
            doomed = [p for p in doomed if p.resolve().parent.parent == real_root]
            removed += doomed
            if not dry_run:
                for p in doomed:
                    remove_tree(p)  # removes links inside, never what they point to
                if doomed and _real_dir(folder) and not any(folder.iterdir()):
                    folder.rmdir()
        except FileNotFoundError:  # removed by another prune meanwhile
            continue
        finally:
            _unlock(lock)
    return removed


def refit_source(engine_dir: Path, info, backend: str, precision: str, runtime_facts: dict | None = None,
                 profile: Profile | None = None) -> Path | None:
    """An intact entry built for another checkpoint of the same architecture, whose
    refittable engines can take this checkpoint's weights instead of a rebuild: built with
    the same runtime facts (for TensorRT: its version and the GPU; a plan from another one
    does not even deserialize) and, where given, for the same shape profile."""
    for row in list_entries(engine_dir):
        manifest = row["manifest"]
        m = KIND.match(row["kind"])
        if (m and (m.group(1), m.group(2)) == (backend, precision) and row["checkpoint"] != info.fingerprint
                and not row["problems"]
                and manifest.get("refittable") and manifest.get("architecture") == info.architecture
                and all(manifest.get(k) == v for k, v in (runtime_facts or {}).items())
                and (profile is None or manifest.get("profile") == asdict(profile))):
            return row["path"]
    return None
