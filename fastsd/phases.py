"""Where a process's start goes: seconds per phase (imports, checkpoint read, fingerprint,
engine-file check, engine load and compile, first call), added up as they happen in this
process. `fastsd generate` writes them as JSON to the file $FASTSD_PHASES names, its imports
counted from $FASTSD_T0 (the launcher's time.time() when it started the process): how
`fastsd bench --cold-start` breaks its cold start down.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

IMPORTS, CHECKPOINT, FINGERPRINT = "imports", "checkpoint read", "fingerprint"
ENGINE_FILES, ENGINE_LOAD, FIRST_CALL = "engine-file check", "engine load", "first call"
ORDER = (IMPORTS, CHECKPOINT, FINGERPRINT, ENGINE_FILES, ENGINE_LOAD, FIRST_CALL)  # one after another
READY = "ready"  # a mark: seconds from launch to the first call's start (time to ready)
AHEAD = "engines loaded ahead"  # on the preload thread (backends/preload.py), overlapping the phases above
PHASES_ENV, T0_ENV = "FASTSD_PHASES", "FASTSD_T0"

_lock = threading.Lock()
_seconds: dict[str, float] = {}
_marks: dict[str, float] = {}  # name -> seconds since launch when it was reached
_open = threading.local()  # this thread's phases in progress: [[name, seconds of the phases inside it]]


def add(name: str, seconds: float) -> None:
    with _lock:
        _seconds[name] = _seconds.get(name, 0.0) + seconds


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block into `name`, less the phases timed inside it (a fingerprint inside the
    checkpoint read counts as fingerprint only), so the phases add up to the time they cover."""
    stack = _open.__dict__.setdefault("stack", [])
    stack.append([name, 0.0])
    t0 = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - t0
        _, inner = stack.pop()
        add(name, elapsed - inner)
        if stack:
            stack[-1][1] += elapsed


def _since_launch() -> float | None:
    """Seconds since $FASTSD_T0 (the launcher's time.time() when it started the process); None where unset."""
    try:
        return time.time() - float(os.environ[T0_ENV])
    except (KeyError, ValueError):
        return None


def since_launch(name: str) -> None:
    """Add the time since $FASTSD_T0 (set by the launcher) to `name`; nothing where it is unset."""
    seconds = _since_launch()
    if seconds is not None:
        add(name, seconds)


def mark(name: str) -> None:
    """Note the seconds since $FASTSD_T0 now, under `name` (not a phase: nothing adds up)."""
    seconds = _since_launch()
    if seconds is not None:
        _marks[name] = seconds


def seconds() -> dict[str, float]:
    with _lock:
        return dict(_seconds)


def write_if_asked() -> None:
    """The phases into $FASTSD_PHASES (when set); the launcher measures the total itself."""
    target = os.environ.get(PHASES_ENV)
    if target:
        Path(target).write_text(json.dumps({"phases": seconds(), "marks": dict(_marks)}))
