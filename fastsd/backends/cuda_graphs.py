"""CUDA-graph replay of one network call (the UNet): one graph per input shape, static
buffers, one memory pool shared by all of them. The pipeline's whole-step graphs
(fastsd/loop.py) are preferred; this is the fallback where a step cannot be captured.

The first call of a shape warms the function up on a side stream, then captures it;
later calls copy their inputs into the static buffers and replay. While a thread warms up
or captures a function (`capturing()`), the networks it calls start no graph of their own:
a whole step that captures holds the UNet's launch, so a UNet-only graph is made only where
a step could not be captured. NOT VERIFIED on a GPU yet (the tests are marked `gpu`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

WARMUP_CALLS = 2  # before a capture: cuDNN/cuBLAS choices and lazy allocations happen here
_state = threading.local()  # per thread: how many captures (warm-ups included) are under way


def stream_capturing() -> bool:
    """Whether the current CUDA stream is being captured (what runs now is recorded, not run)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def capturing() -> bool:
    """Whether this thread is warming up or capturing a CUDA graph (or its stream captures)."""
    return getattr(_state, "depth", 0) > 0 or stream_capturing()


@contextmanager
def graph_warmup() -> Iterator[None]:
    """Mark the block as a capture's warm-up or capture, for `capturing()`."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def capture(fn: Callable[[], object], pool, device: torch.device) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm `fn` up on a side stream, then capture one call of it into a graph on `device`
    using the memory pool `pool`. Returns (graph, what the captured call returned: its
    static output)."""
    with torch.cuda.device(device), graph_warmup():
        caller = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                fn()
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    return graph, out


class GraphedCall:
    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.graphs: dict[tuple, tuple] = {}  # input shapes/dtypes -> (graph, static inputs, static output)
        self.pool = None  # one pool for every shape: only one replays at a time
        self.lock = threading.Lock()  # static buffers: one call at a time (threads sharing a pipeline)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> tuple:
        static_in = tuple(t.clone() for t in inputs)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, static_out = capture(lambda: self.fn(*static_in), self.pool, inputs[0].device)
        return graph, static_in, static_out

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The output as a float32 tensor of its own (one copy out of the static buffer)."""
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        with self.lock:
            if key not in self.graphs:
                self.graphs[key] = self._capture(inputs)  # stored only once the capture succeeded
            graph, static_in, static_out = self.graphs[key]
            for buf, t in zip(static_in, inputs, strict=True):
                buf.copy_(t)
            graph.replay()
            return static_out.to(torch.float32, copy=True)
