"""TFLite conversion: float32, float16, dynamic-range, full-integer int8 and int16x8."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featx_edge.errors import ExportError
from featx_edge.progress import native_output


@dataclass(frozen=True)
class TFLiteQuantization:
    """How the TFLite converter quantizes; build with the named constructors."""

    optimize: bool = False
    float16: bool = False
    full_integer: bool = False
    int16_activations: bool = False

    @classmethod
    def for_float32(cls) -> TFLiteQuantization:
        return cls()

    @classmethod
    def for_float16(cls) -> TFLiteQuantization:
        return cls(optimize=True, float16=True)

    @classmethod
    def for_dynamic(cls) -> TFLiteQuantization:
        return cls(optimize=True)

    @classmethod
    def for_int8(cls) -> TFLiteQuantization:
        return cls(optimize=True, full_integer=True)

    @classmethod
    def for_int16x8(cls) -> TFLiteQuantization:
        """int16 activations with int8 weights (TFLite's 16x8 mode; TFLite Micro and Ethos-U run it):
        256 times finer activation steps where int8 cannot reach the gate. Float input and output."""
        return cls(optimize=True, int16_activations=True)

    @classmethod
    def named(cls, name: str) -> TFLiteQuantization:
        """The recipe a FormatSpec names (``FormatSpec.quantization``): float32, float16, dynamic, int8, int16x8."""
        return {"float32": cls.for_float32, "float16": cls.for_float16, "dynamic": cls.for_dynamic,
                "int8": cls.for_int8, "int16x8": cls.for_int16x8}[name]()

    @property
    def calibrated(self) -> bool:
        """Activation ranges come from calibration images (full-integer int8 and int16x8)."""
        return self.full_integer or self.int16_activations


@dataclass(frozen=True)
class Traced:
    """A Keras model traced once (a concrete function of images 0..255 float32 NHWC) for every TFLite
    conversion of it: float32, float16, dynamic, int8 and the debugger all start from the same trace.

    ``holder`` is a plain ``tf.Module`` that tracks the model's variables: the converter saves it as
    a SavedModel before converting, and a bare module saves in a fraction of the time the Keras model
    takes (no per-layer Keras functions to trace), with the same converted bytes.
    """

    concrete: object
    holder: object
    size: int
    batch: int | None


def trace(model, *, size: int, batch: int | None = None) -> Traced:
    """Trace ``model`` (training=False) for ``batch`` images of ``size`` px (None: a dynamic batch)."""
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    fn = tf.function(lambda image: model(image, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([batch, size, size, 3], tf.float32, name="image"))
    holder = tf.Module()
    holder.variables_of_model = list(model.variables)  # tracked, so the SavedModel can hold the weights
    return Traced(concrete=concrete, holder=holder, size=size, batch=batch)


def converter(model, *, size: int, quantization: TFLiteQuantization, calibration: np.ndarray | None = None,
              batch: int | None = None):
    """A TFLiteConverter for a Keras model taking images 0..255 float32 NHWC (``batch`` None: dynamic).

    ``model`` may be a ``Traced`` of the same size and batch (traced once, converted many times).
    With a calibration set the converter gets it as its representative dataset (one image per
    step); ``quantization.full_integer`` also restricts the ops to int8 builtins with uint8
    input and output (pixels 0..255 map exactly onto the input scale).
    """
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    traced = model if isinstance(model, Traced) else trace(model, size=size, batch=batch)
    if (traced.size, traced.batch) != (size, batch):
        raise ValueError(f"traced for {traced.size} px, batch {traced.batch}; asked for {size} px, batch {batch}")
    conv = tf.lite.TFLiteConverter.from_concrete_functions([traced.concrete], traced.holder)
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
    if quantization.int16_activations:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return conv


def representative(calibration: np.ndarray):
    """The calibration images as TFLite's representative dataset (a generator function)."""
    def images():
        for image in calibration:
            yield [image[None].astype(np.float32)]

    return images


def convert(model, *, size: int, quantization: TFLiteQuantization,
            calibration: np.ndarray | None = None) -> bytes:
    """Convert a Keras model (image 0..255 float32 NHWC), or its dynamic-batch ``Traced``, to a TFLite
    flatbuffer with a dynamic batch.

    For full-integer int8 the result is checked: a model that kept float tensors raises
    ExportError instead of being written.
    """
    if quantization.calibrated and (calibration is None or len(calibration) == 0):
        raise ExportError("tflite-int8 needs calibration images from the training split; none were given.")
    conv = converter(model, size=size, quantization=quantization,
                     calibration=calibration if quantization.calibrated else None)
    try:
        with native_output("the TFLite converter"):
            flatbuffer = conv.convert()
    except Exception as err:  # the converter raises ConverterError / RuntimeError with its log
        raise ExportError(f"TFLite conversion failed: {type(err).__name__}: {err}") from err
    if quantization.full_integer:
        check_integer_only(flatbuffer)
    return flatbuffer


def integer_report(flatbuffer: bytes) -> dict:
    """Input/output dtypes, float32 tensors and op types of a TFLite model (via LiteRT)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=flatbuffer)
    tensors = interp.get_tensor_details()
    return {
        "input_dtype": np.dtype(interp.get_input_details()[0]["dtype"]).name,
        "output_dtype": np.dtype(interp.get_output_details()[0]["dtype"]).name,
        "float_tensors": [t["name"] for t in tensors if t["dtype"] == np.float32],
        "op_types": op_types(flatbuffer),
    }


def op_types(flatbuffer: bytes) -> list[str]:
    """Builtin op names used by a TFLite model, read with the flatbuffer schema LiteRT ships."""
    from ai_edge_litert import schema_py_generated as schema

    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    codes = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Newer files keep the code in BuiltinCode; DeprecatedBuiltinCode holds it below 127.
        value = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        codes.add(names.get(value, f"BUILTIN_{value}") if value != schema.BuiltinOperator.CUSTOM
                  else f"CUSTOM:{(code.CustomCode() or b'').decode()}")
    return sorted(codes)


def check_integer_only(flatbuffer: bytes) -> dict:
    report = integer_report(flatbuffer)
    problems = []
    for key in ("input_dtype", "output_dtype"):
        if report[key] not in ("uint8", "int8"):
            problems.append(f"{key} is {report[key]}")
    if report["float_tensors"]:
        problems.append(f"{len(report['float_tensors'])} float32 tensors, e.g. {report['float_tensors'][:3]}")
    if problems:
        raise ExportError(
            "tflite-int8 conversion kept float parts: " + "; ".join(problems)
            + ". Some layer has no int8 kernel; use tflite-dynamic or tflite-float16 for this model."
        )
    return report


def calibrate(model, *, size: int, calibration: np.ndarray, quantization: TFLiteQuantization | None = None) -> bytes:
    """The float model with calibration statistics (activation min/max) recorded, not yet quantized.

    Calibrate once, quantize as often as needed (``quantize_calibrated``): the images run through
    the model once. ``model`` is a Keras model or its dynamic-batch ``Traced``.
    """
    quantization = quantization or TFLiteQuantization.for_int8()
    if calibration is None or len(calibration) == 0:
        raise ExportError("TFLite calibration needs calibration images from the training split; none were given.")
    conv = converter(model, size=size, quantization=quantization, calibration=calibration)
    conv._experimental_calibrate_only = True  # the converter's own calibrate-once switch (what its debugger uses)
    try:
        with native_output("the TFLite converter (calibration)"):
            return bytes(conv.convert())
    except Exception as err:  # ConverterError / RuntimeError with the converter's log
        raise ExportError(f"TFLite calibration failed: {type(err).__name__}: {err}") from err


def quantize_calibrated(calibrated: bytes, *, quantization: TFLiteQuantization | None = None) -> bytes:
    """Quantize a ``calibrate``d model (full-integer int8, uint8 input and output), checked integer-only.

    It reads the ranges recorded in ``calibrated``: a caller may change them first (another
    calibration method) and quantize again without converting or calibrating again.
    """
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    from tensorflow.lite.python.convert import mlir_quantize

    quantization = quantization or TFLiteQuantization.for_int8()
    if not quantization.full_integer:
        raise ValueError("quantize_calibrated makes full-integer int8 models only")
    try:
        with native_output("the TFLite quantizer"):
            flatbuffer = bytes(mlir_quantize(calibrated, input_data_type=tf.uint8, output_data_type=tf.uint8))
    except Exception as err:
        raise ExportError(f"TFLite quantization failed: {type(err).__name__}: {err}") from err
    check_integer_only(flatbuffer)
    return flatbuffer
