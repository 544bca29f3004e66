"""int8 variants on the main run: per-layer diagnosis, selective quantization, QAT, the budget."""

import json

import numpy as np
import pytest

from featx_edge.cli import main
from featx_edge.rundir.manifest import read_manifest


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_selective_keeps_the_worst_layers_in_float(run_copy):
    from featx_edge.export.tflite import integer_report
    from featx_edge.runtime.metadata import read_tflite

    assert main(["export", str(run_copy), "--formats", "tflite-int8-selective", "--quiet"]) == 0
    layers = json.loads((run_copy / "int8_layers.json").read_text())["layers"]
    scores = [row["rmse_over_scale"] for row in layers if row["rmse_over_scale"] is not None]
    assert len(scores) > 20 and scores == sorted(scores, reverse=True)
    flatbuffer, meta = read_tflite(run_copy / read_manifest(run_copy)["artifacts"]["tflite-int8-selective"]["path"])
    kept = meta["quantization"]["float_layers"]
    assert kept == [row["tensor"] for row in layers[:5]]
    report = integer_report(flatbuffer)
    assert report["float_tensors"], "a selective model keeps some float tensors"
    rc = main(["verify", str(run_copy), "--formats", "tflite-int8-selective", "--quiet"])
    row = json.loads((run_copy / "verify.json").read_text())["formats"]["tflite-int8-selective"]
    assert rc == (0 if row["passed"] else 2)
    assert "float Keras reference" in row["compared_with"]
    assert row["top1_agreement"] >= 0.9, row  # a mixed model stays close to its float twin


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_qat_exports_an_integer_model(run_copy):
    from featx_edge.export.tflite import integer_report
    from featx_edge.runtime.metadata import read_tflite

    assert main(["export", str(run_copy), "--formats", "tflite-int8-qat", "--qat-epochs", "1", "--quiet"]) == 0
    manifest = read_manifest(run_copy)
    assert manifest["config"]["train"]["qat_epochs"] == 1
    flatbuffer, meta = read_tflite(run_copy / manifest["artifacts"]["tflite-int8-qat"]["path"])
    report = integer_report(flatbuffer)
    assert report["input_dtype"] == "uint8" and report["float_tensors"] == []
    assert meta["quantization"]["method"] == "tfmot quantization-aware training"
    assert meta["quantization"]["trained_layers"] == ["head_dense", "probabilities"]
    rc = main(["verify", str(run_copy), "--formats", "tflite-int8-qat", "--quiet"])
    row = json.loads((run_copy / "verify.json").read_text())["formats"]["tflite-int8-qat"]
    assert rc == (0 if row["passed"] else 2)
    # The backbone stayed frozen, so QAT's int8 model is still the run's model: it is compared
    # with the run's reference, and stays close to it. (Before its activation ranges were
    # initialised from calibration, a short QAT on EfficientNet-Lite agreed on 8% of images.)
    assert "float Keras reference" in row["compared_with"]
    assert row["top1_agreement"] >= 0.95, row


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_qat_ranges_start_at_the_float_models(trained_run):
    from featx_edge.export.calibration import calibration_images
    from featx_edge.export.qat import init_qat_ranges, qat_model
    from featx_edge.training.run import Run
    from featx_edge.training.train import predict_pixels_keras

    run = Run.open(trained_run)
    clf, splits = run.reference(), run.splits()
    calibration = calibration_images(splits.root, splits.train, size=96, count=64, seed=0)
    qat = qat_model(clf.model, trainable=("head_dense", "probabilities"))
    assert init_qat_ranges(qat, clf.model, calibration=calibration) > 50
    bottleneck = qat.get_layer("quant_block0_project_bn")
    high = max(float(v.numpy()) for v in bottleneck.weights if v.name.endswith("output_max:0"))
    assert high > 6.0  # tfmot's default would clip this linear bottleneck at 6
    pixels = calibration[:32]
    agree = np.mean(predict_pixels_keras(qat, pixels).argmax(1) == predict_pixels_keras(clf.model, pixels).argmax(1))
    assert agree >= 0.9, agree  # fake-quant model = float model + rounding, before any training


@pytest.mark.slow  # trains or converts a real model (measured with --durations: over 10 s)
def test_qat_keeps_the_backbone_frozen():
    from featx_edge.config import ModelConfig
    from featx_edge.export.qat import fit_variables, qat_model, trainable_variables
    from featx_edge.training.model import build_classifier
    from featx_edge.training.train import make_sequence

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


@pytest.mark.slow  # measured: 7.0 CPU s (tests/DURATIONS.md)
def test_qat_is_refused_for_mobilenet_v3():
    from featx_edge.config import ModelConfig
    from featx_edge.errors import ExportError
    from featx_edge.export.qat import qat_model
    from featx_edge.training.model import build_classifier

    clf = build_classifier(num_classes=2, weights_file=None,
                           config=ModelConfig(backbone="mobilenet_v3_small", alpha=0.75, image_size=32, weights="none"))
    with pytest.raises(ExportError, match="quantization-aware training cannot wrap this model"):
        qat_model(clf.model)


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_budget_judges_losses_on_enough_images_and_fails_loudly(run_copy, capsys):
    """A budget of 0 points: every image the reference gets right must stay right. Candidates are
    judged on validation plus calibration-free training images; a gain is never credited; a
    missed budget exits non-zero with the numbers."""
    rc = main(["export", str(run_copy), "--formats", "tflite-int8", "--int8-budget", "0", "--quiet"])
    decision = read_manifest(run_copy)["int8_selection"]
    assert decision["budget_points"] == 0 and "calibration-free training images" in decision["judged_on"]
    counts = read_manifest(run_copy)["data"]["counts"]
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


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_budget_picks_plain_int8_when_it_is_good_enough(run_copy):
    assert main(["export", str(run_copy), "--formats", "tflite-int8", "--int8-budget", "5", "--quiet"]) == 0
    decision = read_manifest(run_copy)["int8_selection"]
    assert decision["chosen"] == "tflite-int8" and len(decision["attempts"]) == 1


