"""Run a benchmark matrix: fastsd backends and the diffusers baseline, side by side.

Every configuration gets warm-up runs, then N timed runs taken round-robin across the
backends; stages are summarized by median and p90. fastsd's stage times come from
`out.timings`; diffusers' from forward hooks on its text encoder, UNet and VAE decoder
(with a device sync on GPU). End to end is timed
around the whole call: CUDA events on GPU, perf_counter on CPU.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..backends.select import make_backend
from ..checkpoint import load_checkpoint, resolve
from ..engines import check_entry, default_engine_dir, entry_dir
from ..pipeline import DTYPES, Pipeline
from .machine import PeakMemory, machine_facts

log = logging.getLogger(__name__)

SCHEMA = "fastsd-bench/1"
BASELINE = "diffusers"
FASTSD_BACKENDS = ("eager", "eager+graphs", "compiled", "onnxruntime", "tensorrt")
GRAPHS = "eager+graphs"  # eager PyTorch with the UNet replayed as a CUDA graph
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                        "euler_a": "EulerAncestralDiscreteScheduler"}
STAGES = ("text_encoder", "unet", "unet_per_step", "vae_decoder", "end_to_end")
CPU_SIZE = 256  # default benchmark resolution on a CPU


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
    export_missing: bool = False  # export ONNX engines a requested backend lacks (timed)
    cold_start: bool = False  # also time a new process to its first image


def default_config(model: str, device: torch.device, **overrides) -> BenchConfig:
    """Sized to the device: small on CPU, SD 512x512 / 50 steps on a GPU. `sizes` left
    empty means the model's own: its default size on a GPU, at most 256 px on a CPU."""
    if device.type == "cuda":
        base = dict(sizes=(), steps=(50,), warmup=2, runs=10)
    else:
        base = dict(sizes=(), steps=(4,), warmup=1, runs=3)
    base.update(backends=("eager", "onnxruntime", BASELINE), batches=(1,), schedulers=("ddim",))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(model=model, device=device.type, **base)


def default_sizes(info, device: torch.device) -> tuple[tuple[int, int], ...]:
    size = info.default_size if device.type == "cuda" else min(info.default_size, CPU_SIZE)
    size = size // info.vae_factor * info.vae_factor
    return ((size, size),)


def _timer(device: torch.device) -> Callable[[Callable], tuple[float, object]]:
    def timed(fn):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    return timed


def summarize(samples: list[dict]) -> dict:
    """{stage: {"median": s, "p90": s}} over the timed runs."""
    out = {}
    for stage in STAGES:
        values = sorted(s[stage] for s in samples if stage in s)
        if values:
            p90 = values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
            out[stage] = {"median": statistics.median(values), "p90": p90, "n": len(values)}
    return out


def _measure(calls: dict[str, Callable[[int], dict]], cfg: BenchConfig, device: torch.device,
             progress: Callable[[str], None], label: str) -> dict[str, tuple[dict, int, str]]:
    """Warm up every backend, then time them round-robin (run r of each backend, then run
    r + 1), so drift in the machine's speed hits all backends alike."""
    timed = _timer(device)
    for i in range(cfg.warmup):
        for call in calls.values():
            call(i)
    samples: dict[str, list] = {b: [] for b in calls}
    peaks = dict.fromkeys(calls, 0)
    kind = "peak_rss"
    for r in range(cfg.runs):
        progress(f"{label}: timed run {r + 1}/{cfg.runs}")
        for b, call in calls.items():
            with PeakMemory(device) as mem:
                seconds, stages = timed(lambda call=call, r=r: call(cfg.warmup + r))
            samples[b].append({**stages, "end_to_end": seconds})
            peaks[b], kind = max(peaks[b], mem.peak), mem.kind
    return {b: (summarize(samples[b]), peaks[b], kind) for b in calls}


# ---- fastsd ---------------------------------------------------------------------------


