"""Build OpenVINO entries from the exported ONNX graphs: no second export.

engine_dir/<fp>/onnxruntime-fp32/*.onnx (`fastsd export`; exported first where it is
missing) -> engine_dir/<fp>/openvino-<fp32|bf16>/: each network's graph and weights
(hard links to the ONNX entry's files where the file system allows, copies where not).
Each is compiled at the entry's precision and run on its sample inputs against the eager
fp32 network before the entry is committed. The profile
(dynamic or static, the longest text) is the ONNX entry's. A new checkpoint of a known
architecture whose OpenVINO entry (same precision, profile, clip_skip) the store holds is
refitted from it: its files linked, this checkpoint's weights checked against the graph by
name and shape and compiled in when the engine loads (`weights_at_load`); nothing is
exported or compiled. Without such an entry its ONNX graphs come by refit (`fastsd
export`'s, likewise linked) and compile with its weights given.

int8 (`--dtype int8`, needs nncf): -> engine_dir/<fp>/openvino-int8/. The UNet is quantized
(weights and activations of its convolutions and matrix products, OpenVINO's int8 kernels:
AVX512_VNNI, AMX) with ranges calibrated on the checkpoint's own denoising: a few short
generations of the bf16 entry (built first where missing) at the profile's size, whose UNet
inputs nncf's post-training quantization (SmoothQuant, bias correction) takes. It is saved
as OpenVINO IR (`unet.xml`, `unet.bin`) and checked against eager fp32 on one more such
input. The other networks (text encoders, VAE, ControlNets) are compiled as the bf16
entry's: int8 there costs image quality for little time. Quantized weights are the
calibrated checkpoint's: the entry takes no refit.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from fastsd.backends.kind import WEIGHTS_BY_NAME
from fastsd.backends.openvino import PRECISION_HINTS, OvRunner, unavailable, with_weights
from fastsd.engines import (
    MAX_CHUNKS,
    QUANTIZED,
    WEIGHTS_AT_LOAD,
    Profile,
    check_entry,
    entry_dir,
    graph_file,
    read_manifest,
    refit_source,
    shared_files,
    weights_at_load,
)
from fastsd.errors import FastSDError, InvalidArgumentError
from fastsd.networks import weights_of

from .common import (
    GIVEN_AT_LOAD,
    IP_FACTS,
    build_entry,
    build_module,
    build_spec,
    check_chunks,
    check_engine,
    donor_record,
    entry_groups,
    entry_profile,
    link_files,
    load_for_build,
    onnx_entry,
    parse_static,
    source_spec,
)
from .onnx_export import RefitError, check_refit

log = logging.getLogger(__name__)

SOURCE = "fp32"  # the ONNX entry compiled: OpenVINO sets the precision it runs at
TOLERANCE = {"fp32": 2e-3, "bf16": 8e-2, "int8": 0.2}  # max |engine - eager fp32| / max |eager fp32|
QUANTIZED_NETWORKS = ("unet",)  # what an int8 entry quantizes; its other networks run as a bf16 entry's
CALIBRATION_PROMPTS = (  # varied subjects and styles: the activation ranges of ordinary use
    "a photograph of an astronaut riding a horse on mars, highly detailed",
    "portrait of an old fisherman, oil painting, dramatic lighting",
    "a cozy wooden cabin in a snowy forest at night, warm light in the windows, digital art",
    "macro photo of a dew-covered green leaf, shallow depth of field",
)
CALIBRATION_STEPS = 5  # per prompt: the UNet inputs of every step are samples (from pure noise to nearly clean)


def _make_network(family, modules: dict, src: Path, onnx_manifest: dict, stored: dict, profile: Profile,
                  precision: str, name: str, folder: Path) -> tuple[list[str], dict, str]:
    """One network: its graph files linked in, compiled, checked against eager. A graph whose
    weights are given at load (the ONNX entry was a refit) is compiled with them, and so is
    this entry's."""
    record, spec = _source_network(family, onnx_manifest, stored, name)
    files = shared_files(record)
    link_files(src, folder, files)
    graph = folder / graph_file(spec.name, record)
    given = weights_of(modules[name]) if weights_at_load(record) else None
    runner = OvRunner(graph, spec, torch.device("cpu"), profile, precision, record, weights=given)
    batch = 2 if spec.cfg_doubled else 1
    inputs = spec.sample_inputs(batch, profile.opt_size, profile.opt_width, torch.float32)
    err = check_engine(f"OpenVINO {precision} {name}", lambda *args: runner(**dict(zip(spec.input_names, args,
                                                                                     strict=True))),
                       build_module(modules[name], spec).float().eval(), inputs, TOLERANCE[precision])
    extra = {"relative_error": round(err, 6), "inputs": list(spec.input_names),
             "inference_precision": runner.config["INFERENCE_PRECISION_HINT"],
             **{k: record[k] for k in IP_FACTS if k in record}}
    if record.get("weights_layout") == WEIGHTS_BY_NAME:  # LoRA refits by these names
        extra.update(weights_layout=WEIGHTS_BY_NAME, transposed=record.get("transposed", []))
    if given is not None:
        extra[WEIGHTS_AT_LOAD] = True
    return files, extra, f", {runner.config['INFERENCE_PRECISION_HINT']}, relative error vs eager {err:.2e}"


