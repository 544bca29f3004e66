"""The bench plot: test accuracy against p50 latency at batch 1, one panel per thread count (1 and all).

Readable on purpose:
- colour is the runtime and the marker is the format (two legends), so no point needs a text label;
  only the Pareto front (among exports that passed verify) is labelled, with labels spread apart;
- each accuracy has its 95% Wilson interval as an error bar, and the axis spans at least
  ``MIN_ACCURACY_SPAN``, so a one-image difference looks like what it is: noise;
- an export that failed verify (or has no current verify entry) is drawn hollow.
"""

from __future__ import annotations

from pathlib import Path

from featx_edge.bench.stats import pareto_front
from featx_edge.fidelity.intervals import wilson
from featx_edge.files.atomic import atomic_path

_COLORS = {"litert-xnnpack": "tab:blue", "litert-builtin": "tab:cyan", "onnxruntime-cpu": "tab:orange",
           "onnxruntime-cuda": "tab:red", "onnxruntime-tensorrt": "tab:purple", "tensorflow": "tab:green"}
_MARKERS = "osD^vP*XhpH<>d"
MIN_ACCURACY_SPAN = 0.10  # 10 points: wider than the 95% interval of a ~300-image test split


def _accuracy_images(report: dict, row: dict) -> int | None:
    if row.get("accuracy") is not None:
        return (report.get("accuracy") or {}).get("images") or (report.get("inputs") or {}).get("images")
    return row.get("accuracy_images")


def plot_points(report: dict, *, threads: int | None = None) -> list[dict]:
    """The points of one panel: measured rows at the smallest batch, one per format x runtime.

    Args:
        report: a bench report (``RUN/bench.json``).
        threads: the thread count to show; None takes each format x runtime's largest.
    """
    rows = [r for r in report.get("rows", []) if r.get("status") == "ok"]
    if not rows:
        return []
    batch = min(r["batch"] for r in rows)
    points = []
    for r in rows:
        same = [x for x in rows if (x["format"], x["runtime"]) == (r["format"], r["runtime"]) and x["batch"] == batch]
        wanted = max(x["threads"] for x in same) if threads is None else threads
        if r["batch"] != batch or r["threads"] != wanted:
            continue
        acc = r.get("accuracy") if r.get("accuracy") is not None else r.get("bench_accuracy")
        n = _accuracy_images(report, r)
        low, high = wilson(round(acc * n), n) if acc is not None and n else (acc, acc)
        points.append({"label": f"{r['format']} / {r['runtime']}", "format": r["format"], "runtime": r["runtime"],
                       "measured_by": "verify" if r.get("accuracy") is not None else "bench",
                       "latency_ms": r["p50_ms"], "accuracy": acc, "accuracy_low": low, "accuracy_high": high,
                       "images": n, "bytes": r.get("model_bytes") or 0, "threads": r["threads"], "batch": batch,
                       "shippable": r.get("verify") in ("pass", "reference")})
    return points


def pareto_points(points: list[dict]) -> list[dict]:
    """The Pareto front (lower latency, higher accuracy) among the points that passed verify."""
    candidates = [p for p in points if p["shippable"] and p["accuracy"] is not None]
    return [candidates[i] for i in pareto_front([(p["latency_ms"], p["accuracy"]) for p in candidates])]


def accuracy_limits(points: list[dict], *, min_span: float = MIN_ACCURACY_SPAN) -> tuple[float, float]:
    """The y range: every interval shown, at least ``min_span`` wide, inside [0, 1.02]."""
    lows = [p["accuracy_low"] for p in points if p["accuracy_low"] is not None]
    highs = [p["accuracy_high"] for p in points if p["accuracy_high"] is not None]
    low, high = min(lows), max(highs)
    pad = max(0.0, min_span - (high - low)) / 2 + 0.005
    low, high = low - pad, high + pad
    if high > 1.02:
        low, high = low - (high - 1.02), 1.02
    return max(0.0, low), high


