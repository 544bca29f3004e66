"""Peak memory of `featx-edge verify` as the test split grows: it must stay flat (streamed).

Copies a trained run several times with its test list repeated K times (the same files, so the
images exist; verify's memory does not depend on which images they are), runs
`featx-edge verify COPY --formats FORMATS` in a subprocess for each and records the child's peak
resident memory (`ru_maxrss` from `os.wait4`). Before verify streamed, every test image was
held as uint8 and float32 at once (about 4.5 bytes per pixel per image).

    python benchmarks/verify_memory.py runs/demo --repeats 1,4,16 --out bench-out/verify_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained and exported run directory")
    parser.add_argument("--repeats", default="1,4,16", help="comma-separated test-list multipliers")
    parser.add_argument("--formats", default="tflite-int8,onnx-float32")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    from featx_edge.bench import machine_info
    from featx_edge.config import parse_int_list
    from featx_edge.files.atomic import write_json

    rows = []
    with tempfile.TemporaryDirectory(prefix="featx-verify-mem-") as tmp:
        for k in parse_int_list("repeats", args.repeats):
            copy = Path(tmp) / f"x{k}"
            shutil.copytree(args.run, copy)
            splits = json.loads((copy / "splits.json").read_text())
            splits["test"] = splits["test"] * k
            (copy / "splits.json").write_text(json.dumps(splits))
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "featx_edge", "verify", str(copy), "--formats",
                                     args.formats, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            size = json.loads((copy / "manifest.json").read_text())["input"]["height"]
            rows.append({"repeat": k, "test_images": len(splits["test"]), "image_size": size,
                         "exit_code": os.waitstatus_to_exitcode(status),
                         "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["peak_rss_mb"]
    report = {"benchmark": "verify_memory", "run": str(args.run), "formats": args.formats, "rows": rows,
              "peak_rss_ratio_vs_first": [round(r["peak_rss_mb"] / base, 3) for r in rows],
              "machine": machine_info()}
    write_json(args.out, report)
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
