"""The float formats in a second process while this one makes the int8 formats (``[export] workers``).

The float formats (tflite-float32, -float16, -dynamic, onnx-float32) need only the reference model.
The int8 formats wait for the int8 source, and with the per-run choice (``export.int8_choice``)
that means judging candidates under LiteRT's reference kernels: the longest step of an export,
during which a converter in the same process would only queue behind it. A worker process
(spawned: a fresh interpreter, never a fork of one running TensorFlow) rebuilds the reference from
the run's own files, traces it once and converts the float formats meanwhile; this process writes
what it returns exactly as it writes what it converts itself (metadata, self-test file, manifest
entry), and converts a format itself if the worker died. The TFLite converter is deterministic, so
the files are byte for byte those of an export in one process (``tests/test_export_workers.py``).

A worker costs a second TensorFlow import and reference build (about 6 s on the main job), so
``"auto"`` uses one only where that pays: two or more usable CPU cores with at least one of them
idle as the export starts, a per-run int8 choice to overlap with, and a model of at least
``MIN_PARAMETERS`` (below that the float conversions take about as long as the worker's start). ``benchmarks/export_workers.py`` measures it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from featx_edge.formats.registry import get_format
from featx_edge.progress import native_output, record

log = logging.getLogger(__name__)

MIN_PARAMETERS = 1_000_000
"""Smallest reference (parameters) for which ``"auto"`` starts a worker (EfficientNet-Lite0 has 3.4 M;
the tests' 0.35-width MobileNetV2 at 32 px about 0.4 M, converted in a second or two a format)."""


def worker_formats(formats) -> list[str]:
    """The formats a worker can make: those converted from the reference alone, with no calibration."""
    from featx_edge.export.tflite import TFLiteQuantization

    def uncalibrated(spec) -> bool:
        return spec.converter == "onnx" or (spec.converter == "tflite"
                                            and not TFLiteQuantization.named(spec.quantization).calibrated)

    return [fmt for fmt in formats if uncalibrated(get_format(fmt))]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it, else the CPU count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_worker(setting, *, formats, parameters: int, int8_choice: bool) -> bool:
    """Whether ``[export] workers = setting`` starts a worker for this export (see the module text)."""
    floats = worker_formats(formats)
    if not floats or len(floats) == len(formats):
        return False  # nothing for the worker, or nothing left to overlap with it
    if setting != "auto":
        return setting == 2
    cores = usable_cores()
    # The idle-core reading (a quarter of a second) last: exports it cannot change do not wait for it.
    return cores >= 2 and int8_choice and parameters >= MIN_PARAMETERS and idle_cores(cores) >= 1


def idle_cores(cores: int) -> float:
    """Cores other work leaves idle right now: the machine's idle share over a quarter of a second
    (``/proc/stat``, Linux) times its CPUs; elsewhere ``cores`` less the 1-minute load average. (The load
    average lags: just after ``featx-edge run`` trained on both cores it still counts that work.) On
    cores other processes keep busy a worker's extra start only adds work: measured slower beside
    another job (``benchmarks/export_workers.py``)."""
    try:
        first = _cpu_ticks()
        time.sleep(0.25)
        second = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        try:
            return cores - os.getloadavg()[0]
        except (AttributeError, OSError):
            return float(cores)
    idle, total = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or cores) * idle / total if total > 0 else float(cores)


def _cpu_ticks() -> tuple[int, int]:
    """(idle, all) clock ticks of the machine's CPUs since boot, from the first line of ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[3] + ticks[4], sum(ticks)


class FloatWorker:
    """One spawned process converting ``formats`` of the run at ``run_path``, a future per format."""

    def __init__(self, run_path: Path, formats: list[str], *, metadata: dict[str, dict]) -> None:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self._futures: dict[str, Future] = {
            fmt: self._pool.submit(convert_in_worker, str(run_path), fmt, metadata[fmt]) for fmt in formats}
        log.info("  converting %s in a second process meanwhile", ", ".join(formats))

    def take(self, fmt: str) -> bytes | None:
        """What the worker made of ``fmt`` (its error is raised here), or None: convert it here instead."""
        future = self._futures.pop(fmt, None)
        if future is None:
            return None
        try:
            made, seconds, cpu_seconds = future.result()
        except BrokenProcessPool as err:  # the worker died (killed, out of memory): this process converts
            log.warning("  the export worker stopped (%s); converting %s here", err, fmt)
            return None
        record(f"export {fmt} (second process)", seconds=seconds, cpu_seconds=cpu_seconds)
        return made

    def close(self) -> None:
        """Stop the worker; formats not taken are dropped (an interrupted or failed export)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


_TRACED: dict = {}
"""The worker's trace of its reference (one run per worker)."""


def convert_in_worker(run_path: str, fmt: str, metadata: dict) -> tuple[bytes, float, float]:
    """In the worker: ``fmt`` of the run's reference (a TFLite flatbuffer or serialized ONNX), and the wall
    and CPU seconds it took there (the first format's include the worker's TensorFlow import and reference).

    ONNX comes with ``metadata`` (the exporting process's, so the file is the one it would write).
    """
    since = (time.perf_counter(), time.process_time())
    with native_output("the export worker"):  # TensorFlow's import and the converters print here too
        made = _convert(run_path, fmt, metadata)
    return made, time.perf_counter() - since[0], time.process_time() - since[1]


def _convert(run_path: str, fmt: str, metadata: dict) -> bytes:
    from featx_edge.export import onnx as onnx_export
    from featx_edge.export.tflite import TFLiteQuantization, convert, trace
    from featx_edge.training.run import Run

    spec = get_format(fmt)
    run = Run.open(run_path)
    model = run.reference().model  # built once per worker (``training.run`` keeps it)
    if spec.converter == "onnx":
        return onnx_export.convert(model, size=run.size, metadata=metadata).SerializeToString()
    if run_path not in _TRACED:
        _TRACED[run_path] = (model, trace(model, size=run.size))
    return convert(_TRACED[run_path][1], size=run.size, quantization=TFLiteQuantization.named(spec.quantization))