def _linked_network(family, modules: dict, donor: Path, donor_manifest: dict, name: str,
                    folder: Path) -> tuple[list[str], dict, str]:
    """A refit from another checkpoint's OpenVINO entry of this architecture: its files
    hard-linked, this checkpoint's weights checked against the graph by name and shape and
    given when the engine loads (OpenVINO compiles at load anyway: nothing to compile here)."""
    record = donor_record(donor_manifest, family, name, WEIGHTS_BY_NAME)
    spec = build_spec(family, name)
    try:
        check_refit(donor / graph_file(spec.name, record), weights_of(modules[name]), set(record["transposed"]))
    except RefitError as e:
        raise FastSDError(f"{name}: cannot refit from {donor} ({e}); build it with --no-refit") from None
    files = shared_files(record)
    link_files(donor, folder, files)
    keep = ("inputs", "inference_precision", "weights_layout", "transposed", *IP_FACTS)
    extra = {k: record[k] for k in keep if k in record}
    return files, {**extra, WEIGHTS_AT_LOAD: True, "refitted_from": donor_manifest["checkpoint"]}, GIVEN_AT_LOAD


def _refit_groups(root: Path, info, family, networks: tuple[str, ...], dtype: str, profile: Profile,
                  clip_skip: int) -> list[tuple]:
    """(owner, its networks, donor entry, its manifest) for each entry group that an OpenVINO
    entry of another checkpoint of the same architecture (precision, profile, clip_skip) can
    serve by refit: every network of the group there, built by name and with the same inputs."""
    found = []
    for owner, nets, _ in entry_groups(info, family, networks, {}):
        facts = {"clip_skip": clip_skip} if owner is info else {}
        donor = refit_source(root, owner, "openvino", dtype, facts, profile)
        manifest = read_manifest(donor) if donor is not None else None
        if manifest and all(donor_record(manifest, family, n, WEIGHTS_BY_NAME) is not None for n in nets):
            found.append((owner, nets, donor, manifest))
    return found


def _source_network(family, onnx_manifest: dict, stored: dict, name: str) -> tuple[dict, object]:
    """A network's record in the ONNX entry and its spec with the inputs that graph takes."""
    record = onnx_manifest["networks"][stored[name]]
    return record, source_spec(family, name, record)


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


def quantizer_unavailable() -> str | None:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return "int8 OpenVINO entries are quantized with nncf, which is not installed (pip install 'fastsd[int8]')"
    return None


