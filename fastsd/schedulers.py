"""Samplers as small functions over tensors: noise tables, then pure step functions.

A `Schedule` holds every table one run needs (built once, on the device); a step is a
pure function of (x, model output, schedule, index, noise). No hidden step counters.
Tables are built from the checkpoint's scheduler config in float32 with diffusers' own
operations (betas by torch.linspace, alpha_bar by torch.cumprod), so they match its
schedulers bit for bit.

Notation: alpha_bar = prod(1 - beta) (DDPM), sigma = sqrt((1 - alpha_bar) / alpha_bar)
(Karras et al. 2022, "Elucidating the design space", the VE view of the same process).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch

from .errors import InvalidArgumentError

log = logging.getLogger(__name__)

SAMPLER_NAMES = ("ddim", "pndm", "euler", "euler_a")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")
ZERO_SNR_ALPHA_BAR = 2.0**-24  # what diffusers puts in place of alpha_bar = 0 for Euler

# Defaults each sampler's diffusers counterpart uses for keys absent from the checkpoint
# config (diffusers' from_config fills missing keys from the *target* class).
_DEFAULTS: dict[str, dict] = {
    "ddim": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True},
    "pndm": {"timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False},
    "euler": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
    "euler_a": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
}


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM: alpha_bar before t=0 is 1 (else alpha_bar[0])
    clip_sample: bool = False  # DDIM: clamp x0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023, Algorithm 1

    @classmethod
    def from_dict(cls, raw: dict, sampler: str) -> "SchedulerConfig":
        """Read a diffusers scheduler config as `XScheduler.from_config(raw)` does: keys the
        config lists in `_use_default_values`, and keys it lacks, take the target class's
        defaults."""
        check_sampler(sampler)
        known = {f.name for f in fields(cls)}
        defaulted = set(raw.get("_use_default_values") or ())
        values = {k: v for k, v in raw.items() if k in known and k not in defaulted and v is not None}
        for key, default in _DEFAULTS[sampler].items():
            values.setdefault(key, default)
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(values["trained_betas"])
        cfg = cls(**values)
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise InvalidArgumentError(f"unsupported prediction_type {cfg.prediction_type!r}")
        if cfg.timestep_spacing not in SPACINGS:
            raise InvalidArgumentError(f"unsupported timestep_spacing {cfg.timestep_spacing!r}")
        return cfg


@dataclass(frozen=True)
class Schedule:
    """Every table of one sampling run, indexed by step i = 0..n-1 (n+1 for sigmas)."""

    timesteps: torch.Tensor  # (n,) float32: the UNet's timestep input
    signal: torch.Tensor  # (n,) x_i = signal[i] * x0 + noise_level[i] * eps
    noise_level: torch.Tensor  # (n,)
    input_scale: torch.Tensor  # (n,) UNet input = x_i * input_scale[i]
    init_noise_sigma: float  # pure-noise latents are eps * init_noise_sigma
    alpha_bar: torch.Tensor | None = None  # (n,) DDIM
    alpha_bar_prev: torch.Tensor | None = None  # (n,) DDIM
    sigmas: torch.Tensor | None = None  # (n+1,) Euler, sigmas[n] = 0
    host_timesteps: tuple[float, ...] = ()  # the timesteps on the host, for callbacks (no device read)

    def __len__(self) -> int:
        return len(self.timesteps)


def check_sampler(name: str) -> None:
    if name not in SAMPLER_NAMES:
        raise InvalidArgumentError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")


# diffusers scheduler classes fastsd runs, and the options each must have for it to.
DIFFUSERS_CLASSES = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
                     "EulerAncestralDiscreteScheduler": "euler_a"}
CLASS_OF = {name: cls for cls, name in DIFFUSERS_CLASSES.items()}
_SIGMA_OPTIONS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "use_flow_sigmas": False}
_NEEDS: dict[str, dict] = {  # option -> the only value fastsd runs (absent keys take diffusers' defaults)
    "ddim": {"thresholding": False},
    "pndm": {"skip_prk_steps": True},  # PLMS; PNDM's Runge-Kutta warm-up is not implemented
    "euler": dict(_SIGMA_OPTIONS, interpolation_type="linear", timestep_type="discrete", sigma_min=None,
                  sigma_max=None, final_sigmas_type="zero"),
    "euler_a": dict(_SIGMA_OPTIONS),
}
_CLASS_DEFAULTS = {"skip_prk_steps": False, "interpolation_type": "linear", "timestep_type": "discrete",
                   "final_sigmas_type": "zero"}


class SchedulerConfigDict(dict):
    """A scheduler config as diffusers hands it out: a dict whose keys read as attributes too
    (`pipe.scheduler.config.prediction_type`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no {name!r}") from None


class SchedulerChoice:
    """What `pipe.scheduler` holds: a fastsd sampler and the diffusers-style config it reads.
    `.config` is a diffusers config dict (with `_class_name`), so diffusers' idiom
    `pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)`
    works unchanged."""

    def __init__(self, name: str | None, config: dict, problem: str | None = None):
        """`name` None: the checkpoint's own scheduler is one fastsd cannot run (`problem`
        says why); its config still serves `XScheduler.from_config(pipe.scheduler.config)`."""
        self.name, self.problem = name, problem
        self._config = dict(config) if name is None else dict(config, _class_name=CLASS_OF[name])
        self.settings = None if name is None else SchedulerConfig.from_dict(self._config, name)  # validates it

    @property
    def config(self) -> SchedulerConfigDict:
        return SchedulerConfigDict(self._config)

    def __repr__(self) -> str:
        return f"SchedulerChoice({self.name!r}, {self.settings})"


def pipeline_scheduler_config(raw: dict) -> dict:
    """A checkpoint's scheduler config as StableDiffusionPipeline.__init__ leaves it: legacy
    configs get steps_offset = 1 and clip_sample = False."""
    config = dict(raw, steps_offset=1)
    if config.get("clip_sample") is True:
        config["clip_sample"] = False
    return config


def default_scheduler(config: dict) -> SchedulerChoice:
    """The checkpoint's own scheduler, or, where fastsd cannot run it, a choice that says why
    (an error when a call relies on it, a warning now)."""
    try:
        return choose_scheduler(None, config)
    except InvalidArgumentError as e:
        log.warning("%s", e)
        return SchedulerChoice(None, config, str(e))


def choose_scheduler(value, config: dict) -> SchedulerChoice:
    """`value` as fastsd runs it: None (the class `config` names: the checkpoint's own), a
    fastsd sampler name (reading `config` as its diffusers class's from_config would), a
    SchedulerChoice, or a diffusers scheduler object (mapped by class and config). One
    fastsd cannot run is an InvalidArgumentError, never replaced by another."""
    if isinstance(value, SchedulerChoice):
        if value.name is None:
            raise InvalidArgumentError(value.problem)
        return value
    if value is None:
        cls = config.get("_class_name")
        if cls not in DIFFUSERS_CLASSES:
            raise InvalidArgumentError(f"the checkpoint's scheduler {cls} is not one fastsd runs; pass scheduler= "
                                       f"one of {', '.join(SAMPLER_NAMES)} (or set pipe.scheduler)")
        name, what = DIFFUSERS_CLASSES[cls], f"the checkpoint's {cls}"
    elif isinstance(value, str):
        check_sampler(value)
        name, what = value, f"scheduler {value!r}"
        config = dict(config, skip_prk_steps=True) if value == "pndm" else config  # the name means PLMS
    elif hasattr(value, "config") and type(value).__name__.endswith("Scheduler"):
        cls = type(value).__name__
        if cls not in DIFFUSERS_CLASSES:
            raise InvalidArgumentError(f"fastsd cannot run diffusers' {cls}; it runs "
                                       f"{', '.join(DIFFUSERS_CLASSES)} (or the names {', '.join(SAMPLER_NAMES)})")
        name, what, config = DIFFUSERS_CLASSES[cls], cls, dict(value.config)
    else:
        raise InvalidArgumentError(f"scheduler must be a name ({', '.join(SAMPLER_NAMES)}) or a diffusers "
                                   f"scheduler object, not {type(value).__name__}")
    for key, needed in _NEEDS[name].items():
        have = config.get(key, _CLASS_DEFAULTS.get(key, needed))
        if have != needed:
            raise InvalidArgumentError(f"fastsd cannot run {what} with {key}={have!r} (it runs {key}={needed!r})")
    return SchedulerChoice(name, config)


# ---- tables -------------------------------------------------------------------------


def betas(cfg: SchedulerConfig) -> torch.Tensor:
    """(num_train_timesteps,) float32, built with diffusers' float32 torch ops (so every table
    derived from it matches diffusers' schedulers bit for bit)."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return torch.tensor(cfg.trained_betas, dtype=torch.float32)
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":  # LDM: linear in sqrt(beta)
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. (17), in float64, then float32
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    raise InvalidArgumentError(f"unsupported beta_schedule {cfg.beta_schedule!r}")


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), DDPM eq. (4), float32; optionally zero
    terminal SNR (Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar), then back
    to betas, as diffusers does it)."""
    beta = betas(cfg)
    if cfg.rescale_betas_zero_snr:
        root = torch.cumprod(1.0 - beta, dim=0).sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        alpha_bar = root**2
        beta = 1 - torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return torch.cumprod(1.0 - beta, dim=0)


def spaced_timesteps(cfg: SchedulerConfig, steps: int, integer: bool) -> np.ndarray:
    """The n timesteps of a run, high to low (Lin et al. 2023, Table 2 spacings)."""
    n_train = cfg.num_train_timesteps
    if steps > n_train:
        raise InvalidArgumentError(f"num_inference_steps {steps} exceeds num_train_timesteps {n_train}")
    if cfg.timestep_spacing == "linspace":  # Euler (not integer) spaces them in float32, as diffusers
        t = np.linspace(0, n_train - 1, steps, dtype=np.float64 if integer else np.float32)[::-1]
        return t.round() if integer else t
    if cfg.timestep_spacing == "leading":
        return (np.arange(steps) * (n_train // steps)).round()[::-1] + cfg.steps_offset
    ratio = n_train / steps  # trailing
    return np.round(np.arange(n_train, 0, -ratio)) - 1


def _tensor(a, device) -> torch.Tensor:
    return torch.as_tensor(np.array(a), dtype=torch.float32, device=device)  # a copy: positive strides


def ddim_schedule(cfg: SchedulerConfig, steps: int, device="cpu") -> Schedule:
    alpha_bar_all = alphas_cumprod(cfg).numpy()
    t = spaced_timesteps(cfg, steps, integer=True).astype(np.int64)
    prev = t - cfg.num_train_timesteps // steps
    final = 1.0 if cfg.set_alpha_to_one else alpha_bar_all[0]
    alpha_bar = alpha_bar_all[t]
    alpha_bar_prev = np.where(prev >= 0, alpha_bar_all[np.clip(prev, 0, None)], final)
    return Schedule(
        timesteps=_tensor(t, device),
        host_timesteps=tuple(float(v) for v in t.astype(np.float32)),
        signal=_tensor(np.sqrt(alpha_bar), device),
        noise_level=_tensor(np.sqrt(1 - alpha_bar), device),
        input_scale=_tensor(np.ones(steps), device),
        init_noise_sigma=1.0,
        alpha_bar=_tensor(alpha_bar, device),
        alpha_bar_prev=_tensor(alpha_bar_prev, device),
    )


def pndm_schedule(cfg: SchedulerConfig, steps: int, device="cpu") -> Schedule:
    """PLMS (PNDMScheduler with skip_prk_steps): the n spaced timesteps with the second one
    repeated, n + 1 UNet calls (the repeat is the second-order start of PLMS)."""
    alpha_bar_all = alphas_cumprod(cfg).numpy()
    t = spaced_timesteps(cfg, steps, integer=True).astype(np.int64)[::-1]  # ascending, as diffusers builds it
    t = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1]
    alpha_bar = alpha_bar_all[t]
    return Schedule(
        timesteps=_tensor(t, device),
        host_timesteps=tuple(float(v) for v in t.astype(np.float32)),
        signal=_tensor(np.sqrt(alpha_bar), device),
        noise_level=_tensor(np.sqrt(1 - alpha_bar), device),
        input_scale=_tensor(np.ones(len(t)), device),
        init_noise_sigma=1.0,
    )


def _sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of a noise level: linear in log sigma between the
    two neighbouring training steps (as diffusers' EulerDiscreteScheduler._sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def euler_schedule(cfg: SchedulerConfig, steps: int, device="cpu", timesteps=None, sigmas=None) -> Schedule:
    """Euler's sigmas at the spaced timesteps, or at custom `timesteps`, or custom `sigmas`
    (their last value is where sampling ends), as EulerDiscreteScheduler.set_timesteps."""
    alpha_bar_all = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        alpha_bar_all[-1] = ZERO_SNR_ALPHA_BAR
    sigma_all = (((1 - alpha_bar_all) / alpha_bar_all) ** 0.5).numpy()  # float32, as diffusers
    if sigmas is not None:
        sigma_ext = np.array(sigmas).astype(np.float32)
        t = np.array([_sigma_to_t(v, np.log(sigma_all)) for v in sigma_ext[:-1]]).astype(np.float32)
        sigma = sigma_ext[:-1]
    else:
        t = np.array(timesteps).astype(np.float32) if timesteps is not None else \
            spaced_timesteps(cfg, steps, integer=False)
        sigma = np.interp(t, np.arange(len(sigma_all)), sigma_all).astype(np.float32)  # linear in t
        sigma_ext = np.append(sigma, np.float32(0.0)).astype(np.float32)
    sigma_max = torch.tensor(sigma_ext.max())
    init = sigma_max if cfg.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return Schedule(
        timesteps=_tensor(t, device),
        host_timesteps=tuple(float(v) for v in t.astype(np.float32)),
        signal=_tensor(np.ones(len(t)), device),
        noise_level=_tensor(sigma, device),
        input_scale=_tensor(1 / np.sqrt(sigma**2 + 1), device),
        init_noise_sigma=float(init),
        sigmas=_tensor(sigma_ext, device),
    )


# ---- steps --------------------------------------------------------------------------
#
# Each sampler precomputes one row of float32 coefficients per step from its tables (the
# same float32 operations its step would otherwise do per step, so results are bit for bit
# those of computing them in the loop); a step is then a pure function of (x, model output,
# that row, noise). Nothing in a step reads a device value on the host, and a step can be
# replayed inside a CUDA graph with the row copied into a static buffer.


def ddim_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    """(n, 5): sqrt(alpha_bar), sqrt(1 - alpha_bar), the DDIM eq. (12) weights of x0 and
    eps, and the std of the fresh noise (DDIM eq. (16), times eta)."""
    alpha_bar, alpha_bar_prev = sched.alpha_bar, sched.alpha_bar_prev
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    std = eta * variance**0.5
    return torch.stack([alpha_bar**0.5, (1 - alpha_bar) ** 0.5, alpha_bar_prev**0.5,
                        (1 - alpha_bar_prev - std**2) ** 0.5, std], dim=1)


def ddim_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None):
    root_ab, root_1m_ab, w_x0, w_eps, std = c[0], c[1], c[2], c[3], c[4]
    if cfg.prediction_type == "epsilon":  # DDIM eq. (9)
        x0, eps = (x - root_1m_ab * out) / root_ab, out
    else:  # v: Salimans & Ho 2022
        x0, eps = root_ab * x - root_1m_ab * out, root_ab * out + root_1m_ab * x
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    x_prev = w_x0 * x0 + w_eps * eps  # DDIM eq. (12)
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev


# PLMS: linear multistep over the last model outputs (Liu et al. 2022, "Pseudo numerical
# methods", eq. (12); the PLMS of latent-diffusion, as diffusers' PNDMScheduler.step_plms).
# The history (the first step's sample, the last three outputs) is carried explicitly:
# step k of a run (k counts from the first step run, as diffusers' counter) reads one row
# of weights, so every step has the same arithmetic and can be one CUDA graph.
_PLMS_WEIGHTS = {0: ((1, 0, 0, 0), 1), 1: ((1, 1, 0, 0), 2), 2: ((3, -1, 0, 0), 2), 3: ((23, -16, 5, 0), 12),
                 4: ((55, -59, 37, -9), 24)}
PNDM_HISTORY = 4  # carried tensors: the first step's sample, then outputs e1 (newest), e2, e3


def pndm_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    """(n, 14): per step the weights of (out, e1, e2, e3) and their divisor; the weights of x
    and of the kept first sample in the sample stepped from; whether the output joins the
    history; whether x is kept as the first sample; then sqrt(alpha_bar_t), sqrt(1 -
    alpha_bar_t), sqrt(ab_prev / ab_t), ab_prev - ab_t and the update's denominator, in
    float32 with diffusers' operations."""
    alpha_bar_all = alphas_cumprod(cfg)
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else alpha_bar_all[0]
    ratio = cfg.num_train_timesteps // max(len(sched) - 1, 1)  # n + 1 timesteps for n steps
    rows = []
    for i, t_given in enumerate(sched.host_timesteps):
        k = max(i - start, 0)  # diffusers' counter: counts from the first step run
        t, prev = int(t_given), int(t_given) - ratio
        if k == 1:  # the repeated timestep: a second-order step from the first sample, t + ratio -> t
            t, prev = t + ratio, t
        ab = alpha_bar_all[t]
        ab_prev = alpha_bar_all[prev] if prev >= 0 else final
        weights, divisor = _PLMS_WEIGHTS[min(k, 4)]
        denom = ab * (1 - ab_prev) ** 0.5 + (ab * (1 - ab) * ab_prev) ** 0.5
        flags = (0.0, 1.0, 0.0, 0.0) if k == 1 else (1.0, 0.0, 1.0, 1.0 if k == 0 else 0.0)
        row = [*weights, divisor, *flags, ab**0.5, (1 - ab) ** 0.5, (ab_prev / ab) ** 0.5, ab_prev - ab, denom]
        rows.append(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in row]))
    return torch.stack(rows).to(sched.timesteps.device)


