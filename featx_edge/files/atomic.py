"""Atomic file writes: temporary name beside the target, renamed into place; checksums and path checks.

An interrupted command never leaves a half-written model or report: every file is written to a
temporary name in the same folder (``.tmp-PID-...``) and renamed onto its name.
"""

from __future__ import annotations

import contextlib
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

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)


TMP_PREFIX = ".tmp-"


_TMP_NAME = re.compile(r"\.tmp-(\d+)-")


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


def beside(run: str | Path, suffix: str) -> Path:
    """``.RUNNAME<suffix>`` next to the run folder: what must outlive the folder being replaced."""
    run = Path(run).resolve()
    return run.parent / f".{run.name}{suffix}"


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


def inside(relpath: Any) -> bool:
    """Whether ``relpath`` is a relative path that cannot leave the folder it is joined to."""
    if not isinstance(relpath, str) or not relpath or "\\" in relpath or "\0" in relpath:
        return False
    pure = PurePosixPath(relpath)
    return not pure.is_absolute() and ".." not in pure.parts
