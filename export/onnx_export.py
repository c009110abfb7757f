"""Export a checkpoint's networks (four; SD-XL five) to ONNX into the engine store.

Each network is traced in fp32 with the TorchScript exporter (`dynamo=False`: one trace
of the eager module with the I/O names and dynamic axes of its `Spec`) *without its
weights*: they are graph inputs named after the module's parameters while the graph is
checked with onnx.checker, simplified with onnxslim and, for fp16 entries, converted by
ONNX Runtime's converter (a trace of the fp16 module on CPU mixes dtypes in CLIP's
LayerNorms and is not a valid graph). Then each weight becomes an initializer under its
parameter's name, written tensor by tensor into one external-data file beside the graph
(`attach_weights`). Nothing is ever folded into a weight, so the graph takes another
checkpoint's weights, or LoRA-fused ones, name for name: a new checkpoint's entry is made
from an existing one by hard-linking its files, once `check_refit` found every weight of
the graph among the checkpoint's (`weights_at_load`: the runner gives the checkpoint's
weights as initializers at session creation, as it does a LoRA's), and `refit_graph`
writes a graph file with a checkpoint's weights where a builder compiles from the file. Everything is written into a
staging folder that becomes the store entry only once every network and the manifest are done.
"""

from __future__ import annotations

import gc
import logging
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastsd.backends.kind import WEIGHTS_BY_NAME
from fastsd.engines import CPU_GRAPH, MAX_CHUNKS, WEIGHTS_AT_LOAD, Profile, read_manifest, refit_source, shared_files
from fastsd.errors import InvalidArgumentError
from fastsd.networks import FLOAT32, NetworkSpec, weights_of
from fastsd.status import LONG_BYTES, file_bytes, say

from .common import (
    GIVEN_AT_LOAD,
    build_entries,
    build_facts,
    build_module,
    build_spec,
    check_chunks,
    donor_record,
    link_files,
    load_for_build,
    parse_static,
    weight_bytes,
)

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is native from 17
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _trace_dims(profile: Profile, name: str, info) -> tuple[int, int, int]:
    """Batch, height, width to trace `name` at. A dynamic UNet is traced at an odd latent
    size: diffusers' UNet then passes each up block the size of its skip tensor (as it
    does in eager for any size not a multiple of 2**upsamplers), so the graph derives the
    upsample sizes from the skips' shapes and serves every size, odd latents included."""
    height, width = profile.opt_size, profile.opt_width
    if name == "unet" and not profile.static:
        f = info.vae_factor
        height, width = (s + f if (s // f) % 2 == 0 else s for s in (height, width))
    return profile.opt_batch, height, width


def export_network(module: torch.nn.Module, spec: NetworkSpec, args: tuple, path: Path, static: bool,
                   simplify: bool = True, fp16: bool = False) -> tuple[list[str], dict]:
    """Trace `module` into `path` without its weights (they are graph inputs named after the
    module's parameters), simplify and convert that small graph, then give it its weights:
    one initializer per parameter, under the parameter's own name, all in one external-data
    file beside the graph (see `attach_weights`). Because the weights are never constants
    while the graph is transformed, nothing is folded into them: another checkpoint's (or
    LoRA-fused) weights replace them name for name, which is what refit relies on. Returns
    the files and the network's manifest facts (the weights' naming and which are stored
    transposed)."""
    import onnx

    large = sum(p.numel() * p.element_size() for p in module.parameters()) >= LONG_BYTES
    step = say if large else log.debug  # a full-size UNet's steps take minutes each: each says so
    step("%s: tracing it into an ONNX graph", spec.name)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes=spec.dynamic_axes(static),
                          opset_version=OPSET, do_constant_folding=False, export_params=False, dynamo=False,
                          keep_initializers_as_inputs=True)  # True: weights of equal values are not merged
    model = onnx.load(str(path))  # the graph alone: small whatever the network's size
    onnx.checker.check_model(model)
    if simplify:
        import onnxslim

        step("%s: simplifying the graph (onnxslim)", spec.name)
        model = onnxslim.slim(model)
    if fp16:  # ORT's converter keeps precision-critical ops in fp32 behind casts; weights become fp16 inputs
        from onnxruntime.transformers.float16 import convert_float_to_float16

        keep = [t.name for t in spec.inputs if t.kind == FLOAT32]
        model = convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=True)
        topological_sort(model.graph)  # the converter appends its casts at the end
    step("%s: writing the graph and its weights", spec.name)
    transposed = attach_weights(model, module, path)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=False)  # by path: works past 2 GB
    return [path.name, path.name + ".data"], {"weights_layout": WEIGHTS_BY_NAME, "transposed": sorted(transposed)}


