"""The sweep: ``bench_run`` times every artifact of a run on every runtime here and writes the reports."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featx_edge.bench.machine import CEILING_SIZE, machine_info, measure_ceiling
from featx_edge.bench.plan import (
    POOL_IMAGES,
    REFERENCE_FORMAT,
    accuracy_lookup,
    check_artifacts,
    load_inputs,
    plan_rows,
    positive_ints,
)
from featx_edge.bench.plot import write_plot
from featx_edge.bench.recommend import current_verify_entries, passed_entries, recommend, verify_status
from featx_edge.bench.report import BENCH_JSON, BENCH_MD, BENCH_PNG, SCHEMA, format_table, result_row
from featx_edge.bench.worker import run_worker, worker_env
from featx_edge.errors import ConfigError
from featx_edge.export.macs import count_macs
from featx_edge.files.atomic import atomic_path, write_json
from featx_edge.files.lock import locked
from featx_edge.progress import bar
from featx_edge.rundir.names import VERIFY
from featx_edge.runtime.predictor import check_threads
from featx_edge.training.run import Run

log = logging.getLogger(__name__)

DEFAULT_THREADS: tuple[int, ...] = (1, os.cpu_count() or 1)
DEFAULT_BATCHES: tuple[int, ...] = (1, 8)


def bench_run(run: str | Path, *, threads: Sequence[int] = DEFAULT_THREADS,
              batches: Sequence[int] = DEFAULT_BATCHES, formats: Sequence[str] | None = None,
              repeats: int = 30, warmup: int = 5, min_seconds: float = 1.0, max_seconds: float = 10.0,
              include_tf: bool = True, measure_accuracy: bool = True, row_timeout: float = 300.0,
              ceiling_seconds: float = 0.5) -> dict:
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

    Progress goes to the ``featx_edge.bench.harness`` logger at INFO (the table at the end, too)
    and to a bar over the rows (``featx_edge.progress``); both are silent unless enabled.

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
    with locked(run, command="bench"):
        return _bench(Run.open(run, recover=True), threads=threads, batches=batches, formats=formats, repeats=repeats,
                      warmup=warmup, min_seconds=min_seconds, max_seconds=max_seconds, include_tf=include_tf,
                      measure_accuracy=measure_accuracy, row_timeout=row_timeout, ceiling_seconds=ceiling_seconds)


@dataclasses.dataclass(frozen=True)
class _Sweep:
    """The checked settings of one bench: what each row's worker is asked to do."""

    threads: tuple[int, ...]
    batches: tuple[int, ...]
    repeats: int
    warmup: int
    min_seconds: float
    max_seconds: float
    include_tf: bool
    measure_accuracy: bool
    row_timeout: float

    def settings(self, formats: list[str]) -> dict:
        """The report's ``settings`` entry."""
        return {"threads": list(self.threads), "batches": list(self.batches), "formats": formats,
                "repeats": self.repeats, "warmup": self.warmup, "min_seconds": self.min_seconds,
                "max_seconds": self.max_seconds, "include_tf": self.include_tf,
                "measure_accuracy": self.measure_accuracy}


