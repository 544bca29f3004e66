"""A reader of the standard TFLite Model Metadata (what MediaPipe reads), for the tests of its writer.

featx-edge's runtime does not need it (it reads its own ``featx_edge.json``); the tests use it
to check ``featx_edge.export.tflite_metadata`` field by field without MediaPipe (which
``tests/test_mediapipe.py`` runs separately, in its own environment).
"""

from __future__ import annotations

from pathlib import Path

import flatbuffers

from featx_edge.errors import ModelFileError
from featx_edge.runtime.metadata import MAX_ENTRY_BYTES, STANDARD_METADATA_NAME

STANDARD_METADATA_IDENTIFIER = b"M001"
MAX_METADATA_ITEMS = 64  # tensors, process units or files per list; a classifier has one or two


# Names of metadata_schema.fbs enums, by value (tensorflow/tflite-support).
_FILE_TYPES = ("UNKNOWN", "DESCRIPTIONS", "TENSOR_AXIS_LABELS", "TENSOR_VALUE_LABELS",
               "TENSOR_AXIS_SCORE_CALIBRATION", "VOCABULARY", "SCANN_INDEX_FILE")
_CONTENTS = ("NONE", "FeatureProperties", "ImageProperties", "BoundingBoxProperties", "AudioProperties")
_COLOR_SPACES = ("UNKNOWN", "RGB", "GRAYSCALE")
_PROCESS_UNITS = ("NONE", "NormalizationOptions", "ScoreCalibrationOptions", "ScoreThresholdingOptions",
                  "BertTokenizerOptions", "SentencePieceTokenizerOptions", "RegexTokenizerOptions")


