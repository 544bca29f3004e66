"""The machine a bench runs on: CPU, memory and library versions, and the float32 matmul ceiling
(GMAC/s) each row's achieved GMAC/s is compared with.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featx_edge import __version__
from featx_edge.bench.worker import run_worker, worker_env
from featx_edge.versions import package_version

CEILING_SIZE = 1024
"""The side of the square float32 matmul the ceiling is measured on."""


def machine_info() -> dict:
    """CPU model, core counts, memory, interesting CPU flags, Python and library versions."""
    cpu_model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model in ("", platform.machine(), platform.processor()):
                cpu_model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    memory_gb = None
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    interesting = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                   "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_flags": [f for f in interesting if f in flags],
        "memory_gb": memory_gb,
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "featx-edge": __version__,
            "onnxruntime": package_version("onnxruntime") or package_version("onnxruntime-gpu"),
            "ai-edge-litert": package_version("ai-edge-litert"),
            "numpy": np.__version__,
            "tensorflow": package_version("tensorflow"),
            "tf-keras": package_version("tf-keras"),
            "onnx": package_version("onnx"),
        },
    }


def measure_ceiling(threads: Sequence[int], *, size: int = CEILING_SIZE, min_seconds: float = 0.5,
                    timeout: float = 120.0) -> dict:
    """GMAC/s of a float32 ``size x size`` numpy matmul per thread count, each in a fresh subprocess.

    The BLAS thread count is fixed through environment variables before numpy loads.

    Returns:
        ``{str(threads): {"gmacs": float | None, ...}}``.
    """
    out = {}
    for t in sorted(set(threads)):
        env = worker_env(threads=t, blas_threads=t)
        spec = {"threads": t, "size": size, "min_seconds": min_seconds}
        result = run_worker(["--ceiling", json.dumps(spec)], env=env, timeout=timeout)
        out[str(t)] = result if result.get("status") == "ok" else {"gmacs": None, **result}
    return out
