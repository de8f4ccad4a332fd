"""Training: model building, data loading, two-phase fine-tuning and evaluation.

Needs TensorFlow (``pip install 'edgeclf[train]'``). Names are imported on first use,
so ``import edgeclf.train.backbones`` (plain data) stays cheap for the CLI's help.

Example:
    >>> from edgeclf.train import TrainConfig, train
    >>> bundle = train(TrainConfig("digits", "runs/digits", image_size=75, weights=None))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageSet": "data", "LabelMap": "data", "from_arrays": "data", "load_dataset": "data",
    "evaluate_bundle": "evaluate", "build_model": "model", "TrainConfig": "trainer", "train": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgeclf.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgeclf.train.{_EXPORTS[name]}"), name)
