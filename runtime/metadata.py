"""Reading the self-description every edgeclf artifact carries (no TensorFlow).

ONNX: ``metadata_props`` entries ``edgeclf.<key>`` = JSON; OpenVINO IR: ``rt_info``
under ``edgeclf``; TFLite: a JSON entry ``edgeclf`` in the flatbuffer's metadata table;
TensorRT engine: the JSON header of :mod:`edgeclf.engine_file`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgeclf.errors import BundleError
from edgeclf.fsio import parse_json
from edgeclf.limits import is_int

TFLITE_METADATA_NAME = "edgeclf"


def _json(text: str | bytes, where: str) -> Any:
    try:
        return parse_json(text, "edgeclf metadata")
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from None


def read_onnx_metadata(model) -> dict[str, Any]:
    """The ``edgeclf.*`` entries of an ``onnx.ModelProto`` or an ONNX Runtime ``ModelMetadata``."""
    props = getattr(model, "custom_metadata_map", None)
    if props is None:
        props = {p.key: p.value for p in model.metadata_props}
    return {k[len("edgeclf."):]: _json(v, f"ONNX metadata {k}") for k, v in props.items() if k.startswith("edgeclf.")}


def read_openvino_metadata(model) -> dict[str, Any]:
    """The ``edgeclf`` entries of an OpenVINO model's rt_info (an ``ov.Model`` or an IR path)."""
    if isinstance(model, (str, Path)):
        import openvino as ov

        model = ov.Core().read_model(str(model))
    if not model.has_rt_info(["edgeclf"]):
        return {}
    keys = list(model.get_rt_info()["edgeclf"].keys())
    return {key: _json(model.get_rt_info(["edgeclf", key]).astype(str), f"OpenVINO rt_info edgeclf.{key}")
            for key in keys}


def read_tflite_metadata(path: str | Path) -> dict[str, Any]:
    """The ``edgeclf`` metadata of a ``.tflite`` file ({} if it has none)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == TFLITE_METADATA_NAME.encode():
            meta = _json(bytes(model.Buffers(entry.Buffer()).DataAsNumpy()), "TFLite metadata edgeclf")
            if not isinstance(meta, dict):
                raise BundleError(f"{path}: TFLite metadata edgeclf must be a JSON object. Received: {type(meta).__name__}")
            return meta
    return {}


def check_model_path(path: Path) -> None:
    """A model path that exists, with a clear error for a missing one and for a symlink loop.

    Raises:
        BundleError: nothing at ``path``, or a symlink loop.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        raise BundleError(f"model not found: expected a bundle directory or an artifact file. Received: {path}") from None
    except OSError as exc:  # ELOOP, ENAMETOOLONG, EACCES
        raise BundleError(f"cannot open model {path}: {exc.strerror or exc}") from None


def check_artifact_metadata(runner, path: Path) -> tuple[list[int], tuple[int, int]]:
    """The labels and (height, width) an artifact describes itself with, checked against its graph.

    Raises:
        BundleError: metadata missing or malformed (labels not a list of distinct integers, an
            input size that is not positive integers), or disagreeing with the loaded model
            (another input size, another number of logits, no ``logits`` output).
    """
    meta = runner.metadata
    if not isinstance(meta, dict) or "labels" not in meta or "input" not in meta:
        raise BundleError(f"{path.name} carries no edgeclf metadata (labels, input size); was it exported by edgeclf?")
    labels, spec = meta["labels"], meta["input"]
    if (not isinstance(labels, list) or len(labels) < 2 or len(set(map(repr, labels))) != len(labels)
            or not all(is_int(v) for v in labels)):
        raise BundleError(f"{path.name}: edgeclf metadata 'labels' must be a list of at least two distinct "
                          f"integers. Received: {str(labels)[:80]}")
    if not isinstance(spec, dict) or not all(is_int(spec.get(k)) and spec[k] > 0 for k in ("height", "width")):
        raise BundleError(f"{path.name}: edgeclf metadata 'input' must give positive integer height and width. "
                          f"Received: {str(spec)[:80]}")
    size = (spec["height"], spec["width"])
    graph = getattr(runner, "graph", None) or {}
    if "outputs" in graph and "logits" not in graph["outputs"]:
        raise BundleError(f"{path.name} has no 'logits' output (outputs: {graph['outputs']}); "
                          f"edgeclf artifacts answer logits [N, classes]")
    shape = graph.get("input_shape")
    if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:3]) \
            and tuple(shape[1:3]) != size:
        raise BundleError(f"{path.name}: its metadata says input {size[0]}x{size[1]}, but the model takes "
                          f"{shape[1]}x{shape[2]}")
    classes = graph.get("classes")
    if isinstance(classes, int) and classes != len(labels):
        raise BundleError(f"{path.name}: its metadata names {len(labels)} labels, but the model has {classes} "
                          f"logits; each logit needs exactly one label")
    return list(labels), size
