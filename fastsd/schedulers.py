"""Samplers as small functions over tensors: noise tables, then pure step functions.

A `Schedule` holds every table one run needs, built once on the host (diffusers' schedulers
compute their coefficients on the host too); the pipeline moves the per-step rows to the
device once, before the loop. A step is a pure function of (x, model output, one row of
coefficients, the scheduler config, noise[, history]): it returns the next x, or (next x,
history') for samplers that carry a history (multistep, Heun, PLMS). No hidden step counters.
Tables are built from the checkpoint's scheduler config in float32 with diffusers' own
operations (betas by torch.linspace, alpha_bar by torch.cumprod), so they match its
schedulers bit for bit.

Notation: alpha_bar = prod(1 - beta) (DDPM), sigma = sqrt((1 - alpha_bar) / alpha_bar)
(Karras et al. 2022, "Elucidating the design space", the VE view of the same process).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from functools import lru_cache, partial
from typing import Callable

import numpy as np
import torch

from .arguments import check_value
from .errors import InvalidArgumentError
from .sampler_names import SAMPLER_NAMES

log = logging.getLogger(__name__)

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
    "heun": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
    "dpmpp_2m": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
    "unipc": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
    "lcm": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": False},
}
for _name in ("euler_karras", "dpmpp_2m_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras"):
    _DEFAULTS[_name] = _DEFAULTS[_name.removesuffix("_karras").removesuffix("_sde")]


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
    original_inference_steps: int = 50  # LCM: the distillation's step grid
    timestep_scaling: float = 10.0  # LCM: boundary-condition scalings c_skip, c_out

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
    check_value("scheduler", name)


# diffusers scheduler classes fastsd runs: each class is one fastsd sampler, and some
# options of it name another (`VARIANTS`: DPM-Solver's SDE algorithm, Karras sigmas).
DIFFUSERS_CLASSES = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
                     "EulerAncestralDiscreteScheduler": "euler_a", "HeunDiscreteScheduler": "heun",
                     "DPMSolverMultistepScheduler": "dpmpp_2m", "UniPCMultistepScheduler": "unipc",
                     "LCMScheduler": "lcm"}
_KARRAS, _SDE = {"use_karras_sigmas": True}, {"algorithm_type": "sde-dpmsolver++"}
VARIANTS = {"euler_karras": ("euler", _KARRAS), "dpmpp_2m_karras": ("dpmpp_2m", _KARRAS),
            "dpmpp_2m_sde": ("dpmpp_2m", _SDE), "dpmpp_2m_sde_karras": ("dpmpp_2m", {**_SDE, **_KARRAS})}
BASE_OF = {name: name for name in DIFFUSERS_CLASSES.values()} | {n: base for n, (base, _) in VARIANTS.items()}
CLASS_OF = {name: cls for cls, base in DIFFUSERS_CLASSES.items() for name, b in BASE_OF.items() if b == base}
# The options a name sets on the config it is chosen with (`pipe.scheduler = "dpmpp_2m_karras"` is
# DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)); the plain names set the
# variants' options back.
OPTIONS_OF = {"euler": {"use_karras_sigmas": False}, "euler_karras": _KARRAS,
              "dpmpp_2m": {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"},
              "dpmpp_2m_karras": {**_KARRAS, "algorithm_type": "dpmsolver++"},
              "dpmpp_2m_sde": {"use_karras_sigmas": False, **_SDE}, "dpmpp_2m_sde_karras": {**_SDE, **_KARRAS}}
_SIGMA_OPTIONS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "use_flow_sigmas": False}
_OTHER_SIGMAS = {k: v for k, v in _SIGMA_OPTIONS.items() if k != "use_karras_sigmas"}
_EULER = dict(_OTHER_SIGMAS, interpolation_type="linear", timestep_type="discrete", sigma_min=None, sigma_max=None,
              final_sigmas_type="zero")
_DPM = dict(_OTHER_SIGMAS, solver_order=2, solver_type="midpoint", thresholding=False, lower_order_final=True,
            euler_at_final=False, final_sigmas_type="zero", use_lu_lambdas=False, variance_type=None,
            lambda_min_clipped=-math.inf)
_NEEDS: dict[str, dict] = {  # option -> the only value fastsd runs (a tuple: the values it runs)
    "ddim": {"thresholding": False},
    "pndm": {"skip_prk_steps": True},  # PLMS; PNDM's Runge-Kutta warm-up is not implemented
    "euler": _EULER, "euler_karras": _EULER,
    "euler_a": dict(_SIGMA_OPTIONS),
    "heun": dict(_SIGMA_OPTIONS),
    "dpmpp_2m": _DPM, "dpmpp_2m_karras": _DPM, "dpmpp_2m_sde": _DPM, "dpmpp_2m_sde_karras": _DPM,
    # bh2 (diffusers maps the DPM-Solver names of solver_type to it), UniC after every step
    "unipc": dict(_SIGMA_OPTIONS, solver_order=2, solver_type=("bh2", "midpoint", "heun", "logrho"),
                  predict_x0=True, lower_order_final=True, disable_corrector=[], solver_p=None, thresholding=False,
                  final_sigmas_type="zero"),
    "lcm": {"thresholding": False},
}
_CLASS_DEFAULTS = {"skip_prk_steps": False, "interpolation_type": "linear", "timestep_type": "discrete",
                   "final_sigmas_type": "zero", "use_karras_sigmas": False, "algorithm_type": "dpmsolver++",
                   "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "predict_x0": True,
                   "lambda_min_clipped": -math.inf, "disable_corrector": []}


def _option(config: dict, key: str, default=None):
    return config.get(key, _CLASS_DEFAULTS.get(key, default))


def _name_for(cls: str, config: dict) -> str:
    """The fastsd sampler a diffusers class with `config` is: its base name, or the variant its
    options select (the base where none matches: _NEEDS then says what fastsd cannot run)."""
    base = DIFFUSERS_CLASSES[cls]
    for name in (base, *(n for n, (b, _) in VARIANTS.items() if b == base)):
        if all(_option(config, k) == v for k, v in OPTIONS_OF.get(name, {}).items()):
            return name
    return base


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
        name, what = _name_for(cls, config), f"the checkpoint's {cls}"
    elif isinstance(value, str):
        check_sampler(value)
        name, what = value, f"scheduler {value!r}"
        config = dict(config, **OPTIONS_OF.get(value, {}))
        config = dict(config, skip_prk_steps=True) if value == "pndm" else config  # the name means PLMS
    elif hasattr(value, "config") and type(value).__name__.endswith("Scheduler"):
        cls = type(value).__name__
        if cls not in DIFFUSERS_CLASSES:
            raise InvalidArgumentError(f"fastsd cannot run diffusers' {cls}; it runs "
                                       f"{', '.join(DIFFUSERS_CLASSES)} (or the names {', '.join(SAMPLER_NAMES)})")
        config = dict(value.config)
        name, what = _name_for(cls, config), cls
    else:
        raise InvalidArgumentError(f"scheduler must be a name ({', '.join(SAMPLER_NAMES)}) or a diffusers "
                                   f"scheduler object, not {type(value).__name__}")
    for key, want in OPTIONS_OF.get(name, {}).items():
        if _option(config, key) != want:
            raise InvalidArgumentError(f"fastsd cannot run {what} with {key}={_option(config, key)!r}")
    for key, needed in _NEEDS[name].items():
        have = _option(config, key, needed[0] if isinstance(needed, tuple) else needed)
        if have not in needed if isinstance(needed, tuple) else have != needed:
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


def _tensor(a) -> torch.Tensor:
    return torch.as_tensor(np.array(a), dtype=torch.float32)  # a copy: positive strides


def ddim_schedule(cfg: SchedulerConfig, steps: int) -> Schedule:
    alpha_bar_all = alphas_cumprod(cfg).numpy()
    t = spaced_timesteps(cfg, steps, integer=True).astype(np.int64)
    prev = t - cfg.num_train_timesteps // steps
    final = 1.0 if cfg.set_alpha_to_one else alpha_bar_all[0]
    alpha_bar = alpha_bar_all[t]
    alpha_bar_prev = np.where(prev >= 0, alpha_bar_all[np.clip(prev, 0, None)], final)
    return Schedule(
        timesteps=_tensor(t),
        host_timesteps=tuple(float(v) for v in t.astype(np.float32)),
        signal=_tensor(np.sqrt(alpha_bar)),
        noise_level=_tensor(np.sqrt(1 - alpha_bar)),
        input_scale=_tensor(np.ones(steps)),
        init_noise_sigma=1.0,
        alpha_bar=_tensor(alpha_bar),
        alpha_bar_prev=_tensor(alpha_bar_prev),
    )


def pndm_schedule(cfg: SchedulerConfig, steps: int) -> Schedule:
    """PLMS (PNDMScheduler with skip_prk_steps): the n spaced timesteps with the second one
    repeated, n + 1 UNet calls (the repeat is the second-order start of PLMS)."""
    alpha_bar_all = alphas_cumprod(cfg).numpy()
    t = spaced_timesteps(cfg, steps, integer=True).astype(np.int64)[::-1]  # ascending, as diffusers builds it
    t = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1]
    alpha_bar = alpha_bar_all[t]
    return Schedule(
        timesteps=_tensor(t),
        host_timesteps=tuple(float(v) for v in t.astype(np.float32)),
        signal=_tensor(np.sqrt(alpha_bar)),
        noise_level=_tensor(np.sqrt(1 - alpha_bar)),
        input_scale=_tensor(np.ones(len(t))),
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


def train_sigmas(cfg: SchedulerConfig) -> np.ndarray:
    """sigma of every training step, float32 as diffusers' sigma-based schedulers build it
    (zero terminal SNR: alpha_bar's last value becomes 2**-24, as they do)."""
    alpha_bar_all = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        alpha_bar_all[-1] = ZERO_SNR_ALPHA_BAR
    return (((1 - alpha_bar_all) / alpha_bar_all) ** 0.5).numpy()


def karras_sigmas(high_to_low: np.ndarray, steps: int) -> np.ndarray:
    """`steps` sigmas from the first to the last of `high_to_low`, evenly spaced in sigma^(1/rho),
    rho = 7 (Karras et al. 2022, eq. (5)); float64, as diffusers' _convert_to_karras."""
    rho = 7.0
    lo, hi = float(high_to_low[-1]) ** (1 / rho), float(high_to_low[0]) ** (1 / rho)
    return (hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho


def _init_sigma(cfg: SchedulerConfig, sigmas: np.ndarray) -> float:
    """Euler's and Heun's init_noise_sigma: sigma_max, or sqrt(sigma_max^2 + 1) for "leading"."""
    sigma_max = torch.tensor(sigmas.max())
    return float(sigma_max if cfg.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5)


def euler_schedule(cfg: SchedulerConfig, steps: int, timesteps=None, sigmas=None,
                   karras: bool = False) -> Schedule:
    """Euler's sigmas at the spaced timesteps, or at custom `timesteps`, or custom `sigmas`
    (their last value is where sampling ends), as EulerDiscreteScheduler.set_timesteps. With
    `karras`, Karras sigmas between the first and last spaced sigma, at fractional timesteps."""
    sigma_all = train_sigmas(cfg)
    if sigmas is not None:
        sigma_ext = np.array(sigmas).astype(np.float32)
        t = np.array([_sigma_to_t(v, np.log(sigma_all)) for v in sigma_ext[:-1]]).astype(np.float32)
        sigma = sigma_ext[:-1]
    else:
        t = np.array(timesteps).astype(np.float32) if timesteps is not None else \
            spaced_timesteps(cfg, steps, integer=False)
        sigma = np.interp(t, np.arange(len(sigma_all)), sigma_all)  # linear in t, float64
        if karras:
            sigma = karras_sigmas(sigma, steps)
            t = np.array([_sigma_to_t(v, np.log(sigma_all)) for v in sigma]).astype(np.float32)
        sigma_ext = np.append(sigma, 0.0).astype(np.float32)
        sigma = sigma_ext[:-1]
    return Schedule(
        timesteps=_tensor(t),
        host_timesteps=tuple(float(v) for v in t.astype(np.float32)),
        signal=_tensor(np.ones(len(t))),
        noise_level=_tensor(sigma),
        input_scale=_tensor(1 / np.sqrt(sigma**2 + 1)),
        init_noise_sigma=_init_sigma(cfg, sigma_ext),
        sigmas=_tensor(sigma_ext),
    )


def heun_schedule(cfg: SchedulerConfig, steps: int) -> Schedule:
    """HeunDiscreteScheduler's 2n - 1 UNet calls: the spaced sigmas with every one but the
    first repeated (each Heun step evaluates the model at both ends; the last step, to sigma
    0, is a single Euler step)."""
    cfg = replace(cfg, rescale_betas_zero_snr=False)  # not an option of diffusers' Heun
    sigma_all = train_sigmas(cfg)
    t = spaced_timesteps(cfg, steps, integer=False).astype(np.float32)
    sigma = np.append(np.interp(t, np.arange(len(sigma_all)), sigma_all), 0.0).astype(np.float32)
    sigma = np.concatenate([sigma[:1], np.repeat(sigma[1:-1], 2), sigma[-1:]])
    t = np.concatenate([t[:1], np.repeat(t[1:], 2)])
    return Schedule(
        timesteps=_tensor(t),
        host_timesteps=tuple(float(v) for v in t),
        signal=_tensor(np.ones(len(t))),
        noise_level=_tensor(sigma[:-1]),
        input_scale=_tensor(1 / np.sqrt(sigma[:-1] ** 2 + 1)),
        init_noise_sigma=_init_sigma(cfg, sigma),
        sigmas=_tensor(sigma),
    )


def multistep_timesteps(cfg: SchedulerConfig, steps: int) -> np.ndarray:
    """DPM-Solver's and UniPC's n timesteps: "linspace" and "leading" space n + 1 points and
    drop the last (leading's ratio is num_train_timesteps // (n + 1)); "trailing" as DDIM's."""
    n_train = cfg.num_train_timesteps
    if steps > n_train:
        raise InvalidArgumentError(f"num_inference_steps {steps} exceeds num_train_timesteps {n_train}")
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = n_train // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    return np.arange(n_train, 0, -n_train / steps).round().astype(np.int64) - 1


def multistep_schedule(cfg: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """DPM-Solver / UniPC: sigmas at the timesteps (or Karras sigmas over the whole training
    range at rounded timesteps), then 0. The latents are VP: x = alpha * x0 + sigma_t * eps
    with alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha; no input scaling."""
    sigma_all = train_sigmas(cfg)
    if karras:
        sigma = karras_sigmas(sigma_all[::-1], steps)
        t = np.array([_sigma_to_t(v, np.log(sigma_all)) for v in sigma])
        t = (t if cfg.beta_schedule == "squaredcos_cap_v2" else t.round()).astype(np.int64)
    else:
        t = multistep_timesteps(cfg, steps)
        sigma = np.interp(t, np.arange(len(sigma_all)), sigma_all)
    sigmas = torch.from_numpy(np.append(sigma, 0.0).astype(np.float32))
    alpha, sigma_t, _ = _vp(sigmas)
    return Schedule(
        timesteps=_tensor(t),
        host_timesteps=tuple(float(v) for v in t.astype(np.float32)),
        signal=alpha[:-1],
        noise_level=sigma_t[:-1],
        input_scale=_tensor(np.ones(len(t))),
        init_noise_sigma=1.0,
        sigmas=sigmas,
    )


def _vp(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of VE sigmas, float32 as
    diffusers' _sigma_to_alpha_sigma_t (lambda is +inf at sigma 0). One value at a time, as
    diffusers computes them (a vectorised kernel may round differently in the last bit)."""
    def one(sigma):
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        sigma_t = sigma * alpha
        return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)

    alpha, sigma_t, lam = zip(*(one(v) for v in sigmas), strict=True)  # host tables: no device read
    return torch.stack(alpha), torch.stack(sigma_t), torch.stack(lam)


def lcm_timesteps(cfg: SchedulerConfig, steps: int, strength: float = 1.0) -> np.ndarray:
    """LCMScheduler's n timesteps: n evenly skipped from the distillation's grid of
    original_inference_steps timesteps (k - 1, 2k - 1, ..., high to low). `strength` < 1
    (img2img of a guidance-distilled UNet, as LatentConsistencyModelImg2ImgPipeline): from
    the grid's first int(original * strength) timesteps only, all n steps run."""
    n_train, original = cfg.num_train_timesteps, cfg.original_inference_steps
    if not 1 <= original <= n_train:
        raise InvalidArgumentError(f"LCM: original_inference_steps {original} must be in [1, {n_train}]")
    if steps > original:
        raise InvalidArgumentError(f"LCM runs at most original_inference_steps={original} steps, not {steps}")
    span = int(original * strength)
    if steps > span:
        raise InvalidArgumentError(f"LCM img2img: strength {strength:g} leaves {span} of the {original} distillation "
                                   f"timesteps, fewer than {steps} steps: lower num_inference_steps or raise strength")
    k = n_train // original
    grid = (np.arange(1, span + 1) * k - 1)[::-1]
    return grid[np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)]


def lcm_schedule(cfg: SchedulerConfig, steps: int, strength: float = 1.0) -> Schedule:
    alpha_bar_all = alphas_cumprod(cfg)
    t = lcm_timesteps(cfg, steps, strength)
    alpha_bar = alpha_bar_all[torch.from_numpy(t)]
    return Schedule(
        timesteps=_tensor(t),
        host_timesteps=tuple(float(v) for v in t.astype(np.float32)),
        signal=alpha_bar**0.5,  # img2img / inpaint noising: DDPM's, as LCMScheduler.add_noise
        noise_level=(1 - alpha_bar) ** 0.5,
        input_scale=_tensor(np.ones(steps)),
        init_noise_sigma=1.0,
    )


# ---- steps --------------------------------------------------------------------------
#
# Each sampler precomputes one row of float32 coefficients per step from its tables (the
# same float32 operations its step would otherwise do per step, so results are bit for bit
# those of computing them in the loop); a step is then a pure function of (x, model output,
# that row, noise). Nothing in a step reads a device value on the host, and a step can be
# replayed inside a CUDA graph with the row copied into a static buffer. Each sampler names
# its row's columns (a Columns below): a step reads c[DDIM.std], not c[4].


class Columns:
    """The named columns of a sampler's per-step row: `COLUMNS.name` is that column's index."""

    def __init__(self, *names: str):
        self.names = names
        for index, name in enumerate(names):
            setattr(self, name, index)

    def __len__(self) -> int:
        return len(self.names)


DDIM = Columns("root_ab", "root_1m_ab", "w_x0", "w_eps", "std")
PNDM = Columns("w_out", "w_e1", "w_e2", "w_e3", "divisor", "w_x", "w_first", "push", "take", "root_ab",
               "root_1m_ab", "ratio", "ab_diff", "denom")
SIGMA = Columns("sigma", "dt", "v_out", "v_x")  # Euler: x0 = out * v_out + x / v_x for v-prediction
EULER_A = Columns(*SIGMA.names, "sigma_up")
HEUN = Columns(*SIGMA.names, "second")
DPM = Columns("alpha", "sigma", "a", "b", "c", "inv_r0", "s")
UNIPC = Columns("alpha", "sigma", "c_on", "c_ratio", "c_phi", "c_bh", "c_rho0", "c_rk", "c_rho_last",  # UniC
                "p_ratio", "p_phi", "p_bh", "p_rho", "p_rk")  # UniP
LCM = Columns("root_ab", "root_1m_ab", "c_skip", "c_out", "w_f", "w_noise")


def ddim_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    """(n, 5): sqrt(alpha_bar), sqrt(1 - alpha_bar), the DDIM eq. (12) weights of x0 and
    eps, and the std of the fresh noise (DDIM eq. (16), times eta)."""
    alpha_bar, alpha_bar_prev = sched.alpha_bar, sched.alpha_bar_prev
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    std = eta * variance**0.5
    return torch.stack([alpha_bar**0.5, (1 - alpha_bar) ** 0.5, alpha_bar_prev**0.5,
                        (1 - alpha_bar_prev - std**2) ** 0.5, std], dim=1)


def ddim_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None):
    root_ab, root_1m_ab, w_x0, w_eps, std = (c[DDIM.root_ab], c[DDIM.root_1m_ab], c[DDIM.w_x0], c[DDIM.w_eps],
                                             c[DDIM.std])
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
    return torch.stack(rows)


def pndm_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None, history=None):
    """-> (x_prev, history'); history = (first sample, e1, e2, e3), zeros before the first step."""
    first, e1, e2, e3 = history
    eps = (c[PNDM.w_out] * out + c[PNDM.w_e1] * e1 + c[PNDM.w_e2] * e2 + c[PNDM.w_e3] * e3) / c[PNDM.divisor]
    sample = c[PNDM.w_x] * x + c[PNDM.w_first] * first
    if cfg.prediction_type == "v_prediction":
        eps = c[PNDM.root_ab] * eps + c[PNDM.root_1m_ab] * sample
    x_prev = c[PNDM.ratio] * sample - c[PNDM.ab_diff] * eps / c[PNDM.denom]
    push, take = c[PNDM.push], c[PNDM.take]
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
    """x0 from the model output at noise level sigma (x = x0 + sigma * eps); `c` a SIGMA row."""
    if prediction_type == "epsilon":
        return x - c[SIGMA.sigma] * out
    return out * c[SIGMA.v_out] + x / c[SIGMA.v_x]


def euler_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None):
    d = (x - _sigma_x0(x, out, c, cfg.prediction_type)) / c[SIGMA.sigma]  # Karras et al. 2022, eq. (5)
    return x + d * c[SIGMA.dt]


