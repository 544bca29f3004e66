"""Images per second of the embedding pass (decode + resize + frozen backbone), at 1 and 2 cores.

For each (image size, core count) a fresh subprocess pins itself to the first N CPUs
(``sched_setaffinity``, like ``taskset``) and sets TensorFlow's intra- and inter-op threads to N
before TensorFlow starts, then times over the same images:

- ``pipeline``: ``featx_edge.training.features.embed_batches``, what training runs: a tf.data pipeline
  decoding in parallel threads, overlapped with the model, the model in a ``tf.function``;
- ``sequential``: the previous path, the reference in the same process: decode a batch with
  Pillow, then call the Keras model eagerly, one after the other;
- ``model_only``: the backbone on pre-decoded pixels (the ceiling decoding cannot beat).

Reported per row: images/s of each, and ``pipeline / sequential``. The first batches (tracing,
warm-up) are not timed. Random weights (``--weights none``) cost the same as the ImageNet ones.

GPU hosts: the script runs unchanged where TensorFlow sees a GPU (the model is placed there by
TensorFlow; the rows record the GPUs; ``--cores`` then limits only the decode side). The GPU
machine lent to this project's sessions has no TensorFlow installed, so no GPU figures were
measured with it.

    python benchmarks/embedding_throughput.py --out bench-out/embedding_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _worker(args) -> dict:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    tf.config.threading.set_intra_op_parallelism_threads(args.cores)
    tf.config.threading.set_inter_op_parallelism_threads(args.cores)
    import numpy as np

    from featx_edge.backbones.registry import get_backbone
    from featx_edge.backbones.weights import resolve_weights
    from featx_edge.config import ModelConfig
    from featx_edge.data.folders import iter_batches, scan_folder
    from featx_edge.data.sample import resolve_data
    from featx_edge.training.features import embed_batches
    from featx_edge.training.model import build_classifier

    folder = scan_folder(resolve_data(args.data))
    paths = [p for c in folder.classes for p in folder.files[c]]
    paths = (paths * (1 + args.images // max(len(paths), 1)))[: args.images]
    config = ModelConfig(backbone=args.backbone, image_size=args.image_size, weights=args.weights)
    weights = resolve_weights(get_backbone(args.backbone), weights=args.weights, alpha=None, size=args.image_size)
    model = build_classifier(num_classes=2, config=config, weights_file=weights, seed=0).feature_model
    bs, warm = args.batch_size, paths[: 2 * args.batch_size]

    def pipeline(rels):
        for _ in embed_batches(model, folder.root, rels, size=args.image_size, batch_size=bs):
            pass

    def sequential(rels):
        for batch in iter_batches(folder.root, rels, size=args.image_size, batch_size=bs):
            model(batch.astype(np.float32), training=False).numpy()

    pixels = np.concatenate(list(iter_batches(folder.root, paths, size=args.image_size, batch_size=bs)))
    infer = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), reduce_retracing=True)

    def model_only(_rels):
        for i in range(0, len(pixels), bs):
            infer(pixels[i:i + bs]).numpy()

    row = {"backbone": args.backbone, "image_size": args.image_size, "cores": args.cores,
           "cpus_used": sorted(os.sched_getaffinity(0)), "batch_size": bs, "images": len(paths),
           "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}
    for name, fn in (("pipeline", pipeline), ("sequential", sequential), ("model_only", model_only)):
        fn(warm)  # trace and warm up
        t0 = time.perf_counter()
        fn(paths)
        row[f"{name}_images_per_s"] = round(len(paths) / (time.perf_counter() - t0), 2)
    row["pipeline_vs_sequential"] = round(row["pipeline_images_per_s"] / row["sequential_images_per_s"], 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write (the parent run)")
    parser.add_argument("--data", default="sample", help="image folder, or `sample` (the digits, all)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="none", help="`none` (default: same cost), `imagenet` or a file")
    parser.add_argument("--sizes", default="224,96", help="comma-separated input sizes")
    parser.add_argument("--cores", default="1,2", help="comma-separated core counts")
    parser.add_argument("--images", type=int, default=384, help="images timed per path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)  # worker
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.cores = int(args.cores)
        print(json.dumps(_worker(args)), flush=True)
        return 0
    if not args.out:
        parser.error("--out is required")

    from featx_edge.bench import machine_info
    from featx_edge.config import parse_int_list
    from featx_edge.files.atomic import write_json

    rows = []
    for size in parse_int_list("sizes", args.sizes):
        for cores in parse_int_list("cores", args.cores):
            cmd = [sys.executable, __file__, "--worker", "--data", args.data, "--backbone", args.backbone,
                   "--weights", args.weights, "--image-size", str(size), "--cores", str(cores),
                   "--images", str(args.images), "--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if proc.returncode:
                rows.append({"image_size": size, "cores": cores, "error": proc.stderr[-1000:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    write_json(args.out, {"benchmark": "embedding_throughput", "rows": rows, "load_average_at_end": os.getloadavg(),
                          "machine": machine_info()})
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
