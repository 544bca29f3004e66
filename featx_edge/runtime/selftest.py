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

from featx_edge.errors import ImageError, ModelFileError, NonFiniteOutputError, VerificationError
from featx_edge.files.atomic import inside, sha256_file
from featx_edge.formats.registry import FORMAT_SPECS
from featx_edge.runtime.predictor import nonfinite_rows

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


MAX_GOLDEN_BYTES = 64 << 20
"""A golden file holds a few images' probabilities (kilobytes); anything this large is not one."""
MAX_GOLDEN_IMAGES = 1000  # export writes `[export] reference_images` of them, at most 1000


@dataclass(frozen=True)
class Golden:
    """A checked golden file: the format, the image paths (relative to it) and both sets of outputs."""

    format: str
    images: tuple[str, ...]
    reference: np.ndarray  # (images, classes), the Keras reference at export time
    expected: np.ndarray  # (images, classes), the exported model on the export machine
    model_sha256: str | None = None  # the model file the outputs were recorded for


def run_selftest(model_path: str | Path, *, threads: int | None = None) -> SelftestResult:
    """Check ``model_path`` against its golden file.

    Raises:
        ConfigError: ``threads`` is not a positive integer.
        ModelFileError: the model, its golden file or a golden image is missing or damaged
            (named, with what to copy again).
        VerificationError: the local runtime does not reproduce the export-time outputs.
    """
    from featx_edge.runtime import load
    from featx_edge.runtime.predictor import check_threads

    check_threads(threads)  # before any file is read
    model_path = Path(model_path)
    golden_file = golden_path(model_path)
    golden = read_golden(golden_file)
    predictor = load(model_path, threads=threads)
    if golden.model_sha256 is not None and golden.model_sha256 != sha256_file(model_path):
        raise ModelFileError(f"{golden_file}: written for another export of this model (its sha256 differs from "
                             f"`{model_path}`); copy the model and its `{SELFTEST_DIR}/` folder from the same export, "
                             "or re-export.")
    if golden.expected.shape[1] != len(predictor.labels):
        found = f"it has {golden.expected.shape[1]} outputs per image, the model {len(predictor.labels)} classes"
        raise _damaged(golden_file, [f"{found}: it belongs to another model"])
    local = _local_outputs(predictor, golden_file, golden.images)
    bad = nonfinite_rows(local)
    if bad:  # NaN compares unequal to everything, but its argmax is still a class: name it, never pass it
        raise NonFiniteOutputError(
            f"{model_path}: self-test failed: {bad} of {len(local)} self-test images gave NaN/Inf outputs: the model "
            f"is broken (for example a NaN weight); re-export it and copy it with its `{SELFTEST_DIR}/` folder again."
        )
    result = SelftestResult(
        model=str(model_path), format=golden.format, images=len(golden.images),
        max_abs_diff=float(np.abs(local - golden.expected).max()),
        top1_matches=int(np.sum(local.argmax(1) == golden.reference.argmax(1))),
        tolerance=tolerance_for(golden.format),
    )
    if not result.passed:
        raise VerificationError(
            f"{model_path}: self-test failed: top-1 matches the reference on {result.top1_matches}/{result.images} "
            f"images; max |dprob| versus export time {result.max_abs_diff:.4g} (tolerance {result.tolerance}). "
            "The local runtime does not reproduce the exported model; check the runtime version."
        )
    return result


def read_golden(path: Path) -> Golden:
    """Read and check a golden file: every problem named in one ModelFileError, nothing left to crash on."""
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise _damaged(path, [f"it holds a JSON {type(raw).__name__}, not an object"])
    problems: list[str] = []
    fmt = raw.get("format")
    if not isinstance(fmt, str) or fmt not in FORMAT_SPECS:
        problems.append(f"`format` must be one of {', '.join(FORMAT_SPECS)}; found {fmt!r}")
    images = raw.get("images")
    if not isinstance(images, list) or not 0 < len(images) <= MAX_GOLDEN_IMAGES or not all(map(inside, images)):
        problems.append(f"`images` must be a list of 1 to {MAX_GOLDEN_IMAGES} paths inside the self-test folder")
        images = None
    else:
        missing = [name for name in images if not _is_file(path.parent / name)]
        if missing:
            problems.append(f"lists {len(missing)} image(s) that are missing, e.g. `{missing[0]}`")
    arrays = {key: _matrix(raw.get(key), rows=len(images) if images else None, key=key, problems=problems)
              for key in ("reference", "expected")}
    if all(a is not None for a in arrays.values()) and arrays["reference"].shape != arrays["expected"].shape:
        problems.append("`reference` and `expected` differ in shape")
    model_sha256 = raw.get("model_sha256")
    if model_sha256 is not None and not (isinstance(model_sha256, str) and len(model_sha256) == 64):
        problems.append("`model_sha256` is not a sha256 hex digest")
    if problems:
        raise _damaged(path, problems)
    return Golden(format=fmt, images=tuple(images), reference=arrays["reference"], expected=arrays["expected"],
                  model_sha256=model_sha256)


