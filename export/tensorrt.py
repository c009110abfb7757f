"""Build TensorRT engines from the exported ONNX graphs, or refit existing ones.

Written against the TensorRT 10/11 Python API (strongly typed networks, tensor names,
optimization profiles, timing cache, refit). NOT VERIFIED: TensorRT cannot be installed
where fastsd is developed; tests of this module's TensorRT calls skip without `tensorrt`,
while the decisions (build mode by version, profile shapes, donor choice, timing-cache
handling, the engine-vs-eager check) are tested everywhere against stand-ins.

Build: engine_dir/<fp>/onnxruntime-fp16/*.onnx (`fastsd export --dtype fp16`) -> one
.plan per network in engine_dir/<fp>/tensorrt-fp16/, as a strongly typed network (the
ONNX graph's types are the engine's: TensorRT 11 has no FP16 builder flag and treats every
network as strongly typed; 10.12 deprecated the flag). A TensorRT without strongly typed
networks builds from the fp32 graphs with the FP16 flag instead. The optimization profile
is the ONNX entry's (its manifest), so the engines serve exactly the shapes the graphs
were exported for. Engines are refittable only when asked (`--refittable`): TensorRT
documents refittable engines as possibly slower. Every built engine runs on its sample
inputs against the eager network before the entry is committed. A timing cache shared
across builds lives in engine_dir/.trt-timing.cache (written atomically).
Refit: for a new checkpoint of the same architecture, an intact refittable entry built by
the same TensorRT on the same GPU donates its plans, refitted from the new ONNX graphs.
"""

from __future__ import annotations

import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from fastsd.backends.kind import WEIGHTS_BY_NAME
from fastsd.backends.tensorrt import deserialize, runtime_facts
from fastsd.engines import Profile, graph_file, read_manifest, refit_source, weights_at_load
from fastsd.errors import FastSDError
from fastsd.files import atomic_write
from fastsd.networks import weights_of

from .common import (
    IP_FACTS,
    build_entry,
    build_module,
    check_engine,
    entry_groups,
    entry_profile,
    load_for_build,
    onnx_entry,
    parse_static,
    source_spec,
    weight_bytes,
)
from .onnx_export import refit_graph

log = logging.getLogger(__name__)

PRECISION = "fp16"
WORKSPACE = 8 << 30
TIMING_CACHE = ".trt-timing.cache"
ENGINE_TOLERANCE = 2e-2  # max |engine - eager fp32| / max |eager fp32| on the sample inputs (fp16 engines)


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise FastSDError("TensorRT engines need the tensorrt package (pip install tensorrt)") from None
    return trt


def build_mode(trt) -> tuple[str, str]:
    """(how, ONNX source precision): "strongly_typed" from the fp16 graphs where this
    TensorRT has strongly typed networks (10.x, 11), else "fp16_flag" from the fp32 graphs
    with BuilderFlag.FP16 (TensorRT before strong typing)."""
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return "strongly_typed", "fp16"
    if hasattr(trt.BuilderFlag, "FP16"):
        return "fp16_flag", "fp32"
    raise FastSDError(f"TensorRT {getattr(trt, '__version__', '?')} has neither strongly typed networks nor "
                      "an FP16 builder flag")


def load_timing_cache(config, cache_file: Path):
    """The shared timing cache, or a fresh one where the file does not match this TensorRT/GPU."""
    data = cache_file.read_bytes() if cache_file.is_file() else b""
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    log.warning("%s does not match this TensorRT or GPU; building with a fresh timing cache", cache_file)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise FastSDError("TensorRT refused an empty timing cache")
    return cache


def save_timing_cache(config, cache_file: Path) -> None:
    """Atomically: a build interrupted mid-write never leaves a truncated cache behind."""
    atomic_write(cache_file, bytes(config.get_timing_cache().serialize()))


def build_engine(trt, onnx_path: Path, shapes: dict, cache_file: Path, logger, refittable: bool) -> bytes:
    mode, _ = build_mode(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode == "strongly_typed" else 0
    network = builder.create_network(flags)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FastSDError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if mode == "fp16_flag":
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE)
    load_timing_cache(config, cache_file)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise FastSDError(f"TensorRT failed to build an engine from {onnx_path.name}")
    save_timing_cache(config, cache_file)
    return bytes(plan)


def refit_engine(trt, plan: bytes, onnx_path: Path, logger) -> bytes:
    engine = deserialize(trt, logger, plan, f"the donor plan for {onnx_path.stem}")
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise FastSDError(f"TensorRT could not refit the engine from {onnx_path.name}")
    return bytes(engine.serialize())


