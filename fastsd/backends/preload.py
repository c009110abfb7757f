"""Engines loaded ahead: while `Pipeline.from_pretrained` reads the checkpoint, a background
thread finds, from the store's manifests alone, the engine each network's first choice will
load and loads it, largest first (ONNX Runtime's session, OpenVINO's compiled model; both
release the GIL while they work), so the engine load overlaps the checkpoint read; the
pipeline, done reading, loads the rest smallest first (select.make_backend).

Nothing here decides what runs: the runner that loads an engine asks `take` for one made
with exactly its own settings (a key of the file and every option that shapes it) and makes
its own where there is none. Whoever gets to a key first makes it: the runner claims a key
the thread has not reached (the thread then skips it), and waits for one the thread is making.
What no runner took is dropped when the pipeline is made (`Preload.release`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Hashable

from .. import phases

log = logging.getLogger(__name__)

_lock = threading.Lock()
_made: dict[Hashable, Future] = {}  # key -> the engine being (or already) made ahead
_claimed: set[Hashable] = set()  # keys a runner made itself while a preload ran: not made ahead any more
_running = 0  # preloads not released yet


def take(key: Hashable):
    """The engine made ahead under `key` (waiting for it while it is being made), or None: the
    caller makes its own (a failure ahead is left to the caller's load, which reports it)."""
    with _lock:
        future = _made.pop(key, None)
        if future is None:
            if _running:
                _claimed.add(key)
            return None
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - the runner's own load says what is wrong
        return None


class Preload:
    """One background thread making the engines `find` names (a list of (key, make)); started
    at once. `release` drops what no runner took and stops making more."""

    def __init__(self, find: Callable[[], list[tuple[Hashable, Callable[[], object]]]]):
        global _running
        self._find, self._keys, self._stopped = find, [], threading.Event()
        with _lock:
            _running += 1
        self.thread = threading.Thread(target=self._run, name="fastsd-preload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            jobs = self._find()
        except Exception as e:  # noqa: BLE001 - best effort: the pipeline's own load finds what is wrong
            log.debug("no engines loaded ahead: %s", e)
            return
        for key, make in jobs:
            with _lock:
                if self._stopped.is_set() or key in _claimed or key in _made:
                    continue
                future: Future = Future()
                _made[key] = future
                self._keys.append(key)
            t0 = time.perf_counter()
            try:
                future.set_result(make())
                phases.add(phases.AHEAD, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                future.set_exception(e)

    def release(self) -> None:
        global _running
        with _lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            for key in self._keys:
                _made.pop(key, None)
            self._keys = []
            _running -= 1
            if not _running:
                _claimed.clear()
