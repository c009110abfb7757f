"""ONNX Runtime runner for one exported network.

CPU: tensors are handed over as numpy views (no copy for contiguous float32). CUDA: I/O
binding to torch tensors on the device, with ORT on fastsd's work stream (the stream the
pipeline runs on; see `work_stream`), so latents never leave the GPU between steps and
ORT never reads an input before torch has written it. Runs skip ORT's end-of-run device
synchronisation: the shared stream already orders what comes next. A session that did not
get the CUDA provider, or not on that stream (ORT's wrapper silently falls back to other
providers, without their options), is refused at load: the network then runs eager.
The TensorRT execution provider is opt-in (FASTSD_ORT_TENSORRT=1; native TensorRT engines,
`fastsd build --backend tensorrt`, are fastsd's TensorRT path), with the spec's profile shapes.
NOT VERIFIED on a GPU: onnxruntime-gpu is not installed where fastsd is developed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .. import catalog
from ..status import LONG_BYTES, file_bytes, say
from . import preload
from .kind import (
    CPU_GRAPH,
    WEIGHTS_BY_NAME,
    BuildOptions,
    EngineKind,
    EngineRunner,
    RefitUnsupported,
    export_module,
    graph_array,
    missing_weights,
    onnx_weights,
)

log = logging.getLogger(__name__)

_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}
_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                   torch.int32: np.int32}
TENSORRT_EP_ENV = "FASTSD_ORT_TENSORRT"  # "1": ONNX Runtime's TensorRT execution provider before CUDA's
CUDA, TENSORRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


unavailable = catalog.ONNXRUNTIME.unavailable


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    """What a graph ONNX Runtime optimised for the CPU depends on: its version and this
    machine's instruction sets (its CPU kernels and weight layouts, e.g. NCHWc blocks, are
    chosen per instruction set), as "onnxruntime <version>, <machine> <digest of the CPU flags>"."""
    import onnxruntime

    flags = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, ARM
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    digest = hashlib.blake2b(flags.encode(), digest_size=8).hexdigest()
    return f"onnxruntime {onnxruntime.__version__}, {platform.machine()} {digest}"


def tensorrt_ep_wanted() -> bool:
    """Whether the user opted in to ONNX Runtime's TensorRT execution provider."""
    return os.environ.get(TENSORRT_EP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _shape_list(shapes: dict[str, tuple]) -> str:
    """ORT's TensorRT profile option format: "name:1x4x64x64,name2:..."."""
    return ",".join(f"{n}:{'x'.join(str(d) for d in shape)}" for n, shape in shapes.items())


def cuda_chain(index: int, stream: int, have: list[str], tensorrt_shapes: dict | None = None) -> list:
    """The provider chain on CUDA device `index`: CUDA on the work stream `stream` (NHWC
    convolutions, a heuristic cuDNN algorithm choice instead of an exhaustive search per new
    shape), the CPU for what it does not run; with `tensorrt_shapes` ({input: (min, opt, max)},
    the opt-in) ONNX Runtime's TensorRT EP first, built for exactly those profile shapes (an
    fp16 graph carries its own precision: no fp16 flag, which TensorRT 11 no longer has)."""
    if CUDA not in have:
        raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    if not stream:
        raise RuntimeError("ONNX Runtime ignores a null user stream: pass fastsd's work stream")
    common = {"device_id": str(index), "user_compute_stream": str(stream), "has_user_compute_stream": "1"}
    chain = [(CUDA, {**common, "prefer_nhwc": "1", "cudnn_conv_algo_search": "HEURISTIC",
                     "cudnn_conv_use_max_workspace": "1"}), CPU]
    if tensorrt_shapes is not None and TENSORRT in have:
        from ..paths import cache_dir

        chain.insert(0, (TENSORRT, {
            **common, "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir() / "ort-tensorrt"),
            **{f"trt_profile_{k}_shapes": _shape_list({n: s[i] for n, s in tensorrt_shapes.items()})
               for i, k in enumerate(("min", "opt", "max"))}}))
    return chain


def providers_for(device: torch.device, have: list[str] | None = None, tensorrt_shapes: dict | None = None) -> list:
    """The provider chain for `device`: the CPU's, or `cuda_chain` on fastsd's work stream."""
    if device.type != "cuda":
        return [CPU]
    if have is None:
        import onnxruntime as ort

        have = ort.get_available_providers()
    from . import work_stream

    index = device.index if device.index is not None else torch.cuda.current_device()
    return cuda_chain(index, work_stream(device).cuda_stream, have, tensorrt_shapes)


def check_providers(session, chain: list) -> None:
    """Refuse a session that did not get what `chain` asked: ONNX Runtime's Python wrapper
    retries a failed session with CUDA + CPU and no options (the work stream lost: a race with
    torch), and a CUDA provider that fails to load only logs and runs everything on the CPU."""
    got = session.get_providers()
    names = [p[0] if isinstance(p, tuple) else p for p in chain]
    if got[:1] != names[:1]:
        raise RuntimeError(f"onnxruntime created the session with {', '.join(got)} instead of {names[0]} "
                           "(a provider failed to load)")
    options = session.get_provider_options()
    for name, wanted in (p for p in chain if isinstance(p, tuple)):
        if "user_compute_stream" in wanted and name in got:
            have = options.get(name, {}).get("user_compute_stream") or "0"
            if int(have) != int(wanted["user_compute_stream"]):
                raise RuntimeError(f"onnxruntime's {name} is not on fastsd's work stream (its options were dropped)")


_told: set[str] = set()


def cpu_graph(path: Path, record: dict) -> Path | None:
    """The entry's graph as ONNX Runtime optimised it for this CPU at build (`fastsd export`),
    where it was made for this machine and this onnxruntime: loaded as it is (seconds faster:
    SD 1.5's UNet in 0.7 s instead of 6 s), for the entry's own weights, on the CPU alone."""
    made = record.get(CPU_GRAPH)
    if made is None:
        return None
    if made["for"] != cpu_signature():
        if str(path) not in _told:
            _told.add(str(path))
            log.info("%s: its CPU-optimised graph was made for %s, this is %s: optimising the graph at load",
                     path.name, made["for"], cpu_signature())
        return None
    return path.parent / made["file"]


def session_key(graph: Path, threads: int) -> tuple:
    """What a CPU session of no given weights is made of (`preload.take`'s key)."""
    return "onnxruntime", str(graph), threads


def new_session(graph: Path, threads: int, providers: list, overrides: dict | None = None, optimised: bool = False):
    """An InferenceSession of `graph` (`optimised`: a CPU graph, loaded with nothing left to
    optimise) on torch's thread count where `threads` is 0, with `overrides` (initializers by
    name) given instead of the file's."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimised else \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # 0: as many as torch's intra-op pool (by default one per physical core, as ONNX Runtime's own
    # default), so an application's torch.set_num_threads limits both runtimes in one place
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    names = list(overrides or {})
    values = [ort.OrtValue.ortvalue_from_numpy(overrides[n]) for n in names]
    if names:
        opts.add_external_initializers(names, values)
    if not optimised and file_bytes([graph, f"{graph}.data"]) >= LONG_BYTES:
        say("ONNX Runtime is optimising %s for this CPU at load (seconds; `fastsd export` on this machine keeps an "
            "optimised copy for the checkpoint's own weights)", graph.name)
    session = ort.InferenceSession(str(graph), opts, providers=providers)
    session.fastsd_values = values  # the session may read them for its lifetime: they live as long as it
    return session


def _preload(path: Path, device: torch.device, dtype: torch.dtype, record: dict) -> tuple | None:
    """(key, make) of the CPU session a runner of this network would make (`preload`)."""
    if device.type != "cpu":
        return None
    made, threads = cpu_graph(path, record), torch.get_num_threads()
    return session_key(made or path, threads), lambda: new_session(made or path, threads, [CPU], None, made is not None)


class OrtRunner(EngineRunner):
    """Runs one network's graph; inputs by name, returns float32 torch tensors. On CUDA one
    I/O binding per input shape is made once and reused (inputs re-bound per call by address;
    outputs of the engine's precision into buffers kept per shape, cast to float32 on the way
    out, float32 outputs into fresh tensors the caller owns), one call at a time (a lock)."""

    name = "onnxruntime"

    def __init__(self, path: Path, spec, device: torch.device, profile, threads: int = 0,
                 providers: list | None = None, record: dict | None = None,
                 weights: dict[str, torch.Tensor] | None = None):
        import onnxruntime as ort

        super().__init__(spec, profile)
        self.path, self.threads = path, threads
        self.providers = providers if providers is not None else providers_for(device)
        self.by_name = bool(record and record.get("weights_layout") == WEIGHTS_BY_NAME)  # named as the parameters
        self.transposed = set(record.get("transposed", ())) if self.by_name else set()
        self._weights: dict[str, tuple] | None = None  # initializer -> (numpy dtype, shape), read on first refit
        # the weights the engine runs when no LoRA is fused: the file's, or (`weights`: an entry whose files
        # hold a refit donor's) the checkpoint's own, given at session creation
        self._base: dict[str, np.ndarray] = {} if weights is None else self._all_weights(weights)
        self._overrides: dict[str, np.ndarray] = dict(self._base)  # given at session creation instead of the file's
        self._bindings: dict[tuple, tuple] = {}  # input shapes -> (IOBinding, kept output buffers)
        self.lock = threading.Lock()
        self.cpu_graph = cpu_graph(self.path, record or {}) if self.providers == [CPU] else None
        self.session = self._session()
        self.run_options = ort.RunOptions()
        if device.type == "cuda":  # the work stream orders the next kernels; no device-wide wait per run
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.device = device
        self.in_types = {i.name: _ORT_TO_TORCH[i.type] for i in self.session.get_inputs()}
        self.out_types = {o.name: _ORT_TO_TORCH[o.type] for o in self.session.get_outputs()}

    def _session(self):
        made = self.cpu_graph if not self._overrides else None  # optimised already: nothing left to do at load
        if not self._overrides and self.providers == [CPU]:
            session = preload.take(session_key(made or self.path, self.threads or torch.get_num_threads()))
            if session is not None:
                return session
        session = new_session(made or self.path, self.threads, self.providers, self._overrides, made is not None)
        check_providers(session, self.providers)
        return session

    def _graph_weights(self) -> dict[str, tuple]:
        """The graph's weights (external initializers): name -> (numpy dtype, shape)."""
        if not self.by_name:
            raise RefitUnsupported("its graph was exported with weights not named as the network's parameters "
                                   "(by an older fastsd); re-export it to refit it")
        if self._weights is None:
            self._weights = onnx_weights(self.path)
        return self._weights

    def _array(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        return graph_array(name, tensor, name in self.transposed, *self._graph_weights()[name])

    def _all_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Every weight of the graph from `weights` (the checkpoint's); one missing is an error:
        the file's value would be another checkpoint's."""
        names = self._graph_weights()
        missing_weights(names, weights)
        return {n: self._array(n, weights[n]) for n in names}

    def set_weights(self, weights: dict[str, torch.Tensor], at_base: bool) -> None:
        """A new session whose initializers of those names are the given values (the graph's
        weights are external data named as the parameters, so ONNX Runtime substitutes them
        before it optimises the graph). Weights the graph does not use are skipped. At base:
        the engine's own weights again (the file's, or those given at load)."""
        names = self._graph_weights()
        if not at_base and not any(n in names for n in weights):
            return  # none of its weights (an IP-Adapter's projections, for a UNet built without them)
        overrides = dict(self._base if at_base else self._overrides)
        if not at_base:
            overrides.update({n: self._array(n, t) for n, t in weights.items() if n in names})
        with self.lock:
            old = self._overrides
            self._overrides = overrides
            try:
                self.session, self._bindings = self._session(), {}
            except BaseException:
                self._overrides = old  # the old session, with its weights, stays
                raise

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        feeds = self._feeds(inputs)
        if self.device.type == "cuda":
            from . import on_work_stream

            if torch.cuda.is_current_stream_capturing():  # ORT's kernels would run outside the graph
                raise RuntimeError("ONNX Runtime runs cannot be captured in a CUDA graph")
            with self.lock, on_work_stream(self.device):  # the stream ORT was given (a no-op inside a pipeline)
                return self._run_bound(feeds)
        with self.lock:
            outs = self.session.run(list(self.spec.output_names), {n: t.numpy() for n, t in feeds.items()},
                                    self.run_options)
        outs = tuple(torch.from_numpy(o).float() for o in outs)
        return outs if len(outs) > 1 else outs[0]  # several outputs: a tuple in the spec's order

    def _feeds(self, inputs) -> dict[str, torch.Tensor]:
        inputs = self.complete(inputs, lambda t: self.in_types[t.name])
        return {n: inputs[n].to(self.in_types[n]).contiguous() for n in self.spec.input_names}

    def _binding(self, feeds: dict[str, torch.Tensor]) -> tuple:
        """The I/O binding of these input shapes, and the output buffers it keeps (None: a
        float32 output, bound fresh per call)."""
        key = tuple(tuple(t.shape) for t in feeds.values())
        if key not in self._bindings:
            shapes = self.spec.shapes(*self.spec.dims(feeds))
            kept = {n: None if self.out_types[n] == torch.float32 else
                    torch.empty(shapes[n], dtype=self.out_types[n], device=self.device) for n in self.spec.output_names}
            binding = self.session.io_binding()
            for n, out in kept.items():
                if out is not None:
                    self._bind(binding.bind_output, n, out)
            self._bindings[key] = (binding, kept, shapes)
        return self._bindings[key]

    def _bind(self, bind, name: str, t: torch.Tensor) -> None:
        dev_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        bind(name, "cuda", dev_id, _TORCH_TO_NUMPY[t.dtype], tuple(t.shape), t.data_ptr())

    def _run_bound(self, feeds) -> torch.Tensor:
        binding, kept, shapes = self._binding(feeds)
        for n, t in feeds.items():  # this call's inputs, by address
            self._bind(binding.bind_input, n, t)
        fresh = {}
        for n, buf in kept.items():
            if buf is None:  # float32: a tensor of the caller's own, no copy afterwards
                fresh[n] = torch.empty(shapes[n], dtype=torch.float32, device=self.device)
                self._bind(binding.bind_output, n, fresh[n])
        self.session.run_with_iobinding(binding, self.run_options)
        outs = [fresh[n] if n in fresh else buf.float() for n, buf in kept.items()]  # the kept buffer stays ours
        return tuple(outs) if len(outs) > 1 else outs[0]


def _load(path: Path, spec, device: torch.device, dtype: torch.dtype, profile, record: dict | None = None,
          weights: dict | None = None) -> OrtRunner:
    shapes = spec.profile_shapes(profile) if device.type == "cuda" and tensorrt_ep_wanted() else None
    return OrtRunner(path, spec, device, profile, providers=providers_for(device, tensorrt_shapes=shapes),
                     record=record, weights=weights)


def _build(opts: BuildOptions) -> Path:
    if opts.device is not None:
        log.info("ONNX graphs are device independent; --device %s is not needed", opts.device)
    return export_module("onnx_export").export_checkpoint(
        opts.model, engine_dir=opts.engine_dir, dtype=opts.dtype or "fp32", static=opts.static,
        networks=opts.networks, simplify=opts.simplify, allow_pickle=opts.allow_pickle, clip_skip=opts.clip_skip,
        vae=opts.vae, refit=opts.refit, progress=opts.progress,
        controlnets=opts.controlnets, ip_adapters=opts.ip_adapters, max_chunks=opts.max_chunks,
        cpu_graph=opts.cpu_graph)


KIND = EngineKind(catalog.ONNXRUNTIME, lambda device: {}, _load, _build, builds_alone=True, refit_optional=False,
                  preload=_preload)
