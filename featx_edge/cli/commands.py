"""One function per subcommand: parsed arguments -> configs -> library calls. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path


def _config_from_args(args: argparse.Namespace):
    from featx_edge.config import RunConfig, load_config, override

    config = load_config(args.config) if getattr(args, "config", None) else RunConfig()
    config = override(config, "data", path=getattr(args, "data", None))
    config = override(config, "model", backbone=args.backbone, alpha=args.alpha, weights=args.weights,
                      image_size=args.image_size, head_units=args.head_units, dropout=args.dropout,
                      cut_at=getattr(args, "cut_at", None))
    config = override(config, "train", epochs=args.epochs, batch_size=args.batch_size,
                      learning_rate=args.learning_rate, fine_tune_epochs=getattr(args, "fine_tune_epochs", None),
                      unfreeze_top=getattr(args, "unfreeze_top", None),
                      fine_tune_learning_rate=getattr(args, "fine_tune_learning_rate", None),
                      mixed_precision=args.mixed_precision, qat_epochs=getattr(args, "qat_epochs", None),
                      jit_compile=getattr(args, "jit_compile", None), strategy=getattr(args, "strategy", None),
                      feature_cache=getattr(args, "feature_cache", None),
                      augment_views=getattr(args, "augment_views", None), augment=getattr(args, "augment", None))
    config = _export_overrides(config, args)
    config = override(config, "mcu", enabled=getattr(args, "mcu", None),
                      profiles=_split(getattr(args, "profile", None)), npu=_split(getattr(args, "npu", None)))
    return override(config, "seed", seed=args.seed)


def _split(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(item.strip() for item in text.split(",") if item.strip())


def _export_overrides(config, args):
    from featx_edge.config import override
    from featx_edge.formats.registry import parse_formats

    # `--formats ""` is refused (naming the formats), never read as "the default: all".
    formats = parse_formats(args.formats) if getattr(args, "formats", None) is not None else None
    return override(config, "export", formats=formats, int8_budget=getattr(args, "int8_budget", None),
                    onnx_calibration=getattr(args, "onnx_calibration", None), target=getattr(args, "target", None),
                    workers=_workers(getattr(args, "workers", None)))


def _workers(text: str | None) -> str | int | None:
    """``--workers``: "auto", or a number of processes (the parser allows only auto, 1 and 2)."""
    return int(text) if text is not None and text.isdigit() else text


def _thresholds(args) -> dict:
    from featx_edge.formats.registry import parse_threshold

    overrides: dict = {}
    for text in args.threshold:
        fmt, metric, value = parse_threshold(text)
        overrides.setdefault(fmt, {})[metric] = value
    return overrides


def _cmd_backbones(args) -> int:
    from featx_edge.backbones.registry import BACKBONES

    print(f"{'name':<20} {'size':>5} {'preprocessing':<14} {'features':>8}  alphas")
    for spec in BACKBONES.values():
        alphas = ", ".join(map(str, spec.alphas)) or "-"
        print(f"{spec.name:<20} {spec.default_size:>5} {spec.preprocessing:<14} {spec.feature_dim:>8}  {alphas}")
    return 0


def _cmd_sample_data(args) -> int:
    from featx_edge.data.sample import write_sample_data

    root = write_sample_data(args.dir)
    print(f"wrote sample data to {root}: all/ (digits 0-9, `--data sample`), source/ (digits 0-4, for "
          "pretraining) and target/ (digits 5-9, a transfer task)")
    return 0


def _cmd_pretrain(args) -> int:
    from featx_edge.training.pretrain import pretrain

    config = _config_from_args(args)
    pretrain(data=config.data.path, out=args.out, model=config.model, train=config.train, seed=config.seed,
             val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction)
    return 0


def _cmd_train(args) -> int:
    from featx_edge.training.train import train_run

    train_run(_config_from_args(args), args.out, overwrite=args.overwrite, resume=args.resume)
    return 0


def _cmd_fit(args) -> int:
    from featx_edge.config import parse_int_list
    from featx_edge.fit.command import fit_run, parse_cuts
    from featx_edge.progress import say

    config = _config_from_args(args)
    result = fit_run(config, profile=args.profile, out=args.out, overwrite=args.overwrite,
                     cuts=parse_cuts(args.fit_cuts) if args.fit_cuts is not None else None,
                     sizes=parse_int_list("image-sizes", args.image_sizes) if args.image_sizes is not None else None,
                     alphas=_floats("alphas", args.alphas) if args.alphas is not None else None, npu=args.npu)
    say(result.table)
    if result.final:
        final = result.final
        say(f"trained and exported {result.chosen.candidate.label()} to {args.out}: {final['format']} "
            f"{final['flash_bytes']:,} B, TFLM arena {final['arena_bytes']:,} B; fits {args.profile} "
            f"(RAM margin {final['verdict']['ram']['margin']:,} B, flash margin {final['verdict']['flash']['margin']:,} B); "
            f"next: featx-edge verify {args.out} && featx-edge mcu {args.out} --profile {args.profile}")
    return 0


def _floats(name: str, text: str) -> tuple[float, ...]:
    from featx_edge.errors import ConfigError

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(f"`--{name}` takes comma-separated numbers, e.g. 0.35,0.5; received `{text}`.")
    return values


def _cmd_export(args) -> int:
    from featx_edge.config import override
    from featx_edge.errors import VerificationError
    from featx_edge.export import budget_failure, export_run
    from featx_edge.formats.registry import parse_formats

    def change(config):  # recorded in the run when the export succeeds: the manifest says how it was made
        config = override(config, "train", qat_epochs=args.qat_epochs)
        return override(config, "export", int8_budget=args.int8_budget, onnx_calibration=args.onnx_calibration,
                        target=args.target, workers=_workers(args.workers))

    changed = (args.qat_epochs is not None or args.int8_budget is not None or args.onnx_calibration
               or args.target or args.workers is not None)
    formats = parse_formats(args.formats) if args.formats is not None else None  # before the run is locked
    manifest = export_run(args.run, formats=formats, settings=change if changed else None)
    missed = budget_failure(manifest)
    if missed:
        raise VerificationError(missed)
    return 0


def _cmd_verify(args) -> int:
    from featx_edge.errors import VerificationError
    from featx_edge.formats.registry import parse_formats, parse_kernel_sets
    from featx_edge.rundir.manifest import read_manifest
    from featx_edge.verify.record import read_record
    from featx_edge.verify.runner import format_table, verify_run

    formats = parse_formats(args.formats) if args.formats is not None else None  # `--formats ""` is refused
    kernels = parse_kernel_sets(args.kernels) if args.kernels is not None else None
    try:
        report = verify_run(args.run, formats=formats, overrides=_thresholds(args), kernels=kernels)
    except VerificationError:
        record = read_record(args.run)
        if record is not None:  # the table of what was measured, then the error
            print(format_table(dict(record.fields), read_manifest(args.run)))
        raise
    print(format_table(report, read_manifest(args.run)))
    return 0


def _cmd_report(args) -> int:
    from featx_edge.report import write_report

    print(f"wrote {write_report(args.run)}")
    return 0


def _cmd_run(args) -> int:
    from featx_edge.errors import VerificationError
    from featx_edge.export import budget_failure
    from featx_edge.files.lock import locked
    from featx_edge.formats.registry import merge_overrides, parse_kernel_sets
    from featx_edge.progress import StageClock
    from featx_edge.training.distribute import is_chief
    from featx_edge.training.train import check_destination, train_run

    config = _config_from_args(args)
    # Parsed before training (a typo must not cost a training run) and recorded with the run,
    # so a later `featx-edge verify RUN` applies the same thresholds.
    overrides = _thresholds(args)
    config = dataclasses.replace(config, verify=merge_overrides(config.verify, overrides))
    kernels = parse_kernel_sets(args.kernels) if args.kernels is not None else None
    if config.mcu.wanted:  # names, formats and the [mcu] extra checked before training, not after it
        _check_mcu_settings(config)
    check_destination(config, args.out)  # before the lock below creates any folder
    if not is_chief(config.train.strategy):  # a multi-worker helper: trains in step, exports nothing
        train_run(config, args.out, overwrite=args.overwrite, resume=args.resume)
        return 0
    with locked(args.out, command="run", create=True), StageClock.started() as clock:
        try:
            manifest = _run_stages(args, config, kernels)
        finally:
            _record_stage_times(args.out, clock)
    missed = budget_failure(manifest)
    if missed:
        raise VerificationError(missed)
    return 0


def _run_stages(args, config, kernels) -> dict:
    """``run``'s steps after training's checks, under its lock, each timed as a stage; the export's manifest."""
    from featx_edge.errors import VerificationError
    from featx_edge.export import export_run
    from featx_edge.progress import say, stage
    from featx_edge.report import report_after_run
    from featx_edge.rundir.manifest import read_manifest
    from featx_edge.training.train import train_run
    from featx_edge.verify.record import read_record
    from featx_edge.verify.runner import format_table, verify_run

    train_run(config, args.out, overwrite=args.overwrite, resume=args.resume)
    with stage("export"):
        manifest = export_run(args.out, formats=config.export.formats)
    try:
        with stage("verify"):
            report = verify_run(args.out, kernels=kernels)
    except VerificationError:
        record = read_record(args.out)
        if record is not None:  # the table of what was measured, then the error
            say(format_table(dict(record.fields), read_manifest(args.out)))
        with stage("report"):
            report_after_run(args.out)  # most useful when verify failed
        raise
    say(format_table(report, read_manifest(args.out)))  # `run ... | head`: a closed pipe must not stop
    if config.mcu.wanted:
        try:
            with stage("mcu"):
                _run_mcu(args.out, config.mcu)
        except VerificationError:
            with stage("report"):
                report_after_run(args.out)
            raise
    with stage("report"):
        report_after_run(args.out)  # the report from being written
    return manifest


