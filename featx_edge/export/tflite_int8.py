"""Selective int8: per-layer diagnosis of int8 error, and int8 with the worst layers kept in float.

- ``diagnose``: TFLite's QuantizationDebugger runs the calibration images through a
  debug-quantized model and reports, per quantized tensor, the error against float
  (RMSE, and RMSE divided by the tensor's quantization scale: about 0.29 is ideal rounding
  noise; much larger means the layer loses more than its step size).
- ``convert_selective``: keeps the worst K layers in float and quantizes the rest
  (``tflite-int8-selective``; a mixed model, float input and output).
"""

from __future__ import annotations

import csv
import io

import numpy as np

from featx_edge.errors import ExportError
from featx_edge.export.tflite import TFLiteQuantization, converter, representative
from featx_edge.progress import native_output


def _debugger(model, *, size: int, calibration: np.ndarray):
    """A QuantizationDebugger: the model converted and calibrated once (``model``: Keras or ``Traced``).

    Its quantization options can change afterwards (``debugger.options = ...``) without converting
    or calibrating again: TFLite re-quantizes the calibrated model it holds.
    """
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    # The debugger wants a fixed batch of 1 and int8 with float input and output.
    conv = converter(model, size=size, quantization=TFLiteQuantization.for_dynamic(), calibration=calibration,
                     batch=1)
    try:
        with native_output("the TFLite quantization debugger"):
            return tf.lite.experimental.QuantizationDebugger(
                converter=conv, debug_dataset=representative(calibration),
                debug_options=tf.lite.experimental.QuantizationDebugOptions())
    except Exception as err:
        raise ExportError(f"TFLite quantization debugger failed: {type(err).__name__}: {err}") from err


def _layer_rows(debugger) -> list[dict]:
    """Per-layer int8 error from a debugger that has run, worst first."""
    with native_output("the TFLite quantization debugger"):
        debugger.run()
    buf = io.StringIO()
    debugger.layer_statistics_dump(buf)
    rows = []
    for row in csv.DictReader(io.StringIO(buf.getvalue())):
        scale = float(row["scale"]) if row.get("scale") else 0.0
        mse = float(row["mean_squared_error"])
        rows.append({
            "tensor": row["tensor_name"], "op": row["op_name"],
            "rmse": mse ** 0.5, "scale": scale,
            "rmse_over_scale": (mse ** 0.5) / scale if scale else None,
            "max_abs_error": float(row["max_abs_error"]),
        })
    rows.sort(key=lambda r: -(r["rmse_over_scale"] or 0.0))
    return rows


def _without(debugger, keep_float: list[str]) -> bytes:
    """The debugger's calibrated model quantized with ``keep_float``'s ops left in float."""
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    try:
        with native_output("the TFLite converter"):
            debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep_float or None)
            return debugger.get_nondebug_quantized_model()
    except Exception as err:
        raise ExportError(f"selective int8 conversion failed: {type(err).__name__}: {err}") from err


def diagnose(model, *, size: int, calibration: np.ndarray) -> list[dict]:
    """Per-layer int8 error of ``model`` on the calibration images, worst first."""
    return _layer_rows(_debugger(model, size=size, calibration=calibration))


def convert_selective(model, *, size: int, calibration: np.ndarray, keep_float: list[str]) -> bytes:
    """An int8 model with the named tensors' ops kept in float (QuantizationDebugger denylist)."""
    return _without(_debugger(model, size=size, calibration=calibration), keep_float)


def selective(model, *, size: int, calibration: np.ndarray, float_layers: int) -> tuple[list[dict], list[str], bytes]:
    """Diagnose, then keep the worst ``float_layers`` in float: one conversion and one calibration for both.

    Returns (per-layer rows worst first, the tensors kept in float, the selective int8 flatbuffer):
    the same as ``diagnose`` then ``convert_selective``, which converted and calibrated twice.
    """
    debugger = _debugger(model, size=size, calibration=calibration)
    layers = _layer_rows(debugger)
    keep = [row["tensor"] for row in layers[:float_layers]]
    return layers, keep, _without(debugger, keep)
