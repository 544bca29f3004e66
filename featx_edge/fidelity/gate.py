"""Fidelity metrics of an exported model's probabilities against the reference's, and the pass check.

Pure NumPy: verify, the int8 budget and the benchmarks all measure agreement this one way.
"""

from __future__ import annotations

import numpy as np

from featx_edge.errors import NonFiniteOutputError, VerificationError
from featx_edge.fidelity.intervals import paired_difference, wilson
from featx_edge.formats.registry import Thresholds

MAX_LISTED_TIES = 50
"""Near-ties listed by image in a report (all are counted)."""


def compare(probs: np.ndarray, reference: np.ndarray, labels: np.ndarray, *, tie_margin: float = 0.0) -> dict:
    """Fidelity metrics of ``probs`` against ``reference`` (both (N, C) probabilities).

    ``tie_margin``: a top-1 change where the reference's own probabilities of the two classes
    involved differ by at most this is a near-tie (``formats.tie_margin``): counted and listed,
    and judged as agreeing in the ``judged_*`` figures the gate uses. The plain figures
    (``top1_agreement``, ``accuracy_change_points``) count every change.
    """
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
        **_judged(probs, reference, labels, tie_margin=tie_margin),
    }


def _judged(probs: np.ndarray, reference: np.ndarray, labels: np.ndarray, *, tie_margin: float) -> dict:
    """Agreement and accuracy change with near-ties judged as agreeing, and the near-ties themselves."""
    n = len(labels)
    ref_top, top = reference.argmax(1), probs.argmax(1)
    rows = np.arange(n)
    margin = reference[rows, ref_top].astype(np.float64) - reference[rows, top].astype(np.float64)
    tie = (top != ref_top) & (margin <= tie_margin)
    judged = np.where(tie, ref_top, top)
    right, reference_right = judged == labels, ref_top == labels
    agree = int(np.sum(judged == ref_top))
    gained, lost = int(np.sum(right & ~reference_right)), int(np.sum(~right & reference_right))
    change_low, change_high = paired_difference(gained, lost, n)
    listed = [{"image": int(i), "reference_class": int(ref_top[i]), "export_class": int(top[i]),
               "reference_margin": float(margin[i])} for i in np.flatnonzero(tie)[:MAX_LISTED_TIES]]
    return {
        "tie_margin": float(tie_margin),
        "near_ties": int(np.sum(tie)),
        "near_tie_images": listed,
        "judged_top1_agreement": agree / n if n else 1.0,
        "judged_top1_agreement_ci95": list(wilson(agree, n)),
        "judged_accuracy_change_points": 100.0 * (gained - lost) / n if n else 0.0,
        "judged_accuracy_change_ci95_points": [100.0 * change_low, 100.0 * change_high],
    }


def check(metrics: dict, limits: Thresholds) -> list[str]:
    """Human-readable failures of ``metrics`` against ``limits`` (empty: pass)."""
    failures = []
    agreement = metrics.get("judged_top1_agreement", metrics["top1_agreement"])
    change = metrics.get("judged_accuracy_change_points", metrics["accuracy_change_points"])
    ties = metrics.get("near_ties", 0)
    beside = f" ({ties} near-tie(s) within {metrics['tie_margin']:.3g} not counted)" if ties else ""
    if limits.min_agreement is not None and agreement < limits.min_agreement:
        failures.append(f"top-1 agreement {agreement:.4f} < {limits.min_agreement}{beside}")
    if limits.max_accuracy_drop is not None and -change > limits.max_accuracy_drop + 1e-9:
        failures.append(f"accuracy drop {-change:.2f} points > {limits.max_accuracy_drop}{beside}")
    if limits.max_abs_diff is not None and metrics["max_abs_diff"] > limits.max_abs_diff:
        failures.append(f"max |dprob| {metrics['max_abs_diff']:.3g} > {limits.max_abs_diff}")
    if limits.min_sqnr_db is not None and metrics["sqnr_db"] < limits.min_sqnr_db:
        failures.append(f"SQNR {metrics['sqnr_db']:.1f} dB < {limits.min_sqnr_db}")
    return failures


def broken_reference(run, *, weights: str, bad: int, total: int) -> NonFiniteOutputError:
    """The one-line error for a Keras reference that gives NaN/Inf on ``bad`` of ``total`` test images:
    nothing can be judged against it (argmax "agrees" on NaN), so the run must be trained again."""
    return NonFiniteOutputError(
        f"the Keras reference model `{weights}` gives NaN/Inf outputs on {bad} of {total} test images: it is broken "
        "(for example a NaN weight, or non-finite features in training), so no export can be judged against it; "
        f"train the run again (`featx-edge train --out {run} --overwrite` with its --data and settings), then "
        "export and verify."
    )
