"""Multiply-accumulates per image, counted from the ONNX graph: the arithmetic floor.

Convolutions contribute H_out*W_out*C_out*(C_in/groups)*k_h*k_w, matrix products K*N per
row. Dividing by what the CPU can do per second gives the fastest any backend could be.
"""

from __future__ import annotations

from pathlib import Path


def count_macs(onnx_path: str | Path) -> int:
    """MACs for one image of the model in ``onnx_path`` (batch dimension taken as 1)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    shapes = {}
    for info in [*graph.value_info, *graph.output, *graph.input]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    weights = {init.name: numpy_helper.to_array(init).shape for init in graph.initializer}
    macs = 0
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1] in weights and node.output[0] in shapes:
            c_out, c_in_per_group, *kernel = weights[node.input[1]]
            spatial = 1
            for d in shapes[node.output[0]][2:]:
                spatial *= d
            k = 1
            for d in kernel:
                k *= d
            macs += spatial * c_out * c_in_per_group * k
        elif node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
            rows, cols = weights[node.input[1]][-2:]
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            macs += rows * cols if not transposed else cols * rows
    return macs