def _load_fastsd(cfg: BenchConfig, backend: str, ckpt, device, dtype, notes: list):
    def load():
        root = Path(cfg.engine_dir) if cfg.engine_dir else default_engine_dir()
        kind = "eager" if backend == GRAPHS else backend
        graphs = backend == GRAPHS
        return Pipeline(ckpt, make_backend(ckpt, kind, device, dtype, root, cuda_graphs=graphs), device, dtype,
                        cuda_graphs=graphs)

    if backend == GRAPHS and device.type != "cuda":
        notes.append(f"{GRAPHS}: needs a CUDA device; skipped")
        return None, None
    pipe = load()
    export_s = None
    if backend not in ("eager", GRAPHS) and set(pipe.backend.backends.values()) == {"eager"}:
        if not (cfg.export_missing and backend == "onnxruntime"):
            how = "fastsd export, or bench --export-missing" if backend == "onnxruntime" else \
                f"fastsd build --backend {backend}"
            notes.append(f"{backend}: no engines for this checkpoint (run {how}); skipped")
            return None, None
        from export import export_checkpoint

        t0 = time.perf_counter()
        export_checkpoint(cfg.model, engine_dir=cfg.engine_dir, dtype=_precision(pipe))
        export_s = time.perf_counter() - t0
        pipe = load()
    return pipe, export_s


def _precision(pipe: Pipeline) -> str:
    return {v: k for k, v in DTYPES.items()}[pipe.dtype]


def _fastsd_call(pipe: Pipeline, h: int, w: int, batch: int, steps: int, sched: str, guidance: float):
    def call(seed: int) -> dict:
        out = pipe([PROMPT] * batch, num_inference_steps=steps, scheduler=sched, guidance_scale=guidance,
                   height=h, width=w, seed=seed, output_type="np")
        return {k: out.timings[k] for k in ("text_encoder", "unet", "unet_per_step", "vae_decoder")}

    return call


def _engine_export_seconds(cfg: BenchConfig, pipe: Pipeline, backend: str) -> float | None:
    root = Path(cfg.engine_dir) if cfg.engine_dir else default_engine_dir()
    entry = entry_dir(root, pipe.info.fingerprint, backend, _precision(pipe))
    manifest, _ = check_entry(entry, pipe.info.fingerprint, networks=())  # a valid manifest; no file is read
    secs = [n.get("export_seconds") for n in manifest.get("networks", {}).values()]
    return round(sum(secs), 2) if secs and None not in secs else None


# ---- diffusers baseline -----------------------------------------------------------------


class _StageHooks:
    """Accumulates wall time per module call, with a device sync on both sides."""

    def __init__(self, modules: dict, device: torch.device):
        self.device, self.totals, self._t0 = device, {}, {}
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda m, a, name=name: self._start(name))
            module.register_forward_hook(lambda m, a, o, name=name: self._stop(name))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _start(self, name):
        self._t0[name] = self._now()

    def _stop(self, name):
        self.totals[name] = self.totals.get(name, 0.0) + self._now() - self._t0[name]

    def take(self) -> dict:
        totals, self.totals = self.totals, {}
        return totals


def _load_diffusers(cfg: BenchConfig, ckpt, device: torch.device, dtype: torch.dtype):
    """On CPU the baseline shares fastsd's weights (memory); on GPU it loads its own copy,
    so it runs with diffusers' own defaults (fastsd's eager path makes its UNet channels-last)."""
    import diffusers

    with warnings.catch_warnings():  # newer diffusers renames torch_dtype; older ones only know it
        warnings.simplefilter("ignore")
        if device.type == "cpu" and dtype == torch.float32:
            sched = getattr(diffusers, DIFFUSERS_SCHEDULERS["ddim"]).from_config(ckpt.info.scheduler)
            pipe = diffusers.StableDiffusionPipeline(
                vae=ckpt.vae, text_encoder=ckpt.text_encoder, tokenizer=ckpt.tokenizer, unet=ckpt.unet,
                scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                str(resolve(cfg.model)), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
            ).to(device)
    pipe.set_progress_bar_config(disable=True)
    hooks = _StageHooks({"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae_decoder": pipe.vae.decoder},
                        device)
    return pipe, hooks


def _diffusers_call(pipe, hooks: _StageHooks, h, w, batch, steps, sched, guidance):
    import diffusers

    pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[sched]).from_config(pipe.scheduler.config)

    def call(seed: int) -> dict:
        hooks.take()
        pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=guidance, height=h, width=w,
             generator=torch.Generator().manual_seed(seed), output_type="np")
        t = hooks.take()
        return {"text_encoder": t.get("text_encoder", 0.0), "unet": t.get("unet", 0.0),
                "unet_per_step": t.get("unet", 0.0) / steps, "vae_decoder": t.get("vae_decoder", 0.0)}

    return call


