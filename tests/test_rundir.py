"""A run directory is checked when it is read: another layout or a damaged manifest is refused
with a message that names the problem, never a KeyError from deep inside a command."""

import json

import pytest
from conftest import make_manifest

from featx_edge.cli import main
from featx_edge.errors import RunDirError
from featx_edge.files.lock import locked
from featx_edge.rundir.manifest import MANIFEST_VERSION, read_manifest

GOOD = make_manifest()


def _write(tmp_path, manifest) -> str:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return str(tmp_path)


def _write_owned(run, manifest) -> str:
    """A run as featx-edge makes it: with its ownership marker, recorded in the manifest."""
    from featx_edge.files.ownership import ID_KEY, mark

    return _write(run, manifest | {ID_KEY: mark(run, kind="run")})


def test_a_complete_manifest_reads(tmp_path):
    assert read_manifest(_write(tmp_path, GOOD))["labels"] == ["a", "b"]


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("manifest_version"), "an older layout (no `manifest_version`)"),
    (lambda m: m.update(manifest_version=MANIFEST_VERSION + 1), f"layout version {MANIFEST_VERSION + 1}"),
    (lambda m: m.pop("reference"), "`reference` is missing"),
    (lambda m: m.update(labels="a,b"), "`labels` is not a JSON list"),
    (lambda m: m["input"].pop("height"), "`input.height` is missing"),
    (lambda m: m["reference"].update(path="/etc/passwd"), "`reference.path` ('/etc/passwd') is not a relative path"),
    (lambda m: m["data"].update(splits="../other/splits.json"), "`data.splits`"),
    (lambda m: m["artifacts"].update({"tflite-int8": {"path": "export/../../x.tflite", "sha256": "0", "bytes": 1}}),
     "`artifacts.tflite-int8.path`"),
])
def test_damaged_or_foreign_manifests_are_named(tmp_path, change, message):
    manifest = json.loads(json.dumps(GOOD))
    change(manifest)
    with pytest.raises(RunDirError, match="Re-run `featx-edge train`") as err:
        read_manifest(_write(tmp_path, manifest))
    assert message in str(err.value)


