"""Command line: argument parsing -> configs -> library calls. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from featx_edge import __version__
from featx_edge.errors import FeatxError
from featx_edge.formats import ONNX_CALIBRATION_METHODS
from featx_edge.targets import TARGET_CHOICES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="backbone name (see `featx-edge backbones`); default efficientnet_lite0")
    g.add_argument("--alpha", type=float, help="width multiplier, where the backbone has one")
    g.add_argument("--weights", help="`imagenet` (default; Keras download/cache), `none`, or a no-top .h5 file")
    g.add_argument("--image-size", type=int, help="input height and width (default: the backbone's)")
    g.add_argument("--head-units", type=int, help="units of a dense layer before the classifier (0: none)")
    g.add_argument("--dropout", type=float, help="dropout before the classifier layer")


def _add_train_args(p: argparse.ArgumentParser, *, stages: bool = True) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="stage-1 (head) epochs")
    g.add_argument("--batch-size", type=int, help="images per training step")
    g.add_argument("--learning-rate", type=float, help="Adam learning rate of the head (stage 1)")
    if stages:  # fine-tuning and QAT apply to a run, not to pretraining
        g.add_argument("--fine-tune-epochs", type=int, help="stage-2 epochs (0: no fine-tuning)")
        g.add_argument("--unfreeze-top", type=int, help="backbone layers unfrozen in stage 2")
        g.add_argument("--fine-tune-learning-rate", type=float, help="Adam learning rate of stage 2")
        g.add_argument("--qat-epochs", type=int, help="quantization-aware training epochs for tflite-int8-qat")
    g.add_argument("--mixed-precision", action="store_true", default=None, help="float16 compute (GPU hosts)")
    g.add_argument("--seed", type=int, help="seed for the split, initialisation and batch order")
    p.add_argument("--config", help="TOML file with [data] [model] [train] [export] sections; flags override it")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("export")
    g.add_argument("--formats", help="comma-separated formats, or `all` (default: the six standard formats)")
    g.add_argument("--int8-budget", type=float,
                   help="accuracy points int8 may lose on validation; tries int8, selective, then QAT")
    g.add_argument("--onnx-calibration", choices=ONNX_CALIBRATION_METHODS,
                   help="onnxruntime calibration method for onnx-int8 (default percentile)")
    g.add_argument("--target", choices=TARGET_CHOICES,
                   help="CPU the onnx-int8 model is built for: U8S8 on x86-64 (reduce_range without VNNI), "
                        "S8S8 on arm64 and `portable` (the default: exact on every CPU); auto: this host")


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", action="append", default=[], metavar="FORMAT.METRIC=VALUE",
                   help="override a verify threshold, e.g. tflite-int8.min_agreement=0.95 (repeatable)")


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true",
                   help="also show what TensorFlow, the converters and onnxruntime print (held back otherwise, "
                        "and shown when a step fails)")


def _command(sub, name: str, *, purpose: str, example: str) -> argparse.ArgumentParser:
    """A subcommand with its one-line purpose and a runnable example in its --help."""
    return sub.add_parser(name, help=purpose, description=purpose[0].upper() + purpose[1:] + ".",
                          epilog=f"example: {example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featx-edge",
        description="Transfer-learned image classifiers for edge devices: train on a frozen pretrained backbone, "
                    "export to TFLite and ONNX (float and int8), verify every export against the Keras model, "
                    "benchmark, and classify on the device without TensorFlow.",
        epilog="Start with: featx-edge run --config examples/sample_digits.toml --out runs/demo")
    parser.add_argument("--version", action="version", version=f"featx-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _command(sub, "backbones", purpose="list the backbone registry (input size, preprocessing, feature width)",
             example="featx-edge backbones")

    p = _command(sub, "sample-data", purpose="write the built-in sample images (real handwritten digits)",
                 example="featx-edge sample-data digits/  # then: featx-edge run --data digits/all --out runs/d")
    p.add_argument("dir", help="folder to write (all/, source/ and target/ inside)")

    p = _command(sub, "pretrain", purpose="train a backbone from scratch on a source dataset and save its weights",
                 example="featx-edge pretrain --data sample --out pre.h5 --backbone mobilenet_v2 --alpha 0.35 "
                         "--image-size 96")
    p.add_argument("--data", help="image folder, or `sample` (its source part: digits 0-4)")
    p.add_argument("--out", required=True, help="weights file to write (.h5)")
    _add_model_args(p)
    _add_train_args(p, stages=False)
    _quiet(p)

    for name, helptext, example in (
            ("run", "train, export every format, verify each against the Keras model and print a table",
             "featx-edge run --config examples/sample_digits.toml --out runs/demo"),
            ("train", "train a classifier into a run directory (export and verify it later)",
             "featx-edge train --data photos/ --out runs/photos")):
        p = _command(sub, name, purpose=helptext, example=example)
        p.add_argument("--data", help="image folder (one sub-folder per class), `sample` (the default: the "
                                      "built-in digits) or `sample:source` / `sample:target`")
        p.add_argument("--out", required=True, help="run directory to create (a new or empty folder)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing run in --out as a whole (its exports and reports go with it)")
        _add_model_args(p)
        _add_train_args(p)
        if name == "run":
            _add_export_args(p)
            _add_verify_args(p)
        _quiet(p)

    p = _command(sub, "export", purpose="export a trained run to TFLite and ONNX, float and int8",
                 example="featx-edge export runs/demo --formats tflite-int8,onnx-int8 --target auto")
    p.add_argument("run", help="run directory made by `featx-edge train`")
    _add_export_args(p)
    p.add_argument("--qat-epochs", type=int, help="quantization-aware training epochs for tflite-int8-qat")
    _quiet(p)

    p = _command(sub, "verify", purpose="check every export against the Keras reference on the test split",
                 example="featx-edge verify runs/demo --threshold tflite-int8.min_agreement=0.98")
    p.add_argument("run", help="run directory with exports")
    p.add_argument("--formats", help="comma-separated formats (default: every exported one)")
    _add_verify_args(p)
    _quiet(p)

    p = _command(sub, "bench", purpose="latency, throughput, memory and accuracy of every export on every runtime, "
                                       "and what to ship on this host",
                 example="featx-edge bench runs/demo --threads 1,2 --batches 1,8")
    p.add_argument("run", nargs="?", help="run directory to bench (not needed with --compare RUN_A RUN_B)")
    p.add_argument("--formats", help="comma-separated formats (default: every exported one)")
    p.add_argument("--threads", help="comma-separated thread counts (default: 1 and every core)")
    p.add_argument("--batches", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--min-seconds", type=float, help="least timing per row, seconds (default 1.0)")
    p.add_argument("--no-tensorflow", action="store_true", help="skip the Keras/TensorFlow reference rows")
    p.add_argument("--compare", nargs="+", metavar="RUN",
                   help="print two benched runs side by side: --compare RUN_A RUN_B (or RUN --compare RUN_B)")
    _quiet(p)

    p = _command(sub, "predict", purpose="classify images with an exported model (no TensorFlow needed); folders "
                                         "are walked recursively, hidden files skipped",
                 example="featx-edge predict runs/demo/export/model.tflite-int8.tflite photos/ --top-k 3")
    p.add_argument("model", help=".tflite or .onnx file exported by featx-edge")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, help="labels per image, best first (default: 1; 3 with --json)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--threads", type=int, help="inference threads, >= 1 (default: the engine's)")

    p = _command(sub, "selftest", purpose="check that this device's runtime reproduces the exported outputs",
                 example="featx-edge selftest model.tflite-int8.tflite  # its selftest/ folder beside it")
    p.add_argument("models", nargs="+", help="model files (their selftest/ folder must sit beside them)")
    p.add_argument("--threads", type=int, help="inference threads, >= 1 (default: the engine's)")
    _show_config_defaults(parser)
    return parser


def _show_config_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: X)`` to every option that sets a config field and does not name its default.

    The options default to None (so a --config file is not overridden by an untouched flag); the
    value a run gets without either comes from the config dataclasses, and is shown from there.
    """
    import dataclasses

    from featx_edge.config import RunConfig

    defaults: dict[str, object] = {"seed": RunConfig().seed}
    for section in ("data", "model", "train", "export"):
        for field in dataclasses.fields(getattr(RunConfig(), section)):
            defaults.setdefault(field.name, getattr(getattr(RunConfig(), section), field.name))
    for sub in parser._subparsers._group_actions[0].choices.values():  # argparse has no public walk
        for action in sub._actions:
            name = action.dest
            if (name in defaults and action.help and "default" not in action.help
                    and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                    and defaults[name] is not None and sub.prog.split()[-1] not in ("predict", "selftest")):
                value = defaults[name]
                shown = ",".join(value) if isinstance(value, tuple) else value
                action.help += f" (default: {shown})"


