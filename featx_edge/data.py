"""Scan and validate an image folder, split it, and stream resized pixels.

The folder layout is Keras's ``image_dataset_from_directory`` one: ``ROOT/<class>/<image>``
(images may sit in nested folders under their class folder). Every file is decoded once
with Pillow before training; files that fail are skipped and listed, never a crash mid-epoch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx_edge.errors import DataError, ImageError
from featx_edge.progress import bar
from featx_edge.rundir import inside
from featx_edge.runtime.image import load_pixels, open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
MIN_IMAGES_PER_CLASS = 3  # one each for train, validation and test


@dataclass(frozen=True)
class SkippedFile:
    path: str  # relative to the data folder
    reason: str


@dataclass(frozen=True)
class ImageFolder:
    """A validated image folder: usable files per class, and what was skipped and why."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, tuple[str, ...]]  # class -> relative paths (posix), sorted
    skipped: tuple[SkippedFile, ...]

    @property
    def num_images(self) -> int:
        return sum(len(v) for v in self.files.values())


@dataclass(frozen=True)
class Splits:
    """A stratified train/val/test split of an ImageFolder, by relative path."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int

    def labels(self, split: str) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[label_of(p)] for p in getattr(self, split)], dtype=np.int64)

    def to_json(self) -> dict:
        return {
            "data_root": str(self.root),
            "classes": list(self.classes),
            "seed": self.seed,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
        }


def label_of(relpath: str) -> str:
    """Class name of a relative path: its first folder."""
    return relpath.split("/", 1)[0]


def scan_folder(root: str | Path, *, min_per_class: int = MIN_IMAGES_PER_CLASS) -> ImageFolder:
    """Find and decode every image under ``root/<class>/``; skip and list the bad ones.

    Raises:
        DataError: the folder is missing, has no class folders, fewer than two usable
            classes, or a class with fewer than ``min_per_class`` usable images.

    Example:
        >>> folder = scan_folder("data/flowers")  # doctest: +SKIP
        >>> folder.classes, len(folder.skipped)  # doctest: +SKIP
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data folder `{root}` does not exist or is not a folder. Pass a folder with one "
            "sub-folder per class (e.g. data/cat/1.jpg, data/dog/2.jpg), or `--data sample`."
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"data folder `{root}` has no class sub-folders. Put each class's images in its own "
            "sub-folder, e.g. `{root}/cat/1.jpg` and `{root}/dog/2.jpg`."
        )
    candidates = [
        (class_dir.name, path)
        for class_dir in class_dirs
        for path in sorted(class_dir.rglob("*"))
        if path.is_file()
    ]
    files: dict[str, list[str]] = {c.name: [] for c in class_dirs}
    skipped: list[SkippedFile] = []
    for class_name, path in bar(candidates, desc="checking images", unit="img"):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(SkippedFile(rel, f"not an image file (extension `{path.suffix or '(none)'}`)"))
            continue
        try:
            open_image(path)
        except ImageError as err:
            reason = str(err).split(": ", 1)[-1]
            skipped.append(SkippedFile(rel, reason))
            continue
        files[class_name].append(rel)
    usable = {name: tuple(paths) for name, paths in files.items() if paths}
    if len(usable) < 2:
        counts = ", ".join(f"{name}: {len(paths)}" for name, paths in files.items())
        raise DataError(
            f"data folder `{root}` has {len(usable)} class(es) with usable images ({counts}); "
            "a classifier needs at least two. Add a sub-folder of images per class."
        )
    too_small = {name: len(paths) for name, paths in files.items() if len(paths) < min_per_class}
    if too_small:
        detail = ", ".join(f"`{name}` has {n}" for name, n in too_small.items())
        raise DataError(
            f"every class needs at least {min_per_class} usable images to split into train, "
            f"validation and test; {detail}. Add images to that class, or remove its folder."
        )
    return ImageFolder(root=root.resolve(), classes=tuple(usable), files=usable, skipped=tuple(skipped))


