"""`featx-edge device-check`: the committed tiny models on emulated arm64 cores (QEMU user mode).

The emulated tests need `qemu-aarch64-static` (`apt-get install qemu-user-static`; `.ci/run`
installs it) and are skipped, with that reason, only where it is absent. Where it is present the
environment is built once per session into the tests' private FEATX_EDGE_HOME, from Debian's
archive and PyPI: a download failure fails the tests (CI has network), it never skips them.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_manifest
from PIL import Image

from featx_edge.cli import main
from featx_edge.device import env as device_env
from featx_edge.device.compare import SPEED_NOTE, compare_outputs
from featx_edge.device.cores import ARM64, DEFAULT_CORES, DeviceError, cpuinfo_text, parse_arch, parse_cores
from featx_edge.device.emulator import PERTURB_ENV, describe_exit, find_qemu
from featx_edge.device.guest import serve
from featx_edge.errors import ConfigError
from featx_edge.formats.registry import artifact_filename
from featx_edge.runtime import load

DATA = Path(__file__).parent / "data" / "runtime"
MODELS = {"tflite-float32": DATA / "model.tflite-float32.tflite", "tflite-int8": DATA / "model.tflite-int8.tflite",
          "onnx-float32": DATA / "model.onnx-float32.onnx"}
IMAGES = sorted((DATA / "images").glob("*.png"))

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None,
    reason="qemu-aarch64-static is not installed (`apt-get install qemu-user-static`): no emulated arm64 core here")
needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None or not device_env.KEYRING.is_file(),
                               reason="not a Debian-family host (apt-get and debian-archive-keyring)")


# -- fast unit tests: cores, cpuinfo, comparison, the guest's logic on this host ----------------

def test_cpuinfo_describes_the_emulated_core():
    text = cpuinfo_text(ARM64.cores["cortex-a72"], processors=3)
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 3 and [b.splitlines()[0] for b in blocks] == [f"processor\t: {i}" for i in range(3)]
    assert all("CPU part\t: 0xd08" in b and "CPU implementer\t: 0x41" in b and "CPU revision\t: 3" in b for b in blocks)
    a53 = cpuinfo_text(ARM64.cores["cortex-a53"], processors=1)
    a76 = cpuinfo_text(ARM64.cores["cortex-a76"], processors=1)
    assert "CPU part\t: 0xd03" in a53 and "asimddp" not in a53  # no dot product on an A53: XNNPACK must not use it
    assert "CPU part\t: 0xd0b" in a76 and "CPU variant\t: 0x4" in a76 and " asimddp" in a76
    assert " ssbs" in cpuinfo_text(ARM64.cores["neoverse-n1"], processors=1)
    with pytest.raises(ConfigError, match="processors"):
        cpuinfo_text(ARM64.cores["cortex-a53"], processors=0)


def test_core_lists_are_validated():
    assert parse_cores(ARM64, None) == DEFAULT_CORES
    assert parse_cores(ARM64, "cortex-a53, neoverse-n1") == ("cortex-a53", "neoverse-n1")
    with pytest.raises(ConfigError, match="`max` is refused: .*SVE.*wrong results.*supported on arm64: cortex-a35"):
        parse_cores(ARM64, "cortex-a53,max")
    with pytest.raises(ConfigError, match="`cortex-a99` is not a supported arm64 core.*cortex-a76, neoverse-n1"):
        parse_cores(ARM64, "cortex-a99")
    with pytest.raises(ConfigError, match="more than once"):
        parse_cores(ARM64, "cortex-a53,cortex-a53")
    with pytest.raises(ConfigError, match="separated by commas"):
        parse_cores(ARM64, "cortex-a53,,")
    assert parse_arch("aarch64") is ARM64
    with pytest.raises(ConfigError, match="`--arch` must be one of arm64; received `armhf`"):
        parse_arch("armhf")


def test_the_cli_refuses_max_and_unknown_arches_before_any_work(capsys):
    assert main(["device-check", str(MODELS["tflite-int8"]), "--cpu", "max"]) == 2
    assert "`max` is refused" in capsys.readouterr().err
    assert main(["device-check", str(MODELS["tflite-int8"]), "--arch", "riscv64"]) == 2
    assert "`--arch` must be one of arm64" in capsys.readouterr().err
    assert main(["device-check", str(MODELS["tflite-int8"]), "--images", "0"]) == 2
    assert "`--images` must be an integer >= 1" in capsys.readouterr().err


def _probs(rows):
    return np.asarray(rows, dtype=np.float64)


def test_comparison_passes_within_the_tolerance_and_names_every_failure():
    host = _probs([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    same = {"target": "m", "fmt": "tflite-int8", "core": "cortex-a53", "tolerance": 0.03, "host_test": host,
            "reference": host, "expected": host}
    row = compare_outputs(**same, guest_test=host + 0.02, guest_selftest=host)
    assert row.passed and row.top1_host == 3 and row.max_diff_host == pytest.approx(0.02)
    # A near-tie may flip within the tolerance: reported, not failed (|dp| <= tolerance everywhere).
    tie = host.copy()
    tie[2] = [0.3, 0.31, 0.39]
    flip = tie.copy()
    flip[2] = [0.3, 0.33, 0.37]
    row = compare_outputs(**{**same, "host_test": tie}, guest_test=flip, guest_selftest=host)
    assert row.passed and row.top1_host == 3
    row = compare_outputs(**{**same, "host_test": tie}, guest_test=tie + [[0, 0, 0], [0, 0, 0], [0, 0.2, -0.2]],
                          guest_selftest=host)
    assert not row.passed and row.top1_host == 2
    assert row.problems == ["max |dprob| versus the host 0.2 exceeds the tolerance 0.03 (on 1/3 images)"]
    wrong_class = host[:, [1, 0, 2]]  # the export-time reference's top-1 lost on every self-test image
    row = compare_outputs(**same, guest_test=host, guest_selftest=wrong_class)
    assert not row.passed and row.selftest_top1 == 1
    assert any("top-1 equals the export-time reference on only 1/3" in p for p in row.problems)
    nan = host.copy()
    nan[0, 0] = np.nan
    row = compare_outputs(**same, guest_test=nan, guest_selftest=host)
    assert not row.passed and row.max_diff_host is None and "not finite" in row.problems[0]
    row = compare_outputs(**same, guest_test=host[:2], guest_selftest=host)
    assert not row.passed and "shape (2, 3)" in row.error
    float_row = compare_outputs(**{**same, "tolerance": 1e-4}, guest_test=host + 2e-4, guest_selftest=host)
    assert not float_row.passed  # the float32 tolerance is the format's, never loosened
    assert json.dumps(row.to_dict()) and json.dumps(float_row.to_dict())


def test_the_guest_loads_each_model_once_and_reports_failures_per_model(tmp_path, monkeypatch):
    """The guest's code, run on this host: the same outputs as the runtime, a broken model reported."""
    broken = tmp_path / "model.tflite-int8.tflite"
    broken.write_bytes(b"not a model")
    request = {"threads": 1, "models": [
        {"path": str(MODELS["tflite-int8"]), "format": "tflite-int8", "images": {"test": list(map(str, IMAGES))}},
        {"path": str(broken), "format": "tflite-int8", "images": {"test": list(map(str, IMAGES))}}]}
    monkeypatch.delenv(PERTURB_ENV, raising=False)
    reply = serve(request)
    expected = load(MODELS["tflite-int8"], threads=1).predict_proba(IMAGES)
    np.testing.assert_array_equal(np.asarray(reply["models"][0]["outputs"]["test"], np.float32), expected)
    assert "error" in reply["models"][1] and "outputs" not in reply["models"][1]
    assert reply["versions"]["onnxruntime"] == importlib.metadata.version("onnxruntime")
    monkeypatch.setenv(PERTURB_ENV, "tflite-int8=0.5")
    perturbed = serve(request)["models"][0]["outputs"]["test"]
    np.testing.assert_allclose(np.asarray(perturbed)[:, 0], expected[:, 0] + 0.5, atol=1e-6)


