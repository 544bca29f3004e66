"""Do the float formats in a second process make an export faster? (issue 24, "use the cores")

Takes a trained run (e.g. the README's main job) and times, in alternation, the six standard formats
exported by ``featx-edge export RUN --workers 1`` (all in one process) and ``--workers 2`` (the float
formats in a second process while the first makes the int8 formats, ``featx_edge.export.workers``),
each on a fresh copy of the run, so both convert the same model from the same files. Writes JSON:
wall and CPU seconds (the children's user + system, the worker included) per variant and round, the
seconds each export logged, the machine (CPU model, cores, load average at each start).

    python benchmarks/export_workers.py --run runs/demo --rounds 2 --out bench-out/export_workers.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_speed import machine

SIX = "tflite-float32,tflite-float16,tflite-dynamic,tflite-int8,onnx-float32,onnx-int8"
VARIANTS = {"one process": "1", "float formats in a worker": "2"}
WROTE = re.compile(r"wrote export/model\.(?P<fmt>[\w-]+)\.\w+ \([\d.]+ MB, (?P<seconds>[\d.]+) s\)")


def _export(run: Path, workers: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featx_edge", "export", str(run), "--formats", SIX,
                             "--workers", workers], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _copy(run: Path, work: Path, name: str) -> Path:
    target = work / name
    shutil.copytree(run, target)
    return target


def time_variant(run: Path, workers: str) -> dict:
    """One export of the six formats on a fresh copy of ``run``; wall and CPU seconds."""
    work = Path(tempfile.mkdtemp(prefix="featx-export-workers-"))
    try:
        copy = _copy(run, work, "run")
        before, load = resource.getrusage(resource.RUSAGE_CHILDREN), list(os.getloadavg())
        start = time.perf_counter()
        procs = [_export(copy, workers)]
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
    variants = VARIANTS
    rows = []
    for index in range(args.rounds):
        order = list(variants.items()) if index % 2 == 0 else list(reversed(variants.items()))
        for name, workers in order:
            row = {"round": index, "variant": name, "workers": workers, **time_variant(Path(args.run), workers)}
            rows.append(row)
            print(f"round {index} {name}: {row['seconds']:.1f} s wall, {row['cpu_seconds']:.1f} s CPU, "
                  f"exit {row['exit']}", flush=True)
    result = {"run": str(args.run), "machine": machine(),
              "rows": rows, "median": {name: {key: statistics.median(r[key] for r in rows if r["variant"] == name)
                                              for key in ("seconds", "cpu_seconds")} for name in variants}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["median"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
