"""Issue 24: the main job faster and nothing less exact.

One trace per model for every TFLite conversion (the same bytes as a fresh trace of the Keras model,
the way export converted before), one conversion and calibration for the selective variant's
diagnosis and model, calibrate once and quantize more than once, verify's runners side by side in
threads (the same figures as one after the other), the reference's test-split outputs shared between
export and verify, and `featx-edge run`'s stage times.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys

import numpy as np
import pytest
from conftest import make_class_folder

from featx_edge.progress import StageClock, lap, stage

SIZE = 32


# -- the stage clock (no TensorFlow) ---------------------------------------------------------------
def test_stage_clock_records_stages_laps_and_nested_exports():
    with StageClock.started() as clock:
        lap("scan")
        with stage("export"):
            with stage("export tflite-float32"):
                sum(range(10_000))
            with stage("export tflite-float32"):  # entered twice: adds up
                pass
        lap("verify")
    assert list(clock.stages) == ["scan", "export tflite-float32", "export", "verify"]
    assert all(row["seconds"] >= 0 and row["cpu_seconds"] >= 0 for row in clock.stages.values())
    assert clock.stages["export"]["seconds"] >= clock.stages["export tflite-float32"]["seconds"]
    assert clock.total()["seconds"] >= clock.stages["export"]["seconds"]
    assert any("export tflite-float32" in line and "s wall" in line for line in clock.lines())


def test_stages_cost_nothing_without_a_started_clock():
    with stage("export"):
        lap("scan")
    assert StageClock._current is None


# -- conversions of a small model: before (a fresh trace of the Keras model) and after ----------------
@pytest.fixture(scope="module")
def small_model():
    from featx_edge.config import ModelConfig
    from featx_edge.training.model import build_classifier

    config = ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=SIZE, weights="none")
    model = build_classifier(num_classes=3, config=config, weights_file=None, seed=0).model
    calibration = np.random.default_rng(0).integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    return model, calibration


def _before(model, *, quantization, calibration=None, batch=None) -> bytes:
    """The converter as export built it before issue 24 (its code, verbatim): a fresh trace of the Keras
    model for every conversion, the Keras model itself as the trackable the converter saves."""
    from featx_edge._tf import import_tf
    from featx_edge.export.tflite import representative

    tf, _ = import_tf()
    fn = tf.function(lambda image: model(image, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([batch, SIZE, SIZE, 3], tf.float32, name="image"))
    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    if quantization.optimize:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization.float16:
        conv.target_spec.supported_types = [tf.float16]
    if calibration is not None:
        conv.representative_dataset = representative(calibration)
    if quantization.full_integer:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
    return bytes(conv.convert())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["float32", "float16", "dynamic", "int8"])
def test_a_traced_conversion_makes_the_same_bytes_as_before(small_model, name):
    from featx_edge.export.tflite import TFLiteQuantization, convert, trace

    model, calibration = small_model
    quant = TFLiteQuantization.named(name)
    cal = calibration if quant.calibrated else None
    traced = trace(model, size=SIZE)
    after = [bytes(convert(traced, size=SIZE, quantization=quant, calibration=cal)) for _ in range(2)]
    before = _before(model, quantization=quant, calibration=cal)
    digests = {hashlib.sha256(b).hexdigest() for b in (*after, before)}
    assert len(digests) == 1, f"{name}: one trace converted twice and a fresh trace differ: {digests}"


@pytest.mark.slow
def test_selective_int8_in_one_conversion_matches_diagnose_then_convert(small_model):
    from featx_edge.export.tflite import trace
    from featx_edge.export.tflite_int8 import convert_selective, diagnose, selective

    model, calibration = small_model
    layers, keep, flatbuffer = selective(trace(model, size=SIZE, batch=1), size=SIZE, calibration=calibration,
                                         float_layers=2)
    before_layers = diagnose(model, size=SIZE, calibration=calibration)
    assert layers == before_layers and keep == [row["tensor"] for row in before_layers[:2]]
    assert flatbuffer == convert_selective(model, size=SIZE, calibration=calibration, keep_float=keep)


@pytest.mark.slow
def test_calibrate_once_quantize_twice(small_model):
    from featx_edge.export.tflite import (
        TFLiteQuantization,
        calibrate,
        check_integer_only,
        convert,
        quantize_calibrated,
        trace,
    )
    from featx_edge.runtime.backends import LiteRTBackend

    model, calibration = small_model
    traced = trace(model, size=SIZE)
    calibrated = calibrate(traced, size=SIZE, calibration=calibration)
    first, second = quantize_calibrated(calibrated), quantize_calibrated(calibrated)
    assert first == second
    assert check_integer_only(first)["input_dtype"] == "uint8"
    # The converter's own int8 (calibrate and quantize in one call) computes the same numbers. (LiteRT's
    # reference kernels abort on this random-weight model, the converter's own int8 file included.)
    direct = convert(traced, size=SIZE, quantization=TFLiteQuantization.for_int8(), calibration=calibration)
    for kernels in ("xnnpack", "builtin"):
        np.testing.assert_array_equal(LiteRTBackend(first, kernels=kernels).run(calibration),
                                      LiteRTBackend(direct, kernels=kernels).run(calibration))


def _bias_corrected_before(model, *, calibration, images=64):
    """Bias correction as export computed it before issue 24 (its algorithm, verbatim): the inputs of each
    convolution from a fresh pass of the model up to it, so the cost grew with the square of the depth."""
    from featx_edge._tf import import_tf
    from featx_edge.export.bias_correction import _conv_bn_pairs, _int8_rounded

    _, keras = import_tf()

    def copy():
        twin = keras.models.clone_model(model)
        twin.set_weights(model.get_weights())
        return twin

    corrected, simulated = copy(), copy()
    x = calibration[:images].astype(np.float32)
    sim_pairs = {conv.name: (conv, bn) for conv, bn in _conv_bn_pairs(simulated)}
    for conv, bn in _conv_bn_pairs(corrected):
        sim_conv, sim_bn = sim_pairs[conv.name]
        gamma, beta, mean, variance = bn.get_weights()
        gain = gamma / np.sqrt(variance + bn.epsilon)
        inputs = keras.Model(simulated.input, sim_conv.input)(x, training=False).numpy()
        before = sim_conv(inputs).numpy()
        (kernel,) = sim_conv.get_weights()
        sim_conv.set_weights([_int8_rounded(kernel, gain=gain,
                                            depthwise=isinstance(conv, keras.layers.DepthwiseConv2D))])
        shift = (sim_conv(inputs).numpy() - before).mean(axis=(0, 1, 2))
        bn.set_weights([gamma, beta - shift * gain, mean, variance])
        sim_bn.set_weights([gamma, beta - shift * gain, mean, variance])
    return corrected


@pytest.mark.slow
def test_bias_correction_in_one_pass_equals_a_pass_per_convolution(small_model):
    """One forward pass with per-convolution hooks gives bit for bit the offsets that a pass up to each
    convolution gave (MobileNetV2: residual adds, depthwise and pointwise convolutions)."""
    from featx_edge.export.bias_correction import bias_corrected

    from featx_edge._tf import import_tf

    _, keras = import_tf()
    shared, calibration = small_model
    model = keras.models.clone_model(shared)  # the module's model stays as other tests expect it
    model.set_weights(shared.get_weights())
    rng = np.random.default_rng(1)
    for layer in model.layers:  # BatchNorm statistics away from 0/1, so every layer has a real shift
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma * rng.uniform(0.2, 3.0, gamma.shape), beta, mean + rng.normal(0, 0.1, mean.shape),
                               variance * rng.uniform(0.05, 2.0, variance.shape)])
    after, info = bias_corrected(model, calibration=calibration)
    before = _bias_corrected_before(model, calibration=calibration)
    assert info["layers"] > 30 and info["max_shift"] > 0
    for ours, theirs in zip(after.get_weights(), before.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert any(not np.array_equal(a, b) for a, b in zip(after.get_weights(), model.get_weights(), strict=True))


# -- a small run through the CLI: stage times, shared reference, the same verify figures ---------------
ALL_SIX = "tflite-float32,tflite-float16,tflite-dynamic,tflite-int8,onnx-float32,onnx-int8"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """`featx-edge run` on 48 images, six formats, counting the Keras reference passes over the test split."""
    from featx_edge.cli import main
    from featx_edge.training import run as run_module
    from featx_edge.training import train

    root = tmp_path_factory.mktemp("speed")
    data = make_class_folder(root / "data", {"a": 16, "b": 16, "c": 16}, size=SIZE)
    out = root / "run"
    calls: list[tuple[str, ...]] = []
    real = train.predict_probs

    def counting(model, root_, relpaths, **kw):
        calls.append(tuple(relpaths))
        return real(model, root_, relpaths, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "predict_probs", counting)
        mp.setattr(run_module, "_SHARED", {})  # a reference built by another test is not this run's
        mp.setattr(sys, "stdout", io.StringIO())
        rc = main(["run", "--data", str(data), "--out", str(out), "--backbone", "mobilenet_v2", "--alpha", "0.35",
                   "--image-size", str(SIZE), "--weights", "none", "--epochs", "2", "--seed", "0",
                   "--formats", ALL_SIX, "--threshold", "tflite-int8.min_agreement=0",
                   "--threshold", "onnx-int8.min_agreement=0", "--threshold", "tflite-dynamic.min_agreement=0"])
        stdout = sys.stdout.getvalue()
    return out, rc, stdout, calls


@pytest.mark.slow
def test_run_prints_and_records_its_stage_times(small_run):
    out, _, stdout, _ = small_run
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stage_times"]["stages"]
    for name in ("scan", "model", "embed", "train", "export", "verify", "report",
                 *(f"export {fmt}" for fmt in ALL_SIX.split(","))):
        assert stages[name]["seconds"] >= 0 and stages[name]["cpu_seconds"] >= 0, name
    assert manifest["stage_times"]["total"]["seconds"] >= stages["export"]["seconds"]
    tail = stdout.rstrip().splitlines()[-(len(stages) + 2):]
    assert tail[0].startswith("stage times") and tail[-1].split()[0] == "total", stdout[-2000:]


@pytest.mark.slow
def test_verify_reuses_the_reference_outputs_export_computed(small_run):
    from featx_edge.training.run import Run

    out, _, _, calls = small_run
    test = tuple(Run.open(out).splits().test)
    # golden (export) ran the reference over the test split; verify reused it instead of a second pass
    assert calls.count(test) == 1, [len(c) for c in calls]


@pytest.mark.slow
def test_verify_figures_are_those_of_a_sequential_pass(small_run):
    """Before issue 24 verify ran every model one after the other with its own reference pass."""
    from featx_edge.data.folders import map_batches
    from featx_edge.fidelity.gate import compare
    from featx_edge.formats.registry import get_format, thresholds_for, tie_margin
    from featx_edge.runtime import load
    from featx_edge.training.run import Run
    from featx_edge.training.train import predict_probs

    out = small_run[0]
    report = json.loads((out / "verify.json").read_text())
    run = Run.open(out)
    splits = run.splits()
    reference = predict_probs(run.reference().model, splits.root, splits.test, size=SIZE)
    np.testing.assert_array_equal(reference, np.load(out / "verify_reference.npy"))
    for fmt, entry in report["formats"].items():
        for kernels, row in entry["kernels"].items():
            predictor = load(run.artifact_path(fmt), kernels=None if kernels == "default" else kernels)
            probs = map_batches(lambda b, p=predictor: p.predict_pixels(b, allow_nonfinite=True), splits.root,
                                splits.test, size=SIZE)
            limits = thresholds_for(fmt, run.config.verify)
            metrics = compare(probs, reference, splits.labels("test"), tie_margin=tie_margin(fmt, limits))
            compared = [key for key in row if key in metrics]
            assert {"top1_agreement", "max_abs_diff", "accuracy", "near_ties"} <= set(compared)
            for key in compared:  # through JSON, as verify.json holds them
                assert row[key] == json.loads(json.dumps(metrics[key])), (fmt, kernels, key)
        assert get_format(fmt).kernel_sets == tuple(entry["kernels"])


@pytest.mark.slow
def test_int8_choice_judged_in_threads_as_one_after_the_other(small_run):
    from featx_edge.export.budget import judging_set
    from featx_edge.export.int8_choice import judge_all, judge_flatbuffer
    from featx_edge.runtime.metadata import read_tflite
    from featx_edge.training.run import Run

    run = Run.open(small_run[0])
    judging = judging_set(run, train_images=20)
    candidates = {"off": read_tflite(run.artifact_path("tflite-int8"))[0],
                  "on": read_tflite(run.artifact_path("tflite-dynamic"))[0]}
    together = judge_all(candidates, run=run, judging=judging)
    assert together == {name: judge_flatbuffer(fb, run=run, judging=judging) for name, fb in candidates.items()}


def test_native_output_from_many_threads_leaves_stdout_where_it_was(capfd):
    """verify's runners load and resize models in threads, each holding back LiteRT's own lines: the
    process's stdout must still be the terminal (or file) afterwards, not a closed temporary file."""
    import os
    import threading
    import time

    from featx_edge.progress import native_output

    before = os.fstat(1)
    barrier = threading.Barrier(8)

    def noisy(i: int) -> None:
        barrier.wait()
        for _ in range(50):
            with native_output(f"thread {i}"):
                os.write(1, b"held back\n")
                time.sleep(0.001)  # the engine computes (GIL released) while its output is held back

    threads = [threading.Thread(target=noisy, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    os.write(1, b"still printed\n")
    out = capfd.readouterr().out
    assert "still printed" in out and "held back" not in out


@pytest.mark.slow
def test_exporting_again_makes_files_with_the_same_sha256(small_run, tmp_path):
    """The TFLite converter is deterministic, and so is what export wraps around its output (the metadata
    zip has a fixed date): exporting the same run again gives byte-identical files. (tf2onnx is not: its
    generated names change from process to process, so ONNX files are compared by verify's figures.)"""
    import shutil

    from featx_edge.export import export_run

    copy = tmp_path / "again"
    shutil.copytree(small_run[0], copy)
    before = json.loads((copy / "manifest.json").read_text())["artifacts"]
    again = export_run(copy, formats="tflite-float32,tflite-dynamic,tflite-int8")["artifacts"]
    for fmt in ("tflite-float32", "tflite-dynamic", "tflite-int8"):
        assert again[fmt]["sha256"] == before[fmt]["sha256"], fmt
