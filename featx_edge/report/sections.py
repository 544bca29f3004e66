"""The report's sections, each built from the run's own files; no model is run here.

``Sources`` reads every file once (manifest through ``Run``, verify.json, the per-image
predictions, int8_layers.json, bench.json, mcu.json) and knows which artifacts are still the files that
were exported, so a result measured on an earlier file is shown as stale, never as a pass.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from featx_edge.bench.plan import REFERENCE_FORMAT
from featx_edge.bench.recommend import format_recommendation
from featx_edge.bench.report import BENCH_JSON, BENCH_PNG, not_measured
from featx_edge.errors import DataError, RunDirError
from featx_edge.files.atomic import inside
from featx_edge.formats.registry import int8_arithmetic
from featx_edge.mcu import MCU_JSON
from featx_edge.report.figures import thumbnail_png, training_curves_png
from featx_edge.report.page import Html, img_png, join, markdown_lines, note, prose, section, table, tag
from featx_edge.rundir.names import INT8_LAYERS, VERIFY
from featx_edge.training.run import Run
from featx_edge.verify.record import Entry, Stale, VerifyRecord, read_record, staleness
from featx_edge.verify.runner import PREDICTIONS, PREDICTIONS_SCHEMA, small_split_note

log = logging.getLogger(__name__)

GALLERY_MAX = 48
"""Disagreeing test images shown at most (the rest are counted)."""
LAYERS_MAX = 20
"""Rows of the per-layer int8 error ranking shown."""
MATRIX_MAX_CLASSES = 30
"""Above this many classes a confusion matrix is listed as its most frequent confusions."""


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """``(content, None)``, ``(None, None)`` when the file is absent, ``(None, problem)`` when unreadable."""
    if not path.is_file():
        return None, None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"`{path}` could not be read ({err})"
    if not isinstance(obj, dict):
        return None, f"`{path}` holds a JSON {type(obj).__name__}, not an object"
    return obj, None


def _f(value, spec: str = ".4f") -> str:
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return "—"


def _ci(pair, spec: str = ".3f") -> str:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return ""
    return f" [{_f(pair[0], spec)}, {_f(pair[1], spec)}]"


class Sources:
    """What the report is made from, read once; ``current`` says which artifacts are unchanged."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.manifest = run.manifest
        self.labels = [str(label) for label in run.labels]
        self.verify, self.verify_problem = _read_verify(run)
        self.predictions, self.predictions_problem = read_json(run.path / PREDICTIONS)
        self.layers, self.layers_problem = read_json(run.path / INT8_LAYERS)
        self.bench, self.bench_problem = read_json(run.path / BENCH_JSON)
        self.mcu, self.mcu_problem = read_json(run.path / MCU_JSON)
        artifacts = self.manifest.get("artifacts") or {}
        # A format's sha256 only if its file on disk is still the one the manifest records.
        self.file_problems = {fmt: run.artifact_problems(fmt) for fmt in run.exported()}
        self.current = {fmt: artifacts[fmt].get("sha256") for fmt, p in self.file_problems.items() if not p}
        try:
            self.splits = run.splits()
            self.splits_problem = None
        except (RunDirError, DataError) as err:  # data folder gone, splits.json damaged
            self.splits, self.splits_problem = None, str(err)

    def stale_reason(self, fmt: str, sha256: str | None) -> str | None:
        """Why a result measured on ``fmt``'s file ``sha256`` is not about the current file (None: it is)."""
        stale = staleness(fmt, sha256, manifest=self.manifest, file_problems=self.file_problems)
        return None if stale is None else str(stale)


def _read_verify(run: Run) -> tuple[VerifyRecord | None, str | None]:
    """The verify record, or None with the record's own line on why it cannot be used (None: absent)."""
    try:
        return read_record(run.path), None
    except RunDirError as err:  # the page still shows everything else, and says what is wrong here
        return None, str(err)


