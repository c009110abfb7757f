"""One benchmark worker process: one fastsd backend, or the diffusers baseline.

`fastsd bench` runs every backend in a process of its own, so no row competes with
another for memory inside one process or reports another's weights as its own peak. The
parent sends one request at a time (JSON lines on stdin) and waits for the reply (on the
stdout it was started with; anything libraries print goes to stderr), so only one worker
computes at any moment and runs of different backends interleave.

Memory, per worker: on CPU the process's peak RSS during the run (VmHWM, reset before
it); on CUDA the device memory the process holds, from the driver (total - free, which
counts TensorRT, ONNX Runtime and AOTInductor allocations that torch's allocator
statistics miss), accumulated over the moments only this worker runs (its load, its
runs), since allocators keep what they reserved at their peak. Engines a row must build
(--export-missing) are built before its pipeline loads, outside what is measured, and the
build's cached device memory is released: a row's peak is its own.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..backends.registry import ENGINE_KINDS
from ..engines import QUANTIZED, compute_dtype, precision_of
from ..schedulers import CLASS_OF, OPTIONS_OF, SAMPLERS
from .config import BASELINE, GRAPHS, PROMPT, BenchConfig
from .machine import ProcessMemory


@functools.lru_cache(maxsize=8)
def control_images(count: int, h: int, w: int) -> list:
    """The benchmark's conditioning images: fixed random RGB, one per ControlNet (the same for
    fastsd and diffusers; their content does not change the compute), made once per size,
    outside the timed calls' own work."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(count)]




CPU_SIZE = 256  # default benchmark resolution on a CPU


def default_size(size: int, vae_factor: int, device: torch.device) -> int:
    """The model's own size on a GPU, at most CPU_SIZE on a CPU, a multiple of the VAE factor."""
    size = size if device.type == "cuda" else min(size, CPU_SIZE)
    return size // vae_factor * vae_factor


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


# ---- fastsd ---------------------------------------------------------------------------


class FastSDWorker:
    """Made in two parts: __init__ reads the checkpoint and builds the engines the row lacks
    (when asked to), `load()` (what the row's memory counts) makes the pipeline."""

    def __init__(self, cfg, backend: str, device: torch.device, dtype: torch.dtype):
        from ..backends.kind import BuildOptions
        from ..backends.select import candidates
        from ..checkpoint import load_checkpoint
        from ..controlnet import load_controlnets
        from ..engines import default_engine_dir
        from ..families import family_for

        self.cfg, self.backend, self.notes, self.export_s, self.skip = cfg, backend, [], None, None
        self.device, self.dtype, self.pipe = device, dtype, None
        self.precision = cfg.dtype if cfg.dtype in QUANTIZED else precision_of(dtype)  # the engines' (int8: quantized)
        self.ran: dict | None = None  # what ran each network in the last call
        self.ckpt = load_checkpoint(cfg.model)
        self.info = self.ckpt.info
        self.size = default_size(self.info.default_size, self.info.vae_factor, device)
        self.root = Path(cfg.engine_dir) if cfg.engine_dir else default_engine_dir()
        self.graphs = backend == GRAPHS
        self.kind = "eager" if self.graphs else backend
        if self.graphs and device.type != "cuda":
            self.skip = f"{GRAPHS}: needs a CUDA device; skipped"
            return
        self.family = family_for(self.ckpt, load_controlnets(list(cfg.controlnets) or None, self.ckpt))
        engine_kind = ENGINE_KINDS.get(self.kind)
        quantized = self.precision in QUANTIZED
        if quantized and (engine_kind is None or self.precision not in engine_kind.quantizes):
            self.skip = f"{backend}: runs no {self.precision} (engines that do: --backends " + \
                ",".join(k.name for k in ENGINE_KINDS.values() if self.precision in k.quantizes) + "); skipped"
            return
        if engine_kind is None or candidates(self.ckpt, self.family, self.kind, device, dtype, self.root,
                                             precision=self.precision):
            return
        if not (cfg.export_missing and engine_kind.builds_alone):
            how = engine_kind.build_command + (", or bench --export-missing" if engine_kind.builds_alone else "")
            self.skip = f"{backend}: no engines for this checkpoint (run {how}); skipped"
            return
        t0 = time.perf_counter()
        engine_kind.build(BuildOptions(cfg.model, engine_dir=cfg.engine_dir, dtype=self.precision,
                                       device=str(device), controlnets=tuple(cfg.controlnets)))
        self.export_s = time.perf_counter() - t0
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what the build held is not this row's

    def load(self) -> None:
        from ..backends.select import make_backend
        from ..pipeline import Pipeline

        if self.skip:
            return
        backend = make_backend(self.ckpt, self.family, self.kind, self.device, self.dtype, self.root,
                               cuda_graphs=self.graphs, precision=self.precision)
        self.pipe = Pipeline(self.ckpt, backend, self.device, self.dtype, cuda_graphs=self.graphs, family=self.family)
        self.pipe.precision = self.precision
        self.pipe.max_side = None  # a benchmark's sizes are the user's explicit choice
        if self.kind in ENGINE_KINDS and set(backend.backends.values()) == {"eager"}:
            self.skip = f"{self.backend}: its engines did not load (see the log); skipped"

    def call(self, h, w, batch, steps, sched, guidance, seed) -> dict:
        images = control_images(len(self.cfg.controlnets), h, w)
        out = self.pipe([PROMPT] * batch, num_inference_steps=steps, scheduler=sched, guidance_scale=guidance,
                        height=h, width=w, seed=seed, output_type="np",
                        **({"control_image": images[0] if len(images) == 1 else images} if images else {}))
        self.ran = dict(out.backends)  # what ran each network in the call (a fallback shows here)
        return {k: out.timings[k] for k in ("text_encoder", "unet", "unet_per_step", "vae_decoder")}

    def extra(self) -> dict:
        from ..engines import check_entry, default_engine_dir, kind_entries

        export = self.export_s
        if export is None and self.backend in ENGINE_KINDS:
            root = Path(self.cfg.engine_dir) if self.cfg.engine_dir else default_engine_dir()
            for entry in kind_entries(root, self.info.fingerprint, self.backend, self.precision):
                manifest, _ = check_entry(entry, self.info.fingerprint, networks=())  # no file is read
                secs = [n.get("export_seconds") for n in manifest.get("networks", {}).values()]
                if secs and None not in secs:
                    export = round(sum(secs), 2)
                    break
        return {"ran": self.ran or dict(self.pipe.backend.backends), "export_seconds": export,
                "checkpoint": self.info.fingerprint, "dtype": self.precision}


