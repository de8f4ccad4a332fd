"""Keras -> ONNX FP32 with tf2onnx, preprocessing and integer decoding inside the graph.

The graph takes ``pixels`` (uint8 [N, H, W, 3], RGB) and returns ``logits`` (float32
[N, K]), ``label`` (int64 [N], ``labels[argmax(logits)]``), so a consumer without
Python still gets the integer, and ``embedding`` (float32 [N, D], the pooled features the
head reads) for the familiarity check (see :mod:`edgeclf.export.serving`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from edgeclf.bundle import Bundle
from edgeclf.errors import ConversionError
from edgeclf.fsio import atomic_path
from edgeclf.export.metadata import artifact_metadata, set_onnx_metadata
from edgeclf.export.serving import OUTPUT_ORDER, serving_function

DEFAULT_OPSET = 17


def _patch_tf2onnx() -> None:
    """tf2onnx 1.17 predates numpy 2; Keras ships the patch it uses for its own export."""
    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx
    except ImportError:  # a Keras without it: a tf2onnx new enough not to need it
        return
    patch_tf2onnx()


def preprocessing_nodes(proto) -> list[str]:
    """Names of the nodes between the uint8 input and the first convolution.

    They cast and scale raw pixels; FP16 conversion and INT8 quantization leave them in
    FP32 (a Mul of an FP32 tensor by an FP16 constant is rejected by TensorRT and
    OpenVINO, and quantizing the 0..255 -> -1..1 scaling gains nothing).
    """
    names = []
    for node in proto.graph.node:  # tf2onnx writes nodes in topological order
        if node.op_type == "Conv":
            break
        names.append(node.name)
    return names


def _separate_outputs(proto) -> None:
    """Give each graph output that other nodes also read (the embedding, where it is the head's
    input) an Identity of its own. onnxconverter-common's FP16 conversion with ``keep_io_types``
    otherwise leaves those readers an FP32 tensor beside FP16 weights (a MatMul that ONNX Runtime
    and TensorRT reject)."""
    from onnx import helper

    read = {name for node in proto.graph.node for name in node.input}
    for output in proto.graph.output:
        if output.name not in read:
            continue
        inner = f"{output.name}__inner"
        for node in proto.graph.node:
            node.output[:] = [inner if n == output.name else n for n in node.output]
            node.input[:] = [inner if n == output.name else n for n in node.input]
        proto.graph.node.append(helper.make_node("Identity", [inner], [output.name], name=f"{output.name}__output"))


def keras_to_onnx(model, bundle: Bundle, out: Path, opset: int = DEFAULT_OPSET) -> None:
    """Convert the bundle's Keras ``model`` to ``out`` (written atomically).

    Raises:
        ConversionError: tf2onnx failed; the message carries its error.
    """
    import onnx
    import tensorflow as tf
    import tf2onnx

    labels = list(bundle.labels)
    fn, spec = serving_function(model, bundle)
    serve = tf.function(fn, input_signature=[spec])

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the patch and tf2onnx touch np.object
            _patch_tf2onnx()
            proto, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=opset)
    except Exception as exc:  # tf2onnx raises many types; the user needs its message
        raise ConversionError(f"tf2onnx could not convert the model (opset {opset}): {exc}") from exc
    outputs = {o.name: o for o in proto.graph.output}
    if set(outputs) != set(OUTPUT_ORDER):
        raise ConversionError(f"converted graph has outputs {sorted(outputs)}; expected {list(OUTPUT_ORDER)}")
    ordered = [outputs[name] for name in OUTPUT_ORDER]
    del proto.graph.output[:]
    proto.graph.output.extend(ordered)
    _separate_outputs(proto)
    proto.doc_string = f"edgeclf integer classifier ({bundle.meta['backbone']['name']}), labels {labels}"
    set_onnx_metadata(proto, artifact_metadata(bundle, "fp32"))
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"tf2onnx produced an invalid graph (opset {opset}): {exc}") from None
    with atomic_path(out, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
