"""``featx-edge mcu RUN``: every fully-integer TFLite export judged under TensorFlow Lite Micro, compiled for
Ethos-U NPUs on request, sized against microcontroller profiles, and written out as firmware sources.

The judgement is verify's: the model's outputs on the whole test split against the Keras
reference's (``verify_reference.npy``, recorded by ``featx-edge verify``), with the format's
thresholds, intervals and tie rule (``fidelity.compare`` / ``check``). ``RUN/mcu.json`` records the
sha256 of every file it measured or wrote, so a later reader can tell a stale entry.

Example:
    >>> from featx_edge.mcu.check import mcu_run
    >>> report = mcu_run("runs/demo", profiles="cortex-m7-1m", npu="ethos-u55-128")  # doctest: +SKIP
    >>> report["formats"]["tflite-int8"]["tflm"]["arena_bytes"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from featx_edge import __version__
from featx_edge.data.folders import iter_batches
from featx_edge.errors import ConfigError, ExportError, RunDirError, VerificationError
from featx_edge.export.tflite import op_types
from featx_edge.fidelity.gate import check, compare
from featx_edge.files.atomic import sha256_file, write_json
from featx_edge.files.lock import locked
from featx_edge.formats.registry import Thresholds, get_format, thresholds_for, tie_margin
from featx_edge.mcu import MCU_JSON, SCHEMA
from featx_edge.mcu.firmware import write_firmware
from featx_edge.mcu.profiles import Profile, fit, get_profile, misfit_line, parse_profiles
from featx_edge.mcu.tflm import ARENA_NOTE, TflmResult, require_tflm, run_tflm
from featx_edge.mcu.vela import compile_for, parse_npu, require_vela
from featx_edge.progress import bar
from featx_edge.rundir.names import EXPORT_DIR, FIRMWARE_DIR
from featx_edge.runtime.predictor import nonfinite_rows
from featx_edge.training.run import Run
from featx_edge.verify.runner import read_reference_outputs
from featx_edge.versions import installed_versions

log = logging.getLogger(__name__)

_BATCH = 64
VELA_SUFFIX = ".vela.tflite"
"""Vela's optimised files: ``export/model.FORMAT.CONFIG.vela.tflite``."""
_KEPT = ("top1_agreement_ci95", "judged_top1_agreement", "judged_top1_agreement_ci95", "accuracy_ci95",
         "accuracy_change_ci95_points", "judged_accuracy_change_points", "judged_accuracy_change_ci95_points",
         "disagreements", "near_ties", "tie_margin", "near_tie_images", "max_abs_diff", "nonfinite")


def mcu_run(run: str | Path, *, profiles: str | tuple[str, ...] | None = None,
            npu: str | tuple[str, ...] | None = None) -> dict:
    """Check ``run``'s fully-integer TFLite exports for microcontrollers; writes ``RUN/mcu.json``.

    Raises:
        ConfigError: an unknown profile or NPU configuration (before any work).
        RunDirError: no fully-integer TFLite export, or no current reference outputs from verify.
        VerificationError: one line naming each format that fails the gate under TFLM, does not
            fit a requested profile (by how much), or that Vela could not compile.
        ImportError: the ``[mcu]`` extra is missing (the CLI names it).
    """
    chosen, accelerators = parse_profiles(profiles), parse_npu(npu)
    require_tflm()
    if accelerators:
        require_vela()
    with locked(run, command="mcu"):
        return _check(Run.open(run, recover=True), profiles=chosen, npu=accelerators)


def check_settings(*, profiles, npu, formats: tuple[str, ...]) -> None:
    """What `featx-edge run` checks before training when it is to run the check: the profile and NPU
    names, a fully-integer TFLite format among ``formats``, and the ``[mcu]`` extra (ImportError)."""
    parse_profiles(profiles)
    if not any(_runs_on_mcu(fmt) for fmt in formats):
        raise ConfigError(f"the microcontroller check (`--mcu`, `--profile`, `--npu` or [mcu]) runs fully-integer "
                          f"TFLite exports, and `--formats` ({','.join(formats)}) has none; add tflite-int8.")
    require_tflm()
    if parse_npu(npu):
        require_vela()


def _runs_on_mcu(fmt: str) -> bool:
    """A fully-integer TFLite file: what TFLite Micro runs as it is."""
    spec = get_format(fmt)
    return spec.engine == "litert" and spec.integer_only


