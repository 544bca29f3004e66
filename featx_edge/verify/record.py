"""The verify record, ``RUN/verify.json``: its schema, reading, writing, and the one staleness rule.

Verify writes the record; bench, report, bundle, device-check and the CLI read it here and
nowhere else. Reading has one error handling: a missing record is ``None`` (each caller says
what that means for it), a damaged one (not JSON, not an object, a field of the wrong type)
is one ``RunDirError`` line naming the file, the problem and the fix.

The staleness rule (``staleness``, ``VerifyRecord.staleness``): a result is about the file
exported now only when its sha256 is the manifest's for that format (and, where the caller
checked it, the file on disk still has that sha256); a verify entry must also have been
measured against the run's current Keras reference. A stale result is shown as stale, never
reused as a pass.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featx_edge.errors import RunDirError
from featx_edge.files.atomic import write_json
from featx_edge.rundir.names import VERIFY


class Stale(enum.Enum):
    """Why a result measured on a format's file is not about the file exported now."""

    EARLIER_REFERENCE = "verified against an earlier reference model"
    NOT_EXPORTED = "no longer exported"
    FILE_CHANGED = "the file changed since export"
    NO_SHA256 = "no sha256 recorded with the result"
    EARLIER_EXPORT = "measured on an earlier export of this format"


@dataclass(frozen=True)
class Staleness:
    """A typed staleness verdict: ``kind`` to branch on, ``detail`` (the file's problems) to show."""

    kind: Stale
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}" if self.detail else self.kind.value


def staleness(fmt: str, sha256: str | None, *, manifest: Mapping,
              file_problems: Mapping[str, list[str]] | None = None) -> Staleness | None:
    """The one rule: why a result measured on ``fmt``'s file ``sha256`` is stale (None: it is current).

    ``file_problems`` (format -> ``Run.artifact_problems``), where the caller checked the files on
    disk: a file that no longer matches the manifest makes every result about it stale.
    """
    artifacts = manifest.get("artifacts") or {}
    if fmt not in artifacts:
        return Staleness(Stale.NOT_EXPORTED)
    if file_problems is not None and file_problems.get(fmt):
        return Staleness(Stale.FILE_CHANGED, "; ".join(file_problems[fmt]))
    if not sha256:
        return Staleness(Stale.NO_SHA256)
    if sha256 != (artifacts[fmt] or {}).get("sha256"):
        return Staleness(Stale.EARLIER_EXPORT)
    return None


