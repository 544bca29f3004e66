"""Hardening round 3 (issue 20): items 7, 10, 11 and parts of 12, and the feature cache's
non-finite shards. Each case goes through the CLI (exit code, stderr) or the public API.

- 7: a resume state whose checkpoint prefix points outside its folder deletes nothing there;
  every state.json value is typed and range-checked (an edited epoch gave "remaining -97").
- 10: one line, exit 2, no traceback: a truncated checkpoint, `--config` naming a folder, a
  binary file or a deeply nested TOML, a path component over 255 bytes, a shard path that is a
  folder; an image name that is not UTF-8 trains.
- 11: a class folder with a backslash is refused at train time (export refused such runs forever).
- 12: an image rewritten with the same size and mtime is embedded again; a cached shard holding
  NaN is recomputed, and a backbone giving NaN is refused, so NaN never reaches training.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_class_folder
from PIL import Image

from featx_edge.cli import main
from featx_edge.rundir.manifest import read_manifest
from featx_edge.training.checkpoints import INTERRUPT_ENV, STATE, resume_dir

SMALL = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32", "--weights", "none", "--seed", "0"]
LONG = "x" * 300  # one path component longer than any file system's 255-byte limit


def _one_line_error(capsys, *needles: str) -> str:
    """The last stderr line is the error (warnings may come before it); nothing else is an error."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: ") and sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    for needle in needles:
        assert needle in last, err
    return last


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), *SMALL, "--epochs", "3", "--quiet", *extra])


