"""Export a checkpoint's networks (four; SD-XL five) to ONNX into the engine store.

Each network is traced in fp32 with the TorchScript exporter (`dynamo=False`: one trace
of the eager module with the I/O names and dynamic axes of its `Spec`), checked with
onnx.checker and shape inference, simplified with onnxslim, converted to fp16 by ONNX
Runtime's converter for fp16 entries (a trace of the fp16 module on CPU mixes dtypes in
CLIP's LayerNorms and is not a valid graph), and written into a staging
folder that becomes the store entry only once every network and the manifest are done.
Graphs over 2 GB keep their weights in one external-data file beside the graph; networks
with over 1 GiB of weights (SD-XL's UNet and second text encoder) get them written there
tensor by tensor instead of through the exporter (see `export_network`).
"""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path
from typing import Callable

import torch

from fastsd.engines import Profile
from fastsd.errors import InvalidArgumentError
from fastsd.networks import FLOAT32, NetworkSpec

from .common import build_entry, load_for_build, parse_static

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is native from 17
TWO_GB = 2**31  # protobuf's limit on one serialized model
STREAM_BYTES = 2**30  # networks with more weights than this have them written tensor by tensor (stream_weights)
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


def export_network(module: torch.nn.Module, spec: NetworkSpec, args: tuple, path: Path, static: bool) -> bool:
    """Trace `module` into `path`. Returns whether its weights were streamed (a network over
    STREAM_BYTES of weights): the exporter then writes the graph without them, and
    `stream_weights` adds them tensor by tensor into one external-data file. The exporter's
    own way of writing weights holds about 1.4 extra copies of them at once (measured:
    a 2.5 GB module peaked at 6.4 GB), which for SD-XL's 10 GB fp32 UNet is over 24 GB."""
    big = weight_bytes(module) > STREAM_BYTES
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes=spec.dynamic_axes(static),
                          opset_version=OPSET, do_constant_folding=not big, export_params=not big, dynamo=False)
    if big:
        stream_weights(path, module)
    return big


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def stream_weights(path: Path, module: torch.nn.Module) -> None:
    """Turn the graph inputs named after `module`'s parameters and buffers (the exporter's
    export_params=False graph) into initializers in one external-data file beside the graph,
    one tensor in memory at a time. A weight only ever transposed (Linear as MatMul) is
    written transposed and its Transpose node dropped: the folding the exporter would have
    done, without a second copy of the model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # the graph alone: no weights in it
    graph = model.graph
    weights = dict(module.named_parameters()) | dict(module.named_buffers())
    inputs = [i.name for i in graph.input if i.name in weights]
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def only_transposed(name: str) -> bool:
        nodes = users.get(name, [])
        return bool(nodes) and weights[name].ndim == 2 and all(
            n.op_type == "Transpose" and [a.ints for a in n.attribute if a.name == "perm"] in ([[1, 0]], [])
            for n in nodes)

    data = path.name + ".data"
    dropped, offset = set(), 0
    with open(path.parent / data, "wb") as f:
        for name in inputs:
            tensor = weights[name].detach()
            if only_transposed(name):
                outs = [(n.output[0], tensor.t()) for n in users[name]]
                dropped.update(id(n) for n in users[name])
            else:
                outs = [(name, tensor)]
            for out_name, t in outs:
                array = t.contiguous().cpu().numpy()
                proto = onnx.TensorProto(name=out_name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                         dims=array.shape)
                proto.data_location = onnx.TensorProto.EXTERNAL
                pad = -offset % 4096  # page-aligned, so ONNX Runtime can map it
                f.write(b"\0" * pad)
                offset += pad
                raw = array.tobytes()
                f.write(raw)
                for k, v in (("location", data), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = proto.external_data.add()
                    entry.key, entry.value = k, v
                offset += len(raw)
                graph.initializer.append(proto)
                del raw, array
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    remaining = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(remaining)
    onnx.save(model, str(path))


def check_and_simplify(path: Path, simplify: bool, fp16: bool, spec: NetworkSpec, streamed: bool = False) -> list[str]:
    """onnx.checker + shape inference, onnxslim, optional fp16 conversion, then one graph
    file (plus one external data file past 2 GB, where the exporter scatters a file per
    tensor). A `streamed` fp32 graph is already one graph and one data file: checked only.
    Returns the files."""
    import onnx

    onnx.checker.check_model(str(path), full_check=False)  # by path: works past 2 GB
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    exported = _graph_bytes(path)
    if streamed and not fp16:  # already one graph + one data file; nothing here loads the weights
        log.info("%s: %.1f GB of weights, written tensor by tensor; onnxslim skipped (it holds the whole graph "
                 "in memory); ONNX Runtime folds and fuses at session load", path.stem, exported / 1e9)
        return [path.name, path.name + ".data"]
    if simplify:  # past 2 GB its symbolic shape inference cannot serialize the graph: skip that pass
        import onnxslim

        model = onnxslim.slim(str(path), no_shape_infer=exported > TWO_GB * 0.9)
    else:
        model = onnx.load(str(path))
    if fp16:  # ORT's converter keeps precision-critical ops in fp32 behind casts
        from onnxruntime.transformers.float16 import convert_float_to_float16

        keep = [t.name for t in spec.inputs if t.kind == FLOAT32]
        model = convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=True)
    topological_sort(model.graph)  # the fp16 converter appends its casts at the end
    big = sum(len(t.raw_data) for t in model.graph.initializer) > TWO_GB * 0.9
    _remove_graph(path)
    data = path.name + ".data"
    onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
              location=data if big else None)
    onnx.checker.check_model(str(path), full_check=False)
    return [path.name, data] if big else [path.name]


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


def _external_files(path: Path) -> set[Path]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {path.parent / kv.value for t in model.graph.initializer for kv in t.external_data if kv.key == "location"}


def _graph_bytes(path: Path) -> int:
    """Size of a graph with its external data (files it references, counted once)."""
    return path.stat().st_size + sum(f.stat().st_size for f in _external_files(path))


def _remove_graph(path: Path) -> None:
    """Delete a graph and any external-data files the exporter scattered beside it."""
    for f in _external_files(path):
        f.unlink(missing_ok=True)
    path.unlink()


def export_checkpoint(model: str, engine_dir: str | Path | None = None, dtype: str = "fp32",
                      static: str | None = None, networks: tuple[str, ...] | None = None, simplify: bool = True,
                      allow_pickle: bool = False, clip_skip: int = 0, vae: str | None = None,
                      progress: Callable[[str], None] = log.info) -> Path:
    """Export `model` to engine_dir/<fingerprint>/onnxruntime-<dtype>/; returns that folder."""
    import onnx
    import onnxruntime

    if dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown export dtype {dtype!r}; choose fp32 or fp16")
    ckpt, family, root, networks = load_for_build(model, networks, allow_pickle, clip_skip, engine_dir, vae)
    specs = family.specs
    info = ckpt.info
    profile = Profile.for_model(info, parse_static(static, info.vae_factor))
    modules = family.modules(ckpt, clip_skip)

    def make(name: str, folder: Path) -> tuple[list[str], dict, str]:
        path = folder / f"{name}.onnx"
        args = specs[name].sample_inputs(*_trace_dims(profile, name, info), torch.float32)
        streamed = export_network(modules.pop(name).eval(), specs[name], args, path, profile.static)
        if name == "unet":  # most of the checkpoint's memory (SD-XL: 10 GB in fp32): released before the
            ckpt.unet = None  # graph is simplified, which holds a copy of every weight
            gc.collect()
        return check_and_simplify(path, simplify, dtype == "fp16", specs[name], streamed), {}, ""

    return build_entry(root, info, "onnxruntime", dtype, profile, networks, make, dict(
        exporter=f"torch.onnx (TorchScript) {torch.__version__}", opset=OPSET, onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__, simplifier=_version("onnxslim") if simplify else None,
        clip_skip=clip_skip), progress, verb="exported")


def _version(module: str) -> str:
    return f"{module} {__import__(module).__version__}"