@dataclass(frozen=True)
class Entry:
    """One format's verdict. ``fields``: the entry as written (every metric, for tables)."""

    format: str
    sha256: str | None
    passed: bool
    failures: tuple[str, ...]
    accuracy: float | None
    verified_on: str | None
    kernels: Mapping[str, Mapping[str, Any]]
    fields: Mapping[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        """A field as written (a metric such as ``accuracy_change_points``), or ``default``."""
        return self.fields.get(key, default)


@dataclass(frozen=True)
class VerifyRecord:
    """``RUN/verify.json`` as read. ``fields``: the record as written (for the verify table)."""

    path: Path
    passed: bool
    images: int | None
    reference_sha256: str | None
    reference_accuracy: float | None
    reference_outputs: Mapping[str, Any] | None
    entries: Mapping[str, Entry]
    fields: Mapping[str, Any]

    def staleness(self, fmt: str, *, manifest: Mapping,
                  file_problems: Mapping[str, list[str]] | None = None) -> Staleness | None:
        """Why ``fmt``'s entry is stale (None: it is about the current file and reference).

        An entry of a format this record does not hold has no sha256: stale, never a pass.
        """
        current_reference = (manifest.get("reference") or {}).get("sha256")
        if self.reference_sha256 and self.reference_sha256 != current_reference:
            return Staleness(Stale.EARLIER_REFERENCE)
        entry = self.entries.get(fmt)
        return staleness(fmt, entry.sha256 if entry else None, manifest=manifest, file_problems=file_problems)

    def current(self, *, manifest: Mapping,
                file_problems: Mapping[str, list[str]] | None = None) -> dict[str, Entry]:
        """The entries measured on the files exported now (stale ones left out)."""
        return {fmt: entry for fmt, entry in self.entries.items()
                if self.staleness(fmt, manifest=manifest, file_problems=file_problems) is None}


def record_path(run: str | Path) -> Path:
    return Path(run) / VERIFY


def read_record(run: str | Path) -> VerifyRecord | None:
    """``RUN/verify.json``, or None when verify has not written one.

    Raises:
        RunDirError: the file is unreadable, not JSON, or a field has the wrong type (one line
            naming the file, the problem and the fix).
    """
    path = record_path(run)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise _damaged(path, run, f"unreadable: {getattr(err, 'strerror', None) or err}") from err
    try:
        return parse_record(json.loads(text), path=path)
    except (ValueError, TypeError) as err:  # not JSON (a ValueError), or a field of the wrong type
        raise _damaged(path, run, str(err).splitlines()[0]) from err


def write_record(run: str | Path, record: dict) -> Path:
    """Write ``record`` atomically as ``RUN/verify.json``, after checking it reads back."""
    path = record_path(run)
    parse_record(record, path=path)  # what bench, report and bundle will read must parse
    return write_json(path, record)


def parse_record(raw: Any, *, path: Path) -> VerifyRecord:
    """The typed record of a decoded ``verify.json``; TypeError naming the first field of a wrong type."""
    if not isinstance(raw, dict):
        raise TypeError(f"holds a JSON {_JSON_NAMES.get(type(raw), type(raw).__name__)}, not an object")
    formats = _typed(raw, "formats", dict, default={})
    entries = {}
    for fmt, entry in formats.items():
        if not isinstance(entry, dict):
            raise TypeError(f"`formats.{fmt}` has type {type(entry).__name__}; expected an object")
        entries[fmt] = _entry(fmt, entry)
    return VerifyRecord(
        path=path, passed=_typed(raw, "passed", bool, default=False),
        images=_typed(raw, "images", int, default=None), reference_sha256=_typed(raw, "reference_sha256", str),
        reference_accuracy=_number(raw, "reference_accuracy"),
        reference_outputs=_typed(raw, "reference_outputs", dict), entries=entries, fields=raw)


def _entry(fmt: str, raw: dict) -> Entry:
    where = f"formats.{fmt}."
    failures = _typed(raw, "failures", list, default=[], where=where)
    kernels = _typed(raw, "kernels", dict, default={}, where=where)
    if not all(isinstance(row, dict) for row in kernels.values()):
        raise TypeError(f"`{where}kernels` holds a value that is not an object")
    return Entry(format=fmt, sha256=_typed(raw, "sha256", str, where=where),
                 passed=_typed(raw, "passed", bool, default=False, where=where),
                 failures=tuple(map(str, failures)), accuracy=_number(raw, "accuracy", where=where),
                 verified_on=_typed(raw, "verified_on", str, where=where), kernels=kernels, fields=raw)


_EXPECTED = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "an integer"}
_JSON_NAMES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _typed(raw: dict, key: str, kind: type, *, default: Any = None, where: str = "") -> Any:
    """``raw[key]`` if absent or null (then ``default``) or of type ``kind``; TypeError otherwise."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"`{where}{key}` has type {type(value).__name__}; expected {_EXPECTED[kind]}")
    return value


def _number(raw: dict, key: str, *, where: str = "") -> float | None:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"`{where}{key}` has type {type(value).__name__}; expected a number")
    return value


def _damaged(path: Path, run: str | Path, problem: str) -> RunDirError:
    return RunDirError(f"`{path}` is damaged ({problem}); run `featx-edge verify {run}` again to rewrite it.")
