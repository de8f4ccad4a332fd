"""Reading the self-description every edgeclf artifact carries (no TensorFlow).

ONNX: ``metadata_props`` entries ``edgeclf.<key>`` = JSON; OpenVINO IR: ``rt_info``
under ``edgeclf``; TFLite: a JSON entry ``edgeclf`` in the flatbuffer's metadata table;
TensorRT engine: the JSON header of :mod:`edgeclf.engine_file`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TFLITE_METADATA_NAME = "edgeclf"


def read_onnx_metadata(model) -> dict[str, Any]:
    """The ``edgeclf.*`` entries of an ``onnx.ModelProto`` or an ONNX Runtime ``ModelMetadata``."""
    props = getattr(model, "custom_metadata_map", None)
    if props is None:
        props = {p.key: p.value for p in model.metadata_props}
    return {k[len("edgeclf."):]: json.loads(v) for k, v in props.items() if k.startswith("edgeclf.")}


def read_openvino_metadata(model) -> dict[str, Any]:
    """The ``edgeclf`` entries of an OpenVINO model's rt_info (an ``ov.Model`` or an IR path)."""
    if isinstance(model, (str, Path)):
        import openvino as ov

        model = ov.Core().read_model(str(model))
    if not model.has_rt_info(["edgeclf"]):
        return {}
    keys = list(model.get_rt_info()["edgeclf"].keys())
    return {key: json.loads(model.get_rt_info(["edgeclf", key]).astype(str)) for key in keys}


def read_tflite_metadata(path: str | Path) -> dict[str, Any]:
    """The ``edgeclf`` metadata of a ``.tflite`` file ({} if it has none)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == TFLITE_METADATA_NAME.encode():
            return json.loads(bytes(model.Buffers(entry.Buffer()).DataAsNumpy()).decode("utf-8"))
    return {}
