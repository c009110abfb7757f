"""One line when a step will take seconds: building a synthetic model, reading files seen for
the first time (a checkpoint's fingerprint, an engine entry's hashes), optimising or compiling
a large graph at load. Logged on the `fastsd.status` logger at INFO: the `fastsd` command (and
so `fastsd serve`'s log) shows these lines by default, fastsd's other INFO lines with -v; an
application embedding fastsd sees them where it shows INFO."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOGGER = "fastsd.status"
LONG_BYTES = 1 << 30  # reading or compiling this much takes a second or more on the machines measured
SLOW_SECONDS = 2.0  # a step still running after this long says what it is (`slow`)

log = logging.getLogger(LOGGER)
_said: set = set()
_lock = threading.Lock()


_last = [0.0]  # time.monotonic() of the last line said (a status line, a build's progress line)
_active = [0]  # `slow` blocks running (an inner one leaves the speaking to the outer)


def say(message: str, *args) -> None:
    said()
    log.info(message, *args)


def said() -> None:
    """Something was just shown: a `slow` block waits SLOW_SECONDS from now before it speaks."""
    _last[0] = time.monotonic()


def say_once(key, message: str, *args) -> None:
    """`say`, once per process for `key` (threads loading the same files say it once)."""
    with _lock:
        if key in _said:
            return
        _said.add(key)
    say(message, *args)


@contextmanager
def slow(message: str, *args, after: float | None = None) -> Iterator[None]:
    """`say` the message once nothing has been said for `after` seconds (SLOW_SECONDS) while
    the block runs: a step whose time is not known ahead (loading a model: imports, weights,
    engines) says what it is only when a user would otherwise wait that long in silence.
    Silent again, it says so again ("... (still, 9 s so far)") after every twice as long (4 s)
    of silence. Yields an Event: set, the block's step is over (what follows says its own lines)."""
    wait, done = SLOW_SECONDS if after is None else after, threading.Event()
    start = time.monotonic()
    if _active[0]:  # inside another slow block (the CLI's, around the library's): that one speaks
        yield done
        return

    def watch():
        silence, times = wait, 0
        while not done.is_set():
            left = silence - (time.monotonic() - max(start, _last[0]))
            if left > 0:
                if done.wait(left):
                    return
                continue
            if times:
                say(message + " (still, %.0f s so far)", *args, time.monotonic() - start)
            else:
                say(message, *args)
            silence, times = max(2 * wait, 0.1), times + 1  # never 0 (after=0 would spin)

    watcher = threading.Thread(target=watch, daemon=True, name="fastsd-status")
    watcher.start()
    _active[0] += 1
    try:
        yield done
    finally:
        _active[0] -= 1
        done.set()


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
