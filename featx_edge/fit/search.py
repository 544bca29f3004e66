"""The search of ``featx-edge fit``: cut point x image size (x width) under a part's RAM and flash.

Each candidate is first sized, then judged:

1. **Sized** on its architecture: the cut classifier is built without weights and converted to
   full-integer int8 TFLite, the file's bytes are its flash and TFLM's recording allocator gives
   its arena (``parts.tflm_arena``). Weight values do not change an int8 model's tensor sizes, so
   these are the trained model's figures (the final export adds its metadata, and is measured
   again). Before converting, lower bounds prune what cannot fit: every int8 weight takes a byte
   of flash, and an operator's inputs and output are live in the arena together.
2. **Judged** on the validation split, only when it fits: a run is trained in a scratch folder on
   the cached features of the cut (the feature cache is shared with ``train``, so a later run of
   the same cut reuses them) and its validation accuracy is read. The test split is never used
   to choose.

The best is the most accurate fitting candidate; on a tie, the one with the smaller flash, then
arena.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx_edge.backbones.registry import get_backbone
from featx_edge.backbones.weights import resolve_weights
from featx_edge.config import RunConfig, override
from featx_edge.errors import ExportError
from featx_edge.fit.parts import Profile, tflm_arena, vela_ms, verdict

log = logging.getLogger(__name__)

FIT_FORMAT = "tflite-int8"
"""The export a microcontroller runs: full-integer TFLite."""
CALIBRATION_IMAGES = 16
"""Training images that calibrate a candidate's int8 ranges (its size and arena do not depend on them)."""
SIZE_STEPS = (1.0, 0.75, 0.5)
"""Default image sizes: the config's, and these fractions of it (multiples of 16, at least the backbone's minimum)."""


@dataclass(frozen=True)
class Candidate:
    cut_at: str | None  # None: the whole backbone
    size: int
    alpha: float | None

    def label(self) -> str:
        width = f" x{self.alpha}" if self.alpha is not None else ""
        return f"{self.cut_at or '(whole backbone)'} @ {self.size} px{width}"


@dataclass
class Row:
    """One candidate's figures; ``status``: fits, too big, pruned (by the lower bounds) or failed."""

    candidate: Candidate
    status: str = "pending"
    flash_bytes: int | None = None
    arena_bytes: int | None = None
    vela_ms: float | None = None
    val_accuracy: float | None = None
    verdict: dict | None = None
    note: str = ""
    pareto: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def grid(config: RunConfig, *, cuts: tuple[str | None, ...], sizes: tuple[int, ...],
         alphas: tuple[float | None, ...]) -> list[Candidate]:
    """Every (cut, size, alpha); each checked as a ModelConfig (sizes and alphas against the backbone)."""
    out = []
    for alpha in alphas:
        for size in sizes:
            model = override(config, "model", alpha=alpha, image_size=size).model
            out += [Candidate(cut_at=cut, size=model.input_size, alpha=model.alpha) for cut in cuts]
    return out


def default_sizes(config: RunConfig) -> tuple[int, ...]:
    spec, base = get_backbone(config.model.backbone), config.model.input_size
    sizes = [base] + [max(spec.min_size, round(base * f / 16) * 16) for f in SIZE_STEPS[1:]]
    return tuple(dict.fromkeys(sizes))


def default_alphas(config: RunConfig) -> tuple[float | None, ...]:
    """The config's width, and the narrower ones with ImageNet weights (none for a backbone without widths)."""
    spec = get_backbone(config.model.backbone)
    if not spec.has_alpha:
        return (None,)
    alpha = config.model.alpha or 1.0
    return tuple(sorted((a for a in spec.alphas if a <= alpha), reverse=True))


@dataclass(frozen=True)
class Sizing:
    """What sizing needs besides the candidate: the part, the class count, calibration images, an NPU, a folder."""

    profile: Profile
    classes: int
    root: Path  # the data folder, and training images (never validation or test) to calibrate with
    train: tuple[str, ...]
    npu: str | None
    scratch: Path


def size_candidate(config: RunConfig, candidate: Candidate, *, sizing: Sizing) -> Row:
    """Flash and TFLM arena of the candidate's int8 model, and the verdict (step 1).

    Built with the backbone's real weights and a fresh head: random backbone weights make int8
    scales TFLM cannot prepare (it stops the process), where the trained model's are fine.
    """
    from featx_edge.export.calibration import calibration_images
    from featx_edge.export.tflite import TFLiteQuantization, convert
    from featx_edge.formats.registry import get_format
    from featx_edge.training.model import build_classifier

    model_config = dataclasses.replace(config.model, cut_at=candidate.cut_at, image_size=candidate.size,
                                       alpha=candidate.alpha)
    weights = resolve_weights(get_backbone(model_config.backbone), weights=model_config.weights,
                              alpha=model_config.alpha, size=candidate.size)
    model = build_classifier(num_classes=sizing.classes, config=model_config, weights_file=weights,
                             seed=config.seed).model
    row = Row(candidate)
    flash_low, arena_low = lower_bounds(model)
    low = verdict(sizing.profile, arena_bytes=arena_low, model_bytes=flash_low)
    if not low["fits"]:
        row.status, row.verdict, row.note = "pruned", low, f"lower bounds already exceed it: {shortfall(low)}"
        return row
    images = calibration_images(sizing.root, sizing.train, size=candidate.size, count=CALIBRATION_IMAGES,
                                seed=config.seed)
    flatbuffer = convert(model, size=candidate.size, calibration=images.astype(np.float32),
                         quantization=TFLiteQuantization.named(get_format(FIT_FORMAT).quantization))
    path = sizing.scratch / "candidate.tflite"
    path.write_bytes(flatbuffer)
    row.flash_bytes = len(flatbuffer)
    try:
        row.arena_bytes = tflm_arena(path)
    except ExportError as err:  # TFLM cannot run it: it would not run on the part either
        row.status, row.note = "failed", str(err)
        return row
    row.verdict = verdict(sizing.profile, arena_bytes=row.arena_bytes, model_bytes=row.flash_bytes)
    row.status = "fits" if row.verdict["fits"] else "too big"
    if sizing.npu and row.status == "fits":
        row.vela_ms = vela_ms(path, sizing.npu)
    return row


