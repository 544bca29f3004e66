"""int8 variants on a tiny model: per-layer diagnosis, selective quantization, QAT, the budget."""

import json
import shutil

import numpy as np
import pytest

from featx_edge.cli import main
from featx_edge.rundir import read_manifest


@pytest.fixture(scope="module")
def int8_run(trained_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(trained_run, run)
    return run


def test_selective_keeps_the_worst_layers_in_float(int8_run):
    from featx_edge.export.tflite import integer_report
    from featx_edge.runtime.metadata import read_tflite

    assert main(["export", str(int8_run), "--formats", "tflite-int8-selective", "--quiet"]) == 0
    layers = json.loads((int8_run / "int8_layers.json").read_text())["layers"]
    scores = [row["rmse_over_scale"] for row in layers if row["rmse_over_scale"] is not None]
    assert len(scores) > 20 and scores == sorted(scores, reverse=True)
    flatbuffer, meta = read_tflite(int8_run / read_manifest(int8_run)["artifacts"]["tflite-int8-selective"]["path"])
    kept = meta["quantization"]["float_layers"]
    assert kept == [row["tensor"] for row in layers[:5]]
    report = integer_report(flatbuffer)
    assert report["float_tensors"], "a selective model keeps some float tensors"
    assert main(["verify", str(int8_run), "--formats", "tflite-int8-selective", "--quiet",
                 "--threshold", "tflite-int8-selective.min_agreement=0.8",
                 "--threshold", "tflite-int8-selective.max_accuracy_drop=10"]) == 0


def test_qat_exports_an_integer_model(int8_run):
    from featx_edge.export.tflite import integer_report
    from featx_edge.runtime.metadata import read_tflite

    assert main(["export", str(int8_run), "--formats", "tflite-int8-qat", "--qat-epochs", "1", "--quiet"]) == 0
    manifest = read_manifest(int8_run)
    assert manifest["config"]["train"]["qat_epochs"] == 1
    flatbuffer, meta = read_tflite(int8_run / manifest["artifacts"]["tflite-int8-qat"]["path"])
    report = integer_report(flatbuffer)
    assert report["input_dtype"] == "uint8" and report["float_tensors"] == []
    assert meta["quantization"]["method"] == "tfmot quantization-aware training"
    main(["verify", str(int8_run), "--formats", "tflite-int8-qat", "--quiet"])
    row = json.loads((int8_run / "verify.json").read_text())["formats"]["tflite-int8-qat"]
    assert row["accuracy"] >= row["reference_accuracy"] - 0.1  # QAT keeps the model working


def test_qat_is_refused_for_mobilenet_v3():
    from featx_edge.config import ModelConfig
    from featx_edge.errors import ExportError
    from featx_edge.int8 import qat_model
    from featx_edge.model import build_classifier

    clf = build_classifier(num_classes=2, weights_file=None,
                           config=ModelConfig(backbone="mobilenet_v3_small", alpha=0.75, image_size=32, weights="none"))
    with pytest.raises(ExportError, match="quantization-aware training cannot wrap this model"):
        qat_model(clf.model)


def test_budget_tries_variants_in_order_and_records_them(int8_run):
    assert main(["export", str(int8_run), "--formats", "tflite-int8", "--int8-budget", "0",
                 "--qat-epochs", "1", "--quiet"]) == 0
    decision = read_manifest(int8_run)["int8_selection"]
    assert decision["budget_points"] == 0 and decision["split"] == "val"
    order = ["tflite-int8", "tflite-int8-selective", "tflite-int8-qat"]
    tried = [a["format"] for a in decision["attempts"]]
    assert tried == order[: len(tried)]
    for attempt in decision["attempts"]:
        assert attempt["within_budget"] == (attempt["drop_points"] <= 0)
        assert 0 <= attempt["val_agreement"] <= 1
    passing = [a["format"] for a in decision["attempts"] if a["within_budget"]]
    assert decision["chosen"] == (passing[0] if passing else None)
    if decision["chosen"] is not None:
        assert tried[-1] == decision["chosen"]
    else:
        assert len(tried) == 3 and "no int8 variant met the budget" in decision["note"]


def test_budget_validation():
    from featx_edge.config import ExportConfig
    from featx_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="int8_budget"):
        ExportConfig(int8_budget=-1.0)
    assert np.isclose(ExportConfig(int8_budget=0.5).int8_budget, 0.5)
