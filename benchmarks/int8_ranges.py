"""Activation ranges x bias correction for tflite-int8, every candidate on the test split, per matrix cell.

For each cell (backbone, dataset, seed of ``int8_fidelity.py``) this trains the run once, converts
tflite-int8 for every candidate of ``export.int8_choice`` (bias correction off/on x activation
ranges minmax/percentile/mse, ``export.tflite_ranges``), and measures each on the held-out test
split under XNNPACK and LiteRT's reference kernels at the DEFAULT thresholds with the tie rule.
It also runs the per-run choice exactly as ``featx-edge export`` does (on validation plus
calibration-free training images, never test) and marks the candidate it picks, so one training
shows both what each fixed setting would have given and what the default ``"auto"`` gives.

    python benchmarks/int8_ranges.py --out benchmarks/results/int8_ranges.json \
        --backbones mnv2-digits --datasets sample,sample-inverted,fashion --seeds 0
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_fidelity import _config, _data, _pretrained

FMT = "tflite-int8"


def _on_test(flatbuffers: dict[str, bytes], run, *, fmt: str = FMT) -> dict[str, dict]:
    """Each candidate (a ``fmt`` flatbuffer) against the reference on the test split, per kernel set, with the
    gate's verdict."""
    from featx_edge.data.folders import map_batches
    from featx_edge.fidelity.gate import check, compare
    from featx_edge.formats.registry import get_format, thresholds_for, tie_margin
    from featx_edge.runtime.backends import LiteRTBackend
    from featx_edge.training.train import predict_probs

    splits = run.splits()
    labels = splits.labels("test")
    reference = predict_probs(run.reference().model, splits.root, splits.test, size=run.size)
    limits = thresholds_for(fmt, run.config.verify)
    out = {}
    for name, flatbuffer in flatbuffers.items():
        out[name] = {}
        for kernels in get_format(fmt).kernel_sets:
            probs = map_batches(LiteRTBackend(flatbuffer, kernels=kernels).run, splits.root, splits.test,
                                size=run.size)
            metrics = compare(probs, reference, labels, tie_margin=tie_margin(fmt, limits))
            out[name][kernels] = {"agreement": metrics["judged_top1_agreement"],
                                  "agreement_ci95": metrics["judged_top1_agreement_ci95"],
                                  "change_points": metrics["judged_accuracy_change_points"],
                                  "images_lost": metrics["images_lost"], "near_ties": metrics["near_ties"],
                                  "passed": not check(metrics, limits), "images": len(labels)}
    return out


def _cell(config, path: Path) -> dict:
    """Train, convert every candidate, choose as export does, measure all on test."""
    from featx_edge.export.budget import judging_set
    from featx_edge.export.exporter import Exporter
    from featx_edge.export.int8_choice import CHOICE_TRAIN_IMAGES, candidate_names, choose_int8
    from featx_edge.export.tflite_ranges import convert_ranges
    from featx_edge.training.run import Run
    from featx_edge.training.train import train_run

    t0 = time.perf_counter()
    train_run(config, path)
    run = Run.open(path)
    exporter = Exporter(run)
    names = candidate_names(run.config.export)
    sources = exporter._bias_sources(dict.fromkeys(name.split("/")[0] for name in names))
    t1 = time.perf_counter()
    flatbuffers = {}
    for bias, (model, _) in sources.items():
        methods = [name.split("/")[1] for name in names if name.startswith(bias + "/")]
        for method, flatbuffer in convert_ranges(model, size=run.size, calibration=exporter.calibration,
                                                 methods=methods).items():
            flatbuffers[f"{bias}/{method}"] = flatbuffer
    convert_s = time.perf_counter() - t1
    chosen, record = choose_int8({name: flatbuffers[name] for name in names}, run=run,
                                 judging=judging_set(run, train_images=CHOICE_TRAIN_IMAGES))
    return {"chosen": chosen, "choice": record, "test": _on_test(flatbuffers, run),
            "convert_seconds": round(convert_s, 1), "cell_seconds": round(time.perf_counter() - t0, 1)}


