"""The benchmark harness: every runtime gets a row, the numbers are sane, the reports are written."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx_edge.bench import (
    BENCH_JSON,
    BENCH_MD,
    BENCH_PNG,
    bench_run,
    compare_runs,
    format_table,
    latency_stats,
    measure_ceiling,
    pareto_front,
    time_calls,
)
from featx_edge.bench.report import TABLE_HEADER
from featx_edge.errors import ConfigError, RunDirError

FORMATS = ("tflite-float32", "tflite-int8", "onnx-float32")
TINY = {"threads": (1,), "batches": (1, 2), "repeats": 3, "warmup": 1, "min_seconds": 0.0, "max_seconds": 1.0,
        "ceiling_seconds": 0.05}


@pytest.fixture(scope="module")
def benched(trained_run, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the trained run, benchmarked once with tiny repeat counts."""
    run = tmp_path_factory.mktemp("bench") / "digits"
    shutil.copytree(trained_run, run)
    report = bench_run(run, formats=FORMATS, include_tf=True, **TINY)
    return run, report


def _rows(report: dict, **match) -> list[dict]:
    return [r for r in report["rows"] if all(r.get(k) == v for k, v in match.items())]


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_every_available_runtime_has_rows(benched):
    _, report = benched
    for fmt in ("tflite-float32", "tflite-int8"):
        for runtime in ("litert-xnnpack", "litert-builtin"):
            rows = _rows(report, format=fmt, runtime=runtime, status="ok")
            assert sorted(r["batch"] for r in rows) == [1, 2], (fmt, runtime)
    assert sorted(r["batch"] for r in _rows(report, format="onnx-float32", runtime="onnxruntime-cpu",
                                            status="ok")) == [1, 2]
    tf_rows = _rows(report, runtime="tensorflow")
    assert tf_rows and all(r["status"] == "ok" for r in tf_rows), tf_rows
    # .onnx on LiteRT and .tflite on onnxruntime are not combinations at all
    assert not _rows(report, format="onnx-float32", engine="litert")
    assert not _rows(report, format="tflite-int8", engine="onnxruntime")


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_measured_rows_are_sane(benched):
    _, report = benched
    measured = _rows(report, status="ok")
    assert measured
    for r in measured:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"], r
        assert r["throughput_ips"] > 0 and r["peak_rss_mb"] > 0 and r["cold_start_ms"] > 0
        assert r["iterations"] >= 1 and r["iqr_ms"] >= 0 and r["stdev_ms"] >= 0
        assert r["threads"] == 1 and r["batch_mode"] == "dynamic" and r["model_bytes"] > 0
        assert r["gmacs"] > 0 and r["ceiling_gmacs"] > 0
        assert r["accuracy"] is None or 0 <= r["accuracy"] <= 1
        assert 0 <= r["bench_accuracy"] <= 1
    float_rows = _rows(report, format="tflite-float32", status="ok") + _rows(report, format="onnx-float32",
                                                                              status="ok")
    reference = _rows(report, runtime="tensorflow", status="ok")[0]["bench_accuracy"]
    assert all(abs(r["bench_accuracy"] - reference) < 0.02 for r in float_rows)
    assert report["macs"]["macs_per_image"] > 1e6 and report["macs"]["source"] == "onnx-float32"
    assert report["ceiling"]["by_threads"]["1"]["gmacs"] > 0
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"] and machine["versions"]["numpy"]
    assert report["inputs"]["source"] == "test split"


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_gpu_providers_are_reported_not_dropped(benched):
    import onnxruntime as ort

    _, report = benched
    available = ort.get_available_providers()
    for runtime, provider in (("onnxruntime-cuda", "CUDAExecutionProvider"),
                              ("onnxruntime-tensorrt", "TensorrtExecutionProvider")):
        rows = _rows(report, format="onnx-float32", runtime=runtime)
        assert rows, runtime
        if provider in available:  # a GPU machine: measured, or an error with its reason
            assert all(r["status"] == "ok" or r["reason"] for r in rows)
        else:
            assert len(rows) == 1 and rows[0]["status"] == "unavailable"
            assert provider in rows[0]["reason"] and "onnxruntime-gpu" in rows[0]["reason"]
            assert "onnxruntime reports providers" in rows[0]["reason"]
            assert not report["runtimes"][runtime]["available"]


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_reports_are_written_and_readable(benched):
    run, report = benched
    on_disk = json.loads((run / BENCH_JSON).read_text(encoding="utf-8"))
    assert on_disk["rows"] == json.loads(json.dumps(report["rows"]))
    md = (run / BENCH_MD).read_text(encoding="utf-8")
    assert TABLE_HEADER in md and "litert-xnnpack" in md and "onnxruntime-cuda" in md
    assert md.startswith(format_table(report))
    measured = [r for r in report["rows"] if r["status"] == "ok"]
    assert {r["verify"] for r in measured} <= {"pass", "reference"} and "| pass |" in md  # the main run passed
    assert report["recommendation"]["batch1"]["format"] in report["recommendation"]["among"]
    with Image.open(run / BENCH_PNG) as png:
        png.load()
        assert png.format == "PNG" and png.size[0] > 200
    assert not list(run.glob(".tmp-*"))


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_compare_runs_names_both(benched, tmp_path):
    run, _ = benched
    a, b = tmp_path / "mobilenet-a", tmp_path / "mobilenet-b"
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    table = compare_runs(a, b)
    assert "mobilenet-a" in table and "mobilenet-b" in table
    assert "| A p50 ms | B p50 ms | B/A |" in table
    assert "| tflite-int8 | litert-xnnpack | 1 | 1 |" in table
    assert "1.00" in table  # a copy against itself: ratio 1
    with pytest.raises(RunDirError, match="bench_run"):
        compare_runs(a, tmp_path)


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_compare_from_the_cli(benched, tmp_path, capsys):
    from featx_edge.cli import main

    run, _ = benched
    assert main(["bench", "--compare", str(run), str(run)]) == 0
    assert "| A p50 ms | B p50 ms | B/A |" in capsys.readouterr().out
    assert main(["bench", "--compare", str(run)]) == 2
    assert "exactly two runs" in capsys.readouterr().err


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_bad_requests_say_what_to_do(benched, tmp_path):
    run, _ = benched
    with pytest.raises(RunDirError, match="featx-edge export"):
        bench_run(run, formats=("tflite-int4",), **TINY)  # a format nobody exports
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "export" / "model.tflite-int8.tflite").write_bytes(b"TFL3 truncated")
    with pytest.raises(RunDirError, match="does not match"):
        bench_run(broken, formats=("tflite-int8",), **TINY)
    with pytest.raises(ConfigError, match="positive integers"):
        bench_run(run, formats=("tflite-int8",), **{**TINY, "threads": (0,)})
    with pytest.raises(RunDirError, match="not a featx-edge run"):
        bench_run(tmp_path / "nothing", **TINY)


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_missing_data_falls_back_to_random_pixels(benched, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="featx_edge")
    run, _ = benched
    copy = tmp_path / "nodata"
    shutil.copytree(run, copy)
    (copy / "verify.json").unlink(missing_ok=True)
    splits = json.loads((copy / "splits.json").read_text())
    splits["data_root"] = str(tmp_path / "gone")
    (copy / "splits.json").write_text(json.dumps(splits))
    report = bench_run(copy, formats=("tflite-int8",), include_tf=False,
                       **{**TINY, "batches": (1,)})
    assert report["inputs"]["source"] == "random" and any("random" in n for n in report["notes"])
    ok = _rows(report, status="ok")
    assert ok and all(r["bench_accuracy"] is None and r["accuracy"] is None for r in ok)
    tf = _rows(report, runtime="tensorflow")
    assert len(tf) == 1 and tf[0]["status"] == "skipped" and "include_tf" in tf[0]["reason"]
    assert (copy / BENCH_PNG).is_file()
    assert TABLE_HEADER in caplog.text  # progress and the table go to the featx_edge logger