# -- header -----------------------------------------------------------------------------------
def header(src: Sources, *, version: str, created: str) -> Html:
    m = src.manifest
    backbone = m.get("backbone") or {}
    weights = backbone.get("weights")
    inp = m.get("input") or {}
    data = m.get("data") or {}
    counts = data.get("counts") or {}
    training = m.get("training") or {}
    alpha = "" if backbone.get("alpha") is None else f", alpha {backbone['alpha']}"
    sha = backbone.get("weights_sha256")
    rows = [
        ("run", str(src.run.path)),
        ("labels", f"{len(src.labels)}: " + ", ".join(src.labels)),
        ("backbone", f"{backbone.get('name')}{alpha}"),
        ("weights", f"{weights}" + (f" (sha256 {sha[:16]}…)" if isinstance(sha, str) else "")),
        ("input", (f"{inp.get('height')}×{inp.get('width')}×{inp.get('channels')} {inp.get('color', '')}, "
                   f"{inp.get('dtype')} in {inp.get('value_range')}")),
        ("data", (f"{data.get('root')}: train {counts.get('train')}, val {counts.get('val')}, "
                  f"test {counts.get('test')}; {(data.get('skipped') or {}).get('count', 0)} file(s) skipped")),
        ("Keras reference", (f"val accuracy {_f(training.get('val_accuracy'))}, "
                             f"test accuracy {_f(training.get('test_accuracy'))}")),
        ("featx-edge", f"run made with {m.get('featx_edge_version')}; report by {version}, {created}"),
    ]
    parts: list[object] = [tag("h1", f"featx-edge report: {src.run.path.name}")]
    if str(weights).lower() == "none":
        parts.append(tag("p", "--weights none: the backbone's frozen features are random. Every accuracy "
                              "below measures noise, not the method; use pretrained weights (`--weights "
                              "imagenet` or a file from `featx-edge pretrain`).", cls="banner"))
    parts.append(table(None, rows, cls="grid kv"))
    parts.append(Html('<nav><a href="#training">training</a><a href="#verify">verify</a>'
                      '<a href="#confusion">confusion matrices</a><a href="#gallery">int8 disagreements</a>'
                      '<a href="#int8-layers">int8 layers</a><a href="#bench">bench</a><a href="#mcu">microcontrollers</a></nav>'))
    return join(parts)


# -- training ---------------------------------------------------------------------------------
def training(src: Sources) -> Html:
    t = src.manifest.get("training") or {}
    stages = [(name, t[key]["history"]) for key, name in (("stage1", "stage 1 (head)"),
                                                          ("stage2", "stage 2 (fine-tuning)"))
              if isinstance(t.get(key), dict) and isinstance(t[key].get("history"), dict) and t[key]["history"]]
    if not stages:
        return section("training", "Training", note("The manifest records no training history."))
    try:
        figure: object = img_png(training_curves_png(stages), alt="training curves: loss and accuracy per epoch",
                                 cls="figure")
    except ImportError:
        figure = note("matplotlib is not installed, so the curves are not drawn: `pip install matplotlib`, "
                      "then `featx-edge report RUN` again.", cls="warn")
    rows = []
    for name, history in stages:
        last = {k: v[-1] for k, v in history.items() if isinstance(v, list) and v}
        rows.append([name, max((len(v) for v in history.values() if isinstance(v, list)), default=0),
                     _f(last.get("loss")), _f(last.get("accuracy")), _f(last.get("val_loss")),
                     _f(last.get("val_accuracy"))])
    return section("training", "Training", figure,
                   table(["stage", "epochs", "loss", "accuracy", "val loss", "val accuracy"], rows),
                   note("Last epoch of each stage; stage 1 trains the head on cached features of the frozen "
                        "backbone."))


