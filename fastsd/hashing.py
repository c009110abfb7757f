"""File digests, cached so large files are read once.

A cached digest is keyed on the file itself: (device, inode, size, mtime, ctime). A file
rewritten in place keeps its inode, size and (if the writer restores it) its mtime, but
the kernel moves its ctime on every write, truncation, chmod and utime(), and nothing but
the system clock sets it back; a replaced file has a new inode. So no change to a file's
bytes can keep a stale digest valid, and the digest of a file follows it through renames
(an engine entry's files hashed when the entry was committed from its staging folder) and
hard links (one inode: the same bytes). Engine files and checkpoint weights are checked
this way on every load; `digest_file` reads a file regardless. A digest is only recorded
for a file last changed more than SETTLED seconds before it was read: on a file system whose
timestamps are coarse (whole or even seconds), a rewrite within the same tick as the
write before it would keep the ctime, so a file that recent is hashed again next time
(what git calls "racily clean").

`prefetch` hashes files on a background thread (hashlib and file reads release the GIL):
a checkpoint seen for the first time is hashed while the libraries import and its modules
are built, and `digest` waits for that result instead of reading the file again.

A hard link fastsd makes itself (`link_or_copy`: an engine entry sharing another's files)
moves the inode's ctime without touching its bytes; the digest recorded for the file just
before the link is carried to its new identity when nothing but the ctime (and the link
count) changed across the link, so linking costs no second read of gigabytes. Removing such
a link (`remove_tree`: fastsd replacing or pruning an entry) moves the ctime of the files that
live on as well; their records are carried across the unlink the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import stat
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from .paths import cache_dir

CHUNK = 1 << 24
SETTLED = 2.0  # seconds since a file's last change before its digest may be recorded
CACHE_FORMAT = 3  # bump when the key changes (old tables are dropped, never trusted); 3: no path


def digest_file(path: Path, algo: str) -> str:
    """The digest of `path`'s bytes, read now."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _key(path: Path) -> str:
    return _stat_key(os.stat(path))


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


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

    def recorded(self, path: Path) -> str | None:
        """The digest recorded for the file as it is now, without reading it (None: not known)."""
        try:
            cached = self.table.get(_key(path))
        except OSError:
            return None
        return cached if isinstance(cached, str) else None

    def digest(self, path: Path) -> str:
        key = _key(path)
        cached = self.table.get(key)
        if not isinstance(cached, str):
            ahead = _pending.get((self.algo, key))  # hashed in the background (`prefetch`): its result
            started, cached = ahead.result() if ahead is not None else (time.time(), digest_file(path, self.algo))
            st = os.stat(path)
            # unchanged while it was read, and changed last before the clock's coarsest tick: safe to remember
            if _stat_key(st) == key and started - st.st_ctime > SETTLED:
                self.table[key], self.dirty = cached, True
        return cached

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")  # threads save too
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "files": self.table}))
            os.replace(tmp, self.file)
        except OSError:  # a read-only cache costs speed, never correctness
            pass
        self.dirty = False


_pending: dict[tuple[str, str], Future] = {}  # (algo, file identity) -> (started, digest) hashed in the background
_jobs: queue.Queue = queue.Queue()
_worker_lock = threading.Lock()
_worker: threading.Thread | None = None


def _work() -> None:
    while True:
        path, algo, future = _jobs.get()
        try:
            started = time.time()
            future.set_result((started, digest_file(path, algo)))
        except BaseException as e:  # noqa: BLE001 - the waiting digest() raises it (a file gone, unreadable)
            future.set_exception(e)


def _forget_after_fork() -> None:
    """A forked child has no digest thread: reads in flight in the parent would never finish here."""
    global _jobs, _worker
    _pending.clear()
    _jobs, _worker = queue.Queue(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def prefetch(paths, algo: str) -> None:
    """Start hashing, one after another on a background thread, those of `paths` whose digest
    is not recorded; a later `DigestCache(algo).digest` of the same, unchanged file (same
    identity) takes that result, and records it as its own read would. Best effort: a path
    that cannot be read is left to `digest`."""
    global _worker
    table = DigestCache(algo).table
    for path in paths:
        try:
            key = _key(Path(path))
        except OSError:
            continue
        if key in table or (algo, key) in _pending:
            continue
        future: Future = Future()
        _pending[(algo, key)] = future
        _jobs.put((Path(path), algo, future))
    with _worker_lock:
        if _worker is None:  # a daemon: a process that exits early is not held up by a read
            _worker = threading.Thread(target=_work, name="fastsd-digests", daemon=True)
            _worker.start()


def link_or_copy(src: Path, dst: Path, digests: DigestCache | None = None) -> None:
    """`dst` holds `src`'s bytes: a hard link (no space, no write) where the file system
    allows, else a copy. The store never rewrites a file in place (entries are staged and
    renamed) and each entry's manifest hashes its files, so a shared inode cannot change one
    entry unseen. With `digests`, a digest recorded for `src` before the link stays valid
    for the linked file (see the module's docstring)."""
    before = os.stat(src)
    known = digests.table.get(_stat_key(before)) if digests is not None else None
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        return
    if isinstance(known, str):
        _carry(digests, known, before, os.stat(dst), +1)


def _carry(digests: DigestCache, known: str, before: os.stat_result, after: os.stat_result, links: int) -> None:
    """Record `known` (the digest of the file as `before`) for its identity `after` fastsd's own
    link or unlink, where nothing but the ctime changed and the link count moved by `links`."""
    same = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns) == \
        (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns)
    if same and after.st_nlink == before.st_nlink + links:
        digests.table[_stat_key(after)], digests.dirty = known, True


def link_files(src: Path, dst: Path, files) -> None:
    """Each of `files` of the folder `src` hard-linked into the folder `dst` (`link_or_copy`),
    the digests recorded for them carried over."""
    digests = DigestCache("sha256")
    for f in files:
        link_or_copy(src / f, dst / f, digests)
    digests.save()


def remove_tree(folder: Path, algo: str = "sha256") -> None:
    """shutil.rmtree(folder, ignore_errors=True) for fastsd's own folders (a replaced or pruned
    entry, a staging folder), keeping valid the digests recorded for its files that live on
    through other hard links (a refit's or an OpenVINO entry's shared files): an unlink moves
    the inode's ctime, so each record moves to the file's new identity when nothing but the
    ctime and the link count changed across the unlink (as `link_or_copy` does for a link)."""
    folder = Path(folder)
    if not folder.is_symlink() and folder.is_dir():
        digests = DigestCache(algo)
        for path in folder.iterdir():
            try:
                _unlink_keeping(path, digests)
            except OSError:
                pass
        digests.save()
    shutil.rmtree(folder, ignore_errors=True)


def _unlink_keeping(path: Path, digests: DigestCache) -> None:
    """Unlink a regular file with other links and a recorded digest, carrying the record (see remove_tree)."""
    if path.is_symlink() or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        before = os.fstat(fd)
        known = digests.table.get(_stat_key(before))
        if before.st_nlink < 2 or not stat.S_ISREG(before.st_mode) or not isinstance(known, str):
            return
        os.unlink(path)
        _carry(digests, known, before, os.fstat(fd), -1)
    finally:
        os.close(fd)
