"""The checks of an artifact against the Keras reference: export validation and ``verify``.

One code path for both: the artifact is loaded by the runtime's own Predictor (the same
backend, options and file checks it runs with on the device), run on the verification
set, and compared with the Keras logits stored beside it. Each check prints as one
line; export raises all its failures together as one ValidationError, in the manner of
Hugging Face optimum. Needs numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    # BF16 keeps 8 bits of mantissa (FP16: 11), so logits move more; the answers must not.
    "bf16": Tolerance(rtol=5e-2, atol=5e-2, min_agreement=0.99, max_accuracy_drop=0.005),
}


def artifact_outputs(predictor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, label output) of a loaded Predictor's backend on uint8 ``images``.

    The backend call the Predictor makes, in its own batch size; the ``label`` output
    (the graph's own decoding) is read too, to check it against ``labels[argmax]``.
    """
    step = predictor.batch_size
    parts = [predictor.backend.run(images[i:i + step], ("logits", "label")) for i in range(0, len(images), step)]
    return np.concatenate([p["logits"] for p in parts]), np.concatenate([p["label"] for p in parts])


def tolerance_for(precision: str, record: dict[str, Any] | None = None) -> Tolerance:
    """The limits an entry is checked against: those export recorded for it, else the defaults."""
    recorded = ((record or {}).get("validation") or {}).get("tolerance")
    if isinstance(recorded, dict) and set(recorded) == {"rtol", "atol", "min_agreement", "max_accuracy_drop"}:
        return Tolerance(**recorded)
    return TOLERANCES[precision]


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
