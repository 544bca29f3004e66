"""Benchmark harness: accuracy and latency of every exported artifact on every runtime, side by side.

``bench_run(RUN)`` runs each artifact of a run directory through the device runtime
(``featx_edge.runtime.load``: the code a device runs) on every engine this machine has:

- ``litert-xnnpack``: the LiteRT interpreter with its default XNNPACK delegate;
- ``litert-builtin``: the LiteRT interpreter with built-in kernels only (no default delegates),
  the reference the delegate is measured against;
- ``onnxruntime-cpu`` / ``onnxruntime-cuda`` / ``onnxruntime-tensorrt``: onnxruntime with the CPU,
  CUDA and TensorRT execution providers (the GPU ones only when onnxruntime lists them);
- ``tensorflow``: the run's Keras reference model, rebuilt from its weights.

It sweeps thread counts and batch sizes. Each row (format x runtime x threads x batch) runs in a
fresh subprocess (``python -m featx_edge.bench --row JSON``), so cold start and peak resident
memory are those of a process that loaded only that model. Combinations that cannot run here (a
missing execution provider, TensorFlow not installed) are reported as ``unavailable`` with the
reason, never silently dropped.

Latency is per batch, in milliseconds: after ``warmup`` untimed calls, the batch is timed until
there are at least ``repeats`` samples *and* ``min_seconds`` have passed (capped at
``max_seconds``). Reports quote medians (p50) with p90/p99 and the spread (IQR, stdev).
Throughput is ``batch / p50``.

Multiply-accumulates (MACs) are counted once per model from the ONNX float32 graph when the run
has one (``Conv``: output elements x input channels per group x kernel area; ``Gemm``/``MatMul``:
output elements x the reduced dimension; shapes from ONNX shape inference, leading batch dimension
excluded), otherwise from a TFLite graph (``CONV_2D``, ``DEPTHWISE_CONV_2D``, ``FULLY_CONNECTED``,
``BATCH_MATMUL``). Other ops (adds, pooling, activations) are not counted. Each row reports the
achieved GMAC/s next to a ceiling measured on the same machine in the same run: a float32 numpy
matmul (square, 1024) with the BLAS limited to one thread and to the row's thread count.

Outputs: ``RUN/bench.json`` (machine-readable), ``RUN/bench.md`` (the table) and ``RUN/bench.png``
(test accuracy against p50 latency at batch 1 and the most threads, marker area by model size, the
Pareto front marked and labelled).

Example:
    >>> from featx_edge.bench import bench_run, format_table
    >>> report = bench_run("runs/demo", threads=(1, 4), batches=(1, 8))  # doctest: +SKIP
    >>> print(format_table(report))  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from featx_edge import __version__
from featx_edge.errors import ConfigError, FeatxError, RunDirError
from featx_edge.macs import _prod, count_macs_onnx
from featx_edge.rundir import VERIFY, WEIGHTS, artifact_problems, atomic_path, read_manifest, write_json

BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"
BENCH_PNG = "bench.png"
SCHEMA = "featx-edge-bench/1"

DEFAULT_THREADS: tuple[int, ...] = (1, os.cpu_count() or 1)
DEFAULT_BATCHES: tuple[int, ...] = (1, 8)

REFERENCE_FORMAT = "keras-reference"
"""The ``format`` of the TensorFlow rows: the run's Keras model (``RUN/model.weights.h5``)."""

LITERT_RUNTIMES = (("litert-xnnpack", True), ("litert-builtin", False))
ORT_RUNTIMES = (
    ("onnxruntime-cpu", "CPUExecutionProvider"),
    ("onnxruntime-cuda", "CUDAExecutionProvider"),
    ("onnxruntime-tensorrt", "TensorrtExecutionProvider"),
)
_GPU_NEEDS = {
    "CUDAExecutionProvider": "the CUDA provider needs onnxruntime-gpu and an NVIDIA GPU with CUDA and cuDNN",
    "TensorrtExecutionProvider": ("the TensorRT provider needs onnxruntime-gpu, the TensorRT libraries "
                                  "and an NVIDIA GPU"),
}
_RESULT_MARK = "FEATX_BENCH_RESULT "
_CEILING_SIZE = 1024
_POOL_IMAGES = 64  # distinct images cycled through while timing
_ACCURACY_BATCH = 32


# --------------------------------------------------------------------------------------------
# Statistics helpers (pure; unit-tested on hand-made numbers)
# --------------------------------------------------------------------------------------------

