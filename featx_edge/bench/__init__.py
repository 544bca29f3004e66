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
fresh subprocess (``python -m featx_edge.bench.worker --row JSON``), so cold start and peak resident
memory are those of a process that loaded only that model. Combinations that cannot run here (a
missing execution provider, TensorFlow not installed) are reported as ``unavailable`` with the
reason, never silently dropped.

Latency is per batch, in milliseconds: after ``warmup`` untimed calls, the batch is timed until
there are at least ``repeats`` samples *and* ``min_seconds`` have passed (capped at
``max_seconds``). Reports quote medians (p50) with p90/p99 and the spread (IQR, stdev).
Throughput is ``batch / p50``.

Multiply-accumulates (MACs) are counted once per model (``featx_edge.export.macs.count_macs``) from the
ONNX float32 graph when the run has one (``Conv``: output elements x input channels per group x
kernel area; ``Gemm``/``MatMul``: output elements x the reduced dimension; shapes from ONNX shape
inference, leading batch dimension excluded), otherwise from a TFLite graph (``CONV_2D``,
``DEPTHWISE_CONV_2D``, ``FULLY_CONNECTED``, ``BATCH_MATMUL``). Other ops (adds, pooling,
activations) are not counted. Each row reports the achieved GMAC/s next to a ceiling measured on
the same machine in the same run: a float32 numpy matmul (square, 1024) with the BLAS limited to
one thread and to the row's thread count.

Outputs: ``RUN/bench.json`` (machine-readable), ``RUN/bench.md`` (the table) and ``RUN/bench.png``
(test accuracy against p50 latency at batch 1 and the most threads, marker area by model size, the
Pareto front marked and labelled).

Modules, one concern each:

- ``harness``: ``bench_run``, the sweep (``DEFAULT_THREADS``, ``DEFAULT_BATCHES``);
- ``plan``: which artifacts and runtimes, the row specs, the test images, recorded accuracy
  (``REFERENCE_FORMAT``);
- ``worker``: the subprocess that times one row (latency, cold start, peak resident memory) or
  the matmul ceiling, and how it is started;
- ``machine``: ``machine_info``, ``measure_ceiling``;
- ``stats``: ``latency_stats``, ``pareto_front``, ``time_calls`` (pure numpy);
- ``report``: the rows, ``format_table``, ``load_report``, ``compare_runs`` (``BENCH_JSON``,
  ``BENCH_MD``, ``BENCH_PNG``, ``SCHEMA``);
- ``plot``: ``plot_points``, ``write_plot``.

The names above are importable from ``featx_edge.bench`` itself; each loads its module on first
use, so importing the package (as every worker process does) loads nothing else.

May import: verify (the verify record), export (MAC counting), training (``Run``), fidelity, data,
rundir, files, formats, runtime and the leaves. Never report, device or cli.

Example:
    >>> from featx_edge.bench import bench_run, format_table
    >>> report = bench_run("runs/demo", threads=(1, 4), batches=(1, 8))  # doctest: +SKIP
    >>> print(format_table(report))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "featx_edge.bench.harness": ("bench_run", "DEFAULT_THREADS", "DEFAULT_BATCHES"),
    "featx_edge.bench.plan": ("REFERENCE_FORMAT",),
    "featx_edge.bench.machine": ("machine_info", "measure_ceiling"),
    "featx_edge.bench.stats": ("latency_stats", "pareto_front", "time_calls"),
    "featx_edge.bench.report": ("format_table", "load_report", "compare_runs", "BENCH_JSON", "BENCH_MD",
                                "BENCH_PNG", "SCHEMA"),
    "featx_edge.bench.plot": ("plot_points", "write_plot"),
    "featx_edge.export.macs": ("count_macs",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "BENCH_JSON", "BENCH_MD", "BENCH_PNG", "DEFAULT_BATCHES", "DEFAULT_THREADS", "REFERENCE_FORMAT", "SCHEMA",
    "bench_run", "compare_runs", "count_macs", "format_table", "latency_stats", "load_report", "machine_info",
    "measure_ceiling", "pareto_front", "plot_points", "time_calls", "write_plot",
]

if TYPE_CHECKING:
    from featx_edge.bench.harness import DEFAULT_BATCHES, DEFAULT_THREADS, bench_run
    from featx_edge.bench.machine import machine_info, measure_ceiling
    from featx_edge.bench.plan import REFERENCE_FORMAT
    from featx_edge.bench.plot import plot_points, write_plot
    from featx_edge.bench.report import (
        BENCH_JSON,
        BENCH_MD,
        BENCH_PNG,
        SCHEMA,
        compare_runs,
        format_table,
        load_report,
    )
    from featx_edge.bench.stats import latency_stats, pareto_front, time_calls
    from featx_edge.export.macs import count_macs


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
