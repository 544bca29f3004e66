"""What a bench measures: which artifacts, which runtimes are available here, the row specs of the
sweep, the test images, and the accuracy already recorded in ``verify.json`` or the manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featx_edge.errors import ConfigError, FeatxError, RunDirError, check_int, is_int
from featx_edge.formats.registry import engine_for_file
from featx_edge.rundir.manifest import artifact_problems
from featx_edge.rundir.names import MANIFEST, VERIFY, WEIGHTS
from featx_edge.training.run import Run
from featx_edge.verify.record import read_record

REFERENCE_FORMAT = "keras-reference"
"""The ``format`` of the TensorFlow rows: the run's Keras model (``RUN/model.weights.h5``)."""

LITERT_RUNTIMES = (("litert-xnnpack", True), ("litert-builtin", False))
ORT_RUNTIMES = (
    ("onnxruntime-cpu", "CPUExecutionProvider"),
    ("onnxruntime-cuda", "CUDAExecutionProvider"),
    ("onnxruntime-tensorrt", "TensorrtExecutionProvider"),
)
_GPU_NEEDS = {
    "CUDAExecutionProvider": "the CUDA provider needs onnxruntime-gpu and an NVIDIA GPU with CUDA and cuDNN",
    "TensorrtExecutionProvider": ("the TensorRT provider needs onnxruntime-gpu, the TensorRT libraries "
                                  "and an NVIDIA GPU"),
}
POOL_IMAGES = 64  # distinct images cycled through while timing


def positive_ints(name: str, values) -> tuple[int, ...]:
    """A sweep setting (one int or several) as sorted distinct positive ints; ConfigError otherwise."""
    items = (values,) if is_int(values) else values
    try:
        checked = [check_int(name, value, low=1) for value in items]
    except (TypeError, ConfigError):  # not a collection, or an item is not a positive integer
        checked = []
    if not checked:
        raise ConfigError(f"`{name}` must be one or more positive integers, e.g. {name}=(1, 4); received {values!r}.")
    return tuple(sorted(set(checked)))


def check_artifacts(run: Path, manifest: dict, formats) -> list[str]:
    """The formats to bench (default: every exported one), each checked against the manifest; RunDirError if not."""
    artifacts = manifest.get("artifacts") or {}
    if formats is None:
        from featx_edge.formats.registry import ordered

        chosen = ordered(artifacts)
        if not chosen:
            raise RunDirError(f"`{run}` has no exported models; run `featx-edge export {run}` first.")
    else:
        chosen = [formats] if isinstance(formats, str) else list(dict.fromkeys(formats))
        missing = [f for f in chosen if f not in artifacts]
        if missing or not chosen:
            raise RunDirError(
                f"`{run}` has no exported {', '.join(missing) or 'formats'} (exported: "
                f"{', '.join(artifacts) or 'none'}); run `featx-edge export {run} --formats "
                f"{','.join(missing) or 'all'}` or bench only exported formats."
            )
    for fmt in chosen:
        problems = artifact_problems(run, manifest, fmt)
        if problems:
            raise RunDirError(f"{fmt}: {problems[0]}; re-run `featx-edge export {run} --formats {fmt}`.")
    return chosen


def load_inputs(run: Run, *, count: int) -> tuple[np.ndarray, dict | None, dict]:
    """(timing pool, accuracy job, description).

    The pool is the first ``count`` test images (timing cycles through them). The accuracy job
    names the whole test split's files, which the worker decodes batch by batch, so memory
    holds one batch whatever the split's size. Without usable test images: random uint8
    pixels and no accuracy job.
    """
    size, width = run.size, int(run.manifest["input"].get("width", run.size))
    try:
        from featx_edge.data.folders import load_images

        splits = run.splits()
        if not splits.test:
            raise RunDirError("the test split is empty")
        pool = load_images(splits.root, splits.test[:count], size=size)
        job = {"root": str(splits.root), "relpaths": list(splits.test), "labels": splits.labels("test").tolist(),
               "size": size}
        return pool, job, {"source": "test split", "images": len(splits.test), "note": None}
    except FeatxError as err:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (POOL_IMAGES, size, width, 3), dtype=np.uint8)
        note = (f"the run's test images could not be loaded ({err}); timed on random uint8 pixels, "
                "so no accuracy was measured by the bench")
        return pixels, None, {"source": "random", "images": len(pixels), "note": note}


