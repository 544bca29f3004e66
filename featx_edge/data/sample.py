"""The built-in sample dataset: real handwritten digits that ship with scikit-learn.

scikit-learn's ``load_digits`` holds 1,797 real 8x8 grayscale scans of handwritten digits
(UCI ML hand-written digits). They are written as 32x32 grayscale PNG files, dark ink on
white paper as they were scanned, in three parts:

- ``all/``: all ten digits (``--data sample``): the demo task for an ImageNet backbone;
- ``source/``: digits 0-4, for pretraining a backbone from scratch (``featx-edge pretrain``);
- ``target/``: digits 5-9, a transfer task for a backbone pretrained on ``source``.

``source`` and ``target`` share no class, so a model that classifies ``target`` well with a
frozen backbone pretrained on ``source`` shows that the features transfer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
SAMPLE_SIZE = 32
_MARKER = ".featx-edge-sample-v2"
_OLD_MARKERS = (".featx-edge-sample-v1",)  # earlier layouts of our own cache: rewritten


def featx_home() -> Path:
    """featx-edge's own cache folder: ``$FEATX_EDGE_HOME`` or ``~/.cache/featx-edge`` (sample data, features)."""
    return Path(os.environ.get("FEATX_EDGE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "featx-edge"))


def default_sample_dir() -> Path:
    """Where ``--data sample`` materialises the images (``featx_home()/sample-data``)."""
    return featx_home() / "sample-data"


def write_sample_data(out_dir: str | Path) -> Path:
    """Write the sample dataset to ``out_dir`` (``source/`` and ``target/``) and return it.

    Written into a temporary folder first and renamed, so an interrupted call leaves nothing
    half-written. Re-running on an existing complete copy is a no-op.

    Example:
        >>> root = write_sample_data("data/digits")  # doctest: +SKIP
    """
    from sklearn.datasets import load_digits  # ships its data inside the package: no download

    out_dir = Path(out_dir).expanduser()
    if (out_dir / _MARKER).exists():
        return out_dir
    if any((out_dir / old).exists() for old in _OLD_MARKERS):
        shutil.rmtree(out_dir)  # our own copy in an older layout (no `all/`): write it anew
    if out_dir.exists() and any(out_dir.iterdir()):
        from featx_edge.errors import DataError

        raise DataError(
            f"`{out_dir}` exists and is not empty; choose a new folder for the sample data."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    tmp = Path(tempfile.mkdtemp(prefix=".sample-", dir=out_dir.parent))
    try:
        counters: dict[int, int] = {}
        for image, target in zip(digits.images, digits.target):
            target = int(target)
            part = "source" if target in SOURCE_DIGITS else "target"
            counters[target] = counters.get(target, 0) + 1
            # 0..16 ink levels -> dark ink on white paper, as the forms were scanned; upsampled so
            # the files look like small scans. (White ink on black, scikit-learn's display
            # convention, is a much harder case for int8: see README "int8".)
            pixels = (255 - np.clip(np.round(image * (255.0 / 16.0)), 0, 255)).astype(np.uint8)
            scan = Image.fromarray(pixels).resize((SAMPLE_SIZE, SAMPLE_SIZE), resample=Image.Resampling.BICUBIC)
            for folder in (tmp / part / f"digit_{target}", tmp / "all" / f"digit_{target}"):
                folder.mkdir(parents=True, exist_ok=True)
                scan.save(folder / f"{counters[target]:04d}.png")
        (tmp / _MARKER).write_text("scikit-learn load_digits\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


SAMPLE_PARTS = ("all", "source", "target")


def resolve_data(path: str, *, part: str = "all") -> Path:
    """Map ``"sample"`` (its ``part``) or ``"sample:PART"`` to the materialised sample data;
    any other value is a folder path."""
    if path == "sample" or path.startswith("sample:"):
        if path.startswith("sample:"):
            part = path.split(":", 1)[1]
        if part not in SAMPLE_PARTS:
            from featx_edge.errors import DataError

            raise DataError(f"`--data {path}`: the sample data has the parts {', '.join(SAMPLE_PARTS)}; "
                            f"use e.g. `--data sample:target`.")
        return write_sample_data(default_sample_dir()) / part
    return Path(path).expanduser()
