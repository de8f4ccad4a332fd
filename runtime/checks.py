"""The checks of an artifact against the Keras reference: export validation and ``verify``.

One code path for both: the artifact is loaded by the runtime's own Predictor (the same
backend, options and file checks it runs with on the device), run on the verification
set, and compared with the Keras logits stored beside it. Each check prints as one
line; export raises all its failures together as one ValidationError, in the manner of
Hugging Face optimum. Needs numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np

from edgeclf.runtime.backends.base import run_in_chunks
from edgeclf.decoding import median_indices, median_margins, probabilities_of
from edgeclf.runtime.fidelity import (clopper_pearson_lower, decided_agreement, images_to_show, margin_shift,
                                      margins, paired_accuracy_test)


@dataclass(frozen=True)
class Tolerance:
    """Acceptance limits for one precision.

    ``max|logit diff| <= atol + rtol * max|Keras logit|`` (skipped when ``rtol`` is
    None: INT8 logits differ by design), top-1 agreement with Keras of at least
    ``min_agreement``, and accuracy at most ``max_accuracy_drop`` below Keras's.

    The INT8 gate (:mod:`edgeclf.runtime.fidelity`) sets the last two: ``decided_margin``
    judges agreement only on images whose Keras top-1 minus top-2 logit margin reaches it,
    and ``paired_alpha`` fails the accuracy only when a paired exact test on the discordant
    images finds the drop significantly above ``max_accuracy_drop`` at that level.
    """

    rtol: float | None
    atol: float
    min_agreement: float
    max_accuracy_drop: float
    decided_margin: float | None = None
    paired_alpha: float | None = None


TOLERANCES = {
    "fp32": Tolerance(rtol=1e-4, atol=1e-3, min_agreement=0.99, max_accuracy_drop=0.005),
    "fp16": Tolerance(rtol=2e-2, atol=1e-2, min_agreement=0.98, max_accuracy_drop=0.01),
    "int8": Tolerance(rtol=None, atol=0.0, min_agreement=0.95, max_accuracy_drop=0.02),
    # BF16 keeps 8 bits of mantissa (FP16: 11), so logits move more; the answers must not.
    "bf16": Tolerance(rtol=5e-2, atol=5e-2, min_agreement=0.99, max_accuracy_drop=0.005),
}


def artifact_outputs(predictor, images: np.ndarray,
                     embedding: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(logits, label output, embedding or None) of a loaded Predictor's backend on uint8 ``images``
    (the embedding in Keras' space: :meth:`Predictor.aligned`).

    The backend call the Predictor makes, in its own batch size; the ``label`` output
    (the graph's own decoding) is read too, to check it against ``labels[argmax]``.
    """
    names = ("logits", "label", "embedding") if embedding else ("logits", "label")
    out = run_in_chunks(predictor.backend, images, predictor.batch_size, names)
    return out["logits"], out["label"], predictor.aligned(out["embedding"]) if embedding else None


def tolerance_for(precision: str, record: dict[str, Any] | None = None, hint: str | None = None) -> Tolerance:
    """The limits an entry is checked against: those export recorded for it (for a run-time
    precision ``hint``, under the artifact's ``run_time_tolerances``), else the defaults."""
    if hint is not None:
        recorded = ((record or {}).get("run_time_tolerances") or {}).get(hint)
    else:
        recorded = ((record or {}).get("validation") or {}).get("tolerance")
    known = {f.name for f in fields(Tolerance)}
    if isinstance(recorded, dict) and {"rtol", "atol", "min_agreement", "max_accuracy_drop"} <= set(recorded) <= known:
        return Tolerance(**recorded)
    quantization = (record or {}).get("quantization") or {}
    target, decided = quantization.get("target"), quantization.get("decided") or {}
    if hint is None and isinstance(target, dict) and "margin" in decided:  # an INT8 export not validated there
        try:
            return Tolerance(rtol=None, atol=0.0, min_agreement=float(target["min_agreement"]),
                             max_accuracy_drop=float(target["max_accuracy_drop"]),
                             decided_margin=float(decided["margin"]), paired_alpha=float(target["paired_alpha"]))
        except (KeyError, TypeError, ValueError):
            pass  # a record from another version: the defaults below
    return TOLERANCES[precision]


