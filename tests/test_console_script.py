"""The installed `featx-edge` console script, run as a user runs it (the other CLI tests call `main`).

It catches what calling `featx_edge.cli.main([...])` cannot: a broken `[project.scripts]` entry, an
exit status lost between `main` and the shell, output that only appears through a real process.
The script is the one beside this Python (the virtual environment's `bin/`); it runs this
checkout's code (PYTHONPATH), as the rest of the suite does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from featx_edge import __version__
from featx_edge.backbones.registry import BACKBONES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / ("featx-edge.exe" if os.name == "nt" else "featx-edge")
MODEL = Path(__file__).parent / "data" / "runtime" / "model.tflite-int8.tflite"

pytestmark = pytest.mark.skipif(not SCRIPT.is_file(),
                                reason=f"featx-edge is not installed beside {sys.executable} (pip install -e .)")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_version():
    done = _run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"featx-edge {__version__}"


def test_backbones_lists_the_registry():
    done = _run("backbones")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines()[1:] if line.strip()]
    assert listed == list(BACKBONES)


def test_a_bad_argument_is_one_line_and_status_2():
    done = _run("predict", str(MODEL), str(MODEL.parent / "images"), "--top-k", "0")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: `--top-k` must be an integer >= 1; received `0`.\n"
