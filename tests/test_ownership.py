"""featx-edge deletes or replaces only what it made (issue 20, items 1, 2, 5 and three of item 12).

A run, a bundle (folder or zip) and a feature-cache folder carry a `.featx-edge` marker whose id their
manifest.json / bundle.json records; `--overwrite` refuses anything else, naming what it holds. `--out`
cannot be empty, `/`, the current folder or one holding it, or the data; a missing `--data` is refused
before any folder is made. Bundles copy no symbolic links and write no zip entry that leaves its folder.
Temporary files of a killed command are removed by the next one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import make_class_folder, make_manifest
from conftest import one_line_error as _one_line_error
from test_bundle import fake_run, wheel  # noqa: F401  (fixtures: a verified fake run, a stand-in wheel)

from featx_edge.cli import main
from featx_edge.files.ownership import ID_KEY, MARKER, read_marker

MANIFEST = make_manifest(backbone="mobilenet_v2", size=32)
TRAIN = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--weights", "none", "--image-size", "32", "--seed", "0",
         "--epochs", "1", "--quiet"]


@pytest.fixture
def data(tmp_path) -> Path:
    return make_class_folder(tmp_path / "data", {"a": 6, "b": 6}, size=32)



def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- item 1: train/run --overwrite, --out "" and other --out values --------------------------------

@pytest.mark.parametrize("command", ["train", "run"])
def test_overwrite_refuses_a_folder_that_merely_holds_a_manifest(tmp_path, data, capsys, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text(json.dumps(MANIFEST))  # even a valid run manifest
    (mine / "thesis.tex").write_text("years of work")
    before = _tree(mine)
    assert main([command, "--data", str(data), "--out", str(mine), "--overwrite", *TRAIN]) == 2
    _one_line_error(capsys, f"`--out {mine}` holds 2 files and no `{MARKER}` marker", "not a featx-edge run",
                    f"rm -r {mine}")
    assert _tree(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.featx-edge.lock", "data", "mine"]


def test_a_copied_marker_without_its_record_is_not_enough(tmp_path, data, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / MARKER).write_text(json.dumps({"made_by": "featx-edge", "kind": "run", "id": "0" * 32}))
    (mine / "manifest.json").write_text(json.dumps(MANIFEST | {ID_KEY: "1" * 32}))
    assert main(["train", "--data", str(data), "--out", str(mine), "--overwrite", *TRAIN]) == 2
    _one_line_error(capsys, "holds 2 files and a `.featx-edge` marker that its manifest.json does not record")
    assert (mine / "manifest.json").is_file()


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("out, message", [
    ("", "`--out` is empty"),
    (".", "is the current folder or holds it"),
    ("..", "is the current folder or holds it"),
    ("/", "is the root folder"),
    ("../data", "overlap"),
])
def test_out_must_be_a_folder_of_its_own(tmp_path, data, capsys, monkeypatch, command, out, message):
    """`--out ""` used to resolve to the current folder: wiped with --overwrite, a traceback, and
    `.NAME.featx-edge.resume` left in the parent. Now refused before anything is written."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main([command, "--data", str(data), "--out", out, "--overwrite", *TRAIN]) == 2
    _one_line_error(capsys, message)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no lock, no resume folder, nothing deleted


@pytest.mark.parametrize("command", ["train", "run"])
def test_a_missing_data_folder_is_refused_before_any_folder_is_made(tmp_path, capsys, command):
    """It was created as `--out`'s parent (the lock came first), then called "overlapping"."""
    missing = tmp_path / "missing"
    assert main([command, "--data", str(missing), "--out", str(missing / "run"), *TRAIN]) == 2
    _one_line_error(capsys, f"data folder `{missing}` does not exist")
    assert not missing.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # measured: 7.2 CPU s (tests/DURATIONS.md)
