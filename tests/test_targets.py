"""int8 targets (which ONNX int8 recipe for which CPU) and bench's recommendation of what to ship."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featx_edge.bench.recommend import recommend
from featx_edge.errors import ConfigError
from featx_edge.formats.targets import TARGETS, detect_host, resolve_target

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


@pytest.mark.parametrize("machine, cpuinfo, expected", [
    ("x86_64", ZEN4, "x86-64-vnni"), ("x86_64", ZEN3, "x86-64"), ("AMD64", "flags : avx_vnni", "x86-64-vnni"),
    ("aarch64", "", "arm64"), ("arm64", "", "arm64"), ("riscv64", "", "portable"),
])
def test_host_detection(machine, cpuinfo, expected):
    assert detect_host(machine=machine, cpuinfo=cpuinfo) == expected


def test_recipes_follow_onnxruntime_guidance():
    assert (TARGETS["x86-64"].activations, TARGETS["x86-64"].reduce_range) == ("uint8", True)
    assert (TARGETS["x86-64-vnni"].activations, TARGETS["x86-64-vnni"].reduce_range) == ("uint8", False)
    assert (TARGETS["arm64"].activations, TARGETS["portable"].activations) == ("int8", "int8")
    assert resolve_target("auto") == TARGETS[detect_host()]
    with pytest.raises(ConfigError, match="`--target` must be one of auto, portable"):
        resolve_target("x86")


def test_the_default_target_is_portable_and_checked():
    from featx_edge.config import ExportConfig

    assert ExportConfig().target == "portable"
    with pytest.raises(ConfigError, match="`target` must be one of"):
        ExportConfig(target="sparc")


@pytest.mark.parametrize("target, zero_point_type", [("x86-64-vnni", np.uint8), ("arm64", np.int8)])
def test_onnx_int8_uses_the_targets_activation_type(tmp_path, target, zero_point_type):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from featx_edge.export.onnx_int8 import quantize
    from featx_edge.runtime import load

    source = Path(__file__).parent / "data" / "runtime" / "model.onnx-float32.onnx"
    recipe = resolve_target(target)
    calibration = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    meta = dict(load(source).metadata, format="onnx-int8", quantization={"target": target})
    quantize(source, tmp_path / "int8.onnx", calibration=calibration, method="minmax", metadata=meta,
             activations=recipe.activations, reduce_range=recipe.reduce_range)
    model = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    activation_zero_points = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
                              if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert activation_zero_points and all(z.dtype == zero_point_type for z in activation_zero_points)
    assert load(tmp_path / "int8.onnx").metadata["quantization"]["target"] == target


def _row(fmt, runtime, p50, *, batch=1, threads=1, size=1e6):
    return {"format": fmt, "runtime": runtime, "threads": threads, "batch": batch, "status": "ok", "p50_ms": p50,
            "throughput_ips": batch * 1000 / p50, "model_bytes": size}


def test_the_recommendation_ships_the_fastest_verified_export_and_flags_slow_int8():
    rows = [_row("tflite-float32", "litert-xnnpack", 1.0, size=13e6), _row("tflite-int8", "litert-xnnpack", 0.5),
            _row("onnx-float32", "onnxruntime-cpu", 1.5), _row("onnx-int8", "onnxruntime-cpu", 2.0),
            _row("tflite-int8", "litert-xnnpack", 3.0, batch=8), _row("tflite-float32", "litert-xnnpack", 4.0, batch=8),
            {"format": "onnx-int8", "runtime": "onnxruntime-cuda", "status": "unavailable"}]
    verified = {"tflite-float32": {"accuracy_change_points": 0.0}, "tflite-int8": {"accuracy_change_points": -0.37},
                "onnx-float32": {"accuracy_change_points": 0.0}}  # onnx-int8 failed verify
    rec = recommend(rows, verified=verified, quantization={"onnx-int8": {"activations": "int8"}},
                    host="x86-64-vnni")
    assert (rec["batch1"]["format"], rec["batch1"]["runtime"]) == ("tflite-int8", "litert-xnnpack")
    assert "2.0x faster than the fastest float32 (tflite-float32" in rec["batch1"]["reason"]
    assert "-0.37 points" in rec["batch1"]["reason"] and "1.00 MB" in rec["batch1"]["reason"]
    assert (rec["throughput"]["format"], rec["throughput"]["batch"]) == ("tflite-int8", 8)
    assert "onnx-int8" not in rec["among"]
    (flag,) = rec["flags"]
    assert flag["format"] == "onnx-int8" and "--target x86-64-vnni" in flag["likely_cause"]


def test_no_recommendation_without_a_passing_verify():
    rec = recommend([_row("tflite-int8", "litert-xnnpack", 0.5)], verified={}, quantization={}, host="arm64")
    assert "batch1" not in rec and "featx-edge verify" in rec["note"]


def test_a_row_above_its_ceiling_is_not_reported_as_a_share():
    from featx_edge.bench.report import result_row

    spec = {"format": "tflite-int8", "runtime": "litert-xnnpack", "engine": "litert", "provider": None, "threads": 1,
            "batch": 1, "model_bytes": 1000}
    result = {"status": "ok", "p50_ms": 1.0, "peak_rss_mb": 60.0, "baseline_rss_mb": 50.0, "dynamic_batch": True}
    row = result_row(spec, result, macs={"macs_per_image": 50e6}, ceiling={"1": {"gmacs": 10.0}}, per_format_acc={},
                     reference_acc=None, reference_source=None)
    assert row["ceiling_fraction"] is None and row["ceiling_fraction_measured"] == pytest.approx(5.0)
    assert any("unreliable" in note for note in row["notes"])


def test_the_ceiling_is_re_measured_between_rows(monkeypatch):
    from featx_edge.bench import harness

    calls = []

    def fake(threads, *, min_seconds):
        calls.append(threads[0])
        return {str(threads[0]): {"status": "ok", "gmacs": 10.0 * len(calls)}}

    monkeypatch.setattr(harness, "measure_ceiling", fake)
    ceilings = harness._Ceilings([1, 2], min_seconds=0.1)
    seen = [ceilings.near(1)["1"]["gmacs"] for _ in range(2 * harness.CEILING_EVERY + 1)]
    assert seen == [10.0] * harness.CEILING_EVERY + [20.0] * harness.CEILING_EVERY + [30.0]
    assert ceilings.near(2)["2"]["gmacs"] == 40.0
    summary = ceilings.summary()
    assert summary["1"]["gmacs"] == 20.0 and summary["1"]["measurements"] == 3 and summary["2"]["max_gmacs"] == 40.0


def test_verify_status_counts_only_entries_for_the_current_files(tmp_path):
    import json

    from featx_edge.bench.recommend import current_verify_entries, passed_entries, verify_status

    artifacts = {"tflite-int8": {"sha256": "a" * 64}, "onnx-int8": {"sha256": "b" * 64},
                 "tflite-float32": {"sha256": "c" * 64}}
    (tmp_path / "verify.json").write_text(json.dumps({"formats": {
        "tflite-int8": {"sha256": "a" * 64, "passed": True, "accuracy_change_points": -0.4},
        "onnx-int8": {"sha256": "b" * 64, "passed": False},
        "tflite-float32": {"sha256": "0" * 64, "passed": True}}}))  # stale: another file was verified
    entries = current_verify_entries(tmp_path, {"artifacts": artifacts})  # the manifest's artifacts
    assert verify_status(entries) == {"tflite-int8": "pass", "onnx-int8": "FAIL"}
    assert list(passed_entries(entries)) == ["tflite-int8"]
    assert current_verify_entries(tmp_path / "missing", {"artifacts": artifacts}) == {}
