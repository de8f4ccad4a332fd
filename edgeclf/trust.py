"""How far to trust a reading, on the device: calibrated confidence, familiarity, a conformal interval.

numpy only: export fits what is here (:mod:`edgeclf.export.trust_fit`), the device applies it.

- **Confidence** is the softmax of the logits divided by one temperature fitted on held-out
  images (Guo et al. 2017); the raw logits stay as they are.
- **Familiarity** scores the embedding (the pooled features the head reads) by its
  Mahalanobis distance to the nearest class mean under one shared covariance (Lee et al.
  2018), fitted on training images. The logits cannot tell: noise and black frames get
  confidence 1.000 from them. The covariance is stored as its top eigenvectors and
  eigenvalues and one variance for every other direction, which is exact where those
  directions all share one eigenvalue (a shrunk covariance of fewer images than features).
  A score becomes a conformal p-value against the held-out images' scores: the share of
  held-out images (plus one) at least as strange. An image is *unfamiliar* when its p-value
  is at most ``alpha``; on images like the training data that happens with probability at
  most ``alpha``, by construction (the guarantee is marginal and needs exchangeable images).
- **Interval**: split conformal prediction (Sadinle et al. 2019) on ranges: the labels are
  ordered integers, so the device reports the range from the lowest to the highest label whose
  calibrated probability is at least ``1 - q`` (with the decoded label always in it), ``q`` the
  conformal quantile of the held-out images' scores for exactly such ranges
  (:func:`interval_scores`): on data like the held-out images the true label lies inside with
  probability at least the coverage asked for, and not far above it. (Growing a contiguous
  interval by probability mass, the ordinal form of adaptive sets, was tried first: with
  confidences near 1 its deterministic form spanned every label on most images of the main job.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from edgeclf.errors import InvalidInputError

#: The p-value at or below which an image is unfamiliar, unless the caller asks otherwise.
DEFAULT_ALPHA = 0.01
#: The coverage of an interval, unless the caller asks otherwise.
DEFAULT_COVERAGE = 0.9


def scaled_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal threshold: the ceil((n+1) * coverage)-th smallest of ``scores``
    (+inf where that rank exceeds n: too few images to promise the coverage)."""
    if not 0.0 < coverage < 1.0:
        raise InvalidInputError(f"coverage must lie strictly between 0 and 1. Received: {coverage!r}")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(ordered) + 1) * coverage)
    return float(ordered[rank - 1]) if rank <= len(ordered) else math.inf


