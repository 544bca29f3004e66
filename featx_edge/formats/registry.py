"""The export format registry: everything featx-edge knows about a format, in one place.

A leaf module (imports only ``errors``): the CLI, the config, export, verify, bench and the
device runtime all read formats from here. Each ``FormatSpec`` says where the artifact goes
(extension, engine), what it claims (int8 arithmetic, integer-only input and output), how
verify judges it (default ``Thresholds``), how far a device's outputs may stray from the
export machine's (self-test and device tolerance), what its MACs compute in and which float
sibling bench weighs it against, and where ``--int8-budget`` tries it. Code elsewhere asks
these; it never tests a format's name or a file's suffix by its spelling (``engine_for_file``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import PurePath

from featx_edge.errors import ConfigError


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits for one format (None: not checked).

    Attributes:
        min_agreement: top-1 agreement with the reference, as a fraction of images.
        max_accuracy_drop: test accuracy lost versus the reference, in percentage points.
        max_abs_diff: largest |probability difference| over all images and classes.
        min_sqnr_db: signal-to-quantization-noise ratio of the probabilities, in dB.
    """

    min_agreement: float | None = None
    max_accuracy_drop: float | None = None
    max_abs_diff: float | None = None
    min_sqnr_db: float | None = None


@dataclass(frozen=True)
class FormatSpec:
    """One export format.

    Attributes:
        name: the name used everywhere (CLI, JSON keys, file names).
        extension: the artifact's file ending.
        engine: the device runtime that runs it: ``litert`` or ``onnxruntime``.
        int8: computes in int8; verify checks that it really does.
        integer_only: full-integer: uint8 input and output and no float tensor (TFLite).
        standard: part of ``--formats all``; otherwise an int8 variant made on request or by
            ``--int8-budget``.
        thresholds: verify's default limits.
        selftest_tolerance: largest |probability difference| a device may show against the
            export machine (integer kernels differ between CPUs by a few steps of 1/256).
        converter: how export makes it: ``tflite`` (TFLiteConverter with ``quantization``),
            ``tflite-selective``, ``tflite-qat``, ``onnx`` (tf2onnx), ``onnx-int8`` (onnxruntime).
        quantization: the TFLite converter recipe (``float32``, ``float16``, ``dynamic``,
            ``int8``; see ``export.tflite.TFLiteQuantization.named``), None for the others.
        kernel_sets: the kernel sets a device may run this file with, each checked by verify
            (``KERNEL_SETS``). Integer arithmetic differs between them (XNNPACK's fused int8
            kernels round differently from the reference kernels that TFLite Micro computes
            bit for bit), so a quantized TFLite file is verified under both.
        quantized_tie_margin: for formats without a ``max_abs_diff`` tolerance, the reference
            margin below which a top-1 change is a near-tie (see ``tie_margin``).
        float_sibling: the float32 format of the same engine a quantized format is weighed against
            (bench flags an int8 export slower than its sibling on the same runtime and settings).
        mac_arithmetic: what its convolutions and matrix products multiply-accumulate in:
            ``float32``, ``float16``, ``dynamic`` (int8 weights, activations quantized at run
            time), ``int8`` (int8 weights and activations) or ``int16x8`` (int8 weights, int16
            activations). ``float32`` formats are the speed baseline of bench's recommendation.
        mac_count_order: ``export.macs.count_macs`` counts the model's MACs on the first exported
            format in this order (None: never counted from it); every format has the same graph
            shapes, and the float ones carry no quantize/dequantize nodes.
        budget_order: ``--int8-budget`` tries the variants with an order, lowest first, and keeps
            the first within budget (None: not a budget candidate).
    """

    name: str
    extension: str
    engine: str
    int8: bool
    integer_only: bool
    standard: bool
    thresholds: Thresholds
    selftest_tolerance: float
    converter: str
    quantization: str | None = None
    kernel_sets: tuple[str, ...] = ("default",)
    quantized_tie_margin: float | None = None
    float_sibling: str | None = None
    mac_arithmetic: str = "float32"
    mac_count_order: int | None = None
    budget_order: int | None = None

    @property
    def input_dtype(self) -> str:
        """What the artifact's input takes: uint8 pixels (full-integer) or float32 pixels 0..255."""
        return "uint8" if self.integer_only else "float32"

    @property
    def needs_qat(self) -> bool:
        """Made by quantization-aware training: only for a run trained with ``qat_epochs``."""
        return self.converter == "tflite-qat"

    @property
    def device_tolerance(self) -> float:
        """Largest |probability difference| between a device (or an emulated core) and the export
        machine: the self-test tolerance, which ``selftest`` and ``device-check`` both apply."""
        return self.selftest_tolerance