def pndm_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None, history=None):
    """-> (x_prev, history'); history = (first sample, e1, e2, e3), zeros before the first step."""
    first, e1, e2, e3 = history
    eps = (c[0] * out + c[1] * e1 + c[2] * e2 + c[3] * e3) / c[4]
    sample = c[5] * x + c[6] * first
    if cfg.prediction_type == "v_prediction":
        eps = c[9] * eps + c[10] * sample
    x_prev = c[11] * sample - c[12] * eps / c[13]
    push, take = c[7], c[8]
    kept = 1 - push
    history = (take * x + (1 - take) * first, push * out + kept * e1, push * e1 + kept * e2, push * e2 + kept * e3)
    return x_prev, history


def _sigma_rows(sigma: torch.Tensor, step_to: torch.Tensor) -> list[torch.Tensor]:
    """sigma, the step in sigma, and the v-prediction weights of x0 = a * out + x / b."""
    return [sigma, step_to - sigma, -sigma / (sigma**2 + 1) ** 0.5, sigma**2 + 1]


def euler_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    """(n, 4): Euler from sigma to sigma_next (Karras et al. 2022, Algorithm 1, no churn)."""
    return torch.stack(_sigma_rows(sched.sigmas[:-1], sched.sigmas[1:]), dim=1)


