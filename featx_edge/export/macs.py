"""Multiply-accumulates of an ONNX or TFLite graph, per node, and how much of that work runs in int8.

Used by ``bench`` (``count_macs``: a model's MACs per image, for the achieved GMAC/s) and by
``verify`` (an ``onnx-int8`` artifact must really be quantized: QDQ pairs around its convolutions,
the share of MACs whose inputs are int8).

ONNX: ``Conv`` counts output elements x input channels per group x kernel area; ``Gemm``/``MatMul``
output elements x the reduced dimension; shapes from ONNX shape inference, the leading batch
dimension excluded. TFLite: ``CONV_2D``, ``DEPTHWISE_CONV_2D``, ``FULLY_CONNECTED`` and
``BATCH_MATMUL`` from the interpreter's tensor shapes. Other ops (adds, pooling, activations) are
not counted.
"""

from __future__ import annotations

from pathlib import Path

from featx_edge.formats.registry import get_format, mac_count_formats

_COUNTED = ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")
_INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm")


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _node_macs(graph) -> list[tuple[object, int | None]]:
    """(node, MACs per image or None when a shape is unknown) for every Conv/Gemm/MatMul-like node."""
    shapes: dict[str, list[int | None]] = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)

    def known(shape, *, skip_batch: bool) -> bool:
        return shape is not None and all(d is not None for d in (shape[1:] if skip_batch else shape))

    out = []
    for node in graph.node:
        if node.op_type not in _COUNTED:
            continue
        # QLinear ops carry (x, x_scale, x_zero, w, ...): the weight is input 3.
        w_index = 3 if node.op_type.startswith("QLinear") else 1
        x = shapes.get(node.input[0])
        w = shapes.get(node.input[w_index]) if len(node.input) > w_index else None
        y = shapes.get(node.output[0])
        macs = None
        if "Conv" in node.op_type and known(w, skip_batch=False) and known(y, skip_batch=True):
            macs = _prod(y[1:]) * _prod(w[1:])  # M*oH*oW * (C/group)*kH*kW
        elif "Conv" not in node.op_type and known(y, skip_batch=True) and x and x[-1] is not None:
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            reduced = x[0] if trans_a else x[-1]
            if reduced is not None:
                macs = _prod(y[1:]) * int(reduced)
        out.append((node, macs))
    return out


def _load_inferred(path: str | Path):
    import onnx
    from onnx import shape_inference

    return shape_inference.infer_shapes(onnx.load(str(path)))


def count_macs_onnx(path: str | Path) -> dict:
    """Multiply-accumulates per image of an ONNX graph (Conv, Gemm, MatMul), via shape inference.

    Returns:
        ``macs_per_image``, ``ops`` (MACs per op type) and ``uncounted`` (nodes of those types
        whose shapes were unknown).
    """
    ops: dict[str, int] = {}
    uncounted = 0
    for node, macs in _node_macs(_load_inferred(path).graph):
        if macs is None:
            uncounted += 1
            continue
        ops[node.op_type] = ops.get(node.op_type, 0) + macs
    return {"macs_per_image": int(sum(ops.values())), "ops": ops, "uncounted": uncounted}


