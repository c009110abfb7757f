"""Weights are data, measured: a new checkpoint of an exported architecture by refit vs from
scratch, and switching a LoRA, on full-size random-weight checkpoints.

1. Two random-weight checkpoints of one architecture (`synthetic:NAME` and the same with
   another seed). For each engine kind asked (onnxruntime, compiled, openvino): the first is built
   from scratch into a store (the donor); the second is built into that store (refit: the
   donor's graphs / packages reused, only the weights written) and, for comparison, from
   scratch into a store of its own. Each in a fresh process, timed end to end (loading the
   checkpoint included). Before both, a process loads the second checkpoint once (its first
   sight: every file hashed for its fingerprint, timed and reported apart), so the refit and
   the build from scratch find it alike. The refitted entry then runs in a fresh process: its load time and
   first one-step image, against eager's on the second checkpoint.
2. A LoRA (kohya layout, rank R, on every attention projection and feed-forward layer of
   the UNet and every text-encoder layer: what a typical SD 1.5 LoRA touches) loaded,
   re-scaled and unloaded on eager and on each engine kind's pipeline: seconds per switch,
   and a one-step image with the LoRA against eager's.

    python3 benchmarks/refit.py --model synthetic:sd15 --kinds onnxruntime,compiled --out DIR

Writes DIR/refit.json and DIR/refit.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUILD = {"onnxruntime": ["export"], "compiled": ["build", "--backend", "compiled"],
         "openvino": ["build", "--backend", "openvino"]}


def second_checkpoint(model: str, out: Path) -> Path:
    """The same architecture as `model` (synthetic:NAME) with other random weights."""
    from fastsd.synthetic import build

    name = model.split(":", 1)[1]
    if not (out / "model_index.json").exists():
        build(out, name, seed=1)
    return out


def timed_build(kind: str, model: str, store: Path, extra: list[str]) -> dict:
    """`fastsd export|build` in a fresh process: wall seconds and what it printed."""
    cmd = [sys.executable, "-m", "fastsd", *BUILD[kind], "--model", model, "--engine-dir", str(store), *extra]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return {"seconds": round(seconds, 1), "refitted": sum("refitted from" in line for line in lines), "log": lines}


def first_sight(model: str) -> float:
    """Seconds for a fresh process to load a checkpoint it has never seen (its files hashed for
    the fingerprint and checked for NaN): paid once per checkpoint by whichever command loads
    it first, so it comes before both builds of the second checkpoint, which then compare alike."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", "import sys; from fastsd.checkpoint import load_checkpoint; "
                          "load_checkpoint(sys.argv[1])", model], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"loading {model} failed:\n{run.stderr[-3000:]}")
    return round(time.perf_counter() - t0, 1)


