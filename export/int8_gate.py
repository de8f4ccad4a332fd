"""The INT8 gate's margin: which images the Keras model has decided, derived from BF16.

An image is *decided* when its Keras top-1 minus top-2 logit margin is larger than a
change of arithmetic that nobody would call a different model can move it. The yardstick
is BF16 (the precision OpenVINO runs FP32 models in on AMX and AVX512_BF16 CPUs): the
FP32 ONNX is run by ONNX Runtime with every convolution's and matrix product's inputs and
weights rounded to BF16, as BF16 kernels take them, on tuning images from the training
side; the gate's margin is ``scale`` times the ``quantile`` of how much that closes each
image's gap between its top-1 and any other class (:func:`edgeclf.runtime.fidelity.margin_shift`).
Emulated, not run natively, so every machine derives the same threshold.

The margin is never below ``floor`` (1 logit by default). Logits are log-odds: below a margin
of 1 the model gives its runner-up more than a third of its answer's probability, undecided
whatever the arithmetic. BF16 alone is no yardstick of INT8 where the logits are small: on the
main job's model at 299 px, BF16 moved the top-1 margin by 0.10 (99th percentile, tuning
images) and the INT8 artifacts by 0.8 to 1.9, where at 75 px both were about 2. On a kept
pretrained case every INT8 disagreement had a margin of at most 0.44, and margins of 1 or more
agreed on every image (DESIGN.md section 10).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import InvalidInputError
from edgeclf.runtime.fidelity import margin_shift, margins

#: Operations whose inputs BF16 kernels take in BF16.
BF16_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class MarginRule:
    """How the decided margin is derived: ``scale`` x the ``quantile`` of the BF16 margin shift,
    at least ``floor`` logits; or a fixed ``margin`` in logits when one is given."""

    quantile: float = 0.99
    scale: float = 2.0
    margin: float | None = None
    floor: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile <= 1.0 or not (np.isfinite(self.scale) and self.scale > 0):
            raise InvalidInputError(f"the decided-margin rule needs 0 < quantile <= 1 and a finite scale > 0. "
                                    f"Received: quantile={self.quantile}, scale={self.scale}")
        if not (np.isfinite(self.floor) and self.floor >= 0):
            raise InvalidInputError(f"the decided margin's floor must be a finite number of logits >= 0. "
                                    f"Received: {self.floor}")
        if self.margin is not None and not (np.isfinite(self.margin) and self.margin >= 0):
            raise InvalidInputError(f"the decided margin must be a finite number of logits >= 0. "
                                    f"Received: {self.margin}")


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest BF16 (ties to even), kept as float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def bf16_emulation(proto):
    """A copy of the FP32 ONNX ``proto`` whose convolutions and matrix products take BF16 inputs and weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = model.graph
    weights = {init.name: i for i, init in enumerate(graph.initializer)}
    nodes = []
    for node in graph.node:
        if node.op_type in BF16_OPS:
            for slot, name in enumerate(node.input[:2]):  # data and weights; a bias stays FP32, as it does in BF16 kernels
                if name in weights:
                    init = graph.initializer[weights[name]]
                    if init.data_type == onnx.TensorProto.FLOAT:
                        init.CopyFrom(numpy_helper.from_array(round_to_bf16(numpy_helper.to_array(init)), name))
                elif name:
                    low, back = f"{node.name}.bf16_in{slot}", f"{node.name}.bf16_in{slot}.f32"
                    nodes.append(onnx.helper.make_node("Cast", [name], [low], to=onnx.TensorProto.BFLOAT16))
                    nodes.append(onnx.helper.make_node("Cast", [low], [back], to=onnx.TensorProto.FLOAT))
                    node.input[slot] = back
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def bf16_logits(src: Path, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The logits of the FP32 ONNX ``src`` on uint8 ``images`` under emulated BF16 arithmetic."""
    import onnx
    import onnxruntime as ort

    model = bf16_emulation(onnx.load(str(src)))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], {"pixels": images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def derive_margin(src: Path, images: np.ndarray, keras_logits: np.ndarray, rule: MarginRule) -> dict[str, Any]:
    """The decided margin for the model ``src``, derived on tuning ``images``, and how.

    Returns:
        The record: ``margin`` (logits), the rule, the BF16 figures it rests on and the share of
        the tuning images it counts as decided.
    """
    record: dict[str, Any] = {"quantile": rule.quantile, "scale": rule.scale, "floor": rule.floor,
                              "images": int(len(images))}
    if rule.margin is not None:
        margin = float(rule.margin)
        record["derived_from"] = "given (--int8-decided-margin)"
    else:
        moved = bf16_logits(src, images)
        shift = margin_shift(keras_logits, moved)
        flipped = int(np.sum(moved.argmax(axis=1) != np.asarray(keras_logits).argmax(axis=1)))
        from_bf16 = float(rule.scale * np.quantile(shift, rule.quantile))
        margin = max(from_bf16, rule.floor)
        record.update(from_bf16=from_bf16, floored=from_bf16 < rule.floor,
                      derived_from="BF16 emulated on ONNX Runtime (convolution and matrix-product inputs and "
                                   "weights rounded to BF16), on tuning images from the training side",
                      bf16_shift={"median": float(np.median(shift)), "quantile": float(np.quantile(shift, rule.quantile)),
                                  "max": float(shift.max())},
                      bf16_flipped=flipped)
    record["margin"] = margin
    record["decided_share"] = float(np.mean(margins(keras_logits) >= margin)) if len(images) else 0.0
    return record
