"""The denoising loop: one step function, run step by step or replayed as one CUDA graph.

A step is the UNet (+ CFG) + the sampler update (+ the inpaint blend). It is a function
of the latents x, one row of per-step numbers (timestep, UNet input scale, the inpaint
re-noising weights, the sampler's coefficients) and that step's noise, drawn before the
loop. What else it reads (text embeddings, inpaint latents and mask, 9-channel
conditioning) is bound once per call. Nothing in the loop reads a device value on the
host, so on CUDA the loop never waits for the GPU.

With `cuda_graphs`, the whole step is captured once per shape and setting (`StepKey`) and
replayed for every step: per step, the row and the noise are copied into the graph's
static buffers and the graph runs, one launch instead of hundreds.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable

import torch

from .backends.cuda_graphs import capture
from .guidance import blend, cfg_denoiser, control_residuals, unet_denoiser
from .networks import IP_PREFIXES
from .schedulers import SAMPLERS, Schedule, SchedulerConfig, vp_x0

log = logging.getLogger(__name__)

# columns of a step row: timestep, UNet input scale, the inpaint re-noising weights (to the next
# step), the VP weights of the UNet input (x * scale = a x0 + s eps: previews' x0), then the sampler's,
# then with ControlNets each one's scale at that step (0 outside its guidance window)
ROW_T, ROW_SCALE, ROW_SIGNAL, ROW_LEVEL, ROW_A, ROW_S, ROW_COEF = 0, 1, 2, 3, 4, 5, 6


@dataclass
class StepInputs:
    """Tensors a step reads besides x: bound once per call (static buffers in a graph)."""

    unet_inputs: dict[str, torch.Tensor]  # the family's UNet conditioning, [uncond; cond] with CFG
    conditioning: torch.Tensor | None = None  # 9-channel UNets: mask + masked-image latents
    x0: torch.Tensor | None = None  # 4-channel inpaint: clean image latents
    noise: torch.Tensor | None = None  # 4-channel inpaint: the noise that made the first latents
    mask: torch.Tensor | None = None  # 4-channel inpaint: 1 = repaint
    control: tuple[torch.Tensor, ...] = ()  # ControlNets: each one's conditioning image, [uncond; cond] with CFG

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"unet.{n}": t for n, t in self.unet_inputs.items()}
        out.update((f.name, getattr(self, f.name)) for f in fields(self)
                   if f.name not in ("unet_inputs", "control") and getattr(self, f.name) is not None)
        out.update((f"control.{j}", t) for j, t in enumerate(self.control))
        return out

    def clone(self) -> "StepInputs":
        same = lambda t: None if t is None else t.clone()  # noqa: E731
        return StepInputs({n: t.clone() for n, t in self.unet_inputs.items()}, same(self.conditioning),
                          same(self.x0), same(self.noise), same(self.mask), tuple(t.clone() for t in self.control))


@dataclass(frozen=True)
class StepKey:
    """What a step bakes in besides tensors: settings, and every tensor's shape."""

    sampler: str
    scheduler_config: SchedulerConfig  # the sampler's settings (not CFG: that is do_cfg, guidance_scale)
    guidance_scale: float
    do_cfg: bool
    draws_noise: bool
    shapes: tuple  # ((name, shape), ...) of x and the StepInputs
    guidance_rescale: float = 0.0
    preview: bool = False  # the state also carries the step's x0 estimate (live previews)
    controlnets: tuple[str, ...] = ()  # the ControlNet networks run, one row column each
    residuals: tuple[str, ...] = ()  # the UNet's residual inputs they feed


def step_rows(sched: Schedule, sampler: str, config: SchedulerConfig, eta: float, start: int = 0) -> torch.Tensor:
    """(n - start, 4 + K) float32 on the host: one row per step run, from step
    `start`. The inpaint weights of row i re-noise the clean latents to step i + 1 (the
    last row: the clean latents)."""
    signal_next = torch.cat([sched.signal[1:], sched.signal.new_ones(1)])
    level_next = torch.cat([sched.noise_level[1:], sched.noise_level.new_zeros(1)])
    fixed = torch.stack([sched.timesteps, sched.input_scale, signal_next, level_next,
                         sched.signal * sched.input_scale, sched.noise_level * sched.input_scale], dim=1)
    return torch.cat([fixed, SAMPLERS[sampler].coefficients(sched, config, eta, start)], dim=1)[start:]


def make_step(unet: Callable, key: StepKey, inputs: StepInputs, controlnet: Callable | None = None) -> Callable:
    """step(state, row, noise, control=True) -> the state after one step: the latents, the
    sampler's history, and with `key.preview` the step's estimate of the clean latents x0
    last. With `key.controlnets`, `controlnet(name, inputs)` runs each on the step's latents
    (its scale: the row's last columns); `control` False skips them (a step outside every
    guidance window, whose residuals would all be zeros: the UNet runs without them)."""
    sampler = SAMPLERS[key.sampler]
    k = len(key.controlnets)
    text = {n: t for n, t in inputs.unet_inputs.items() if not n.startswith(IP_PREFIXES)}  # not the image prompt's
    residuals = control_residuals(controlnet, key.controlnets, inputs.control, text, key.residuals) if k else None
    denoise = unet_denoiser(unet, inputs.unet_inputs, inputs.conditioning, residuals)
    if key.do_cfg:
        denoise = cfg_denoiser(denoise, key.guidance_scale, key.guidance_rescale)

    def step(state, row, noise, control=True):
        x = state[0]
        x_in = x * row[ROW_SCALE]
        coef = row[ROW_COEF:row.shape[0] - k]
        out = denoise(x_in, row[ROW_T], row[row.shape[0] - k:] if k and control else None)
        if sampler.history:  # a multistep sampler carries its history in the state
            x, history = sampler.step(x, out, coef, key.scheduler_config, noise, state[1:1 + sampler.history])
        else:
            x, history = sampler.step(x, out, coef, key.scheduler_config, noise), ()
        if inputs.mask is not None:
            x = blend(x, row[ROW_SIGNAL] * inputs.x0 + row[ROW_LEVEL] * inputs.noise, inputs.mask)
        if not key.preview:
            return (x, *history)
        # the UNet's input is VP: a x0 + s eps (DDPM eq. (4))
        return (x, *history, vp_x0(x_in, out, row[ROW_A], row[ROW_S], key.scheduler_config.prediction_type))

    return step


