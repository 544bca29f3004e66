"""Standard TFLite Model Metadata (featx_edge.export.tflite_metadata): written, read back, kept intact.

The independent check of the layout, by MediaPipe's own reader and ImageClassifier, is in
tests/test_mediapipe.py.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from tflite_metadata_reader import read_standard_metadata

from featx_edge.errors import ModelFileError
from featx_edge.export.tflite_metadata import model_metadata, pack, with_model_metadata
from featx_edge.runtime import load
from featx_edge.runtime.metadata import (
    LABELS_NAME,
    METADATA_NAME,
    STANDARD_METADATA_NAME,
    pack_tflite,
    read_tflite,
)

DATA = Path(__file__).resolve().parent / "data" / "runtime"
LABELS = ["red", "green", "blue"]


def _metadata_names(flatbuffer: bytes) -> list[bytes]:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    return [model.Metadata(i).Name() for i in range(model.MetadataLength())]


def _plain(fmt: str) -> tuple[bytes, dict]:
    """A committed model's flatbuffer with its standard metadata entry taken out, and its featx metadata."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    flatbuffer, meta = read_tflite(DATA / f"model.{fmt}.tflite")
    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    model.metadata = [m for m in model.metadata if m.name not in (b"TFLITE_METADATA", "TFLITE_METADATA")]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), {k: v for k, v in meta.items() if k != "flatbuffer"}


def test_written_model_metadata_reads_back_with_every_field():
    blob = model_metadata(name="toy classifier", description="three colours", version="featx-edge 9",
                          labels=LABELS, height=48, width=40)
    assert blob[4:8] == b"M001"
    model, _ = _plain("tflite-float32")
    std = read_standard_metadata(with_model_metadata(model, metadata_buffer=blob))
    assert (std["name"], std["description"], std["version"], std["author"], std["min_parser_version"]) == (
        "toy classifier", "three colours", "featx-edge 9", "featx-edge", "1.0.0")
    assert std["associated_files"] == [{"name": METADATA_NAME, "type": "DESCRIPTIONS"}]
    assert std["subgraphs"] == 1 and len(std["inputs"]) == 1 and len(std["outputs"]) == 1
    image = std["inputs"][0]
    assert image["name"] == "image" and image["content"] == "ImageProperties" and image["color_space"] == "RGB"
    assert image["default_size"] == {"width": 40, "height": 48}
    assert image["process_units"] == [{"type": "NormalizationOptions", "mean": [0.0], "std": [1.0]}]
    assert image["stats"] == {"min": [0.0], "max": [255.0]}
    out = std["outputs"][0]
    assert out["name"] == "probabilities" and out["content"] == "FeatureProperties" and out["process_units"] == []
    assert out["associated_files"] == [{"name": LABELS_NAME, "type": "TENSOR_AXIS_LABELS"}]
    assert "3 classes" in out["description"]


