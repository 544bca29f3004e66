"""The int8 budget (``--int8-budget POINTS``): try int8 variants in order, keep the first that loses
at most that many accuracy points against the reference on images that are never the test split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from featx_edge.data.folders import label_of, map_batches
from featx_edge.export.calibration import calibration_files
from featx_edge.fidelity.gate import compare
from featx_edge.fidelity.intervals import wilson
from featx_edge.formats.registry import budget_candidates, thresholds_for
from featx_edge.training.train import predict_probs

log = logging.getLogger(__name__)

JUDGE_TRAIN_IMAGES = 2000
"""At most this many calibration-free training images join validation to judge int8 variants."""


@dataclass(frozen=True)
class JudgingSet:
    """Images for int8 choices: relative paths, labels, the reference's probabilities, a description."""

    relpaths: tuple[str, ...]
    labels: np.ndarray
    reference: np.ndarray
    what: str


def judging_set(run, *, train_images: int = JUDGE_TRAIN_IMAGES) -> JudgingSet:
    """Validation plus calibration-free training images (never test).

    Training images that calibrated the int8 models are left out: their ranges were fit on them.
    The reference's probabilities are computed batch by batch; no pixels are kept.
    """
    config, splits = run.config, run.splits()
    calibrated = set(calibration_files(splits.train, count=config.export.calibration_images, seed=config.seed))
    free = [p for p in splits.train if p not in calibrated]
    rng = np.random.default_rng([config.seed, 11])
    free = [free[i] for i in sorted(rng.permutation(len(free))[:train_images])]
    train_labels = np.array([splits.classes.index(label_of(p)) for p in free], dtype=np.int64)
    relpaths = (*splits.val, *free)
    reference = predict_probs(run.reference().model, splits.root, relpaths, size=run.size,
                              desc="reference on the judging set")
    return JudgingSet(relpaths=relpaths, labels=np.concatenate([splits.labels("val"), train_labels]),
                      reference=reference,
                      what=f"{len(splits.val)} validation + {len(free)} calibration-free training images")


def judge(run, judging: JudgingSet, fmt: str, *, budget: float) -> dict:
    """How far an exported int8 format strays from the reference on the judging set.

    Only losses count: an image the reference gets right and the candidate gets wrong.
    Images the candidate "gains" are disagreements too, not credit; choosing a variant
    because it scored higher than the reference would be choosing noise.
    """
    from featx_edge.runtime import load

    predictor = load(run.artifact_path(fmt))
    probs = map_batches(predictor.predict_pixels, run.splits().root, judging.relpaths, size=run.size,
                        desc=f"judging {fmt}")
    metrics = compare(probs, judging.reference, judging.labels)
    n, lost = metrics["images"], metrics["images_lost"]
    loss_low, loss_high = wilson(lost, n)
    min_agreement = thresholds_for(fmt, run.config.verify).min_agreement
    attempt = {"format": fmt, "images": n, "judged_on": judging.what,
               **{key: metrics[key] for key in ("top1_agreement", "top1_agreement_ci95", "images_lost",
                                                "images_gained")},
               "loss_points": 100.0 * lost / n, "loss_ci95_points": [100.0 * loss_low, 100.0 * loss_high],
               "min_agreement": min_agreement}
    attempt["within_budget"] = bool(attempt["loss_points"] <= budget
                                    and (min_agreement is None or attempt["top1_agreement"] >= min_agreement))
    return attempt


def choose_int8(run, *, budget: float, export: Callable[[str], dict]) -> dict:
    """Try plain int8, then selective, then QAT (when enabled); keep the first within budget.

    ``export(fmt)`` makes a variant the run does not have yet. The decision is recorded in the
    manifest (``int8_selection``).
    """
    candidates = budget_candidates(qat=bool(run.config.train.qat_epochs))
    judging = judging_set(run)
    attempts = []
    chosen = None
    for fmt in candidates:
        if fmt not in run.manifest.get("artifacts", {}):
            export(fmt)
        attempt = judge(run, judging, fmt, budget=budget)
        attempts.append(attempt)
        log.info("  int8 budget %s points: %s loses %d of %d images the reference gets right (%.2f points), "
                 "agreement %.4f -> %s", budget, fmt, attempt["images_lost"], attempt["images"],
                 attempt["loss_points"], attempt["top1_agreement"],
                 "OK" if attempt["within_budget"] else "over budget")
        if attempt["within_budget"]:
            chosen = fmt
            break
    decision = {"budget_points": budget, "judged_on": judging.what, "attempts": attempts,
                "chosen": chosen, "criterion": "images lost versus the reference (gains are not credited), "
                                               "and top-1 agreement at least the format's verify threshold"}
    if chosen is None:
        decision["note"] = ("no int8 variant met the budget" +
                            ("" if run.config.train.qat_epochs else "; enable QAT with --qat-epochs N"))
        log.info("  %s", decision["note"])
    run.manifest["int8_selection"] = decision
    run.save()
    return decision


def budget_failure(manifest: dict) -> str | None:
    """The message for a missed ``--int8-budget`` (None when met or not asked for)."""
    decision = manifest.get("int8_selection")
    if not decision or decision.get("chosen"):
        return None
    rows = "\n  ".join(f"{a['format']}: lost {a['images_lost']} of {a['images']} images "
                       f"({a['loss_points']:.2f} points, 95% CI {a['loss_ci95_points'][0]:.2f}-"
                       f"{a['loss_ci95_points'][1]:.2f}), agreement {a['top1_agreement']:.4f}"
                       for a in decision["attempts"])
    return (f"no int8 variant met `--int8-budget {decision['budget_points']}` "
            f"(judged on {decision['judged_on']}):\n  {rows}\n"
            "Enable quantization-aware training with `--qat-epochs N`, raise `[export] calibration_images`, "
            "or ship a float16 / dynamic-range export.")
