"""The train -> export -> evaluate flow over a run directory (see DESIGN.md's contract)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from featx_edge import __version__
from featx_edge.backbones import get_backbone
from featx_edge.config import RunConfig
from featx_edge.data import label_of, load_images, scan_folder, split_folder
from featx_edge.errors import ConfigError
from featx_edge.formats import artifact_filename, parse_formats
from featx_edge.run import load_reference, load_run_splits, run_config
from featx_edge.rundir import (
    EXPORT_DIR,
    INT8_LAYERS,
    MANIFEST,
    MANIFEST_VERSION,
    SPLITS,
    WEIGHTS,
    atomic_path,
    read_manifest,
    record_artifact,
    sha256_file,
    write_bytes,
    write_json,
)
from featx_edge.runtime.image import RESIZE_METHOD
from featx_edge.runtime.metadata import pack_tflite
from featx_edge.sample import resolve_data
from featx_edge.train import predict_pixels_keras
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
        ...                 model=ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=96,
        ...                                   weights="pretrained.h5"))
        >>> manifest = train_run(cfg, "runs/demo")  # doctest: +SKIP
    """
    from featx_edge.model import build_classifier, unfreeze_top
    from featx_edge.train import embed, fit, image_sequence, predict_probs, setup_devices, train_head_on_features

    out = Path(out)
    spec = get_backbone(config.model.backbone)
    size = config.model.input_size
    data_root = resolve_data(config.data.path, part="all")
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
    metrics: dict = {"embedding_seconds": round(embed_s, 3)}
    _log(progress, f"stage 1: head on cached features ({f_train.shape[1]}-d), {config.train.epochs} epochs")
    stage1 = train_head_on_features(clf.head_model, f_train, y_train, config=config.train, seed=config.seed,
                                    val=(f_val, y_val), progress=progress)
    metrics["stage1"] = dataclasses.asdict(stage1)
    # What the frozen backbone + head reaches; stage 2 is judged against it.
    metrics["stage1_val_accuracy"] = float(np.mean(clf.head_model(f_val, training=False).numpy().argmax(1) == y_val))
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
    if config.train.fine_tune_epochs:
        gain = 100.0 * (metrics["val_accuracy"] - metrics["stage1_val_accuracy"])
        metrics["stage2_val_gain_points"] = gain
        _log(progress, f"stage 2 changed validation accuracy by {gain:+.2f} points "
                       f"({metrics['stage1_val_accuracy']:.4f} -> {metrics['val_accuracy']:.4f}, "
                       f"{len(y_val)} images)")
    _log(progress, f"Keras reference: val accuracy {metrics['val_accuracy']:.4f}, "
                   f"test accuracy {metrics['test_accuracy']:.4f}")

    with atomic_path(out / WEIGHTS) as tmp:
        clf.model.save_weights(str(tmp))
    manifest = {
        "manifest_version": MANIFEST_VERSION,
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


def artifact_metadata(manifest: dict, fmt: str, *, input_dtype: str) -> dict:
    return {
        "featx_edge_version": __version__,
        "format": fmt,
        "labels": manifest["labels"],
        "input": dict(manifest["input"], dtype=input_dtype),
        "output": {"kind": "probabilities", "classes": len(manifest["labels"])},
        "backbone": manifest["backbone"],
    }


QAT_TRAINABLE = ("head_dense", "probabilities")
"""Layers quantization-aware training may change: the head. The backbone stays as trained, so
``tflite-int8-qat`` is the run's model (with an int8-adapted head), compared with its reference."""


class _Exporter:
    """What every format's export needs, computed once and only when needed."""

    def __init__(self, run: Path, manifest: dict, *, progress: bool) -> None:
        self.run = run
        self.manifest = manifest
        self.config = run_config(manifest)
        self.splits = load_run_splits(run, manifest)
        self.size = manifest["input"]["height"]
        self.clf = load_reference(run, manifest)
        self.progress = progress
        self._calibration = None
        self._judge = None
        self._int8_source = None
        self._golden = None

    @property
    def calibration(self) -> np.ndarray:
        from featx_edge.export.calibration import calibration_images

        if self._calibration is None:
            self._calibration = calibration_images(self.splits.root, self.splits.train, size=self.size,
                                                   count=self.config.export.calibration_images,
                                                   seed=self.config.seed)
        return self._calibration

    def int8_source(self) -> tuple:
        """(model, recipe): what post-training int8 is converted from, and how it was prepared.

        With ``[export] bias_correction`` (default) a bias-corrected copy of the reference;
        verify still compares every export with the reference itself.
        """
        if self._int8_source is None:
            if self.config.export.bias_correction:
                from featx_edge.int8 import bias_corrected

                model, info = bias_corrected(self.clf.model, calibration=self.calibration)
                self._int8_source = (model, {"bias_correction": info})
            else:
                self._int8_source = (self.clf.model, {"bias_correction": None})
        return self._int8_source

    def judging_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """Images for int8 choices (never test): validation plus calibration-free training images.

        Returns pixels, labels, the reference's probabilities and a description. Training images
        that calibrated the int8 models are left out: their ranges were fit on them.
        """
        if self._judge is None:
            from featx_edge.export.calibration import calibration_files

            calibrated = set(calibration_files(self.splits.train, count=self.config.export.calibration_images,
                                               seed=self.config.seed))
            free = [p for p in self.splits.train if p not in calibrated]
            rng = np.random.default_rng([self.config.seed, 11])
            free = [free[i] for i in sorted(rng.permutation(len(free))[:JUDGE_TRAIN_IMAGES])]
            train_labels = np.array([self.splits.classes.index(label_of(p)) for p in free], dtype=np.int64)
            pixels = load_images(self.splits.root, [*self.splits.val, *free], size=self.size)
            labels = np.concatenate([self.splits.labels("val"), train_labels])
            reference = predict_pixels_keras(self.clf.model, pixels)
            what = f"{len(self.splits.val)} validation + {len(free)} calibration-free training images"
            self._judge = (pixels, labels, reference, what)
        return self._judge

    def export(self, fmt: str) -> dict:
        from featx_edge.export import onnx as onnx_export
        from featx_edge.export import tflite as tflite_export

        t0 = time.perf_counter()
        path = self.run / EXPORT_DIR / artifact_filename(fmt)
        _log(self.progress, f"exporting {fmt} ...")
        extra: dict = {}
        if fmt == "tflite-int8-selective":
            flatbuffer, extra = self._selective()
            dtype = "float32"
        elif fmt == "tflite-int8-qat":
            flatbuffer, extra = self._qat()
            dtype = "uint8"
        elif fmt.startswith("tflite-"):
            quant = tflite_export.TFLiteQuantization.for_format(fmt)
            source, recipe = self.int8_source() if quant.full_integer else (self.clf.model, None)
            flatbuffer = tflite_export.convert(source, size=self.size, quantization=quant,
                                               calibration=self.calibration if quant.full_integer else None)
            dtype = "uint8" if quant.full_integer else "float32"
            if recipe is not None:
                extra = {"quantization": {"method": "tflite full-integer post-training", **recipe}}
        if fmt.startswith("tflite-"):
            metadata = artifact_metadata(self.manifest, fmt, input_dtype=dtype) | extra
            write_bytes(path, pack_tflite(flatbuffer, metadata))
        elif fmt == "onnx-float32":
            proto = onnx_export.convert(self.clf.model, size=self.size,
                                        metadata=artifact_metadata(self.manifest, fmt, input_dtype="float32"))
            onnx_export.save(proto, path)
        elif fmt == "onnx-int8":
            source, recipe = self.int8_source()
            _export_onnx_int8(self.run, self.manifest, source, path, size=self.size,
                              calibration=self.calibration, method=self.config.export.onnx_calibration,
                              recipe=recipe)
        entry = record_artifact(self.run, self.manifest, fmt, path)
        self._write_golden(fmt, path)
        _log(self.progress, f"  wrote {entry['path']} ({entry['bytes'] / 1e6:.2f} MB, "
                            f"{time.perf_counter() - t0:.1f} s)")
        return entry

    def _golden_images(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The self-test images: the held-out test images the reference is surest about."""
        if self._golden is None:
            from PIL import Image

            from featx_edge.runtime.selftest import SELFTEST_DIR

            count = min(self.config.export.reference_images, len(self.splits.test))
            pixels = load_images(self.splits.root, self.splits.test, size=self.size)
            probs = predict_pixels_keras(self.clf.model, pixels)
            top2 = np.sort(probs, axis=1)[:, -2:]
            chosen = np.argsort(-(top2[:, 1] - top2[:, 0]), kind="stable")[:count]
            names = []
            for i, index in enumerate(chosen):
                name = f"images/{i:02d}.png"
                with atomic_path(self.run / EXPORT_DIR / SELFTEST_DIR / name) as tmp:
                    Image.fromarray(pixels[index]).save(tmp, format="PNG")
                names.append(name)
            self._golden = (names, pixels[chosen], probs[chosen])
        return self._golden

    def _write_golden(self, fmt: str, path: Path) -> None:
        from featx_edge.runtime import load
        from featx_edge.runtime.selftest import write_golden

        names, pixels, reference = self._golden_images()
        expected = load(path).predict_pixels(pixels)
        write_golden(path, fmt=fmt, images=names, reference=reference, expected=expected)

    def _selective(self) -> tuple[bytes, dict]:
        from featx_edge.int8 import convert_selective, diagnose

        source, recipe = self.int8_source()
        layers = diagnose(source, size=self.size, calibration=self.calibration)
        write_json(self.run / INT8_LAYERS, {"metric": "rmse / quantization scale (about 0.29 is ideal)",
                                            "calibration_images": len(self.calibration), "layers": layers})
        keep = [row["tensor"] for row in layers[: self.config.export.selective_float_layers]]
        _log(self.progress, f"  keeping {len(keep)} layers in float (worst rmse/scale first; see {INT8_LAYERS})")
        flatbuffer = convert_selective(source, size=self.size, calibration=self.calibration, keep_float=keep)
        return flatbuffer, {"quantization": {"method": "tflite int8, selective", "float_layers": keep, **recipe}}

    def _qat(self) -> tuple[bytes, dict]:
        from featx_edge.export import tflite as tflite_export
        from featx_edge.int8 import fit_variables, init_qat_ranges, qat_model, trainable_variables
        from featx_edge.train import image_sequence

        epochs = self.config.train.qat_epochs
        if epochs < 1:
            raise ConfigError("tflite-int8-qat needs `--qat-epochs N` (N >= 1) of quantization-aware training.")
        qat = qat_model(self.clf.model, trainable=QAT_TRAINABLE)
        init_qat_ranges(qat, self.clf.model, calibration=self.calibration)
        _log(self.progress, f"  quantization-aware training of the head ({', '.join(QAT_TRAINABLE)}; the backbone "
                            f"stays frozen): {epochs} epoch(s), lr {self.config.train.qat_learning_rate}")
        bs = self.config.train.batch_size
        seq = image_sequence(self.splits.root, self.splits.train, self.splits.labels("train"), size=self.size,
                             batch_size=bs, seed=self.config.seed + 2)
        t0 = time.perf_counter()
        history = fit_variables(qat, seq, variables=trainable_variables(qat, QAT_TRAINABLE), epochs=epochs,
                                learning_rate=self.config.train.qat_learning_rate, teacher=self.clf.model)
        seconds = time.perf_counter() - t0
        flatbuffer = tflite_export.convert(qat, size=self.size, quantization=tflite_export.TFLiteQuantization.for_int8(),
                                           calibration=self.calibration)
        return flatbuffer, {"quantization": {"method": "tfmot quantization-aware training", "epochs": epochs,
                                             "trained_layers": list(QAT_TRAINABLE),
                                             "objective": "distillation from the float reference",
                                             "loss": history["loss"],
                                             "seconds": round(seconds, 2)}}

    def judge(self, fmt: str, *, budget: float) -> dict:
        """How far an exported int8 format strays from the reference on the judging set.

        Only losses count: an image the reference gets right and the candidate gets wrong.
        Images the candidate "gains" are disagreements too, not credit; choosing a variant
        because it scored higher than the reference would be choosing noise.
        """
        from featx_edge.formats import thresholds_for
        from featx_edge.intervals import wilson
        from featx_edge.runtime import load
        from featx_edge.verify import compare

        pixels, labels, reference, what = self.judging_set()
        probs = load(self.run / self.manifest["artifacts"][fmt]["path"]).predict_pixels(pixels)
        metrics = compare(probs, reference, labels)
        n, lost = metrics["images"], metrics["images_lost"]
        loss_low, loss_high = wilson(lost, n)
        min_agreement = thresholds_for(fmt, self.config.verify).min_agreement
        attempt = {"format": fmt, "images": n, "judged_on": what,
                   **{key: metrics[key] for key in ("top1_agreement", "top1_agreement_ci95", "images_lost",
                                                    "images_gained")},
                   "loss_points": 100.0 * lost / n, "loss_ci95_points": [100.0 * loss_low, 100.0 * loss_high],
                   "min_agreement": min_agreement}
        attempt["within_budget"] = bool(attempt["loss_points"] <= budget
                                        and (min_agreement is None or attempt["top1_agreement"] >= min_agreement))
        return attempt

    def choose_int8(self, budget: float) -> dict:
        """Try plain int8, then selective, then QAT (when enabled); keep the first within budget."""
        candidates = ["tflite-int8", "tflite-int8-selective"]
        if self.config.train.qat_epochs:
            candidates.append("tflite-int8-qat")
        attempts = []
        chosen = None
        for fmt in candidates:
            if fmt not in self.manifest.get("artifacts", {}):
                self.export(fmt)
            attempt = self.judge(fmt, budget=budget)
            attempts.append(attempt)
            _log(self.progress, f"  int8 budget {budget} points: {fmt} loses {attempt['images_lost']} of "
                                f"{attempt['images']} images the reference gets right "
                                f"({attempt['loss_points']:.2f} points), agreement {attempt['top1_agreement']:.4f}"
                                f" -> {'OK' if attempt['within_budget'] else 'over budget'}")
            if attempt["within_budget"]:
                chosen = fmt
                break
        decision = {"budget_points": budget, "judged_on": attempts[0]["judged_on"], "attempts": attempts,
                    "chosen": chosen, "criterion": "images lost versus the reference (gains are not credited), "
                                                   "and top-1 agreement at least the format's verify threshold"}
        if chosen is None:
            decision["note"] = ("no int8 variant met the budget" +
                                ("" if self.config.train.qat_epochs else "; enable QAT with --qat-epochs N"))
            _log(self.progress, "  " + decision["note"])
        self.manifest["int8_selection"] = decision
        write_json(self.run / MANIFEST, self.manifest)
        return decision


JUDGE_TRAIN_IMAGES = 2000
"""At most this many calibration-free training images join validation to judge int8 variants."""


def budget_failure(manifest: dict) -> str | None:
    """The message for a missed ``--int8-budget`` (None when met or not asked for)."""
    decision = manifest.get("int8_selection")
    if not decision or decision.get("chosen"):
        return None
    rows = "\n  ".join(f"{a['format']}: lost {a['images_lost']} of {a['images']} images "
                       f"({a['loss_points']:.2f} points, 95% CI {a['loss_ci95_points'][0]:.2f}-"
                       f"{a['loss_ci95_points'][1]:.2f}), agreement {a['top1_agreement']:.4f}"
                       for a in decision["attempts"])
    return (f"no int8 variant met `--int8-budget {decision['budget_points']}` "
            f"(judged on {decision['judged_on']}):\n  {rows}\n"
            + ("Enable quantization-aware training with `--qat-epochs N`, raise `[export] calibration_images`, "
               "or ship a float16 / dynamic-range export.")
            )


def export_run(run: str | Path, *, formats: tuple[str, ...] | str | None = None, progress: bool = True) -> dict:
    """Export the run's reference model to each format under ``RUN/export/``; returns the manifest.

    With ``export.int8_budget`` set, int8 variants are then tried in order until one loses at
    most that many accuracy points on the validation split (recorded in the manifest).
    """
    run = Path(run)
    manifest = read_manifest(run)
    exporter = _Exporter(run, manifest, progress=progress)
    formats = parse_formats(formats) if formats else exporter.config.export.formats
    for fmt in formats:
        exporter.export(fmt)
    if exporter.config.export.int8_budget is not None:
        exporter.choose_int8(exporter.config.export.int8_budget)
    return manifest


def _export_onnx_int8(run: Path, manifest: dict, model, path: Path, *, size: int, calibration, method: str,
                      recipe: dict) -> None:
    """Quantize this run's model to ONNX int8 (from a float32 ONNX made in a temporary folder)."""
    import tempfile

    from featx_edge.export import onnx as onnx_export
    from featx_edge.export.onnx_int8 import quantize

    metadata = artifact_metadata(manifest, "onnx-int8", input_dtype="float32")
    metadata["quantization"] = {"method": "onnxruntime static QDQ", "weights": "int8 per-channel",
                                "activations": "int8", "calibration": method,
                                "calibration_images": len(calibration), **recipe}
    with tempfile.TemporaryDirectory(prefix="featx-onnx-") as tmp:
        float_path = Path(tmp) / "float32.onnx"
        onnx_export.save(onnx_export.convert(model, size=size, metadata=metadata), float_path)
        quantize(float_path, path, calibration=calibration, method=method, metadata=metadata)


def format_table(report: dict, manifest: dict) -> str:
    """The run's table from a verify report: size, test accuracy, change and agreement with 95% intervals."""
    header = (f"{'format':<22} {'size (MB)':>9} {'test acc':>8} {'change (points) [95% CI]':>26} "
              f"{'agreement [95% CI]':>25}  verify")
    lines = [header]
    low, high = report.get("reference_accuracy_ci95") or (None, None)
    ci = f"[{low:.3f}, {high:.3f}]" if low is not None else ""
    lines.append(f"{'keras (reference)':<22} {'':>9} {report['reference_accuracy']:>8.4f} {ci:>26}")
    for fmt, row in report["formats"].items():
        size = manifest.get("artifacts", {}).get(fmt, {}).get("bytes")
        acc, agree = row.get("accuracy"), row.get("top1_agreement")
        change = ""
        if row.get("accuracy_change_points") is not None:
            c_low, c_high = row["accuracy_change_ci95_points"]
            change = f"{row['accuracy_change_points']:+.2f} [{c_low:+.2f}, {c_high:+.2f}]"
        agreement = ""
        if agree is not None:
            a_low, a_high = row["top1_agreement_ci95"]
            agreement = f"{agree:.4f} [{a_low:.3f}, {a_high:.3f}]"
        lines.append(f"{fmt:<22} {'' if size is None else f'{size / 1e6:.2f}':>9} "
                     f"{'' if acc is None else f'{acc:.4f}':>8} {change:>26} {agreement:>25}  "
                     f"{'pass' if row['passed'] else 'FAIL'}")
    lines.append(f"({report['images']} test images; change and agreement are against the Keras reference "
                 "on the same images)")
    return "\n".join(lines)
