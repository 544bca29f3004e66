"""The format registry: one place that knows each format; everything else reads it."""


import pytest

from featx_edge.errors import VerificationError
from featx_edge.formats.registry import (
    ALL_FORMATS,
    FORMAT_SPECS,
    FORMATS,
    INT8_VARIANTS,
    artifact_filename,
    merge_overrides,
    ordered,
    thresholds_for,
)


def test_every_format_is_described_once():
    assert set(FORMAT_SPECS) == set(ALL_FORMATS) and len(ALL_FORMATS) == len(set(ALL_FORMATS))
    assert FORMATS == ("tflite-float32", "tflite-float16", "tflite-dynamic", "tflite-int8", "onnx-float32",
                       "onnx-int8")
    assert INT8_VARIANTS == ("tflite-int8-selective", "tflite-int16x8", "tflite-int8-qat")
    for name, spec in FORMAT_SPECS.items():
        assert spec.extension == {"litert": ".tflite", "onnxruntime": ".onnx"}[spec.engine]
        assert artifact_filename(name) == f"model.{name}{spec.extension}"
        assert spec.int8 == ("int8" in name or "int16x8" in name) and (not spec.integer_only or spec.int8)
        assert thresholds_for(name) == spec.thresholds
    assert {n for n, s in FORMAT_SPECS.items() if s.integer_only} == {"tflite-int8", "tflite-int8-qat"}


def test_selftest_tolerance_comes_from_the_registry():
    from featx_edge.runtime.selftest import tolerance_for

    for name, spec in FORMAT_SPECS.items():
        assert tolerance_for(name) == spec.selftest_tolerance
    with pytest.raises(VerificationError, match="unknown format `tflite-int4`"):
        tolerance_for("tflite-int4")


def test_overrides_layer_and_order_is_the_registrys():
    merged = merge_overrides({"tflite-int8": {"min_agreement": 0.9, "max_accuracy_drop": 2.0}},
                             {"tflite-int8": {"min_agreement": 0.95}}, None)
    assert merged == {"tflite-int8": {"min_agreement": 0.95, "max_accuracy_drop": 2.0}}
    assert thresholds_for("tflite-int8", merged).min_agreement == 0.95
    assert ordered(["onnx-int8", "zzz", "tflite-float32", "tflite-int8-qat"]) == [
        "tflite-float32", "onnx-int8", "tflite-int8-qat", "zzz"]