class _FakeRun:
    """What the budget policy reads of a run: its settings and manifest."""

    def __init__(self, *, qat_epochs: int = 0) -> None:
        from featx_edge.config import RunConfig, override

        self.config = override(RunConfig(), "train", qat_epochs=qat_epochs)
        self.manifest = {"artifacts": {"tflite-int8": {}}}
        self.saved = 0

    def save(self) -> None:
        self.saved += 1


@pytest.mark.parametrize("lost, qat, chosen, exported", [
    ({"tflite-int8": 0}, 0, "tflite-int8", []),
    ({"tflite-int8": 3, "tflite-int8-selective": 1}, 0, "tflite-int8-selective", ["tflite-int8-selective"]),
    ({"tflite-int8": 3, "tflite-int8-selective": 2}, 0, None, ["tflite-int8-selective"]),
    ({"tflite-int8": 3, "tflite-int8-selective": 2, "tflite-int8-qat": 1}, 2, "tflite-int8-qat",
     ["tflite-int8-selective", "tflite-int8-qat"]),
])
def test_budget_policy_tries_variants_in_order(monkeypatch, lost, qat, chosen, exported):
    """The policy alone, on judged losses given here: plain int8, then selective, then QAT (only
    when enabled); the first within budget wins; a miss is recorded and explained."""
    from featx_edge.export import budget

    monkeypatch.setattr(budget, "judging_set", lambda run: budget.JudgingSet((), np.zeros(0), np.zeros(0), "200 images"))

    def judge(run, judging, fmt, *, budget):
        n = 200
        return {"format": fmt, "images": n, "judged_on": judging.what, "images_lost": lost[fmt], "images_gained": 0,
                "top1_agreement": 1 - lost[fmt] / n, "top1_agreement_ci95": [0.9, 1.0],
                "loss_points": 100 * lost[fmt] / n, "loss_ci95_points": [0.0, 2.0],
                "within_budget": 100 * lost[fmt] / n <= budget}

    monkeypatch.setattr(budget, "judge", judge)
    run, made = _FakeRun(qat_epochs=qat), []
    decision = budget.choose_int8(run, budget=0.5, export=lambda fmt: made.append(fmt) or {})
    assert decision["chosen"] == chosen and made == exported and run.saved == 1
    assert [a["format"] for a in decision["attempts"]] == list(lost)
    message = budget.budget_failure(run.manifest)
    if chosen:
        assert message is None
    else:
        assert "no int8 variant met `--int8-budget 0.5`" in message and "lost 3 of 200 images" in message
        assert "--qat-epochs" in decision["note"]


def test_budget_validation():
    from featx_edge.config import ExportConfig
    from featx_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="int8_budget"):
        ExportConfig(int8_budget=-1.0)
    assert np.isclose(ExportConfig(int8_budget=0.5).int8_budget, 0.5)


@pytest.mark.slow  # needs the main run (fixture `trained_run`: minutes)
def test_bias_correction_shrinks_the_int8_feature_error(trained_run):
    """On the main run, the backbone's int8 features are measurably closer to the float ones when
    converted from the bias-corrected copy (measured on Zen 4: 15.5% -> 10.4% relative error)."""
    from featx_edge._tf import import_tf
    from featx_edge.data.folders import load_images
    from featx_edge.export.bias_correction import bias_corrected
    from featx_edge.export.calibration import calibration_images
    from featx_edge.export.tflite import TFLiteQuantization, convert
    from featx_edge.runtime.backends import LiteRTBackend
    from featx_edge.training.run import Run
    from featx_edge.training.train import predict_pixels_keras

    _, keras = import_tf()
    run = Run.open(trained_run)
    clf, splits = run.reference(), run.splits()
    calibration = calibration_images(splits.root, splits.train, size=96, count=200, seed=0)
    test = load_images(splits.root, splits.test, size=96)
    corrected, info = bias_corrected(clf.model, calibration=calibration)
    assert info["layers"] == 49  # every conv + BatchNorm pair of EfficientNet-Lite0
    reference = predict_pixels_keras(clf.feature_model, test)

    def int8_error(model) -> float:
        features = keras.Model(model.input, model.get_layer("features").output)
        flatbuffer = convert(features, size=96, quantization=TFLiteQuantization.for_int8(), calibration=calibration)
        out = LiteRTBackend(flatbuffer).run(test)
        return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))

    plain, fixed = int8_error(clf.model), int8_error(corrected)
    assert fixed < 0.85 * plain, (plain, fixed)
    # The correction only moves BatchNorm offsets: kernels are untouched.
    for a, b in zip(clf.model.layers, corrected.layers):
        if a.name.endswith("conv"):
            np.testing.assert_array_equal(a.get_weights()[0], b.get_weights()[0])
