"""Ownership markers: featx-edge deletes or replaces only folders it made.

A folder featx-edge creates to own as a whole (a run, a device bundle, a feature-cache folder, the
staging folder of each) gets a ``.featx-edge`` file holding a random id and what it is; a run's
``manifest.json`` and a bundle's ``bundle.json`` record the same id (``ID_KEY``). ``--overwrite``
replaces only a folder whose marker is well-formed, of the right kind, and recorded by the folder's
own record file: a folder that merely holds a ``manifest.json`` (or a copied marker alone) is not
one. A folder without a marker, an earlier featx-edge's included, is never deleted: the error names
it and what it holds, and the user removes it by hand.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".featx-edge"
ID_KEY = "featx_edge_id"
"""Where a run's manifest.json and a bundle's bundle.json record the id of the folder's marker."""
_MAX_MARKER_BYTES = 4096
_MAX_RECORD_BYTES = 64 << 20  # a manifest or bundle.json is kilobytes; a larger one is not ours to parse
_ID = re.compile(r"[0-9a-f]{32}")


def new_marker(kind: str) -> tuple[str, bytes]:
    """A fresh id and the marker file's bytes for a folder of ``kind`` (run, bundle, feature-cache)."""
    ident = secrets.token_hex(16)
    text = json.dumps({"made_by": "featx-edge", "kind": kind, "id": ident}) + "\n"
    return ident, text.encode()


def mark(folder: Path, *, kind: str) -> str:
    """Mark ``folder``, which featx-edge has just created, as its own; returns the id.

    One small write: a kill leaves no marker or an empty one, and ``is_leftover_ours`` takes a
    folder holding only that for ours.
    """
    ident, data = new_marker(kind)
    fd = os.open(Path(folder) / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return ident


def parse_marker(data: bytes) -> dict | None:
    """The marker's fields ({kind, id}) if ``data`` is a well-formed marker, else None."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("made_by") != "featx-edge" or not isinstance(doc.get("kind"), str):
        return None
    return doc if isinstance(doc.get("id"), str) and _ID.fullmatch(doc["id"]) else None


def read_marker(folder: Path) -> dict | None:
    """``folder``'s marker ({kind, id}) when it is a small regular file (never a link) of the right form."""
    path = Path(folder) / MARKER
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_MARKER_BYTES:
            return None
        return parse_marker(path.read_bytes())
    except OSError:
        return None


def recorded_id(data: bytes) -> str | None:
    """The id a record file (manifest.json, bundle.json) holds under ``ID_KEY``, if any."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return doc.get(ID_KEY) if isinstance(doc, dict) and isinstance(doc.get(ID_KEY), str) else None


def owner_problem(folder: Path, *, kind: str, record: str) -> str | None:
    """None if featx-edge made ``folder`` as a ``kind`` whose ``record`` file (in it) holds the marker's id;
    else what the folder holds and why it is not that, for an error message (``holds 3 files and ...``)."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return f"holds {contents(folder)} and no `{MARKER}` marker"
    if marker["kind"] != kind:
        return f"holds {contents(folder)} and the `{MARKER}` marker of a featx-edge {marker['kind']}, not a {kind}"
    path = folder / record
    try:
        info = os.lstat(path)
        data = path.read_bytes() if stat.S_ISREG(info.st_mode) and info.st_size <= _MAX_RECORD_BYTES else b""
    except OSError:
        data = b""
    if recorded_id(data) != marker["id"]:
        return f"holds {contents(folder)} and a `{MARKER}` marker that its {record} does not record"
    return None


def contents(folder: Path) -> str:
    """What ``folder`` holds at its top, in words: ``3 files and 1 folder``."""
    files = folders = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders += 1
                else:
                    files += 1
    except OSError as err:
        return f"entries it cannot list ({err.strerror or err})"
    parts = [f"{n} {word}{'' if n == 1 else 's'}" for n, word in ((files, "file"), (folders, "folder")) if n]
    return " and ".join(parts) or "nothing"


def is_leftover_ours(folder: Path) -> bool:
    """Whether a leftover folder in featx-edge's own names (``.NAME.partial-PID``, ``.NAME.old-PID``) may be
    deleted: it carries a marker of any kind (one being deleted loses its record first), or holds nothing but
    a marker a kill cut short."""
    folder = Path(folder)
    if read_marker(folder) is not None:
        return True
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return False
    return not names or (names == [MARKER] and (folder / MARKER).stat().st_size == 0)


def remove_owned(folder: Path) -> bool:
    """Delete ``folder`` (checked as featx-edge's by the caller), its marker last: a kill part-way leaves it
    marked, so the next command can finish the job. False (with a warning) if something could not be deleted."""
    folder = Path(folder)
    try:
        with os.scandir(folder) as entries:
            for entry in list(entries):
                if entry.name == MARKER:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        (folder / MARKER).unlink(missing_ok=True)
        folder.rmdir()
    except FileNotFoundError:
        return True
    except OSError as err:
        log.warning("could not delete %s (%s); remove it by hand", folder, err.strerror or err)
        return False
    return True


def claim_folder(folder: Path, *, kind: str) -> str | None:
    """Make sure ``folder`` is a featx-edge folder of ``kind``: created, marked, if it does not exist (or is
    empty); None when it is ours, else what it holds (``owner_problem``'s words) and nothing is written in it.

    A new folder is made whole in a temporary folder beside it and renamed into place, so a second process
    creating it at the same moment sees either no folder or a marked one, never an unmarked one.
    """
    folder = Path(folder)
    if not _is_empty_dir(folder):
        marker = read_marker(folder)
        if marker is not None and marker["kind"] == kind:
            return None
        if marker is None:
            return f"holds {contents(folder)} and no `{MARKER}` marker"
        return f"holds {contents(folder)} and the `{MARKER}` marker of a featx-edge {marker['kind']}, not a {kind}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{folder.name}"
    tmp.mkdir()
    try:
        mark(tmp, kind=kind)
        os.rename(tmp, folder)  # replaces an empty folder; fails if another process made it first
    except OSError:
        remove_owned(tmp)
        if _is_empty_dir(folder):
            raise
        return claim_folder(folder, kind=kind)
    return None


def _is_empty_dir(folder: Path) -> bool:
    """True for no folder or an empty one (nothing in it to own or lose)."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        return False
