"""The device runtime: every input kind, bad files, and no TensorFlow in sight."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK_TENSORFLOW
from PIL import Image

MODELS = ["tflite-float32", "tflite-int8", "onnx-float32"]


def _model(run: Path, fmt: str) -> Path:
    return run / "export" / f"model.{fmt}.{'onnx' if fmt.startswith('onnx') else 'tflite'}"


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
@pytest.mark.parametrize("fmt", MODELS)
def test_every_input_kind_gives_the_same_answer(trained_run, sample_root, fmt):
    from featx_edge.runtime import load

    predictor = load(_model(trained_run, fmt))
    path = min((sample_root / "all" / "digit_7").glob("*.png"))
    gray = Image.open(path)  # 32x32 grayscale file; the model wants 64x64 RGB
    rgb_array = np.asarray(gray.convert("RGB"))
    inputs = [path, str(path), gray, gray.convert("RGBA"), gray.convert("P"), np.asarray(gray), rgb_array]
    preds = predictor.predict(inputs, top_k=2)
    assert {p.label for p in preds} == {preds[0].label}
    scores = np.array([p.score for p in preds])
    np.testing.assert_allclose(scores, scores[0], atol=0.02)
    assert len(preds[0].top_k) == 2 and preds[0].top_k[0] == (preds[0].label, preds[0].score)
    assert preds[0].top_k[0][1] >= preds[0].top_k[1][1]


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_predictions_match_the_reference_on_the_test_split(trained_run):
    """Runtime probabilities match the Keras model on held-out images (float32: tight)."""
    from featx_edge.data.folders import load_images, load_splits
    from featx_edge.rundir.manifest import read_manifest
    from featx_edge.runtime import load
    from featx_edge.training.run import Run

    splits = load_splits(trained_run / "splits.json")
    pixels = load_images(splits.root, splits.test, size=read_manifest(trained_run)["input"]["height"])
    reference = Run.open(trained_run).reference().model(pixels.astype(np.float32)).numpy()
    # (format, max |dprob| bound, mean |dprob| bound, top-1 agreement bound). Measured on x86-64
    # (Zen 4): mean |dprob| 1.7e-4 float16, 1.9e-3 dynamic, 4.4e-3 int8; the bounds leave room
    # for other CPUs' int8 kernels, and the agreement bounds are verify's default gates.
    for fmt, max_d, mean_d, agree in (("tflite-float32", 1e-4, 1e-5, 1.0), ("onnx-float32", 1e-4, 1e-5, 1.0),
                                      ("tflite-float16", 0.05, 1e-3, 0.98), ("tflite-dynamic", 0.6, 0.01, 0.97),
                                      ("tflite-int8", 0.8, 0.015, 0.97)):
        probs = load(_model(trained_run, fmt)).predict_pixels(pixels)
        delta = np.abs(probs - reference)
        assert delta.max() <= max_d and delta.mean() <= mean_d, fmt
        assert np.mean(probs.argmax(1) == reference.argmax(1)) >= agree, fmt


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_runtime_imports_no_tensorflow(trained_run, sample_root):
    """In a fresh interpreter where TF, Keras, tf2onnx and onnx cannot be imported, predict works."""
    image = min((sample_root / "all" / "digit_5").glob("*.png"))
    code = BLOCK_TENSORFLOW + f"""
import featx_edge.runtime as rt
for path in {[str(_model(trained_run, f)) for f in MODELS]!r}:
    print(rt.load(path).predict([{str(image)!r}])[0].label)
assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'onnx', 'tf2onnx')]
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 3


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_selftest_passes_for_every_export(trained_run, capsys):
    from featx_edge.cli import main
    from featx_edge.rundir.manifest import read_manifest

    models = [str(trained_run / e["path"]) for e in read_manifest(trained_run)["artifacts"].values()]
    assert len(list((trained_run / "export" / "selftest" / "images").glob("*.png"))) == 8
    assert main(["selftest", *models]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == len(models) and "FAIL" not in out
