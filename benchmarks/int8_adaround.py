"""AdaRound x bias correction for int8, every candidate on the test split, per matrix cell (issue 21).

For each cell (backbone, dataset, seed of ``int8_fidelity.py``) this trains the run once and makes
the int8 source four ways: weight rounding ``nearest`` (the converters' own) or ``adaround``
(``export.adaround``), each with bias correction off and on, exactly as ``featx-edge export``
does with ``[export] weight_rounding`` and ``bias_correction`` fixed. Each source is converted to
``tflite-int8`` (min/max activation ranges, the default) and ``tflite-int16x8``, and, with
``--onnx``, to ``onnx-int8`` (the portable recipe), and measured against the float reference on the held-out test split,
at the DEFAULT thresholds with the tie rule: tflite-int8 under XNNPACK and LiteRT's reference
kernels (tflite-int16x8 likewise), onnx-int8 under onnxruntime's CPU kernels. A diagnosis
row runs Keras with the conv kernels on the int8 grid (nearest or AdaRound) and float activations.

    python benchmarks/int8_adaround.py --out benchmarks/results/int8_adaround.json \
        --backbones mnv2-digits --seeds 0 --onnx
    python benchmarks/int8_adaround.py --out benchmarks/results/int8_adaround.json --table
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_ranges import _on_test, cell_sweep

ROUNDINGS = ("nearest", "adaround")


def _sources(run) -> tuple[dict[str, tuple], object]:
    """``{"rounding/bias": (model, recipe)}`` as the exporter makes them, and the exporter (its calibration)."""
    from featx_edge.config import override
    from featx_edge.export.exporter import Exporter

    recorded, sources, exporter = run.config, {}, None
    for rounding in ROUNDINGS:
        run.config = override(recorded, "export", weight_rounding=rounding)
        exporter = Exporter(run) if exporter is None else exporter
        for bias, source in exporter._bias_sources(("off", "on")).items():
            sources[f"{rounding}/{bias}"] = source
    run.config = recorded
    return sources, exporter


def _nearest_grid(model):
    """A copy of ``model`` whose conv kernels are rounded to the nearest int8 step, as the converters do."""
    from featx_edge._tf import import_tf
    from featx_edge.export.bias_correction import _conv_bn_pairs, _int8_rounded

    _, keras = import_tf()
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for conv, bn in _conv_bn_pairs(copy):
        gamma, _, _, variance = bn.get_weights()
        conv.set_weights([_int8_rounded(conv.get_weights()[0], gain=gamma / (variance + bn.epsilon) ** 0.5,
                                        depthwise=isinstance(conv, keras.layers.DepthwiseConv2D))])
    return copy


def _weights_only(sources: dict[str, tuple], run) -> dict[str, dict]:
    """Diagnosis: Keras with int8-grid conv kernels but float activations, against the reference on test.

    Separates what weight rounding alone costs from what int8 activations add."""
    from featx_edge.fidelity.gate import compare
    from featx_edge.training.train import predict_probs

    splits = run.splits()
    labels = splits.labels("test")
    reference = predict_probs(run.reference().model, splits.root, splits.test, size=run.size)
    models = {"nearest": _nearest_grid(run.reference().model), "adaround": sources["adaround/off"][0]}
    out = {}
    for name, model in models.items():
        metrics = compare(predict_probs(model, splits.root, splits.test, size=run.size), reference, labels,
                          tie_margin=0.0)
        out[name] = {"agreement": metrics["top1_agreement"], "images_lost": metrics["images_lost"]}
    return out


def _onnx_on_test(sources: dict[str, tuple], run, exporter, work: Path) -> dict[str, dict]:
    """onnx-int8 (portable recipe) of each source against the reference on the test split."""
    from featx_edge.data.folders import map_batches
    from featx_edge.export import onnx as onnx_export
    from featx_edge.export.onnx_int8 import quantize
    from featx_edge.fidelity.gate import check, compare
    from featx_edge.formats.registry import get_format, thresholds_for, tie_margin
    from featx_edge.runtime.backends import OnnxRuntimeBackend
    from featx_edge.training.train import predict_probs

    splits = run.splits()
    labels = splits.labels("test")
    reference = predict_probs(run.reference().model, splits.root, splits.test, size=run.size)
    limits = thresholds_for("onnx-int8", run.config.verify)
    out = {}
    for name, (model, _) in sources.items():
        float_path, int8_path = work / "float.onnx", work / f"{name.replace('/', '-')}.onnx"
        onnx_export.save(exporter.onnx_float(model, metadata=exporter.metadata(get_format("onnx-int8"))), float_path)
        quantize(float_path, int8_path, calibration=exporter.calibration, method=run.config.export.onnx_calibration)
        probs = map_batches(OnnxRuntimeBackend(int8_path).run, splits.root, splits.test, size=run.size)
        metrics = compare(probs, reference, labels, tie_margin=tie_margin("onnx-int8", limits))
        out[name] = {"default": {"agreement": metrics["judged_top1_agreement"],
                                 "agreement_ci95": metrics["judged_top1_agreement_ci95"],
                                 "change_points": metrics["judged_accuracy_change_points"],
                                 "images_lost": metrics["images_lost"], "near_ties": metrics["near_ties"],
                                 "passed": not check(metrics, limits), "images": len(labels)}}
    return out


def _cell(config, path: Path, *, onnx: bool) -> dict:
    """Train once; four int8 sources; tflite-int8 (and onnx-int8) of each on the test split."""
    from featx_edge.export.tflite import TFLiteQuantization, convert
    from featx_edge.training.run import Run
    from featx_edge.training.train import train_run

    t0 = time.perf_counter()
    train_run(config, path)
    run = Run.open(path)
    t1 = time.perf_counter()
    sources, exporter = _sources(run)
    source_s = time.perf_counter() - t1
    flatbuffers = {name: convert(exporter.traced(model), size=run.size, quantization=TFLiteQuantization.for_int8(),
                                 calibration=exporter.calibration) for name, (model, _) in sources.items()}
    cell, failed = {"tflite-int8": _on_test(flatbuffers, run)}, None
    # int16 activations leave weight rounding as the main int8 error: where AdaRound should show most.
    wide = {name: convert(exporter.traced(model), size=run.size, quantization=TFLiteQuantization.for_int16x8(),
                          calibration=exporter.calibration) for name, (model, _) in sources.items()}
    cell["tflite-int16x8"] = _on_test(wide, run, fmt="tflite-int16x8")
    try:
        weights_only = _weights_only(sources, run)
    except Exception as err:  # noqa: BLE001 - a diagnosis only: the measured figures stand without it
        weights_only = {"error": f"{type(err).__name__}: {err}"}
    if onnx:
        try:
            cell["onnx-int8"] = _onnx_on_test(sources, run, exporter, path)
        except Exception as err:  # noqa: BLE001 - a failed ONNX conversion is recorded; the tflite figures stand
            failed = f"{type(err).__name__}: {err}"
    rounding = sources["adaround/off"][1]["weight_rounding"]
    return {"test": cell, "weights_only_float_activations": weights_only, "onnx_error": failed,
            "adaround": {k: v for k, v in rounding.items() if k != "setting"},
            "sources_seconds": round(source_s, 1), "cell_seconds": round(time.perf_counter() - t0, 1),
            "images": len(run.splits().test)}


def markdown(cells: list[dict]) -> str:
    """One line per cell, format and kernel set: test agreement (change) of the four candidates."""
    names = [f"{r}/{b}" for r in ROUNDINGS for b in ("off", "on")]
    lines = ["| cell (test images) | format | kernels | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for cell in cells:
        for fmt, table in cell["test"].items():
            for kernels in table[names[0]]:
                shown = [f"{table[n][kernels]['agreement']:.3f} ({table[n][kernels]['change_points']:+.2f})"
                         + ("" if table[n][kernels]["passed"] else " fail") for n in names]
                lines.append(f"| {cell['backbone']} {cell['dataset']} seed {cell['seed']} ({cell['images']}) | "
                             f"{fmt} | {kernels} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def measure(config, path: Path, args) -> dict:
        return {**_cell(config, path, onnx=args.onnx), "load_average": list(os.getloadavg())}

    return cell_sweep(argv, description=__doc__.splitlines()[0], prefix="featx-int8-adaround-", bias=False,
                      measure=measure,
                      header={"benchmark": "int8_adaround", "activation_ranges": "minmax",
                              "thresholds": "default (agreement >= 0.97, at most 1 point lost), tie-aware"},
                      table=markdown,
                      summary=("backbone", "dataset", "seed", "test"),
                      options=((("--onnx",), {"action": "store_true",
                                              "help": "also measure onnx-int8 (four more conversions)"}),))


if __name__ == "__main__":
    raise SystemExit(main())
