"""Build TensorRT engines from the exported ONNX graphs, or refit existing ones.

Written against the TensorRT 10 Python API (tensor names, optimization profiles, timing
cache, REFIT). NOT VERIFIED: TensorRT cannot be installed where fastsd is developed;
tests of this module skip without `tensorrt`, while the parts shared with other backends
(profiles -> min/opt/max shapes, the store, refit bookkeeping) are tested everywhere.

Build: engine_dir/<fp>/onnxruntime-fp32/*.onnx (made by `fastsd export`) -> one .plan per
network in engine_dir/<fp>/tensorrt-fp16/, fp16, one optimization profile (dynamic or
static), refittable, with a timing cache shared across builds in engine_dir/.trt-timing.cache.
Refit: for a new checkpoint of the same architecture, copy the plans of an existing entry
and refit them from the new checkpoint's ONNX graphs: seconds instead of minutes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from fastsd.backends.tensorrt import runtime_facts
from fastsd.engines import (
    Profile,
    Staging,
    base_manifest,
    check_entry,
    entry_dir,
    graph_file,
    read_manifest,
    refit_source,
    trt_shapes,
)
from fastsd.errors import FastSDError
from fastsd.networks import NETWORKS

log = logging.getLogger(__name__)

PRECISION = "fp16"
ONNX_SOURCE = "onnxruntime-fp32"  # the graphs TensorRT parses (it applies fp16 itself)
WORKSPACE = 8 << 30
TIMING_CACHE = ".trt-timing.cache"


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise FastSDError("TensorRT engines need the tensorrt package (pip install tensorrt)") from None
    return trt


def _onnx_entry(engine_dir: Path, info) -> tuple[Path, dict]:
    src = entry_dir(engine_dir, info.fingerprint, "onnxruntime", "fp32")
    manifest, problems = check_entry(src, info.fingerprint)
    if problems.keys() & set(NETWORKS) == set(NETWORKS) or not manifest:
        raise FastSDError(f"no fp32 ONNX graphs for this checkpoint in {src.parent}: run `fastsd export` first")
    return src, manifest


def build_engine(trt, onnx_path: Path, shapes: dict, cache_file: Path, logger) -> bytes:
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FastSDError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.REFIT)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise FastSDError(f"TensorRT failed to build an engine from {onnx_path.name}")
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def refit_engine(trt, plan: bytes, onnx_path: Path, logger) -> bytes:
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise FastSDError(f"TensorRT could not refit the engine from {onnx_path.name}")
    return bytes(engine.serialize())


def build_tensorrt(model: str, engine_dir: str | Path | None = None, static: str | None = None,
                   networks: tuple[str, ...] = NETWORKS, allow_pickle: bool = False,
                   progress: Callable[[str], None] = log.info) -> Path:
    """Refit the engines of a same-architecture entry if one exists, else build them."""
    from .onnx_export import load_for_build, parse_static

    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    ckpt, root = load_for_build(model, networks, allow_pickle, 0, engine_dir)
    info = ckpt.info
    src, onnx_manifest = _onnx_entry(root, info)
    donor = None if static else refit_source(root, info, "tensorrt", PRECISION)
    profile = Profile(**read_manifest(donor)["profile"]) if donor else Profile.for_model(
        info, parse_static(static, info.vae_factor))
    with Staging(entry_dir(root, info.fingerprint, "tensorrt", PRECISION)) as stage:
        for name in networks:
            graph = src / graph_file(name, onnx_manifest["networks"][name])
            t0 = time.perf_counter()
            if donor is not None:
                plan = refit_engine(trt, (donor / f"{name}.plan").read_bytes(), graph, logger)
            else:
                plan = build_engine(trt, graph, trt_shapes(name, info, profile), root / TIMING_CACHE, logger)
            (stage.dir / f"{name}.plan").write_bytes(plan)
            seconds = time.perf_counter() - t0
            stage.add(name, [f"{name}.plan"], export_seconds=round(seconds, 2), bytes=len(plan))
            progress(f"{name}: {'refitted' if donor else 'built'} in {seconds:.1f}s, {len(plan) / 2**20:.1f} MiB")
        facts = runtime_facts()
        donor_fp = read_manifest(donor)["checkpoint"] if donor else None
        return stage.commit(base_manifest(info, "tensorrt", PRECISION, profile, refittable=True,
                                          weights=info.fingerprint, refitted_from=donor_fp,
                                          clip_skip=onnx_manifest.get("clip_skip", 0), **facts))

