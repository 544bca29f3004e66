"""The on-disk feature cache: backbone features in .npy shards, memory-mapped, reused across runs.

Layout: ``<cache>/<key>/`` where ``<cache>`` is ``--feature-cache DIR`` (config
``train.feature_cache``) or ``<featx-edge home>/features`` (``$FEATX_EDGE_HOME`` or
``~/.cache/featx-edge``), and ``<key>`` is a digest of everything that decides a feature
vector apart from the image: backbone, alpha, the weights' sha256 (random weights: the seed that
drew them), input size, the layer pooled (``--cut-at``), preprocessing, resize and ``FEATURE_VERSION``. ``key.json`` there spells the key out.

Inside, ``shards/<id>.npy`` holds float32 features of up to ``shard_images`` consecutive
images of a list; ``<id>`` digests the key, the data folder, each image's relative path (its
bytes, so file names that are not UTF-8 work), size, modification and status-change times
(``st_mtime_ns``, ``st_ctime_ns``) and inode, and the augmented view (none for the originals). So:

- a second run over the same files reuses every shard and embeds nothing;
- a changed file (new size, mtime, ctime or inode) changes its shard's id: that shard alone is
  recomputed;
- new weights (another sha256) change the key: nothing is reused;
- an interrupted pass keeps its completed shards (each written to a temporary name and renamed)
  and the next run computes only the rest.

Why stat and not a hash of the content: a content hash reads every file on every run (a
million files is minutes of I/O before any work), while ``stat`` costs microseconds. Any
write changes ctime, which no tool can set back (``touch -r`` and sync tools restore mtime
only), and a file replaced by a new one has a new inode: an image rewritten with the same size
and its old mtime is recomputed. The price: copying or moving the data folder to another
file system (new inodes), or ``chmod``/``chown`` on the images, recomputes their shards once.

Non-finite numbers never reach training: features are checked before a shard is written (a
backbone giving NaN or infinity is refused, ``WeightsError``), and a cached shard holding NaN
or infinity (damaged on disk) is reported in one warning line, removed and recomputed, as a
shard of the wrong shape or a truncated one is. That check reads each reused shard once.
``sets/<id>.json`` indexes each list's shards (and records how augmented views were made).

Memory: features are read through ``np.load(mmap_mode="r")``; only one shard being written and
the batches in flight are in RAM, plus, per image, its path, label and an 8-byte row index.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import shutil
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from featx_edge.data.augment import AugmentSpec, augmented_pixels
from featx_edge.data.folders import Splits, _pixels
from featx_edge.data.sample import featx_home
from featx_edge.errors import DataError, FeatxError, WeightsError
from featx_edge.files.atomic import atomic_path, write_json
from featx_edge.files.ownership import claim_folder
from featx_edge.progress import bar

log = logging.getLogger(__name__)

FEATURE_VERSION = 1
"""Bumped when featx-edge computes features differently (decode, resize, pooling): old shards are not reused."""

SHARD_IMAGES = 4096  # images per shard: 20 MB of 1280-d features; what an interrupted pass can lose at most

STOP_AFTER_SHARDS_ENV = "FEATX_EDGE_TEST_STOP_AFTER_SHARDS"  # test hook: SimulatedInterrupt after this many shards


class SimulatedInterrupt(FeatxError):
    """Raised by the test hook ``STOP_AFTER_SHARDS_ENV`` in place of a real interruption."""


def default_cache_dir() -> Path:
    """``<featx-edge home>/features``."""
    return featx_home() / "features"


@dataclass(frozen=True)
class FeatureKey:
    """Everything besides the image that decides its feature vector."""

    backbone: str
    alpha: float | None
    weights_sha256: str | None
    random_weights_seed: int | None  # `--weights none`: the seed that drew the random backbone
    image_size: int
    preprocessing: str
    resize: str
    feature_version: int = FEATURE_VERSION
    cut_at: str | None = None  # the backbone layer the features are pooled from (None: its output)

    def digest(self) -> str:  # without a cut, the key from before cuts existed: existing caches stay valid
        text = json.dumps({k: v for k, v in asdict(self).items() if k != "cut_at" or v is not None}, sort_keys=True)
        name = "-".join(str(part) for part in (self.backbone, self.image_size, self.cut_at) if part is not None)
        return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


class ShardedArray:
    """Rows (N, D) float32 stored as .npy shards of ``rows_per_shard`` rows, memory-mapped."""

    def __init__(self, paths: Sequence[Path], *, rows_per_shard: int, count: int, dim: int) -> None:
        self.maps = [np.load(path, mmap_mode="r") for path in paths]
        self.rows_per_shard, self.count, self.dim = rows_per_shard, count, dim

    def __len__(self) -> int:
        return self.count

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order) as an in-memory float32 array (len(idx), D)."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.dim), np.float32)
        shard, row = np.divmod(idx, self.rows_per_shard)
        for s in np.unique(shard):
            hit = shard == s
            out[hit] = self.maps[s][row[hit]]
        return out


class FeatureTable:
    """Rows drawn from several ShardedArrays (e.g. the training images' originals, then each view)."""

    def __init__(self, parts: Sequence[tuple[ShardedArray, np.ndarray | None]]) -> None:
        self.parts = [(array, np.arange(len(array)) if rows is None else np.asarray(rows, np.int64))
                      for array, rows in parts]
        self.offsets = np.cumsum([0] + [len(rows) for _, rows in self.parts])
        self.dim = self.parts[0][0].dim if self.parts else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.dim), np.float32)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        for p in np.unique(part):
            hit = part == p
            array, rows = self.parts[p]
            out[hit] = array.take(rows[idx[hit] - self.offsets[p]])
        return out

    def to_array(self) -> np.ndarray:
        return self.take(np.arange(len(self)))


