"""Replacing a folder this tool made (a run, a bundle) with a new one, crash-safe.

The new folder is built in a staging folder beside the old; ``replace_run`` swaps them under a
journal (``.NAME.featx-edge.replace``) so a crash at any step is undone or completed by the next
command (``recover_replacement``). Only folders that carry this tool's ownership marker are ever
deleted (``files.ownership``).
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
from pathlib import Path

from featx_edge.errors import RunDirError
from featx_edge.files.ownership import is_leftover_ours, mark, owner_problem, remove_owned

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from featx_edge.files.atomic import _dead, beside, remove_dead_temps, write_json

log = logging.getLogger(__name__)


REPLACE_JOURNAL = ".featx-edge.replace"
"""Beside the run (``.RUNNAME.featx-edge.replace``) while ``replace_run`` swaps it for a new one."""


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


def replace_run(staging: Path, out: Path, *, kind: str, record: str) -> None:
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