def test_a_crashed_guest_is_named_by_its_signal():
    assert describe_exit(subprocess.CompletedProcess([], 1)) == "exit 1"
    assert describe_exit(subprocess.CompletedProcess([], -4)).startswith("killed by SIGILL (an instruction the emulated")
    assert describe_exit(subprocess.CompletedProcess([], -11)).startswith("killed by SIGSEGV (a crash; the CPU")


def test_a_missing_qemu_names_the_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceError, match=r"`qemu-aarch64-static` was not found.*`apt-get install qemu-user-static`"):
        find_qemu(ARM64)
    assert main(["device-check", str(MODELS["tflite-int8"]), "--cpu", "cortex-a53"]) == 2
    assert "apt-get install qemu-user-static" in capsys.readouterr().err


def test_one_builder_at_a_time_and_dead_builds_are_cleared(tmp_path):
    home = tmp_path / "arm64"
    (home / ".build-dead123" / "sysroot").mkdir(parents=True)  # what a killed build leaves
    acquired = threading.Event()

    def second_builder():
        with device_env._build_lock(home):
            acquired.set()

    with device_env._build_lock(home):
        assert not (home / ".build-dead123").exists()
        thread = threading.Thread(target=second_builder)
        thread.start()
        assert not acquired.wait(0.5)  # it waits while the first one builds
    thread.join(10)
    assert acquired.is_set()


