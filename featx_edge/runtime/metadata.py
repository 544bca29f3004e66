"""Model metadata that travels inside each exported file (no TensorFlow, no onnx package).

- ``.tflite``: a zip archive appended to the flatbuffer (the TFLite "associated files"
  convention), holding ``featx_edge.json`` (labels and the input contract) and ``labels.txt``.
  The JSON also records the flatbuffer's length and sha256, so truncation or tampering is
  caught before the interpreter ever sees the bytes.
  The flatbuffer itself also carries standard TFLite Model Metadata (a ``TFLITE_METADATA``
  entry naming those two files; written by :mod:`featx_edge.export.tflite_metadata`) for
  MediaPipe and Android; :func:`read_standard_metadata` decodes it.
- ``.onnx``: ``metadata_props`` entries ``featx_edge`` (the same JSON) and ``labels``.
"""

from __future__ import annotations

import hashlib
import io
import json
import unicodedata
import zipfile
from pathlib import Path

import flatbuffers

from featx_edge.errors import ModelFileError

METADATA_NAME = "featx_edge.json"
LABELS_NAME = "labels.txt"
TFLITE_IDENTIFIER = b"TFL3"
MAX_MODEL_BYTES = 2 << 30  # larger than any edge classifier; refuses absurd files early
MAX_ZIP_ENTRIES = 8
MAX_ENTRY_BYTES = 4 << 20  # a JSON of labels and settings; 100,000 labels fit
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 200
MAX_INPUT_SIDE = 4096
STANDARD_METADATA_NAME = "TFLITE_METADATA"
STANDARD_METADATA_IDENTIFIER = b"M001"
MAX_METADATA_ITEMS = 64  # tensors, process units or files per list; a classifier has one or two


def pack_tflite(flatbuffer: bytes, metadata: dict) -> bytes:
    """Append the metadata zip to a TFLite flatbuffer; the interpreter ignores trailing bytes.

    The entries are stored, not deflated: MediaPipe reads associated files in place and refuses
    a compressed archive ("Expected uncompressed zip archive").
    """
    meta = dict(metadata, flatbuffer={"bytes": len(flatbuffer),
                                      "sha256": hashlib.sha256(flatbuffer).hexdigest()})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(METADATA_NAME, json.dumps(meta, indent=2))
        zf.writestr(LABELS_NAME, "\n".join(metadata["labels"]) + "\n")
    return flatbuffer + buf.getvalue()


def check_size(path: Path) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found") from None
    if size == 0:
        raise ModelFileError(f"{path}: model file is empty")
    if size > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path}: {size} bytes is larger than the {MAX_MODEL_BYTES} byte limit for a model")
    return size


def read_tflite(path: Path) -> tuple[bytes, dict]:
    """Return (flatbuffer bytes, metadata) of a featx-edge .tflite file, checking its integrity."""
    check_size(path)
    data = path.read_bytes()
    if data[4:8] != TFLITE_IDENTIFIER:
        raise ModelFileError(f"{path}: not a TFLite model (no `TFL3` identifier); the file is corrupt or of another kind")
    meta = _parse_json(path, _read_zip_entry(path, data, METADATA_NAME))
    fb = meta.get("flatbuffer")
    if not isinstance(fb, dict) or not _is_int(fb.get("bytes")) or not isinstance(fb.get("sha256"), str):
        raise ModelFileError(f"{path}: the metadata does not record the model's length and checksum; re-export it")
    flatbuffer = data[: fb["bytes"]]
    if len(flatbuffer) != fb["bytes"] or hashlib.sha256(flatbuffer).hexdigest() != fb["sha256"]:
        raise ModelFileError(f"{path}: the model bytes do not match their recorded checksum; the file is corrupt")
    return flatbuffer, _check_metadata(path, meta)


