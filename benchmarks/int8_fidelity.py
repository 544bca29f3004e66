"""The int8 evidence matrix: backbones x datasets x seeds, every int8 path under every kernel set.

Each cell trains a run, exports ``tflite-int8``, ``onnx-int8`` and ``tflite-int16x8`` (int16
activations, int8 weights: for where int8 cannot reach the gate) with the int8 settings under
test (``--bias-correction auto|on|off``) and verifies them against the run's float Keras
reference on its held-out test split, at the DEFAULT thresholds, with the tie-aware gate and
under each kernel set (XNNPACK and LiteRT's reference kernels for tflite-int8; onnxruntime's
CPU kernels for onnx-int8). Writes JSON (one row per cell, format and kernel set, with 95%
intervals; the bias-correction choice of each run; the machine) and prints a Markdown table.

Backbones:
- ``lite0``: EfficientNet-Lite0 with its ImageNet weights (the README's main run), 96 px.
- ``mnv2-digits``: a 0.35-width MobileNetV2 pretrained by ``featx-edge pretrain`` on the sample's
  source digits (0-4), 64 px, frozen and transferred (the ``examples/digits_pretrained.toml`` kind).
Datasets (``benchmarks/datasets.py``): ``sample`` (all ten digits for lite0; the target digits
5-9 for mnv2-digits, the transfer task), ``sample-inverted`` (white on black), ``fashion``
(Fashion-MNIST, Debian's dataset-fashion-mnist).

    python benchmarks/int8_fidelity.py --out benchmarks/results/int8_matrix.json
    python benchmarks/int8_fidelity.py --out /tmp/off.json --bias-correction off --backbones mnv2-digits

Goal (issue 21): every cell passes the default gate on every kernel set; >= 0.99 agreement and
<= 0.5 points lost where it can.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import fashion_folder, inverted_copy

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("tflite-int8", "onnx-int8", "tflite-int16x8")
BACKBONES = ("lite0", "mnv2-digits")
DATASETS = ("sample", "sample-inverted", "fashion")
BIAS = {"auto": "auto", "on": True, "off": False}


def _pretrained(work: Path) -> Path:
    """MobileNetV2 0.35 at 64 px pretrained on the sample's source digits (as tests/conftest.py does)."""
    from featx_edge.cli import main
    from featx_edge.data.sample import resolve_data

    out = work / "mnv2_digits_64.h5"
    rc = main(["pretrain", "--data", str(resolve_data("sample", part="source")), "--out", str(out),
               "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "64", "--seed", "0",
               "--epochs", "8", "--quiet"])
    if rc != 0:
        raise SystemExit("pretraining the digits backbone failed")
    return out


def _data(name: str, backbone: str, work: Path) -> Path:
    from featx_edge.data.sample import resolve_data

    part = "target" if backbone == "mnv2-digits" else "all"
    if name == "sample":
        return resolve_data("sample", part=part)
    if name == "sample-inverted":
        out = work / f"inverted-{part}"
        return out if out.is_dir() else inverted_copy(resolve_data("sample", part=part), out)
    out = work / "fashion"
    return out if out.is_dir() else fashion_folder(out)


def _config(backbone: str, data: Path, *, seed: int, bias, weights: Path | None):
    from featx_edge.config import load_config, override

    if backbone == "lite0":
        config = load_config(ROOT / "examples" / "sample_digits.toml")
    else:
        config = load_config(ROOT / "examples" / "digits_pretrained.toml")
        config = override(config, "model", image_size=64, weights=str(weights))
    config = override(config, "data", path=str(data))
    config = override(config, "export", bias_correction=bias)
    return dataclasses.replace(config, seed=seed)


def _cell(config, run: Path, formats: tuple[str, ...]) -> tuple[dict, float]:
    from featx_edge.errors import FeatxError, VerificationError
    from featx_edge.export import export_run
    from featx_edge.rundir.manifest import read_manifest
    from featx_edge.rundir.names import VERIFY
    from featx_edge.training.train import train_run
    from featx_edge.verify.runner import verify_run

    t0 = time.perf_counter()
    train_run(config, run)
    failed = {}
    for fmt in formats:
        try:
            export_run(run, formats=(fmt,))
        except FeatxError as err:  # e.g. a kernel cannot prepare the model: recorded, not fatal
            failed[fmt] = str(err)
    try:
        verify_run(run)
    except VerificationError:
        pass  # recorded per format in verify.json
    return {"verify": json.loads((run / VERIFY).read_text()), "export_failed": failed,
            "int8_choice": read_manifest(run).get("int8_choice")}, time.perf_counter() - t0


