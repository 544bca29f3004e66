"""Distribution strategies: TF_CONFIG checks, mirrored replicas on logical CPUs, two workers on loopback.

Strategies are set up before TensorFlow initialises its devices, so the runs that use them are
subprocesses (`python -m featx_edge.cli train ...`); `FEATX_EDGE_LOGICAL_CPUS=2` (a test hook, see
featx_edge.training.distribute) splits the CPU into two devices for `--strategy mirrored`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, few_images, make_class_folder

from featx_edge.config import TrainConfig
from featx_edge.errors import ConfigError
from featx_edge.training.distribute import Placement, Task, cluster_task, is_chief

CLUSTER = {"worker": ["localhost:2222", "localhost:2223"]}


def _tf_config(task_type: str, index: int, cluster: dict | None = None) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster or CLUSTER, "task": {"type": task_type, "index": index}})}


def test_tf_config_names_the_chief():
    assert cluster_task(_tf_config("worker", 0)).is_chief
    assert not cluster_task(_tf_config("worker", 1)).is_chief
    with_chief = {"chief": ["host0:1"], "worker": ["host1:1", "host2:1"]}
    assert cluster_task(_tf_config("chief", 0, with_chief)).is_chief
    assert not cluster_task(_tf_config("worker", 0, with_chief)).is_chief  # a chief exists: worker 0 is not it
    assert cluster_task(_tf_config("worker", 1, with_chief)).workers == 3
    record = Placement(strategy=None, name="multi-worker", replicas=2, task=Task("worker", 1, CLUSTER)).record()
    assert record["workers"] == 2 and record["task"] == {"type": "worker", "index": 1}
    assert "global batch" in record["learning_rate_rule"]


@pytest.mark.parametrize("environ, message", [
    ({}, "needs the `TF_CONFIG` environment variable, which is not set"),
    ({"TF_CONFIG": "{cluster"}, "`TF_CONFIG` is not valid JSON"),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'}, "must hold a `cluster` object and a `task` object"),
    (_tf_config("worker", 2), "is not in its cluster"),
    (_tf_config("ps", 0, {"ps": ["a:1"], "worker": ["b:1"]}), "takes only `chief` and `worker`"),
    (_tf_config("worker", 0, {"worker": ["no-port"]}), "list of `host:port` strings"),
])
def test_tf_config_errors_say_what_to_set(environ, message):
    with pytest.raises(ConfigError, match="TF_CONFIG") as err:
        cluster_task(environ)
    assert message in str(err.value)
    assert '"task": {"type": "worker", "index": 0}' in str(err.value)  # an example to copy


def test_strategy_is_validated_and_only_multi_worker_reads_tf_config(monkeypatch):
    with pytest.raises(ConfigError, match="`strategy` .* must be one of auto, default, mirrored, multi-worker"):
        TrainConfig(strategy="horovod")
    with pytest.raises(ConfigError, match="`jit_compile` must be true or false"):
        TrainConfig(jit_compile="yes")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert is_chief("auto") and is_chief("mirrored")
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        is_chief("multi-worker")
    monkeypatch.setenv("TF_CONFIG", _tf_config("worker", 1)["TF_CONFIG"])
    assert not is_chief("multi-worker") and is_chief("default")


@pytest.mark.slow  # measured: 7.7 CPU s (tests/DURATIONS.md)
def test_jit_compile_trains_and_is_recorded(tmp_path):
    """--jit-compile reaches model.compile (XLA on this CPU) and the manifest records it with the strategy."""
    from featx_edge.cli import main
    from featx_edge.rundir.manifest import read_manifest

    data = make_class_folder(tmp_path / "data", {"a": 8, "b": 8}, size=40)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--backbone", "mobilenet_v2",
                 "--alpha", "0.35", "--image-size", "32", "--weights", "none", "--epochs", "2", "--jit-compile",
                 "--strategy", "default", "--quiet"]) == 0
    manifest = read_manifest(tmp_path / "run")
    assert manifest["devices"]["jit_compile"] is True and manifest["config"]["train"]["jit_compile"] is True
    assert manifest["devices"]["mixed_precision"] is False and manifest["devices"]["strategy"]["name"] == "default"
    assert len(manifest["training"]["stage1"]["history"]["loss"]) == 2


def test_mixed_precision_keeps_the_output_float32():
    """Under mixed_float16 (what --mixed-precision sets on a GPU) the backbone computes in float16 and
    the probabilities stay float32 (softmax and the loss in float32)."""
    from featx_edge._tf import import_tf
    from featx_edge.config import ModelConfig
    from featx_edge.training.model import build_classifier

    _, keras = import_tf()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        clf = build_classifier(num_classes=3, weights_file=None, config=ModelConfig(
            backbone="mobilenet_v2", alpha=0.35, image_size=32, weights="none", head_units=8))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert clf.model.get_layer("head_dense").compute_dtype == "float16"
    assert clf.model.output.dtype == "float32" and clf.head_model.output.dtype == "float32"


def _train(args: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featx_edge.cli", "train", "--quiet", *args],
                            env=os.environ | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out:\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return out


def _manifest(run: Path) -> dict:
    from featx_edge.training.run import Run

    return Run.open(run).manifest


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_default(tmp_path, sample_root, pretrained):
    """Two replicas split each global batch; they train the head one device trains.

    Noise: without dropout the two differ only in the order of float sums (the all-reduce), so
    the loss curves agree to 1e-3 and the test accuracy within 1 image of 134. (With dropout,
    each replica draws its own masks: at dropout 0.2 the two were 2 test images apart.) A wrong
    batch split or a learning rate scaled by the replicas moves the loss curve far more.
    """
    common = ["--data", str(sample_root / "target"), *TINY, "--weights", str(pretrained), "--epochs", "6",
              "--dropout", "0"]
    mirrored = _train([*common, "--out", str(tmp_path / "mirrored"), "--strategy", "mirrored"],
                      env={"FEATX_EDGE_LOGICAL_CPUS": "2"})
    default = _train([*common, "--out", str(tmp_path / "default"), "--strategy", "default"])
    _finish(mirrored), _finish(default)
    a, b = _manifest(tmp_path / "mirrored"), _manifest(tmp_path / "default")
    assert a["devices"]["strategy"]["replicas"] == 2 and a["devices"]["logical_cpus"] == 2
    assert len(a["devices"]["strategy"]["embedding_devices"]) == 2  # the frozen backbone ran on both replicas
    assert b["devices"]["strategy"] == {**a["devices"]["strategy"], "name": "default", "replicas": 1,
                                        "embedding_devices": None}
    assert a["config"]["train"]["strategy"] == "mirrored"
    n_test = a["data"]["counts"]["test"]
    print(f"test accuracy on {n_test} images: mirrored {a['training']['test_accuracy']:.4f}, "
          f"default {b['training']['test_accuracy']:.4f}")
    assert abs(a["training"]["test_accuracy"] - b["training"]["test_accuracy"]) * n_test <= 1 + 1e-9
    assert b["training"]["test_accuracy"] > 0.5, "the pretrained backbone separates the target digits (chance: 0.2)"
    np.testing.assert_allclose(a["training"]["stage1"]["history"]["loss"],
                               b["training"]["stage1"]["history"]["loss"], rtol=1e-3)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_on_loopback_write_one_run(tmp_path, sample_root, pretrained):
    """Two processes train as one MultiWorkerMirroredStrategy cluster; only the chief writes the run,
    and the head it trains is the one a single process trains (loss curves within 1e-3, no dropout)."""
    from featx_edge.cli import main

    data = few_images(sample_root / "target", tmp_path / "data")
    runs = tmp_path / "runs"
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    args = ["--data", str(data), *TINY, "--weights", str(pretrained), "--epochs", "4", "--dropout", "0",
            "--batch-size", "16"]
    procs = [_train([*args, "--out", str(runs / "cluster"), "--strategy", "multi-worker"],
                    env=_tf_config("worker", i, cluster)) for i in (0, 1)]
    for proc in procs:
        _finish(proc)
    manifest = _manifest(runs / "cluster")
    assert manifest["devices"]["strategy"] | {"learning_rate_rule": None} == {
        "name": "multi-worker", "replicas": 2, "workers": 2, "task": {"type": "worker", "index": 0},
        "learning_rate_rule": None, "embedding_devices": None}  # one device per worker: nothing to split
    # The chief's run, its lock file and nothing else: no staging, checkpoint or worker folder.
    assert sorted(p.name for p in runs.iterdir()) == [".cluster.featx-edge.lock", "cluster"]
    assert main(["train", *args, "--out", str(tmp_path / "single"), "--strategy", "default", "--quiet"]) == 0
    single = _manifest(tmp_path / "single")
    np.testing.assert_allclose(manifest["training"]["stage1"]["history"]["loss"],
                               single["training"]["stage1"]["history"]["loss"], rtol=1e-3)


_SPLIT_EMBEDDING = """
import json, sys
import numpy as np
from featx_edge._tf import import_tf
tf, keras = import_tf()
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
devices = [d.name for d in tf.config.list_logical_devices("CPU")]
from featx_edge.training.features import embed_batches
keras.utils.set_random_seed(0)
inputs = keras.Input((16, 16, 3))
x = keras.layers.Conv2D(8, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
from pathlib import Path
root, rels = Path(sys.argv[1]), json.loads(sys.argv[2])
one = np.concatenate(list(embed_batches(model, root, rels, size=16, batch_size=5)))
two = np.concatenate(list(embed_batches(model, root, rels, size=16, batch_size=5, devices=devices)))
print(json.dumps({"devices": devices, "rows": len(two), "max_diff": float(np.abs(one - two).max()),
                  "spread": float(np.abs(np.diff(one, axis=0)).max(axis=1).min())}))
"""


@pytest.mark.slow  # measured: 5.4 CPU s (tests/DURATIONS.md)
def test_the_embedding_pass_splits_each_batch_across_the_replicas_in_order(tmp_path):
    """Each batch is cut into one slice per device and put back in order: the same features as one device
    (a batch of 5 over 2 devices: uneven slices; 13 images: a short last batch)."""
    from PIL import Image

    root, rels = tmp_path / "data", []
    for i in range(13):  # a brightness ramp: every image's features differ
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        rels.append(f"{'ab'[i % 2]}/{i:02d}.png")
        pixels = np.random.default_rng(i).integers(0, 40, (16, 16, 3)) + 15 * i
        Image.fromarray(pixels.astype(np.uint8)).save(root / rels[-1])
    out = subprocess.run([sys.executable, "-c", _SPLIT_EMBEDDING, str(root), json.dumps(rels)], check=False,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["devices"]) == 2 and result["rows"] == len(rels) == 13
    assert result["spread"] > 1e-3, "neighbouring images' features differ, so a reordering would show"
    assert result["max_diff"] <= 1e-6, result
