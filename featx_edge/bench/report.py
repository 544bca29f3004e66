"""Bench reports: one measured row from a worker's result, the markdown table, ``bench.json`` read
back, and two runs' reports side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

from featx_edge.bench.plan import REFERENCE_FORMAT
from featx_edge.bench.recommend import format_recommendation
from featx_edge.errors import RunDirError
from featx_edge.rundir.names import BENCH_JSON, BENCH_MD, BENCH_PNG, VERIFY

__all__ = ["BENCH_JSON", "BENCH_MD", "BENCH_PNG", "SCHEMA", "compare_runs", "format_table", "load_report", "result_row"]
SCHEMA = "featx-edge-bench/1"


def result_row(spec: dict, result: dict, *, macs: dict, ceiling: dict, per_format_acc: dict,
               reference_acc: float | None, reference_source: str | None) -> dict:
    """The report row of one row spec and its worker's result: latency, memory, GMAC/s, accuracy."""
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
    if row["ceiling_fraction"] is not None and row["ceiling_fraction"] > 1.0:
        # Above a float32 matmul rate: int8 kernels can be (VNNI), and a ceiling measured while
        # the cores were busy is too low. Either way the percentage is not a fact about this row.
        row["ceiling_fraction_measured"] = row["ceiling_fraction"]
        row["ceiling_fraction"] = None
        row["notes"].append(f"{100 * row['ceiling_fraction_measured']:.0f}% of the float32 matmul ceiling: "
                            "unreliable (int8 kernels exceed a float32 ceiling, or the ceiling was measured "
                            "on busy cores); not reported as a share")
    return row


def _fmt(value, spec: str = ".2f", empty: str = "—") -> str:
    if value is None:
        return empty
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


TABLE_HEADER = ("| format | runtime | threads | batch | p50 ms | p90 ms | p99 ms | IQR ms | img/s | GMAC/s "
                "| % ceiling | cold start ms | peak RSS MB | size MB | accuracy | verify |")


def _accuracy_text(row: dict) -> str:
    if row.get("accuracy") is not None:
        return f"{row['accuracy']:.4f}"
    if row.get("bench_accuracy") is not None:
        return f"{row['bench_accuracy']:.4f}*"
    return "—"


def not_measured(rows: list[dict]) -> list[str]:
    """One line per runtime and reason (the formats and settings it hit listed once), not one per row."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("runtime"), r.get("status"), r.get("reason")), []).append(r)
    lines = []
    for (runtime, status, reason), group in groups.items():
        formats = ", ".join(dict.fromkeys(str(r.get("format")) for r in group))
        settings = sorted({(r["threads"], r.get("batch")) for r in group if isinstance(r.get("threads"), int)})
        where = " (" + "; ".join(f"threads {t}, batch {b}" for t, b in settings) + ")" if settings else ""
        lines.append(f"{formats} on {runtime}{where}: {status}: {reason}")
    return lines


def format_table(report: dict) -> str:
    """The bench report as markdown: a summary of the machine, MACs and ceiling, then one row per result.

    Args:
        report: a dict returned by ``bench_run`` (or loaded from ``RUN/bench.json``).

    Returns:
        Markdown text: the header lines, the table of measured rows (medians, with IQR as the
        spread), then the combinations that were not measured and why, then notes.
    """
    lines = _summary_lines(report)
    lines += ["", TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    measured = [r for r in report.get("rows", []) if r.get("status") == "ok"]
    lines += [_table_row(r) for r in measured]
    if any(r.get("accuracy") is None and r.get("bench_accuracy") is not None for r in measured):
        lines += ["", "\\* accuracy measured by this bench on the test split (no verify.json entry)."]
    others = [r for r in report.get("rows", []) if r.get("status") != "ok"]
    if others:
        lines += ["", "Not measured:", ""] + [f"- {line}" for line in not_measured(others)]
    if report.get("recommendation"):
        lines += format_recommendation(report["recommendation"])
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    lines.append("")
    return "\n".join(lines)


def _summary_lines(report: dict) -> list[str]:
    """The title and the lines above the table: run, machine, MACs, ceiling, inputs."""
    m = report.get("machine", {})
    macs = report.get("macs", {})
    ceiling = (report.get("ceiling") or {}).get("by_threads", {})
    backbone = report.get("backbone") or {}
    size = (report.get("input") or {}).get("height")
    lines = [f"# Benchmark: {report.get('name')}", ""]
    alpha = "" if backbone.get("alpha") is None else f" alpha {backbone['alpha']}"
    lines.append(f"- run: `{report.get('run')}`; backbone {backbone.get('name')}{alpha}, "
                 f"{size} px, {report.get('classes')} classes")
    if backbone.get("weights") == "none":
        lines.append("- **accuracy not meaningful**: the run was trained with `--weights none` (random frozen "
                     "features); its latency and size figures hold, its accuracy is near chance")
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
    return lines


def _table_row(r: dict) -> str:
    """One measured row of the markdown table."""
    batch = f"{r['batch']}" + ("" if r.get("dynamic_batch", True) else " (fixed 1)")
    share = None if r.get("ceiling_fraction") is None else 100 * r["ceiling_fraction"]
    share_text = ">100 (unreliable)" if r.get("ceiling_fraction_measured") else _fmt(share, ".0f")
    mb = None if r.get("model_bytes") is None else r["model_bytes"] / 1e6
    return (f"| {r['format']} | {r['runtime']} | {r['threads']} | {batch} | {_fmt(r['p50_ms'])} | "
            f"{_fmt(r['p90_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['iqr_ms'])} | {_fmt(r['throughput_ips'], '.1f')} | "
            f"{_fmt(r.get('gmacs'), '.2f')} | {share_text} | "
            f"{_fmt(r['cold_start_ms'], '.0f')} | {_fmt(r['peak_rss_mb'], '.1f')} | {_fmt(mb)} | {_accuracy_text(r)} | "
            f"{r.get('verify') or '—'} |")


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