def image_batches(root: Path, relpaths: Sequence[str], *, size: int, batch_size: int,
                  view: tuple[AugmentSpec, int] | None = None) -> Iterator[np.ndarray]:
    """uint8 batches of the images, in order, decoded by a tf.data pipeline in parallel threads.

    Each image goes through ``data._pixels`` (the runtime's decode and bilinear resize), or
    ``augment.augmented_pixels`` for an augmented ``view``; decoding overlaps the model's work.
    """
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    failed: list[BaseException] = []

    def load(i) -> np.ndarray:
        rel = relpaths[int(i)]
        try:
            if view is None:
                return _pixels(root, rel, size)
            return augmented_pixels(root, rel, size=size, spec=view[0], view=view[1])
        except BaseException as err:  # re-raised, typed, outside TensorFlow below
            failed.append(err)
            raise

    dataset = tf.data.Dataset.range(len(relpaths)).map(
        lambda i: tf.ensure_shape(tf.numpy_function(load, [i], tf.uint8, stateful=False), (size, size, 3)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    try:
        for batch in dataset:
            yield batch.numpy()
    except tf.errors.OpError as err:
        if failed:
            raise failed[0] from None
        raise DataError(f"decoding images under `{root}` failed: {err.message}") from err


def embed_batches(feature_model, root: Path, relpaths: Sequence[str], *, size: int, batch_size: int,
                  view: tuple[AugmentSpec, int] | None = None, desc: str | None = None,
                  devices: Sequence[str] = ()) -> Iterator[np.ndarray]:
    """Pooled features (B, D) float32 of the images, batch by batch, in order.

    ``devices``: with two or more (a distribution strategy's local replicas, e.g. every GPU), each
    batch is split into one contiguous slice per device, run there in parallel, and put back in
    order; the features are those of one device (a test compares them).
    """
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    key = tuple(devices) if len(devices) > 1 else ()
    infer = _compiled.setdefault(feature_model, {}).get(key)
    if infer is None:  # one traced function per model and device set, however many lists and views it embeds
        infer = tf.function(_splitting(tf, feature_model, key), reduce_retracing=True)
        _compiled[feature_model][key] = infer
    batches = image_batches(root, relpaths, size=size, batch_size=batch_size, view=view)
    if desc:
        batches = bar(batches, total=-(-len(relpaths) // batch_size), desc=desc, unit="batch")
    for batch in batches:
        yield infer(batch).numpy().astype(np.float32, copy=False)


def _splitting(tf, feature_model, devices: tuple[str, ...]) -> Callable:
    """The features of a batch, on one device or split across ``devices`` (contiguous slices, in order)."""
    if not devices:
        return lambda x: feature_model(tf.cast(x, tf.float32), training=False)

    def split(x):
        n, k = tf.shape(x)[0], len(devices)
        parts = []
        for i, device in enumerate(devices):
            with tf.device(device):
                parts.append(feature_model(tf.cast(x[n * i // k : n * (i + 1) // k], tf.float32), training=False))
        return tf.concat(parts, axis=0)

    return split


_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class CacheStats:
    reused: int = 0
    embedded: int = 0
    seconds: float = 0.0


class FeatureCache:
    """Features of image lists under one FeatureKey, in ``<cache_dir>/<key>/``.

    Example:
        >>> cache = FeatureCache(default_cache_dir(), key, shard_images=4096)  # doctest: +SKIP
        >>> array = cache.features(feature_model, root, relpaths, size=96, batch_size=32)  # doctest: +SKIP
    """

    def __init__(self, cache_dir: Path, key: FeatureKey, *, shard_images: int = SHARD_IMAGES) -> None:
        self.dir = Path(cache_dir).expanduser() / key.digest()
        self.key, self.shard_images, self.stats = key, shard_images, CacheStats()
        self.scratch: Path | None = None  # set by open_cache when the cache is off: removed by close()
        try:
            # Shards are deleted (damaged) and replaced here: only in a folder featx-edge made (ownership).
            if problem := claim_folder(self.dir, kind="feature-cache"):
                raise DataError(f"the feature cache folder `{self.dir}` {problem}; featx-edge writes and deletes only "
                                "in cache folders it made. Delete it yourself if it is an earlier featx-edge's cache "
                                "(it is rebuilt), or pass another `--feature-cache DIR`.")
            (self.dir / "shards").mkdir(exist_ok=True)
            (self.dir / "sets").mkdir(exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot create the feature cache `{self.dir}` ({err.strerror or err}); pass a "
                            "writable folder with `--feature-cache DIR`, or `--feature-cache none`.") from err
        if not (self.dir / "key.json").is_file():
            write_json(self.dir / "key.json", asdict(self.key))

    def close(self) -> None:
        """Remove the scratch folder of a disabled cache (a no-op for a real cache)."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def features(self, feature_model, root: Path, relpaths: Sequence[str], *, size: int, batch_size: int,
                 view: tuple[AugmentSpec, int] | None = None, desc: str = "embedding",
                 devices: Sequence[str] = ()) -> ShardedArray:
        """Features of ``relpaths`` (in order) as a memory-mapped ShardedArray: cached shards are reused,
        the missing ones computed and written one by one."""
        dim = int(feature_model.output_shape[-1])
        view_id = None if view is None else {"augment": view[0].describe(), "view": view[1]}
        starts = range(0, len(relpaths), self.shard_images)
        ids = [self._shard_id(root, relpaths[s : s + self.shard_images], view_id) for s in starts]
        paths = [self.dir / "shards" / f"{shard_id}.npy" for shard_id in ids]
        missing = [i for i, path in enumerate(paths)
                   if not self._valid(path, rows=min(self.shard_images, len(relpaths) - i * self.shard_images), dim=dim)]
        reused = len(relpaths) - sum(min(self.shard_images, len(relpaths) - i * self.shard_images) for i in missing)
        self.stats.reused += reused
        set_file = self.dir / "sets" / f"{hashlib.sha256(''.join(ids).encode()).hexdigest()[:20]}.json"
        index = {"images": len(relpaths), "shard_images": self.shard_images, "feature_dim": dim,
                 "data_root": str(root), "view": view_id, "shards": [p.name for p in paths],
                 "complete": not missing}
        if reused:
            log.info("reused %d cached features (%d of %d shards) from %s", reused, len(paths) - len(missing),
                     len(paths), self.dir)
        if missing:
            write_json(set_file, index)
            todo = [rel for i in missing for rel in relpaths[i * self.shard_images : (i + 1) * self.shard_images]]
            t0 = time.perf_counter()
            self._embed(feature_model, root, todo, [(paths[i], min(self.shard_images, len(relpaths) - i * self.shard_images))
                                                    for i in missing], size=size, batch_size=batch_size, view=view,
                        desc=desc, devices=devices)
            self.stats.embedded += len(todo)
            self.stats.seconds += time.perf_counter() - t0
            index["complete"] = True
        write_json(set_file, index)
        return ShardedArray(paths, rows_per_shard=self.shard_images, count=len(relpaths), dim=dim)

    def _embed(self, feature_model, root: Path, todo: Sequence[str], shards: list[tuple[Path, int]], *, size: int,
               batch_size: int, view, desc: str, devices: Sequence[str]) -> None:
        """Embed ``todo`` (the missing shards' images, in order) and write each shard once it is full."""
        stop_after = _stop_after_shards()
        pending: list[np.ndarray] = []
        filled, written, first = 0, 0, 0  # first: the index in `todo` of the shard's first image
        shard_iter = iter(shards)
        path, rows = next(shard_iter)
        for out in embed_batches(feature_model, root, todo, size=size, batch_size=batch_size, view=view, desc=desc,
                                 devices=devices):
            while len(out):
                take = min(rows - filled, len(out))
                pending.append(out[:take])
                filled += take
                out = out[take:]
                if filled == rows:
                    shard = np.concatenate(pending)
                    _refuse_non_finite(shard, root=root, relpaths=todo[first : first + rows])
                    _write_shard(path, shard)
                    written += 1
                    first += rows
                    if stop_after is not None and written >= stop_after:
                        raise SimulatedInterrupt(f"stopped after {written} shard(s) ({STOP_AFTER_SHARDS_ENV})")
                    pending, filled = [], 0
                    path, rows = next(shard_iter, (None, 0))

    def _shard_id(self, root: Path, relpaths: Sequence[str], view_id: dict | None) -> str:
        digest = hashlib.sha256(json.dumps([self.key.digest(), str(root), view_id]).encode())
        for rel in relpaths:
            try:
                st = os.stat(root / rel)
            except OSError as err:
                raise DataError(f"`{root / rel}` cannot be read ({err.strerror or err}); the file changed since the "
                                "data folder was scanned. Restore it or re-run.") from err
            # fsencode: a file name that is not UTF-8 (surrogate-escaped) keys on its bytes.
            digest.update(b"\0" + os.fsencode(rel))
            digest.update(f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}".encode())
        return digest.hexdigest()[:32]

    @staticmethod
    def _valid(path: Path, *, rows: int, dim: int) -> bool:
        """A complete shard of the expected shape holding finite numbers; a damaged one is removed
        (and recomputed) after one warning line.

        Raises:
            DataError: the shard's path is a folder or another non-file (not ours to replace).
        """
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise DataError(f"the feature shard `{path}` is a folder or a special file, not a shard this cache "
                            "wrote; remove it, or pass another folder with `--feature-cache DIR`.")
        if not path.is_file():
            return False
        try:
            array = np.load(path, mmap_mode="r")
            problem = (f"shape {array.shape} {array.dtype}, not ({rows}, {dim}) float32"
                       if array.shape != (rows, dim) or array.dtype != np.float32
                       else None if _finite(array) else "it holds NaN or infinite numbers")
        except (OSError, ValueError) as err:
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        if problem:
            log.warning("feature shard %s is damaged (%s); recomputing it", path, problem)
            path.unlink(missing_ok=True)
        return problem is None


def _finite(array: np.ndarray, *, rows_per_step: int = 1024) -> bool:
    """Whether every number is finite; a few rows at a time, so a memory-mapped shard is not copied whole."""
    return all(np.isfinite(array[s : s + rows_per_step]).all() for s in range(0, len(array), rows_per_step))


def _refuse_non_finite(features: np.ndarray, *, root: Path, relpaths: Sequence[str]) -> None:
    """WeightsError when the backbone gave NaN or infinity: such features must not be cached or trained on."""
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise WeightsError(
            f"the backbone gives NaN or infinite features for {len(bad)} of {len(relpaths)} images (first: "
            f"`{root / relpaths[bad[0]]}`); its weights hold non-finite numbers or its float16 activations "
            "overflow. Check the weights file (`--weights`), or train without `--mixed-precision`.")


def _write_shard(path: Path, features: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(features, dtype=np.float32))


def _stop_after_shards() -> int | None:
    value = os.environ.get(STOP_AFTER_SHARDS_ENV)
    return int(value) if value else None


def open_cache(setting: str | None, key: FeatureKey, *, scratch: Path,
               shard_images: int = SHARD_IMAGES) -> FeatureCache:
    """The cache ``setting`` names: None, the default folder; a path; ``"none"``, ``scratch``.

    With the cache off, features still go to disk (in ``scratch``, removed by ``close()``) so
    memory stays bounded.
    """
    if setting is not None and setting.lower() == "none":
        cache = FeatureCache(scratch, key, shard_images=shard_images)
        cache.scratch = scratch
        return cache
    return FeatureCache(Path(setting) if setting else default_cache_dir(), key, shard_images=shard_images)


def feature_key(spec, *, alpha: float | None, weights_sha256: str | None, seed: int, size: int,
                cut_at: str | None = None) -> FeatureKey:
    """The FeatureKey of a backbone spec with these weights at ``size``, cut at ``cut_at`` (None: whole)."""
    from featx_edge.runtime.image import RESIZE_METHOD

    return FeatureKey(backbone=spec.name, alpha=alpha, weights_sha256=weights_sha256,
                      random_weights_seed=None if weights_sha256 else seed, image_size=size,
                      preprocessing=spec.preprocessing, resize=RESIZE_METHOD, cut_at=cut_at)


@dataclass
class SplitFeatures:
    """Cached features of a run's splits: train (originals, then each augmented view), val, test."""

    train: FeatureTable
    train_labels: np.ndarray  # the training labels, repeated once per view
    val: FeatureTable
    test: FeatureTable
    record: dict  # for the run's manifest


def split_features(feature_model, splits: Splits, *, cache: FeatureCache, size: int, batch_size: int,
                   augment: AugmentSpec, views: int, devices: Sequence[str] = ()) -> SplitFeatures:
    """Embed (or reuse) every image of the splits once, and ``views`` augmented views of the training images.

    ``devices``: the local replicas to split each batch across (``embed_batches``).
    """
    everything, rows = split_rows(splits)
    t0 = time.perf_counter()
    originals = cache.features(feature_model, splits.root, everything, size=size, batch_size=batch_size,
                               devices=devices)
    parts = [(originals, rows["train"])]
    for view in range(1, views + 1):
        parts.append((cache.features(feature_model, splits.root, splits.train, size=size, batch_size=batch_size,
                                     view=(augment, view), desc=f"embedding view {view}/{views}", devices=devices),
                      None))
    record = {"dir": str(cache.dir) if cache.scratch is None else None, "key": asdict(cache.key),
              "images_embedded": cache.stats.embedded, "features_reused": cache.stats.reused,
              "seconds": round(time.perf_counter() - t0, 3), "shard_images": cache.shard_images,
              "augment_views": views, "augment": augment.describe() if views else None,
              "devices": list(devices) if len(devices) > 1 else None}
    if cache.stats.embedded:
        log.info("embedded %d images in %.1f s (%.0f images/s)", cache.stats.embedded, cache.stats.seconds,
                 cache.stats.embedded / max(cache.stats.seconds, 1e-9))
    return SplitFeatures(train=FeatureTable(parts), train_labels=np.tile(splits.labels("train"), views + 1),
                         val=FeatureTable([(originals, rows["val"])]), test=FeatureTable([(originals, rows["test"])]),
                         record=record)


def split_rows(splits: Splits) -> tuple[list[str], dict[str, np.ndarray]]:
    """All images of the splits in one sorted list, and each split's rows in it.

    The whole folder is embedded as one list, so the cache does not depend on the seed or the
    split fractions (another split of the same folder reuses every feature).
    """
    tagged = [[(rel, name) for rel in getattr(splits, name)] for name in ("train", "val", "test")]
    merged = heapq.merge(*tagged)
    everything: list[str] = []
    rows: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, (rel, name) in enumerate(merged):
        everything.append(rel)
        rows[name].append(i)
    return everything, {name: np.asarray(r, dtype=np.int64) for name, r in rows.items()}


def table_dataset(table: FeatureTable, labels: np.ndarray, *, batch_size: int, epochs: Sequence[int] = (0,),
                  order: Callable[[int], np.ndarray] | None = None):
    """A tf.data pipeline of (features, labels) batches read from ``table``; (dataset, steps per epoch).

    For each epoch in ``epochs``, ``order(epoch)`` gives its permutation (``train.epoch_order``;
    batches never straddle epochs, as in ``train.array_dataset``, so both give the same batches).
    ``order=None``: the rows in order, once per epoch. Only the batches in flight are in memory.
    """
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    n = len(labels)
    steps = -(-n // batch_size)
    epochs = list(epochs)

    def batches():
        for epoch in epochs:
            perm = order(epoch) if order is not None else np.arange(n)
            for s in range(steps):
                idx = perm[s * batch_size : (s + 1) * batch_size]
                yield table.take(idx), labels[idx]

    dataset = tf.data.Dataset.from_generator(batches, output_signature=(
        tf.TensorSpec((None, table.dim), tf.float32), tf.TensorSpec((None,), tf.as_dtype(labels.dtype))))
    # A known length: Keras needs it to evaluate with steps_per_execution > 1.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(epochs) * steps))
    return dataset.prefetch(tf.data.AUTOTUNE), steps


def predict_table(head_model, table: FeatureTable, *, batch_size: int = 1024) -> np.ndarray:
    """The head's probabilities for every row of ``table``, a batch at a time: (N, C) float32."""
    out = [head_model(table.take(np.arange(s, min(s + batch_size, len(table)))), training=False).numpy()
           for s in range(0, len(table), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, head_model.output_shape[-1]), np.float32)