def _record_stage_times(out: str, clock) -> None:
    """``run``'s stage times: its last lines, and ``manifest.json``'s ``stage_times`` (when training made a
    run; a run that stopped early records what it did). Never hides the command's own result."""
    import logging

    from featx_edge.errors import FeatxError
    from featx_edge.rundir.names import MANIFEST
    from featx_edge.training.run import Run

    if not clock.stages:
        return
    total = clock.total()
    log = logging.getLogger("featx_edge.cli")
    lines = clock.lines()
    width = max([len(name) for name in clock.stages] + [len("total")])  # the name column of clock.lines()
    log.info("stage times (wall and CPU seconds; `stage_times` in %s):\n%s\n  %-*s %8.1f s wall %8.1f s CPU",
             Path(out) / MANIFEST, "\n".join(lines), width, "total", total["seconds"], total["cpu_seconds"])
    try:
        run = Run.open(out)
        run.manifest["stage_times"] = {"stages": clock.stages, "total": total,
                                       "note": "`export` holds each `export FORMAT`; CPU seconds count every "
                                               "thread of the process; `(second process)` stages ran in the "
                                               "export worker beside the others (`[export] workers`)"}
        run.save()
    except (FeatxError, OSError) as err:  # no run was made (training failed before it): nothing to record
        log.debug("stage times not recorded: %s", err)