def calibration_inputs(model: str, root: Path, profile: Profile, progress: Callable[[str], None],
                       **load) -> list[dict]:
    """The UNet's inputs (as its OpenVINO model takes them) at every step of short generations
    of the calibration prompts, run on the checkpoint's bf16 OpenVINO entry at the profile's
    optimum size."""
    from fastsd.backends.openvino import OvRunner
    from fastsd.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model, backend="openvino", dtype="bf16", engine_dir=str(root), **load)
    unet = pipe.backend.engines.get("unet", [None])[0] if hasattr(pipe.backend, "engines") else None
    if unet is None or not unet.load() or not isinstance(unet.runner, OvRunner):
        raise FastSDError("the checkpoint's bf16 OpenVINO UNet did not load, so the int8 build has nothing to "
                          "calibrate on (see the log)")
    samples: list[dict] = []
    run = pipe.backend.run

    def capture(network, inputs, ran=None):
        if network == "unet":
            samples.append({n: a.copy() for n, a in unet.runner.feeds(inputs).items()})
        return run(network, inputs, ran)

    pipe.backend.run = capture
    for i, prompt in enumerate(CALIBRATION_PROMPTS):
        progress(f"calibrating: generation {i + 1} of {len(CALIBRATION_PROMPTS)} ({CALIBRATION_STEPS} steps, "
                 f"{profile.opt_size}x{profile.opt_width}, on the bf16 entry)")
        pipe(prompt, num_inference_steps=CALIBRATION_STEPS, height=profile.opt_size, width=profile.opt_width,
             seed=i, output_type="latent")
    return samples


