"""--resume: an interrupted training continues from its last epoch checkpoint and ends where an
uninterrupted one ends; a resume that cannot be done says why.

The interruption is the test hook FEATX_EDGE_TEST_INTERRUPT_AFTER_EPOCH=K (featx_edge.training.checkpoints):
a KeyboardInterrupt after the K-th epoch is checkpointed, as a Ctrl-C there would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY, few_images, make_class_folder

from featx_edge.cli import main
from featx_edge.rundir.manifest import read_manifest
from featx_edge.training.checkpoints import INTERRUPT_ENV, resume_dir

SMALL = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32", "--weights", "none", "--seed", "0"]


def _weights(run: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(run / "model.weights.h5", "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _interrupt_then_resume(args: list[str], out: Path, *, after: int, monkeypatch) -> dict:
    monkeypatch.setenv(INTERRUPT_ENV, str(after))
    assert main(["train", *args, "--out", str(out), "--quiet"]) == 130  # as after Ctrl-C
    assert not out.exists(), "an interrupted training leaves no run"
    state = json.loads((resume_dir(out) / "state.json").read_text())
    monkeypatch.delenv(INTERRUPT_ENV)
    assert main(["train", *args, "--out", str(out), "--quiet", "--resume"]) == 0
    assert not resume_dir(out).exists(), "a completed run removes its checkpoints"
    return state


@pytest.mark.slow  # needs the pretrained backbone (fixture `pretrained`: minutes)
def test_resumed_head_equals_uninterrupted_head(tmp_path, sample_root, pretrained, monkeypatch):
    """Interrupted after epoch 2 of 5 and resumed: the same head weights and accuracy, 3 epochs trained."""
    args = ["--data", str(sample_root / "target"), *TINY, "--weights", str(pretrained), "--epochs", "5",
            "--dropout", "0", "--learning-rate", "0.01"]
    assert main(["train", *args, "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    state = _interrupt_then_resume(args, tmp_path / "resumed", after=2, monkeypatch=monkeypatch)
    assert state["stages"]["stage1"]["epoch"] == 2

    whole, resumed = read_manifest(tmp_path / "whole"), read_manifest(tmp_path / "resumed")
    assert resumed["training"]["stage1"]["resumed_from_epoch"] == 2  # trained epochs 3-5 only
    assert whole["training"]["stage1"]["resumed_from_epoch"] == 0
    np.testing.assert_allclose(resumed["training"]["stage1"]["history"]["loss"],
                               whole["training"]["stage1"]["history"]["loss"], rtol=1e-5)
    assert resumed["training"]["val_accuracy"] == whole["training"]["val_accuracy"] > 0.5  # chance: 0.2
    assert resumed["training"]["test_accuracy"] == whole["training"]["test_accuracy"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-6, err_msg=name)


@pytest.mark.slow  # needs the pretrained backbone (fixture `pretrained`: minutes)
def test_resume_inside_fine_tuning(tmp_path, sample_root, pretrained, monkeypatch):
    """Interrupted in the first fine-tuning epoch (epoch 3 of 2 + 2): stage 1 is restored, not retrained,
    and the fine-tuned weights and Adam state equal an uninterrupted run's."""
    data = few_images(sample_root / "target", tmp_path / "data")
    args = ["--data", str(data), *TINY, "--weights", str(pretrained), "--epochs", "2", "--fine-tune-epochs", "2",
            "--unfreeze-top", "10", "--dropout", "0", "--fine-tune-learning-rate", "0.001", "--batch-size", "16"]
    assert main(["train", *args, "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    state = _interrupt_then_resume(args, tmp_path / "resumed", after=3, monkeypatch=monkeypatch)
    assert (state["stages"]["stage1"]["epoch"], state["stages"]["stage2"]["epoch"]) == (2, 1)
    whole, resumed = read_manifest(tmp_path / "whole")["training"], read_manifest(tmp_path / "resumed")["training"]
    assert resumed["stage1"]["resumed_from_epoch"] == 2 and resumed["stage2"]["resumed_from_epoch"] == 1
    losses = whole["stage2"]["history"]["loss"]
    assert abs(losses[1] - losses[0]) > 1e-4, "fine-tuning should change the model"
    np.testing.assert_allclose(resumed["stage2"]["history"]["loss"], losses, rtol=1e-5)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(name.startswith("optimizer/") for name in a)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-6, err_msg=name)


@pytest.mark.slow  # measured: 6.8 CPU s (tests/DURATIONS.md)
def test_resume_refuses_what_it_cannot_continue(tmp_path, monkeypatch, capsys):
    data = make_class_folder(tmp_path / "data", {"a": 12, "b": 12}, size=40)
    args = ["--data", str(data), *SMALL, "--epochs", "3"]
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out), "--resume"]) == 2
    assert "`--resume`: there is no checkpoint of an interrupted training" in capsys.readouterr().err

    monkeypatch.setenv(INTERRUPT_ENV, "1")
    assert main(["train", *args, "--out", str(out), "--quiet"]) == 130
    assert "(stage1 epoch 1 of 3) are in" in capsys.readouterr().err  # and how to continue
    monkeypatch.delenv(INTERRUPT_ENV)
    assert main(["train", *args[:-1], "4", "--out", str(out), "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "belongs to a training with other settings or data (train.epochs 3 -> 4)" in err
    assert resume_dir(out).is_dir(), "a refused resume keeps the checkpoints"
    # Without --resume a new training starts over, says so, and its completion removes them.
    assert main(["train", *args, "--out", str(out)]) == 0
    assert "starting over: the checkpoints of an interrupted training (stage1 epoch 1 of 3)" in capsys.readouterr().err
    assert read_manifest(out)["training"]["stage1"]["resumed_from_epoch"] == 0
    assert not resume_dir(out).exists()


@pytest.mark.parametrize("value", ["0", "x"])
def test_interrupt_hook_is_checked(value, monkeypatch):
    from featx_edge.errors import ConfigError
    from featx_edge.training.checkpoints import interrupt_after

    monkeypatch.setenv(INTERRUPT_ENV, value)
    with pytest.raises(ConfigError, match=INTERRUPT_ENV):
        interrupt_after()
