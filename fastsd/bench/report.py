"""Benchmark reports: versioned JSON, a Markdown table, a PNG chart, and comparisons."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..errors import InvalidArgumentError
from ..files import atomic_write
from .runner import NOISY_SPREAD, SCHEMA, BenchResult

NOISE_FLOOR = 0.05  # a change under 5% is never called a regression
CHART_STAGES = ("text_encoder", "unet", "vae_decoder")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _mem(row: dict) -> str:
    gib = row["peak_memory_bytes"] / 2**30
    return f"{gib:.2f} GiB" + (" RSS" if row["memory_kind"] == "peak_rss" else "")


def _vs(row: dict) -> str:
    ratio = row.get("vs_diffusers")
    if row["backend"] == "diffusers":
        return "baseline" + (f" (noisy: {row['noisy']})" if row.get("noisy") else "")
    if not ratio:
        return "-"
    if "noisy" in ratio:
        return f"noisy ({ratio['noisy']})"
    return f"{ratio['end_to_end']:.2f}x, {ratio['unet_per_step']:.2f}x"


def markdown(result: BenchResult | dict) -> str:
    r = asdict(result) if isinstance(result, BenchResult) else result
    m = r["machine"]
    hw = m.get("gpu") or m.get("cpu")
    control = r["config"].get("controlnets") or ()
    model = r["config"]["model"] + "".join(f" + ControlNet `{c}`" for c in control)
    flags = f" [{' '.join(m['cpu_flags'])}]" if m.get("cpu_flags") and m["device"] == "cpu" else ""
    libs = "".join(f", {k} {m[k]}" for k in ("onnxruntime", "openvino") if m.get(k))
    lines = [f"fastsd bench: `{model}` on {hw}{flags} ({m['device']}), {r['created']}, "
             f"torch {m['torch']}{libs}, fastsd {m['fastsd']} ({m.get('git_commit') or 'no git'})", "",
             "| backend | size | batch | steps | scheduler | text enc ms | UNet ms/step | VAE dec ms "
             "| end to end ms (median / p90) | img/s | peak memory | vs diffusers (e2e, UNet step) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        s = row["stages"]
        vs = _vs(row)
        fallback = sorted(n for n, b in row.get("ran", {}).items() if b == "eager" and row["backend"] != "eager")
        name = row["backend"] + (f" ({', '.join(fallback)}: eager)" if fallback else "")
        lines.append(
            f"| {name} | {row['height']}x{row['width']} | {row['batch']} | {row['steps']} | "
            f"{row['scheduler']} | {_ms(s['text_encoder']['median'])} | {_ms(s['unet_per_step']['median'])} | "
            f"{_ms(s['vae_decoder']['median'])} | {_ms(s['end_to_end']['median'])} / {_ms(s['end_to_end']['p90'])}"
            f" | {row['images_per_s']:.2f} | {_mem(row)} | {vs} |")
    extras = [f"- {row['backend']}: export {row['export_seconds']:.1f} s" for row in r["rows"]
              if row.get("export_seconds")]
    extras += [f"- {row['backend']}: cold start (new process to first image) {row['cold_start_seconds']:.1f} s"
               + (f", ready for the first call after {row['cold_start_ready']:.1f} s" if row.get("cold_start_ready")
                  else "")
               + (": " + ", ".join(f"{p} {s:.1f} s" for p, s in row["cold_start_phases"].items())
                  if row.get("cold_start_phases") else "")
               + "".join(f" ({p} {s:.1f} s, overlapped)" for p, s in row.get("cold_start_overlapped", {}).items() if s)
               for row in r["rows"] if row.get("cold_start_seconds")]
    notes = [f"- {n}" for n in r.get("notes", [])]
    runs = r["config"]
    kind = {"peak_rss": "peak RSS of the row's own process",
            "cuda_process_driver": "device memory its own process holds (driver view)"}
    kinds = sorted({kind.get(row["memory_kind"], row["memory_kind"]) for row in r["rows"]})
    order = "backends one after another" if runs.get("sequential") else "runs interleaved"
    lines += ["", f"{runs['warmup']} warm-up + {runs['runs']} timed runs per row, each backend in its own process, "
              f"{order}; guidance {runs['guidance']}; memory: {', '.join(kinds) or '-'}." + _quietness(r["rows"])]
    return "\n".join(lines + ([""] + sorted(set(extras)) if extras else []) + ([""] + notes if notes else []))


def _quietness(rows: list[dict]) -> str:
    """The machine during the timed runs, over every row (fastsd/bench/quiet.py)."""
    loads = [row["machine_load"] for row in rows if row.get("machine_load")]
    if not loads:
        return " The machine's load was not measured (no /proc/stat)."
    clocks = [m for load in loads if load.get("mhz") for m in load["mhz"]]
    clock = f", CPU clock {min(clocks)}-{max(clocks)} MHz" if clocks else ", CPU clock not readable"
    return (f" During the timed runs other processes kept at most {max(x['others_cpus'] for x in loads):.2f} CPUs "
            f"busy, steal at most {max(x['steal'] for x in loads):.1%}{clock}.")


def write_reports(result: BenchResult, out_dir: Path) -> list[Path]:
    """DIR/bench.json, DIR/bench.md, DIR/bench.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "bench.json", out_dir / "bench.md", out_dir / "bench.png"]
    atomic_write(paths[0], json.dumps(asdict(result), indent=2).encode())
    atomic_write(paths[1], (markdown(result) + "\n").encode())
    atomic_write(paths[2], chart(result))
    return paths