def _bench(opened: Run, *, threads: Sequence[int], batches: Sequence[int], formats: Sequence[str] | None,
           repeats: int, warmup: int, min_seconds: float, max_seconds: float, include_tf: bool,
           measure_accuracy: bool, row_timeout: float, ceiling_seconds: float) -> dict:
    """The bench as steps: check the settings, plan the rows, time them, judge them, write the reports."""
    started = time.perf_counter()
    run, manifest = opened.path, opened.manifest
    sweep = _check_sweep(threads=threads, batches=batches, repeats=repeats, warmup=warmup,
                         min_seconds=min_seconds, max_seconds=max_seconds, include_tf=include_tf,
                         measure_accuracy=measure_accuracy, row_timeout=row_timeout)
    chosen = check_artifacts(run, manifest, formats)
    machine = machine_info()
    notes = _machine_notes(sweep.threads, machine)
    specs, unavailable, runtimes = plan_rows(run, manifest, chosen, threads=sweep.threads, batches=sweep.batches,
                                             include_tf=include_tf)
    macs = count_macs(run, manifest["artifacts"])
    per_format_acc, reference_acc, reference_source, acc_note = accuracy_lookup(run, manifest)
    if acc_note:
        notes.append(acc_note)
    pool, eval_job, inputs = load_inputs(opened, count=max(POOL_IMAGES, max(sweep.batches)))
    if inputs["note"]:
        notes.append(inputs["note"])

    log.info("bench %s: %d rows to time (%s; threads %s, batches %s), %d combinations not measurable here",
             run, len(specs), ", ".join(chosen), list(sweep.threads), list(sweep.batches), len(unavailable))
    # The ceiling is measured between the rows (every CEILING_EVERY rows per thread count), and
    # each row is compared with the measurement nearest to it in time: a machine that gets busy
    # or idle during the sweep moves both together.
    ceilings = _Ceilings(sorted(set(sweep.threads)), min_seconds=ceiling_seconds)
    results, accuracy_done = _time_rows(specs, sweep, pool=pool, eval_job=eval_job if measure_accuracy else None,
                                        ceilings=ceilings)
    rows = [result_row(spec, result, macs=macs, ceiling=ceiling, per_format_acc=per_format_acc,
                       reference_acc=reference_acc, reference_source=reference_source)
            for spec, result, ceiling in results]
    for row in rows:  # accuracy is measured once per format x runtime; share it across the sweep
        if row["status"] == "ok" and row.get("bench_accuracy") is None:
            row["bench_accuracy"] = accuracy_done.get((row["format"], row["runtime"]))
    ceiling = ceilings.summary()
    notes += _contention_notes(ceiling, rows)
    recommendation = _judge_rows(opened, rows, chosen)
    rows += unavailable

    report = {
        **_report_head(run, manifest),
        "settings": sweep.settings(chosen),
        "machine": machine,
        "macs": macs,
        "ceiling": {"method": CEILING_METHOD, "by_threads": ceiling},
        "runtimes": runtimes,
        "inputs": inputs,
        "accuracy": {"reference": reference_acc, "reference_source": reference_source,
                     "source": VERIFY if per_format_acc else None,
                     "images": ((manifest.get("data") or {}).get("counts") or {}).get("test")},
        "rows": rows,
        "recommendation": recommendation,
        "notes": notes,
    }
    _write_reports(run, report, started=started)
    return report


def _report_head(run: Path, manifest: dict) -> dict:
    """The report's first entries: what was benched, and when."""
    return {
        "schema": SCHEMA,
        "run": str(run),
        "name": run.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbone": manifest.get("backbone"),
        "input": manifest.get("input"),
        "classes": len(manifest.get("labels", [])),
    }


def _check_sweep(*, threads: Sequence[int], batches: Sequence[int], repeats: int, warmup: int, min_seconds: float,
                 max_seconds: float, include_tf: bool, measure_accuracy: bool, row_timeout: float) -> _Sweep:
    """The sweep settings, checked before any work (ConfigError naming the bad one)."""
    threads = positive_ints("threads", threads)
    for count in threads:
        check_threads(count)
    batches = positive_ints("batches", batches)
    if repeats < 1 or warmup < 0 or min_seconds < 0 or max_seconds <= 0:
        raise ConfigError(f"repeats must be >= 1, warmup >= 0, min_seconds >= 0 and max_seconds > 0; received "
                          f"repeats={repeats}, warmup={warmup}, min_seconds={min_seconds}, max_seconds={max_seconds}.")
    return _Sweep(threads=tuple(threads), batches=tuple(batches), repeats=repeats, warmup=warmup,
                  min_seconds=min_seconds, max_seconds=max_seconds, include_tf=include_tf,
                  measure_accuracy=measure_accuracy, row_timeout=row_timeout)


