"""Inference engines: the LiteRT interpreter for .tflite, onnxruntime for .onnx.

Each backend takes a uint8 NHWC batch of pixels (0..255, already resized) and returns float32
class probabilities; quantized inputs and outputs are handled here.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from featx_edge.errors import ModelFileError
from featx_edge.progress import native_output


def _quantize(x: np.ndarray, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    info = np.iinfo(dtype)
    if scale == 0:  # not quantized: raw pixels in an integer tensor
        return np.clip(x, info.min, info.max).astype(dtype)
    q = np.round(x.astype(np.float32) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


MAX_TENSOR_BYTES = 1 << 30
"""Default limit on the tensors a model may ask for at batch 1 (weights and activations together).
An edge classifier needs tens of MB; a file with patched tensor shapes can ask for many GB."""

_ITEMSIZE = {"FLOAT32": 4, "FLOAT16": 2, "BFLOAT16": 2, "FLOAT64": 8, "INT32": 4, "UINT32": 4, "INT64": 8,
             "UINT64": 8, "INT16": 2, "UINT16": 2, "INT8": 1, "UINT8": 1, "BOOL": 1, "INT4": 1, "UINT4": 1,
             "INT2": 1, "COMPLEX64": 8, "COMPLEX128": 16}


def tflite_tensor_bytes(flatbuffer: bytes, *, path: Path | None = None) -> int:
    """Bytes of every tensor a TFLite model declares, at batch 1, read from the flatbuffer itself.

    Done before the interpreter sees the file, so absurd shapes are refused instead of allocated.
    """
    try:
        from ai_edge_litert import schema_py_generated as schema

        names = {value: name for name, value in vars(schema.TensorType).items() if not name.startswith("_")}
        model = schema.Model.GetRootAs(flatbuffer, 0)
        total = 0
        for g in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(g)
            for t in range(subgraph.TensorsLength()):
                tensor = subgraph.Tensors(t)
                elements = 1
                for d in range(tensor.ShapeLength()):
                    dim = tensor.Shape(d)
                    if dim < -1 or dim > 1 << 24:
                        raise ModelFileError(f"{path}: tensor {t} has an impossible dimension {dim}; "
                                             "the file is damaged")
                    elements *= max(dim, 1)
                total += elements * _ITEMSIZE.get(names.get(tensor.Type(), ""), 8)
        return total
    except ModelFileError:
        raise
    except Exception as err:  # the flatbuffer reader raises struct/index errors on damaged files
        raise ModelFileError(f"{path}: the TFLite model structure is unreadable ({type(err).__name__}: {err}); "
                             "the file is damaged") from err


def _dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if scale == 0:
        return q.astype(np.float32)
    return (q.astype(np.float32) - zero_point) * scale


LITERT_KERNELS = ("xnnpack", "builtin", "reference")
"""LiteRT kernel sets: the XNNPACK delegate (the default), the optimised built-in kernels without
a delegate, and the reference kernels (what TensorFlow Lite Micro computes on a microcontroller)."""


_PROBE = """
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
it = Interpreter(model_content=sys.stdin.buffer.read(), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
it.allocate_tensors()
d = it.get_input_details()[0]
it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
it.invoke()
"""
_probed: dict[str, str | None] = {}


def probe_reference_kernels(flatbuffer: bytes, *, path: Path | None = None) -> None:
    """ModelFileError if LiteRT's reference kernels cannot prepare and run the model once.

    Some reference kernels stop the whole process on parameters they do not support (the
    int8 softmax aborts in ``PreprocessSoftmaxScaling`` when its input range is too wide), so
    the first run of a file happens in a child process; the verdict is kept per file content.
    """
    key = hashlib.sha256(flatbuffer).hexdigest()
    if key not in _probed:
        try:
            proc = subprocess.run([sys.executable, "-c", _PROBE], input=flatbuffer, capture_output=True,
                                  timeout=600, check=False)
        except subprocess.TimeoutExpired:
            _probed[key] = "did not finish one image in 10 minutes"
        else:
            _probed[key] = None if proc.returncode == 0 else _why(proc)
    if _probed[key] is not None:
        raise ModelFileError(
            f"{path or 'the model'}: LiteRT's reference kernels (the arithmetic TensorFlow Lite Micro runs on a "
            f"microcontroller) cannot run this model: {_probed[key]}. A microcontroller build would likely fail "
            "the same way; if the model is for phones or Linux boards only, verify with `--kernels xnnpack`."
        )


def _why(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else ""
        return f"the interpreter was killed by signal {-proc.returncode} {name} while preparing or running it".strip()
    lines = [line for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"the interpreter failed (exit status {proc.returncode})"


class LiteRTBackend:
    """The LiteRT (TFLite) interpreter; XNNPACK on by default (``kernels``: one of LITERT_KERNELS)."""

    engine = "litert"

    def __init__(self, flatbuffer: bytes, *, threads: int | None = None, kernels: str = "xnnpack",
                 path: Path | None = None, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ModelFileError(
                "running .tflite models needs the LiteRT interpreter: `pip install ai-edge-litert`"
            ) from err
        asked = tflite_tensor_bytes(flatbuffer, path=path)
        if asked > max_tensor_bytes:
            raise ModelFileError(
                f"{path}: the model declares {asked / 2**20:.0f} MiB of tensors at batch 1 (limit "
                f"{max_tensor_bytes / 2**20:.0f} MiB); the file is damaged or not an edge classifier. "
                "Re-export it, or raise the limit with `load(..., max_tensor_bytes=N)` if it is genuine."
            )
        self.path = path
        resolvers = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                     "reference": OpResolverType.BUILTIN_REF}
        if kernels not in resolvers:
            raise ModelFileError(f"unknown LiteRT kernel set `{kernels}`; allowed: {', '.join(LITERT_KERNELS)}")
        resolver = resolvers[kernels]
        if kernels == "reference":
            probe_reference_kernels(flatbuffer, path=path)
        try:
            with native_output("loading the model in LiteRT"):  # "INFO: Created ... XNNPACK delegate"
                self.interpreter = Interpreter(model_content=flatbuffer, num_threads=threads,
                                               experimental_op_resolver_type=resolver)
        except Exception as err:  # LiteRT raises ValueError/RuntimeError with its log
            raise ModelFileError(f"{path}: LiteRT cannot load this model: {err}") from err
        self.kernels = kernels
        self.xnnpack = kernels == "xnnpack"
        self.threads = threads
        try:
            self._input = self.interpreter.get_input_details()[0]
            self._output = self.interpreter.get_output_details()[0]
        except UnicodeDecodeError as err:  # LiteRT decodes tensor names as UTF-8 here
            raise ModelFileError(f"{path}: a tensor name in the model is not valid UTF-8 ({err.reason} at byte "
                                 f"{err.start}); the file is damaged; re-export it") from err
        signature = self._input.get("shape_signature", self._input["shape"])
        self.dynamic_batch = int(signature[0]) == -1
        self._batch = None
        self.provider = kernels

    @property
    def input_dtype(self) -> str:
        return np.dtype(self._input["dtype"]).name

    def _ensure_batch(self, n: int) -> None:
        if self._batch == n:
            return
        shape = list(self._input["shape"])
        shape[0] = n
        self.interpreter.resize_tensor_input(self._input["index"], shape)
        with native_output("allocating the LiteRT model"):  # applying the XNNPACK delegate logs INFO
            self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = n

    @property
    def output_classes(self) -> int:
        return int(self._output["shape"][-1])

    @property
    def input_shape(self) -> tuple:
        return tuple(int(d) for d in self._input.get("shape_signature", self._input["shape"]))

    @property
    def output_resolution(self) -> float | None:
        """The dequantization scale of an integer output (its smallest nonzero probability), else None."""
        if np.dtype(self._output["dtype"]) == np.float32:
            return None
        scale = float(self._output["quantization"][0])
        return scale or None

    def run(self, pixels: np.ndarray) -> np.ndarray:
        try:
            return self._run(pixels)
        except (RuntimeError, ValueError) as err:
            raise ModelFileError(f"{self.path}: LiteRT failed to run this model: {err}") from err

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        if not self.dynamic_batch and len(pixels) != 1:
            return np.concatenate([self._run(pixels[i : i + 1]) for i in range(len(pixels))])
        self._ensure_batch(len(pixels))
        dtype = np.dtype(self._input["dtype"])
        if dtype == np.float32:
            x = pixels.astype(np.float32)
        else:
            scale, zero_point = self._input["quantization"]
            x = _quantize(pixels, dtype, scale, zero_point)
        self.interpreter.set_tensor(self._input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self._output["index"])
        if np.dtype(self._output["dtype"]) != np.float32:
            scale, zero_point = self._output["quantization"]
            y = _dequantize(y, scale, zero_point)
        return np.asarray(y, dtype=np.float32)


class OnnxRuntimeBackend:
    """onnxruntime with a chosen execution provider (CPU by default)."""

    engine = "onnxruntime"

    def __init__(self, path: Path, *, threads: int | None = None, provider: str = "CPUExecutionProvider") -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if provider not in available:
            raise ModelFileError(
                f"onnxruntime execution provider `{provider}` is not available here; available: "
                f"{', '.join(available)}."
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
        except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf classes
            raise ModelFileError(f"{path}: onnxruntime cannot load this model: {err}") from err
        self.provider = provider
        self.threads = threads
        self.path = path
        self._input = self.session.get_inputs()[0]
        self.dynamic_batch = not isinstance(self._input.shape[0], int)
        self.input_dtype = {"tensor(float)": "float32", "tensor(uint8)": "uint8",
                            "tensor(int8)": "int8"}.get(self._input.type, self._input.type)

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def output_classes(self) -> int | None:
        dim = self.session.get_outputs()[0].shape[-1]
        return dim if isinstance(dim, int) else None

    @property
    def input_shape(self) -> tuple:
        return tuple(d if isinstance(d, int) else -1 for d in self._input.shape)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(np.float32) if self.input_dtype == "float32" else pixels.astype(self.input_dtype)
        try:
            (y,) = self.session.run(None, {self._input.name: x})[:1]
        except Exception as err:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException classes
            raise ModelFileError(f"{self.path}: onnxruntime failed to run this model: {err}") from err
        return np.asarray(y, dtype=np.float32)
