"""Regenerate tests/data/runtime/: tiny exported models for the TensorFlow-free runtime tests.

    python tests/data/make_runtime_models.py

A 3-class toy CNN (32x32 input, in-graph [-1, 1] scaling, seeded weights) exported with
featx-edge's own export code and metadata (the .tflite files with standard TFLite Model Metadata,
as `featx-edge export` writes them): tflite-float32, tflite-int8 and onnx-float32, plus their
self-test golden files. Classes are "red", "green" and "blue" and the weights are set so
the model really answers which channel dominates, so tests can check answers, not just shapes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).parent / "runtime"
SIZE = 32
LABELS = ["red", "green", "blue"]


def build_model():
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(3, 1, name="channels")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("channels").set_weights([np.eye(3, dtype=np.float32)[None, None] * 2.0, np.zeros(3, np.float32)])
    model.get_layer("probabilities").set_weights([np.eye(3, dtype=np.float32) * 4.0, np.zeros(3, np.float32)])
    return model


def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i, label in enumerate(LABELS):
        for j in range(2):
            arr = rng.integers(0, 60, (40 + 8 * j, 36, 3), dtype=np.uint8)
            arr[:, :, i] = rng.integers(170, 256, arr.shape[:2])
            out[f"{label}_{j}.png"] = arr
    return out


def main() -> None:
    """Build into a sibling folder, then swap it in: tests running meanwhile never see a half-made one."""
    new, old = OUT.with_name(OUT.name + ".new"), OUT.with_name(OUT.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    build(new)
    shutil.rmtree(old, ignore_errors=True)
    if OUT.exists():
        OUT.rename(old)
    new.rename(OUT)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {OUT}")


def build(out: Path) -> None:
    from featx_edge.export import onnx as onnx_export
    from featx_edge.export import tflite as tflite_export
    from featx_edge.export.tflite_metadata import pack
    from featx_edge.files.atomic import write_bytes
    from featx_edge.formats.registry import get_format
    from featx_edge.runtime import load
    from featx_edge.runtime.image import load_pixels
    from featx_edge.runtime.selftest import SELFTEST_DIR, write_golden

    (out / "images").mkdir(parents=True)
    (out / SELFTEST_DIR / "images").mkdir(parents=True)
    model = build_model()
    pics = images()
    for name, arr in pics.items():
        Image.fromarray(arr).save(out / "images" / name)
    pixels = np.stack([load_pixels(arr, height=SIZE, width=SIZE) for arr in pics.values()])
    golden_names = []
    for i, px in enumerate(pixels):
        golden_names.append(f"images/{i:02d}.png")
        Image.fromarray(px).save(out / SELFTEST_DIR / golden_names[-1])
    reference = model(pixels.astype(np.float32)).numpy()
    calibration = np.concatenate([pixels, np.random.default_rng(1).integers(0, 256, (32, SIZE, SIZE, 3), np.uint8)])

    def metadata(fmt: str, dtype: str) -> dict:
        return {"featx_edge_version": "test", "format": fmt, "labels": LABELS,
                "input": {"name": "image", "height": SIZE, "width": SIZE, "channels": 3, "layout": "NHWC",
                          "color": "RGB", "dtype": dtype, "value_range": [0, 255], "resize": "bilinear"},
                "output": {"kind": "probabilities", "classes": 3}, "backbone": {"name": "toy"}}

    for fmt in ("tflite-float32", "tflite-int8"):
        quant = tflite_export.TFLiteQuantization.named(get_format(fmt).quantization)
        fb = tflite_export.convert(model, size=SIZE, quantization=quant, calibration=calibration)
        path = out / f"model.{fmt}.tflite"
        write_bytes(path, pack(fb, metadata=metadata(fmt, "uint8" if quant.full_integer else "float32")))
    path = out / "model.onnx-float32.onnx"
    onnx_export.save(onnx_export.convert(model, size=SIZE, metadata=metadata("onnx-float32", "float32")), path)
    for path in sorted(out.glob("model.*")):
        fmt = path.name.split(".")[1]
        write_golden(path, fmt=fmt, images=golden_names, reference=reference,
                     expected=load(path).predict_pixels(pixels))


if __name__ == "__main__":
    main()