# ---- pure helpers, on hand-made numbers --------------------------------------------------------

def test_latency_stats_percentiles():
    stats = latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["iqr_ms"] == pytest.approx(75.25 - 25.75)
    assert stats["min_ms"] == pytest.approx(1) and stats["max_ms"] == pytest.approx(100)
    assert stats["iterations"] == 100
    one = latency_stats([0.002])
    assert one["p50_ms"] == one["p99_ms"] == pytest.approx(2.0) and one["stdev_ms"] == 0.0
    skewed = latency_stats([0.001] * 9 + [0.1])
    assert skewed["p50_ms"] == pytest.approx(1.0) and skewed["p99_ms"] > skewed["p90_ms"] >= skewed["p50_ms"]
    with pytest.raises(ConfigError):
        latency_stats([])


def test_pareto_front():
    points = [(10.0, 0.90), (5.0, 0.80), (20.0, 0.95), (12.0, 0.85), (5.0, 0.70), (30.0, 0.95)]
    assert pareto_front(points) == [1, 0, 2]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # identical points do not dominate
    assert pareto_front([(3.0, 0.9)]) == [0]
    assert pareto_front([]) == []


def test_package_import_is_light_and_the_worker_runs_as_a_module():
    code = ("import sys, featx_edge.bench; "
            "print(sorted(m for m in sys.modules if m.startswith('featx_edge.')), 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['featx_edge.bench']", "False"]  # the names load their module on first use
    ceiling = measure_ceiling([1], size=32, min_seconds=0.0)  # `python -m featx_edge.bench.worker --ceiling`
    assert ceiling["1"]["status"] == "ok" and ceiling["1"]["gmacs"] > 0