@pytest.mark.parametrize("fmt", ["tflite-float32", "tflite-int8"])
def test_pack_adds_the_entry_keeps_the_converters_and_changes_no_output(fmt, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    plain, meta = _plain(fmt)
    assert read_standard_metadata(plain) is None
    packed = pack(plain, metadata=meta)
    path = tmp_path / f"model.{fmt}.tflite"
    path.write_bytes(packed)
    flatbuffer, _ = read_tflite(path)  # the checksum covers the flatbuffer with its metadata buffer
    names = _metadata_names(flatbuffer)
    assert names.count(STANDARD_METADATA_NAME.encode()) == 1
    assert set(_metadata_names(plain)) <= set(names)  # min_runtime_version, CONVERSION_METADATA kept
    std = read_standard_metadata(flatbuffer)
    assert fmt in std["name"] and std["outputs"][0]["associated_files"][0]["name"] == LABELS_NAME

    pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    outputs = []
    for model in (plain, flatbuffer):
        interp = Interpreter(model_content=model)
        interp.allocate_tensors()
        inp = interp.get_input_details()[0]
        interp.set_tensor(inp["index"], pixels.astype(inp["dtype"]))
        interp.invoke()
        outputs.append(interp.get_tensor(interp.get_output_details()[0]["index"]))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert load(path).labels == LABELS


def test_packing_twice_replaces_the_entry():
    plain, _ = _plain("tflite-int8")
    once = with_model_metadata(plain, metadata_buffer=model_metadata(
        name="first", description="", version="1", labels=LABELS, height=32, width=32))
    twice = with_model_metadata(once, metadata_buffer=model_metadata(
        name="second", description="", version="2", labels=LABELS, height=32, width=32))
    assert _metadata_names(twice).count(STANDARD_METADATA_NAME.encode()) == 1
    assert read_standard_metadata(twice)["name"] == "second"
    assert len(twice) - len(once) < 64  # the buffer was reused, not a second one added


@pytest.mark.parametrize("fmt", ["tflite-float32", "tflite-int8"])
def test_the_associated_files_are_stored_in_the_zip_after_the_flatbuffer(fmt):
    """MediaPipe reads associated files in place: it refuses a deflated zip."""
    path = DATA / f"model.{fmt}.tflite"
    flatbuffer, meta = read_tflite(path)
    std = read_standard_metadata(flatbuffer)
    named = [f["name"] for f in std["associated_files"]] + [
        f["name"] for t in std["inputs"] + std["outputs"] for f in t["associated_files"]]
    with zipfile.ZipFile(io.BytesIO(path.read_bytes()[len(flatbuffer):])) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        assert sorted(named) == sorted(infos) == [METADATA_NAME, LABELS_NAME]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos.values())
        assert zf.read(LABELS_NAME).decode().split() == meta["labels"] == LABELS
        assert json.loads(zf.read(METADATA_NAME))["flatbuffer"]["bytes"] == len(flatbuffer)


def test_an_altered_byte_in_the_metadata_buffer_is_refused(tmp_path):
    data = bytearray((DATA / "model.tflite-int8.tflite").read_bytes())
    at = data.index(b"Classifies an RGB image")  # the description, inside the flatbuffer
    data[at] ^= 0x20
    path = tmp_path / "model.tflite"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="do not match their recorded checksum"):
        load(path)


def test_damaged_standard_metadata_is_a_clear_error():
    plain, _ = _plain("tflite-float32")
    blob = bytearray(model_metadata(name="x", description="", version="1", labels=LABELS, height=32, width=32))
    blob[4:8] = b"XXXX"
    with pytest.raises(ModelFileError, match="TFLITE_METADATA.*damaged.*identifier"):
        read_standard_metadata(with_model_metadata(plain, metadata_buffer=bytes(blob)))


def test_a_model_without_standard_metadata_still_loads(tmp_path):
    """Exports made before the standard metadata: the runtime reads featx_edge.json as before."""
    plain, meta = _plain("tflite-int8")
    path = tmp_path / "old.tflite"
    path.write_bytes(pack_tflite(plain, meta))
    flatbuffer, _ = read_tflite(path)
    assert read_standard_metadata(flatbuffer) is None
    assert load(path).labels == LABELS


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_every_tflite_export_of_the_main_run_carries_it(trained_run):
    manifest = json.loads((trained_run / "manifest.json").read_text())
    tflites = {fmt: a["path"] for fmt, a in manifest["artifacts"].items() if a["path"].endswith(".tflite")}
    assert {"tflite-float32", "tflite-int8"} <= set(tflites)
    for fmt, rel in tflites.items():
        flatbuffer, meta = read_tflite(trained_run / rel)
        std = read_standard_metadata(flatbuffer)
        assert fmt in std["name"] and std["version"] == f"featx-edge {meta['featx_edge_version']}"
        assert std["inputs"][0]["default_size"] == {"width": meta["input"]["width"],
                                                    "height": meta["input"]["height"]}
        assert std["outputs"][0]["associated_files"] == [{"name": LABELS_NAME, "type": "TENSOR_AXIS_LABELS"}]
        assert load(trained_run / rel).labels == manifest["labels"]
