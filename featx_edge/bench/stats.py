"""Latency statistics, the accuracy/latency Pareto front and the timing loop (pure numpy, no I/O)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from featx_edge.errors import ConfigError


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