def integer_formats(run: Run) -> list[str]:
    """The run's exports a microcontroller can run as they are: fully-integer TFLite files."""
    chosen = [fmt for fmt in run.exported() if _runs_on_mcu(fmt)]
    if not chosen:
        raise RunDirError(f"`{run.path}` has no fully-integer TFLite export (exported: "
                          f"{', '.join(run.exported()) or 'none'}); run `featx-edge export {run.path} --formats "
                          "tflite-int8`, then `featx-edge verify`.")
    for fmt in chosen:
        if problems := run.artifact_problems(fmt):
            raise RunDirError(f"`{run.path}`: the {fmt} export is not usable: {'; '.join(problems)}. Re-export it "
                              f"with `featx-edge export {run.path} --formats {fmt}`.")
    return chosen


def _check(run: Run, *, profiles: tuple[str, ...], npu: tuple[str, ...]) -> dict:
    formats = integer_formats(run)
    reference = read_reference_outputs(run, needed_by="mcu")
    splits = run.splits()
    labels = splits.labels("test")
    overrides = run.manifest.get("config", {}).get("verify", {})
    report: dict = {"schema": SCHEMA, "featx_edge": __version__, "run": str(run.path),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "images": len(labels), "reference_sha256": run.manifest["reference"]["sha256"],
                    "kernels": "TensorFlow Lite Micro's reference kernels (CMSIS-NN is held bit-exact to them)",
                    "versions": installed_versions(("tflite-micro", "ethos-u-vela")),
                    "latency": "not measured: the host's TFLM interpreter says nothing about a device's speed; "
                               "the NPU times are Vela's estimates",
                    "profiles": {name: dataclasses.asdict(get_profile(name)) for name in profiles},
                    "formats": {}}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="featx-edge-mcu-") as tmp:
        pixels = _save_test_pixels(run, Path(tmp) / "test.npy")
        for fmt in formats:
            limits = thresholds_for(fmt, overrides)
            entry, problems = _check_format(run, fmt, pixels=pixels, reference=reference, labels=labels,
                                            limits=limits, npu=npu)
            problems += _fits(entry, fmt, profiles)
            entry["passed"], entry["failures"] = not problems, problems
            report["formats"][fmt] = entry
            failures += problems
    report["passed"] = not failures
    write_json(run.path / MCU_JSON, report)
    log.info("wrote %s", run.path / MCU_JSON)
    if failures:
        raise VerificationError(f"`{run.path}`: " + "; ".join(failures) + f" (details in {run.path / MCU_JSON})")
    return report


