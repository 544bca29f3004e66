"""Multiply-accumulates of an ONNX graph, per node, and how much of that work runs in int8.

Used by ``bench`` (achieved GMAC/s) and by ``verify`` (an ``onnx-int8`` artifact must really be
quantized: QDQ pairs around its convolutions, the share of MACs whose inputs are int8).
"""

from __future__ import annotations

from pathlib import Path

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
