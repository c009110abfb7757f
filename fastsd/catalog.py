"""What fastsd's engine store is made of, readable without importing torch (`fastsd info` and
`fastsd engines list` answer in well under a second): the networks' names, and what each engine
kind is (its name, files, what it needs and whether this installation can run it). The kinds'
runners and builds (fastsd/backends/<kind>.py) take their `About` from here."""

from __future__ import annotations

import ctypes
import importlib.util
import platform
import shutil
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Callable

NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder",  # every network fastsd knows
            "controlnet",  # a ControlNet's entry holds only this one (keyed by the ControlNet's own weights)
            "image_encoder")  # an IP-Adapter's CLIP image encoder: an entry of its own too
CPU_GRAPH = "cpu_graph"  # a network record's: {"file": <network>.cpu.onnx, "for": the machine it was made on}


def installed(package: str) -> str | None:
    """A package's version from its metadata (nothing imported), None where it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_devices() -> list[dict]:
    """The CUDA GPUs the driver reports (name, compute capability, memory), asked of libcuda
    directly, as torch.cuda would, without importing torch; [] where there is no driver or GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return []
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    found = []
    for k in range(count.value):
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name, total = ctypes.create_string_buffer(256), ctypes.c_size_t()
        if cuda.cuDeviceGet(ctypes.byref(dev), k) != 0:
            continue
        cuda.cuDeviceGetName(name, 256, dev)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
        cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
        found.append({"name": name.value.decode(errors="replace"), "sm": f"{major.value}{minor.value}",
                      "memory": total.value})
    return found


_core_lock = threading.Lock()  # OpenVINO's Core is shared; reading its CPU properties holds this


@lru_cache(maxsize=1)
def openvino_core():
    """The process's one OpenVINO Core (plugins load once)."""
    import openvino as ov

    return ov.Core()


@lru_cache(maxsize=1)
def openvino_cpu() -> dict:
    """The OpenVINO version and the CPU: its name and the precisions OpenVINO runs natively on it."""
    import openvino as ov

    with _core_lock:
        c = openvino_core()
        caps = sorted(c.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        return {"openvino": ov.get_version(), "cpu": c.get_property("CPU", "FULL_DEVICE_NAME"), "cpu_caps": caps}


def _missing(module: str, why: str) -> Callable[[], str | None]:
    return lambda: why if importlib.util.find_spec(module) is None else None


def _tensorrt_unavailable() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT engines need the tensorrt package and a CUDA device"
    return None if cuda_devices() else "TensorRT engines need a CUDA device"


def _openvino_details() -> str:
    facts = openvino_cpu()
    nncf = installed("nncf")
    int8 = f"nncf {nncf}: int8 builds" if nncf else "no nncf: no int8 builds"
    return f"openvino {facts['openvino']}, {int8}, CPU: {facts['cpu']} ({', '.join(facts['cpu_caps'])})"


def _compiled_details() -> str:
    cxx = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    return f"torch {installed('torch')} AOTInductor; C++ compiler: {cxx or 'none found (CPU builds need one)'}"


def _onnxruntime_details() -> str:
    import onnxruntime  # ~0.15 s; no torch

    return f"onnxruntime {onnxruntime.__version__}, providers: {', '.join(onnxruntime.get_available_providers())}"


@dataclass(frozen=True)
class About:
    """An engine kind as a user meets it: its name (also the store's folder prefix,
    <name>-<precision>), the file each network's graph or engine is (<network><suffix>), what it
    needs, how its entries are built, and whether this installation can run it."""

    name: str
    suffix: str
    unavailable: Callable[[], str | None]  # why this installation cannot run it (None: it can)
    build_command: str  # how a user builds this kind's entries
    needs: str = ""  # what it takes to run, for `fastsd info`
    details: Callable[[], str] = lambda: ""  # what this installation has (versions, providers), for `fastsd info`
    devices: tuple[str, ...] = ("cpu", "cuda")  # the device types its engines run on
    other_suffixes: tuple[str, ...] = ()  # graph files it also loads (OpenVINO: a quantized network's IR)


TENSORRT = About("tensorrt", ".plan", _tensorrt_unavailable,
                 build_command="fastsd export --dtype fp16, then fastsd build --backend tensorrt",
                 needs="the tensorrt Python package (TensorRT 10+) and a CUDA GPU; engines are tied to the "
                       "TensorRT version and GPU model",
                 details=lambda: f"tensorrt {installed('tensorrt')}")
OPENVINO = About("openvino", ".onnx",
                 _missing("openvino", "openvino is not installed (pip install 'fastsd[openvino]')"),
                 build_command="fastsd build --backend openvino",
                 needs="openvino (pip install 'fastsd[openvino]'), on the CPU; compiles the ONNX graphs of "
                       "`fastsd export` (exported first where missing); int8 entries also need nncf "
                       "(pip install 'fastsd[int8]')",
                 details=_openvino_details, devices=("cpu",), other_suffixes=(".xml",))
COMPILED = About("compiled", ".pt2", lambda: None, build_command="fastsd build --backend compiled",
                 needs="torch's AOTInductor (torch >= 2.6) and, to build on CPU, a C++ compiler; packages are "
                       "tied to the torch version and device they were built with",
                 details=_compiled_details)
ONNXRUNTIME = About("onnxruntime", ".onnx",
                    _missing("onnxruntime", "onnxruntime is not installed (pip install 'fastsd[onnx]')"),
                    build_command="fastsd export",
                    needs="onnxruntime (CPU), or onnxruntime-gpu with CUDA / TensorRT execution providers; "
                          "ONNX graphs from `fastsd export`",
                    details=_onnxruntime_details)
KINDS: dict[str, About] = {k.name: k for k in (TENSORRT, OPENVINO, COMPILED, ONNXRUNTIME)}  # the order auto tries
GRAPH_SUFFIXES = tuple(dict.fromkeys(s for k in KINDS.values() for s in (k.suffix, *k.other_suffixes)))
