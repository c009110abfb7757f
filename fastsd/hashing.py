"""File digests, cached so large files are read once.

A cached digest is keyed on (path, device, inode, size, mtime, ctime). A file rewritten
in place keeps its path, size and (if the writer restores it) its mtime, but the kernel
moves its ctime on every write and on every utime(), and a replaced file has a new
inode, so neither can reuse a stale digest. `digest_file` skips the cache altogether:
the engine loader uses it for the files it is about to run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .paths import cache_dir

CHUNK = 1 << 24
CACHE_FORMAT = 2  # bump when the key changes (old tables are dropped, never trusted)


def digest_file(path: Path, algo: str) -> str:
    """The digest of `path`'s bytes, read now."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _key(path: Path) -> str:
    st = os.stat(path)
    return f"{Path(path).resolve()}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class DigestCache:
    """Per-file digests kept in <cache>/digests-<algo>.json; `save()` writes it atomically."""

    def __init__(self, algo: str):
        self.algo, self.file = algo, cache_dir() / f"digests-{algo}.json"
        try:
            table = json.loads(self.file.read_text())
        except (OSError, ValueError):
            table = None
        ok = isinstance(table, dict) and table.get("format") == CACHE_FORMAT and isinstance(table.get("files"), dict)
        self.table: dict[str, str] = table["files"] if ok else {}
        self.dirty = False

    def digest(self, path: Path) -> str:
        key = _key(path)
        cached = self.table.get(key)
        if not isinstance(cached, str):
            cached = digest_file(path, self.algo)
            if _key(path) == key:  # unchanged while it was read: safe to remember
                self.table[key], self.dirty = cached, True
        return cached

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "files": self.table}))
            os.replace(tmp, self.file)
        except OSError:  # a read-only cache costs speed, never correctness
            pass
        self.dirty = False
