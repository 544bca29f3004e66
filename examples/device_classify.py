"""Classify images on a device with only the runtime install (no TensorFlow).

On the host, pack a verified export (model, selftest/, pinned requirements.txt, featx-edge wheel):
    featx-edge bundle runs/demo --format tflite-int8 --out bundle-int8

On the board, in the copied bundle folder (its README gives the install line with the wheel's name):
    python3 -m venv .venv && . .venv/bin/activate
    pip install -r requirements.txt && pip install --no-deps featx_edge-*.whl
    featx-edge selftest model.tflite-int8.tflite   # once: does this runtime reproduce the export?
    python device_classify.py model.tflite-int8.tflite photo1.jpg photo2.png --top-k 3
"""

from __future__ import annotations

import argparse
import sys
import time

from featx_edge.errors import FeatxError
from featx_edge.runtime import load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    try:
        predictor = load(args.model, threads=args.threads)
    except FeatxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.model}: {len(predictor.labels)} classes, input {predictor.height}x{predictor.width}, "
          f"engine {predictor.backend.engine}")
    status = 0
    for path in args.images:
        start = time.perf_counter()
        try:
            (result,) = predictor.predict([path], top_k=args.top_k)
        except FeatxError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
            continue
        ms = (time.perf_counter() - start) * 1000
        ranked = ", ".join(f"{label} {score:.3f}" for label, score in result.top_k)
        print(f"{path}: {ranked}  ({ms:.1f} ms incl. decode)")
    return status


if __name__ == "__main__":
    sys.exit(main())
