"""Stage times of `featx-edge run` on the README's sample config, optionally interleaved with a baseline.

Each round runs `featx-edge run --config examples/sample_digits.toml` in a fresh subprocess with a
fresh run folder and an empty feature cache (cold, like a first run), for this checkout and, with
`--baseline DIR`, for another checkout of featx-edge (e.g. `git worktree add ../base a9b3325`),
alternating the two so that a busy machine slows both alike. Writes JSON: per round and checkout,
the wall and CPU seconds of the whole command (CPU: the child's user + system time), the stage
times `featx-edge run` recorded in `manifest.json` (scan, model, embed, train, export and each
`export FORMAT`, verify, report; a checkout that predates them has none), the seconds each export
logged, and the machine (CPU model, cores; the load average as each run starts).

    python benchmarks/run_speed.py --out bench-out/run_speed.json --baseline /work/wt/speed-base --rounds 2
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

REPO = Path(__file__).resolve().parents[1]
CONFIG = "examples/sample_digits.toml"
WROTE = re.compile(r"wrote export/model\.(?P<fmt>[\w-]+)\.\w+ \([\d.]+ MB, (?P<seconds>[\d.]+) s\)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--baseline", help="another featx-edge checkout to time in alternation with this one")
    parser.add_argument("--rounds", type=int, default=1, help="runs per checkout (alternating)")
    parser.add_argument("--data", help="image folder for --data (default: the config's, the sample digits)")
    args = parser.parse_args(argv)
    checkouts = {"current": REPO} | ({"baseline": Path(args.baseline).resolve()} if args.baseline else {})
    rounds = []
    for index in range(args.rounds):
        for name, checkout in (checkouts.items() if index % 2 == 0 else reversed(checkouts.items())):
            row = time_run(checkout, data=args.data)
            rounds.append({"round": index, "checkout": name, "path": str(checkout), **row})
            print(f"round {index} {name}: {row['seconds']:.1f} s wall, {row['cpu_seconds']:.1f} s CPU, "
                  f"exit {row['exit']}", flush=True)
    result = {"config": CONFIG, "machine": machine(), "rounds": rounds,
              "median": {name: {key: statistics.median(r[key] for r in rounds if r["checkout"] == name)
                                for key in ("seconds", "cpu_seconds")} for name in checkouts}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["median"], indent=2))
    return 0


def time_run(checkout: Path, *, data: str | None) -> dict:
    """One cold `featx-edge run` of ``checkout`` in a subprocess: its times and what it recorded."""
    work = Path(tempfile.mkdtemp(prefix="featx-run-speed-"))
    command = [sys.executable, "-m", "featx_edge", "run", "--config", str(checkout / CONFIG), "--out",
               str(work / "run"), "--feature-cache", str(work / "features"), *(["--data", data] if data else [])]
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), list(os.getloadavg())
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
                              capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        manifest_path = work / "run" / "manifest.json"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"exit": proc.returncode, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "load_average_at_start": load,
            "stage_times": manifest.get("stage_times"),
            "export_logged_seconds": {m["fmt"]: float(m["seconds"]) for m in WROTE.finditer(proc.stdout)},
            "training": {key: (manifest.get("training") or {}).get(key) for key in ("embedding_seconds",)},
            "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}


def machine() -> dict:
    """The CPU (lscpu's model name), cores, and the load average: the cores may be shared."""
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
