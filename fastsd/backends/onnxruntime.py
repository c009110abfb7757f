"""ONNX Runtime runner for one exported network.

CPU: tensors are handed over as numpy views (no copy for contiguous float32). CUDA: I/O
binding to torch tensors on the device, with ORT on torch's current stream, so latents
never leave the GPU between steps. TensorRT EP is used when installed and asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..networks import SPECS, call_dims, io_shapes

log = logging.getLogger(__name__)

_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}
_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                   torch.int32: np.int32}


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def providers_for(device: torch.device, use_tensorrt: bool = False) -> list:
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in have:
        raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    cuda = ("CUDAExecutionProvider", {"device_id": device.index or 0,
                                      "user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream)})
    chain = [cuda, "CPUExecutionProvider"]
    if use_tensorrt and "TensorrtExecutionProvider" in have:
        chain.insert(0, ("TensorrtExecutionProvider", {"device_id": device.index or 0, "trt_fp16_enable": True}))
    return chain


class OrtRunner:
    """Runs one network's graph; inputs in ONNX order, returns a float32 torch tensor."""

    name = "onnxruntime"

    def __init__(self, path: Path, network: str, info, device: torch.device, profile, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads  # 0: one per physical core
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=providers_for(device))
        self.network, self.info, self.device, self.profile = network, info, device, profile
        self.spec = SPECS[network]
        self.in_types = {i.name: _ORT_TO_TORCH[i.type] for i in self.session.get_inputs()}
        self.out_type = _ORT_TO_TORCH[self.session.get_outputs()[0].type]

    def refuses(self, *inputs: torch.Tensor) -> str | None:
        return self.profile.refuses(self.network, *call_dims(self.network, self.info, inputs[0]))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feeds = {n: t.to(self.in_types[n]).contiguous() for n, t in zip(self.spec.inputs, inputs, strict=True)}
        if self.device.type == "cuda":
            return self._run_bound(feeds, inputs[0]).float()
        out = self.session.run(None, {n: t.numpy() for n, t in feeds.items()})[0]
        return torch.from_numpy(out).float()

    def _run_bound(self, feeds: dict, first: torch.Tensor) -> torch.Tensor:
        binding = self.session.io_binding()
        dev_id = self.device.index or 0
        for n, t in feeds.items():
            binding.bind_input(n, "cuda", dev_id, _TORCH_TO_NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        batch, height, width = call_dims(self.network, self.info, first)
        shape = io_shapes(self.network, self.info, batch, height, width)[self.spec.outputs[0]]
        out = torch.empty(shape, dtype=self.out_type, device=self.device)
        binding.bind_output(self.spec.outputs[0], "cuda", dev_id, _TORCH_TO_NUMPY[out.dtype], shape, out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out
