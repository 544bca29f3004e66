"""Stage 1 on cached features gives the same head as training through the frozen graph."""

import numpy as np
import pytest

from featx_edge.config import ModelConfig, TrainConfig
from featx_edge.training.model import build_classifier
from featx_edge.training.train import embed, train_head_on_features, train_head_through_graph


@pytest.mark.slow  # needs the pretrained backbone (fixture `pretrained`: minutes)
def test_cached_feature_head_equals_graph_trained_head(sample_root, pretrained):
    from featx_edge.data.folders import load_images, scan_folder, split_folder

    splits = split_folder(scan_folder(sample_root / "target"), val_fraction=0.1, test_fraction=0.1, seed=0)
    rng = np.random.default_rng(0)
    train = [splits.train[i] for i in sorted(rng.choice(len(splits.train), 64, replace=False))]
    y = splits.labels("train")[[splits.train.index(p) for p in train]]
    size = 64
    model_cfg = ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=size, weights=str(pretrained), head_units=16, dropout=0.0)
    train_cfg = TrainConfig(epochs=3, batch_size=8, learning_rate=1e-2)

    cached = build_classifier(num_classes=5, config=model_cfg, weights_file=pretrained, seed=11)
    graph = build_classifier(num_classes=5, config=model_cfg, weights_file=pretrained, seed=11)
    start = [w.copy() for w in cached.head_model.get_weights()]
    for a, b in zip(start, graph.head_model.get_weights()):
        np.testing.assert_array_equal(a, b)  # same seed, same starting head

    features = embed(cached.feature_model, splits.root, train, size=size, batch_size=8)
    assert features.std(axis=0).mean() > 1e-3, "features should vary between images"
    train_head_on_features(cached.head_model, features, y, config=train_cfg, seed=5)
    images = load_images(splits.root, train, size=size)
    train_head_through_graph(graph.model, images, y, config=train_cfg, seed=5)

    moved = max(np.abs(a - b).max() for a, b in zip(cached.head_model.get_weights(), start))
    assert moved > 1e-2, "the head should have trained"
    # Float round-off differs between the two paths (batched vs per-step backbone runs) and
    # Adam amplifies it for near-zero gradients, so compare relative weight distance and outputs.
    for a, b in zip(cached.head_model.get_weights(), graph.head_model.get_weights()):
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(a)
    np.testing.assert_allclose(cached.head_model(features).numpy(), graph.head_model(features).numpy(),
                               atol=1e-4)
    # The frozen backbone did not move in either path.
    for a, b in zip(cached.feature_model.get_weights(), graph.feature_model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # measured: 7.9 CPU s (tests/DURATIONS.md)
def test_fine_tune_stage_reports_what_it_changed_on_validation(tmp_path, capsys):
    """Stage 2 runs end to end and the run records (and prints) its validation change."""
    from conftest import make_class_folder

    from featx_edge.cli import main
    from featx_edge.rundir.manifest import read_manifest

    root = make_class_folder(tmp_path / "data", {"a": 12, "b": 12}, size=40)
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run), "--backbone", "mobilenet_v2", "--alpha", "0.35",
                 "--image-size", "32", "--weights", "none", "--epochs", "2", "--fine-tune-epochs", "1",
                 "--unfreeze-top", "10"]) == 0
    training = read_manifest(run)["training"]
    assert training["stage2"]["epochs"] == 1 and training["stage2"]["unfrozen_layers_with_weights"] > 0
    expected = 100 * (training["val_accuracy"] - training["stage1_val_accuracy"])
    assert abs(training["stage2_val_gain_points"] - expected) < 1e-9
    assert "stage 2 changed validation accuracy by" in capsys.readouterr().out
