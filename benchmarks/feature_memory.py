"""Peak memory of `featx-edge train` as the image count grows: it must grow by kilobytes per image.

Makes synthetic folders (small PNGs in 10 classes, `make_folder`), then runs
`/usr/bin/time -v featx-edge train --data DIR ...` in a subprocess for each count and records the
peak resident memory it reports ("Maximum resident set size"), plus the peak of the training
process's anonymous and file-backed resident memory (RssAnon, RssFile from /proc, sampled every
0.1 s): memory-mapped feature shards count as file-backed resident pages while they are read,
and the kernel can drop those at any time, unlike anonymous memory.

Each count runs with a fresh feature cache (a cold run: every image embedded), then once more on
the same cache for the largest count (a warm run: nothing embedded). The random backbone
(`--weights none`) is fine for memory: the work per image is the same.

    python benchmarks/feature_memory.py --counts 5000,20000,50000 --out bench-out/feature_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, count: int, *, classes: int = 10, size: int = 32, seed: int = 0) -> Path:
    """``count`` small RGB PNGs, ``classes`` classes (a class colour plus noise); reused if complete."""
    marker = root / f".complete-{count}-{classes}-{size}-{seed}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        c = i % classes
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([c * 20 % 256, (255 - c * 20) % 256, (c * 53) % 192])
        arr = np.clip(rng.integers(0, 64, (size, size, 3)) + colour, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:07d}.png")
    marker.write_text("")
    return root


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; its peak RSS and the sampled peaks of RssAnon / RssFile."""
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for child in _children(proc.pid):
                for field, peak in list(peaks.items()):
                    peaks[field] = max(peak, _status_kb(child, field))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    reused = re.findall(r"reused (\d+) cached features", err + out)
    return {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(int(peak.group(1)) / 1024, 1) if peak else None,
            "peak_rss_anon_mb": round(peaks["RssAnon"] / 1024, 1),
            "peak_rss_file_mb": round(peaks["RssFile"] / 1024, 1),
            "features_reused": sum(int(n) for n in reused),
            "stderr_tail": err[-600:] if proc.returncode else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="5000,20000,50000", help="comma-separated image counts")
    parser.add_argument("--image-size", type=int, default=32, help="model input size (the PNGs are 32x32)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", help="folder for the images, runs and caches (default: a temporary one)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    from featx_edge.bench import machine_info
    from featx_edge.config import parse_int_list
    from featx_edge.files.atomic import write_json

    counts = parse_int_list("counts", args.counts)
    work = Path(args.work or tempfile.mkdtemp(prefix="featx-feature-mem-"))
    env = dict(os.environ, FEATX_EDGE_HOME=str(work / "home"))
    rows = []
    for n in counts:
        data = make_folder(work / f"data-{n}", n)
        for warm in (False, True) if n == max(counts) else (False,):
            run = work / f"run-{n}-{'warm' if warm else 'cold'}"
            cmd = [sys.executable, "-m", "featx_edge", "train", "--data", str(data), "--out", str(run),
                   "--overwrite", "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size",
                   str(args.image_size), "--weights", "none", "--epochs", str(args.epochs),
                   "--feature-cache", str(work / f"cache-{n}")]
            row = {"images": n, "cache": "warm" if warm else "cold", **run_measured(cmd, env)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    cold = [r for r in rows if r["cache"] == "cold" and r["peak_rss_mb"]]
    slope = None
    if len(cold) >= 2:
        slope = (cold[-1]["peak_rss_mb"] - cold[0]["peak_rss_mb"]) * 1024 / (cold[-1]["images"] - cold[0]["images"])
    report = {"benchmark": "feature_memory", "command": "featx-edge train --backbone mobilenet_v2 --alpha 0.35 "
              f"--image-size {args.image_size} --weights none --epochs {args.epochs}", "rows": rows,
              "peak_rss_kb_per_image_cold": None if slope is None else round(slope, 2),
              "peak_rss_ratio_vs_first": [round(r["peak_rss_mb"] / cold[0]["peak_rss_mb"], 3) for r in cold],
              "load_average_at_end": os.getloadavg(), "machine": machine_info()}
    write_json(args.out, report)
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
