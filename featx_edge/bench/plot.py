"""The bench plot: test accuracy against p50 latency, one point per format x runtime, Pareto front marked."""

from __future__ import annotations

from pathlib import Path

from featx_edge.bench.stats import pareto_front
from featx_edge.rundir import atomic_path

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
                           "threads": r["threads"], "batch": batch,
                           "shippable": r.get("verify") in ("pass", "reference")})
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
        # The front is drawn among exports that passed verify (and the reference): a failed export
        # is plotted, but it is not a choice.
        candidates = [p for p in scored if p["shippable"]]
        front = [candidates[i] for i in pareto_front([(p["latency_ms"], p["accuracy"]) for p in candidates])]
        ax.step([p["latency_ms"] for p in front], [p["accuracy"] for p in front], where="post", color="k",
                linestyle="--", linewidth=1, label="Pareto front")
        ax.scatter([p["latency_ms"] for p in front], [p["accuracy"] for p in front], marker="x", color="k", s=30)
        for p in scored:
            on_front = any(p is q for q in front)
            mark = " (Pareto)" if on_front else ("" if p["shippable"] else " (not verified)")
            ax.annotate(p["label"] + mark, (p["latency_ms"], p["accuracy"]),
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