def chart(result: BenchResult) -> bytes:
    """The figure (`figure`) as PNG."""
    import io

    import matplotlib.pyplot as plt

    fig = figure(result)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def figure(result: BenchResult):
    """Stacked bars of each row's stage medians, its end-to-end median (a dot) with the p10-p90
    range of its runs (a line), and noisy rows hatched and marked "noisy" (no ratio). Sized so
    that its labels read at 100% (9-10 pt at 120 dpi)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    x = list(range(len(rows)))
    labels = [f"{r['backend']}\n{r['height']}x{r['width']} b{r['batch']}\n{r['steps']} st {r['scheduler']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(rows) + 2) + 3, 5.5), dpi=120)  # + the legend beside
    bottom = [0.0] * len(rows)
    for stage in CHART_STAGES:
        vals = [r["stages"][stage]["median"] for r in rows]
        ax.bar(x, vals, bottom=bottom, label=f"{stage} (median)", width=0.6,
               hatch=["//" if r.get("noisy") else "" for r in rows], edgecolor="white")
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    e2e = [r["stages"]["end_to_end"] for r in rows]
    lows = [s["median"] - s.get("p10", s["median"]) for s in e2e]
    highs = [s["p90"] - s["median"] for s in e2e]
    ax.errorbar(x, [s["median"] for s in e2e], yerr=[lows, highs], fmt="o", color="black", capsize=5,
                label="end to end: median, p10-p90 of the runs")
    top = max((s["p90"] for s in e2e), default=1.0)
    for k, r in enumerate(rows):
        if r.get("noisy"):
            ax.annotate("noisy", (k, e2e[k]["p90"]), xytext=(0, 6), textcoords="offset points", ha="center",
                        color="crimson", fontsize=10, fontweight="bold")
    ax.set_ylim(0, top * 1.2)
    ax.set_xticks(x, labels, fontsize=9)
    ax.set_ylabel("seconds", fontsize=10)
    ax.tick_params(axis="y", labelsize=9)
    title = f"fastsd bench: {result.config['model']} ({result.machine.get('gpu') or result.machine['cpu']})"
    ax.set_title(title + ("\nhatched, 'noisy': runs not steady or machine not quiet, no ratio"
                          if any(r.get("noisy") for r in rows) else ""), fontsize=10)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def load_report(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"cannot read benchmark report {path}: {e}") from None
    if data.get("schema") not in (SCHEMA, "fastsd-bench/1"):  # /1: one process for every backend
        raise InvalidArgumentError(f"{path} is not a fastsd benchmark report (schema {data.get('schema')!r})")
    return data


def _row_key(report: dict, row: dict) -> tuple:
    """What makes two rows the same measurement: the same weights (checkpoint fingerprint,
    else the model as named), backend, shape, steps, sampler, guidance, precision, device."""
    cfg = report["config"]
    return (cfg.get("checkpoint") or cfg["model"], row["backend"], row["height"], row["width"], row["batch"],
            row["steps"], row["scheduler"], row.get("guidance", cfg.get("guidance")),
            row.get("dtype") or cfg.get("dtype"), cfg.get("device"))


def _labels(paths: list[str], reports: list[dict]) -> list[str]:
    """One distinct label per report: folder, machine, commit; the index where those repeat."""
    labels = [f"{Path(p).parent.name or p} ({r['machine'].get('gpu') or r['machine'].get('cpu', '?')[:24]}, "
              f"{r['machine'].get('git_commit') or '?'})" for p, r in zip(paths, reports, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"#{k + 1} {label} [{p}]" for k, (label, p) in enumerate(zip(labels, paths, strict=True))]
    return labels


def _spread(stage: dict) -> float:
    return stage["p90"] / stage["median"] if stage["median"] > 0 else float("inf")


def compare(paths: list[str]) -> tuple[str, int]:
    """Side-by-side end-to-end medians of the same measurements across reports (GPUs,
    commits), matched by checkpoint fingerprint and settings; a row slower than the first
    report by more than its noise is flagged, and a row whose p90/median spread is too wide
    to trust gets a warning instead of a verdict. Returns the Markdown table (warnings
    below it) and the number of regressions."""
    if len(paths) < 2:
        raise InvalidArgumentError("bench compare needs at least two reports")
    reports = [load_report(p) for p in paths]
    heads = _labels(paths, reports)
    lines = ["| model | backend | size | batch | steps | sched | guidance | dtype | " + " | ".join(heads) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(heads)]
    tables = [{_row_key(r, row): row for row in r["rows"]} for r in reports]
    regressions, warnings = 0, []
    for key in dict.fromkeys(k for t in tables for k in t):
        cells = []
        base = tables[0].get(key)
        for head, t in zip(heads, tables, strict=True):
            row = t.get(key)
            if row is None:
                cells.append("-")
                continue
            e2e = row["stages"]["end_to_end"]
            cell = f"{_ms(e2e['median'])} ms"
            if base is not None and row is not base:
                b = base["stages"]["end_to_end"]
                ratio = e2e["median"] / b["median"]
                cell += f" ({ratio:.2f}x)"
                spread = max(_spread(b), _spread(e2e))
                if spread > NOISY_SPREAD:
                    cell += " NOISY"
                    warnings.append(f"warning: {key[1]} {key[2]}x{key[3]} in {head}: p90 is {spread:.2f}x the "
                                    "median; too noisy to call a regression, rerun with more --runs")
                elif ratio > 1 + max(NOISE_FLOOR, spread - 1):
                    cell += " REGRESSION"
                    regressions += 1
            cells.append(cell)
        _, backend, h, w, batch, steps, sched, guidance, dtype, _ = key
        model = next(r["config"]["model"] for r, t in zip(reports, tables, strict=True) if key in t)
        lines.append(f"| {model} | {backend} | {h}x{w} | {batch} | {steps} | {sched} | {guidance} | {dtype or '-'} | "
                     + " | ".join(cells) + " |")
    if len(tables[0]) and not any(k in t for t in tables[1:] for k in tables[0]):
        warnings.append("warning: no row of the first report matches any other (other weights or settings)")
    lines += [""] + warnings if warnings else []
    return "\n".join(lines), regressions
