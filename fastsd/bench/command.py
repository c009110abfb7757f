"""`fastsd bench` and `fastsd bench compare` from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import FastSDError


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise FastSDError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise FastSDError(f"--{what} values must be >= 1, got {text!r}")
    return values


def _sizes(args) -> tuple[tuple[int, int], ...] | None:
    """The sizes asked for, each a positive multiple of the model's VAE factor (read from its
    configs, before any worker starts)."""
    from ..checkpoint import peek_vae_factor

    if args.sizes:
        try:
            sizes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(","))
        except ValueError:
            raise FastSDError(f"--sizes takes HxW[,HxW...], got {args.sizes!r}") from None
        if any(len(s) != 2 for s in sizes):
            raise FastSDError(f"--sizes takes HxW[,HxW...], got {args.sizes!r}")
        flag = "--sizes"
    elif args.height or args.width:
        if not (args.height and args.width):
            raise FastSDError("give --height and --width together")
        sizes, flag = ((args.height, args.width),), "--height/--width"
    else:
        return None
    factor = peek_vae_factor(args.model) or 1
    for h, w in sizes:
        if min(h, w) <= 0 or h % factor or w % factor:
            raise FastSDError(f"{flag}: {h}x{w} is not a positive multiple of the VAE factor {factor}")
    return sizes


EXIT_REGRESSION = 1  # bench compare found a regression (for CI); bad input is 2


def cmd_bench(args) -> int:
    from ..devices import parse_device
    from . import compare, default_config, markdown, run_bench, write_reports
    from .runner import BASELINE, FASTSD_BACKENDS

    if args.action:
        if args.action[0] != "compare":
            raise FastSDError(f"unknown bench action {args.action[0]!r}; use: fastsd bench compare A.json B.json")
        table, regressions = compare(args.action[1:])
        print(table)
        print(f"{regressions} regression(s) beyond the noise")
        return EXIT_REGRESSION if regressions else 0
    if not args.model:
        raise FastSDError("bench needs --model (a checkpoint or synthetic:tiny|sd15|sd21)")
    from ..schedulers import SAMPLER_NAMES

    for name in args.schedulers.split(",") if args.schedulers else ():
        if name not in SAMPLER_NAMES:
            raise FastSDError(f"--schedulers: unknown scheduler {name!r}; choose from {', '.join(SAMPLER_NAMES)}")
    backends = tuple(args.backends.split(",")) if args.backends else None
    for name in backends or ():
        if name not in FASTSD_BACKENDS + (BASELINE,):
            raise FastSDError(f"--backends: unknown backend {name!r}")
    for n in (args.warmup, args.runs):
        if n is not None and n < (0 if n is args.warmup else 1):
            raise FastSDError("--warmup must be >= 0 and --runs >= 1")
    device = parse_device(args.device)
    cfg = default_config(args.model, device, backends=backends, sizes=_sizes(args), batches=_ints(args.batch, "batch"),
                         steps=_ints(args.steps, "steps"), schedulers=tuple(args.schedulers.split(","))
                         if args.schedulers else None, guidance=args.guidance, warmup=args.warmup, runs=args.runs,
                         dtype=args.dtype, engine_dir=args.engine_dir, export_missing=args.export_missing,
                         cold_start=args.cold_start, sequential=args.sequential,
                         controlnets=tuple(args.controlnet) or None)
    result = run_bench(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    paths = write_reports(result, Path(args.out))
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 130 if result.interrupted else 0