def attach_weights(model, module: torch.nn.Module, path: Path) -> set[str]:
    """Turn the graph inputs named after `module`'s parameters and buffers into initializers
    in one external-data file beside the graph (each in the dtype its input was given: fp16
    after the fp16 conversion), written one tensor at a time: the exporter's own writer
    holds about 1.4 extra copies of the weights at once (measured: a 2.5 GB module peaked
    at 6.4 GB), which for SD-XL's 10 GB fp32 UNet is over 24 GB. A weight only ever
    transposed (Linear as MatMul) is written transposed under its own name and its Transpose
    node dropped: the folding the exporter would have done. Returns those names."""
    weights = weights_of(module)
    graph = model.graph
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def only_transposed(name: str) -> bool:
        nodes = users.get(name, [])
        return bool(nodes) and weights[name].ndim == 2 and all(
            n.op_type == "Transpose" and [a.ints for a in n.attribute if a.name == "perm"] in ([[1, 0]], [])
            for n in nodes)

    types = {i.name: i.type.tensor_type.elem_type for i in graph.input if i.name in weights}
    transposed: set[str] = set()
    dropped: set[int] = set()
    with WeightWriter(path) as writer:
        for name, elem_type in types.items():
            tensor = weights[name].detach()
            if only_transposed(name):
                tensor = tensor.t()
                transposed.add(name)
                for n in users[name]:  # the Transpose's users read the stored (transposed) weight
                    dropped.add(id(n))
                    for user in users.get(n.output[0], []):
                        user.input[:] = [name if x == n.output[0] else x for x in user.input]
            graph.initializer.append(writer.write(name, tensor, elem_type))
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    remaining = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(remaining)
    return transposed


