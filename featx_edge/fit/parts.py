"""What ``fit`` needs of ``featx_edge.mcu``, behind one function each: a profile and its verdict, TFLM's
arena for a model file, Vela's time.

The profiles, reserves and verdict are ``featx-edge mcu``'s (``mcu.profiles``), so a model ``fit``
finds fitting is one ``featx-edge mcu --profile`` accepts. The arena is TensorFlow Lite Micro's own
figure (``mcu.tflm``: its recording allocator, in a child process), never an estimate.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from featx_edge.errors import ExportError
from featx_edge.mcu.profiles import KIB, Profile, get_profile
from featx_edge.mcu.profiles import fit as _fit

__all__ = ["KIB", "Profile", "get_profile", "tflm_arena", "vela_ms", "verdict"]


def verdict(profile: Profile, *, arena_bytes: int, model_bytes: int) -> dict:
    """Arena + runtime reserve within RAM and model + code reserve within flash, both margins (``mcu.profiles.fit``)."""
    return _fit(profile, arena_bytes=arena_bytes, model_bytes=model_bytes)


def tflm_arena(model: Path) -> int:
    """TFLM's recording-allocator arena for ``model`` (bytes), after one inference on a blank image.

    Raises:
        ExportError: TFLM could not run the model (the reason in one line).
    """
    from ai_edge_litert.interpreter import Interpreter

    from featx_edge.mcu.tflm import require_tflm, run_tflm

    require_tflm()  # ImportError naming tflite_micro: the CLI names the [mcu] extra
    shape = Interpreter(model_path=str(model)).get_input_details()[0]["shape"]
    with tempfile.TemporaryDirectory(prefix="featx-edge-fit-tflm-") as tmp:
        pixels = Path(tmp) / "blank.npy"
        np.save(pixels, np.zeros((1, *shape[1:]), np.uint8), allow_pickle=False)
        result = run_tflm(Path(model), pixels, images=1)
    if result.arena_bytes is None or result.error:
        raise ExportError(f"TensorFlow Lite Micro could not run `{model}`: {result.error or 'no arena report'}.")
    return result.arena_bytes


def vela_ms(model: Path, accelerator: str) -> float:
    """Vela's estimated time per inference on ``accelerator`` (ms; its performance model, an estimate)."""
    from featx_edge.mcu.vela import compile_for

    with tempfile.TemporaryDirectory(prefix="featx-edge-fit-vela-") as tmp:
        return float(compile_for(Path(model), accelerator, out=Path(tmp) / "model.vela.tflite")["inference_ms"])
