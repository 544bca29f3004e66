"""AdaRound weight rounding for int8 (export/adaround.py, ``[export] weight_rounding``; issue 21).

- The integers in the converted tflite-int8 and onnx-int8 files are exactly the integers AdaRound
  chose: the float kernel written back (scale x q / BatchNorm gain) makes TFLite's converter and
  onnxruntime's quantizer round to them.
- Per layer, the folded output error on the calibration images (AdaRound's objective), measured
  by running the layer itself, is no larger than nearest rounding's, and smaller somewhere.
- ``[export] weight_rounding`` is validated (one line) and recorded in the tflite-int8 file's
  metadata and the manifest's config through the CLI.
"""

from __future__ import annotations

import numpy as np
import pytest


def _model():
    """Conv + BN + ReLU6, depthwise + BN, pooling, softmax: BatchNorm with non-trivial statistics."""
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    image = keras.Input((24, 24, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(image)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(12, 1, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(image, keras.layers.Dense(3, activation="softmax")(x))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape
            layer.set_weights([rng.uniform(0.3, 3.0, n), rng.normal(size=n), rng.normal(size=n) * 0.1,
                               rng.uniform(0.2, 2.0, n)])
    return model, keras


def _smooth_images(count: int, *, seed: int) -> np.ndarray:
    """Images whose neighbouring pixels are alike (as in photos): where nearest rounding's errors add up."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (count, 6, 6, 3))
    return np.clip(coarse.repeat(4, axis=1).repeat(4, axis=2) + rng.normal(0, 4, (count, 24, 24, 3)), 0,
                   255).astype(np.uint8)


@pytest.fixture(scope="module")
def rounded():
    from featx_edge.export.adaround import adarounded

    model, keras = _model()
    calibration = _smooth_images(24, seed=1)
    copy, info = adarounded(model, calibration=calibration, iterations=300)
    return model, copy, info, calibration, keras


def _tflite_kernels(flatbuffer: bytes) -> list[np.ndarray]:
    """The int8 filter of every CONV_2D / DEPTHWISE_CONV_2D op, in graph order."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    return [interpreter.get_tensor(op["inputs"][1]) for op in interpreter._get_ops_details()
            if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]


def test_the_tflite_file_holds_exactly_the_integers_adaround_chose(rounded):
    from featx_edge.export.tflite import TFLiteQuantization, convert

    _, copy, info, calibration, _ = rounded
    assert info["layers"] == 3 and info["weights_changed"] > 0  # it chose something other than nearest
    flatbuffer = convert(copy, size=24, quantization=TFLiteQuantization.for_int8(), calibration=calibration)
    kernels = _tflite_kernels(flatbuffer)
    assert len(kernels) == 3
    for row, kernel in zip(info["per_layer"], kernels):
        chosen = row["integers"]  # (kh*kw*cin, out) or (kh*kw, channels) for depthwise
        if "depthwise" in row["layer"]:
            expected, within = chosen.reshape(kernel.shape), (0, 1, 2)  # TFLite: (1, kh, kw, channels)
        else:
            expected, within = chosen.T.reshape(kernel.shape), (1, 2, 3)  # TFLite: (out, kh, kw, in)
        assert kernel.dtype == np.int8
        assert np.array_equal(kernel, expected), row["layer"]
        assert set(np.abs(kernel.astype(int)).max(axis=within)) == {127}  # each channel's scale unchanged


def test_the_onnx_int8_file_holds_exactly_the_integers_adaround_chose(rounded, tmp_path):
    """onnxruntime's per-channel symmetric quantizer (no reduce_range) on tf2onnx's BN-fused kernels."""
    import onnx
    from onnx import numpy_helper

    from featx_edge.export import onnx as onnx_export
    from featx_edge.export.onnx_int8 import quantize

    _, copy, info, calibration, _ = rounded
    metadata = {"featx_edge_version": "0", "format": "onnx-int8", "labels": ["a", "b", "c"],
                "input": {"size": 24}, "output": {}, "backbone": "test"}
    onnx_export.save(onnx_export.convert(copy, size=24, metadata=metadata), tmp_path / "float.onnx")
    quantize(tmp_path / "float.onnx", tmp_path / "int8.onnx", calibration=calibration, method="minmax")
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer
               if init.name.endswith("_weights_fused_bn_quantized")}
    for row in info["per_layer"]:
        (kernel,) = [array for name, array in weights.items() if f"/{row['layer']}/" in name]
        chosen = row["integers"]  # (kh*kw*in, out) or (kh*kw, channels); ONNX: (out, in, kh, kw)
        if "depthwise" in row["layer"]:
            expected = chosen.reshape(3, 3, -1).transpose(2, 0, 1)[:, None]
        else:
            out, cin, kh, kw = kernel.shape
            expected = chosen.reshape(kh, kw, cin, out).transpose(3, 2, 0, 1)
        assert np.array_equal(kernel, expected), row["layer"]


def _folded_error(conv, kernel, reference_kernel, inputs, gain) -> float:
    """Mean squared error of the layer's BatchNorm-folded output with ``kernel`` instead of the float one."""
    conv.set_weights([reference_kernel])
    want = conv(inputs).numpy() * gain
    conv.set_weights([kernel])
    got = conv(inputs).numpy() * gain
    return float(np.mean((got - want) ** 2))


def test_adaround_lowers_each_layers_output_error_on_the_calibration_images(rounded):
    """Measured by running each layer (not through AdaRound's second-moment shortcut), on the inputs
    the int8 model gives it: the earlier layers already rounded."""
    from featx_edge.export.bias_correction import _conv_bn_pairs, _int8_rounded

    model, copy, _, calibration, keras = rounded
    x = calibration.astype(np.float32)
    better = 0
    for conv, bn in _conv_bn_pairs(copy):
        gamma, _, _, variance = bn.get_weights()
        gain = gamma / np.sqrt(variance + bn.epsilon)
        inputs = keras.Model(copy.input, conv.input)(x).numpy()
        (learned,) = conv.get_weights()
        (original,) = model.get_layer(conv.name).get_weights()
        nearest = _int8_rounded(original, gain=gain, depthwise=isinstance(conv, keras.layers.DepthwiseConv2D))
        ada = _folded_error(conv, learned, original, inputs, gain)
        near = _folded_error(conv, nearest, original, inputs, gain)
        conv.set_weights([learned])
        assert ada <= near * (1 + 1e-5), (conv.name, ada, near)
        better += ada < near * 0.95
    assert better >= 2  # lower by 5% or more on at least two of the three layers


def test_bias_correction_after_adaround_measures_the_shift_against_the_float_kernels(rounded):
    from featx_edge.export.bias_correction import bias_corrected

    model, copy, _, calibration, _ = rounded
    _, against_itself = bias_corrected(copy, calibration=calibration)
    _, against_float = bias_corrected(copy, calibration=calibration, float_model=model)
    assert against_itself["max_shift"] < 1e-4  # its kernels are on the grid: rounding them changes nothing
    assert against_float["max_shift"] > 1e-3


def test_an_unknown_weight_rounding_is_one_line(tmp_path, capsys):
    from conftest import one_line_error

    from featx_edge.cli import main

    (tmp_path / "c.toml").write_text('[export]\nweight_rounding = "stochastic"\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "run")]) == 2
    one_line_error(capsys, "weight_rounding", "nearest, adaround", "stochastic")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # trains and converts a (tiny) model
def test_weight_rounding_is_recorded_in_the_manifest_and_the_file(tmp_path):
    from test_int8_ranges import _train

    from featx_edge.rundir.manifest import read_manifest
    from featx_edge.runtime.metadata import read_tflite

    run, main = _train(tmp_path, config='[export]\nweight_rounding = "adaround"\nbias_correction = true\n')
    assert main(["export", str(run), "--formats", "tflite-int8", "--quiet"]) == 0
    assert read_manifest(run)["config"]["export"]["weight_rounding"] == "adaround"
    _, meta = read_tflite(run / "export" / "model.tflite-int8.tflite")
    rounding = meta["quantization"]["weight_rounding"]
    assert rounding["setting"] == "adaround" and rounding["method"] == "adaround"
    assert rounding["layers"] > 0 and rounding["weights_changed"] > 0 and "per_layer" not in rounding
    assert meta["quantization"]["bias_correction"]["layers"] == rounding["layers"]
    assert main(["export", str(run), "--formats", "tflite-int8", "--quiet"]) == 0  # no choice: the default
    _, again = read_tflite(run / "export" / "model.tflite-int8.tflite")
    assert again["flatbuffer"]["sha256"] == meta["flatbuffer"]["sha256"]  # deterministic: the same integers