def test_a_run_carries_its_marker_and_overwrite_replaces_only_it(tmp_path, data, capsys):
    """A real (tiny) training: the run's marker id is in its manifest; a second training with
    --overwrite replaces it as a whole (new id), a third without is refused."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    first = read_marker(run)
    assert first is not None and first["kind"] == "run"
    assert json.loads((run / "manifest.json").read_text())[ID_KEY] == first["id"]
    (run / "stray.txt").write_text("goes with the old run")
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 2
    _one_line_error(capsys, "pass `--overwrite`")
    assert main(["train", "--data", str(data), "--out", str(run), "--overwrite", *TRAIN]) == 0
    second = read_marker(run)
    assert second["id"] != first["id"] and json.loads((run / "manifest.json").read_text())[ID_KEY] == second["id"]
    assert not (run / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.featx-edge.lock", "data", "run"]


def test_an_empty_folder_takes_a_run_and_gets_its_marker(tmp_path, data, monkeypatch):
    from featx_edge.training import train

    def trains(config, out, **_):  # the staging folder's marker is what the manifest records
        (out / "manifest.json").write_text(json.dumps(MANIFEST | {ID_KEY: read_marker(out)["id"]}))
        return {}

    monkeypatch.setattr(train, "_train_run", trains)
    run = tmp_path / "empty"
    run.mkdir()
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    assert read_marker(run)["kind"] == "run" and sorted(p.name for p in run.iterdir()) == [MARKER, "manifest.json"]
    assert main(["train", "--data", str(data), "--out", str(run), "--overwrite", *TRAIN]) == 0


# -- item 2: bundle --overwrite -------------------------------------------------------------------

def _bundle(run: Path, wheel: Path, out: Path, *extra: str) -> int:  # noqa: F811
    return main(["bundle", str(run), "--format", "tflite-int8", "--out", str(out), "--wheel", str(wheel), *extra])


def test_bundle_overwrite_refuses_a_folder_with_a_foreign_bundle_json(fake_run, wheel, tmp_path, capsys):  # noqa: F811
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "bundle.json").write_text("{}")
    (mine / "photos.tar").write_bytes(b"\0" * 100)
    before = _tree(mine)
    assert _bundle(fake_run, wheel, mine, "--overwrite") == 2
    _one_line_error(capsys, f"`--out {mine}` holds 2 files and no `{MARKER}` marker", "not a featx-edge bundle")
    assert _tree(mine) == before


def test_bundle_overwrite_refuses_a_zip_it_did_not_write(fake_run, wheel, tmp_path, capsys):  # noqa: F811
    mine = tmp_path / "mine.zip"
    with zipfile.ZipFile(mine, "w") as zf:
        zf.writestr("x/bundle.json", "{}")
        zf.writestr("x/holiday.jpg", b"\xff\xd8")
    before = mine.read_bytes()
    assert _bundle(fake_run, wheel, mine, "--overwrite") == 2
    _one_line_error(capsys, "holds 2 entries and no `.featx-edge` marker", "not a featx-edge bundle")
    assert mine.read_bytes() == before


def test_bundle_overwrite_refuses_a_run_folder(fake_run, wheel, tmp_path, capsys):  # noqa: F811
    """A featx-edge folder of another kind (a run) is not a bundle to replace."""
    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"made_by": "featx-edge", "kind": "run", "id": "2" * 32}))
    (other / "bundle.json").write_text(json.dumps({ID_KEY: "2" * 32}))
    assert _bundle(fake_run, wheel, other, "--overwrite") == 2
    _one_line_error(capsys, "marker of a featx-edge run, not a bundle")
    assert (other / "bundle.json").is_file()


@pytest.mark.parametrize("name", ["b", "b.zip"])
def test_a_bundle_is_marked_and_its_zip_entries_stay_in_one_folder(fake_run, wheel, tmp_path, name):  # noqa: F811
    out = tmp_path / name
    assert _bundle(fake_run, wheel, out) == 0
    if out.is_dir():
        assert read_marker(out)["kind"] == "bundle"
        assert json.loads((out / "bundle.json").read_text())[ID_KEY] == read_marker(out)["id"]
    else:
        with zipfile.ZipFile(out) as zf:
            names = zf.namelist()
            marker = json.loads(zf.read(f"b/{MARKER}"))
            assert json.loads(zf.read("b/bundle.json"))[ID_KEY] == marker["id"]
        assert all(n.startswith("b/") and ".." not in n.split("/") for n in names)
    assert _bundle(fake_run, wheel, out, "--overwrite") == 0  # its own bundle: replaced


@pytest.mark.parametrize("name", ["...zip", "..zip"])
def test_a_zip_name_that_would_make_entries_leave_the_folder_is_refused(fake_run, wheel, tmp_path, capsys,  # noqa: F811
                                                                        monkeypatch, name):
    """`--out ...zip` made every entry start with `../` (the folder in the zip is the name before .zip)."""
    monkeypatch.chdir(tmp_path)
    assert _bundle(fake_run, wheel, Path(name)) == 2
    _one_line_error(capsys, "cannot be one; give a name like `bundle.zip`")
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("out", ["", ".", ".."])
def test_bundle_out_must_not_be_the_current_folder(fake_run, wheel, tmp_path, capsys, monkeypatch, out):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["bundle", str(fake_run), "--format", "tflite-int8", "--out", out, "--wheel", str(wheel),
                 "--overwrite"]) == 2
    _one_line_error(capsys, "--out")
    assert list(work.iterdir()) == []


# -- item 5: symbolic links in selftest/ ----------------------------------------------------------

@pytest.mark.parametrize("link", ["images/00.png", "images", "model.tflite-int8.tflite.json"])
def test_bundle_copies_no_symbolic_link(fake_run, wheel, tmp_path, capsys, link):  # noqa: F811
    """A link in the run's selftest/ put the linked private file into the folder and the zip."""
    private = tmp_path / "private"
    private.mkdir()
    selftest = fake_run / "export" / "selftest"
    target = private / Path(link).name
    os.rename(selftest / link, target)
    (selftest / link).symlink_to(target)
    for out in (tmp_path / "b", tmp_path / "b.zip"):
        assert _bundle(fake_run, wheel, out) == 2
        _one_line_error(capsys, f"`{selftest / link}` is a symbolic link")
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".b.", ".tmp-"))]


