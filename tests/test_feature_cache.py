"""The on-disk feature cache: equal to a fresh pass, reused, invalidated, resumable, memory-mapped;
augmented views: deterministic, cached, different from the originals."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_class_folder
from PIL import Image

from featx_edge.config import TrainConfig
from featx_edge.data.augment import AugmentSpec, augmented_pixels, parse_transforms
from featx_edge.data.folders import _pixels, iter_batches, scan_folder, split_folder
from featx_edge.errors import ConfigError, DataError
from featx_edge.training import features as features_mod
from featx_edge.training.features import (
    STOP_AFTER_SHARDS_ENV,
    FeatureCache,
    FeatureTable,
    SimulatedInterrupt,
    feature_key,
    split_features,
)

SIZE = 32


@pytest.fixture(scope="module")
def tiny():
    """A seeded one-convolution feature model (16-d): fast, and its features differ clearly between
    images (a random-weights MobileNetV2's are ~1e-11, too small to tell anything apart)."""
    from featx_edge._tf import import_tf
    from featx_edge.backbones.registry import get_backbone

    _, keras = import_tf()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, activation="tanh")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    key = feature_key(get_backbone("mobilenet_v2"), alpha=0.35, weights_sha256=None, seed=0, size=SIZE)
    return model, key


def _head(keras, seed: int):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,))
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Dense(8, "relu")(inputs)))


@pytest.fixture
def folder(tmp_path):
    root = make_class_folder(tmp_path / "data", {"a": 10, "b": 10}, size=40)
    return root, sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def _reference(feature_model, root, relpaths) -> np.ndarray:
    """The embedding path before the cache: sequential decode, eager model calls."""
    out = [feature_model(b.astype(np.float32), training=False).numpy() for b in
           iter_batches(root, relpaths, size=SIZE, batch_size=8)]
    return np.concatenate(out)


def test_cached_features_equal_fresh_ones_and_are_reused_without_embedding(tiny, folder, tmp_path, monkeypatch):
    model, key = tiny
    root, rels = folder
    cache = FeatureCache(tmp_path / "cache", key, shard_images=6)
    first = cache.features(model, root, rels, size=SIZE, batch_size=4)
    assert cache.stats.embedded == 20 and cache.stats.reused == 0
    assert len(list((cache.dir / "shards").glob("*.npy"))) == 4  # 6 + 6 + 6 + 2
    assert FeatureTable([(first, None)]).to_array().std(axis=0).mean() > 1e-3  # images tell apart
    np.testing.assert_allclose(FeatureTable([(first, None)]).to_array(), _reference(model, root, rels),
                               rtol=1e-5, atol=1e-5)

    def no_embedding(*args, **kwargs):
        raise AssertionError("the second pass must not embed")

    monkeypatch.setattr(features_mod, "embed_batches", no_embedding)
    again = FeatureCache(tmp_path / "cache", key, shard_images=6)
    second = again.features(model, root, rels, size=SIZE, batch_size=4)
    assert again.stats.embedded == 0 and again.stats.reused == 20
    assert all(isinstance(m, np.memmap) for m in second.maps)  # read from disk, not loaded
    np.testing.assert_array_equal(FeatureTable([(second, None)]).to_array(), FeatureTable([(first, None)]).to_array())


def test_an_interrupted_pass_resumes_and_equals_an_uninterrupted_one(tiny, folder, tmp_path, monkeypatch):
    model, key = tiny
    root, rels = folder
    monkeypatch.setenv(STOP_AFTER_SHARDS_ENV, "2")
    with pytest.raises(SimulatedInterrupt):
        FeatureCache(tmp_path / "resumed", key, shard_images=6).features(model, root, rels, size=SIZE,
                                                                         batch_size=4)
    shards = list((tmp_path / "resumed").rglob("shards/*.npy"))
    assert len(shards) == 2 and not list((tmp_path / "resumed").rglob(".tmp-*"))  # complete shards only
    monkeypatch.delenv(STOP_AFTER_SHARDS_ENV)
    cache = FeatureCache(tmp_path / "resumed", key, shard_images=6)
    resumed = cache.features(model, root, rels, size=SIZE, batch_size=4)
    assert (cache.stats.reused, cache.stats.embedded) == (12, 8)  # only the missing shards
    whole = FeatureCache(tmp_path / "whole", key, shard_images=6).features(model, root, rels, size=SIZE,
                                                                           batch_size=4)
    np.testing.assert_allclose(FeatureTable([(resumed, None)]).to_array(), FeatureTable([(whole, None)]).to_array(),
                               rtol=1e-5, atol=1e-5)


def test_new_weights_or_a_changed_image_invalidate(tiny, folder, tmp_path):
    from featx_edge.backbones.registry import get_backbone

    model, key = tiny
    root, rels = folder
    FeatureCache(tmp_path / "cache", key, shard_images=6).features(model, root, rels, size=SIZE,
                                                                   batch_size=4)
    other = feature_key(get_backbone("mobilenet_v2"), alpha=0.35, weights_sha256="0" * 64, seed=0, size=SIZE)
    assert other.digest() != key.digest()
    cache = FeatureCache(tmp_path / "cache", other, shard_images=6)
    cache.features(model, root, rels, size=SIZE, batch_size=4)
    assert cache.stats.embedded == 20  # other weights: nothing reused

    changed = rels[7]  # in the second shard (rows 6..11)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(root / changed)
    os.utime(root / changed, ns=(1, 1))
    cache = FeatureCache(tmp_path / "cache", key, shard_images=6)
    array = cache.features(model, root, rels, size=SIZE, batch_size=4)
    assert (cache.stats.embedded, cache.stats.reused) == (6, 14)
    np.testing.assert_allclose(array.take(np.array([7])), _reference(model, root, [changed]),
                               rtol=1e-5, atol=1e-5)


