"""`featx-edge fit`: cut x size (x width) under a profile's RAM and flash, judged on validation.

A tiny grid on random-weight MobileNetV2 0.35 (`--weights none`, small random images): enough to
check that the figures are TFLM's and the file's, that a candidate that cannot fit is never
chosen, that the chosen one is trained and exported into --out with its cut recorded, and that
nothing fitting is refused in one line with the numbers.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_class_folder, one_line_error

from featx_edge.cli import main

MNV2 = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--weights", "none", "--seed", "0", "--alphas", "0.35"]


@pytest.fixture
def data(tmp_path):
    return make_class_folder(tmp_path / "data", {"a": 8, "b": 8}, size=24)


@pytest.mark.slow  # converts two models and trains three runs (about a minute on 2 busy cores)
def test_fit_picks_a_candidate_that_fits_trains_and_exports_it(tmp_path, data, capsys):
    from featx_edge.fit.parts import get_profile, tflm_arena

    run = tmp_path / "run"
    rc = main(["fit", "--data", str(data), "--profile", "cortex-m4-256k", "--out", str(run), *MNV2,
               "--cut-at", "block_2_add,block_5_add", "--image-sizes", "40,512", "--epochs", "2",
               "--feature-cache", str(tmp_path / "cache"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    record = json.loads((run / "fit.json").read_text())
    rows = {(r["candidate"]["cut_at"], r["candidate"]["size"]): r for r in record["candidates"]}
    assert len(rows) == 4 and record["judged_on"] == "validation split"
    for cut in ("block_2_add", "block_5_add"):  # 512 px: its first activations alone exceed 256 KB of RAM
        assert rows[(cut, 512)]["status"] == "pruned" and rows[(cut, 512)]["val_accuracy"] is None
        assert rows[(cut, 40)]["status"] == "fits" and 0 <= rows[(cut, 40)]["val_accuracy"] <= 1
        assert rows[(cut, 40)]["arena_bytes"] > 40 * 40 * 3  # at least the input image
    chosen = record["chosen"]["candidate"]
    assert chosen["size"] == 40 and record["chosen"]["pareto"]
    assert record["chosen"]["val_accuracy"] == max(rows[(c, 40)]["val_accuracy"] for c in ("block_2_add", "block_5_add"))

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["backbone"]["cut_at"] == chosen["cut_at"] and manifest["input"]["height"] == 40
    model = run / manifest["artifacts"]["tflite-int8"]["path"]
    final = record["final"]
    assert final["flash_bytes"] == model.stat().st_size and final["arena_bytes"] == tflm_arena(model)
    assert final["verdict"]["fits"] and final["verdict"]["ram"]["reserve"] == get_profile("cortex-m4-256k").runtime_reserve_bytes
    assert "> " + chosen["cut_at"] in out and "pruned" in out and f"{final['arena_bytes']:,} B" in out


def test_fit_refuses_in_one_line_with_the_numbers_when_nothing_fits(tmp_path, data, capsys):
    run = tmp_path / "run"
    rc = main(["fit", "--data", str(data), "--profile", "cortex-m4-256k", "--out", str(run), *MNV2,
               "--cut-at", "block_2_add", "--image-sizes", "400,512", "--quiet"])
    assert rc == 2
    err = one_line_error(capsys, "no candidate of 2 fits cortex-m4-256k", "229,376 B of RAM", "917,504 B of flash",
                         "block_2_add @ 400 px", "--image-sizes")
    assert "smallest arena was" in err and not run.exists()


def test_fit_names_an_unknown_profile_and_cut_before_any_work(tmp_path, data, capsys):
    assert main(["fit", "--data", str(data), "--profile", "cortex-m9", *MNV2]) == 2
    one_line_error(capsys, "`cortex-m9`", "cortex-m7-1m")
    assert main(["fit", "--data", str(data), "--profile", "cortex-m7-1m", *MNV2, "--cut-at", "block_2_add,nope"]) == 2
    one_line_error(capsys, "`nope`", "block_5_add")
