"""Validation of an exported artifact against the Keras model on held-out real images.

Each check prints as one line; all failures of an export are raised together as one
:class:`~edgeclf.errors.ValidationError`, in the manner of Hugging Face optimum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Acceptance limits for one precision.

    ``max|logit diff| <= atol + rtol * max|Keras logit|`` (skipped when ``rtol`` is
    None: INT8 logits differ by design), top-1 agreement with Keras of at least
    ``min_agreement``, and accuracy at most ``max_accuracy_drop`` below Keras's.
    """

    rtol: float | None
    atol: float
    min_agreement: float
    max_accuracy_drop: float


TOLERANCES = {
    "fp32": Tolerance(rtol=1e-4, atol=1e-3, min_agreement=0.99, max_accuracy_drop=0.005),
    "fp16": Tolerance(rtol=2e-2, atol=1e-2, min_agreement=0.98, max_accuracy_drop=0.01),
    "int8": Tolerance(rtol=None, atol=0.0, min_agreement=0.95, max_accuracy_drop=0.02),
}


def onnx_logits(path: Path, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits, label output) of an edgeclf ONNX model for uint8 images, with ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, labels = [], []
    for start in range(0, len(images), batch_size):
        out_logits, out_label = session.run(["logits", "label"], {"pixels": images[start:start + batch_size]})
        logits.append(out_logits)
        labels.append(out_label)
    return np.concatenate(logits), np.concatenate(labels)


def openvino_logits(path: Path, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits, label output) of an edgeclf OpenVINO IR, run on the CPU in FP32.

    FP32 is asked for explicitly: on CPUs with AMX OpenVINO would otherwise choose BF16.
    """
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits, labels = [], []
    for start in range(0, len(images), batch_size):
        result = compiled(images[start:start + batch_size])
        logits.append(result["logits"])
        labels.append(result["label"])
    return np.concatenate(logits), np.concatenate(labels)


def tflite_logits(path: Path, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits, label output) of an edgeclf ``.tflite`` model, with the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    logits, labels = [], []
    for start in range(0, len(images), batch_size):
        result = runner(pixels=images[start:start + batch_size])
        logits.append(result["logits"])
        labels.append(result["label"])
    return np.concatenate(logits), np.concatenate(labels)


def tensorrt_logits(path: Path, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits, label output) of an edgeclf TensorRT engine, on this machine's GPU."""
    from edgeclf.runtime.backends import BackendOptions
    from edgeclf.runtime.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend()
    backend.load(path, BackendOptions())
    try:
        step = min(batch_size, backend.max_batch)
        parts = [backend.run(images[i:i + step], ("logits", "label")) for i in range(0, len(images), step)]
    finally:
        backend.close()
    return np.concatenate([p["logits"] for p in parts]), np.concatenate([p["label"] for p in parts])


RUNNERS = {"onnxruntime": onnx_logits, "openvino": openvino_logits, "litert": tflite_logits,
           "tensorrt": tensorrt_logits}


def skip_reason(runtime: str) -> str | None:
    """Why an artifact for ``runtime`` cannot be run on this machine, or None if it can."""
    if runtime == "tensorrt":
        from edgeclf.gpu import local_compute_capability

        from edgeclf.runtime.backends import BACKENDS, missing_modules

        if local_compute_capability() is None:
            return ("no NVIDIA GPU here: the engine was built ahead of time from the validated FP16 ONNX; "
                    "its header lets the device refuse a mismatch, and exporting on a GPU machine validates it")
        missing = missing_modules(BACKENDS["tensorrt"])
        if missing:
            return f"running the engine needs {missing}: pip install 'edgeclf[gpu]'"
    if runtime not in RUNNERS:
        return f"no runner for {runtime} artifacts in this edgeclf version"
    return None


def compare(
    precision: str, logits: np.ndarray, label_out: np.ndarray, reference: np.ndarray,
    true_values: np.ndarray, labels: Sequence[int], tolerance: Tolerance | None = None,
) -> dict[str, Any]:
    """Compare an artifact's outputs with the Keras reference logits.

    Returns:
        A JSON-ready dict: the figures, the tolerance used, each check with its
        outcome, and ``passed``.
    """
    tol = tolerance or TOLERANCES[precision]
    table = np.asarray(labels, dtype=np.int64)
    predicted = table[logits.argmax(axis=1)]
    reference_predicted = table[reference.argmax(axis=1)]
    max_diff = float(np.max(np.abs(logits.astype(np.float64) - reference)))
    scale = float(np.max(np.abs(reference)))
    agreement = float(np.mean(predicted == reference_predicted))
    accuracy = float(np.mean(predicted == true_values))
    accuracy_keras = float(np.mean(reference_predicted == true_values))
    checks = []
    if tol.rtol is not None:
        limit = tol.atol + tol.rtol * scale
        checks.append({"check": "max |logit diff|", "value": max_diff, "limit": limit,
                       "passed": max_diff <= limit})
    checks.append({"check": "top-1 agreement", "value": agreement, "limit": tol.min_agreement,
                   "passed": agreement >= tol.min_agreement})
    checks.append({"check": "accuracy drop", "value": accuracy_keras - accuracy,
                   "limit": tol.max_accuracy_drop, "passed": accuracy_keras - accuracy <= tol.max_accuracy_drop})
    label_ok = bool(np.array_equal(label_out, predicted))
    checks.append({"check": "label output = labels[argmax(logits)]", "value": label_ok, "limit": True,
                   "passed": label_ok})
    return {
        "images": int(len(true_values)),
        "max_abs_logit_diff": max_diff,
        "max_abs_keras_logit": scale,
        "top1_agreement": agreement,
        "accuracy": accuracy,
        "accuracy_keras": accuracy_keras,
        "accuracy_delta": accuracy - accuracy_keras,
        "tolerance": asdict(tol),
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
    }


def format_check(artifact: str, check: dict[str, Any]) -> str:
    """One line per check, e.g. ``onnx-int8  top-1 agreement  0.9931 >= 0.95  ok``."""
    value, limit = check["value"], check["limit"]
    if isinstance(value, bool):
        shown = f"{value}"
    elif check["check"] == "max |logit diff|" or check["check"] == "accuracy drop":
        shown = f"{value:.4g} <= {limit:.4g}"
    else:
        shown = f"{value:.4f} >= {limit:.4g}"
    return f"  {artifact:<13} {check['check']:<40} {shown:<24} {'ok' if check['passed'] else 'FAILED'}"