_FLOAT32 = Thresholds(min_agreement=1.0, max_accuracy_drop=0.0, max_abs_diff=1e-4)
_INT8 = Thresholds(min_agreement=0.97, max_accuracy_drop=1.0)
_QUANTIZED_TOLERANCE = 0.03
_TFLITE_QUANTIZED_KERNELS = ("xnnpack", "reference")
_OUTPUT_STEP = 1 / 256
"""One step of a uint8 probability: two classes closer than this cannot be ordered by an int8 output."""

KERNEL_SETS: dict[str, str] = {
    "default": "the engine's default kernels (onnxruntime's CPU provider)",
    "xnnpack": "LiteRT with its default XNNPACK delegate (phones, Linux boards)",
    "builtin": "LiteRT's optimised built-in kernels, no delegate",
    "reference": "LiteRT's reference kernels: what TensorFlow Lite Micro computes on a microcontroller",
}
"""Kernel sets a file can be verified under; ``--kernels`` picks the ones the gate applies to."""

_TFLITE_SIBLING = "tflite-float32"
_ONNX_SIBLING = "onnx-float32"

FORMAT_SPECS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("tflite-float32", ".tflite", "litert", int8=False, integer_only=False, standard=True,
                   thresholds=_FLOAT32, selftest_tolerance=1e-4, converter="tflite", quantization="float32",
                   kernel_sets=("xnnpack",), mac_count_order=1),
        FormatSpec("tflite-float16", ".tflite", "litert", int8=False, integer_only=False, standard=True,
                   thresholds=Thresholds(min_agreement=0.98, max_accuracy_drop=1.0, max_abs_diff=0.05),
                   selftest_tolerance=2e-3, converter="tflite", quantization="float16", kernel_sets=("xnnpack",),
                   mac_arithmetic="float16", mac_count_order=2),
        FormatSpec("tflite-dynamic", ".tflite", "litert", int8=False, integer_only=False, standard=True,
                   thresholds=Thresholds(min_agreement=0.97, max_accuracy_drop=1.0, min_sqnr_db=20.0),
                   selftest_tolerance=_QUANTIZED_TOLERANCE, converter="tflite", quantization="dynamic",
                   kernel_sets=_TFLITE_QUANTIZED_KERNELS, quantized_tie_margin=_OUTPUT_STEP,
                   float_sibling=_TFLITE_SIBLING, mac_arithmetic="dynamic", mac_count_order=3),
        FormatSpec("tflite-int8", ".tflite", "litert", int8=True, integer_only=True, standard=True,
                   thresholds=_INT8, selftest_tolerance=_QUANTIZED_TOLERANCE, converter="tflite", quantization="int8",
                   kernel_sets=_TFLITE_QUANTIZED_KERNELS, quantized_tie_margin=_OUTPUT_STEP,
                   float_sibling=_TFLITE_SIBLING, mac_arithmetic="int8", mac_count_order=4, budget_order=1),
        FormatSpec("onnx-float32", ".onnx", "onnxruntime", int8=False, integer_only=False, standard=True,
                   thresholds=_FLOAT32, selftest_tolerance=1e-4, converter="onnx", mac_count_order=0),
        FormatSpec("onnx-int8", ".onnx", "onnxruntime", int8=True, integer_only=False, standard=True,
                   thresholds=_INT8, selftest_tolerance=_QUANTIZED_TOLERANCE, converter="onnx-int8",
                   quantized_tie_margin=_OUTPUT_STEP, float_sibling=_ONNX_SIBLING, mac_arithmetic="int8"),
        FormatSpec("tflite-int8-selective", ".tflite", "litert", int8=True, integer_only=False, standard=False,
                   thresholds=_INT8, selftest_tolerance=_QUANTIZED_TOLERANCE, converter="tflite-selective",
                   kernel_sets=_TFLITE_QUANTIZED_KERNELS, quantized_tie_margin=_OUTPUT_STEP,
                   float_sibling=_TFLITE_SIBLING, mac_arithmetic="int8", budget_order=2),
        FormatSpec("tflite-int16x8", ".tflite", "litert", int8=True, integer_only=False, standard=False,
                   thresholds=_INT8, selftest_tolerance=_QUANTIZED_TOLERANCE, converter="tflite", quantization="int16x8",
                   kernel_sets=_TFLITE_QUANTIZED_KERNELS, quantized_tie_margin=_OUTPUT_STEP,
                   float_sibling=_TFLITE_SIBLING, mac_arithmetic="int16x8"),
        FormatSpec("tflite-int8-qat", ".tflite", "litert", int8=True, integer_only=True, standard=False,
                   thresholds=_INT8, selftest_tolerance=_QUANTIZED_TOLERANCE, converter="tflite-qat",
                   kernel_sets=_TFLITE_QUANTIZED_KERNELS, quantized_tie_margin=_OUTPUT_STEP,
                   float_sibling=_TFLITE_SIBLING, mac_arithmetic="int8", budget_order=3),
    )
}

