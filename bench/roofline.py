"""What one image costs the encoder, read off its ONNX graph: FLOPs (multiply-adds x 2 of every Conv, Gemm
and MatMul, from shapes given by onnx shape inference at batch 1) and bytes moved under a simple per-layer
model (every node reads its inputs and writes its outputs once, float32; weights read once per batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BYTES = {1: 4, 10: 2, 11: 8, 7: 8, 6: 4, 3: 1, 2: 1, 9: 1}  # onnx TensorProto elem types -> bytes


def _fixed_batch(model, batch: int = 1):
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim
        if dim and not dim[0].HasField("dim_value"):
            dim[0].dim_value = batch
    return onnx.shape_inference.infer_shapes(model)


def _shapes(model) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes per element) of every value and initializer whose shape is known."""
    out = {}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if None not in dims:
            out[value.name] = (tuple(dims), BYTES.get(t.elem_type, 4))
    for init in model.graph.initializer:
        out[init.name] = (tuple(init.dims), BYTES.get(init.data_type, 4))
    return out


def _macs(node, shapes) -> int:
    def shape(name):
        return shapes.get(name, (None,))[0]

    if node.op_type == "Conv":
        w, y = shape(node.input[1]), shape(node.output[0])
        if w is None or y is None:
            return 0
        return int(np.prod(y)) * int(np.prod(w[1:]))  # each output: C/groups * kh * kw multiply-adds
    if node.op_type in ("Gemm", "MatMul"):
        a, y = shape(node.input[0]), shape(node.output[0])
        if a is None or y is None:
            return 0
        trans_a = any(att.name == "transA" and att.i for att in node.attribute)
        k = a[-2] if trans_a and len(a) >= 2 else a[-1]
        return int(np.prod(y)) * int(k)
    return 0


def encoder_cost(onnx_path: str | Path) -> dict:
    """Per image: ``flops``; ``weight_bytes`` (initializers, read once per batch); ``activation_bytes``
    (inputs and outputs of every node that are not weights); ``bytes_at_batch(b)`` is then
    weight_bytes / b + activation_bytes. Also the FLOPs by op type."""
    import onnx

    model = _fixed_batch(onnx.load(str(onnx_path)), 1)
    shapes = _shapes(model)
    weights = {init.name for init in model.graph.initializer}
    by_op: dict[str, int] = {}
    activation = 0
    for node in model.graph.node:
        by_op[node.op_type] = by_op.get(node.op_type, 0) + 2 * _macs(node, shapes)
        for name in list(node.input) + list(node.output):
            if name and name not in weights and name in shapes:
                dims, size = shapes[name]
                activation += int(np.prod(dims)) * size
    weight_bytes = sum(int(np.prod(shapes[n][0])) * shapes[n][1] for n in weights)
    flops = sum(by_op.values())
    return {"flops": flops, "gflops": flops / 1e9, "weight_bytes": weight_bytes,
            "activation_bytes": activation, "flops_by_op": {k: v for k, v in by_op.items() if v},
            "nodes": len(model.graph.node)}


def bytes_at_batch(cost: dict, batch: int) -> float:
    return cost["weight_bytes"] / batch + cost["activation_bytes"]
