"""Would independent exports run faster side by side in worker processes? (issue 24, "use the cores")

Takes a trained run (e.g. the README's main job) and times, in alternation:

- ``sequential``: one ``featx-edge export RUN --formats SIX`` (what ``featx-edge run`` does today);
- ``two processes``: the same six formats split over two ``featx-edge export`` processes started
  together on two copies of the run: the float formats (tflite-float32, -float16, -dynamic,
  onnx-float32) in one, the int8 formats (tflite-int8 with its per-run choice, onnx-int8) in the
  other. Each process pays its own TensorFlow import and reference rebuild, as a worker would.

Each variant runs on fresh copies of the run, so both convert the same model from the same files.
Writes JSON: wall and CPU seconds (children's user + system) per variant and round, the seconds each
export logged, the machine (CPU model, cores, load average at each start).

    python benchmarks/export_workers.py --run runs/demo --rounds 2 --out bench-out/export_workers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIX = "tflite-float32,tflite-float16,tflite-dynamic,tflite-int8,onnx-float32,onnx-int8"
GROUPS = ("tflite-float32,tflite-float16,tflite-dynamic,onnx-float32", "tflite-int8,onnx-int8")
WROTE = re.compile(r"wrote export/model\.(?P<fmt>[\w-]+)\.\w+ \([\d.]+ MB, (?P<seconds>[\d.]+) s\)")


def _export(run: Path, formats: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featx_edge", "export", str(run), "--formats", formats],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _copy(run: Path, work: Path, name: str) -> Path:
    target = work / name
    shutil.copytree(run, target)
    return target


def time_variant(run: Path, groups: tuple[str, ...]) -> dict:
    """Start one export process per group (together), wait for all; wall and CPU seconds."""
    work = Path(tempfile.mkdtemp(prefix="featx-export-workers-"))
    try:
        copies = [_copy(run, work, f"run{i}") for i in range(len(groups))]
        before, load = resource.getrusage(resource.RUSAGE_CHILDREN), list(os.getloadavg())
        start = time.perf_counter()
        procs = [_export(copy, formats) for copy, formats in zip(copies, groups, strict=True)]
        outputs = [proc.communicate()[0] for proc in procs]
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [out[-2000:] for proc, out in zip(procs, outputs, strict=True) if proc.returncode != 0]
    return {"seconds": round(seconds, 2),
            "cpu_seconds": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
            "load_average_at_start": load, "exit": [proc.returncode for proc in procs], "failed_output": failed,
            "export_logged_seconds": {m["fmt"]: float(m["seconds"]) for out in outputs for m in WROTE.finditer(out)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run (its export/ is not touched: copies are used)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    variants = {"sequential": (SIX,), "two processes": GROUPS}
    rows = []
    for index in range(args.rounds):
        order = list(variants.items()) if index % 2 == 0 else list(reversed(variants.items()))
        for name, groups in order:
            row = {"round": index, "variant": name, "groups": list(groups), **time_variant(Path(args.run), groups)}
            rows.append(row)
            print(f"round {index} {name}: {row['seconds']:.1f} s wall, {row['cpu_seconds']:.1f} s CPU, "
                  f"exit {row['exit']}", flush=True)
    result = {"run": str(args.run), "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
              "rows": rows, "median": {name: {key: statistics.median(r[key] for r in rows if r["variant"] == name)
                                              for key in ("seconds", "cpu_seconds")} for name in variants}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["median"], indent=2))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
