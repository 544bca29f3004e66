"""`featx-edge mcu`: TensorFlow Lite Micro's verdict and arena, Vela for Ethos-U, profile fits, the [mcu]
extra, the run's [mcu] table, the report section and `bundle --target mcu`.

Fast tests use the tiny int8 model of tests/data/runtime; the slow ones train a tiny run (frozen
random MobileNetV2 0.35 at 32 px, three classes: about a minute) through `featx-edge run --profile`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_class_folder, one_line_error

from featx_edge.cli import main
from featx_edge.errors import ConfigError
from featx_edge.mcu import MCU_JSON
from featx_edge.mcu.profiles import PROFILES, Profile, fit, get_profile, misfit_line, parse_profiles
from featx_edge.mcu.tflm import run_tflm
from featx_edge.mcu.vela import compile_for, parse_npu

DATA = Path(__file__).parent / "data"
SMALL = DATA / "runtime" / "model.tflite-int8.tflite"
UNSUPPORTED = DATA / "mcu" / "unsupported_rfft2d.tflite"


def _pixels(tmp_path: Path) -> tuple[Path, np.ndarray]:
    from featx_edge.runtime.image import load_pixels

    images = sorted((DATA / "runtime" / "images").glob("*.png"))
    pixels = np.stack([load_pixels(image, height=32, width=32) for image in images])
    path = tmp_path / "pixels.npy"
    np.save(path, pixels)
    return path, pixels


# -- TensorFlow Lite Micro -------------------------------------------------------------------------
def test_tflm_equals_litert_reference_kernels_and_reports_its_own_arena(tmp_path):
    """TFLM's outputs equal LiteRT's reference kernels bit for bit (what verify gates as `reference`); the arena
    is the recording allocator's total, a figure of this model, not a multiple of its size."""
    from featx_edge.runtime import load

    path, pixels = _pixels(tmp_path)
    result = run_tflm(SMALL, path, images=len(pixels))
    assert result.error is None and result.unsupported_ops == ()
    expected = load(SMALL, kernels="reference").predict_pixels(pixels)
    np.testing.assert_array_equal(result.probs, expected)
    assert list(result.probs.argmax(1)) == [2, 2, 1, 1, 0, 0]  # blue, green, red: the model answers right
    assert "Arena allocation total" in result.log
    assert 1024 < result.arena_bytes < 64 * 1024, result.arena_bytes


def test_an_operator_tflm_cannot_run_is_named_with_what_to_do(tmp_path):
    pixels = tmp_path / "x.npy"
    np.save(pixels, np.zeros((1, 8, 8), np.float32))
    result = run_tflm(UNSUPPORTED, pixels, images=1)
    assert result.probs is None and result.unsupported_ops == ("RFFT2D",)
    assert "no kernel for RFFT2D" in result.error and "op resolver" in result.error


# -- profiles ----------------------------------------------------------------------------------------
def test_every_profile_states_its_figures_source_and_reserves():
    for profile in PROFILES.values():
        assert profile.ram_bytes > profile.runtime_reserve_bytes > 0
        assert profile.flash_bytes > profile.code_reserve_bytes > 0
        assert "datasheet" in profile.source.lower() or "specification" in profile.source.lower(), profile
    names = set(PROFILES)
    assert {"cortex-m4-256k", "cortex-m7-1m", "cortex-m33-786k", "esp32-s3", "rp2350", "cortex-m55-ethos-u55"} <= names
    assert get_profile("cortex-m55-ethos-u55").npu == "ethos-u55-256"


def test_the_fit_verdict_gives_both_margins_and_a_miss_says_by_how_much():
    m4 = get_profile("cortex-m4-256k")
    verdict = fit(m4, arena_bytes=134_048, model_bytes=630_000)
    assert verdict["fits"]
    assert verdict["ram"]["margin"] == 256 * 1024 - 134_048 - m4.runtime_reserve_bytes
    assert verdict["flash"]["margin"] == 1024 * 1024 - 630_000 - m4.code_reserve_bytes
    lite0 = fit(m4, arena_bytes=300_000, model_bytes=3_970_000)  # the default EfficientNet-Lite0 int8 export
    assert not lite0["fits"]
    line = misfit_line("tflite-int8", lite0)
    over_ram = 300_000 + m4.runtime_reserve_bytes - 256 * 1024
    over_flash = 3_970_000 + m4.code_reserve_bytes - 1024 * 1024
    assert f"RAM needs {300_000 + m4.runtime_reserve_bytes:,} B" in line and f"{over_ram:,} B over" in line
    assert f"{over_flash:,} B over" in line and "\n" not in line