def _machine_notes(threads: Sequence[int], machine: dict) -> list[str]:
    """Notes on what makes this machine's numbers less than clean: oversubscription, a busy start."""
    notes: list[str] = []
    cpus = os.cpu_count() or 1
    if max(threads) > cpus:
        notes.append(f"threads {max(threads)} is more than the {cpus} CPUs here: those rows are oversubscribed")
    if machine["load_average"] and machine["load_average"][0] >= 0.5:
        notes.append(f"the machine was not idle when the bench started (1-minute load average "
                     f"{machine['load_average'][0]} on {cpus} CPUs): other processes compete for the cores, "
                     "rows with more threads suffer most; compare medians from the same report only")
    return notes


def _time_rows(specs: list[dict], sweep: _Sweep, *, pool: np.ndarray, eval_job: dict | None,
               ceilings: _Ceilings) -> tuple[list[tuple[dict, dict, dict]], dict[tuple[str, str], float | None]]:
    """Time every planned row in its own worker subprocess.

    Returns ``(spec, result, ceiling)`` per row, and ``bench_accuracy`` per format x runtime: the
    test split (``eval_job``) is run once per combination, by the first of its rows that runs.
    """
    results: list[tuple[dict, dict, dict]] = []
    accuracy_done: dict[tuple[str, str], float | None] = {}
    failed_combos: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="featx-bench-") as tmp:
        pool_path = Path(tmp) / "pool.npy"
        np.save(pool_path, pool)
        eval_path = None
        if eval_job is not None:
            eval_path = Path(tmp) / "eval.json"
            eval_path.write_text(json.dumps(eval_job), encoding="utf-8")
        rows_bar = bar(specs, total=len(specs), desc="bench", unit="row")
        for spec in rows_bar:
            combo = (spec["format"], spec["runtime"])
            label = f"{spec['format']} {spec['runtime']} t{spec['threads']} b{spec['batch']}"
            log.debug("timing %s", label)
            if hasattr(rows_bar, "set_postfix_str"):  # a tqdm bar: name the row being timed
                rows_bar.set_postfix_str(label)
            if combo in failed_combos:  # the runtime could not start for this combination: no retry
                result = dict(failed_combos[combo])
            else:
                want_accuracy = eval_path is not None and combo not in accuracy_done
                result = _time_row(spec, sweep, pool_path=pool_path, eval_path=eval_path if want_accuracy else None)
                if result.get("status") == "unavailable":
                    failed_combos[combo] = result
                if want_accuracy and result.get("status") == "ok":
                    accuracy_done[combo] = result.get("bench_accuracy")
            ceiling = ceilings.near(spec["threads"]) if result.get("status") == "ok" else {}
            results.append((spec, result, ceiling))
    return results, accuracy_done


def _time_row(spec: dict, sweep: _Sweep, *, pool_path: Path, eval_path: Path | None) -> dict:
    """One row's worker result (its subprocess sees only ``spec["threads"]`` threads)."""
    job = {k: spec[k] for k in ("engine", "path", "run", "provider", "threads", "batch")}
    job.update(warmup=sweep.warmup, repeats=sweep.repeats, min_seconds=sweep.min_seconds,
               max_seconds=sweep.max_seconds, pool=str(pool_path), eval=str(eval_path) if eval_path else None)
    return run_worker(["--row", json.dumps(job)], env=worker_env(threads=spec["threads"]), timeout=sweep.row_timeout)


