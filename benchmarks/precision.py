"""fp16 (or bf16, or int8) against fp32, per network and per whole generation: the error a
lower-precision run adds.

Per network: the same sample inputs (fixed seed) through the eager fp32 network and the
half-precision one (eager, or with --backend openvino the CPU's OpenVINO entry of that
precision), on one device; the relative error max |half - fp32| / max |fp32|, NaN/inf
counted as a failure, against a stated bound. The fp32 reference runs in true fp32: TF32
is switched off for cuBLAS matmuls and cuDNN convolutions (cuDNN's default is TF32 on
Ampere and later), and the report records both flags.
With --generations SAMPLERS: whole generations (--steps, one fixed seed and prompt per
sampler) at fp32 eager and at the lower precision on each of --backends, compared on the
final latents (max abs, relative L2) and the images (max abs, relative L2, PSNR in dB).
Random weights: these figures show how far the arithmetic drifts, not whether a trained
model's picture still looks right (a trained model's smoother weights usually drift less).
With --dtype int8 --backends openvino: the OpenVINO int8 entry (its UNet quantized, the
rest bf16) against eager fp32, per network and per whole generation.
Writes JSON and a Markdown table; exits 1 if any network is over its bound.

    python3 benchmarks/precision.py --model synthetic:sd15 --device cuda --out DIR
    python3 benchmarks/precision.py --model synthetic:sd15 --device cpu --dtype bf16 --size 256 \
        --backends eager,openvino --engine-dir STORE --generations euler_a,dpmpp_2m --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastsd.backends.eager import channels_last  # noqa: E402
from fastsd.checkpoint import load_checkpoint  # noqa: E402
from fastsd.families import family_for  # noqa: E402
from fastsd.networks import FLOAT, relative_error  # noqa: E402

# fp16 keeps ~3 decimal digits per operation; a network of a few dozen layers stays near
# 1e-3 relative. The VAE decoder upsamples to large activations and is the loosest. bf16
# has 3 fewer mantissa bits than fp16: bounds 5x looser.
BOUNDS = {"fp16": {"text_encoder": 1e-2, "text_encoder_2": 1e-2, "unet": 1e-2, "vae_encoder": 2e-2,
                   "vae_decoder": 2e-2},
          "bf16": {"text_encoder": 5e-2, "text_encoder_2": 5e-2, "unet": 5e-2, "vae_encoder": 1e-1,
                   "vae_decoder": 1e-1}}
# int8 (OpenVINO only): the UNet quantized (weights and activations, 8 bits: ~2 decimal digits
# on calibrated ranges), the other networks bf16; the build's own bound (export/openvino.py)
BOUNDS["int8"] = {**BOUNDS["bf16"], "unet": 0.2}
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@contextmanager
def true_fp32() -> Iterator[dict]:
    """TF32 off for matmuls and convolutions inside the block (restored after); yields the
    flags as torch reports them inside it, for the report."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32, cudnn.allow_tf32 = False, False
    try:
        yield {"matmul_allow_tf32": matmul.allow_tf32, "cudnn_allow_tf32": cudnn.allow_tf32}
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def _sample_inputs(spec, batch: int, size: int) -> tuple:
    """A network's fixed-seed sample inputs at `size` (the VAE encoder's images in [-1, 1], as the
    pipeline feeds it)."""
    inputs = spec.sample_inputs(batch, size, size, torch.float32)
    return (inputs[0].clamp(-1, 1),) if spec.name == "vae_encoder" else inputs


def _row(network: str, layout: str, got: tuple, want: tuple, bound: float, seconds: float) -> dict:
    """One network's report row: the worst relative error of its outputs against the bound."""
    err = max(relative_error(g, w) for g, w in zip(got, want, strict=True))
    return {"network": network, "layout": layout, "relative_error": err, "bound": bound, "ok": err <= bound,
            "finite": bool(torch.isfinite(got[0]).all()), "shape": list(got[0].shape),
            "half_seconds": round(seconds, 4)}


