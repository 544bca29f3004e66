"""ONNX int8: onnxruntime static quantization (QDQ, per-channel weights) of the float32 export.

Calibrated from the same images as TFLite int8 (``export.calibration``), fed through an
onnxruntime CalibrationDataReader.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from featx_edge.errors import ConfigError, ExportError
from featx_edge.files.atomic import atomic_path
from featx_edge.formats.registry import ONNX_CALIBRATION_METHODS
from featx_edge.progress import native_output

log = logging.getLogger(__name__)


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
             metadata: dict | None = None, per_channel: bool = True, activations: str = "int8",
             reduce_range: bool = False) -> str:
    """Write a QDQ int8 copy of ``float_model`` to ``out``; returns the calibration method used.

    Histogram methods (``percentile``, ``entropy``) fail in onnxruntime on tensors whose values
    span almost no range (dead or constant channels). Then the export falls back to ``minmax``,
    says so, and records it in the model's metadata (``quantization.calibration``).

    Args:
        method: ``minmax``, ``percentile`` or ``entropy`` (onnxruntime CalibrationMethod).
        activations: ``int8`` (S8S8) or ``uint8`` (U8S8); weights are int8 (see ``featx_edge.formats.targets``).
        reduce_range: quantize weights to 7 bits (x86-64 without VNNI).
        metadata: featx-edge metadata for the model; its ``quantization`` entry is completed
            here. None keeps the float model's metadata_props.
    """
    import onnx

    from featx_edge.export.onnx import add_metadata

    if method not in ONNX_CALIBRATION_METHODS:
        raise ConfigError(f"`--onnx-calibration` must be one of {', '.join(ONNX_CALIBRATION_METHODS)}; received `{method}`.")
    if calibration is None or len(calibration) == 0:
        raise ExportError("onnx-int8 needs calibration images from the training split; none were given.")
    source = onnx.load(str(float_model))
    props = {p.key: p.value for p in source.metadata_props}
    used = method
    try:
        model = _quantize(float_model, source.graph.input[0].name, calibration, method, per_channel, activations,
                          reduce_range)
    except ValueError as err:
        if method == "minmax" or "bins" not in str(err):
            raise ExportError(f"onnx-int8 quantization ({method}) failed: {type(err).__name__}: {err}") from err
        used = f"minmax (fallback: {method} failed: {err})"
        log.warning("onnx-int8: %s calibration failed (%s); using minmax", method, err)
        model = _quantize(float_model, source.graph.input[0].name, calibration, "minmax", per_channel, activations,
                          reduce_range)
    if metadata is not None:
        metadata = dict(metadata, quantization=dict(metadata.get("quantization", {}), calibration=used))
        add_metadata(model, metadata)
    else:
        onnx.helper.set_model_props(model, props)
    with atomic_path(out) as tmp:
        onnx.save_model(model, str(tmp))
    return used


def _quantize(float_model: Path, input_name: str, calibration: np.ndarray, method: str, per_channel: bool,
              activations: str = "int8", reduce_range: bool = False):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = Path(tempfile.mkdtemp(prefix="featx-onnx-int8-"))
    try:
        prepared = work / "prepared.onnx"
        quantized = work / "int8.onnx"
        with native_output("onnxruntime quantization"):  # its calibration prints progress lines
            quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(quantized), _reader(calibration, input_name),
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, reduce_range=reduce_range,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                  "entropy": CalibrationMethod.Entropy}[method],
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        return onnx.load(str(quantized))
    except ValueError:
        raise  # histogram failures: the caller may fall back to minmax
    except Exception as err:  # onnxruntime's quantizer raises assorted errors
        raise ExportError(f"onnx-int8 quantization ({method}) failed: {type(err).__name__}: {err}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