@needs_qemu
@needs_apt
def test_an_unreachable_debian_archive_is_a_clear_error_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATX_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(device_env, "DEBIAN_ARCHIVES", (("http://127.0.0.1:9/debian", ("bookworm",)),))
    with pytest.raises(DeviceError, match=r"(?s)`apt-get update` for Debian bookworm arm64 failed.*reaches Debian"):
        device_env.ensure_environment(ARM64, qemu=find_qemu(ARM64))
    home = tmp_path / "home" / "device" / "arm64"
    assert sorted(p.name for p in home.iterdir()) == [".build.lock"]  # no half-built environment


@needs_qemu
@needs_apt
def test_a_wheel_pypi_lacks_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATX_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(device_env, "_fetch_sysroot", lambda arch, *, work, sysroot: {})  # only the pip step
    monkeypatch.setattr(device_env, "WHEELS", ("numpy",))
    real = device_env._request
    monkeypatch.setattr(device_env, "_request", lambda arch: {**real(arch), "wheels": {"numpy": "0.0.1"}})
    with pytest.raises(DeviceError, match=r"(?s)`pip download` of the aarch64 wheels \(numpy==0.0.1\) failed.*PyPI"):
        device_env.ensure_environment(ARM64, qemu=find_qemu(ARM64))


