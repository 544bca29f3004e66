"""Bias correction on or off, chosen per run on the validation split (``[export] bias_correction = "auto"``).

Bias correction cancels the mean error of int8 weight rounding; on the sample digits it raised
int8 agreement, on a MobileNetV2 transferred between digit tasks it cost 5 points (issue 21). No
fixed value is right everywhere, so with ``"auto"`` both candidates are converted to tflite-int8
and judged against the float reference on images that are never the test split (validation plus
calibration-free training images, ``budget.judging_set``), under every kernel set the format
lists. The candidate with the higher worst-kernel-set agreement wins; equal agreement goes to the
one that loses fewer images, then to the uncorrected model (the simpler one). The choice and the
figures that made it are recorded in ``manifest.json`` (``int8_choice``) and in the int8 files'
metadata; the same run, seed and images make the same choice.
"""

from __future__ import annotations

import logging

from featx_edge.data.folders import map_batches
from featx_edge.fidelity.gate import compare
from featx_edge.formats.registry import get_format, thresholds_for, tie_margin

log = logging.getLogger(__name__)

CHOICE_TRAIN_IMAGES = 500
"""Calibration-free training images that join validation to judge the choice (LiteRT's reference
kernels are slow: every candidate runs under them too)."""


def judge_flatbuffer(flatbuffer: bytes, *, run, judging, fmt: str = "tflite-int8") -> dict:
    """Agreement of an int8 flatbuffer with the reference on the judging set, per kernel set."""
    from featx_edge.errors import ModelFileError
    from featx_edge.runtime.backends import LiteRTBackend

    limits = thresholds_for(fmt, run.config.verify)
    out = {}
    for kernels in get_format(fmt).kernel_sets:
        try:
            backend = LiteRTBackend(flatbuffer, kernels=kernels)
        except ModelFileError as err:  # this kernel set cannot run it: judged as agreeing on nothing
            out[kernels] = {"top1_agreement": 0.0, "images_lost": len(judging.labels), "images_gained": 0,
                            "error": str(err)}
            continue
        probs = map_batches(backend.run, run.splits().root, judging.relpaths, size=run.size)
        metrics = compare(probs, judging.reference, judging.labels, tie_margin=tie_margin(fmt, limits))
        out[kernels] = {"top1_agreement": round(metrics["judged_top1_agreement"], 6),
                        "images_lost": metrics["images_lost"], "images_gained": metrics["images_gained"]}
    return out


def _score(judged: dict) -> tuple[float, int]:
    worst = min(judged.values(), key=lambda row: (row["top1_agreement"], -row["images_lost"]))
    return worst["top1_agreement"], -worst["images_lost"]


def choose_bias_correction(candidates: dict[str, bytes], *, run, judging) -> tuple[str, dict]:
    """The better of ``{"off": flatbuffer, "on": flatbuffer}`` on the judging set, and the record."""
    judged = {name: judge_flatbuffer(flatbuffer, run=run, judging=judging) for name, flatbuffer in candidates.items()}
    # max() keeps the first of equals: "off" is listed first, so a tie keeps the uncorrected model.
    chosen = max(candidates, key=lambda name: _score(judged[name]))
    record = {"setting": "bias_correction", "chosen": chosen, "judged_on": judging.what,
              "images": len(judging.labels), "rule": "highest worst-kernel-set agreement, then fewest images "
              "lost, then off", "candidates": judged}
    log.info("  bias correction %s for int8 (agreement on %s: off %.4f, on %.4f)", chosen, judging.what,
             _score(judged["off"])[0], _score(judged["on"])[0])
    return chosen, record