def euler_ancestral_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 1.0,
                                 start: int = 0) -> torch.Tensor:
    """(n, 5): Euler to sigma_down, then fresh noise of std sigma_up (k-diffusion get_ancestral_step)."""
    sigma, sigma_next = sched.sigmas[:-1], sched.sigmas[1:]
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return torch.stack(_sigma_rows(sigma, sigma_down) + [sigma_up], dim=1)


def _sigma_x0(x, out, c, prediction_type):
    """x0 from the model output at noise level sigma = c[0] (x = x0 + sigma * eps)."""
    if prediction_type == "epsilon":
        return x - c[0] * out
    return out * c[2] + x / c[3]


def euler_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None):
    d = (x - _sigma_x0(x, out, c, cfg.prediction_type)) / c[0]  # Karras et al. 2022, eq. (5)
    return x + d * c[1]


def euler_ancestral_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None):
    return euler_step(x, out, c, cfg) + noise * c[4]


@dataclass(frozen=True)
class Sampler:
    name: str
    schedule: Callable[..., Schedule]  # (cfg, steps, device) -> Schedule
    coefficients: Callable[..., torch.Tensor]  # (sched, cfg, eta, start) -> (n, K) float32, one row per step
    step: Callable[..., torch.Tensor]  # (x, out, row, cfg, noise[, history]) -> x_prev[, history']
    draws_noise: Callable[[float], bool]  # eta -> does step() take fresh noise?
    history: int = 0  # multistep samplers: how many tensors of x's shape a step carries to the next
    loop_steps: Callable[[int], int] = lambda steps: steps  # schedule length (UNet calls) for `steps`
    custom_schedule: bool = False  # schedule() takes timesteps= / sigmas= (as its diffusers class's set_timesteps)


SAMPLERS = {
    "ddim": Sampler("ddim", ddim_schedule, ddim_coefficients, ddim_step, lambda eta: eta > 0),
    "pndm": Sampler("pndm", pndm_schedule, pndm_coefficients, pndm_step, lambda eta: False, PNDM_HISTORY,
                    lambda steps: steps + 1 if steps > 1 else 1),
    "euler": Sampler("euler", euler_schedule, euler_coefficients, euler_step, lambda eta: False,
                     custom_schedule=True),
    "euler_a": Sampler("euler_a", euler_schedule, euler_ancestral_coefficients, euler_ancestral_step,
                       lambda eta: True),
}


def add_noise(sched: Schedule, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
    """Noise a clean latent to step i of the schedule (forward process, DDPM eq. (4))."""
    return sched.signal[i] * x0 + sched.noise_level[i] * noise


def first_step(steps: int, strength: float) -> int:
    """Index of the first step an img2img/inpaint run takes (as diffusers' get_timesteps)."""
    init_steps = min(int(steps * strength), steps)
    return max(steps - init_steps, 0)
