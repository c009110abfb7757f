"""fastsd serve's dynamic batcher, with a recording runner in place of the pipeline."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")  # fastsd.serve imports its app (the serve extra)

from fastsd.serve.batcher import Batcher, Cancelled, DrainingError, Job, QueueFullError


class Recorder:
    """A runner that records each batch as [(job name, image index)] and can be held."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[tuple[str, int]]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.fail_on = fail_on

    def __call__(self, slots, stopped):
        self.started.set()
        while not self.hold.wait(0.01):
            if stopped():
                raise Cancelled()
        names = [(s.job.payload, s.index) for s in slots]
        self.batches.append(names)
        if self.fail_on is not None and any(name == self.fail_on for name, _ in names):
            raise ValueError(f"{self.fail_on} is bad")
        return [f"{name}#{i}" for name, i in names], {"total": 0.0}


def started(rec: Recorder, **kw) -> Batcher:
    b = Batcher(rec, **kw)
    b.start()
    return b


async def until_running(rec: Recorder) -> None:
    while not rec.started.is_set():
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_same_key_requests_share_batches_in_arrival_order():
    rec = Recorder()

    async def main():
        b = started(rec, max_batch=4, window_s=0.2, max_queue=16)
        jobs = [Job("k1", 1, "A"), Job("k2", 1, "B"), Job("k1", 2, "C"), Job("k1", 3, "D")]
        out = await asyncio.gather(*(b.submit(j) for j in jobs))
        await b.close()
        return out

    out = run(main())
    assert out == [["A#0"], ["B#0"], ["C#0", "C#1"], ["D#0", "D#1", "D#2"]]
    # A decides the first batch (k1, filled to 4 from C and D); then B, the oldest left; then D's rest
    assert rec.batches == [[("A", 0), ("C", 0), ("C", 1), ("D", 0)], [("B", 0)], [("D", 1), ("D", 2)]]


def test_a_request_within_the_window_joins_one_after_it_does_not():
    rec = Recorder()

    async def main(window):
        b = started(rec, max_batch=8, window_s=window, max_queue=16)
        first = asyncio.ensure_future(b.submit(Job("k", 1, "first")))
        await asyncio.sleep(0.1)
        second = await b.submit(Job("k", 1, "second"))
        await first
        await b.close()
        return second

    run(main(1.0))
    assert rec.batches == [[("first", 0), ("second", 0)]]
    rec.batches.clear()
    run(main(0.0))
    assert rec.batches == [[("first", 0)], [("second", 0)]]


def test_full_queue_refuses_and_cancelled_requests_never_run():
    rec = Recorder()
    rec.hold.clear()

    async def main():
        b = started(rec, max_batch=1, window_s=0.0, max_queue=2)
        running = asyncio.ensure_future(b.submit(Job("k", 1, "running")))
        await until_running(rec)
        waiting = asyncio.ensure_future(b.submit(Job("k", 1, "waiting")))
        dropped = asyncio.ensure_future(b.submit(Job("k", 1, "dropped")))
        await asyncio.sleep(0.05)
        assert b.queued_requests == 2
        with pytest.raises(QueueFullError):
            await b.submit(Job("k", 1, "refused"))
        dropped.cancel()  # its client went away while it waited
        await asyncio.sleep(0.05)
        assert b.queued_requests == 1
        rec.hold.set()
        assert await running == ["running#0"] and await waiting == ["waiting#0"]
        await b.close()

    run(main())
    assert rec.batches == [[("running", 0)], [("waiting", 0)]]


def test_a_running_batch_stops_when_all_its_requests_are_gone():
    rec = Recorder()
    rec.hold.clear()

    async def main():
        b = started(rec, max_batch=4, window_s=0.0, max_queue=4)
        task = asyncio.ensure_future(b.submit(Job("k", 2, "gone")))
        await until_running(rec)
        task.cancel()
        await asyncio.sleep(0.2)
        assert not b.busy  # the runner saw stopped() and gave up
        await b.close()

    run(main())
    assert rec.batches == []


def test_one_bad_request_does_not_fail_its_batch_neighbours():
    rec = Recorder(fail_on="bad")

    async def main():
        b = started(rec, max_batch=4, window_s=0.2, max_queue=8)
        results = await asyncio.gather(b.submit(Job("k", 1, "good")), b.submit(Job("k", 1, "bad")),
                                       return_exceptions=True)
        await b.close()
        return results

    good, bad = run(main())
    assert good == ["good#0"]
    assert isinstance(bad, ValueError) and "bad is bad" in str(bad)
    assert rec.batches == [[("good", 0), ("bad", 0)], [("good", 0)], [("bad", 0)]]


def test_close_finishes_queued_work_and_refuses_new():
    rec = Recorder()

    async def main():
        b = started(rec, max_batch=1, window_s=0.0, max_queue=8)
        tasks = [asyncio.ensure_future(b.submit(Job("k", 1, f"j{k}"))) for k in range(3)]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0)
        with pytest.raises(DrainingError):
            await b.submit(Job("k", 1, "late"))
        await closing
        return [t.result() for t in tasks]

    assert run(main()) == [["j0#0"], ["j1#0"], ["j2#0"]]