def _rows(backbone: str, dataset: str, seed: int, cell: dict, formats: tuple[str, ...]) -> list[dict]:
    report, rows = cell["verify"], []
    for fmt in formats:
        if fmt in cell["export_failed"]:
            rows.append({"backbone": backbone, "dataset": dataset, "seed": seed, "format": fmt, "kernels": "-",
                         "passed": False, "failures": [cell["export_failed"][fmt]], "agreement": None,
                         "change_points": None, "images": report["images"]})
            continue
        entry = report["formats"][fmt]
        for kernels, sub in (entry.get("kernels") or {"default": entry}).items():
            rows.append({
                "backbone": backbone, "dataset": dataset, "seed": seed, "format": fmt, "kernels": kernels,
                "images": report["images"], "reference_accuracy": report["reference_accuracy"],
                "passed": sub.get("passed"), "failures": sub.get("failures"),
                "agreement": sub.get("judged_top1_agreement"), "agreement_ci95": sub.get("judged_top1_agreement_ci95"),
                "plain_agreement": sub.get("top1_agreement"), "near_ties": sub.get("near_ties"),
                "change_points": sub.get("judged_accuracy_change_points"),
                "change_ci95_points": sub.get("judged_accuracy_change_ci95_points"),
                "bias_correction": (cell["int8_choice"] or {}).get("bias_correction"),
                "activation_ranges": (cell["int8_choice"] or {}).get("activation_ranges"),
            })
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per backbone, dataset, format and kernel set: agreement and change over the seeds."""
    lines = ["| backbone | data | format | kernels | agreement per seed [95% CI] | change, points per seed | "
             "default gate | >= 0.99 and <= 0.5 pt lost |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["backbone"], r["dataset"], r["format"], r["kernels"]) for r in rows},
                  key=lambda k: (BACKBONES.index(k[0]), DATASETS.index(k[1]), FORMATS.index(k[2]), k[3]))
    for key in keys:
        cell = [r for r in rows if (r["backbone"], r["dataset"], r["format"], r["kernels"]) == key]
        agree = "; ".join(f"{r['agreement']:.3f} [{r['agreement_ci95'][0]:.3f}, {r['agreement_ci95'][1]:.3f}]"
                          for r in cell if r["agreement"] is not None)
        change = "; ".join(f"{r['change_points']:+.2f}" for r in cell if r["change_points"] is not None)
        goal = sum(1 for r in cell if r["agreement"] is not None and r["agreement"] >= 0.99
                   and r["change_points"] >= -0.5)
        if key[3] == "-":
            agree = "export failed: " + "; ".join(sorted({str(r["failures"][0])[:120] for r in cell}))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {agree} | {change} | "
                     f"{sum(bool(r['passed']) for r in cell)}/{len(cell)} | {goal}/{len(cell)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (split, head initialisation)")
    parser.add_argument("--bias-correction", choices=tuple(BIAS), default="auto")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--skip", default="", help="cells already measured, e.g. lite0:sample:0,lite0:sample:1")
    parser.add_argument("--rows", default=None, help="a JSON-lines file of rows measured before, to include")
    args = parser.parse_args(argv)

    from featx_edge.bench import machine_info
    from featx_edge.config import parse_int_list
    from featx_edge.files.atomic import write_json

    backbones = [b for b in args.backbones.split(",") if b]
    formats = tuple(f for f in args.formats.split(",") if f)
    skip = set(filter(None, args.skip.split(",")))
    datasets = [d for d in args.datasets.split(",") if d]
    work = Path(tempfile.mkdtemp(prefix="featx-int8-matrix-"))
    rows: list[dict] = []
    if args.rows:  # earlier cells of the same matrix (the JSON lines this script prints)
        rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.startswith("{")]
    try:
        weights = _pretrained(work) if "mnv2-digits" in backbones else None
        for seed in parse_int_list("seeds", args.seeds):  # seeds outermost: every cell once before repeats
            for backbone in backbones:
                for dataset in datasets:
                    if f"{backbone}:{dataset}:{seed}" in skip:
                        continue
                    config = _config(backbone, _data(dataset, backbone, work), seed=seed,
                                     bias=BIAS[args.bias_correction], weights=weights)
                    run = work / f"{backbone}-{dataset}-{seed}"
                    cell, seconds = _cell(config, run, formats)
                    shutil.rmtree(run, ignore_errors=True)
                    for row in _rows(backbone, dataset, seed, cell, formats):
                        rows.append({**row, "cell_seconds": round(seconds, 1)})
                        print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown(rows)
    write_json(args.out, {"benchmark": "int8_fidelity_matrix", "bias_correction": args.bias_correction,
                          "thresholds": "default (agreement >= 0.97, at most 1 point lost), tie-aware",
                          "goal": ">= 0.99 agreement and <= 0.5 points lost", "rows": rows, "markdown": table,
                          "machine": machine_info(), "python": platform.python_version()})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