def _quantize_network(module: torch.nn.Module, spec, src: Path, record: dict, profile: Profile,
                      samples: list[dict], folder: Path) -> tuple[list[str], dict, str]:
    """The network's ONNX graph quantized to int8 by nncf on `samples` (all but the last, on
    which the result is checked against eager fp32), saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    from fastsd.backends.openvino import core

    calibrate, held_out = samples[:-1], samples[-1]
    model = core().read_model(str(src / graph_file(spec.name, record)))
    if weights_at_load(record):  # the ONNX entry's files hold a refit donor's weights: quantize this checkpoint's
        with_weights(model, weights_of(module), set(record.get("transposed", ())))
    quantized = nncf.quantize(model, nncf.Dataset(calibrate), subset_size=len(calibrate),
                              model_type=nncf.ModelType.TRANSFORMER)
    files = [f"{spec.name}.xml", f"{spec.name}.bin"]
    ov.save_model(quantized, str(folder / files[0]), compress_to_fp16=False)  # unquantized weights stay fp32
    del model, quantized
    runner = OvRunner(folder / files[0], spec, torch.device("cpu"), profile, "bf16", {"quantized": "int8"})
    inputs = tuple(torch.from_numpy(held_out[n]) for n in spec.input_names)
    err = check_engine(f"OpenVINO int8 {spec.name}", lambda *args: runner(**dict(zip(spec.input_names, args,
                                                                                     strict=True))),
                       module.float().eval(), inputs, TOLERANCE["int8"])
    extra = {"relative_error": round(err, 6), "inputs": list(spec.input_names), "quantized": "int8",
             "inference_precision": runner.config["INFERENCE_PRECISION_HINT"],
             "calibration": {"samples": len(calibrate), "prompts": len(CALIBRATION_PROMPTS),
                             "steps": CALIBRATION_STEPS, "size": [profile.opt_size, profile.opt_width]}}
    return sorted(files), extra, f", int8 ({len(calibrate)} calibration samples), relative error vs eager {err:.2e}"


def build_openvino(model: str, engine_dir: str | Path | None = None, dtype: str = "fp32", static: str | None = None,
                   networks: tuple[str, ...] | None = None, allow_pickle: bool = False, clip_skip: int = 0,
                   vae: str | None = None, refit: bool = True, progress: Callable[[str], None] = log.info,
                   controlnets: tuple = (), max_chunks: int | None = None, ip_adapters: tuple = ()) -> Path:
    """OpenVINO entries (the checkpoint's, each ControlNet's) at `dtype` (fp32, bf16, or int8:
    see the module's docstring), compiled from the fp32 ONNX entries, which `fastsd export`
    makes first where missing (and an int8 build, the bf16 entry it calibrates on)."""
    if dtype not in PRECISION_HINTS and dtype not in QUANTIZED:
        raise InvalidArgumentError(f"OpenVINO engines run in {', '.join((*PRECISION_HINTS, *QUANTIZED))}, not {dtype}")
    why = unavailable() or (quantizer_unavailable() if dtype in QUANTIZED else None)
    if why:
        raise FastSDError(why)
    options = dict(engine_dir=engine_dir, static=static, networks=networks, allow_pickle=allow_pickle,
                   clip_skip=clip_skip, vae=vae, refit=refit, progress=progress, controlnets=controlnets,
                   max_chunks=max_chunks, ip_adapters=ip_adapters)
    ckpt, family, root, networks = load_for_build(model, networks, allow_pickle, clip_skip, engine_dir, vae,
                                                  controlnets, ip_adapters)
    info = ckpt.info
    size = parse_static(static, info.vae_factor)

    def export():
        progress("no fp32 ONNX graphs for this build yet: exporting them first")
        from .onnx_export import export_checkpoint

        export_checkpoint(model, dtype=SOURCE, **{**options, "engine_dir": root})

    samples: list[dict] = []
    if dtype in QUANTIZED and any(n in QUANTIZED_NETWORKS for n in networks):
        base, profile = QUANTIZED[dtype], Profile.for_model(info, size)
        held, problems = check_entry(entry_dir(root, info.fingerprint, "openvino", base, profile),
                                     info.fingerprint, {"clip_skip": clip_skip}, networks=QUANTIZED_NETWORKS)
        if not held or problems:
            progress(f"{dtype}: building the {base} entry the calibration runs on first")
            build_openvino(model, **{**options, "engine_dir": root, "dtype": base})
        samples = calibration_inputs(model, root, profile, progress, allow_pickle=allow_pickle, clip_skip=clip_skip,
                                     vae=vae)
    modules: dict = {}
    built = []
    if refit and not samples:  # another checkpoint's entry of this architecture: its files, these weights
        profile = Profile.for_model(info, size, max_chunks=check_chunks(max_chunks or MAX_CHUNKS))
        for owner, nets, donor, donor_manifest in _refit_groups(root, info, family, networks, dtype, profile,
                                                                clip_skip):
            modules = modules or family.modules(ckpt, clip_skip)
            facts = dict(onnx_source=f"onnxruntime-{SOURCE}", weights=owner.fingerprint, refittable=True,
                         **({"clip_skip": clip_skip} if owner is info else {}))
            built.append(build_entry(root, owner, "openvino", dtype, profile, nets,
                                     partial(_linked_network, family, modules, donor, donor_manifest), facts,
                                     progress, verb="compiled", stored={n: family.specs[n].name for n in nets}))
            networks = tuple(n for n in networks if n not in nets)
        if not networks:
            return _checkpoints_first(built, info)
    for owner, nets, src, onnx_manifest in _source_entries(root, info, family, networks, size, clip_skip, export):
        stored = {n: family.specs[n].name for n in nets}
        profile = entry_profile(onnx_manifest, size, max_chunks)
        modules = modules or family.modules(ckpt, onnx_manifest.get("clip_skip", 0))
        compile_as = QUANTIZED.get(dtype, dtype)
        make = partial(_make_network, family, modules, src, onnx_manifest, stored, profile, compile_as)
        if samples:
            make = partial(_make_or_quantize, make, family, modules, src, onnx_manifest, stored, profile, samples)
        facts = dict(onnx_source=f"onnxruntime-{SOURCE}", weights=owner.fingerprint, refittable=not samples)
        if owner is info:
            facts["clip_skip"] = onnx_manifest.get("clip_skip", 0)
        built.append(build_entry(root, owner, "openvino", dtype, profile, nets, make, facts, progress,
                                 verb="compiled", stored=stored))
    return _checkpoints_first(built, info)


def _checkpoints_first(built: list[Path], info) -> Path:
    """The checkpoint's entry among those built (else the first: only ControlNets were)."""
    return next((e for e in built if e.parent.name == info.fingerprint), built[0])


def _make_or_quantize(make: Callable, family, modules: dict, src: Path, onnx_manifest: dict, stored: dict,
                      profile: Profile, samples: list[dict], name: str, folder: Path):
    """An int8 entry's network: quantized where it is one of QUANTIZED_NETWORKS (the checkpoint's
    UNet), else compiled as `make` does (bf16)."""
    if name not in QUANTIZED_NETWORKS:
        return make(name, folder)
    record, spec = _source_network(family, onnx_manifest, stored, name)
    return _quantize_network(modules[name], spec, src, record, profile, samples, folder)