def _check_mcu_settings(config) -> None:
    from featx_edge.mcu.check import check_settings

    check_settings(profiles=config.mcu.profiles, npu=config.mcu.npu, formats=config.export.formats)


def _mcu_then_show(run: str, *, profiles, npu, show) -> None:
    """`featx-edge mcu` on ``run``; ``show`` gets the report, also when a model fails or does not fit."""
    from featx_edge.errors import VerificationError
    from featx_edge.mcu import MCU_JSON
    from featx_edge.mcu.check import mcu_run

    try:
        report = mcu_run(run, profiles=profiles, npu=npu)
    except VerificationError:
        path = Path(run) / MCU_JSON
        if path.is_file():  # what was measured, then the error
            show(json.loads(path.read_text(encoding="utf-8")))
        raise
    show(report)


def _run_mcu(run: str, mcu) -> None:
    from featx_edge.mcu.table import format_table
    from featx_edge.progress import say

    _mcu_then_show(run, profiles=mcu.profiles, npu=mcu.npu, show=lambda report: say(format_table(report)))


def _cmd_mcu(args) -> int:
    from featx_edge.errors import ConfigError
    from featx_edge.mcu.profiles import profile_table
    from featx_edge.mcu.table import format_table

    if args.profile is not None and args.profile.strip() == "list":
        print(profile_table())
        return 0
    if not args.run:
        raise ConfigError("`featx-edge mcu` needs a run directory: `featx-edge mcu RUN` (or `featx-edge mcu "
                          "--profile list` to see the profiles).")
    _mcu_then_show(args.run, profiles=args.profile, npu=args.npu,
                   show=lambda report: print(json.dumps(report, indent=2) if args.json else format_table(report)))
    return 0


