"""The `compiled` engine kind: AOTInductor packages (.pt2) loaded without recompiling.
Packages are tied to the torch version and the device, which the manifest records. A
package holds code only and its weights are the `<network>.weights.safetensors` beside it
(refittable: constants swapped with the package's load_constants), or, built --frozen,
its weights are folded into the code.

Packages load with `run_single_threaded=True`: the default container synchronises threads
with CUDA events, whose queries are illegal while a CUDA graph is captured (every whole-step
capture would be refused) and make each call wait on the previous one's event. The runner's
own lock keeps calls one at a time instead."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from .. import catalog
from ..devices import device_key
from . import as_float, device_index, on_device
from .kind import BuildOptions, EngineKind, EngineRunner, RefitUnsupported, export_module, missing_weights

SEPARATE, FROZEN = "separate", "frozen"  # weights_layout: weights in a file beside the code, or folded into it
FOLDED = "_FOLDED_CONST_"  # constants a package computes from the weights when they are loaded


def weights_name(network: str) -> str:
    """The weights file beside a package that holds code only."""
    return f"{network}.weights.safetensors"


def runtime_facts(device: torch.device) -> dict:
    """Manifest facts a compiled package must match at load time."""
    return {"torch": torch.__version__, "device_key": device_key(device)}


class CompiledRunner(EngineRunner):
    name = "compiled"

    def __init__(self, path: Path, spec, device: torch.device, profile, dtype: torch.dtype,
                 record: dict | None = None, weights: dict[str, torch.Tensor] | None = None):
        super().__init__(spec, profile)
        self.device, self.dtype = device, dtype
        self.lock = threading.Lock()  # a single-threaded package runs one call at a time
        self.separate = bool(record and record.get("weights_layout") == SEPARATE)  # else frozen into the code
        self.constants: set[str] = set()
        with on_device(device):  # the pipeline's GPU, not the current one
            self.model = torch._inductor.aoti_load_package(str(path), run_single_threaded=True,
                                                           device_index=device_index(device))
            if self.separate:  # the package holds code only: its weights are the file beside it, or given
                self.constants = {n for n in self.model.get_constant_fqns() if not n.startswith(FOLDED)}
                if weights is None:
                    from safetensors.torch import load_file

                    weights = load_file(str(path.parent / weights_name(spec.name)), device=str(device))
                    if set(weights) != self.constants:  # the folded ones are computed from these by the package
                        raise RuntimeError(f"{spec.name}.weights.safetensors does not hold the package's constants")
                else:  # the checkpoint's own (the file beside it holds a refit donor's): every constant
                    missing_weights(dict.fromkeys(self.constants), weights)
                    weights = {n: self._cast(weights[n]) for n in self.constants}
                self.model.load_constants(weights, check_full_update=False)
            elif weights is not None:
                raise RuntimeError("its package was built --frozen: weights cannot be given at load")

    def set_weights(self, weights: dict[str, torch.Tensor], at_base: bool) -> None:
        """Swap those constants of the package (a weight it does not use is skipped)."""
        if not self.separate:
            raise RefitUnsupported("its package was built --frozen (weights folded into the code)")
        new = {n: self._cast(t) for n, t in weights.items() if n in self.constants}
        if new:
            with self.lock, on_device(self.device):
                self.model.load_constants(new, check_full_update=False)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        inputs = self.complete(inputs, lambda t: t.dtype(self.dtype))
        args = self.spec.cast(inputs, self.device, self.dtype)
        with self.lock, on_device(self.device), torch.inference_mode():
            out = self.model(*args.values())
        if isinstance(out, (list, tuple)) and len(out) == 1:
            out = out[0]
        return as_float(out)  # several outputs: a tuple in the spec's order


def _build(opts: BuildOptions) -> Path:
    return export_module("compiled").build_compiled(
        opts.model, engine_dir=opts.engine_dir, dtype=opts.dtype, static=opts.static, device=opts.device,
        networks=opts.networks, allow_pickle=opts.allow_pickle, clip_skip=opts.clip_skip, vae=opts.vae,
        frozen=opts.refittable is False, refit=opts.refit, progress=opts.progress,
        controlnets=opts.controlnets, ip_adapters=opts.ip_adapters, max_chunks=opts.max_chunks)


def _load(path: Path, spec, device: torch.device, dtype: torch.dtype, profile,
          record: dict | None = None, weights: dict | None = None) -> CompiledRunner:
    return CompiledRunner(path, spec, device, profile, dtype, record, weights)


KIND = EngineKind(catalog.COMPILED, runtime_facts, _load, _build, builds_alone=True, refit_optional=True)
