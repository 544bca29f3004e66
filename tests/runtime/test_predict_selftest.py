"""`featx-edge predict` and `featx-edge selftest` given hostile inputs: flags out of range, folders
with hidden files, symlinks, no images or images with malformed metadata, labels with terminal
escape sequences and damaged self-test files. One line per problem, never a traceback."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import one_line_error as _one_line_error
from PIL import Image

from featx_edge.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "runtime"
MODELS = sorted(DATA.glob("model.*"))
TFLITE = DATA / "model.tflite-int8.tflite"
ONNX = DATA / "model.onnx-float32.onnx"
IMAGES = sorted((DATA / "images").glob("*.png"))


def _jpeg_with_malformed_exif(path: Path) -> Path:
    """A JPEG whose EXIF (rotated, with a text ImageWidth) makes Pillow's exif_transpose raise struct.error."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "a description"
    Image.new("RGB", (8, 6), (10, 200, 30)).save(path, format="JPEG", exif=exif.tobytes())
    data = bytearray(path.read_bytes())
    tiff = data.index(b"Exif\x00\x00") + 6
    order = ">" if data[tiff : tiff + 2] == b"MM" else "<"
    at = data.index(struct.pack(order + "HH", 0x010E, 2), tiff)
    data[at : at + 2] = struct.pack(order + "H", 0x0100)
    path.write_bytes(bytes(data))
    return path


def _folder(tmp_path: Path, images=IMAGES[:2]) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    return folder



# --- predict ---------------------------------------------------------------------------------------


def test_predict_goes_on_after_an_image_with_malformed_exif(tmp_path, capsys):
    folder = _folder(tmp_path)
    _jpeg_with_malformed_exif(folder / "a_bad_exif.jpg")  # sorted first: the others come after it
    assert main(["predict", str(TFLITE), str(folder)]) == 1
    captured = capsys.readouterr()
    assert [Path(line.split("\t")[0]).name for line in captured.out.splitlines()] == [p.name for p in IMAGES[:2]]
    assert "a_bad_exif.jpg: malformed EXIF" in captured.err and "1 image(s) could not be classified" in captured.err


@pytest.mark.parametrize("command", ["predict", "selftest"])
@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_below_one_name_the_flag(capsys, command, threads):
    args = [str(TFLITE), str(IMAGES[0])] if command == "predict" else [str(TFLITE)]
    assert main([command, *args, "--threads", threads]) == 2
    _one_line_error(capsys, "`--threads`", f"received `{threads}`")


@pytest.mark.parametrize("top_k", ["0", "-1"])
def test_top_k_below_one_is_refused(capsys, top_k):
    assert main(["predict", str(TFLITE), str(IMAGES[0]), "--top-k", top_k]) == 2
    _one_line_error(capsys, "`--top-k`", f"received `{top_k}`")


