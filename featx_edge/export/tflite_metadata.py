"""Standard TFLite Model Metadata in every featx-edge ``.tflite`` (what MediaPipe and Android read).

A featx-edge ``.tflite`` is the converter's flatbuffer, with a ``TFLITE_METADATA`` entry added to
its ``metadata`` vector, followed by a zip of associated files (``featx_edge.json``,
``labels.txt``; see :mod:`featx_edge.runtime.metadata`). The entry points at a buffer holding a
``ModelMetadata`` flatbuffer (file identifier ``M001``) of tensorflow/tflite-support's
``metadata_schema.fbs`` (schema 1.5.0; only 1.0.0 fields are used, so ``min_parser_version`` is
"1.0.0"). What is written:

- model: name, description, version, author "featx-edge", min_parser_version, and
  ``featx_edge.json`` as an associated file (type DESCRIPTIONS);
- one subgraph; its input ``image``: ImageProperties (RGB, default size), NormalizationOptions
  mean [0] std [1] (the model takes raw 0..255 pixels and normalises in-graph; MediaPipe needs
  this for a float32 input and ignores it for a uint8 one, whose range is 0..255 anyway), stats
  min [0] max [255];
- its output ``probabilities``: FeatureProperties, with ``labels.txt`` as an associated file of
  type TENSOR_AXIS_LABELS (MediaPipe names the categories from it).

Why hand-written: tflite-support (which generates this) is unmaintained and pins protobuf 3.20,
which TensorFlow 2.21 cannot use; ai-edge-litert and the ``tflite`` package ship only the model
schema; mediapipe ships the generated metadata module but brings ~240 MB (OpenCV, matplotlib)
into the export install for one file. The metadata is a small tree of tables, built below with
the ``flatbuffers`` Builder: each field's slot is its position in the schema's table (a union
takes two: its type, then its value). ``tests/test_mediapipe.py`` checks the result with
MediaPipe's own reader and ImageClassifier. The model flatbuffer is edited with the object API
of the model schema that ai-edge-litert ships (no TensorFlow needed).
"""

from __future__ import annotations

import logging

from featx_edge.errors import ExportError
from featx_edge.runtime.metadata import LABELS_NAME, METADATA_NAME, STANDARD_METADATA_NAME, pack_tflite

log = logging.getLogger(__name__)

MODEL_METADATA_IDENTIFIER = b"M001"
MIN_PARSER_VERSION = "1.0.0"  # the newest schema feature used here is from 1.0.0
AUTHOR = "featx-edge"

# Enum values of metadata_schema.fbs.
ASSOCIATED_FILE_DESCRIPTIONS = 1
ASSOCIATED_FILE_TENSOR_AXIS_LABELS = 2
COLOR_SPACE_RGB = 1
CONTENT_FEATURE_PROPERTIES = 1  # union ContentProperties
CONTENT_IMAGE_PROPERTIES = 2
PROCESS_UNIT_NORMALIZATION = 1  # union ProcessUnitOptions

# Field slots: the position of the field in its table in metadata_schema.fbs.
_ASSOCIATED_FILE = {"name": 0, "description": 1, "type": 2}
_IMAGE_SIZE = {"width": 0, "height": 1}
_IMAGE_PROPERTIES = {"color_space": 0, "default_size": 1}
_CONTENT = {"content_properties_type": 0, "content_properties": 1}
_NORMALIZATION = {"mean": 0, "std": 1}
_PROCESS_UNIT = {"options_type": 0, "options": 1}
_STATS = {"max": 0, "min": 1}
_TENSOR = {"name": 0, "description": 1, "content": 3, "process_units": 4, "stats": 5, "associated_files": 6}
_SUBGRAPH = {"name": 0, "description": 1, "input_tensor_metadata": 2, "output_tensor_metadata": 3}
_MODEL = {"name": 0, "description": 1, "version": 2, "subgraph_metadata": 3, "author": 4,
          "associated_files": 6, "min_parser_version": 7}


