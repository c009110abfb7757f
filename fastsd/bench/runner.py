"""Run a benchmark matrix: fastsd backends and the diffusers baseline, side by side.

Each backend runs in a worker process of its own (fastsd/bench/worker.py): no backend
competes with another inside one process, and each row's peak memory is its own. Every
configuration gets warm-up runs, then N timed runs taken round-robin across the workers
(run r of each backend, then run r + 1), one worker computing at a time, so drift in the
machine's speed hits all backends alike. Stages are summarized by median, p10 and p90.
fastsd's stage times come from `out.timings`; diffusers' from forward hooks, which on
CUDA add two synchronisations per UNet step, so there diffusers is timed end to end
without them and its stage figures come from one separate hooked run. End to end is
timed around the whole call: CUDA events on GPU, perf_counter on CPU.

A row whose runs were not steady (p90 above NOISY_SPREAD x median, or major page faults
during its timed runs: the machine was paging) or whose machine was not quiet (other
processes busy, hypervisor steal or the CPU clock moving during its runs: quiet.py) gets no
speed-up ratio: "noisy" instead, with the reason. A benchmark that overstates a lead is worse than none.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..backends.registry import ENGINE_KINDS
from . import quiet
from .config import BASELINE, GRAPHS, PROMPT, BenchConfig
from .machine import machine_facts, mem_available

log = logging.getLogger(__name__)

SCHEMA = "fastsd-bench/2"
FASTSD_BACKENDS = ("eager", GRAPHS, *ENGINE_KINDS)
STAGES = ("text_encoder", "unet", "unet_per_step", "vae_decoder", "end_to_end")
NOISY_SPREAD = 1.25  # p90 / median of end to end above this: not steady
NOISY_FAULTS = 100  # major page faults in one timed run above this: the machine was paging
# Every worker, fastsd's and diffusers' alike: torch's CPU allocator asks for transparent
# huge pages. Without it, the same fp32 SD 1.5 UNet step ran at 2.6 s in some processes and
# 3.3 s in others on the 2-core development VM (bimodal, by process); with it, 2.65-2.72 s
# in every process. One process per backend would otherwise turn that luck into ratios.
# And a worker killed by a signal leaves its Python stack in its log (faulthandler).
WORKER_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "PYTHONFAULTHANDLER": "1"}


def default_config(model: str, device: torch.device, **overrides) -> BenchConfig:
    """Sized to the device: small on CPU, SD 512x512 / 50 steps on a GPU. `sizes` left
    empty means the model's own: its default size on a GPU, at most 256 px on a CPU
    (worker.default_size)."""
    if device.type == "cuda":
        base = dict(sizes=(), steps=(50,), warmup=2, runs=10)
    else:
        base = dict(sizes=(), steps=(4,), warmup=1, runs=3)
    base.update(backends=("eager", "onnxruntime", BASELINE), batches=(1,), schedulers=("ddim",))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(model=model, device=device.type, **base)


def _rank(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile of sorted `values`."""
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(samples: list[dict]) -> dict:
    """{stage: {"median": s, "p10": s, "p90": s}} over the timed runs (nearest-rank percentiles)."""
    out = {}
    for stage in STAGES:
        values = sorted(s[stage] for s in samples if stage in s)
        if values:
            out[stage] = {"median": statistics.median(values), "p10": _rank(values, 0.1), "p90": _rank(values, 0.9),
                          "n": len(values)}
    return out


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


_PROGRESS_BAR = re.compile(r"\d+%\|")