def accuracy_lookup(run: Path, manifest: dict) -> tuple[dict, float | None, str | None, str | None]:
    """(format -> accuracy from verify.json, reference accuracy, its source, note)."""
    per_format: dict = {}
    reference, source, note = None, None, None
    try:
        record = read_record(run)
    except RunDirError as err:  # damaged: the bench still runs, and says so
        record, note = None, str(err)
    if record is not None:
        # An entry measured on another file than the one exported now is stale: not reused.
        current = record.current(manifest=manifest)
        per_format = {fmt: entry.accuracy for fmt, entry in current.items()}
        stale = sorted(fmt for fmt in record.entries if fmt in (manifest.get("artifacts") or {})
                       and fmt not in current)
        if stale:
            note = (f"{VERIFY} is stale for {', '.join(stale)} (the artifact changed since it was verified, "
                    f"or it predates sha256 records); re-run `featx-edge verify {run}`")
        reference = record.reference_accuracy
        source = VERIFY if reference is not None else None
    elif note is None:
        note = (f"no {VERIFY}: accuracy columns come from this bench's own pass over the test split; "
                f"run `featx-edge verify {run}` for verified accuracy")
    if reference is None:
        reference = (manifest.get("training") or {}).get("test_accuracy")
        source = f"{MANIFEST} (training)" if reference is not None else None
    return per_format, reference, source, note


def _ort_providers() -> tuple[list[str] | None, str | None]:
    try:
        import onnxruntime as ort
    except ImportError as err:
        return None, f"onnxruntime is not importable ({err}); `pip install onnxruntime`"
    return list(ort.get_available_providers()), None


def _litert_problem() -> str | None:
    import importlib.util

    if importlib.util.find_spec("ai_edge_litert") is None:
        return "the LiteRT interpreter is not installed; `pip install ai-edge-litert`"
    return None


def plan_rows(run: Path, manifest: dict, formats: list[str], *, threads: tuple[int, ...],
              batches: tuple[int, ...], include_tf: bool) -> tuple[list[dict], list[dict], dict]:
    """Measurable row specs, unavailable entries, and the availability of each runtime."""
    import importlib.util

    providers, ort_problem = _ort_providers()
    litert_problem = _litert_problem()
    runtimes: dict[str, dict] = {}
    for name, xnnpack in LITERT_RUNTIMES:
        runtimes[name] = {"engine": "litert", "provider": "xnnpack" if xnnpack else "builtin",
                          "available": litert_problem is None, "reason": litert_problem}
    for name, provider in ORT_RUNTIMES:
        if ort_problem:
            reason = ort_problem
        elif provider not in providers:
            reason = f"onnxruntime reports providers [{', '.join(providers)}], not {provider}"
            if provider in _GPU_NEEDS:
                reason += f"; {_GPU_NEEDS[provider]}"
        else:
            reason = None
        runtimes[name] = {"engine": "onnxruntime", "provider": provider, "available": reason is None,
                          "reason": reason}
    if not include_tf:
        tf_reason = "not requested (include_tf=False, or --no-tensorflow on the command line)"
    elif importlib.util.find_spec("tensorflow") is None:
        tf_reason = "TensorFlow is not installed; `pip install 'featx-edge[train]'` for the reference rows"
    elif not (run / manifest.get("reference", {}).get("path", WEIGHTS)).is_file():
        tf_reason = f"the reference weights `{run / WEIGHTS}` are missing; re-run `featx-edge train`"
    else:
        tf_reason = None
    runtimes["tensorflow"] = {"engine": "tensorflow", "provider": None, "available": tf_reason is None,
                              "reason": tf_reason}

    artifacts = manifest["artifacts"]
    combos = []  # (format, runtime name, path, model bytes, sha256)
    for fmt in formats:
        path = run / artifacts[fmt]["path"]
        onnx = engine_for_file(path) == "onnxruntime"
        names = [n for n, _ in (ORT_RUNTIMES if onnx else LITERT_RUNTIMES)]
        combos += [(fmt, name, path, int(artifacts[fmt]["bytes"]), artifacts[fmt].get("sha256")) for name in names]
    weights = run / manifest.get("reference", {}).get("path", WEIGHTS)
    combos.append((REFERENCE_FORMAT, "tensorflow", weights, weights.stat().st_size if weights.is_file() else None,
                   manifest.get("reference", {}).get("sha256")))

    specs, unavailable = [], []
    for fmt, name, path, nbytes, sha256 in combos:
        info = runtimes[name]
        if not info["available"]:
            unavailable.append({"format": fmt, "runtime": name, "provider": info["provider"],
                                "engine": info["engine"], "status": "skipped" if name == "tensorflow" and
                                not include_tf else "unavailable", "reason": info["reason"],
                                "threads": None, "batch": None, "model_bytes": nbytes})
            continue
        gpu = info["provider"] in _GPU_NEEDS
        for t in ((max(threads),) if gpu else threads):
            for b in batches:
                specs.append({"format": fmt, "runtime": name, "engine": info["engine"], "provider": info["provider"],
                              "path": str(path), "run": str(run), "threads": t, "batch": b, "model_bytes": nbytes,
                              "sha256": sha256})
    return specs, unavailable, runtimes
