"""LoRA: low-rank weight deltas fused into a network's weights, as diffusers' `fuse_lora`.

A LoRA file holds, per targeted Linear or Conv2d weight W, two factors `up` (out, r[, 1, 1])
and `down` (r, in[, kh, kw]) and optionally an `alpha`; fusing adds
scale * alpha / r * up @ down to W. Read here: kohya / A1111 files (`lora_unet_...`,
`lora_te_...`, `lora_te1_` / `lora_te2_` for SD-XL, `.lora_down` / `.lora_up` / `.alpha`;
SD-XL UNet names in the original (sgm) layout or diffusers'), diffusers / PEFT files
(`unet.<module>.lora_A` / `.lora_B`, alphas from the file's `lora_adapter_metadata` or
`.alpha` keys) and diffusers' older layouts (`.lora.down` / `.lora.up`, attention
processors' `to_q_lora`). Names are resolved against the loaded model's own modules, so
a key that names nothing in this model is an error, never a silent no-op.

`LoraWeights` keeps the state: the loaded LoRAs in order, and the original value of each
weight any of them touches (not a copy of the model), so a weight is always recomputed
from its original (no drift across scale changes) and unloading restores it bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import InvalidArgumentError, ModelNotFoundError

log = logging.getLogger(__name__)

LORA_NETWORKS = ("text_encoder", "text_encoder_2", "unet")  # networks a LoRA may target
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                 "lora_te2_": "text_encoder_2"}
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_w1": "LoHa (LyCORIS)",
                "lokr_w1": "LoKr (LyCORIS)", "lokr_w2": "LoKr (LyCORIS)", ".diff": "full-weight diff (LyCORIS)",
                "lora_B.bias": "LoRA bias", "lora_up.bias": "LoRA bias"}
SHOWN_KEYS = 3  # unmatched keys named in an error


@dataclass(frozen=True)
class Delta:
    """One weight's low-rank update: W += scale * up @ down (scale = alpha / rank)."""

    network: str  # "unet", "text_encoder" or "text_encoder_2"
    param: str  # the weight, named as in the network's module (NetworkSpec naming: "unet.conv_in.weight")
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    scale: float  # alpha / r

    def tensor(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The full update in float32, shaped like the weight."""
        up = self.up.to(device, torch.float32).flatten(1)
        down = self.down.to(device, torch.float32).flatten(1)
        return (up @ down).reshape(shape) * self.scale


@dataclass
class Lora:
    name: str
    path: str
    deltas: list[Delta]
    scale: float
    seconds: float = 0.0  # how long its last load or scale change took (fusing, and refitting engines)
    networks: tuple[str, ...] = field(default=())

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "scale": self.scale, "weights": len(self.deltas),
                "networks": list(self.networks), "seconds": round(self.seconds, 3)}


# ---- naming: every spelling a LoRA file may use for one of the model's weights ---------------

def _sgm_names(unet) -> dict[str, str]:
    """The UNet's module names in the original (sgm / LDM) layout kohya uses for SD-XL."""
    from .single_file import unet_key

    cfg = unet.config
    up_attn = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    layers = cfg.layers_per_block if isinstance(cfg.layers_per_block, int) else cfg.layers_per_block[0]
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            try:
                out[unet_key(name + ".weight", layers, up_attn).removesuffix(".weight")] = name
            except Exception:  # noqa: BLE001 - a module with no original-layout name (none in SD UNets)
                continue
    return out


def targets(modules: dict[str, nn.Module]) -> dict[str, dict[str, str]]:
    """Per network, every alias of each Linear / Conv2d weight -> its parameter name in the
    wrapped module (`modules`: a family's modules, NetworkSpec naming). Aliases: the model's
    own module name (with or without transformers' `text_model.`), the same with `_` for `.`
    (kohya), and for the UNet the original-layout name of SD-XL kohya files."""
    out: dict[str, dict[str, str]] = {}
    for network in LORA_NETWORKS:
        wrapper = modules.get(network)
        if wrapper is None:
            continue
        (root, inner), = list(wrapper.named_children())  # "unet" / "clip": the wrapped model
        table: dict[str, str] = {}
        names = {n: n for n, m in inner.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n}
        if network == "unet":
            names |= {alias: n for alias, n in _sgm_names(inner).items() if alias not in names}
        for alias, n in names.items():
            param = f"{root}.{n}.weight"
            spellings = {alias}
            if network != "unet":
                bare = alias.removeprefix("text_model.")
                spellings |= {bare, "text_model." + bare}
            for s in spellings:
                table.setdefault(s, param)
                table.setdefault(s.replace(".", "_"), param)
        out[network] = table
    return out


# ---- reading a file ------------------------------------------------------------------------

def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors":
        raise InvalidArgumentError(f"LoRA {path}: only .safetensors LoRA files are read (pickle files run code)")
    if not path.is_file():
        raise ModelNotFoundError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidArgumentError(f"LoRA {path} is not a readable safetensors file: {e}") from None


def _peft_alphas(metadata: dict) -> dict[str, tuple[float | None, dict]]:
    """diffusers' `lora_adapter_metadata`: per network, (lora_alpha, alpha_pattern)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise InvalidArgumentError("the LoRA's lora_adapter_metadata is not JSON") from None
    out = {}
    for network in LORA_NETWORKS:
        config = meta.get(network) if isinstance(meta.get(network), dict) else {
            k.removeprefix(network + "."): v for k, v in meta.items() if k.startswith(network + ".")}
        if config:
            out[network] = (config.get("lora_alpha"), config.get("alpha_pattern") or {})
    return out


def _pair(key: str) -> tuple[str, str, str] | None:
    """(network, module alias, "up" | "down" | "alpha") of one LoRA key, or None if it is not
    a LoRA key fastsd knows."""
    for prefix, network in _KOHYA_PREFIX.items():
        if key.startswith(prefix):
            module, _, rest = key[len(prefix):].partition(".")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(rest)
            return (network, module, part) if part else None
    network, _, rest = key.partition(".")
    if network not in LORA_NETWORKS:
        return None
    for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                         (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                         (".lora_linear_layer.up.weight", "up"), ("_lora.down.weight", "down"),
                         ("_lora.up.weight", "up"), (".alpha", "alpha")):
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if suffix.startswith("_lora"):  # attention processors: attn1.processor.to_q_lora -> attn1.to_q
                module = module.replace(".processor.", ".") + ("" if not module.endswith("to_out") else ".0")
            return network, module, part
    return None


def read_lora(path: str | Path, modules: dict[str, nn.Module], name: str, scale: float) -> Lora:
    """Parse a LoRA file against the model's `modules` (a family's, NetworkSpec naming)."""
    path = Path(path).expanduser()
    tensors, metadata = _read(path)
    for key in tensors:
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise InvalidArgumentError(f"LoRA {path.name}: {what} weights ({key}) are not supported; "
                                           "fastsd reads plain LoRA (up/down factors)")
    table = targets(modules)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        parsed = _pair(key)
        if parsed is None:
            unknown.append(key)
            continue
        network, module, part = parsed
        parts.setdefault((network, module), {})[part] = value
    if unknown:
        raise InvalidArgumentError(f"LoRA {path.name}: {len(unknown)} keys are not LoRA weights fastsd reads, e.g. "
                                   f"{', '.join(unknown[:SHOWN_KEYS])}")
    alphas = _peft_alphas(metadata)
    deltas, missing = [], []
    for (network, module), found in parts.items():
        if "up" not in found or "down" not in found:
            raise InvalidArgumentError(f"LoRA {path.name}: {network} {module} has no "
                                       f"{'up' if 'up' not in found else 'down'} factor")
        param = table.get(network, {}).get(module)
        if param is None:
            missing.append(f"{network}.{module}")
            continue
        up, down, rank, alpha = _factors(path.name, f"{network} {module}", found)
        if alpha is None:
            alpha = _alpha(alphas.get(network), module, rank)
        deltas.append(Delta(network, param, up, down, alpha / rank))
    if missing:
        have = ", ".join(n for n in LORA_NETWORKS if n in modules)
        raise InvalidArgumentError(
            f"LoRA {path.name} does not match this model: {len(missing)} of its {len(parts)} weights name no layer "
            f"of it ({have}), e.g. {', '.join(missing[:SHOWN_KEYS])}")
    if not deltas:
        raise InvalidArgumentError(f"LoRA {path.name} holds no LoRA weights")
    _check_shapes(path.name, deltas, modules)
    nets = tuple(n for n in LORA_NETWORKS if any(d.network == n for d in deltas))
    return Lora(name, str(path), deltas, float(scale), networks=nets)


def _factors(file: str, where: str, found: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int,
                                                                              float | None]:
    """(up, down, rank, alpha or None) of one module's LoRA tensors, checked: factors of a
    Linear (2-D) or Conv2d (4-D) of one rank >= 1, one finite alpha, no NaN or infinity."""
    up, down = found["up"], found["down"]
    for part, t in found.items():
        if not t.is_floating_point():
            raise InvalidArgumentError(f"LoRA {file}: {where}: its {part} tensor is {t.dtype}, not floating point")
        if not torch.isfinite(t).all():
            raise InvalidArgumentError(f"LoRA {file}: {where}: its {part} tensor holds NaN or infinite values; "
                                       "the file is corrupt")
    for part, t in (("up", up), ("down", down)):
        if t.ndim not in (2, 4):
            raise InvalidArgumentError(f"LoRA {file}: {where}: the {part} factor is {tuple(t.shape)}; a LoRA factor "
                                       "is 2-D (Linear) or 4-D (Conv2d)")
    rank = down.shape[0]
    if rank == 0 or up.shape[1] != rank:
        raise InvalidArgumentError(f"LoRA {file}: {where}: up {tuple(up.shape)} and down {tuple(down.shape)} do not "
                                   "share a rank of at least 1")
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise InvalidArgumentError(f"LoRA {file}: {where}: the up factor is {tuple(up.shape)}; a Conv2d LoRA's up "
                                   "factor is (out, rank, 1, 1)")
    alpha = None
    if "alpha" in found:
        if found["alpha"].numel() != 1:
            raise InvalidArgumentError(f"LoRA {file}: {where}: alpha has {found['alpha'].numel()} values; it is one "
                                       "number")
        alpha = float(found["alpha"].reshape(()))
    return up, down, rank, alpha


def _alpha(config: tuple[float | None, dict] | None, module: str, rank: int) -> float:
    """PEFT's alpha of a module: alpha_pattern (a regex matched at the end of the module
    name), else lora_alpha, else the rank (scale 1: diffusers' rule without alphas)."""
    if config is None:
        return float(rank)
    alpha, pattern = config
    if not isinstance(pattern, dict):
        raise InvalidArgumentError(f"the LoRA's alpha_pattern is {type(pattern).__name__}, not an object")
    value = float(rank) if alpha is None else alpha
    for key, v in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                value = v
                break
        except re.error:
            raise InvalidArgumentError(f"the LoRA's alpha_pattern key {key!r} is not a regular expression") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"the LoRA's alpha for {module} in its metadata is {value!r}, not a finite "
                                   "number")
    return float(value)


