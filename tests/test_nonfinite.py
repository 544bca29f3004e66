"""Non-finite numbers never pass verify or export; nan thresholds and empty --formats are refused;
verify fails an export whose self-test golden file was written for an older export.

The runs are tiny (three classes of random images, a 0.35-width MobileNetV2 with random weights at
32 px, two float formats): one is trained and exported per module, and each test poisons a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_class_folder

from featx_edge.cli import main
from featx_edge.errors import ConfigError, NonFiniteOutputError
from featx_edge.files.atomic import sha256_file
from featx_edge.formats.registry import ALL_FORMATS, parse_threshold
from featx_edge.rundir.manifest import read_manifest

FORMATS = "tflite-float32,onnx-float32"


def _strict_json(path: Path) -> dict:
    """The file, with NaN refused. (`Infinity` stays allowed: verify.json records the SQNR of an exact
    match, a zero noise, as infinite.)"""
    def refuse(name):
        if name == "Infinity":
            return float("inf")
        raise ValueError(f"{name} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nonfinite")
    data = make_class_folder(root / "data", {"a": 10, "b": 10, "c": 10}, size=32)
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--backbone", "mobilenet_v2", "--alpha", "0.35",
                 "--image-size", "32", "--weights", "none", "--epochs", "1", "--seed", "0", "--quiet"]) == 0
    assert main(["export", str(run), "--formats", FORMATS, "--quiet"]) == 0
    return run


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def _artifact(run: Path, fmt: str) -> Path:
    return run / read_manifest(run)["artifacts"][fmt]["path"]


def _golden(run: Path, fmt: str) -> Path:
    model = _artifact(run, fmt)
    return model.parent / "selftest" / f"{model.name}.json"


def _poison_reference(run: Path) -> None:
    """One NaN in the first convolution kernel of the backbone, recorded as the run's weights."""
    import h5py

    with h5py.File(run / "model.weights.h5", "r+") as weights:
        kernels = []
        weights.visititems(lambda name, obj: kernels.append(name) if getattr(obj, "ndim", 0) == 4 else None)
        kernel = weights[kernels[0]]
        values = kernel[...]
        values.flat[0] = np.nan
        kernel[...] = values
    manifest = read_manifest(run)
    manifest["reference"]["sha256"] = sha256_file(run / "model.weights.h5")
    (run / "manifest.json").write_text(json.dumps(manifest))


def _poison_onnx(run: Path, value: float) -> None:
    """``value`` in the classifier's kernel of the onnx-float32 export, recorded in the manifest and in its
    golden file (so only the outputs can fail it)."""
    import onnx
    from onnx import numpy_helper

    from featx_edge.training.run import Run

    path = _artifact(run, "onnx-float32")
    model = onnx.load(str(path))
    classes = len(read_manifest(run)["labels"])
    init = next(i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[-1] == classes)
    kernel = numpy_helper.to_array(init).copy()
    kernel[0, 0] = value
    init.CopyFrom(numpy_helper.from_array(kernel, init.name))
    onnx.save(model, str(path))
    Run.open(run).record_artifact("onnx-float32", path)
    golden = json.loads(_golden(run, "onnx-float32").read_text())
    golden["model_sha256"] = sha256_file(path)
    _golden(run, "onnx-float32").write_text(json.dumps(golden))


@pytest.mark.slow
def test_the_healthy_tiny_run_passes(run, capsys):
    assert main(["verify", str(run), "--quiet"]) == 0
    report = _strict_json(run / "verify.json")
    assert report["passed"] and report["reference_nonfinite"] == 0
    assert all(entry["nonfinite"] == 0 for entry in report["formats"].values())


