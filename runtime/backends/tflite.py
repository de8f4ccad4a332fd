"""LiteRT (TFLite) interpreter from ``ai-edge-litert``, the ARM devices' runtime."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import BundleError
from edgeclf.runtime.backends.base import BackendOptions
from edgeclf.runtime.hardware import detect
from edgeclf.runtime.metadata import read_tflite_metadata


class TFLiteBackend:
    name = "tflite"

    def __init__(self) -> None:
        self.runner = None
        self.metadata: dict[str, Any] = {}
        self.max_batch: int | None = None
        self.graph: dict[str, Any] = {}  # input shape, output names, classes: checked against metadata
        self._lock = threading.Lock()
        self._dequantize: dict[str, tuple[float, int]] = {}
        self._threads: int | None = None

    def load(self, path: Path, options: BackendOptions) -> None:
        from ai_edge_litert.interpreter import Interpreter

        # LiteRT's default (-1) gives XNNPACK no thread pool: one core. Use them all unless told.
        threads = options.threads or detect().cores
        try:
            self.metadata = read_tflite_metadata(path)
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.runner = interpreter.get_signature_runner("serving_default")
            inputs, outputs = self.runner.get_input_details(), self.runner.get_output_details()
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"LiteRT cannot load {path}: {exc}") from None
        self._threads = threads
        # A full-integer model gives INT8 logits (LiteRT's debugger quantizes the outputs too): they
        # are read back as (q - zero_point) * scale, or softmax, confidences and logit checks see
        # raw integers (max |logit diff| 41 where the real one is about 1 on the main job's model).
        self._dequantize = {name: (float(d["quantization"][0]), int(d["quantization"][1]))
                            for name, d in outputs.items()
                            if np.issubdtype(d["dtype"], np.integer) and d["quantization"][0] > 0}
        pixels = inputs.get("pixels", {}).get("shape")
        logits = outputs.get("logits", {}).get("shape")
        self.graph = {"input_shape": [int(d) for d in pixels] if pixels is not None else None,
                      "outputs": sorted(outputs), "classes": int(logits[-1]) if logits is not None else None}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)["logits"]

    def run(self, batch: np.ndarray, outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
        # An interpreter is not thread-safe: calls take turns.
        with self._lock:
            result = self.runner(pixels=batch)
        return {name: self._real(name, result[name]) for name in outputs}

    def _real(self, name: str, values: np.ndarray) -> np.ndarray:
        if name not in self._dequantize:
            return values
        scale, zero_point = self._dequantize[name]
        return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "delegate": "XNNPACK (CPU)", "threads": self._threads}

    def close(self) -> None:
        self.runner = None
