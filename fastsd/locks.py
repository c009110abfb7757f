"""A shared/exclusive lock: pipeline calls share a pipeline's weights, a weight change
(LoRA load, scale, unload) waits for the calls in flight and holds new ones back until it
is done, so no call ever runs on half-changed weights."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import InvalidArgumentError


class SharedLock:
    """Many shared holders, or one exclusive holder; a waiting exclusive holder goes before
    new shared ones (a stream of calls cannot starve a LoRA switch)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._mine = threading.local()  # this thread's shared holds (an exclusive request inside one would deadlock)

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        yield from self._held_shared()

    @contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        self._take_exclusive(what)
        try:
            yield
        finally:
            self._end_exclusive(shared=False)

    @contextmanager
    def shared_when(self, ready: Callable[[], bool], prepare: Callable[[], None], what: str) -> Iterator[None]:
        """A shared hold on a state where `ready()`; where it is not, an exclusive hold first runs
        `prepare()` (which makes it ready) and then becomes the shared hold, with no other
        change in between. `ready` is read only under the lock (changes hold it exclusively)."""
        with self._cond:
            fast = not (self._exclusive or self._waiting) and ready()
            if fast:
                self._shared += 1
        if not fast:
            self._take_exclusive(what)
            try:
                if not ready():
                    prepare()
            except BaseException:
                self._end_exclusive(shared=False)
                raise
            self._end_exclusive(shared=True)  # exclusive -> shared: nothing changes the state in between
        yield from self._held_shared()

    def _take_exclusive(self, what: str) -> None:
        if getattr(self._mine, "count", 0):
            raise InvalidArgumentError(f"{what} cannot happen inside a pipeline call (from its callback): "
                                       "the call runs on the weights it started with")
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True

    def _end_exclusive(self, shared: bool) -> None:
        """Give the exclusive hold up, or (`shared`) turn it into a shared one."""
        with self._cond:
            self._exclusive = False
            self._shared += int(shared)
            self._cond.notify_all()

    def _held_shared(self) -> Iterator[None]:
        """The body of a shared hold taken already: this thread's count, released at the end."""
        self._mine.count = getattr(self._mine, "count", 0) + 1
        try:
            yield
        finally:
            self._mine.count -= 1
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()
