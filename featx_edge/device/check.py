"""``featx-edge device-check``: every export's self-test and a prediction comparison on emulated cores.

Example:
    >>> from featx_edge.device.check import device_check
    >>> result = device_check(["runs/demo"], cpus="cortex-a53,cortex-a72", images=64)  # doctest: +SKIP
    >>> print(result.table); result.passed  # doctest: +SKIP

For a run, the check images are its whole test split (or ``--images`` of them, evenly spaced so
every class is in) and each format on each core is judged as verify judges it: against the Keras
reference's outputs that verify recorded (``verify_reference.npy``), with the format's thresholds,
intervals and tie rule; the differences from this host's outputs are reported beside, as
information. The report goes to ``RUN/device_check.json``. For a bare model file the check images
are those of its ``selftest/`` folder, judged against the host and the export-time outputs, and the
report is printed (or written to ``--out``). The host computes its own outputs with
``featx_edge.runtime``; each core runs one guest Python that loads each model once
(``featx_edge.device.guest``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from featx_edge import __version__
from featx_edge.device.compare import SPEED_NOTE, Row, compare_outputs, format_table
from featx_edge.device.cores import parse_arch, parse_cores
from featx_edge.device.emulator import (
    describe_exit,
    find_qemu,
    make_prefix,
    output_tail,
    qemu_version,
    run_python,
)
from featx_edge.device.env import Environment, ensure_environment
from featx_edge.errors import ConfigError, ModelFileError, RunDirError, check_int
from featx_edge.files.atomic import sha256_file, write_json
from featx_edge.files.lock import locked
from featx_edge.formats.registry import parse_formats, thresholds_for, tie_margin
from featx_edge.progress import verbose
from featx_edge.rundir.names import DEVICE_CHECK as REPORT
from featx_edge.runtime.predictor import check_threads
from featx_edge.runtime.selftest import Golden, golden_path, read_golden, tolerance_for
from featx_edge.verify.runner import read_reference_outputs
from featx_edge.versions import installed_versions

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 64
"""Self-test images compared for a bare model file (a run uses its whole test split by default)."""
GATE_MIN_IMAGES = 200
"""Fewer test images than this and the report says the gate's intervals are wide."""
SCHEMA = 1
_ENGINES = ("numpy", "pillow", "onnxruntime", "ai-edge-litert")


@dataclass(frozen=True)
class Job:
    """One model to check: its golden self-test data and the images to compare on."""

    target: str
    run: Path | None
    format: str
    model: Path
    sha256: str
    golden: Golden
    selftest_images: tuple[str, ...]
    images: tuple[str, ...]
    gate: dict | None = None  # for a run: {"reference", "labels", "limits", "tie_margin"} on ``images``


@dataclass
class CheckResult:
    """Every row, the report per target (``reports``: target -> dict) and the printable table."""

    rows: list[Row]
    reports: dict[str, dict] = field(default_factory=dict)
    table: str = ""

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)


def device_check(targets: list[str], *, arch: str = "arm64", cpus: str | None = None,
                 images: int | None = None, formats: str | None = None, threads: int = 1,
                 out: str | Path | None = None) -> CheckResult:
    """Check ``targets`` (run folders or model files) on emulated ``cpus`` of ``arch``.

    Writes ``RUN/device_check.json`` for each run, and every target's report to ``out`` if given.

    Raises:
        ConfigError: an unknown architecture or core, `max`, a bad ``images`` or ``formats``.
        RunDirError, ModelFileError: a target is not a run or an exported model with its self-test data.
        DeviceError: QEMU is missing, the environment cannot be built or downloaded.
    """
    target_arch = parse_arch(arch)
    cores = parse_cores(target_arch, cpus)
    if images is not None:
        check_int("--images", images, low=1)
    check_threads(threads)
    wanted = parse_formats(formats) if formats is not None else None  # `--formats ""` is refused
    if not targets:
        raise ConfigError("`featx-edge device-check` needs at least one run folder or model file.")
    targets = list(dict.fromkeys(str(t) for t in targets))  # each once
    qemu = find_qemu(target_arch)  # before anything slow
    runs = [Path(t) for t in targets if Path(t).is_dir()]
    with contextlib.ExitStack() as stack:
        for run in runs:
            stack.enter_context(locked(run, command="device-check"))
        jobs = [job for t in targets for job in _jobs(t, images=images, formats=wanted)]
        # The host first: a model that gives NaN/Inf here is refused before the slow guest environment.
        host = {job.model: _host_outputs(job, threads=threads) for job in jobs}
        env = ensure_environment(target_arch, qemu=qemu)
        guests = _run_cores(env, qemu=qemu, cores=cores, jobs=jobs, threads=threads)
        rows = [_row(job, core, guests[core], host[job.model]) for job in jobs for core in cores]
        result = CheckResult(rows=rows)
        context = _context(env, qemu=qemu, cores=cores, guests=guests, threads=threads)
        for target in dict.fromkeys(job.target for job in jobs):
            mine = [job for job in jobs if job.target == target]
            report = _report(target, mine, [r for r in rows if r.target == target], context)
            result.reports[target] = report
            if mine[0].run is not None:
                write_json(mine[0].run / REPORT, report)
    if out is not None:
        write_json(out, {"note": SPEED_NOTE, "passed": result.passed, "targets": list(result.reports.values())})
    title = (f"device check on emulated {target_arch.name} ({context['emulator']}; Debian {context['guest_os']}, "
             f"Python {context['guest_python']})")
    result.table = format_table(rows, title=title)
    return result


