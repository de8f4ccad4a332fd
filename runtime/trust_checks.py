"""The checks of an artifact's familiarity output, beside its logits (export validation and ``verify``).

An artifact passes when its embedding gives the Keras model's familiarity decisions on the
verification images (INT8 and BF16 move the embedding as they move the logits), and when it
flags the plainly foreign frames of :mod:`edgeclf.probe` (uniform noise, constant frames).
numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeclf.probe import foreign_probe
from edgeclf.trust import DEFAULT_ALPHA, expected_calibration_error, p_values, scaled_probabilities
from edgeclf.trust_file import Trust

#: The least share of verification images whose familiarity decision must be the Keras model's.
MIN_DECISION_AGREEMENT = 0.99
#: The least share of each kind of probe frame that must be flagged unfamiliar.
MIN_FLAGGED = 0.99
#: Probe frames of each kind.
PROBE_FRAMES = 64


def trust_checks(predictor, trust: Trust, reference_images: np.ndarray, reference_logits: np.ndarray,
                 reference_index: np.ndarray, embedding: np.ndarray,
                 alpha: float = DEFAULT_ALPHA) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(checks, figures) of the artifact's ``embedding`` of the verification images and of the probe
    (``predictor`` embeds the probe's frames: :meth:`edgeclf.runtime.predictor.Predictor.embeddings`).

    The figures: the decision agreement, the share of each probe kind flagged, and the ECE (15 bins)
    of the artifact's calibrated probabilities on the verification images (the temperature was fitted
    on held-out images that include them: a check that the calibration carried over, not a measure
    of it on new images).
    """
    familiarity = trust.familiarity
    checks, figures = [], {}
    if len(trust.reference_scores) == len(reference_images):
        ours = familiarity.p_values(embedding) > alpha
        keras = p_values(trust.reference_scores, familiarity.calibration) > alpha
        agreement = float(np.mean(ours == keras))
        figures["familiarity_agreement"] = agreement
        figures["familiar_share"] = float(np.mean(ours))
        checks.append({"check": f"familiarity decisions = Keras' (p > {alpha:g})", "value": agreement,
                       "limit": MIN_DECISION_AGREEMENT, "passed": agreement >= MIN_DECISION_AGREEMENT})
    height, width = reference_images.shape[1:3]
    keras_flagged = trust.record.get("probe_flagged_by_keras") or {}
    for kind, frames in foreign_probe(height, width, PROBE_FRAMES).items():
        flagged = float(np.mean(familiarity.p_values(predictor.embeddings(frames)) <= alpha))
        figures[f"flagged {kind}"] = flagged
        check = {"check": f"{kind} flagged unfamiliar ({PROBE_FRAMES} frames)", "value": flagged,
                 "limit": MIN_FLAGGED, "passed": flagged >= MIN_FLAGGED}
        by_keras = keras_flagged.get(kind)
        if not check["passed"] and isinstance(by_keras, float) and by_keras < MIN_FLAGGED:
            # The model itself cannot tell these frames from its images: no artifact of it can.
            check.update(passed=True, waived=True, note=f"the Keras model flags only {by_keras:.0%} of them "
                                                        f"(export warned): a limit of the model, not the artifact")
        checks.append(check)
    figures["ece_15_bins_calibrated"] = expected_calibration_error(
        scaled_probabilities(reference_logits, trust.temperature), reference_index)
    return checks, figures
