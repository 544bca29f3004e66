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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx_edge import __version__
from featx_edge.backbones import get_backbone
from featx_edge.config import RunConfig, TrainConfig
from featx_edge.data import iter_batches, map_batches, scan_folder, split_folder
from featx_edge.errors import ConfigError
from featx_edge.progress import bar, native_output
from featx_edge.progress import verbose as progress_verbose
from featx_edge.rundir import (
    MANIFEST,
    MANIFEST_VERSION,
    SPLITS,
    WEIGHTS,
    atomic_path,
    locked,
    prepare_out,
    replace_run,
    sha256_file,
    write_json,
)
from featx_edge.runtime.image import RESIZE_METHOD
from featx_edge.sample import resolve_data
from featx_edge.weights import resolve_weights

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


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def setup_devices(*, mixed_precision: bool) -> dict:
    """Report the devices TensorFlow sees; enable mixed precision (GPU only) when asked."""
    from featx_edge._tf import import_tf

    tf, keras = import_tf()
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
    return {"gpus": [gpu.name for gpu in gpus], "mixed_precision": bool(mixed_precision)}


def embed(feature_model, root: Path, relpaths: Sequence[str], *, size: int, batch_size: int) -> np.ndarray:
    """Pooled backbone features of the given images, computed once: float32 (N, D)."""
    batches = bar(iter_batches(root, relpaths, size=size, batch_size=batch_size),
                  total=-(-len(relpaths) // batch_size), desc="embedding", unit="batch")
    out = [feature_model(batch.astype(np.float32), training=False).numpy() for batch in batches]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, feature_model.output_shape[-1]), np.float32)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded order of ``n`` training items in ``epoch``; every training path uses it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def make_sequence(load: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, *, batch_size: int, seed: int):
    """A Keras Sequence over ``len(labels)`` items, loaded on demand, in ``epoch_order``.

    ``load(indices)`` returns the inputs of those items (e.g. images decoded from disk).
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()

    class _Batches(keras.utils.Sequence):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.order = epoch_order(seed, 0, len(labels))

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
                  augment: Callable | None = None):
    """An in-memory tf.data pipeline over ``epochs`` epochs in ``epoch_order``; (dataset, steps/epoch).

    Batches never straddle two epochs, so the cached-feature and the through-the-graph paths
    see the same batches in the same order for the same seed.
    """
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    x = tf.constant(inputs)
    y = tf.constant(labels)
    dataset = None
    for epoch in range(epochs):
        part = tf.data.Dataset.from_tensor_slices(epoch_order(seed, epoch, len(labels))).batch(batch_size)
        dataset = part if dataset is None else dataset.concatenate(part)
    dataset = dataset.map(lambda idx: (tf.cast(tf.gather(x, idx), tf.float32), tf.gather(y, idx)))
    if augment is not None:
        dataset = dataset.map(lambda images, targets: (augment(images, training=True), targets))
    return dataset.prefetch(tf.data.AUTOTUNE), -(-len(labels) // batch_size)


def fit(model, train_data, *, epochs: int, learning_rate: float, val_data=None,
        steps_per_epoch: int | None = None) -> StageResult:
    """Compile with Adam + sparse categorical cross-entropy and fit; returns timings and history."""
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        # Several small head steps per call: Python overhead, not math, dominates them.
        steps_per_execution=steps_per_epoch or 1,
    )
    start = time.perf_counter()
    with native_output("Keras training"):  # epoch lines only with --verbose; a summary line is logged
        hist = model.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch, validation_data=val_data,
                         shuffle=False, verbose=_verbose() if progress_verbose() else 0)
    return StageResult(epochs=epochs, seconds=time.perf_counter() - start,
                       history={k: [float(v) for v in vals] for k, vals in hist.history.items()})


def train_head_on_features(head_model, features: np.ndarray, labels: np.ndarray, *, config: TrainConfig,
                           seed: int, val: tuple[np.ndarray, np.ndarray] | None = None) -> StageResult:
    """Stage 1 on cached features."""
    data, steps = array_dataset(features, labels, batch_size=config.batch_size, seed=seed, epochs=config.epochs)
    return fit(head_model, data, epochs=config.epochs, learning_rate=config.learning_rate,
               val_data=val, steps_per_epoch=steps)


def train_head_through_graph(model, images: np.ndarray, labels: np.ndarray, *, config: TrainConfig,
                             seed: int) -> StageResult:
    """Stage 1 the slow way, through the frozen backbone; the reference for the cached path."""
    data, steps = array_dataset(images, labels, batch_size=config.batch_size, seed=seed, epochs=config.epochs)
    return fit(model, data, epochs=config.epochs, learning_rate=config.learning_rate, steps_per_epoch=steps)


def image_sequence(root: Path, relpaths: Sequence[str], labels: np.ndarray, *, size: int,
                   batch_size: int, seed: int):
    """Batches of images decoded from disk on demand (for fine-tuning)."""
    from featx_edge.data import _pixels

    def load(idx: np.ndarray) -> np.ndarray:
        return np.stack([_pixels(root, relpaths[i], size) for i in idx]).astype(np.float32)

    return make_sequence(load, labels, batch_size=batch_size, seed=seed)


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


def train_run(config: RunConfig, out: str | Path, *, overwrite: bool = False) -> dict:
    """Scan, split, train (stage 1 on cached features, optional stage 2) and save a run.

    Returns the manifest. The Keras reference lives in ``RUN/model.weights.h5`` (weights only,
    rebuilt from the recorded config: nothing executable is deserialised).

    The run is built in a staging folder beside ``out`` and moved into place only when complete:
    an interrupted training leaves ``out`` as it was. An existing non-empty ``out`` is refused
    unless ``overwrite`` and it is a featx-edge run; then it is replaced as a whole (its exports,
    verify and bench results go with it, never mixed with the new weights and split).

    Example:
        >>> from featx_edge.config import RunConfig, DataConfig, ModelConfig
        >>> cfg = RunConfig(data=DataConfig(path="sample"),
        ...                 model=ModelConfig(backbone="efficientnet_lite0", image_size=96))
        >>> manifest = train_run(cfg, "runs/demo")  # doctest: +SKIP
    """
    out = Path(out)
    data_root = resolve_data(config.data.path, part="all")
    with locked(out, command="train", create=True):
        staging = prepare_out(out, overwrite=overwrite, data_root=data_root)
        try:
            manifest = _train_run(config, staging, data_root=data_root)
            replace_run(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return manifest


def _summary(stage: StageResult) -> str:
    """One line for a training stage: its last epoch's figures and its time."""
    last = {key: values[-1] for key, values in stage.history.items() if values}
    shown = ", ".join(f"{key.replace('val_', 'validation ')} {value:.4f}" for key, value in last.items())
    return f"{stage.epochs} epochs in {stage.seconds:.1f} s; last epoch: {shown}"