# -- verify -----------------------------------------------------------------------------------
def verify_status(src: Sources, entry: Entry) -> tuple[str, str]:
    """(``pass`` | ``FAIL`` | ``stale``, why) for one verify.json entry, against the current files."""
    stale = src.verify.staleness(entry.format, manifest=src.manifest, file_problems=src.file_problems)
    failed = ("FAIL", "; ".join(entry.failures))
    if stale is not None and stale.kind is Stale.EARLIER_REFERENCE:
        return "stale", str(stale)
    if not entry.sha256 and not entry.passed:
        return failed  # failed before any file was measured (e.g. it could not be loaded)
    if stale is not None:
        return "stale", str(stale)
    return ("pass", "") if entry.passed else failed


def _thresholds(limits: dict) -> str:
    shown = [(limits.get("min_agreement"), "agreement ≥ {}"), (limits.get("max_accuracy_drop"), "drop ≤ {} pt"),
             (limits.get("max_abs_diff"), "|Δp| ≤ {}"), (limits.get("min_sqnr_db"), "SQNR ≥ {} dB")]
    return "; ".join(template.format(value) for value, template in shown if value is not None)


def _verify_cells(entry: dict) -> list[str]:
    """Accuracy, change, agreement (the gate's: near-ties judged as agreeing), near-ties, max |Δp|."""
    change_value = entry.get("judged_accuracy_change_points", entry.get("accuracy_change_points"))
    change = ""
    if change_value is not None:
        change = _f(change_value, "+.2f") + _ci(entry.get("judged_accuracy_change_ci95_points",
                                                          entry.get("accuracy_change_ci95_points")), "+.2f")
    agreement = _f(entry.get("judged_top1_agreement", entry.get("top1_agreement"))) + _ci(
        entry.get("judged_top1_agreement_ci95", entry.get("top1_agreement_ci95")))
    ties = entry.get("near_ties")
    tie_cell = "" if ties is None else (f"{ties} (margin ≤ {entry.get('tie_margin', 0):.2g}; plain agreement "
                                        f"{_f(entry.get('top1_agreement'))})" if ties else "0")
    return [_f(entry.get("accuracy")) + _ci(entry.get("accuracy_ci95")), change, agreement, tie_cell,
            _f(entry.get("max_abs_diff"), ".3g")]


def verify(src: Sources) -> Html:
    fix = f"run `featx-edge verify {src.run.path}`"
    if src.verify is None:
        line = src.verify_problem or f"this run has no {VERIFY}; {fix}."  # a damaged record's line names its fix
        return section("verify", "Verify", note(line, cls="warn"))
    v = src.verify.fields
    formats = src.verify.entries
    sizes = {fmt: (a or {}).get("bytes") for fmt, a in (src.manifest.get("artifacts") or {}).items()}
    rows = [["keras (reference)", "", _f(v.get("reference_accuracy")) + _ci(v.get("reference_accuracy_ci95")),
             "", "", "", "", "", "", "reference"]]
    classes: list[str | None] = [None]
    for fmt, entry in formats.items():
        status, why = verify_status(src, entry)
        size = sizes.get(fmt)
        kernel_rows = entry.kernels
        rows.append([fmt, "" if size is None else f"{size / 1e6:.2f}", *_verify_cells(entry.fields),
                     _thresholds(entry.get("thresholds") or {}), why, status])
        classes.append(status.lower())
        if len(kernel_rows) > 1:  # side by side: one row per kernel set the file was verified under
            for kernels, sub in kernel_rows.items():
                sub = sub if isinstance(sub, dict) else {}
                gated = "gated" if sub.get("gated", True) else "recorded, not gated"
                rows.append([f"↳ {kernels} kernels", "", *_verify_cells(sub), gated,
                             "; ".join(map(str, sub.get("failures") or [])), "pass" if sub.get("passed") else "FAIL"])
                classes.append("pass" if sub.get("passed") else "fail")
    for fmt in src.run.exported():
        if fmt not in formats:
            rows.append([fmt, f"{(sizes.get(fmt) or 0) / 1e6:.2f}", "", "", "", "", "", "", prose(fix),
                         "not verified"])
            classes.append("stale")
    headers = ["format", "size MB", "test accuracy [95% CI]", "change, points [95% CI]",
               "top-1 agreement [95% CI]", "near-ties", "max |Δp|", "thresholds", "notes", "verify"]
    overall = "passed" if v.get("passed") and not any(c in ("fail", "stale") for c in classes) else (
        "FAILED" if not v.get("passed") else "stale entries")
    parts = [note(f"{v.get('images')} test images; agreement and change are against the Keras reference on the "
                  f"same images. Overall: {overall}."), table(headers, rows, row_classes=classes)]
    small = small_split_note(v)
    if small:
        parts.append(note(small, cls="warn"))
    if any(row[-1] == "stale" for row in rows):  # the legend only where a row is marked stale
        parts.append(note("stale: measured on a file other than the one exported now (or against an earlier "
                          f"reference); {fix} to measure the current files."))
    return section("verify", "Verify", *parts)


