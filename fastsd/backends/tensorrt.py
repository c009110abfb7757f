"""TensorRT runner: one deserialized engine per network, run by tensor name.

TensorRT 10 API: set_input_shape / set_tensor_address / execute_async_v3 on torch's
current stream, into pre-allocated torch buffers (one set per input shape), with the
launch captured in a CUDA graph and replayed after the first call of each shape.
NOT VERIFIED: TensorRT cannot be installed where fastsd is developed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..networks import SPECS, call_dims, io_shapes


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


class TrtRunner:
    name = "tensorrt"

    def __init__(self, path: Path, network: str, info, device: torch.device, profile, cuda_graphs: bool = True):
        import tensorrt as trt

        self.trt, self.logger = trt, trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.network, self.info, self.device, self.profile = network, info, device, profile
        self.spec, self.cuda_graphs = SPECS[network], cuda_graphs
        names = self.spec.inputs + self.spec.outputs
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.slots: dict[tuple, dict] = {}  # input shapes -> buffers (+ graph)

    def refuses(self, *inputs: torch.Tensor) -> str | None:
        return self.profile.refuses(self.network, *call_dims(self.network, self.info, inputs[0]))

    def _slot(self, inputs) -> dict:
        key = tuple(tuple(t.shape) for t in inputs)
        if key not in self.slots:
            shapes = io_shapes(self.network, self.info, *call_dims(self.network, self.info, inputs[0]))
            bufs = {n: torch.empty(shapes[n], dtype=self.dtypes[n], device=self.device)
                    for n in self.spec.inputs + self.spec.outputs}
            self.slots[key] = {"bufs": bufs, "graph": None, "runs": 0}
        return self.slots[key]

    def _launch(self, bufs: dict, stream: torch.cuda.Stream) -> None:
        for n in self.spec.inputs:
            self.context.set_input_shape(n, tuple(bufs[n].shape))
        for n, t in bufs.items():
            self.context.set_tensor_address(n, t.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT {self.network} execution failed")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        slot = self._slot(inputs)
        bufs = slot["bufs"]
        for n, t in zip(self.spec.inputs, inputs, strict=True):
            bufs[n].copy_(t)
        stream = torch.cuda.current_stream(self.device)
        if slot["graph"] is not None:
            slot["graph"].replay()
        else:
            self._launch(bufs, stream)
            slot["runs"] += 1
            if self.cuda_graphs and slot["runs"] == 2:  # capture once shapes and tactics are warm
                slot["graph"] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(slot["graph"]):
                    self._launch(bufs, torch.cuda.current_stream(self.device))
        return bufs[self.spec.outputs[0]].float() if self.dtypes[self.spec.outputs[0]] != torch.float32 else \
            bufs[self.spec.outputs[0]].clone()


def _torch_dtype(trt, dt) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32, trt.int64: torch.int64}[dt]
