"""Device-side tests: need only the base install (numpy, Pillow, onnxruntime, ai-edge-litert).

CI also runs this folder in a virtual environment without TensorFlow. The models in
tests/data/runtime/ were exported by featx-edge (tests/data/make_runtime_models.py): a toy
classifier that answers which colour channel dominates an image.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK_TENSORFLOW
from PIL import Image

from featx_edge.cli import main
from featx_edge.errors import ModelFileError
from featx_edge.runtime import load

DATA = Path(__file__).parents[1] / "data" / "runtime"
MODELS = sorted(DATA.glob("model.*"))
IMAGES = sorted((DATA / "images").glob("*.png"))


def test_models_are_there():
    assert [m.name for m in MODELS] == ["model.onnx-float32.onnx", "model.tflite-float32.tflite",
                                        "model.tflite-int8.tflite"]


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.name)
def test_labels_come_from_the_model_file(model):
    predictor = load(model)
    assert predictor.labels == ["red", "green", "blue"] and (predictor.height, predictor.width) == (32, 32)


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.name)
def test_every_input_kind_and_size(model):
    predictor = load(model, threads=1)
    for path in IMAGES:
        expected = path.name.split("_")[0]
        img = Image.open(path)
        arr = np.asarray(img)
        inputs = [path, str(path), img, img.convert("RGBA"), img.convert("P"), img.convert("CMYK"), arr,
                  np.asarray(img.resize((97, 13)))]
        preds = predictor.predict(inputs, top_k=3, batch_size=3)
        assert [p.label for p in preds] == [expected] * len(inputs), path.name
        assert all(len(p.top_k) == 3 and p.top_k[0][0] == expected for p in preds)
        assert all(abs(sum(s for _, s in p.top_k) - 1.0) < 0.02 for p in preds)
    gray = predictor.predict(np.full((20, 20), 128, np.uint8))[0]  # any mode, even one channel
    assert 0.2 < gray.score < 0.5  # no channel dominates a grey image


def test_int8_input_quantization_and_batching():
    int8 = load(DATA / "model.tflite-int8.tflite")
    fp32 = load(DATA / "model.tflite-float32.tflite")
    assert int8.backend.input_dtype == "uint8"
    pixels = int8.preprocess(IMAGES)
    np.testing.assert_allclose(int8.predict_pixels(pixels, batch_size=4), fp32.predict_pixels(pixels), atol=0.03)
    one_by_one = np.concatenate([int8.predict_pixels(pixels[i:i + 1]) for i in range(len(pixels))])
    np.testing.assert_allclose(int8.predict_pixels(pixels), one_by_one, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "wrong-extension", "missing", "foreign"])
@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.name)
def test_damaged_or_foreign_files_give_clear_errors(tmp_path, model, damage):
    good = model.read_bytes()
    path = tmp_path / model.name
    if damage == "truncated":
        path.write_bytes(good[: len(good) * 2 // 3])
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong-extension":
        path = path.with_suffix(".bin")
        path.write_bytes(good)
    elif damage == "foreign":  # a PNG renamed to a model
        path.write_bytes(IMAGES[0].read_bytes())
    with pytest.raises(ModelFileError, match=path.name):
        load(path)


def test_tflite_with_altered_bytes_is_refused(tmp_path):
    data = bytearray((DATA / "model.tflite-float32.tflite").read_bytes())
    data[len(data) // 4] ^= 0xFF
    path = tmp_path / "model.tflite"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load(path)


def test_runtime_imports_no_tensorflow():
    code = BLOCK_TENSORFLOW + f"""
from featx_edge.cli import main
import featx_edge.runtime as rt
for path in {[str(m) for m in MODELS]!r}:
    print(rt.load(path).predict([{str(IMAGES[0])!r}])[0].label)
sys.argv = ['featx-edge', 'selftest'] + {[str(m) for m in MODELS]!r}
rc = main(sys.argv[1:])
assert rc == 0, rc
heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'onnx', 'tf2onnx')]
assert not heavy, heavy
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == ["blue"] * 3


def test_predict_cli(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in IMAGES[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    rc = main(["predict", str(DATA / "model.tflite-int8.tflite"), str(folder), "--json", "--top-k", "2",
               "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 1
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == [p.name for p in IMAGES[:2]]
    assert [r["label"] for r in rows] == ["blue", "blue"]
    assert all(set(r) >= {"path", "label", "score", "top_k"} and len(r["top_k"]) == 2 for r in rows)
    assert "broken.jpg" in captured.err and "1 image(s) could not be classified" in captured.err

    assert main(["predict", str(DATA / "model.onnx-float32.onnx"), str(IMAGES[-1])]) == 0
    path, label, score = capsys.readouterr().out.strip().split("\t")
    assert path == str(IMAGES[-1]) and label == "red" and 0.5 < float(score) <= 1
    assert main(["predict", str(tmp_path / "nope.tflite"), str(IMAGES[0])]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_selftest_on_the_device(tmp_path, capsys):
    import shutil

    assert main(["selftest", *map(str, MODELS)]) == 0
    assert capsys.readouterr().out.count("PASS") == 3
    device = tmp_path / "device"
    shutil.copytree(DATA, device)
    golden_file = device / "selftest" / "model.tflite-int8.tflite.json"
    golden = json.loads(golden_file.read_text())
    golden["expected"] = (1.0 - np.asarray(golden["expected"])).tolist()  # a runtime that disagrees
    golden_file.write_text(json.dumps(golden))
    assert main(["selftest", str(device / "model.tflite-int8.tflite")]) == 1
    assert "self-test failed" in capsys.readouterr().out
    (device / "model.onnx-float32.onnx").rename(tmp_path / "lonely.onnx")
    assert main(["selftest", str(tmp_path / "lonely.onnx")]) == 1
    assert "no self-test data" in capsys.readouterr().out
