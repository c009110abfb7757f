"""OpenVINO runner for one network, on the CPU: the entry's ONNX graph compiled by OpenVINO.

An `openvino-<precision>` entry holds each network's ONNX graph, linked from the ONNX
entry it was built from (no second export) and hashed in its manifest like every engine
file; OpenVINO compiles it when the engine loads. No compiled blob is kept: on the CPUs
fastsd was measured on, importing OpenVINO's exported model was no faster than compiling
the graph (SD 1.5 UNet: 3.2-4.0 s vs 1.9-3.8 s) and it took as much disk again as the weights.
Precision is OpenVINO's inference precision: fp32 entries pin it to f32 (parity with eager
fp32); bf16 entries run the CPU's bf16 instructions (AVX512_BF16, AMX) where it has them,
and f32, with a warning, where it does not. Refit (LoRA, another checkpoint's weights)
compiles the graph again with its weight constants, named as the network's parameters,
replaced; an entry refitted by reference (`weights_at_load`: its files are the donor's)
compiles with the checkpoint's weights given at load, sharing their memory. Inputs and
outputs are float32 numpy views of CPU torch tensors.

An `openvino-int8` entry holds the UNet quantized at build (OpenVINO IR, `unet.xml`: int8
weights and activations, calibrated on the checkpoint's own denoising; export/openvino.py)
and the other networks as a bf16 entry does; it runs at bf16 around the int8 layers. A
quantized network takes no other weights: its LoRA calls run eager, with the usual warning.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from .. import catalog
from ..engines import precision_of
from ..status import LONG_BYTES, file_bytes, say
from . import preload
from .kind import (
    WEIGHTS_BY_NAME,
    BuildOptions,
    EngineKind,
    EngineRunner,
    RefitUnsupported,
    export_module,
    graph_array,
    missing_weights,
    onnx_weights,
)

log = logging.getLogger(__name__)

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}  # entry precision -> INFERENCE_PRECISION_HINT
_warned: set[str] = set()


unavailable = catalog.OPENVINO.unavailable
core = catalog.openvino_core  # the process's one OpenVINO Core
cpu_facts = catalog.openvino_cpu  # the OpenVINO version, the CPU and what it runs natively


def has_bf16() -> bool:
    """Whether OpenVINO runs bf16 natively on this CPU."""
    return "BF16" in cpu_facts()["cpu_caps"]


def compile_config(precision: str, threads: int = 0) -> dict:
    """OpenVINO's CPU settings for a network of the entry's `precision`: one latency stream on
    torch's threads (so torch.set_num_threads limits both), the inference precision pinned,
    and no dynamic quantisation of activations (it applies to int8/int4-compressed weights,
    which fastsd's graphs do not have; pinned off so no OpenVINO default changes the result)."""
    hint = PRECISION_HINTS[precision]
    if hint == "bf16" and not has_bf16():
        if "bf16" not in _warned:
            _warned.add("bf16")
            log.warning("this CPU has no bf16 instructions (OpenVINO reports %s): OpenVINO runs the bf16 entry "
                        "in fp32", ", ".join(cpu_facts()["cpu_caps"]))
        hint = "f32"
    return {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads or torch.get_num_threads()),
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def weight_constants(model) -> dict:
    """The model's constants by name (OpenVINO names an ONNX initializer's Constant after it)."""
    return {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}


def with_weights(model, weights: dict[str, torch.Tensor], transposed: set[str], keep: list | None = None) -> int:
    """Replace the model's weight constants of those names by the given values (in the
    constant's dtype and shape; `transposed`: stored transposed in the graph). Names the graph
    does not hold are skipped. With `keep` (a list the caller holds as long as the model), the
    constants share the arrays, which go into it, instead of copying them. Returns how many
    were replaced."""
    from openvino import opset13 as ops

    constants, replaced = weight_constants(model), 0
    for name, tensor in weights.items():
        old = constants.get(name)
        if old is None:
            continue
        have = old.get_data()
        array = graph_array(name, tensor, name in transposed, have.dtype, have.shape)
        if keep is not None:
            keep.append(array)
        new = ops.constant(array, shared_memory=keep is not None)
        new.set_friendly_name(name)
        for target in list(old.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
        replaced += 1
    return replaced


def compile_model(model, config: dict):
    """Compiled for the CPU. Not under the core's lock: OpenVINO compiles models on one Core from
    several threads (its maintainers call compile_model thread-safe), so a network the preload
    thread compiles does not hold up another the pipeline compiles meanwhile."""
    return core().compile_model(model, "CPU", config)


def read_graph(path: Path):
    """The graph as an OpenVINO model, about to be compiled (a line where that takes seconds)."""
    if file_bytes([path, f"{path}.data"]) >= LONG_BYTES:
        say("OpenVINO is compiling %s", path.name)
    return core().read_model(str(path))


def compiled_key(path: Path, config: dict) -> tuple:
    """What a compiled model of a graph's own weights is made of (`preload.take`'s key)."""
    return "openvino", str(path), tuple(sorted(config.items()))


def _preload(path: Path, device: torch.device, dtype: torch.dtype, record: dict) -> tuple | None:
    """(key, make) of the compiled model a runner of this network would make (`preload`)."""
    if device.type != "cpu":
        return None
    config = compile_config(precision_of(dtype))
    return compiled_key(path, config), lambda: compile_model(read_graph(path), config)


class OvRunner(EngineRunner):
    """One compiled model and its infer request, one call at a time (a lock)."""

    name = "openvino"

    def __init__(self, path: Path, spec, device: torch.device, profile, precision: str = "fp32",
                 record: dict | None = None, threads: int = 0, weights: dict[str, torch.Tensor] | None = None):
        if device.type != "cpu":
            raise RuntimeError(f"OpenVINO engines run on the CPU, not {device}")
        super().__init__(spec, profile)
        record = record or {}
        self.path, self.precision = path, precision
        self.config = compile_config(precision, threads)
        self.by_name = record.get("weights_layout") == WEIGHTS_BY_NAME
        self.quantized = record.get("quantized")  # "int8": quantized at build (calibrated to its weights)
        self.transposed = set(record.get("transposed", ()))
        self.lock = threading.Lock()
        self._overrides: dict[str, torch.Tensor] = {}  # weights given since the entry's own: compiled in
        # `weights`: the checkpoint's own, for an entry whose files hold a refit donor's: every
        # weight of the graph, compiled in whenever the engine runs its own weights
        self._given = None if weights is None else self._checked(weights)
        self.compiled, self._kept = self._base()  # _kept: the arrays the compiled model's constants share
        self.request = self.compiled.create_infer_request()
        self.in_types = {i.get_any_name(): i.get_element_type().to_dtype() for i in self.compiled.inputs}

    def _checked(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.quantized or not self.by_name:
            raise RuntimeError("its weights cannot be given at load (a quantized or unnamed-weights graph)")
        graph = onnx_weights(self.path)
        missing_weights(graph, weights)
        return {n: weights[n].detach() for n in graph}

    def _base(self) -> tuple:
        """The entry's graph with its own weights (the file's, or those given at load), compiled;
        and the arrays its constants share (kept while it lives)."""
        return self._with({})

    def _with(self, overrides: dict) -> tuple:
        if self._given is None and not overrides:  # the file's own weights: maybe compiled ahead
            compiled = preload.take(compiled_key(self.path, self.config))
            if compiled is not None:
                return compiled, []
        model, kept = read_graph(self.path), []
        if self._given is not None or overrides:
            with_weights(model, {**(self._given or {}), **overrides}, self.transposed, kept)
        return compile_model(model, self.config), kept

    def set_weights(self, weights: dict[str, torch.Tensor], at_base: bool) -> None:
        """Compile the graph again with the weights given so far since the last `at_base` (each
        call passes those it changed; the others are the graph's); at base, the entry's own
        compiled model again. A failure keeps the old model and its weights."""
        if self.quantized:
            raise RefitUnsupported(f"it was quantized to {self.quantized} for the weights it was built with; "
                                   "build the int8 entry again for other weights")
        if not self.by_name:
            raise RefitUnsupported("its graph was exported with weights not named as the network's parameters "
                                   "(by an older fastsd); re-export it to refit it")
        overrides = {} if at_base else {**self._overrides, **{n: t.detach().clone() for n, t in weights.items()}}
        compiled, kept = self._with(overrides)
        with self.lock:
            self._overrides, self.compiled, self._kept = overrides, compiled, kept
            self.request = compiled.create_infer_request()

    def feeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The compiled model's inputs for a call's (optional ones left out filled with zeros)."""
        inputs = self.complete(inputs, lambda t: torch.float32)
        return {n: np.ascontiguousarray(inputs[n].detach().to("cpu", torch.float32).numpy(), dtype=dtype)
                for n, dtype in self.in_types.items()}

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        feeds = self.feeds(inputs)
        with self.lock:
            result = self.request.infer(feeds, share_inputs=True)
            outs = tuple(torch.from_numpy(np.array(result[self.compiled.output(n)], dtype=np.float32, copy=True))
                         for n in self.spec.output_names)
        return outs if len(outs) > 1 else outs[0]  # several outputs: a tuple in the spec's order


def _load(path: Path, spec, device: torch.device, dtype: torch.dtype, profile, record: dict | None = None,
          weights: dict | None = None):
    return OvRunner(path, spec, device, profile, precision_of(dtype), record, weights=weights)


def _build(opts: BuildOptions) -> Path:
    """fp32 and bf16 entries compile the ONNX graphs; int8 ones quantize the UNet (export/openvino.py)."""
    if opts.device not in (None, "cpu"):
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(f"OpenVINO engines run on the CPU, not {opts.device}")
    return export_module("openvino").build_openvino(
        opts.model, engine_dir=opts.engine_dir, dtype=opts.dtype or "fp32", static=opts.static,
        networks=opts.networks, allow_pickle=opts.allow_pickle, clip_skip=opts.clip_skip, vae=opts.vae,
        refit=opts.refit, progress=opts.progress, controlnets=opts.controlnets, ip_adapters=opts.ip_adapters,
        max_chunks=opts.max_chunks)


KIND = EngineKind(catalog.OPENVINO, lambda device: {}, _load, _build, builds_alone=True, refit_optional=False,
                  quantizes=("int8",), preload=_preload)
