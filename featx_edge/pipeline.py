"""The train -> export -> evaluate flow over a run directory (see DESIGN.md's contract)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from featx_edge import __version__
from featx_edge.backbones import get_backbone
from featx_edge.config import RunConfig, config_from_dict
from featx_edge.data import Splits, load_images, load_splits, scan_folder, split_folder
from featx_edge.errors import RunDirError
from featx_edge.formats import FORMATS, artifact_filename, parse_formats
from featx_edge.rundir import (EXPORT_DIR, MANIFEST, SPLITS, WEIGHTS, atomic_path, read_manifest,
                               record_artifact, sha256_file, write_bytes, write_json)
from featx_edge.runtime.image import RESIZE_METHOD
from featx_edge.sample import resolve_data
from featx_edge.weights import resolve_weights


def input_contract(size: int, *, dtype: str = "float32") -> dict:
    return {"name": "image", "height": size, "width": size, "channels": 3, "layout": "NHWC",
            "color": "RGB", "dtype": dtype, "value_range": [0, 255], "resize": RESIZE_METHOD}


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def train_run(config: RunConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Scan, split, train (stage 1 on cached features, optional stage 2) and save a run.

    Returns the manifest. The Keras reference lives in ``RUN/model.weights.h5`` (weights only,
    rebuilt from the recorded config: nothing executable is deserialised).

    Example:
        >>> from featx_edge.config import RunConfig, DataConfig, ModelConfig
        >>> cfg = RunConfig(data=DataConfig(path="sample"),
        ...                 model=ModelConfig(alpha=0.35, image_size=96, weights="pretrained.h5"))
        >>> manifest = train_run(cfg, "runs/demo")  # doctest: +SKIP
    """
    from featx_edge.model import build_classifier, unfreeze_top
    from featx_edge.train import (embed, image_sequence, predict_probs, setup_devices,
                                  train_head_on_features, fit)

    out = Path(out)
    spec = get_backbone(config.model.backbone)
    size = config.model.input_size
    data_root = resolve_data(config.data.path, part="target")
    # Cheap checks first: weights (may download) before decoding every image.
    weights_file = resolve_weights(spec, weights=config.model.weights, alpha=config.model.alpha, size=size)
    folder = scan_folder(data_root, progress=progress)
    for skipped in folder.skipped:
        _log(progress, f"skipped {skipped.path}: {skipped.reason}")
    splits = split_folder(folder, val_fraction=config.data.val_fraction,
                          test_fraction=config.data.test_fraction, seed=config.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SPLITS, splits.to_json())
    _log(progress, f"{folder.num_images} images in {len(folder.classes)} classes "
                   f"({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test), "
                   f"{len(folder.skipped)} skipped")

    devices = setup_devices(mixed_precision=config.train.mixed_precision)
    clf = build_classifier(num_classes=len(splits.classes), config=config.model,
                           weights_file=weights_file, seed=config.seed)
    y_train, y_val, y_test = splits.labels("train"), splits.labels("val"), splits.labels("test")
    bs = config.train.batch_size

    t0 = time.perf_counter()
    f_train = embed(clf.feature_model, splits.root, splits.train, size=size, batch_size=bs, progress=progress)
    f_val = embed(clf.feature_model, splits.root, splits.val, size=size, batch_size=bs, progress=progress)
    embed_s = time.perf_counter() - t0
    _log(progress, f"stage 1: head on cached features ({f_train.shape[1]}-d), {config.train.epochs} epochs")
    stage1 = train_head_on_features(clf.head_model, f_train, y_train, config=config.train, seed=config.seed,
                                    val=(f_val, y_val), progress=progress)
    metrics: dict = {"embedding_seconds": round(embed_s, 3),
                     "stage1": dataclasses.asdict(stage1)}
    if config.train.fine_tune_epochs:
        n = unfreeze_top(clf, config.train.unfreeze_top)
        _log(progress, f"stage 2: fine-tuning the top {config.train.unfreeze_top} backbone layers "
                       f"({n} with weights), lr {config.train.fine_tune_learning_rate}")
        seq = image_sequence(splits.root, splits.train, y_train, size=size, batch_size=bs, seed=config.seed + 1)
        val = image_sequence(splits.root, splits.val, y_val, size=size, batch_size=bs, seed=config.seed)
        stage2 = fit(clf.model, seq, epochs=config.train.fine_tune_epochs,
                     learning_rate=config.train.fine_tune_learning_rate, val_data=val, progress=progress)
        metrics["stage2"] = dataclasses.asdict(stage2) | {"unfrozen_layers_with_weights": n}
    for split, relpaths, labels in (("val", splits.val, y_val), ("test", splits.test, y_test)):
        probs = predict_probs(clf.model, splits.root, relpaths, size=size)
        metrics[f"{split}_accuracy"] = float(np.mean(probs.argmax(1) == labels))
    _log(progress, f"Keras reference: val accuracy {metrics['val_accuracy']:.4f}, "
                   f"test accuracy {metrics['test_accuracy']:.4f}")

    with atomic_path(out / WEIGHTS) as tmp:
        clf.model.save_weights(str(tmp))
    manifest = {
        "featx_edge_version": __version__,
        "labels": list(splits.classes),
        "backbone": {"name": spec.name, "alpha": config.model.alpha, "weights": config.model.weights,
                     "weights_sha256": sha256_file(weights_file) if weights_file else None},
        "input": input_contract(size),
        "data": {"root": str(splits.root), "splits": SPLITS,
                 "counts": {split: len(getattr(splits, split)) for split in ("train", "val", "test")},
                 "skipped": {"count": len(folder.skipped),
                             "files": [dataclasses.asdict(s) for s in folder.skipped]}},
        "reference": {"path": WEIGHTS, "sha256": sha256_file(out / WEIGHTS)},
        "training": metrics,
        "devices": devices,
        "config": config.to_dict(),
        "artifacts": {},
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def run_config(manifest: dict) -> RunConfig:
    return config_from_dict(manifest["config"], source=MANIFEST)


def load_reference(run: str | Path, manifest: dict | None = None):
    """Rebuild the run's Keras classifier (float32) and load its trained weights."""
    from featx_edge.model import build_classifier
    from featx_edge.train import setup_devices

    run = Path(run)
    manifest = manifest or read_manifest(run)
    weights = run / manifest["reference"]["path"]
    if not weights.is_file():
        raise RunDirError(f"`{weights}` is missing; re-run `featx-edge train`.")
    if sha256_file(weights) != manifest["reference"]["sha256"]:
        raise RunDirError(f"`{weights}` does not match the checksum in {MANIFEST}; re-run `featx-edge train`.")
    config = run_config(manifest)
    setup_devices(mixed_precision=False)
    model_config = dataclasses.replace(config.model, weights="none")
    clf = build_classifier(num_classes=len(manifest["labels"]), config=model_config, weights_file=None,
                           seed=config.seed)
    clf.model.load_weights(str(weights))
    return clf


def artifact_metadata(manifest: dict, fmt: str, *, input_dtype: str) -> dict:
    return {
        "featx_edge_version": __version__,
        "format": fmt,
        "labels": manifest["labels"],
        "input": dict(manifest["input"], dtype=input_dtype),
        "output": {"kind": "probabilities", "classes": len(manifest["labels"])},
        "backbone": manifest["backbone"],
    }


def export_run(run: str | Path, *, formats: tuple[str, ...] | str | None = None, progress: bool = True) -> dict:
    """Export the run's reference model to each format under ``RUN/export/``; returns the manifest."""
    from featx_edge.export import onnx as onnx_export
    from featx_edge.export import tflite as tflite_export
    from featx_edge.export.calibration import calibration_images
    from featx_edge.runtime.metadata import pack_tflite

    run = Path(run)
    manifest = read_manifest(run)
    config = run_config(manifest)
    formats = parse_formats(formats) if formats else config.export.formats
    splits = load_run_splits(run, manifest)
    size = manifest["input"]["height"]
    clf = load_reference(run, manifest)
    calibration = None
    if "tflite-int8" in formats:
        calibration = calibration_images(splits.root, splits.train, size=size,
                                         count=config.export.calibration_images, seed=config.seed)
    for fmt in formats:
        t0 = time.perf_counter()
        path = run / EXPORT_DIR / artifact_filename(fmt)
        _log(progress, f"exporting {fmt} ...")
        if fmt.startswith("tflite-"):
            quant = tflite_export.TFLiteQuantization.for_format(fmt)
            flatbuffer = tflite_export.convert(clf.model, size=size, quantization=quant, calibration=calibration)
            dtype = "uint8" if quant.full_integer else "float32"
            write_bytes(path, pack_tflite(flatbuffer, artifact_metadata(manifest, fmt, input_dtype=dtype)))
        elif fmt == "onnx-float32":
            proto = onnx_export.convert(clf.model, size=size,
                                        metadata=artifact_metadata(manifest, fmt, input_dtype="float32"))
            onnx_export.save(proto, path)
        entry = record_artifact(run, manifest, fmt, path)
        _log(progress, f"  wrote {entry['path']} ({entry['bytes'] / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s)")
    return manifest


def load_run_splits(run: Path, manifest: dict) -> Splits:
    splits = load_splits(run / manifest["data"]["splits"])
    if not splits.root.is_dir():
        raise RunDirError(
            f"the run's data folder `{splits.root}` is gone; restore it (the splits refer to its files)."
        )
    return splits


def evaluate_artifacts(run: str | Path, *, formats: tuple[str, ...] | None = None) -> list[dict]:
    """Test-split accuracy of each exported artifact, run through the device runtime."""
    from featx_edge.runtime import load

    run = Path(run)
    manifest = read_manifest(run)
    splits = load_run_splits(run, manifest)
    size = manifest["input"]["height"]
    pixels = load_images(splits.root, splits.test, size=size)
    labels = splits.labels("test")
    rows = [{"format": "keras (reference)", "bytes": (run / WEIGHTS).stat().st_size,
             "test_accuracy": manifest["training"]["test_accuracy"]}]
    for fmt in formats or [f for f in FORMATS if f in manifest["artifacts"]]:
        entry = manifest["artifacts"][fmt]
        predictor = load(run / entry["path"])
        probs = predictor.predict_pixels(pixels)
        rows.append({"format": fmt, "bytes": entry["bytes"],
                     "test_accuracy": float(np.mean(probs.argmax(1) == labels))})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'format':<18} {'size (MB)':>10} {'test accuracy':>14}"]
    for row in rows:
        lines.append(f"{row['format']:<18} {row['bytes'] / 1e6:>10.2f} {row['test_accuracy']:>14.4f}")
    return "\n".join(lines)
