"""`fastsd bench` smoke run on the tiny checkpoint, reports, compare, Ctrl-C."""

from __future__ import annotations

import copy
import json

import pytest

from fastsd.bench import compare, default_config, run_bench, write_reports
from fastsd.bench.runner import SCHEMA, summarize
from fastsd.cli import main

pytest.importorskip("matplotlib")


def quick(model, tmp_path, **kw):
    import torch

    base = dict(backends=("eager", "onnxruntime", "diffusers"), steps=(2,), warmup=0, runs=2,
                engine_dir=str(tmp_path / "engines"), export_missing=True)
    base.update(kw)
    return default_config(model, torch.device("cpu"), **base)


@pytest.fixture(scope="module")
def report(ckpts, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    tmp = tmp_path_factory.mktemp("bench")
    result = run_bench(quick(str(ckpts["eps"]), tmp), progress=lambda line: None)
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
    ort = result.rows[1]
    assert set(ort["ran"].values()) == {"onnxruntime"} and ort["export_seconds"] > 0
    assert ort["vs_diffusers"]["end_to_end"] > 0 and "vs_diffusers" not in result.rows[2]


def test_reports_written(report):
    result, (js, md, png) = report
    data = json.loads(js.read_text())
    assert data["schema"] == SCHEMA and data["machine"]["torch"] and data["machine"]["cpu_count"] >= 1
    assert data["machine"]["fastsd"] and "git_commit" in data["machine"]
    text = md.read_text()
    assert "| onnxruntime | 32x32 | 1 | 2 | ddim |" in text and "baseline" in text and "export" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_flags_regressions(report, tmp_path):
    _, (js, _, _) = report
    slow = json.loads(js.read_text())
    faster = copy.deepcopy(slow)
    for row in slow["rows"]:
        e2e = row["stages"]["end_to_end"]
        e2e["median"], e2e["p90"] = e2e["median"] * 3, e2e["median"] * 3.01
    for row in faster["rows"]:
        row["stages"]["end_to_end"]["median"] *= 0.99
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "bench.json").write_text(json.dumps(slow))
    (tmp_path / "b" / "bench.json").write_text(json.dumps(faster))
    table, regressions = compare([str(js), str(tmp_path / "a" / "bench.json"), str(tmp_path / "b" / "bench.json")])
    assert regressions == 3  # every row of the 3x slower run, none of the 1% faster one
    assert table.count("REGRESSION") == 3


def test_interrupt_keeps_finished_rows(ckpts, tmp_path):
    def progress(line):
        if line.startswith("[2/2]"):  # Ctrl-C during the second configuration
            raise KeyboardInterrupt

    result = run_bench(quick(str(ckpts["eps"]), tmp_path, backends=("eager", "diffusers"), steps=(1, 2)),
                       progress=progress)
    assert result.interrupted
    assert [(r["backend"], r["steps"]) for r in result.rows] == [("eager", 1), ("diffusers", 1)]
    paths = write_reports(result, tmp_path / "out")
    assert "interrupted" in paths[1].read_text()


def test_summarize_median_p90():
    s = summarize([{"end_to_end": v} for v in (1.0, 2.0, 3.0, 4.0, 10.0)])
    assert s["end_to_end"] == {"median": 3.0, "p90": 10.0, "n": 5}


def test_cli_bench_and_errors(ckpts, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["bench", "--model", str(ckpts["eps"]), "--backends", "eager,diffusers", "--steps", "2", "--warmup", "0",
            "--runs", "1", "--out", str(out)]
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    assert "| eager |" in capsys.readouterr().out
    assert main(["bench", "compare", str(out / "bench.json"), str(out / "bench.json")]) == 0
    assert "0 regression(s)" in capsys.readouterr().out
    for bad, msg in ((["bench"], "needs --model"), (["bench", "--model", "x", "--backends", "trt"], "unknown backend"),
                     (["bench", "--model", "x", "--sizes", "big"], "--sizes"),
                     (["bench", "compare", str(out / "bench.md"), str(out / "bench.json")], "cannot read"),
                     (["bench", "frobnicate"], "unknown bench action")):
        assert main(bad) == 2
        assert msg in capsys.readouterr().err
