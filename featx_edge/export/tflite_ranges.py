"""Activation ranges for TFLite int8 from a better calibration than the converter's min/max.

The TFLite converter quantizes each activation over the full range it saw on the calibration
images. One rare outlier stretches that range and makes the step of every other value coarser.
Here the converter is stopped after calibration (``_experimental_calibrate_only``): the result is
the float model whose tensors carry the min/max the converter measured. Each activation's values
on the same calibration images are then histogrammed and its range is replaced by

- ``minmax``: the converter's own range, unchanged (reproduces ``TFLiteConverter.convert()``'s
  integers exactly);
- ``percentile``: clipped to the 0.01th and 99.99th percentiles (only ever narrowed);
- ``mse``: the clipping range that minimises the expected squared error of 8-bit quantization,
  rounding noise inside the range plus clipping error outside it (searched on the histogram);

and TFLite's own quantizer (``mlir_quantize``, the step ``convert()`` runs after calibration)
makes the int8 model from the rewritten statistics. The model's input (pixels 0..255 map exactly
onto the uint8 input), the in-graph preprocessing that reads it (an affine map that gives each
pixel level its own int8 level) and the output (softmax, a fixed range) keep the converter's ranges.
The default is ``minmax`` (the converter's own); ``auto`` chooses per run (``export.int8_choice``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from featx_edge.export.tflite import calibrate, quantize_calibrated
from featx_edge.formats.registry import TFLITE_RANGE_METHODS

RANGE_METHODS = tuple(m for m in TFLITE_RANGE_METHODS if m != "auto")  # minmax, percentile, mse
PERCENTILE = 99.99
"""``percentile`` keeps the values between the (100 - PERCENTILE)th and PERCENTILEth percentiles."""
BINS = 2048
BATCH = 16
_LEVELS = 255  # int8 activations: 256 levels, 255 steps


def _fixed(graph) -> set[int]:
    """Tensors whose range stays: the model's input and output, and the preprocessing that reads the input
    (an affine map that gives each pixel level its own int8 level)."""
    inputs = {int(i) for i in graph.inputs}
    fixed = inputs | {int(i) for i in graph.outputs}
    for op in graph.operators:
        if inputs & {int(i) for i in op.inputs}:
            fixed |= {int(i) for i in op.outputs}
    return fixed


def fixed_tensor_names(flatbuffer: bytes) -> list[str]:
    """Names of the tensors of a calibrated model whose ranges are never changed (see ``_fixed``)."""
    from tensorflow.lite.tools import flatbuffer_utils

    graph = flatbuffer_utils.convert_bytearray_to_object(flatbuffer).subgraphs[0]
    return sorted(graph.tensors[i].name.decode() for i in _fixed(graph))


def _activations(model_object) -> dict[int, tuple[float, float]]:
    """Tensor index -> the converter's (min, max), for every activation whose range may change."""
    graph = model_object.subgraphs[0]
    fixed = _fixed(graph)
    out = {}
    for index, tensor in enumerate(graph.tensors):
        quant = tensor.quantization
        has_data = model_object.buffers[tensor.buffer].data is not None
        if index in fixed or has_data or quant is None or quant.min is None or len(quant.min) != 1:
            continue
        out[index] = (float(quant.min[0]), float(quant.max[0]))
    return out


