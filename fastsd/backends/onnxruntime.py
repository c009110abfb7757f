"""ONNX Runtime runner for one exported network.

CPU: tensors are handed over as numpy views (no copy for contiguous float32). CUDA: I/O
binding to torch tensors on the device, with ORT on fastsd's work stream (the stream the
pipeline runs on; see `work_stream`), so latents never leave the GPU between steps and
ORT never reads an input before torch has written it. Runs skip ORT's end-of-run device
synchronisation: the shared stream already orders what comes next. The TensorRT
execution provider is put first where onnxruntime has it (engines cached under the fastsd
cache, not in the engine store, whose entries hold only hashed files).
NOT VERIFIED on a GPU: onnxruntime-gpu is not installed where fastsd is developed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .kind import WEIGHTS_BY_NAME, BuildOptions, EngineKind, EngineRunner, RefitUnsupported, export_module

log = logging.getLogger(__name__)

_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}
_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                   torch.int32: np.int32}


def unavailable() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'fastsd[onnx]')"
    return None


def providers_for(device: torch.device, use_tensorrt: bool = False, have: list[str] | None = None) -> list:
    """The provider chain for `device`: CPU; or CUDA on fastsd's work stream (TensorRT EP
    first when asked for and present), with the CPU for what neither runs."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if have is None:
        import onnxruntime as ort

        have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    from . import work_stream

    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = str(work_stream(device).cuda_stream)  # never 0: ORT ignores a null user stream
    chain = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": stream}), "CPUExecutionProvider"]
    if use_tensorrt and "TensorrtExecutionProvider" in have:
        from ..paths import cache_dir

        chain.insert(0, ("TensorrtExecutionProvider", {
            "device_id": index, "user_compute_stream": stream, "trt_fp16_enable": True,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir() / "ort-tensorrt")}))
    return chain


