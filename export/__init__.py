"""Export: ONNX FP32 (tf2onnx), FP16 and INT8, each validated against the Keras model.

Needs ``pip install 'edgeclf[export]'``. Names are imported on first use; the formats
themselves are plain data in :mod:`edgeclf.formats`.

Example:
    >>> from edgeclf.export import export_bundle
    >>> records = export_bundle("runs/digits", "onnx,onnx-int8")
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"ExportOptions": "exporter", "export_bundle": "exporter"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgeclf.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgeclf.export.{_EXPORTS[name]}"), name)