def _jobs(target: str, *, images: int | None, formats: tuple[str, ...] | None) -> list[Job]:
    path = Path(target)
    if path.is_dir():
        return _run_jobs(path, images=images, formats=formats)
    if not path.is_file():
        raise ConfigError(f"`{target}` is neither a run folder nor a model file; pass a folder made by "
                          "`featx-edge run` or an exported .tflite / .onnx file with its selftest/ folder.")
    job = _model_job(path, target=target, run=None, images=images or DEFAULT_IMAGES)
    if formats is not None and job.format not in formats:
        raise ConfigError(f"`{target}` is a {job.format} model, which `--formats` leaves out.")
    return [job]


def _run_jobs(path: Path, *, images: int | None, formats: tuple[str, ...] | None) -> list[Job]:
    from featx_edge.training.run import Run

    run = Run.open(path)
    exported = run.exported()
    chosen = [fmt for fmt in exported if formats is None or fmt in formats]
    if not chosen:
        raise RunDirError(f"`{path}` has no exported model{' of ' + ', '.join(formats) if formats else ''} "
                          f"(exported: {', '.join(exported) or 'none'}); run `featx-edge export {path}` first.")
    for fmt in chosen:
        problems = run.artifact_problems(fmt)
        if problems:
            raise RunDirError(f"`{path}`: the {fmt} export is not usable: {'; '.join(problems)}. Re-export it with "
                              f"`featx-edge export {path} --formats {fmt}`.")
    splits = run.splits()
    test = [os.path.abspath(splits.root / rel) for rel in splits.test]  # the guest runs in another folder
    if not test:
        raise RunDirError(f"`{path}`: the test split is empty; nothing to compare on.")
    count = min(images or len(test), len(test))
    step = len(test) / count  # evenly spaced: every class, whatever the split's order
    rows = [int(i * step) for i in range(count)]
    picked = tuple(test[i] for i in rows)
    reference = read_reference_outputs(run)[rows]
    labels = splits.labels("test")[rows]
    overrides = run.manifest.get("config", {}).get("verify", {})
    jobs = []
    for fmt in chosen:
        limits = thresholds_for(fmt, overrides)
        gate = {"reference": reference, "labels": labels, "limits": limits, "tie_margin": tie_margin(fmt, limits),
                "split_images": len(test)}
        jobs.append(_model_job(run.artifact_path(fmt), target=str(path), run=path, images=count, test=picked,
                               gate=gate))
    return jobs


def _model_job(model: Path, *, target: str, run: Path | None, images: int,
               test: tuple[str, ...] | None = None, gate: dict | None = None) -> Job:
    golden_file = golden_path(model)
    golden = read_golden(golden_file)
    sha = sha256_file(model)
    if golden.model_sha256 is not None and golden.model_sha256 != sha:
        raise ModelFileError(f"{golden_file}: written for another export of this model (its sha256 differs from "
                             f"`{model}`); copy the model and its selftest/ folder from the same export, or re-export.")
    selftest = tuple(str((golden_file.parent / name).resolve()) for name in golden.images)
    return Job(target=target, run=run, format=golden.format, model=model.resolve(), sha256=sha, golden=golden,
               selftest_images=selftest, images=test if test is not None else selftest[:images], gate=gate)


def _host_outputs(job: Job, *, threads: int):
    """This host's probabilities on the check images; NonFiniteOutputError (one line) for NaN/Inf."""
    from featx_edge.runtime import load

    return load(job.model, threads=threads).predict_proba(list(job.images))