def test_time_calls_stops_on_count_and_time():
    calls = []
    samples, _ = time_calls(calls.append, [np.zeros(1)], warmup=2, repeats=7, min_seconds=0.0, max_seconds=5.0)
    assert len(samples) == 7 and len(calls) == 9
    samples, elapsed = time_calls(lambda x: None, [np.zeros(1)], warmup=0, repeats=1, min_seconds=0.05,
                                  max_seconds=5.0)
    assert elapsed >= 0.05 and len(samples) > 1


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_rows_record_the_artifact_and_stale_verify_entries_are_not_reused(benched, tmp_path):
    from featx_edge.bench.plan import accuracy_lookup
    from featx_edge.rundir.manifest import read_manifest

    run, report = benched
    manifest = read_manifest(run)
    for row in _rows(report, status="ok"):
        if row["format"] in manifest["artifacts"]:
            assert row["sha256"] == manifest["artifacts"][row["format"]]["sha256"]
    per_format, _, _, note = accuracy_lookup(run, manifest)
    assert per_format["tflite-int8"] is not None and note is None
    # The int8 model is re-exported (another checksum) after verify ran: its verify entry is stale.
    changed = dict(manifest, artifacts=dict(manifest["artifacts"],
                                            **{"tflite-int8": dict(manifest["artifacts"]["tflite-int8"],
                                                                   sha256="0" * 64)}))
    per_format, _, _, note = accuracy_lookup(run, changed)
    assert "tflite-int8" not in per_format and "stale for tflite-int8" in note
    assert per_format["tflite-float32"] is not None


def _plot_report(verify_of: dict[str, str]) -> dict:
    rows = []
    for fmt, runtime, ms, acc in (("tflite-float32", "litert-xnnpack", 4.0, 0.94), ("tflite-int8", "litert-xnnpack",
                                  2.0, 0.937), ("onnx-int8", "onnxruntime-cpu", 1.5, 0.95)):
        for threads in (1, 2):
            rows.append({"format": fmt, "runtime": runtime, "threads": threads, "batch": 1, "status": "ok",
                         "p50_ms": ms / threads, "accuracy": acc, "model_bytes": 1000, "verify": verify_of[fmt]})
    return {"name": "demo", "accuracy": {"images": 269}, "rows": rows}


def test_plot_panels_intervals_and_front_only_among_passed(tmp_path):
    from featx_edge.bench.plot import MIN_ACCURACY_SPAN, accuracy_limits, pareto_points, plot_points, write_plot

    report = _plot_report({"tflite-float32": "pass", "tflite-int8": "pass", "onnx-int8": "FAIL"})
    one, two = plot_points(report, threads=1), plot_points(report, threads=2)
    assert {p["threads"] for p in one} == {1} and {p["threads"] for p in two} == {2}
    # a failed export is plotted but is never on the front, though it is the fastest and most accurate
    assert [p["format"] for p in pareto_points(one)] == ["tflite-int8", "tflite-float32"]
    # each accuracy carries its 95% interval over the 269 test images, and the axis is at least 10 points wide
    p = next(p for p in one if p["format"] == "tflite-int8")
    assert p["accuracy_low"] < 0.937 < p["accuracy_high"] and p["accuracy_high"] - p["accuracy_low"] > 0.04
    low, high = accuracy_limits(one)
    assert high - low >= MIN_ACCURACY_SPAN and low <= min(q["accuracy_low"] for q in one)
    out = write_plot(report, tmp_path / "bench.png")
    from PIL import Image

    with Image.open(out) as image:
        assert image.width > 1.5 * image.height  # two panels side by side


def test_not_measured_and_slow_flags_are_grouped():
    from featx_edge.bench.recommend import format_recommendation

    rows = [{"format": f, "runtime": "onnxruntime-cuda", "status": "unavailable", "reason": "no CUDA",
             "threads": None, "batch": None} for f in ("onnx-float32", "onnx-int8")]
    text = format_table({"name": "x", "rows": rows})
    assert text.count("no CUDA") == 1 and "onnx-float32, onnx-int8 on onnxruntime-cuda" in text
    flags = [{"format": "tflite-dynamic", "runtime": "litert-xnnpack", "threads": t, "batch": 1, "p50_ms": 9.0,
              "float32_p50_ms": 4.0, "float32": "tflite-float32", "likely_cause": "run-time conversion"}
             for t in (1, 2)]
    lines = format_recommendation({"host_target": "x86-64", "flags": flags})
    assert sum("run-time conversion" in line for line in lines) == 1
    assert "threads 1, batch 1: 9.00 ms against 4.00 ms; threads 2" in "\n".join(lines)


def test_a_random_weights_run_is_marked_in_the_bench_table():
    assert "not meaningful" not in format_table({"name": "x", "rows": [], "backbone": {"weights": "imagenet"}})
    assert "accuracy not meaningful" in format_table({"name": "x", "rows": [], "backbone": {"weights": "none"}})
