"""The subprocess side of the bench: ``python -m featx_edge.bench.worker --row JSON`` times one model
on one runtime, ``--ceiling JSON`` times a float32 matmul. Each prints one result line
(``RESULT_MARK`` + JSON) on stdout; ``run_worker`` starts a worker and reads that line back.

Only this fresh process loads the model, so its cold start and peak memory are the model's own.
The worker imports numpy and ``featx_edge.bench.stats``; the runtime it times, only once the clock runs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from featx_edge.bench.stats import latency_stats, time_calls
from featx_edge.errors import FeatxError

RESULT_MARK = "FEATX_BENCH_RESULT "
"""Prefix of the worker's result line on stdout (the protocol between bench_run and its workers)."""
_ACCURACY_BATCH = 32


def worker_env(*, threads: int, blas_threads: int = 1) -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding featx_edge/
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        env[var] = str(blas_threads)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_worker(args: list[str], *, env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "featx_edge.bench.worker", *args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"the worker ran past {timeout:.0f} s and was stopped; "
                                             "raise row_timeout or lower repeats/max_seconds"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    return {"status": "error", "reason": f"the worker exited with code {proc.returncode} without a result: {tail}"}


def _ru_maxrss_mb() -> float:
    """Peak resident memory by ``getrusage``, MB (on Linux inherited across ``execve``: see ``_peak_rss_mb``)."""
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
    try:
        tf = _import_engine(engine, threads=threads)
    except FeatxError as err:
        return {"status": "unavailable", "reason": str(err)}
    import_ms = (time.perf_counter() - t_import) * 1000.0
    batches = _batches_from(np.load(job["pool"]), batch)
    baseline = _peak_rss_mb()

    t0 = time.perf_counter()
    fn, loaded = _load_model(job, tf=tf, threads=threads, batch=batch)
    t1 = time.perf_counter()
    fn(batches[0])
    t2 = time.perf_counter()
    samples, timed = time_calls(fn, batches, warmup=int(job["warmup"]), repeats=int(job["repeats"]),
                                min_seconds=float(job["min_seconds"]), max_seconds=float(job["max_seconds"]))
    peak = _peak_rss_mb()
    if len(samples) < int(job["repeats"]):
        notes.append(f"only {len(samples)} timed calls in the {job['max_seconds']} s cap")
    result = {"status": "ok", **loaded, "import_ms": import_ms, "load_ms": (t1 - t0) * 1000.0,
              "first_inference_ms": (t2 - t1) * 1000.0, "cold_start_ms": (t2 - t0) * 1000.0,
              "timed_seconds": timed, "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
              "ru_maxrss_mb": round(_ru_maxrss_mb(), 1),
              "notes": notes, **latency_stats(samples)}
    if job.get("eval"):  # after the memory reading: accuracy on the whole test split, decoded batch by batch
        result.update(_bench_accuracy(Path(job["eval"]), fn, batch=batch, dynamic=loaded["dynamic_batch"]))
    return result


def _import_engine(engine: str, *, threads: int):
    """Import the row's engine before the clock starts; TensorFlow (set to ``threads``) or None.

    Raises:
        FeatxError: TensorFlow is wanted and cannot be imported here.
    """
    if engine == "tensorflow":
        from featx_edge._tf import import_tf

        tf, _ = import_tf()
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import featx_edge.training.run  # its import is not part of the load time
        return tf
    import featx_edge.runtime  # noqa: F401 - nor is this one's
    if engine == "onnxruntime":
        import onnxruntime  # noqa: F401 - imported before the clock starts, like litert below
    else:
        import ai_edge_litert.interpreter  # noqa: F401
    return None


def _load_model(job: dict, *, tf, threads: int, batch: int):
    """The row's model as ``fn(pixels) -> probabilities``, and what the report says of how it runs."""
    if job["engine"] == "tensorflow":
        from featx_edge.training.run import Run

        model = Run.open(job["run"]).reference().model
        infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

        def fn(x: np.ndarray) -> np.ndarray:
            return infer(tf.constant(x, dtype=tf.float32)).numpy()

        provider = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
        return fn, {"provider": provider, "dynamic_batch": True, "input_dtype": "float32", "active_providers": None}
    from featx_edge.runtime import load

    predictor = load(job["path"], threads=threads, provider=job.get("provider") or "CPUExecutionProvider",
                     xnnpack=job.get("provider") != "builtin")
    backend = predictor.backend

    def fn(x: np.ndarray) -> np.ndarray:
        return predictor.predict_pixels(x, batch_size=batch)

    active = list(backend.session.get_providers()) if job["engine"] == "onnxruntime" else None
    return fn, {"provider": backend.provider, "dynamic_batch": bool(backend.dynamic_batch),
                "input_dtype": backend.input_dtype, "active_providers": active}


def _bench_accuracy(eval_path: Path, fn, *, batch: int, dynamic: bool) -> dict:
    """``bench_accuracy`` and ``accuracy_images``: the test split run through ``fn``."""
    from featx_edge.data.folders import iter_batches

    data = json.loads(eval_path.read_text(encoding="utf-8"))
    labels = np.asarray(data["labels"])
    step = batch if not dynamic else max(batch, _ACCURACY_BATCH)
    probs = np.concatenate([fn(pixels) for pixels in iter_batches(Path(data["root"]), data["relpaths"],
                                                                  size=int(data["size"]), batch_size=step)])
    return {"bench_accuracy": float(np.mean(probs.argmax(1) == labels)), "accuracy_images": len(labels)}


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

    parser = argparse.ArgumentParser(prog="python -m featx_edge.bench.worker",
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
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
