"""Backbone x format x runtime latency on this CPU: one small run per backbone, benched, compared.

Trains each backbone's head for one epoch on the sample digits with `--weights none` (the
latency of a network does not depend on its weights; its accuracy here is meaningless and is
not reported), exports the formats, runs `featx-edge bench` on each run and writes all reports
as one JSON file, plus the side-by-side table of the first two backbones.

    python benchmarks/bench_backbones.py --out bench-out/backbones.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--workdir", default="bench-out/backbone-runs", help="where the runs are made")
    parser.add_argument("--backbones", default="mobilenet_v2:0.35,mobilenet_v3_small:0.75",
                        help="comma-separated name[:alpha]")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--formats", default="tflite-float32,tflite-int8,onnx-float32,onnx-int8")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)

    from featx_edge.bench import bench_run, compare_runs
    from featx_edge.config import DataConfig, ExportConfig, ModelConfig, RunConfig, TrainConfig, parse_int_list
    from featx_edge.export import export_run
    from featx_edge.files.atomic import write_json
    from featx_edge.training.train import train_run

    reports = {}
    runs = []
    for item in args.backbones.split(","):
        name, _, alpha = item.partition(":")
        run = Path(args.workdir) / f"{name}-{alpha or 'default'}-{args.image_size}"
        config = RunConfig(
            data=DataConfig(path="sample"),
            model=ModelConfig(backbone=name, alpha=float(alpha) if alpha else None, image_size=args.image_size,
                              weights="none"),
            train=TrainConfig(epochs=1),
            export=ExportConfig(formats=args.formats),
        )
        train_run(config, run)
        export_run(run)
        report = bench_run(run, threads=parse_int_list("threads", args.threads),
                           batches=parse_int_list("batches", args.batches),
                           measure_accuracy=False, include_tf=True)
        for row in report["rows"]:  # random backbone: accuracy means nothing here
            row.pop("accuracy", None)
            row.pop("bench_accuracy", None)
        reports[run.name] = report
        runs.append(run)
    write_json(args.out, {"benchmark": "backbones", "note": "latency only: weights=none, accuracy not meaningful",
                          "runs": reports})
    if len(runs) >= 2:
        print(compare_runs(runs[0], runs[1]))
    print(json.dumps({name: len(r["rows"]) for name, r in reports.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
