"""Which int8 is fastest on this CPU: every ONNX int8 recipe featx-edge can make, against float32
and TFLite, at the sizes people ship (MobileNetV2 1.0 and EfficientNet-Lite0 at 224 px).

For each backbone: a run is trained for one epoch on the sample digits (MobileNetV2 with random
weights: no ImageNet weights are reachable offline, and latency does not depend on them;
EfficientNet-Lite0 with its ImageNet weights), exported to tflite-float32, tflite-int8 and
onnx-float32, and the onnx-float32 model is quantized with each target's recipe (portable/arm64
= S8S8, x86-64-vnni = U8S8, x86-64 = U8S8 + reduce_range). Then every model runs in this one
process, interleaved round by round (each round times every model once, for ``--min-seconds``),
at batch 1 and 8 and 1 and all threads; the medians over rounds are reported with ratios to
onnx-float32. The TF reference (Keras model, tf.function) is timed the same way. Agreement of
each ONNX int8 recipe with onnx-float32 on the test split is reported too (top-1, same images).

    python benchmarks/int8_kernels.py --out bench-out/int8_kernels.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKBONES = {"mobilenet_v2_1.0": (["mobilenet_v2"], 1.0, "none"), "efficientnet_lite0": (["efficientnet_lite0"], None,
                                                                                           "imagenet")}
RECIPES = ("portable", "x86-64-vnni", "x86-64")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--workdir", default=None, help="where the runs are made (default: a temporary folder)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timing per model per round")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    args = parser.parse_args(argv)

    from featx_edge.bench import machine_info
    from featx_edge.files.atomic import write_json

    work = Path(args.workdir or tempfile.mkdtemp(prefix="featx-int8-kernels-"))
    report = {"benchmark": "int8_kernels", "image_size": args.image_size, "machine": machine_info(), "models": {}}
    for name in args.backbones.split(","):
        report["models"][name] = _bench_backbone(name, work / name, size=args.image_size, rounds=args.rounds,
                                                 min_seconds=args.min_seconds)
        write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


def _bench_backbone(name: str, run: Path, *, size: int, rounds: int, min_seconds: float) -> dict:
    from featx_edge.config import DataConfig, ExportConfig, ModelConfig, RunConfig, TrainConfig
    from featx_edge.export import export_run
    from featx_edge.export.calibration import calibration_images
    from featx_edge.export.macs import count_macs_onnx
    from featx_edge.export.onnx_int8 import quantize
    from featx_edge.formats.targets import TARGETS
    from featx_edge.runtime import load
    from featx_edge.training.run import Run
    from featx_edge.training.train import train_run

    (backbone,), alpha, weights = BACKBONES[name]
    if not (run / "manifest.json").is_file():
        config = RunConfig(data=DataConfig(path="sample"),
                           model=ModelConfig(backbone=backbone, alpha=alpha, weights=weights, image_size=size),
                           train=TrainConfig(epochs=1),
                           export=ExportConfig(formats=("tflite-float32", "tflite-int8", "onnx-float32")))
        train_run(config, run, overwrite=True)
        export_run(run)
    opened = Run.open(run)
    splits = opened.splits()
    calibration = calibration_images(splits.root, splits.train, size=size, count=200, seed=0)
    float_onnx = opened.artifact_path("onnx-float32")
    paths = {"tflite-float32": opened.artifact_path("tflite-float32"),
             "tflite-int8": opened.artifact_path("tflite-int8"), "onnx-float32": float_onnx}
    meta = load(float_onnx).metadata
    for recipe in RECIPES:
        target = TARGETS[recipe]
        path = run / f"onnx-int8-{recipe}.onnx"
        if not path.is_file():
            quantize(float_onnx, path, calibration=calibration, method="percentile",
                     metadata=dict(meta, format="onnx-int8"), activations=target.activations,
                     reduce_range=target.reduce_range)
        paths[f"onnx-int8 {recipe}"] = path

    from featx_edge.data.folders import load_images

    test = load_images(splits.root, splits.test[:200], size=size)
    agreement = {}
    reference = load(float_onnx).predict_pixels(test).argmax(1)
    for key, path in paths.items():
        if key.startswith("onnx-int8"):
            agreement[key] = float(np.mean(load(path).predict_pixels(test).argmax(1) == reference))

    cpus = os.cpu_count() or 1
    result = {"macs_per_image": count_macs_onnx(float_onnx)["macs_per_image"], "agreement_vs_onnx_float32": agreement,
              "test_images": len(test), "rows": []}
    keras = opened.reference().model
    for threads in sorted({1, cpus}):
        for batch in (1, 8):
            models = {key: load(path, threads=threads) for key, path in paths.items()}
            fns = {key: m.predict_pixels for key, m in models.items()}
            fns["tf-reference"] = _tf_fn(keras, threads)
            x = test[:batch]
            times: dict[str, list[float]] = {key: [] for key in fns}
            for key, fn in fns.items():  # warm up once each
                fn(x)
            for _ in range(rounds):
                for key, fn in fns.items():
                    times[key].append(_median_ms(fn, x, min_seconds=min_seconds))
            base = statistics.median(times["onnx-float32"])
            for key, samples in times.items():
                p50 = statistics.median(samples)
                row = {"model": key, "threads": threads, "batch": batch, "p50_ms": round(p50, 3),
                       "vs_onnx_float32": round(p50 / base, 3), "rounds_ms": [round(s, 3) for s in samples]}
                result["rows"].append(row)
                print(f"{name:<20} {key:<22} t{threads} b{batch} {p50:8.2f} ms  x{p50 / base:.2f}", flush=True)
    return result


def _tf_fn(model, threads: int):
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow fixes its pools when it first runs: every column then uses that setting
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda pixels: fn(tf.constant(pixels.astype(np.float32))).numpy()


def _median_ms(fn, x, *, min_seconds: float) -> float:
    samples = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(samples) < 3:
        t0 = time.perf_counter()
        fn(x)
        samples.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(samples)


if __name__ == "__main__":
    sys.exit(main())
