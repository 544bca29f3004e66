"""Verify every exported model against the Keras reference on the held-out test split.

Artifacts run through the device runtime (``featx_edge.runtime``), so what is verified is what
a device runs. Every failure is collected, written to ``RUN/verify.json``, then raised as one
VerificationError listing each failing format with the measured value and the threshold.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from featx_edge.errors import ModelFileError, VerificationError
from featx_edge.formats import Thresholds, get_format, merge_overrides, ordered, thresholds_for
from featx_edge.intervals import paired_difference, wilson
from featx_edge.rundir import VERIFY, artifact_problems, read_manifest, write_json


def compare(probs: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    """Fidelity metrics of ``probs`` against ``reference`` (both (N, C) probabilities)."""
    if probs.shape != reference.shape:
        raise VerificationError(f"output shape {probs.shape} differs from the reference's {reference.shape}")
    delta = np.abs(probs.astype(np.float64) - reference.astype(np.float64))
    noise = float(np.sum(delta ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    norms = np.linalg.norm(probs, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = np.sum(probs.astype(np.float64) * reference, axis=1) / np.maximum(norms, 1e-12)
    n = len(labels)
    right = probs.argmax(1) == labels
    reference_right = reference.argmax(1) == labels
    agree = int(np.sum(probs.argmax(1) == reference.argmax(1)))
    gained, lost = int(np.sum(right & ~reference_right)), int(np.sum(~right & reference_right))
    accuracy = float(np.mean(right)) if n else 0.0
    reference_accuracy = float(np.mean(reference_right)) if n else 0.0
    change_low, change_high = paired_difference(gained, lost, n)
    return {
        "images": n,
        "accuracy": accuracy,
        "accuracy_ci95": list(wilson(int(np.sum(right)), n)),
        "reference_accuracy": reference_accuracy,
        "accuracy_change_points": 100.0 * (accuracy - reference_accuracy),
        "accuracy_change_ci95_points": [100.0 * change_low, 100.0 * change_high],
        "images_gained": gained,
        "images_lost": lost,
        "top1_agreement": agree / n if n else 1.0,
        "top1_agreement_ci95": list(wilson(agree, n)),
        "disagreements": n - agree,
        "max_abs_diff": float(delta.max()) if delta.size else 0.0,
        "mean_abs_diff": float(delta.mean()) if delta.size else 0.0,
        "cosine_similarity": float(cosine.mean()) if cosine.size else 1.0,
        "sqnr_db": float("inf") if noise == 0 else 10.0 * np.log10(signal / noise),
    }


def check(metrics: dict, limits: Thresholds) -> list[str]:
    """Human-readable failures of ``metrics`` against ``limits`` (empty: pass)."""
    failures = []
    if limits.min_agreement is not None and metrics["top1_agreement"] < limits.min_agreement:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {limits.min_agreement}")
    if limits.max_accuracy_drop is not None and -metrics["accuracy_change_points"] > limits.max_accuracy_drop + 1e-9:
        failures.append(f"accuracy drop {-metrics['accuracy_change_points']:.2f} points > {limits.max_accuracy_drop}")
    if limits.max_abs_diff is not None and metrics["max_abs_diff"] > limits.max_abs_diff:
        failures.append(f"max |dprob| {metrics['max_abs_diff']:.3g} > {limits.max_abs_diff}")
    if limits.min_sqnr_db is not None and metrics["sqnr_db"] < limits.min_sqnr_db:
        failures.append(f"SQNR {metrics['sqnr_db']:.1f} dB < {limits.min_sqnr_db}")
    return failures


def verify_run(run: str | Path, *, formats: tuple[str, ...] | None = None,
               overrides: dict[str, dict[str, float]] | None = None, progress: bool = True) -> dict:
    """Verify the run's artifacts; writes ``RUN/verify.json`` and raises on any failure.

    Example:
        >>> report = verify_run("runs/demo")  # doctest: +SKIP
        >>> report["formats"]["tflite-int8"]["top1_agreement"]  # doctest: +SKIP
    """
    from featx_edge.data import load_images
    from featx_edge.export.tflite import integer_report
    from featx_edge.macs import onnx_quantization_report
    from featx_edge.run import load_reference, load_run_splits
    from featx_edge.runtime import load
    from featx_edge.runtime.metadata import read_tflite
    from featx_edge.train import predict_pixels_keras

    run = Path(run)
    manifest = read_manifest(run)
    # The run's own [verify] settings, then this call's.
    overrides = merge_overrides(manifest.get("config", {}).get("verify", {}), overrides)
    artifacts = manifest.get("artifacts", {})
    formats = tuple(formats) if formats else tuple(ordered(artifacts))
    if not formats:
        raise VerificationError(f"`{run}` has no exported models; run `featx-edge export {run}` first.")
    splits = load_run_splits(run, manifest)
    size = manifest["input"]["height"]
    pixels = load_images(splits.root, splits.test, size=size)
    labels = splits.labels("test")
    reference = predict_pixels_keras(load_reference(run, manifest).model, pixels)
    reference_right = int(np.sum(reference.argmax(1) == labels))
    report: dict = {"run": str(run), "images": len(labels),
                    "reference_accuracy": reference_right / max(len(labels), 1),
                    "reference_accuracy_ci95": list(wilson(reference_right, len(labels))),
                    "reference_sha256": manifest["reference"]["sha256"], "formats": {}}
    failures: list[str] = []
    for fmt in formats:
        limits = thresholds_for(fmt, overrides)
        entry: dict = {"thresholds": dataclasses.asdict(limits)}
        report["formats"][fmt] = entry
        problems = artifact_problems(run, manifest, fmt)
        if not problems:
            t0 = time.perf_counter()
            path = run / artifacts[fmt]["path"]
            # What was measured, so a later reader (bench, report) can tell a stale entry.
            entry["sha256"] = artifacts[fmt]["sha256"]
            entry["compared_with"] = f"the run's float Keras reference ({manifest['reference']['path']})"
            try:
                predictor = load(path)
                if predictor.labels != manifest["labels"]:
                    problems.append(f"labels in the model {predictor.labels} differ from the run's")
                else:
                    probs = predictor.predict_pixels(pixels)
                    entry.update(compare(probs, reference, labels))
                    problems += check(entry, limits)
                spec = get_format(fmt)
                if spec.int8 and spec.engine == "litert" and not problems:
                    entry["integer"] = integer_report(read_tflite(path)[0])
                    if spec.integer_only and (entry["integer"]["float_tensors"]
                                              or entry["integer"]["input_dtype"] not in ("uint8", "int8")):
                        problems.append("not integer-only: " + str(entry["integer"]["float_tensors"][:3]))
                if spec.int8 and spec.engine == "onnxruntime":
                    entry["integer"] = onnx_quantization_report(path)
                    problems += _onnx_int8_problems(entry["integer"])
            except (ModelFileError, VerificationError) as err:
                problems.append(str(err))
            entry["seconds"] = round(time.perf_counter() - t0, 3)
        entry["passed"] = not problems
        entry["failures"] = problems
        failures += [f"{fmt}: {p}" for p in problems]
        if progress:
            status = "PASS" if not problems else "FAIL: " + "; ".join(problems)
            agree = entry.get("top1_agreement")
            shown = "" if agree is None else (f"agreement {agree:.4f} [{entry['top1_agreement_ci95'][0]:.3f}, "
                                              f"{entry['top1_agreement_ci95'][1]:.3f}] ")
            print(f"{fmt:<22} {shown}{status}", flush=True)
    report["passed"] = not failures
    write_json(run / VERIFY, report)
    if failures:
        remedy = ""
        if any(get_format(f.split(":")[0]).int8 for f in failures):
            remedy = (f"\nFor int8: try `featx-edge export {run} --int8-budget 1.0 --qat-epochs 2` (tries the "
                      "selective and QAT variants, keeps the first within budget), ship tflite-float16 or "
                      "tflite-dynamic instead, or accept a looser limit knowingly with "
                      "`--threshold FORMAT.METRIC=VALUE`. README \"int8\" lists what moves int8 fidelity.")
        raise VerificationError(
            f"{len(failures)} check(s) failed on {len(labels)} test images (details in {run / VERIFY}):\n  "
            + "\n  ".join(failures) + remedy
        )
    return report


def _onnx_int8_problems(report: dict) -> list[str]:
    """An ``onnx-int8`` file must really compute in int8 (QDQ pairs or integer ops)."""
    if not (report["quantize_nodes"] and report["dequantize_nodes"]) and not report["integer_ops"]:
        return ["not quantized: no QuantizeLinear/DequantizeLinear pairs and no integer ops in the graph"]
    if not report["int8_mac_share"]:
        return ["not quantized: none of the convolutions or matrix products has int8 inputs and weights"]
    return []