def _config_from_args(args: argparse.Namespace):
    from featx_edge.config import RunConfig, load_config, override

    config = load_config(args.config) if getattr(args, "config", None) else RunConfig()
    config = override(config, "data", path=getattr(args, "data", None))
    config = override(config, "model", backbone=args.backbone, alpha=args.alpha, weights=args.weights,
                      image_size=args.image_size, head_units=args.head_units, dropout=args.dropout)
    config = override(config, "train", epochs=args.epochs, batch_size=args.batch_size,
                      learning_rate=args.learning_rate, fine_tune_epochs=getattr(args, "fine_tune_epochs", None),
                      unfreeze_top=getattr(args, "unfreeze_top", None),
                      fine_tune_learning_rate=getattr(args, "fine_tune_learning_rate", None),
                      mixed_precision=args.mixed_precision, qat_epochs=getattr(args, "qat_epochs", None))
    config = _export_overrides(config, args)
    return override(config, "seed", seed=args.seed)


def _export_overrides(config, args):
    from featx_edge.config import override
    from featx_edge.formats import parse_formats

    formats = parse_formats(args.formats) if getattr(args, "formats", None) else None
    return override(config, "export", formats=formats, int8_budget=getattr(args, "int8_budget", None),
                    onnx_calibration=getattr(args, "onnx_calibration", None), target=getattr(args, "target", None))


