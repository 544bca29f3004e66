"""Replacing a run (or a bundle folder) is journaled (issue 20, item 6).

A kill between the two renames used to lose the run: `.NAME.old-PID` and `.NAME.partial-PID` were
left and never restored, and the next command said "no such folder". Here a subprocess runs
`replace_run` with the file-system calls it makes (rename, replace, unlink, rmdir, chmod) patched to
die (`os._exit`) at call k, for every k until one run completes; after each kill the next command
(`verify`, `train` preparing `--out`, `bundle`) must find the old run or the new one, whole, under
its name, and nothing left beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_class_folder, make_manifest
from test_bundle import fake_run, wheel  # noqa: F401  (fixtures: a verified fake run, a stand-in wheel)

from featx_edge.cli import main
from featx_edge.files.ownership import ID_KEY, mark

MANIFEST = make_manifest(backbone="mobilenet_v2", size=32)

# Stages the new version from a template (as train/bundle do: a marked `.NAME.partial-PID`, the record
# holding the marker's id), then kills the process at the K-th file-system change replace_run makes
# (shutil.rmtree's included).
KILL_AT_STEP = """
import json, os, shutil, sys
from pathlib import Path
from featx_edge.files.ownership import ID_KEY, read_marker
from featx_edge.files.replace import make_staging, replace_run

step, template, out, kind, record = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]
staging = make_staging(out, kind=kind)
shutil.copytree(template, staging, dirs_exist_ok=True)
doc = json.loads((template / record).read_text())
(staging / record).write_text(json.dumps(doc | {ID_KEY: read_marker(staging)["id"]}))
calls = [0]

def dying(real):
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            os._exit(9)
        return real(*args, **kwargs)
    return call

for name in ("rename", "replace", "unlink", "rmdir", "chmod"):
    setattr(os, name, dying(getattr(os, name)))
replace_run(staging, out, kind=kind, record=record)
"""


def _fill(folder: Path, *, version: str, kind: str, record: str, marked: bool = True) -> dict[str, str]:
    """A run (or bundle) of ``version``: its record, two files and a sub-folder; returns its files.
    ``marked``: as featx-edge made it (else a template without marker or id)."""
    doc = (MANIFEST | {"labels": [version]}) if record == "manifest.json" else {"format": version}
    (folder / record).write_text(json.dumps(doc | ({ID_KEY: mark(folder, kind=kind)} if marked else {})))
    (folder / "splits.json").write_text(version)
    (folder / "export").mkdir()
    (folder / "export" / "m.tflite").write_text(version * 100)
    return _files(folder)


def _core(files: dict[str, str], record: str) -> dict[str, str]:
    return {k: v for k, v in files.items() if k not in (".featx-edge", record)}


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kill_at(step: int, template: Path, out: Path, *, kind: str, record: str) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(step), str(template), str(out), kind, record],
                          env=env, check=False).returncode


def _replace_killed_at_each_step(tmp_path: Path, next_command, *, kind: str = "run", record: str = "manifest.json"):
    """For k = 1, 2, ...: an old and a new version, replace_run killed at change k, then ``next_command``;
    out must be the old or the new version whole, with nothing left beside it. Returns the outcomes."""
    outcomes, step = [], 0
    while True:
        step += 1
        work = tmp_path / f"k{step}"
        out = work / "out"
        out.mkdir(parents=True)
        old = _fill(out, version="old", kind=kind, record=record)
        template = tmp_path / f"new{step}"
        template.mkdir()
        new = _fill(template, version="new", kind=kind, record=record, marked=False)
        rc = _kill_at(step, template, out, kind=kind, record=record)
        assert rc in (0, 9), rc
        next_command(out)
        after = _files(out)
        after_core = {k: v for k, v in after.items() if k not in (".featx-edge", record)}
        assert after_core in (_core(old, record), _core(new, record)), f"step {step}: {sorted(after)}"
        assert set(after) == set(old)  # whole: the marker and the record too
        outcomes.append("old" if after == old else "new")
        assert sorted(p.name for p in work.iterdir() if p.name != ".out.featx-edge.lock") == ["out"], step
        if rc == 0:
            return outcomes
        assert step < 50


def test_a_run_killed_at_any_step_of_its_replacement_is_recovered_by_verify(tmp_path, capsys):
    def verify(out: Path) -> None:
        main(["verify", str(out), "--quiet"])  # fails later (nothing exported): the recovery is what counts
        err = capsys.readouterr().err
        assert "no such folder" not in err and "Traceback" not in err, err

    outcomes = _replace_killed_at_each_step(tmp_path, verify)
    # Killed before the new run is in place: the old one is back; after: the new one stays.
    assert outcomes[0] == "old" and outcomes[-1] == "new" and "old" in outcomes[:4]
    assert outcomes == sorted(outcomes, key=["old", "new"].index)  # never back to old once new was in place
    assert len(outcomes) >= 8  # journal write, two renames, the old run's files one by one, the journal


def test_train_preparing_out_recovers_a_killed_replacement(tmp_path, capsys):
    data = make_class_folder(tmp_path / "data", {"a": 2, "b": 2})

    def train(out: Path) -> None:
        assert main(["train", "--data", str(data), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "already holds a run; pass `--overwrite`" in err, err  # the run is back in place, whole

    _replace_killed_at_each_step(tmp_path / "runs", train)


def test_a_bundle_folder_killed_at_any_step_is_recovered_by_bundle(fake_run, wheel, tmp_path, capsys):  # noqa: F811
    def bundle(out: Path) -> None:
        rc = main(["bundle", str(fake_run), "--format", "tflite-int8", "--out", str(out), "--wheel", str(wheel)])
        err = capsys.readouterr().err
        assert rc == 2 and "already holds a bundle; pass `--overwrite`" in err, err

    outcomes = _replace_killed_at_each_step(tmp_path / "bundles", bundle, kind="bundle", record="bundle.json")
    assert set(outcomes) == {"old", "new"}


@pytest.mark.parametrize("with_staging", [True, False])
def test_leftovers_of_an_earlier_version_without_a_journal_are_put_back(tmp_path, capsys, with_staging):
    """What the issue found: killed between the renames, an earlier featx-edge left `.run.old-PID`
    (and `.run.partial-PID`) and no run; the next command puts the old run back."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    old = tmp_path / f".run.old-{pid}"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps(MANIFEST | {"labels": ["old"]}))  # no marker: an earlier version
    if with_staging:
        (tmp_path / f".run.partial-{pid}").mkdir()
        (tmp_path / f".run.partial-{pid}" / "manifest.json").write_text("{}")
    main(["verify", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert "no such folder" not in err
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["labels"] == ["old"]
    assert not old.exists()


def test_a_journal_that_is_not_featx_edges_names_nothing_to_delete(tmp_path, capsys):
    """A journal naming folders outside featx-edge's own names is ignored, never followed."""
    run = tmp_path / "run"
    run.mkdir()
    _fill(run, version="old", kind="run", record="manifest.json")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (tmp_path / ".run.featx-edge.replace").write_text(json.dumps({"pid": 1 << 22, "old": "../victim",
                                                                  "new": "victim"}))
    main(["verify", str(run), "--quiet"])
    capsys.readouterr()
    assert (victim / "keep.txt").read_text() == "mine" and (run / "manifest.json").is_file()