def _check_shapes(file: str, deltas: list[Delta], modules: dict[str, nn.Module]) -> None:
    params = {n: dict(modules[n].named_parameters()) for n in {d.network for d in deltas}}
    for d in deltas:
        w = params[d.network][d.param]
        out, inner = d.up.shape[0], d.down.flatten(1).shape[1]
        if out != w.shape[0] or out * inner != w.numel():
            raise InvalidArgumentError(
                f"LoRA {file}: {d.param} is {tuple(w.shape)} in this model but the LoRA's update is "
                f"{out}x{inner}: a LoRA for another model (SD 1.x vs 2.x vs SD-XL?)")


# ---- the state: which LoRAs are fused, and the originals to restore ----------------------------

class LoraWeights:
    """The LoRAs fused into a model's weights, in load order, and the original value of every
    weight they touch. `modules()` returns the model's networks (sharing its weights)."""

    def __init__(self, modules):
        self._modules = modules
        self.loras: dict[str, Lora] = {}
        self._originals: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, lora: Lora) -> dict[str, dict[str, torch.Tensor]]:
        if lora.name in self.loras:
            raise InvalidArgumentError(f"a LoRA named {lora.name!r} is already loaded; unload it first or pick "
                                       "another name")
        self.loras[lora.name] = lora
        return self._fuse({(d.network, d.param) for d in lora.deltas})

    def set_scale(self, name: str, scale: float) -> dict[str, dict[str, torch.Tensor]]:
        lora = self._get(name)
        lora.scale = float(scale)
        return self._fuse({(d.network, d.param) for d in lora.deltas})

    def remove_all(self, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        """Remove every LoRA whose name starts with `prefix` (none there: no change)."""
        names = [n for n in self.loras if n.startswith(prefix)]
        touched = {(d.network, d.param) for n in names for d in self.loras[n].deltas}
        for n in names:
            del self.loras[n]
        return self._fuse(touched) if touched else {}

    def remove(self, name: str | None) -> dict[str, dict[str, torch.Tensor]]:
        names = [n for n in self.loras if not n.startswith(TAG)] if name is None else [self._get(name).name]
        touched = {(d.network, d.param) for n in names for d in self.loras[n].deltas}
        for n in names:
            del self.loras[n]
        return self._fuse(touched)

    def overridden(self) -> dict[str, set[str]]:
        """Per network, the weights that differ from the checkpoint's now."""
        out: dict[str, set[str]] = {}
        for network, param in self._originals:
            out.setdefault(network, set()).add(param)
        return out

    def _get(self, name: str) -> Lora:
        if name not in self.loras:
            loaded = ", ".join(map(repr, self.loras)) or "none"
            raise InvalidArgumentError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return self.loras[name]

    def _fuse(self, touched: set[tuple[str, str]]) -> dict[str, dict[str, torch.Tensor]]:
        """Recompute each touched weight from its original and the LoRAs now loaded (in load
        order), in float32; a weight no LoRA touches any more gets its original back exactly.
        Returns per network the weights written (name -> tensor)."""
        modules = self._modules()
        params = {n: dict(modules[n].named_parameters()) for n in {net for net, _ in touched}}
        by_param: dict[tuple[str, str], list[tuple[float, Delta]]] = {}
        for lora in self.loras.values():
            for d in lora.deltas:
                if (d.network, d.param) in touched:
                    by_param.setdefault((d.network, d.param), []).append((lora.scale, d))
        changed: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for key in sorted(touched):
                network, name = key
                w = params[network][name]
                if key not in self._originals:
                    self._originals[key] = w.detach().clone()
                original = self._originals[key]
                if key in by_param:
                    fused = original.to(w.device, torch.float32)
                    for scale, d in by_param[key]:
                        fused = fused + scale * d.tensor(w.shape, w.device)
                    _assign(w, fused.to(w.dtype))
                else:
                    _assign(w, original)
                    del self._originals[key]
                changed.setdefault(network, {})[name] = w.detach()
        return changed


def _assign(w: torch.Tensor, value: torch.Tensor) -> None:
    """Give weight `w` this value. On the CPU its storage is replaced: a checkpoint's weights
    are memory-mapped, and writing into them would first copy every page touched (2 s for a
    rank-32 SD 1.5 LoRA). On a GPU the value is written in place, where captured CUDA graphs
    read it."""
    if w.device.type == "cpu":
        w.data = value
    else:
        w.data.copy_(value)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` (the CLI's --lora) -> (file, scale); a colon not followed by a number
    belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, check_scale(float(tail))
        except (ValueError, InvalidArgumentError):
            pass
    return text, 1.0


def lora_name(path: str | Path, name: str | None) -> str:
    if name is None:
        return Path(path).stem
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"a LoRA name must be a non-empty string, got {name!r}")
    return name


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) < float("inf"):
        raise InvalidArgumentError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


TAG = "<lora>:"  # the prefix of the names prompt-tag LoRAs are fused under


class LoraMethods:
    """Pipeline's LoRA methods (a mixin of fastsd/pipeline.py's Pipeline)."""

    _tagged: tuple[tuple[str, float], ...] = ()  # the <lora:...> tag LoRAs fused now, (name, weight) in order

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Fuse a LoRA (.safetensors: kohya / A1111, or diffusers / PEFT) into the UNet and text
        encoder weights it targets, on eager and, by refit, on engines (an engine that cannot
        be refitted leaves those networks to eager PyTorch while the LoRA is loaded): it costs
        nothing per step. Several may be loaded; each weight is recomputed from its original
        and the LoRAs loaded, in load order. Returns its name (default: the file's stem). A
        file whose keys do not match this model is an InvalidArgumentError naming some."""
        name, scale = lora_name(path, name), check_scale(scale)
        t0 = time.perf_counter()
        lora = read_lora(path, self.family.modules(self.ckpt), name, scale)  # checked before anything changes
        with self._weights_lock.exclusive("load_lora"):
            self._weights_changed(self._loras.add(lora))
        lora.seconds = time.perf_counter() - t0
        log.info("LoRA %s: %d weights of %s fused in %.2fs", name, len(lora.deltas), ", ".join(lora.networks),
                 lora.seconds)
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Re-weight a loaded LoRA (0 disables it) without reading its file again."""
        scale = check_scale(scale)
        t0 = time.perf_counter()
        with self._weights_lock.exclusive("set_lora_scale"):
            self._weights_changed(self._loras.set_scale(name, scale))
            lora = self._loras.loras[name]
            lora.seconds = time.perf_counter() - t0
        log.info("LoRA %s: scale %g in %.2fs", name, scale, lora.seconds)

    def unload_lora(self, name: str | None = None) -> None:
        """Unload one LoRA, or all (None): the weights no LoRA touches any more get their
        original values back, bit for bit."""
        with self._weights_lock.exclusive("unload_lora"):
            self._weights_changed(self._loras.remove(name))

    @property
    def loras(self) -> list[dict]:
        """The loaded LoRAs in load order: name, path, scale, weights, networks, and how long
        its last load or scale change took (fusing and refitting engines), in seconds."""
        return [lora.describe() for lora in self._loras.loras.values() if not lora.name.startswith(TAG)]

    # ---- <lora:NAME:W> prompt tags (prompt_syntax="a1111") ----------------------------------

    def _prompt_loras(self, values: dict) -> tuple[tuple[str, float], ...]:
        """The LoRAs a call's tags ask for, (name, weight) in order, with the tags cut out of
        `values`' texts (changed in place); none for prompt_syntax "plain" (tags are text there,
        as in diffusers). The prompts of one call must name the same LoRAs; a name given two
        weights is an error."""
        from .prompts import A1111, lora_tags

        if values.get("prompt_syntax") != A1111:
            return ()
        wanted: dict[str, float] = {}
        for key in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
            value = values.get(key)
            texts = [value] if isinstance(value, str) else value
            if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
                continue  # not text: the call's own checks say so
            cut = [lora_tags(t) for t in texts]
            if key in ("prompt", "prompt_2") and len({tags for _, tags in cut}) > 1:
                raise InvalidArgumentError("the prompts of one call name different LoRAs: make one call per set of "
                                           "<lora:...> tags", key)
            for _, tags in cut:
                for name, weight in tags:
                    if wanted.setdefault(name, weight) != weight:
                        raise InvalidArgumentError(f"<lora:{name}:...> is given two weights ({wanted[name]:g} and "
                                                   f"{weight:g})", key)
            values[key] = cut[0][0] if isinstance(value, str) else [text for text, _ in cut]
        if wanted:  # a missing folder or name fails before any work
            files = self._lora_files(next(iter(wanted)))
            for name in wanted:
                self._lora_file(name, files)
        return tuple(wanted.items())

    def _lora_files(self, name: str) -> dict[str, Path]:
        """The LoRA tags' files by name: the .safetensors files in lora_dir and the folders below
        it (`name`: a tag's, for the error where there is no folder)."""
        folder = getattr(self, "lora_dir", None)
        if folder is None:
            raise InvalidArgumentError(f"<lora:{name}> needs a LoRA folder: Pipeline.from_pretrained(..., "
                                       "lora_dir=...) (CLI and server: --lora-dir)", "prompt")
        return {f.stem: f for f in sorted(Path(folder).rglob("*.safetensors"))}

    def _lora_file(self, name: str, files: dict[str, Path]) -> Path:
        """The file of a LoRA tag's NAME among `files` (its exact name first, then ignoring case)."""
        if name in files:
            return files[name]
        folded = [f for stem, f in files.items() if stem.lower() == name.lower()]
        if len(folded) == 1:
            return folded[0]
        have = ", ".join(sorted(files)[:10]) or "none"
        raise InvalidArgumentError(f"no LoRA named {name!r} in {self.lora_dir} (.safetensors files there: {have})",
                                   "prompt")

    def _lora_state(self, wanted: tuple[tuple[str, float], ...]):
        """The shared hold of a call on weights with exactly the tag LoRAs `wanted` fused (after
        the explicitly loaded ones): a call that wants another set waits for the calls running,
        switches, and runs; the weights equal loading those LoRAs with load_lora."""
        read: dict = {}

        def read_files() -> None:  # each wanted LoRA's file, once per call
            missing = [(n, w) for n, w in wanted if (n, w) not in read]
            if missing:
                files, modules = self._lora_files(missing[0][0]), self.family.modules(self.ckpt)
                read.update({(n, w): read_lora(self._lora_file(n, files), modules, TAG + n, w) for n, w in missing})

        if wanted != self._tagged:  # read before taking the weights: the switch is then quick
            read_files()

        def switch() -> None:
            t0 = time.perf_counter()
            read_files()  # where another call switched since the check above
            changed: dict[str, dict[str, torch.Tensor]] = {}
            for network, weights in self._loras.remove_all(TAG).items():
                changed.setdefault(network, {}).update(weights)
            for key in wanted:
                for network, weights in self._loras.add(read[key]).items():
                    changed.setdefault(network, {}).update(weights)
            self._weights_changed(changed)
            log.info("LoRA tags: %s -> %s in %.2fs", list(self._tagged) or "none", list(wanted) or "none",
                     time.perf_counter() - t0)
            self._tagged = wanted

        return self._weights_lock.shared_when(lambda: self._tagged == wanted, switch, "a LoRA tag switch")

    def _weights_changed(self, changed: dict[str, dict[str, torch.Tensor]]) -> None:
        """Weights changed: engines are refitted, captured steps dropped."""
        overridden = self._loras.overridden()
        for network, weights in changed.items():
            self.backend.set_weights(network, weights, network not in overridden)
        if "unet" in changed and "unet" not in overridden and getattr(self, "_ip", ()):
            self._ip_refit()  # back at the entry's own weights: its adapters' projections are the loaded ones again
        self._reset_graphs()
