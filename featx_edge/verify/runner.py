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
import re
import time
from pathlib import Path

import numpy as np

from featx_edge.data.folders import iter_batches
from featx_edge.errors import ModelFileError, RunDirError, VerificationError
from featx_edge.fidelity.gate import broken_reference, check, compare
from featx_edge.fidelity.intervals import wilson
from featx_edge.files.atomic import atomic_path, sha256_file, write_json
from featx_edge.files.lock import locked
from featx_edge.formats.registry import (
    KERNEL_SETS,
    Thresholds,
    get_format,
    merge_overrides,
    parse_formats,
    parse_kernel_sets,
    thresholds_for,
    tie_margin,
)
from featx_edge.formats.targets import detect_host
from featx_edge.progress import bar
from featx_edge.rundir.names import PREDICTIONS, REFERENCE_OUTPUTS, VERIFY
from featx_edge.runtime.predictor import nonfinite_rows
from featx_edge.runtime.selftest import golden_path, read_golden, written_for
from featx_edge.training.run import Run
from featx_edge.verify.record import read_record, write_record

log = logging.getLogger(__name__)

BATCH = 64
"""Images per batch: decoded once, run through the reference and every model."""

PREDICTIONS_SCHEMA = "featx-edge-verify-predictions/1"


def verify_run(run: str | Path, *, formats: tuple[str, ...] | None = None,
               overrides: dict[str, dict[str, float]] | None = None,
               kernels: tuple[str, ...] | None = None) -> dict:
    """Verify the run's artifacts; writes ``RUN/verify.json`` and raises on any failure.

    Every export runs under each kernel set its format lists (``FormatSpec.kernel_sets``: a
    quantized TFLite file under XNNPACK and under the reference kernels that TensorFlow Lite
    Micro computes); all are recorded, and the gate applies to those in ``kernels`` (default:
    all, since a file handed on may run under any of them).

    Example:
        >>> report = verify_run("runs/demo")  # doctest: +SKIP
        >>> report["formats"]["tflite-int8"]["kernels"]["reference"]["top1_agreement"]  # doctest: +SKIP
    """
    chosen = parse_kernel_sets(kernels) if kernels else tuple(KERNEL_SETS)
    with locked(run, command="verify"):
        return _verify(Run.open(run, recover=True), formats=formats, overrides=overrides, kernels=chosen)


@dataclasses.dataclass
class _Runner:
    """One export under one kernel set, and what it produced on the test split."""

    fmt: str
    kernels: str
    predictor: object
    outputs: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    probs: np.ndarray | None = None  # the outputs joined once the split is done (None after an error)


def _verify(run: Run, *, formats: tuple[str, ...] | None, overrides: dict | None, kernels: tuple[str, ...]) -> dict:
    formats = parse_formats(formats) if formats is not None else run.exported()  # an empty list is refused
    if not formats:
        raise VerificationError(f"`{run.path}` has no exported models; run `featx-edge export {run.path}` first.")
    # The run's own [verify] settings, then this call's.
    overrides = merge_overrides(run.manifest.get("config", {}).get("verify", {}), overrides)
    splits = run.splits()
    labels = splits.labels("test")
    limits = {fmt: thresholds_for(fmt, overrides) for fmt in formats}
    entries = {fmt: {"thresholds": dataclasses.asdict(limits[fmt])} for fmt in formats}
    problems = {fmt: run.artifact_problems(fmt) for fmt in formats}
    runners = [r for fmt in formats if not problems[fmt] for r in _open_runners(run, fmt, entries[fmt], problems[fmt])]
    log.info("verifying %d export(s) against the Keras reference on %d test images ...", len(formats), len(labels))
    reference = _run_test_split(run, splits, runners)
    report = _report_head(run, reference, labels, kernels=kernels, entries=entries)
    if report["reference_nonfinite"]:
        _refuse_broken_reference(run, report, problems=problems, runners=runners)
    predictions = {"schema": PREDICTIONS_SCHEMA, "images": list(splits.test), "labels": labels.tolist(),
                   "reference": {"sha256": run.manifest["reference"]["sha256"], **top1(reference)}, "formats": {}}
    failures: list[str] = []
    for fmt in formats:
        mine = [r for r in runners if r.fmt == fmt]
        failures += _judge_format(run, fmt, entries[fmt], mine, reference, labels, limits=limits[fmt],
                                  problems=problems[fmt], kernels=kernels)
        if mine and mine[0].error is None and not entries[fmt].get("nonfinite"):  # numbers only
            predictions["formats"][fmt] = {"sha256": entries[fmt]["sha256"], **top1(mine[0].probs)}
    report["passed"] = not failures
    report["reference_outputs"] = _save_reference(run, reference)
    write_json(run.path / PREDICTIONS, predictions)
    log.info("wrote %s", write_record(run.path, report))
    if failures:
        _raise_failures(run, failures, images=len(labels))
    return report