def check(model: str, device: str, half: str, size: int | None, batch: int = 2) -> list[dict]:
    ckpt = load_checkpoint(model)
    info, family = ckpt.info, family_for(ckpt)
    specs = family.specs
    size = size or info.default_size
    rows = []
    for name in family.networks:
        module = family.modules(ckpt)[name].to(device, torch.float32).eval()
        inputs = _sample_inputs(specs[name], batch, size)
        # as eager runs it on this device: channels-last convolutions on CUDA (measured both ways there,
        # so a fault of the layout shows apart from one of the precision)
        layouts = ["contiguous", "channels_last"] if torch.device(device).type == "cuda" and channels_last(name) \
            else ["contiguous"]
        bound = BOUNDS[half][name]
        with torch.inference_mode():
            want = _outputs(module(*(t.to(device) for t in inputs)))
            module.to(dtype=HALF[half])
            for layout in layouts:
                if layout == "channels_last":
                    module.to(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                got = _outputs(module(*(t.to(device, HALF[half]) if spec.kind == FLOAT else t.to(device)
                                        for spec, t in zip(specs[name].inputs, inputs, strict=True))))
                seconds = time.perf_counter() - t0
                rows.append(_row(name, layout, got, want, bound, seconds))
        module.to("cpu")
        del module
    return rows


def check_openvino(model: str, half: str, size: int | None, engine_dir: str, batch: int = 2) -> list[dict]:
    """Per network: the OpenVINO entry of precision `half` against the eager fp32 network."""
    from fastsd.backends.openvino import OvRunner
    from fastsd.engines import QUANTIZED, Profile, entry_dir, graph_file, read_manifest

    ckpt = load_checkpoint(model)
    info, family = ckpt.info, family_for(ckpt)
    size = size or info.default_size
    entry = entry_dir(Path(engine_dir), info.fingerprint, "openvino", half)
    manifest = read_manifest(entry)
    if not manifest:
        raise SystemExit(f"precision: no OpenVINO {half} entry at {entry} (fastsd build --backend openvino --dtype "
                         f"{half})")
    rows, modules = [], family.modules(ckpt)
    for name in family.networks:
        spec, module = family.specs[name], modules[name].float().eval()
        inputs = _sample_inputs(spec, batch, size)
        record = manifest["networks"][name]
        runner = OvRunner(entry / graph_file(name, record), spec, torch.device("cpu"), Profile(**manifest["profile"]),
                          QUANTIZED.get(half, half), record)
        with torch.inference_mode():
            want = _outputs(module(*inputs))
        t0 = time.perf_counter()
        got = _outputs(runner(**dict(zip(spec.input_names, inputs, strict=True))))
        seconds = time.perf_counter() - t0
        rows.append(_row(name, "openvino", got, want, BOUNDS[half][name], seconds))
    return rows


def _generate(pipe, sampler: str, steps: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latents, images in [0, 1]) of one generation."""
    import numpy as np

    last = {}

    def keep(_pipe, step, t, kwargs):
        last["latents"] = kwargs["latents"].detach().float().clone()
        return {}

    out = pipe("a lighthouse on a cliff at dusk, oil painting", num_inference_steps=steps, scheduler=sampler,
               height=size, width=size, seed=seed, output_type="np", callback_on_step_end=keep)
    return last["latents"], torch.from_numpy(np.asarray(out.images, dtype=np.float32))


def generations(model: str, half: str, samplers: list[str], backends: list[str], steps: int, size: int | None,
                engine_dir: str | None, seed: int = 7) -> list[dict]:
    """Whole generations at `half` on each backend against eager fp32, per sampler."""
    from fastsd import Pipeline

    ref = Pipeline.from_pretrained(model, device="cpu", backend="eager", dtype="fp32")
    size = size or ref.info.default_size
    want = {s: _generate(ref, s, steps, size, seed) for s in samplers}
    del ref
    rows = []
    for backend in backends:
        pipe = Pipeline.from_pretrained(model, device="cpu", backend=backend, dtype=half, engine_dir=engine_dir)
        for s in samplers:
            t0 = time.perf_counter()
            lat, img = _generate(pipe, s, steps, size, seed)
            seconds = time.perf_counter() - t0
            (ref_lat, ref_img) = want[s]
            mse = float(((img - ref_img) ** 2).mean())
            rows.append({"backend": backend, "sampler": s, "steps": steps, "size": size,
                         "latent_max_abs": float((lat - ref_lat).abs().max()),
                         "latent_rel_l2": float((lat - ref_lat).norm() / ref_lat.norm()),
                         "image_max_abs": float((img - ref_img).abs().max()),
                         "image_rel_l2": float((img - ref_img).norm() / ref_img.norm()),
                         "psnr_db": float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(1.0 / mse))),
                         "seconds": round(seconds, 1)})
        del pipe
    return rows


def generations_markdown(rows: list[dict], model: str, half: str) -> str:
    lines = [f"whole generations, {half} vs eager fp32, `{model}` (same seed and prompt; images in [0, 1])", "",
             "| backend | sampler | steps | size | latents max abs | latents rel. L2 | image max abs | image rel. L2 "
             "| PSNR dB | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['sampler']} | {r['steps']} | {r['size']} | {r['latent_max_abs']:.3g} | "
              f"{r['latent_rel_l2']:.3g} | {r['image_max_abs']:.3g} | {r['image_rel_l2']:.3g} | {r['psnr_db']:.1f} | "
              f"{r['seconds']} |" for r in rows]
    return "\n".join(lines)


def _outputs(out) -> tuple:
    """A network's output(s) as a tuple of float32 tensors."""
    return tuple(o.float() for o in out) if isinstance(out, tuple) else (out.float(),)


def markdown(rows: list[dict], model: str, device: str, half: str, tf32: dict) -> str:
    flags = ", ".join(f"{k} {v}" for k, v in tf32.items())
    lines = [f"{half} vs eager fp32, `{model}` on {device} (fp32 reference: {flags})", "",
             "| network | layout | relative error (max abs / max abs ref) | bound | ok |", "|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['layout']} | {r['relative_error']:.2e} | {r['bound']:.0e} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=sorted(BOUNDS), help="int8: OpenVINO int8 entries only")
    ap.add_argument("--size", type=int, default=None, help="pixels (default: the model's own)")
    ap.add_argument("--backends", default="eager", help="comma list: eager, openvino (CPU: the entry of --dtype)")
    ap.add_argument("--engine-dir", default=None, help="the store holding the OpenVINO entries")
    ap.add_argument("--generations", default=None, metavar="SAMPLERS",
                    help="also whole generations with these samplers (comma list)")
    ap.add_argument("--steps", type=int, default=20, help="steps per generation")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("precision: no CUDA device", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.dtype not in HALF and backends != ["openvino"]:
        print(f"precision: {args.dtype} runs on --backends openvino only", file=sys.stderr)
        return 2
    with true_fp32() as tf32:
        rows = check(args.model, args.device, args.dtype, args.size) if "eager" in backends else []
        if "openvino" in backends:
            rows += check_openvino(args.model, args.dtype, args.size, args.engine_dir)
        gens = generations(args.model, args.dtype, args.generations.split(","), backends, args.steps, args.size,
                           args.engine_dir) if args.generations else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps({"model": args.model, "device": args.device,
                                                    "dtype": args.dtype, "tf32": tf32, "rows": rows,
                                                    "generations": gens}, indent=2))
    text = markdown(rows, args.model, args.device, args.dtype, tf32)
    if gens:
        text += "\n\n" + generations_markdown(gens, args.model, args.dtype)
    (out / "precision.md").write_text(text + "\n")
    print(text)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
