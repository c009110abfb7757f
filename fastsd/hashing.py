"""File digests, cached by (path, size, mtime) so large files are read once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .synthetic import cache_dir

CHUNK = 1 << 24


class DigestCache:
    """Per-file digests kept in <cache>/digests-<algo>.json; `save()` writes it atomically."""

    def __init__(self, algo: str):
        self.algo, self.file = algo, cache_dir() / f"digests-{algo}.json"
        try:
            self.table = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.table = {}
        self.dirty = False

    def digest(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in self.table:
            h = hashlib.new(self.algo)
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            self.table[key], self.dirty = h.hexdigest(), True
        return self.table[key]

    def save(self) -> None:
        if not self.dirty:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.table))
        os.replace(tmp, self.file)
        self.dirty = False
