"""What an engine kind is (one unit: availability, runtime facts, artifact suffix, build,
load, refit) and what every engine runner shares (its spec, its profile, the one shape
check). Each kind module (onnxruntime.py, compiled.py, tensorrt.py) defines its `KIND`;
registry.py lists them.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..catalog import CPU_GRAPH, About  # noqa: F401 - CPU_GRAPH re-exported for the kinds
from ..networks import NetworkSpec

log = logging.getLogger(__name__)

WEIGHTS_BY_NAME = "by-name"  # weights_layout of a graph (or plan) whose weights are named as the parameters


class Runner(Protocol):
    """One engine serving one network, called with the spec's input names."""

    name: str  # the engine kind, reported in out.backends

    def fits(self, inputs: dict[str, torch.Tensor]) -> str | None:
        """None when the engine serves these shapes; else why it does not."""

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor: ...

    def set_weights(self, weights: dict[str, torch.Tensor], at_base: bool) -> None:
        """Refit: give the engine these values of the network's weights (named as the
        network module's parameters; the others keep theirs). `at_base`: every weight is the
        entry's own again (its files', or for an entry refitted by reference the checkpoint's,
        given at load: `kind.load(..., weights=)`). Raises RefitUnsupported where the engine
        cannot take new weights."""


def onnx_weights(path: Path) -> dict[str, tuple]:
    """An ONNX graph's weights (its initializers kept in external data): name -> (numpy
    dtype, shape), read from the graph file alone."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {t.name: (onnx.helper.tensor_dtype_to_np_dtype(t.data_type), tuple(t.dims))
            for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def graph_array(name: str, tensor: torch.Tensor, transposed: bool, dtype, shape: tuple) -> np.ndarray:
    """A weight as a graph holds it: in `dtype`, transposed where the graph stores it so. An
    fp32 CPU tensor stored as it is stays a view (no copy of a memory-mapped checkpoint).
    RefitUnsupported where its shape is not the graph's."""
    t = tensor.detach().t() if transposed else tensor.detach()
    array = np.ascontiguousarray(t.to("cpu", torch.float32).numpy().astype(dtype, copy=False))
    if array.shape != tuple(shape):
        raise RefitUnsupported(f"{name} is {array.shape}, the graph's is {tuple(shape)}")
    return array


def missing_weights(graph: dict, weights: dict) -> None:
    """Refuse weights given at load (the checkpoint's, for an entry whose files hold a refit
    donor's) that do not cover every weight of the graph: the file's would be another checkpoint's."""
    missing = sorted(set(graph) - set(weights))
    if missing:
        raise RuntimeError(f"the checkpoint has no weight {missing[0]} of the graph ({len(missing)} missing)")


class RefitUnsupported(Exception):
    """An engine that cannot take other weights than those it was built with (a frozen
    compiled package, a non-refittable TensorRT plan, a graph exported before weights were
    named): it serves calls only while the network holds the entry's own weights."""


class EngineRunner:
    """The part every runner shares: the network's spec, the entry's shape profile and the
    shape check against it."""

    name = "engine"

    def __init__(self, spec: NetworkSpec, profile):
        self.spec, self.profile = spec, profile
        self._zeros: dict[tuple, torch.Tensor] = {}  # (input, shape, dtype, device) -> zeros made once

    def fits(self, inputs: dict[str, torch.Tensor]) -> str | None:
        return self.spec.refuses(self.profile, inputs)

    def complete(self, inputs: dict[str, torch.Tensor], dtype_of: Callable) -> dict[str, torch.Tensor]:
        """`inputs` with zeros for the optional inputs a call leaves out (the ControlNet residuals
        of a UNet built with them, called without ControlNet: adding zeros changes nothing),
        made once per shape in the dtype the engine takes (`dtype_of(TensorSpec)`) and reused."""
        absent = [t for t in self.spec.inputs if t.optional and t.name not in inputs]
        if not absent:
            return inputs
        shapes, like = self.spec.shapes(*self.spec.dims(inputs)), inputs[self.spec.inputs[0].name]
        zeros = {}
        for t in absent:
            key = (t.name, shapes[t.name], dtype_of(t), like.device)
            if key not in self._zeros:
                self._zeros[key] = torch.zeros(shapes[t.name], dtype=key[2], device=like.device)
            zeros[t.name] = self._zeros[key]
        return {**inputs, **zeros}

    def set_weights(self, weights: dict[str, torch.Tensor], at_base: bool) -> None:
        raise RefitUnsupported(f"{self.name} engines of this entry cannot be refitted")