def compare(
    precision: str, logits: np.ndarray, label_out: np.ndarray, reference: np.ndarray,
    true_values: np.ndarray, labels: Sequence[int], tolerance: Tolerance | None = None,
    decoding: str = "argmax",
) -> dict[str, Any]:
    """Compare an artifact's outputs with the Keras reference logits.

    ``decoding`` "median" adds the answers decoded by median (:mod:`edgeclf.decoding`) to the
    checks: they must agree with Keras's median and keep its accuracy, within the same limits.

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
    agreeing = predicted == reference_predicted
    agreement = float(np.mean(agreeing))
    accuracy = float(np.mean(predicted == true_values))
    accuracy_keras = float(np.mean(reference_predicted == true_values))
    checks = []
    gate: dict[str, Any] = {}
    if tol.rtol is not None:
        limit = tol.atol + tol.rtol * scale
        checks.append({"check": "max |logit diff|", "value": max_diff, "limit": limit,
                       "passed": max_diff <= limit})
    if tol.decided_margin is None:
        checks.append({"check": "top-1 agreement", "value": agreement, "limit": tol.min_agreement,
                       "passed": agreement >= tol.min_agreement})
    else:
        gate["decided"] = decided_agreement(reference, logits.argmax(axis=1), tol.decided_margin)
        checks.append({"check": f"top-1 agreement, margin >= {tol.decided_margin:.3g} "
                                f"({gate['decided']['decided_images']} img)",
                       "value": gate["decided"]["agreement"], "limit": tol.min_agreement,
                       # No decided image shows nothing: that is a failure, not a pass.
                       "passed": gate["decided"]["decided_images"] > 0
                       and gate["decided"]["agreement"] >= tol.min_agreement})
    if tol.paired_alpha is None:
        checks.append({"check": "accuracy drop", "value": accuracy_keras - accuracy,
                       "limit": tol.max_accuracy_drop, "passed": accuracy_keras - accuracy <= tol.max_accuracy_drop})
    else:
        gate["paired"] = paired_accuracy_test(reference_predicted == true_values, predicted == true_values,
                                              tol.max_accuracy_drop, tol.paired_alpha)
        checks.append({"check": f"accuracy drop > {tol.max_accuracy_drop:g} (p-value)",
                       "value": gate["paired"]["p_value"], "limit": tol.paired_alpha,
                       "passed": not gate["paired"]["significant"]})
    label_ok = bool(np.array_equal(label_out, predicted))
    checks.append({"check": "label output = labels[argmax(logits)]", "value": label_ok, "limit": True,
                   "passed": label_ok})
    median: dict[str, Any] = {}
    if decoding != "argmax":
        median["median"], more = median_comparison(logits, reference, true_values, table, tol)
        checks += more
    return {
        "images": int(len(true_values)),
        "max_abs_logit_diff": max_diff,
        "max_abs_keras_logit": scale,
        "top1_agreement": agreement,
        # How far the artifact closes the top-1's gap to another class (99th percentile, logits):
        # a continuous measure of fidelity where agreement counts flips only.
        "margin_shift_q99": float(np.quantile(margin_shift(reference, logits), 0.99)) if len(logits) else 0.0,
        # What the images can show: the one-sided 95% lower bound of the all-image agreement.
        "top1_agreement_lower_95": clopper_pearson_lower(int(agreeing.sum()), int(len(agreeing))),
        "accuracy": accuracy,
        "accuracy_keras": accuracy_keras,
        "accuracy_delta": accuracy - accuracy_keras,
        **gate,
        **median,
        "tolerance": asdict(tol),
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
    }


def median_comparison(logits: np.ndarray, reference: np.ndarray, true_values: np.ndarray, table: np.ndarray,
                      tol: Tolerance) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The artifact's answers decoded by median against Keras's, on every image: (figures, checks).

    Agreement is judged against ``min_agreement`` as top-1 agreement is: on every image, or, under
    the INT8/BF16 gate, on the images whose Keras median is decided by at least ``decided_margin``
    (:func:`~edgeclf.decoding.median_margins`: the same logit units, the same guarantee). The
    accuracy is judged as the argmax accuracy is (a plain drop, or the paired test).
    """
    predicted = table[median_indices(probabilities_of(logits))]
    keras = table[median_indices(probabilities_of(reference))]
    agreeing = predicted == keras
    figures = {"agreement": float(np.mean(agreeing)),
               "agreement_lower_95": clopper_pearson_lower(int(agreeing.sum()), int(len(agreeing))),
               "accuracy": float(np.mean(predicted == true_values)),
               "accuracy_keras": float(np.mean(keras == true_values)),
               "mae": float(np.mean(np.abs(predicted - true_values))),
               "mae_keras": float(np.mean(np.abs(keras - true_values)))}
    if tol.decided_margin is None:
        checks = [{"check": "median agreement", "value": figures["agreement"], "limit": tol.min_agreement,
                   "passed": figures["agreement"] >= tol.min_agreement}]
    else:
        decided = median_margins(reference) >= tol.decided_margin
        figures["decided_images"] = int(decided.sum())
        figures["decided_agreement"] = float(np.mean(agreeing[decided])) if decided.any() else 0.0
        checks = [{"check": f"median agreement, margin >= {tol.decided_margin:.3g} ({figures['decided_images']} img)",
                   "value": figures["decided_agreement"], "limit": tol.min_agreement,
                   "passed": bool(decided.any()) and figures["decided_agreement"] >= tol.min_agreement}]
    drop = figures["accuracy_keras"] - figures["accuracy"]
    if tol.paired_alpha is None:
        checks.append({"check": "median accuracy drop", "value": drop, "limit": tol.max_accuracy_drop,
                       "passed": drop <= tol.max_accuracy_drop})
    else:
        paired = paired_accuracy_test(keras == true_values, predicted == true_values, tol.max_accuracy_drop,
                                      tol.paired_alpha)
        checks.append({"check": f"median accuracy drop > {tol.max_accuracy_drop:g} (p-value)",
                       "value": paired["p_value"], "limit": tol.paired_alpha, "passed": not paired["significant"]})
    return figures, checks