def _report_head(run: Run, reference: np.ndarray, labels: np.ndarray, *, kernels: tuple[str, ...],
                 entries: dict) -> dict:
    """The record's reference part: its accuracy on the test split and how many outputs were not finite."""
    finite = np.isfinite(reference).all(axis=1) if reference.size else np.ones(len(reference), bool)
    reference_right = int(np.sum(finite & (reference.argmax(1) == labels)))  # a NaN row is never right
    return {"run": str(run.path), "images": len(labels),
            "reference_accuracy": reference_right / max(len(labels), 1),
            "reference_accuracy_ci95": list(wilson(reference_right, len(labels))),
            "reference_sha256": run.manifest["reference"]["sha256"],
            "reference_nonfinite": int(np.sum(~finite)), "kernel_sets_gated": list(kernels),
            "formats": entries}


def read_reference_outputs(run: Run, *, needed_by: str = "device-check") -> np.ndarray:
    """The Keras reference's test-split probabilities recorded by the last verify (for device-check, mcu).

    RunDirError naming the fix when verify has not run, ran with an earlier reference, or the file
    was changed since; ``needed_by`` names the command in it.
    """
    fix = f"run `featx-edge verify {run.path}` first ({needed_by} judges against the outputs it records)"
    record = read_record(run.path)  # a damaged verify.json: its own one line
    outputs_record = record.reference_outputs if record is not None else None
    if outputs_record is None:
        why = f"{VERIFY} records none" if record is not None else f"no {VERIFY}"
        raise RunDirError(f"`{run.path}` has no usable reference outputs from verify ({why}); {fix}.")
    path = run.path / REFERENCE_OUTPUTS
    try:
        current = record.reference_sha256 == run.manifest["reference"]["sha256"]
        if not current or sha256_file(path) != outputs_record.get("sha256"):
            raise RunDirError(f"`{path}` is stale (an earlier reference model, or changed since verify); {fix}.")
        outputs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise RunDirError(f"`{run.path}` has no usable reference outputs from verify ({type(err).__name__}); "
                          f"{fix}.") from err
    if outputs.shape != (len(run.splits().test), len(run.labels)):
        raise RunDirError(f"`{path}` has shape {outputs.shape}, not the test split's; {fix}.")
    return outputs


def _save_reference(run: Run, reference: np.ndarray) -> dict:
    with atomic_path(run.path / REFERENCE_OUTPUTS) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, reference.astype(np.float32), allow_pickle=False)
        digest = sha256_file(tmp)
    return {"path": REFERENCE_OUTPUTS, "sha256": digest, "shape": list(reference.shape)}


def _open_runners(run: Run, fmt: str, entry: dict, problems: list[str]) -> list[_Runner]:
    """Load ``fmt``'s file once per kernel set of its format; a load failure goes to ``problems``."""
    from featx_edge.runtime import load

    manifest = run.manifest
    # What was measured, so a later reader (bench, report) can tell a stale entry.
    entry["sha256"] = manifest["artifacts"][fmt]["sha256"]
    entry["compared_with"] = f"the run's float Keras reference ({manifest['reference']['path']})"
    problems += _golden_problems(run, fmt)
    # int8 kernels differ between CPUs: bench recommends an int8 file only where it was verified.
    entry["verified_on"] = detect_host()
    runners = []
    for kernels in get_format(fmt).kernel_sets:
        try:
            predictor = load(run.artifact_path(fmt), kernels=None if kernels == "default" else kernels)
        except ModelFileError as err:
            problems.append(str(err))
            return []
        if predictor.labels != run.labels:
            problems.append(f"labels in the model {predictor.labels} differ from the run's")
            return []
        runners.append(_Runner(fmt, kernels, predictor))
    return runners


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