def test_unknown_profile_and_npu_names_are_refused_naming_the_choices(capsys):
    with pytest.raises(ConfigError, match="cortex-m7-1m"):
        parse_profiles("cortex-m9")
    with pytest.raises(ConfigError, match="ethos-u55-128"):
        parse_npu("ethos-u99")
    assert parse_profiles("rp2350, rp2350,esp32-s3") == ("rp2350", "esp32-s3")
    assert main(["mcu", "runs/none", "--profile", "cortex-m9"]) == 2
    one_line_error(capsys, "unknown microcontroller profile `cortex-m9`", "--profile list")


def test_profile_list_prints_the_table(capsys):
    assert main(["mcu", "--profile", "list"]) == 0
    out = capsys.readouterr().out
    for profile in PROFILES.values():
        assert profile.name in out and profile.source in out


# -- Vela ----------------------------------------------------------------------------------------------
def test_vela_compiles_the_small_model_for_ethos_u55_and_keeps_its_warnings_out_of_the_way(tmp_path, capfd):
    out = tmp_path / "small_vela.tflite"
    entry = compile_for(SMALL, "ethos-u55-128", out=out)
    assert capfd.readouterr() == ("", "")  # nothing printed: Vela's output is recorded, not shown
    assert entry["npu_op_share"] == 1.0 and entry["cpu_ops"] == [] and entry["npu_ops"] > 0
    assert entry["sram_bytes"] > 0 and entry["flash_bytes"] > 0 and entry["inference_ms"] > 0
    assert entry["inference_ms_is"] == "estimate" and entry["clock_hz"] == 500_000_000
    assert entry["system_config"] == "Ethos_U55_High_End_Embedded"
    assert any("No system configuration specified" in w for w in entry["vela_warnings"])
    assert out.read_bytes()[4:8] == b"TFL3"


def test_vela_names_the_operators_it_leaves_to_the_cpu(tmp_path):
    entry = compile_for(UNSUPPORTED, "ethos-u55-128", out=tmp_path / "v.tflite")
    assert entry["npu_op_share"] == 0.0
    assert {op["op"] for op in entry["cpu_ops"]} == {"RFFT2D", "COMPLEX_ABS"}
    assert all(op["reason"] for op in entry["cpu_ops"])


# -- the [mcu] extra -------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, args", [("tflite_micro", []), ("ethosu", ["--npu", "ethos-u55-128"])])
def test_a_missing_mcu_extra_is_one_line_naming_it(monkeypatch, capsys, tmp_path, module, args):
    monkeypatch.setitem(sys.modules, module, None)  # `import tflite_micro` now fails, as without the extra
    assert main(["mcu", str(tmp_path / "run"), *args]) == 2
    one_line_error(capsys, "pip install 'featx-edge[mcu]'", f"`{module}`")


def test_run_refuses_a_missing_mcu_extra_before_training(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "tflite_micro", None)
    data = make_class_folder(tmp_path / "data", {"a": 3, "b": 3})
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--profile", "rp2350"]) == 2
    one_line_error(capsys, "pip install 'featx-edge[mcu]'")
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_run_refuses_an_mcu_check_without_a_fully_integer_tflite_format_before_training(tmp_path, capsys):
    data = make_class_folder(tmp_path / "data", {"a": 3, "b": 3})
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--formats", "onnx-int8,tflite-dynamic",
                 "--mcu"]) == 2
    one_line_error(capsys, "fully-integer TFLite", "add tflite-int8")
    assert not (tmp_path / "run").exists()