def _read_zip_entry(path: Path, data: bytes, name: str) -> bytes:
    """One entry of the metadata zip appended to a .tflite, read within fixed limits.

    The zip comes from elsewhere: at most ``MAX_ZIP_ENTRIES`` entries, only stored or deflated,
    not encrypted, and at most ``MAX_ENTRY_BYTES`` once inflated (the limit is enforced while
    inflating, so an entry that claims a small size cannot inflate to gigabytes).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_ENTRIES:
                raise ModelFileError(f"{path}: the metadata zip has {len(infos)} entries (at most "
                                     f"{MAX_ZIP_ENTRIES} expected); the file is not a featx-edge export")
            info = next((i for i in infos if i.filename == name), None)
            if info is None:
                raise ModelFileError(f"{path}: no `{name}` in the model's metadata; it was not exported by "
                                     "`featx-edge export`; re-export it.")
            if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ModelFileError(f"{path}: `{name}` is encrypted or compressed in an unsupported way; "
                                     "re-export the model")
            if info.file_size > MAX_ENTRY_BYTES:
                raise ModelFileError(f"{path}: `{name}` claims {info.file_size} bytes (limit {MAX_ENTRY_BYTES})")
            with zf.open(info) as fh:
                raw = fh.read(MAX_ENTRY_BYTES + 1)
            if len(raw) > MAX_ENTRY_BYTES:
                raise ModelFileError(f"{path}: `{name}` inflates past {MAX_ENTRY_BYTES} bytes; refused")
            return raw
    except ModelFileError:
        raise
    except Exception as err:  # zipfile raises many kinds on hostile input; all mean "damaged"
        raise ModelFileError(
            f"{path}: no readable featx-edge metadata ({type(err).__name__}: {err}). The file is truncated, "
            "damaged, or was not exported by `featx-edge export`; re-export it."
        ) from err


def _parse_json(path: Path, raw: bytes | str) -> dict:
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelFileError(f"{path}: the featx-edge metadata is not valid JSON ({err}); re-export the model") from err
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: the featx-edge metadata is a JSON {type(meta).__name__}, not an object; "
                             "re-export the model")
    return meta


def parse_onnx_metadata(path: Path, props: dict[str, str]) -> dict:
    if "featx_edge" not in props:
        raise ModelFileError(
            f"{path}: ONNX model has no `featx_edge` metadata_props entry; export it with `featx-edge export`."
        )
    if len(props["featx_edge"]) > MAX_ENTRY_BYTES:
        raise ModelFileError(f"{path}: the `featx_edge` metadata is larger than {MAX_ENTRY_BYTES} bytes; refused")
    return _check_metadata(path, _parse_json(path, props["featx_edge"]))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unsafe_char(char: str) -> bool:
    """A character that acts on a terminal instead of showing: C0/DEL/C1 controls (escape
    sequences, tabs, newlines), bidirectional overrides, or a byte that was not valid UTF-8."""
    return unicodedata.category(char) in ("Cc", "Cs") or char in _BIDI_CONTROLS


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``, ``\\t``, ``\\u202e``), the rest unchanged.

    Example:
        >>> printable("\x1b[31mred")
        '\\x1b[31mred'
    """
    return "".join(repr(char)[1:-1] if unsafe_char(char) else char for char in text)


def _check_metadata(path: Path, meta: dict) -> dict:
    """Every field the runtime uses, typed and in range; ModelFileError naming the first that is not."""
    problem = None
    labels, inp = meta.get("labels"), meta.get("input")
    if not isinstance(labels, list) or not labels:
        problem = "`labels` is missing or not a non-empty list"
    elif len(labels) > MAX_LABELS:
        problem = f"{len(labels)} labels (at most {MAX_LABELS})"
    elif not all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels):
        problem = f"every label must be a string of 1 to {MAX_LABEL_CHARS} characters"
    elif any(any(map(unsafe_char, x)) for x in labels):
        problem = "a label contains control characters (e.g. terminal escape sequences)"
    elif not isinstance(inp, dict):
        problem = "`input` is missing or not an object"
    elif not all(_is_int(inp.get(k)) and 1 <= inp[k] <= MAX_INPUT_SIDE for k in ("height", "width")):
        problem = f"`input.height` and `input.width` must be integers from 1 to {MAX_INPUT_SIDE}"
    elif inp.get("channels") != 3:
        problem = "`input.channels` must be 3 (RGB)"
    elif "format" in meta and not isinstance(meta["format"], str):
        problem = "`format` is not a string"
    if problem:
        raise ModelFileError(f"{path}: damaged featx-edge metadata: {problem}; re-export the model")
    return meta


def check_onnx_header(path: Path) -> None:
    """Cheap sanity check before onnxruntime parses the protobuf: size and first field tag."""
    check_size(path)
    with open(path, "rb") as fh:
        first = fh.read(1)
    # ModelProto's first serialized field is ir_version (field 1, varint): tag byte 0x08.
    if first != b"\x08":
        raise ModelFileError(f"{path}: not an ONNX model (bad header byte {first!r}); the file is corrupt or of another kind")


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
