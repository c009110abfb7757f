"""Build `compiled` engines: AOTInductor packages (.pt2) of a checkpoint's networks.

Each network is captured with torch.export (dynamic batch, fixed height x width: the
profile's static size, the checkpoint's default unless --static says otherwise), compiled
ahead of time by Inductor for this device and precision, and packaged; the runtime loads
a package without recompiling. Packages are tied to the torch version and the device
(GPU name and compute capability, or the CPU), which the manifest records and the
runtime checks.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from fastsd.backends.compiled import FOLDED, FROZEN, SEPARATE, runtime_facts, weights_name
from fastsd.devices import parse_device
from fastsd.engines import (
    DTYPES,
    MAX_BATCH,
    MAX_CHUNKS,
    WEIGHTS_AT_LOAD,
    Profile,
    compute_dtype,
    read_manifest,
    refit_source,
)
from fastsd.errors import FastSDError, InvalidArgumentError
from fastsd.networks import BATCH, TOKENS, NetworkSpec, weights_of

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



def _dynamic_batch(module: torch.nn.Module, spec: NetworkSpec, max_chunks: int = 1) -> dict:
    """torch.export's dynamic_shapes: the batch axis of every input that has one, and the text
    axis where a text of up to `max_chunks` chunks goes in, by the forward's parameter names
    (the inputs a *args parameter takes: a tuple under its name)."""
    import inspect

    batch = torch.export.Dim("batch", min=1, max=2 * MAX_BATCH)
    tokens = (torch.export.Dim("tokens", min=spec.chunk_tokens, max=spec.chunk_tokens * max_chunks)
              if max_chunks > 1 else None)

    def axes(t) -> dict | None:
        out = {a: batch if d == BATCH else tokens for a, d in enumerate(t.shape)
               if d == BATCH or (d == TOKENS and tokens is not None)}
        return out or None

    dims = [axes(t) for t in spec.inputs]
    out, params = {}, list(inspect.signature(module.forward).parameters.values())
    for i, p in enumerate(params):
        if p.kind == p.VAR_POSITIONAL:
            if dims[i:]:
                out[p.name] = tuple(dims[i:])
            break
        if i < len(dims):  # a parameter with a default the spec does not feed is left out
            out[p.name] = dims[i]
    return out


@contextmanager
def _without_buffers(module: torch.nn.Module) -> Iterator[None]:
    """`module` without its buffers while it is exported (put back after). The networks compute
    what their buffers held (CLIP's position ids: fastsd.networks.positions), so the package's
    constants are the weights alone, the same names as the weights file beside it."""
    taken = [(m, name, m._buffers.pop(name)) for m in module.modules() for name in list(m._buffers)]
    try:
        yield
    finally:
        for m, name, buf in taken:
            m._buffers[name] = buf


def export_program(module: torch.nn.Module, spec: NetworkSpec, args: tuple,
                   max_chunks: int = 1) -> torch.export.ExportedProgram:
    """torch.export of `module` with a dynamic batch (and text, up to `max_chunks` chunks),
    without its buffers (above)."""
    with torch.no_grad(), _without_buffers(module):
        return torch.export.export(module, args, dynamic_shapes=_dynamic_batch(module, spec, max_chunks))


def compile_network(module: torch.nn.Module, spec: NetworkSpec, args: tuple, path: Path, frozen: bool,
                    max_chunks: int = 1) -> list[str]:
    """Compile `module` into the package `path`. Frozen: the weights become constants of the
    code, folded and prepacked (measured on the CPU, SD 1.5 UNet at 256x256: 3.70 s -> 2.75 s
    per CFG step; eager 2.82 s), and no other weights can go in. Otherwise the package holds
    only code and the weights go beside it (`<network>.weights.safetensors`, by parameter
    name), loaded with the package's constant-loading API: refit is writing that file, or
    swapping some constants in memory (LoRA). Returns the files written."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = export_program(module, spec, args, max_chunks)
        # not frozen: constants Inductor derives from weights (views, permutes) are folded at run time,
        # after the weights are loaded, not baked in at compile time from the weights traced here
        configs = {"freezing": True} if frozen else {"aot_inductor.package_constants_in_so": False,
                                                     "aot_inductor.use_runtime_constant_folding": True}
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    if frozen:
        return [path.name]
    names = [n for n in torch._inductor.aoti_load_package(str(path)).get_constant_fqns() if not n.startswith(FOLDED)]
    weights = weights_of(module)
    missing = [n for n in names if n not in weights]
    if missing:
        raise FastSDError(f"{spec.name}: the compiled package needs constants that are not weights of the network "
                          f"({', '.join(missing[:3])}); build it with --frozen")
    weights_file = path.parent / weights_name(spec.name)
    write_weights(weights_file, {n: weights[n] for n in names})
    return [path.name, weights_file.name]


def write_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({n: t.detach().to("cpu").contiguous() for n, t in weights.items()}, str(path))


def check_package_refit(src: Path, weights: dict[str, torch.Tensor]) -> None:
    """Whether `weights` (this checkpoint's) hold every constant of the package `src` (another
    checkpoint's of the same architecture) with the donor's shape: a refit shares the donor's
    files and gives the weights when the engine loads. Reads the weights file's header alone.
    Raises FastSDError where they do not match."""
    from safetensors import safe_open

    with safe_open(str(src.parent / weights_name(src.stem)), framework="pt") as f:
        for name in f.keys():
            tensor = weights.get(name)
            if tensor is None or list(tensor.shape) != list(f.get_slice(name).get_shape()):
                raise FastSDError(f"{src.stem}: {name} is not a weight of this checkpoint with the donor's shape")


def build_compiled(model: str, engine_dir: str | Path | None = None, dtype: str | None = None,
                   static: str | None = None, device: str | None = None, networks: tuple[str, ...] | None = None,
                   allow_pickle: bool = False, clip_skip: int = 0, vae: str | None = None, frozen: bool = False,
                   refit: bool = True, progress: Callable[[str], None] = log.info, controlnets: tuple = (),
                   max_chunks: int | None = None, ip_adapters: tuple = ()) -> Path:
    """Compile `model` into engine_dir/<fingerprint>/compiled-<dtype>/; returns that folder.
    With `controlnets`, its UNet takes their residuals and each ControlNet is compiled into an
    entry of its own. Not `frozen`, where the store holds a refittable entry of another
    checkpoint (or ControlNet) of the same architecture (same precision, size, clip_skip,
    torch and device), its packages are shared (hard-linked) and this checkpoint's weights given
    when they load (`refit`)."""
    dev = parse_device(device)
    dtype = dtype or ("fp16" if dev.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    ckpt, family, root, networks = load_for_build(model, networks, allow_pickle, clip_skip, engine_dir, vae,
                                                  controlnets, ip_adapters)
    info = ckpt.info
    size = parse_static(static, info.vae_factor) or (info.default_size, info.default_size)
    profile = Profile.for_model(info, size, max_chunks=check_chunks(max_chunks or MAX_CHUNKS))
    modules = family.modules(ckpt, clip_skip)
    facts = dict(clip_skip=clip_skip, **runtime_facts(dev))

    def make_for(owner, owner_facts: dict):
        runtime = {k: v for k, v in owner_facts.items() if k in facts}
        donor = refit_source(root, owner, "compiled", dtype, runtime, profile) if refit and not frozen else None
        donor_manifest = read_manifest(donor) if donor is not None else None

        def make(name: str, folder: Path) -> tuple[list[str], dict, str]:
            spec = build_spec(family, name)
            path = folder / f"{spec.name}.pt2"
            inputs = build_facts(family, name, spec)  # the UNet's may include ControlNet and IP-Adapter inputs
            if donor_record(donor_manifest, family, name, SEPARATE) is not None:
                check_package_refit(donor / path.name, weights_of(modules[name]))
                files = [path.name, weights_name(spec.name)]
                link_files(donor, folder, files)
                extra = {"weights_layout": SEPARATE, "refitted_from": donor_manifest["checkpoint"],
                         WEIGHTS_AT_LOAD: True, **inputs}
                return files, extra, GIVEN_AT_LOAD
            module = build_module(modules[name], spec).to(dev, compute_dtype(dtype)).eval()
            args = tuple(a.to(dev) for a in spec.sample_inputs(2, *size, compute_dtype(dtype)))
            files = compile_network(module, spec, args, path, frozen, profile.max_chunks)
            return files, {"weights_layout": FROZEN if frozen else SEPARATE, **inputs}, ""

        return make

    return build_entries(root, info, family, "compiled", dtype, profile, networks, make_for,
                         dict(exporter="AOTInductor", refittable=not frozen, weights=info.fingerprint, **facts),
                         progress, verb="compiled", need=weight_bytes(modules, networks, dtype))
