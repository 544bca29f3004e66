"""int8 settings chosen per run on the validation split: bias correction x activation ranges.

Bias correction cancels the mean error of int8 weight rounding; on the sample digits it raised
int8 agreement, on a MobileNetV2 transferred between digit tasks it cost 5 points (issue 21).
Clipped activation ranges (``tflite_ranges``: percentile, MSE-optimal) give finer steps to most
values at the cost of a few outliers. No fixed value of either is right everywhere, so with
``[export] bias_correction = "auto"`` and/or ``activation_ranges = "auto"`` every candidate is
converted to tflite-int8 and judged against the float reference on images that are never the
test split (validation plus calibration-free training images, ``budget.judging_set``), under
every kernel set the format lists. The candidate with the higher worst-kernel-set agreement
wins; equal agreement goes to the one that loses fewer images, then to the simpler candidate.
The choice and the figures that made it are recorded in ``manifest.json`` (``int8_choice``) and
in the int8 files' metadata; the same run, seed and images make the same choice.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from featx_edge.data.folders import map_batches
from featx_edge.fidelity.gate import compare
from featx_edge.formats.registry import get_format, thresholds_for, tie_margin

log = logging.getLogger(__name__)

CHOICE_TRAIN_IMAGES = 500
"""Calibration-free training images that join validation to judge the choice (LiteRT's reference
kernels are slow: every candidate runs under them too)."""


def judge_flatbuffer(flatbuffer: bytes, *, run, judging, fmt: str = "tflite-int8") -> dict:
    """Agreement of an int8 flatbuffer with the reference on the judging set, per kernel set."""
    return {kernels: _judge_kernels(flatbuffer, kernels, run=run, judging=judging, fmt=fmt)
            for kernels in get_format(fmt).kernel_sets}


def _judge_kernels(flatbuffer: bytes, kernels: str, *, run, judging, fmt: str) -> dict:
    """One flatbuffer under one kernel set against the reference on the judging set."""
    from featx_edge.errors import ModelFileError
    from featx_edge.runtime.backends import LiteRTBackend

    limits = thresholds_for(fmt, run.config.verify)
    try:
        backend = LiteRTBackend(flatbuffer, kernels=kernels)
    except ModelFileError as err:  # this kernel set cannot run it: judged as agreeing on nothing
        return {"top1_agreement": 0.0, "images_lost": len(judging.labels), "images_gained": 0, "error": str(err)}
    probs = map_batches(backend.run, run.splits().root, judging.relpaths, size=run.size)
    metrics = compare(probs, judging.reference, judging.labels, tie_margin=tie_margin(fmt, limits))
    return {"top1_agreement": round(metrics["judged_top1_agreement"], 6),
            "images_lost": metrics["images_lost"], "images_gained": metrics["images_gained"]}


def judge_all(candidates: dict[str, bytes], *, run, judging, fmt: str = "tflite-int8") -> dict[str, dict]:
    """``judge_flatbuffer`` of every candidate, the (candidate, kernel set) pairs side by side in threads.

    LiteRT releases the GIL while it computes, so the slow reference-kernel passes of two candidates
    share the cores; each pair sees the same images in the same batches as one after the other.
    """
    pairs = [(name, kernels) for name in candidates for kernels in get_format(fmt).kernel_sets]
    workers = max(1, min(len(pairs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pair: pool.submit(_judge_kernels, candidates[pair[0]], pair[1], run=run, judging=judging,
                                     fmt=fmt) for pair in pairs}
        return {name: {kernels: futures[(name, kernels)].result() for kernels in get_format(fmt).kernel_sets}
                for name in candidates}


def _score(judged: dict) -> tuple[float, int]:
    worst = min(judged.values(), key=lambda row: (row["top1_agreement"], -row["images_lost"]))
    return worst["top1_agreement"], -worst["images_lost"]


def candidate_names(export) -> list[str]:
    """``"bias/ranges"`` names of the int8 candidates ``[export]`` asks for, simplest first.

    ``bias_correction`` gives ``off`` and ``on`` (``"auto"``) or the fixed one; ``activation_ranges``
    gives ``minmax``, ``percentile`` and ``mse`` (``"auto"``) or the fixed one. The order breaks ties:
    the converter's own min/max before clipped ranges, no correction before correction.
    """
    from featx_edge.export.tflite_ranges import RANGE_METHODS

    biases = ("off", "on") if export.bias_correction == "auto" else ("on",) if export.bias_correction else ("off",)
    methods = RANGE_METHODS if export.activation_ranges == "auto" else (export.activation_ranges,)
    return [f"{bias}/{method}" for method in methods for bias in biases]


def choose_int8(candidates: dict[str, bytes], *, run, judging) -> tuple[str, dict]:
    """The best of ``{"bias/ranges": flatbuffer}`` on the judging set, and the record for the manifest."""
    judged = judge_all(candidates, run=run, judging=judging)  # side by side in threads, the same figures
    # max() keeps the first of equals: candidates come simplest first (candidate_names).
    chosen = max(candidates, key=lambda name: _score(judged[name]))
    bias, ranges = chosen.split("/")
    record = {"setting": "bias_correction x activation_ranges", "chosen": chosen, "bias_correction": bias,
              "activation_ranges": ranges, "judged_on": judging.what, "images": len(judging.labels),
              "rule": "highest worst-kernel-set agreement, then fewest images lost, then the simpler candidate "
              "(min/max before clipped ranges, bias correction off before on)", "candidates": judged}
    log.info("  int8 candidate %s chosen (worst-kernel-set agreement on %s: %s)", chosen, judging.what,
             ", ".join(f"{name} {_score(row)[0]:.4f}" for name, row in judged.items()))
    return chosen, record