def _run_cores(env: Environment, *, qemu: str, cores: tuple[str, ...], jobs: list[Job], threads: int) -> dict:
    """Each core's guest results (or ``{"error": ...}``), the cores side by side up to the host's CPU count."""
    request = {"threads": threads, "models": [
        {"path": str(job.model), "format": job.format,
         "images": {"test": list(job.images), "selftest": list(job.selftest_images)}} for job in jobs]}
    timeout = 600 + 10 * sum(len(job.images) + len(job.selftest_images) for job in jobs)
    log.info("running %d model(s) on emulated %s (one guest Python per core)", len(jobs), ", ".join(cores))
    with tempfile.TemporaryDirectory(prefix="featx-edge-device-") as tmp:
        work = Path(tmp)
        write_json(work / "request.json", request)

        def one(core: str) -> dict:
            prefix = make_prefix(env.sysroot, env.arch.cores[core], work / f"prefix-{core}")
            out = work / f"results-{core}.json"
            proc = run_python(qemu=qemu, core=core, prefix=prefix, python=env.python, pythonpath=env.pythonpath,
                              args=["-m", "featx_edge.device.guest", "--json", str(work / "request.json"),
                                    "--out", str(out)], timeout=timeout)
            if verbose() and proc.returncode == 0:
                log.info("output of the guest on %s:\n%s", core, output_tail(proc, lines=200))
            if proc.returncode != 0 or not out.is_file():
                log.warning("the guest on %s failed (%s):\n%s", core, describe_exit(proc), output_tail(proc))
                return {"error": f"the guest Python failed ({describe_exit(proc)}); its output is shown above"}
            results = json.loads(out.read_text(encoding="utf-8"))
            seen, part = results.get("cpuinfo"), f"0x{env.arch.cores[core].part:03x}"
            if seen != part:
                return {**results, "error": f"the guest saw CPU part {seen} in /proc/cpuinfo, not {core}'s {part}"}
            log.info("%s: done", core)
            return results

        with ThreadPoolExecutor(max_workers=max(1, min(len(cores), os.cpu_count() or 1))) as pool:
            return dict(zip(cores, pool.map(one, cores)))


def _row(job: Job, core: str, guest: dict, host) -> Row:
    base = {"target": job.target, "fmt": job.format, "core": core, "tolerance": tolerance_for(job.format)}
    if "error" in guest:
        return Row(target=job.target, format=job.format, core=core, tolerance=base["tolerance"], error=guest["error"])
    entry = next((m for m in guest["models"] if m["path"] == str(job.model)), None)
    if entry is None or "error" in entry:
        why = entry["error"] if entry else "the guest returned no result for this model"
        return Row(target=job.target, format=job.format, core=core, tolerance=base["tolerance"],
                   error=f"the runtime failed on {core}: {why}")
    return compare_outputs(**base, guest_test=entry["outputs"]["test"], host_test=host,
                           guest_selftest=entry["outputs"]["selftest"], reference=job.golden.reference,
                           expected=job.golden.expected, gate=job.gate)


def _context(env: Environment, *, qemu: str, cores: tuple[str, ...], guests: dict, threads: int) -> dict:
    return {"arch": env.arch.name, "cores": list(cores), "emulator": qemu_version(qemu),
            "guest_os": f"{env.info['suite']} {env.arch.debian}",
            "guest_python": next((g["python"] for g in guests.values() if "python" in g), env.info["python"]),
            "environment": env.info, "threads": threads,
            "guest": {core: {key: g.get(key) for key in ("machine", "python", "versions", "cpuinfo", "error")
                             if key in g} for core, g in guests.items()},
            "host": {"machine": platform.machine(), "python": platform.python_version(), "versions": installed_versions(_ENGINES)}}


def _report(target: str, jobs: list[Job], rows: list[Row], context: dict) -> dict:
    first = jobs[0]
    source = "the model's selftest/ images"
    if first.run is not None:
        source = f"the test split ({len(first.images)} of {first.gate['split_images']} images, evenly spaced)"
        if len(first.images) < GATE_MIN_IMAGES:
            source += (f" (fewer than {GATE_MIN_IMAGES} images: the gate's intervals are wide; one image moves "
                       f"agreement {100 / max(len(first.images), 1):.1f} points)")
    return {"schema": SCHEMA, "note": SPEED_NOTE, "featx_edge": __version__, "target": target,
            "proves": "the exported models' kernels and numerics on these emulated cores (instruction set and core "
                      "model); not speed, and not a real device's drivers, NPU or GPU delegates",
            **{key: context[key] for key in ("arch", "cores", "emulator", "threads", "environment", "guest",
                                               "host")},
            "images": {"count": len(first.images), "source": source},
            "artifacts": {job.format: {"path": str(job.model), "sha256": job.sha256} for job in jobs},
            "results": [row.to_dict() for row in rows], "passed": all(row.passed for row in rows)}
