"""Training: cached-feature head training (stage 1), fine-tuning (stage 2), pretraining.

Stage 1 runs the frozen backbone once over the training images and trains the head on the
cached pooled features. That gives the same head as training through the frozen graph (the
backbone's output does not change while it is frozen; BatchNorm runs in inference mode) at a
fraction of the cost per epoch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx_edge.config import TrainConfig
from featx_edge.data import iter_batches
from featx_edge.errors import ConfigError


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


def embed(feature_model, root: Path, relpaths: Sequence[str], *, size: int, batch_size: int,
          progress: bool = True) -> np.ndarray:
    """Pooled backbone features of the given images, computed once: float32 (N, D)."""
    batches = iter_batches(root, relpaths, size=size, batch_size=batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(relpaths) // batch_size), desc="embedding", unit="batch")
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


def fit(model, train_data, *, epochs: int, learning_rate: float, val_data=None, progress: bool = True,
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
    hist = model.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch, validation_data=val_data,
                     shuffle=False, verbose=_verbose() if progress else 0)
    return StageResult(epochs=epochs, seconds=time.perf_counter() - start,
                       history={k: [float(v) for v in vals] for k, vals in hist.history.items()})


def train_head_on_features(head_model, features: np.ndarray, labels: np.ndarray, *, config: TrainConfig,
                           seed: int, val: tuple[np.ndarray, np.ndarray] | None = None,
                           progress: bool = True) -> StageResult:
    """Stage 1 on cached features."""
    data, steps = array_dataset(features, labels, batch_size=config.batch_size, seed=seed, epochs=config.epochs)
    return fit(head_model, data, epochs=config.epochs, learning_rate=config.learning_rate,
               val_data=val, progress=progress, steps_per_epoch=steps)


def train_head_through_graph(model, images: np.ndarray, labels: np.ndarray, *, config: TrainConfig,
                             seed: int, progress: bool = True) -> StageResult:
    """Stage 1 the slow way, through the frozen backbone; the reference for the cached path."""
    data, steps = array_dataset(images, labels, batch_size=config.batch_size, seed=seed, epochs=config.epochs)
    return fit(model, data, epochs=config.epochs, learning_rate=config.learning_rate, progress=progress,
               steps_per_epoch=steps)


def image_sequence(root: Path, relpaths: Sequence[str], labels: np.ndarray, *, size: int,
                   batch_size: int, seed: int):
    """Batches of images decoded from disk on demand (for fine-tuning)."""
    from featx_edge.data import _pixels

    def load(idx: np.ndarray) -> np.ndarray:
        return np.stack([_pixels(root, relpaths[i], size) for i in idx]).astype(np.float32)

    return make_sequence(load, labels, batch_size=batch_size, seed=seed)


def predict_probs(model, root: Path, relpaths: Sequence[str], *, size: int, batch_size: int = 64) -> np.ndarray:
    """Keras model probabilities for the given images (float32, (N, C))."""
    out = [model(batch.astype(np.float32), training=False).numpy()
           for batch in iter_batches(root, relpaths, size=size, batch_size=batch_size)]
    return np.concatenate(out).astype(np.float32)


def predict_pixels_keras(model, pixels: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """The Keras model's probabilities for uint8 pixels, in batches (bounded memory per call)."""
    out = [model(pixels[i:i + batch_size].astype(np.float32), training=False).numpy()
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)