def refitted_runs(model: str, kind: str, store: Path, size: int) -> dict:
    """The refitted entry at work, in a fresh process: seconds to load the pipeline (its
    engines take the checkpoint's weights at load) and to its first one-step image, and that
    image against eager's on the same checkpoint."""
    code = (
        "import json, sys, time; t0 = time.perf_counter()\n"
        "import numpy as np; from fastsd import Pipeline\n"
        "model, kind, store, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])\n"
        "pipe = Pipeline.from_pretrained(model, backend=kind, engine_dir=store, device='cpu')\n"
        "t1 = time.perf_counter()\n"
        "kw = dict(num_inference_steps=1, seed=0, output_type='np', height=size, width=size)\n"
        "out = pipe('a lighthouse at dusk', **kw); t2 = time.perf_counter()\n"
        "ref = Pipeline.from_pretrained(model, backend='eager', device='cpu')('a lighthouse at dusk', **kw)\n"
        "print(json.dumps({'load_s': round(t1 - t0, 1), 'first_image_s': round(t2 - t1, 1), "
        "'backends': out.backends, 'vs_eager': float(np.abs(out.images - ref.images).max())}))\n")
    run = subprocess.run([sys.executable, "-c", code, model, kind, str(store), str(size)], capture_output=True,
                         text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"the refitted {kind} entry did not run:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def make_lora(model: str, out: Path, rank: int) -> Path:
    """A kohya LoRA on every attention projection and feed-forward layer of the UNet and every
    text-encoder layer (random factors scaled to a plausible update size)."""
    import torch
    from safetensors.torch import save_file

    from fastsd.checkpoint import load_checkpoint

    ckpt = load_checkpoint(model)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    unet = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    text = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    for prefix, model_, names in (("lora_unet_", ckpt.unet, unet), ("lora_te_", ckpt.text_encoder, text)):
        for name, module in model_.named_modules():
            if not any(name.endswith("." + n) for n in names):
                continue
            w = module.weight
            key = prefix + ("text_model." + name.removeprefix("text_model.") if prefix == "lora_te_" else name)
            key = key.replace(".", "_")
            down = torch.randn((rank, *w.shape[1:]), generator=gen) / w.shape[1] ** 0.5
            up = torch.randn((w.shape[0], rank, *([1] * (w.ndim - 2))), generator=gen) * 0.01
            tensors[f"{key}.lora_down.weight"] = down.half()
            tensors[f"{key}.lora_up.weight"] = up.half()
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def lora_switches(model: str, backend: str, store: Path, lora: Path, size: int) -> dict:
    """Seconds to load (fuse + refit), re-scale and unload the LoRA on one pipeline, and a
    one-step image with it (for the comparison with eager)."""
    import numpy as np

    from fastsd import Pipeline

    pipe = Pipeline.from_pretrained(model, backend=backend, engine_dir=str(store), device="cpu")
    kw = dict(num_inference_steps=1, seed=0, output_type="np", height=size, width=size)
    base = pipe("a lighthouse at dusk", **kw)
    t0 = time.perf_counter()
    pipe.load_lora(lora, scale=1.0, name="style")
    load = time.perf_counter() - t0
    out = pipe("a lighthouse at dusk", **kw)
    t0 = time.perf_counter()
    pipe.set_lora_scale("style", 0.5)
    rescale = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.unload_lora()
    unload = time.perf_counter() - t0
    again = pipe("a lighthouse at dusk", **kw)
    return {"backend": backend, "backends": out.backends, "load_s": round(load, 2), "rescale_s": round(rescale, 2),
            "unload_s": round(unload, 2), "unet_step_s": round(min(base.timings["unet"], again.timings["unet"]), 2),
            "restored_exactly": bool(np.array_equal(again.images, base.images)),
            "lora_changes_image": float(np.abs(out.images - base.images).max()), "images": out.images}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:sd15")
    ap.add_argument("--kinds", default="onnxruntime,compiled")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="image size of the LoRA check (one step)")
    ap.add_argument("--work", default="/tmp/fastsd-refit", help="checkpoints and stores")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-builds", action="store_true", help="only the LoRA part, on the stores a previous run left")
    args = ap.parse_args(argv)
    import numpy as np

    from fastsd.checkpoint import model_source
    from fastsd.synthetic import synthetic_path

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = str(synthetic_path(args.model)) if args.model.startswith("synthetic:") else str(model_source(args.model))
    second = str(second_checkpoint(args.model, work / "second"))
    kinds = [k for k in args.kinds.split(",") if k]
    report: dict = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "builds": {}, "lora": [],
                    "first_sight_s": None if args.no_builds else first_sight(second)}
    print(f"the second checkpoint's first load (hashing, NaN check): {report['first_sight_s']} s", flush=True)
    for kind in [] if args.no_builds else kinds:
        store, scratch = work / f"store-{kind}", work / f"scratch-{kind}"
        size = ["--static", f"{args.size}x{args.size}"] if kind == "compiled" else []  # the LoRA check's size
        row = {"donor": timed_build(kind, first, store, size),
               "refit": timed_build(kind, second, store, size),
               "scratch": timed_build(kind, second, scratch, [*size, "--no-refit"])}
        row["ratio"] = round(row["refit"]["seconds"] / row["scratch"]["seconds"], 3)
        row["runs"] = refitted_runs(second, kind, store, args.size)
        report["builds"][kind] = row
        print(f"{kind}: donor {row['donor']['seconds']} s, second by refit {row['refit']['seconds']} s "
              f"({row['refit']['refitted']} networks refitted), from scratch {row['scratch']['seconds']} s: "
              f"{100 * row['ratio']:.1f}%; the refitted entry: {row['runs']}", flush=True)
    lora = make_lora(first, work / "lora" / f"rank{args.rank}.safetensors", args.rank)
    report["lora_file_mb"] = round(lora.stat().st_size / 2**20, 1)
    eager = lora_switches(first, "eager", work / "none", lora, args.size)
    rows = [eager]
    for kind in kinds:
        row = lora_switches(first, kind, work / f"store-{kind}", lora, args.size)
        row["vs_eager"] = float(np.abs(row["images"] - eager["images"]).max())
        rows.append(row)
    for row in rows:
        row.pop("images")
        print(f"LoRA on {row['backend']}: load {row['load_s']} s, re-scale {row['rescale_s']} s, unload "
              f"{row['unload_s']} s; restored exactly: {row['restored_exactly']}; backends {row['backends']}"
              + (f"; vs eager {row['vs_eager']:.2e}" if "vs_eager" in row else ""), flush=True)
    report["lora"] = rows
    (out / "refit.json").write_text(json.dumps(report, indent=2))
    md = ["| engine kind | donor from scratch (s) | second checkpoint by refit (s) | second from scratch (s) | "
          "refit / scratch | refitted entry: load s, first image s, vs eager |", "|---|---|---|---|---|---|"]
    for kind, row in report["builds"].items():
        runs = row["runs"]
        md.append(f"| {kind} | {row['donor']['seconds']} | {row['refit']['seconds']} | {row['scratch']['seconds']} "
                  f"| {100 * row['ratio']:.1f}% | {runs['load_s']}, {runs['first_image_s']}, "
                  f"{runs['vs_eager']:.1e} |")
    md += ["", f"The second checkpoint's first load (before both builds): {report['first_sight_s']} s", "",
           f"LoRA: rank {args.rank}, {report['lora_file_mb']} MiB", "",
           "| pipeline | load (fuse + refit) s | re-scale s | unload s | restored exactly | one step vs eager | "
           "UNet step s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        md.append(f"| {row['backend']} | {row['load_s']} | {row['rescale_s']} | {row['unload_s']} | "
                  f"{row['restored_exactly']} | {row.get('vs_eager', 0):.1e} | {row['unet_step_s']} |")
    (out / "refit.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
