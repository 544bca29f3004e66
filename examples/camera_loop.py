"""Classify a stream of frames: a video file or camera (needs OpenCV), or a folder of images.

    python camera_loop.py model.tflite-int8.tflite --video clip.mp4     # pip install opencv-python-headless
    python camera_loop.py model.tflite-int8.tflite --camera 0
    python camera_loop.py model.tflite-int8.tflite --frames frames/      # no OpenCV needed

Prints one line per frame with the label, its score and the inference time, and a summary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from featx_edge.runtime import load

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def frames_from_folder(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    from PIL import Image

    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        with Image.open(path) as img:
            yield path.name, np.asarray(img.convert("RGB"))


def frames_from_opencv(source: str | int) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import cv2
    except ImportError:
        sys.exit("reading video or a camera needs OpenCV: pip install opencv-python-headless "
                 "(or pass --frames DIR with images)")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        sys.exit(f"cannot open video source {source!r}")
    index = 0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            yield f"frame {index}", bgr[:, :, ::-1].copy()  # OpenCV gives BGR; the model wants RGB
            index += 1
    finally:
        capture.release()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--frames", type=Path, help="folder of images, read in name order")
    source.add_argument("--video", help="video file (OpenCV)")
    source.add_argument("--camera", type=int, help="camera index (OpenCV)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--max-frames", type=int, default=0, help="stop after N frames (0: all)")
    args = parser.parse_args()

    predictor = load(args.model, threads=args.threads)
    if args.frames:
        frames = frames_from_folder(args.frames)
    else:
        frames = frames_from_opencv(args.video if args.video is not None else args.camera)
    times = []
    for count, (name, rgb) in enumerate(frames, start=1):
        start = time.perf_counter()
        (result,) = predictor.predict([rgb], top_k=1)
        times.append((time.perf_counter() - start) * 1000)
        print(f"{name}: {result.label} {result.score:.3f} ({times[-1]:.1f} ms)", flush=True)
        if args.max_frames and count >= args.max_frames:
            break
    if times:
        print(f"{len(times)} frames, median {statistics.median(times):.1f} ms per frame (resize + inference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
