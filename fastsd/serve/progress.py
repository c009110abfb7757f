"""What the worker is doing now, for AUTOMATIC1111's /sdapi/v1/progress, and the interrupt
and skip that stop it (the web UI's buttons, which its API clients call too)."""

from __future__ import annotations

import threading
import time

from .batcher import Interrupted


class Run:
    """One batch being run: its steps so far, its live preview, whether it was told to stop."""

    def __init__(self, slots: list, steps: int):
        self.slots, self.steps, self.done = slots, max(steps, 1), 0
        self.started = time.time()
        self.preview = None  # the newest TAESD preview (PIL) of the batch's first image
        self.stop: str | None = None  # "interrupt" (the batch and the rest of its requests) or "skip" (the batch)

    def step(self) -> None:
        self.done = min(self.done + 1, self.steps)  # PNDM's extra first call: never "21 of 20"
        if self.stop is not None:
            raise Interrupted(whole_jobs=self.stop == "interrupt")

    @property
    def fraction(self) -> float:
        return min(self.done / self.steps, 1.0)


class Progress:
    def __init__(self):
        self._lock = threading.Lock()
        self.current: Run | None = None
        self.timestamp = time.strftime("%Y%m%d%H%M%S")  # the web UI's job_timestamp of the latest batch

    def begin(self, slots: list, steps: int) -> Run:
        with self._lock:
            self.current = Run(slots, steps)
            self.timestamp = time.strftime("%Y%m%d%H%M%S")
            return self.current

    def end(self) -> None:
        with self._lock:
            self.current = None

    def stop(self, kind: str) -> bool:
        """Tell the running batch to stop at its next step; False when none runs (the web UI's
        interrupt likewise does nothing to a job that has not started)."""
        with self._lock:
            if self.current is None:
                return False
            self.current.stop = kind
            return True
