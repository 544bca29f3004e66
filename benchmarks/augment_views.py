"""Does `--augment-views K` help? Validation and test accuracy with 95% intervals, paired against K=0.

Trains the README's main job (`examples/sample_digits.toml`: frozen EfficientNet-Lite0, 96 px,
all ten sample digits) once per K with `featx-edge train --augment-views K --augment LIST` (a run
folder that already holds a finished run for that K is reused), then scores every run's Keras
reference on the same validation and test images: accuracy with its Wilson interval, and the
change against K=0 with the paired interval of `featx_edge.fidelity.intervals` (computed from the images
one run gets right and the other wrong).

    python benchmarks/augment_views.py --views 0,2,4 --work bench-out/augment --out bench-out/augment_views.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", default="0,2,4", help="comma-separated K values (0 first: the baseline)")
    parser.add_argument("--augment", default="crop,rotate,color", help="transforms (no flip for digits)")
    parser.add_argument("--config", default="examples/sample_digits.toml")
    parser.add_argument("--work", required=True, help="folder for the runs (aug0, aug2, ...)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    from featx_edge.config import parse_int_list
    from featx_edge.fidelity.intervals import paired_difference, wilson
    from featx_edge.files.atomic import write_json
    from featx_edge.rundir.names import MANIFEST
    from featx_edge.training.run import Run
    from featx_edge.training.train import predict_probs

    views = parse_int_list("views", args.views)
    correct: dict[int, dict[str, np.ndarray]] = {}
    rows = []
    for k in views:
        run = Path(args.work) / f"aug{k}"
        if not (run / MANIFEST).is_file():
            subprocess.run([sys.executable, "-m", "featx_edge", "train", "--config", args.config, "--out", str(run),
                            "--augment-views", str(k), "--augment", args.augment, "--quiet"], check=True)
        opened = Run.open(run)
        splits, model = opened.splits(), opened.reference().model
        row = {"views": k, "run": str(run),
               "feature_cache": json.loads((run / MANIFEST).read_text())["training"].get("feature_cache")}
        correct[k] = {}
        for split in ("val", "test"):
            probs = predict_probs(model, splits.root, getattr(splits, split), size=opened.size)
            right = probs.argmax(1) == splits.labels(split)
            correct[k][split] = right
            row[f"{split}_images"] = len(right)
            row[f"{split}_accuracy"] = float(right.mean())
            row[f"{split}_accuracy_ci95"] = list(wilson(int(right.sum()), len(right)))
            if k != views[0]:
                base = correct[views[0]][split]
                gained, lost = int(np.sum(right & ~base)), int(np.sum(~right & base))
                low, high = paired_difference(gained, lost, len(right))
                row[f"{split}_change_points_vs_{views[0]}"] = round(100 * (right.mean() - base.mean()), 2)
                row[f"{split}_change_ci95_points"] = [round(100 * low, 2), round(100 * high, 2)]
                row[f"{split}_gained_lost"] = [gained, lost]
        rows.append(row)
        print(json.dumps({key: v for key, v in row.items() if key != "feature_cache"}), flush=True)
    write_json(args.out, {"benchmark": "augment_views", "config": args.config, "augment": args.augment,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