def euler_ancestral_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None):
    return euler_step(x, out, c, cfg) + noise * c[EULER_A.sigma_up]


# DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) and its SDE variant: data
# prediction m = x0(x, out) at each step; second order from the previous m (the history),
# first order at the first step run and the last (to sigma 0), as diffusers' lower-order
# steps. A step is x' = a x + b m + c inv_r0 (m - m_prev) (+ s noise), with diffusers'
# float32 coefficients per step.


def _dpm_coefficients(sched: Schedule, start: int, sde: bool) -> torch.Tensor:
    """(n, 7): alpha_s, sigma_s (x0 from the output), then a, b, c, inv_r0, s."""
    alpha, sigma_t, lam = _vp(sched.sigmas)
    n, rows, zero = len(sched), [], torch.tensor(0.0)
    for j in range(n):
        h = lam[j + 1] - lam[j]
        if sde:  # Lu et al. 2022, eq. (9)-(10) as diffusers' sde-dpmsolver++ midpoint
            a = sigma_t[j + 1] / sigma_t[j] * torch.exp(-h)
            b = alpha[j + 1] * (1 - torch.exp(-2.0 * h))
            c = 0.5 * (alpha[j + 1] * (1 - torch.exp(-2.0 * h)))
            s = sigma_t[j + 1] * torch.sqrt(1.0 - torch.exp(-2 * h))
        else:  # x' = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) (D0 + D1 / 2)
            a = sigma_t[j + 1] / sigma_t[j]
            b = -(alpha[j + 1] * (torch.exp(-h) - 1.0))
            c = -(0.5 * (alpha[j + 1] * (torch.exp(-h) - 1.0)))
            s = zero
        second = j - start >= 1 and j < n - 1  # first order at the first step run and the last
        inv_r0 = 1.0 / ((lam[j] - lam[j - 1]) / h) if second else zero
        rows.append(torch.stack([alpha[j], sigma_t[j], a, b, c if second else zero, inv_r0, s]))
    return torch.stack(rows)