def _save_test_pixels(run: Run, path: Path) -> Path:
    """The test split's pixels, decoded as verify decodes them, into an .npy the TFLM child reads."""
    splits = run.splits()
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                       shape=(len(splits.test), run.size, run.size, 3))
    batches = bar(iter_batches(splits.root, splits.test, size=run.size, batch_size=_BATCH),
                  total=-(-len(splits.test) // _BATCH), desc="decoding test images", unit="batch")
    start = 0
    for batch in batches:
        pixels[start : start + len(batch)] = batch
        start += len(batch)
    pixels.flush()
    del pixels
    return path


def _check_format(run: Run, fmt: str, *, pixels: Path, reference: np.ndarray, labels: np.ndarray,
                  limits: Thresholds, npu: tuple[str, ...]) -> tuple[dict, list[str]]:
    """One format's ``mcu.json`` entry (TFLM, firmware, NPUs) and its failures."""
    path, sha = run.artifact_path(fmt), run.manifest["artifacts"][fmt]["sha256"]
    log.info("%s: running the %d test images through TensorFlow Lite Micro ...", fmt, len(labels))
    result = run_tflm(path, pixels, images=len(labels))
    tflm, problems = _judge(fmt, result, reference, labels, limits=limits, model_bytes=path.stat().st_size)
    tflm["operators"] = op_types(path.read_bytes())
    entry: dict = {"path": path.relative_to(run.path).as_posix(), "sha256": sha, "tflm": tflm}
    folder = run.path / EXPORT_DIR / FIRMWARE_DIR / fmt
    for written in (folder.parent, folder):  # sources of an earlier export of this format never stay behind
        _clear(written, keep_folder=written == folder.parent)
    for old in (run.path / EXPORT_DIR).glob(f"model.{glob.escape(fmt)}.*{VELA_SUFFIX}"):
        old.unlink()  # nor Vela files of an earlier check: export/ holds what mcu.json records
    if result.arena_bytes is not None and result.error is None:
        files = write_firmware(folder, model=path, fmt=fmt, sha256=sha, labels=run.labels,
                               input_info=run.manifest["input"], arena_bytes=result.arena_bytes)
        entry["firmware"] = {"folder": folder.relative_to(run.path).as_posix(), "files": files}
    if npu:
        entry["npu"] = {}
    for accelerator in npu:
        entry["npu"][accelerator], problem = _vela(run, fmt, path, accelerator)
        problems += [problem] if problem else []
    return entry, problems


def _clear(path: Path, *, keep_folder: bool) -> None:
    """Remove what an earlier check wrote at ``path`` (a folder, unless ``keep_folder``); a symbolic link
    there is removed as a link, never followed, so nothing outside the run is deleted or written."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir() and not keep_folder:
        shutil.rmtree(path)


def _judge(fmt: str, result: TflmResult, reference: np.ndarray, labels: np.ndarray, *, limits: Thresholds,
           model_bytes: int) -> tuple[dict, list[str]]:
    """The ``tflm`` entry: verify's metrics of TFLM's outputs against the reference, the arena, the flash."""
    metrics: dict = {}
    if result.error is not None:
        problems = [result.error]
    elif nonfinite := nonfinite_rows(result.probs):
        metrics["nonfinite"] = nonfinite
        problems = [f"{nonfinite} of {len(result.probs)} test images gave NaN/Inf outputs"]
    else:
        metrics = compare(result.probs, reference, labels, tie_margin=tie_margin(fmt, limits))
        problems = check(metrics, limits)
    tflm = {"top1_agreement": metrics.get("top1_agreement"), "accuracy": metrics.get("accuracy"),
            "accuracy_change_points": metrics.get("accuracy_change_points"), "images": len(labels),
            "arena_bytes": result.arena_bytes, "flash_bytes": model_bytes,
            "unsupported_ops": list(result.unsupported_ops),
            **{key: metrics[key] for key in _KEPT if key in metrics},
            "arena_measured_by": ARENA_NOTE, "thresholds": dataclasses.asdict(limits),
            "passed": not problems, "failures": problems}
    return tflm, [f"{fmt} under TFLite Micro: {problem}" for problem in problems]


def _vela(run: Run, fmt: str, path: Path, accelerator: str) -> tuple[dict, str | None]:
    """Vela's entry for ``fmt`` on ``accelerator`` (the optimised file under ``export/``), and a failure."""
    out = run.path / EXPORT_DIR / f"model.{fmt}.{accelerator}{VELA_SUFFIX}"
    log.info("%s: compiling for %s with Vela ...", fmt, accelerator)
    try:
        entry = compile_for(path, accelerator, out=out)
    except ExportError as err:
        return {"error": str(err)}, f"{fmt} on {accelerator}: {err}"
    return {**entry, "path": out.relative_to(run.path).as_posix(), "sha256": sha256_file(out),
            "bytes": out.stat().st_size}, None


def _fits(entry: dict, fmt: str, profiles: tuple[str, ...]) -> list[str]:
    """Fill ``entry["fit"]`` with each profile's verdict; a line per profile the format misses."""
    tflm = entry["tflm"]
    if not profiles or tflm["arena_bytes"] is None:
        return []
    entry["fit"], misses = {}, []
    for name in profiles:
        verdict = _verdict(get_profile(name), tflm, entry.get("npu") or {})
        entry["fit"][name] = verdict
        if not verdict["fits"]:
            misses.append(misfit_line(fmt, verdict))
    return misses


def _verdict(profile: Profile, tflm: dict, npu: dict) -> dict:
    """A part with an NPU that Vela compiled for: Vela's SRAM and optimised file; else TFLM on the CPU."""
    compiled = npu.get(profile.npu) if profile.npu else None
    if compiled and "error" not in compiled:
        verdict = fit(profile, arena_bytes=compiled["sram_bytes"], model_bytes=compiled["bytes"])
        verdict["basis"] = (f"on the {profile.npu}: Vela's SRAM use as the arena and its optimised file as the model")
        return verdict
    verdict = fit(profile, arena_bytes=tflm["arena_bytes"], model_bytes=tflm["flash_bytes"])
    verdict["basis"] = "on the CPU with TFLM: the measured arena and the .tflite file" + (
        f" (pass `--npu {profile.npu}` for the NPU's figures)" if profile.npu else "")
    return verdict