def split_folder(folder: ImageFolder, *, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Seeded, stratified split: each class contributes the same shares to each split."""
    rng = np.random.default_rng(seed)
    train: list[str] = []
    val: list[str] = []
    test: list[str] = []
    for name in folder.classes:
        paths = list(folder.files[name])
        order = rng.permutation(len(paths))
        n = len(paths)
        n_test = max(1, round(n * test_fraction))
        n_val = max(1, round(n * val_fraction))
        if n - n_test - n_val < 1:
            raise DataError(
                f"class `{name}` has {n} usable images: too few for a {val_fraction:.0%} validation and "
                f"{test_fraction:.0%} test split with at least one training image. Add images."
            )
        shuffled = [paths[i] for i in order]
        test += shuffled[:n_test]
        val += shuffled[n_test : n_test + n_val]
        train += shuffled[n_test + n_val :]
    return Splits(
        root=folder.root,
        classes=folder.classes,
        train=tuple(sorted(train)),
        val=tuple(sorted(val)),
        test=tuple(sorted(test)),
        seed=seed,
    )


def load_splits(path: str | Path) -> Splits:
    """Read ``splits.json``, refusing entries of the wrong type or paths that leave the data folder."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"`{path}` is missing; is this a featx-edge run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"`{path}` is not valid JSON ({err}); re-run `featx-edge train`.") from err
    problems = []
    if not isinstance(raw, dict):
        raise DataError(f"`{path}` holds a JSON {type(raw).__name__}, not an object; re-run `featx-edge train`.")
    if not isinstance(raw.get("data_root"), str):
        problems.append("`data_root` is missing or not a string")
    if not isinstance(raw.get("seed"), int):
        problems.append("`seed` is missing or not an integer")
    for key in ("classes", "train", "val", "test"):
        value = raw.get(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            problems.append(f"`{key}` is missing or not a list of strings")
        elif key != "classes" and not all(inside(item) for item in value):
            bad = next(item for item in value if not inside(item))
            problems.append(f"`{key}` names {bad!r}, which is not a relative path inside the data folder")
    if problems:
        raise DataError(f"`{path}` is damaged: {'; '.join(problems)}. Re-run `featx-edge train`.")
    return Splits(
        root=Path(raw["data_root"]),
        classes=tuple(raw["classes"]),
        train=tuple(raw["train"]),
        val=tuple(raw["val"]),
        test=tuple(raw["test"]),
        seed=raw["seed"],
    )


def iter_batches(
    root: Path, relpaths: Sequence[str], *, size: int, batch_size: int
) -> Iterator[np.ndarray]:
    """Yield uint8 batches (B, size, size, 3) of the given images, in order."""
    for start in range(0, len(relpaths), batch_size):
        chunk = relpaths[start : start + batch_size]
        yield np.stack([_pixels(root, rel, size) for rel in chunk])


def map_batches(fn: Callable[[np.ndarray], np.ndarray], root: Path, relpaths: Sequence[str], *, size: int,
                batch_size: int = 64, desc: str | None = None) -> np.ndarray:
    """``fn`` applied to the images in batches, outputs concatenated: memory holds one batch of pixels.

    ``desc`` names a progress bar (shown when progress is on).
    """
    batches = iter_batches(root, relpaths, size=size, batch_size=batch_size)
    if desc:
        batches = bar(batches, total=-(-len(relpaths) // batch_size), desc=desc, unit="batch")
    out = [np.asarray(fn(batch)) for batch in batches]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def load_images(root: Path, relpaths: Sequence[str], *, size: int) -> np.ndarray:
    """All given images as one uint8 array (N, size, size, 3)."""
    if not relpaths:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.concatenate(list(iter_batches(root, relpaths, size=size, batch_size=256)))


def _pixels(root: Path, rel: str, size: int) -> np.ndarray:
    path = root / rel
    try:
        return load_pixels(path, height=size, width=size)
    except ImageError as err:
        raise DataError(
            f"{err}. The file changed since the run was split; restore it or re-run training."
        ) from err
