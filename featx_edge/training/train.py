"""Training: cached-feature head training (stage 1), fine-tuning (stage 2), pretraining.

Stage 1 runs the frozen backbone once over the training images and trains the head on the
cached pooled features. That gives the same head as training through the frozen graph (the
backbone's output does not change while it is frozen; BatchNorm runs in inference mode) at a
fraction of the cost per epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx_edge import __version__
from featx_edge.backbones.registry import get_backbone
from featx_edge.backbones.weights import resolve_weights
from featx_edge.config import RunConfig, TrainConfig
from featx_edge.data.augment import AugmentSpec
from featx_edge.data.folders import map_batches, scan_folder, split_folder
from featx_edge.data.sample import resolve_data
from featx_edge.errors import CheckpointError, ConfigError, DataError
from featx_edge.files.atomic import atomic_path, sha256_file, write_json
from featx_edge.files.lock import locked
from featx_edge.files.ownership import ID_KEY, read_marker
from featx_edge.files.replace import check_out, replace_run
from featx_edge.progress import native_output
from featx_edge.progress import verbose as progress_verbose
from featx_edge.rundir.manifest import MANIFEST_VERSION
from featx_edge.rundir.names import MANIFEST, SPLITS, WEIGHTS
from featx_edge.rundir.out import prepare_out
from featx_edge.runtime.image import RESIZE_METHOD
from featx_edge.training.checkpoints import Checkpoints, StageCheckpoint, note_resumable, remove_checkpoints, run_key
from featx_edge.training.distribute import auto_shard_by_data, configure_logical_cpus, is_chief, make_placement
from featx_edge.training.features import feature_key, open_cache, predict_table, split_features

log = logging.getLogger(__name__)


def input_contract(size: int, *, dtype: str = "float32") -> dict:
    """What every exported model takes: RGB pixels 0..255, NHWC, resized the runtime's way."""
    return {"name": "image", "height": size, "width": size, "channels": 3, "layout": "NHWC",
            "color": "RGB", "dtype": dtype, "value_range": [0, 255], "resize": RESIZE_METHOD}


@dataclass
class StageResult:
    epochs: int
    seconds: float
    history: dict = field(default_factory=dict)
    resumed_from_epoch: int = 0  # epochs restored from a checkpoint (`--resume`); the rest trained now


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def setup_devices(*, mixed_precision: bool, jit_compile: bool = False) -> dict:
    """Report the devices TensorFlow sees; enable mixed precision (GPU only) when asked.

    Call before TensorFlow runs anything: it applies the ``FEATX_EDGE_LOGICAL_CPUS`` test hook
    (``featx_edge.training.distribute``). ``jit_compile`` is only recorded here (``fit`` takes it).
    """
    from featx_edge._tf import import_tf

    tf, keras = import_tf()
    logical_cpus = configure_logical_cpus(tf)
    # Same seed, same result: deterministic kernels (a small cost on GPU, none to speak of on CPU).
    tf.config.experimental.enable_op_determinism()
    with native_output("looking for GPUs"):  # CUDA probes log errors on CPU-only hosts
        gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass
    if mixed_precision:
        if not gpus:
            raise ConfigError(
                "`--mixed-precision` needs a GPU, and TensorFlow sees none on this machine. "
                "Drop the flag to train in float32 on the CPU."
            )
        keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        keras.mixed_precision.set_global_policy("float32")
    devices = {"gpus": [gpu.name for gpu in gpus], "mixed_precision": bool(mixed_precision),
               "jit_compile": bool(jit_compile)}
    return devices | ({"logical_cpus": logical_cpus} if logical_cpus > 1 else {})


