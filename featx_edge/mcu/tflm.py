"""Run a ``.tflite`` file through TensorFlow Lite Micro (the ``tflite-micro`` package) and read its arena.

TFLM's reference kernels are what a microcontroller computes: the CMSIS-NN kernels used on
Cortex-M are held bit-exact to them by TFLM's own tests. The model runs in a child process
(``tflm_worker``) that prints the recording allocator's report; the arena is that report's total,
TFLM's own figure for this model, never an estimate. Operators TFLM has no kernel for are read
from its error messages and named. The child's time per image is not a device figure and is not
reported.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx_edge.mcu.tflm_worker import EXIT_NOT_LOADED

ARENA_PATTERN = re.compile(r"Arena allocation total (\d+) bytes")
MISSING_OP_PATTERN = re.compile(r"Didn't find op for (?:builtin|custom) opcode '([^']+)'")
HOST_ARENA = 64 << 20
"""Arena handed to TFLM on the host (the recording allocator reports what the model used of it)."""
ARENA_NOTE = ("TFLM's recording allocator on this 64-bit host; on a 32-bit Cortex-M the interpreter's own "
              "structures are smaller, so the same model needs this much or slightly less")
UNSUPPORTED_FIX = ("TensorFlow Lite Micro has no kernel for {ops}, so the model cannot run on a microcontroller as "
                   "exported: replace the layers that produce these operators (a backbone of the registry exported "
                   "as tflite-int8 uses only supported ones), or write a TFLM kernel for each and add it to the "
                   "application's op resolver")


@dataclass(frozen=True)
class TflmResult:
    """What TFLM made of one model: probabilities on the images, its arena, and why it could not run."""

    probs: np.ndarray | None
    arena_bytes: int | None
    unsupported_ops: tuple[str, ...] = ()
    error: str | None = None
    log: str = field(default="", repr=False)


def require_tflm() -> None:
    """ImportError (named ``tflite_micro``) when the ``[mcu]`` extra is not installed; the CLI names the extra."""
    import tflite_micro  # noqa: F401


def run_tflm(model: Path, pixels: Path, *, images: int, timeout: float | None = None) -> TflmResult:
    """Run ``model`` on the uint8 pixels saved in ``pixels`` (an .npy of ``images`` images), one at a time."""
    out = pixels.with_name(pixels.stem + ".tflm-out.npy")
    timeout = timeout if timeout is not None else 600 + 10 * images
    command = [sys.executable, "-m", "featx_edge.mcu.tflm_worker", str(model), str(pixels), str(out), str(HOST_ARENA)]
    try:
        proc = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return TflmResult(None, None, error=f"TFLM did not finish {images} images in {timeout:.0f} s")
    log = proc.stderr.decode("utf-8", "replace")
    arena = ARENA_PATTERN.search(log)
    missing = tuple(dict.fromkeys(MISSING_OP_PATTERN.findall(log)))
    if proc.returncode != 0 or not out.is_file():
        return TflmResult(None, int(arena.group(1)) if arena else None, unsupported_ops=missing,
                          error=_failure(proc.returncode, log, missing), log=log)
    probs = np.load(out, allow_pickle=False)
    out.unlink()
    if arena is None:
        return TflmResult(probs, None, error="TFLM ran the model but printed no arena report", log=log)
    return TflmResult(probs, int(arena.group(1)), log=log)


def _failure(returncode: int, log: str, missing: tuple[str, ...]) -> str:
    """Why TFLM could not run the model, in one line."""
    if missing:
        return UNSUPPORTED_FIX.format(ops=", ".join(missing))
    if returncode == EXIT_NOT_LOADED:
        lines = [line.strip() for line in log.splitlines() if line.strip() and not line.startswith("featx-edge:")]
        return "TFLM could not prepare the model: " + ("; ".join(lines[-3:]) or "no reason given")[:300]
    if returncode < 0:
        return f"TFLM stopped the process with signal {-returncode} while running the model"
    tail = [line for line in log.splitlines() if line.strip()]
    return f"TFLM failed (exit status {returncode}): {tail[-1][:300] if tail else 'no output'}"
