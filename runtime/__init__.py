"""The device runtime: ``Predictor`` and its backends. Needs numpy, Pillow and one backend.

Nothing here imports TensorFlow. Names are imported on first use, so ``import
edgeclf.runtime`` costs nothing until a Predictor is made.

Example:
    >>> from edgeclf.runtime import Predictor, verify
    >>> verify("runs/demo/bundle").passed    # every artifact checked on this machine
    >>> Predictor.load("runs/demo/bundle").predict("digit.png").label
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Predictor": "predictor", "Prediction": "predictor", "BACKENDS": "backends",
            "BackendOptions": "backends", "doctor": "doctor", "verify": "verifier"}
__all__ = ["BACKENDS", "BackendOptions", "Prediction", "Predictor", "doctor", "verify"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgeclf.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgeclf.runtime.{_EXPORTS[name]}"), name)