FORMATS: tuple[str, ...] = tuple(name for name, spec in FORMAT_SPECS.items() if spec.standard)
"""The standard export formats (`--formats all`), in the order they are produced and reported."""

INT8_VARIANTS: tuple[str, ...] = tuple(name for name, spec in FORMAT_SPECS.items() if not spec.standard)
"""Extra int8 variants: made on request, or by `--int8-budget` when plain int8 misses it."""

ALL_FORMATS = FORMATS + INT8_VARIANTS

ONNX_CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy")
"""onnxruntime calibration methods for onnx-int8 (`--onnx-calibration`)."""
TFLITE_RANGE_METHODS: tuple[str, ...] = ("auto", "minmax", "percentile", "mse")
"""``[export] activation_ranges``: how tflite-int8's activation ranges are calibrated (``export.tflite_ranges``)."""
WEIGHT_ROUNDINGS: tuple[str, ...] = ("nearest", "adaround")
"""``[export] weight_rounding``: how int8 conv weights are rounded: the converters' own (nearest) or learned
per layer on the calibration images (``export.adaround``)."""


MODEL_SUFFIXES: dict[str, str] = {spec.extension: spec.engine for spec in FORMAT_SPECS.values()}
"""A model file's suffix -> the engine that runs it (``.tflite``: LiteRT, ``.onnx``: onnxruntime)."""


def engine_for_file(path) -> str | None:
    """The engine that runs a model file, by its suffix (any case); None for another file."""
    return MODEL_SUFFIXES.get(PurePath(path).suffix.lower())


def mac_count_formats() -> tuple[str, ...]:
    """The formats ``count_macs`` may count the model's MACs on, in the order it tries them."""
    counted = [spec for spec in FORMAT_SPECS.values() if spec.mac_count_order is not None]
    return tuple(spec.name for spec in sorted(counted, key=lambda spec: spec.mac_count_order))


def budget_candidates(*, qat: bool) -> tuple[str, ...]:
    """The int8 variants ``--int8-budget`` tries, in order; those made by QAT only when ``qat``."""
    tried = [spec for spec in FORMAT_SPECS.values()
             if spec.budget_order is not None and (qat or not spec.needs_qat)]
    return tuple(spec.name for spec in sorted(tried, key=lambda spec: spec.budget_order))


def int8_arithmetic(fmt: str) -> bool:
    """A known format whose MACs are int8 on both sides (weights and activations)."""
    spec = FORMAT_SPECS.get(fmt)
    return spec is not None and spec.mac_arithmetic == "int8"


def get_format(fmt: str) -> FormatSpec:
    """The spec of a known format; ConfigError naming the choices otherwise."""
    return FORMAT_SPECS[check_format(fmt)]


def artifact_filename(fmt: str) -> str:
    """File name of a format's artifact inside ``RUN/export/``, e.g. ``model.tflite-int8.tflite``."""
    return f"model.{fmt}{get_format(fmt).extension}"


