"""Non-finite outputs never pass on the device side: predict, the Predictor, selftest, device-check.

The NaN models are the committed toy models (tests/data/runtime/) with one classifier weight set
to NaN or +Inf, repacked without TensorFlow. +Inf in the "red" row of the dense kernel gives NaN
only on images whose red feature is positive (the two red ones): a model that is broken on some
images and not others.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featx_edge.cli import main
from featx_edge.errors import NonFiniteOutputError
from featx_edge.runtime import load
from featx_edge.runtime.metadata import pack_tflite, read_tflite
from featx_edge.runtime.selftest import golden_path, run_selftest, write_golden

DATA = Path(__file__).resolve().parents[1] / "data" / "runtime"
IMAGES = sorted((DATA / "images").glob("*.png"))
RED = [p for p in IMAGES if p.name.startswith("red")]
KERNEL = np.eye(3, dtype=np.float32) * 4.0  # the toy model's dense kernel (make_runtime_models.py)


def _poisoned(tmp_path: Path, fmt: str, value: float) -> Path:
    """A copy of the committed ``fmt`` model (and its selftest/ folder) whose dense kernel[0, 0] is
    ``value``; its golden file re-pointed at the new file, so only the numbers can fail it."""
    folder = tmp_path / f"{fmt}-{value}"
    shutil.copytree(DATA / "selftest", folder / "selftest")
    source = next(DATA.glob(f"model.{fmt}.*"))
    path = folder / source.name
    poisoned = KERNEL.copy()
    poisoned[0, 0] = value
    if fmt == "onnx-float32":
        onnx = pytest.importorskip("onnx")
        from onnx import numpy_helper

        model = onnx.load(str(source))
        (init,) = [i for i in model.graph.initializer if np.array_equal(numpy_helper.to_array(i), KERNEL)]
        init.CopyFrom(numpy_helper.from_array(poisoned, init.name))
        onnx.save(model, str(path))
    else:
        flatbuffer, meta = read_tflite(source)
        assert flatbuffer.count(KERNEL.tobytes()) == 1
        meta = {k: v for k, v in meta.items() if k != "flatbuffer"}
        path.write_bytes(pack_tflite(flatbuffer.replace(KERNEL.tobytes(), poisoned.tobytes()), meta))
    golden = golden_path(path)
    doc = json.loads(golden.read_text())
    doc["model_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    golden.write_text(json.dumps(doc))
    return path


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("fmt", ["tflite-float32", "onnx-float32"])
def test_the_predictor_raises_a_typed_error_naming_how_many_images(tmp_path, fmt):
    path = _poisoned(tmp_path, fmt, np.inf)
    predictor = load(path)
    with pytest.raises(NonFiniteOutputError, match=f"NaN/Inf outputs on {len(RED)} of {len(IMAGES)} image"):
        predictor.predict_proba(IMAGES)
    with pytest.raises(NonFiniteOutputError, match="re-export it"):
        predictor.predict(RED[:1])
    assert predictor.predict(IMAGES[:1])[0].label == "blue"  # an image with finite outputs still classifies
    probs = predictor.predict_proba(IMAGES, allow_nonfinite=True)  # for callers that count them
    assert int(np.sum(~np.isfinite(probs).all(1))) == len(RED)
    with pytest.raises(NonFiniteOutputError):
        predictor.decode(np.array([np.nan, 0.5, 0.5], np.float32))


@pytest.mark.parametrize("fmt", ["tflite-float32", "onnx-float32"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_predict_refuses_a_nan_model_with_one_line(tmp_path, capsys, fmt, json_flag):
    path = _poisoned(tmp_path, fmt, np.nan)
    assert main(["predict", str(path), str(IMAGES[0]), *json_flag]) == 2
    captured = capsys.readouterr()
    err = _one_line(captured.err)
    assert "NaN/Inf outputs on 1 of 1 image" in err and str(path) in err
    assert "nan" not in captured.out.lower() and captured.out == ""


def test_predict_json_never_prints_nan(tmp_path, capsys):
    """Finite images print as strict JSON; the first NaN one stops predict, exit status 2."""
    path = _poisoned(tmp_path, "onnx-float32", np.inf)
    blue = [p for p in IMAGES if p.name.startswith("blue")]
    assert main(["predict", str(path), *map(str, blue + RED), "--json"]) == 2
    captured = capsys.readouterr()

    def strict(name):
        raise ValueError(f"{name} in --json output")

    rows = [json.loads(line, parse_constant=strict) for line in captured.out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == [p.name for p in blue]
    assert "NaN/Inf outputs" in _one_line(captured.err)


@pytest.mark.parametrize("fmt", ["tflite-float32", "onnx-float32"])
def test_selftest_fails_a_nan_model(tmp_path, capsys, fmt):
    path = _poisoned(tmp_path, fmt, np.nan)
    with pytest.raises(NonFiniteOutputError, match="6 of 6 self-test images gave NaN/Inf outputs"):
        run_selftest(path)
    assert main(["selftest", str(path), str(DATA / "model.tflite-int8.tflite")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"FAIL {path}: self-test failed: 6 of 6") and "re-export" in lines[0]
    assert lines[1].startswith("PASS")


def test_no_golden_file_of_nan_is_written(tmp_path):
    model = tmp_path / "model.onnx-float32.onnx"
    shutil.copy(DATA / "model.onnx-float32.onnx", model)
    good = np.full((2, 3), 1 / 3, np.float32)
    for reference, expected, what in ((good, good * np.nan, "the onnx-float32 export"),
                                      (good * np.inf, good, "the Keras reference")):
        with pytest.raises(NonFiniteOutputError, match=f"{what} gave NaN/Inf outputs on 2 of 2"):
            write_golden(model, fmt="onnx-float32", images=["images/00.png", "images/01.png"], reference=reference,
                         expected=expected)
        assert not golden_path(model).exists()


def test_the_device_guest_reports_a_nan_model_and_writes_strict_json(tmp_path):
    from featx_edge.device.guest import main as guest_main

    path = _poisoned(tmp_path, "tflite-float32", np.inf)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"threads": 1, "models": [
        {"path": str(path), "format": "tflite-float32", "images": {"test": list(map(str, IMAGES))}},
        {"path": str(DATA / "model.tflite-int8.tflite"), "format": "tflite-int8",
         "images": {"test": list(map(str, IMAGES))}}]}))
    out = tmp_path / "results.json"
    assert guest_main(["--json", str(request), "--out", str(out)]) == 0
    results = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the results"))
    broken, good = results["models"]
    assert "outputs" not in broken and f"NaN/Inf outputs on {len(RED)} of {len(IMAGES)}" in broken["error"]
    assert len(good["outputs"]["test"]) == len(IMAGES)


def test_device_comparison_names_how_many_images_were_not_finite():
    from featx_edge.device.compare import compare_outputs

    host = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    guest = host.copy()
    guest[[0, 2], 1] = [np.nan, np.inf]
    row = compare_outputs(target="m", fmt="tflite-int8", core="cortex-a53", tolerance=0.03, guest_test=guest,
                          host_test=host, guest_selftest=host, reference=host, expected=host)
    assert not row.passed and row.nonfinite == 2
    assert row.problems == ["2 of 6 images gave NaN/Inf outputs (not finite) on cortex-a53"]
    assert json.dumps(row.to_dict(), allow_nan=False)


def test_device_check_refuses_a_nan_model_on_the_host_before_building_anything(tmp_path, monkeypatch, capsys):
    """The host's own outputs are checked first: one line, exit 2, and no guest environment is built."""
    from featx_edge.device import check

    path = _poisoned(tmp_path, "onnx-float32", np.nan)
    monkeypatch.setattr(check, "find_qemu", lambda arch: "/usr/bin/qemu-aarch64-static")
    monkeypatch.setattr(check, "ensure_environment", lambda *a, **k: pytest.fail("environment built for a NaN model"))
    assert main(["device-check", str(path), "--cpu", "cortex-a53"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "NaN/Inf outputs on 6 of 6 image" in err and str(path) in err