def initial_state(sampler: str, x: torch.Tensor, preview: bool = False) -> tuple[torch.Tensor, ...]:
    """The loop's state before the first step: the latents, the sampler's history (zeros),
    with previews a slot for x0."""
    return (x, *(torch.zeros_like(x) for _ in range(SAMPLERS[sampler].history + preview)))


def run_steps(step: Callable, state: tuple, rows: torch.Tensor, noises: torch.Tensor | None,
              host_t: tuple[float, ...], callback: Callable | None, preview: bool = False,
              control: tuple[bool, ...] | None = None) -> torch.Tensor:
    """The loop; `callback(k, t, latents, x0)` after each step (x0: the step's clean-latent
    estimate with previews, else None) may return latents to go on with. `control[k]`: whether
    step k runs the ControlNets (known on the host: their scales are in the rows)."""
    for k in range(len(rows)):
        state = step(state, rows[k], None if noises is None else noises[k], control is None or control[k])
        if callback is not None:
            replaced = callback(k, host_t[k], state[0], state[-1] if preview else None)
            if replaced is not None:
                state = (replaced.to(state[0].device, state[0].dtype), *state[1:])
    return state[0]


def store_state(static: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> None:
    """Write the step's new state into the state it read (a graph's static buffers). A sampler
    may return tensors of the state it was given (Heun keeps its start x, UniPC shifts its
    history along): those are copied out first, or an earlier slot's write would change them."""
    held = {t.untyped_storage().data_ptr() for t in static}
    new = tuple(t.clone() if t.untyped_storage().data_ptr() in held else t for t in new)
    for s, t in zip(static, new, strict=True):
        s.copy_(t)


class _StepGraph:
    """One captured step: static x, row, noise and inputs; the graph writes x in place.
    `ran` is what ran each network during the capture (what every replay runs)."""

    def __init__(self, unet, key: StepKey, inputs: StepInputs, state, row, noise, pool, controlnet=None):
        self.inputs = inputs.clone()
        self.state, self.row = tuple(t.clone() for t in state), row.clone()
        self.noise = None if noise is None else noise.clone()
        self.ran: dict[str, str] = {}
        self.preview = key.preview
        step = make_step(partial(unet, ran=self.ran), key, self.inputs,
                         None if controlnet is None else partial(controlnet, ran=self.ran))

        def replayed():  # the graph writes the new state into its own input; run() sets it first
            store_state(self.state, step(self.state, self.row, self.noise))

        self.graph, _ = capture(replayed, pool, row.device)

    def run(self, inputs: StepInputs, state, rows, noises, host_t, callback, ran: dict) -> torch.Tensor:
        for static, t in zip(self.inputs.tensors().values(), inputs.tensors().values(), strict=True):
            static.copy_(t)
        ran.update(self.ran)
        for static, t in zip(self.state, state, strict=True):
            static.copy_(t)
        for k in range(len(rows)):
            self.row.copy_(rows[k])
            if self.noise is not None:
                self.noise.copy_(noises[k])
            self.graph.replay()
            if callback is not None:
                replaced = callback(k, host_t[k], self.state[0].clone(),
                                    self.state[-1].clone() if self.preview else None)
                if replaced is not None:
                    self.state[0].copy_(replaced)
        return self.state[0].clone()


class StepGraphs:
    """Whole-step CUDA graphs of one pipeline: one per StepKey, sharing one memory pool.
    Replays share static buffers, so one call replays at a time (a lock). A step that
    cannot be captured (an engine that synchronises, for example ONNX Runtime) is run
    step by step from then on, with a warning once."""

    def __init__(self):
        self.graphs: dict[StepKey, _StepGraph] = {}
        self.refused: set[StepKey] = set()
        self.pool = None
        self.lock = threading.Lock()

    def run(self, unet, key: StepKey, inputs: StepInputs, state, rows, noises, host_t, callback, ran: dict,
            controlnet=None):
        """The final latents, or None where this step cannot run as a graph. `unet` (and
        `controlnet(name, inputs, ran=)`) are the backend's (they record what ran into the
        capture's own dict, copied into `ran`). The graph runs the ControlNets at every step
        (outside a guidance window at scale 0, as diffusers)."""
        if key in self.refused:
            return None
        with self.lock:
            graph = self.graphs.get(key)
            if graph is None:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                try:
                    graph = _StepGraph(unet, key, inputs, state, rows[0], None if noises is None else noises[0],
                                       self.pool, controlnet)
                except Exception as e:  # noqa: BLE001 - anything that cannot be captured runs uncaptured
                    self.refused.add(key)
                    log.warning("cannot capture the denoising step as a CUDA graph (%s); running it step by step",
                                str(e).splitlines()[0] if str(e) else type(e).__name__)
                    return None
                self.graphs[key] = graph
            return graph.run(inputs, state, rows, noises, host_t, callback, ran)
