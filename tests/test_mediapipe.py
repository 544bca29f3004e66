"""featx-edge's .tflite files work in MediaPipe Tasks' ImageClassifier (what Android, iOS and web apps use).

MediaPipe's dependencies clash with TensorFlow's, so it lives in its own virtual environment
(``.ci/run`` makes ``.venv-mediapipe``; or point ``FEATX_EDGE_MEDIAPIPE_PYTHON`` at a Python that
has ``mediapipe``). Each test runs a small script in that interpreter which parses the standard
TFLite Model Metadata with MediaPipe's own generated schema code, loads the model with
``ImageClassifier`` and classifies images; the test compares the category names with the
model's labels and the answers with featx-edge's own runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx_edge.runtime import load
from featx_edge.runtime.image import load_pixels

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "runtime"
TIMEOUT_S = 600

SCRIPT = r'''
import json, sys
import mediapipe as mp
from mediapipe.tasks.metadata import metadata_schema_py_generated as mfb
from mediapipe.tasks.metadata import schema_py_generated as sfb
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.core import base_options

def enum_name(cls, value):
    return next((k for k, v in vars(cls).items() if not k.startswith("_") and v == value), value)

def text(value):
    return value.decode() if isinstance(value, bytes) else value

def files(items):
    return [[text(f.name), enum_name(mfb.AssociatedFileType, f.type)] for f in items or []]

def tensor(t):
    out = {"name": text(t.name), "content": enum_name(mfb.ContentProperties, t.content.contentPropertiesType),
           "files": files(t.associatedFiles), "units": []}
    props = t.content.contentProperties
    if isinstance(props, mfb.ImagePropertiesT):
        out["color_space"] = enum_name(mfb.ColorSpaceType, props.colorSpace)
        out["default_size"] = [props.defaultSize.width, props.defaultSize.height]
    for unit in t.processUnits or []:
        options = unit.options
        out["units"].append([enum_name(mfb.ProcessUnitOptions, unit.optionsType),
                             [float(x) for x in options.mean], [float(x) for x in options.std]])
    if t.stats is not None:
        out["stats"] = [[float(x) for x in t.stats.min], [float(x) for x in t.stats.max]]
    return out

def standard_metadata(path):
    data = open(path, "rb").read()
    model = sfb.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        if model.Metadata(i).Name() == b"TFLITE_METADATA":
            blob = model.Buffers(model.Metadata(i).Buffer()).DataAsNumpy().tobytes()
            assert mfb.ModelMetadata.ModelMetadataBufferHasIdentifier(blob, 0), "no M001 identifier"
            md = mfb.ModelMetadataT.InitFromPackedBuf(blob, 0)
            sub = md.subgraphMetadata[0]
            return {"name": text(md.name), "version": text(md.version), "author": text(md.author),
                    "min_parser_version": text(md.minParserVersion), "files": files(md.associatedFiles),
                    "subgraphs": len(md.subgraphMetadata),
                    "inputs": [tensor(t) for t in sub.inputTensorMetadata],
                    "outputs": [tensor(t) for t in sub.outputTensorMetadata]}
    return None

job = json.load(sys.stdin)
results = {"mediapipe": mp.__version__, "models": {}}
for path in job["models"]:
    options = vision.ImageClassifierOptions(
        base_options=base_options.BaseOptions(model_asset_path=path), max_results=-1)
    answers = []
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for image in job["images"]:
            head = classifier.classify(mp.Image.create_from_file(image)).classifications[0]
            answers.append({"head": head.head_name, "categories": [
                [c.index, c.category_name, float(c.score)] for c in head.categories]})
    results["models"][path] = {"metadata": standard_metadata(path), "answers": answers}
with open(job["out"], "w") as fh:
    json.dump(results, fh)
'''


MEDIAPIPE_PIN = "mediapipe==1.2.3"
"""The version .ci/run installs (tests/test_new_user.py checks that the two agree)."""


def mediapipe_python() -> Path:
    """The interpreter that has mediapipe; the test is skipped, with the way to get one, if none."""
    chosen = os.environ.get("FEATX_EDGE_MEDIAPIPE_PYTHON")
    path = Path(chosen) if chosen else REPO / ".venv-mediapipe" / "bin" / "python"
    if not path.is_file():
        pytest.skip(f"no MediaPipe interpreter at {path}: create it with `python3 -m venv .venv-mediapipe && "
                    f".venv-mediapipe/bin/pip install {MEDIAPIPE_PIN}` (as .ci/run does) or set "
                    "FEATX_EDGE_MEDIAPIPE_PYTHON")
    return path


def run_mediapipe(models: list[Path], images: list[Path], tmp_path: Path) -> dict:
    out = tmp_path / "mediapipe.json"
    job = {"models": [str(m) for m in models], "images": [str(i) for i in images], "out": str(out)}
    proc = subprocess.run([str(mediapipe_python()), "-c", SCRIPT], input=json.dumps(job), capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"MediaPipe failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def score_tolerance(path: Path) -> float:
    """How far MediaPipe's scores may be from featx-edge's on the same pixels: the same model file
    in another build of the TFLite kernels. Measured: 0.0 for every format (MediaPipe 1.2.3,
    ai-edge-litert 2.3); a float kernel may round differently elsewhere, an int8 one by one step."""
    return 1.01 / 256 if "int8" in path.name else 1e-4


def check_model(path: Path, result: dict, images: list[Path], *, same_pixels: bool) -> None:
    """MediaPipe's metadata view, category names and answers match featx-edge's for one model.

    With ``same_pixels`` (images already at the model's size) the scores must match too."""
    predictor = load(path)
    md = result["metadata"]
    assert md is not None, f"{path.name}: MediaPipe's reader found no TFLITE_METADATA"
    assert (md["author"], md["min_parser_version"], md["subgraphs"]) == ("featx-edge", "1.0.0", 1)
    assert md["files"] == [["featx_edge.json", "DESCRIPTIONS"]]
    (image,), (output,) = md["inputs"], md["outputs"]
    assert image["content"] == "ImageProperties" and image["color_space"] == "RGB"
    assert image["default_size"] == [predictor.width, predictor.height]
    assert image["units"] == [["NormalizationOptions", [0.0], [1.0]]]
    assert image["stats"] == [[0.0], [255.0]]
    assert output["content"] == "FeatureProperties" and output["files"] == [["labels.txt", "TENSOR_AXIS_LABELS"]]

    ours = predictor.predict_proba(images)
    assert len(result["answers"]) == len(images)
    for probs, answer, image_path in zip(ours, result["answers"], images):
        categories = sorted(answer["categories"])  # by index
        assert answer["head"] == "probabilities"  # the output's TensorMetadata name
        assert [c[1] for c in categories] == predictor.labels, f"{path.name}: categories are not the labels"
        top = max(answer["categories"], key=lambda c: c[2])
        assert top[1] == predictor.labels[int(np.argmax(probs))], (
            f"{path.name} on {image_path.name}: MediaPipe says {top[1]}, featx-edge {predictor.decode(probs).label}")
        if same_pixels:
            scores = np.array([c[2] for c in categories])
            assert np.abs(scores - probs).max() <= score_tolerance(path), (path.name, image_path.name, scores, probs)


def test_mediapipe_classifies_the_committed_models(tmp_path):
    """Fast: the tiny committed models, on images of any size (MediaPipe resizes them itself) and on
    images of the model's size (the same pixels for both: scores must agree closely)."""
    models = [DATA / "model.tflite-float32.tflite", DATA / "model.tflite-int8.tflite"]
    any_size = sorted((DATA / "images").glob("*.png"))
    model_size = sorted((DATA / "selftest" / "images").glob("*.png"))
    result = run_mediapipe(models, any_size + model_size, tmp_path)
    for model in models:
        answers = result["models"][str(model)]
        check_model(model, {**answers, "answers": answers["answers"][:len(any_size)]}, any_size, same_pixels=False)
        check_model(model, {**answers, "answers": answers["answers"][len(any_size):]}, model_size, same_pixels=True)


@pytest.mark.slow
def test_mediapipe_classifies_every_tflite_export_of_the_main_run(trained_run, tmp_path):
    """The README's main run (EfficientNet-Lite0 on digits): every .tflite it exported, float and int8,
    gives MediaPipe the run's labels and featx-edge's top-1 on test images (given at the model's size,
    so both classify the same pixels)."""
    manifest = json.loads((trained_run / "manifest.json").read_text())
    models = [trained_run / a["path"] for a in manifest["artifacts"].values() if a["path"].endswith(".tflite")]
    assert {"model.tflite-float32.tflite", "model.tflite-int8.tflite"} <= {m.name for m in models}
    splits = json.loads((trained_run / "splits.json").read_text())
    height, width = manifest["input"]["height"], manifest["input"]["width"]
    images = []
    for i, rel in enumerate(splits["test"][::10]):  # every tenth: all ten digits appear
        path = tmp_path / f"{i:02d}.png"
        Image.fromarray(load_pixels(Path(splits["data_root"]) / rel, height=height, width=width)).save(path)
        images.append(path)
    result = run_mediapipe(models, images, tmp_path)
    for model in models:
        check_model(model, result["models"][str(model)], images, same_pixels=True)