def _iter_images(items: list[str]) -> list[Path]:
    """Files as given; folders walked as training walks them (hidden names ignored, symlinks that
    leave the folder or loop reported on stderr and not followed). DataError for a folder without images."""
    from featx_edge.data.folders import find_images
    from featx_edge.runtime.metadata import printable

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        try:
            folder = path.is_dir()
        except OSError:  # a name the system refuses (too long): predict reports it as an image it cannot read
            folder = False
        if not folder:
            paths.append(path)
            continue
        images, skipped = find_images(path)
        for entry in skipped:
            print(f"warning: skipped {printable(str(path / entry.path))}: {printable(entry.reason)}", file=sys.stderr)
        paths.extend(images)
    return paths


def _cmd_predict(args) -> int:
    from featx_edge.errors import ImageError, check_int
    from featx_edge.runtime import load
    from featx_edge.runtime.metadata import printable
    from featx_edge.runtime.predictor import check_threads

    check_threads(args.threads, name="--threads")
    if args.top_k is not None:
        check_int("--top-k", args.top_k, low=1)
    top_k = args.top_k or (3 if args.json else 1)
    paths = _iter_images(args.images)
    predictor = load(args.model, threads=args.threads)
    step = predictor.output_resolution  # 1/256 for a uint8 output: smaller scores read as 0
    failures = 0
    for path in paths:
        try:
            (pred,) = predictor.predict([path], top_k=top_k)
        except ImageError as err:
            failures += 1
            print(f"error: {printable(str(err))}", file=sys.stderr)
            continue
        if args.json:  # json.dumps escapes control characters (\u001b) itself; never NaN (not JSON)
            extra = {"resolution": step} if step else {}
            line = json.dumps({"path": str(path), **pred.to_dict(), **extra}, allow_nan=False)
        else:  # labels come from the model file: escape what a terminal would act on
            pairs = "\t".join(f"{printable(label)}\t{_score(score, step)}" for label, score in pred.top_k)
            line = f"{printable(str(path))}\t{pairs}"
        print(line, flush=True)  # a line at a time, so `| head -1` stops the loop (exit 141 in main)
    if failures:
        print(f"error: {failures} image(s) could not be classified", file=sys.stderr)
    return 1 if failures else 0


def _score(score: float, step: float | None) -> str:
    """A probability for the text output; below a quantized output's step, ``<step`` (rounded up to
    the 4 digits shown): it was 0 in the model's uint8 output, not an exact zero."""
    if step and score < step:
        return f"<{math.ceil(step * 1000) / 1000:.3f}"
    return f"{score:.4f}"


