"""Build OpenVINO entries from the exported ONNX graphs: no second export.

engine_dir/<fp>/onnxruntime-fp32/*.onnx (`fastsd export`; exported first where it is
missing) -> engine_dir/<fp>/openvino-<fp32|bf16>/: each network's graph and weights
(hard links to the ONNX entry's files where the file system allows, copies where not).
Each is compiled at the entry's precision and run on its sample inputs against the eager
fp32 network before the entry is committed. The profile
(dynamic or static, the longest text) is the ONNX entry's. A new checkpoint of a known
architecture gets its ONNX graphs by refit (`fastsd export`'s), then its compiled models.
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from fastsd.backends.kind import WEIGHTS_BY_NAME
from fastsd.backends.openvino import PRECISION_HINTS, OvRunner, unavailable
from fastsd.engines import Profile, graph_file
from fastsd.errors import FastSDError, InvalidArgumentError

from .common import build_entry, check_engine, entry_groups, entry_profile, load_for_build, onnx_entry, parse_static

log = logging.getLogger(__name__)

SOURCE = "fp32"  # the ONNX entry compiled: OpenVINO sets the precision it runs at
TOLERANCE = {"fp32": 2e-3, "bf16": 8e-2}  # max |engine - eager fp32| / max |eager fp32| on the sample inputs


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` holds `src`'s bytes: a hard link (no space) where the file system allows, else a copy.
    The store never rewrites a file in place (entries are staged and renamed), and each
    entry's manifest hashes its files, so a shared inode cannot change one entry unseen."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _make_network(family, modules: dict, src: Path, onnx_manifest: dict, stored: dict, profile: Profile,
                  precision: str, name: str, folder: Path) -> tuple[list[str], dict, str]:
    """One network: its graph files linked in, compiled, checked against eager."""
    record = onnx_manifest["networks"][stored[name]]
    spec = family.specs[name].with_inputs(record.get("inputs", family.specs[name].input_names))
    files = sorted(record["sha256"])
    for f in files:
        link_or_copy(src / f, folder / f)
    graph = folder / graph_file(spec.name, record)
    runner = OvRunner(graph, spec, torch.device("cpu"), profile, precision, record)
    batch = 2 if spec.cfg_doubled else 1
    inputs = spec.sample_inputs(batch, profile.opt_size, profile.opt_width, torch.float32)
    err = check_engine(f"OpenVINO {precision} {name}", lambda *args: runner(**dict(zip(spec.input_names, args,
                                                                                     strict=True))),
                       modules[name].float().eval(), inputs, TOLERANCE[precision])
    extra = {"relative_error": round(err, 6), "inputs": list(spec.input_names),
             "inference_precision": runner.config["INFERENCE_PRECISION_HINT"]}
    if record.get("weights_layout") == WEIGHTS_BY_NAME:  # LoRA refits by these names
        extra.update(weights_layout=WEIGHTS_BY_NAME, transposed=record.get("transposed", []))
    return files, extra, f", {runner.config['INFERENCE_PRECISION_HINT']}, relative error vs eager {err:.2e}"


def _source_entries(root: Path, info, family, networks: tuple[str, ...], size, clip_skip: int,
                    export: Callable) -> list[tuple]:
    """(owner, its networks, its ONNX entry, that entry's manifest) per entry group, the ONNX
    graphs exported first (`export()`) where any is missing or was exported for another clip_skip."""
    def find():
        found = []
        for owner, nets, _ in entry_groups(info, family, networks, {}):
            stored = tuple(family.specs[n].name for n in nets)
            src, manifest = onnx_entry(root, info, SOURCE, stored, size, owner if owner is not info else None)
            if owner is info and manifest.get("clip_skip", 0) != clip_skip:
                raise FastSDError(f"{src} was exported with clip_skip {manifest.get('clip_skip', 0)}")
            found.append((owner, nets, src, manifest))
        return found

    try:
        return find()
    except FastSDError:
        export()
        return find()


def build_openvino(model: str, engine_dir: str | Path | None = None, dtype: str = "fp32", static: str | None = None,
                   networks: tuple[str, ...] | None = None, allow_pickle: bool = False, clip_skip: int = 0,
                   vae: str | None = None, refit: bool = True, progress: Callable[[str], None] = log.info,
                   controlnets: tuple = (), max_chunks: int | None = None) -> Path:
    """OpenVINO entries (the checkpoint's, each ControlNet's) at `dtype` (fp32 or bf16),
    compiled from the fp32 ONNX entries, which `fastsd export` makes first where missing."""
    if dtype not in PRECISION_HINTS:
        raise InvalidArgumentError(f"OpenVINO engines run in {' or '.join(PRECISION_HINTS)}, not {dtype}")
    why = unavailable()
    if why:
        raise FastSDError(why)
    ckpt, family, root, networks = load_for_build(model, networks, allow_pickle, clip_skip, engine_dir, vae,
                                                  controlnets)
    info = ckpt.info
    size = parse_static(static, info.vae_factor)

    def export():
        progress("no fp32 ONNX graphs for this build yet: exporting them first")
        from .onnx_export import export_checkpoint

        export_checkpoint(model, engine_dir=root, dtype=SOURCE, static=static, networks=networks,
                          allow_pickle=allow_pickle, clip_skip=clip_skip, vae=vae, refit=refit, progress=progress,
                          controlnets=controlnets, max_chunks=max_chunks)

    modules: dict = {}
    built = []
    for owner, nets, src, onnx_manifest in _source_entries(root, info, family, networks, size, clip_skip, export):
        stored = {n: family.specs[n].name for n in nets}
        profile = entry_profile(onnx_manifest, size, max_chunks)
        modules = modules or family.modules(ckpt, onnx_manifest.get("clip_skip", 0))
        make = partial(_make_network, family, modules, src, onnx_manifest, stored, profile, dtype)
        facts = dict(onnx_source=f"onnxruntime-{SOURCE}", weights=owner.fingerprint, refittable=True)
        if owner is info:
            facts["clip_skip"] = onnx_manifest.get("clip_skip", 0)
        built.append(build_entry(root, owner, "openvino", dtype, profile, nets, make, facts, progress,
                                 verb="compiled", stored=stored))
    return built[0]
