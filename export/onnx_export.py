"""Export a checkpoint's four networks to ONNX into the engine store.

Each network is traced in fp32 with the TorchScript exporter (`dynamo=False`: one trace
of the eager module with the I/O names and dynamic axes of its `Spec`), checked with
onnx.checker and shape inference, simplified with onnxslim, converted to fp16 by ONNX
Runtime's converter for fp16 entries (a trace of the fp16 module on CPU mixes dtypes in
CLIP's LayerNorms and is not a valid graph), and written into a staging
folder that becomes the store entry only once every network and the manifest are done.
Graphs over 2 GB keep their weights in one external-data file beside the graph.
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


def export_network(module: torch.nn.Module, spec: NetworkSpec, args: tuple, path: Path, static: bool) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes=spec.dynamic_axes(static),
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def check_and_simplify(path: Path, simplify: bool, fp16: bool, spec: NetworkSpec) -> list[str]:
    """onnx.checker + shape inference, onnxslim, optional fp16 conversion, then one graph
    file (plus one external data file past 2 GB, where the exporter scatters a file per
    tensor). Returns the files."""
    import onnx

    onnx.checker.check_model(str(path), full_check=False)  # by path: works past 2 GB
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    exported = _graph_bytes(path)
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
        export_network(modules.pop(name).eval(), specs[name], args, path, profile.static)
        if name == "unet":  # most of the checkpoint's memory (SD-XL: 10 GB in fp32): released before the
            ckpt.unet = None  # graph is simplified, which holds a copy of every weight
            gc.collect()
        return check_and_simplify(path, simplify, dtype == "fp16", specs[name]), {}, ""

    return build_entry(root, info, "onnxruntime", dtype, profile, networks, make, dict(
        exporter=f"torch.onnx (TorchScript) {torch.__version__}", opset=OPSET, onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__, simplifier=_version("onnxslim") if simplify else None,
        clip_skip=clip_skip), progress, verb="exported")


def _version(module: str) -> str:
    return f"{module} {__import__(module).__version__}"