def _cmd_bench(args) -> int:
    from featx_edge import bench
    from featx_edge.config import parse_int_list
    from featx_edge.errors import ConfigError
    from featx_edge.runtime.predictor import check_threads

    if args.compare:
        runs = ([args.run] if args.run else []) + args.compare
        if len(runs) != 2:
            raise ConfigError(f"`--compare` needs exactly two runs (RUN_A RUN_B); received {len(runs)}.")
        print(bench.compare_runs(runs[0], runs[1]))
        return 0
    if not args.run:
        raise ConfigError("`featx-edge bench` needs a run directory: `featx-edge bench RUN`.")
    kwargs = {"formats": args.formats.split(",") if args.formats else None,
              "include_tf": not args.no_tensorflow}
    for name in ("threads", "batches"):
        if getattr(args, name) is not None:
            kwargs[name] = parse_int_list(name, getattr(args, name))
    for threads in kwargs.get("threads", ()):
        check_threads(threads, name="--threads")
    if args.min_seconds is not None:
        kwargs["min_seconds"] = args.min_seconds
    report = bench.bench_run(args.run, **kwargs)
    if args.quiet:
        print(bench.format_table(report))
    return 0


def _cmd_bundle(args) -> int:
    from featx_edge.bundle.pack import bundle_run

    if args.target == "mcu":
        return _bundle_firmware(args)

    bundle = bundle_run(args.run, fmt=args.format, out=args.out, wheel=args.wheel,
                        allow_unverified=args.allow_unverified, overwrite=args.overwrite)
    unzip = f" (after `unzip {bundle.path.name} && cd {bundle.path.stem}`)" if bundle.path.suffix == ".zip" else ""
    print(f"wrote {bundle.path} ({bundle.format}, verify: {bundle.verify_status}); on the device, in it{unzip}:")
    print("\n".join(f"  {command}" for command in bundle.commands.values()))
    return 0


def _bundle_firmware(args) -> int:
    from featx_edge.bundle.firmware import bundle_firmware
    from featx_edge.errors import ConfigError

    if args.wheel is not None:
        raise ConfigError("`--wheel` ships the Python runtime of a device bundle; `--target mcu` bundles C sources "
                          "and takes no wheel: leave `--wheel` out.")
    bundle = bundle_firmware(args.run, fmt=args.format, out=args.out, allow_unverified=args.allow_unverified,
                             overwrite=args.overwrite)
    print(f"wrote {bundle.path} (firmware sources of {bundle.format}, mcu: {bundle.verify_status}); in the "
          "application:")
    print("\n".join(f"  {step}" for step in bundle.commands.values()))
    return 0


def _cmd_device_check(args) -> int:
    from featx_edge.device.check import device_check
    from featx_edge.errors import check_int
    from featx_edge.runtime.predictor import check_threads

    check_threads(args.threads, name="--threads")
    if args.images is not None:
        check_int("--images", args.images, low=1)
    result = device_check(args.targets, arch=args.arch, cpus=args.cpu, images=args.images,
                          formats=args.formats, threads=args.threads or 1, out=args.out)
    print(result.table)
    return 0 if result.passed else 1


def _cmd_selftest(args) -> int:
    from featx_edge.errors import FeatxError
    from featx_edge.runtime.metadata import printable
    from featx_edge.runtime.predictor import check_threads
    from featx_edge.runtime.selftest import run_selftest

    check_threads(args.threads, name="--threads")
    failed = 0
    for model in args.models:
        try:
            result = run_selftest(model, threads=args.threads)
        except FeatxError as err:  # one line per model, then the next model
            failed += 1
            reason = str(err).removeprefix(f"{model}: ").removeprefix(f"{Path(model)}: ")
            print(f"FAIL {printable(model)}: {printable(reason)}")
            continue
        print(f"PASS {printable(model)}: {result.images} images, top-1 {result.top1_matches}/{result.images}, "
              f"max |dprob| {result.max_abs_diff:.2g} (tolerance {result.tolerance})")
    return 1 if failed else 0


COMMANDS = {
    "backbones": _cmd_backbones,
    "sample-data": _cmd_sample_data,
    "pretrain": _cmd_pretrain,
    "train": _cmd_train,
    "export": _cmd_export,
    "fit": _cmd_fit,
    "run": _cmd_run,
    "verify": _cmd_verify,
    "report": _cmd_report,
    "predict": _cmd_predict,
    "selftest": _cmd_selftest,
    "bundle": _cmd_bundle,
    "device-check": _cmd_device_check,
    "bench": _cmd_bench,
    "mcu": _cmd_mcu,
}
