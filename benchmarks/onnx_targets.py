"""Which ONNX int8 recipe (``--target``) passes verify where: every recipe from the same trained run.

For each cell (backbone, dataset, seed of ``int8_fidelity.py``) this trains the run once, then
exports ``onnx-int8`` once per ``--target`` recipe (``featx_edge.formats.targets``: ``portable``
S8S8; ``x86-64-vnni`` U8S8; ``x86-64`` U8S8 with 7-bit weights; ``arm64`` is the same recipe as
``portable``) and verifies each on the run's test split against the Keras reference at the
DEFAULT thresholds with the near-tie rule, exactly as ``featx-edge export RUN --formats onnx-int8
--target T`` followed by ``featx-edge verify RUN --formats onnx-int8`` would. One exporter serves
every recipe of a cell (the target is applied as ``export --target`` applies it: the run's
``[export] target`` for that export), so the int8 source (bias correction chosen per run),
calibration images and float ONNX are the same and the recipe is the only difference.

onnxruntime's int8 kernels differ by CPU: the verdicts hold for the CPU they were measured on
(recorded with its flags: VNNI or not), not for others.

    python benchmarks/onnx_targets.py --out benchmarks/results/onnx_targets.json
    python benchmarks/onnx_targets.py --out benchmarks/results/onnx_targets.json --table
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

FMT = "onnx-int8"
RECIPES = ("portable", "x86-64-vnni", "x86-64")
CELLS = "lite0:sample:0,lite0:sample-inverted:0,lite0:fashion:0,mnv2-digits:sample:0"


def _verified(path: Path) -> dict:
    """``featx-edge verify RUN --formats onnx-int8`` (all kernel sets gated): its onnx-int8 entry."""
    from featx_edge.errors import VerificationError
    from featx_edge.rundir.names import VERIFY
    from featx_edge.verify.runner import verify_run

    try:
        verify_run(path, formats=(FMT,))
    except VerificationError:
        pass  # the verdict is in verify.json
    report = json.loads((path / VERIFY).read_text(encoding="utf-8"))
    entry = report["formats"][FMT]
    sub = (entry.get("kernels") or {}).get("default", entry)  # onnxruntime's CPU kernels: one set
    return {"images": report["images"], "reference_accuracy": report["reference_accuracy"],
            "passed": entry.get("passed"), "failures": entry.get("failures"),
            "agreement": sub.get("judged_top1_agreement"), "agreement_ci95": sub.get("judged_top1_agreement_ci95"),
            "plain_agreement": sub.get("top1_agreement"), "near_ties": sub.get("near_ties"),
            "change_points": sub.get("judged_accuracy_change_points"),
            "change_ci95_points": sub.get("judged_accuracy_change_ci95_points"),
            "max_abs_diff": sub.get("max_abs_diff"), "verified_on": entry.get("verified_on")}


def _cell(config, path: Path, recipes: tuple[str, ...]) -> list[dict]:
    """Train once; export and verify onnx-int8 once per recipe."""
    from featx_edge.config import override
    from featx_edge.export.exporter import Exporter
    from featx_edge.runtime import load
    from featx_edge.training.run import Run
    from featx_edge.training.train import train_run

    t0 = time.perf_counter()
    train_run(config, path)
    run = Run.open(path)
    exporter = Exporter(run)
    trained = run.config
    rows = []
    for recipe in recipes:
        t1 = time.perf_counter()
        run.config = override(trained, "export", target=recipe)  # what `export --target RECIPE` sets
        exporter.export(FMT)  # records the file (sha256) in the manifest, so verify judges this one
        quantization = load(run.artifact_path(FMT)).metadata["quantization"]
        rows.append({"target": recipe, "activations": quantization["activations"],
                     "reduce_range": quantization["reduce_range"], "sha256": run.manifest["artifacts"][FMT]["sha256"],
                     "bias_correction": (run.manifest.get("int8_choice") or {}).get("bias_correction"),
                     **_verified(path), "seconds": round(time.perf_counter() - t1, 1)})
    for row in rows:
        row["cell_seconds"] = round(time.perf_counter() - t0, 1)
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per recipe: per cell, agreement [95% CI], change in points and the verdict."""
    cells = list(dict.fromkeys((r["backbone"], r["dataset"], r["seed"]) for r in rows))
    recipes = list(dict.fromkeys(r["target"] for r in rows))
    head = "| `--target` (recipe) | " + " | ".join(f"{b} {d} seed {s} ({_images(rows, (b, d, s))} images)"
                                                  for b, d, s in cells) + " |"
    lines = [head, "|---" * (len(cells) + 1) + "|"]
    for recipe in recipes:
        shown = []
        for cell in cells:
            row = next((r for r in rows if (r["backbone"], r["dataset"], r["seed"]) == cell
                        and r["target"] == recipe), None)
            shown.append("-" if row is None else
                         f"{row['agreement']:.3f} [{row['agreement_ci95'][0]:.3f}, {row['agreement_ci95'][1]:.3f}], "
                         f"{row['change_points']:+.2f} pt: **{'pass' if row['passed'] else 'FAIL'}**")
        lines.append(f"| `{recipe}` | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _images(rows: list[dict], cell: tuple) -> int:
    return next(r["images"] for r in rows if (r["backbone"], r["dataset"], r["seed"]) == cell)


def _write(out: Path, rows: list[dict]) -> None:
    from featx_edge.bench import machine_info
    from featx_edge.files.atomic import write_json
    from featx_edge.formats.targets import detect_host

    machine = machine_info()
    write_json(out, {"benchmark": "onnx_int8_targets", "format": FMT,
                     "thresholds": "default (agreement >= 0.97, at most 1 point lost), tie-aware",
                     "note": "onnxruntime int8 kernels differ by CPU: these verdicts hold for this CPU only",
                     "cpu_model": machine["cpu_model"],
                     "vnni": bool({"avx512_vnni", "avx_vnni"} & set(machine["cpu_flags"])),
                     "host_target": detect_host(), "machine": machine, "python": platform.python_version(),
                     "rows": rows, "markdown": markdown(rows)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write (rows of earlier runs in it are kept)")
    parser.add_argument("--cells", default=CELLS, help="backbone:dataset:seed, comma-separated")
    parser.add_argument("--targets", default=",".join(RECIPES), help="the `--target` recipes to compare")
    parser.add_argument("--table", action="store_true", help="only print the table of the rows in --out")
    args = parser.parse_args(argv)

    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    if args.table:
        print(markdown(rows))
        return 0
    cells = [tuple(c.split(":")) for c in args.cells.split(",") if c]
    recipes = tuple(t for t in args.targets.split(",") if t)
    work = Path(tempfile.mkdtemp(prefix="featx-onnx-targets-"))
    try:
        weights = _pretrained(work) if any(c[0] == "mnv2-digits" for c in cells) else None
        for backbone, dataset, seed in cells:
            config = _config(backbone, _data(dataset, backbone, work), seed=int(seed), bias="auto", weights=weights)
            for row in _cell(config, work / f"{backbone}-{dataset}-{seed}", recipes):
                rows.append({"backbone": backbone, "dataset": dataset, "seed": int(seed), **row})
                print(json.dumps(rows[-1]), flush=True)
            _write(out, rows)  # after every cell: a long sweep keeps what it measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