def shortfall(v: dict) -> str:
    """By how much a verdict misses its part, RAM and flash."""
    parts = [f"{kind.upper() if kind == 'ram' else kind} {-v[kind]['margin']:,} B over ({v[kind]['needed']:,} of "
             f"{v[kind]['available']:,} B)" for kind in ("ram", "flash") if v[kind]["margin"] < 0]
    return "; ".join(parts) or "fits"


def lower_bounds(model) -> tuple[int, int]:
    """(flash, arena) lower bounds in bytes of a Keras model's int8 TFLite: one byte per weight of each
    convolution and dense kernel; the largest inputs + output of one operator (all live while it runs)."""
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    weighted = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
    ops = weighted + (keras.layers.Add, keras.layers.ZeroPadding2D, keras.layers.GlobalAveragePooling2D)
    flash, arena = 0, 0
    for layer in model.layers:
        if isinstance(layer, weighted):
            flash += int(np.prod(layer.weights[0].shape))
        if isinstance(layer, ops):
            shapes = layer.input_shape if isinstance(layer.input_shape, list) else [layer.input_shape]
            live = sum(int(np.prod(s[1:])) for s in shapes) + int(np.prod(layer.output_shape[1:]))
            arena = max(arena, live)
    return flash, arena


def judge(config: RunConfig, candidate: Candidate, *, scratch: Path) -> float:
    """The candidate's validation accuracy: a run trained in ``scratch`` on its cached features (step 2)."""
    from featx_edge.training.train import train_run

    trial = override(config, "model", cut_at=candidate.cut_at, image_size=candidate.size, alpha=candidate.alpha)
    trial = override(trial, "train", fine_tune_epochs=0, qat_epochs=0)  # the search trains heads only
    out = scratch / "trial"
    training_log = logging.getLogger("featx_edge.training")
    level = training_log.level
    # A trial's own progress lines (its test accuracy among them) would invite choosing on test: held back.
    training_log.setLevel(max(level, logging.WARNING))
    try:
        return float(train_run(trial, out)["training"]["val_accuracy"])
    finally:
        training_log.setLevel(level)
        shutil.rmtree(out, ignore_errors=True)


def search(config: RunConfig, candidates: list[Candidate], *, profile: Profile, splits, npu: str | None) -> list[Row]:
    """Size every candidate, judge those that fit, mark the Pareto front; rows best first.

    ``splits``: the data folder's split (``data.folders.Splits``), as the candidates' runs make it.
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="featx-edge-fit-") as tmp:
        sizing = Sizing(profile=profile, classes=len(splits.classes), root=splits.root, train=splits.train, npu=npu,
                        scratch=Path(tmp))
        for i, candidate in enumerate(candidates, 1):
            log.info("fit: sizing %d/%d: %s", i, len(candidates), candidate.label())
            rows.append(size_candidate(config, candidate, sizing=sizing))
        fitting = [row for row in rows if row.status == "fits"]
        for i, row in enumerate(fitting, 1):
            log.info("fit: judging %d/%d on the validation split: %s", i, len(fitting), row.candidate.label())
            row.val_accuracy = judge(config, row.candidate, scratch=Path(tmp))
            log.info("fit:   validation accuracy %.4f", row.val_accuracy)
    mark_pareto(fitting)
    return sorted(rows, key=_order)


def mark_pareto(rows: list[Row]) -> None:
    """Mark rows no other row beats on validation accuracy, arena and flash at once."""
    for row in rows:
        row.pareto = not any(_dominates(other, row) for other in rows if other is not row)


def _dominates(a: Row, b: Row) -> bool:
    at_least = (a.val_accuracy >= b.val_accuracy and a.arena_bytes <= b.arena_bytes
                and a.flash_bytes <= b.flash_bytes)
    return at_least and (a.val_accuracy, -a.arena_bytes, -a.flash_bytes) != (b.val_accuracy, -b.arena_bytes,
                                                                            -b.flash_bytes)


def _order(row: Row) -> tuple:
    """Fitting rows first, best first (accuracy, then smaller flash, then arena); then the measured ones that do
    not fit, then those the lower bounds pruned, each smallest first."""
    if row.status == "fits":
        return (0, -row.val_accuracy, row.flash_bytes, row.arena_bytes)
    return (1, row.status == "pruned", row.flash_bytes or 0, row.arena_bytes or 0)


def best(rows: list[Row]) -> Row | None:
    """The chosen candidate: the first fitting row of ``search``'s order."""
    return next((row for row in rows if row.status == "fits"), None)