def latency_stats(samples_s: Sequence[float]) -> dict:
    """Summarise per-call times in seconds as milliseconds: percentiles, spread and count.

    Percentiles use linear interpolation between order statistics (numpy's default), so
    ``p50_ms <= p90_ms <= p99_ms`` always holds.

    Args:
        samples_s: wall-clock durations of individual calls, in seconds (at least one).

    Returns:
        ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``, ``stdev_ms`` (sample stdev, 0 for one
        sample), ``iqr_ms`` (p75 - p25), ``min_ms``, ``max_ms`` and ``iterations``.

    Raises:
        ConfigError: no samples.
    """
    ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
    if ms.size == 0:
        raise ConfigError("latency_stats needs at least one timing sample; time at least one call.")
    p25, p50, p75, p90, p99 = np.percentile(ms, [25, 50, 75, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "stdev_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "iqr_ms": float(p75 - p25),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "iterations": int(ms.size),
    }


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower latency and higher accuracy is better.

    A point is dominated when another point is at least as fast and at least as accurate, and
    strictly better in one of the two. Identical points do not dominate each other.

    Args:
        points: ``(latency, accuracy)`` pairs.

    Returns:
        Indices of the non-dominated points, ordered by latency (then by accuracy, descending).
    """
    front = []
    for i, (lat_i, acc_i) in enumerate(points):
        dominated = any(
            lat_j <= lat_i and acc_j >= acc_i and (lat_j < lat_i or acc_j > acc_i)
            for j, (lat_j, acc_j) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda k: (points[k][0], -points[k][1]))


def time_calls(fn: Callable[[np.ndarray], object], batches: Sequence[np.ndarray], *, warmup: int,
               repeats: int, min_seconds: float, max_seconds: float) -> tuple[list[float], float]:
    """Call ``fn`` on ``batches`` in turn: ``warmup`` untimed calls, then timed ones.

    Timing stops once there are at least ``repeats`` samples and ``min_seconds`` have passed, or
    when ``max_seconds`` have passed (whichever comes first; at least one sample is always taken).

    Returns:
        ``(samples in seconds, seconds spent timing)``.
    """
    import gc

    for i in range(warmup):
        fn(batches[i % len(batches)])
    samples: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        i = 0
        while True:
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            fn(batch)
            samples.append(time.perf_counter() - t0)
            i += 1
            elapsed = time.perf_counter() - start
            if (len(samples) >= repeats and elapsed >= min_seconds) or elapsed >= max_seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, elapsed


# --------------------------------------------------------------------------------------------
# Machine, MACs and the matmul ceiling
# --------------------------------------------------------------------------------------------

def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


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
            "onnxruntime": _package_version("onnxruntime") or _package_version("onnxruntime-gpu"),
            "ai-edge-litert": _package_version("ai-edge-litert"),
            "numpy": np.__version__,
            "tensorflow": _package_version("tensorflow"),
            "tf-keras": _package_version("tf-keras"),
            "onnx": _package_version("onnx"),
        },
    }


def count_macs_tflite(path: str | Path) -> dict:
    """Multiply-accumulates per image of a TFLite graph (convolutions and fully connected layers).

    Returns:
        ``macs_per_image``, ``ops`` (MACs per op name) and ``uncounted``.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from featx_edge.runtime.metadata import read_tflite

    flatbuffer, _ = read_tflite(Path(path))
    interpreter = Interpreter(model_content=flatbuffer,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {d["index"]: list(d["shape"]) for d in interpreter.get_tensor_details()}
    ops: dict[str, int] = {}
    uncounted = 0
    for op in interpreter._get_ops_details():
        name = op["op_name"]
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"):
            continue
        inputs = [int(i) for i in op["inputs"]]
        x, w = tensors.get(inputs[0]), tensors.get(inputs[1])
        y = tensors.get(int(op["outputs"][0]))
        if not x or not w or not y:
            uncounted += 1
            continue
        if name == "CONV_2D":  # weights [O, kH, kW, I]
            macs = _prod(y[1:]) * _prod(w[1:])
        elif name == "DEPTHWISE_CONV_2D":  # weights [1, kH, kW, C*multiplier]
            macs = _prod(y[1:]) * _prod(w[1:3])
        elif name == "FULLY_CONNECTED":  # weights [O, I]
            macs = _prod(y[1:]) * int(w[-1])
        else:
            macs = _prod(y[1:]) * int(x[-1])
        ops[name] = ops.get(name, 0) + macs
    return {"macs_per_image": int(sum(ops.values())), "ops": ops, "uncounted": uncounted}


def count_macs(run: Path, artifacts: dict) -> dict:
    """The model's MACs per image, counted once: ONNX float32 graph first, else a TFLite graph."""
    attempts = []
    candidates = [("onnx-float32", count_macs_onnx)]
    candidates += [(fmt, count_macs_tflite) for fmt in ("tflite-float32", "tflite-float16", "tflite-dynamic",
                                                        "tflite-int8")]
    for fmt, counter in candidates:
        if fmt not in artifacts:
            continue
        try:
            result = counter(run / artifacts[fmt]["path"])
        except Exception as err:  # noqa: BLE001 - a missing `onnx` package or an odd graph: try the next
            attempts.append(f"{fmt}: {type(err).__name__}: {err}")
            continue
        method = ("ONNX graph with shape inference: Conv, Gemm, MatMul" if fmt.startswith("onnx")
                  else "TFLite graph: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL")
        note = "element-wise ops, pooling and activations are not counted"
        if result["uncounted"]:
            note += f"; {result['uncounted']} node(s) had unknown shapes and were left out"
        return dict(result, source=fmt, method=method, note=note,
                    gmacs_per_image=result["macs_per_image"] / 1e9)
    return {"macs_per_image": None, "ops": {}, "source": None, "method": None,
            "note": "no artifact could be counted (" + ("; ".join(attempts) or "no onnx-float32 or tflite artifact")
                    + "); GMAC/s columns are empty"}


def measure_ceiling(threads: Sequence[int], *, size: int = _CEILING_SIZE, min_seconds: float = 0.5,
                    timeout: float = 120.0) -> dict:
    """GMAC/s of a float32 ``size x size`` numpy matmul per thread count, each in a fresh subprocess.

    The BLAS thread count is fixed through environment variables before numpy loads.

    Returns:
        ``{str(threads): {"gmacs": float | None, ...}}``.
    """
    out = {}
    for t in sorted(set(threads)):
        env = _worker_env(threads=t, blas_threads=t)
        spec = {"threads": t, "size": size, "min_seconds": min_seconds}
        result = _run_worker(["--ceiling", json.dumps(spec)], env=env, timeout=timeout)
        out[str(t)] = result if result.get("status") == "ok" else {"gmacs": None, **result}
    return out


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------

def _positive_ints(name: str, values) -> tuple[int, ...]:
    if isinstance(values, int):
        values = (values,)
    try:
        items = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError):
        items = ()
    if not items or any(v < 1 for v in items) or any(isinstance(v, bool) for v in values):
        raise ConfigError(f"`{name}` must be one or more positive integers, e.g. {name}=(1, 4); received {values!r}.")
    return items


def _check_artifacts(run: Path, manifest: dict, formats) -> list[str]:
    artifacts = manifest.get("artifacts") or {}
    if formats is None:
        from featx_edge.formats import ordered

        chosen = ordered(artifacts)
        if not chosen:
            raise RunDirError(f"`{run}` has no exported models; run `featx-edge export {run}` first.")
    else:
        chosen = [formats] if isinstance(formats, str) else list(dict.fromkeys(formats))
        missing = [f for f in chosen if f not in artifacts]
        if missing or not chosen:
            raise RunDirError(
                f"`{run}` has no exported {', '.join(missing) or 'formats'} (exported: "
                f"{', '.join(artifacts) or 'none'}); run `featx-edge export {run} --formats "
                f"{','.join(missing) or 'all'}` or bench only exported formats."
            )
    for fmt in chosen:
        problems = artifact_problems(run, manifest, fmt)
        if problems:
            raise RunDirError(f"{fmt}: {problems[0]}; re-run `featx-edge export {run} --formats {fmt}`.")
    return chosen


def _load_inputs(run: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray | None, dict]:
    size = int(manifest["input"]["height"])
    width = int(manifest["input"].get("width", size))
    try:
        from featx_edge.data import load_images
        from featx_edge.run import load_run_splits

        splits = load_run_splits(run, manifest)
        if not splits.test:
            raise RunDirError("the test split is empty")
        pixels = load_images(splits.root, splits.test, size=size)
        labels = splits.labels("test")
        return pixels, labels, {"source": "test split", "images": len(pixels), "note": None}
    except FeatxError as err:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (_POOL_IMAGES, size, width, 3), dtype=np.uint8)
        note = (f"the run's test images could not be loaded ({err}); timed on random uint8 pixels, "
                "so no accuracy was measured by the bench")
        return pixels, None, {"source": "random", "images": len(pixels), "note": note}


