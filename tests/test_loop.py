"""The denoising loop: nothing inside it touches the generator or reads the device on the
host (noise drawn before it, coefficient rows precomputed), and on CUDA the whole step
replays as one graph. Parity with diffusers of the same loop: tests/test_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastsd import Pipeline
from fastsd.loop import ROW_LEVEL, ROW_SIGNAL, ROW_T, step_rows
from fastsd.schedulers import SAMPLERS, SchedulerConfig

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


@pytest.mark.parametrize("scheduler,eta", [("euler_a", 0.0), ("ddim", 0.6), ("ddim", 0.0), ("euler", 0.0),
                                           ("dpmpp_2m_sde_karras", 0.0), ("lcm", 0.0), ("unipc", 0.0)])
def test_generator_untouched_inside_the_loop(pipes, scheduler, eta):
    """Every draw happens before the first step: the generator's state is the same at
    every callback, and it is the state the call leaves behind."""
    gen = torch.Generator().manual_seed(5)
    states = []
    pipes("eps")("a cat", num_inference_steps=4, scheduler=scheduler, eta=eta, generator=gen, output_type="latent",
                 callback=lambda i, t, x: states.append(gen.get_state()))
    assert len(states) == 4 and all(torch.equal(s, gen.get_state()) for s in states)


def test_callback_timesteps_are_host_floats(pipes):
    seen = []
    pipes("eps")("a cat", num_inference_steps=3, output_type="latent", callback=lambda i, t, x: seen.append(t))
    assert all(type(t) is float for t in seen) and seen == sorted(seen, reverse=True)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_step_rows(sampler):
    cfg = SchedulerConfig.from_dict(SD, sampler)
    sched = SAMPLERS[sampler].schedule(cfg, 6)
    rows = step_rows(sched, sampler, cfg, 0.3)
    assert rows.dtype == torch.float32 and rows.shape[0] == len(sched) == SAMPLERS[sampler].loop_steps(6)
    assert torch.equal(rows[:, ROW_T], sched.timesteps)
    assert list(sched.host_timesteps) == sched.timesteps.tolist()
    # row i re-noises the clean latents to step i + 1; the last row keeps them clean
    assert torch.equal(rows[:-1, ROW_SIGNAL], sched.signal[1:]) and rows[-1, ROW_SIGNAL] == 1
    assert torch.equal(rows[:-1, ROW_LEVEL], sched.noise_level[1:]) and rows[-1, ROW_LEVEL] == 0
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("preview", [False, True])
def test_step_reads_no_device_value(sampler, preview):
    """What the CUDA paths need from every sampler, checked on the CPU: a step run on fake
    tensors (shapes only, no data) goes through, so nothing in it reads a tensor's value on
    the host (.item(), bool(), a data-dependent branch): no host synchronisation, and the same
    kernels every step, as a CUDA graph replays them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastsd.loop import StepInputs, StepKey, initial_state, make_step

    cfg = SchedulerConfig.from_dict(dict(SD, prediction_type="v_prediction"), sampler)
    sched = SAMPLERS[sampler].schedule(cfg, 5)
    rows = step_rows(sched, sampler, cfg, 0.5)
    x = torch.randn(2, 4, 8, 8)
    draws = SAMPLERS[sampler].draws_noise(0.5)
    start = initial_state(sampler, x, preview)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor
        key = StepKey(sampler, cfg, 7.5, True, draws, (), preview=preview)
        step = make_step(lambda sample, timestep, **kw: sample * 0.5 + timestep[0] * 0.001, key, StepInputs({}))
        state = tuple(fake(t) for t in start)
        fake_rows, noise = fake(rows), fake(x) if draws else None
        for k in range(len(rows)):
            state = step(state, fake_rows[k], noise)
    assert state[0].shape == x.shape and len(state) == 1 + SAMPLERS[sampler].history + preview


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("preview", [False, True])
def test_state_written_in_place_as_a_captured_step_writes_it(sampler, preview):
    """A captured step writes its new state into the buffers it read (store_state): the same
    state as the step run functionally, for every sampler. Heun returns its input x as its
    history and UniPC shifts its history along; an in-order copy overwrote those first (found
    on an H200: Heun's whole-step graph off the plain loop by 5.1, UniPC's by 0.028)."""
    from fastsd.loop import StepInputs, StepKey, initial_state, make_step, store_state

    cfg = SchedulerConfig.from_dict(SD, sampler)
    rows = step_rows(SAMPLERS[sampler].schedule(cfg, 5), sampler, cfg, 0.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    noises = torch.randn(len(rows), *x.shape, generator=gen) if SAMPLERS[sampler].draws_noise(0.5) else None
    key = StepKey(sampler, cfg, 7.5, False, noises is not None, (), preview=preview)
    step = make_step(lambda sample, timestep, **kw: torch.tanh(sample) + timestep[0] * 1e-3, key, StepInputs({}))
    state = initial_state(sampler, x, preview)
    static = tuple(t.clone() for t in state)
    for k in range(len(rows)):
        noise = None if noises is None else noises[k]
        state = step(state, rows[k], noise)
        store_state(static, step(static, rows[k], noise))
    assert all(torch.equal(a, b) for a, b in zip(state, static, strict=True))


def test_heun_legacy_callback_once_per_step(pipes):
    """diffusers calls the legacy callback when a loop step completes a sampler step (Heun: every
    second UNet call, and the last), with step = i // order; callback_on_step_end every call."""
    legacy, every = [], []
    pipes("eps")("a cat", num_inference_steps=3, scheduler="heun", output_type="latent", seed=0,
                 callback=lambda i, t, x: legacy.append(i),
                 callback_on_step_end=lambda p, i, t, kw: every.append(i) or {})
    assert legacy == [0, 1, 2] and every == [0, 1, 2, 3, 4]


def test_pre_drawn_noise_is_diffusers_order(pipes):
    """N draws of one shape in a row: the same numbers whether drawn in the loop or before it."""
    pipe = pipes("eps")
    a = pipe._randn_steps((2, 4, 3, 3), 3, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    b = torch.stack([pipe._randn((2, 4, 3, 3), g) for _ in range(3)])
    assert torch.equal(a, b)


# ---- CUDA ---------------------------------------------------------------------------------

CASES = {  # every sampler, with and without CFG, txt2img, img2img and inpaint
    "txt2img ddim": dict(scheduler="ddim"),
    "ddim eta, no cfg": dict(scheduler="ddim", eta=0.5, guidance_scale=1.0),
    "txt2img pndm": dict(scheduler="pndm"),
    "img2img pndm": dict(scheduler="pndm", strength=0.6),
    "txt2img euler": dict(scheduler="euler"),
    "txt2img euler_a": dict(scheduler="euler_a"),
    "txt2img euler_karras": dict(scheduler="euler_karras"),
    "inpaint": dict(strength=0.8, scheduler="euler_a"),
    "txt2img heun": dict(scheduler="heun"),
    "txt2img dpmpp_2m": dict(scheduler="dpmpp_2m"),
    "img2img dpmpp_2m_karras": dict(scheduler="dpmpp_2m_karras", strength=0.7),
    "txt2img dpmpp_2m_sde": dict(scheduler="dpmpp_2m_sde"),
    "txt2img dpmpp_2m_sde_karras": dict(scheduler="dpmpp_2m_sde_karras"),
    "txt2img unipc, no cfg": dict(scheduler="unipc", guidance_scale=1.0),
    "inpaint lcm": dict(strength=0.8, scheduler="lcm"),
}


def _kwargs(name, init_image, mask_image):
    kw = dict(CASES[name])
    if name.startswith(("inpaint", "img2img")):
        kw.update(image=init_image)
    if name.startswith("inpaint"):
        kw.update(mask_image=mask_image)
    return kw


_HOST = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default,
         torch.ops.aten._local_scalar_dense.default}
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class _HostTraffic(TorchDispatchMode):
    """Records, while active, what on CUDA makes the host wait for the GPU: a tensor made from
    host data (aten.lift_fresh: torch.tensor / as_tensor, a host-to-device copy there), a
    tensor value read on the host (.item(), bool(), float(): aten._local_scalar_dense), a copy
    between devices."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _HOST:
            self.seen.append(str(func))
        out = func(*args, **(kwargs or {}))
        if func in _COPIES and isinstance(out, torch.Tensor):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if isinstance(src, torch.Tensor) and src.device != out.device:
                self.seen.append(f"{func}: {src.device} -> {out.device}")
        return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_loop_makes_no_host_traffic(pipes, monkeypatch, name, init_image, mask_image):
    """The CPU twin of test_loop_never_synchronises: inside the loop (Pipeline._denoise, every
    sampler) no tensor is made from host data and no tensor value is read on the host. Every
    table is built and moved to the device before it."""
    pipe = pipes("eps")
    traffic = _HostTraffic()
    denoise = Pipeline._denoise

    def watched(self, *args, **kwargs):
        with traffic:
            return denoise(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "_denoise", watched)
    steps = []
    out = pipe(["a cat", "a dog"], num_inference_steps=4, seed=0, output_type="latent",
               callback=lambda i, t, x: steps.append(i), **_kwargs(name, init_image, mask_image))
    assert steps and torch.isfinite(out.images).all()
    assert traffic.seen == []


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_loop_never_synchronises(ckpts, monkeypatch, name, init_image, mask_image):
    """The loop runs under torch.cuda.set_sync_debug_mode("error"): any host sync raises."""
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda", backend="eager")
    denoise = Pipeline._denoise

    def strict(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return denoise(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(Pipeline, "_denoise", strict)
    out = pipe(["a cat", "a dog"], num_inference_steps=4, seed=0, output_type="np",
               callback=lambda i, t, x: None, **_kwargs(name, init_image, mask_image))
    assert np.isfinite(out.images).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_step_graphs_match_plain_loop(ckpts, name, init_image, mask_image):
    """fp32 on CUDA: replaying the captured step gives the plain loop's latents; one capture
    serves every call of the same shape and settings, whatever the number of steps."""
    kw = dict(seed=0, output_type="latent", dtype="fp32", **_kwargs(name, init_image, mask_image))
    kw_load = dict(device="cuda", backend="eager", dtype=kw.pop("dtype"))
    plain = Pipeline.from_pretrained(str(ckpts["eps"]), **kw_load)
    graphed = Pipeline.from_pretrained(str(ckpts["eps"]), cuda_graphs=True, **kw_load)
    for steps in (4, 6):
        want = plain(["a cat", "a dog"], num_inference_steps=steps, **kw).images
        got = graphed(["a cat", "a dog"], num_inference_steps=steps, **kw).images
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (steps, (got - want).abs().max())
    assert len(graphed._graphs.graphs) == 1 and not graphed._graphs.refused
    assert not any(g.graphs for g in graphed.backend._graphed.values())  # the step's capture holds the UNet
    again = graphed(["a cat", "a dog"], num_inference_steps=6, **kw)
    assert torch.equal(again.images, got)
    assert again.backends["unet"] == "eager"  # a replay reports what ran at its capture


@pytest.mark.gpu
def test_whole_step_graph_fp16_and_unet_graph_fallback(ckpts, caplog):
    """fp16 whole-step replay stays within fp16 noise of the plain loop; a step that cannot
    be captured falls back to the UNet-only graph with one warning."""
    kw = dict(num_inference_steps=4, seed=0, output_type="np")
    plain = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda", backend="eager")("a cat", **kw).images
    graphed = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda", backend="eager", cuda_graphs=True)
    assert np.abs(graphed("a cat", **kw).images - plain).max() < 1e-2
    broken = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda", backend="eager", cuda_graphs=True)
    unet = broken.backend.unet

    def refuses_capture(**inputs):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("not capturable")
        return unet(**inputs)

    broken.backend.unet = refuses_capture
    out = broken("a cat", **kw).images
    assert "cannot capture the denoising step" in caplog.text and len(broken._graphs.refused) == 1
    assert sum(len(g.graphs) for g in broken.backend._graphed.values()) == 1  # UNet-only, after the refusal
    assert np.abs(out - plain).max() < 1e-2


def test_no_unet_graph_inside_a_step_capture(ckpts):
    """While a whole step is warmed up or captured, the eager UNet runs as it is: its own
    UNet-only graph (own warm-ups, own memory pool) is made only for a step run uncaptured."""
    from fastsd.backends.cuda_graphs import capturing, graph_warmup
    from fastsd.backends.eager import EagerBackend
    from fastsd.checkpoint import load_checkpoint
    from fastsd.families import family_for

    ckpt = load_checkpoint(str(ckpts["eps"]))
    backend = EagerBackend(ckpt, family_for(ckpt), torch.device("cpu"), torch.float32, cuda_graphs=True)
    graphed = []
    backend._graphed_unet = lambda *args: graphed.append(args) or torch.zeros(1)
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10.0, 10.0]),
              "encoder_hidden_states": torch.randn(2, 77, 64)}
    assert not capturing()
    with graph_warmup():
        assert capturing()
        out = backend.run("unet", inputs)
    assert not graphed and out.shape == (2, 4, 8, 8) and not capturing()
    backend.run("unet", inputs)
    assert len(graphed) == 1
    seen = []  # with static shapes (graphs) the eager networks run with cuDNN's algorithm search
    backend.modules["vae_decoder"].register_forward_pre_hook(lambda m, a: seen.append(torch.backends.cudnn.benchmark))
    before = torch.backends.cudnn.benchmark
    backend.run("vae_decoder", {"latent": torch.randn(1, 4, 8, 8)})
    assert seen == [True] and torch.backends.cudnn.benchmark == before


def test_controlnet_step_reads_no_device_value():
    """The step with two ControlNets (their scales from the row, residuals summed into the
    UNet's inputs) runs on fake tensors too: no host read, the same kernels every step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastsd.loop import StepInputs, StepKey, initial_state, make_step

    cfg = SchedulerConfig.from_dict(SD, "euler")
    sched = SAMPLERS["euler"].schedule(cfg, 4)
    rows = torch.cat([step_rows(sched, "euler", cfg, 0.0), torch.rand(4, 2)], dim=1)
    x = torch.randn(1, 4, 8, 8)
    seen = []

    def controlnet(name, inputs):
        seen.append((name, tuple(inputs["sample"].shape), tuple(inputs["conditioning_scale"].shape)))
        return (inputs["sample"] * inputs["conditioning_scale"], inputs["sample"][:, :, ::2, ::2])

    def unet(sample, timestep, down_residual_0=None, mid_residual=None, **kw):
        return sample * 0.5 + down_residual_0 + mid_residual.mean()

    with FakeTensorMode() as mode:
        fake = mode.from_tensor
        images = (fake(torch.rand(2, 3, 16, 16)), fake(torch.rand(2, 3, 16, 16)))
        key = StepKey("euler", cfg, 7.5, True, False, (), controlnets=("controlnet", "controlnet_2"),
                      residuals=("down_residual_0", "mid_residual"))
        step = make_step(unet, key, StepInputs({}, control=images), controlnet)
        state = tuple(fake(t) for t in initial_state("euler", x))
        fake_rows = fake(rows)
        for k in range(len(rows)):
            state = step(state, fake_rows[k], None)
    assert state[0].shape == x.shape
    assert seen[:2] == [("controlnet", (2, 4, 8, 8), (1,)), ("controlnet_2", (2, 4, 8, 8), (1,))]
