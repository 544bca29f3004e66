"""Guest side of ``featx-edge device-check``: runs inside the emulated target's Python.

One process per core: it loads each model once, computes the probabilities of every image set
it is given, and writes them to a results file; the host compares. Imports the device runtime
and nothing else (no TensorFlow, no training code), like a real device install, and starts no
subprocess (user-mode QEMU would need binfmt_misc for it).

    python3.11 -m featx_edge.device.guest --json request.json --out results.json

The request: ``{"threads": 1, "models": [{"path": ..., "format": ..., "images": {"test": [...],
"selftest": [...]}}]}``. The results: the guest's machine and engine versions, then per model
``{"path", "outputs": {"test": [[p, ...], ...], ...}}`` or ``{"path", "error"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

from featx_edge.errors import FeatxError
from featx_edge.runtime import load
from featx_edge.versions import installed_versions

PERTURB_ENV = "FEATX_EDGE_DEVICE_PERTURB"  # the test hook documented in featx_edge.device.emulator
_ENGINES = ("numpy", "pillow", "onnxruntime", "ai-edge-litert")


def serve(request: dict) -> dict:
    """Every model's probabilities on every image set of ``request``; a model that fails is reported, not fatal."""
    perturb = _perturbation(os.environ.get(PERTURB_ENV, ""))
    threads = request.get("threads")
    models = []
    for job in request["models"]:
        entry: dict = {"path": job["path"]}
        try:
            predictor = load(job["path"], threads=threads)
            outputs = {}
            for name, images in job["images"].items():
                probs = predictor.predict_proba(images).astype(np.float64)
                if job.get("format") in perturb:
                    probs[:, 0] += perturb[job["format"]]
                outputs[name] = probs.tolist()
            entry["outputs"] = outputs
        except FeatxError as err:
            entry["error"] = str(err)
        except Exception as err:  # noqa: BLE001 - an engine failure on this core is a result to report
            entry["error"] = f"{type(err).__name__}: {err}"
        models.append(entry)
    return {"machine": platform.machine(), "python": platform.python_version(), "versions": _versions(),
            "cpuinfo": _cpu_part(), "models": models}


def _perturbation(text: str) -> dict[str, float]:
    """``FORMAT=DELTA[,FORMAT=DELTA]`` from the test hook; empty when unset."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        fmt, _, delta = item.partition("=")
        result[fmt] = float(delta)
    return result


def _versions() -> dict[str, str]:
    found = installed_versions(_ENGINES)
    return {name: found.get(name, "missing") for name in _ENGINES}


def _cpu_part() -> str:
    """The CPU part the engines saw in /proc/cpuinfo (the emulator's prefix provides it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("CPU part"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m featx_edge.device.guest", description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="request file written by the host")
    parser.add_argument("--out", required=True, help="results file to write")
    args = parser.parse_args(argv)
    with open(args.json, encoding="utf-8") as fh:
        request = json.load(fh)
    results = serve(request)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(results, fh, allow_nan=False)  # the runtime refuses NaN/Inf outputs: none can be here
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
