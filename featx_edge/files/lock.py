"""One command at a time per folder: an ``flock`` on a lock file beside it (``.NAME.featx-edge.lock``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from featx_edge.errors import RunDirError
from featx_edge.files.ownership import read_marker

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from featx_edge.files.atomic import beside, remove_dead_temps
from featx_edge.files.replace import recover_replacement, replacement_pending

log = logging.getLogger(__name__)


LOCK_SUFFIX = ".featx-edge.lock"

_held: dict[str, int] = {}
"""Locks this process holds, by folder, with their depth: ``locked`` is re-entrant."""


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
