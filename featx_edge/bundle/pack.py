"""Bundle one verified export for a device: only what a board needs, staged beside ``--out`` and moved into place.

The model file, its ``selftest/`` folder, ``requirements.txt`` (numpy, Pillow and the one engine the format needs,
pinned as installed here), a featx-edge wheel (``own_wheel``: built from this checkout, or the installed copy
packed into one), a README with the three device commands, and ``bundle.json`` (what was bundled, how it was
verified).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from featx_edge.bundle.own_wheel import own_wheel
from featx_edge.errors import ConfigError, ExportError, ModelFileError, RunDirError, VerificationError
from featx_edge.files.atomic import atomic_path, remove_dead_temps, sha256_file, write_json
from featx_edge.files.lock import locked
from featx_edge.files.ownership import ID_KEY, MARKER, owner_problem, parse_marker, read_marker, recorded_id
from featx_edge.files.replace import check_out, make_staging, recover_replacement, replace_run
from featx_edge.formats.registry import artifact_filename, check_format, get_format
from featx_edge.rundir.names import VERIFY
from featx_edge.runtime.selftest import SELFTEST_DIR, golden_path, read_golden, written_for
from featx_edge.training.run import Run
from featx_edge.verify.record import read_record

log = logging.getLogger(__name__)
BUNDLE_JSON = "bundle.json"
BUNDLE_VERSION = 1
ENGINE_DISTRIBUTIONS = {"litert": "ai-edge-litert", "onnxruntime": "onnxruntime"}
TRAINING_ONLY = {"tensorflow", "tensorflow-cpu", "tf-keras", "keras", "tf2onnx", "onnx",
                 "tensorflow-model-optimization"}
HOST_CHECK = "featx-edge device-check {run} --arch arm64 --cpu cortex-a53,cortex-a72,cortex-a76"
VERIFY_KEPT = ("accuracy", "top1_agreement", "top1_agreement_ci95", "accuracy_change_points", "thresholds", "failures")


@dataclass(frozen=True)
class Bundle:
    """What ``bundle_run`` wrote, and the three device commands (install, selftest, predict) of its README."""

    path: Path
    format: str
    commands: dict[str, str]
    verify_status: str  # pass; FAILED, stale or not verified only with allow_unverified


def bundle_run(run: str | Path, *, fmt: str, out: str | Path, wheel: str | Path | None = None,
               allow_unverified: bool = False, overwrite: bool = False) -> Bundle:
    """Write a device bundle of ``run``'s ``fmt`` export to ``out`` (a folder, or a ``.zip`` file).

    Example:
        >>> bundle_run("runs/demo", fmt="tflite-int8", out="bundle-int8").commands["selftest"]  # doctest: +SKIP
        'featx-edge selftest model.tflite-int8.tflite'

    Raises:
        ConfigError: unknown ``fmt``; ``out`` is not a bundle featx-edge made (or is one, without ``overwrite``);
            a bad ``wheel``.
        RunDirError: ``out`` is empty, ``/`` or the current folder (or holds it); ``fmt`` was not exported, or its
            file or self-test files are not what the run recorded (or are symbolic links).
        VerificationError: ``fmt`` did not pass verify on this very file (unless ``allow_unverified``).
        ExportError: the wheel could not be built, or would install TensorFlow.
    """
    fmt, out, as_zip = check_format(fmt), Path(out), Path(out).suffix.lower() == ".zip"
    recover_bundle_out(out, as_zip=as_zip)
    check_bundle_out(out, as_zip=as_zip, overwrite=overwrite)
    if wheel is not None and not Path(wheel).is_file():
        raise ConfigError(f"`--wheel {wheel}`: no such file; give a featx_edge-*.whl built with `pip wheel`.")
    with locked(run, command="bundle", create=False):
        source = Run.open(run)
        if problems := source.artifact_problems(fmt):
            raise RunDirError(f"`{source.path}`: cannot bundle {fmt}: {'; '.join(problems)}. Re-export it: "
                              f"`featx-edge export {source.path} --formats {fmt}`, then `featx-edge verify`.")
        model, (status, verified) = source.artifact_path(fmt), _verify_entry(source, fmt, allow=allow_unverified)
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging(out, kind="bundle")
        try:
            images = _copy_model(source, fmt, model, staging)
            whl, origin, version, requires = _add_wheel(staging, wheel)
            pins, pythons = _pins(requires, engine=ENGINE_DISTRIBUTIONS[get_format(fmt).engine])
            lines = [f"# pinned as verified; then: pip install --no-deps {whl.name}", *pins.values()]
            (staging / "requirements.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
            commands = device_commands(fmt=fmt, wheel=whl.name)
            meta = {"bundle_version": BUNDLE_VERSION, "format": fmt,
                    "model": {"file": model.name, "sha256": source.manifest["artifacts"][fmt]["sha256"],
                              "bytes": model.stat().st_size},
                    "featx_edge_version": version, "exported_with": source.manifest.get("featx_edge_version"),
                    "run": str(source.path.resolve()), "labels": source.labels,
                    "verify": {"status": status, "allowed_unverified": status != "pass", **verified},
                    "requirements": pins, "requires_python": pythons, "selftest_images": images,
                    "wheel": {"file": whl.name, "sha256": sha256_file(whl), "built_from": origin}, "host_python": ".".join(map(str, sys.version_info[:3])),
                    "commands": commands, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    ID_KEY: read_marker(staging)["id"]}  # the marker's: `--overwrite` replaces only this bundle
            readme = _readme(meta, unzip=f"unzip {out.name} && cd {out.stem}" if as_zip else "")
            (staging / "README.md").write_text(readme, encoding="utf-8")
            write_json(staging / BUNDLE_JSON, meta)
            check_bundle_out(out, as_zip=as_zip, overwrite=overwrite)  # again: it may have changed while bundling
            move_bundle_into_place(staging, out, as_zip=as_zip)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.debug("wrote %s (%s, verify: %s)", out, fmt, status)  # the CLI prints it, with the commands
    return Bundle(path=out, format=fmt, commands=commands, verify_status=status)


def device_commands(*, fmt: str, wheel: str) -> dict[str, str]:
    """The three commands a device runs in the bundle folder, in one shell: install, self-test, classify."""
    model = artifact_filename(fmt)
    return {"install": "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt "
                       f"&& pip install --no-deps {wheel}",
            "selftest": f"featx-edge selftest {model}",
            "predict": f"featx-edge predict {model} photos/ --top-k 3"}


def check_bundle_out(out: Path, *, as_zip: bool, overwrite: bool) -> None:
    """Refuse, before any work, an ``--out`` that would replace anything but a bundle featx-edge made."""
    check_out(out, folder=not as_zip)
    if as_zip and out.stem in ("", ".", ".."):
        raise ConfigError(f"`--out {out}`: the name before .zip becomes the bundle's folder in the zip, and "
                          f"`{out.stem}` cannot be one; give a name like `bundle.zip`.")
    if out.exists() and out.is_dir() == as_zip:
        raise ConfigError(f"`--out {out}` exists and is not {'a .zip file' if as_zip else 'a folder'}; choose "
                          "another path (a name ending in .zip writes a zip, any other a folder).")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    problem = _zip_owner_problem(out) if as_zip else owner_problem(out, kind="bundle", record=BUNDLE_JSON)
    if problem or not overwrite:
        raise ConfigError(f"`--out {out}` " + (f"{problem}, so it is not a featx-edge bundle; choose a new path "
                          "(`--overwrite` replaces only bundles featx-edge made), or delete it yourself if you no "
                          "longer need it." if problem else "already holds a bundle; pass `--overwrite` to replace "
                          "it, or choose a new path."))


def _zip_owner_problem(out: Path) -> str | None:
    """None if ``out`` is a zip featx-edge wrote: one top folder holding a bundle marker and a bundle.json that
    records its id; else what it holds (``ownership.owner_problem``'s words)."""
    try:
        with zipfile.ZipFile(out) as zf:
            names = zf.namelist()
            tops = {name.split("/", 1)[0] for name in names}
            top = tops.pop() if len(tops) == 1 else None
            marker = parse_marker(_small_entry(zf, f"{top}/{MARKER}")) if top else None
            recorded = recorded_id(_small_entry(zf, f"{top}/{BUNDLE_JSON}")) if marker else None
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError, NotImplementedError):
        return f"is {out.stat().st_size} bytes and not a zip file featx-edge wrote"
    held = f"holds {len(names)} entr{'y' if len(names) == 1 else 'ies'}"
    if marker is None:
        return f"{held} and no `{MARKER}` marker in one top folder"
    if marker["kind"] != "bundle" or recorded != marker["id"]:
        return f"{held} and a `{MARKER}` marker that is not its bundle's"
    return None