# -- confusion matrices and the gallery (per-image predictions from verify) -------------------
def usable_predictions(src: Sources) -> tuple[dict[str, dict], list[str]]:
    """Per-image predictions by name ("keras (reference)", then each format whose file is unchanged),
    and one line per problem (missing, stale, damaged) for the page."""
    fix = f"run `featx-edge verify {src.run.path}`"
    p = src.predictions
    if p is None:
        why = src.predictions_problem or f"this run has no per-image predictions ({PREDICTIONS})"
        return {}, [f"{why}; {fix} to record them."]
    labels, images = p.get("labels"), p.get("images")
    ref = p.get("reference") if isinstance(p.get("reference"), dict) else {}
    if p.get("schema") != PREDICTIONS_SCHEMA or not isinstance(labels, list) or not isinstance(images, list):
        return {}, [f"{PREDICTIONS} has another layout than this featx-edge reads; {fix}."]
    if ref.get("sha256") != (src.manifest.get("reference") or {}).get("sha256"):
        return {}, [f"{PREDICTIONS} was computed with an earlier reference model (stale); {fix}."]
    if src.splits is not None and list(src.splits.test) != images:
        return {}, [f"{PREDICTIONS} was computed on other test images than the run's splits (stale); {fix}."]
    n, k = len(labels), len(src.labels)

    def valid(entry) -> bool:
        top1, score = entry.get("top1"), entry.get("score")
        return (isinstance(top1, list) and isinstance(score, list) and len(top1) == len(score) == n
                and all(isinstance(i, int) and 0 <= i < k for i in top1))

    if not all(isinstance(i, int) and 0 <= i < k for i in labels) or not valid(ref):
        return {}, [f"{PREDICTIONS} does not match this run's {k} labels (damaged or stale); {fix}."]
    usable = {"keras (reference)": ref}
    problems = []
    for fmt, entry in (p.get("formats") or {}).items():
        if not isinstance(entry, dict) or not valid(entry):
            problems.append(f"{fmt}: its predictions are damaged; {fix}.")
            continue
        stale = src.stale_reason(fmt, entry.get("sha256"))
        if stale:
            problems.append(f"{fmt}: predictions are stale ({stale}); {fix}.")
            continue
        usable[fmt] = entry
    missing = [fmt for fmt in src.run.exported() if fmt not in (p.get("formats") or {})]
    if missing:
        problems.append(f"no predictions for {', '.join(missing)} (not verified, or failed before all images "
                        f"ran); {fix}.")
    return usable, problems


