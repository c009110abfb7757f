"""What every builder shares: checking a build's arguments and the store, loading the
checkpoint, and the one build loop (staging folder, per-network timing and size, the
progress line, the manifest) that turns networks into a store entry."""

from __future__ import annotations

import errno
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from fastsd.checkpoint import check_clip_skip, load_checkpoint
from fastsd.controlnet import load_controlnets
from fastsd.engines import (
    Profile,
    Staging,
    base_manifest,
    check_entry,
    compute_dtype,
    default_engine_dir,
    entry_dir,
    writable_store,
)
from fastsd.errors import FastSDError, InvalidArgumentError, OutputPathError
from fastsd.families import family_for
from fastsd.hashing import link_files  # noqa: F401 - a refit's: the donor entry's files into the staging folder
from fastsd.image_prompts import attach_adapters, ip_facts
from fastsd.networks import NETWORKS, RESIDUAL_PREFIXES, NetworkSpec, record_ip_inputs, relative_error

# make(network, staging folder) -> (files written, extra manifest facts of the network, note for the progress line)
MakeNetwork = Callable[[str, Path], tuple[list[str], dict, str]]


def parse_static(text: str | None, factor: int) -> tuple[int, int] | None:
    """'512x768' -> (512, 768): height x width, each a positive multiple of the VAE factor."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidArgumentError(f"--static takes HxW, e.g. 512x512, got {text!r}") from None
    if min(h, w) <= 0 or h % factor or w % factor:
        raise InvalidArgumentError(f"static size {h}x{w}: both must be positive multiples of {factor}")
    return h, w


MAX_PROMPT_CHUNKS = 8  # 600 tokens: far past any prompt people write


def check_chunks(max_chunks) -> int:
    """--max-prompt-chunks: an integer in [1, 8]."""
    if isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or not 1 <= max_chunks <= MAX_PROMPT_CHUNKS:
        raise InvalidArgumentError(f"--max-prompt-chunks must be an integer in [1, {MAX_PROMPT_CHUNKS}], got "
                                   f"{max_chunks!r}")
    return max_chunks


def load_for_build(model: str, networks: tuple[str, ...] | None, allow_pickle: bool, clip_skip: int,
                   engine_dir: str | Path | None, vae: str | None = None, controlnets: tuple = (),
                   ip_adapters: tuple = ()):
    """Check a build's arguments and the store, then load the checkpoint (with `vae`
    replacing its VAE), the `controlnets` and the `ip_adapters` (whose inputs its UNet then
    takes). Returns (checkpoint, its model family with the ControlNets, store root, the
    networks to build: `networks`, or None for all of the family's)."""
    if networks is not None:
        numbered = r"(controlnet|image_encoder)_[2-9][0-9]*"  # a second ControlNet, image encoder, ...
        unknown = {n for n in networks if not re.fullmatch(numbered, n)} - set(NETWORKS)
        if unknown:
            raise InvalidArgumentError(f"unknown networks {sorted(unknown)}; choose from {', '.join(NETWORKS)}")
        if not networks:
            raise InvalidArgumentError(f"no networks to build; choose from {', '.join(NETWORKS)}")
    root = writable_store(Path(engine_dir) if engine_dir else default_engine_dir())
    ckpt = load_checkpoint(model, allow_pickle=allow_pickle, vae=vae)
    check_clip_skip(ckpt, clip_skip)
    family = family_for(ckpt, load_controlnets(list(controlnets) or None, ckpt, allow_pickle))
    if ip_adapters:
        attach_adapters(ckpt, family, ip_adapters, allow_pickle)
    if networks is None:
        networks = family.networks
    other = [n for n in networks if n not in family.networks]
    if other:
        raise InvalidArgumentError(f"this checkpoint has no {', '.join(other)}; its networks are "
                                   f"{', '.join(family.networks)}")
    return ckpt, family, root, tuple(networks)


def build_spec(family, name: str) -> NetworkSpec:
    """The spec a network is built with: with ControlNets, the UNet takes their residuals too,
    with IP-Adapters their image tokens and scales (zeros when a call has none: such an engine
    serves every call)."""
    spec = family.specs[name]
    if name == "unet":
        spec = spec.with_inputs(t.name for t in spec.optional_inputs
                                if family.controlnets or not t.name.startswith(RESIDUAL_PREFIXES))
    return spec


def build_module(module: torch.nn.Module, spec: NetworkSpec) -> torch.nn.Module:
    """The network module taking the spec's inputs by name (a UNet with optional inputs)."""
    return module.with_names(spec.input_names) if hasattr(module, "with_names") else module


IP_FACTS = ("ip_tokens", "ip_layers", "ip_adapters")  # a UNet record's facts about its IP-Adapter inputs


def source_spec(family, name: str, record: dict) -> NetworkSpec:
    """The spec of a network as its ONNX entry's record says the graph takes it (ControlNet
    residuals, IP-Adapter inputs): what an engine built from that graph takes. A UNet graph
    holding IP-Adapters is built only with the same adapters loaded (the eager check runs them)."""
    spec = family.specs[name]
    if record.get("ip_tokens"):
        have = [a.fingerprint for a in getattr(family, "ip_adapters", ())]
        if list(record.get("ip_adapters", ())) != have:
            raise FastSDError(f"the ONNX {name} was exported with {len(record['ip_tokens'])} IP-Adapter(s); build "
                              "its engines with the same --ip-adapter flags as that export")
        spec = record_ip_inputs(spec, record)
    return spec.with_inputs(record.get("inputs", spec.input_names))


def build_facts(family, name: str, spec: NetworkSpec) -> dict:
    """A network's manifest facts about its inputs: their names, and a UNet's IP-Adapter inputs."""
    return {"inputs": list(spec.input_names), **(ip_facts(family, spec) if name == "unet" else {})}


def donor_record(donor_manifest: dict | None, family, name: str, layout: str) -> dict | None:
    """The donor entry's record of network `name` where its graph (or package) can take this
    build's weights: the same weights layout and the same inputs as `build_spec` gives (a
    record that lists no inputs was built with the plain spec's). None: build it instead."""
    spec = build_spec(family, name)
    record = donor_manifest["networks"].get(spec.name) if donor_manifest else None
    if record is None or record.get("weights_layout") != layout:
        return None
    plain = None if spec.name.startswith("text_encoder") else list(family.specs[name].input_names)
    built_with = record.get("inputs", plain)  # text encoders that list none took token ids
    return record if built_with == list(spec.input_names) else None


GIVEN_AT_LOAD = " (the donor's files, hard-linked; this checkpoint's weights are given when it loads)"


def owned_networks(family) -> dict:
    """The networks with entries of their own (ControlNets, IP-Adapters' image encoders) by name:
    each keyed by its own weights, it serves beside any checkpoint it fits."""
    return {**family.controlnets, **getattr(family, "image_encoders", {})}


def entry_groups(info, family, networks: tuple[str, ...], facts: dict) -> list[tuple]:
    """What a build writes: (whose entry, its networks, its manifest facts). The checkpoint's
    networks go into its entry; each ControlNet and image encoder into an entry of its own,
    keyed by its weights, without the text encoder's clip_skip."""
    owned = owned_networks(family)
    own = tuple(n for n in networks if n not in owned)
    groups = [(info, own, facts)] if own else []
    for n in networks:
        if n in owned:
            own_facts = {k: v for k, v in facts.items() if k != "clip_skip"} | {"weights": owned[n].fingerprint}
            groups.append((owned[n], (n,), own_facts))
    return groups


def weight_bytes(modules: dict, networks: tuple[str, ...], precision: str) -> int:
    """The networks' weights at `precision`: about what their engines take on disk."""
    size = compute_dtype(precision).itemsize
    return sum(p.numel() * size for n in networks if n in modules for p in modules[n].parameters())


def _disk_full(error: BaseException | None) -> bool:
    """Whether an error (or one it came from) is the disk or quota running out; exporters
    wrap the OSError in their own errors."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def build_entries(root: Path, info, family, kind: str, precision: str, profile: Profile, networks: tuple[str, ...],
                  make_for: Callable[[object, dict], MakeNetwork], facts: dict, progress: Callable[[str], None],
                  verb: str = "built", need: int | None = None) -> Path:
    """`build_entry` for each of `entry_groups`; `make_for(owner, facts)` gives the make
    function of one entry (its refit donor is that owner's). Returns the first entry (the
    checkpoint's, unless only ControlNets were built)."""
    built = []
    for owner, nets, owner_facts in entry_groups(info, family, networks, facts):
        stored = {n: family.specs[n].name for n in nets}
        built.append(build_entry(root, owner, kind, precision, profile, nets, make_for(owner, owner_facts),
                                 owner_facts, progress, verb, stored, need))
    return built[0]


STARTING = {"exported": "exporting", "built": "building", "compiled": "compiling", "refitted": "refitting"}


def build_entry(root: Path, info, kind: str, precision: str, profile: Profile, networks: tuple[str, ...],
                make: MakeNetwork, facts: dict, progress: Callable[[str], None], verb: str = "built",
                stored: dict[str, str] | None = None, need: int | None = None) -> Path:
    """Make each network's files in a staging folder (timed), then commit the entry with
    its manifest; an interrupted or failed build leaves nothing behind. `stored` renames
    networks in the entry (controlnet_2 -> controlnet). A disk that fills up is an
    OutputPathError naming the store and the space needed (`need`: the build's estimate
    of its bytes). Returns the entry."""
    written = 0
    try:
        with Staging(entry_dir(root, info.fingerprint, kind, precision, profile)) as stage:
            try:
                for name in networks:  # a line as each starts (a UNet takes minutes) and one when done
                    progress(f"{name}: {STARTING.get(verb, verb)}...")
                    t0 = time.perf_counter()
                    files, extra, note = make(name, stage.dir)
                    seconds = time.perf_counter() - t0
                    size = sum((stage.dir / f).stat().st_size for f in files)
                    stage.add((stored or {}).get(name, name), files, export_seconds=round(seconds, 2), bytes=size,
                              **extra)
                    how = f"refitted from {extra['refitted_from']}'s engine" if extra.get("refitted_from") else verb
                    progress(f"{name}: {how} in {seconds:.1f}s, {size / 2**20:.1f} MiB ({', '.join(files)}){note}")
                return stage.commit(base_manifest(info, kind, precision, profile, **facts))
            except Exception:
                written = sum(f.stat().st_size for f in stage.dir.rglob("*") if f.is_file())
                raise
    except Exception as e:
        if not _disk_full(e):
            raise
        free = shutil.disk_usage(root).free  # the staging folder is gone again
        raise OutputPathError(
            f"the engine store {root} ran out of disk space after writing {_mib(written)} of this build (nothing "
            f"was kept); it needs about {_mib(max(need or 0, written))}{'' if need else ' or more'} free and has "
            f"{_mib(free)}: free some space, prune the store (fastsd engines prune) or pass --engine-dir on a "
            "larger disk") from None


def onnx_entry(engine_dir: Path, info, precision: str, networks: tuple[str, ...],
               static: tuple[int, int] | None = None, owner=None) -> tuple[Path, dict]:
    """The ONNX entry the engines are built from: the checkpoint's (`info`), or where `owner`
    is a ControlNet, that ControlNet's (for the checkpoint's profile)."""
    fingerprint = (owner or info).fingerprint
    src = entry_dir(engine_dir, fingerprint, "onnxruntime", precision, Profile.for_model(info, static))
    manifest, problems = check_entry(src, fingerprint, networks=networks)
    if not manifest or problems:
        why = "; ".join(sorted({f"{n}: {p}" for n, p in problems.items()})) or "no valid entry"
        what = "this checkpoint" if owner is None else f"the ControlNet {owner.source}"
        raise FastSDError(f"no usable {precision} ONNX graphs for {what} in {src} ({why}): run "
                          f"`fastsd export --dtype {precision}"
                          f"{f' --static {static[0]}x{static[1]}' if static else ''}"
                          f"{' --controlnet ...' if owner is not None else ''}` first")
    return src, manifest


def entry_profile(onnx_manifest: dict, static: tuple[int, int] | None, max_chunks: int | None = None) -> Profile:
    """The profile engines are built for: the ONNX entry's. `--static` and `--max-prompt-chunks`
    must agree with it."""
    profile = Profile(**onnx_manifest["profile"])
    if max_chunks is not None and max_chunks != profile.max_chunks:
        raise FastSDError(f"the ONNX graphs were exported for texts of up to {profile.max_chunks} chunk(s); export "
                          f"them with --max-prompt-chunks {max_chunks} before building engines for that")
    if static is not None and (not profile.static or (profile.opt_size, profile.opt_width) != static):
        have = f"static {profile.opt_size}x{profile.opt_width}" if profile.static else "dynamic"
        raise FastSDError(f"the ONNX graphs were exported {have}; export them with --static "
                          f"{static[0]}x{static[1]} before building static engines")
    return profile


def check_engine(name: str, run: Callable, module: torch.nn.Module, inputs: tuple, bound: float) -> float:
    """Run the engine (`run`) and the eager fp32 network on the same sample inputs; refuse
    an engine whose relative error exceeds `bound`. Returns the error."""
    with torch.inference_mode():
        want = module(*inputs)
    got = run(*inputs)
    pairs = zip(got, want, strict=True) if isinstance(want, tuple) else [(got, want)]  # several outputs: the worst
    err = max(relative_error(g, w) for g, w in pairs)
    if not err <= bound:
        raise FastSDError(f"the {name} engine disagrees with eager PyTorch on its sample inputs "
                          f"(relative error {err:.3g} > {bound}); nothing was written")
    return err
