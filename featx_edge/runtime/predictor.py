"""``load(path) -> Predictor``: classify images with an exported model, without TensorFlow."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx_edge.errors import ModelFileError, NonFiniteOutputError, check_int
from featx_edge.formats.registry import MODEL_SUFFIXES, engine_for_file
from featx_edge.runtime.backends import MAX_TENSOR_BYTES, LiteRTBackend, OnnxRuntimeBackend
from featx_edge.runtime.image import ImageInput, load_pixels
from featx_edge.runtime.metadata import check_onnx_header, parse_onnx_metadata, read_tflite


@dataclass(frozen=True)
class Prediction:
    """One image's result: best label and score, and the top-k (label, score) pairs."""

    label: str
    score: float
    top_k: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"label": self.label, "score": self.score,
                "top_k": [{"label": lab, "score": s} for lab, s in self.top_k]}


class Predictor:
    """An exported featx-edge model ready to classify images.

    Labels and the input contract come from the model file's own metadata.

    Example:
        >>> from featx_edge.runtime import load
        >>> predictor = load("runs/demo/export/model.tflite-int8.tflite")  # doctest: +SKIP
        >>> predictor.predict(["cat.jpg"], top_k=3)[0].label  # doctest: +SKIP
    """

    def __init__(self, backend, metadata: dict, path: Path) -> None:
        self.backend = backend
        self.metadata = metadata
        self.path = path
        self.labels: list[str] = list(metadata["labels"])
        self.height = int(metadata["input"]["height"])
        self.width = int(metadata["input"]["width"])
        self.format: str = metadata.get("format", "")

    @property
    def output_resolution(self) -> float | None:
        """The step between the probabilities the model can output (1/256 for a uint8 output), or None
        for a float output: a score below it was rounded to 0, not measured as 0."""
        return getattr(self.backend, "output_resolution", None)

    def preprocess(self, images: Iterable[ImageInput]) -> np.ndarray:
        """Decode, convert to RGB and resize as in training: uint8 (N, H, W, 3)."""
        return np.stack([load_pixels(img, height=self.height, width=self.width) for img in images])

    def predict_pixels(self, pixels: np.ndarray, *, batch_size: int = 32, allow_nonfinite: bool = False) -> np.ndarray:
        """Probabilities for already-resized uint8 pixels (N, H, W, 3): float32 (N, classes).

        Raises:
            NonFiniteOutputError: an output is NaN or Inf (a broken model), unless ``allow_nonfinite``
                (for callers that count and report such images themselves: verify, the self-test).
        """
        if pixels.ndim != 4 or pixels.shape[1:] != (self.height, self.width, 3):
            raise ModelFileError(
                f"pixels must have shape (N, {self.height}, {self.width}, 3); received {pixels.shape}. "
                "Use `predict` to resize images."
            )
        out = [self.backend.run(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
        probs = np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)
        bad = nonfinite_rows(probs)
        if bad and not allow_nonfinite:  # argmax "agrees" on NaN: a NaN must never pass as a class
            raise NonFiniteOutputError(
                f"{self.path}: the model gave NaN/Inf outputs on {bad} of {len(probs)} image(s): it is broken "
                "(for example a NaN weight) and its answers mean nothing; re-export it from a run that passes "
                "`featx-edge verify`."
            )
        return probs

    def predict_proba(self, images: Sequence[ImageInput], *, batch_size: int = 32,
                      allow_nonfinite: bool = False) -> np.ndarray:
        return self.predict_pixels(self.preprocess(images), batch_size=batch_size, allow_nonfinite=allow_nonfinite)

    def predict(self, images: Sequence[ImageInput] | ImageInput, *, top_k: int = 3,
                batch_size: int = 32) -> list[Prediction]:
        """Classify file paths, PIL images or uint8 arrays (any size, any mode)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        probs = self.predict_proba(images, batch_size=batch_size)
        return [self.decode(row, top_k=top_k) for row in probs]

    def decode(self, probs: np.ndarray, *, top_k: int = 3) -> Prediction:
        """One image's probabilities as its best ``top_k`` labels; NonFiniteOutputError for a NaN or an Inf."""
        if nonfinite_rows(np.reshape(probs, (1, -1))):
            raise NonFiniteOutputError(f"{self.path}: the model gave NaN/Inf outputs: it is broken (for example a NaN "
                                       "weight); re-export it from a run that passes `featx-edge verify`.")
        k = max(1, min(top_k, len(self.labels)))
        order = np.argsort(-probs, kind="stable")[:k]
        pairs = [(self.labels[i], float(probs[i])) for i in order]
        return Prediction(label=pairs[0][0], score=pairs[0][1], top_k=pairs)


def load(path: str | Path, *, threads: int | None = None, provider: str = "CPUExecutionProvider",
         xnnpack: bool = True, kernels: str | None = None, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> Predictor:
    """Load a .tflite or .onnx model exported by featx-edge, checking the file first.

    Args:
        path: the model file; the backend is chosen from its extension.
        threads: inference threads (None: the engine's default).
        provider: onnxruntime execution provider for .onnx files.
        xnnpack: use the XNNPACK delegate for .tflite files (False: LiteRT's built-in kernels).
        kernels: the LiteRT kernel set for .tflite files, overriding ``xnnpack``: ``xnnpack``,
            ``builtin`` or ``reference`` (TFLite Micro's arithmetic; slow, for checking).
        max_tensor_bytes: refuse a .tflite whose tensors at batch 1 need more than this (the
            shapes are read from the file before the interpreter allocates anything).

    Raises:
        ModelFileError: missing, empty, truncated, corrupt or foreign files, with the reason.
    """
    check_threads(threads)
    path = Path(path)
    engine = engine_for_file(path)
    if engine == "litert":
        flatbuffer, metadata = read_tflite(path)
        kernels = kernels or ("xnnpack" if xnnpack else "builtin")
        backend = LiteRTBackend(flatbuffer, threads=threads, kernels=kernels, path=path,
                                max_tensor_bytes=max_tensor_bytes)
    elif engine == "onnxruntime":
        check_onnx_header(path)
        backend = OnnxRuntimeBackend(path, threads=threads, provider=provider)
        metadata = parse_onnx_metadata(path, backend.metadata())
    else:
        raise ModelFileError(f"{path}: unknown model type `{path.suffix.lower() or '(none)'}`; pass a "
                             f"{' or '.join(MODEL_SUFFIXES)} file")
    _check_contract(path, backend, metadata)
    return Predictor(backend, metadata, path)


def nonfinite_rows(outputs: np.ndarray) -> int:
    """How many rows (images) of ``outputs`` hold a NaN or an Inf."""
    outputs = np.asarray(outputs)
    if not outputs.size:
        return 0
    return int(np.sum(~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)))


def check_threads(threads, *, name: str = "threads") -> None:
    """ConfigError unless ``threads`` is None (the engine's default) or an integer from 1 to 4x the
    logical CPUs. ``name``: how the error names the setting (``--threads`` on the command line).

    Why a bound: engines do not check it themselves; far more threads than CPUs only slows
    inference, and a huge count fails in them (LiteRT: a misleading XNNPACK error; onnxruntime:
    a crash).
    """
    import os  # here, not at the top: this function is the only part of the module that needs it

    cpus = os.cpu_count() or 1
    if threads is not None:
        check_int(name, threads, low=1, high=4 * cpus, why_high=f"4x the {cpus} logical CPUs here")


def _check_contract(path: Path, backend, metadata: dict) -> None:
    """The model's own input and output shapes must be what its metadata says."""
    inp = metadata["input"]
    shape = backend.input_shape
    expected = (inp["height"], inp["width"], 3)
    if len(shape) != 4 or shape[1:] != expected or shape[0] not in (-1, 1):
        raise ModelFileError(f"{path}: the model's input shape {shape} does not match its metadata "
                             f"(N, {inp['height']}, {inp['width']}, 3); the file is damaged; re-export it")
    classes = backend.output_classes
    if classes is not None and classes != len(metadata["labels"]):
        raise ModelFileError(f"{path}: the model outputs {classes} classes but its metadata lists "
                             f"{len(metadata['labels'])} labels; the file is damaged; re-export it")
