"""Where training runs: the distribution strategy, the cluster from ``TF_CONFIG``, the chief.

``--strategy`` (config ``train.strategy``):

- ``auto`` (default): ``mirrored`` when TensorFlow sees more than one GPU, else ``default``.
- ``default``: one device (the first GPU, else the CPU).
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over every local GPU (or, with the test hook
  below, every logical CPU); variables are copied on each device and gradients all-reduced.
- ``multi-worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` across processes or hosts, which
  reads the cluster and this process's place in it from the ``TF_CONFIG`` environment variable.

Batch and learning rate, in every strategy: ``train.batch_size`` is the *global* batch, split
across all replicas (each of R replicas takes ``batch_size / R`` per step), and the configured
learning rates apply to that global batch as they are; nothing is scaled with the number of
replicas. The same config then trains the same schedule on one device or on eight (the loss is
averaged over the global batch either way), so results stay comparable within float round-off.

Only the chief writes: in a multi-worker run the chief is the task of type ``chief``, or worker 0
when the cluster has no ``chief``. Other workers train in step with it and leave nothing behind.

Test hook: ``FEATX_EDGE_LOGICAL_CPUS=N`` splits the CPU into N logical devices (read once, by
``configure_logical_cpus``, before TensorFlow initialises its devices), so ``mirrored`` can be
tested with N replicas on a machine without GPUs. It is for tests, not for speed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from featx_edge.config import STRATEGIES
from featx_edge.errors import ConfigError

log = logging.getLogger(__name__)

LOGICAL_CPUS_ENV = "FEATX_EDGE_LOGICAL_CPUS"
LEARNING_RATE_RULE = "configured for the global batch (batch_size, split across replicas); not scaled"
_TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}\'')
_TASK_TYPES = ("chief", "worker")


@dataclass(frozen=True)
class Task:
    """This process's place in a multi-worker cluster, from ``TF_CONFIG``."""

    type: str
    index: int
    cluster: dict[str, list[str]] = field(default_factory=dict)

    @property
    def is_chief(self) -> bool:
        """The chief task, or worker 0 when the cluster names no chief (TensorFlow's rule)."""
        return self.type == "chief" or (self.type == "worker" and self.index == 0 and "chief" not in self.cluster)

    @property
    def workers(self) -> int:
        return sum(len(self.cluster.get(kind, [])) for kind in _TASK_TYPES)


@dataclass
class Placement:
    """The strategy a run trains under, and what the manifest records about it."""

    strategy: Any
    name: str
    replicas: int
    task: Task | None = None

    @property
    def local_devices(self) -> tuple[str, ...]:
        """This worker's replica devices (one per GPU, or per logical CPU in tests); () for one device."""
        if self.replicas <= 1:
            return ()
        devices = tuple(getattr(getattr(self.strategy, "extended", None), "worker_devices", ()))
        return devices if len(devices) > 1 else ()

    @property
    def is_chief(self) -> bool:
        return self.task is None or self.task.is_chief

    def record(self) -> dict:
        """The manifest's account of the strategy (``devices.strategy``)."""
        out: dict = {"name": self.name, "replicas": self.replicas, "learning_rate_rule": LEARNING_RATE_RULE,
                     "embedding_devices": list(self.local_devices) or None}
        if self.task is not None:
            out |= {"workers": self.task.workers, "task": {"type": self.task.type, "index": self.task.index}}
        return out