def dpm_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    return _dpm_coefficients(sched, start, sde=False)


def dpm_sde_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    return _dpm_coefficients(sched, start, sde=True)


def vp_x0(x, out, alpha, sigma, prediction_type):
    """x0 from the model output (eps or v) for VP latents x = alpha x0 + sigma eps."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    return alpha * x - sigma * out  # v (Salimans & Ho 2022)


def dpm_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None, history=None):
    """-> (x', (m,)); history = (the previous step's m,), zeros before the first step."""
    (m_prev,) = history
    m = vp_x0(x, out, c[DPM.alpha], c[DPM.sigma], cfg.prediction_type)
    x_next = c[DPM.a] * x + c[DPM.b] * m + c[DPM.c] * (c[DPM.inv_r0] * (m - m_prev))
    if noise is not None:
        x_next = x_next + c[DPM.s] * noise
    return x_next, (m,)


# UniPC (Zhao et al. 2023), bh2, order 2, data prediction: at every step after the first run,
# the corrector UniC refines the sample the last step predicted, using the model output at it
# (no extra model call); then the predictor UniP steps to the next sigma. Orders as diffusers:
# UniC of order min(2, k), UniP of order min(2, n - j, k + 1) (k: steps run before step j).
# History: the last (corrected) sample and the last two data predictions.
UNIPC_HISTORY = 3


def _unipc_rhos(rk: torch.Tensor, hh: torch.Tensor, order: int) -> torch.Tensor:
    """diffusers' bh2 coefficients: solve R rho = b with R[i] = rks^i, b[i] from h phi_k(h)."""
    rks = torch.stack([rk, torch.ones(())])
    h_phi_k, factorial, b_h = torch.expm1(hh) / hh - 1, 1, torch.expm1(hh)
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.linalg.solve(torch.stack(rows), torch.stack(b))