class WeightWriter:
    """Writes tensors one after another into `<graph>.data`, each at a page-aligned offset
    (ONNX Runtime maps them), and makes the initializer that points at each."""

    def __init__(self, graph_path: Path):
        self.location = graph_path.name + ".data"
        self.path = graph_path.parent / self.location
        self.offset = 0

    def __enter__(self) -> "WeightWriter":
        self.file = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def append(self, raw: bytes) -> int:
        """Write `raw` at the next page-aligned offset; returns that offset."""
        pad = -self.offset % 4096
        self.file.write(b"\0" * pad)
        offset = self.offset = self.offset + pad
        self.file.write(raw)
        self.offset += len(raw)
        return offset

    def write(self, name: str, tensor: torch.Tensor, elem_type: int):
        import onnx

        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        array = tensor.detach().to("cpu").contiguous().numpy().astype(dtype, copy=False)
        proto = onnx.TensorProto(name=name, data_type=elem_type, dims=array.shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        raw = array.tobytes()
        offset = self.append(raw)
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = proto.external_data.add()
            entry.key, entry.value = k, v
        return proto


def write_cpu_graph(graph: Path) -> tuple[list[str], dict]:
    """The exported `graph` as ONNX Runtime optimises it for this CPU (ORT_ENABLE_ALL: fused
    ops, convolution weights reordered into the CPU's NCHWc blocks), saved beside it as
    `<network>.cpu.onnx`, which loads with no optimisation left to do (SD 1.5's UNet: 0.7 s
    instead of 6 s, same outputs bit for bit). Only the weights the optimiser changed are
    written (`<network>.cpu.onnx.data`: the UNet's convolutions, 2.2 of its 3.4 GB); the others
    point into the exported graph's own data file. Returns its files and the record's fact
    (the machine it was made for: `cpu_signature`)."""
    import hashlib
    import tempfile

    import onnx
    import onnxruntime as ort

    from fastsd.backends.onnxruntime import CPU, cpu_signature, new_session

    out = graph.with_name(graph.stem + ".cpu.onnx")
    step = say if file_bytes([graph.with_name(graph.name + ".data")]) >= LONG_BYTES else log.debug
    step("%s: optimising the graph for this CPU (ONNX Runtime; loads then take a fraction of the time)", graph.stem)
    with tempfile.TemporaryDirectory(dir=graph.parent, prefix=".cpu-") as scratch:
        made = Path(scratch) / out.name
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(made)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", made.name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(str(made), load_external_data=False)

        def key(raw: bytes) -> bytes:
            return hashlib.blake2b(raw, digest_size=16).digest()

        exported = {key(_read(graph.parent, where)): where for _, where in _external(onnx.load(
            str(graph), load_external_data=False))}
        with WeightWriter(out) as writer:
            for init, where in _external(model):
                raw = _read(made.parent, where)
                same = exported.get(key(raw))
                if same is None:
                    same = {"location": writer.location, "offset": str(writer.append(raw)), "length": str(len(raw))}
                for entry in init.external_data:
                    entry.value = same.get(entry.key, entry.value)
        onnx.save(model, str(out))
    new_session(out, 0, [CPU], optimised=True)  # it loads as the runner loads it (nothing left to optimise)
    return [out.name, out.name + ".data"], {CPU_GRAPH: {"file": out.name, "for": cpu_signature()}}


def _external(model):
    """(initializer, {location, offset, length}) of each initializer held in an external file."""
    for init in model.graph.initializer:
        if init.external_data:
            yield init, {e.key: e.value for e in init.external_data}


def _read(folder: Path, where: dict) -> bytes:
    with open(folder / where["location"], "rb") as f:
        f.seek(int(where.get("offset", 0)))
        return f.read(int(where["length"]))


def topological_sort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (Kahn)."""
    produced_by = {out: i for i, n in enumerate(graph.node) for out in n.output}
    deps = [{produced_by[x] for x in n.input if x in produced_by} for n in graph.node]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    ready = [i for i, d in enumerate(deps) if not d]
    order = []
    while ready:
        i = ready.pop()
        order.append(i)
        for u in users.get(i, []):
            deps[u].discard(i)
            if not deps[u]:
                ready.append(u)
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _refit_weights(model, data: str, weights: dict[str, torch.Tensor], transposed: set[str]):
    """(initializer, its data offset, this checkpoint's tensor for it as the graph lays it out,
    the graph's numpy dtype) for every weight of the graph `model` (external data in the file
    `data`). Raises RefitError where a weight is missing or differs in shape."""
    import onnx

    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue  # a constant of the graph (not a weight): in the graph file
        where = {e.key: e.value for e in init.external_data}
        tensor = weights.get(init.name)
        if where.get("location") != data or tensor is None:
            raise RefitError(f"{init.name} is not a weight of this checkpoint")
        tensor = tensor.detach().t() if init.name in transposed else tensor.detach()
        if tuple(tensor.shape) != tuple(init.dims):
            raise RefitError(f"{init.name} is {tuple(tensor.shape)} here, {tuple(init.dims)} in the graph")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        if tensor.numel() * np.dtype(dtype).itemsize != int(where["length"]):
            raise RefitError(f"{init.name} has {tensor.numel()} values, the graph's has {where['length']} bytes")
        yield init, int(where["offset"]), tensor, dtype


def check_refit(src: Path, weights: dict[str, torch.Tensor], transposed: set[str]) -> None:
    """Whether the graph `src` takes `weights` (every weight of it, by name and shape): the
    check of a refit that shares the donor's files and gives the weights at load. Reads the
    graph file alone. Raises RefitError."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    for _ in _refit_weights(model, src.name + ".data", weights, transposed):
        pass


def refit_graph(src: Path, dst: Path, weights: dict[str, torch.Tensor], transposed: set[str]) -> None:
    """Write `dst` (graph) and its data file from the graph `src` of another checkpoint of
    the same architecture, with `weights` instead of its own: the graph is copied as it is
    and every external initializer gets the new weight of its name at the same offset, so
    the copy is exactly the graph an export of this checkpoint would give, without tracing.
    (What TensorRT and int8 builds compile from an entry whose weights are given at load.)
    Raises RefitError where a weight is missing or differs in shape."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    with open(dst.parent / (dst.name + ".data"), "wb") as f:
        for _, offset, tensor, dtype in _refit_weights(model, src.name + ".data", weights, transposed):
            f.seek(offset)
            f.write(np.ascontiguousarray(tensor.contiguous().numpy().astype(dtype, copy=False)).data)  # no bytes copy
    shutil.copyfile(src, dst)


class RefitError(Exception):
    """A donor graph that cannot take this checkpoint's weights (the network is exported instead)."""


def export_checkpoint(model: str, engine_dir: str | Path | None = None, dtype: str = "fp32",
                      static: str | None = None, networks: tuple[str, ...] | None = None, simplify: bool = True,
                      allow_pickle: bool = False, clip_skip: int = 0, vae: str | None = None, refit: bool = True,
                      progress: Callable[[str], None] = log.info, controlnets: tuple = (),
                      max_chunks: int | None = None, cpu_graph: bool = True, ip_adapters: tuple = ()) -> Path:
    """Export `model` to engine_dir/<fingerprint>/onnxruntime-<dtype>/; returns that folder.
    With `cpu_graph` (fp32), each network's graph as ONNX Runtime optimises it for this CPU
    is kept beside it (`write_cpu_graph`): its sessions load in a fraction of the time.
    With `controlnets`, its UNet takes their residuals and each ControlNet is exported into
    an entry of its own (engine_dir/<its fingerprint>/onnxruntime-<dtype>/). With `refit`,
    where the store holds an intact entry of another checkpoint (or ControlNet) of the same
    architecture (same precision, profile and clip_skip), its graphs are shared (hard-linked)
    and this checkpoint's weights given when they load: nothing traced or written (seconds)."""
    import onnx
    import onnxruntime

    if dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown export dtype {dtype!r}; choose fp32 or fp16")
    ckpt, family, root, networks = load_for_build(model, networks, allow_pickle, clip_skip, engine_dir, vae,
                                                  controlnets, ip_adapters)
    info = ckpt.info
    profile = Profile.for_model(info, parse_static(static, info.vae_factor),
                                max_chunks=check_chunks(max_chunks or MAX_CHUNKS))
    modules = family.modules(ckpt, clip_skip)

    def make_for(owner, facts: dict):
        runtime = {k: facts[k] for k in ("clip_skip",) if k in facts}
        donor = refit_source(root, owner, "onnxruntime", dtype, runtime, profile) if refit else None
        donor_manifest = read_manifest(donor) if donor is not None else None

        def make(name: str, folder: Path) -> tuple[list[str], dict, str]:
            spec = build_spec(family, name)
            path = folder / f"{spec.name}.onnx"
            module = build_module(modules.pop(name), spec).eval()
            inputs = build_facts(family, name, spec)  # the UNet's may include ControlNet and IP-Adapter inputs
            record = donor_record(donor_manifest, family, name, WEIGHTS_BY_NAME)
            if record is not None:
                try:
                    check_refit(donor / path.name, weights_of(module), set(record["transposed"]))
                    files = shared_files(record)
                    link_files(donor, folder, files)
                    facts = {"weights_layout": WEIGHTS_BY_NAME, "transposed": record["transposed"],
                             "refitted_from": donor_manifest["checkpoint"], WEIGHTS_AT_LOAD: True, **inputs}
                    return files, facts, GIVEN_AT_LOAD
                except RefitError as e:
                    log.warning("%s: cannot refit from %s (%s); exporting it", name, donor, e)
            args = spec.sample_inputs(*_trace_dims(profile, name, info), torch.float32)
            files, facts = export_network(module, spec, args, path, profile.static, simplify, dtype == "fp16")
            del module
            if cpu_graph and dtype == "fp32":  # fp16 graphs are for GPUs
                more, made = write_cpu_graph(path)
                files, facts = files + more, {**facts, **made}
            if name == "unet":  # most of the checkpoint's memory (SD-XL: 10 GB in fp32), released once written
                ckpt.unet = None
                gc.collect()
            return files, {**facts, **inputs}, ""

        return make

    return build_entries(root, info, family, "onnxruntime", dtype, profile, networks, make_for, dict(
        exporter=f"torch.onnx (TorchScript) {torch.__version__}", opset=OPSET, onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__, simplifier=_version("onnxslim") if simplify else None,
        clip_skip=clip_skip, refittable=True, weights=info.fingerprint), progress, verb="exported",
        need=weight_bytes(modules, networks, dtype))


def _version(module: str) -> str:
    return f"{module} {__import__(module).__version__}"