def embed(feature_model, root: Path, relpaths: Sequence[str], *, size: int, batch_size: int) -> np.ndarray:
    """Pooled backbone features of the given images, in memory: float32 (N, D).

    Decoded in parallel by ``features.embed_batches`` (tf.data); training itself goes through the
    on-disk cache (``features.split_features``), which keeps memory bounded.
    """
    from featx_edge.training.features import embed_batches

    out = list(embed_batches(feature_model, root, relpaths, size=size, batch_size=batch_size, desc="embedding"))
    return np.concatenate(out) if out else np.zeros((0, feature_model.output_shape[-1]), np.float32)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded order of ``n`` training items in ``epoch``; every training path uses it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def make_sequence(load: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, *, batch_size: int, seed: int,
                  start_epoch: int = 0):
    """A Keras Sequence over ``len(labels)`` items, loaded on demand, in ``epoch_order`` from ``start_epoch``.

    ``load(indices)`` returns the inputs of those items (e.g. images decoded from disk).
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()

    class _Batches(keras.utils.Sequence):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = start_epoch
            self.order = epoch_order(seed, start_epoch, len(labels))

        def __len__(self) -> int:
            return int(np.ceil(len(labels) / batch_size))

        def __getitem__(self, i: int):
            idx = self.order[i * batch_size : (i + 1) * batch_size]
            return load(idx), labels[idx]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = epoch_order(seed, self.epoch, len(labels))

    return _Batches()


def array_dataset(inputs: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int, epochs: int,
                  augment: Callable | None = None, start_epoch: int = 0):
    """An in-memory tf.data pipeline over epochs ``start_epoch`` to ``epochs - 1`` in ``epoch_order``;
    (dataset, steps/epoch).

    Batches never straddle two epochs, so the cached-feature and the through-the-graph paths
    see the same batches in the same order for the same seed, and a run resumed at epoch k
    (``start_epoch``) sees the batches an uninterrupted one would. ``batch_size`` is the global
    batch: a distribution strategy splits each batch across its replicas.
    """
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    x = tf.constant(inputs)
    y = tf.constant(labels)
    dataset = None
    for epoch in range(start_epoch, max(epochs, start_epoch + 1)):  # a finished stage: one unused epoch
        part = tf.data.Dataset.from_tensor_slices(epoch_order(seed, epoch, len(labels))).batch(batch_size)
        dataset = part if dataset is None else dataset.concatenate(part)
    dataset = dataset.map(lambda idx: (tf.cast(tf.gather(x, idx), tf.float32), tf.gather(y, idx)))
    if augment is not None:
        dataset = dataset.map(lambda images, targets: (augment(images, training=True), targets))
    return auto_shard_by_data(tf, dataset.prefetch(tf.data.AUTOTUNE)), -(-len(labels) // batch_size)


def fit(model, train_data, *, epochs: int, learning_rate: float, val_data=None,
        steps_per_epoch: int | None = None, jit_compile: bool = False,
        checkpoint: StageCheckpoint | None = None) -> StageResult:
    """Compile with Adam + sparse categorical cross-entropy and fit; returns timings and history.

    Runs under the strategy ``model`` was built in (``model.distribute_strategy``), at
    ``learning_rate`` as given (for the global batch; not scaled with replicas). ``jit_compile``:
    XLA. ``checkpoint``: save after every epoch and, when it holds a resumed state, restore it and
    train from its epoch on (``train_data`` must then start at that epoch).
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    first = checkpoint.start_epoch if checkpoint is not None else 0
    with model.distribute_strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            # Several small head steps per call: Python overhead, not math, dominates them.
            steps_per_execution=steps_per_epoch or 1,
            jit_compile=jit_compile,
        )
        if checkpoint is not None:
            checkpoint.attach(model)
    start = time.perf_counter()
    history: dict = {}
    if first < epochs:
        with native_output("Keras training"):  # epoch lines only with --verbose; a summary line is logged
            hist = model.fit(train_data, epochs=epochs, initial_epoch=first, steps_per_epoch=steps_per_epoch,
                             validation_data=val_data, shuffle=False,
                             callbacks=[checkpoint.callback()] if checkpoint is not None else None,
                             verbose=_verbose() if progress_verbose() else 0)
        history = hist.history
    if checkpoint is not None:  # the restored epochs' figures, then this run's
        history = checkpoint.history
    return StageResult(epochs=epochs, seconds=time.perf_counter() - start, resumed_from_epoch=first,
                       history={k: [float(v) for v in vals] for k, vals in history.items()})


