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


def _debugger(model, *, size: int, calibration: np.ndarray, denylisted_nodes: list[str] | None = None):
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    # The debugger wants a fixed batch of 1 and int8 with float input and output.
    conv = converter(model, size=size, quantization=TFLiteQuantization.for_dynamic(), calibration=calibration,
                     batch=1)
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denylisted_nodes or None)
    try:
        return tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=representative(calibration),
                                                         debug_options=options)
    except Exception as err:
        raise ExportError(f"TFLite quantization debugger failed: {type(err).__name__}: {err}") from err


def diagnose(model, *, size: int, calibration: np.ndarray) -> list[dict]:
    """Per-layer int8 error of ``model`` on the calibration images, worst first."""
    debugger = _debugger(model, size=size, calibration=calibration)
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


def convert_selective(model, *, size: int, calibration: np.ndarray, keep_float: list[str]) -> bytes:
    """An int8 model with the named tensors' ops kept in float (QuantizationDebugger denylist)."""
    debugger = _debugger(model, size=size, calibration=calibration, denylisted_nodes=keep_float)
    try:
        with native_output("the TFLite converter"):
            return debugger.get_nondebug_quantized_model()
    except Exception as err:
        raise ExportError(f"selective int8 conversion failed: {type(err).__name__}: {err}") from err
