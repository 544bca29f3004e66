"""A run directory is checked when it is read: another layout or a damaged manifest is refused
with a message that names the problem, never a KeyError from deep inside a command."""

import json

import pytest

from featx_edge.cli import main
from featx_edge.errors import RunDirError
from featx_edge.rundir import MANIFEST_VERSION, read_manifest

GOOD = {"manifest_version": MANIFEST_VERSION, "labels": ["a", "b"], "backbone": {"name": "efficientnet_lite0"},
        "input": {"height": 96, "width": 96}, "data": {"splits": "splits.json"},
        "reference": {"path": "model.weights.h5", "sha256": "0" * 64}, "config": {}, "artifacts": {}}


def _write(tmp_path, manifest) -> str:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return str(tmp_path)


def test_a_complete_manifest_reads(tmp_path):
    assert read_manifest(_write(tmp_path, GOOD))["labels"] == ["a", "b"]


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("manifest_version"), "an older layout (no `manifest_version`)"),
    (lambda m: m.update(manifest_version=99), "layout version 99"),
    (lambda m: m.pop("reference"), "`reference` is missing"),
    (lambda m: m.update(labels="a,b"), "`labels` is not a JSON list"),
    (lambda m: m["input"].pop("height"), "`input.height` is missing"),
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
