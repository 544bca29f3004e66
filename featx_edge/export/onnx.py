"""ONNX export: float32 via tf2onnx, with a dynamic batch dimension and featx-edge metadata."""

from __future__ import annotations

import json
from pathlib import Path

from featx_edge.errors import ExportError
from featx_edge.files.atomic import atomic_path
from featx_edge.progress import native_output

OPSET = 17


def convert(model, *, size: int, metadata: dict):
    """Convert a Keras model to an ONNX ModelProto (input ``image``: float32 [N, size, size, 3])."""
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    import tf2onnx

    spec = (tf.TensorSpec([None, size, size, 3], tf.float32, name="image"),)
    try:
        with native_output("tf2onnx"):
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    except Exception as err:  # tf2onnx raises assorted errors for unsupported ops
        raise ExportError(f"ONNX conversion (tf2onnx, opset {OPSET}) failed: {type(err).__name__}: {err}") from err
    add_metadata(proto, metadata)
    return proto


def add_metadata(proto, metadata: dict) -> None:
    import onnx

    keep = [p for p in proto.metadata_props if p.key not in ("featx_edge", "labels")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.helper.set_model_props(proto, {
        **{p.key: p.value for p in keep},
        "featx_edge": json.dumps(metadata),
        "labels": "\n".join(metadata["labels"]),
    })


def save(proto, path: Path) -> Path:
    import onnx

    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path