def count_macs_tflite(path: str | Path) -> dict:
    """Multiply-accumulates per image of a TFLite graph (convolutions and fully connected layers).

    Returns:
        ``macs_per_image``, ``ops`` (MACs per op name) and ``uncounted``.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from featx_edge.runtime.metadata import read_tflite

    flatbuffer, _ = read_tflite(Path(path))
    interpreter = Interpreter(model_content=flatbuffer,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {d["index"]: list(d["shape"]) for d in interpreter.get_tensor_details()}
    ops: dict[str, int] = {}
    uncounted = 0
    for op in interpreter._get_ops_details():
        name = op["op_name"]
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"):
            continue
        inputs = [int(i) for i in op["inputs"]]
        x, w = tensors.get(inputs[0]), tensors.get(inputs[1])
        y = tensors.get(int(op["outputs"][0]))
        if not x or not w or not y:
            uncounted += 1
            continue
        if name == "CONV_2D":  # weights [O, kH, kW, I]
            macs = _prod(y[1:]) * _prod(w[1:])
        elif name == "DEPTHWISE_CONV_2D":  # weights [1, kH, kW, C*multiplier]
            macs = _prod(y[1:]) * _prod(w[1:3])
        elif name == "FULLY_CONNECTED":  # weights [O, I]
            macs = _prod(y[1:]) * int(w[-1])
        else:
            macs = _prod(y[1:]) * int(x[-1])
        ops[name] = ops.get(name, 0) + macs
    return {"macs_per_image": int(sum(ops.values())), "ops": ops, "uncounted": uncounted}


def count_macs(run: Path, artifacts: dict) -> dict:
    """The model's MACs per image, counted once: ONNX float32 graph first, else a TFLite graph.

    Args:
        run: the run directory.
        artifacts: the manifest's ``artifacts`` (format -> entry with the ``path`` under ``run``).

    Returns:
        ``count_macs_onnx``/``count_macs_tflite``'s result plus ``source`` (the format counted),
        ``method``, ``note`` and ``gmacs_per_image``; ``macs_per_image`` None (with the reasons in
        ``note``) when no artifact could be counted.
    """
    attempts = []
    for fmt in mac_count_formats():
        if fmt not in artifacts:
            continue
        onnx = get_format(fmt).engine == "onnxruntime"
        counter = count_macs_onnx if onnx else count_macs_tflite
        try:
            result = counter(run / artifacts[fmt]["path"])
        except Exception as err:  # noqa: BLE001 - a missing `onnx` package or an odd graph: try the next
            attempts.append(f"{fmt}: {type(err).__name__}: {err}")
            continue
        method = ("ONNX graph with shape inference: Conv, Gemm, MatMul" if onnx
                  else "TFLite graph: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL")
        note = "element-wise ops, pooling and activations are not counted"
        if result["uncounted"]:
            note += f"; {result['uncounted']} node(s) had unknown shapes and were left out"
        return dict(result, source=fmt, method=method, note=note,
                    gmacs_per_image=result["macs_per_image"] / 1e9)
    return {"macs_per_image": None, "ops": {}, "source": None, "method": None,
            "note": "no artifact could be counted (" + ("; ".join(attempts) or "no onnx-float32 or tflite artifact")
                    + "); GMAC/s columns are empty"}


def onnx_quantization_report(path: str | Path) -> dict:
    """How much of an ONNX model's arithmetic is int8.

    A Conv/Gemm/MatMul counts as int8 when both its data input and its weight come out of a
    ``DequantizeLinear`` (the QDQ form onnxruntime fuses into integer kernels), or when it is
    an integer op itself (``QLinearConv``, ``ConvInteger``...).

    Returns:
        ``quantize_nodes`` / ``dequantize_nodes`` (counts), ``integer_ops`` (count),
        ``int8_macs`` and ``macs`` per image, ``int8_mac_share`` (None when nothing was
        counted), ``float_nodes`` (names of counted nodes left in float, first 10).
    """
    graph = _load_inferred(path).graph
    produced_by = {out: node for node in graph.node for out in node.output}

    def dequantized(name: str) -> bool:
        node = produced_by.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    total = int8 = 0
    float_nodes = []
    for node, macs in _node_macs(graph):
        macs = macs or 0
        total += macs
        if node.op_type in _INTEGER_OPS or (len(node.input) > 1 and dequantized(node.input[0])
                                            and dequantized(node.input[1])):
            int8 += macs
        else:
            float_nodes.append(node.name or node.op_type)
    op_types = [node.op_type for node in graph.node]
    return {
        "quantize_nodes": op_types.count("QuantizeLinear"),
        "dequantize_nodes": op_types.count("DequantizeLinear"),
        "integer_ops": sum(op_types.count(op) for op in _INTEGER_OPS),
        "macs": total,
        "int8_macs": int8,
        "int8_mac_share": (int8 / total) if total else None,
        "float_nodes": float_nodes[:10],
    }