def unipc_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    """(n, 14): alpha_s, sigma_s; UniC: on, sigma ratio, alpha h phi_1, alpha B(h), rho_0, r_k,
    rho_last; UniP: sigma ratio, alpha h phi_1, alpha B(h), rho, r_k."""
    alpha, sigma_t, lam = _vp(sched.sigmas)
    n, rows = len(sched), []
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    for j in range(n):
        k = j - start
        corrector = [zero, zero, zero, zero, zero, one, zero]
        if k >= 1:
            hh = -(lam[j] - lam[j - 1])
            ratio, phi, bh = sigma_t[j] / sigma_t[j - 1], alpha[j] * torch.expm1(hh), alpha[j] * torch.expm1(hh)
            if min(2, k) == 1:
                corrector = [one, ratio, phi, bh, zero, one, torch.tensor(0.5)]
            else:
                rk = (lam[j - 2] - lam[j - 1]) / -hh
                rho = _unipc_rhos(rk, hh, 2)
                corrector = [one, ratio, phi, bh, rho[0], rk, rho[1]]
        hh = -(lam[j + 1] - lam[j])
        predictor = [sigma_t[j + 1] / sigma_t[j], alpha[j + 1] * torch.expm1(hh), alpha[j + 1] * torch.expm1(hh)]
        if min(2, n - j, k + 1) == 2:
            predictor += [torch.tensor(0.5), (lam[j - 1] - lam[j]) / -hh]
        else:
            predictor += [zero, one]
        rows.append(torch.stack([alpha[j], sigma_t[j], *corrector, *predictor]))
    return torch.stack(rows)


