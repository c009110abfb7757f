"""Machine facts for benchmark reports, and the memory probes of a bench worker."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Callable

import torch

from ..devices import cpu_name
from ..version import __version__


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts(device: torch.device) -> dict:
    facts = {
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "os": platform.platform(),
        "python": platform.python_version(), "fastsd": __version__, "git_commit": _git_commit(),
        "torch": torch.__version__, "diffusers": _version("diffusers"), "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"), "openvino": _openvino_version(), "tensorrt": _version("tensorrt"),
        "device": device.type, "cpu_flags": cpu_flags(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        facts.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}",
                     gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda, driver=_nvidia_driver())
    return facts


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
             "amx_tile")  # what decides CPU speed by precision (fp32 SIMD width, int8 dot products, bf16)


def cpu_flags() -> list[str]:
    """The CPU's flags among CPU_FLAGS (Linux's /proc/cpuinfo; empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        return []
    have = set(line.split(":", 1)[-1].split())
    return [flag for flag in CPU_FLAGS if flag in have]


def _openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


class ProcessMemory:
    """What this process holds: peak RSS over a block (CPU), or device memory held (CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.held = device, 0
        self.kind = "cuda_process_driver" if device.type == "cuda" else "peak_rss"
        if device.type == "cuda":
            torch.cuda.init()
            self._used()  # creates the context; the baseline excludes it

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def measure(self, fn: Callable):
        """Run fn; returns (its result, the peak memory of this process so far)."""
        if self.device.type != "cuda":
            _reset_rss_peak()
            out = fn()
            return out, _rss_peak()
        torch.cuda.synchronize(self.device)
        before = self._used()
        out = fn()
        torch.cuda.synchronize(self.device)
        self.held += max(self._used() - before, 0)
        return out, self.held


def _reset_rss_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def _proc_kib(path: str, key: str) -> int | None:
    """A "Key:   N kB" line of a /proc file, in bytes (None where there is none)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


def _rss_peak() -> int:
    peak = _proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
