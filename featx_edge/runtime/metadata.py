"""Model metadata that travels inside each exported file (no TensorFlow, no onnx package).

- ``.tflite``: a zip archive appended to the flatbuffer (the TFLite "associated files"
  convention), holding ``featx_edge.json`` (labels and the input contract) and ``labels.txt``.
  The JSON also records the flatbuffer's length and sha256, so truncation or tampering is
  caught before the interpreter ever sees the bytes.
- ``.onnx``: ``metadata_props`` entries ``featx_edge`` (the same JSON) and ``labels``.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

from featx_edge.errors import ModelFileError

METADATA_NAME = "featx_edge.json"
LABELS_NAME = "labels.txt"
TFLITE_IDENTIFIER = b"TFL3"
MAX_MODEL_BYTES = 2 << 30  # larger than any edge classifier; refuses absurd files early


def pack_tflite(flatbuffer: bytes, metadata: dict) -> bytes:
    """Append the metadata zip to a TFLite flatbuffer; the interpreter ignores trailing bytes."""
    meta = dict(metadata, flatbuffer={"bytes": len(flatbuffer),
                                      "sha256": hashlib.sha256(flatbuffer).hexdigest()})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
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
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            meta = json.loads(zf.read(METADATA_NAME))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as err:
        raise ModelFileError(
            f"{path}: no readable featx-edge metadata ({err}). The file is truncated, or was not "
            "exported by `featx-edge export`; re-export it."
        ) from err
    fb = meta.get("flatbuffer", {})
    flatbuffer = data[: fb.get("bytes", -1)]
    if len(flatbuffer) != fb.get("bytes") or hashlib.sha256(flatbuffer).hexdigest() != fb.get("sha256"):
        raise ModelFileError(f"{path}: the model bytes do not match their recorded checksum; the file is corrupt")
    return flatbuffer, _check_metadata(path, meta)


def parse_onnx_metadata(path: Path, props: dict[str, str]) -> dict:
    if "featx_edge" not in props:
        raise ModelFileError(
            f"{path}: ONNX model has no `featx_edge` metadata_props entry; export it with `featx-edge export`."
        )
    try:
        meta = json.loads(props["featx_edge"])
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{path}: `featx_edge` metadata is not valid JSON ({err})") from err
    return _check_metadata(path, meta)


def _check_metadata(path: Path, meta: dict) -> dict:
    inp = meta.get("input") or {}
    if not meta.get("labels") or not all(k in inp for k in ("height", "width", "channels")):
        raise ModelFileError(f"{path}: featx-edge metadata lacks labels or the input size; re-export the model")
    return meta


def check_onnx_header(path: Path) -> None:
    """Cheap sanity check before onnxruntime parses the protobuf: size and first field tag."""
    check_size(path)
    with open(path, "rb") as fh:
        first = fh.read(1)
    # ModelProto's first serialized field is ir_version (field 1, varint): tag byte 0x08.
    if first != b"\x08":
        raise ModelFileError(f"{path}: not an ONNX model (bad header byte {first!r}); the file is corrupt or of another kind")
