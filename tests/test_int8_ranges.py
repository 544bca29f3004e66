"""Activation ranges for tflite-int8 (export/tflite_ranges.py) and their per-run choice (issue 21).

- The ranges are written into the converter's own calibration: with the converter's min/max the
  result has exactly the integers ``TFLiteConverter.convert()`` gives; clipped ranges change
  activations only, never the input, the preprocessing that reads it, or the softmax output.
- Percentile and MSE clipping on constructed histograms: never wider than min/max, always hold 0,
  and MSE clips a long thin tail but not a flat distribution.
- ``[export] activation_ranges = "auto"`` (opt-in; the default is ``minmax``) with bias correction ``"auto"``: the six
  candidates are judged on never-test images, the choice and its numbers are in the manifest and
  the file's metadata, and the same run makes the same choice. A fixed setting makes no choice.
"""

from __future__ import annotations

import numpy as np
import pytest

from featx_edge.export import tflite_ranges as tr


def test_percentile_and_mse_ranges_narrow_a_long_tail_and_keep_zero():
    low, high = -1.0, 100.0
    counts = np.zeros(tr.BINS, dtype=np.int64)
    counts[: tr.BINS // 50] = 100_000  # the bulk of the values sits in [-1, 1]
    counts[-1] = 1  # one outlier at 100
    for method in ("percentile", "mse"):
        a, b = tr.clipped({0: (low, high, counts)}, method=method)[0]
        assert low <= a <= 0.0 <= b < high / 4, (method, a, b)
    assert tr.clipped({0: (low, high, counts)}, method="minmax")[0] == (low, high)


def test_mse_keeps_the_full_range_of_a_flat_distribution():
    counts = np.full(tr.BINS, 1000, dtype=np.int64)
    a, b = tr.mse_range(0.0, 6.0, counts)
    assert a == 0.0 and b == pytest.approx(6.0)  # clipping a flat distribution only adds error
    a, b = tr.percentile_range(-3.0, 3.0, counts)
    assert -3.0 <= a < -2.99 and 2.99 < b <= 3.0


def _tiny_model():
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    image = keras.Input((24, 24, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(image)
    x = keras.layers.Conv2D(8, 3, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(image, keras.layers.Dense(3, activation="softmax")(x))


def _quantization(flatbuffer: bytes) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_content=flatbuffer).get_tensor_details()
    return {d["name"]: (d["dtype"].__name__, tuple(np.round(d["quantization_parameters"]["scales"], 10)),
                        tuple(d["quantization_parameters"]["zero_points"])) for d in details}


def _outputs(flatbuffer: bytes, images: np.ndarray) -> np.ndarray:
    from featx_edge.runtime.backends import LiteRTBackend

    return np.concatenate([LiteRTBackend(flatbuffer, kernels=kernels).run(images)
                           for kernels in ("xnnpack", "reference")])


def test_ranges_are_written_into_the_converters_calibration():
    """min/max through calibrate-only + the converter's quantizer == TFLiteConverter.convert(), integer
    for integer; clipped ranges change some activation scales but not the input or the output."""
    from featx_edge.export.tflite import TFLiteQuantization, calibrate, convert

    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 256, (32, 24, 24, 3), dtype=np.uint8)
    calibration[:, :4] = 0  # dark rows: the depthwise output gets a tail for clipping to cut
    model = _tiny_model()
    plain = convert(model, size=24, quantization=TFLiteQuantization.for_int8(), calibration=calibration)
    ours = tr.convert_ranges(model, size=24, calibration=calibration, methods=tr.RANGE_METHODS)
    assert _quantization(ours["minmax"]) == _quantization(plain)
    images = rng.integers(0, 256, (8, 24, 24, 3), dtype=np.uint8)
    assert np.array_equal(_outputs(ours["minmax"], images), _outputs(plain, images))
    base = _quantization(plain)
    fixed = set(tr.fixed_tensor_names(calibrate(model, size=24, calibration=calibration))) & set(base)
    for method in ("percentile", "mse"):
        clipped = _quantization(ours[method])
        assert set(clipped) == set(base)
        changed = {name for name in base if clipped[name] != base[name]}
        assert changed, method  # some activation got a narrower range
        assert fixed and not changed & fixed, (method, changed, fixed)


def test_minmax_alone_skips_the_histogram_pass_and_makes_the_same_bytes(monkeypatch):
    """The default (`minmax`) quantizes the calibrated model as it is: no float pass keeping every tensor,
    and byte for byte the file the histogram route made (its min/max written back unchanged)."""
    from featx_edge.export.tflite import calibrate, quantize_calibrated

    calibration = np.random.default_rng(0).integers(0, 256, (16, 24, 24, 3), dtype=np.uint8)
    model = _tiny_model()
    base = calibrate(model, size=24, calibration=calibration)
    through_histograms = quantize_calibrated(tr.with_ranges(base, tr.clipped(
        tr.histograms(base, calibration=calibration), method="minmax")))

    def refused(*args, **kwargs):
        raise AssertionError("a histogram pass for min/max ranges")

    monkeypatch.setattr(tr, "histograms", refused)
    assert tr.convert_ranges(model, size=24, calibration=calibration, methods=("minmax",))["minmax"] == through_histograms


def _train(tmp_path, *, config: str | None = None):
    from conftest import TINY, make_class_folder

    from featx_edge.cli import main

    data = make_class_folder(tmp_path / "data", {"a": 12, "b": 12}, size=32)
    run = tmp_path / "run"
    extra = []
    if config is not None:
        (tmp_path / "c.toml").write_text(config)
        extra = ["--config", str(tmp_path / "c.toml")]
    assert main(["train", *extra, "--data", str(data), "--out", str(run), *TINY, "--image-size", "32",
                 "--weights", "none", "--epochs", "2", "--quiet"]) == 0
    return run, main


@pytest.mark.slow  # converts six int8 candidates of a (tiny) trained model
def test_activation_ranges_and_bias_correction_are_chosen_per_run_and_recorded(tmp_path):
    from featx_edge.rundir.manifest import read_manifest
    from featx_edge.runtime.metadata import read_tflite

    run, main = _train(tmp_path, config='[export]\nactivation_ranges = "auto"\n')
    assert main(["export", str(run), "--formats", "tflite-int8", "--quiet"]) == 0
    manifest = read_manifest(run)
    first = manifest["int8_choice"]
    assert manifest["config"]["export"]["activation_ranges"] == "auto"
    assert set(first["candidates"]) == {f"{b}/{m}" for b in ("off", "on") for m in ("minmax", "percentile", "mse")}
    assert first["chosen"] == f"{first['bias_correction']}/{first['activation_ranges']}"
    assert "validation" in first["judged_on"] and "test" not in first["judged_on"] and first["images"] > 0
    for judged in first["candidates"].values():
        assert set(judged) == {"xnnpack", "reference"}
        assert all(0.0 <= row["top1_agreement"] <= 1.0 and row["images_lost"] >= 0 for row in judged.values())
    best = max(min(row["top1_agreement"] for row in judged.values()) for judged in first["candidates"].values())
    assert min(row["top1_agreement"] for row in first["candidates"][first["chosen"]].values()) == best
    _, meta = read_tflite(run / "export" / "model.tflite-int8.tflite")
    assert meta["quantization"]["activation_ranges"] == {"setting": "auto", "method": first["activation_ranges"]}
    model_sha = meta["flatbuffer"]["sha256"]  # the model's bytes (the metadata zip holds a time stamp)
    assert main(["export", str(run), "--formats", "tflite-int8", "--quiet"]) == 0
    assert read_manifest(run)["int8_choice"] == first  # reproducible: the same choice, the same numbers
    assert read_tflite(run / "export" / "model.tflite-int8.tflite")[1]["flatbuffer"]["sha256"] == model_sha


@pytest.mark.slow  # converts a (tiny) trained model
def test_a_fixed_activation_range_method_makes_no_choice(tmp_path):
    from featx_edge.rundir.manifest import read_manifest
    from featx_edge.runtime.metadata import read_tflite

    run, main = _train(tmp_path, config='[export]\nactivation_ranges = "mse"\nbias_correction = false\n')
    assert main(["export", str(run), "--formats", "tflite-int8", "--quiet"]) == 0
    assert "int8_choice" not in read_manifest(run)
    _, meta = read_tflite(run / "export" / "model.tflite-int8.tflite")
    assert meta["quantization"]["activation_ranges"] == {"setting": "mse", "method": "mse"}
    assert meta["quantization"]["bias_correction"] is None


def test_an_unknown_activation_range_method_is_one_line(tmp_path, capsys):
    from conftest import one_line_error

    from featx_edge.cli import main

    (tmp_path / "c.toml").write_text('[export]\nactivation_ranges = "kl"\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "run")]) == 2
    one_line_error(capsys, "activation_ranges", "auto, minmax, percentile, mse", "kl")
    assert not (tmp_path / "run").exists()