def check_format(fmt: str) -> str:
    """Return ``fmt`` if it is a known format name, else raise ConfigError naming the choices."""
    if fmt not in FORMAT_SPECS:
        raise ConfigError(
            f"unknown export format `{fmt}`; allowed: {', '.join(ALL_FORMATS)}. "
            "Pass a comma-separated list, e.g. `--formats tflite-int8,onnx-float32`."
        )
    return fmt


def ordered(names) -> list[str]:
    """``names`` in registry order (the order reports use), unknown names last, sorted."""
    names = list(names)
    return [f for f in ALL_FORMATS if f in names] + sorted(f for f in names if f not in FORMAT_SPECS)


def parse_formats(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse ``"all"``, a comma-separated string or a list into a de-duplicated tuple of formats."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ConfigError(f"`--formats` is empty; allowed: all, or any of {', '.join(ALL_FORMATS)}.")
    if items == ["all"]:
        return FORMATS
    seen: list[str] = []
    for item in items:
        if check_format(item) not in seen:
            seen.append(item)
    return tuple(seen)


def thresholds_for(fmt: str, overrides: dict[str, dict[str, float]] | None = None) -> Thresholds:
    """The format's default thresholds with ``overrides[fmt]`` applied."""
    base = FORMAT_SPECS[fmt].thresholds if fmt in FORMAT_SPECS else _INT8
    changes = (overrides or {}).get(fmt, {})
    return dataclasses.replace(base, **changes) if changes else base


def tie_margin(fmt: str, limits: Thresholds) -> float:
    """The reference margin up to which a top-1 change of ``fmt`` is a near-tie, not a disagreement.

    A float format allowed to stray ``max_abs_diff`` from the reference on every probability can
    swap two classes whose reference probabilities differ by up to twice that (one rises, the
    other falls), so its near-tie band is ``2 * max_abs_diff``: an export within its tolerance on
    every image then never fails agreement on a tie. A quantized format without that tolerance
    uses its ``quantized_tie_margin`` (one step of a uint8 probability, 1/256): classes closer
    than that cannot be told apart by an 8-bit output. Near-ties are counted and listed, never
    hidden; the plain agreement is reported beside the judged one.
    """
    if limits.max_abs_diff is not None:
        return 2.0 * limits.max_abs_diff
    spec = FORMAT_SPECS.get(fmt)
    return (spec.quantized_tie_margin if spec and spec.quantized_tie_margin is not None else _OUTPUT_STEP)


def parse_kernel_sets(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse ``--kernels`` (e.g. ``xnnpack,reference``) into known kernel-set names."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [item.strip() for item in items if item.strip()]
    unknown = [item for item in items if item not in KERNEL_SETS]
    if not items or unknown:
        raise ConfigError(f"`--kernels` must be a comma-separated list of {', '.join(KERNEL_SETS)}; received "
                          f"`{value}`. E.g. `--kernels xnnpack` for a phone, `--kernels reference` for a "
                          "microcontroller.")
    return tuple(dict.fromkeys(items))


def parse_threshold(text: str) -> tuple[str, str, float]:
    """Parse ``FORMAT.METRIC=VALUE`` (e.g. ``tflite-int8.min_agreement=0.95``)."""
    fields = [f.name for f in dataclasses.fields(Thresholds)]
    try:
        key, value = text.split("=", 1)
        fmt, metric = key.rsplit(".", 1)
        number = float(value)
    except ValueError:
        raise ConfigError(
            f"`--threshold` must look like FORMAT.METRIC=VALUE, e.g. tflite-int8.min_agreement=0.95; "
            f"received `{text}`."
        ) from None
    if metric not in fields:
        raise ConfigError(f"unknown threshold `{metric}` in `{text}`; allowed: {', '.join(fields)}.")
    if not math.isfinite(number):  # every comparison with NaN is false: a NaN limit would pass everything
        raise ConfigError(f"`--threshold` needs a finite number; received `{value.strip()}` in `{text}`. "
                          "Pass e.g. tflite-int8.min_agreement=0.95.")
    check_format(fmt)
    return fmt, metric, number


def merge_overrides(*layers: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]]:
    """Threshold overrides layered left to right (later wins per format and metric)."""
    out: dict[str, dict[str, float]] = {}
    for layer in layers:
        for fmt, metrics in (layer or {}).items():
            out.setdefault(fmt, {}).update(metrics)
    return out