def p_values(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Conformal p-values: (1 + number of ``calibration`` scores >= each score) / (n + 1)."""
    ordered = np.sort(np.asarray(calibration, dtype=np.float64))
    at_least = len(ordered) - np.searchsorted(ordered, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + at_least) / (len(ordered) + 1.0)


def interval_scores(probabilities: np.ndarray, true_index: np.ndarray) -> np.ndarray:
    """The nonconformity of each row's true class for the ranges :func:`intervals` reports.

    The range at bar ``b`` runs over the classes with probability >= b and the most probable
    class; it holds class y when a kept class lies at or below y and one at or above. So y is
    held for every bar up to min(best probability at or below y, best at or above y), the most
    probable class counting as 1, and the score is one minus that: the conformal quantile of
    these scores then calibrates the ranges themselves, not the sets they are drawn around
    (which left the ranges over-covering wherever the set had a gap).
    """
    p = np.array(probabilities, dtype=np.float64)
    rows = np.arange(len(p))
    p[rows, np.argmax(p, axis=1)] = 1.0  # always in the range
    below = np.maximum.accumulate(p, axis=1)  # best probability of the classes at or below each
    above = np.maximum.accumulate(p[:, ::-1], axis=1)[:, ::-1]
    y = np.asarray(true_index)
    return 1.0 - np.minimum(below[rows, y], above[rows, y])


def intervals(probabilities: np.ndarray, threshold: float, chosen: np.ndarray | None = None) -> np.ndarray:
    """[N, 2] (lowest, highest) class index of the classes whose probability is at least
    ``1 - threshold``, together with the most probable class and the ``chosen`` one (the decoded
    label, when the decoding is not argmax), as one range: with ``threshold`` the conformal
    quantile of :func:`interval_scores`, the range holds the true class with the coverage asked.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    rows = np.arange(len(p))
    kept = p >= 1.0 - threshold - 1e-12
    kept[rows, np.argmax(p, axis=1)] = True
    if chosen is not None:
        kept[rows, np.asarray(chosen)] = True
    columns = np.arange(p.shape[1])[None, :]
    lowest = np.where(kept, columns, p.shape[1]).min(axis=1)
    highest = np.where(kept, columns, -1).max(axis=1)
    return np.stack([lowest, highest], axis=1)


@dataclass(frozen=True)
class Familiarity:
    """A class-conditional Gaussian with one shared covariance in low-rank-plus-isotropic form.

    ``means`` [K, D] class means; ``basis`` [D, r] orthonormal eigenvectors of the covariance
    with ``eigenvalues`` [r]; every direction outside the basis has variance ``residual``.
    ``calibration`` [n]: the scores of the held-out images, which p-values are counted against.
    """

    means: np.ndarray
    basis: np.ndarray
    eigenvalues: np.ndarray
    residual: float
    calibration: np.ndarray

    @property
    def dimension(self) -> int:
        return int(self.means.shape[1])

    def scores(self, embedding: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance [N] of each embedding [N, D] to its nearest class mean."""
        x = np.asarray(embedding, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dimension:
            raise InvalidInputError(f"embeddings must be [N, {self.dimension}] for this familiarity model. "
                                    f"Received: shape={tuple(x.shape)}")
        projection, rank, shrink, cross, constant = self._prepared
        product = x @ projection  # [N, r + K]: coordinates in the basis, then dot products with the means
        along, dots = product[:, :rank], product[:, rank:]
        per_image = (along * along) @ shrink + (x * x).sum(1) / self.residual
        scores = per_image[:, None] - 2.0 * (along @ cross + dots / self.residual) + constant[None, :]
        return np.maximum(scores, 0.0).min(axis=1)

    @cached_property
    def _prepared(self) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
        """What every call shares, computed once (most of the cost at batch 1 otherwise).

        With a = x's coordinates in the basis, m = a mean's, s = 1/eigenvalues - 1/residual, the score
        to that mean, sum s (a - m)^2 + ||x - mean||^2 / residual, expands into a part of x alone,
        cross terms (one product of x with [basis | means^T]) and a constant per class.
        """
        basis = np.asarray(self.basis, dtype=np.float64)
        means = np.asarray(self.means, dtype=np.float64)
        shrink = 1.0 / np.asarray(self.eigenvalues, dtype=np.float64) - 1.0 / self.residual
        along_means = means @ basis  # [K, r]
        cross = (along_means * shrink).T  # [r, K]
        constant = (along_means ** 2) @ shrink + (means * means).sum(1) / self.residual
        return np.concatenate([basis, means.T], axis=1), basis.shape[1], shrink, cross, constant

    def p_values(self, embedding: np.ndarray) -> np.ndarray:
        """Conformal p-values [N] of embeddings [N, D] against the held-out images' scores."""
        return self.p_values_of_scores(self.scores(embedding))

    def p_values_of_scores(self, scores: np.ndarray) -> np.ndarray:
        return p_values(scores, self.calibration)


def expected_calibration_error(probabilities: np.ndarray, true_index: np.ndarray, bins: int = 15) -> float:
    """ECE: the mean |accuracy - confidence| over equal-width confidence bins, weighted by their share of
    images (Guo et al. 2017; 15 bins). The confidence is the top class's probability."""
    confidence, accuracy, share = reliability(probabilities, true_index, bins)
    return float(np.sum(share * np.abs(accuracy - confidence)))


def reliability(probabilities: np.ndarray, true_index: np.ndarray,
                bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, share of images) of each non-empty equal-width confidence bin,
    the bins (lo, hi]: what ECE sums and a reliability diagram draws."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence, chosen = p.max(axis=1), p.argmax(axis=1)
    correct = (chosen == np.asarray(true_index)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    used = [b for b in range(bins) if (which == b).any()]
    return (np.array([confidence[which == b].mean() for b in used]),
            np.array([correct[which == b].mean() for b in used]),
            np.array([np.mean(which == b) for b in used]))