def train_head_on_features(head_model, features: np.ndarray, labels: np.ndarray, *, config: TrainConfig,
                           seed: int, val: tuple[np.ndarray, np.ndarray] | None = None,
                           checkpoint: StageCheckpoint | None = None) -> StageResult:
    """Stage 1 on cached features (from the checkpoint's epoch on, when resuming).

    ``features`` (and ``val[0]``) is an in-memory array or a ``features.FeatureTable`` on the disk
    cache, read a batch at a time (same batches, same order).
    """
    start = checkpoint.start_epoch if checkpoint is not None else 0
    if isinstance(features, np.ndarray):
        data, steps = array_dataset(features, labels, batch_size=config.batch_size, seed=seed, epochs=config.epochs,
                                    start_epoch=start)
    else:
        data, steps, val = _table_data(features, labels, batch_size=config.batch_size, seed=seed,
                                       epochs=range(start, max(config.epochs, start + 1)), val=val)
    return fit(head_model, data, epochs=config.epochs, learning_rate=config.learning_rate,
               val_data=val, steps_per_epoch=steps, jit_compile=config.jit_compile, checkpoint=checkpoint)


def _table_data(features, labels: np.ndarray, *, batch_size: int, seed: int, epochs: range, val):
    """``train_head_on_features``'s datasets from FeatureTables: (train dataset, steps, validation dataset)."""
    from featx_edge._tf import import_tf
    from featx_edge.training.features import table_dataset

    tf, _ = import_tf()
    data, steps = table_dataset(features, labels, batch_size=batch_size, epochs=epochs,
                                order=lambda epoch: epoch_order(seed, epoch, len(labels)))
    if val is not None and not isinstance(val[0], np.ndarray):
        val = auto_shard_by_data(tf, table_dataset(val[0], val[1], batch_size=batch_size)[0])
    return auto_shard_by_data(tf, data), steps, val


def train_head_through_graph(model, images: np.ndarray, labels: np.ndarray, *, config: TrainConfig,
                             seed: int) -> StageResult:
    """Stage 1 the slow way, through the frozen backbone; the reference for the cached path."""
    data, steps = array_dataset(images, labels, batch_size=config.batch_size, seed=seed, epochs=config.epochs)
    return fit(model, data, epochs=config.epochs, learning_rate=config.learning_rate, steps_per_epoch=steps)


def image_sequence(root: Path, relpaths: Sequence[str], labels: np.ndarray, *, size: int,
                   batch_size: int, seed: int, start_epoch: int = 0):
    """Batches of images decoded from disk on demand (for fine-tuning), from ``start_epoch``'s order."""
    from featx_edge.data.folders import _pixels

    def load(idx: np.ndarray) -> np.ndarray:
        return np.stack([_pixels(root, relpaths[i], size) for i in idx]).astype(np.float32)

    return make_sequence(load, labels, batch_size=batch_size, seed=seed, start_epoch=start_epoch)


def predict_probs(model, root: Path, relpaths: Sequence[str], *, size: int, batch_size: int = 64,
                  desc: str | None = None) -> np.ndarray:
    """Keras model probabilities for the given images (float32, (N, C)), decoded batch by batch."""
    probs = map_batches(lambda batch: model(batch.astype(np.float32), training=False).numpy(), root, relpaths,
                        size=size, batch_size=batch_size, desc=desc)
    return probs.astype(np.float32).reshape(len(relpaths), -1) if len(relpaths) else probs


