"""Real image folders for the benchmarks, from registry packages only (no downloads).

- ``sample``: the README's scanned digits (scikit-learn), dark ink on white.
- ``sample-inverted``: the same scans, white ink on black (scikit-learn's display convention).
- ``fashion``: Fashion-MNIST product photos (Zalando, MIT), from Debian's ``dataset-fashion-mnist``
  package (``apt-get install dataset-fashion-mnist``), a seeded, class-balanced subset of its
  10,000-image test set written as 28 x 28 grayscale PNGs.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")


def inverted_copy(root: Path, out: Path) -> Path:
    """Every PNG under ``root`` as 255 - pixels under ``out``, same relative paths."""
    from PIL import Image

    for src in sorted(root.rglob("*.png")):
        dst = out / src.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as img:
            Image.fromarray(255 - np.asarray(img)).save(dst)
    return out


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_folder(out: Path, *, per_class: int = 180, seed: int = 0) -> Path:
    """``per_class`` Fashion-MNIST test images per class as PNG class folders under ``out``."""
    from PIL import Image

    images_path = FASHION_DIR / "t10k-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise SystemExit(f"{images_path} is missing: `apt-get install dataset-fashion-mnist` (Debian, MIT).")
    images, labels = _idx(images_path), _idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    for cls, name in enumerate(FASHION_CLASSES):
        chosen = rng.permutation(np.flatnonzero(labels == cls))[:per_class]
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in sorted(chosen):
            Image.fromarray(images[i]).save(out / name / f"{i:05d}.png")
    return out