def markdown(cells: list[dict]) -> str:
    """One line per cell and candidate: test agreement and change per kernel set, the gate, the choice."""
    header = ("| backbone | data | seed | candidate (bias/ranges) | judging set, worst kernel set | test XNNPACK "
              "agreement [95% CI], change | test reference kernels agreement [95% CI], change | gate |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        for name, sets in cell["test"].items():
            judged = min(row["top1_agreement"] for row in cell["choice"]["candidates"][name].values())
            shown = [f"{r['agreement']:.3f} [{r['agreement_ci95'][0]:.3f}, {r['agreement_ci95'][1]:.3f}], "
                     f"{r['change_points']:+.2f}" for r in (sets["xnnpack"], sets["reference"])]
            mark = " **(auto)**" if name == cell["chosen"] else ""
            gate = "pass" if all(r["passed"] for r in sets.values()) else "fail"
            lines.append(f"| {cell['backbone']} | {cell['dataset']} | {cell['seed']} | {name}{mark} | {judged:.3f} | "
                         f"{shown[0]} | {shown[1]} | {gate} |")
    return "\n".join(lines)


def cell_sweep(argv: list[str] | None, *, description: str, prefix: str, bias, measure, header: dict, table,
               summary: tuple[str, ...], options: tuple = ()) -> int:
    """The driver this script and ``int8_adaround.py`` share: the cell options (plus ``options``, pairs of
    (flags, argparse keywords)); then, per seed x backbone x dataset, ``measure(config, path, args)`` (the
    cell's record), a printed line of its ``summary`` keys, and ``--out`` rewritten as ``header`` plus
    every cell (earlier ones kept) and their ``table(cells)``, so a long sweep keeps what it measured."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="JSON file to write (rows of earlier runs in it are kept)")
    parser.add_argument("--backbones", default="mnv2-digits")
    parser.add_argument("--datasets", default="sample,sample-inverted,fashion")
    parser.add_argument("--seeds", default="0")
    for flags, keywords in options:
        parser.add_argument(*flags, **keywords)
    parser.add_argument("--table", action="store_true", help="only print the table of the cells in --out")
    parser.add_argument("--weights", default=None, help="mnv2-digits backbone pretrained before (default: pretrain it)")
    args = parser.parse_args(argv)

    from featx_edge.bench import machine_info
    from featx_edge.config import parse_int_list
    from featx_edge.files.atomic import write_json

    out = Path(args.out)
    cells = json.loads(out.read_text())["cells"] if out.is_file() else []
    if args.table:
        print(table(cells))
        return 0
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        weights = Path(args.weights) if args.weights else _pretrained(work) if "mnv2-digits" in args.backbones else None
        for seed in parse_int_list("seeds", args.seeds):
            for backbone in filter(None, args.backbones.split(",")):
                for dataset in filter(None, args.datasets.split(",")):
                    config = _config(backbone, _data(dataset, backbone, work), seed=seed, bias=bias, weights=weights)
                    cell = measure(config, work / f"{backbone}-{dataset}-{seed}", args)
                    cells.append({"backbone": backbone, "dataset": dataset, "seed": seed, **cell})
                    print(json.dumps({k: cells[-1][k] for k in summary}), flush=True)
                    write_json(out, {**header, "cells": cells, "markdown": table(cells), "machine": machine_info(),
                                     "python": platform.python_version()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cell_sweep(argv, description=__doc__.splitlines()[0], prefix="featx-int8-ranges-", bias="auto",
                      measure=lambda config, path, args: _cell(config, path),
                      header={"benchmark": "int8_activation_ranges", "format": FMT,
                              "thresholds": "default (agreement >= 0.97, at most 1 point lost), tie-aware"},
                      table=markdown,
                      summary=("backbone", "dataset", "seed", "chosen", "test"))


if __name__ == "__main__":
    raise SystemExit(main())