# -- on emulated cores ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def arm64_env(_isolated_homes):
    """The emulated arm64 environment, built once per session in the tests' FEATX_EDGE_HOME."""
    return device_env.ensure_environment(ARM64, qemu=find_qemu(ARM64))


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A run folder around the committed tiny models: their exports, self-test files and a test split."""
    run = tmp_path / "run"
    shutil.copytree(DATA / "selftest", run / "export" / "selftest")
    artifacts = {}
    for fmt, model in MODELS.items():
        shutil.copy(model, run / "export" / artifact_filename(fmt))
        artifacts[fmt] = {"path": f"export/{artifact_filename(fmt)}"}
    data = tmp_path / "data"
    names = []
    for i, color in enumerate(["red", "green", "blue"] * 3):  # 9 test images, three per class
        pixels = np.zeros((40, 40, 3), np.uint8)
        pixels[..., "rgb".index(color[0])] = 120 + 15 * i
        (data / color).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(data / color / f"{i}.png")
        names.append(f"{color}/{i}.png")
    (run / "splits.json").write_text(json.dumps({"data_root": str(data), "seed": 0, "classes": ["red", "green", "blue"],
                                                 "train": [], "val": [], "test": names}))
    from featx_edge.files.atomic import sha256_file

    for fmt, entry in artifacts.items():
        path = run / entry["path"]
        entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (run / "manifest.json").write_text(json.dumps(make_manifest(labels=["red", "green", "blue"], backbone="tiny",
                                                                size=32, artifacts=artifacts)))
    # What verify records: the reference's test-split outputs (the tiny float32 model stands in for Keras).
    from featx_edge.runtime import load
    from featx_edge.verify.runner import REFERENCE_OUTPUTS

    reference = load(MODELS["tflite-float32"]).predict_proba([data / name for name in names])
    np.save(run / REFERENCE_OUTPUTS, reference.astype(np.float32))
    (run / "verify.json").write_text(json.dumps({"reference_sha256": "0" * 64, "reference_outputs": {
        "path": REFERENCE_OUTPUTS, "sha256": sha256_file(run / REFERENCE_OUTPUTS), "shape": list(reference.shape)}}))
    return run


@pytest.mark.slow  # measured: 11.7 CPU s (setup 12.8) (tests/DURATIONS.md)
@needs_qemu
def test_the_tiny_models_pass_on_two_emulated_cores(arm64_env, tiny_run, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["device-check", str(tiny_run), str(MODELS["onnx-float32"]), "--cpu", "cortex-a53,cortex-a72",
               "--images", "6", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert SPEED_NOTE in text and " ms" not in text and "latency" not in text
    run_report = json.loads((tiny_run / "device_check.json").read_text())
    report = json.loads(out.read_text())
    assert report["passed"] and [t["target"] for t in report["targets"]] == [str(tiny_run), str(MODELS["onnx-float32"])]
    assert report["targets"][0] == run_report
    assert run_report["images"]["count"] == 6
    assert run_report["images"]["source"].startswith("the test split (6 of 9 images, evenly spaced) (fewer than 200")
    assert {(r["format"], r["core"]) for r in run_report["results"]} == {
        (fmt, core) for fmt in MODELS for core in ("cortex-a53", "cortex-a72")}
    for target in report["targets"]:
        assert target["note"] == SPEED_NOTE and target["passed"]
        for row in target["results"]:
            assert row["passed"] and row["problems"] == [], row
            assert row["top1_host"] == row["images"] == 6 and row["selftest_top1"] == row["selftest_images"] == 6
            assert row["max_diff_host"] <= row["tolerance"] and row["max_diff_export"] <= row["tolerance"]
            if target["target"] == str(tiny_run):  # a run: judged against the Keras reference, as verify does
                assert row["gate"]["judged_top1_agreement"] == 1.0 and row["gate"]["failures"] == [], row
            else:
                assert row["gate"] is None
        for core, part in (("cortex-a53", "0xd03"), ("cortex-a72", "0xd08")):
            guest = target["guest"][core]
            assert guest["machine"] == "aarch64" and guest["cpuinfo"] == part
            assert guest["versions"] == target["host"]["versions"]  # the same engines: only the CPU differs
    assert run_report["environment"]["debian"] == arm64_env.info["debian"]
    assert set(run_report["environment"]["debian"]) == set(device_env.DEBIAN_PACKAGES)


@needs_qemu
def test_the_environment_is_built_once_and_reused(arm64_env, monkeypatch):
    def rebuild(*args, **kwargs):
        raise AssertionError("the cached environment was rebuilt")

    monkeypatch.setattr(device_env, "_build_base", rebuild)
    again = device_env.ensure_environment(ARM64, qemu=find_qemu(ARM64))
    assert again.base == arm64_env.base and again.python.is_file()
    assert again.base.name.startswith("base-") and not list(again.base.parent.glob(".build-*"))


@pytest.mark.slow  # measured: 4.0 CPU s (tests/DURATIONS.md)
@needs_qemu
def test_a_wrong_result_on_the_emulated_core_fails_the_check(arm64_env, tmp_path, capsys, monkeypatch):
    """The guest perturbs its float32 outputs by 0.001 (the test hook): the real comparison must catch it."""
    monkeypatch.setenv(PERTURB_ENV, "tflite-float32=0.001")
    out = tmp_path / "report.json"
    rc = main(["device-check", str(MODELS["tflite-float32"]), str(MODELS["tflite-int8"]), "--cpu", "cortex-a72",
               "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 1, text
    rows = {r["format"]: r for t in json.loads(out.read_text())["targets"] for r in t["results"]}
    bad, good = rows["tflite-float32"], rows["tflite-int8"]
    assert not bad["passed"] and bad["max_diff_host"] == pytest.approx(0.001, abs=2e-6)
    assert "max |dprob| versus the host 0.001 exceeds the tolerance 0.0001 (on 6/6 images)" in bad["problems"]
    assert good["passed"]  # only the perturbed format fails
    assert f"FAIL {MODELS['tflite-float32']} tflite-float32 on cortex-a72" in text


@pytest.mark.slow  # measured: 11.1 CPU s (tests/DURATIONS.md)
@needs_qemu
def test_a_run_is_judged_against_the_reference_not_the_host(arm64_env, tiny_run, capsys, monkeypatch):
    """Outputs 0.04 away from the host's on every image (beyond int8's 0.03 self-test tolerance) but
    with the reference's top-1 classes: the run passes (the host's |dp| is information); a bare
    model file, which has no reference, still fails on it. Moved far enough to change classes, the
    run fails verify's gate on that core."""
    monkeypatch.setenv(PERTURB_ENV, "tflite-int8=0.04")
    assert main(["device-check", str(tiny_run), "--formats", "tflite-int8", "--cpu", "cortex-a72", "--quiet"]) == 0
    row = json.loads((tiny_run / "device_check.json").read_text())["results"][0]
    assert row["passed"] and row["max_diff_host"] > row["tolerance"] and row["gate"]["failures"] == []
    assert main(["device-check", str(MODELS["tflite-int8"]), "--cpu", "cortex-a72", "--quiet"]) == 1
    capsys.readouterr()

    monkeypatch.setenv(PERTURB_ENV, "tflite-int8=1.0")  # class 0 wins everywhere: 6 of 9 images change
    assert main(["device-check", str(tiny_run), "--formats", "tflite-int8", "--cpu", "cortex-a72", "--quiet"]) == 1
    text = capsys.readouterr().out
    row = json.loads((tiny_run / "device_check.json").read_text())["results"][0]
    assert row["gate"]["judged_top1_agreement"] == pytest.approx(3 / 9)
    assert "top-1 agreement 0.3333 < 0.97 (against the Keras reference on cortex-a72)" in text


def test_a_run_without_verify_outputs_is_refused_with_the_fix(tiny_run, capsys):
    (tiny_run / "verify_reference.npy").unlink()
    assert main(["device-check", str(tiny_run), "--cpu", "cortex-a72"]) == 2
    err = capsys.readouterr().err
    assert f"run `featx-edge verify {tiny_run}` first" in err and "Traceback" not in err
