"""The tie-aware gate and the kernel sets verify runs (issue 21)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featx_edge.fidelity.gate import check, compare
from featx_edge.formats.registry import get_format, parse_kernel_sets, thresholds_for, tie_margin


def _probs(rows):
    return np.asarray(rows, dtype=np.float32)


def test_a_float32_export_within_tolerance_passes_on_an_exact_tie():
    """Two classes at 0.5 in the reference: a float32 export 5e-6 away may pick either."""
    reference = _probs([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    export = _probs([[0.499995, 0.500005], [0.9, 0.1], [0.2, 0.8]])
    labels = np.array([0, 0, 1])
    limits = thresholds_for("tflite-float32")
    metrics = compare(export, reference, labels, tie_margin=tie_margin("tflite-float32", limits))
    assert metrics["top1_agreement"] == pytest.approx(2 / 3)  # the plain figure still counts it
    assert metrics["near_ties"] == 1 and metrics["near_tie_images"] == [
        {"image": 0, "reference_class": 0, "export_class": 1, "reference_margin": 0.0}]
    assert metrics["judged_top1_agreement"] == 1.0 and metrics["judged_accuracy_change_points"] == 0.0
    assert check(metrics, limits) == []


def test_a_change_beyond_the_noise_is_a_disagreement():
    """The same flip with a reference margin far above 2 x max_abs_diff fails, and says so."""
    reference = _probs([[0.6, 0.4], [0.9, 0.1]])
    export = _probs([[0.4, 0.6], [0.9, 0.1]])
    limits = thresholds_for("tflite-float32")
    metrics = compare(export, reference, np.array([0, 0]), tie_margin=tie_margin("tflite-float32", limits))
    assert metrics["near_ties"] == 0 and metrics["judged_top1_agreement"] == 0.5
    failures = check(metrics, limits)
    assert any(f.startswith("top-1 agreement 0.5000 < 1.0") for f in failures), failures
    assert any("accuracy drop 50.00" in f for f in failures), failures


def test_tie_margins_follow_the_format_noise():
    # float formats: twice the tolerance (one probability up, the other down), overrides included
    assert tie_margin("tflite-float32", thresholds_for("tflite-float32")) == pytest.approx(2e-4)
    looser = thresholds_for("onnx-float32", {"onnx-float32": {"max_abs_diff": 1e-3}})
    assert tie_margin("onnx-float32", looser) == pytest.approx(2e-3)
    # quantized formats without that tolerance: one step of a uint8 probability
    for fmt in ("tflite-int8", "onnx-int8", "tflite-dynamic"):
        assert tie_margin(fmt, thresholds_for(fmt)) == pytest.approx(1 / 256)


def test_an_int8_flip_just_above_one_output_step_counts():
    reference = _probs([[0.51, 0.49]] * 10)
    export = _probs([[0.49, 0.51]] + [[0.51, 0.49]] * 9)
    limits = thresholds_for("tflite-int8")
    metrics = compare(export, reference, np.zeros(10, int), tie_margin=tie_margin("tflite-int8", limits))
    assert metrics["near_ties"] == 0 and metrics["judged_top1_agreement"] == pytest.approx(0.9)
    assert check(metrics, limits)  # 0.9 < 0.97


def test_quantized_tflite_formats_list_both_kernel_sets():
    for fmt in ("tflite-int8", "tflite-dynamic", "tflite-int8-qat", "tflite-int8-selective"):
        assert get_format(fmt).kernel_sets == ("xnnpack", "reference"), fmt
    assert get_format("tflite-float32").kernel_sets == ("xnnpack",)
    assert get_format("onnx-int8").kernel_sets == ("default",)
    assert parse_kernel_sets("reference, xnnpack") == ("reference", "xnnpack")


@pytest.mark.parametrize("text", ["", "cmsis", "xnnpack,arm"])
def test_unknown_kernel_sets_are_one_line_errors(text, tmp_path, capsys):
    from featx_edge.cli import main

    (tmp_path / "run").mkdir()
    assert main(["verify", str(tmp_path / "run"), "--kernels", text]) == 2
    err = capsys.readouterr().err
    assert "`--kernels` must be a comma-separated list of default, xnnpack, builtin, reference" in err
    assert "Traceback" not in err


def test_the_reference_kernels_compute_what_the_runtime_loads(tmp_path):
    """`load(kernels="reference")` really runs LiteRT's reference kernels (BUILTIN_REF), batch or not."""
    from pathlib import Path

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from featx_edge.runtime import load

    path = Path(__file__).parent / "data" / "runtime" / "model.tflite-int8.tflite"
    pixels = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    ours = load(path, kernels="reference")
    assert ours.backend.provider == "reference"
    got = ours.predict_pixels(pixels)
    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.resize_tensor_input(0, [8, 32, 32, 3])
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    scale, zero = out["quantization"]
    expected = (interpreter.get_tensor(out["index"]).astype(np.float32) - zero) * scale
    assert np.array_equal(got, expected)


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_every_quantized_tflite_export_is_verified_under_both_kernel_sets(trained_run):
    report = json.loads((trained_run / "verify.json").read_text())
    assert report["kernel_sets_gated"] == ["default", "xnnpack", "builtin", "reference"]
    for fmt in ("tflite-int8", "tflite-dynamic"):
        row = report["formats"][fmt]
        assert set(row["kernels"]) == {"xnnpack", "reference"} and row["kernel_sets_gated"] == ["xnnpack", "reference"]
        for sub in row["kernels"].values():
            assert sub["passed"] and sub["images"] == report["images"] and "judged_top1_agreement" in sub
        same = row["kernel_sets_compared"]["xnnpack_vs_reference"]
        assert 0.0 <= same["top1_same"] <= 1.0
        assert row["top1_agreement"] == row["kernels"]["xnnpack"]["top1_agreement"]  # the first set on top
    assert set(report["formats"]["onnx-int8"]["kernels"]) == {"default"}
    for fmt, row in report["formats"].items():
        assert "near_ties" in row and "tie_margin" in row, fmt


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_a_kernel_set_that_disagrees_fails_the_gate_unless_not_gated(run_copy, monkeypatch, capsys):
    """The reference kernels made to disagree on every other image: the gate names that kernel set;
    `--kernels xnnpack` records it and passes (a phone-only target)."""
    from featx_edge.cli import main
    from featx_edge.runtime.backends import LiteRTBackend

    real_run = LiteRTBackend.run

    def swapped(self, pixels):
        probs = real_run(self, pixels)
        if self.kernels == "reference":
            probs[::2] = np.roll(probs[::2], 1, axis=1)  # another top-1 class, far beyond any tie
        return probs

    monkeypatch.setattr(LiteRTBackend, "run", swapped)
    assert main(["verify", str(run_copy), "--formats", "tflite-int8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tflite-int8: top-1 agreement" in err and "[reference kernels]" in err
    row = json.loads((run_copy / "verify.json").read_text())["formats"]["tflite-int8"]
    assert row["kernels"]["xnnpack"]["passed"] and not row["kernels"]["reference"]["passed"]
    assert row["kernel_sets_compared"]["xnnpack_vs_reference"]["images_differing"] > 0

    assert main(["verify", str(run_copy), "--formats", "tflite-int8", "--kernels", "xnnpack", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reference kernels" in out and "(not gated)" in out
    row = json.loads((run_copy / "verify.json").read_text())["formats"]["tflite-int8"]
    assert row["passed"] and not row["kernels"]["reference"]["passed"] and not row["kernels"]["reference"]["gated"]


def test_bench_never_recommends_a_runtime_whose_kernel_set_failed_verify():
    from featx_edge.bench.recommend import recommend

    rows = [{"status": "ok", "format": "tflite-int8", "runtime": "litert-xnnpack", "threads": 1, "batch": 1,
             "p50_ms": 1.0, "throughput_ips": 900.0, "model_bytes": 10},
            {"status": "ok", "format": "tflite-float32", "runtime": "litert-xnnpack", "threads": 1, "batch": 1,
             "p50_ms": 3.0, "throughput_ips": 300.0, "model_bytes": 40}]
    ok = {"passed": True, "accuracy_change_points": 0.0}
    failed_on_xnnpack = {**ok, "kernels": {"xnnpack": {"passed": False}, "reference": {"passed": True}}}
    picked = recommend(rows, verified={"tflite-int8": ok, "tflite-float32": ok}, quantization={}, host="x86-64")
    assert picked["batch1"]["format"] == "tflite-int8"
    picked = recommend(rows, verified={"tflite-int8": failed_on_xnnpack, "tflite-float32": ok}, quantization={},
                       host="x86-64")
    assert picked["batch1"]["format"] == "tflite-float32" and picked["throughput"]["format"] == "tflite-float32"


@pytest.mark.slow  # trains or converts a real model (measured with --durations: over 10 s)
def test_bias_correction_is_chosen_per_run_on_validation_and_recorded(tmp_path):
    """`bias_correction = "auto"` (the default): both candidates judged on never-test images under
    both kernel sets; the record is in the manifest and the same run makes the same choice."""
    from conftest import TINY, make_class_folder

    from featx_edge.cli import main
    from featx_edge.rundir.manifest import read_manifest

    data = make_class_folder(tmp_path / "data", {"a": 12, "b": 12}, size=32)
    run = tmp_path / "run"
    # The converter's own ranges: two candidates (all six: tests/test_int8_ranges.py).
    (tmp_path / "c.toml").write_text('[export]\nactivation_ranges = "minmax"\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--data", str(data), "--out", str(run), *TINY,
                 "--image-size", "32", "--weights", "none", "--epochs", "2", "--quiet"]) == 0
    assert main(["export", str(run), "--formats", "tflite-int8", "--quiet"]) == 0
    manifest = read_manifest(run)
    first = manifest["int8_choice"]
    assert manifest["config"]["export"]["bias_correction"] == "auto"
    assert first["bias_correction"] in ("off", "on") and set(first["candidates"]) == {"off/minmax", "on/minmax"}
    assert "validation" in first["judged_on"] and first["images"] > 0
    for judged in first["candidates"].values():
        assert set(judged) == {"xnnpack", "reference"}
        assert all(0.0 <= row["top1_agreement"] <= 1.0 for row in judged.values())
    assert main(["export", str(run), "--formats", "tflite-int8", "--quiet"]) == 0
    assert read_manifest(run)["int8_choice"] == first  # reproducible


def test_bench_recommends_int8_only_where_it_was_verified():
    """An onnx-int8 verified on an x86-64-vnni host is not shipped on arm64 on that word alone."""
    from featx_edge.bench.recommend import format_recommendation, recommend

    rows = [{"status": "ok", "format": fmt, "runtime": "onnxruntime-cpu", "threads": 1, "batch": 1,
             "p50_ms": ms, "throughput_ips": 1000 / ms, "model_bytes": 10} for fmt, ms in
            (("onnx-int8", 1.0), ("onnx-float32", 2.0))]
    verified = {"onnx-int8": {"passed": True, "verified_on": "x86-64-vnni"}, "onnx-float32": {"passed": True}}
    here = recommend(rows, verified=verified, quantization={}, host="x86-64-vnni")
    assert here["batch1"]["format"] == "onnx-int8"
    there = recommend(rows, verified=verified, quantization={}, host="arm64")
    assert there["batch1"]["format"] == "onnx-float32" and there["verified_elsewhere"] == ["onnx-int8"]
    assert any("verified on another kind of CPU" in line for line in format_recommendation(there))


@pytest.mark.slow  # needs the pretrained backbone (fixture `pretrained`: minutes)
def test_a_fragile_int8_model_is_caught_disagreeing_between_kernel_sets(tmp_path, sample_root, pretrained):
    """The issue's case: a MobileNetV2 0.35 pretrained for a minute on digits 0-4, transferred to
    5-9 at 64 px. Its int8 file gives other top-1 classes under LiteRT's reference kernels (what
    TensorFlow Lite Micro computes) than under XNNPACK; verify records both and names the set."""
    from conftest import TINY

    from featx_edge.cli import main

    run = tmp_path / "run"
    rc = main(["run", "--data", str(sample_root / "target"), "--out", str(run), *TINY, "--weights", str(pretrained),
               "--epochs", "10", "--formats", "tflite-int8", "--quiet"])
    report = json.loads((run / "verify.json").read_text())
    row = report["formats"]["tflite-int8"]
    compared = row["kernel_sets_compared"]["xnnpack_vs_reference"]
    assert compared["images_differing"] > 0 and compared["top1_same"] < 1.0, compared
    xnnpack, reference = row["kernels"]["xnnpack"], row["kernels"]["reference"]
    assert xnnpack["top1_agreement"] != reference["top1_agreement"] or xnnpack["max_abs_diff"] != reference[
        "max_abs_diff"]
    assert rc == (0 if row["passed"] else 2)
    assert row["passed"] == (xnnpack["passed"] and reference["passed"])  # both gate by default