def test_an_mcu_table_in_the_config_asks_for_the_check_and_bad_names_stop_run_before_training(tmp_path, capsys):
    from featx_edge.config import RunConfig, load_config

    good = tmp_path / "good.toml"
    good.write_text('[mcu]\nprofiles = ["cortex-m7-1m"]\nnpu = ["ethos-u55-128"]\n', encoding="utf-8")
    config = load_config(good)
    assert config.mcu.wanted and config.mcu.profiles == ("cortex-m7-1m",) and config.mcu.npu == ("ethos-u55-128",)
    empty = tmp_path / "empty.toml"
    empty.write_text("[mcu]\n", encoding="utf-8")
    assert load_config(empty).mcu.wanted and not RunConfig().mcu.wanted
    bad = tmp_path / "bad.toml"
    bad.write_text('[mcu]\nprofiles = ["cortex-m9"]\n', encoding="utf-8")
    data = make_class_folder(tmp_path / "data", {"a": 3, "b": 3})
    assert main(["run", "--config", str(bad), "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "cortex-m9")
    assert not (tmp_path / "run").exists()


# -- a real run (slow) -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mcu_run(tmp_path_factory) -> Path:
    """`featx-edge run --profile ... --npu ...`: train, export tflite-int8, verify, then the mcu check."""
    root = tmp_path_factory.mktemp("mcu")
    data = make_class_folder(root / "data", {"a": 20, "b": 20, "c": 20}, size=32)
    run = root / "run"
    rc = main(["run", "--data", str(data), "--out", str(run), *TINY, "--image-size", "32", "--weights", "none",
               "--epochs", "2", "--formats", "tflite-int8", "--profile", "cortex-m4-256k,cortex-m55-ethos-u55",
               "--npu", "ethos-u55-256", "--quiet"])
    assert rc == 0
    return run


@pytest.mark.slow
def test_run_with_profiles_writes_mcu_json_as_verify_judges(mcu_run):
    report = json.loads((mcu_run / MCU_JSON).read_text())
    verify = json.loads((mcu_run / "verify.json").read_text())["formats"]["tflite-int8"]
    entry = report["formats"]["tflite-int8"]
    tflm = entry["tflm"]
    for key in ("top1_agreement", "accuracy", "accuracy_change_points", "images", "arena_bytes", "flash_bytes",
                "unsupported_ops"):
        assert key in tflm, key
    # TFLM computes what LiteRT's reference kernels compute: the same figures as verify's `reference` row.
    reference = verify["kernels"]["reference"]
    for key in ("top1_agreement", "accuracy", "judged_top1_agreement", "max_abs_diff"):
        assert tflm[key] == reference[key], key
    assert tflm["flash_bytes"] == (mcu_run / entry["path"]).stat().st_size and tflm["unsupported_ops"] == []
    assert tflm["arena_bytes"] > 0 and entry["passed"] and report["passed"]
    npu = entry["npu"]["ethos-u55-256"]
    for key in ("npu_op_share", "cpu_ops", "sram_bytes", "flash_bytes", "inference_ms", "clock_hz", "system_config"):
        assert key in npu, key
    assert npu["inference_ms_is"] == "estimate" and (mcu_run / npu["path"]).is_file()
    assert set(entry["fit"]) == {"cortex-m4-256k", "cortex-m55-ethos-u55"}
    assert "Vela" in entry["fit"]["cortex-m55-ethos-u55"]["basis"]  # the NPU part is sized on the NPU's figures
    firmware = mcu_run / entry["firmware"]["folder"]
    assert sorted(p.name for p in firmware.iterdir()) == sorted(entry["firmware"]["files"])
    html = (mcu_run / "report.html").read_text()
    assert 'id="mcu"' in html and "Vela&#x27;s estimate" in html


@pytest.mark.slow
def test_a_model_that_does_not_fit_is_refused_with_the_numbers(mcu_run, monkeypatch, capsys):
    tiny = Profile("tiny-part", part="a 64 KB part", core="Cortex-M0+", ram_bytes=64 * 1024, flash_bytes=256 * 1024,
                   source="a test's datasheet", runtime_reserve_bytes=8 * 1024, code_reserve_bytes=64 * 1024)
    monkeypatch.setitem(PROFILES, tiny.name, tiny)
    assert main(["mcu", str(mcu_run), "--profile", "tiny-part,cortex-m4-256k"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    report = json.loads((mcu_run / MCU_JSON).read_text())
    verdict = report["formats"]["tflite-int8"]["fit"]["tiny-part"]
    over = -verdict["flash"]["margin"]
    assert "tflite-int8 does not fit tiny-part" in err and f"{over:,} B over" in err
    assert "cortex-m4-256k" not in err and "DOES NOT FIT" in captured.out  # the table, then the one line
    assert not report["passed"] and report["formats"]["tflite-int8"]["fit"]["cortex-m4-256k"]["fits"]
    # A format that failed the check is not bundled as firmware without saying so.
    out = mcu_run.parent / "refused-fw"
    assert main(["bundle", str(mcu_run), "--format", "tflite-int8", "--target", "mcu", "--out", str(out)]) == 2
    one_line_error(capsys, "failed `featx-edge mcu`", "does not fit tiny-part", "--allow-unverified")
    assert not out.exists()


@pytest.mark.slow
def test_report_marks_changed_firmware_stale_and_bundle_packs_the_sources(mcu_run, tmp_path, capsys):
    assert main(["mcu", str(mcu_run), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["formats"]["tflite-int8"]["passed"]
    out = tmp_path / "fw"
    assert main(["bundle", str(mcu_run), "--format", "tflite-int8", "--target", "mcu", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == sorted(["README.md", "bundle.json", "labels.h", "mcu.json", "model_data.cc", "model_data.h",
                            "model_settings.h"])
    assert (out / "model_data.cc").read_bytes() == (mcu_run / "export/mcu/tflite-int8/model_data.cc").read_bytes()
    assert "FEATX_TENSOR_ARENA_SIZE" in (out / "README.md").read_text()
    source = mcu_run / "export" / "mcu" / "tflite-int8" / "labels.h"
    saved = source.read_bytes()
    try:
        source.write_bytes(saved + b"// edited\n")
        assert main(["report", str(mcu_run)]) == 0
        html = (mcu_run / "report.html").read_text()
        section = html[html.index('id="mcu"'):]
        assert "stale" in section and "labels.h" in section
    finally:
        source.write_bytes(saved)


@pytest.mark.slow
def test_mcu_without_verify_reference_outputs_says_to_run_verify(mcu_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(mcu_run, copy)
    (copy / "verify_reference.npy").unlink()
    assert main(["mcu", str(copy)]) == 2
    one_line_error(capsys, f"featx-edge verify {copy}", "mcu judges against")


@pytest.mark.slow
def test_mcu_needs_no_tensorflow_and_keeps_only_the_vela_files_it_records(mcu_run):
    """The check runs TFLM and Vela on the exports and the reference outputs verify recorded: no TensorFlow."""
    import subprocess

    from conftest import BLOCK_TENSORFLOW

    code = BLOCK_TENSORFLOW + (f"from featx_edge.cli import main\nraise SystemExit(main(['mcu', {str(mcu_run)!r}, "
                               "'--npu', 'ethos-u55-128', '--quiet']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    vela = sorted(p.name for p in (mcu_run / "export").glob("*.vela.tflite"))
    assert vela == ["model.tflite-int8.ethos-u55-128.vela.tflite"]  # the fixture's ethos-u55-256 file is gone
    assert list(json.loads((mcu_run / MCU_JSON).read_text())["formats"]["tflite-int8"]["npu"]) == ["ethos-u55-128"]


@pytest.mark.slow
def test_a_symlink_where_the_sources_go_is_replaced_never_followed(mcu_run, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    folder = mcu_run / "export" / "mcu" / "tflite-int8"
    shutil.rmtree(folder)
    folder.symlink_to(outside, target_is_directory=True)
    assert main(["mcu", str(mcu_run), "--quiet"]) == 0
    assert (outside / "keep.txt").read_text() == "mine" and sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert not folder.is_symlink() and (folder / "model_data.cc").is_file()
