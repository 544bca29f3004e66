"""int8 fidelity on a real ImageNet backbone: every int8 path against its float twin.

For each seed, trains the README's main run (frozen EfficientNet-Lite0 with its ImageNet
weights, the sample digits, 96 px), exports each int8 path (``tflite-int8``, ``onnx-int8``,
``tflite-int8-selective``, ``tflite-int8-qat``), times each export, and verifies each against
the run's float Keras reference on the held-out test split with the DEFAULT thresholds.
Writes JSON: per seed and path the top-1 agreement (with its 95% interval), the accuracy change
in points (with its paired 95% interval), max |dprob|, pass/fail and export seconds; plus a
summary per path (mean agreement over seeds, worst seed) and the machine.

    python benchmarks/int8_fidelity.py --out bench-out/int8_fidelity.json
    python benchmarks/int8_fidelity.py --out bench-out/int8_polarity.json --white-on-black
    python benchmarks/int8_fidelity.py --out bench-out/int8_no_bias_correction.json --no-bias-correction

Goal (issue 14): >= 0.99 agreement and <= 0.5 points lost for the best path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

PATHS = ("tflite-int8", "onnx-int8", "tflite-int8-selective", "tflite-int8-qat")


def _inverted_copy(root: Path, out: Path) -> Path:
    """The sample digits as white ink on black (scikit-learn's display convention)."""
    from PIL import Image

    for src in root.rglob("*.png"):
        dst = out / src.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as img:
            Image.fromarray(255 - np.asarray(img)).save(dst)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (split, head initialisation)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--white-on-black", action="store_true", help="invert the sample digits first")
    parser.add_argument("--no-bias-correction", action="store_true", help="convert int8 from the model as trained")
    args = parser.parse_args(argv)

    from featx_edge.bench import machine_info
    from featx_edge.config import load_config, override, parse_int_list
    from featx_edge.errors import VerificationError
    from featx_edge.export import export_run
    from featx_edge.rundir import VERIFY, write_json
    from featx_edge.sample import resolve_data
    from featx_edge.train import train_run
    from featx_edge.verify import verify_run

    work = Path(tempfile.mkdtemp(prefix="featx-int8-fidelity-"))
    data = resolve_data("sample")
    if args.white_on_black:
        data = _inverted_copy(data, work / "white-on-black")
    base = load_config(Path(__file__).resolve().parents[1] / "examples" / "sample_digits.toml")
    base = override(base, "data", path=str(data))
    base = override(base, "model", image_size=args.image_size)
    base = override(base, "train", qat_epochs=args.qat_epochs)
    base = override(base, "export", formats=PATHS, bias_correction=not args.no_bias_correction)
    results: list[dict] = []
    try:
        for seed in parse_int_list("seeds", args.seeds):
            config = dataclasses.replace(base, seed=seed)
            run = work / f"seed{seed}"
            t0 = time.perf_counter()
            train_run(config, run)
            train_s = time.perf_counter() - t0
            seconds = {}
            for fmt in PATHS:
                t0 = time.perf_counter()
                export_run(run, formats=(fmt,))
                seconds[fmt] = round(time.perf_counter() - t0, 2)
            try:
                verify_run(run)
            except VerificationError:
                pass  # recorded per format in verify.json
            report = json.loads((run / VERIFY).read_text())
            for fmt in PATHS:
                row = report["formats"][fmt]
                results.append({
                    "seed": seed, "format": fmt, "passed": row["passed"], "failures": row["failures"],
                    "images": row.get("images"), "top1_agreement": row.get("top1_agreement"),
                    "top1_agreement_ci95": row.get("top1_agreement_ci95"),
                    "accuracy_change_points": row.get("accuracy_change_points"),
                    "accuracy_change_ci95_points": row.get("accuracy_change_ci95_points"),
                    "max_abs_diff": row.get("max_abs_diff"), "export_seconds": seconds[fmt],
                    "reference_accuracy": report["reference_accuracy"], "train_seconds": round(train_s, 1),
                })
                print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for fmt in PATHS:
        rows = [r for r in results if r["format"] == fmt and r["top1_agreement"] is not None]
        if rows:
            summary[fmt] = {
                "mean_agreement": float(np.mean([r["top1_agreement"] for r in rows])),
                "worst_agreement": float(np.min([r["top1_agreement"] for r in rows])),
                "mean_accuracy_change_points": float(np.mean([r["accuracy_change_points"] for r in rows])),
                "worst_accuracy_change_points": float(np.min([r["accuracy_change_points"] for r in rows])),
                "passed_default_gate": f"{sum(r['passed'] for r in rows)}/{len(rows)}",
                "meets_goal_every_seed": all(r["top1_agreement"] >= 0.99 and r["accuracy_change_points"] >= -0.5
                                             for r in rows),
            }
    write_json(args.out, {
        "benchmark": "int8_fidelity", "backbone": "efficientnet_lite0", "weights": "imagenet",
        "image_size": args.image_size, "data": "sample digits (all ten), "
        + ("white ink on black" if args.white_on_black else "dark ink on white, as scanned"),
        "bias_correction": not args.no_bias_correction, "qat_epochs": args.qat_epochs,
        "goal": ">= 0.99 agreement and <= 0.5 points lost", "summary": summary, "rows": results,
        "machine": machine_info(), "python": platform.python_version(),
    })
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
