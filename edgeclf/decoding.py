"""From class probabilities to one class: argmax, or the median of the ordered integers.

The labels are ordered integers, so a prediction's cost grows with its distance from the
truth. Argmax picks the most probable class, which minimises the error *rate*; the median
of the predicted distribution over the ordered labels minimises the expected *absolute*
error: it is the first class whose cumulative probability, counted from the smallest
label, reaches one half. On a tie (the cumulative probability is exactly one half at a
class) every value between that label and the next minimises it equally; the lower one is
taken, so decoding stays deterministic.

Labels are sorted (``LabelMap``: index ``i`` is ``labels[i]`` and ``labels`` ascends), so
the class order is the order of the integers. numpy only: training's evaluation and the
device runtime decode alike.
"""

from __future__ import annotations

import numpy as np

from edgeclf.errors import InvalidInputError

#: The decodings a Predictor, ``predict``, ``evaluate`` and ``verify`` take (``--decode``).
DECODINGS = ("argmax", "median")
#: Cumulative sums of probabilities that should reach 0.5 exactly may fall short by rounding.
_HALF = 0.5 - 1e-9


def check_decoding(decoding: str) -> str:
    if decoding not in DECODINGS:
        raise InvalidInputError(f"decoding must be one of {', '.join(DECODINGS)}. Received: {decoding!r}")
    return decoding


def median_indices(probabilities: np.ndarray) -> np.ndarray:
    """For each row of ``probabilities`` [N, K] (classes in ascending label order), the index of
    the lower median: the first class whose cumulative probability reaches one half."""
    cumulative = np.cumsum(np.asarray(probabilities, dtype=np.float64), axis=1)
    cumulative /= cumulative[:, -1:]  # rows that do not sum to exactly 1 (float32 softmax)
    return np.argmax(cumulative >= _HALF, axis=1)


def median_margins(logits: np.ndarray) -> np.ndarray:
    """For each row of ``logits`` [N, K], how firmly its median is decided, in logit units: the
    smaller of the log-odds that the value is at most the median, and that it is below it.

    Each is a difference of two log-sum-exps over disjoint classes (log C - log(1 - C)), which
    moving every logit by at most d changes by at most 2d, as it does the top-1 margin (top-1
    minus top-2 logit): so the INT8 gate's decided margin carries over to the median unchanged.
    """
    z = np.asarray(logits, dtype=np.float64)
    median = median_indices(probabilities_of(z))
    below = np.logaddexp.accumulate(z, axis=1)  # log of the mass of classes 0..k
    above = np.logaddexp.accumulate(z[:, ::-1], axis=1)[:, ::-1]  # log of the mass of classes k..K-1
    rows = np.arange(len(z))
    inf = np.full(len(z), np.inf)
    last = z.shape[1] - 1
    # P(value <= median) against P(value > median); and P(value >= median) against P(value < median).
    upper = np.where(median < last, below[rows, median] - above[rows, np.minimum(median + 1, last)], inf)
    lower = np.where(median > 0, above[rows, median] - below[rows, np.maximum(median - 1, 0)], inf)
    return np.minimum(upper, lower)


def probabilities_of(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    shifted = np.exp(np.asarray(logits, dtype=np.float64) - np.max(logits, axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def decode_indices(probabilities: np.ndarray, decoding: str = "argmax") -> np.ndarray:
    """Class indices [N] of ``probabilities`` [N, K] by ``decoding`` ("argmax" or "median")."""
    check_decoding(decoding)
    if decoding == "median":
        return median_indices(probabilities)
    return np.argmax(probabilities, axis=1)
