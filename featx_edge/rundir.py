"""The run directory contract: file names, atomic writes, the manifest and checksums.

Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted command never leaves a half-written model or report.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from featx_edge.errors import RunDirError
from featx_edge.ownership import is_leftover_ours, mark, owner_problem, read_marker, remove_owned

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
REPLACE_JOURNAL = ".featx-edge.replace"
"""Beside the run (``.RUNNAME.featx-edge.replace``) while ``replace_run`` swaps it for a new one."""
TMP_PREFIX = ".tmp-"
MANIFEST_VERSION = 2
"""Version of the manifest layout; a run written with another layout is refused, not guessed at.
(2: EfficientNet-Lite, the affine preprocessing layer, bias-corrected int8, verify intervals.)"""

log = logging.getLogger(__name__)
_TMP_NAME = re.compile(r"\.tmp-(\d+)-")

# Top-level manifest entries every command relies on, and their JSON types.
_REQUIRED = {"labels": list, "backbone": dict, "input": dict, "data": dict, "reference": dict,
             "config": dict, "artifacts": dict}


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name carries the writer's pid (``.tmp-PID-...``): one a killed command left is
    removed by the next command that locks the run (``remove_dead_temps``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same ending as the target: some writers pick the file format from the name (.weights.h5).
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=f"-{path.name}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_dead_temps(folder: Path, *, name: str = "", recursive: bool = True) -> None:
    """Delete the ``atomic_path`` temporary files in ``folder`` (ending in ``-name``, if given) whose
    writer is dead: a kill leaves them behind. Links and folders of that name are left alone."""
    for root, dirs, files in os.walk(folder) if recursive else [(str(folder), [], _names(folder))]:
        dirs[:] = [d for d in dirs if not d.startswith(TMP_PREFIX)]  # never walk into a folder being made
        for filename in files:
            match = _TMP_NAME.match(filename)
            if not match or (name and not filename.endswith(f"-{name}")) or not _dead(int(match.group(1))):
                continue
            path = Path(root) / filename
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    path.unlink()
                    log.info("removed %s: a temporary file of a command that was killed", path)


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


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

    Taking the lock first finishes what a killed command left: a replacement of the run
    (``recover_replacement``) and the temporary files of its atomic writes (``remove_dead_temps``).
    """
    run = Path(run)
    if create:
        run.resolve().parent.mkdir(parents=True, exist_ok=True)
    elif not run.is_dir() and not replacement_pending(run):
        raise _no_such_run(run)
    key = str(run.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    with _flock(run, command=command):
        _held[key] = 1
        try:
            recover_replacement(run, lock_held=True)
            if not create and not run.is_dir():
                raise _no_such_run(run)
            if run.is_dir() and read_marker(run) is not None:  # only in a folder featx-edge made
                remove_dead_temps(run)
            yield
        finally:
            del _held[key]


def _no_such_run(run: Path) -> RunDirError:
    return RunDirError(f"`{run}` is not a featx-edge run directory (no such folder). "
                       "Create one with `featx-edge train --data DIR --out RUN` or `featx-edge run`.")


@contextlib.contextmanager
def _flock(run: Path, *, command: str) -> Iterator[None]:
    """The OS lock on ``run``'s lock file, saying who holds it (a no-op without ``fcntl``)."""
    if fcntl is None:
        yield
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
    try:
        yield
    finally:
        os.ftruncate(fd, 0)  # no stale "held by" text once released
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_out(out: str | Path, *, data_root: str | Path | None = None, folder: bool = True,
              flag: str = "--out") -> Path:
    """``out`` resolved, if it can name what featx-edge writes and replaces as a whole; RunDirError otherwise.

    Only the path is judged (nothing is created): refused are an empty value, ``/``, the current
    folder or one holding it, a file (where ``folder``), and a folder that is (or is inside, or
    holds) the data folder ``data_root``.
    """
    if not str(out):
        raise RunDirError(f"`{flag}` is empty; give the folder to write, e.g. `{flag} runs/NAME`.")
    resolved, cwd = Path(out).resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        raise RunDirError(f"`{flag} {out}` is the root folder; give a folder of its own, e.g. `{flag} runs/NAME`.")
    if resolved == cwd or resolved in cwd.parents:
        raise RunDirError(f"`{flag} {out}` is the current folder or holds it ({resolved}); featx-edge replaces "
                          f"that folder as a whole, so give one of its own, e.g. `{flag} runs/NAME`.")
    if folder and resolved.exists() and not resolved.is_dir():
        raise RunDirError(f"`{flag} {resolved}` is a file; give a folder.")
    if data_root is not None:
        data = Path(data_root).resolve()
        if resolved == data or data in resolved.parents or resolved in data.parents:
            raise RunDirError(f"`{flag} {resolved}` and the data folder `{data}` overlap; put the run outside the "
                              "images (e.g. `runs/NAME`).")
    return resolved


def prepare_out(out: Path, *, overwrite: bool, data_root: Path) -> Path:
    """Check that ``out`` can take a new run, before any work; returns an empty, marked staging folder.

    Refused: what ``check_out`` refuses; an existing non-empty folder unless ``overwrite`` and
    featx-edge made it as a run (``ownership``: a folder of other files, or a run of an earlier
    version without the marker, is never replaced); a parent folder that cannot be written.
    """
    out = check_out(out, data_root=data_root)
    if out.is_dir() and any(out.iterdir()):
        if problem := owner_problem(out, kind="run", record=MANIFEST):
            raise RunDirError(f"`--out {out}` {problem}, so it is not a featx-edge run (or is one of an earlier "
                              "version); `--overwrite` replaces only runs featx-edge made. Choose a new folder, or "
                              f"delete it yourself if you no longer need it (`rm -r {out}`).")
        if not overwrite:
            raise RunDirError(f"`--out {out}` already holds a run; pass `--overwrite` to replace it as a whole "
                              "(its exports and reports go with it), or choose a new folder.")
    return make_staging(out, kind="run")


def make_staging(out: Path, *, kind: str) -> Path:
    """``.NAME.partial-PID`` beside ``out``, new and marked as a ``kind`` (a killed command's are removed first)."""
    out = Path(out).resolve()
    _remove_dead_leftovers(out, "partial")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists() and is_leftover_ours(staging):  # this process's own, from an earlier failed call
        remove_owned(staging)
    try:
        staging.mkdir()
        mark(staging, kind=kind)
    except OSError as err:
        raise RunDirError(f"cannot write in `{out.parent}` ({err.strerror}); choose a writable place for "
                          "`--out`.") from err
    return staging


def _remove_dead_leftovers(out: Path, what: str) -> None:
    """``.NAME.<what>-PID`` folders of commands that were killed (their process is gone), if featx-edge's."""
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.{what}-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _dead(int(pid)) and leftover.is_dir() and is_leftover_ours(leftover):
            remove_owned(leftover)


def _dead(pid: int) -> bool:
    """Whether ``pid`` is no running process (never this one)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def replace_run(staging: Path, out: Path, *, kind: str = "run", record: str = MANIFEST) -> None:
    """Move a complete run (or bundle: ``kind``, ``record``) from ``staging`` onto ``out``, replacing the old
    one as a whole, journaled: a kill at any point leaves the old or the new one, or a journal from which the
    next command (``recover_replacement``) puts one of them back under ``out``'s name."""
    out = Path(out).resolve()
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.rename(staging, out)  # onto an empty folder too; fails if it is no longer empty
        return
    if problem := owner_problem(out, kind=kind, record=record):  # changed since prepare_out checked it
        raise RunDirError(f"`{out}` {problem} now, so it is not replaced; the new {kind} is not kept.")
    old, journal = out.parent / f".{out.name}.old-{os.getpid()}", beside(out, REPLACE_JOURNAL)
    write_json(journal, {"pid": os.getpid(), "old": old.name, "new": Path(staging).name})
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)  # put the old run back
        journal.unlink()
        raise
    remove_owned(old)
    journal.unlink()