def _thresholds(args) -> dict:
    from featx_edge.formats import parse_threshold

    overrides: dict = {}
    for text in args.threshold:
        fmt, metric, value = parse_threshold(text)
        overrides.setdefault(fmt, {})[metric] = value
    return overrides


def _cmd_backbones(args) -> int:
    from featx_edge.backbones import BACKBONES

    print(f"{'name':<20} {'size':>5} {'preprocessing':<14} {'features':>8}  alphas")
    for spec in BACKBONES.values():
        alphas = ", ".join(map(str, spec.alphas)) or "-"
        print(f"{spec.name:<20} {spec.default_size:>5} {spec.preprocessing:<14} {spec.feature_dim:>8}  {alphas}")
    return 0


def _cmd_sample_data(args) -> int:
    from featx_edge.sample import write_sample_data

    root = write_sample_data(args.dir)
    print(f"wrote sample data to {root}: all/ (digits 0-9, `--data sample`), source/ (digits 0-4, for "
          "pretraining) and target/ (digits 5-9, a transfer task)")
    return 0


def _cmd_pretrain(args) -> int:
    from featx_edge.pretrain import pretrain

    config = _config_from_args(args)
    pretrain(data=config.data.path, out=args.out, model=config.model, train=config.train, seed=config.seed,
             val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction)
    return 0


def _cmd_train(args) -> int:
    from featx_edge.train import train_run

    train_run(_config_from_args(args), args.out, overwrite=args.overwrite)
    return 0


def _cmd_export(args) -> int:
    from featx_edge.config import override
    from featx_edge.errors import VerificationError
    from featx_edge.export import budget_failure, export_run

    def change(config):  # recorded in the run when the export succeeds: the manifest says how it was made
        config = override(config, "train", qat_epochs=args.qat_epochs)
        return override(config, "export", int8_budget=args.int8_budget, onnx_calibration=args.onnx_calibration,
                        target=args.target)

    changed = (args.qat_epochs is not None or args.int8_budget is not None or args.onnx_calibration
               or args.target)
    manifest = export_run(args.run, formats=args.formats, settings=change if changed else None)
    missed = budget_failure(manifest)
    if missed:
        raise VerificationError(missed)
    return 0


