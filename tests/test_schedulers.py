"""Scheduler tables and steps against closed-form float64 math, and tables against diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastsd.errors import InvalidArgumentError
from fastsd.schedulers import (
    SAMPLERS,
    SchedulerConfig,
    add_noise,
    alphas_cumprod,
    ddim_schedule,
    euler_schedule,
    first_step,
    spaced_timesteps,
)

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
      "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}


def _step(name, x, out, sched, i, c, noise=None, eta=0.0):
    """One step of sampler `name` at index i, through its precomputed coefficient row."""
    sampler = SAMPLERS[name]
    return sampler.step(x, out, sampler.coefficients(sched, c, eta)[i], c, noise)


def cfg(sampler="ddim", **kw):
    return SchedulerConfig.from_dict({**SD, **kw}, sampler)


def test_alphas_cumprod_closed_form():
    c = cfg()
    alpha_bar = alphas_cumprod(c)
    t = 500
    betas = [(0.00085**0.5 + s * (0.012**0.5 - 0.00085**0.5) / 999) ** 2 for s in range(1000)]
    # float32 tables (as diffusers builds them): within float32 accumulation of the float64 product
    assert alpha_bar.dtype == torch.float32
    assert float(alpha_bar[t]) == pytest.approx(math.prod(1 - b for b in betas[: t + 1]), rel=1e-5)


def test_zero_snr_rescale():
    alpha_bar = alphas_cumprod(cfg(rescale_betas_zero_snr=True))
    assert alpha_bar[-1] == pytest.approx(0.0, abs=1e-20)
    assert float(alpha_bar[0]) == pytest.approx(float(alphas_cumprod(cfg())[0]), rel=1e-6)  # first SNR unchanged


@pytest.mark.parametrize("spacing,expected", [
    ("leading", [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_spacings(spacing, expected):
    assert spaced_timesteps(cfg(timestep_spacing=spacing), 10, integer=True).tolist() == expected


def test_ddim_step_is_eq12():
    c = cfg(prediction_type="epsilon")
    s = ddim_schedule(c, 10)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(1, 4, 2, 2, generator=g,
                                                                                     dtype=torch.float64)
    i = 3
    t = int(s.timesteps[i])
    ab_all = alphas_cumprod(c)
    a, a_prev = float(ab_all[t]), float(ab_all[t - 100])
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    want = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    got = _step("ddim", x, eps, s, i, c)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ddim_last_step_uses_final_alpha():
    s = ddim_schedule(cfg(set_alpha_to_one=True), 10)
    assert float(s.alpha_bar_prev[-1]) == 1.0
    s = ddim_schedule(cfg(set_alpha_to_one=False), 10)
    assert float(s.alpha_bar_prev[-1]) == float(alphas_cumprod(cfg())[0])


def test_ddim_clean_prediction_is_fixed_point():
    """If the model predicts the true noise, DDIM (eta=0) lands exactly on x0 at the end."""
    c = cfg()
    s1 = ddim_schedule(SchedulerConfig.from_dict({**SD, "set_alpha_to_one": True}, "ddim"), 20)
    x0 = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x = add_noise(s1, x0, eps, 0).double()
    for i in range(len(s1)):
        x = _step("ddim", x, eps, s1, i, c)
    assert torch.allclose(x, x0, atol=1e-5)


def test_v_prediction_recovers_x0_and_eps():
    c = cfg(prediction_type="v_prediction")
    s = ddim_schedule(c, 10)
    i = 2
    a = float(s.alpha_bar[i])
    x0, eps = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.randn(2, 4, 2, 2, dtype=torch.float64)
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0  # Salimans & Ho 2022
    # DDIM with v must equal DDIM with the eps that v implies
    got = _step("ddim", x, v, s, i, c)
    want = _step("ddim", x, eps, s, i, cfg())
    assert torch.allclose(got, want, atol=1e-4)


def test_euler_sigmas_closed_form():
    c = cfg("euler", timestep_spacing="linspace")
    s = euler_schedule(c, 4)
    ab = alphas_cumprod(c)
    t = np.linspace(0, 999, 4)[::-1]
    for k, tk in enumerate(t):
        lo, hi = int(math.floor(tk)), min(int(math.floor(tk)) + 1, 999)
        sig = lambda j: math.sqrt((1 - float(ab[j])) / float(ab[j]))  # noqa: E731
        want = sig(lo) + (tk - lo) * (sig(hi) - sig(lo))
        assert float(s.sigmas[k]) == pytest.approx(want, rel=1e-5)
    assert float(s.sigmas[-1]) == 0.0
    assert s.init_noise_sigma == pytest.approx(float(s.sigmas[0]), rel=1e-6)
    assert euler_schedule(cfg("euler", timestep_spacing="leading"), 4).init_noise_sigma == pytest.approx(
        math.sqrt(float(euler_schedule(cfg("euler", timestep_spacing="leading"), 4).sigmas[0]) ** 2 + 1))


def test_euler_exact_on_linear_ode():
    """With eps constant the probability-flow ODE is linear in sigma: one Euler step is exact."""
    c = cfg("euler")
    s = euler_schedule(c, 5)
    x0 = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x = x0 + float(s.sigmas[0]) * eps
    x = _step("euler", x, eps, s, 0, c)
    assert torch.allclose(x, x0 + float(s.sigmas[1]) * eps, atol=1e-5)


def test_euler_ancestral_noise_split():
    """sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion get_ancestral_step)."""
    c = cfg("euler_a")
    s = euler_schedule(c, 5)
    x0 = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x = x0 + float(s.sigmas[1]) * eps
    noise = torch.randn_like(x0)
    out = _step("euler_a", x, eps, s, 1, c, noise)
    sig, nxt = float(s.sigmas[1]), float(s.sigmas[2])
    up = math.sqrt(nxt**2 * (sig**2 - nxt**2) / sig**2)
    down = math.sqrt(nxt**2 - up**2)
    assert torch.allclose(out, x0 + down * eps + up * noise, atol=1e-5)
    row = SAMPLERS["euler_a"].coefficients(s, c, 1.0)[1]  # the step's own sigma_down and sigma_up
    code_down, code_up = sig + float(row[1]), float(row[4])
    assert code_up == pytest.approx(up, rel=1e-5) and code_down == pytest.approx(down, rel=1e-5)
    assert code_down**2 + code_up**2 == pytest.approx(nxt**2, rel=1e-5)


def test_first_step_matches_diffusers_get_timesteps():
    assert first_step(50, 0.8) == 10
    assert first_step(10, 1.0) == 0
    assert first_step(4, 0.1) == 4  # nothing to denoise: the pipeline refuses it


def test_unknown_options_refused():
    with pytest.raises(InvalidArgumentError):
        SchedulerConfig.from_dict({**SD, "prediction_type": "sample"}, "ddim")
    with pytest.raises(InvalidArgumentError):
        SchedulerConfig.from_dict(SD, "dpm++")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_match_diffusers(spacing, zero_snr):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    raw = {**SD, "timestep_spacing": spacing, "rescale_betas_zero_snr": zero_snr}
    d = DDIMScheduler.from_config(raw)
    d.set_timesteps(7)
    s = ddim_schedule(cfg(**raw), 7)
    assert s.timesteps.tolist() == d.timesteps.float().tolist()
    assert torch.equal(alphas_cumprod(cfg(**raw)), d.alphas_cumprod)  # float32, bit for bit
    assert torch.equal(s.alpha_bar, d.alphas_cumprod[d.timesteps])
    e = EulerDiscreteScheduler.from_config(raw)
    e.set_timesteps(7)
    s = euler_schedule(cfg("euler", **raw), 7)
    assert torch.equal(s.timesteps, e.timesteps)
    assert torch.equal(s.sigmas, e.sigmas)
    assert s.init_noise_sigma == float(e.init_noise_sigma)


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_loop_steps_is_the_schedule_length(steps):
    for name, sampler in SAMPLERS.items():
        cfg = SchedulerConfig.from_dict(SD, name)
        assert len(sampler.schedule(cfg, steps)) == sampler.loop_steps(steps), name