def _make_plan(trt, logger, family, modules: dict, device, root: Path, src: Path, onnx_manifest: dict,
               stored: dict, profile: Profile, donor: Path | None, donor_manifest: dict | None, refitting: bool,
               name: str, folder: Path) -> tuple[list[str], dict, str]:
    """One network's plan (refitted from the donor's, else built from the ONNX entry `src`),
    checked against the eager network on its sample inputs."""
    from fastsd.backends.tensorrt import TrtRunner

    record = onnx_manifest["networks"][stored[name]]
    spec = source_spec(family, name, record)
    graph = src / graph_file(spec.name, record)
    with tempfile.TemporaryDirectory(prefix=".fastsd-graph-", dir=root) as scratch:
        if weights_at_load(record):  # the ONNX entry's files hold a refit donor's weights: write this checkpoint's
            graph = Path(scratch) / graph.name
            refit_graph(src / graph.name, graph, weights_of(modules[name]), set(record.get("transposed", ())))
        if donor is not None:
            plan = refit_engine(trt, (donor / f"{spec.name}.plan").read_bytes(), graph, logger)
        else:
            plan = build_engine(trt, graph, spec.profile_shapes(profile), root / TIMING_CACHE, logger, refitting)
    path = folder / f"{spec.name}.plan"
    path.write_bytes(plan)
    batch = 2 if spec.cfg_doubled else 1
    inputs = tuple(t.to(device) for t in spec.sample_inputs(batch, profile.opt_size, profile.opt_width,
                                                            torch.float32))
    runner = TrtRunner(path, spec, device, profile, cuda_graphs=False)
    err = check_engine(f"TensorRT {name}", lambda *args: runner(**dict(zip(spec.input_names, args, strict=True))),
                       build_module(modules[name], spec).to(device, torch.float32).eval(), inputs,
                       ENGINE_TOLERANCE)
    modules[name].to("cpu")
    extra = {"relative_error": round(err, 6), "inputs": list(spec.input_names),
             **{k: record[k] for k in IP_FACTS if k in record}}
    if refitting and record.get("weights_layout") == WEIGHTS_BY_NAME:  # LoRA refits by these names
        extra.update(weights_layout=WEIGHTS_BY_NAME, transposed=record.get("transposed", []))
    if donor is not None:
        extra["refitted_from"] = donor_manifest["checkpoint"]
    return [path.name], extra, f", relative error vs eager {err:.2e}"


def build_tensorrt(model: str, engine_dir: str | Path | None = None, static: str | None = None,
                   networks: tuple[str, ...] | None = None, allow_pickle: bool = False,
                   refittable: bool | None = None, vae: str | None = None, refit: bool = True,
                   progress: Callable[[str], None] = log.info, controlnets: tuple = (),
                   max_chunks: int | None = None, ip_adapters: tuple = ()) -> Path:
    """Refit the engines of a same-architecture entry if one exists, else build them. With
    `controlnets`, each ControlNet's engine goes into its own entry (from its ONNX entry), and
    the UNet is built from its graph with the ControlNet residual inputs. The profile, the
    longest text (`max_chunks`) included, is the ONNX entry's."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    mode, source = build_mode(trt)
    ckpt, family, root, networks = load_for_build(model, networks, allow_pickle, 0, engine_dir, vae, controlnets,
                                                  ip_adapters)
    info = ckpt.info
    size = parse_static(static, info.vae_factor)
    device = torch.device("cuda", torch.cuda.current_device())
    facts = runtime_facts(device)
    modules: dict = {}
    built = []
    for owner, nets, _ in entry_groups(info, family, networks, {}):
        stored = {n: family.specs[n].name for n in nets}
        is_controlnet = owner is not info
        src, onnx_manifest = onnx_entry(root, info, source, tuple(stored.values()), size,
                                        owner if is_controlnet else None)
        profile = entry_profile(onnx_manifest, size, max_chunks)
        donor = refit_source(root, owner, "tensorrt", PRECISION, facts, profile) \
            if refit and refittable is not False else None
        donor_manifest = read_manifest(donor) if donor else None
        refitting = bool(donor_manifest and donor_manifest.get("refittable")) or bool(refittable)
        clip_skip = onnx_manifest.get("clip_skip", 0)
        modules = modules or family.modules(ckpt, clip_skip)
        make = partial(_make_plan, trt, logger, family, modules, device, root, src, onnx_manifest, stored, profile,
                       donor, donor_manifest, refitting)
        entry_facts = dict(refittable=refitting, build_mode=mode, onnx_source=f"onnxruntime-{source}",
                           weights=owner.fingerprint,
                           refitted_from=donor_manifest["checkpoint"] if donor_manifest else None, **facts)
        if not is_controlnet:
            entry_facts["clip_skip"] = clip_skip
        built.append(build_entry(root, owner, "tensorrt", PRECISION, profile, nets, make, entry_facts, progress,
                                 verb="refitted" if donor is not None else "built", stored=stored,
                                 need=weight_bytes(modules, nets, PRECISION)))
    return built[0]