def exit_reason(returncode: int, log: str) -> str:
    """Why a worker process ended before answering, from its exit status and its stderr log:
    the signal that killed it and, from the stack faulthandler wrote, the innermost Python
    frame of the thread that crashed; else its code and its last line that is not a
    progress bar."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        lines = log.splitlines()
        for k, line in enumerate(lines):
            if line.startswith("Current thread") and k + 1 < len(lines):
                frame = re.match(r'\s*File "(.+)", line (\d+) in (\S+)', lines[k + 1])
                if frame:
                    return f"worker died of {name} in {frame[3]} ({frame[1]}:{frame[2]})"
        return f"worker died of {name}"
    shown = [ln.rsplit("\r", 1)[-1].strip() for ln in log.splitlines()]
    shown = [ln for ln in shown if ln and not _PROGRESS_BAR.search(ln)]
    return f"worker exited (code {returncode}); {shown[-1][:300] if shown else 'no output'}"


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, cfg: BenchConfig, backend: str, log_dir: Path):
        self.backend, self.memory_kind = backend, None
        self.log_path = log_dir / f"{backend.replace('+', '_')}.log"
        self._log = open(self.log_path, "w")
        env = dict(WORKER_ENV, **os.environ)  # the user's own settings win
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                          os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "fastsd.bench.worker", json.dumps(asdict(cfg)), backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     bufsize=1, env=env)

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            try:
                log = self.log_path.read_text(errors="replace")
            except OSError:
                log = ""
            raise RuntimeError(exit_reason(self.proc.returncode, log))
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(msg["error"])
        return msg

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _measure(workers: dict[str, Worker], cfg: BenchConfig, call: dict, progress: Callable[[str], None],
             label: str, device: torch.device, notes: list) -> dict[str, dict]:
    """Warm-ups for every worker, then the timed runs round-robin. Returns per backend its
    samples, peak memory, major faults, the least free memory seen before its runs and what
    the machine did meanwhile (fastsd/bench/quiet.py: other processes' CPU, steal, clock)."""
    for i in range(cfg.warmup):
        for w in workers.values():
            w.ask(op="run", seed=i, **call)
    got = {b: {"samples": [], "memory": 0, "faults": [], "free": None, "activity": quiet.Activity()} for b in workers}
    pids = [os.getpid(), *(w.proc.pid for w in workers.values())]  # the bench's own CPU time is not "others"
    for r in range(cfg.runs):
        progress(f"{label}: timed run {r + 1}/{cfg.runs}")
        for b, w in workers.items():
            free = mem_available()
            before = quiet.sample(pids)
            msg = w.ask(op="run", seed=cfg.warmup + r, **call)
            g = got[b]
            g["activity"].add(before, quiet.sample(pids))
            g["samples"].append(msg["stages"])
            g["memory"] = max(g["memory"], msg["memory"])
            g["faults"].append(msg["major_faults"])
            if free is not None:
                g["free"] = free if g["free"] is None else min(g["free"], free)
    if BASELINE in workers and device.type == "cuda":  # stage figures from one hooked run
        stages = workers[BASELINE].ask(op="run", seed=0, hooked=True, **call)["stages"]
        for sample in got[BASELINE]["samples"]:
            sample.update({k: v for k, v in stages.items() if k != "end_to_end"})
        notes.append("diffusers: end to end timed without hooks; its stage figures come from one separate "
                     "hooked run (hooks synchronise the GPU)")
    return got


def steadiness(stages: dict, faults: list[int], machine: dict | None = None) -> str | None:
    """Why a row's timings cannot be trusted for a ratio (None if they can): spread runs,
    paging, or a machine that was not quiet (`machine`: quiet.Activity.facts)."""
    why = quiet.unquiet(machine)
    if why:
        return why
    e2e = stages["end_to_end"]
    if e2e["median"] > 0 and e2e["p90"] / e2e["median"] > NOISY_SPREAD:
        return f"p90 {e2e['p90'] / e2e['median']:.2f}x the median"
    if faults and max(faults) > NOISY_FAULTS:
        return f"{max(faults)} major page faults in one run (the machine was paging)"
    return None


def _start_workers(cfg: BenchConfig, backends, progress, notes: list,
                   log_dir: Path) -> tuple[dict[str, Worker], int | None]:
    """One worker per backend, started one after another (each measures its own load).
    Also returns the model's default benchmark size, as the first worker reports it."""
    workers, size = {}, None
    for backend in backends:
        progress(f"loading {backend}")
        w = Worker(cfg, backend, log_dir)
        try:
            msg = w.receive()
        except RuntimeError as e:
            what = "diffusers baseline unavailable" if backend == BASELINE else f"{backend}: failed to load"
            notes.append(f"{what}: {e}")
            w.close()
            continue
        notes.extend(msg["notes"])
        w.memory_kind = msg["memory_kind"]  # what its peak memory figures are, as the worker measures them
        size = size or msg.get("size")
        if msg["skip"]:
            notes.append(msg["skip"])
            w.close()
            continue
        workers[backend] = w
    return workers, size


def weight_bytes(path: Path) -> int:
    """Bytes of a checkpoint's weight files (a folder's, or one file's)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in (".safetensors", ".bin", ".ckpt"))


def one_at_a_time(cfg: BenchConfig, path: Path, device: torch.device) -> str | None:
    """Why the backends' processes should run one after another instead of side by side
    (None: together). Each process holds the model's weights once (engines a second time:
    the runtime keeps the PyTorch weights for its eager fallback); on a CPU they all share
    the machine's memory, and a machine that pages times nothing but the disk."""
    if cfg.sequential is not None:
        return "asked for (--sequential)" if cfg.sequential else None
    free = mem_available()
    if device.type == "cuda" or free is None or len(cfg.backends) < 2:
        return None
    weights = weight_bytes(path)
    need = sum(weights * (1 if b in (BASELINE, "eager") else 2) for b in cfg.backends)
    if need <= 0.9 * free:
        return None
    return (f"the backends' processes would hold ~{need / 2**30:.0f} GiB together, {free / 2**30:.0f} GiB is "
            "available")


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = print) -> BenchResult:
    from ..checkpoint import resolve

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = BenchResult(config=asdict(cfg), machine=machine_facts(device))
    resolve(cfg.model)  # builds a synthetic model once, before any worker needs it
    why = one_at_a_time(cfg, resolve(cfg.model), device)
    groups = [(b,) for b in cfg.backends] if why else [tuple(cfg.backends)]
    result.config["sequential"] = bool(why)
    if why:
        result.notes.append(f"backends ran one after another, each in its own process ({why}); "
                            "rows of different backends were not interleaved")
    extras: dict = {}
    with tempfile.TemporaryDirectory(prefix="fastsd-bench-") as log_dir:
        size = None
        for group in groups:
            workers: dict[str, Worker] = {}
            try:
                workers, first = _start_workers(cfg, group, progress, result.notes, Path(log_dir))
                size = size or first
                sizes = cfg.sizes or (((size, size),) if size else ())  # the model's own, as its workers say
                result.config["sizes"] = [list(s) for s in sizes]
                matrix = list(itertools.product(sizes, cfg.batches, cfg.steps, cfg.schedulers))
                cold = {b: _cold_start(cfg, b) for b in workers if cfg.cold_start and b != BASELINE}
                for k, ((h, w), batch, steps, sched) in enumerate(matrix):
                    label = f"[{k + 1}/{len(matrix)}] {h}x{w} batch {batch} {steps} steps {sched}" + (
                        f" ({group[0]})" if why else "")
                    call = dict(h=h, w=w, batch=batch, steps=steps, sched=sched, guidance=cfg.guidance)
                    measured = _measure(workers, cfg, call, progress, label, device, result.notes)
                    for b, m in measured.items():  # rows of a configuration land together
                        if b not in extras:
                            extras[b] = workers[b].ask(op="extra")
                            if extras[b].get("checkpoint"):  # the weights every row ran (compare matches on it)
                                result.config.setdefault("checkpoint", extras[b]["checkpoint"])
                        stages, machine = summarize(m["samples"]), m["activity"].facts()
                        result.rows.append({
                            "backend": b, "height": h, "width": w, "batch": batch, "steps": steps,
                            "scheduler": sched, "guidance": cfg.guidance, "stages": stages,
                            "images_per_s": batch / stages["end_to_end"]["median"],
                            "peak_memory_bytes": m["memory"], "memory_kind": workers[b].memory_kind,
                            "major_faults": sum(m["faults"]), "min_free_memory_bytes": m["free"],
                            "machine_load": machine, "noisy": steadiness(stages, m["faults"], machine), **extras[b],
                            **({"cold_start_seconds": cold[b]["seconds"], "cold_start_phases": cold[b]["phases"],
                                "cold_start_overlapped": cold[b]["overlapped"], "cold_start_ready": cold[b]["ready"]}
                               if b in cold else {})})
            except KeyboardInterrupt:
                result.interrupted = True
                result.notes.append("interrupted: the rows above are complete, the rest was not run")
                break
            except RuntimeError as e:  # a worker died mid-run: keep what is complete
                result.notes.append(f"stopped: {e}")
                break
            finally:
                for w in workers.values():
                    w.close()
    result.notes = list(dict.fromkeys(result.notes))
    add_ratios(result.rows)
    return result


