"""int8 variants on the main run: per-layer diagnosis, selective quantization, QAT, the budget."""

import json
import shutil

import numpy as np
import pytest

from featx_edge.cli import main
from featx_edge.rundir import read_manifest


@pytest.fixture
def int8_run(trained_run, tmp_path):
    """A private copy of the main run per test: no test sees another's exports or settings."""
    run = tmp_path / "run"
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
    main(["verify", str(int8_run), "--formats", "tflite-int8-selective", "--quiet"])
    row = json.loads((int8_run / "verify.json").read_text())["formats"]["tflite-int8-selective"]
    assert "float Keras reference" in row["compared_with"]
    assert row["top1_agreement"] >= 0.9, row  # a mixed model stays close to its float twin


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
    assert meta["quantization"]["trained_layers"] == ["head_dense", "probabilities"]
    assert main(["verify", str(int8_run), "--formats", "tflite-int8-qat", "--quiet"]) == 2  # see below
    row = json.loads((int8_run / "verify.json").read_text())["formats"]["tflite-int8-qat"]
    # The backbone stayed frozen, so QAT's int8 model is still the run's model: it is compared
    # with the run's reference.
    assert "float Keras reference" in row["compared_with"]
    assert not row["passed"] and row["top1_agreement"] < 0.5, row


@pytest.mark.xfail(strict=True, reason="known bug: tfmot's fake-quant ranges start at [-6, 6] and move by an "
                                       "EMA of decay 0.999, so EfficientNet-Lite's linear bottlenecks (values "
                                       "up to +-50) stay clipped after a short QAT; the QAT model is noise")
def test_qat_stays_close_to_its_float_twin(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    main(["export", str(run), "--formats", "tflite-int8-qat", "--qat-epochs", "1", "--quiet"])
    main(["verify", str(run), "--formats", "tflite-int8-qat", "--quiet"])
    row = json.loads((run / "verify.json").read_text())["formats"]["tflite-int8-qat"]
    assert row["top1_agreement"] >= 0.97, row


def test_qat_keeps_the_backbone_frozen():
    from featx_edge.config import ModelConfig
    from featx_edge.int8 import fit_variables, qat_model, trainable_variables
    from featx_edge.model import build_classifier
    from featx_edge.train import make_sequence

    clf = build_classifier(num_classes=3, weights_file=None,
                           config=ModelConfig(backbone="efficientnet_lite0", image_size=32, weights="none",
                                              head_units=8))
    head = ("head_dense", "probabilities")
    qat = qat_model(clf.model, trainable=head)
    variables = trainable_variables(qat, head)
    assert {v.name.split("/")[0].removeprefix("quant_") for v in variables} == set(head)
    frozen = {v.name: v.numpy().copy() for v in qat.weights if v.name.startswith(("stem_", "block", "top_"))
              and "kernel" in v.name or "moving_" in v.name}
    before = {v.name: v.numpy().copy() for v in variables}
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 16)
    fit_variables(qat, make_sequence(lambda idx: images[idx], labels, batch_size=8, seed=0),
                  variables=variables, epochs=2, learning_rate=1e-2)
    after = {v.name: v.numpy() for v in qat.weights}
    assert frozen and all(np.array_equal(after[name], value) for name, value in frozen.items()), \
        "backbone kernels and BatchNorm statistics must not move"
    assert any(not np.array_equal(after[name], value) for name, value in before.items()), "the head trains"


def test_qat_is_refused_for_mobilenet_v3():
    from featx_edge.config import ModelConfig
    from featx_edge.errors import ExportError
    from featx_edge.int8 import qat_model
    from featx_edge.model import build_classifier

    clf = build_classifier(num_classes=2, weights_file=None,
                           config=ModelConfig(backbone="mobilenet_v3_small", alpha=0.75, image_size=32, weights="none"))
    with pytest.raises(ExportError, match="quantization-aware training cannot wrap this model"):
        qat_model(clf.model)


def test_budget_judges_losses_on_enough_images_and_fails_loudly(int8_run, capsys):
    """A budget of 0 points: every image the reference gets right must stay right. Candidates are
    judged on validation plus calibration-free training images; a gain is never credited; a
    missed budget exits non-zero with the numbers."""
    rc = main(["export", str(int8_run), "--formats", "tflite-int8", "--int8-budget", "0", "--quiet"])
    decision = read_manifest(int8_run)["int8_selection"]
    assert decision["budget_points"] == 0 and "calibration-free training images" in decision["judged_on"]
    counts = read_manifest(int8_run)["data"]["counts"]
    tried = [a["format"] for a in decision["attempts"]]
    assert tried == ["tflite-int8", "tflite-int8-selective"][: len(tried)]
    for attempt in decision["attempts"]:
        assert attempt["images"] > counts["val"]  # more than validation alone
        assert attempt["loss_points"] == pytest.approx(100 * attempt["images_lost"] / attempt["images"])
        assert attempt["within_budget"] == (attempt["images_lost"] == 0 and attempt["top1_agreement"] >= 0.97)
        low, high = attempt["loss_ci95_points"]
        assert low <= attempt["loss_points"] <= high
    if decision["chosen"] is None:
        assert rc == 2 and "no int8 variant met `--int8-budget 0.0`" in capsys.readouterr().err
    else:
        assert rc == 0 and tried[-1] == decision["chosen"]


def test_budget_picks_plain_int8_when_it_is_good_enough(int8_run):
    assert main(["export", str(int8_run), "--formats", "tflite-int8", "--int8-budget", "5", "--quiet"]) == 0
    decision = read_manifest(int8_run)["int8_selection"]
    assert decision["chosen"] == "tflite-int8" and len(decision["attempts"]) == 1


def test_budget_validation():
    from featx_edge.config import ExportConfig
    from featx_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="int8_budget"):
        ExportConfig(int8_budget=-1.0)
    assert np.isclose(ExportConfig(int8_budget=0.5).int8_budget, 0.5)
