"""Devices: parsing the user's device, and the key a compiled engine is tied to."""

from __future__ import annotations

import torch

from .catalog import cpu_name
from .errors import InvalidArgumentError


def parse_device(device) -> torch.device:
    """"cpu", "cuda" or "cuda:N" (None: cuda if available), checked against this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"must be 'cpu', 'cuda' or 'cuda:N', got {device!r}", "device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"{device!r} requested but CUDA is not available", "device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                                   "device")
    return dev


def device_key(device: torch.device) -> str:
    """What a compiled package or TensorRT plan is tied to: the GPU model and compute
    capability, or the CPU."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"cuda:{p.name}:sm_{p.major}{p.minor}"
    return f"cpu:{cpu_name()}"