def _cold_start(cfg: BenchConfig, backend: str) -> dict:
    """A new process, from launch to its first image written (1 step): {"seconds": wall time,
    "phases": {phase: seconds}} as the process records them (fastsd/phases.py), with "other"
    for the rest (its exit, writing the PNG, what no phase covers), "overlapped": the seconds
    engines took to load on the preload thread, meanwhile (not part of the sum), and "ready":
    the seconds from launch to the first call's start."""
    from .. import phases

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fastsd", "generate", PROMPT, "--model", cfg.model, "--backend", backend,
               "--steps", "1", "--no-progress", "--out", str(Path(tmp) / "cold.png")]
        for flag, value in (("--device", cfg.device), ("--dtype", cfg.dtype), ("--engine-dir", cfg.engine_dir)):
            if value:
                cmd += [flag, str(value)]
        record = Path(tmp) / "phases.json"
        env = {**os.environ, phases.PHASES_ENV: str(record), phases.T0_ENV: repr(time.time())}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        seconds = time.perf_counter() - t0
        written = json.loads(record.read_text()) if record.is_file() else {}
        got, marks = written.get("phases", {}), written.get("marks", {})
    ordered = {p: round(got[p], 2) for p in phases.ORDER if p in got}
    ordered["other"] = round(max(0.0, seconds - sum(got[p] for p in phases.ORDER if p in got)), 2)
    return {"seconds": seconds, "phases": ordered, "overlapped": {phases.AHEAD: round(got.get(phases.AHEAD, 0.0), 2)},
            "ready": round(marks[phases.READY], 2) if phases.READY in marks else None}


def add_ratios(rows: list[dict]) -> None:
    """Speed-up of each fastsd row over the diffusers row of the same configuration, or
    "noisy" (and why) where either row's timings were not steady."""
    key = lambda r: (r["height"], r["width"], r["batch"], r["steps"], r["scheduler"])  # noqa: E731
    base = {key(r): r for r in rows if r["backend"] == BASELINE}
    for r in rows:
        b = base.get(key(r))
        if b is None or r["backend"] == BASELINE:
            continue
        why = r.get("noisy") or (b.get("noisy") and f"diffusers: {b['noisy']}")
        if why:
            r["vs_diffusers"] = {"noisy": why}
            continue
        r["vs_diffusers"] = {s: b["stages"][s]["median"] / r["stages"][s]["median"]
                             for s in ("unet_per_step", "end_to_end") if r["stages"][s]["median"] > 0}