def written_for(golden: Golden, *, fmt: str, sha256: str) -> bool:
    """Whether ``golden`` was recorded for this export: its format, and its model's sha256 (a file
    from before golden files recorded one is taken on trust)."""
    return golden.format == fmt and golden.model_sha256 in (None, sha256)


def _read_json(path: Path):
    try:
        size = path.stat().st_size
        if size > MAX_GOLDEN_BYTES:
            raise _damaged(path, [f"it is {size} bytes; a self-test file is a few kilobytes"])
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise ModelFileError(
            f"{path}: no self-test data for this model. Copy the `{SELFTEST_DIR}/` folder that "
            "`featx-edge export` wrote next to the model along with it."
        ) from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read the self-test file ({err.strerror or err})") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, [f"it is not valid JSON ({err})"]) from err


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the system
        return False


def _no_constant(name: str):
    raise ValueError(f"`{name}` is not a JSON number")


def _matrix(value, *, rows: int | None, key: str, problems: list[str]) -> np.ndarray | None:
    """``value`` as a float32 (rows, classes) array of finite numbers; None (and a problem) otherwise."""
    ok = (isinstance(value, list) and value and all(isinstance(row, list) and row for row in value)
          and len({len(row) for row in value}) == 1
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and _finite(x) for row in value for x in row))
    if not ok:
        problems.append(f"`{key}` must be a list of equally long lists of finite numbers")
        return None
    if rows is not None and len(value) != rows:
        problems.append(f"`{key}` has {len(value)} rows for {rows} images")
        return None
    return np.asarray(value, dtype=np.float32)


def _finite(x: float) -> bool:
    try:
        return bool(np.isfinite(float(x)))
    except OverflowError:  # an integer too large for a float
        return False


def _local_outputs(predictor, golden_file: Path, images: tuple[str, ...]) -> np.ndarray:
    """This device's probabilities for the golden images; an unreadable image is a damaged copy."""
    try:
        return predictor.predict_proba([golden_file.parent / name for name in images], allow_nonfinite=True)
    except ImageError as err:
        raise ModelFileError(
            f"{golden_file}: a self-test image is unreadable ({err}). Copy the `{SELFTEST_DIR}/` folder that "
            "`featx-edge export` wrote again."
        ) from err


def _damaged(path: Path, problems: list[str]) -> ModelFileError:
    return ModelFileError(
        f"{path}: the self-test file is damaged: {'; '.join(problems)}. Copy the `{SELFTEST_DIR}/` folder that "
        "`featx-edge export` wrote next to the model again."
    )


def write_golden(model_path: Path, *, fmt: str, images: list[str], reference: np.ndarray,
                 expected: np.ndarray) -> Path:
    """Write the golden file for one model (images already written under ``selftest/``).

    Raises:
        NonFiniteOutputError: ``reference`` or ``expected`` holds a NaN or an Inf (a broken model:
            a golden file of NaN would be invalid JSON and could never pass).
    """
    from featx_edge.files.atomic import write_json

    for what, outputs in (("the Keras reference", reference), (f"the {fmt} export", expected)):
        bad = nonfinite_rows(outputs)
        if bad:
            raise NonFiniteOutputError(
                f"{model_path}: {what} gave NaN/Inf outputs on {bad} of {len(outputs)} self-test images, so no "
                "self-test file was written: the model is broken (for example a NaN weight); train the run again."
            )
    return write_json(golden_path(model_path), {
        "format": fmt, "images": images, "model_sha256": sha256_file(model_path),
        "reference": np.round(reference.astype(np.float64), 7).tolist(),
        "expected": np.round(expected.astype(np.float64), 7).tolist(),
        "tolerance": tolerance_for(fmt),
    })
