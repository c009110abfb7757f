"""Dynamic batching: requests whose images share a shape and settings join one UNet batch.

A Job is one HTTP request: a key (what must match to share a batch: mode, size, steps,
guidance, sampler, ...) and n images. The batcher hands out batches of up to `max_batch`
images of one key, in arrival order: the oldest waiting job decides the next key, and its
batch waits at most `window_s` after that job arrived for others to join. A job's images
may span batches (n > max_batch, or a batch that was nearly full). The batches run one at
a time on one worker thread, off the event loop; results come back per image.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The queue holds max_queue requests already (HTTP 429)."""


class DrainingError(Exception):
    """The batcher stopped taking work (HTTP 503)."""


class Cancelled(Exception):
    """Raised inside a running batch once every request in it has gone."""


class Interrupted(Exception):
    """Raised inside a running batch told to stop (A1111's skip and interrupt): its images are
    dropped (None in their requests' results); with `whole_jobs`, so are its requests' images
    not yet run, and those requests are answered with what they have."""

    def __init__(self, whole_jobs: bool):
        super().__init__("interrupted" if whole_jobs else "skipped")
        self.whole_jobs = whole_jobs


@dataclass(eq=False)
class Job:
    key: Hashable  # requests with equal keys may share a batch
    n: int  # images
    payload: Any  # what the runner needs for this request's images
    arrival: float = field(default_factory=time.monotonic)
    taken: int = 0  # images handed to batches so far
    started: float | None = None  # when its first image went into a batch (monotonic)
    results: list = field(default_factory=list)
    future: asyncio.Future | None = None
    cancelled: bool = False
    left: int = 0  # images not yet back

    @property
    def waiting(self) -> int:
        return self.n - self.taken


@dataclass(frozen=True)
class Slot:
    job: Job
    index: int  # which of the job's images


# runner(slots, stopped) -> (one result per slot, timings dict); runs on the worker thread.
# stopped() turns True once every job in the batch is cancelled: the runner may raise Cancelled.
Runner = Callable[[list[Slot], Callable[[], bool]], tuple[list, dict]]


class Batcher:
    def __init__(self, runner: Runner, max_batch: int = 4, window_s: float = 0.01, max_queue: int = 64,
                 on_batch: Callable[[list[Slot], dict], None] | None = None):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and window_s >= 0")
        self.runner, self.max_batch, self.window_s, self.max_queue = runner, max_batch, window_s, max_queue
        self.on_batch = on_batch
        self._pending: list[Job] = []  # jobs with images not yet in a batch, oldest first
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsd-worker")
        self._accepting = True
        self._running: list[Slot] = []

    # ---- state ------------------------------------------------------------------------

    @property
    def queued_requests(self) -> int:
        return len(self._pending)

    @property
    def queued_images(self) -> int:
        return sum(j.waiting for j in self._pending)

    @property
    def running_images(self) -> int:
        return len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._running)

    # ---- the event loop's side ----------------------------------------------------------

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="fastsd-batcher")

    async def submit(self, job: Job) -> list:
        """Queue `job` and wait for its images (a list of n results, in order). Cancelling the
        awaiting task cancels the job: its images not yet started are dropped, and a running
        batch stops once all of its jobs are gone."""
        if not self._accepting:
            raise DrainingError("the server is shutting down")
        if len(self._pending) >= self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
        job.future = asyncio.get_running_loop().create_future()
        job.results, job.left = [None] * job.n, job.n
        self._pending.append(job)
        self._arrived.set()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        if job in self._pending:
            self._pending.remove(job)
        if job.future is not None and not job.future.done():
            job.future.cancel()

    async def close(self) -> None:
        """Stop taking jobs, finish every queued and running one, stop the worker."""
        self._accepting = False
        while self.busy:
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._pending[0]
            deadline = first.arrival + self.window_s
            while self._ready(first.key) < self.max_batch and not first.cancelled:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    break
            slots = self._take(first.key)
            if slots:
                await self._run(slots)

    def _ready(self, key) -> int:
        return sum(j.waiting for j in self._pending if j.key == key)

    def _take(self, key) -> list[Slot]:
        slots: list[Slot] = []
        for job in list(self._pending):
            if job.key != key or job.cancelled:
                continue
            k = min(job.waiting, self.max_batch - len(slots))
            if job.started is None:
                job.started = time.monotonic()
            slots += [Slot(job, job.taken + i) for i in range(k)]
            job.taken += k
            if not job.waiting:
                self._pending.remove(job)
            if len(slots) == self.max_batch:
                break
        return slots

    async def _run(self, slots: list[Slot]) -> None:
        loop = asyncio.get_running_loop()
        jobs = list(dict.fromkeys(s.job for s in slots))
        self._running = slots
        try:
            try:
                results, timings = await loop.run_in_executor(self._executor, self.runner, slots,
                                                              lambda: all(j.cancelled for j in jobs))
                if len(results) != len(slots):
                    raise RuntimeError(f"the batch runner gave {len(results)} results for {len(slots)} images")
            except Cancelled:
                return
            except Interrupted as e:
                self._interrupted(slots, jobs, e.whole_jobs)
                return
            except Exception as e:  # noqa: BLE001 - handed to the requests that asked
                if len(jobs) > 1:  # one request's trouble must not fail the others: each alone
                    for job in jobs:
                        await self._run([s for s in slots if s.job is job])
                    return
                self._fail(jobs[0], e)
                return
            if self.on_batch is not None:
                self.on_batch(slots, timings)
            for slot, result in zip(slots, results, strict=True):
                job = slot.job
                job.results[slot.index] = result
                job.left -= 1
                if not job.left and job.future is not None and not job.future.done():
                    job.future.set_result(job.results)
        finally:
            self._running = []

    def _interrupted(self, slots: list[Slot], jobs: list[Job], whole_jobs: bool) -> None:
        for job in jobs:
            job.left -= sum(1 for s in slots if s.job is job)
            if whole_jobs and job.waiting:
                job.left -= job.waiting
                job.taken = job.n
                if job in self._pending:
                    self._pending.remove(job)
            if not job.left and job.future is not None and not job.future.done():
                job.future.set_result(job.results)

    def _fail(self, job: Job, error: Exception) -> None:
        if job.future is not None and not job.future.done():
            job.future.set_exception(error)
        self.cancel(job)  # its images not yet run are dropped
