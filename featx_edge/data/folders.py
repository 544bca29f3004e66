"""Scan and validate an image folder, split it, and stream resized pixels.

The folder layout is Keras's ``image_dataset_from_directory`` one: ``ROOT/<class>/<image>``
(images may sit in nested folders under their class folder). Every file is decoded once
with Pillow before training; files that fail are skipped and listed, never a crash mid-epoch.

What the walk (training's scan and ``featx-edge predict DIR`` alike) looks at:

- Hidden names, starting with ``.`` (``.git``, ``.DS_Store``, ``._IMG_1.jpg``, ``.thumbnails/``),
  are ignored at every depth: class folders, nested folders and files.
- Symlinks are followed only while they stay inside the folder. A symlink whose target is
  outside it, one that loops (points to a folder that contains it) and a broken one are
  listed as skipped with the reason, never followed.
- Files directly in ROOT (not in a class folder) are ignored.
- A class folder name becomes a label, printed on terminals and stored in the model: names
  with control characters (terminal escape sequences, tabs, newlines, bidirectional
  overrides) or bytes that are not valid UTF-8 are refused, and so are names with a backslash
  (a folder separator on Windows: the run records paths with ``/`` only). Image files or nested
  folders with a backslash in their name are skipped and listed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx_edge.errors import DataError, ImageError
from featx_edge.files.atomic import inside
from featx_edge.progress import bar
from featx_edge.runtime.image import load_pixels, open_image
from featx_edge.runtime.metadata import printable, unsafe_char

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
MIN_IMAGES_PER_CLASS = 3  # one each for train, validation and test
BACKSLASH = "\\"


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

    Hidden files and folders are ignored; symlinks that leave ``root``, loop or are broken
    are listed as skipped (see the module docstring).

    Raises:
        DataError: the folder is missing, has no class folders, a class folder whose name has
            control characters, fewer than two usable classes, or a class with fewer than
            ``min_per_class`` usable images.

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
    class_dirs, skipped = _class_folders(root)
    if not class_dirs:
        raise DataError(
            f"data folder `{root}` has no class sub-folders. Put each class's images in its own "
            f"sub-folder, e.g. `{root}/cat/1.jpg` and `{root}/dog/2.jpg`."
        )
    root_real = root.resolve()
    candidates: list[tuple[str, Path]] = []
    for class_dir in class_dirs:
        found, missed = _walk(class_dir, root=root, root_real=root_real, chain=(root_real, class_dir.resolve()))
        candidates += [(class_dir.name, path) for path in found]
        skipped += missed
    files, unreadable = _decode_all(root, candidates, classes=[c.name for c in class_dirs])
    usable = _check_counts(root, files, min_per_class=min_per_class)
    skipped = sorted(skipped + unreadable, key=lambda s: s.path)
    return ImageFolder(root=root_real, classes=tuple(usable), files=usable, skipped=tuple(skipped))


def _class_folders(root: Path) -> tuple[list[Path], list[SkippedFile]]:
    """The visible class folders of ``root`` (names checked), and the symlinks not followed."""
    root_real = root.resolve()
    class_dirs: list[Path] = []
    skipped: list[SkippedFile] = []
    try:
        entries = _visible_entries(root)
    except OSError as err:
        raise DataError(f"cannot list the data folder `{root}` ({err.strerror or err}); check its permissions.") from err
    for entry in entries:
        problem = _link_problem(entry, root=root, root_real=root_real, chain=(root_real,))
        if problem:
            skipped.append(SkippedFile(entry.name, problem))
        elif entry.is_dir():
            _check_class_name(root, entry.name)
            class_dirs.append(entry)
    return class_dirs, skipped


def _decode_all(root: Path, candidates: list[tuple[str, Path]], *,
                classes: list[str]) -> tuple[dict[str, list[str]], list[SkippedFile]]:
    """Decode every candidate once: usable relative paths per class, and the files skipped."""
    files: dict[str, list[str]] = {name: [] for name in classes}
    skipped: list[SkippedFile] = []
    for class_name, path in bar(candidates, desc="checking images", unit="img"):
        rel = path.relative_to(root).as_posix()
        if BACKSLASH in rel:  # splits.json refuses such paths (rundir.inside): export would fail on the run
            skipped.append(SkippedFile(rel, "a backslash in its path (a folder separator on Windows); rename it"))
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(SkippedFile(rel, f"not an image file (extension `{path.suffix or '(none)'}`)"))
            continue
        try:
            open_image(path)
        except ImageError as err:
            skipped.append(SkippedFile(rel, str(err).removeprefix(f"{path}: ")))
            continue
        files[class_name].append(rel)
    return files, skipped


def _check_counts(root: Path, files: dict[str, list[str]], *, min_per_class: int) -> dict[str, tuple[str, ...]]:
    """The classes with usable images; DataError when fewer than two, or one is too small."""
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
    return usable


def _check_class_name(root: Path, name: str) -> None:
    bad = sorted({char for char in name if unsafe_char(char)})
    if bad:
        raise DataError(
            f"class folder {name!r} in `{printable(str(root))}` has control characters in its name "
            f"({', '.join(repr(char) for char in bad)}); the name becomes a label that is printed and "
            "stored in the model. Rename the folder to plain text (letters, digits, spaces, `-`, `_`)."
        )
    if BACKSLASH in name:
        raise DataError(
            f"class folder {name!r} in `{printable(str(root))}` has a backslash in its name; the run records "
            "paths with `/` only (a backslash separates folders on Windows), so it could not be exported. "
            f"Rename the folder, e.g. to `{name.replace(BACKSLASH, '_')}`."
        )


def _visible_entries(directory: Path) -> list[Path]:
    """The entries of ``directory`` whose names do not start with ``.``, sorted."""
    return sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))


def _link_problem(path: Path, *, root: Path, root_real: Path, chain: tuple[Path, ...]) -> str | None:
    """Why the symlink ``path`` is not followed; None for a plain entry or a link that stays inside.

    ``chain`` holds the resolved folders from the root down to ``path``'s folder: a link to one
    of them would walk the same folders forever.
    """
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return f"broken symlink (its target `{os.readlink(path)}` does not exist)"
    except (OSError, RuntimeError):  # links that point at each other: ELOOP (RuntimeError before 3.13)
        return "symlink loop (the links point at each other); not followed"
    if not target.is_relative_to(root_real):
        return f"symlink to `{target}`, outside the folder `{root}`; not followed"
    if target in chain:
        return f"symlink loop (it points to `{target}`, a folder that contains it); not followed"
    return None


def _walk(start: Path, *, root: Path, root_real: Path, chain: tuple[Path, ...]) -> tuple[list[Path], list[SkippedFile]]:
    """Every visible regular file under ``start`` (sorted), and what was skipped, relative to ``root``."""
    files: list[Path] = []
    skipped: list[SkippedFile] = []
    pending = [(start, chain)]
    while pending:
        directory, chain = pending.pop()
        try:
            entries = _visible_entries(directory)
        except OSError as err:
            skipped.append(SkippedFile(_relative(directory, root), f"cannot list this folder ({err.strerror or err})"))
            continue
        for entry in entries:
            try:
                problem = _link_problem(entry, root=root, root_real=root_real, chain=chain)
                if problem is None and entry.is_dir():
                    pending.append((entry, (*chain, entry.resolve())))
                elif problem is None and entry.is_file():
                    files.append(entry)
                elif problem is None:
                    problem = "not a regular file (a socket, FIFO or device)"
            except OSError as err:  # a name too long for the system, a permission denied
                problem = f"cannot be read ({err.strerror or err})"
            if problem:
                skipped.append(SkippedFile(_relative(entry, root), problem))
    return sorted(files), skipped


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."


def walk_folder(folder: str | Path) -> tuple[tuple[Path, ...], tuple[SkippedFile, ...]]:
    """Every visible regular file under ``folder`` (sorted), and the symlinks not followed, with reasons.

    The same rules as the training scan: hidden names ignored at every depth, symlinks followed
    only while they stay inside ``folder`` (see the module docstring).
    """
    folder = Path(folder)
    real = folder.resolve()
    files, skipped = _walk(folder, root=folder, root_real=real, chain=(real,))
    return tuple(files), tuple(sorted(skipped, key=lambda s: s.path))


def find_images(folder: str | Path) -> tuple[tuple[Path, ...], tuple[SkippedFile, ...]]:
    """The image files under ``folder`` by extension (``walk_folder``'s rules), and what was skipped.

    Raises:
        DataError: the folder holds no image file.
    """
    files, skipped = walk_folder(folder)
    images = tuple(path for path in files if path.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(
            f"no images found in {printable(str(folder))} (looked for {', '.join(IMAGE_EXTENSIONS)}; "
            "hidden files and folders are ignored)"
        )
    return images, skipped


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
    except RecursionError:  # arrays or objects nested thousands deep: never a split
        raise DataError(f"`{path}` nests JSON too deeply to be a split; re-run `featx-edge train`.") from None
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