# -- the feature cache's folder --------------------------------------------------------------------

def _key():
    from featx_edge.training.features import FeatureKey

    return FeatureKey(backbone="mobilenet_v2", alpha=0.35, weights_sha256=None, random_weights_seed=0,
                      image_size=32, preprocessing="mobilenet", resize="bilinear")


def test_the_feature_cache_folder_is_marked_and_a_foreign_one_refused(tmp_path):
    from featx_edge.errors import DataError
    from featx_edge.training.features import FeatureCache

    cache = FeatureCache(tmp_path / "cache", _key())
    assert read_marker(cache.dir)["kind"] == "feature-cache"
    FeatureCache(tmp_path / "cache", _key())  # its own folder: used again
    foreign = tmp_path / "other" / _key().digest()
    (foreign / "shards").mkdir(parents=True)
    (foreign / "shards" / "mine.npy").write_bytes(b"not featx-edge's")
    with pytest.raises(DataError, match=f"holds 1 folder and no `{MARKER}` marker"):
        FeatureCache(tmp_path / "other", _key())
    assert (foreign / "shards" / "mine.npy").read_bytes() == b"not featx-edge's"
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == [_key().digest()]


# -- item 12: a killed atomic write's 0-byte temporary file ---------------------------------------

def _owned_run(run: Path) -> Path:
    from featx_edge.files.ownership import mark

    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(MANIFEST | {ID_KEY: mark(run, kind="run")}))
    return run


def test_a_killed_write_leaves_a_temporary_file_that_the_next_command_removes(tmp_path, capsys):
    run = _owned_run(tmp_path / "run")
    (run / "export").mkdir()
    killed = subprocess.Popen([sys.executable, "-c", (
        "import os, sys\nfrom featx_edge.files.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n    os._exit(9)\n"), str(run / "export" / "model.tflite")],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert killed.wait() == 9
    (left,) = (run / "export").iterdir()
    assert left.name.startswith(f".tmp-{killed.pid}-") and left.stat().st_size == 0
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = run / f".tmp-{alive.pid}-abcdefgh-verify.json"  # a live writer's: not to be touched
        busy.write_bytes(b"")
        main(["verify", str(run), "--quiet"])  # fails (nothing exported); the dead temp file goes anyway
        err = capsys.readouterr().err
        assert ".tmp-" not in err and "Traceback" not in err
        assert list((run / "export").iterdir()) == [] and busy.exists()
    finally:
        alive.kill()
        alive.wait()


def test_temporary_files_are_removed_only_in_a_folder_featx_edge_made(tmp_path, capsys):
    """A folder without a marker is not featx-edge's: even files named like its temporary files stay."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "manifest.json").write_text(json.dumps(MANIFEST))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stray = plain / f".tmp-{dead.stdout.strip()}-abcdefgh-notes.txt"
    stray.write_text("mine")
    main(["verify", str(plain), "--quiet"])
    capsys.readouterr()
    assert stray.read_text() == "mine"