@pytest.mark.slow
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_verify_fails_an_export_with_nan_outputs_naming_how_many(run, capsys, value):
    _poison_onnx(run, value)
    assert main(["verify", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    images = _strict_json(run / "verify.json")["images"]
    assert f"onnx-float32: {images} of {images} test images gave NaN/Inf outputs" in err
    assert "tflite-float32" not in err  # the healthy export passes
    report = _strict_json(run / "verify.json")  # no NaN written, whatever the model gave
    assert not report["passed"] and report["formats"]["onnx-float32"]["nonfinite"] == images
    assert not report["formats"]["onnx-float32"]["passed"] and "top1_agreement" not in report["formats"]["onnx-float32"]
    assert report["formats"]["tflite-float32"]["passed"] and report["formats"]["tflite-float32"]["nonfinite"] == 0
    predictions = _strict_json(run / "verify_predictions.json")
    assert set(predictions["formats"]) == {"tflite-float32"}


@pytest.mark.slow
def test_a_nan_reference_fails_the_whole_verify_in_one_line(run, capsys):
    _poison_reference(run)
    assert main(["verify", str(run), "--quiet"]) == 2
    err = _one_line(capsys.readouterr().err)
    images = _strict_json(run / "verify.json")["images"]
    weights = run / "model.weights.h5"
    assert f"the Keras reference model `{weights}` gives NaN/Inf outputs on {images} of {images} test images" in err
    assert "broken (for example a NaN weight" in err and f"featx-edge train --out {run} --overwrite" in err
    report = _strict_json(run / "verify.json")
    assert not report["passed"] and report["reference_nonfinite"] == images and report["reference_accuracy"] == 0.0
    assert not any(entry["passed"] for entry in report["formats"].values())
    assert not (run / "verify_predictions.json").exists()  # nothing per image to show for a broken reference


@pytest.mark.slow
def test_export_refuses_a_nan_reference_before_converting(run, capsys):
    from featx_edge.export import export_run

    _poison_reference(run)
    before = {fmt: sha256_file(_artifact(run, fmt)) for fmt in ("tflite-float32", "onnx-float32")}
    assert main(["export", str(run), "--formats", "tflite-float32", "--quiet"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "the Keras reference model" in err and "NaN/Inf outputs" in err
    assert {fmt: sha256_file(_artifact(run, fmt)) for fmt in before} == before
    with pytest.raises(NonFiniteOutputError):  # the typed error, for callers of the API
        export_run(run, formats=("onnx-float32",))


@pytest.mark.slow
def test_verify_fails_an_export_whose_selftest_golden_is_older(run, capsys):
    """Item 13: `selftest` and `bundle` refuse a golden file written for another export; so does verify."""
    golden = _golden(run, "tflite-float32")
    doc = json.loads(golden.read_text())
    doc["model_sha256"] = "0" * 64  # written for an older export of this format
    golden.write_text(json.dumps(doc))
    assert main(["verify", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.strip().startswith("tflite-float32:"))
    assert "self-test file" in line and "older export" in line
    assert f"re-export it: `featx-edge export {run} --formats tflite-float32`" in line
    assert "onnx-float32" not in err
    report = _strict_json(run / "verify.json")
    assert not report["formats"]["tflite-float32"]["passed"] and report["formats"]["onnx-float32"]["passed"]
    assert main(["selftest", str(_artifact(run, "tflite-float32"))]) == 1  # the device agrees
    assert "written for another export" in capsys.readouterr().out

    golden.unlink()  # missing: selftest and bundle could not use the export either
    assert main(["verify", str(run), "--formats", "tflite-float32", "--quiet"]) == 2
    assert "self-test file" in capsys.readouterr().err and "missing or damaged" in (run / "verify.json").read_text()
    assert main(["export", str(run), "--formats", "tflite-float32", "--quiet"]) == 0
    assert main(["verify", str(run), "--quiet"]) == 0


# -- item 12: no NaN limit, no empty format list (no run needed: refused before any work) -------------

@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_a_non_finite_threshold_is_refused(tmp_path, capsys, value):
    with pytest.raises(ConfigError, match="finite number"):
        parse_threshold(f"tflite-int8.max_abs_diff={value}")
    run = tmp_path / "run"
    assert main(["verify", str(run), "--threshold", f"onnx-float32.max_abs_diff={value}", "--quiet"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"received `{value}`" in err and "finite number" in err
    assert main(["run", "--data", str(tmp_path / "data"), "--out", str(run), "--threshold",
                 f"tflite-int8.min_agreement={value}", "--quiet"]) == 2
    assert "finite number" in _one_line(capsys.readouterr().err)
    assert not run.exists()


def test_a_nan_threshold_in_a_config_file_is_refused(tmp_path):
    from featx_edge.config import load_config

    config = tmp_path / "c.toml"
    config.write_text("[verify.tflite-int8]\nmin_agreement = nan\n")
    with pytest.raises(ConfigError, match="finite number"):
        load_config(config)


@pytest.mark.parametrize("command", ["export", "verify", "run", "device-check"])
@pytest.mark.parametrize("formats", ["", ",", " , "])
def test_an_empty_format_list_is_refused_naming_the_formats(tmp_path, capsys, command, formats):
    run = tmp_path / "run"
    argv = {"export": ["export", str(run)], "verify": ["verify", str(run)], "device-check": ["device-check", str(run)],
            "run": ["run", "--data", str(tmp_path / "data"), "--out", str(run)]}[command]
    assert main([*argv, "--formats", formats]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "`--formats` is empty" in err and ", ".join(ALL_FORMATS) in err
    assert not run.exists() and not (tmp_path / "data").exists()