def _train_run(config: RunConfig, out: Path, *, data_root: Path) -> dict:
    from featx_edge.model import build_classifier, unfreeze_top

    spec = get_backbone(config.model.backbone)
    size = config.model.input_size
    if config.model.weights == "none":
        log.warning("`--weights none`: the frozen backbone keeps random weights, so its features carry almost no "
                    "information and the accuracy of this run means nothing; use it for latency tests only")
    # Cheap checks first: weights (may download) before decoding every image.
    weights_file = resolve_weights(spec, weights=config.model.weights, alpha=config.model.alpha, size=size)
    folder = scan_folder(data_root)
    for skipped in folder.skipped:
        log.info("skipped %s: %s", skipped.path, skipped.reason)
    splits = split_folder(folder, val_fraction=config.data.val_fraction,
                          test_fraction=config.data.test_fraction, seed=config.seed)
    write_json(out / SPLITS, splits.to_json())
    log.info("%d images in %d classes (%d train / %d val / %d test), %d skipped", folder.num_images,
             len(folder.classes), len(splits.train), len(splits.val), len(splits.test), len(folder.skipped))

    devices = setup_devices(mixed_precision=config.train.mixed_precision)
    clf = build_classifier(num_classes=len(splits.classes), config=config.model,
                           weights_file=weights_file, seed=config.seed)
    y_train, y_val, y_test = splits.labels("train"), splits.labels("val"), splits.labels("test")
    bs = config.train.batch_size

    t0 = time.perf_counter()
    f_train = embed(clf.feature_model, splits.root, splits.train, size=size, batch_size=bs)
    f_val = embed(clf.feature_model, splits.root, splits.val, size=size, batch_size=bs)
    metrics: dict = {"embedding_seconds": round(time.perf_counter() - t0, 3)}
    log.info("stage 1: head on cached features (%d-d), %d epochs", f_train.shape[1], config.train.epochs)
    stage1 = train_head_on_features(clf.head_model, f_train, y_train, config=config.train, seed=config.seed,
                                    val=(f_val, y_val))
    metrics["stage1"] = dataclasses.asdict(stage1)
    log.info("  %s", _summary(stage1))
    # What the frozen backbone + head reaches; stage 2 is judged against it.
    metrics["stage1_val_accuracy"] = float(np.mean(clf.head_model(f_val, training=False).numpy().argmax(1) == y_val))
    if config.train.fine_tune_epochs:
        n = unfreeze_top(clf, config.train.unfreeze_top)
        log.info("stage 2: fine-tuning the top %d backbone layers (%d with weights), lr %s",
                 config.train.unfreeze_top, n, config.train.fine_tune_learning_rate)
        seq = image_sequence(splits.root, splits.train, y_train, size=size, batch_size=bs, seed=config.seed + 1)
        val = image_sequence(splits.root, splits.val, y_val, size=size, batch_size=bs, seed=config.seed)
        stage2 = fit(clf.model, seq, epochs=config.train.fine_tune_epochs,
                     learning_rate=config.train.fine_tune_learning_rate, val_data=val)
        metrics["stage2"] = dataclasses.asdict(stage2) | {"unfrozen_layers_with_weights": n}
        log.info("  %s", _summary(stage2))
    for split, relpaths, labels in (("val", splits.val, y_val), ("test", splits.test, y_test)):
        probs = predict_probs(clf.model, splits.root, relpaths, size=size)
        metrics[f"{split}_accuracy"] = float(np.mean(probs.argmax(1) == labels))
    if config.train.fine_tune_epochs:
        gain = 100.0 * (metrics["val_accuracy"] - metrics["stage1_val_accuracy"])
        metrics["stage2_val_gain_points"] = gain
        log.info("stage 2 changed validation accuracy by %+.2f points (%.4f -> %.4f, %d images)", gain,
                 metrics["stage1_val_accuracy"], metrics["val_accuracy"], len(y_val))
    log.info("Keras reference: val accuracy %.4f, test accuracy %.4f", metrics["val_accuracy"],
             metrics["test_accuracy"])

    with atomic_path(out / WEIGHTS) as tmp:
        clf.model.save_weights(str(tmp))
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "featx_edge_version": __version__,
        "labels": list(splits.classes),
        "backbone": {"name": spec.name, "alpha": config.model.alpha, "weights": config.model.weights,
                     "weights_sha256": sha256_file(weights_file) if weights_file else None},
        "input": input_contract(size),
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
    write_json(out / MANIFEST, manifest)
    return manifest