# ---- diffusers baseline -----------------------------------------------------------------


class _StageHooks:
    """Wall time per module call, with a device sync on both sides (so only for stage figures:
    on CUDA the timed runs go without them)."""

    def __init__(self, modules: dict, device: torch.device):
        self.device, self.totals, self._t0 = device, {}, {}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._start(name)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._stop(name)))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _start(self, name):
        self._t0[name] = self._now()

    def _stop(self, name):
        self.totals[name] = self.totals.get(name, 0.0) + self._now() - self._t0[name]

    def remove(self):
        for h in self.handles:
            h.remove()


class DiffusersWorker:
    """diffusers' StableDiffusionPipeline, or StableDiffusionXLPipeline for an SD-XL folder
    (with ControlNets: their ControlNet pipelines), with its own defaults (its own copy of the
    weights). Its ControlNets' time counts in the UNet stage, as fastsd's loop does."""

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype, self.notes, self.skip = cfg, device, dtype, [], None
        if cfg.dtype in QUANTIZED:
            self.skip = f"{BASELINE}: has no {cfg.dtype} (run it with --dtype {QUANTIZED[cfg.dtype]}); skipped"

    def load(self) -> None:
        if self.skip:
            return
        import diffusers

        from ..checkpoint import resolve

        cfg, device, dtype = self.cfg, self.device, self.dtype
        path = resolve(cfg.model)
        index = path / "model_index.json"
        xl = index.is_file() and json.loads(index.read_text()).get("_class_name") == "StableDiffusionXLPipeline"
        with warnings.catch_warnings():  # newer diffusers renames torch_dtype; older ones only know it
            warnings.simplefilter("ignore")
            extra = {}
            if cfg.controlnets:
                from ..controlnet import CONTROLNET_FILES

                nets = [diffusers.ControlNetModel.from_pretrained(str(resolve(c, patterns=CONTROLNET_FILES)),
                                                                  torch_dtype=dtype) for c in cfg.controlnets]
                extra["controlnet"] = nets[0] if len(nets) == 1 else nets
            if xl:
                cls = diffusers.StableDiffusionXLControlNetPipeline if extra else diffusers.StableDiffusionXLPipeline
                self.pipe = cls.from_pretrained(str(path), torch_dtype=dtype, **extra)
            else:
                cls = diffusers.StableDiffusionControlNetPipeline if extra else diffusers.StableDiffusionPipeline
                self.pipe = cls.from_pretrained(str(path), torch_dtype=dtype, safety_checker=None,
                                                requires_safety_checker=False, **extra)
            self.pipe = self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        factor = self.pipe.vae_scale_factor
        self.size = default_size(self.pipe.unet.config.sample_size * factor, factor, device)

    def _scheduler(self, sched: str):
        import diffusers

        self.pipe.scheduler = getattr(diffusers, CLASS_OF[sched]).from_config(self.pipe.scheduler.config,
                                                                               **OPTIONS_OF.get(sched, {}))

    def call(self, h, w, batch, steps, sched, guidance, seed, hooked: bool | None = None) -> dict:
        """Stage figures from hooks on CPU (no syncs there); on CUDA end to end only, unless
        `hooked` (the separate run that gives diffusers' stage figures)."""
        self._scheduler(sched)
        hooked = self.device.type != "cuda" if hooked is None else hooked
        modules = {"text_encoder": self.pipe.text_encoder, "unet": self.pipe.unet, "vae_decoder": self.pipe.vae.decoder}
        if getattr(self.pipe, "text_encoder_2", None) is not None:  # SD-XL: both encoders are the text stage
            modules["text_encoder_2"] = self.pipe.text_encoder_2
        if getattr(self.pipe, "controlnet", None) is not None:  # the whole multi-ControlNet, or the one
            modules["controlnet"] = self.pipe.controlnet
        hooks = _StageHooks(modules, self.device) if hooked else None
        images = control_images(len(self.cfg.controlnets), h, w)
        control = {"image": images[0] if len(images) == 1 else images} if images else {}
        try:
            self.pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=guidance, height=h, width=w,
                      generator=torch.Generator().manual_seed(seed), output_type="np", **control)
        finally:
            if hooks is not None:
                hooks.remove()
        if hooks is None:
            return {}
        t = hooks.totals
        unet = t.get("unet", 0.0) + t.get("controlnet", 0.0)
        return {"text_encoder": t.get("text_encoder", 0.0) + t.get("text_encoder_2", 0.0), "unet": unet,
                "unet_per_step": unet / SAMPLERS[sched].loop_steps(steps),  # PNDM: n + 1 calls
                "vae_decoder": t.get("vae_decoder", 0.0)}

    def extra(self) -> dict:
        return {}


