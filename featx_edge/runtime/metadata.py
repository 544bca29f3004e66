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


def pack_tflite(flatbuffer: bytes, metadata: dict) -> bytes:
    """Append the metadata zip to a TFLite flatbuffer; the interpreter ignores trailing bytes.

    The entries are stored, not deflated: MediaPipe reads associated files in place and refuses
    a compressed archive ("Expected uncompressed zip archive").
    """
    meta = dict(metadata, flatbuffer={"bytes": len(flatbuffer),
                                      "sha256": hashlib.sha256(flatbuffer).hexdigest()})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, text in ((METADATA_NAME, json.dumps(meta, indent=2)),
                           (LABELS_NAME, "\n".join(metadata["labels"]) + "\n")):
            # A fixed date (zip's earliest): the same model and metadata make the same file, sha256 included.
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.external_attr = zipfile.ZIP_STORED, 0o600 << 16
            zf.writestr(info, text)
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