def _contention_notes(ceiling: dict, rows: list[dict]) -> list[str]:
    """A note when the multi-thread ceiling fell below the 1-thread one, and its rows' shares withdrawn."""
    single, most = (ceiling.get("1") or {}).get("gmacs"), (ceiling.get(str(max(ceiling, key=int))) or {}).get("gmacs")
    if not (single and most and most < single):
        return []
    for row in rows:
        if row.get("status") == "ok" and row["threads"] > 1 and row.get("ceiling_fraction") is not None:
            row["ceiling_fraction_measured"], row["ceiling_fraction"] = row["ceiling_fraction"], None
    return [(f"the {max(ceiling, key=int)}-thread matmul ceiling ({most:.1f} GMAC/s, median) is below the "
             f"1-thread one ({single:.1f}): the cores were contended while benchmarking; multi-thread rows "
             "understate what this machine does when idle, and their ceiling shares are unreliable")]


def _judge_rows(opened: Run, rows: list[dict], chosen: list[str]) -> dict:
    """Mark each row with its export's verify status, and recommend what to ship from the verified ones."""
    entries = current_verify_entries(opened.path, opened.manifest)
    status = verify_status(entries)
    for row in rows:  # the exports a user may ship are those that passed verify
        row["verify"] = "reference" if row["format"] == REFERENCE_FORMAT else status.get(row["format"])
    return recommend(rows, verified=passed_entries(entries), quantization=_recipes(opened, chosen))


def _write_reports(run: Path, report: dict, *, started: float) -> None:
    """Write bench.json, bench.png (where matplotlib is installed) and bench.md; log the table."""
    try:
        report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
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
    table = format_table(report)
    with atomic_path(run / BENCH_MD) as tmp_md:
        tmp_md.write_text(table + f"\n![accuracy vs latency]({BENCH_PNG})\n", encoding="utf-8")
    log.info(table)
    log.info("wrote %s, %s and %s", run / BENCH_JSON, run / BENCH_MD, run / BENCH_PNG)


def _recipes(opened: Run, formats: list[str]) -> dict[str, dict]:
    """Each exported format's quantization recipe, from its own metadata (empty for float formats)."""
    from featx_edge.errors import FeatxError
    from featx_edge.runtime import load

    recipes = {}
    for fmt in formats:
        if fmt not in opened.manifest["artifacts"]:
            continue
        try:
            recipes[fmt] = load(opened.artifact_path(fmt)).metadata.get("quantization") or {}
        except FeatxError:
            recipes[fmt] = {}
    return recipes


CEILING_EVERY = 4
"""Rows timed per thread count between two measurements of the matmul ceiling."""

CEILING_METHOD = (f"float32 numpy matmul {CEILING_SIZE}x{CEILING_SIZE}, median of repeated calls, BLAS limited to "
                  f"the thread count; measured between the rows (every {CEILING_EVERY} rows per thread count), "
                  "each row against the nearest measurement")
"""How the ceiling in bench.json was measured (its ``ceiling.method``)."""


class _Ceilings:
    """The float32 matmul ceiling per thread count, re-measured as the sweep goes."""

    def __init__(self, threads: list[int], *, min_seconds: float) -> None:
        self._min_seconds = min_seconds
        self._samples: dict[str, list[dict]] = {str(t): [] for t in threads}
        self._since: dict[str, int] = {}

    def near(self, threads: int) -> dict:
        """``{str(threads): measurement}`` for a row about to be reported (measuring when due)."""
        key = str(threads)
        if key not in self._since or self._since[key] >= CEILING_EVERY:
            log.debug("measuring the %s-thread matmul ceiling", key)
            self._samples.setdefault(key, []).append(measure_ceiling([threads], min_seconds=self._min_seconds)[key])
            self._since[key] = 0
        self._since[key] += 1
        return {key: self._samples[key][-1]}

    def summary(self) -> dict:
        """Per thread count: the median GMAC/s, its range and every measurement."""
        out = {}
        for key, samples in self._samples.items():
            values = [s["gmacs"] for s in samples if s.get("gmacs")]
            out[key] = {"gmacs": float(np.median(values)) if values else None,
                        "min_gmacs": min(values) if values else None, "max_gmacs": max(values) if values else None,
                        "measurements": len(samples), "samples": samples}
        return out
