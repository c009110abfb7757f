"""Runner for `compiled` engines: AOTInductor packages loaded without recompiling."""

from __future__ import annotations

from pathlib import Path

import torch

from ..networks import FP32_INPUTS, INT_INPUTS, SPECS, call_dims


def device_key(device: torch.device) -> str:
    """What a compiled package is tied to: the GPU model and compute capability, or the CPU."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"cuda:{p.name}:sm_{p.major}{p.minor}"
    from ..bench.machine import _cpu_name

    return f"cpu:{_cpu_name()}"


def runtime_facts(device: torch.device) -> dict:
    """Manifest facts a compiled package must match at load time."""
    return {"torch": torch.__version__, "device_key": device_key(device)}


class CompiledRunner:
    name = "compiled"

    def __init__(self, path: Path, network: str, info, device: torch.device, profile, dtype: torch.dtype):
        self.model = torch._inductor.aoti_load_package(str(path))
        self.network, self.info, self.device, self.profile, self.dtype = network, info, device, profile, dtype
        self.spec = SPECS[network]

    def refuses(self, *inputs: torch.Tensor) -> str | None:
        return self.profile.refuses(self.network, *call_dims(self.network, self.info, inputs[0]))

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name in INT_INPUTS:
            return t.to(self.device, torch.int64)
        return t.to(self.device, torch.float32 if name in FP32_INPUTS else self.dtype).contiguous()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        args = [self._cast(n, t) for n, t in zip(self.spec.inputs, inputs, strict=True)]
        with torch.inference_mode():
            out = self.model(*args)
        return (out[0] if isinstance(out, (list, tuple)) else out).float()