def _cmd_verify(args) -> int:
    from featx_edge.errors import VerificationError
    from featx_edge.formats import parse_formats
    from featx_edge.rundir import VERIFY, read_manifest
    from featx_edge.verify import format_table, verify_run

    formats = parse_formats(args.formats) if args.formats else None
    try:
        report = verify_run(args.run, formats=formats, overrides=_thresholds(args))
    except VerificationError:
        path = Path(args.run) / VERIFY
        if path.is_file():  # the table of what was measured, then the error
            print(format_table(json.loads(path.read_text(encoding="utf-8")), read_manifest(args.run)))
        raise
    print(format_table(report, read_manifest(args.run)))
    return 0


def _cmd_run(args) -> int:
    from featx_edge.errors import VerificationError
    from featx_edge.export import budget_failure, export_run
    from featx_edge.formats import merge_overrides
    from featx_edge.rundir import VERIFY, locked, read_manifest
    from featx_edge.train import train_run
    from featx_edge.verify import format_table, verify_run

    config = _config_from_args(args)
    # Parsed before training (a typo must not cost a training run) and recorded with the run,
    # so a later `featx-edge verify RUN` applies the same thresholds.
    overrides = _thresholds(args)
    config = dataclasses.replace(config, verify=merge_overrides(config.verify, overrides))
    with locked(args.out, command="run", create=True):
        train_run(config, args.out, overwrite=args.overwrite)
        manifest = export_run(args.out, formats=config.export.formats)
        try:
            report = verify_run(args.out)
        except VerificationError:
            print(format_table(json.loads((Path(args.out) / VERIFY).read_text()), read_manifest(args.out)))
            raise
    print(format_table(report, read_manifest(args.out)))
    missed = budget_failure(manifest)
    if missed:
        raise VerificationError(missed)
    return 0


def _iter_images(items: list[str]) -> list[Path]:
    """Files as given; folders walked as training walks them (hidden names ignored, symlinks that
    leave the folder or loop reported on stderr and not followed). DataError for a folder without images."""
    from featx_edge.data import find_images
    from featx_edge.runtime.metadata import printable

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.is_dir():
            paths.append(path)
            continue
        images, skipped = find_images(path)
        for entry in skipped:
            print(f"warning: skipped {printable(str(path / entry.path))}: {printable(entry.reason)}", file=sys.stderr)
        paths.extend(images)
    return paths


def _cmd_predict(args) -> int:
    from featx_edge.config import check_flag
    from featx_edge.errors import ImageError
    from featx_edge.runtime import load
    from featx_edge.runtime.metadata import printable

    check_flag("--threads", args.threads)
    check_flag("--top-k", args.top_k)
    top_k = args.top_k or (3 if args.json else 1)
    paths = _iter_images(args.images)
    predictor = load(args.model, threads=args.threads)
    failures = 0
    for path in paths:
        try:
            (pred,) = predictor.predict([path], top_k=top_k)
        except ImageError as err:
            failures += 1
            print(f"error: {printable(str(err))}", file=sys.stderr)
            continue
        if args.json:  # json.dumps escapes control characters (\u001b) itself
            print(json.dumps({"path": str(path), **pred.to_dict()}))
        else:  # labels come from the model file: escape what a terminal would act on
            pairs = "\t".join(f"{printable(label)}\t{score:.4f}" for label, score in pred.top_k)
            print(f"{printable(str(path))}\t{pairs}")
    if failures:
        print(f"error: {failures} image(s) could not be classified", file=sys.stderr)
    return 1 if failures else 0


def _cmd_bench(args) -> int:
    from featx_edge import bench
    from featx_edge.config import parse_int_list
    from featx_edge.errors import ConfigError

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
    if args.min_seconds is not None:
        kwargs["min_seconds"] = args.min_seconds
    report = bench.bench_run(args.run, **kwargs)
    if args.quiet:
        print(bench.format_table(report))
    return 0


def _cmd_selftest(args) -> int:
    from featx_edge.config import check_flag
    from featx_edge.errors import FeatxError
    from featx_edge.runtime.metadata import printable
    from featx_edge.runtime.selftest import run_selftest

    check_flag("--threads", args.threads)
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
    "run": _cmd_run,
    "verify": _cmd_verify,
    "predict": _cmd_predict,
    "selftest": _cmd_selftest,
    "bench": _cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    from featx_edge.progress import configure

    args = build_parser().parse_args(argv)
    configure(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        return COMMANDS[args.command](args)
    except FeatxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial files were left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