def unipc_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None, history=None):
    """-> (x', (sample, m, m_prev)); history = (last sample, m_prev, m_prev2), zeros at first."""
    last, m1, m2 = history
    u = UNIPC
    m = vp_x0(x, out, c[u.alpha], c[u.sigma], cfg.prediction_type)
    corrected = c[u.c_ratio] * last - c[u.c_phi] * m1 - c[u.c_bh] * (
        c[u.c_rho0] * ((m2 - m1) / c[u.c_rk]) + c[u.c_rho_last] * (m - m1))  # UniC
    sample = c[u.c_on] * corrected + (1 - c[u.c_on]) * x
    x_next = c[u.p_ratio] * sample - c[u.p_phi] * m - c[u.p_bh] * (c[u.p_rho] * ((m1 - m) / c[u.p_rk]))  # UniP
    return x_next, (sample, m, m1)


# Heun (Karras et al. 2022, Algorithm 1 without churn) as HeunDiscreteScheduler: loop steps
# alternate between an Euler step (saving its derivative and start) and the correction that
# averages both derivatives from the saved start. Row: sigma, dt, the v weights, stage.
HEUN_HISTORY = 2


def heun_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    """(n, 5): Euler's row from each sigma to the next; a second stage (odd index: the
    interleaved schedule starts every Heun step at an even one) steps by its first stage's dt."""
    sigma = sched.sigmas
    rows = _sigma_rows(sigma[:-1], sigma[1:])
    rows[1][1::2] = rows[1][0:-1:2]
    second = (torch.arange(len(sched)) % 2).float()
    return torch.stack(rows + [second], dim=1)