# --- item 7 and 10: the resume state and its checkpoint --------------------------------------------

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Data, and the checkpoint folder of a training interrupted after epoch 2 of 3 (a copy to edit)."""
    root = tmp_path_factory.mktemp("resume")
    data = make_class_folder(root / "data", {"a": 8, "b": 8}, size=24)
    os.environ[INTERRUPT_ENV] = "2"
    try:
        assert _train(data, root / "run") == 130
    finally:
        del os.environ[INTERRUPT_ENV]
    saved = root / "saved"
    shutil.copytree(resume_dir(root / "run"), saved)
    return data, saved


def _resumable(interrupted, tmp_path: Path) -> tuple[Path, Path, Path]:
    data, saved = interrupted
    out = tmp_path / "runs" / "run"
    out.parent.mkdir()
    shutil.copytree(saved, resume_dir(out))
    return data, out, resume_dir(out)


def _edit_state(folder: Path, edit) -> None:
    state = json.loads((folder / STATE).read_text())
    edit(state)
    (folder / STATE).write_text(json.dumps(state))


@pytest.mark.slow
def test_a_prefix_outside_the_checkpoint_folder_deletes_nothing_there(interrupted, tmp_path, capsys):
    """The prefix names a copy of the real checkpoint outside: before, resume restored it and then
    deleted it (the old epoch's files) after the next epoch."""
    data, out, folder = _resumable(interrupted, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in (folder / "stage1").iterdir():
        shutil.copy(path, outside / path.name.replace("epoch-00002", "victim"))
    victims = sorted(p.name for p in outside.iterdir())
    prefix = os.path.relpath(outside / "victim", folder)
    assert prefix.startswith("../")
    _edit_state(folder, lambda s: s["stages"]["stage1"].__setitem__("prefix", prefix))
    assert _train(data, out, "--resume") == 2
    _one_line_error(capsys, str(folder / STATE), "stages.stage1.prefix", "stage1/epoch-00002", "without `--resume`")
    assert sorted(p.name for p in outside.iterdir()) == victims, "nothing outside the folder is deleted"
    assert (folder / STATE).is_file() and not out.exists()


STATE_EDITS = {
    "epoch beyond epochs (remaining -97)": (lambda s: s["stages"]["stage1"].__setitem__("epoch", 100), "epoch"),
    "epoch zero": (lambda s: s["stages"]["stage1"].__setitem__("epoch", 0), "epoch"),
    "epoch a string": (lambda s: s["stages"]["stage1"].__setitem__("epoch", "2"), "epoch"),
    "epochs a float": (lambda s: s["stages"]["stage1"].__setitem__("epochs", 3.0), "epochs"),
    "history a list": (lambda s: s["stages"]["stage1"].__setitem__("history", []), "history"),
    "history of strings": (lambda s: s["stages"]["stage1"]["history"].__setitem__("loss", ["x", "y"]), "history.loss"),
    "prefix a number": (lambda s: s["stages"]["stage1"].__setitem__("prefix", 5), "prefix"),
    "prefix absolute": (lambda s: s["stages"]["stage1"].__setitem__("prefix", "/tmp/x"), "prefix"),
    "stage a list": (lambda s: s["stages"].__setitem__("stage1", []), "stages.stage1"),
    "unknown stage": (lambda s: s["stages"].__setitem__("../x", {}), "stages"),
    "stages a list": (lambda s: s.__setitem__("stages", []), "stages"),
    "key a number": (lambda s: s.__setitem__("key", 7), "key"),
    "settings a string": (lambda s: s.__setitem__("settings", "x"), "settings"),
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", list(STATE_EDITS), ids=list(STATE_EDITS))
def test_every_state_value_is_typed_and_range_checked(interrupted, tmp_path, capsys, edit):
    change, names = STATE_EDITS[edit]
    data, out, folder = _resumable(interrupted, tmp_path)
    _edit_state(folder, change)
    assert _train(data, out, "--resume") == 2
    _one_line_error(capsys, str(folder / STATE), "is damaged", names)
    assert (folder / STATE).is_file(), "a refused resume keeps the checkpoints"


@pytest.mark.slow
@pytest.mark.parametrize("part", ["index", "data-00000-of-00001"])
def test_a_truncated_checkpoint_is_one_line(interrupted, tmp_path, capsys, part):
    data, out, folder = _resumable(interrupted, tmp_path)
    path = folder / "stage1" / f"epoch-00002.{part}"
    os.truncate(path, path.stat().st_size // 2)
    assert _train(data, out, "--resume") == 2
    err = _one_line_error(capsys, str(folder / "stage1" / "epoch-00002"), "truncated or damaged",
                          "without `--resume`")
    assert "continues from there" not in err  # a damaged checkpoint is not offered for resuming
    assert not out.exists()


# --- item 10: file names that are not UTF-8 train ----------------------------------------------

@pytest.mark.slow
def test_an_image_name_that_is_not_utf8_trains_and_is_cached(tmp_path, capsys):
    from featx_edge.training.run import Run

    data = make_class_folder(tmp_path / "data", {"a": 5, "b": 5}, size=24)
    name = b"\xff\xfe-caf\xe9.png"  # Latin-1 bytes: not UTF-8
    try:
        os.rename(data / "a" / "000.png", os.path.join(os.fsencode(data / "a"), name))
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    args = ["--feature-cache", str(tmp_path / "cache")]
    assert _train(data, tmp_path / "r1", *args) == 0, capsys.readouterr().err
    splits = Run.open(tmp_path / "r1").splits()
    assert "a/" + os.fsdecode(name) in splits.train + splits.val + splits.test
    assert _train(data, tmp_path / "r2", *args) == 0
    record = read_manifest(tmp_path / "r2")["training"]["feature_cache"]
    assert (record["features_reused"], record["images_embedded"]) == (10, 0)  # its shard id is stable


# --- item 10: --config that is not a TOML file ---------------------------------------------------

@pytest.mark.parametrize("kind", ["folder", "binary", "nested arrays", "nested tables"])
def test_a_config_that_is_not_a_toml_file_is_one_line(tmp_path, capsys, kind):
    path = tmp_path / "cfg.toml"
    if kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "nested arrays":
        path.write_text("seed = " + "[" * 100_000 + "]" * 100_000 + "\n")
    else:
        path.write_text("[model]\nalpha = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, str(path))
    assert not (tmp_path / "run").exists()


# --- item 10: a path component longer than 255 bytes -------------------------------------------

@pytest.mark.parametrize("command", ["train --data", "train --out", "export", "verify", "report"])
def test_a_name_too_long_is_one_line(tmp_path, capsys, command):
    long = str(tmp_path / LONG)
    args = {"train --data": ["train", "--data", long + "/d", "--out", str(tmp_path / "run"), *SMALL],
            "train --out": ["train", "--data", str(tmp_path), "--out", long, *SMALL]}.get(command, [command, long])
    assert main(args) == 2
    _one_line_error(capsys, LONG, "too long")


# --- item 10: a feature-cache shard path that is a folder -----------------------------------------

@pytest.mark.slow
def test_a_shard_path_that_is_a_folder_is_one_line(tmp_path, capsys):
    data = make_class_folder(tmp_path / "data", {"a": 4, "b": 4}, size=24)
    cache = tmp_path / "cache"
    assert _train(data, tmp_path / "run", "--feature-cache", str(cache)) == 0
    (shard,) = cache.glob("*/shards/*.npy")
    shard.unlink()
    (shard / "user-file").mkdir(parents=True)
    assert _train(data, tmp_path / "run", "--feature-cache", str(cache), "--overwrite") == 2
    _one_line_error(capsys, str(shard), "folder")
    assert (shard / "user-file").is_dir() and read_manifest(tmp_path / "run")  # neither is touched


# --- item 11: a backslash in a class folder's name ----------------------------------------------

def test_a_class_folder_with_a_backslash_is_refused_at_train_time(tmp_path, capsys):
    data = make_class_folder(tmp_path / "data", {"cats\\big": 3, "dogs": 3}, size=24)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *SMALL]) == 2
    _one_line_error(capsys, "'cats\\\\big'", "backslash", "`cats_big`")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_image_with_a_backslash_is_skipped_and_the_run_stays_usable(tmp_path):
    from featx_edge.training.run import Run

    data = make_class_folder(tmp_path / "data", {"a": 4, "b": 4}, size=24)
    (data / "a" / "000.png").rename(data / "a" / "x\\y.png")
    assert _train(data, tmp_path / "run") == 0
    skipped = read_manifest(tmp_path / "run")["data"]["skipped"]["files"]
    assert [s["path"] for s in skipped] == ["a/x\\y.png"] and "backslash" in skipped[0]["reason"]
    splits = Run.open(tmp_path / "run").splits()  # export reads them: a backslash made them "damaged"
    assert len(splits.train + splits.val + splits.test) == 7


# --- item 12 and non-finite shards: the feature cache -----------------------------------------------

SIZE = 32


@pytest.fixture(scope="module")
def tiny():
    """A one-convolution feature model (16-d) whose features tell images apart, and its cache key."""
    from featx_edge._tf import import_tf
    from featx_edge.backbones.registry import get_backbone
    from featx_edge.training.features import feature_key

    _, keras = import_tf()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(16, 3, activation="tanh")(keras.layers.Rescaling(1 / 255.0)(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    return model, feature_key(get_backbone("mobilenet_v2"), alpha=0.35, weights_sha256=None, seed=0, size=SIZE)


def _bmp_folder(root: Path) -> tuple[Path, list[str]]:
    """BMP images: every rewrite of one has the same size in bytes."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(root / name / f"{i}.bmp")
    return root, sorted(p.relative_to(root).as_posix() for p in root.rglob("*.bmp"))


def test_an_image_rewritten_with_the_same_size_and_mtime_is_embedded_again(tiny, tmp_path):
    from featx_edge.training.features import FeatureCache

    model, key = tiny
    root, rels = _bmp_folder(tmp_path / "data")
    first = FeatureCache(tmp_path / "cache", key, shard_images=4).features(model, root, rels, size=SIZE,
                                                                          batch_size=4).take(np.arange(8))
    path = root / rels[5]
    before = path.stat()
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(path)  # in place: same inode, same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the old mtime put back (`touch -r`)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    cache = FeatureCache(tmp_path / "cache", key, shard_images=4)
    second = cache.features(model, root, rels, size=SIZE, batch_size=4).take(np.arange(8))
    assert (cache.stats.embedded, cache.stats.reused) == (4, 4)  # that image's shard only
    np.testing.assert_array_equal(second[:4], first[:4])
    assert not np.allclose(second[5], first[5]), "the stale feature of the old image was reused"


@pytest.mark.slow
def test_a_cached_shard_holding_nan_is_recomputed_with_one_warning(tmp_path, capsys):
    data = make_class_folder(tmp_path / "data", {"a": 4, "b": 4}, size=24)
    cache = tmp_path / "cache"
    assert _train(data, tmp_path / "run", "--feature-cache", str(cache)) == 0
    (shard,) = cache.glob("*/shards/*.npy")
    features = np.load(shard)
    features[3, 7] = np.nan
    np.save(shard.with_suffix(".tmp.npy"), features)
    os.replace(shard.with_suffix(".tmp.npy"), shard)
    capsys.readouterr()
    assert _train(data, tmp_path / "run", "--feature-cache", str(cache), "--overwrite") == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if str(shard) in line]
    assert len(warnings) == 1 and "NaN or infinite" in warnings[0] and "recomputing" in warnings[0], err
    record = read_manifest(tmp_path / "run")["training"]
    assert record["feature_cache"]["images_embedded"] == 8 and np.isfinite(np.load(shard)).all()
    assert all(np.isfinite(record["stage1"]["history"]["loss"]))


def test_a_backbone_giving_nan_features_is_refused_and_nothing_is_cached(tmp_path):
    from featx_edge._tf import import_tf
    from featx_edge.backbones.registry import get_backbone
    from featx_edge.errors import WeightsError
    from featx_edge.training.features import FeatureCache, feature_key

    _, keras = import_tf()
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(float("nan"))(inputs)  # as a NaN weight in a backbone makes its features
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    key = feature_key(get_backbone("mobilenet_v2"), alpha=0.35, weights_sha256="1" * 64, seed=0, size=SIZE)
    root, rels = _bmp_folder(tmp_path / "data")
    cache = FeatureCache(tmp_path / "cache", key, shard_images=4)
    with pytest.raises(WeightsError, match="NaN or infinite features for 4 of 4 images") as caught:
        cache.features(model, root, rels, size=SIZE, batch_size=4)
    assert str(root / rels[0]) in str(caught.value) and "\n" not in str(caught.value)
    assert not list((cache.dir / "shards").iterdir())
