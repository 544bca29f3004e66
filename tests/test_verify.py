"""verify: metrics on hand-made outputs, and wrong models caught on a real run."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from featx_edge.errors import ConfigError, VerificationError
from featx_edge.fidelity.gate import check, compare
from featx_edge.formats.registry import Thresholds, parse_threshold, thresholds_for
from featx_edge.verify.runner import verify_run


def test_metrics_on_hand_made_outputs():
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    same = compare(reference.copy(), reference, labels)
    assert same["top1_agreement"] == 1.0 and same["max_abs_diff"] == 0.0 and same["sqnr_db"] == float("inf")
    assert same["accuracy"] == same["reference_accuracy"] == 0.75 and same["accuracy_change_points"] == 0.0
    assert same["cosine_similarity"] == pytest.approx(1.0)

    flipped = reference.copy()
    flipped[2] = [0.4, 0.6]  # now right: +25 points, one disagreement
    m = compare(flipped, reference, labels)
    assert m["top1_agreement"] == 0.75 and m["accuracy"] == 1.0
    assert m["accuracy_change_points"] == pytest.approx(25.0)
    assert m["max_abs_diff"] == pytest.approx(0.2) and m["mean_abs_diff"] == pytest.approx(0.4 / 8)
    signal = np.sum(reference ** 2)
    assert m["sqnr_db"] == pytest.approx(10 * np.log10(signal / 0.08))
    assert m["images"] == 4


def test_check_reports_value_and_threshold():
    metrics = {"top1_agreement": 0.95, "accuracy_change_points": -1.5, "max_abs_diff": 0.3, "sqnr_db": 12.0}
    failures = check(metrics, Thresholds(min_agreement=0.97, max_accuracy_drop=1.0, max_abs_diff=0.1,
                                         min_sqnr_db=20.0))
    assert failures == ["top-1 agreement 0.9500 < 0.97", "accuracy drop 1.50 points > 1.0",
                        "max |dprob| 0.3 > 0.1", "SQNR 12.0 dB < 20.0"]
    assert check(metrics, Thresholds()) == []


def test_threshold_overrides():
    assert parse_threshold("tflite-int8.min_agreement=0.95") == ("tflite-int8", "min_agreement", 0.95)
    assert thresholds_for("tflite-int8", {"tflite-int8": {"min_agreement": 0.9}}).min_agreement == 0.9
    assert thresholds_for("tflite-int8").min_agreement == 0.97
    assert thresholds_for("tflite-int8").max_accuracy_drop == 1.0
    assert thresholds_for("onnx-float32").min_agreement == 1.0
    with pytest.raises(ConfigError, match="FORMAT.METRIC=VALUE"):
        parse_threshold("tflite-int8=0.9")
    with pytest.raises(ConfigError, match="unknown threshold `min_agree`"):
        parse_threshold("tflite-int8.min_agree=0.9")


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_every_export_passes_default_thresholds_on_an_imagenet_backbone(trained_run):
    """The main run's exports, int8 included, meet the DEFAULT gate; nothing was loosened."""
    from featx_edge.rundir.manifest import read_manifest

    assert read_manifest(trained_run)["config"]["verify"] == {}
    report = json.loads((trained_run / "verify.json").read_text())
    assert report["passed"], report
    for fmt, row in report["formats"].items():
        limits = thresholds_for(fmt)
        assert row["thresholds"] == dataclasses.asdict(limits), "defaults, not loosened"
        assert row["passed"] and row["top1_agreement"] >= limits.min_agreement, (fmt, row)
        assert -row["accuracy_change_points"] <= limits.max_accuracy_drop + 1e-9, (fmt, row)
        assert row["images"] == report["images"] >= 250  # all ten digits: enough to resolve a few points
    integer = report["formats"]["tflite-int8"]["integer"]
    assert integer["float_tensors"] == [] and integer["input_dtype"] == "uint8"
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "QUANTIZE"} <= set(integer["op_types"])