def _refuse_broken_reference(run: Run, report: dict, *, problems: dict, runners: list[_Runner]) -> None:
    """A reference with NaN/Inf outputs fails the whole verify in one line: every comparison with it is
    meaningless. verify.json says so (nothing stale may pass), and no per-image predictions are kept."""
    for fmt, entry in report["formats"].items():
        mine = next((r for r in runners if r.fmt == fmt and r.probs is not None), None)
        if mine is not None:
            entry["nonfinite"] = nonfinite_rows(mine.probs)
        entry["passed"] = False
        entry["failures"] = problems[fmt] + ["not compared: the Keras reference model gives NaN/Inf outputs"]
    report["passed"] = False
    (run.path / PREDICTIONS).unlink(missing_ok=True)
    write_record(run.path, report)
    raise broken_reference(run.path, weights=run.path / run.manifest["reference"]["path"],
                           bad=report["reference_nonfinite"], total=report["images"])


def _run_test_split(run: Run, splits, runners: list[_Runner]) -> np.ndarray:
    """Decode each test batch once; run it through the reference and every runner still working."""
    model = run.reference().model
    reference = []
    batches = bar(iter_batches(splits.root, splits.test, size=run.size, batch_size=BATCH),
                  total=-(-len(splits.test) // BATCH), desc="verifying", unit="batch")
    for batch in batches:
        reference.append(model(batch.astype(np.float32), training=False).numpy())
        for runner in runners:
            if runner.error is not None:
                continue
            t0 = time.perf_counter()
            try:
                # NaN/Inf outputs are kept: verify counts them per image and fails the format
                runner.outputs.append(runner.predictor.predict_pixels(batch, allow_nonfinite=True))
            except (ModelFileError, VerificationError) as err:
                runner.error = str(err)
            runner.seconds += time.perf_counter() - t0
    empty = np.zeros((0, len(run.labels)), np.float32)
    for runner in runners:
        if runner.error is None:
            runner.probs = np.concatenate(runner.outputs) if runner.outputs else empty
    return np.concatenate(reference) if reference else empty


_KERNEL_KEPT = ("nonfinite", "images", "accuracy", "accuracy_change_points", "accuracy_change_ci95_points",
                "top1_agreement", "top1_agreement_ci95", "disagreements", "near_ties", "tie_margin", "near_tie_images",
                "judged_top1_agreement", "judged_top1_agreement_ci95", "judged_accuracy_change_points",
                "judged_accuracy_change_ci95_points", "max_abs_diff", "sqnr_db")


def _judge_format(run: Run, fmt: str, entry: dict, runners: list[_Runner], reference: np.ndarray,
                  labels: np.ndarray, *, limits: Thresholds, problems: list[str],
                  kernels: tuple[str, ...]) -> list[str]:
    """Fill ``entry`` (the first kernel set's metrics at the top, every set under ``kernels``); its failures."""
    spec = get_format(fmt)
    gated = [k for k in spec.kernel_sets if k in kernels] or list(spec.kernel_sets[:1])
    if runners:
        entry["kernels"], entry["kernel_sets_gated"] = {}, gated
    for runner in runners:
        metrics: dict = {}
        mine = [runner.error] if runner.error is not None else _metric_problems(
            fmt, metrics, runner.probs, reference, labels, limits=limits)
        if runner is runners[0]:
            entry.update(metrics)
            entry["seconds"] = round(runner.seconds, 3)
        entry["kernels"][runner.kernels] = {**{k: metrics[k] for k in _KERNEL_KEPT if k in metrics},
                                            "passed": not mine, "failures": mine, "gated": runner.kernels in gated,
                                            "seconds": round(runner.seconds, 3)}
        if runner.kernels in gated:
            named = f" [{runner.kernels} kernels]" if len(runners) > 1 else ""
            problems += [f"{p}{named}" for p in mine]
    if runners and runners[0].error is None:  # a property of the file: checked once, not per kernel set
        first_passed = entry["kernels"][runners[0].kernels]["passed"]
        problems += _claim_problems(run, fmt, entry, metrics_passed=first_passed)
    if len(runners) > 1 and all(r.error is None for r in runners):
        entry["kernel_sets_compared"] = _between_kernel_sets(runners)
    entry["passed"] = not problems
    entry["failures"] = problems
    _log_format(fmt, entry)
    return [f"{fmt}: {p}" for p in problems]


def _between_kernel_sets(runners: list[_Runner]) -> dict:
    """How far the kernel sets are from each other on the same file (information, not a gate)."""
    first = runners[0].probs
    out = {}
    for other in runners[1:]:
        probs = other.probs
        same = int(np.sum(probs.argmax(1) == first.argmax(1)))
        out[f"{runners[0].kernels}_vs_{other.kernels}"] = {
            "top1_same": same / len(first) if len(first) else 1.0,
            "images_differing": len(first) - same,
            "max_abs_diff": float(np.abs(probs - first).max()) if first.size else 0.0}
    return out


def _log_format(fmt: str, entry: dict) -> None:
    parts = []
    for kernels, row in (entry.get("kernels") or {}).items():
        agree = row.get("judged_top1_agreement")
        if agree is not None:
            tie = f" ({row['near_ties']} near-tie)" if row.get("near_ties") else ""
            parts.append(f"{kernels} {agree:.4f}{tie}")
    shown = f"agreement {', '.join(parts)} " if parts else ""
    log.info("%-22s %s%s", fmt, shown, "PASS" if entry["passed"] else "FAIL: " + "; ".join(entry["failures"]))


def _raise_failures(run: Run, failures: list[str], *, images: int) -> None:
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


def _metric_problems(fmt: str, metrics: dict, probs: np.ndarray, reference: np.ndarray, labels: np.ndarray, *,
                     limits: Thresholds) -> list[str]:
    """Fill ``metrics`` with one kernel set's outputs against the reference; their problems against ``limits``."""
    metrics["nonfinite"] = nonfinite_rows(probs)
    if metrics["nonfinite"]:  # argmax "agrees" on NaN and every metric would be NaN: count, never compare
        return [f"{metrics['nonfinite']} of {len(probs)} test images gave NaN/Inf outputs"]
    try:
        metrics.update(compare(probs, reference, labels, tie_margin=tie_margin(fmt, limits)))
    except VerificationError as err:
        return [str(err)]
    return check(metrics, limits)


def _claim_problems(run: Run, fmt: str, entry: dict, *, metrics_passed: bool) -> list[str]:
    """The int8 claims of ``fmt``'s file (recorded in ``entry["integer"]``): integer-only TFLite (checked
    when its metrics passed, as before), and an ONNX int8 graph that really computes in int8."""
    from featx_edge.export.macs import onnx_quantization_report
    from featx_edge.export.tflite import integer_report
    from featx_edge.runtime.metadata import read_tflite

    spec, path = get_format(fmt), run.artifact_path(fmt)
    try:
        if spec.int8 and spec.engine == "litert" and metrics_passed:
            entry["integer"] = integer_report(read_tflite(path)[0])
            if spec.integer_only and (entry["integer"]["float_tensors"]
                                      or entry["integer"]["input_dtype"] not in ("uint8", "int8")):
                return ["not integer-only: " + str(entry["integer"]["float_tensors"][:3])]
        if spec.int8 and spec.engine == "onnxruntime":
            entry["integer"] = onnx_quantization_report(path)
            return _onnx_int8_problems(entry["integer"])
    except (ModelFileError, VerificationError) as err:
        return [str(err)]
    return []


def _onnx_int8_problems(report: dict) -> list[str]:
    """An ``onnx-int8`` file must really compute in int8 (QDQ pairs or integer ops)."""
    if not (report["quantize_nodes"] and report["dequantize_nodes"]) and not report["integer_ops"]:
        return ["not quantized: no QuantizeLinear/DequantizeLinear pairs and no integer ops in the graph"]
    if not report["int8_mac_share"]:
        return ["not quantized: none of the convolutions or matrix products has int8 inputs and weights"]
    return []


def format_table(report: dict, manifest: dict) -> str:
    """The run's table from a verify report: size, test accuracy, change and agreement with 95% intervals.

    Change and agreement are the gate's (near-ties judged as agreeing; their count in the last
    column); a format verified under several kernel sets gets one row per set.
    """
    header = (f"{'format':<22} {'size (MB)':>9} {'test acc':>8} {'change (points) [95% CI]':>26} "
              f"{'agreement [95% CI]':>25}  verify  near-ties")
    lines = [header]
    low, high = report.get("reference_accuracy_ci95") or (None, None)
    ci = f"[{low:.3f}, {high:.3f}]" if low is not None else ""
    lines.append(f"{'keras (reference)':<22} {'':>9} {report['reference_accuracy']:>8.4f} {ci:>26}")
    for fmt, row in report["formats"].items():
        size = manifest.get("artifacts", {}).get(fmt, {}).get("bytes")
        kernel_rows = row.get("kernels") or {}
        if len(kernel_rows) > 1:
            lines.append(f"{fmt:<22} {'' if size is None else f'{size / 1e6:.2f}':>9}"
                         f"{'':>65}  {'pass' if row['passed'] else 'FAIL'}")
            for kernels, sub in kernel_rows.items():
                gated = "" if sub.get("gated", True) else " (not gated)"
                lines.append(_table_row(f"  {kernels} kernels", None, sub, passed=sub["passed"]) + gated)
        else:
            lines.append(_table_row(fmt, size, row, passed=row["passed"]))
    lines.append(f"({report['images']} test images; change and agreement are against the Keras reference "
                 "on the same images; a near-tie is a top-1 change where the reference's two probabilities "
                 "differ by less than the format's numeric noise: listed in verify.json, not counted)")
    if (manifest.get("backbone") or {}).get("weights") == "none":
        lines = [f"{line}  (not meaningful)" if re.search(r"\s(pass|FAIL)(\s|$)", line) else line
                 for line in lines[:-1]] + lines[-1:]
        lines.append("NOT MEANINGFUL: this run was trained with `--weights none` (a frozen backbone with random "
                     "weights), so its accuracy is near chance; pass/FAIL only says the exports match that random "
                     "model. Use it for latency tests, not to judge a model.")
    lines.extend(filter(None, [small_split_note(report)]))
    return "\n".join(lines)


def _table_row(name: str, size: int | None, row: dict, *, passed: bool) -> str:
    acc = row.get("accuracy")
    agree = row.get("judged_top1_agreement", row.get("top1_agreement"))
    change = ""
    change_value = row.get("judged_accuracy_change_points", row.get("accuracy_change_points"))
    if change_value is not None and row.get("accuracy_change_ci95_points"):
        c_low, c_high = row.get("judged_accuracy_change_ci95_points", row["accuracy_change_ci95_points"])
        change = f"{change_value:+.2f} [{c_low:+.2f}, {c_high:+.2f}]"
    agreement = ""
    if agree is not None:
        a_low, a_high = row.get("judged_top1_agreement_ci95", row.get("top1_agreement_ci95"))
        agreement = f"{agree:.4f} [{a_low:.3f}, {a_high:.3f}]"
    ties = row.get("near_ties")
    return (f"{name:<22} {'' if size is None else f'{size / 1e6:.2f}':>9} "
            f"{'' if acc is None else f'{acc:.4f}':>8} {change:>26} {agreement:>25}  "
            f"{'pass' if passed else 'FAIL'}  {'' if not ties else ties:>9}").rstrip()


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
