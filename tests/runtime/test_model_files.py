"""Model files from elsewhere are bounded: hostile metadata, patched shapes and damaged fields give
one clear ModelFileError (one line from the CLI), never a traceback, a hang or gigabytes of memory."""

from __future__ import annotations

import io
import json
import resource
import zipfile
from pathlib import Path

import numpy as np
import pytest
from tflite_metadata_reader import read_standard_metadata

from featx_edge.cli import main
from featx_edge.errors import ModelFileError
from featx_edge.runtime import load
from featx_edge.runtime.metadata import METADATA_NAME, pack_tflite, read_tflite

DATA = Path(__file__).resolve().parents[1] / "data" / "runtime"
TFLITE = DATA / "model.tflite-int8.tflite"


def _flatbuffer_and_meta() -> tuple[bytes, dict]:
    flatbuffer, meta = read_tflite(TFLITE)
    return flatbuffer, {k: v for k, v in meta.items() if k != "flatbuffer"}


def _with_zip(flatbuffer: bytes, entries: dict[str, bytes], *, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return flatbuffer + buf.getvalue()


def _meta_bytes(flatbuffer: bytes, meta: dict) -> bytes:
    import hashlib

    return json.dumps(dict(meta, flatbuffer={"bytes": len(flatbuffer),
                                             "sha256": hashlib.sha256(flatbuffer).hexdigest()})).encode()


def _refused(tmp_path: Path, data: bytes, match: str, capsys) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(data)
    with pytest.raises(ModelFileError, match=match):
        load(path)
    image = DATA / "images" / min(p.name for p in (DATA / "images").iterdir())
    assert main(["predict", str(path), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err


def test_a_metadata_entry_that_inflates_to_gigabytes_is_refused_without_inflating(tmp_path, capsys):
    flatbuffer, _ = _flatbuffer_and_meta()
    bomb = _with_zip(flatbuffer, {METADATA_NAME: b" " * (64 << 20)})  # 64 MiB of spaces: ~64 KiB deflated
    assert len(bomb) < len(flatbuffer) + (1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(tmp_path, bomb, "bytes", capsys)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 << 10  # KiB: nothing inflated


def test_a_size_field_that_lies_cannot_inflate_past_the_limit(tmp_path, capsys):
    flatbuffer, meta = _flatbuffer_and_meta()
    data = bytearray(_with_zip(flatbuffer, {METADATA_NAME: _meta_bytes(flatbuffer, meta) + b" " * (8 << 20)}))
    # Rewrite the uncompressed size in the central directory and the local header to 100 bytes.
    start = len(flatbuffer)
    with zipfile.ZipFile(io.BytesIO(bytes(data[start:]))) as zf:
        info = zf.infolist()[0]
    real = info.file_size.to_bytes(4, "little")
    small = (100).to_bytes(4, "little")
    assert data.count(real) >= 2
    data[:] = data.replace(real, small)
    _refused(tmp_path, bytes(data), "not valid JSON|no readable featx-edge metadata", capsys)


@pytest.mark.parametrize("entries, compression, match", [
    ({METADATA_NAME: b"[1, 2, 3]"}, zipfile.ZIP_DEFLATED, "JSON list, not an object"),
    ({METADATA_NAME: b"{not json"}, zipfile.ZIP_DEFLATED, "not valid JSON"),
    ({"other.txt": b"x"}, zipfile.ZIP_DEFLATED, "no `featx_edge.json`"),
    ({f"f{i}": b"x" for i in range(20)}, zipfile.ZIP_STORED, "20 entries"),
    ({METADATA_NAME: b"{}"}, zipfile.ZIP_BZIP2, "unsupported way"),
])
def test_hostile_zips_are_refused(tmp_path, capsys, entries, compression, match):
    flatbuffer, _ = _flatbuffer_and_meta()
    _refused(tmp_path, _with_zip(flatbuffer, entries, compression=compression), match, capsys)


def test_an_encrypted_entry_is_refused(tmp_path, capsys):
    flatbuffer, meta = _flatbuffer_and_meta()
    data = bytearray(_with_zip(flatbuffer, {METADATA_NAME: _meta_bytes(flatbuffer, meta)}))
    start = len(flatbuffer)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # general purpose flag: bit 0
        at = data.index(signature, start)
        data[at + offset] |= 0x1
    _refused(tmp_path, bytes(data), "encrypted", capsys)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(labels="a,b"), "`labels` is missing or not a non-empty list"),
    (lambda m: m.update(labels=[1, 2]), "every label must be a string"),
    (lambda m: m.update(labels=["\x1b[31mred", "green"]), "control characters"),
    (lambda m: m.update(labels=["\u202ered", "green"]), "control characters"),  # bidi override, as for folders
    (lambda m: m["input"].update(height=0), "`input.height` and `input.width` must be integers"),
    (lambda m: m["input"].update(height=True), "`input.height` and `input.width` must be integers"),
    (lambda m: m["input"].update(width=10**9), "`input.height` and `input.width` must be integers"),
    (lambda m: m["input"].update(channels=4), "`input.channels` must be 3"),
    (lambda m: m.update(input=[32, 32, 3]), "`input` is missing or not an object"),
    (lambda m: m.update(labels=m["labels"] + ["extra"]), "metadata lists"),
    (lambda m: m["input"].update(height=m["input"]["height"] * 2), "does not match its metadata"),
])
def test_damaged_metadata_fields_are_named(tmp_path, capsys, change, match):
    flatbuffer, meta = _flatbuffer_and_meta()
    meta = json.loads(json.dumps(meta))
    change(meta)
    _refused(tmp_path, _with_zip(flatbuffer, {METADATA_NAME: _meta_bytes(flatbuffer, meta)}), match, capsys)


def test_patched_tensor_shapes_are_refused_before_allocation(tmp_path, capsys):
    """Shapes patched to ask for gigabytes, with a checksum recomputed to match: the shapes are
    read from the file and refused before LiteRT allocates anything."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    flatbuffer, meta = _flatbuffer_and_meta()
    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    tensors = model.subgraphs[0].tensors
    victim = max(tensors, key=lambda t: int(np.prod(t.shape)) if t.shape is not None else 0)
    victim.shape = np.array([1, 4096, 4096, 64], dtype=np.int32)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    patched = bytes(builder.Output())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(tmp_path, pack_tflite(patched, meta), r"declares \d+ MiB of tensors", capsys)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KiB


def test_garbage_after_the_identifier_is_a_clear_error(tmp_path, capsys):
    flatbuffer, meta = _flatbuffer_and_meta()
    garbage = flatbuffer[:8] + bytes(np.random.default_rng(0).integers(0, 256, len(flatbuffer) - 8, dtype=np.uint8))
    path = tmp_path / "model.tflite"
    path.write_bytes(pack_tflite(garbage, meta))
    with pytest.raises(ModelFileError):
        load(path)


def test_a_selftest_file_from_another_export_is_named(tmp_path, capsys):
    """The golden file records which model file it was written for."""
    import shutil

    from featx_edge.runtime.selftest import golden_path, run_selftest, write_golden

    model = tmp_path / "model.tflite-int8.tflite"
    shutil.copy(TFLITE, model)
    shutil.copytree(DATA / "selftest" / "images", tmp_path / "selftest" / "images")
    images = sorted(f"images/{p.name}" for p in (tmp_path / "selftest" / "images").iterdir())
    predictor = load(model)
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(tmp_path / "selftest" / name).convert("RGB")) for name in images])
    probs = predictor.predict_pixels(pixels)
    write_golden(model, fmt="tflite-int8", images=images, reference=probs, expected=probs)
    assert run_selftest(model).passed
    flatbuffer, meta = _flatbuffer_and_meta()
    model.write_bytes(pack_tflite(flatbuffer, dict(meta, featx_edge_version="another export")))
    with pytest.raises(ModelFileError, match="written for another export of this model"):
        run_selftest(model)
    assert golden_path(model).is_file()


def test_an_onnxruntime_run_error_is_one_line(tmp_path, capsys):
    """A graph that loads but fails when run (a reshape to an impossible shape) gives ModelFileError."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    meta = json.loads(json.dumps(_flatbuffer_and_meta()[1]))
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["probabilities"])], "broken",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [5, -1])])  # 3072 values: no fit
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"featx_edge": json.dumps(dict(meta, format="onnx-float32"))})
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    predictor = load(path)
    with pytest.raises(ModelFileError, match="onnxruntime failed to run this model"):
        predictor.predict_pixels(np.zeros((1, 32, 32, 3), np.uint8))


@pytest.mark.parametrize("fmt", ["tflite-float32", "tflite-int8"])
def test_committed_models_carry_standard_tflite_metadata(fmt):
    """Readable without TensorFlow: the TFLITE_METADATA entry names the zip's labels.txt for the output."""
    flatbuffer, meta = read_tflite(DATA / f"model.{fmt}.tflite")
    std = read_standard_metadata(flatbuffer, path=DATA / f"model.{fmt}.tflite")
    assert std["author"] == "featx-edge" and std["min_parser_version"] == "1.0.0"
    assert std["inputs"][0]["process_units"] == [{"type": "NormalizationOptions", "mean": [0.0], "std": [1.0]}]
    assert std["outputs"][0]["associated_files"] == [{"name": "labels.txt", "type": "TENSOR_AXIS_LABELS"}]
    assert std["associated_files"] == [{"name": METADATA_NAME, "type": "DESCRIPTIONS"}]
    assert meta["labels"] == ["red", "green", "blue"]
