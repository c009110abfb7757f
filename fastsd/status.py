"""One line when a step will take seconds: building a synthetic model, reading files seen for
the first time (a checkpoint's fingerprint, an engine entry's hashes), optimising or compiling
a large graph at load. Logged on the `fastsd.status` logger at INFO: the `fastsd` command (and
so `fastsd serve`'s log) shows these lines by default, fastsd's other INFO lines with -v; an
application embedding fastsd sees them where it shows INFO."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

LOGGER = "fastsd.status"
LONG_BYTES = 1 << 30  # reading or compiling this much takes a second or more on the machines measured

log = logging.getLogger(LOGGER)
_said: set = set()
_lock = threading.Lock()


def say(message: str, *args) -> None:
    log.info(message, *args)


def say_once(key, message: str, *args) -> None:
    """`say`, once per process for `key` (threads loading the same files say it once)."""
    with _lock:
        if key in _said:
            return
        _said.add(key)
    say(message, *args)


def file_bytes(paths) -> int:
    """The bytes of the files that exist among `paths`."""
    total = 0
    for p in paths:
        try:
            total += Path(p).stat().st_size
        except OSError:
            pass
    return total


def gigabytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