def predict_pixels_keras(model, pixels: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """The Keras model's probabilities for uint8 pixels, in batches (bounded memory per call)."""
    out = [model(pixels[i:i + batch_size].astype(np.float32), training=False).numpy()
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def train_run(config: RunConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False) -> dict:
    """Scan, split, train (stage 1 on cached features, optional stage 2) and save a run.

    Returns the manifest. The Keras reference lives in ``RUN/model.weights.h5`` (weights only,
    rebuilt from the recorded config: nothing executable is deserialised).

    The run is built in a staging folder beside ``out`` and moved into place only when complete:
    an interrupted training leaves ``out`` as it was. An existing non-empty ``out`` is refused
    unless ``overwrite`` and it is a featx-edge run; then it is replaced as a whole (its exports,
    verify and bench results go with it, never mixed with the new weights and split).

    Every epoch is checkpointed beside ``out`` (``featx_edge.training.checkpoints``); ``resume`` continues
    an interrupted training of the same settings from its last checkpoint. A completed run removes
    its checkpoints. Under ``train.strategy = "multi-worker"`` only the chief writes ``out``; the
    other workers train in step with it in a private temporary folder and return its manifest.

    Example:
        >>> from featx_edge.config import RunConfig, DataConfig, ModelConfig
        >>> cfg = RunConfig(data=DataConfig(path="sample"),
        ...                 model=ModelConfig(backbone="efficientnet_lite0", image_size=96))
        >>> manifest = train_run(cfg, "runs/demo")  # doctest: +SKIP
    """
    data_root, _ = check_destination(config, out)
    from featx_edge.training.model import check_cut

    check_cut(config.model)  # a typo in `--cut-at` must not cost an embedding pass
    out = Path(out)
    if not is_chief(config.train.strategy):  # no lock: the chief, maybe on this host, holds `out`'s
        scratch = Path(tempfile.mkdtemp(prefix="featx-edge-worker-"))
        try:
            return _train_run(config, scratch, data_root=data_root, run_dir=out, resume=resume)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    with locked(out, command="train", create=True):
        staging = prepare_out(out, overwrite=overwrite, data_root=data_root)
        try:
            manifest = _train_run(config, staging, data_root=data_root, run_dir=out, resume=resume)
            replace_run(staging, out, kind="run", record=MANIFEST)
        except BaseException as err:  # KeyboardInterrupt too: the checkpoints outlive the staging folder
            if not isinstance(err, CheckpointError):  # a damaged checkpoint cannot be continued from
                note_resumable(out)
            raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        remove_checkpoints(out)
        return manifest


def check_destination(config: RunConfig, out: str | Path) -> tuple[Path, Path]:
    """The data folder and ``out`` of a training, both resolved and checked before any folder or lock is
    made (``rundir.check_out``): a missing ``--data`` must not be created as ``--out``'s parent."""
    data_root = resolve_data(config.data.path, part="all")
    if not data_root.is_dir():
        raise DataError(f"data folder `{data_root}` does not exist or is not a folder. Pass a folder with one "
                        "sub-folder per class (e.g. data/cat/1.jpg, data/dog/2.jpg), or `--data sample`.")
    return data_root, check_out(out, data_root=data_root)


def _summary(stage: StageResult) -> str:
    """One line for a training stage: its last epoch's figures and its time."""
    last = {key: values[-1] for key, values in stage.history.items() if values}
    shown = ", ".join(f"{key.replace('val_', 'validation ')} {value:.4f}" for key, value in last.items())
    return f"{stage.epochs} epochs in {stage.seconds:.1f} s; last epoch: {shown}"


def _train_run(config: RunConfig, out: Path, *, data_root: Path, run_dir: Path, resume: bool) -> dict:
    from featx_edge.training.model import build_classifier

    spec = get_backbone(config.model.backbone)
    if config.model.weights == "none":
        log.warning("`--weights none`: the frozen backbone keeps random weights, so its features carry almost no "
                    "information and the accuracy of this run means nothing; use it for latency tests only")
    # Cheap checks first: weights (may download) before decoding every image.
    weights_file = resolve_weights(spec, weights=config.model.weights, alpha=config.model.alpha,
                                   size=config.model.input_size)
    folder, splits = _scan_and_split(config, data_root=data_root, out=out)
    devices = setup_devices(mixed_precision=config.train.mixed_precision, jit_compile=config.train.jit_compile)
    placement = make_placement(config.train.strategy, gpus=devices["gpus"])
    devices["strategy"] = placement.record()
    weights_sha256 = sha256_file(weights_file) if weights_file else None
    checkpoints = Checkpoints.open(run_dir, key=run_key(config.to_dict(), splits=splits.to_json(),
                                                        weights_sha256=weights_sha256),
                                   config_dict=config.to_dict(), resume=resume, write=placement.is_chief)
    with placement.strategy.scope():  # variables mirrored on every replica
        clf = build_classifier(num_classes=len(splits.classes), config=config.model,
                               weights_file=weights_file, seed=config.seed)
    t0 = time.perf_counter()
    # Features of every image on disk (memory-mapped; reused across runs), plus augmented views.
    cache = open_cache(config.train.feature_cache, feature_key(spec, alpha=config.model.alpha,
                       size=config.model.input_size, weights_sha256=weights_sha256, seed=config.seed,
                       cut_at=config.model.cut_at), scratch=out / ".feature-scratch")
    try:
        feats = split_features(clf.feature_model, splits, cache=cache, size=config.model.input_size,
                               batch_size=config.train.batch_size, devices=placement.local_devices,
                               augment=AugmentSpec(config.train.augment, seed=config.seed),
                               views=config.train.augment_views)
        metrics: dict = {"embedding_seconds": round(time.perf_counter() - t0, 3), "feature_cache": feats.record}
        metrics |= _train_stages(config, clf, splits, feats=feats, checkpoints=checkpoints)
    finally:
        cache.close()
    with atomic_path(out / WEIGHTS) as tmp:
        clf.model.save_weights(str(tmp))
    manifest = _manifest(config, out, splits=splits, folder=folder, metrics=metrics, devices=devices,
                         weights_sha256=weights_sha256, feature_dim=int(clf.feature_model.output_shape[-1]))
    write_json(out / MANIFEST, manifest)
    return manifest


def _scan_and_split(config: RunConfig, *, data_root: Path, out: Path):
    """The data folder scanned and split by ``config``; the split written to ``out``. (folder, splits)."""
    folder = scan_folder(data_root)
    for skipped in folder.skipped:
        log.info("skipped %s: %s", skipped.path, skipped.reason)
    splits = split_folder(folder, val_fraction=config.data.val_fraction,
                          test_fraction=config.data.test_fraction, seed=config.seed)
    write_json(out / SPLITS, splits.to_json())
    log.info("%d images in %d classes (%d train / %d val / %d test), %d skipped", folder.num_images,
             len(folder.classes), len(splits.train), len(splits.val), len(splits.test), len(folder.skipped))
    return folder, splits


def _train_stages(config: RunConfig, clf, splits, *, feats, checkpoints: Checkpoints) -> dict:
    """Stage 1 on the cached features, stage 2 if asked; the metrics, with validation and test accuracy."""
    y_val = splits.labels("val")
    log.info("stage 1: head on cached features (%d-d, %d rows), %d epochs", feats.train.dim, len(feats.train),
             config.train.epochs)
    stage1 = train_head_on_features(clf.head_model, feats.train, feats.train_labels, config=config.train,
                                    seed=config.seed, val=(feats.val, y_val),
                                    checkpoint=checkpoints.stage("stage1", epochs=config.train.epochs))
    log.info("  %s", _summary(stage1))
    metrics: dict = {"stage1": dataclasses.asdict(stage1)}
    # What the frozen backbone + head reaches; stage 2 is judged against it.
    metrics["stage1_val_accuracy"] = float(np.mean(predict_table(clf.head_model, feats.val).argmax(1) == y_val))
    if config.train.fine_tune_epochs:
        metrics["stage2"] = _fine_tune(config, clf, splits, checkpoints=checkpoints)
    size = config.model.input_size
    for split in ("val", "test"):
        # Without stage 2 the backbone is the one that made the cached features: no second pass.
        probs = (predict_probs(clf.model, splits.root, getattr(splits, split), size=size)
                 if config.train.fine_tune_epochs else predict_table(clf.head_model, getattr(feats, split)))
        metrics[f"{split}_accuracy"] = float(np.mean(probs.argmax(1) == splits.labels(split)))
    if config.train.fine_tune_epochs:
        gain = 100.0 * (metrics["val_accuracy"] - metrics["stage1_val_accuracy"])
        metrics["stage2_val_gain_points"] = gain
        log.info("stage 2 changed validation accuracy by %+.2f points (%.4f -> %.4f, %d images)", gain,
                 metrics["stage1_val_accuracy"], metrics["val_accuracy"], len(y_val))
    log.info("Keras reference: val accuracy %.4f, test accuracy %.4f", metrics["val_accuracy"],
             metrics["test_accuracy"])
    return metrics


def _fine_tune(config: RunConfig, clf, splits, *, checkpoints: Checkpoints) -> dict:
    """Stage 2: the top backbone layers (up to the cut, if any) trained end to end at a low learning rate."""
    from featx_edge.training.model import unfreeze_top

    n = unfreeze_top(clf, config.train.unfreeze_top)
    log.info("stage 2: fine-tuning the top %d backbone layers (%d with weights), lr %s",
             config.train.unfreeze_top, n, config.train.fine_tune_learning_rate)
    resumed = checkpoints.stage("stage2", epochs=config.train.fine_tune_epochs, offset=config.train.epochs)
    size, bs = config.model.input_size, config.train.batch_size
    seq = image_sequence(splits.root, splits.train, splits.labels("train"), size=size, batch_size=bs,
                         seed=config.seed + 1, start_epoch=resumed.start_epoch)
    val = image_sequence(splits.root, splits.val, splits.labels("val"), size=size, batch_size=bs, seed=config.seed)
    stage2 = fit(clf.model, seq, epochs=config.train.fine_tune_epochs,
                 learning_rate=config.train.fine_tune_learning_rate, val_data=val,
                 jit_compile=config.train.jit_compile, checkpoint=resumed)
    log.info("  %s", _summary(stage2))
    return dataclasses.asdict(stage2) | {"unfrozen_layers_with_weights": n}


def _manifest(config: RunConfig, out: Path, *, splits, folder, metrics: dict, devices: dict,
              weights_sha256: str | None, feature_dim: int) -> dict:
    """The run's manifest.json content (the weights file is already written)."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "featx_edge_version": __version__,
        "labels": list(splits.classes),
        # cut_at: the layer whose pooled output feeds the head (None: the whole backbone)
        "backbone": {"name": config.model.backbone, "alpha": config.model.alpha, "weights": config.model.weights,
                     "weights_sha256": weights_sha256, "cut_at": config.model.cut_at, "feature_dim": feature_dim},
        "input": input_contract(config.model.input_size),
        "data": {"root": str(splits.root), "splits": SPLITS,
                 "counts": {split: len(getattr(splits, split)) for split in ("train", "val", "test")},
                 "skipped": {"count": len(folder.skipped),
                             "files": [dataclasses.asdict(s) for s in folder.skipped]}},
        "reference": {"path": WEIGHTS, "sha256": sha256_file(out / WEIGHTS)},
        "training": metrics,
        "devices": devices,
        "config": config.to_dict(),
        "artifacts": {},
    }
    if (marker := read_marker(out)) is not None:  # the staging folder's: the run is featx-edge's to replace
        manifest[ID_KEY] = marker["id"]
    return manifest