def measurable_check(tolerance: Tolerance, reference: np.ndarray, waive: bool = False) -> dict[str, Any]:
    """Whether the reference logits [N, K] are enough images to show the agreement target at all.

    The agreement check is judged on every image, or on the decided ones (Keras margin at least
    ``decided_margin``); if even all of those agreeing leaves the one-sided 95% Clopper-Pearson
    lower bound of agreement below ``min_agreement``, a pass would show nothing: 0.99 takes 299
    images (:func:`~edgeclf.runtime.fidelity.images_to_show`). ``waive`` keeps the check in the
    report without failing it (``verify --allow-small-set``).
    """
    if tolerance.decided_margin is None:
        judged, what = int(len(reference)), "img"
    else:
        judged, what = int((margins(reference) >= tolerance.decided_margin).sum()) if len(reference) else 0, \
            "decided img"
    needed = images_to_show(tolerance.min_agreement)
    shown = clopper_pearson_lower(judged, judged)
    enough = needed is not None and judged >= needed
    check = {"check": f"95% bound if all {judged} {what} agree (needs {needed if needed else 'infinitely many'})",
             "value": shown, "limit": tolerance.min_agreement, "passed": enough or waive,
             "images": judged, "images_needed": needed}
    if waive and not enough:
        check["waived"] = True
    return check


def format_check(artifact: str, check: dict[str, Any]) -> str:
    """One line per check, e.g. ``onnx-int8  top-1 agreement  0.9931 >= 0.95  ok``."""
    value, limit = check["value"], check["limit"]
    if isinstance(value, bool):
        shown = f"{value}"
    elif check["check"] in ("max |logit diff|", "accuracy drop") or check["check"].startswith("layers kept in FP32"):
        shown = f"{value:.4g} <= {limit:.4g}"
    else:
        shown = f"{value:.4f} >= {limit:.4g}"
    verdict = "waived" if check.get("waived") else "ok" if check["passed"] else "FAILED"
    return f"  {artifact:<13} {check['check']:<44} {shown:<24} {verdict}"