def _matrix(labels: list[str], truth: list[int], pred: list[int]) -> Html:
    k = len(labels)
    counts = [[0] * k for _ in range(k)]
    for t, p in zip(truth, pred):
        counts[t][p] += 1
    if k > MATRIX_MAX_CLASSES:
        pairs = sorted(((counts[t][p], t, p) for t in range(k) for p in range(k) if t != p and counts[t][p]),
                       reverse=True)[:20]
        return table(["true", "predicted", "images"], [[labels[t], labels[p], c] for c, t, p in pairs])
    head = "<tr>" + tag("th", "true \u2193 / predicted \u2192") + "".join(
        tag("th", str(j), title=labels[j]) for j in range(k)) + "</tr>"
    body = []
    for i in range(k):
        total = sum(counts[i]) or 1
        cells = []
        for j in range(k):
            c = counts[i][j]
            shade = f"background:rgba({'31,119,180' if i == j else '207,34,46'},{0.08 + 0.6 * c / total:.2f})"
            cells.append(tag("td", c or "", cls="diag" if i == j else None, style=shade if c else None,
                             title=f"true {labels[i]}, predicted {labels[j]}: {c}"))
        body.append("<tr>" + tag("th", f"{i} {labels[i]}") + "".join(cells) + "</tr>")
    return Html(f'<table class="grid">{head}{"".join(body)}</table>')


def confusion(src: Sources, usable: dict[str, dict], problems: list[str]) -> Html:
    parts: list[object] = [note(line, cls="warn") for line in problems]
    if usable:
        truth = src.predictions["labels"]
        parts.append(note(f"Test split ({len(truth)} images); rows: true class, columns: predicted class "
                          "(by index, as in the row labels)."))
        cards = []
        for name, entry in usable.items():
            right = sum(t == p for t, p in zip(truth, entry["top1"]))
            cards.append(tag("div", tag("h3", f"{name}: {right}/{len(truth)} right"),
                             _matrix(src.labels, truth, entry["top1"]), cls="cm"))
        parts.append(tag("div", *cards, cls="cms"))
    return section("confusion", "Confusion matrices", *parts)


def _said(src: Sources, name: str, entry: dict, i: int, *, truth: int) -> Html:
    """What ``name`` chose for image ``i``: label and probability, coloured right or wrong."""
    label = entry["top1"][i]
    return tag("div", f"{name}: {src.labels[label]} ({entry['score'][i]:.2f})",
               cls="right" if label == truth else "wrong")


def gallery(src: Sources, usable: dict[str, dict], problems: list[str]) -> Html:
    int8 = [fmt for fmt in usable if int8_arithmetic(fmt)]
    if not usable:
        return section("gallery", "Where int8 disagrees with the reference",
                       *[note(line, cls="warn") for line in problems])
    if not int8:
        return section("gallery", "Where int8 disagrees with the reference",
                       note("No int8 export with current predictions in this run."))
    p = src.predictions
    ref = usable["keras (reference)"]
    images, truth = p["images"], p["labels"]
    found = [i for i in range(len(images)) if any(usable[f]["top1"][i] != ref["top1"][i] for f in int8)]
    parts: list[object] = [note(f"{len(found)} of {len(images)} test images on which an int8 export "
                                f"({', '.join(int8)}) chooses another class than the Keras reference.")]
    if src.splits is None:
        parts.append(note(f"No thumbnails: {src.splits_problem}", cls="warn"))
    cards = []
    for i in found[:GALLERY_MAX]:
        rel = str(images[i])
        thumb: object = ""
        if src.splits is not None and inside(rel):
            png = thumbnail_png(src.splits.root / rel)
            thumb = img_png(png, alt=rel, width=64) if png else note("(unreadable)")

        lines = [_said(src, "reference", ref, i, truth=truth[i])]
        lines += [_said(src, f, usable[f], i, truth=truth[i]) for f in int8 if usable[f]["top1"][i] != ref["top1"][i]]
        cards.append(tag("div", thumb, tag("div", rel, cls="path"), tag("div", f"true: {src.labels[truth[i]]}"),
                         *lines, cls="card"))
    parts.append(tag("div", *cards, cls="gallery"))
    if len(found) > GALLERY_MAX:
        parts.append(note(f"… and {len(found) - GALLERY_MAX} more not shown."))
    return section("gallery", "Where int8 disagrees with the reference", *parts)


