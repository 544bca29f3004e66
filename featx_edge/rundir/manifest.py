"""``manifest.json``: its layout version, reading it, checking it, and the artifacts it lists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from featx_edge.errors import RunDirError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from featx_edge.files.atomic import inside, sha256_file
from featx_edge.rundir.names import MANIFEST, SPLITS

log = logging.getLogger(__name__)


MANIFEST_VERSION = 2
"""Version of the manifest layout; a run written with another layout is refused, not guessed at.
(2: EfficientNet-Lite, the affine preprocessing layer, bias-corrected int8, verify intervals.)"""


# Top-level manifest entries every command relies on, and their JSON types.
_REQUIRED = {"labels": list, "backbone": dict, "input": dict, "data": dict, "reference": dict,
             "config": dict, "artifacts": dict}


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