def _accuracy_lookup(run: Path, manifest: dict) -> tuple[dict, float | None, str | None, str | None]:
    """(format -> accuracy from verify.json, reference accuracy, its source, note)."""
    path = run / VERIFY
    per_format: dict = {}
    reference, source, note = None, None, None
    if path.is_file():
        try:
            verify = json.loads(path.read_text(encoding="utf-8"))
            artifacts = manifest.get("artifacts") or {}
            # An entry measured on another file than the one exported now is stale: not reused.
            per_format = {f: e.get("accuracy") for f, e in (verify.get("formats") or {}).items()
                          if e.get("sha256") and e.get("sha256") == (artifacts.get(f) or {}).get("sha256")}
            stale = sorted(f for f, e in (verify.get("formats") or {}).items()
                           if f in artifacts and f not in per_format)
            if stale:
                note = (f"{VERIFY} is stale for {', '.join(stale)} (the artifact changed since it was verified, "
                        f"or it predates sha256 records); re-run `featx-edge verify {run}`")
            reference = verify.get("reference_accuracy")
            source = VERIFY if reference is not None else None
        except (OSError, json.JSONDecodeError) as err:
            note = f"{path} is unreadable ({err}); re-run `featx-edge verify {run}`"
    else:
        note = (f"no {VERIFY}: accuracy columns come from this bench's own pass over the test split; "
                f"run `featx-edge verify {run}` for verified accuracy")
    if reference is None:
        reference = (manifest.get("training") or {}).get("test_accuracy")
        source = "manifest.json (training)" if reference is not None else None
    return per_format, reference, source, note


def _ort_providers() -> tuple[list[str] | None, str | None]:
    try:
        import onnxruntime as ort
    except ImportError as err:
        return None, f"onnxruntime is not importable ({err}); `pip install onnxruntime`"
    return list(ort.get_available_providers()), None


def _litert_problem() -> str | None:
    import importlib.util

    if importlib.util.find_spec("ai_edge_litert") is None:
        return "the LiteRT interpreter is not installed; `pip install ai-edge-litert`"
    return None


def _plan(run: Path, manifest: dict, formats: list[str], *, threads: tuple[int, ...], batches: tuple[int, ...],
          include_tf: bool) -> tuple[list[dict], list[dict], dict]:
    """Measurable row specs, unavailable entries, and the availability of each runtime."""
    import importlib.util

    providers, ort_problem = _ort_providers()
    litert_problem = _litert_problem()
    runtimes: dict[str, dict] = {}
    for name, xnnpack in LITERT_RUNTIMES:
        runtimes[name] = {"engine": "litert", "provider": "xnnpack" if xnnpack else "builtin",
                          "available": litert_problem is None, "reason": litert_problem}
    for name, provider in ORT_RUNTIMES:
        if ort_problem:
            reason = ort_problem
        elif provider not in providers:
            reason = f"onnxruntime reports providers [{', '.join(providers)}], not {provider}"
            if provider in _GPU_NEEDS:
                reason += f"; {_GPU_NEEDS[provider]}"
        else:
            reason = None
        runtimes[name] = {"engine": "onnxruntime", "provider": provider, "available": reason is None,
                          "reason": reason}
    if not include_tf:
        tf_reason = "not requested (include_tf=False, or --no-tensorflow on the command line)"
    elif importlib.util.find_spec("tensorflow") is None:
        tf_reason = "TensorFlow is not installed; `pip install 'featx-edge[train]'` for the reference rows"
    elif not (run / manifest.get("reference", {}).get("path", WEIGHTS)).is_file():
        tf_reason = f"the reference weights `{run / WEIGHTS}` are missing; re-run `featx-edge train`"
    else:
        tf_reason = None
    runtimes["tensorflow"] = {"engine": "tensorflow", "provider": None, "available": tf_reason is None,
                              "reason": tf_reason}

    artifacts = manifest["artifacts"]
    combos = []  # (format, runtime name, path, model bytes)
    for fmt in formats:
        path = run / artifacts[fmt]["path"]
        kind = "onnx" if path.suffix.lower() == ".onnx" else "tflite"
        names = [n for n, _ in (ORT_RUNTIMES if kind == "onnx" else LITERT_RUNTIMES)]
        combos += [(fmt, name, path, int(artifacts[fmt]["bytes"]), artifacts[fmt].get("sha256")) for name in names]
    weights = run / manifest.get("reference", {}).get("path", WEIGHTS)
    combos.append((REFERENCE_FORMAT, "tensorflow", weights, weights.stat().st_size if weights.is_file() else None,
                   manifest.get("reference", {}).get("sha256")))

    specs, unavailable = [], []
    for fmt, name, path, nbytes, sha256 in combos:
        info = runtimes[name]
        if not info["available"]:
            unavailable.append({"format": fmt, "runtime": name, "provider": info["provider"],
                                "engine": info["engine"], "status": "skipped" if name == "tensorflow" and
                                not include_tf else "unavailable", "reason": info["reason"],
                                "threads": None, "batch": None, "model_bytes": nbytes})
            continue
        gpu = info["provider"] in _GPU_NEEDS
        for t in ((max(threads),) if gpu else threads):
            for b in batches:
                specs.append({"format": fmt, "runtime": name, "engine": info["engine"], "provider": info["provider"],
                              "path": str(path), "run": str(run), "threads": t, "batch": b, "model_bytes": nbytes,
                              "sha256": sha256})
    return specs, unavailable, runtimes