def _small_entry(zf: zipfile.ZipFile, name: str, *, limit: int = 16 << 20) -> bytes:
    """An entry's bytes, read no further than ``limit`` (a declared size can lie); empty if absent or larger."""
    try:
        with zf.open(name) as fh:
            data = fh.read(limit + 1)
    except KeyError:
        return b""
    return data if len(data) <= limit else b""


def recover_bundle_out(out: Path, *, as_zip: bool) -> None:
    """What a killed bundle left at ``--out``: a folder replacement to finish or roll back, its staging
    folder, and a zip's temporary file (each only if its command's process is gone)."""
    if as_zip:
        remove_dead_temps(out.resolve().parent, name=out.name, recursive=False)
    else:
        recover_replacement(out, lock_held=False)


def _verify_entry(run: Run, fmt: str, *, allow: bool) -> tuple[str, dict]:
    """``fmt``'s verify status (pass, FAILED, stale, not verified) and what verify measured."""
    redo = f"`featx-edge verify {run.path} --formats {fmt}`"
    record = read_record(run.path)  # a damaged verify.json: its own one line
    entry = record.entries.get(fmt) if record is not None else None
    status, why = "pass", ""
    if entry is None:
        status, why = "not verified", f"has no entry in {VERIFY}; run {redo}"
    elif record.staleness(fmt, manifest=run.manifest) is not None:
        status, why = "stale", f"changed since it was verified ({VERIFY} measured another file); run {redo}"
    elif not entry.passed:
        status, why = "FAILED", (f"FAILED verify ({'; '.join(entry.failures) or VERIFY}); "
                                 "ship a format that passed, or fix this one (README \"int8\") and run " + redo)
    if status != "pass" and not allow:
        raise VerificationError(f"`{run.path}`: {fmt} {why}. Or pass `--allow-unverified` to bundle it anyway "
                                f"(recorded in {BUNDLE_JSON} and the bundle's README).")
    if status != "pass":  # allowed
        log.warning("bundling %s although it %s (--allow-unverified; recorded in %s)", fmt, why, BUNDLE_JSON)
    kept = {k: entry.fields[k] for k in VERIFY_KEPT if k in entry.fields} if entry is not None else {}
    return status, {**kept, "images": record.images if record is not None else None}


