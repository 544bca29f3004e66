"""ONNX int8: onnxruntime static quantization (QDQ, per-channel weights) of the float32 export.

Calibrated from the same images as TFLite int8 (``export.calibration``), fed through an
onnxruntime CalibrationDataReader.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from featx_edge.errors import ConfigError, ExportError
from featx_edge.rundir import atomic_path

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def _reader(images: np.ndarray, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._iter = iter(images)

        def get_next(self):
            image = next(self._iter, None)
            return None if image is None else {input_name: image[None].astype(np.float32)}

    return _Reader()


def quantize(float_model: Path, out: Path, *, calibration: np.ndarray, method: str = "percentile",
             per_channel: bool = True) -> Path:
    """Write a QDQ int8 copy of ``float_model`` to ``out`` (metadata_props carried over).

    Args:
        method: ``minmax``, ``percentile`` or ``entropy`` (onnxruntime CalibrationMethod).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"`--onnx-calibration` must be one of {', '.join(CALIBRATION_METHODS)}; received `{method}`.")
    if calibration is None or len(calibration) == 0:
        raise ExportError("onnx-int8 needs calibration images from the training split; none were given.")
    source = onnx.load(str(float_model))
    props = {p.key: p.value for p in source.metadata_props}
    input_name = source.graph.input[0].name
    work = Path(tempfile.mkdtemp(prefix="featx-onnx-int8-"))
    try:
        prepared = work / "prepared.onnx"
        quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        quantized = work / "int8.onnx"
        quantize_static(
            str(prepared), str(quantized), _reader(calibration, input_name),
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        model = onnx.load(str(quantized))
    except Exception as err:  # onnxruntime's quantizer raises assorted errors
        raise ExportError(f"onnx-int8 quantization ({method}) failed: {type(err).__name__}: {err}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    onnx.helper.set_model_props(model, props)
    with atomic_path(out) as tmp:
        onnx.save_model(model, str(tmp))
    return out
