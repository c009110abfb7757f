"""`fastsd bench` smoke run on the tiny checkpoint, reports, compare, Ctrl-C."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import copy_entries
from PIL import Image

from fastsd.bench import compare, default_config, markdown, run_bench, write_reports
from fastsd.bench.runner import SCHEMA, add_ratios, steadiness, summarize
from fastsd.cli import main

pytest.importorskip("matplotlib")


def quick(model, tmp_path, **kw):
    import torch

    base = dict(backends=("eager", "onnxruntime", "diffusers"), steps=(2,), warmup=0, runs=2,
                engine_dir=str(tmp_path / "engines"), export_missing=True)
    base.update(kw)
    return default_config(model, torch.device("cpu"), **base)


@pytest.fixture(scope="module")
def report(ckpts, eps_onnx, tmp_path_factory):
    """Two configurations (2 steps, then 1), interrupted by Ctrl-C as the second starts: the
    first configuration's rows are the smoke test's, and the run shows what an interrupt keeps.
    The onnxruntime row finds the session's export in its store and reports the export time
    its manifest recorded (a row that exports first: test_export_missing_builds_before_the_row_loads)."""
    pytest.importorskip("onnxruntime")
    tmp = tmp_path_factory.mktemp("bench")
    copy_entries(eps_onnx, tmp / "engines", "onnxruntime-*")

    def progress(line):
        if line.startswith("[2/2]"):
            raise KeyboardInterrupt

    result = run_bench(quick(str(ckpts["eps"]), tmp, steps=(2, 1)), progress=progress)
    return result, write_reports(result, tmp / "out")


def test_smoke_rows_and_ratios(report):
    result, _ = report
    assert [r["backend"] for r in result.rows] == ["eager", "onnxruntime", "diffusers"]
    for row in result.rows:
        assert (row["height"], row["width"]) == (32, 32)  # the tiny model's own default size on CPU
        for stage in ("text_encoder", "unet", "unet_per_step", "vae_decoder", "end_to_end"):
            assert row["stages"][stage]["median"] > 0 and row["stages"][stage]["n"] == 2
        assert row["stages"]["end_to_end"]["median"] >= row["stages"]["unet"]["median"]
        assert row["peak_memory_bytes"] > 0 and row["memory_kind"] == "peak_rss"
        assert row["major_faults"] >= 0 and row["min_free_memory_bytes"] > 0
    ort = result.rows[1]
    assert set(ort["ran"].values()) == {"onnxruntime"} and ort["export_seconds"] > 0
    ratio = ort["vs_diffusers"]  # 0 warm-ups: the first run may make a row noisy, which must say so
    assert ratio.get("end_to_end", 0) > 0 or ratio["noisy"]
    assert "vs_diffusers" not in result.rows[2]


def _row(backend, median, p90, faults=0):
    stages = {s: {"median": median, "p90": p90, "n": 3} for s in ("unet_per_step", "end_to_end")}
    return {"backend": backend, "height": 64, "width": 64, "batch": 1, "steps": 2, "scheduler": "ddim",
            "stages": stages, "noisy": steadiness(stages, [faults])}


def test_unsteady_rows_get_no_ratio():
    """A ratio is printed only where both rows were steady: p90 within NOISY_SPREAD of the
    median, and no paging during the timed runs."""
    rows = [_row("eager", 1.0, 1.1), _row("diffusers", 2.0, 2.2)]
    add_ratios(rows)
    assert rows[0]["vs_diffusers"] == {"unet_per_step": 2.0, "end_to_end": 2.0}
    for rows, why in (([_row("eager", 1.0, 3.0), _row("diffusers", 2.0, 2.1)], "p90 3.00x the median"),
                      ([_row("eager", 1.0, 1.0, faults=5000), _row("diffusers", 2.0, 2.0)], "5000 major page faults"),
                      ([_row("eager", 1.0, 1.0), _row("diffusers", 2.0, 9.0)], "diffusers: p90 4.50x")):
        add_ratios(rows)
        assert why in rows[0]["vs_diffusers"]["noisy"] and "end_to_end" not in rows[0]["vs_diffusers"]
        text = markdown({"config": {"model": "m", "warmup": 1, "runs": 3, "guidance": 7.5},
                         "machine": {"cpu": "c", "device": "cpu", "torch": "t", "fastsd": "f"}, "created": "now",
                         "rows": [dict(r, stages={**r["stages"], "text_encoder": r["stages"]["unet_per_step"],
                                                  "vae_decoder": r["stages"]["unet_per_step"]},
                                       images_per_s=1.0, peak_memory_bytes=1, memory_kind="peak_rss")
                                  for r in rows]})
        assert "| noisy (" in text


def test_reports_written(report):
    result, (js, md, png) = report
    data = json.loads(js.read_text())
    assert data["schema"] == SCHEMA and data["machine"]["torch"] and data["machine"]["cpu_count"] >= 1
    assert data["machine"]["fastsd"] and "git_commit" in data["machine"]
    assert isinstance(data["machine"]["cpu_flags"], list) and "openvino" in data["machine"]
    text = md.read_text()
    assert "| onnxruntime | 32x32 | 1 | 2 | ddim |" in text and "baseline" in text and "export" in text
    assert "During the timed runs other processes kept at most " in text
    for row in data["rows"]:  # what the machine did during each row's runs
        assert set(row["machine_load"]) == {"others_cpus", "steal", "mhz"} and row["machine_load"]["steal"] >= 0
        assert row["stages"]["end_to_end"]["p10"] <= row["stages"]["end_to_end"]["median"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size[0] >= 720 and im.size[1] >= 600  # 9-10 pt labels at 120 dpi: readable at 100%


def test_the_chart_draws_ranges_and_marks_noisy_rows(report):
    """The PNG: a p10-p90 range per row and, on a noisy row, the mark "noisy" (with hatching)."""
    import matplotlib.pyplot as plt

    from fastsd.bench.report import figure

    result, _ = report
    noisy = copy.deepcopy(result)
    for k, row in enumerate(noisy.rows):  # the first noisy, the others steady
        row["noisy"] = "other processes kept 1.30 CPUs busy during its runs" if k == 0 else None
    fig = figure(noisy)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["noisy"]
    assert any(c.get_label().startswith("end to end: median, p10-p90") for c in ax.containers)
    hatches = [p.get_hatch() for p in ax.patches]
    assert "//" in hatches and any(not h for h in hatches)
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 9
    plt.close(fig)


def _steady(data: dict, scale: float = 1.0, spread: float = 1.01) -> dict:
    data = copy.deepcopy(data)
    for row in data["rows"]:
        e2e = row["stages"]["end_to_end"]
        e2e["median"] *= scale
        e2e["p90"] = e2e["median"] * spread
    return data


def test_compare_flags_regressions(report, tmp_path, capsys):
    _, (js, _, _) = report
    base = json.loads(js.read_text())
    assert base["config"]["checkpoint"]  # rows are matched on the weights' fingerprint
    for name, data in (("base", _steady(base)), ("slow", _steady(base, 3.0)), ("faster", _steady(base, 0.99)),
                       ("noisy", _steady(base, 3.0, spread=2.0))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench.json").write_text(json.dumps(data))
    runs = [str(tmp_path / n / "bench.json") for n in ("base", "slow", "faster", "noisy")]
    table, regressions = compare(runs)
    rows = len(base["rows"])
    assert regressions == rows  # every row of the 3x slower run; none of the 1% faster or the noisy one
    assert table.count("REGRESSION") == rows and table.count("NOISY") == rows
    assert "too noisy to call a regression" in table
    assert main(["bench", "compare", runs[0], runs[1]]) == 1  # CI can fail on it
    assert main(["bench", "compare", runs[0], runs[2]]) == 0
    capsys.readouterr()
    # the same folder names get distinct labels; other weights are not compared with these
    other = _steady(base, 3.0)
    other["config"]["checkpoint"] = "0" * 16
    (tmp_path / "x" / "base").mkdir(parents=True)
    (tmp_path / "x" / "base" / "bench.json").write_text(json.dumps(other))
    table, regressions = compare([runs[0], str(tmp_path / "x" / "base" / "bench.json")])
    heads = table.splitlines()[0].split(" | ")[-2:]
    assert heads[0] != heads[1] and regressions == 0 and "no row of the first report matches" in table


def test_interrupt_keeps_finished_rows(report):
    result, (_, md, _) = report
    assert result.interrupted
    assert [(r["backend"], r["steps"]) for r in result.rows] == [("eager", 2), ("onnxruntime", 2), ("diffusers", 2)]
    assert "interrupted" in md.read_text()


def test_a_worker_that_crashes_is_named_by_signal_and_frame(tmp_path):
    """A worker killed by a signal is reported by the signal's name and the innermost Python
    frame of the crash (as a worker's log has it); an exit with a code, by its last line that
    is not a progress bar. (Found on an H200: a compiled row said only "worker exited (code
    -11); Loading weights: 100%|...".)"""
    import os
    import subprocess
    import sys

    from fastsd.bench.runner import WORKER_ENV, exit_reason

    log = tmp_path / "worker.log"
    with open(log, "w") as f:
        code = "import ctypes\ndef load():\n    ctypes.string_at(0)\nload()\n"
        rc = subprocess.run([sys.executable, "-c", code], stderr=f, env=dict(os.environ, **WORKER_ENV)).returncode
    reason = exit_reason(rc, log.read_text())  # the innermost frame: ctypes' own, which load() called
    assert re.fullmatch(r"worker died of SIGSEGV in string_at \(.+ctypes.__init__\.py:\d+\)", reason), reason
    assert exit_reason(-9, "") == "worker died of SIGKILL"
    bars = "Loading weights: 100%|##| 36/36\nValueError: no such file\n\rLoading: 50%|#  | 1/2\n"
    assert exit_reason(1, bars) == "worker exited (code 1); ValueError: no such file"


def test_summarize_median_p10_p90():
    s = summarize([{"end_to_end": v} for v in (1.0, 2.0, 3.0, 4.0, 10.0)])
    assert s["end_to_end"] == {"median": 3.0, "p10": 1.0, "p90": 10.0, "n": 5}


def test_a_machine_that_is_not_quiet_gives_no_ratio():
    """Another process busy, hypervisor steal or a moving CPU clock during a row's runs: the
    row is noisy, says why, and gets no ratio; a quiet machine's row gets one."""
    from fastsd.bench import quiet

    stages = {s: {"median": 1.0, "p90": 1.01, "n": 3} for s in ("unet_per_step", "end_to_end")}
    calm = {"others_cpus": 0.02, "steal": 0.001, "mhz": [2400, 2450]}
    assert steadiness(stages, [0], calm) is None
    for load, why in (({"others_cpus": 1.3}, "other processes kept 1.30 CPUs busy during its runs"),
                      ({"steal": 0.12}, "the hypervisor took 12% of the CPU time (steal)"),
                      ({"mhz": [1500, 2450]}, "the CPU clock moved between 1500 and 2450 MHz")):
        assert steadiness(stages, [0], {**calm, **load}) == why
        rows = [dict(_row("eager", 1.0, 1.01), noisy=steadiness(stages, [0], {**calm, **load})),
                _row("diffusers", 2.0, 2.02)]
        add_ratios(rows)
        assert rows[0]["vs_diffusers"] == {"noisy": why}

    # measured: a busy loop in another process between two samples is another process's CPU
    pids = [os.getpid()]
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        time.sleep(0.3)  # it has started spinning
        before = quiet.sample(pids)
        time.sleep(0.8)
        after = quiet.sample(pids)
    finally:
        busy.wait()
    activity = quiet.Activity()
    activity.add(before, after)
    facts = activity.facts()
    assert facts["others_cpus"] > 0.5, facts  # about one CPU
    assert quiet.unquiet(facts).startswith("other processes kept")


@pytest.mark.slow
def test_cli_bench_and_errors(ckpts, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["bench", "--model", str(ckpts["eps"]), "--backends", "eager", "--steps", "2", "--warmup", "0",
            "--runs", "1", "--out", str(out)]
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    assert "| eager |" in capsys.readouterr().out
    assert main(["bench", "compare", str(out / "bench.json"), str(out / "bench.json")]) == 0
    assert "0 regression(s)" in capsys.readouterr().out
    for bad, msg in ((["bench"], "needs --model"), (["bench", "--model", "x", "--backends", "trt"], "unknown backend"),
                     (["bench", "--model", "x", "--sizes", "big"], "--sizes"),
                     (["bench", "--model", str(ckpts["eps"]), "--sizes", "32x7", "--out", str(tmp_path / "no")],
                      "--sizes: 32x7 is not a positive multiple of the VAE factor 2"),
                     (["bench", "--model", str(ckpts["eps"]), "--schedulers", "ddim,foo"],
                      "--schedulers: unknown scheduler 'foo'"),
                     (["bench", "compare", str(out / "bench.md"), str(out / "bench.json")], "cannot read"),
                     (["bench", "frobnicate"], "unknown bench action")):
        assert main(bad) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "no").exists()  # refused before any worker ran: no report


def test_sampler_benchmark_smoke(tmp_path):
    """benchmarks/samplers.py end to end on tiny models: the convergence table (a DDIM run
    against its own reference is exact), TAESD decode times, preview overhead."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_samplers", Path(__file__).resolve().parents[1] / "benchmarks" / "samplers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", "synthetic:tiny", "--taesd", "synthetic:taesd-tiny", "--samplers", "ddim,unipc",
                       "--steps", "2,6", "--reference-steps", "6", "--size", "16", "--decode-size", "32",
                       "--runs", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "samplers.json").read_text())
    table = result["convergence"]["mean_abs_diff"]
    assert table["ddim"]["6"] == 0.0 and table["ddim"]["2"] > 0 and table["unipc"]["6"] > 0
    assert result["taesd"]["full_vae_decoder_s"] > 0 and result["preview"]["preview_decodes_s"] > 0
    assert "| unipc |" in (tmp_path / "samplers.md").read_text()
    exact = result["exact_convergence"]["relative_error"]  # a sampler's error shrinks with steps
    assert exact["ddim"]["64"] < exact["ddim"]["4"] and exact["unipc"]["64"] < exact["unipc"]["4"]


def test_export_missing_builds_before_the_row_loads(ckpts, tmp_path, monkeypatch):
    """A row that must build its engines builds them before its pipeline loads (nothing of the
    checkpoint on the device during the build), and its memory counts from the load on."""
    import torch

    from fastsd.backends.registry import ENGINE_KINDS
    from fastsd.bench.machine import ProcessMemory
    from fastsd.bench.worker import FastSDWorker

    pytest.importorskip("onnxruntime")
    order = []
    kind = ENGINE_KINDS["onnxruntime"]
    build = kind.build
    monkeypatch.setitem(ENGINE_KINDS, "onnxruntime", type(kind)(**{
        **kind.__dict__, "build": lambda opts: order.append("build") or build(opts)}))
    cfg = quick(str(ckpts["eps"]), tmp_path)
    worker = FastSDWorker(cfg, "onnxruntime", torch.device("cpu"), torch.float32)
    assert order == ["build"] and worker.pipe is None and worker.export_s > 0 and not worker.skip
    _, held = ProcessMemory(torch.device("cpu")).measure(worker.load)
    assert held > 0 and set(worker.pipe.backend.backends.values()) == {"onnxruntime"}
    assert worker.extra()["export_seconds"] == worker.export_s  # the row reports the build it timed
    again = FastSDWorker(cfg, "onnxruntime", torch.device("cpu"), torch.float32)  # entries exist now: no build
    assert order == ["build"] and again.export_s is None
    skipped = FastSDWorker(quick(str(ckpts["eps"]), tmp_path / "other", export_missing=False), "onnxruntime",
                           torch.device("cpu"), torch.float32)
    assert "no engines for this checkpoint" in skipped.skip and order == ["build"]


def test_phases_are_exclusive_of_the_phases_inside_them():
    import time

    from fastsd import phases

    before = phases.seconds()
    with phases.phase("test outer"):
        time.sleep(0.05)
        with phases.phase("test inner"):
            time.sleep(0.1)
    got = {k: v - before.get(k, 0.0) for k, v in phases.seconds().items()}
    assert 0.04 <= got["test outer"] < 0.09 and got["test inner"] >= 0.1


def test_cold_start_is_broken_down_by_phase(ckpts, eps_onnx, report, tmp_path):
    """A new `fastsd generate` process on engines: its phases (as it records them) cover its
    wall time, engine loading among them, and the report prints them."""
    from fastsd.bench.runner import _cold_start

    pytest.importorskip("onnxruntime")
    copy_entries(eps_onnx, tmp_path / "engines", "onnxruntime-fp32")
    cold = _cold_start(quick(str(ckpts["eps"]), tmp_path), "onnxruntime")
    ph = cold["phases"]
    assert list(ph)[:1] == ["imports"] and {"checkpoint read", "engine-file check", "engine load",
                                            "first call", "other"} <= set(ph)
    assert all(v >= 0 for v in ph.values()) and ph["imports"] > 0
    assert ph["engine load"] + cold["overlapped"]["engines loaded ahead"] > 0  # in the main thread, or ahead
    assert abs(sum(ph.values()) - cold["seconds"]) < 0.1 + 0.02 * cold["seconds"]
    data = json.loads(report[1][0].read_text())
    row = next(r for r in data["rows"] if r["backend"] == "onnxruntime")
    assert 0 < cold["ready"] < cold["seconds"] - ph["first call"] + 0.1  # launch to the first call's start
    row.update(cold_start_seconds=cold["seconds"], cold_start_phases=ph,
               cold_start_overlapped={"engines loaded ahead": 1.5}, cold_start_ready=cold["ready"])
    line = next(x for x in markdown(data).splitlines() if "cold start (new process to first image)" in x)
    assert f"engine load {ph['engine load']:.1f} s" in line and line.index("imports") < line.rindex("first call")
    assert f"ready for the first call after {cold['ready']:.1f} s" in line
    assert line.endswith("(engines loaded ahead 1.5 s, overlapped)")



def test_int8_rows_run_only_on_kinds_that_quantize(ckpts, tmp_path):
    """--dtype int8: eager, diffusers and kinds without int8 entries say why they do not run;
    openvino looks for its int8 entries (none in this store) and the engines' precision is int8."""
    import torch

    from fastsd.bench.worker import DiffusersWorker, FastSDWorker

    cfg, cpu = quick(str(ckpts["eps"]), tmp_path, dtype="int8", export_missing=False), torch.device("cpu")
    for backend in ("eager", "onnxruntime"):
        worker = FastSDWorker(cfg, backend, cpu, torch.bfloat16)
        assert worker.skip == f"{backend}: runs no int8 (engines that do: --backends openvino); skipped"
    baseline = DiffusersWorker(cfg, cpu, torch.bfloat16)
    assert baseline.skip == "diffusers: has no int8 (run it with --dtype bf16); skipped"
    ov = FastSDWorker(cfg, "openvino", cpu, torch.bfloat16)
    assert "no engines for this checkpoint (run fastsd build --backend openvino" in ov.skip and ov.precision == "int8"