class OrtRunner(EngineRunner):
    """Runs one network's graph; inputs by name, returns a float32 torch tensor."""

    name = "onnxruntime"

    def __init__(self, path: Path, spec, device: torch.device, profile, threads: int = 0,
                 use_tensorrt: bool = False, record: dict | None = None):
        import onnxruntime as ort

        super().__init__(spec, profile)
        self.path, self.threads, self.providers = path, threads, providers_for(device, use_tensorrt)
        self.by_name = bool(record and record.get("weights_layout") == WEIGHTS_BY_NAME)  # named as the parameters
        self.transposed = set(record.get("transposed", ())) if self.by_name else set()
        self._weights: dict[str, tuple] | None = None  # initializer -> (numpy dtype, shape), read on first refit
        self._overrides: dict[str, np.ndarray] = {}  # weights given at session creation instead of the file's
        self.session = self._session()
        self.run_options = ort.RunOptions()
        if device.type == "cuda":  # the work stream orders the next kernels; no device-wide wait per run
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.device = device
        self.in_types = {i.name: _ORT_TO_TORCH[i.type] for i in self.session.get_inputs()}
        self.out_types = {o.name: _ORT_TO_TORCH[o.type] for o in self.session.get_outputs()}

    def _session(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads  # 0: one per physical core
        opts.log_severity_level = 3
        names = list(self._overrides)
        values = [ort.OrtValue.ortvalue_from_numpy(self._overrides[n]) for n in names]
        if names:
            opts.add_external_initializers(names, values)
        session = ort.InferenceSession(str(self.path), opts, providers=self.providers)
        session.fastsd_values = values  # the session may read them for its lifetime: they live as long as it
        return session

    def set_weights(self, weights: dict[str, torch.Tensor], at_base: bool) -> None:
        """A new session whose initializers of those names are the given values (the graph's
        weights are external data named as the parameters, so ONNX Runtime substitutes them
        before it optimises the graph). Weights the graph does not use are skipped."""
        if not self.by_name:
            raise RefitUnsupported("its graph was exported with weights not named as the network's parameters "
                                   "(by an older fastsd); re-export it to refit it")
        if self._weights is None:
            import onnx

            graph = onnx.load(str(self.path), load_external_data=False).graph
            self._weights = {t.name: (onnx.helper.tensor_dtype_to_np_dtype(t.data_type), tuple(t.dims))
                             for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        overrides = {} if at_base else dict(self._overrides)
        if not at_base:
            for name, tensor in weights.items():
                if name not in self._weights:
                    continue
                dtype, shape = self._weights[name]
                t = tensor.detach().t() if name in self.transposed else tensor.detach()
                array = np.ascontiguousarray(t.to("cpu", torch.float32).numpy().astype(dtype, copy=False))
                if array.shape != shape:
                    raise RefitUnsupported(f"{name} is {array.shape}, the graph's is {shape}")
                overrides[name] = array
        old = self._overrides
        self._overrides = overrides
        try:
            self.session = self._session()
        except BaseException:
            self._overrides = old  # the old session, with its weights, stays
            raise

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            from . import on_work_stream

            if torch.cuda.is_current_stream_capturing():  # ORT's kernels would run outside the graph
                raise RuntimeError("ONNX Runtime runs cannot be captured in a CUDA graph")
            with on_work_stream(self.device):  # the stream ORT was given (a no-op inside a pipeline)
                return self._run_bound(inputs)
        feeds = self._feeds(inputs)
        outs = self.session.run(list(self.spec.output_names), {n: t.numpy() for n, t in feeds.items()},
                                self.run_options)
        outs = tuple(torch.from_numpy(o).float() for o in outs)
        return outs if len(outs) > 1 else outs[0]  # several outputs: a tuple in the spec's order

    def _feeds(self, inputs) -> dict[str, torch.Tensor]:
        return {n: inputs[n].to(self.in_types[n]).contiguous() for n in self.spec.input_names}

    def _run_bound(self, inputs) -> torch.Tensor:
        feeds = self._feeds(inputs)
        binding = self.session.io_binding()
        dev_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        for n, t in feeds.items():
            binding.bind_input(n, "cuda", dev_id, _TORCH_TO_NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        shapes, outs = self.spec.shapes(*self.spec.dims(inputs)), []
        for name in self.spec.output_names:
            out = torch.empty(shapes[name], dtype=self.out_types[name], device=self.device)
            binding.bind_output(name, "cuda", dev_id, _TORCH_TO_NUMPY[out.dtype], shapes[name], out.data_ptr())
            outs.append(out)
        self.session.run_with_iobinding(binding, self.run_options)
        return tuple(o.float() for o in outs) if len(outs) > 1 else outs[0].float()


def _load(path: Path, spec, device: torch.device, dtype: torch.dtype, profile, record: dict | None = None) -> OrtRunner:
    return OrtRunner(path, spec, device, profile, use_tensorrt=device.type == "cuda", record=record)


def _build(opts: BuildOptions) -> Path:
    if opts.device is not None:
        log.info("ONNX graphs are device independent; --device %s is not needed", opts.device)
    return export_module("onnx_export").export_checkpoint(
        opts.model, engine_dir=opts.engine_dir, dtype=opts.dtype or "fp32", static=opts.static,
        networks=opts.networks, simplify=opts.simplify, allow_pickle=opts.allow_pickle, clip_skip=opts.clip_skip,
        vae=opts.vae, refit=opts.refit, progress=opts.progress,
        controlnets=opts.controlnets)


def _details() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}, providers: {', '.join(onnxruntime.get_available_providers())}"


KIND = EngineKind("onnxruntime", ".onnx", unavailable, lambda device: {}, _load, _build,
                  build_command="fastsd export", builds_alone=True, refit_optional=False,
                  needs="onnxruntime (CPU), or onnxruntime-gpu with CUDA / TensorRT execution providers; "
                        "ONNX graphs from `fastsd export`",
                  details=_details)