def _worker_env(*, threads: int, blas_threads: int = 1) -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        env[var] = str(blas_threads)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_worker(args: list[str], *, env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "featx_edge.bench", *args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"the worker ran past {timeout:.0f} s and was stopped; "
                                             "raise row_timeout or lower repeats/max_seconds"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    return {"status": "error", "reason": f"the worker exited with code {proc.returncode} without a result: {tail}"}


def bench_run(run: str | Path, *, threads: Sequence[int] = DEFAULT_THREADS,
              batches: Sequence[int] = DEFAULT_BATCHES, formats: Sequence[str] | None = None,
              repeats: int = 30, warmup: int = 5, min_seconds: float = 1.0, max_seconds: float = 10.0,
              include_tf: bool = True, measure_accuracy: bool = True, row_timeout: float = 300.0,
              ceiling_seconds: float = 0.5, progress: bool = True) -> dict:
    """Benchmark every exported artifact of a run on every runtime here; write bench.json/.md/.png.

    Args:
        run: the run directory (``manifest.json`` with exported ``artifacts``).
        threads: inference thread counts to sweep (default: 1 and every core).
        batches: batch sizes to sweep (default: 1 and 8).
        formats: formats to bench (default: every exported artifact).
        repeats: minimum timed calls per row.
        warmup: untimed calls per row before timing.
        min_seconds: minimum seconds of timing per row (with ``repeats``, whichever is later).
        max_seconds: stop timing a row after this many seconds even below ``repeats``.
        include_tf: also bench the Keras reference on TensorFlow (reported as skipped if False).
        measure_accuracy: run the test split once per format x runtime through the row's runtime
            (``bench_accuracy``); ``accuracy`` itself comes from ``RUN/verify.json``.
        row_timeout: seconds before a row's subprocess is stopped and reported as an error.
        ceiling_seconds: seconds of the matmul ceiling measurement per thread count.
        progress: show a progress bar over the sweep and print the table at the end.

    Returns:
        The report written to ``RUN/bench.json``: ``machine``, ``macs``, ``ceiling``, ``runtimes``,
        ``inputs``, ``rows`` (one per format x runtime x threads x batch, plus one
        ``unavailable``/``skipped`` entry per combination that cannot run here) and ``notes``.

    Raises:
        RunDirError: ``run`` is not a run directory, lacks a requested artifact, or an artifact
            does not match the manifest.
        ConfigError: a sweep setting is out of range.

    Example:
        >>> report = bench_run("runs/demo", threads=(1,), batches=(1,), repeats=10)  # doctest: +SKIP
        >>> [r["p50_ms"] for r in report["rows"] if r["status"] == "ok"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    run = Path(run)
    manifest = read_manifest(run)
    threads = _positive_ints("threads", threads)
    batches = _positive_ints("batches", batches)
    if repeats < 1 or warmup < 0 or min_seconds < 0 or max_seconds <= 0:
        raise ConfigError(f"repeats must be >= 1, warmup >= 0, min_seconds >= 0 and max_seconds > 0; received "
                          f"repeats={repeats}, warmup={warmup}, min_seconds={min_seconds}, max_seconds={max_seconds}.")
    chosen = _check_artifacts(run, manifest, formats)
    notes: list[str] = []
    cpus = os.cpu_count() or 1
    if max(threads) > cpus:
        notes.append(f"threads {max(threads)} is more than the {cpus} CPUs here: those rows are oversubscribed")

    machine = machine_info()
    if machine["load_average"] and machine["load_average"][0] >= 0.5:
        notes.append(f"the machine was not idle when the bench started (1-minute load average "
                     f"{machine['load_average'][0]} on {cpus} CPUs): other processes compete for the cores, "
                     "rows with more threads suffer most; compare medians from the same report only")
    specs, unavailable, runtimes = _plan(run, manifest, chosen, threads=threads, batches=batches,
                                         include_tf=include_tf)
    macs = count_macs(run, manifest["artifacts"])
    per_format_acc, reference_acc, reference_source, acc_note = _accuracy_lookup(run, manifest)
    if acc_note:
        notes.append(acc_note)
    pixels, labels, inputs = _load_inputs(run, manifest)
    if inputs["note"]:
        notes.append(inputs["note"])

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs) + 1, desc="bench", unit="row", file=sys.stderr)
        bar.set_postfix_str("matmul ceiling")
    ceiling = measure_ceiling(sorted(set(threads) | {1, cpus}), min_seconds=ceiling_seconds)
    if bar:
        bar.update(1)
    single, most = (ceiling.get("1") or {}).get("gmacs"), (ceiling.get(str(max(ceiling, key=int))) or {}).get("gmacs")
    if single and most and most < single:
        notes.append(f"the {max(ceiling, key=int)}-thread matmul ceiling ({most:.1f} GMAC/s) is below the 1-thread one "
                     f"({single:.1f}): the cores were contended while benchmarking, so multi-thread rows understate "
                     "what this machine does when idle")

    rows: list[dict] = []
    accuracy_done: dict[tuple[str, str], float | None] = {}
    failed_combos: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="featx-bench-") as tmp:
        pool = pixels[:max(_POOL_IMAGES, max(batches))]
        pool_path = Path(tmp) / "pool.npy"
        np.save(pool_path, pool)
        eval_path = None
        if labels is not None and measure_accuracy:
            eval_path = Path(tmp) / "eval.npz"
            np.savez(eval_path, pixels=pixels, labels=labels)
        for spec in specs:
            combo = (spec["format"], spec["runtime"])
            if bar:
                bar.set_postfix_str(f"{spec['format']} {spec['runtime']} t{spec['threads']} b{spec['batch']}")
            if combo in failed_combos:  # the runtime could not start for this combination: no retry
                result = dict(failed_combos[combo])
            else:
                want_accuracy = eval_path is not None and combo not in accuracy_done
                job = {k: spec[k] for k in ("engine", "path", "run", "provider", "threads", "batch")}
                job.update(warmup=warmup, repeats=repeats, min_seconds=min_seconds, max_seconds=max_seconds,
                           pool=str(pool_path), eval=str(eval_path) if want_accuracy else None)
                result = _run_worker(["--row", json.dumps(job)], env=_worker_env(threads=spec["threads"]),
                                     timeout=row_timeout)
                if result.get("status") == "unavailable":
                    failed_combos[combo] = result
                if want_accuracy and result.get("status") == "ok":
                    accuracy_done[combo] = result.get("bench_accuracy")
            rows.append(_row(spec, result, macs=macs, ceiling=ceiling, per_format_acc=per_format_acc,
                             reference_acc=reference_acc, reference_source=reference_source))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    for row in rows:  # accuracy is measured once per format x runtime; share it across the sweep
        if row["status"] == "ok" and row.get("bench_accuracy") is None:
            row["bench_accuracy"] = accuracy_done.get((row["format"], row["runtime"]))
    rows += unavailable

    report = {
        "schema": SCHEMA,
        "run": str(run),
        "name": run.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbone": manifest.get("backbone"),
        "input": manifest.get("input"),
        "classes": len(manifest.get("labels", [])),
        "settings": {"threads": list(threads), "batches": list(batches), "formats": chosen, "repeats": repeats,
                     "warmup": warmup, "min_seconds": min_seconds, "max_seconds": max_seconds,
                     "include_tf": include_tf, "measure_accuracy": measure_accuracy},
        "machine": machine,
        "macs": macs,
        "ceiling": {"method": f"float32 numpy matmul {_CEILING_SIZE}x{_CEILING_SIZE}, median of repeated "
                              "calls, BLAS limited to the thread count", "by_threads": ceiling},
        "runtimes": runtimes,
        "inputs": inputs,
        "accuracy": {"reference": reference_acc, "reference_source": reference_source,
                     "source": VERIFY if per_format_acc else None},
        "rows": rows,
        "notes": notes,
    }
    try:
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(run / BENCH_JSON, report)
    try:
        write_plot(report, run / BENCH_PNG)
    except ImportError as err:
        report["notes"].append(f"bench.png not written: matplotlib is not installed ({err}); "
                               "`pip install matplotlib`")
        write_json(run / BENCH_JSON, report)
    with atomic_path(run / BENCH_MD) as tmp_md:
        tmp_md.write_text(format_table(report) + f"\n![accuracy vs latency]({BENCH_PNG})\n", encoding="utf-8")
    if progress:
        print(format_table(report), flush=True)
    return report


def _row(spec: dict, result: dict, *, macs: dict, ceiling: dict, per_format_acc: dict,
         reference_acc: float | None, reference_source: str | None) -> dict:
    row = {k: spec[k] for k in ("format", "runtime", "engine", "provider", "threads", "batch", "model_bytes")}
    row["sha256"] = spec.get("sha256")  # the artifact this row measured
    row["status"] = result.get("status", "error")
    row["reason"] = result.get("reason")
    if spec["format"] == REFERENCE_FORMAT:
        row["accuracy"], row["accuracy_source"] = reference_acc, reference_source
    else:
        acc = per_format_acc.get(spec["format"])
        row["accuracy"], row["accuracy_source"] = acc, (VERIFY if acc is not None else None)
    if row["status"] != "ok":
        return row
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "stdev_ms", "iqr_ms", "min_ms", "max_ms", "iterations",
                "timed_seconds", "cold_start_ms", "load_ms", "first_inference_ms", "import_ms",
                "peak_rss_mb", "baseline_rss_mb", "ru_maxrss_mb", "dynamic_batch", "input_dtype", "active_providers",
                "bench_accuracy", "accuracy_images"):
        row[key] = result.get(key)
    if result.get("provider"):
        row["provider"] = result["provider"]
    row["batch_mode"] = "dynamic" if result.get("dynamic_batch", True) else "fixed (1)"
    row["notes"] = list(result.get("notes") or [])
    if not result.get("dynamic_batch", True) and spec["batch"] > 1:
        row["notes"].append(f"fixed-batch model: a batch of {spec['batch']} runs as {spec['batch']} calls")
    row["model_rss_mb"] = round(row["peak_rss_mb"] - row["baseline_rss_mb"], 1)
    row["throughput_ips"] = spec["batch"] * 1000.0 / row["p50_ms"] if row["p50_ms"] > 0 else None
    mpi = macs.get("macs_per_image")
    row["gmacs"] = mpi * row["throughput_ips"] / 1e9 if mpi and row["throughput_ips"] else None
    ceil = (ceiling.get(str(spec["threads"])) or {}).get("gmacs")
    row["ceiling_gmacs"] = ceil
    row["ceiling_fraction"] = row["gmacs"] / ceil if row["gmacs"] and ceil else None
    return row


# --------------------------------------------------------------------------------------------
# Reports: the markdown table, the plot, two runs side by side
# --------------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".2f", empty: str = "—") -> str:
    if value is None:
        return empty
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


TABLE_HEADER = ("| format | runtime | threads | batch | p50 ms | p90 ms | p99 ms | IQR ms | img/s | GMAC/s "
                "| % ceiling | cold start ms | peak RSS MB | size MB | accuracy |")


def _accuracy_text(row: dict) -> str:
    if row.get("accuracy") is not None:
        return f"{row['accuracy']:.4f}"
    if row.get("bench_accuracy") is not None:
        return f"{row['bench_accuracy']:.4f}*"
    return "—"


def format_table(report: dict) -> str:
    """The bench report as markdown: a summary of the machine, MACs and ceiling, then one row per result.

    Args:
        report: a dict returned by ``bench_run`` (or loaded from ``RUN/bench.json``).

    Returns:
        Markdown text: the header lines, the table of measured rows (medians, with IQR as the
        spread), then the combinations that were not measured and why, then notes.
    """
    m = report.get("machine", {})
    macs = report.get("macs", {})
    ceiling = (report.get("ceiling") or {}).get("by_threads", {})
    backbone = report.get("backbone") or {}
    size = (report.get("input") or {}).get("height")
    lines = [f"# Benchmark: {report.get('name')}", ""]
    lines.append(f"- run: `{report.get('run')}`; backbone {backbone.get('name')} alpha {backbone.get('alpha')}, "
                 f"{size} px, {report.get('classes')} classes")
    lines.append(f"- machine: {m.get('cpu_model')}, {m.get('cpu_count')} CPUs, Python {m.get('python')}; "
                 + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v))
    if macs.get("macs_per_image"):
        lines.append(f"- MACs per image: {macs['macs_per_image'] / 1e6:.1f} M (from {macs.get('source')}: "
                     f"{macs.get('method')})")
    else:
        lines.append(f"- MACs per image: unknown ({macs.get('note')})")
    if ceiling:
        lines.append("- float32 matmul ceiling: " + ", ".join(
            f"{t} thread{'s' if t != '1' else ''} {_fmt(c.get('gmacs'), '.1f')} GMAC/s" for t, c in ceiling.items()))
    inputs = report.get("inputs") or {}
    settings = report.get("settings") or {}
    lines.append(f"- inputs: {inputs.get('source')} ({inputs.get('images')} images); latency per batch, "
                 f"median of >= {settings.get('repeats')} calls and >= {settings.get('min_seconds')} s "
                 f"after {settings.get('warmup')} warm-up calls; throughput = batch / p50")
    lines += ["", TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    measured = [r for r in report.get("rows", []) if r.get("status") == "ok"]
    for r in measured:
        batch = f"{r['batch']}" + ("" if r.get("dynamic_batch", True) else " (fixed 1)")
        share = None if r.get("ceiling_fraction") is None else 100 * r["ceiling_fraction"]
        mb = None if r.get("model_bytes") is None else r["model_bytes"] / 1e6
        lines.append(
            f"| {r['format']} | {r['runtime']} | {r['threads']} | {batch} | {_fmt(r['p50_ms'])} | "
            f"{_fmt(r['p90_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['iqr_ms'])} | {_fmt(r['throughput_ips'], '.1f')} | "
            f"{_fmt(r.get('gmacs'), '.2f')} | {_fmt(share, '.0f')} | "
            f"{_fmt(r['cold_start_ms'], '.0f')} | {_fmt(r['peak_rss_mb'], '.1f')} | {_fmt(mb)} | {_accuracy_text(r)} |")
    if any(r.get("accuracy") is None and r.get("bench_accuracy") is not None for r in measured):
        lines += ["", "\\* accuracy measured by this bench on the test split (no verify.json entry)."]
    others = [r for r in report.get("rows", []) if r.get("status") != "ok"]
    if others:
        lines += ["", "Not measured:", ""]
        for r in others:
            where = "" if r.get("threads") is None else f" (threads {r['threads']}, batch {r['batch']})"
            lines.append(f"- {r['format']} on {r['runtime']}{where}: {r['status']}: {r.get('reason')}")
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    lines.append("")
    return "\n".join(lines)


_COLORS = {"litert-xnnpack": "tab:blue", "litert-builtin": "tab:cyan", "onnxruntime-cpu": "tab:orange",
           "onnxruntime-cuda": "tab:red", "onnxruntime-tensorrt": "tab:purple", "tensorflow": "tab:green"}


def plot_points(report: dict) -> list[dict]:
    """The rows the plot shows: measured, smallest batch (1 by default), most threads; one per format x runtime."""
    rows = [r for r in report.get("rows", []) if r.get("status") == "ok"]
    if not rows:
        return []
    batch = min(r["batch"] for r in rows)
    points = []
    for r in rows:
        same = [x for x in rows if (x["format"], x["runtime"]) == (r["format"], r["runtime"]) and x["batch"] == batch]
        if r["batch"] == batch and r["threads"] == max(x["threads"] for x in same):
            acc = r.get("accuracy") if r.get("accuracy") is not None else r.get("bench_accuracy")
            points.append({"label": f"{r['format']} / {r['runtime']}", "runtime": r["runtime"],
                           "measured_by": "verify" if r.get("accuracy") is not None else "bench",
                           "latency_ms": r["p50_ms"], "accuracy": acc, "bytes": r.get("model_bytes") or 0,
                           "threads": r["threads"], "batch": batch})
    return points


def write_plot(report: dict, path: str | Path) -> Path:
    """Accuracy against p50 latency (one point per format x runtime), Pareto front marked; PNG.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = plot_points(report)
    fig = Figure(figsize=(10, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scored = [p for p in points if p["accuracy"] is not None]
    if scored:
        biggest = max(p["bytes"] for p in scored) or 1
        for runtime in dict.fromkeys(p["runtime"] for p in scored):
            group = [p for p in scored if p["runtime"] == runtime]
            ax.scatter([p["latency_ms"] for p in group], [p["accuracy"] for p in group],
                       s=[40 + 400 * p["bytes"] / biggest for p in group], alpha=0.6,
                       color=_COLORS.get(runtime, "tab:gray"), label=runtime, edgecolors="k", linewidths=0.5)
        front = [scored[i] for i in pareto_front([(p["latency_ms"], p["accuracy"]) for p in scored])]
        ax.step([p["latency_ms"] for p in front], [p["accuracy"] for p in front], where="post", color="k",
                linestyle="--", linewidth=1, label="Pareto front")
        ax.scatter([p["latency_ms"] for p in front], [p["accuracy"] for p in front], marker="x", color="k", s=30)
        for p in scored:
            on_front = any(p is q for q in front)
            ax.annotate(p["label"] + (" (Pareto)" if on_front else ""), (p["latency_ms"], p["accuracy"]),
                        textcoords="offset points", xytext=(6, 6 if on_front else -10),
                        fontsize=8 if on_front else 6.5, color="k" if on_front else "0.4",
                        fontweight="bold" if on_front else "normal")
        lat = [p["latency_ms"] for p in scored]
        if max(lat) / max(min(lat), 1e-9) > 5:
            ax.set_xscale("log")
        ax.set_ylabel("test accuracy" + ("" if all(p["measured_by"] == "verify" for p in scored)
                                         else " (verify.json, else measured by the bench)"))
        legend = ax.legend(fontsize=8, loc="best")
        for handle in getattr(legend, "legend_handles", getattr(legend, "legendHandles", [])):
            if hasattr(handle, "set_sizes"):
                handle.set_sizes([40])
        title_note = "marker area ~ model size"
    else:
        ax.barh([p["label"] for p in points], [p["latency_ms"] for p in points])
        title_note = "no accuracy available (no verify.json and no test images)"
    t = points[0]["threads"] if points else "-"
    b = points[0]["batch"] if points else "-"
    ax.set_xlabel(f"p50 latency per batch (ms), batch {b}, most threads ({t})")
    ax.set_title(f"{report.get('name')}: accuracy vs latency ({title_note})", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def load_report(run: str | Path) -> dict:
    """Read ``RUN/bench.json``.

    Raises:
        RunDirError: the run has no (readable) bench.json.
    """
    path = Path(run) / BENCH_JSON
    if not path.is_file():
        raise RunDirError(f"`{run}` has no {BENCH_JSON}; benchmark it first with `featx_edge.bench.bench_run(RUN)` "
                          f"or `python benchmarks/bench_formats.py --run {run} --out FILE.json`.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunDirError(f"`{path}` is not valid JSON ({err}); benchmark the run again.") from err


def compare_runs(run_a: str | Path, run_b: str | Path) -> str:
    """Two runs' benchmarks side by side (e.g. two backbones), as a markdown table.

    Rows are matched on format, runtime, threads and batch; a result only one run has is shown
    against a dash.

    Args:
        run_a: the first run directory (with ``bench.json``), column A.
        run_b: the second run directory, column B.

    Returns:
        Markdown: a legend naming both runs (path, backbone, input size, MACs), then per matched row
        A's and B's p50 latency, B/A, throughput, accuracy and model size.

    Raises:
        RunDirError: a run has no bench.json.
    """
    reports = [load_report(run_a), load_report(run_b)]

    def describe(run: Path, rep: dict) -> str:
        bb = rep.get("backbone") or {}
        mpi = (rep.get("macs") or {}).get("macs_per_image")
        return (f"`{run}` ({bb.get('name')} alpha {bb.get('alpha')}, {(rep.get('input') or {}).get('height')} px"
                + (f", {mpi / 1e6:.1f} M MACs/image" if mpi else "")
                + f"; benched {rep.get('created')} on {(rep.get('machine') or {}).get('cpu_model')})")

    def keyed(rep: dict) -> dict:
        return {(r["format"], r["runtime"], r["threads"], r["batch"]): r
                for r in rep.get("rows", []) if r.get("status") == "ok"}

    a, b = keyed(reports[0]), keyed(reports[1])
    keys = list(a) + [k for k in b if k not in a]
    path_a, path_b = Path(run_a), Path(run_b)
    name_a, name_b = path_a.name, path_b.name
    if name_a == name_b:  # same folder name in two places: name them by path
        name_a, name_b = str(path_a), str(path_b)
    lines = [f"# {name_a} (A) vs {name_b} (B)", "", f"- A = {describe(path_a, reports[0])}",
             f"- B = {describe(path_b, reports[1])}", ""]
    if reports[0].get("machine", {}).get("cpu_model") != reports[1].get("machine", {}).get("cpu_model"):
        lines += ["Warning: the two runs were benchmarked on different CPUs; latencies are not comparable.", ""]
    header = ("| format | runtime | threads | batch | A p50 ms | B p50 ms | B/A | A img/s | B img/s "
              "| A accuracy | B accuracy | A MB | B MB |")
    lines += [header, "|" + "---|" * header.count(" | ") + "---|"]
    for key in keys:
        ra, rb = a.get(key, {}), b.get(key, {})
        ratio = rb["p50_ms"] / ra["p50_ms"] if ra and rb and ra["p50_ms"] else None
        size_a = ra.get("model_bytes") / 1e6 if ra.get("model_bytes") else None
        size_b = rb.get("model_bytes") / 1e6 if rb.get("model_bytes") else None
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {_fmt(ra.get('p50_ms'))} | {_fmt(rb.get('p50_ms'))} | "
            f"{_fmt(ratio, '.2f')} | {_fmt(ra.get('throughput_ips'), '.1f')} | "
            f"{_fmt(rb.get('throughput_ips'), '.1f')} | "
            f"{_accuracy_text(ra) if ra else '—'} | {_accuracy_text(rb) if rb else '—'} | "
            f"{_fmt(size_a)} | {_fmt(size_b)} |")
    if any(r.get("accuracy") is None and r.get("bench_accuracy") is not None for r in [*a.values(), *b.values()]):
        lines += ["", "\\* accuracy measured by the bench on the test split (that run has no verify.json entry)."]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The subprocess workers (``python -m featx_edge.bench --row JSON`` / ``--ceiling JSON``)
# --------------------------------------------------------------------------------------------

def _ru_maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 1024.0 / 1024.0  # KiB on Linux, bytes on macOS


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, MB.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process's
    own address space. ``ru_maxrss`` is not used there because Linux carries it over ``execve``
    from the parent that spawned the worker, so a worker would report at least the parent's
    size. Elsewhere, ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _ru_maxrss_mb()


def _batches_from(pool: np.ndarray, batch: int) -> list[np.ndarray]:
    if len(pool) < batch:
        pool = np.resize(pool, (batch,) + pool.shape[1:])
    count = max(1, len(pool) // batch)
    return [np.ascontiguousarray(pool[i * batch:(i + 1) * batch]) for i in range(count)]


def _row_worker(job: dict) -> dict:
    """Load one model in this fresh process, warm it up, time it, report latency and peak memory."""
    t_import = time.perf_counter()
    engine = job["engine"]
    threads, batch = int(job["threads"]), int(job["batch"])
    notes: list[str] = []
    if engine == "tensorflow":
        from featx_edge._tf import import_tf

        try:
            tf, _ = import_tf()
        except FeatxError as err:
            return {"status": "unavailable", "reason": str(err)}
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from featx_edge.run import load_reference
    else:
        from featx_edge.runtime import load
        if engine == "onnxruntime":
            import onnxruntime  # noqa: F401 - imported before the clock starts, like litert below
        else:
            import ai_edge_litert.interpreter  # noqa: F401
    import_ms = (time.perf_counter() - t_import) * 1000.0
    batches = _batches_from(np.load(job["pool"]), batch)
    baseline = _peak_rss_mb()

    t0 = time.perf_counter()
    if engine == "tensorflow":
        model = load_reference(job["run"]).model
        infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

        def fn(x: np.ndarray) -> np.ndarray:
            return infer(tf.constant(x, dtype=tf.float32)).numpy()

        provider = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
        dynamic, input_dtype, active = True, "float32", None
    else:
        predictor = load(job["path"], threads=threads, provider=job.get("provider") or "CPUExecutionProvider",
                         xnnpack=job.get("provider") != "builtin")
        backend = predictor.backend

        def fn(x: np.ndarray) -> np.ndarray:
            return predictor.predict_pixels(x, batch_size=batch)

        provider, dynamic = backend.provider, bool(backend.dynamic_batch)
        input_dtype = backend.input_dtype
        active = list(backend.session.get_providers()) if engine == "onnxruntime" else None
    t1 = time.perf_counter()
    fn(batches[0])
    t2 = time.perf_counter()
    samples, timed = time_calls(fn, batches, warmup=int(job["warmup"]), repeats=int(job["repeats"]),
                                min_seconds=float(job["min_seconds"]), max_seconds=float(job["max_seconds"]))
    peak = _peak_rss_mb()
    if len(samples) < int(job["repeats"]):
        notes.append(f"only {len(samples)} timed calls in the {job['max_seconds']} s cap")
    result = {"status": "ok", "provider": provider, "dynamic_batch": dynamic, "input_dtype": input_dtype,
              "active_providers": active, "import_ms": import_ms, "load_ms": (t1 - t0) * 1000.0,
              "first_inference_ms": (t2 - t1) * 1000.0, "cold_start_ms": (t2 - t0) * 1000.0,
              "timed_seconds": timed, "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
              "ru_maxrss_mb": round(_ru_maxrss_mb(), 1),
              "notes": notes, **latency_stats(samples)}
    if job.get("eval"):  # after the memory reading: accuracy on the whole test split
        data = np.load(job["eval"])
        pixels, labels = data["pixels"], data["labels"]
        step = batch if not dynamic else max(batch, _ACCURACY_BATCH)
        probs = np.concatenate([fn(pixels[i:i + step]) for i in range(0, len(pixels), step)])
        result["bench_accuracy"] = float(np.mean(probs.argmax(1) == labels))
        result["accuracy_images"] = len(labels)
    return result


def _ceiling_worker(job: dict) -> dict:
    threads, size = int(job["threads"]), int(job["size"])
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=threads)
    except ImportError:  # the environment variables set by the parent already apply
        limiter = None
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    samples, _ = time_calls(lambda x: x @ b, [a], warmup=2, repeats=5, min_seconds=float(job["min_seconds"]),
                            max_seconds=max(5.0, 4 * float(job["min_seconds"])))
    stats = latency_stats(samples)
    if limiter is not None:
        limiter.restore_original_limits()
    return {"status": "ok", "threads": threads, "size": size, "gmacs": size ** 3 / (stats["p50_ms"] / 1000.0) / 1e9,
            "p50_ms": stats["p50_ms"], "iqr_ms": stats["iqr_ms"], "iterations": stats["iterations"]}


def _worker_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m featx_edge.bench",
                                     description="featx-edge bench subprocess worker (used by bench_run).")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--row", help="JSON row spec: time one model on one runtime")
    group.add_argument("--ceiling", help="JSON spec: time a float32 matmul")
    args = parser.parse_args(argv)
    try:
        result = _row_worker(json.loads(args.row)) if args.row else _ceiling_worker(json.loads(args.ceiling))
    except FeatxError as err:
        result = {"status": "error", "reason": str(err)}
    except Exception as err:  # noqa: BLE001 - reported to the parent as this row's error
        result = {"status": "error", "reason": f"{type(err).__name__}: {err}"}
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