# ---- the matrix ---------------------------------------------------------------------------


@dataclass
class BenchResult:
    config: dict
    machine: dict
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    interrupted: bool = False
    schema: str = SCHEMA
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    command: str = field(default_factory=lambda: " ".join(["fastsd"] + sys.argv[1:]) if sys.argv else "")


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = print) -> BenchResult:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[cfg.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    result = BenchResult(config=asdict(cfg), machine=machine_facts(device))
    try:
        ckpt = load_checkpoint(cfg.model)
        sizes = cfg.sizes or default_sizes(ckpt.info, device)
        result.config["sizes"] = [list(s) for s in sizes]
        matrix = list(itertools.product(sizes, cfg.batches, cfg.steps, cfg.schedulers))
        runners = {}
        for backend in cfg.backends:
            progress(f"loading {backend}")
            runner = _backend_runner(cfg, backend, ckpt, device, dtype, result.notes)
            if runner is not None:
                runners[backend] = runner
        for k, ((h, w), batch, steps, sched) in enumerate(matrix):
            label = f"[{k + 1}/{len(matrix)}] {h}x{w} batch {batch} {steps} steps {sched}"
            calls = {b: make(h, w, batch, steps, sched) for b, (make, _) in runners.items()}
            measured = _measure(calls, cfg, device, progress, label)
            for b, (stages, peak, kind) in measured.items():  # rows of a configuration land together
                result.rows.append({"backend": b, "height": h, "width": w, "batch": batch, "steps": steps,
                                    "scheduler": sched, "guidance": cfg.guidance, "stages": stages,
                                    "images_per_s": batch / stages["end_to_end"]["median"],
                                    "peak_memory_bytes": peak, "memory_kind": kind, **runners[b][1]()})
    except KeyboardInterrupt:
        result.interrupted = True
        result.notes.append("interrupted: the rows above are complete, the rest was not run")
    add_ratios(result.rows)
    return result


def _backend_runner(cfg, backend, ckpt, device, dtype, notes):
    if backend == BASELINE:
        try:
            pipe, hooks = _load_diffusers(cfg, ckpt, device, dtype)
        except Exception as e:  # noqa: BLE001 - e.g. a single-file model diffusers cannot open offline
            notes.append(f"diffusers baseline unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None
        return (lambda h, w, b, s, sc: _diffusers_call(pipe, hooks, h, w, b, s, sc, cfg.guidance)), dict
    pipe, export_s = _load_fastsd(cfg, backend, ckpt, device, dtype, notes)
    if pipe is None:
        return None
    cold = _cold_start(cfg, backend) if cfg.cold_start else None

    def extra() -> dict:
        export = (export_s or _engine_export_seconds(cfg, pipe, backend)) if backend not in ("eager", GRAPHS) \
            else None
        return {"ran": dict(pipe.backend.backends), "export_seconds": export, "cold_start_seconds": cold}

    return (lambda h, w, b, s, sc: _fastsd_call(pipe, h, w, b, s, sc, cfg.guidance)), extra


def _cold_start(cfg: BenchConfig, backend: str) -> float:
    """A new process, from launch to its first image written (1 step)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fastsd", "generate", PROMPT, "--model", cfg.model, "--backend", backend,
               "--steps", "1", "--no-progress", "--out", str(Path(tmp) / "cold.png")]
        for flag, value in (("--device", cfg.device), ("--dtype", cfg.dtype), ("--engine-dir", cfg.engine_dir)):
            if value:
                cmd += [flag, str(value)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - t0


def add_ratios(rows: list[dict]) -> None:
    """Speed-up of each fastsd row over the diffusers row of the same configuration."""
    key = lambda r: (r["height"], r["width"], r["batch"], r["steps"], r["scheduler"])  # noqa: E731
    base = {key(r): r for r in rows if r["backend"] == BASELINE}
    for r in rows:
        b = base.get(key(r))
        if b is None or r["backend"] == BASELINE:
            continue
        r["vs_diffusers"] = {s: b["stages"][s]["median"] / r["stages"][s]["median"]
                             for s in ("unet_per_step", "end_to_end") if r["stages"][s]["median"] > 0}
