"""Export a trained run to TFLite and ONNX formats.

``export_run`` (``exporter.py``) dispatches each format to the converter its ``FormatSpec``
names: ``tflite.py`` (TFLiteConverter: float32, float16, dynamic-range, full-integer int8),
``tflite_int8.py`` (per-layer diagnosis, selective int8), ``qat.py`` (quantization-aware
training), ``onnx.py`` (tf2onnx), ``onnx_int8.py`` (onnxruntime static QDQ). ``calibration.py``
is the one calibration source, ``adaround.py`` (learned weight rounding) and ``bias_correction.py``
prepare the int8 source model,
``golden.py`` writes the self-test files and ``budget.py`` picks an int8 variant within
``--int8-budget``.

May import: training (``Run`` and its reference), data, config, fidelity, rundir, files, formats,
runtime and the leaves. Never verify, bench, report, device or cli.
"""

from featx_edge.export.budget import budget_failure
from featx_edge.export.exporter import export_run

__all__ = ["budget_failure", "export_run"]
