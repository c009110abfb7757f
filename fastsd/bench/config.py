"""What a benchmark run measures (shared by the runner and its worker processes)."""

from __future__ import annotations

from dataclasses import dataclass

BASELINE = "diffusers"
GRAPHS = "eager+graphs"  # eager PyTorch with whole-step CUDA graphs
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@dataclass(frozen=True)
class BenchConfig:
    model: str
    backends: tuple[str, ...]  # fastsd backends and/or "diffusers"
    sizes: tuple[tuple[int, int], ...]  # (height, width)
    batches: tuple[int, ...]  # prompts per call
    steps: tuple[int, ...]
    schedulers: tuple[str, ...]
    guidance: float = 7.5
    warmup: int = 1
    runs: int = 3
    device: str | None = None
    dtype: str | None = None
    engine_dir: str | None = None
    export_missing: bool = False  # export ONNX / build compiled engines a requested backend lacks (timed)
    cold_start: bool = False  # also time a new process to its first image
    sequential: bool | None = None  # one backend's process at a time (None: when they would not fit together)
    controlnets: tuple[str, ...] = ()  # every call also runs these ControlNets (diffusers: its ControlNet pipeline)
