"""Verify every exported model against the Keras reference on the held-out test split.

Artifacts run through the device runtime (``featx_edge.runtime``), so what is verified is what
a device runs. The test images are decoded once, a batch at a time, and every model sees each
batch (memory holds one batch of pixels, whatever the test split's size). Every failure is
collected, written to ``RUN/verify.json``, then raised as one VerificationError listing each
failing format with the measured value and the threshold. Each image's top-1 class and its
probability, of the reference and of every format that ran, go to ``RUN/verify_predictions.json``
(with the sha256 of each model), for the report's confusion matrices and disagreement gallery.

A NaN or an Inf is never a probability (argmax would "agree" on it): a format whose outputs hold
one fails, with the count of such test images (``nonfinite`` in its entry), and a reference that
gives one fails the whole verify in one line. An export passes only with its own self-test file
(``export/selftest/``, what ``selftest`` and ``bundle`` use), never one written for an older export.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from featx_edge.data import iter_batches
from featx_edge.errors import ModelFileError, VerificationError
from featx_edge.fidelity import broken_reference, check, compare
from featx_edge.formats import Thresholds, get_format, merge_overrides, parse_formats, thresholds_for
from featx_edge.intervals import wilson
from featx_edge.progress import bar
from featx_edge.run import Run
from featx_edge.rundir import VERIFY, locked, write_json
from featx_edge.runtime.predictor import nonfinite_rows
from featx_edge.runtime.selftest import golden_path, read_golden, written_for

log = logging.getLogger(__name__)

BATCH = 64
"""Images per batch: decoded once, run through the reference and every model."""

PREDICTIONS = "verify_predictions.json"
"""Per test image: top-1 class and its probability, of the reference and of each verified format
(for the report's confusion matrices and disagreement gallery, which never rerun a model)."""
PREDICTIONS_SCHEMA = "featx-edge-verify-predictions/1"


def verify_run(run: str | Path, *, formats: tuple[str, ...] | None = None,
               overrides: dict[str, dict[str, float]] | None = None) -> dict:
    """Verify the run's artifacts; writes ``RUN/verify.json`` and raises on any failure.

    Example:
        >>> report = verify_run("runs/demo")  # doctest: +SKIP
        >>> report["formats"]["tflite-int8"]["top1_agreement"]  # doctest: +SKIP
    """
    with locked(run, command="verify"):
        return _verify(Run.open(run, recover=True), formats=formats, overrides=overrides)


def _verify(run: Run, *, formats: tuple[str, ...] | None, overrides: dict | None) -> dict:
    manifest = run.manifest
    # The run's own [verify] settings, then this call's.
    overrides = merge_overrides(manifest.get("config", {}).get("verify", {}), overrides)
    formats = parse_formats(formats) if formats is not None else run.exported()  # an empty list is refused
    if not formats:
        raise VerificationError(f"`{run.path}` has no exported models; run `featx-edge export {run.path}` first.")
    splits = run.splits()
    labels = splits.labels("test")
    entries, limits, problems, predictors = _prepare(run, formats, overrides)
    log.info("verifying %d export(s) against the Keras reference on %d test images ...", len(formats), len(labels))
    reference, outputs, seconds = _run_models(run, splits, predictors, problems)
    finite = np.isfinite(reference).all(axis=1) if reference.size else np.ones(len(reference), bool)
    reference_right = int(np.sum(finite & (reference.argmax(1) == labels)))  # a NaN row is never right
    report: dict = {"run": str(run.path), "images": len(labels),
                    "reference_accuracy": reference_right / max(len(labels), 1),
                    "reference_accuracy_ci95": list(wilson(reference_right, len(labels))),
                    "reference_sha256": manifest["reference"]["sha256"],
                    "reference_nonfinite": int(np.sum(~finite)), "formats": entries}
    if report["reference_nonfinite"]:
        _refuse_broken_reference(run, report, problems=problems, outputs=outputs)
    failures: list[str] = []
    predictions = {"schema": PREDICTIONS_SCHEMA, "images": list(splits.test), "labels": labels.tolist(),
                   "reference": {"sha256": manifest["reference"]["sha256"], **top1(reference)}, "formats": {}}
    for fmt in formats:
        entry = entries[fmt]
        if fmt in outputs:
            probs = outputs[fmt]
            try:
                problems[fmt] += _check_format(run, fmt, entry, probs, reference, labels, limits=limits[fmt])
            except (ModelFileError, VerificationError) as err:
                problems[fmt].append(str(err))
            if not entry.get("nonfinite"):  # the report's per-image predictions hold numbers only
                predictions["formats"][fmt] = {"sha256": entry["sha256"], **top1(probs)}
            entry["seconds"] = round(seconds[fmt], 3)
        entry["passed"] = not problems[fmt]
        entry["failures"] = problems[fmt]
        failures += [f"{fmt}: {p}" for p in problems[fmt]]
        agree = entry.get("top1_agreement")
        shown = "" if agree is None else (f"agreement {agree:.4f} [{entry['top1_agreement_ci95'][0]:.3f}, "
                                          f"{entry['top1_agreement_ci95'][1]:.3f}] ")
        log.info("%-22s %s%s", fmt, shown, "PASS" if not problems[fmt] else "FAIL: " + "; ".join(problems[fmt]))
    report["passed"] = not failures
    write_json(run.path / PREDICTIONS, predictions)
    write_json(run.path / VERIFY, report)
    log.info("wrote %s", run.path / VERIFY)
    if failures:
        _raise_failures(run, failures, images=len(labels))
    return report


def _prepare(run: Run, formats: tuple[str, ...], overrides: dict) -> tuple[dict, dict, dict, dict]:
    """Per format: its verify.json entry, its thresholds, the problems found before it runs, and its
    predictor (none for a format whose file is unusable: its problems say why)."""
    from featx_edge.runtime import load

    manifest = run.manifest
    entries: dict[str, dict] = {}
    limits: dict[str, Thresholds] = {}
    problems: dict[str, list[str]] = {}
    predictors: dict = {}
    for fmt in formats:
        limits[fmt] = thresholds_for(fmt, overrides)
        entries[fmt] = {"thresholds": dataclasses.asdict(limits[fmt])}
        problems[fmt] = run.artifact_problems(fmt)
        if problems[fmt]:
            continue
        # What was measured, so a later reader (bench, report) can tell a stale entry.
        entries[fmt]["sha256"] = manifest["artifacts"][fmt]["sha256"]
        entries[fmt]["compared_with"] = f"the run's float Keras reference ({manifest['reference']['path']})"
        problems[fmt] += _golden_problems(run, fmt)
        try:
            predictor = load(run.artifact_path(fmt))
        except ModelFileError as err:
            problems[fmt].append(str(err))
            continue
        if predictor.labels != run.labels:
            problems[fmt].append(f"labels in the model {predictor.labels} differ from the run's")
            continue
        predictors[fmt] = predictor
    return entries, limits, problems, predictors


def _golden_problems(run: Run, fmt: str) -> list[str]:
    """An export passes only with its own self-test file: `selftest` and `bundle` refuse one written
    for another (older) export, so verify must not call that export good."""
    path = golden_path(run.artifact_path(fmt))
    fix = f"re-export it: `featx-edge export {run.path} --formats {fmt}`"
    try:
        golden = read_golden(path)
    except ModelFileError:
        return [f"its self-test file `{path}` is missing or damaged, so `featx-edge selftest` and `bundle` would "
                f"refuse it; {fix}"]
    if not written_for(golden, fmt=fmt, sha256=run.manifest["artifacts"][fmt]["sha256"]):
        return [f"its self-test file `{path}` was written for an older export (another format or sha256), so "
                f"`featx-edge selftest` and `bundle` would refuse it; {fix}"]
    return []


def _run_models(run: Run, splits, predictors: dict, problems: dict) -> tuple[np.ndarray, dict, dict]:
    """The reference's outputs on the test split, and each model's with its seconds. Each batch is decoded
    once and run through every model; a model that fails is dropped, its problem recorded."""
    model = run.reference().model
    reference: list[np.ndarray] = []
    outputs: dict[str, list[np.ndarray]] = {fmt: [] for fmt in predictors}
    seconds = dict.fromkeys(predictors, 0.0)
    running = dict(predictors)
    batches = bar(iter_batches(splits.root, splits.test, size=run.size, batch_size=BATCH),
                  total=-(-len(splits.test) // BATCH), desc="verifying", unit="batch")
    for batch in batches:
        reference.append(model(batch.astype(np.float32), training=False).numpy())
        for fmt in list(running):
            t0 = time.perf_counter()
            try:  # NaN/Inf outputs are kept: verify counts them per image and fails the format
                outputs[fmt].append(running[fmt].predict_pixels(batch, allow_nonfinite=True))
            except (ModelFileError, VerificationError) as err:
                problems[fmt].append(str(err))
                del running[fmt]
            else:
                seconds[fmt] += time.perf_counter() - t0
    empty = np.zeros((0, len(run.labels)), np.float32)
    finished = {fmt: np.concatenate(outputs[fmt]) if outputs[fmt] else empty for fmt in running}
    return (np.concatenate(reference) if reference else empty), finished, seconds


def _refuse_broken_reference(run: Run, report: dict, *, problems: dict, outputs: dict) -> None:
    """A reference with NaN/Inf outputs fails the whole verify in one line: every comparison with it is
    meaningless. verify.json says so (nothing stale may pass), and no per-image predictions are kept."""
    for fmt, entry in report["formats"].items():
        if fmt in outputs:
            entry["nonfinite"] = nonfinite_rows(outputs[fmt])
        entry["passed"] = False
        entry["failures"] = problems[fmt] + ["not compared: the Keras reference model gives NaN/Inf outputs"]
    report["passed"] = False
    (run.path / PREDICTIONS).unlink(missing_ok=True)
    write_json(run.path / VERIFY, report)
    raise broken_reference(run.path, weights=run.path / run.manifest["reference"]["path"],
                           bad=report["reference_nonfinite"], total=report["images"])


def _raise_failures(run: Run, failures: list[str], *, images: int) -> None:
    """One VerificationError listing every failure, with the int8 remedies when an int8 format missed."""
    remedy = ""
    if any(get_format(f.split(":")[0]).int8 for f in failures):
        remedy = (f"\nFor int8: try `featx-edge export {run.path} --int8-budget 1.0 --qat-epochs 2` (tries the "
                  "selective and QAT variants, keeps the first within budget), ship tflite-float16 or "
                  "tflite-dynamic instead, or accept a looser limit knowingly with "
                  "`--threshold FORMAT.METRIC=VALUE`. README \"int8\" lists what moves int8 fidelity.")
    raise VerificationError(
        f"{len(failures)} check(s) failed on {images} test images (details in {run.path / VERIFY}):\n  "
        + "\n  ".join(failures) + remedy
    )


def top1(probs: np.ndarray) -> dict[str, list]:
    """Each row's top-1 class index and its probability (4 decimals: enough to show, small to store)."""
    probs = np.asarray(probs, dtype=np.float64)
    if not probs.size:
        return {"top1": [], "score": []}
    probs = probs.reshape(len(probs), -1)
    return {"top1": probs.argmax(1).tolist(), "score": np.round(probs.max(1), 4).tolist()}


def _check_format(run: Run, fmt: str, entry: dict, probs: np.ndarray, reference: np.ndarray,
                  labels: np.ndarray, *, limits: Thresholds) -> list[str]:
    """Fill ``entry`` with ``fmt``'s metrics; its problems against its thresholds and its int8 claim."""
    from featx_edge.export.tflite import integer_report
    from featx_edge.macs import onnx_quantization_report
    from featx_edge.runtime.metadata import read_tflite

    spec = get_format(fmt)
    entry["nonfinite"] = nonfinite_rows(probs)
    if entry["nonfinite"]:  # argmax "agrees" on NaN and every metric would be NaN: count, never compare
        return [f"{entry['nonfinite']} of {len(probs)} test images gave NaN/Inf outputs"]
    entry.update(compare(probs, reference, labels))
    problems = check(entry, limits)
    path = run.artifact_path(fmt)
    if spec.int8 and spec.engine == "litert" and not problems:
        entry["integer"] = integer_report(read_tflite(path)[0])
        if spec.integer_only and (entry["integer"]["float_tensors"]
                                  or entry["integer"]["input_dtype"] not in ("uint8", "int8")):
            problems.append("not integer-only: " + str(entry["integer"]["float_tensors"][:3]))
    if spec.int8 and spec.engine == "onnxruntime":
        entry["integer"] = onnx_quantization_report(path)
        problems += _onnx_int8_problems(entry["integer"])
    return problems


def _onnx_int8_problems(report: dict) -> list[str]:
    """An ``onnx-int8`` file must really compute in int8 (QDQ pairs or integer ops)."""
    if not (report["quantize_nodes"] and report["dequantize_nodes"]) and not report["integer_ops"]:
        return ["not quantized: no QuantizeLinear/DequantizeLinear pairs and no integer ops in the graph"]
    if not report["int8_mac_share"]:
        return ["not quantized: none of the convolutions or matrix products has int8 inputs and weights"]
    return []


def format_table(report: dict, manifest: dict) -> str:
    """The run's table from a verify report: size, test accuracy, change and agreement with 95% intervals."""
    header = (f"{'format':<22} {'size (MB)':>9} {'test acc':>8} {'change (points) [95% CI]':>26} "
              f"{'agreement [95% CI]':>25}  verify")
    lines = [header]
    low, high = report.get("reference_accuracy_ci95") or (None, None)
    ci = f"[{low:.3f}, {high:.3f}]" if low is not None else ""
    lines.append(f"{'keras (reference)':<22} {'':>9} {report['reference_accuracy']:>8.4f} {ci:>26}")
    for fmt, row in report["formats"].items():
        size = manifest.get("artifacts", {}).get(fmt, {}).get("bytes")
        acc, agree = row.get("accuracy"), row.get("top1_agreement")
        change = ""
        if row.get("accuracy_change_points") is not None:
            c_low, c_high = row["accuracy_change_ci95_points"]
            change = f"{row['accuracy_change_points']:+.2f} [{c_low:+.2f}, {c_high:+.2f}]"
        agreement = ""
        if agree is not None:
            a_low, a_high = row["top1_agreement_ci95"]
            agreement = f"{agree:.4f} [{a_low:.3f}, {a_high:.3f}]"
        lines.append(f"{fmt:<22} {'' if size is None else f'{size / 1e6:.2f}':>9} "
                     f"{'' if acc is None else f'{acc:.4f}':>8} {change:>26} {agreement:>25}  "
                     f"{'pass' if row['passed'] else 'FAIL'}")
    lines.append(f"({report['images']} test images; change and agreement are against the Keras reference "
                 "on the same images)")
    if (manifest.get("backbone") or {}).get("weights") == "none":
        lines = [f"{line}  (not meaningful)" if line.endswith(("pass", "FAIL")) else line for line in lines]
        lines.append("NOT MEANINGFUL: this run was trained with `--weights none` (a frozen backbone with random "
                     "weights), so its accuracy is near chance; pass/FAIL only says the exports match that random "
                     "model. Use it for latency tests, not to judge a model.")
    lines.extend(filter(None, [small_split_note(report)]))
    return "\n".join(lines)


WIDE_INTERVAL = 0.05
"""A 95% interval of agreement wider than this (5 points) is too coarse for the verify gate to mean much."""


def small_split_note(report: dict) -> str | None:
    """One line when the test split is too small for its intervals to resolve the gate, else None.

    On 12 images an agreement of 1.0 has the 95% interval [0.76, 1.0]: a pass says little. The line
    names the widest interval and how many test images would make it 1 point wide.
    """
    widest, worst, images = 0.0, 1.0, int(report.get("images") or 0)
    for row in (report.get("formats") or {}).values():
        pair, agree = (row or {}).get("top1_agreement_ci95"), (row or {}).get("top1_agreement")
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and agree is not None:
            widest, worst = max(widest, pair[1] - pair[0]), min(worst, agree)
    if images <= 0 or widest <= WIDE_INTERVAL:
        return None
    return (f"note: only {images} test images: the 95% intervals of agreement are up to {widest * 100:.0f} points "
            f"wide, too wide for the verify gate to mean much; about {images_for_width(worst, 0.01):,} test images "
            "would resolve 1 point (more images per class, or a larger `test_fraction` in [data]).")


def images_for_width(rate: float, width: float) -> int:
    """The fewest images whose Wilson 95% interval at ``rate`` is at most ``width`` wide (doubling, then bisection)."""
    def wide(n: int) -> bool:
        low, high = wilson(round(rate * n), n)
        return high - low > width

    high = 1
    while wide(high):
        high *= 2
    low = high // 2
    while high - low > 1:  # wide(low) holds, wide(high) does not
        mid = (low + high) // 2
        low, high = (mid, high) if wide(mid) else (low, mid)
    return high
