"""The run directory contract: file names, atomic writes, the manifest and checksums.

Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted command never leaves a half-written model or report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from featx_edge.errors import RunDirError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

MANIFEST = "manifest.json"
SPLITS = "splits.json"
WEIGHTS = "model.weights.h5"
EXPORT_DIR = "export"
VERIFY = "verify.json"
INT8_LAYERS = "int8_layers.json"
LOCK_SUFFIX = ".featx-edge.lock"
EXPORT_JOURNAL = ".export-journal.json"
MANIFEST_VERSION = 2
"""Version of the manifest layout; a run written with another layout is refused, not guessed at.
(2: EfficientNet-Lite, the affine preprocessing layer, bias-corrected int8, verify intervals.)"""

# Top-level manifest entries every command relies on, and their JSON types.
_REQUIRED = {"labels": list, "backbone": dict, "input": dict, "data": dict, "reference": dict,
             "config": dict, "artifacts": dict}


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same ending as the target: some writers pick the file format from the name (.weights.h5).
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_held: dict[str, int] = {}


def beside(run: str | Path, suffix: str) -> Path:
    """``.RUNNAME<suffix>`` next to the run folder: what must outlive the folder being replaced."""
    run = Path(run).resolve()
    return run.parent / f".{run.name}{suffix}"


def lock_path(run: str | Path) -> Path:
    """The lock file of ``run``: beside the run folder, so replacing the folder keeps the lock."""
    return beside(run, LOCK_SUFFIX)


@contextlib.contextmanager
def locked(run: str | Path, *, command: str, create: bool = False) -> Iterator[None]:
    """Hold ``run``'s lock while one command works on it; RunDirError if another command does.

    An advisory ``flock`` on ``.RUNNAME.featx-edge.lock`` beside the run folder (released by the
    OS when the process dies, so a killed command never leaves a stale lock; beside, not
    inside, so ``train --overwrite`` can replace the folder as a whole under it). Re-entrant
    within one process (``run`` takes it, then train/export/verify inside take it again).
    ``create``: the folder may not exist yet (``train``); otherwise a missing folder is an
    error. Where ``fcntl`` does not exist (Windows) commands are not locked.
    """
    run = Path(run)
    if create:
        run.resolve().parent.mkdir(parents=True, exist_ok=True)
    elif not run.is_dir():
        raise RunDirError(f"`{run}` is not a featx-edge run directory (no such folder). "
                          "Create one with `featx-edge train --data DIR --out RUN` or `featx-edge run`.")
    key = str(run.resolve())
    if key in _held or fcntl is None:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    try:
        fd = os.open(lock_path(run), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(f"cannot create the lock file `{lock_path(run)}` ({err.strerror}); "
                          "the folder must be writable.") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(f"`{run}` is in use by another featx-edge command ({holder}); wait for it to "
                          "finish, or work in another run folder.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"`featx-edge {command}`, pid {os.getpid()}".encode(), 0)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        os.ftruncate(fd, 0)  # no stale "held by" text once released
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def prepare_out(out: Path, *, overwrite: bool, data_root: Path) -> Path:
    """Check that ``out`` can take a new run, before any work; returns an empty staging folder.

    Refused: a file; a folder inside the data (or holding it); an existing non-empty folder
    unless ``overwrite`` and it is a featx-edge run (a folder of other files is never replaced);
    a parent folder that cannot be written (read-only, no permission).
    """
    out, data = out.resolve(), Path(data_root).resolve()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"`--out {out}` is a file; give a folder for the run.")
    if out == data or data in out.parents or out in data.parents:
        raise RunDirError(f"`--out {out}` and the data folder `{data}` overlap; put the run outside the "
                          "images (e.g. `runs/NAME`).")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise RunDirError(f"`--out {out}` holds files and is not a featx-edge run; choose a new folder "
                              "(`--overwrite` replaces only featx-edge runs).")
        if not overwrite:
            raise RunDirError(f"`--out {out}` already holds a run; pass `--overwrite` to replace it as a whole "
                              "(its exports and reports go with it), or choose a new folder.")
    _remove_dead_staging(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        staging.mkdir()
    except FileExistsError:
        shutil.rmtree(staging)
        staging.mkdir()
    except OSError as err:
        raise RunDirError(f"cannot write in `{out.parent}` ({err.strerror}); choose a writable place for "
                          "`--out`.") from err
    return staging


def _remove_dead_staging(out: Path) -> None:
    """Staging folders of trainings that were killed (their process is gone)."""
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_run(staging: Path, out: Path) -> None:
    """Move a complete run from ``staging`` onto ``out``, replacing an old run as a whole."""
    out = out.resolve()
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)  # put the old run back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(path)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(run: str | Path) -> dict:
    """Load ``RUN/manifest.json``, with a clear error when ``run`` is not a trained run."""
    path = Path(run) / MANIFEST
    if not path.is_file():
        raise RunDirError(
            f"`{run}` is not a featx-edge run directory (no {MANIFEST}). "
            "Create one with `featx-edge train --data DIR --out RUN` or `featx-edge run`."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunDirError(f"`{path}` is not valid JSON ({err}); re-run `featx-edge train`.") from err
    except RecursionError:  # arrays or objects nested thousands deep: never a manifest
        raise RunDirError(f"`{path}` nests JSON too deeply to be a manifest; re-run `featx-edge train`.") from None
    check_manifest(manifest, path=path)
    return manifest


def check_manifest(manifest: Any, *, path: Path) -> None:
    """Refuse a manifest of another layout or with missing/mistyped entries, naming what is wrong."""
    if not isinstance(manifest, dict):
        raise RunDirError(f"`{path}` holds a JSON {type(manifest).__name__}, not an object; re-run `featx-edge train`.")
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION:
        written = f"layout version {version}" if version is not None else "an older layout (no `manifest_version`)"
        raise RunDirError(
            f"`{path}` has {written}; this featx-edge reads version {MANIFEST_VERSION}. Re-run "
            "`featx-edge train` (or `run`) into a new folder with this version."
        )
    problems = [f"`{key}` is missing" if key not in manifest else f"`{key}` is not a JSON {kind.__name__}"
                for key, kind in _REQUIRED.items() if not isinstance(manifest.get(key), kind)]
    if not problems and not isinstance(manifest["reference"].get("path"), str):
        problems.append("`reference.path` is missing")
    if not problems and not isinstance(manifest["input"].get("height"), int):
        problems.append("`input.height` is missing or not an integer")
    if not problems:
        problems += _path_problems(manifest)
    if problems:
        raise RunDirError(f"`{path}` is incomplete or damaged: {'; '.join(problems)}. Re-run `featx-edge train`.")


def _path_problems(manifest: dict) -> list[str]:
    """Every path the manifest names must be a relative path that stays inside the run."""
    named = [("reference.path", manifest["reference"].get("path")),
             ("data.splits", manifest["data"].get("splits", SPLITS))]
    for fmt, entry in manifest["artifacts"].items():
        if not isinstance(entry, dict):
            return [f"`artifacts.{fmt}` is not a JSON object"]
        named.append((f"artifacts.{fmt}.path", entry.get("path")))
    problems = []
    for key, value in named:
        if value is None and key.startswith("artifacts."):
            continue  # an incomplete entry: artifact_problems names it for that format
        if not inside(value):
            problems.append(f"`{key}` ({value!r}) is not a relative path inside the run")
    return problems


def inside(relpath: Any) -> bool:
    """Whether ``relpath`` is a relative path that cannot leave the folder it is joined to."""
    if not isinstance(relpath, str) or not relpath or "\\" in relpath or "\0" in relpath:
        return False
    pure = PurePosixPath(relpath)
    return not pure.is_absolute() and ".." not in pure.parts


def artifact_problems(run: str | Path, manifest: dict, fmt: str) -> list[str]:
    """What is wrong with ``fmt``'s exported file against the manifest (empty: it is the file
    that was exported). Size first (cheap), then the sha256 (catches a same-size swap)."""
    run = Path(run)
    entry = (manifest.get("artifacts") or {}).get(fmt)
    if entry is None:
        return [f"not exported (run `featx-edge export {run} --formats {fmt}`)"]
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), kind) and not isinstance(entry.get(k), bool)
                                              for k, kind in (("path", str), ("bytes", int), ("sha256", str))):
        return [f"the manifest's entry for {fmt} is incomplete (path, bytes, sha256); re-export it"]
    path = run / entry["path"]
    if not path.is_file():
        return [f"`{path}` is missing"]
    size = path.stat().st_size
    if size != entry["bytes"]:
        problem = f"`{path}` does not match the manifest: {size} bytes where it records {entry['bytes']}"
        return [problem + " (truncated or replaced)"]
    if sha256_file(path) != entry["sha256"]:
        return [f"`{path}` does not match its sha256 in the manifest: swapped or modified after export"]
    return []
