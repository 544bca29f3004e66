"""Hardening round 3 (issue 20), the TensorFlow-free part: `--threads` is bounded on every command
that takes it, a `.tflite` whose tensor name is not UTF-8 and a path the system refuses (too long)
are one line each, never a traceback or a crash."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from conftest import one_line_error as _one_line_error

from featx_edge.cli import main
from featx_edge.errors import ConfigError
from featx_edge.runtime import load
from featx_edge.runtime.metadata import METADATA_NAME, read_tflite

DATA = Path(__file__).resolve().parents[1] / "data" / "runtime"
TFLITE = DATA / "model.tflite-int8.tflite"
ONNX = DATA / "model.onnx-float32.onnx"
IMAGES = sorted((DATA / "images").glob("*.png"))
MAX_THREADS = 4 * (os.cpu_count() or 1)
LONG = "x" * 300  # one path component longer than any file system's 255-byte limit



# --- item 9: --threads bounded ---------------------------------------------------------------------

@pytest.mark.parametrize("model", [TFLITE, ONNX], ids=["litert", "onnxruntime"])
@pytest.mark.parametrize("threads", [MAX_THREADS + 1, 20_000, 100_000])
def test_predict_refuses_more_threads_than_the_bound(capsys, model, threads):
    """100000 on LiteRT gave a misleading XNNPACK error; 20000 on onnxruntime crashed the process."""
    assert main(["predict", str(model), str(IMAGES[0]), "--threads", str(threads)]) == 2
    _one_line_error(capsys, "`--threads`", f"at most {MAX_THREADS}", "logical CPUs", f"received `{threads}`")


@pytest.mark.parametrize("args", [["selftest", str(TFLITE)], ["bench", "no-such-run", "--threads"],
                                  ["device-check", "no-such-run"]], ids=["selftest", "bench", "device-check"])
def test_every_command_with_threads_bounds_it(capsys, args):
    value = f"1,{MAX_THREADS + 1}" if args[0] == "bench" else str(MAX_THREADS + 1)
    command = args + [value] if args[-1] == "--threads" else args + ["--threads", value]
    assert main(command) == 2
    _one_line_error(capsys, "`--threads`", f"at most {MAX_THREADS}", f"received `{MAX_THREADS + 1}`")


def test_the_bound_itself_is_accepted_and_the_api_checks_it_too():
    predictor = load(ONNX, threads=MAX_THREADS)
    assert len(predictor.predict(IMAGES[:1])) == 1
    with pytest.raises(ConfigError, match=f"at most {MAX_THREADS}"):
        load(TFLITE, threads=MAX_THREADS + 1)


# --- item 10: a tensor name that is not UTF-8 --------------------------------------------------------

def _with_renamed_tensor(tmp_path: Path, name: bytes) -> Path:
    """The int8 model with byte 0x80 in tensor ``name``, its recorded checksum updated to match
    (a damaged or hostile file that passes the integrity check)."""
    flatbuffer, meta = read_tflite(TFLITE)
    data = bytearray(flatbuffer)
    data[data.index(name) + 1] = 0x80
    meta = dict(meta, flatbuffer={"bytes": len(data), "sha256": hashlib.sha256(bytes(data)).hexdigest()})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(METADATA_NAME, json.dumps(meta))
    path = tmp_path / "model.tflite"
    path.write_bytes(bytes(data) + buf.getvalue())
    return path


@pytest.mark.parametrize("tensor", [b"serving_default_image:0", b"StatefulPartitionedCall:0"])
def test_a_tensor_name_that_is_not_utf8_is_one_line(tmp_path, capsys, tensor):
    model = _with_renamed_tensor(tmp_path, tensor)
    assert main(["predict", str(model), str(IMAGES[0])]) == 2
    _one_line_error(capsys, str(model), "tensor name", "not valid UTF-8")


# --- item 10: a path component longer than 255 bytes -------------------------------------------------

@pytest.mark.parametrize("args", [["predict", f"{LONG}.tflite", str(IMAGES[0])], ["bench", LONG],
                                  ["bundle", LONG, "--format", "tflite-int8", "--out", "b"],
                                  ["bundle", "run", "--format", "tflite-int8", "--out", LONG]],
                         ids=["predict-model", "bench", "bundle-run", "bundle-out"])
def test_a_name_too_long_is_one_line(tmp_path, capsys, args):
    args = [str(tmp_path / a) if a in (LONG, f"{LONG}.tflite", "b", "run") else a for a in args]
    assert main(args) == 2
    _one_line_error(capsys, LONG, "file name too long", "shorter names")


def test_predict_reports_an_image_name_too_long_and_goes_on(tmp_path, capsys):
    assert main(["predict", str(TFLITE), str(tmp_path / f"{LONG}.png"), str(IMAGES[0])]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(str(IMAGES[0])) and captured.out.count("\n") == 1
    assert "Traceback" not in captured.err and LONG in captured.err