def test_commands_on_a_damaged_run_give_one_line(tmp_path, capsys):
    _write(tmp_path, [1, 2, 3])
    for command in (["verify", str(tmp_path)], ["export", str(tmp_path)], ["bench", str(tmp_path)]):
        assert main([*command, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "holds a JSON list" in err and "Traceback" not in err


def _splits(tmp_path, **change) -> dict:
    splits = {"data_root": str(tmp_path), "classes": ["a", "b"], "train": ["a/1.png"], "val": ["b/2.png"],
              "test": ["a/3.png"], "seed": 0} | change
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    return splits


def test_run_opens_and_gives_config_and_splits(tmp_path):
    from featx_edge.training.run import Run

    _write(tmp_path, GOOD)
    _splits(tmp_path)
    run = Run.open(tmp_path)
    assert run.labels == ["a", "b"] and run.size == 96 and run.exported() == ()
    assert run.splits().test == ("a/3.png",)
    assert run.config.model.backbone == "efficientnet_lite0"  # an empty [config] means the defaults


@pytest.mark.parametrize("change, message", [
    ({"test": ["../../etc/passwd"]}, "`test` names '../../etc/passwd'"),
    ({"train": ["/abs/a.png"]}, "`train` names '/abs/a.png'"),
    ({"val": "b/2.png"}, "`val` is missing or not a list of strings"),
    ({"seed": "0"}, "`seed` is missing or not an integer"),
])
def test_splits_that_leave_the_data_folder_are_refused(tmp_path, change, message):
    from featx_edge.errors import DataError
    from featx_edge.training.run import Run

    _write(tmp_path, GOOD)
    _splits(tmp_path, **change)
    with pytest.raises(DataError, match="Re-run `featx-edge train`") as err:
        Run.open(tmp_path).splits()
    assert message in str(err.value)


def test_one_command_at_a_time_per_run(tmp_path):
    """A second process cannot take a run another command holds; the same process may re-enter."""
    import subprocess
    import sys

    code = ("import sys, time; from featx_edge.files.lock import locked\n"
            "with locked(sys.argv[1], command='export'):\n"
            "    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = r"in use by another featx-edge command \(`featx-edge export`, pid"
        with pytest.raises(RunDirError, match=busy), locked(tmp_path, command="verify"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with locked(tmp_path, command="run"), locked(tmp_path, command="train"):
        pass  # released when the holder died; re-entrant here


def test_a_missing_run_folder_is_not_created(tmp_path):
    assert main(["verify", str(tmp_path / "nope"), "--quiet"]) == 2
    assert not (tmp_path / "nope").exists()


def test_out_checks_before_any_work(tmp_path):
    from featx_edge.rundir.out import prepare_out

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    _write_owned(run, GOOD)
    for out, overwrite, message in ((tmp_path / "file", False, "is a file"),
                                    (data / "runs" / "x", False, "overlap"),
                                    (tmp_path, False, "overlap"),
                                    (other, True, "is not a featx-edge run"),
                                    (run, False, "pass `--overwrite`")):
        with pytest.raises(RunDirError, match=message):
            prepare_out(out, overwrite=overwrite, data_root=data)
    assert (other / "notes.txt").read_text() == "mine"
    staging = prepare_out(run, overwrite=True, data_root=data)
    assert staging.is_dir() and staging.parent == run.parent
    assert [p.name for p in staging.iterdir()] == [".featx-edge"]  # empty but for its ownership marker


def _data_and_run(tmp_path):
    """A data folder with one class folder, and a run beside it."""
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    _write_owned(run, GOOD)
    return data, run


def test_an_interrupted_training_leaves_the_old_run_as_it_was(tmp_path, monkeypatch):
    from featx_edge.config import DataConfig, RunConfig
    from featx_edge.training import train

    data, run = _data_and_run(tmp_path)
    (run / "splits.json").write_text("old split")
    before = sorted(p.name for p in run.iterdir())

    def dies(config, out, *, data_root, **_):
        (out / "splits.json").write_text("new split")
        (out / "manifest.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train_run", dies)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(RunConfig(data=DataConfig(path=str(data))), run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "splits.json").read_text() == "old split"
    assert read_manifest(run)["labels"] == ["a", "b"]
    assert not list(tmp_path.glob(".run.partial-*"))  # the staging folder is cleaned up

    def completes(config, out, *, data_root, **_):
        (out / "splits.json").write_text("new split")
        (out / "manifest.json").write_text(json.dumps(GOOD | {"labels": ["new"]}))
        return {}

    monkeypatch.setattr(train, "_train_run", completes)
    train.train_run(RunConfig(data=DataConfig(path=str(data))), run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [".featx-edge", "manifest.json", "splits.json"]  # nothing old
    assert read_manifest(run)["labels"] == ["new"]
    assert not list(tmp_path.glob(".run.old-*"))


@pytest.mark.parametrize("moved", [True, False])
def test_an_export_killed_around_its_rename_is_recorded_or_forgotten(tmp_path, moved):
    """Killed after the new file was moved into place: the next command records it (the manifest
    matches the file). Killed before: the journal is dropped and the old file stays recorded."""
    import hashlib

    from featx_edge.rundir.names import EXPORT_JOURNAL
    from featx_edge.training.run import Run

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    old, new = b"old model", b"new model"
    (run / "export" / "m.tflite").write_bytes(new if moved else old)
    entry = {"path": "export/m.tflite", "sha256": hashlib.sha256(old).hexdigest(), "bytes": len(old)}
    _write(run, GOOD | {"artifacts": {"tflite-int8": entry}})
    (run / EXPORT_JOURNAL).write_text(json.dumps({"format": "tflite-int8", "path": "export/m.tflite",
                                                  "sha256": hashlib.sha256(new).hexdigest()}))
    opened = Run.open(run, recover=True)
    assert not (run / EXPORT_JOURNAL).exists()
    assert opened.artifact_problems("tflite-int8") == []
    recorded = read_manifest(run)["artifacts"]["tflite-int8"]["sha256"]
    assert recorded == hashlib.sha256(new if moved else old).hexdigest()


def test_train_into_an_existing_run_needs_overwrite(tmp_path, capsys):
    data, run = _data_and_run(tmp_path)
    before = (run / "manifest.json").read_text()
    assert main(["train", "--data", str(data), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pass `--overwrite`" in err
    assert (run / "manifest.json").read_text() == before
