"""Golden self-test: does this device's runtime reproduce what the model gave at export time?

Export writes ``export/selftest/``: a few held-out images (PNG, already at the model's input
size) and, per model file, the Keras reference's probabilities and the exported model's own
probabilities on the development machine. ``featx-edge selftest MODEL`` runs the model with the
local runtime and checks, for every image, that the top-1 class equals the reference's and that
the probabilities stay within the format's tolerance of the export-time outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx_edge.errors import ModelFileError, VerificationError
from featx_edge.formats import FORMAT_SPECS

SELFTEST_DIR = "selftest"

def tolerance_for(fmt: str) -> float:
    """Largest |probability difference| allowed between this device and the export machine
    (the format registry's ``selftest_tolerance``); a model of an unknown format is refused."""
    if fmt not in FORMAT_SPECS:
        raise VerificationError(f"unknown format `{fmt}` in the self-test file; known: {', '.join(FORMAT_SPECS)}.")
    return FORMAT_SPECS[fmt].selftest_tolerance


def golden_path(model_path: Path) -> Path:
    return model_path.parent / SELFTEST_DIR / f"{model_path.name}.json"


@dataclass(frozen=True)
class SelftestResult:
    model: str
    format: str
    images: int
    max_abs_diff: float
    top1_matches: int
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.top1_matches == self.images and self.max_abs_diff <= self.tolerance


def run_selftest(model_path: str | Path, *, threads: int | None = None) -> SelftestResult:
    """Check ``model_path`` against its golden file; raises VerificationError when it fails."""
    from featx_edge.runtime import load

    model_path = Path(model_path)
    golden_file = golden_path(model_path)
    try:
        golden = json.loads(golden_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(
            f"{golden_file}: no self-test data for this model. Copy the `{SELFTEST_DIR}/` folder that "
            "`featx-edge export` wrote next to the model along with it."
        ) from None
    predictor = load(model_path, threads=threads)
    images = [golden_file.parent / name for name in golden["images"]]
    local = predictor.predict_proba(images)
    expected = np.asarray(golden["expected"], dtype=np.float32)
    reference = np.asarray(golden["reference"], dtype=np.float32)
    fmt = golden["format"]
    result = SelftestResult(
        model=str(model_path), format=fmt, images=len(images),
        max_abs_diff=float(np.abs(local - expected).max()),
        top1_matches=int(np.sum(local.argmax(1) == reference.argmax(1))),
        tolerance=tolerance_for(fmt),
    )
    if not result.passed:
        raise VerificationError(
            f"{model_path}: self-test failed: top-1 matches the reference on {result.top1_matches}/{result.images} "
            f"images; max |dprob| versus export time {result.max_abs_diff:.4g} (tolerance {result.tolerance}). "
            "The local runtime does not reproduce the exported model; check the runtime version."
        )
    return result


def write_golden(model_path: Path, *, fmt: str, images: list[str], reference: np.ndarray,
                 expected: np.ndarray) -> Path:
    """Write the golden file for one model (images already written under ``selftest/``)."""
    from featx_edge.rundir import write_json

    return write_json(golden_path(model_path), {
        "format": fmt, "images": images,
        "reference": np.round(reference.astype(np.float64), 7).tolist(),
        "expected": np.round(expected.astype(np.float64), 7).tolist(),
        "tolerance": tolerance_for(fmt),
    })
