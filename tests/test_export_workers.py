"""Issue 24, "use the cores": the float formats in a second process (``[export] workers``).

The worker's files are the files an export in one process writes (TFLite byte for byte; ONNX, whose
tf2onnx names change between processes, by its outputs), its errors reach the user as the export's
own, a worker that dies leaves this process to convert, and ``"auto"`` starts one only where it pays.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
from conftest import TINY, make_class_folder, one_line_error

from featx_edge.export import workers

# -- when a worker starts ----------------------------------------------------------------------
SIX = ("tflite-float32", "tflite-float16", "tflite-dynamic", "tflite-int8", "onnx-float32", "onnx-int8")


def test_the_worker_takes_the_formats_made_from_the_reference_alone():
    assert workers.worker_formats(SIX) == ["tflite-float32", "tflite-float16", "tflite-dynamic", "onnx-float32"]
    assert workers.worker_formats(("tflite-int16x8", "tflite-int8-selective", "tflite-int8-qat")) == []


@pytest.mark.parametrize(("setting", "formats", "parameters", "choice", "cores", "load", "expected"), [
    (2, SIX, 10, False, 1, 9.0, True),  # asked for: started, small model, busy machine or not
    (1, SIX, 10**8, True, 16, 0.0, False),  # asked not to
    ("auto", SIX, 3_400_000, True, 2, 0.5, True),  # the main job: Lite0 with the per-run int8 choice
    ("auto", SIX, 3_400_000, True, 2, 1.5, False),  # no idle core: the worker's start only adds work
    ("auto", SIX, 400_000, True, 2, 0.0, False),  # a small model: the worker's start costs what it saves
    ("auto", SIX, 3_400_000, False, 2, 0.0, False),  # no int8 choice to overlap with
    ("auto", SIX, 3_400_000, True, 1, 0.0, False),  # one core: the two would take turns
    (2, ("tflite-float32", "onnx-float32"), 10**8, True, 16, 0.0, False),  # nothing left here to overlap with
    (2, ("tflite-int8", "onnx-int8"), 10**8, True, 16, 0.0, False),  # nothing for the worker
])
def test_when_a_worker_starts(monkeypatch, setting, formats, parameters, choice, cores, load, expected):
    monkeypatch.setattr(workers, "usable_cores", lambda: cores)
    monkeypatch.setattr(workers, "idle_cores", lambda n: n - load)
    assert workers.use_worker(setting, formats=formats, parameters=parameters, int8_choice=choice) is expected


@pytest.mark.parametrize("value", [0, 3, "two", True, 1.5])
def test_workers_setting_is_checked(value):
    from featx_edge.config import ExportConfig
    from featx_edge.errors import ConfigError

    with pytest.raises(ConfigError, match='`workers` must be "auto", 1 .* or 2'):
        ExportConfig(workers=value)


def test_workers_in_a_config_file_gives_one_line(tmp_path, capsys):
    from featx_edge.cli import main

    (tmp_path / "c.toml").write_text("[export]\nworkers = 4\n")
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "run")]) == 2
    one_line_error(capsys, "`workers`", "received `4`")


# -- the worker process itself ------------------------------------------------------------------
def test_a_worker_error_is_the_exports_error(tmp_path):
    """What fails in the worker is raised where the export takes the format, with its own message."""
    from featx_edge.errors import RunDirError

    worker = workers.FloatWorker(tmp_path / "no-run", ["tflite-float32"], metadata={"tflite-float32": {}})
    try:
        with pytest.raises(RunDirError, match="no-run"):
            worker.take("tflite-float32")
        assert worker.take("tflite-float32") is None  # taken once; not the worker's any more
    finally:
        worker.close()


def test_a_worker_that_dies_leaves_the_format_to_this_process(tmp_path, caplog):
    worker = workers.FloatWorker(tmp_path / "no-run", ["tflite-float32"], metadata={"tflite-float32": {}})
    try:
        # Killed at once: a spawned interpreter takes far longer to start than this takes to kill it.
        for pid in list(worker._pool._processes):
            os.kill(pid, signal.SIGKILL)
        with caplog.at_level("WARNING"):
            assert worker.take("tflite-float32") is None
        assert "the export worker stopped" in caplog.text and "converting tflite-float32 here" in caplog.text
    finally:
        worker.close()


# -- a run exported with and without the worker ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from featx_edge.cli import main

    root = tmp_path_factory.mktemp("workers")
    data = make_class_folder(root / "data", {"a": 12, "b": 12}, size=32)
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TINY, "--image-size", "32", "--weights", "none",
                 "--epochs", "2", "--quiet"]) == 0
    return root, run


@pytest.mark.slow  # two exports of six formats and a spawned TensorFlow process
def test_files_made_by_the_worker_are_those_made_here(tiny_run, capsys):
    from featx_edge.cli import main
    from featx_edge.runtime import load

    root, run = tiny_run
    made = {}
    for setting in ("1", "2"):
        copy = root / f"run-{setting}"
        shutil.copytree(run, copy)
        assert main(["export", str(copy), "--workers", setting]) == 0
        made[setting] = copy
    out = capsys.readouterr().out + capsys.readouterr().err
    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in made.items()}
    assert manifests["2"]["config"]["export"]["workers"] == 2
    one, two = manifests["1"]["artifacts"], manifests["2"]["artifacts"]
    assert set(one) == set(two) == set(SIX)
    for fmt in SIX:
        if fmt.startswith("tflite"):
            assert one[fmt]["sha256"] == two[fmt]["sha256"], fmt
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for fmt in ("onnx-float32", "onnx-int8"):
        a = load(made["1"] / one[fmt]["path"]).predict_pixels(images)
        b = load(made["2"] / two[fmt]["path"]).predict_pixels(images)
        np.testing.assert_array_equal(a, b, err_msg=fmt)
    assert "in a second process" in out


def test_the_workers_own_times_are_stages_of_their_own():
    """`featx-edge run`'s stage times show what the worker spent, beside this process's stages."""
    from featx_edge.progress import StageClock, record

    record("export tflite-float32 (second process)", seconds=1.0, cpu_seconds=1.0)  # no clock: nothing
    with StageClock.started() as clock:
        record("export tflite-float32 (second process)", seconds=2.5, cpu_seconds=2.0)
        record("export tflite-float32 (second process)", seconds=0.5, cpu_seconds=0.25)
    assert clock.stages == {"export tflite-float32 (second process)": {"seconds": 3.0, "cpu_seconds": 2.25}}


def test_idle_cores_are_read_from_the_machines_idle_share(monkeypatch):
    """Two CPUs, one of them busy between the two readings: one idle core. Without /proc/stat: the load average."""
    ticks = iter([(1000, 4000), (1100, 4200)])  # 100 of 200 ticks idle
    monkeypatch.setattr(workers, "_cpu_ticks", lambda: next(ticks))
    monkeypatch.setattr(workers.time, "sleep", lambda s: None)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 2)
    assert workers.idle_cores(2) == pytest.approx(1.0)

    def unreadable():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(workers, "_cpu_ticks", unreadable)
    monkeypatch.setattr(workers.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert workers.idle_cores(2) == pytest.approx(0.5)


def test_idle_cores_on_this_machine_are_between_none_and_all():
    assert -0.01 <= workers.idle_cores(workers.usable_cores()) <= (os.cpu_count() or 1) + 0.01
