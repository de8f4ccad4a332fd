"""Which layers INT8 hurts: each compute node's share of the quantization error.

The FP32 ONNX and its QDQ INT8 version are run side by side on a few calibration images
with the inputs and output of every node INT8 runs exposed (convolutions, matrix
products, and the pools, concatenations and additions whose inputs it also quantizes:
keeping only the convolutions in FP32 left two images of 256 wrong on the main job's
model). At each such tensor the
noise-to-signal ratio ``||fp32 - int8||^2 / ||fp32||^2`` is measured; a node's *added*
error is its output's ratio minus its input's, so a deep layer is not blamed for the
error it inherits. Nodes that add the most are the ones worth keeping in FP32.

Written here rather than with ``onnxruntime.quantization.qdq_loss_debug``: that helper
keeps every float tensor of every run in memory, including each weight's dequantized
copy (about 90 MB per image for InceptionV3); only two tensors per node are needed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The nodes the quantizer runs in INT8 (ONNX Runtime's QDQ defaults that occur in these models).
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Add")


@dataclass(frozen=True)
class LayerError:
    node: str  # the FP32 graph's node name (what nodes_to_exclude takes)
    op: str
    companions: tuple[str, ...]  # nodes that go with it (the Relu the quantizer folds into a Conv)
    added_nsr: float  # noise-to-signal ratio its output adds to its input's
    output_sqnr_db: float  # signal-to-quantization-noise ratio at its output, dB

    def to_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "also": list(self.companions),
                "added_nsr": self.added_nsr, "output_sqnr_db": self.output_sqnr_db}


def _points(proto, skip: set[str]) -> list[tuple[object, tuple[str, ...], list[str], str]]:
    """(node, companions, input tensors, output tensor) for each quantized node of the FP32 graph.

    The quantizer removes a Relu that follows a quantized Conv and gives the Conv the
    Relu's output name, so the compared output is the Relu's and the Relu goes with it."""
    consumers = defaultdict(list)
    produced = {o for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)
    points = []
    for node in proto.graph.node:
        if node.op_type not in QUANTIZED_OPS or node.name in skip:
            continue
        output, companions = node.output[0], ()
        after = consumers.get(output, [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
            output, companions = after[0].output[0], (after[0].name,)
        inputs = [name for name in node.input if name in produced]  # activations, not weights
        points.append((node, companions, inputs, output))
    return points


def _session(proto, tensors: list[str]):
    """A CPU session of ``proto`` that also outputs ``tensors``; no graph optimisation, so the
    QDQ model runs as simulated quantization with every tensor name intact."""
    import onnx
    import onnxruntime as ort

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    present = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    existing = {o.name for o in proto.graph.output}
    for name in tensors:
        if name in present and name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, [o.name for o in session.get_outputs()]


def layer_errors(fp32_path: Path, int8_path: Path, images: np.ndarray, skip: set[str] = frozenset(),
                 batch_size: int = 4) -> list[LayerError]:
    """Every quantized node of the model, the one adding the most INT8 error first.

    Args:
        images: uint8 NHWC calibration images (never the tuning or held-out images candidates and
            the result are judged on).
        skip: nodes never quantized (the preprocessing), left out of the ranking.
    """
    import onnx

    fp32 = onnx.load(str(fp32_path))
    points = _points(fp32, set(skip))
    tensors = sorted({t for _, _, inputs, o in points for t in (*inputs, o)})
    int8 = onnx.load(str(int8_path))
    # What the INT8 graph's consumers see of a tensor is its dequantized copy: that includes the
    # activation's own rounding and the clamp of a Relu the quantizer folded into the range.
    produced = {o for n in int8.graph.node for o in n.output}
    seen = {t: f"{t}_DequantizeLinear_Output" if f"{t}_DequantizeLinear_Output" in produced else t for t in tensors}
    float_run, float_names = _session(fp32, tensors)
    int8_run, int8_names = _session(int8, list(seen.values()))
    signal: dict[str, float] = defaultdict(float)
    noise: dict[str, float] = defaultdict(float)
    for start in range(0, len(images), batch_size):
        feed = {"pixels": images[start:start + batch_size]}
        reference = dict(zip(float_names, float_run.run(None, feed), strict=True))
        quantized = dict(zip(int8_names, int8_run.run(None, feed), strict=True))
        for name in tensors:
            if name in reference and seen[name] in quantized and reference[name].dtype.kind == "f":
                f = reference[name].astype(np.float64)
                signal[name] += float(np.sum(f * f))
                noise[name] += float(np.sum((f - quantized[seen[name]]) ** 2))

    def nsr(*names: str) -> float:
        total = sum(signal.get(n, 0.0) for n in names)
        return sum(noise.get(n, 0.0) for n in names) / total if total else 0.0

    errors = [LayerError(node.name, node.op_type, companions, nsr(out) - nsr(*inputs),
                         float(10 * np.log10(1 / max(nsr(out), 1e-12))))
              for node, companions, inputs, out in points]
    return sorted(errors, key=lambda e: -e.added_nsr)