def test_plain_output_honours_top_k(capsys):
    image = str(IMAGES[0])
    assert main(["predict", str(ONNX), image, "--json", "--top-k", "2"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert main(["predict", str(ONNX), image, "--top-k", "2"]) == 0
    fields = capsys.readouterr().out.rstrip("\n").split("\t")
    assert len(fields) == 5 and fields[0] == image
    assert fields[1::2] == [pair["label"] for pair in row["top_k"]] and fields[1] == row["label"]  # top-1 first
    assert [float(s) for s in fields[2::2]] == pytest.approx([pair["score"] for pair in row["top_k"]], abs=1e-4)
    assert main(["predict", str(ONNX), image, "--top-k", "3"]) == 0
    assert len(capsys.readouterr().out.rstrip("\n").split("\t")) == 7
    assert main(["predict", str(ONNX), image]) == 0  # without --top-k: the best label only, as before
    assert len(capsys.readouterr().out.rstrip("\n").split("\t")) == 3


@pytest.mark.parametrize("content", ["empty", "no-image-files", "only-hidden-images"])
def test_a_folder_without_images_is_an_error(tmp_path, capsys, content):
    folder = tmp_path / "imgs"
    folder.mkdir()
    if content == "no-image-files":
        (folder / "notes.txt").write_text("not an image")
    elif content == "only-hidden-images":
        shutil.copy(IMAGES[0], folder / ".hidden.png")
        (folder / ".thumbs").mkdir()
        shutil.copy(IMAGES[0], folder / ".thumbs" / "a.png")
    assert main(["predict", str(TFLITE), str(folder)]) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: no images found in {folder} (looked for .jpg, .jpeg, .png"), err


def test_predict_walk_ignores_hidden_names_and_reports_symlinks_leaving_the_folder(tmp_path, capsys):
    folder = _folder(tmp_path)
    (folder / ".cache").mkdir()
    shutil.copy(IMAGES[2], folder / ".cache" / "x.png")
    shutil.copy(IMAGES[3], folder / "._resource_fork.png")
    (folder / "sub").mkdir()
    shutil.copy(IMAGES[4], folder / "sub" / ".y.png")
    outside = tmp_path / "outside.png"
    shutil.copy(IMAGES[5], outside)
    (folder / "escape.png").symlink_to(outside)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "alias.png").symlink_to(folder / IMAGES[0].name)  # inside the folder: classified
    assert main(["predict", str(TFLITE), str(folder)]) == 0
    captured = capsys.readouterr()
    names = [Path(line.split("\t")[0]).name for line in captured.out.splitlines()]
    assert names == ["alias.png", *[p.name for p in IMAGES[:2]]]
    warnings = captured.err.splitlines()
    assert len(warnings) == 2 and all(line.startswith("warning: skipped ") for line in warnings), captured.err
    assert "escape.png" in warnings[0] and "outside" in warnings[0] and "loop" in warnings[1]


def test_labels_with_terminal_escapes_are_printed_escaped(monkeypatch, capsys):
    from featx_edge import runtime

    hostile = ["\x1b[31mred\x1b[0m", "gr\teen", "blue\u202e\n"]
    real_load = runtime.load

    def load(path, **kwargs):
        predictor = real_load(path, **kwargs)
        predictor.labels = hostile
        return predictor

    monkeypatch.setattr(runtime, "load", load)
    assert main(["predict", str(ONNX), str(IMAGES[0]), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\x1b" not in out and "\u202e" not in out
    fields = out.rstrip("\n").split("\t")
    assert len(fields) == 7
    assert set(fields[1::2]) == {"\\x1b[31mred\\x1b[0m", "gr\\teen", "blue\\u202e\\n"}
    assert main(["predict", str(ONNX), str(IMAGES[0]), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\x1b" not in out and "\u202e" not in out and "\t" not in out
    assert {pair["label"] for pair in json.loads(out)["top_k"]} == set(hostile)  # JSON keeps the exact label


# --- selftest --------------------------------------------------------------------------------------


def _damage(golden: Path, kind: str) -> None:
    data = json.loads(golden.read_text())
    if kind == "not-json":
        golden.write_text('{"format": "tflite-int8", "images": [')
        return
    if kind == "not-utf8":
        golden.write_bytes(b"\xff\xfe\x00{")
        return
    if kind == "a-list":
        data = [data]
    elif kind == "missing-keys":
        del data["expected"], data["images"]
    elif kind == "images-not-a-list":
        data["images"] = 5
    elif kind == "image-not-a-string":
        data["images"][0] = None
    elif kind == "image-leaves-the-folder":
        data["images"][0] = "../../model.tflite-int8.tflite"
    elif kind == "expected-text":
        data["expected"] = "high"
    elif kind == "expected-ragged":
        data["expected"][0] = data["expected"][0][:1]
    elif kind == "expected-bool":
        data["expected"][0][0] = True
    elif kind == "expected-nan":
        data["expected"][0][0] = float("nan")  # json writes NaN, which is not JSON
    elif kind == "fewer-rows":
        data["reference"] = data["reference"][:-1]
    elif kind == "wrong-class-count":
        data["expected"] = [row + [0.0] for row in data["expected"]]
        data["reference"] = [row + [0.0] for row in data["reference"]]
    elif kind == "format-unknown":
        data["format"] = "tflite-int4"
    elif kind == "format-number":
        data["format"] = 8
    elif kind == "image-missing":  # the other models share the images: name one that is not there
        data["images"][0] = "images/missing.png"
    elif kind == "image-broken":
        (golden.parent / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
        data["images"][0] = "images/broken.png"
    golden.write_text(json.dumps(data))


DAMAGES = ["not-json", "not-utf8", "a-list", "missing-keys", "images-not-a-list", "image-not-a-string",
           "image-leaves-the-folder", "expected-text", "expected-ragged", "expected-bool", "expected-nan",
           "fewer-rows", "wrong-class-count", "format-unknown", "format-number", "image-missing", "image-broken"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_golden_copy_fails_that_model_only(tmp_path, capsys, kind):
    device = tmp_path / "device"
    shutil.copytree(DATA, device)
    damaged = device / "model.tflite-int8.tflite"
    _damage(device / "selftest" / f"{damaged.name}.json", kind)
    models = [str(device / m.name) for m in MODELS]
    assert main(["selftest", *models]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == len(models) and "Traceback" not in captured.out + captured.err
    fails = [line for line in lines if line.startswith("FAIL ")]
    assert len(fails) == 1 and fails[0].startswith(f"FAIL {damaged}: "), lines
    assert "selftest" in fails[0]  # names the golden file (or its image) to copy again
    assert sum(line.startswith("PASS ") for line in lines) == len(models) - 1


@pytest.mark.parametrize("threads", [0, -1, True, 1.5])
def test_run_selftest_refuses_bad_thread_counts(threads):
    from featx_edge.errors import ConfigError
    from featx_edge.runtime.selftest import run_selftest

    with pytest.raises(ConfigError, match="`threads` must be an integer >= 1"):
        run_selftest(TFLITE, threads=threads)
