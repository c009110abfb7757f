"""TensorRT runner: one deserialized engine per network, run by tensor name.

TensorRT 10/11 API: set_input_shape / set_tensor_address / execute_async_v3 on fastsd's
work stream (never the default stream, where TensorRT documents extra synchronisations),
into pre-allocated torch buffers. Each input shape gets its own execution context (its
shapes and addresses are set once, so a graph captured from it stays valid) and all
contexts share one device-memory scratch buffer: they run one at a time on one stream.
After two launches of a shape the launch is captured in a CUDA graph and replayed; a
capture that fails leaves plain launches in place. Inside the pipeline's whole-step
capture the runner only enqueues (the step's graph holds the launch). Inputs are copied
into the slot's buffers as they come (one copy, casting where the engine's dtype differs);
an optional input a call leaves out (ControlNet residuals) is zeroed once per slot, not per
call. Deserialising, allocating, refitting and launching happen on the pipeline's GPU.
NOT VERIFIED: TensorRT cannot be installed where fastsd is developed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from .. import catalog
from ..devices import device_key
from . import on_device
from .cuda_graphs import capturing, stream_capturing
from .kind import WEIGHTS_BY_NAME, BuildOptions, EngineKind, EngineRunner, RefitUnsupported, export_module

log = logging.getLogger(__name__)

CAPTURE_AFTER = 2  # launches of a shape before its graph is captured (shape setup and tactics are warm)


unavailable = catalog.TENSORRT.unavailable


def runtime_facts(device: torch.device) -> dict:
    """Manifest facts a plan must match: the TensorRT version and the GPU it was built on
    (for a pipeline on the CPU: the current GPU, as plans only run on one)."""
    import tensorrt as trt

    if device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return {"tensorrt": trt.__version__, "device_key": device_key(device)}


def deserialize(trt, logger, plan: bytes, what: str):
    """The engine of `plan`, or a clear error (TensorRT returns None, for example for a plan
    built by another TensorRT version or for another GPU)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError(f"TensorRT cannot deserialize {what} (built by another TensorRT version or GPU, "
                           "or damaged); rebuild it with `fastsd build --backend tensorrt`")
    return engine


def _scratch_bytes(engine) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
    return int(size if size is not None else engine.device_memory_size)


