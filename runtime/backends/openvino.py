"""OpenVINO on the CPU: FP32 or INT8 IRs, and BF16 at run time on AMX or AVX512_BF16 CPUs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import BundleError, InvalidInputError
from edgeclf.runtime.backends.base import BackendOptions
from edgeclf.runtime.metadata import read_openvino_metadata

_HINTS = {None: "f32", "fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVINOBackend:
    name = "openvino"

    def __init__(self) -> None:
        self.compiled = None
        self.metadata: dict[str, Any] = {}
        self.max_batch: int | None = None
        self.graph: dict[str, Any] = {}  # input shape, output names, classes: checked against metadata
        self._local = threading.local()
        self._config: dict[str, Any] = {}

    def load(self, path: Path, options: BackendOptions) -> None:
        import openvino as ov

        if options.precision not in _HINTS:
            raise InvalidInputError(f"OpenVINO precision hint must be one of fp32, bf16, int8. "
                                    f"Received: {options.precision!r}")
        core = ov.Core()
        try:
            model = core.read_model(str(path), str(options.weights)) if options.weights else \
                core.read_model(str(path))
        except Exception as exc:
            raise BundleError(f"OpenVINO cannot read {path}: {exc}") from None
        self.metadata = read_openvino_metadata(model)
        names = sorted(name for out in model.outputs for name in out.get_names())
        logits = next((out.get_partial_shape() for out in model.outputs if "logits" in out.get_names()), None)
        shape = model.inputs[0].get_partial_shape()
        self.graph = {"input_shape": [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static
                      else None, "outputs": names,
                      "classes": logits[-1].get_length() if logits is not None and logits[-1].is_static else None}
        # INT8 IRs carry their precision in the graph; the hint sets what the rest runs in.
        # f32 by default: on AMX and AVX512_BF16 CPUs OpenVINO would otherwise pick BF16 unasked.
        self._config = {"INFERENCE_PRECISION_HINT": _HINTS[options.precision], "PERFORMANCE_HINT": "LATENCY"}
        if options.threads:
            self._config["INFERENCE_NUM_THREADS"] = options.threads
        self.compiled = core.compile_model(model, "CPU", self._config)

    def _request(self):
        # An InferRequest serves one call at a time: one per thread makes infer thread-safe.
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def infer(self, batch: np.ndarray) -> np.ndarray:
        request = self._request()
        request.infer({0: batch})
        return request.get_tensor("logits").data.copy()  # the request's buffer is reused next call

    def run(self, batch: np.ndarray, outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
        request = self._request()
        request.infer({0: batch})
        return {name: request.get_tensor(name).data.copy() for name in outputs}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": "CPU", **{k.lower(): v for k, v in self._config.items()}}

    def close(self) -> None:
        self.compiled = None
        self._local = threading.local()