@dataclass(frozen=True)
class BuildOptions:
    """What a build is asked for (the CLI's `export` / `build` options); a kind refuses
    what it cannot do."""

    model: str
    engine_dir: str | Path | None = None  # None: the default store
    dtype: str | None = None  # precision; None: the kind's default for the device
    static: str | None = None  # "HxW": a static-shape entry
    device: str | None = None  # the device the engines are for (kinds tied to one)
    networks: tuple[str, ...] | None = None  # None: every network of the checkpoint's family
    allow_pickle: bool = False
    clip_skip: int = 0
    vae: str | None = None  # a VAE (folder or file) replacing the checkpoint's
    controlnets: tuple[str, ...] = ()  # ControlNets: each into an entry of its own; the UNet takes their residuals
    ip_adapters: tuple[str, ...] = ()  # IP-Adapters (files or folders): the UNet takes their image tokens and scales
    refittable: bool | None = None  # engines that take other weights by refit; None: the kind's default
    # (compiled: yes, weights beside the code, False = frozen; TensorRT: no, True = refittable plans)
    refit: bool = True  # a new checkpoint of an architecture the store holds is refitted, not rebuilt
    simplify: bool = True  # ONNX: run onnxslim
    cpu_graph: bool = True  # ONNX (fp32): also keep each graph as ONNX Runtime optimises it for this CPU
    max_chunks: int | None = None  # the longest text the UNet (and ControlNets) take, in chunks of 77
    # tokens; None: 3 (231 tokens) for a new export, the ONNX entry's for TensorRT
    progress: Callable[[str], None] = log.info  # one line per network built


@dataclass(frozen=True)
class EngineKind:
    about: About  # its name, files, needs and availability (fastsd/catalog.py: read without torch)
    runtime_facts: Callable[[torch.device], dict]  # manifest facts an entry must match to run here
    load: Callable[..., Runner]  # (path, spec, device, dtype, profile, record) -> a runner; record: the
    # network's manifest record (its files and facts, e.g. how its weights are named)
    build: Callable[[BuildOptions], Path]  # builds (or refits) an entry; returns its folder
    builds_alone: bool  # builds from the checkpoint alone (bench --export-missing may build it)
    refit_optional: bool  # whether its engines take other weights is a build choice (--refittable / --frozen)
    quantizes: tuple[str, ...] = ()  # the quantized precisions (engines.QUANTIZED) it builds
    preload: Callable[..., tuple | None] | None = None  # (path, device, dtype, record) -> (key, make): the engine
    # a runner of the entry's own weights would load, made ahead (backends/preload.py); None: not made ahead

    name = property(lambda self: self.about.name)
    suffix = property(lambda self: self.about.suffix)
    other_suffixes = property(lambda self: self.about.other_suffixes)
    unavailable = property(lambda self: self.about.unavailable)
    details = property(lambda self: self.about.details)
    needs = property(lambda self: self.about.needs)
    build_command = property(lambda self: self.about.build_command)
    devices = property(lambda self: self.about.devices)


def export_module(name: str):
    """fastsd.export.<name>, the build-time tools (the top-level export/ folder, installed
    as fastsd.export). From a source tree that was not installed (PYTHONPATH=.), the folder
    beside fastsd/ is registered under that name first."""
    try:
        return importlib.import_module(f"fastsd.export.{name}")
    except ModuleNotFoundError as e:
        if e.name != "fastsd.export":
            raise
    source = Path(__file__).resolve().parents[2] / "export"
    spec = importlib.util.spec_from_file_location("fastsd.export", source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    if spec is None or not (source / "__init__.py").is_file():
        raise ModuleNotFoundError("fastsd.export is not installed and no export/ folder is beside fastsd/",
                                  name="fastsd.export")
    package = importlib.util.module_from_spec(spec)
    sys.modules["fastsd.export"] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"fastsd.export.{name}")