class _Writer:
    """The flatbuffers Builder with one helper per kind of field (children are built first)."""

    def __init__(self) -> None:
        import flatbuffers

        self.builder = flatbuffers.Builder(1024)

    def table(self, slots: dict[str, int], *, offsets: dict | None = None, int8: dict | None = None,
              uint8: dict | None = None, uint32: dict | None = None) -> int:
        """A table from already built children (``offsets``) and scalars, placed by ``slots``."""
        b = self.builder
        strings = {k: (b.CreateString(v) if isinstance(v, str) else v) for k, v in (offsets or {}).items()
                   if v is not None}
        b.StartObject(max(slots.values(), default=-1) + 1)
        for key, value in strings.items():
            b.PrependUOffsetTRelativeSlot(slots[key], value, 0)
        for key, value in (int8 or {}).items():
            b.PrependInt8Slot(slots[key], value, 0)
        for key, value in (uint8 or {}).items():
            b.PrependUint8Slot(slots[key], value, 0)
        for key, value in (uint32 or {}).items():
            b.PrependUint32Slot(slots[key], value, 0)
        return b.EndObject()

    def tables(self, offsets: list[int]) -> int:
        """A vector of tables (offsets prepended last first, so they read in order)."""
        b = self.builder
        b.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            b.PrependUOffsetTRelative(offset)
        return b.EndVector()

    def floats(self, values: list[float]) -> int:
        import numpy as np

        return self.builder.CreateNumpyVector(np.asarray(values, dtype=np.float32))

    def associated_file(self, name: str, description: str, kind: int) -> int:
        return self.table(_ASSOCIATED_FILE, offsets={"name": name, "description": description}, int8={"type": kind})

    def finish(self, root: int) -> bytes:
        self.builder.Finish(root, file_identifier=MODEL_METADATA_IDENTIFIER)
        return bytes(self.builder.Output())


def model_metadata(*, name: str, description: str, version: str, labels: list[str], height: int, width: int,
                   input_name: str = "image", output_name: str = "probabilities") -> bytes:
    """The ModelMetadata flatbuffer (identifier ``M001``) of a featx-edge image classifier.

    Args:
        name, description, version: the model's, as shown by metadata readers.
        labels: the class names, in output order (only their count is used here; the names are
            in the associated ``labels.txt``).
        height, width: the input image size.

    Example:
        >>> blob = model_metadata(name="toy", description="a toy", version="1", labels=["a", "b"],
        ...                       height=32, width=32)
        >>> blob[4:8]
        b'M001'
    """
    w = _Writer()
    size = w.table(_IMAGE_SIZE, uint32={"width": width, "height": height})
    image = w.table(_IMAGE_PROPERTIES, offsets={"default_size": size}, int8={"color_space": COLOR_SPACE_RGB})
    content = w.table(_CONTENT, offsets={"content_properties": image},
                      uint8={"content_properties_type": CONTENT_IMAGE_PROPERTIES})
    mean, std = w.floats([0.0]), w.floats([1.0])
    norm = w.table(_NORMALIZATION, offsets={"mean": mean, "std": std})
    unit = w.table(_PROCESS_UNIT, offsets={"options": norm}, uint8={"options_type": PROCESS_UNIT_NORMALIZATION})
    units = w.tables([unit])
    high, low = w.floats([255.0]), w.floats([0.0])
    stats = w.table(_STATS, offsets={"max": high, "min": low})
    input_tensor = w.table(_TENSOR, offsets={
        "name": input_name, "content": content, "process_units": units, "stats": stats,
        "description": f"RGB image, {height}x{width}, pixel values 0..255 (the model normalises them itself)"})

    features = w.table({}, offsets={})  # FeatureProperties has no fields
    out_content = w.table(_CONTENT, offsets={"content_properties": features},
                          uint8={"content_properties_type": CONTENT_FEATURE_PROPERTIES})
    labels_file = w.associated_file(LABELS_NAME, "The class names, one per line, in output order.",
                                    ASSOCIATED_FILE_TENSOR_AXIS_LABELS)
    out_files = w.tables([labels_file])
    output_tensor = w.table(_TENSOR, offsets={
        "name": output_name, "content": out_content, "associated_files": out_files,
        "description": f"Probabilities of the {len(labels)} classes (softmax, summing to 1)"})

    inputs, outputs = w.tables([input_tensor]), w.tables([output_tensor])
    subgraph = w.table(_SUBGRAPH, offsets={"name": "classifier", "input_tensor_metadata": inputs,
                                           "output_tensor_metadata": outputs})
    subgraphs = w.tables([subgraph])
    json_file = w.associated_file(
        METADATA_NAME, "featx-edge's metadata (JSON): labels, input contract, export recipe and the "
        "flatbuffer's length and sha256, read by featx_edge.runtime.", ASSOCIATED_FILE_DESCRIPTIONS)
    model_files = w.tables([json_file])
    root = w.table(_MODEL, offsets={
        "name": name, "description": description, "version": version, "author": AUTHOR,
        "subgraph_metadata": subgraphs, "associated_files": model_files, "min_parser_version": MIN_PARSER_VERSION})
    return w.finish(root)


