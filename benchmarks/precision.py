"""fp16 (or bf16) against fp32, per network: the error a half-precision run adds.

For each of the four networks of a checkpoint: the same sample inputs (fixed seed) through
the eager fp32 network and the eager half-precision one, on one device; the relative error
max |half - fp32| / max |fp32|, NaN/inf counted as a failure, against a stated bound.
The fp32 reference runs in true fp32: TF32 is switched off for cuBLAS matmuls and cuDNN
convolutions (cuDNN's default is TF32 on Ampere and later), and the report records both
flags. Writes JSON and a Markdown table; exits 1 if any network is over its bound.

    python3 benchmarks/precision.py --model synthetic:sd15 --device cuda --out DIR
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


def check(model: str, device: str, half: str, size: int | None, batch: int = 2) -> list[dict]:
    ckpt = load_checkpoint(model)
    info, family = ckpt.info, family_for(ckpt)
    specs = family.specs
    size = size or info.default_size
    rows = []
    for name in family.networks:
        module = family.modules(ckpt)[name].to(device, torch.float32).eval()
        inputs = specs[name].sample_inputs(batch, size, size, torch.float32)
        if name == "vae_encoder":  # images in [-1, 1], as the pipeline feeds it
            inputs = (inputs[0].clamp(-1, 1),)
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
                err = max(relative_error(g, w) for g, w in zip(got, want, strict=True))  # several outputs: the worst
                rows.append({"network": name, "layout": layout, "relative_error": err, "bound": bound,
                             "ok": err <= bound, "finite": bool(torch.isfinite(got[0]).all()),
                             "shape": list(got[0].shape), "half_seconds": round(seconds, 4)})
        module.to("cpu")
        del module
    return rows


def _outputs(out) -> tuple:
    """A network's output(s) as a tuple of float32 tensors."""
    return tuple(o.float() for o in out) if isinstance(out, tuple) else (out.float(),)


def markdown(rows: list[dict], model: str, device: str, half: str, tf32: dict) -> str:
    flags = ", ".join(f"{k} {v}" for k, v in tf32.items())
    lines = [f"{half} vs fp32, eager, `{model}` on {device} (fp32 reference: {flags})", "",
             "| network | layout | relative error (max abs / max abs ref) | bound | ok |", "|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['layout']} | {r['relative_error']:.2e} | {r['bound']:.0e} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=sorted(HALF))
    ap.add_argument("--size", type=int, default=None, help="pixels (default: the model's own)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("precision: no CUDA device", file=sys.stderr)
        return 2
    with true_fp32() as tf32:
        rows = check(args.model, args.device, args.dtype, args.size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps({"model": args.model, "device": args.device,
                                                    "dtype": args.dtype, "tf32": tf32, "rows": rows}, indent=2))
    text = markdown(rows, args.model, args.device, args.dtype, tf32)
    (out / "precision.md").write_text(text + "\n")
    print(text)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