def _panel(ax, points: list[dict], *, markers: dict[str, str], title: str) -> None:
    scored = [p for p in points if p["accuracy"] is not None]
    if not scored:  # no accuracy anywhere: latency alone
        ax.barh([p["label"] for p in points], [p["latency_ms"] for p in points])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"p50 latency (ms), batch {points[0]['batch']}")
        return
    for p in scored:
        color = _COLORS.get(p["runtime"], "tab:gray")
        ax.errorbar([p["latency_ms"]], [p["accuracy"]],
                    yerr=[[p["accuracy"] - p["accuracy_low"]], [p["accuracy_high"] - p["accuracy"]]],
                    fmt="none", ecolor=color, alpha=0.35, capsize=2, linewidth=1)
        ax.scatter([p["latency_ms"]], [p["accuracy"]], marker=markers[p["format"]], s=60,
                   facecolors=color if p["shippable"] else "none", edgecolors=color if not p["shippable"] else "k",
                   linewidths=1.2 if not p["shippable"] else 0.5, zorder=3)
    front = pareto_points(scored)
    if front:
        ax.step([p["latency_ms"] for p in front], [p["accuracy"] for p in front], where="post", color="k",
                linestyle="--", linewidth=1, zorder=2)
        # Labels of the front, stacked from the top-left so they never sit on one another.
        for rank, p in enumerate(sorted(front, key=lambda q: q["latency_ms"])):
            ax.annotate(p["label"], (p["latency_ms"], p["accuracy"]), xytext=(8, 14 + 13 * rank),
                        textcoords="offset points", fontsize=7.5, fontweight="bold",
                        arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.6})
    lat = [p["latency_ms"] for p in points]
    if lat and max(lat) / max(min(lat), 1e-9) > 5:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    if scored:
        ax.set_ylim(*accuracy_limits(scored))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"p50 latency (ms), batch {points[0]['batch'] if points else '-'}")
    ax.grid(True, alpha=0.3)


def write_plot(report: dict, path: str | Path) -> Path:
    """Accuracy against p50 latency, one panel for 1 thread and one for the most threads; PNG.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    measured = [r for r in report.get("rows", []) if r.get("status") == "ok"]
    counts = sorted({r["threads"] for r in measured})
    panels = [(t, plot_points(report, threads=t)) for t in dict.fromkeys([counts[0], counts[-1]] if counts else [])]
    panels = [(t, pts) for t, pts in panels if pts]
    formats = list(dict.fromkeys(p["format"] for _, pts in panels for p in pts))
    markers = {fmt: _MARKERS[i % len(_MARKERS)] for i, fmt in enumerate(formats)}
    fig = Figure(figsize=(5.5 * max(1, len(panels)) + 2.4, 5.5))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, max(1, len(panels)), i + 1) for i in range(max(1, len(panels)))]
    any_scored = False
    for ax, (threads, pts) in zip(axes, panels):
        any_scored |= any(p["accuracy"] is not None for p in pts)
        _panel(ax, pts, markers=markers, title=f"{threads} thread{'s' if threads != 1 else ''}")
    if not panels:
        axes[0].text(0.5, 0.5, "nothing was measured", ha="center", va="center", transform=axes[0].transAxes)
    sources = {p["measured_by"] for _, pts in panels for p in pts}
    axes[0].set_ylabel("test accuracy, 95% interval" + ("" if sources <= {"verify"} else
                                                         " (verify.json, else measured by the bench)"))
    runtimes = list(dict.fromkeys(p["runtime"] for _, pts in panels for p in pts))
    handles = [Line2D([], [], marker="o", linestyle="", color=_COLORS.get(r, "tab:gray"), label=r) for r in runtimes]
    handles += [Line2D([], [], marker=markers[f], linestyle="", color="0.3", label=f) for f in formats]
    handles += [Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="0.3",
                       label="hollow: did not pass verify"),
                Line2D([], [], linestyle="--", color="k", label="Pareto front (passed verify)")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    note = "" if any_scored else " (no accuracy: no verify.json and no test images)"
    fig.suptitle(f"{report.get('name')}: accuracy vs latency{note}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)
