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


# ---- DPM-Solver++, UniPC, LCM, Heun, Karras sigmas ------------------------------------------


def test_multistep_leading_spacing_uses_steps_plus_one():
    """DPM-Solver and UniPC space "leading" over n + 1 points: 8 steps run 889 ... 112 (DDIM: 876 ... 1)."""
    sched = SAMPLERS["dpmpp_2m"].schedule(cfg("dpmpp_2m", timestep_spacing="leading"), 8)
    assert sched.host_timesteps == (889, 778, 667, 556, 445, 334, 223, 112)
    assert float(sched.sigmas[-1]) == 0.0  # the last step goes to sigma 0


@pytest.mark.parametrize("name,cls,options", [
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
    ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("unipc", "UniPCMultistepScheduler", {}),
    ("euler_karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("lcm", "LCMScheduler", {}),
])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_new_tables_match_diffusers(name, cls, options, spacing, zero_snr):
    """Timesteps bit for bit (DPM's Karras ones rounded, Euler's fractional), sigmas and the
    initial noise scale as each diffusers scheduler builds them."""
    import diffusers

    raw = {**SD, "timestep_spacing": spacing, "rescale_betas_zero_snr": zero_snr}
    if name == "heun" and zero_snr:
        pytest.skip("HeunDiscreteScheduler has no zero-SNR option")
    ref = getattr(diffusers, cls).from_config(raw, **options)
    ref.set_timesteps(9)
    s = SAMPLERS[name].schedule(cfg(name, **raw), 9)
    assert s.timesteps.tolist() == ref.timesteps.float().tolist()
    if s.sigmas is not None:
        assert torch.equal(s.sigmas, ref.sigmas)
    assert s.init_noise_sigma == float(ref.init_noise_sigma)


def test_dpm_first_order_step_is_ddim():
    """DPM-Solver++'s first-order update is DDIM (Lu et al. 2022): the first step of a run and
    the data prediction from a noise prediction, in closed float64 form."""
    c = cfg("dpmpp_2m")
    s = SAMPLERS["dpmpp_2m"].schedule(c, 10)
    rows = SAMPLERS["dpmpp_2m"].coefficients(s, c, 0.0, 0)
    g = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    got, (m,) = SAMPLERS["dpmpp_2m"].step(x, eps, rows[0], c, None, (torch.zeros_like(x),))
    sig, sig_next = float(s.sigmas[0]), float(s.sigmas[1])
    a, a_next = 1 / math.sqrt(sig**2 + 1), 1 / math.sqrt(sig_next**2 + 1)  # VP: alpha = 1/sqrt(sigma^2+1)
    x0 = (x - sig * a * eps) / a
    want = a_next * x0 + sig_next * a_next * eps  # DDIM eq. (12), deterministic
    assert torch.allclose(m, x0, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lcm_last_step_is_the_consistency_function():
    c = cfg("lcm")
    s = SAMPLERS["lcm"].schedule(c, 4)
    assert s.host_timesteps == (999, 759, 499, 259)  # LCMScheduler, 4 of its 50-step grid
    last = SAMPLERS["lcm"].coefficients(s, c)[-1]
    assert last[4].item() == 1.0 and last[5].item() == 0.0  # no fresh noise at the end
    with pytest.raises(InvalidArgumentError, match="at most"):
        SAMPLERS["lcm"].schedule(c, 51)


@pytest.mark.parametrize("value,name", [
    ("dpmpp_2m_sde_karras", "dpmpp_2m_sde_karras"),
    (("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
     "dpmpp_2m_sde_karras"),
    (("DPMSolverMultistepScheduler", {}), "dpmpp_2m"),
    (("EulerDiscreteScheduler", {"use_karras_sigmas": True}), "euler_karras"),
    (("UniPCMultistepScheduler", {}), "unipc"),
    (("LCMScheduler", {}), "lcm"),
    (("HeunDiscreteScheduler", {}), "heun"),
])
def test_diffusers_objects_map_to_samplers(value, name):
    import diffusers

    from fastsd.schedulers import choose_scheduler

    base = dict(SD, _class_name="PNDMScheduler")
    if isinstance(value, tuple):
        value = getattr(diffusers, value[0]).from_config(base, **value[1])
    choice = choose_scheduler(value, base)
    assert choice.name == name
    # and back: the config it hands out builds the same diffusers scheduler
    again = getattr(diffusers, choice.config["_class_name"]).from_config(choice.config)
    assert choose_scheduler(again, base).name == name


def test_names_set_and_reset_their_options():
    from fastsd.schedulers import choose_scheduler

    karras = choose_scheduler("dpmpp_2m_karras", dict(SD, _class_name="PNDMScheduler"))
    assert karras.config["use_karras_sigmas"] is True
    assert karras.config["_class_name"] == "DPMSolverMultistepScheduler"
    plain = choose_scheduler("euler", karras.config)  # a plain name drops the variant's options
    assert plain.name == "euler" and plain.config["use_karras_sigmas"] is False


@pytest.mark.parametrize("cls,options,what", [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
     "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order"),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("UniPCMultistepScheduler", {"solver_type": "bh1"}, "solver_type"),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("LCMScheduler", {"thresholding": True}, "thresholding"),
])
def test_options_fastsd_cannot_run_are_refused(cls, options, what):
    import diffusers

    from fastsd.schedulers import choose_scheduler

    value = getattr(diffusers, cls).from_config(SD, **options)
    with pytest.raises(InvalidArgumentError, match=what):
        choose_scheduler(value, SD)


# ---- every step count a sampler accepts runs --------------------------------------------------

def _run_all_steps(name, c, steps, eta=0.5):
    """Every step of sampler `name` on stand-in model outputs; returns the final latents."""
    sampler = SAMPLERS[name]
    sched = sampler.schedule(c, steps)
    table = sampler.coefficients(sched, c, eta, 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 2, generator=gen) * sched.init_noise_sigma
    history = [torch.zeros_like(x)] * sampler.history
    for i in range(len(sched)):
        out = 0.1 * torch.randn(x.shape, generator=gen)
        noise = torch.randn(x.shape, generator=gen) if sampler.draws_noise(eta) else None
        if sampler.history:
            x, history = sampler.step(x, out, table[i], c, noise, history)
        else:
            x = sampler.step(x, out, table[i], c, noise)
    return x


@pytest.mark.parametrize("spacing,zero_snr,steps", [
    ("leading", False, 1), ("leading", False, 999), ("leading", False, 1000),  # SD 1.5's schedule
    ("linspace", False, 1), ("linspace", False, 999), ("linspace", False, 1000),
    ("trailing", False, 1000), ("trailing", True, 1), ("trailing", True, 1000)])
def test_every_sampler_runs_or_refuses_each_step_count(spacing, zero_snr, steps):
    """At 1 step and at the most a checkpoint's schedule has (1000 = num_train_timesteps: SD
    1.5's default DDIM / PNDM index past it with steps_offset 1), a sampler either runs
    every step to finite latents or check_run refuses the count before any work, naming a
    count it can run; never an IndexError or NaN mid-run."""
    from fastsd.schedulers import check_run

    raw = {**SD, "timestep_spacing": spacing, "rescale_betas_zero_snr": zero_snr}
    if zero_snr:
        raw["prediction_type"] = "v_prediction"  # zero-SNR with epsilon is undefined at the last timestep
    refused = {}
    for name in SAMPLERS:
        c = cfg(name, **raw)
        try:
            check_run(name, c, steps, 0.5)
        except InvalidArgumentError as e:
            refused[name] = str(e)
            continue
        assert torch.isfinite(_run_all_steps(name, c, steps)).all(), (name, steps)
    if steps == 1000 and spacing == "leading":
        assert {"ddim", "pndm"} <= set(refused)
        assert "use at most 999 steps" in refused["ddim"]
    if steps == 1:
        assert set(refused) <= ({"pndm"} if zero_snr else set()), refused
    for name, text in refused.items():
        assert f"scheduler {name!r} cannot run {steps} steps" in text or (
            name == "lcm" and "LCM runs at most original_inference_steps=50 steps" in text), text


def test_pipeline_refuses_a_step_count_its_sampler_cannot_run(pipes):
    """check_call (what a server runs before queuing) refuses DDIM at 1000 steps on SD 1.5's
    schedule (leading spacing, steps_offset 1) instead of an IndexError mid-run."""
    pipe = pipes("eps")
    with pytest.raises(InvalidArgumentError, match="cannot run 1000 steps.*at most 999"):
        pipe.check_call("a cat", num_inference_steps=1000, scheduler="ddim")
    pipe.check_call("a cat", num_inference_steps=999, scheduler="ddim")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_row_has_its_named_columns(name):
    """Each sampler names its row's columns; its coefficients fill exactly those."""
    sampler = SAMPLERS[name]
    c = cfg(name)
    rows = sampler.coefficients(sampler.schedule(c, 6), c, 1.0 if sampler.draws_noise(1.0) else 0.0)
    assert sampler.columns is not None and rows.shape[1] == len(sampler.columns), name
    assert [getattr(sampler.columns, n) for n in sampler.columns.names] == list(range(len(sampler.columns)))
