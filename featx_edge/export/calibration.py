"""One calibration source for every int8 path: a plain list of uint8 image batches.

TFLite's representative dataset and onnxruntime's CalibrationDataReader both read from it,
so both int8 models see the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featx_edge.data.folders import load_images


def calibration_files(train: Sequence[str], *, count: int, seed: int) -> list[str]:
    """The training images int8 calibration uses: up to ``count``, a seeded choice."""
    rng = np.random.default_rng([seed, 7])
    chosen = sorted(rng.choice(len(train), size=min(count, len(train)), replace=False))
    return [train[i] for i in chosen]


def calibration_images(root: Path, train: Sequence[str], *, size: int, count: int, seed: int) -> np.ndarray:
    """Up to ``count`` training images (seeded choice), uint8 (N, size, size, 3)."""
    return load_images(root, calibration_files(train, count=count, seed=seed), size=size)
