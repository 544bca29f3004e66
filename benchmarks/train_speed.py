"""Head-training speed: through the frozen backbone vs on cached features, same data and head.

Writes JSON with `graph_epoch_s` and `cached_epoch_s` (median of the steady epochs: the first
epoch, which includes tracing, is left out), `embedding_s` (the one-off cost of caching the
features) and their ratio, plus the machine it ran on.

    python benchmarks/train_speed.py --out bench-out/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--data", default="sample", help="image folder, or `sample` (target digits)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per path (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=512, help="training images used")
    args = parser.parse_args(argv)

    from featx_edge._tf import import_tf
    from featx_edge.config import ModelConfig, TrainConfig
    from featx_edge.data.folders import load_images, scan_folder
    from featx_edge.data.sample import resolve_data
    from featx_edge.files.atomic import write_json
    from featx_edge.training.model import build_classifier
    from featx_edge.training.train import embed, train_head_on_features, train_head_through_graph

    tf, keras = import_tf()
    folder = scan_folder(resolve_data(args.data))
    paths = [p for c in folder.classes for p in folder.files[c]]
    rng = np.random.default_rng(0)
    paths = [paths[i] for i in sorted(rng.choice(len(paths), min(args.images, len(paths)), replace=False))]
    index = {c: i for i, c in enumerate(folder.classes)}
    labels = np.array([index[p.split("/")[0]] for p in paths])
    model_cfg = ModelConfig(backbone=args.backbone, alpha=args.alpha, image_size=args.image_size,
                            weights="none", head_units=0, dropout=0.0)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size)

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._t)

    # Timing hooks: fit() is called inside train.*; wrap Model.fit to add the timer.
    timers: list[EpochTimer] = []
    original_fit = keras.Model.fit

    def timed_fit(self, *a, **kw):
        timer = EpochTimer()
        timers.append(timer)
        kw["callbacks"] = list(kw.get("callbacks") or []) + [timer]
        return original_fit(self, *a, **kw)

    keras.Model.fit = timed_fit
    try:
        graph = build_classifier(num_classes=len(folder.classes), config=model_cfg, weights_file=None, seed=0)
        images = load_images(folder.root, paths, size=args.image_size)
        train_head_through_graph(graph.model, images, labels, config=train_cfg, seed=0)
        cached = build_classifier(num_classes=len(folder.classes), config=model_cfg, weights_file=None, seed=0)
        t0 = time.perf_counter()
        features = embed(cached.feature_model, folder.root, paths, size=args.image_size,
                         batch_size=args.batch_size)
        embedding_s = time.perf_counter() - t0
        train_head_on_features(cached.head_model, features, labels, config=train_cfg, seed=0)
    finally:
        keras.Model.fit = original_fit
    graph_epoch_s = statistics.median(timers[0].times[1:])
    cached_epoch_s = statistics.median(timers[1].times[1:])
    result = {
        "benchmark": "train_speed",
        "graph_epoch_s": graph_epoch_s,
        "cached_epoch_s": cached_epoch_s,
        "speedup": graph_epoch_s / cached_epoch_s,
        "embedding_s": embedding_s,
        "graph_epoch_times_s": timers[0].times,
        "cached_epoch_times_s": timers[1].times,
        "settings": vars(args) | {"images": len(paths), "feature_dim": int(features.shape[1])},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "processor": _cpu_model(), "tensorflow": tf.__version__,
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("graph_epoch_s", "cached_epoch_s", "speedup", "embedding_s")}, indent=2))
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