def with_model_metadata(flatbuffer: bytes, *, metadata_buffer: bytes) -> bytes:
    """``flatbuffer`` with ``metadata_buffer`` as its ``TFLITE_METADATA`` entry (an old one is replaced).

    The other metadata entries the converter wrote (``min_runtime_version``, ``CONVERSION_METADATA``)
    are kept.

    Raises:
        ExportError: the flatbuffer is not a TFLite model the schema can read.
    """
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    try:
        model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    except Exception as err:  # the flatbuffer reader raises struct/index errors on a damaged model
        raise ExportError(f"the converted TFLite model is unreadable ({type(err).__name__}: {err}); "
                          "cannot add its metadata. Re-run the export; report it if it persists.") from err
    data = np.frombuffer(metadata_buffer, dtype=np.uint8)
    model.metadata = list(model.metadata or [])
    model.buffers = list(model.buffers or [])
    entry = next((m for m in model.metadata if m.name in (STANDARD_METADATA_NAME, STANDARD_METADATA_NAME.encode())),
                 None)
    if entry is None:
        buffer = schema.BufferT()
        model.buffers.append(buffer)
        model.metadata.append(schema.MetadataT(name=STANDARD_METADATA_NAME, buffer=len(model.buffers) - 1))
    else:
        buffer = model.buffers[entry.buffer]
    buffer.data, buffer.offset, buffer.size = data, 0, 0
    builder = flatbuffers.Builder(len(flatbuffer) + len(metadata_buffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def pack(flatbuffer: bytes, *, metadata: dict) -> bytes:
    """A featx-edge ``.tflite``: the model with standard metadata, then the associated files zip.

    Args:
        flatbuffer: the converter's output.
        metadata: featx-edge's metadata (``featx_edge.json``: labels, input, format, ...).

    The zip records the length and sha256 of the flatbuffer *with* its metadata buffer.
    """
    labels, inp = metadata["labels"], metadata["input"]
    backbone = (metadata.get("backbone") or {}).get("name", "unknown")
    fmt = metadata.get("format", "tflite")
    version = str(metadata.get("featx_edge_version", "unknown"))
    shown = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
    blob = model_metadata(
        name=f"featx-edge image classifier ({backbone}, {fmt})",
        description=(f"Classifies an RGB image into {len(labels)} classes ({shown}). Transfer-learned on a "
                     f"{backbone} backbone and exported as {fmt} by featx-edge {version}."),
        version=f"featx-edge {version}", labels=labels, height=int(inp["height"]), width=int(inp["width"]),
        input_name=str(inp.get("name", "image")))
    with_meta = with_model_metadata(flatbuffer, metadata_buffer=blob)
    log.debug("added %d bytes of TFLite Model Metadata", len(with_meta) - len(flatbuffer))
    return pack_tflite(with_meta, metadata)