def heun_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None, history=None):
    """-> (x', (derivative, x)); history = (the first stage's derivative, its start)."""
    d_prev, start = history
    x0 = _sigma_x0(x, out, c, cfg.prediction_type)
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    d = (x - x0) / c[HEUN.sigma]
    second = c[HEUN.second]
    d_used = second * ((d_prev + d) / 2) + (1 - second) * d
    return (second * start + (1 - second) * x) + d_used * c[HEUN.dt], (d, x)


# LCM (Luo et al. 2023, "Latent Consistency Models"): the consistency function
# f(x, t) = c_skip x + c_out x0, then noised to the next timestep with fresh noise; the last
# step returns f itself (its noise row is zeros, its weights 1 and 0).


def lcm_coefficients(sched: Schedule, cfg: SchedulerConfig, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    """(n, 6): sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), c_skip, c_out, then the weights of f
    and of the noise."""
    alpha_bar_all = alphas_cumprod(cfg)
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else alpha_bar_all[0]
    t = [int(v) for v in sched.host_timesteps]
    rows, n = [], len(t)
    for j in range(n):
        ab = alpha_bar_all[t[j]]
        scaled = torch.tensor(t[j]) * cfg.timestep_scaling  # an integer timestep times a float: float32
        c_skip = 0.5**2 / (scaled**2 + 0.5**2)
        c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
        if j == n - 1:
            weights = [torch.tensor(1.0), torch.tensor(0.0)]
        else:
            ab_prev = alpha_bar_all[t[j + 1]] if t[j + 1] >= 0 else final
            weights = [ab_prev.sqrt(), (1 - ab_prev).sqrt()]
        rows.append(torch.stack([ab.sqrt(), (1 - ab).sqrt(), c_skip, c_out, *weights]))
    return torch.stack(rows)


def lcm_step(x, out, c: torch.Tensor, cfg: SchedulerConfig, noise=None):
    x0 = vp_x0(x, out, c[LCM.root_ab], c[LCM.root_1m_ab], cfg.prediction_type)
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    denoised = c[LCM.c_out] * x0 + c[LCM.c_skip] * x
    return c[LCM.w_f] * denoised + c[LCM.w_noise] * noise



@dataclass(frozen=True)
class Sampler:
    name: str
    schedule: Callable[..., Schedule]  # (config, steps[, timesteps=, sigmas=]) -> Schedule, on the host
    coefficients: Callable[..., torch.Tensor]  # (sched, config, eta, start) -> (n, K) float32, one row per step
    step: Callable  # (x, out, row, config, noise[, history]) -> x_prev, or (x_prev, history') with a history
    draws_noise: Callable[[float], bool]  # eta -> does step() take fresh noise?
    history: int = 0  # multistep samplers: how many tensors of x's shape a step carries to the next
    loop_steps: Callable[[int], int] = lambda steps: steps  # schedule length (UNet calls) for `steps`
    custom_schedule: bool = False  # schedule() takes timesteps= / sigmas= (as its diffusers class's set_timesteps)
    order: int = 1  # diffusers' scheduler.order: img2img starts at schedule index first_step * order
    last_step_noise: bool = True  # False: the last step draws no noise (LCM)
    strength_schedule: bool = False  # img2img of a guidance-distilled UNet: schedule(strength=) compresses the
    # schedule instead of skipping its first steps (LCM: LatentConsistencyModelImg2ImgPipeline)
    columns: Columns | None = None  # the names of its row's columns (coefficients() gives (n, len(columns)))


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", ddim_schedule, ddim_coefficients, ddim_step, draws_noise=lambda eta: eta > 0, columns=DDIM),
    Sampler("pndm", pndm_schedule, pndm_coefficients, pndm_step, draws_noise=lambda eta: False, history=PNDM_HISTORY,
            loop_steps=lambda steps: steps + 1 if steps > 1 else 1, columns=PNDM),
    Sampler("euler", euler_schedule, euler_coefficients, euler_step, draws_noise=lambda eta: False,
            custom_schedule=True, columns=SIGMA),
    Sampler("euler_a", euler_schedule, euler_ancestral_coefficients, euler_ancestral_step,
            draws_noise=lambda eta: True, columns=EULER_A),
    Sampler("euler_karras", partial(euler_schedule, karras=True), euler_coefficients, euler_step,
            draws_noise=lambda eta: False, columns=SIGMA),
    Sampler("heun", heun_schedule, heun_coefficients, heun_step, draws_noise=lambda eta: False,
            history=HEUN_HISTORY, loop_steps=lambda steps: 2 * steps - 1, order=2, columns=HEUN),
    Sampler("dpmpp_2m", multistep_schedule, dpm_coefficients, dpm_step, draws_noise=lambda eta: False, history=1,
            columns=DPM),
    Sampler("dpmpp_2m_karras", partial(multistep_schedule, karras=True), dpm_coefficients, dpm_step,
            draws_noise=lambda eta: False, history=1, columns=DPM),
    Sampler("dpmpp_2m_sde", multistep_schedule, dpm_sde_coefficients, dpm_step, draws_noise=lambda eta: True,
            history=1, columns=DPM),
    Sampler("dpmpp_2m_sde_karras", partial(multistep_schedule, karras=True), dpm_sde_coefficients, dpm_step,
            draws_noise=lambda eta: True, history=1, columns=DPM),
    Sampler("unipc", multistep_schedule, unipc_coefficients, unipc_step, draws_noise=lambda eta: False,
            history=UNIPC_HISTORY, columns=UNIPC),
    Sampler("lcm", lcm_schedule, lcm_coefficients, lcm_step, draws_noise=lambda eta: True, last_step_noise=False,
            columns=LCM, strength_schedule=True),
)}
if tuple(SAMPLERS) != SAMPLER_NAMES:  # the CLI lists SAMPLER_NAMES without importing this module
    raise ImportError(f"fastsd.sampler_names lists {SAMPLER_NAMES}, fastsd.schedulers defines {tuple(SAMPLERS)}")


