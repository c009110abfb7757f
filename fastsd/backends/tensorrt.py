"""TensorRT runner: one deserialized engine per network, run by tensor name.

TensorRT 10/11 API: set_input_shape / set_tensor_address / execute_async_v3 on fastsd's
work stream (never the default stream, where TensorRT documents extra synchronisations),
into pre-allocated torch buffers. Each input shape gets its own execution context (its
shapes and addresses are set once, so a graph captured from it stays valid) and all
contexts share one device-memory scratch buffer: they run one at a time on one stream.
After two launches of a shape the launch is captured in a CUDA graph and replayed; a
capture that fails leaves plain launches in place. Inside the pipeline's whole-step
capture the runner only enqueues (the step's graph holds the launch).
NOT VERIFIED: TensorRT cannot be installed where fastsd is developed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..networks import SPECS, call_dims, io_shapes

log = logging.getLogger(__name__)

CAPTURE_AFTER = 2  # launches of a shape before its graph is captured (shape setup and tactics are warm)


def available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def runtime_facts() -> dict:
    """Manifest facts a plan must match: the TensorRT version and the GPU it was built on."""
    import tensorrt as trt

    from .compiled import device_key

    return {"tensorrt": trt.__version__, "device_key": device_key(torch.device("cuda", torch.cuda.current_device()))}


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


class TrtRunner:
    name = "tensorrt"

    def __init__(self, path: Path, network: str, info, device: torch.device, profile, cuda_graphs: bool = True):
        import tensorrt as trt

        self.trt, self.logger = trt, trt.Logger(trt.Logger.WARNING)
        self.engine = deserialize(trt, self.logger, path.read_bytes(), f"{network} ({path.name})")
        self.network, self.info, self.device, self.profile = network, info, device, profile
        self.spec, self.cuda_graphs = SPECS[network], cuda_graphs
        names = self.spec.inputs + self.spec.outputs
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.scratch = torch.empty(max(_scratch_bytes(self.engine), 1), dtype=torch.uint8, device=device)
        self.slots: dict[tuple, dict] = {}  # input shapes -> context, buffers, graph

    def refuses(self, *inputs: torch.Tensor) -> str | None:
        return self.profile.refuses(self.network, *call_dims(self.network, self.info, inputs[0]))

    def _context(self):
        trt = self.trt
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
            context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        else:
            context.device_memory = self.scratch.data_ptr()
        return context

    def _slot(self, inputs) -> dict:
        key = tuple(tuple(t.shape) for t in inputs)
        if key not in self.slots:
            shapes = io_shapes(self.network, self.info, *call_dims(self.network, self.info, inputs[0]))
            bufs = {n: torch.empty(shapes[n], dtype=self.dtypes[n], device=self.device)
                    for n in self.spec.inputs + self.spec.outputs}
            context = self._context()
            for n in self.spec.inputs:
                if not context.set_input_shape(n, tuple(bufs[n].shape)):
                    raise RuntimeError(f"TensorRT {self.network}: shape {tuple(bufs[n].shape)} of {n} is outside "
                                       "the engine's profile")
            for n, t in bufs.items():
                context.set_tensor_address(n, t.data_ptr())
            self.slots[key] = {"context": context, "bufs": bufs, "graph": None, "runs": 0, "capture": True}
        return self.slots[key]

    def _launch(self, slot: dict) -> None:
        if not slot["context"].execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT {self.network} execution failed")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        from . import on_work_stream

        with on_work_stream(self.device):  # a no-op inside a pipeline, or inside a whole-step capture
            return self._run(inputs)

    def _run(self, inputs) -> torch.Tensor:
        slot = self._slot(inputs)
        bufs = slot["bufs"]
        for n, t in zip(self.spec.inputs, inputs, strict=True):
            bufs[n].copy_(t)
        if torch.cuda.is_current_stream_capturing():  # inside the pipeline's whole-step graph
            self._launch(slot)
        elif slot["graph"] is not None:
            slot["graph"].replay()
        else:
            self._launch(slot)
            slot["runs"] += 1
            if self.cuda_graphs and slot["capture"] and slot["runs"] == CAPTURE_AFTER:
                slot["graph"] = self._capture(slot)
        out = bufs[self.spec.outputs[0]]
        return out.to(torch.float32, copy=True)  # one copy out of the static buffer

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
