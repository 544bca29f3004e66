"""``featx-edge bundle --target mcu``: one format's firmware sources, its ``mcu.json`` and a README, for a
TensorFlow Lite Micro application.

The sources are those ``featx-edge mcu`` wrote (``RUN/export/mcu/<format>/``), checked against the
sha256 it recorded, for the export that is in the run now; the bundle is staged beside ``--out``
and moved into place like a device bundle (``pack``), and refused, unless ``allow_unverified``,
when the format failed the TFLM check or a requested profile.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

from featx_edge import __version__
from featx_edge.bundle.pack import BUNDLE_JSON, Bundle, check_bundle_out, move_bundle_into_place, recover_bundle_out
from featx_edge.errors import RunDirError, VerificationError
from featx_edge.files.atomic import sha256_file, write_json
from featx_edge.files.lock import locked
from featx_edge.files.ownership import ID_KEY, read_marker
from featx_edge.files.replace import make_staging
from featx_edge.formats.registry import check_format
from featx_edge.mcu import MCU_JSON
from featx_edge.mcu.firmware import APPLICATION_EXAMPLE, FILES
from featx_edge.training.run import Run

log = logging.getLogger(__name__)


def bundle_firmware(run: str | Path, *, fmt: str, out: str | Path, allow_unverified: bool = False,
                    overwrite: bool = False) -> Bundle:
    """Write ``fmt``'s firmware sources, ``mcu.json`` and a README to ``out`` (a folder, or a ``.zip``).

    Raises:
        RunDirError: ``featx-edge mcu`` has not checked ``fmt``, or its record or sources are stale.
        VerificationError: ``fmt`` failed the TFLM check or a profile (unless ``allow_unverified``).
        ConfigError: ``out`` is not a bundle featx-edge made (or is one, without ``overwrite``).
    """
    fmt, out, as_zip = check_format(fmt), Path(out), Path(out).suffix.lower() == ".zip"
    recover_bundle_out(out, as_zip=as_zip)
    check_bundle_out(out, as_zip=as_zip, overwrite=overwrite)
    with locked(run, command="bundle", create=False):
        source = Run.open(run)
        report, entry, status = _mcu_entry(source, fmt, allow=allow_unverified)
        folder = source.path / entry["firmware"]["folder"]
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging(out, kind="bundle")
        try:
            for name in FILES:
                shutil.copyfile(folder / name, staging / name, follow_symlinks=False)
                if sha256_file(staging / name) != entry["firmware"]["files"][name]:
                    raise RunDirError(f"`{folder / name}` changed while it was being bundled; bundle again.")
            write_json(staging / MCU_JSON, {**report, "formats": {fmt: entry}})
            meta = {"bundle_version": 1, "target": "mcu", "format": fmt, "featx_edge_version": __version__,
                    "model": {"sha256": entry["sha256"], "bytes": entry["tflm"]["flash_bytes"]},
                    "run": str(source.path.resolve()), "labels": source.labels, "mcu": {"status": status},
                    "files": {name: entry["firmware"]["files"][name] for name in FILES},
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    ID_KEY: read_marker(staging)["id"]}
            (staging / "README.md").write_text(readme(fmt, entry, status=status), encoding="utf-8")
            write_json(staging / BUNDLE_JSON, meta)
            check_bundle_out(out, as_zip=as_zip, overwrite=overwrite)  # again: it may have changed meanwhile
            move_bundle_into_place(staging, out, as_zip=as_zip)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return Bundle(path=out, format=fmt, commands=firmware_commands(), verify_status=status)


def _mcu_entry(run: Run, fmt: str, *, allow: bool) -> tuple[dict, dict, str]:
    """mcu.json, ``fmt``'s entry in it and its status (pass or FAILED); RunDirError if absent or stale."""
    redo = f"run `featx-edge mcu {run.path}`"
    try:
        report = json.loads((run.path / MCU_JSON).read_text(encoding="utf-8"))
        entry = (report.get("formats") or {}).get(fmt)
    except FileNotFoundError:
        raise RunDirError(f"`{run.path}` has no {MCU_JSON}: {redo} first (it writes the firmware sources).") from None
    except (OSError, ValueError, AttributeError) as err:
        raise RunDirError(f"`{run.path / MCU_JSON}` is unreadable ({err}); {redo} again.") from err
    if not isinstance(entry, dict) or not isinstance(entry.get("firmware"), dict):
        raise RunDirError(f"`{run.path / MCU_JSON}` has no firmware sources of {fmt}; {redo} (it checks the "
                          "fully-integer TFLite exports and writes their sources when TFLM runs them).")
    artifact = (run.manifest.get("artifacts") or {}).get(fmt) or {}
    if entry.get("sha256") != artifact.get("sha256") or run.artifact_problems(fmt):
        raise RunDirError(f"`{run.path / MCU_JSON}` was written for an earlier {fmt} export (stale); {redo} again.")
    status = "pass" if entry.get("passed") is True else "FAILED"
    if status != "pass":
        why = "; ".join(map(str, entry.get("failures") or [])) or MCU_JSON
        if not allow:
            raise VerificationError(f"`{run.path}`: {fmt} failed `featx-edge mcu` ({why}). Fix it, or pass "
                                    f"`--allow-unverified` to bundle it anyway (recorded in {BUNDLE_JSON}).")
        log.warning("bundling %s although it failed `featx-edge mcu` (--allow-unverified): %s", fmt, why)
    return report, entry, status


def firmware_commands() -> dict[str, str]:
    """How the sources enter a build (shown by the CLI after writing the bundle)."""
    return {"copy": "copy model_data.cc, model_data.h, model_settings.h and labels.h into the application's sources",
            "compile": "arm-none-eabi-g++ -mcpu=cortex-m4 -mthumb -O2 -c model_data.cc"}


def readme(fmt: str, entry: dict, *, status: str) -> str:
    tflm = entry["tflm"]
    agreement = tflm.get("judged_top1_agreement", tflm.get("top1_agreement"))
    if status == "pass":
        checked = (f"TFLM top-1 agreement with the Keras reference {agreement:.4f} on {tflm['images']} test images "
                   "(verify's gate: passed)")
    else:
        checked = (f"**WARNING: it failed `featx-edge mcu`** ({'; '.join(entry.get('failures') or [])}); bundled "
                   "with `--allow-unverified`")
    fits = "".join(f"\n- {name}: {'fits' if v['fits'] else 'DOES NOT FIT'} (RAM margin {v['ram']['margin']:+,} B, "
                   f"flash margin {v['flash']['margin']:+,} B)" for name, v in (entry.get("fit") or {}).items())
    return f"""# featx-edge firmware sources: {fmt}

The {fmt} model (sha256 `{entry['sha256'][:16]}...`, {tflm['flash_bytes']:,} bytes) as C sources for a
TensorFlow Lite Micro application; {checked}. The tensor arena TFLM's recording allocator measured:
{tflm['arena_bytes']:,} bytes (`FEATX_TENSOR_ARENA_SIZE`). `{MCU_JSON}`: every figure, with how it was measured.{fits}

- `model_data.h`, `model_data.cc`: `featx_model_data[]` (16-byte aligned) and `featx_model_data_len`.
- `model_settings.h`: input size and type, its scale and zero point, the preprocessing, the class count,
  the arena size.
- `labels.h`: `featx_labels[]`, in output order.

```c++
{APPLICATION_EXAMPLE}```
"""