class TrtRunner(EngineRunner):
    """Slots (contexts, buffers, graphs) and the scratch memory are shared state: one call
    runs at a time (a lock), so threads sharing a pipeline never mix their buffers."""

    name = "tensorrt"

    def __init__(self, path: Path, spec, device: torch.device, profile, cuda_graphs: bool = True,
                 record: dict | None = None):
        import tensorrt as trt

        super().__init__(spec, profile)
        record = record or {}
        self.by_name = record.get("weights_layout") == WEIGHTS_BY_NAME  # refittable plan of a by-name ONNX graph
        self.transposed = set(record.get("transposed", ()))
        self.trt, self.logger = trt, trt.Logger(trt.Logger.WARNING)
        self.network, self.device, self.cuda_graphs = spec.name, device, cuda_graphs
        with on_device(device):  # TensorRT works on the current device: make it the pipeline's
            self.engine = deserialize(trt, self.logger, path.read_bytes(), f"{spec.name} ({path.name})")
            names = self.spec.input_names + self.spec.output_names
            self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
            self.scratch = torch.empty(max(_scratch_bytes(self.engine), 1), dtype=torch.uint8, device=device)
        self.slots: dict[tuple, dict] = {}  # (batch, height, width) -> context, buffers, graph
        self.lock = threading.Lock()

    def _context(self):
        trt = self.trt
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
            context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        else:
            context.device_memory = self.scratch.data_ptr()
        return context

    def _slot(self, inputs: dict) -> dict:
        key = self.spec.dims(inputs)  # every input and output shape follows from these
        if key not in self.slots:
            shapes = self.spec.shapes(*key)
            bufs = {n: torch.empty(shapes[n], dtype=self.dtypes[n], device=self.device)
                    for n in self.spec.input_names + self.spec.output_names}
            context = self._context()
            for n in self.spec.input_names:
                if not context.set_input_shape(n, tuple(bufs[n].shape)):
                    raise RuntimeError(f"TensorRT {self.network}: shape {tuple(bufs[n].shape)} of {n} is outside "
                                       "the engine's profile")
            for n, t in bufs.items():
                context.set_tensor_address(n, t.data_ptr())
            self.slots[key] = {"context": context, "bufs": bufs, "graph": None, "runs": 0, "capture": True,
                               "zeroed": set()}
        return self.slots[key]

    def _launch(self, slot: dict) -> None:
        if not slot["context"].execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT {self.network} execution failed")

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        from . import on_work_stream

        with self.lock, on_device(self.device), on_work_stream(self.device):  # no-ops inside a pipeline
            return self._run(inputs)

    def set_weights(self, weights: dict[str, torch.Tensor], at_base: bool) -> None:
        """Refit the plan's weights of those names (TensorRT names a weight after its ONNX
        initializer, which fastsd names after the parameter; some are stored transposed).
        Captured graphs are dropped: they may hold the old weights' addresses."""
        if not self.by_name:
            raise RefitUnsupported("the plan was not built refittable (fastsd build --backend tensorrt --refittable)")
        trt = self.trt
        with self.lock, on_device(self.device):
            refitter = trt.Refitter(self.engine, self.logger)
            names = set(refitter.get_all_weights())
            keep = []  # TensorRT reads the host arrays during refit_cuda_engine
            for name, tensor in weights.items():
                if name not in names:
                    continue  # a weight the engine does not use
                t = tensor.detach().t() if name in self.transposed else tensor.detach()
                proto = refitter.get_weights_prototype(name)  # trt.Weights: dtype, size, nbytes; no shape
                dtype = _torch_dtype(trt, proto.dtype)
                array = t.to("cpu", dtype).contiguous().numpy()
                if array.size != proto.size:
                    raise RefitUnsupported(f"{name} has {array.size} values, the plan's has {proto.size}")
                keep.append(array)
                if not refitter.set_named_weights(name, trt.Weights(array)):
                    raise RuntimeError(f"TensorRT refused new weights for {name}")
            if keep and not refitter.refit_cuda_engine():
                raise RuntimeError(f"TensorRT could not refit the {self.network} engine")
            for slot in self.slots.values():
                slot["graph"], slot["runs"] = None, 0

    def _fill(self, slot: dict, inputs: dict) -> None:
        """The call's inputs into the slot's buffers; an optional input it leaves out is zeroed
        once, and stays zero while calls leave it out (a whole-step capture records the zeroing:
        its replays may follow a call that filled the buffer)."""
        recorded = stream_capturing()
        for n in self.spec.input_names:
            if n in inputs:
                slot["bufs"][n].copy_(inputs[n])
                slot["zeroed"].discard(n)
            elif recorded or n not in slot["zeroed"]:
                slot["bufs"][n].zero_()
                slot["zeroed"].add(n)

    def _run(self, inputs: dict) -> torch.Tensor:
        slot = self._slot(inputs)
        bufs = slot["bufs"]
        self._fill(slot, inputs)
        if capturing():  # inside the pipeline's whole-step graph (or its warm-up): no graph of its own
            self._launch(slot)
        elif slot["graph"] is not None:
            slot["graph"].replay()
        else:
            self._launch(slot)
            slot["runs"] += 1
            if self.cuda_graphs and slot["capture"] and slot["runs"] == CAPTURE_AFTER:
                slot["graph"] = self._capture(slot)
        outs = tuple(bufs[n].to(torch.float32, copy=True) for n in self.spec.output_names)  # copies out of the
        return outs if len(outs) > 1 else outs[0]  # static buffers; several outputs in spec order

    def _capture(self, slot: dict):
        """The slot's launch as a CUDA graph, or None (plain launches stay) if it cannot be captured."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # on a private side stream, as PyTorch recommends
                self._launch(slot)
        except Exception as e:  # noqa: BLE001 - keep running uncaptured
            slot["capture"] = False
            log.warning("TensorRT %s: CUDA-graph capture failed (%s); launching without a graph", self.network,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        return graph


def _torch_dtype(trt, dt) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32, trt.int64: torch.int64}[dt]


def _build(opts: BuildOptions) -> Path:
    if opts.dtype not in (None, "fp16"):
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(f"TensorRT engines are built in fp16, not {opts.dtype}")
    return export_module("tensorrt").build_tensorrt(
        opts.model, engine_dir=opts.engine_dir, static=opts.static, networks=opts.networks,
        allow_pickle=opts.allow_pickle, refittable=opts.refittable, vae=opts.vae, refit=opts.refit,
        progress=opts.progress, controlnets=opts.controlnets, ip_adapters=opts.ip_adapters, max_chunks=opts.max_chunks)


KIND = EngineKind(catalog.TENSORRT, runtime_facts,
                  lambda path, spec, device, dtype, profile, record=None: TrtRunner(path, spec, device, profile,
                                                                                    record=record), _build,
                  builds_alone=False, refit_optional=True)
