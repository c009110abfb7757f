"""Samplers and TAESD, measured on full-size random-weight networks.

1. Convergence, two ways:
   a. the full-size network: for each sampler, the mean absolute difference of the final
      latents between N steps and a 200-step DDIM reference from the same initial noise
      (same seed), as N grows. With random weights the pictures mean nothing, and the
      network's "ODE" is rough (no trained score is smooth in x and t), so this mostly
      shows agreement between samplers; the stochastic ones (euler_a, dpmpp_2m_sde*, lcm)
      sample the SDE and do not converge to the ODE's solution at all;
   b. an exact denoiser: Gaussian data x0 ~ N(0, sigma_data^2), whose optimal noise
      prediction is closed-form, so the sampling ODE's exact solution is known; each
      deterministic sampler's relative error against it as N grows shows its real order
      of convergence on the checkpoint's noise schedule (the same step functions, loop
      and tables as a real run; no network).
2. TAESD: decode time of the tiny autoencoder vs the checkpoint's full VAE decoder at
   HxW, eager PyTorch, median of R runs after a warm-up, on this machine.
3. Live previews: the denoising loop with a TAESD preview every step vs without, same
   settings, interleaved runs: the loop's extra time vs the preview decodes' own time.

    python3 benchmarks/samplers.py --model synthetic:sd15 --taesd synthetic:taesd --out DIR

Writes DIR/samplers.json and DIR/samplers.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STOCHASTIC = ("euler_a", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "lcm")


def convergence(pipe, samplers: list[str], steps: list[int], size: int, guidance: float, seed: int,
                reference_steps: int) -> dict:
    kw = dict(prompt="a lighthouse on a cliff at dusk", height=size, width=size, guidance_scale=guidance,
              output_type="latent", seed=seed)
    t0 = time.perf_counter()
    ref = pipe(num_inference_steps=reference_steps, scheduler="ddim", **kw).images
    print(f"reference: DDIM {reference_steps} steps in {time.perf_counter() - t0:.1f}s", flush=True)
    scale = float(ref.abs().mean())
    rows = {}
    for name in samplers:
        rows[name] = {}
        for n in steps:
            t0 = time.perf_counter()
            got = pipe(num_inference_steps=n, scheduler=name, **kw).images
            rows[name][n] = float((got - ref).abs().mean())
            print(f"{name:>20} {n:>3} steps: {rows[name][n]:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return {"reference": f"ddim {reference_steps} steps", "reference_mean_abs": scale, "mean_abs_diff": rows}


def exact_convergence(scheduler_config: dict, samplers: list[str], steps: list[int], sigma_data: float = 0.5,
                      seed: int = 0) -> dict:
    """Relative mean error of each deterministic sampler against the exact solution of the
    probability-flow ODE for Gaussian data. The denoiser gets what a UNet gets (the scaled
    latents and the timestep; sigma(t) interpolated as the sigma-based samplers do) and
    returns the optimal eps; from the sampler's starting point x (VP: a x0 + s eps), the ODE
    maps x to x * sigma_data / sqrt(a^2 sigma_data^2 + s^2) at t = 0."""
    import numpy as np
    import torch

    from fastsd.loop import StepInputs, StepKey, initial_state, make_step, run_steps, step_rows
    from fastsd.schedulers import SAMPLERS, SchedulerConfig, choose_scheduler, train_sigmas

    def unet(sample, timestep, sigmas, **_):
        sigma = float(np.interp(float(timestep[0]), np.arange(len(sigmas)), sigmas))
        a = 1 / (1 + sigma**2) ** 0.5
        s = sigma * a
        return s * sample / (a**2 * sigma_data**2 + s**2)

    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = {}
    for name in samplers:
        if name in STOCHASTIC:
            continue
        config = choose_scheduler(name, scheduler_config).config
        cfg = SchedulerConfig.from_dict(config, name)
        sigmas = train_sigmas(cfg).astype(np.float64)
        rows[name] = {}
        for n in steps:
            sched = SAMPLERS[name].schedule(cfg, n)
            table = step_rows(sched, name, cfg, 0.0).double()
            x = noise * sched.init_noise_sigma
            a, s = float(sched.signal[0] * sched.input_scale[0]), float(sched.noise_level[0] * sched.input_scale[0])
            exact = x * float(sched.input_scale[0]) * sigma_data / (a**2 * sigma_data**2 + s**2) ** 0.5
            key = StepKey(name, cfg, 1.0, False, False, ())
            step = make_step(partial(unet, sigmas=sigmas), key, StepInputs({}))
            got = run_steps(step, initial_state(name, x), table, None, sched.host_timesteps, None)
            rows[name][n] = float((got - exact).abs().mean() / exact.abs().mean())
    return {"sigma_data": sigma_data, "relative_error": rows}


def _median_seconds(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def taesd_decode(pipe, taesd: str, size: int, runs: int) -> dict:
    import torch

    from fastsd.checkpoint import load_vae
    from fastsd.networks import TinyVaeDecoder, VaeDecoder

    tiny = TinyVaeDecoder(load_vae(taesd)[0]).eval()
    full = VaeDecoder(pipe.ckpt.vae).eval()
    f, c = pipe.info.vae_factor, pipe.info.latent_channels
    z = torch.randn(1, c, size // f, size // f, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t_full = _median_seconds(lambda: full(z), runs)
        t_tiny = _median_seconds(lambda: tiny(z), runs)
    params = {"full": sum(p.numel() for p in full.parameters()), "taesd": sum(p.numel() for p in tiny.parameters())}
    return {"size": size, "runs": runs, "full_vae_decoder_s": t_full, "taesd_decoder_s": t_tiny,
            "speedup": t_full / t_tiny, "parameters": params}


def preview_overhead(pipe, taesd: str, size: int, steps: int, guidance: float, runs: int) -> dict:
    pipe.load_preview_vae(taesd)
    kw = dict(prompt="a lighthouse", height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
              scheduler="dpmpp_2m", seed=0, output_type="latent")
    plain, with_preview, decodes = [], [], []
    pipe(**kw)  # warm-up
    for _ in range(runs):  # interleaved, so drift hits both alike
        plain.append(pipe(callback_on_step_end=lambda *a: {}, **kw).timings["unet"])
        t = pipe(preview_every=1, callback_on_step_end=lambda *a: {}, **kw).timings
        with_preview.append(t["unet"])
        decodes.append(t["preview"])
    loop_plain, loop_preview, decode = (statistics.median(v) for v in (plain, with_preview, decodes))
    return {"size": size, "steps": steps, "runs": runs, "loop_s": loop_plain, "loop_with_previews_s": loop_preview,
            "extra_s": loop_preview - loop_plain, "preview_decodes_s": decode}


def markdown(result: dict) -> str:
    lines = [f"# Samplers and TAESD ({result['date']}, {result['machine']})", "", f"Command: `{result['command']}`",
             ""]
    exact = result.get("exact_convergence")
    if exact:
        steps = sorted({n for row in exact["relative_error"].values() for n in row})
        lines += [f"## Convergence to the exact ODE solution (Gaussian data, sigma_data {exact['sigma_data']}; "
                  "relative mean error of the final latents)", "",
                  "| sampler | " + " | ".join(f"N={n}" for n in steps) + " |", "|---|" + "---:|" * len(steps)]
        for name, row in exact["relative_error"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[n]:.2e}" for n in steps) + " |")
        lines.append("")
    conv = result.get("convergence")
    if conv:
        steps = sorted({n for row in conv["mean_abs_diff"].values() for n in row})
        lines += [f"## Convergence: mean |latents(N steps) - latents({conv['reference']})| "
                  f"(reference mean |latents| {conv['reference_mean_abs']:.3f})", "",
                  "| sampler | " + " | ".join(f"N={n}" for n in steps) + " |",
                  "|---|" + "---:|" * len(steps)]
        for name, row in conv["mean_abs_diff"].items():
            mark = " (stochastic)" if name in STOCHASTIC else ""
            lines.append(f"| {name}{mark} | " + " | ".join(f"{row[n]:.4f}" if n in row else "" for n in steps) + " |")
        lines.append("")
    dec = result.get("taesd")
    if dec:
        lines += [f"## Decode at {dec['size']}x{dec['size']} (eager fp32, median of {dec['runs']})", "",
                  "| decoder | parameters | seconds |", "|---|---:|---:|",
                  f"| full VAE decoder | {dec['parameters']['full'] / 1e6:.1f} M | {dec['full_vae_decoder_s']:.3f} |",
                  f"| TAESD decoder | {dec['parameters']['taesd'] / 1e6:.2f} M | {dec['taesd_decoder_s']:.3f} |",
                  "", f"TAESD is {dec['speedup']:.0f}x faster.", ""]
    pre = result.get("preview")
    if pre:
        lines += [f"## Live previews ({pre['size']}x{pre['size']}, {pre['steps']} steps, a preview every step, "
                  f"median of {pre['runs']})", "",
                  f"Loop {pre['loop_s']:.3f}s without previews, {pre['loop_with_previews_s']:.3f}s with: "
                  f"{pre['extra_s']:+.3f}s, of which the preview decodes took {pre['preview_decodes_s']:.3f}s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic:sd15")
    p.add_argument("--taesd", default="synthetic:taesd", help="the tiny autoencoder (TAESD folder / hub id)")
    p.add_argument("--samplers", default="ddim,pndm,euler,euler_karras,heun,dpmpp_2m,dpmpp_2m_karras,unipc,"
                   "euler_a,dpmpp_2m_sde,dpmpp_2m_sde_karras,lcm")
    p.add_argument("--steps", default="4,8,16,32", help="N values of the convergence table")
    p.add_argument("--size", type=int, default=128, help="convergence and preview image size (pixels)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale of the convergence runs (1: none)")
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--decode-size", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--exact-steps", default="4,8,16,32,64", help="N values of the exact-solution table")
    p.add_argument("--only", default="exact,convergence,taesd,preview")
    p.add_argument("--out", default="bench-samplers")
    args = p.parse_args(argv)

    import torch

    from fastsd import Pipeline

    torch.manual_seed(0)
    only = set(args.only.split(","))
    pipe = Pipeline.from_pretrained(args.model, backend="eager", device="cpu")
    result = {"date": time.strftime("%Y-%m-%d"), "command": "python3 benchmarks/samplers.py " + " ".join(
        argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
                   f"{torch.__version__}", "model": args.model}
    if "exact" in only:
        from fastsd.schedulers import pipeline_scheduler_config

        result["exact_convergence"] = exact_convergence(pipeline_scheduler_config(pipe.info.scheduler),
                                                        args.samplers.split(","),
                                                        [int(n) for n in args.exact_steps.split(",")])
        print(json.dumps(result["exact_convergence"]), flush=True)
    if "taesd" in only:
        result["taesd"] = taesd_decode(pipe, args.taesd, args.decode_size, args.runs)
        print(json.dumps(result["taesd"]), flush=True)
    if "preview" in only:
        result["preview"] = preview_overhead(pipe, args.taesd, args.size, 8, args.guidance, args.runs)
        print(json.dumps(result["preview"]), flush=True)
    if "convergence" in only:
        result["convergence"] = convergence(pipe, args.samplers.split(","), [int(n) for n in args.steps.split(",")],
                                            args.size, args.guidance, 0, args.reference_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers.json").write_text(json.dumps(result, indent=2))
    (out / "samplers.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