def test_a_bad_image_is_a_typed_error_naming_it(tiny, folder, tmp_path):
    model, key = tiny
    root, rels = folder
    (root / rels[3]).write_bytes(b"not a png")
    with pytest.raises(DataError, match=rels[3].split("/")[-1]):
        FeatureCache(tmp_path / "cache", key).features(model, root, rels, size=SIZE, batch_size=4)


def test_augmented_views_are_deterministic_cached_and_differ_from_the_original(tiny, folder, tmp_path):
    model, key = tiny
    root, rels = folder
    spec = AugmentSpec(transforms=("flip", "crop", "rotate", "color"), seed=3)
    view1 = augmented_pixels(root, rels[0], size=SIZE, spec=spec, view=1)
    np.testing.assert_array_equal(view1, augmented_pixels(root, rels[0], size=SIZE, spec=spec, view=1))
    assert view1.shape == (SIZE, SIZE, 3) and view1.dtype == np.uint8
    original = _pixels(root, rels[0], SIZE).astype(int)
    assert np.abs(view1.astype(int) - original).mean() > 1
    assert np.abs(view1.astype(int) - augmented_pixels(root, rels[0], size=SIZE, spec=spec, view=2)).mean() > 1
    other_seed = AugmentSpec(transforms=spec.transforms, seed=4)
    assert np.abs(view1.astype(int) - augmented_pixels(root, rels[0], size=SIZE, spec=other_seed, view=1)).mean() > 1

    splits = split_folder(scan_folder(root), val_fraction=0.2, test_fraction=0.2, seed=0)
    cache = FeatureCache(tmp_path / "cache", key, shard_images=8)
    feats = split_features(model, splits, cache=cache, size=SIZE, batch_size=4, augment=spec, views=2)
    n = len(splits.train)
    assert len(feats.train) == 3 * n and cache.stats.embedded == 20 + 2 * n
    np.testing.assert_array_equal(feats.train_labels, np.tile(splits.labels("train"), 3))
    train = feats.train.to_array()
    assert np.abs(train[n:2 * n] - train[:n]).max() > 1e-3  # views are not the originals
    assert feats.record["augment"]["transforms"] == ["flip", "crop", "rotate", "color"]
    again = FeatureCache(tmp_path / "cache", key, shard_images=8)
    repeat = split_features(model, splits, cache=again, size=SIZE, batch_size=4, augment=spec, views=2)
    assert again.stats.embedded == 0 and again.stats.reused == 20 + 2 * n
    np.testing.assert_array_equal(repeat.train.to_array(), train)


def test_head_trains_from_the_memory_map_with_the_batches_of_the_in_memory_path(tiny, folder, tmp_path, monkeypatch):
    from featx_edge._tf import import_tf
    from featx_edge.training import train as train_mod

    model, key = tiny
    root, rels = folder
    array = FeatureCache(tmp_path / "cache", key, shard_images=6).features(model, root, rels,
                                                                           size=SIZE, batch_size=4)
    table = FeatureTable([(array, np.arange(3, 20))])
    labels = np.array([0 if r.startswith("a/") else 1 for r in rels[3:]])
    _, keras = import_tf()
    heads = [_head(keras, seed=1) for _ in range(2)]
    cfg = TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2)
    in_memory = table.to_array()
    train_mod.train_head_on_features(heads[0], in_memory, labels, config=cfg, seed=5)

    def no_materialising(*args, **kwargs):
        raise AssertionError("the disk-cache path must not build an in-memory dataset")

    monkeypatch.setattr(train_mod, "array_dataset", no_materialising)
    train_mod.train_head_on_features(heads[1], table, labels, config=cfg, seed=5, val=(table, labels))
    assert all(isinstance(m, np.memmap) for m in array.maps)
    for a, b in zip(heads[0].get_weights(), heads[1].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_settings_are_checked():
    assert TrainConfig().augment == ("rotate", "color") and TrainConfig().augment_views == 0
    assert TrainConfig(augment="color, flip").augment == ("flip", "color")
    assert parse_transforms(["rotate"]) == ("rotate",)
    with pytest.raises(ConfigError, match="mirror"):
        TrainConfig(augment="flip,mirror")
    with pytest.raises(ConfigError, match="augment_views"):
        TrainConfig(augment_views=-1)
    with pytest.raises(ConfigError, match="feature_cache"):
        TrainConfig(feature_cache="")


@pytest.mark.slow
def test_train_reuses_the_cache_on_a_second_run_and_none_leaves_nothing(tmp_path, capsys):
    from featx_edge.cli import main
    from featx_edge.rundir.manifest import read_manifest

    root = make_class_folder(tmp_path / "data", {"a": 8, "b": 8}, size=40)
    args = ["train", "--data", str(root), "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32",
            "--weights", "none", "--epochs", "1", "--feature-cache", str(tmp_path / "cache"), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "r1")]) == 0
    capsys.readouterr()
    assert main([*args[:-1], "--out", str(tmp_path / "r2"), "--augment-views", "1"]) == 0
    assert "reused 16 cached features" in capsys.readouterr().out
    first, second = (read_manifest(tmp_path / r)["training"]["feature_cache"] for r in ("r1", "r2"))
    assert first["images_embedded"] == 16 and first["features_reused"] == 0
    train = read_manifest(tmp_path / "r2")["data"]["counts"]["train"]
    assert second["features_reused"] == 16 and second["images_embedded"] == train  # only the view
    assert main([*args[:-3], "--feature-cache", "none", "--quiet", "--out", str(tmp_path / "r3")]) == 0
    assert not list((tmp_path / "r3").rglob("*.npy")) and read_manifest(tmp_path / "r3")["training"][
        "feature_cache"]["dir"] is None
