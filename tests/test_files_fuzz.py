"""Property-based tests of the readers of files from elsewhere: model metadata and run directories.

Whatever the bytes or JSON, the reader returns a checked result or raises its one typed error
(ModelFileError, RunDirError, DataError) naming the file: never another exception, not even
another FeatxError. Bounded and derandomized.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featx_edge.errors import DataError, ModelFileError, RunDirError
from featx_edge.rundir.manifest import MANIFEST_VERSION
from featx_edge.runtime import load
from featx_edge.runtime.metadata import METADATA_NAME, read_tflite

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DATA = Path(__file__).parent / "data" / "runtime"
FLATBUFFER, META = read_tflite(DATA / "model.tflite-int8.tflite")

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)


def _mutated_meta(draw_key, value) -> dict:
    meta = json.loads(json.dumps(META))
    node = meta
    *parents, leaf = draw_key
    for key in parents:
        node = node[key]
    node[leaf] = value
    return meta


KEYS = [("labels",), ("input",), ("input", "height"), ("input", "width"), ("input", "channels"), ("format",),
        ("flatbuffer",), ("flatbuffer", "bytes"), ("flatbuffer", "sha256")]


@FUZZ
@given(key=st.sampled_from(KEYS), value=JSON)
def test_any_metadata_value_is_accepted_or_a_model_file_error(tmp_path_factory, key, value):
    meta = _mutated_meta(key, value)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(METADATA_NAME, json.dumps(meta))
    path = tmp_path_factory.mktemp("m") / "model.tflite"
    path.write_bytes(FLATBUFFER + buf.getvalue())
    try:
        predictor = load(path)
    except ModelFileError as err:
        assert str(path) in str(err), err
        return
    assert predictor.labels == meta["labels"]


@FUZZ
@given(cut=st.integers(0, 4096), flips=st.lists(st.tuples(st.integers(0, 10**7), st.integers(1, 255)), max_size=6))
def test_damaged_model_bytes_are_a_model_file_error(tmp_path_factory, cut, flips):
    data = bytearray((DATA / "model.tflite-int8.tflite").read_bytes())
    for at, xor in flips:
        data[at % len(data)] ^= xor
    if cut:
        data = data[: max(len(data) - cut, 0)]
    path = tmp_path_factory.mktemp("m") / "model.tflite"
    path.write_bytes(bytes(data))
    try:
        load(path).predict_pixels(np.zeros((1, 32, 32, 3), np.uint8))
    except ModelFileError as err:
        assert str(path) in str(err), err


GOOD = make_manifest()
MANIFEST_KEYS = [*([k] for k in GOOD), ["input", "height"], ["data", "splits"], ["reference", "path"],
                 ["artifacts", "tflite-int8"], ["config", "train"], ["config", "model"]]


@FUZZ
@given(key=st.sampled_from(MANIFEST_KEYS), value=JSON)
def test_any_manifest_is_opened_or_a_run_dir_error(tmp_path_factory, key, value):
    from featx_edge.training.run import Run

    manifest = json.loads(json.dumps(GOOD))
    node = manifest
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    run = tmp_path_factory.mktemp("run")
    (run / "manifest.json").write_text(json.dumps(manifest))
    try:
        opened = Run.open(run)
        opened.config  # noqa: B018 - the settings are validated when first read
        opened.exported()
        for fmt in opened.exported():
            opened.artifact_problems(fmt)
    except RunDirError as err:  # a damaged record, even of settings: not a ConfigError about the user's flags
        assert str(run / "manifest.json") in str(err), err
        return


@FUZZ
@given(key=st.sampled_from(["data_root", "classes", "train", "val", "test", "seed"]), value=JSON)
def test_any_splits_file_is_read_or_a_data_error(tmp_path_factory, key, value):
    from featx_edge.data.folders import load_splits

    splits = {"data_root": "/data", "classes": ["a", "b"], "train": ["a/1.png"], "val": ["b/2.png"],
              "test": ["a/3.png"], "seed": 0, key: value}
    path = tmp_path_factory.mktemp("s") / "splits.json"
    path.write_text(json.dumps(splits))
    try:
        loaded = load_splits(path)
    except DataError as err:
        assert str(path) in str(err), err
        return
    assert all(not p.startswith("/") and ".." not in p.split("/") for p in loaded.train + loaded.val + loaded.test)


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"[]", b"nul", f'{{"manifest_version": {MANIFEST_VERSION}'.encode(),
                                 b"1e999999"])
def test_unreadable_manifests(tmp_path, raw):
    from featx_edge.training.run import Run

    (tmp_path / "manifest.json").write_bytes(raw)
    with pytest.raises(RunDirError) as err:
        Run.open(tmp_path)
    assert f"`{tmp_path / 'manifest.json'}`" in str(err.value)