# ---- the process ------------------------------------------------------------------------


def _run_once(worker, memory: ProcessMemory, timed: Callable, req: dict) -> dict:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    (seconds, stages), peak = memory.measure(lambda: timed(lambda: worker.call(**req)))
    return {"stages": {**stages, "end_to_end": seconds}, "memory": peak,
            "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults}


def serve(cfg_json: str, backend: str) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies; library prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**msg):
        proto.write(json.dumps(msg) + "\n")

    cfg = BenchConfig(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                         for k, v in json.loads(cfg_json).items()})
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = compute_dtype(cfg.dtype or ("fp16" if device.type == "cuda" else "fp32"))
    memory = ProcessMemory(device)
    try:  # a fastsd row builds what it lacks first; its memory counts from its load on
        worker = DiffusersWorker(cfg, device, dtype) if backend == BASELINE else FastSDWorker(cfg, backend, device,
                                                                                               dtype)
        _, held = memory.measure(worker.load)
    except Exception as e:  # noqa: BLE001 - e.g. a single-file model diffusers cannot open offline
        reply(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        return
    reply(ready=True, skip=worker.skip, notes=worker.notes, memory=held, memory_kind=memory.kind,
          size=worker.size)
    if worker.skip:
        return
    timed = _timer(device)
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            break
        try:
            if op == "extra":
                reply(**worker.extra())
                continue
            if backend != BASELINE:
                req.pop("hooked", None)
            reply(**_run_once(worker, memory, timed, req))
        except Exception as e:  # noqa: BLE001 - reported in the parent's notes
            reply(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