# -- int8 layers and bench --------------------------------------------------------------------
def _tensor(name: object) -> Html:
    """A tensor's first name (TFLite joins the names of fused ops with ';'); the full name on hover."""
    full = str(name)
    first = full.split(";", 1)[0]
    return tag("span", first if len(first) <= 90 else first[:89] + "…", title=full if full != first else None)


def int8_layers(src: Sources) -> Html:
    title = "Per-layer int8 error"
    if src.layers is None:
        return section("int8-layers", title, note(src.layers_problem or (
            f"Not measured in this run: exporting `tflite-int8-selective` writes the ranking ({INT8_LAYERS}), "
            f"e.g. `featx-edge export {src.run.path} --formats tflite-int8-selective`.")))
    layers = [row for row in (src.layers.get("layers") or []) if isinstance(row, dict)]
    rows = [[i + 1, _tensor(row.get("tensor")), row.get("op"), _f(row.get("rmse_over_scale"), ".3f"),
             _f(row.get("rmse"), ".3g"), _f(row.get("max_abs_error"), ".3g")]
            for i, row in enumerate(layers[:LAYERS_MAX])]
    parts: list[object] = [note(f"TFLite's quantization debugger on {src.layers.get('calibration_images')} "
                                f"calibration images, worst first ({len(layers)} layers, top {len(rows)} shown); "
                                f"metric: {src.layers.get('metric')}.")]
    if "tflite-int8-selective" not in src.current:
        parts.append(note(f"{INT8_LAYERS} comes from an earlier export: this run's tflite-int8-selective file is "
                          "absent or changed.", cls="warn"))
    parts.append(table(["rank", "tensor", "op", "rmse / scale", "rmse", "max |error|"], rows))
    return section("int8-layers", title, *parts)


def bench(src: Sources) -> Html:
    if src.bench is None:
        return section("bench", "Bench", note(src.bench_problem or (
            f"Not benchmarked yet: run `featx-edge bench {src.run.path}`.")))
    rows, classes, others = [], [], []
    for r in src.bench.get("rows") or []:
        if not isinstance(r, dict):
            continue
        if r.get("status") != "ok":
            others.append(r)
            continue
        stale = None if r.get("format") == REFERENCE_FORMAT else src.stale_reason(r.get("format"), r.get("sha256"))
        acc = r.get("accuracy") if r.get("accuracy") is not None else r.get("bench_accuracy")
        mb = None if r.get("model_bytes") is None else r["model_bytes"] / 1e6
        rows.append([r.get("format"), r.get("runtime"), r.get("threads"), r.get("batch"), _f(r.get("p50_ms"), ".2f"),
                     _f(r.get("p90_ms"), ".2f"), _f(r.get("throughput_ips"), ".1f"), _f(r.get("peak_rss_mb"), ".1f"),
                     _f(mb, ".2f"), _f(acc), "stale: " + stale if stale else (r.get("verify") or "—")])
        classes.append("stale" if stale else None)
    m = src.bench.get("machine") or {}
    parts: list[object] = [note(f"{src.bench.get('created', '')} on {m.get('cpu_model')} ({m.get('cpu_count')} "
                                "CPUs); latency per batch, median (p50) and p90; throughput = batch / p50.")]
    parts.append(table(["format", "runtime", "threads", "batch", "p50 ms", "p90 ms", "img/s", "peak RSS MB",
                        "size MB", "accuracy", "verify"], rows, row_classes=classes))
    if others:
        parts.append(tag("h3", "Not measured"))
        parts.append(tag("ul", *[tag("li", line) for line in not_measured(others)]))
    if isinstance(src.bench.get("recommendation"), dict):
        parts.append(markdown_lines(format_recommendation(src.bench["recommendation"])))
    png = src.run.path / BENCH_PNG
    if png.is_file():
        parts.append(img_png(png.read_bytes(), alt="accuracy against latency", cls="figure"))
    return section("bench", "Bench", *parts)

