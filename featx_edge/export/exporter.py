"""``export_run``: every requested format of a run, made by the converter its FormatSpec names.

What several formats share (the reference, the calibration images, the bias-corrected int8
source, the self-test images, the TFLite trace of each source model, the float32 ONNX of a model)
is computed once, on first use: every TFLite format converts from one trace of its model
(``Exporter.traced``), and the reference's test-split outputs stay in the process for verify. Each artifact is written
atomically, recorded in the manifest (path, sha256, bytes) and given its golden self-test file.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from featx_edge import __version__
from featx_edge.config import RunConfig
from featx_edge.errors import ExportError, ModelFileError
from featx_edge.export.calibration import calibration_images
from featx_edge.export.golden import GoldenImages
from featx_edge.files.atomic import atomic_path, sha256_file, write_bytes, write_json
from featx_edge.files.lock import locked
from featx_edge.formats.registry import FormatSpec, artifact_filename, get_format, parse_formats
from featx_edge.formats.targets import resolve_target
from featx_edge.progress import bar, stage
from featx_edge.rundir.names import EXPORT_DIR, EXPORT_JOURNAL, INT8_LAYERS
from featx_edge.training.run import Run

log = logging.getLogger(__name__)


def export_run(run: str | Path, *, formats: tuple[str, ...] | str | None = None,
               settings: Callable[[RunConfig], RunConfig] | None = None) -> dict:
    """Export the run's reference model to each format under ``RUN/export/``; returns the manifest.

    With ``export.int8_budget`` set, int8 variants are then tried in order until one loses at
    most that many accuracy points on images that are never the test split (recorded in the
    manifest as ``int8_selection``).

    Args:
        run: the run directory.
        formats: format names or a comma-separated string (default: the run's ``[export] formats``).
        settings: ``change(config) -> config``: other settings for this export (e.g. ``--target``);
            recorded in the manifest only when every format was made.

    Example:
        >>> manifest = export_run("runs/demo", formats="tflite-int8,onnx-float32")  # doctest: +SKIP
        >>> sorted(manifest["artifacts"])  # doctest: +SKIP
        ['onnx-float32', 'tflite-int8']
    """
    with locked(run, command="export"):
        opened = Run.open(run, recover=True)
        recorded = opened.config
        if settings is not None:
            opened.config = settings(recorded)  # used now, recorded only if every export succeeds
        exporter = Exporter(opened)
        config = opened.config
        chosen = parse_formats(formats) if formats is not None else config.export.formats  # "" is refused
        done = False
        try:
            order = exporter.start_worker(chosen)  # the worker's float formats last: they convert meanwhile
            for fmt in bar(order, total=len(order), desc="exporting", unit="format"):
                exporter.export(fmt)
            if config.export.int8_budget is not None:
                from featx_edge.export.budget import choose_int8

                choose_int8(opened, budget=config.export.int8_budget, export=exporter.export)
            done = True
        finally:
            exporter.close()
            # Artifacts made so far stay recorded; new settings only when every export was made.
            opened.manifest["config"] = (config if done else recorded).to_dict()
            opened.save()
        return opened.manifest


class Exporter:
    """Makes one run's artifacts; shared inputs are computed once, when a format first needs them."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.golden = GoldenImages(run, count=run.config.export.reference_images)
        self._calibration: np.ndarray | None = None
        self._int8_source: tuple | None = None
        self._int8_flatbuffer: bytes | None = None  # tflite-int8 as converted while choosing its source
        self._traces: dict[tuple[int, int | None], tuple[object, object]] = {}  # (model id, batch) -> (model, Traced)
        self._onnx_protos: dict[int, tuple[object, object]] = {}  # model id -> (model, float32 ONNX before metadata)
        self._int8_ranges = "minmax"  # tflite-int8's activation ranges (export.tflite_ranges), set with the source
        self._worker = None  # export.workers.FloatWorker converting the float formats, when one runs
        self._converters = {"tflite": self._tflite, "tflite-selective": self._tflite_selective,
                            "tflite-qat": self._tflite_qat, "onnx": self._onnx, "onnx-int8": self._onnx_int8}

    def start_worker(self, formats) -> list[str]:
        """Start a worker process for the float formats where ``[export] workers`` says so
        (``export.workers``); returns the order to export in: the worker's formats last."""
        from featx_edge.export.int8_choice import candidate_names
        from featx_edge.export.workers import FloatWorker, use_worker, worker_formats

        floats = worker_formats(formats)
        choice = len(candidate_names(self.run.config.export)) > 1
        if not use_worker(self.run.config.export.workers, formats=formats, int8_choice=choice,
                          parameters=self.run.reference().model.count_params()):
            return list(formats)
        self._worker = FloatWorker(self.run.path, floats,
                                   metadata={fmt: self.metadata(get_format(fmt)) for fmt in floats})
        return [fmt for fmt in formats if fmt not in floats] + floats

    def _from_worker(self, fmt: str) -> bytes | None:
        """What the worker made of ``fmt``, or None (no worker, not its format, or it died)."""
        return None if self._worker is None else self._worker.take(fmt)

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        if self._worker is not None:
            self._worker.close()

    @property
    def calibration(self) -> np.ndarray:
        """The int8 calibration images (a seeded choice of training images, bounded in number)."""
        if self._calibration is None:
            config, splits = self.run.config, self.run.splits()
            self._calibration = calibration_images(splits.root, splits.train, size=self.run.size,
                                                   count=config.export.calibration_images, seed=config.seed)
        return self._calibration

    def traced(self, model, *, batch: int | None = None):
        """``model`` traced once for TFLite (``export.tflite.Traced``): every TFLite format of it converts
        from this trace instead of tracing and saving the Keras model again."""
        from featx_edge.export.tflite import trace

        key = (id(model), batch)
        if key not in self._traces:  # the model is kept beside its trace, so its id stays its own
            self._traces[key] = (model, trace(model, size=self.run.size, batch=batch))
        return self._traces[key][1]

    def onnx_float(self, model, *, metadata: dict):
        """A float32 ONNX of ``model`` with ``metadata``; tf2onnx runs once per model (onnx-float32 and
        the float model onnx-int8 quantizes share it when int8 is made from the reference itself)."""
        import onnx

        from featx_edge.export import onnx as onnx_export

        made = self._from_worker("onnx-float32") if model is self.run.reference().model else None
        if made is not None:  # the worker's tf2onnx of the reference (made with onnx-float32's metadata)
            self._onnx_protos[id(model)] = (model, onnx.load_from_string(made))
        if id(model) not in self._onnx_protos:
            self._onnx_protos[id(model)] = (model, onnx_export.convert(model, size=self.run.size, metadata=metadata))
        proto = type(self._onnx_protos[id(model)][1])()
        proto.CopyFrom(self._onnx_protos[id(model)][1])
        onnx_export.add_metadata(proto, metadata)
        return proto

    def int8_source(self) -> tuple:
        """(model, recipe): what post-training int8 is converted from, and how it was prepared.

        ``[export] bias_correction`` and ``activation_ranges`` name the candidates
        (``int8_choice.candidate_names``): one fixed candidate is taken as it is; with ``"auto"``
        (the default of both) each candidate is converted to tflite-int8 and the one closest to the
        reference on the validation split is kept (``export.int8_choice``). Verify still compares
        every export with the reference itself.
        """
        if self._int8_source is None:
            from featx_edge.export.int8_choice import candidate_names

            names = candidate_names(self.run.config.export)
            if len(names) > 1:
                self._int8_source = self._chosen_int8_source(names)
            else:
                self.run.manifest.pop("int8_choice", None)  # a fixed setting: no choice was made
                bias, self._int8_ranges = names[0].split("/")
                self._int8_source = self._bias_sources((bias,))[bias]
        return self._int8_source

    def _rounded_source(self) -> tuple[object, dict]:
        """(the reference, or its AdaRound copy with ``[export] weight_rounding = "adaround"``, the record)."""
        reference = self.run.reference().model
        setting = self.run.config.export.weight_rounding
        if setting == "nearest":
            return reference, {"weight_rounding": {"setting": setting, "method": "nearest"}}
        from featx_edge.export.adaround import adarounded, recorded

        with stage("int8 source: AdaRound weight rounding"):
            model, info = adarounded(reference, calibration=self.calibration)
        log.info("  AdaRound: %d layers, output error %s of nearest rounding's (median), %.1f s", info["layers"],
                 info["output_error_vs_nearest"]["median"], info["seconds"])
        return model, {"weight_rounding": {"setting": setting, **recorded(info)}}

    def _bias_sources(self, biases) -> dict[str, tuple]:
        """``{"off"|"on": (model, {"weight_rounding": ..., "bias_correction": info or None})}`` for the biases
        asked for; bias correction is applied after the weight rounding, against the reference's kernels."""
        reference = self.run.reference().model
        base, rounding = self._rounded_source()
        sources = {}
        for bias in biases:
            if bias == "on":
                from featx_edge.export.bias_correction import bias_corrected

                model, info = bias_corrected(base, calibration=self.calibration,
                                             float_model=None if base is reference else reference)
                sources[bias] = (model, {**rounding, "bias_correction": info})
            else:
                sources[bias] = (base, {**rounding, "bias_correction": None})
        return sources

    def _chosen_int8_source(self, names: list[str]) -> tuple:
        """Convert tflite-int8 once per candidate; keep the best on the judging set (never test)."""
        from featx_edge.export.budget import judging_set
        from featx_edge.export.int8_choice import CHOICE_TRAIN_IMAGES, choose_int8
        from featx_edge.export.tflite_ranges import convert_ranges

        sources = self._bias_sources(dict.fromkeys(name.split("/")[0] for name in names))
        flatbuffers = {}
        for bias, (model, _) in sources.items():
            methods = [name.split("/")[1] for name in names if name.split("/")[0] == bias]
            converted = convert_ranges(model, size=self.run.size, calibration=self.calibration, methods=methods)
            flatbuffers.update({f"{bias}/{method}": flatbuffer for method, flatbuffer in converted.items()})
        with stage("int8 source: judging the candidates"):
            judging = judging_set(self.run, train_images=CHOICE_TRAIN_IMAGES)
            chosen, record = choose_int8({name: flatbuffers[name] for name in names}, run=self.run,
                                         judging=judging)
        self.run.manifest["int8_choice"] = record
        self._int8_flatbuffer = flatbuffers[chosen]
        bias, self._int8_ranges = chosen.split("/")
        model, recipe = sources[bias]
        if self.run.config.export.bias_correction == "auto":
            recipe = {**recipe, "bias_correction_choice": {"setting": "auto", "chosen": bias,
                                                           "judged_on": record["judged_on"]}}
        return model, recipe

    def _tflite_int8(self, source) -> tuple[bytes, dict]:
        """tflite-int8 from the int8 source with the chosen activation ranges, and what says so."""
        from featx_edge.export.tflite import TFLiteQuantization, convert
        from featx_edge.export.tflite_ranges import convert_ranges

        flatbuffer, ranges = self._int8_flatbuffer, self._int8_ranges  # converted while choosing, if chosen
        if flatbuffer is None and ranges == "minmax":
            flatbuffer = convert(self.traced(source), size=self.run.size, quantization=TFLiteQuantization.for_int8(),
                                 calibration=self.calibration)
        elif flatbuffer is None:
            flatbuffer = convert_ranges(source, size=self.run.size, calibration=self.calibration,
                                        methods=(ranges,))[ranges]
        setting = self.run.config.export.activation_ranges
        return flatbuffer, {"activation_ranges": {"setting": setting, "method": ranges}}

    def metadata(self, spec: FormatSpec) -> dict:
        """What the artifact says about itself (read by ``featx_edge.runtime``)."""
        manifest = self.run.manifest
        return {
            "featx_edge_version": __version__,
            "format": spec.name,
            "labels": manifest["labels"],
            "input": dict(manifest["input"], dtype=spec.input_dtype),
            "output": {"kind": "probabilities", "classes": len(manifest["labels"])},
            "backbone": manifest["backbone"],
        }

    def export(self, fmt: str) -> dict:
        """Make ``fmt``'s artifact, record it in the manifest, write its golden file; returns the entry."""
        with stage(f"export {fmt}"):  # a shared input (calibration, int8 source) counts for the first format
            return self._export(fmt)

    def _export(self, fmt: str) -> dict:
        spec = get_format(fmt)
        t0 = time.perf_counter()
        self.golden.chosen()  # the reference on the test split, once: a NaN reference stops before any conversion
        path = self.run.path / EXPORT_DIR / artifact_filename(fmt)
        log.info("exporting %s ...", fmt)
        with atomic_path(path) as tmp:  # same folder and ending; renamed onto `path` on success
            self._converters[spec.converter](spec, tmp)
            try:  # a file that cannot run on this host never takes the export's place
                expected = self.golden.expected(tmp)
            except ModelFileError as err:
                raise ExportError(f"{fmt}: the converted model does not run here, so it was not written: "
                                  f"{str(err).replace(str(tmp), str(path))}") from err
            self.run.journal(fmt, path, sha256=sha256_file(tmp))
        entry = self.run.record_artifact(fmt, path)
        (self.run.path / EXPORT_JOURNAL).unlink(missing_ok=True)
        self.golden.write(fmt, path, expected=expected)
        log.info("  wrote %s (%.2f MB, %.1f s)", entry["path"], entry["bytes"] / 1e6, time.perf_counter() - t0)
        return entry

    # -- one method per FormatSpec.converter ----------------------------------------------------
    def _write_tflite(self, spec: FormatSpec, path: Path, flatbuffer: bytes, extra: dict) -> None:
        """Every .tflite format ends here: standard TFLite Model Metadata, then featx-edge's zip."""
        from featx_edge.export.tflite_metadata import pack

        write_bytes(path, pack(flatbuffer, metadata=self.metadata(spec) | extra))

    def _tflite(self, spec: FormatSpec, path: Path) -> None:
        from featx_edge.export.tflite import TFLiteQuantization, convert

        quant = TFLiteQuantization.named(spec.quantization)
        extra: dict = {}
        if quant.calibrated:
            source, recipe = self.int8_source()
            if spec.quantization == "int8":
                flatbuffer, ranges = self._tflite_int8(source)
                recipe = {**recipe, **ranges}
            else:
                flatbuffer = convert(self.traced(source), size=self.run.size, quantization=quant,
                                     calibration=self.calibration)
            method = ("tflite full-integer post-training" if quant.full_integer
                      else "tflite 16x8 post-training (int16 activations, int8 weights)")
            extra = {"quantization": {"method": method, **recipe}}
        else:
            flatbuffer = self._from_worker(spec.name) or convert(self.traced(self.run.reference().model),
                                                                 size=self.run.size, quantization=quant)
        self._write_tflite(spec, path, flatbuffer, extra)

    def _tflite_selective(self, spec: FormatSpec, path: Path) -> None:
        from featx_edge.export.tflite_int8 import selective

        source, recipe = self.int8_source()
        # One conversion and calibration serve the per-layer diagnosis and the selective model.
        layers, keep, flatbuffer = selective(self.traced(source, batch=1), size=self.run.size,
                                             calibration=self.calibration,
                                             float_layers=self.run.config.export.selective_float_layers)
        write_json(self.run.path / INT8_LAYERS, {"metric": "rmse / quantization scale (about 0.29 is ideal)",
                                                 "calibration_images": len(self.calibration), "layers": layers})
        log.info("  keeping %d layers in float (worst rmse/scale first; see %s)", len(keep), INT8_LAYERS)
        self._write_tflite(spec, path, flatbuffer,
                           {"quantization": {"method": "tflite int8, selective", "float_layers": keep, **recipe}})

    def _tflite_qat(self, spec: FormatSpec, path: Path) -> None:
        from featx_edge.export.qat import export_qat

        flatbuffer, extra = export_qat(self.run, calibration=self.calibration)
        self._write_tflite(spec, path, flatbuffer, extra)

    def _onnx(self, spec: FormatSpec, path: Path) -> None:
        from featx_edge.export import onnx as onnx_export

        onnx_export.save(self.onnx_float(self.run.reference().model, metadata=self.metadata(spec)), path)

    def _onnx_int8(self, spec: FormatSpec, path: Path) -> None:
        """QDQ int8 with onnxruntime, from a float32 ONNX of the int8 source made in a temporary folder."""
        from featx_edge.export import onnx as onnx_export
        from featx_edge.export.onnx_int8 import quantize

        source, recipe = self.int8_source()
        method = self.run.config.export.onnx_calibration
        target = resolve_target(self.run.config.export.target)
        metadata = self.metadata(spec)
        metadata["quantization"] = {"method": "onnxruntime static QDQ",
                                    "weights": "int8 per-channel" + (", reduce_range (7-bit)" if target.reduce_range
                                                                     else ""),
                                    "activations": target.activations, "reduce_range": target.reduce_range,
                                    "target": target.name, "target_requested": self.run.config.export.target,
                                    "target_why": target.why, "calibration": method,
                                    "calibration_images": len(self.calibration), **recipe}
        log.info("  onnx-int8 for target %s: %s", target.name, target.why)
        with tempfile.TemporaryDirectory(prefix="featx-onnx-") as tmp:
            float_path = Path(tmp) / "float32.onnx"
            with stage("onnx-int8: float32 ONNX of the int8 source"):
                onnx_export.save(self.onnx_float(source, metadata=metadata), float_path)
            with stage("onnx-int8: onnxruntime calibration and quantization"):
                quantize(float_path, path, calibration=self.calibration, method=method, metadata=metadata,
                         activations=target.activations, reduce_range=target.reduce_range)