def add_noise(sched: Schedule, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
    """Noise a clean latent to step i of the schedule (forward process, DDPM eq. (4))."""
    return sched.signal[i] * x0 + sched.noise_level[i] * noise


def first_step(steps: int, strength: float) -> int:
    """The first of `steps` steps an img2img/inpaint run takes (as diffusers' get_timesteps)."""
    init_steps = min(int(steps * strength), steps)
    return max(steps - init_steps, 0)


def start_index(sampler: str, steps: int, strength: float, guidance_embedded: bool = False) -> int:
    """The schedule index an img2img/inpaint run starts at: first_step times the sampler's
    order (Heun's schedule has two entries per step), as diffusers' get_timesteps; 0 where
    the schedule itself is compressed by strength (strength_args)."""
    if strength_args(sampler, strength, guidance_embedded):
        return 0
    return first_step(steps, strength) * SAMPLERS[sampler].order


def strength_args(sampler: str, strength: float, guidance_embedded: bool) -> dict:
    """{"strength": s} where the sampler's schedule takes img2img's strength (LCM with a
    guidance-distilled UNet, as LatentConsistencyModelImg2ImgPipeline), else {}: the run
    skips the schedule's first steps (as StableDiffusionImg2ImgPipeline, LCM-LoRA included)."""
    return {"strength": strength} if SAMPLERS[sampler].strength_schedule and guidance_embedded and strength < 1 else {}


@lru_cache(maxsize=256)  # a server checks each request before queuing and again when it runs
def _run_problem(name: str, cfg: SchedulerConfig, steps: int, eta: float, start: int,
                 custom: tuple[tuple[str, tuple[float, ...]], ...]) -> str | None:
    """Why sampler `name` cannot run `steps` steps on `cfg` (None: it can): its schedule
    indexes past the trained timesteps, or a step's coefficients are not finite (timesteps
    that repeat at high step counts, zero-SNR tables a sampler divides by). `custom`: the
    (name, values) of custom timesteps or sigmas."""
    sampler = SAMPLERS[name]
    try:
        sched = sampler.schedule(cfg, steps, **dict(custom))
        table = sampler.coefficients(sched, cfg, eta, start)
    except IndexError:
        return f"its timesteps pass the last trained one ({cfg.num_train_timesteps - 1})"
    if not (torch.isfinite(table).all() and torch.isfinite(sched.signal).all()
            and torch.isfinite(sched.noise_level).all() and torch.isfinite(sched.input_scale).all()):
        return "its step coefficients are not finite (repeated timesteps or a zero-SNR table it divides by)"
    if not torch.isfinite(_dry_run(sampler, sched, table, cfg, eta, start)).all():
        return "a step divides by zero (repeated timesteps or a zero-SNR table it divides by)"
    return None


def _dry_run(sampler: Sampler, sched: Schedule, table: torch.Tensor, cfg: SchedulerConfig, eta: float,
             start: int) -> torch.Tensor:
    """The loop's arithmetic on a 2-element stand-in (fixed model outputs and noise): the
    final latents, non-finite where a real run's would be."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 1, 2, generator=gen) * sched.init_noise_sigma
    history = tuple(torch.zeros_like(x) for _ in range(sampler.history))
    noisy = sampler.draws_noise(eta)
    for i in range(start, len(sched)):
        x_in = x * sched.input_scale[i]
        out = 0.1 * torch.randn(x.shape, generator=gen) + 0.01 * x_in
        noise = torch.randn(x.shape, generator=gen) if noisy else None
        if sampler.history:
            x, history = sampler.step(x, out, table[i], cfg, noise, history)
        else:
            x = sampler.step(x, out, table[i], cfg, noise)
    return x


def check_run(name: str, cfg: SchedulerConfig, steps: int, eta: float = 0.0, start: int = 0, **custom) -> None:
    """Refuse, before any work, a step count sampler `name` cannot run on this checkpoint's
    schedule (an InvalidArgumentError naming the nearest count below that it can run)."""
    problem = _run_problem(name, cfg, steps, float(eta), start, tuple(sorted(custom.items())))
    if problem is None:
        return
    setting = f"timestep_spacing {cfg.timestep_spacing!r}, steps_offset {cfg.steps_offset}" + (
        ", zero-SNR betas" if cfg.rescale_betas_zero_snr else "")
    hint = "use another scheduler"
    if not custom:
        for fewer in range(steps - 1, max(steps - 9, 0), -1):
            if _run_problem(name, cfg, fewer, float(eta), min(start, fewer - 1), ()) is None:
                hint = f"use at most {fewer} steps or another scheduler"
                break
    raise InvalidArgumentError(f"scheduler {name!r} cannot run {steps} steps on this checkpoint's schedule "
                               f"({setting}): {problem}; {hint}")