class _Table:
    """A table of a flatbuffer, read by field slot (its position in the schema's table)."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.tab = flatbuffers.table.Table(buf, pos)

    def _at(self, slot: int) -> int:
        offset = self.tab.Offset(4 + 2 * slot)
        return offset + self.tab.Pos if offset else 0

    def string(self, slot: int) -> str | None:
        at = self._at(slot)
        return self.tab.String(at).decode("utf-8", "replace") if at else None

    def int8(self, slot: int) -> int:
        at = self._at(slot)
        return self.tab.Get(flatbuffers.number_types.Int8Flags, at) if at else 0

    def uint8(self, slot: int) -> int:
        at = self._at(slot)
        return self.tab.Get(flatbuffers.number_types.Uint8Flags, at) if at else 0

    def uint32(self, slot: int) -> int:
        at = self._at(slot)
        return self.tab.Get(flatbuffers.number_types.Uint32Flags, at) if at else 0

    def table(self, slot: int) -> _Table | None:
        at = self._at(slot)
        return _Table(self.tab.Bytes, self.tab.Indirect(at)) if at else None

    def _vector(self, slot: int) -> tuple[int, int]:
        at = self._at(slot)
        if not at:
            return 0, 0
        count = self.tab.VectorLen(at - self.tab.Pos)
        if count > MAX_METADATA_ITEMS:
            raise ValueError(f"a list of {count} items (at most {MAX_METADATA_ITEMS} expected)")
        return self.tab.Vector(at - self.tab.Pos), count

    def tables(self, slot: int) -> list[_Table]:
        start, count = self._vector(slot)
        return [_Table(self.tab.Bytes, self.tab.Indirect(start + 4 * i)) for i in range(count)]

    def floats(self, slot: int) -> list[float]:
        start, count = self._vector(slot)
        return [self.tab.Get(flatbuffers.number_types.Float32Flags, start + 4 * i) for i in range(count)]


def _name(names: tuple[str, ...], value: int) -> str:
    return names[value] if 0 <= value < len(names) else f"UNKNOWN_{value}"


def _files(table: _Table, slot: int) -> list[dict]:
    # AssociatedFile: name 0, description 1, type 2
    return [{"name": f.string(0), "type": _name(_FILE_TYPES, f.int8(2))} for f in table.tables(slot)]


def _tensor(t: _Table) -> dict:
    # TensorMetadata: name 0, description 1, dimension_names 2, content 3, process_units 4, stats 5,
    # associated_files 6. Content: content_properties (union: type 0, value 1), range 2.
    out: dict = {"name": t.string(0), "description": t.string(1), "content": None, "process_units": []}
    content = t.table(3)
    if content is not None:
        out["content"] = _name(_CONTENTS, content.uint8(0))
        props = content.table(1)
        if out["content"] == "ImageProperties" and props is not None:
            out["color_space"] = _name(_COLOR_SPACES, props.int8(0))  # ImageProperties: color_space 0,
            size = props.table(1)  # default_size 1; ImageSize: width 0, height 1
            out["default_size"] = None if size is None else {"width": size.uint32(0), "height": size.uint32(1)}
    for unit in t.tables(4):  # ProcessUnit: options (union: type 0, value 1)
        kind, options = _name(_PROCESS_UNITS, unit.uint8(0)), unit.table(1)
        entry: dict = {"type": kind}
        if kind == "NormalizationOptions" and options is not None:
            entry.update(mean=options.floats(0), std=options.floats(1))  # mean 0, std 1
        out["process_units"].append(entry)
    stats = t.table(5)
    if stats is not None:
        out["stats"] = {"min": stats.floats(1), "max": stats.floats(0)}  # Stats: max 0, min 1
    out["associated_files"] = _files(t, 6)
    return out


def read_standard_metadata(flatbuffer: bytes, *, path: Path | None = None) -> dict | None:
    """The standard TFLite Model Metadata of a model (what MediaPipe reads), decoded; None if absent.

    Reads the ``TFLITE_METADATA`` entry of the model's ``metadata`` vector and the ModelMetadata
    flatbuffer in the buffer it names (tflite-support's ``metadata_schema.fbs``): the model's
    name, version, author, min_parser_version and associated files, and per input and output
    tensor its content kind, normalization, stats and associated files. Bounded: lists of more
    than ``MAX_METADATA_ITEMS`` entries are refused.

    Raises:
        ModelFileError: the entry exists but is damaged or not a ModelMetadata flatbuffer.

    Example:
        >>> flatbuffer, _ = read_tflite(Path("model.tflite-int8.tflite"))  # doctest: +SKIP
        >>> read_standard_metadata(flatbuffer)["outputs"][0]["associated_files"]  # doctest: +SKIP
        [{'name': 'labels.txt', 'type': 'TENSOR_AXIS_LABELS'}]
    """
    try:
        from ai_edge_litert import schema_py_generated as schema

        model = schema.Model.GetRootAs(flatbuffer, 0)
        index = next((model.Metadata(i).Buffer() for i in range(model.MetadataLength())
                      if model.Metadata(i).Name() == STANDARD_METADATA_NAME.encode()), None)
        if index is None:
            return None
        if index >= model.BuffersLength():
            raise ValueError(f"the entry names buffer {index} of {model.BuffersLength()}")
        buffer = model.Buffers(index)
        if buffer.DataLength() > MAX_ENTRY_BYTES:
            raise ValueError(f"{buffer.DataLength()} bytes (limit {MAX_ENTRY_BYTES})")
        data = buffer.DataAsNumpy()
        blob = data.tobytes() if not isinstance(data, int) else b""
        if len(blob) < 8 or blob[4:8] != STANDARD_METADATA_IDENTIFIER:
            raise ValueError(f"no `{STANDARD_METADATA_IDENTIFIER.decode()}` identifier")
        root = _Table(blob, flatbuffers.encode.Get(flatbuffers.packer.uoffset, blob, 0))
        # ModelMetadata: name 0, description 1, version 2, subgraph_metadata 3, author 4, license 5,
        # associated_files 6, min_parser_version 7. SubGraphMetadata: input_tensor_metadata 2, output 3.
        subgraphs = root.tables(3)
        return {"name": root.string(0), "description": root.string(1), "version": root.string(2),
                "author": root.string(4), "license": root.string(5), "min_parser_version": root.string(7),
                "associated_files": _files(root, 6), "subgraphs": len(subgraphs),
                "inputs": [_tensor(t) for t in subgraphs[0].tables(2)] if subgraphs else [],
                "outputs": [_tensor(t) for t in subgraphs[0].tables(3)] if subgraphs else []}
    except Exception as err:  # struct/index/Unicode errors on a damaged buffer all mean "damaged"
        raise ModelFileError(f"{path}: the standard TFLite Model Metadata (`{STANDARD_METADATA_NAME}`) is "
                             f"damaged ({type(err).__name__}: {err}); re-export the model") from err