def _path(run, fmt):
    return run / json.loads((run / "manifest.json").read_text())["artifacts"][fmt]["path"]


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_verify_catches_swapped_truncated_and_perturbed_models(run_copy, capsys):
    from featx_edge.cli import main
    from featx_edge.training.run import Run

    # swapped: the float16 file replaced by the float32 one
    shutil.copy(_path(run_copy, "tflite-float32"), _path(run_copy, "tflite-float16"))
    # truncated
    data = _path(run_copy, "onnx-float32").read_bytes()
    _path(run_copy, "onnx-float32").write_bytes(data[: len(data) // 2])
    # perturbed weights, re-recorded in the manifest so that only the numbers can catch it
    import onnx
    from onnx import numpy_helper

    path = _path(run_copy, "onnx-int8")
    perturbed = onnx.load_from_string(data)  # the float32 model, one conv kernel drowned in noise
    rng = np.random.default_rng(0)
    for init in perturbed.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 4:
            noisy = arr + rng.normal(scale=arr.std(), size=arr.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
            break
    onnx.save(perturbed, str(path))
    Run.open(run_copy).record_artifact("onnx-int8", path)

    with pytest.raises(VerificationError) as err:
        verify_run(run_copy)
    msg = str(err.value)
    assert "tflite-float16: " in msg and "truncated or replaced" in msg  # size differs: caught first
    assert "onnx-float32: " in msg and "truncated" in msg
    assert "onnx-int8: top-1 agreement" in msg and "< 0.97" in msg  # the default threshold
    assert "onnx-int8: not quantized" in msg  # a float graph recorded as onnx-int8
    report = json.loads((run_copy / "verify.json").read_text())
    failing = {fmt for fmt, row in report["formats"].items() if not row["passed"]}
    assert failing == {"tflite-float16", "onnx-float32", "onnx-int8"} and not report["passed"]
    assert all(f"{fmt}: " in msg for fmt in failing)

    assert main(["verify", str(run_copy), "--quiet"]) == 2
    assert "check(s) failed" in capsys.readouterr().err


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_verify_catches_a_same_size_swap(run_copy):
    """A file with the recorded size but other bytes: only the checksum can tell."""
    path = _path(run_copy, "tflite-int8")
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="tflite-int8: .*does not match its sha256"):
        verify_run(run_copy, formats=("tflite-int8",))


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_verify_threshold_override_from_cli(run_copy, capsys):
    from featx_edge.cli import main

    rc = main(["verify", str(run_copy), "--formats", "tflite-float16", "--quiet",
               "--threshold", "tflite-float16.max_abs_diff=0"])
    assert rc == 2
    assert "tflite-float16: max |dprob|" in capsys.readouterr().err


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_standalone_verify_prints_the_table(run_copy, capsys):
    from featx_edge.cli import main

    assert main(["verify", str(run_copy), "--formats", "tflite-float32,onnx-float32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "format" in out and "agreement [95% CI]" in out and "tflite-float32" in out and "pass" in out


def test_a_run_with_random_backbone_weights_is_marked_not_meaningful():
    from featx_edge.verify.runner import format_table

    report = {"reference_accuracy": 0.1, "reference_accuracy_ci95": [0.05, 0.2], "images": 40,
              "formats": {"tflite-float32": {"accuracy": 0.1, "accuracy_change_points": 0.0,
                                             "accuracy_change_ci95_points": [-1.0, 1.0], "top1_agreement": 1.0,
                                             "top1_agreement_ci95": [0.9, 1.0], "passed": True}}}
    real = format_table(report, {"backbone": {"weights": "imagenet"}, "artifacts": {}})
    assert "not meaningful" not in real.lower()
    table = format_table(report, {"backbone": {"weights": "none"}, "artifacts": {}})
    row = next(line for line in table.splitlines() if line.startswith("tflite-float32"))
    assert row.endswith("pass  (not meaningful)")
    assert "NOT MEANINGFUL" in table and "--weights none" in table


def test_top1_records_class_and_probability():
    from featx_edge.verify.runner import top1

    probs = np.array([[0.1, 0.7, 0.2], [0.55555, 0.3, 0.14445]])
    assert top1(probs) == {"top1": [1, 0], "score": [0.7, 0.5556]}
    assert top1(np.zeros((0, 3))) == {"top1": [], "score": []}


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_recorded_predictions_agree_with_verify_json(trained_run):
    """The per-image predictions (for the report) are the ones verify measured: same images, same counts."""
    from featx_edge.rundir.manifest import read_manifest
    from featx_edge.verify.runner import PREDICTIONS, PREDICTIONS_SCHEMA

    report = json.loads((trained_run / "verify.json").read_text())
    preds = json.loads((trained_run / PREDICTIONS).read_text())
    manifest = read_manifest(trained_run)
    assert preds["schema"] == PREDICTIONS_SCHEMA and preds["reference"]["sha256"] == manifest["reference"]["sha256"]
    assert preds["images"] == json.loads((trained_run / "splits.json").read_text())["test"]
    truth, ref = np.array(preds["labels"]), np.array(preds["reference"]["top1"])
    assert len(truth) == report["images"] and np.mean(ref == truth) == pytest.approx(report["reference_accuracy"])
    assert set(preds["formats"]) == set(report["formats"])
    for fmt, entry in preds["formats"].items():
        row, top = report["formats"][fmt], np.array(entry["top1"])
        assert entry["sha256"] == row["sha256"] == manifest["artifacts"][fmt]["sha256"]
        assert np.mean(top == truth) == pytest.approx(row["accuracy"]), fmt
        assert int(np.sum(top != ref)) == row["disagreements"], fmt
        assert all(1 / len(manifest["labels"]) <= s <= 1.0 for s in entry["score"]), fmt