def cluster_task(environ: dict[str, str] | None = None) -> Task:
    """Parse and check ``TF_CONFIG``; ConfigError naming what to set when it is missing or invalid."""
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "")
    fix = f"Set it on every worker, e.g. {_TF_CONFIG_EXAMPLE} (the same cluster, each with its own index)."
    if not raw.strip():
        raise ConfigError(f"`--strategy multi-worker` needs the `TF_CONFIG` environment variable, which is not set. {fix}")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"`TF_CONFIG` is not valid JSON ({err}). {fix}") from err
    cluster = doc.get("cluster") if isinstance(doc, dict) else None
    task = doc.get("task") if isinstance(doc, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError(f"`TF_CONFIG` must hold a `cluster` object and a `task` object. {fix}")
    unknown = sorted(set(cluster) - set(_TASK_TYPES))
    if unknown:
        raise ConfigError(f"`TF_CONFIG` cluster has task type(s) {', '.join(unknown)}; multi-worker training "
                          f"takes only `chief` and `worker`. {fix}")
    for kind, hosts in cluster.items():
        if (not isinstance(hosts, list) or not hosts
                or not all(isinstance(h, str) and h.rpartition(":")[2].isdigit() for h in hosts)):
            raise ConfigError(f"`TF_CONFIG` cluster `{kind}` must be a non-empty list of `host:port` strings; "
                              f"received `{hosts!r}`. {fix}")
    if len(cluster.get("chief", [])) > 1:
        raise ConfigError(f"`TF_CONFIG` cluster names {len(cluster['chief'])} chiefs; at most one. {fix}")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster or not isinstance(index, int) or isinstance(index, bool) \
            or not 0 <= index < len(cluster[kind]):
        raise ConfigError(f"`TF_CONFIG` task `{json.dumps(task)}` is not in its cluster: `type` must be one of "
                          f"{', '.join(sorted(cluster))} and `index` an integer below that list's length. {fix}")
    return Task(type=kind, index=index, cluster={k: list(v) for k, v in cluster.items()})


def is_chief(strategy: str) -> bool:
    """Whether this process writes the run (always, except a non-chief worker of ``multi-worker``)."""
    return strategy != "multi-worker" or cluster_task().is_chief


def configure_logical_cpus(tf) -> int:
    """Apply the ``FEATX_EDGE_LOGICAL_CPUS`` test hook (before TensorFlow initialises devices); returns N."""
    raw = os.environ.get(LOGICAL_CPUS_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise ConfigError(f"`{LOGICAL_CPUS_ENV}` (a test hook) must be an integer from 1 to 64; received `{raw}`. "
                          "Unset it outside tests.")
    count = int(raw)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # devices already initialised in this process: keep what they are
        count = len(tf.config.list_logical_devices("CPU"))
        log.debug("%s ignored: TensorFlow's devices are initialised (%d logical CPUs)", LOGICAL_CPUS_ENV, count)
    return count


def make_placement(name: str, *, gpus: list) -> Placement:
    """Create the strategy ``name`` stands for on this machine (after ``configure_logical_cpus``).

    ``gpus``: the GPUs TensorFlow sees (``auto`` mirrors across them when there are several).
    """
    from featx_edge._tf import import_tf
    from featx_edge.progress import native_output

    tf, _ = import_tf()

    if name not in STRATEGIES:
        raise ConfigError(f"`--strategy` must be one of {', '.join(STRATEGIES)}; received `{name}`.")
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            log.warning("TF_CONFIG is set but `--strategy` is auto, which never trains across workers; pass "
                        "`--strategy multi-worker` to use the cluster")
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return Placement(strategy=tf.distribute.get_strategy(), name="default", replicas=1)
    if name == "mirrored":
        with native_output("creating MirroredStrategy"):  # initialises the devices: CUDA probes log
            # Every GPU; without GPUs, every logical CPU (one, outside tests).
            devices = None if gpus else [device.name for device in tf.config.list_logical_devices("CPU")]
            strategy = tf.distribute.MirroredStrategy(devices=devices)
        if strategy.num_replicas_in_sync == 1:
            log.info("`--strategy mirrored` on one device: it trains like `default`")
        return Placement(strategy=strategy, name="mirrored", replicas=int(strategy.num_replicas_in_sync))
    task = cluster_task()
    with native_output("starting MultiWorkerMirroredStrategy"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    log.info("multi-worker training: task %s %d of %d workers (%d replicas)%s", task.type, task.index,
             task.workers, strategy.num_replicas_in_sync, "; this one is the chief" if task.is_chief else "")
    return Placement(strategy=strategy, name="multi-worker", replicas=int(strategy.num_replicas_in_sync), task=task)


def auto_shard_by_data(tf, dataset):
    """Shard ``dataset`` across workers by element (it is built in memory: there are no files to split)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
