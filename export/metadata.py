"""What every exported artifact says about itself (ONNX ``metadata_props``).

A lone ``model.onnx`` copied to a device carries its labels, input spec and
preprocessing, so it can be run and decoded without the bundle.
"""

from __future__ import annotations

import json
from typing import Any

import edgeclf
from edgeclf.bundle import Bundle
from edgeclf.runtime.metadata import read_onnx_metadata  # noqa: F401  (re-exported for export)

ARTIFACT_FORMAT = "edgeclf-artifact/1"


def artifact_input_spec(bundle: Bundle) -> dict[str, Any]:
    """The input of every exported graph: uint8 NHWC RGB pixels, as a camera gives them."""
    height, width = bundle.image_size
    return {"name": "pixels", "height": height, "width": width, "channels": 3, "color": "RGB",
            "layout": "NHWC", "dtype": "uint8", "batch": "dynamic"}


def artifact_metadata(bundle: Bundle, precision: str) -> dict[str, Any]:
    """The self-description embedded in an artifact (values JSON-serialisable)."""
    pre = bundle.meta["preprocessing"]
    return {
        "format": ARTIFACT_FORMAT,
        "edgeclf_version": edgeclf.__version__,
        "labels": bundle.labels,
        "input": artifact_input_spec(bundle),
        "outputs": {"logits": "float32 [N, K]", "label": "int64 [N] = labels[argmax(logits)]",
                    "embedding": "float32 [N, D], the pooled features the head reads"},
        "preprocessing": {"inside_graph": True,
                          "steps": f"cast uint8 -> float32, then {pre['in_graph']}",
                          "decode": pre.get("decode")},
        "backbone": bundle.meta["backbone"]["name"],
        "precision": precision,
        "source_model_sha256": bundle.meta["model"]["sha256"],
    }


def set_onnx_metadata(model, meta: dict[str, Any]) -> None:
    """Write ``meta`` into an ``onnx.ModelProto`` as ``edgeclf.<key>`` = JSON text."""
    keep = [p for p in model.metadata_props if not p.key.startswith("edgeclf.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key = f"edgeclf.{key}"
        prop.value = json.dumps(value)