def _copy_model(run: Run, fmt: str, model: Path, staging: Path) -> int:
    """Copy the model and the self-test files it needs; RunDirError if they are not this export's."""
    golden_file, fix = golden_path(model), f"re-export it: `featx-edge export {run.path} --formats {fmt}`"
    try:
        golden = read_golden(golden_file)
    except ModelFileError as err:
        raise RunDirError(f"{err} The self-test files are part of the bundle; {fix}.") from err
    if not written_for(golden, fmt=fmt, sha256=run.manifest["artifacts"][fmt]["sha256"]):
        raise RunDirError(f"`{golden_file}` was written for another export than `{model}` (format or sha256 "
                          f"differ), so the device self-test would fail; {fix}.")
    if sha256_file(shutil.copyfile(model, staging / model.name)) != run.manifest["artifacts"][fmt]["sha256"]:
        raise RunDirError(f"`{model}` changed while it was being bundled; bundle again.")
    for name in (*golden.images, golden_file.name):
        _refuse_links(golden_file.parent, name, fix=fix)
        (staging / SELFTEST_DIR / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(golden_file.parent / name, staging / SELFTEST_DIR / name, follow_symlinks=False)
    return len(golden.images)


def _refuse_links(selftest: Path, name: str, *, fix: str) -> None:
    """RunDirError if ``selftest`` or any part of ``name`` in it is a symbolic link: export writes plain files,
    and a link could put a file from anywhere (a private key) into the bundle."""
    path = selftest
    for part in ("", *Path(name).parts):
        path = path / part if part else path
        if path.is_symlink():
            raise RunDirError(f"`{path}` is a symbolic link; a bundle copies only the files export wrote, never what "
                              f"a link points to. Remove the link and {fix}.")


def _add_wheel(staging: Path, wheel: str | Path | None) -> tuple[Path, str, str, list[str]]:
    """The featx-edge wheel in ``staging`` (given, or made by ``own_wheel``): (path, where it came from, its
    version, its base requirements)."""
    if wheel is not None and not re.fullmatch(r"featx_edge-[^-]+-.+\.whl", Path(wheel).name):
        raise ConfigError(f"`--wheel {wheel}`: pip installs only a wheel named as built (featx_edge-VERSION-...whl).")
    whl, origin = own_wheel(staging) if wheel is None else (Path(shutil.copyfile(wheel, staging / Path(wheel).name)),
                                                           "--wheel")
    try:
        with zipfile.ZipFile(whl) as zf:
            name = next((n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), "")
            text = zf.read(name).decode("utf-8") if name else ""
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise ConfigError(f"`{wheel or whl}` is not a readable wheel ({err}); give a featx_edge-*.whl.") from err
    fields = [tuple(part.strip() for part in line.split(":", 1)) for line in text.split("\n\n")[0].splitlines()
              if ":" in line and not line.startswith(" ")]
    if not {("Name", "featx-edge"), ("Name", "featx_edge")} & set(fields):
        raise ConfigError(f"`{wheel or whl}` is not a featx-edge wheel (no `Name: featx-edge` in its METADATA).")
    requires = [v for k, v in fields if k == "Requires-Dist" and not re.search(r"\bextra\s*==", v)]
    training = sorted({_name(r) for r in requires} & TRAINING_ONLY)
    if training:
        raise ExportError(f"`{whl.name}` requires {', '.join(training)} in its base install; a device bundle must "
                          "not pull in TensorFlow. Build it from a featx-edge whose base install is the runtime.")
    return whl, origin, next((v for k, v in fields if k == "Version"), "unknown"), requires


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def _pins(requires: list[str], *, engine: str) -> tuple[dict[str, str], dict[str, str]]:
    """Base requirements but the unused engine, pinned as installed here (or as stated); their Requires-Python."""
    pins, pythons = {}, {}
    for req in requires:
        name, marker = _name(req), (f"; {req.split(';', 1)[1].strip()}" if ";" in req else "")
        if name in ENGINE_DISTRIBUTIONS.values() and name != engine:
            continue
        try:
            dist = importlib.metadata.distribution(name)
            pins[name], pythons[name] = f"{name}=={dist.version}{marker}", dist.metadata.get("Requires-Python") or ""
        except importlib.metadata.PackageNotFoundError:
            pins[name] = req  # not installed here (e.g. tomli on Python 3.11+): as the wheel states it
    if engine not in pins:
        raise ExportError(f"the featx-edge wheel does not require {engine}, the engine this format runs on; "
                          "build the wheel from a featx-edge that does.")
    return pins, pythons


def move_bundle_into_place(staging: Path, out: Path, *, as_zip: bool) -> None:
    if not as_zip:
        os.chmod(staging, 0o755)  # a bundle is made to be read and copied
        replace_run(staging, out, kind="bundle", record=BUNDLE_JSON)  # journaled renames: old or new, never a mix
        return
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            zf.write(path, arcname=f"{out.stem}/{path.relative_to(staging).as_posix()}")


def _readme(meta: dict, *, unzip: str) -> str:
    fmt, model, verify, cmds = meta["format"], meta["model"], meta["verify"], meta["commands"]
    floor = max((tuple(map(int, m)) for spec in meta["requires_python"].values()
                 for m in re.findall(r">=\s*(\d+)\.(\d+)", spec)), default=None)
    python, tolerance = f"Python {floor[0]}.{floor[1]}+" if floor else "Python 3", get_format(fmt).selftest_tolerance
    name, mb, sha, images = model["file"], model["bytes"] / 1e6, model["sha256"][:16], meta["selftest_images"]
    run = Path(meta["run"]).name  # the folder's name only: the bundle travels, the host's paths stay home
    checked = (f"verify passed on the host (top-1 agreement {verify.get('top1_agreement', float('nan')):.4f} with "
               f"the Keras reference, {verify.get('images')} test images)" if verify["status"] == "pass" else
               f"**WARNING: not verified ({verify['status']})**: bundled with `--allow-unverified`")
    return f"""# featx-edge device bundle: {fmt}

`{name}` ({mb:.2f} MB, sha256 `{sha}...`), featx-edge {meta['featx_edge_version']},
run `{run}`; {checked}. No TensorFlow needed.

Needs Linux (aarch64 or x86-64), {python} with venv, and pip with access to PyPI or a mirror: pip
picks the wheels of the pinned versions for the device's CPU (aarch64 on an ARM board). In this folder{
f' (`{unzip}` first)' if unzip else ''}, in one shell:

1. Install (once): numpy, Pillow and this model's engine only (`--no-deps`: the wheel's metadata names both engines).
```bash
{cmds['install']}
```
2. Self-test: the {images} held-out images in `{SELFTEST_DIR}/` must keep the Keras reference's top-1 class and stay
   within {tolerance} of the export machine's probabilities. PASS: this device's engine, its kernels on this CPU
   and the image code reproduce the export. It measures neither accuracy on your images nor speed.
```bash
{cmds['selftest']}
```
3. Classify (`photos/`: your image files or folders; `--json`: one JSON object per line).
```bash
{cmds['predict']}
```

On the host, before copying: `{HOST_CHECK.format(run=run)}` runs the export with the arm64
engines under user-mode qemu on emulated cores and compares the outputs with the host's: it shows that the ARM
kernels agree, never speed, and does not replace the self-test on the board. `{BUNDLE_JSON}`: what was bundled.
"""