def histograms(flatbuffer: bytes, *, calibration: np.ndarray) -> dict[int, tuple[float, float, np.ndarray]]:
    """Tensor index -> (min, max, counts over BINS equal bins of [min, max]) on the calibration images.

    The calibrated model runs in float under LiteRT's built-in kernels with every intermediate
    tensor kept; values outside the converter's range (there should be none) count in the edge bins.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tensorflow.lite.tools import flatbuffer_utils

    ranges = _activations(flatbuffer_utils.convert_bytearray_to_object(flatbuffer))
    counts = {index: np.zeros(BINS, dtype=np.int64) for index in ranges}
    interp = Interpreter(model_content=flatbuffer, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    image = interp.get_input_details()[0]["index"]
    for start in range(0, len(calibration), BATCH):
        batch = calibration[start:start + BATCH].astype(np.float32)
        interp.resize_tensor_input(image, batch.shape)
        interp.allocate_tensors()
        interp.set_tensor(image, batch)
        interp.invoke()
        for index, (low, high) in ranges.items():
            values = interp.get_tensor(index).ravel()
            width = (high - low) or 1.0
            bins = np.clip(((values - low) / width * BINS).astype(np.int64), 0, BINS - 1)
            counts[index] += np.bincount(bins, minlength=BINS)
    return {index: (low, high, counts[index]) for index, (low, high) in ranges.items()}


def percentile_range(low: float, high: float, counts: np.ndarray, *, percentile: float = PERCENTILE) -> tuple:
    """The (100 - p)th and pth percentiles of a histogram, never wider than [low, high], always holding 0."""
    edges = np.linspace(low, high, len(counts) + 1)
    cumulative = np.cumsum(counts) / max(counts.sum(), 1)
    tail = 1.0 - percentile / 100.0
    new_low = edges[np.searchsorted(cumulative, tail, side="right")]
    new_high = edges[min(np.searchsorted(cumulative, 1.0 - tail, side="left") + 1, len(counts))]
    return min(max(new_low, low), 0.0), max(min(new_high, high), 0.0)


def mse_range(low: float, high: float, counts: np.ndarray, *, grid: int = 48) -> tuple:
    """The range [a*low, b*high] (a, b in (0, 1]) with the least expected squared 8-bit error.

    Inside the range a value is off by the rounding noise step^2/12; outside it by its distance
    to the nearer end. Evaluated on the bin centres, for every pair on a grid of a and b.
    """
    centres = low + (np.arange(len(counts)) + 0.5) * (high - low) / len(counts)
    factors = np.linspace(1.0 / grid, 1.0, grid)
    lows = (factors * low)[:, None, None] if low < 0 else np.zeros((1, 1, 1))
    highs = (factors * high)[None, :, None] if high > 0 else np.zeros((1, 1, 1))
    step = np.maximum(highs - lows, 1e-12) / _LEVELS
    below = np.clip(lows - centres, 0.0, None)
    above = np.clip(centres - highs, 0.0, None)
    error = np.where((below > 0) | (above > 0), below**2 + above**2, step**2 / 12.0)
    total = (error * counts).sum(axis=-1)
    i, j = np.unravel_index(np.argmin(total), total.shape)
    return float(lows.ravel()[i]), float(highs.ravel()[j])


def clipped(stats: dict[int, tuple[float, float, np.ndarray]], *, method: str) -> dict[int, tuple[float, float]]:
    """Tensor index -> the (min, max) ``method`` gives it."""
    pick = {"minmax": lambda low, high, counts: (low, high), "percentile": percentile_range, "mse": mse_range}[method]
    return {index: tuple(float(v) for v in pick(low, high, counts)) for index, (low, high, counts) in stats.items()}


def with_ranges(flatbuffer: bytes, ranges: dict[int, tuple[float, float]]) -> bytes:
    """The calibrated model with these tensors' min/max statistics replaced."""
    from tensorflow.lite.tools import flatbuffer_utils

    model_object = flatbuffer_utils.convert_bytearray_to_object(flatbuffer)
    tensors = model_object.subgraphs[0].tensors
    for index, (low, high) in ranges.items():
        tensors[index].quantization.min = np.array([low], dtype=np.float32)
        tensors[index].quantization.max = np.array([high], dtype=np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model_object))


def convert_ranges(model, *, size: int, calibration: np.ndarray, methods: Iterable[str]) -> dict[str, bytes]:
    """``{method: tflite-int8 flatbuffer}``: one calibration, one histogram pass, one quantization per method.

    ``minmax`` keeps the converter's own ranges, so it quantizes the calibrated model as it is; the
    histogram pass (a float run keeping every tensor) is made only when a clipping method asks for it.
    """
    methods = tuple(methods)
    base = calibrate(model, size=size, calibration=calibration)
    stats = histograms(base, calibration=calibration) if set(methods) - {"minmax"} else {}
    return {method: quantize_calibrated(base if method == "minmax" else with_ranges(base, clipped(stats, method=method)))
            for method in methods}
