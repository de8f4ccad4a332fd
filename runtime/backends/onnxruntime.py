"""ONNX Runtime: CPU everywhere; CUDA and TensorRT execution providers with onnxruntime-gpu."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import BundleError
from edgeclf.runtime.backends.base import BackendOptions
from edgeclf.runtime.metadata import read_onnx_metadata

#: Preferred order where installed; CPU is always there.
_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self) -> None:
        self.session = None
        self.metadata: dict[str, Any] = {}
        self.max_batch: int | None = None
        self.graph: dict[str, Any] = {}  # input shape, output names, classes: checked against metadata
        self._options = BackendOptions()

    def load(self, path: Path, options: BackendOptions) -> None:
        import onnxruntime as ort

        self._options = options
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.threads:
            so.intra_op_num_threads = options.threads
        so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
        available = ort.get_available_providers()
        providers = list(options.providers or [p for p in _PROVIDER_ORDER if p in available])
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/...
            raise BundleError(f"onnxruntime cannot load {path}: {exc}") from None
        self.metadata = read_onnx_metadata(self.session.get_modelmeta())
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        logits = outputs.get("logits") or [None]
        self.graph = {"input_shape": self.session.get_inputs()[0].shape, "outputs": sorted(outputs),
                      "classes": logits[-1]}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        # InferenceSession.run is thread-safe; only the logits are fetched (decoding is numpy's).
        return self.session.run(["logits"], {"pixels": batch})[0]

    def run(self, batch: np.ndarray, outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.session.run(list(outputs), {"pixels": batch}), strict=True))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": self.session.get_providers() if self.session else [],
                "threads": self._options.threads or "default (all cores)"}

    def close(self) -> None:
        self.session = None
