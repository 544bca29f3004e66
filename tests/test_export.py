"""The trained run: transfer really happens, every format is written, checked and described."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featx_edge.files.atomic import sha256_file
from featx_edge.formats.registry import FORMATS
from featx_edge.rundir.manifest import read_manifest


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_imagenet_backbone_transfers_to_digits(trained_run):
    """Frozen ImageNet EfficientNet-Lite0; the head alone learns all ten digits well."""
    manifest = read_manifest(trained_run)
    assert manifest["labels"] == [f"digit_{d}" for d in range(10)]
    assert manifest["training"]["test_accuracy"] >= 0.9  # chance is 0.1
    assert manifest["training"]["stage1"]["epochs"] == 60
    assert manifest["backbone"]["name"] == "efficientnet_lite0" and manifest["backbone"]["weights"] == "imagenet"
    assert len(manifest["backbone"]["weights_sha256"]) == 64  # the converted file the run used


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_run_directory_contract(trained_run, sample_root):
    manifest = read_manifest(trained_run)
    splits = json.loads((trained_run / "splits.json").read_text())
    assert Path(splits["data_root"]) == (sample_root / "all").resolve()
    assert not set(splits["test"]) & (set(splits["train"]) | set(splits["val"]))
    assert manifest["data"]["counts"] == {k: len(splits[k]) for k in ("train", "val", "test")}
    assert manifest["input"] == {"name": "image", "height": 96, "width": 96, "channels": 3, "layout": "NHWC",
                                 "color": "RGB", "dtype": "float32", "value_range": [0, 255],
                                 "resize": "bilinear"}
    assert manifest["config"]["model"]["image_size"] == 96 and manifest["config"]["seed"] == 0
    assert set(manifest["artifacts"]) == set(FORMATS)
    for fmt, entry in manifest["artifacts"].items():
        path = trained_run / entry["path"]
        assert path.name.startswith(f"model.{fmt}.")
        assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
    assert not list(trained_run.rglob(".tmp-*")), "no temporary files may be left behind"


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_run_verified_every_format(trained_run):
    """`featx-edge run` ends with verify: each export's test accuracy is close to the reference."""
    report = json.loads((trained_run / "verify.json").read_text())
    reference = read_manifest(trained_run)["training"]["test_accuracy"]
    assert report["reference_accuracy"] == pytest.approx(reference, abs=1e-6)
    rows = {fmt: row["accuracy"] for fmt, row in report["formats"].items()}
    assert set(rows) == set(FORMATS)
    for fmt in ("tflite-float32", "onnx-float32", "tflite-float16"):
        assert rows[fmt] == pytest.approx(reference, abs=0.01), fmt
    for fmt in ("tflite-dynamic", "tflite-int8", "onnx-int8"):  # the default gate: at most 1 point lost
        assert rows[fmt] >= reference - 0.01 - 1e-9, fmt


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_int8_is_integer_only(trained_run):
    from featx_edge.export.tflite import integer_report
    from featx_edge.runtime.metadata import read_tflite

    flatbuffer, meta = read_tflite(trained_run / "export" / "model.tflite-int8.tflite")
    report = integer_report(flatbuffer)
    assert report["input_dtype"] == "uint8" and report["output_dtype"] == "uint8"
    assert report["float_tensors"] == []
    assert meta["input"]["dtype"] == "uint8"


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_float_model_fails_the_integer_check(trained_run):
    from featx_edge.errors import ExportError
    from featx_edge.export.tflite import check_integer_only
    from featx_edge.runtime.metadata import read_tflite

    flatbuffer, _ = read_tflite(trained_run / "export" / "model.tflite-float32.tflite")
    with pytest.raises(ExportError, match="kept float parts: input_dtype is float32"):
        check_integer_only(flatbuffer)


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_labels_and_contract_travel_with_each_model(trained_run):
    import onnx

    from featx_edge.runtime.metadata import read_tflite

    labels = [f"digit_{d}" for d in range(10)]
    for fmt in FORMATS:
        path = trained_run / read_manifest(trained_run)["artifacts"][fmt]["path"]
        if fmt.startswith("tflite"):
            import zipfile

            _, meta = read_tflite(path)
            assert zipfile.ZipFile(path).read("labels.txt").decode().split() == labels
        else:
            proto = onnx.load(str(path))
            props = {p.key: p.value for p in proto.metadata_props}
            meta = json.loads(props["featx_edge"])
            assert props["labels"].split("\n") == labels
            dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
            assert dim.dim_param and not dim.dim_value, "ONNX batch dimension must be dynamic"
        assert meta["labels"] == labels and meta["format"] == fmt
        assert (meta["input"]["height"], meta["input"]["width"]) == (96, 96)


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_interrupted_export_leaves_no_partial_file(run_copy, monkeypatch):
    """A failing conversion must not leave a half-written model nor a changed manifest."""
    from featx_edge.export import export_run
    from featx_edge.files import atomic

    run = run_copy
    target = run / "export" / "model.tflite-float16.tflite"
    target.unlink()
    before = (run / "manifest.json").read_text()

    def interrupted_rename(src, dst):  # the model bytes are written, then Ctrl-C hits
        assert Path(src).stat().st_size > 0
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        export_run(run, formats="tflite-float16")
    assert not target.exists()
    assert not list(run.rglob(".tmp-*"))
    assert (run / "manifest.json").read_text() == before


