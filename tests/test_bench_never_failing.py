"""`featx-edge bench` never recommends a file that failed verify under a gated kernel set (issue 21).

The case of issue 21 item 5: the fast x86 ONNX recipe (U8S8, `--target x86-64-vnni`) is the
fastest export measured, and it failed verify. Fast: a hand-made run of the tiny runtime test
models (tests/data/runtime) plus an onnx-int8 quantized from them with that recipe; the row
timings are faked (each worker's result), everything else is bench's own path, through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_manifest

from featx_edge.bench import harness
from featx_edge.cli import main
from featx_edge.files.atomic import sha256_file
from featx_edge.formats.targets import detect_host, resolve_target
from featx_edge.rundir.names import BENCH_JSON, BENCH_MD
from featx_edge.verify.record import write_record

DATA = Path(__file__).parent / "data" / "runtime"
LABELS = ("red", "green", "blue")
FILES = {"tflite-float32": "model.tflite-float32.tflite", "tflite-int8": "model.tflite-int8.tflite",
         "onnx-float32": "model.onnx-float32.onnx"}
P50_MS = {"onnx-int8": 0.2, "tflite-int8": 0.5, "tflite-float32": 1.0, "onnx-float32": 1.5}  # onnx-int8 fastest


def _onnx_int8(source: Path, out: Path) -> None:
    """The model quantized as `export --target x86-64-vnni` does (U8S8, full 8-bit weights)."""
    import numpy as np

    from featx_edge.export.onnx_int8 import quantize
    from featx_edge.runtime import load

    recipe = resolve_target("x86-64-vnni")
    calibration = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    meta = dict(load(source).metadata, format="onnx-int8",
                quantization={"target": recipe.name, "activations": recipe.activations,
                              "reduce_range": recipe.reduce_range})
    quantize(source, out, calibration=calibration, method="minmax", metadata=meta,
             activations=recipe.activations, reduce_range=recipe.reduce_range)


def _entry(sha256: str, kernels: dict[str, bool]) -> dict:
    """A verify.json entry as verify writes it: a verdict per kernel set, all of them gated."""
    failures = [f"top-1 agreement 0.9665 < 0.97 [{k} kernels]" for k, ok in kernels.items() if not ok]
    return {"sha256": sha256, "passed": not failures, "failures": failures, "accuracy": 1.0,
            "accuracy_change_points": 0.0 if not failures else -1.12, "verified_on": detect_host(),
            "kernel_sets_gated": list(kernels),
            "kernels": {k: {"passed": ok, "failures": [] if ok else ["top-1 agreement 0.9665 < 0.97"],
                            "gated": True} for k, ok in kernels.items()}}


def _run(tmp_path: Path, verdicts: dict[str, dict[str, bool]]) -> Path:
    """A run of the tiny models whose verify.json holds ``verdicts`` (format -> kernel set -> passed)."""
    run, data = tmp_path / "run", tmp_path / "data"
    (run / "export").mkdir(parents=True)
    test = []
    for label in LABELS:  # the runtime test images, one class folder each
        (data / label).mkdir(parents=True)
        for i in range(2):
            shutil.copy(DATA / "images" / f"{label}_{i}.png", data / label / f"{i}.png")
            test.append(f"{label}/{i}.png")
    for fmt, name in FILES.items():
        shutil.copy(DATA / name, run / "export" / name)
    _onnx_int8(DATA / FILES["onnx-float32"], run / "export" / "model.onnx-int8.onnx")
    paths = {**FILES, "onnx-int8": "model.onnx-int8.onnx"}
    artifacts = {fmt: {"path": f"export/{name}", "sha256": sha256_file(run / "export" / name),
                       "bytes": (run / "export" / name).stat().st_size} for fmt, name in paths.items()}
    (run / "splits.json").write_text(json.dumps({"data_root": str(data), "classes": list(LABELS), "seed": 0,
                                                 "train": [], "val": [], "test": test}))
    (run / "manifest.json").write_text(json.dumps(make_manifest(
        labels=LABELS, size=32, artifacts=artifacts, data={"root": str(data), "splits": "splits.json",
                                                           "counts": {"test": len(test)}})))
    write_record(run, {"images": len(test), "passed": all(all(v.values()) for v in verdicts.values()),
                       "reference_sha256": "0" * 64, "reference_accuracy": 1.0,
                       "formats": {fmt: _entry(artifacts[fmt]["sha256"], kernels)
                                   for fmt, kernels in verdicts.items()}})
    return run


@pytest.fixture
def fake_timings(monkeypatch):
    """Each row's worker result made up (onnx-int8 the fastest), the matmul ceiling too: no subprocesses."""
    def row(spec, sweep, *, pool_path, eval_path):
        ms = P50_MS[spec["format"]]
        return {"status": "ok", "p50_ms": ms, "p90_ms": ms, "p99_ms": ms, "mean_ms": ms, "stdev_ms": 0.0,
                "iqr_ms": 0.0, "min_ms": ms, "max_ms": ms, "iterations": 3, "timed_seconds": 0.01,
                "cold_start_ms": 1.0, "peak_rss_mb": 60.0, "baseline_rss_mb": 50.0, "dynamic_batch": True}

    monkeypatch.setattr(harness, "_time_row", row)
    monkeypatch.setattr(harness, "measure_ceiling",
                        lambda threads, *, min_seconds: {str(threads[0]): {"status": "ok", "gmacs": 10.0}})


def _bench(run: Path) -> dict:
    assert main(["bench", str(run), "--threads", "1", "--batches", "1", "--min-seconds", "0",
                 "--no-tensorflow", "--quiet"]) == 0
    return json.loads((run / BENCH_JSON).read_text(encoding="utf-8"))


def _shipped(report: dict) -> set[str]:
    rec = report["recommendation"]
    return {rec[key]["format"] for key in ("batch1", "throughput") if key in rec} | set(rec["among"])


def test_the_fastest_onnx_int8_that_failed_verify_is_never_recommended(tmp_path, fake_timings):
    passing = {"xnnpack": True, "reference": True}
    run = _run(tmp_path, {"onnx-int8": {"default": False}, "tflite-int8": passing,
                          "tflite-float32": passing, "onnx-float32": {"default": True}})
    report = _bench(run)
    assert {r["verify"] for r in report["rows"] if r["format"] == "onnx-int8" and r["status"] == "ok"} == {"FAIL"}
    assert "onnx-int8" not in _shipped(report)
    assert report["recommendation"]["batch1"]["format"] == "tflite-int8"  # the fastest that passed
    md = (run / BENCH_MD).read_text(encoding="utf-8")
    assert "**lowest latency, batch 1**: tflite-int8" in md


@pytest.mark.parametrize("failed_on", ["xnnpack", "reference"])
def test_an_int8_file_that_failed_on_one_gated_kernel_set_is_not_recommended_on_any(tmp_path, fake_timings,
                                                                                    failed_on):
    """Failing under the reference kernels (what a microcontroller computes) keeps the file off
    the list even where bench timed it under XNNPACK, and the other way round."""
    int8 = {"xnnpack": failed_on != "xnnpack", "reference": failed_on != "reference"}
    run = _run(tmp_path, {"onnx-int8": {"default": False}, "tflite-int8": int8,
                          "tflite-float32": {"xnnpack": True, "reference": True}, "onnx-float32": {"default": True}})
    report = _bench(run)
    assert _shipped(report) == {"tflite-float32", "onnx-float32"}
    assert report["recommendation"]["batch1"]["format"] == "tflite-float32"