def replacement_pending(out: Path) -> bool:
    """Whether a killed replacement of ``out`` left a journal or an old folder to put back."""
    out = Path(out).resolve()
    return beside(out, REPLACE_JOURNAL).exists() or any(out.parent.glob(f".{glob.escape(out.name)}.old-*"))


def recover_replacement(out: Path, *, lock_held: bool) -> None:
    """Finish or roll back a replacement of ``out`` that was killed (see ``replace_run``).

    New run in place: delete the old one. Old run moved aside, new one not in place: move the old
    one back (the command did not complete, so the previous state stays). Without ``lock_held``
    (a bundle's ``--out``), a journal whose writer is alive is left to it. Staging folders of
    killed commands go too (``.NAME.partial-PID`` of a dead PID, if featx-edge's).
    """
    out = Path(out).resolve()
    journal = beside(out, REPLACE_JOURNAL)
    remove_dead_temps(out.parent, name=journal.name, recursive=False)
    entry = _read_journal(journal, out)
    if entry is None:
        _recover_unjournaled(out)
        _remove_dead_leftovers(out, "partial")  # a staging folder killed before it was journaled
        return
    if not lock_held and not _dead(entry["pid"]):
        return
    old, new = out.parent / entry["old"], out.parent / entry["new"]
    if not out.exists() and old.is_dir():
        _put_back(old, out)
    for leftover in (old, new):
        if leftover.is_dir() and is_leftover_ours(leftover):
            remove_owned(leftover)
    journal.unlink(missing_ok=True)


def _read_journal(journal: Path, out: Path) -> dict | None:
    """The journal's entry, if it is one: a pid and two names beside ``out`` in featx-edge's own forms."""
    try:
        entry = json.loads(journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:  # no such journal can exist; the command names the real problem
            return None
        entry = None
    except ValueError:
        entry = None
    prefix = f".{out.name}."
    valid = (isinstance(entry, dict) and isinstance(entry.get("pid"), int)
             and all(isinstance(entry.get(k), str) and entry[k].startswith(prefix) and "/" not in entry[k]
                     and re.fullmatch(r"(old|partial)-\d+", entry[k][len(prefix):]) for k in ("old", "new")))
    if not valid:
        log.warning("ignored %s: not a featx-edge replacement journal; delete it by hand", journal)
        return None
    return entry


def _recover_unjournaled(out: Path) -> None:
    """``.NAME.old-PID`` left without a journal by a killed command: featx-edge's own is deleted once the run
    is in place; if the run is missing, the one old folder (of an earlier featx-edge too) is put back."""
    olds = [p for p in out.parent.glob(f".{glob.escape(out.name)}.old-*")
            if p.name.rsplit("-", 1)[-1].isdigit() and _dead(int(p.name.rsplit("-", 1)[-1])) and p.is_dir()]
    if not out.exists() and len(olds) == 1:
        _put_back(olds[0], out)
        return
    for old in olds if out.exists() else []:
        if is_leftover_ours(old):
            remove_owned(old)


def _put_back(old: Path, out: Path) -> None:
    """Move the run that a killed replacement had moved aside back under its name."""
    try:
        os.rename(old, out)
    except OSError as err:
        raise RunDirError(f"replacing `{out}` was interrupted and its previous version, `{old}`, cannot be moved "
                          f"back ({err.strerror or err}); rename it to `{out.name}` by hand.") from err
    log.warning("put back %s from %s: replacing it was interrupted (the new one, if any, is discarded)", out, old.name)


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