def test_export_of_a_non_run_is_a_clear_error(tmp_path, capsys):
    from featx_edge.cli import main

    assert main(["export", str(tmp_path)]) == 2
    assert "is not a featx-edge run directory" in capsys.readouterr().err


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_onnx_runs_any_batch(trained_run):
    from featx_edge.runtime import load

    predictor = load(trained_run / "export" / "model.onnx-float32.onnx")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    single = np.concatenate([predictor.predict_pixels(pixels[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(predictor.predict_pixels(pixels, batch_size=3), single, atol=1e-5)


def test_written_files_get_ordinary_permissions(tmp_path):
    import os

    from featx_edge.files.atomic import write_bytes

    path = write_bytes(tmp_path / "x.bin", b"data")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_onnx_int8_falls_back_to_minmax_and_says_so(tmp_path, monkeypatch, capsys):
    """onnxruntime's histogram calibration fails on tensors with no range; export says so."""
    from featx_edge.export import onnx_int8
    from featx_edge.runtime import load

    source = Path(__file__).parent / "data" / "runtime" / "model.onnx-float32.onnx"
    real = onnx_int8._quantize

    def flaky(float_model, input_name, calibration, method, *recipe):
        if method == "percentile":
            raise ValueError("Too many bins for data range. Cannot create 2048 finite-sized bins.")
        return real(float_model, input_name, calibration, method, *recipe)

    monkeypatch.setattr(onnx_int8, "_quantize", flaky)
    meta = load(source).metadata
    calibration = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    used = onnx_int8.quantize(source, tmp_path / "int8.onnx", calibration=calibration, method="percentile",
                              metadata=dict(meta, format="onnx-int8"))
    assert used.startswith("minmax (fallback: percentile failed")
    assert "using minmax" in capsys.readouterr().err
    predictor = load(tmp_path / "int8.onnx")
    assert predictor.metadata["quantization"]["calibration"] == used
    assert predictor.predict(np.full((8, 8, 3), (250, 10, 10), np.uint8))[0].label == "red"


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_onnx_int8_really_computes_in_int8(trained_run):
    """verify's int8 check: QDQ pairs around the convolutions, most MACs in int8; a float graph fails."""
    from featx_edge.export.macs import onnx_quantization_report
    from featx_edge.verify.runner import _onnx_int8_problems

    report = json.loads((trained_run / "verify.json").read_text())["formats"]["onnx-int8"]["integer"]
    assert report["quantize_nodes"] > 50 and report["dequantize_nodes"] > 50
    assert report["int8_mac_share"] > 0.95 and report["macs"] > 50e6  # Lite0 at 96 px: ~71 M MACs
    float_report = onnx_quantization_report(trained_run / "export" / "model.onnx-float32.onnx")
    assert float_report["int8_mac_share"] == 0 and float_report["macs"] == report["macs"]
    assert _onnx_int8_problems(float_report)[0].startswith("not quantized")


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_verify_records_what_it_measured(trained_run):
    report = json.loads((trained_run / "verify.json").read_text())
    manifest = read_manifest(trained_run)
    assert report["reference_sha256"] == manifest["reference"]["sha256"]
    for fmt, row in report["formats"].items():
        assert row["sha256"] == manifest["artifacts"][fmt]["sha256"]
        low, high = row["top1_agreement_ci95"]
        assert low <= row["top1_agreement"] <= high
        c_low, c_high = row["accuracy_change_ci95_points"]
        assert c_low <= row["accuracy_change_points"] <= c_high


@pytest.fixture(scope="module")
def three_digits(tmp_path_factory, sample_root) -> Path:
    """A small folder: twelve images each of three digits."""
    root = tmp_path_factory.mktemp("three") / "digits"
    for digit in ("digit_0", "digit_1", "digit_2"):
        (root / digit).mkdir(parents=True)
        for image in sorted((sample_root / "all" / digit).iterdir())[:12]:
            shutil.copy(image, root / digit / image.name)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("backbone, style", [
    (["--backbone", "mobilenet_v2", "--alpha", "0.35"], "tf"),
    (["--backbone", "mobilenet_v3_small", "--alpha", "0.75"], "builtin"),
    (["--backbone", "vgg16"], "caffe"),
])
def test_every_preprocessing_style_exports_and_verifies(three_digits, tmp_path, backbone, style):
    """Each in-graph preprocessing (tf: [-1, 1]; builtin: inside the Keras model; caffe: BGR minus
    the ImageNet mean) survives TFLite and ONNX conversion: float exports match the reference at
    the default thresholds, and full-integer int8 converts to an integer-only model that runs."""
    from featx_edge.backbones.registry import get_backbone
    from featx_edge.cli import main
    from featx_edge.runtime import load

    assert get_backbone(backbone[1]).preprocessing == style
    run = tmp_path / "run"
    assert main(["train", "--data", str(three_digits), "--out", str(run), *backbone, "--weights", "none",
                 "--image-size", "32", "--epochs", "2", "--quiet"]) == 0
    assert main(["export", str(run), "--formats", "tflite-float32,onnx-float32,tflite-int8", "--quiet"]) == 0
    assert main(["verify", str(run), "--formats", "tflite-float32,onnx-float32", "--quiet"]) == 0
    report = json.loads((run / "verify.json").read_text())
    for fmt in ("tflite-float32", "onnx-float32"):
        assert report["formats"][fmt]["top1_agreement"] == 1.0
        assert report["formats"][fmt]["max_abs_diff"] <= 1e-4
    int8 = load(run / read_manifest(run)["artifacts"]["tflite-int8"]["path"])
    assert int8.backend.input_dtype == "uint8" and int8.metadata["input"]["dtype"] == "uint8"
    probs = int8.predict_pixels(np.zeros((2, 32, 32, 3), np.uint8))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1.0, atol=0.02)


@pytest.mark.slow
def test_a_failed_export_keeps_the_recorded_settings_and_artifacts(run_copy, monkeypatch, capsys):
    from featx_edge.cli import main
    from featx_edge.errors import ExportError
    from featx_edge.export.exporter import Exporter

    run = run_copy
    before = read_manifest(run)

    def fails(self, spec, path):
        path.write_bytes(b"half a model")
        raise ExportError("onnxruntime quantization failed (simulated)")

    monkeypatch.setattr(Exporter, "_onnx_int8", fails)
    rc = main(["export", str(run), "--formats", "onnx-int8", "--onnx-calibration", "minmax", "--quiet"])
    assert rc == 2 and "quantization failed (simulated)" in capsys.readouterr().err
    after = read_manifest(run)
    assert after["config"] == before["config"]  # --onnx-calibration minmax was not recorded
    entry = after["artifacts"]["onnx-int8"]
    assert entry == before["artifacts"]["onnx-int8"] and sha256_file(run / entry["path"]) == entry["sha256"]
    assert not list((run / "export").glob(".tmp-*"))
