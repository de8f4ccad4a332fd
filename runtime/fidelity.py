"""The statistics of the INT8 gate: decided images, a paired accuracy test, confidence bounds.

Top-1 agreement over every image mostly counts near-ties: an image whose two best Keras
logits are almost equal flips under any change of arithmetic (BF16 flips some too), so a
gate on all-image agreement keeps layers in FP32 to chase noise. The gate judges instead:

- agreement on the *decided* images, those whose Keras top-1 minus top-2 logit margin is
  at least a threshold export derives from how far BF16 arithmetic moves the logits;
- accuracy by a paired test on the discordant images (Keras right and the artifact wrong,
  or the reverse): it fails only when the drop exceeds the allowed one significantly;
- and it always reports all-image agreement with its one-sided 95% Clopper-Pearson lower
  bound, which is what the images can show (256 of 256 agreeing shows only 0.988).

Pure Python and numpy: ``verify`` applies the same gate on the device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit of each row of ``logits`` [N, K] (K >= 2)."""
    top = np.sort(np.asarray(logits, dtype=np.float64), axis=1)
    return top[:, -1] - top[:, -2]


def margin_shift(reference: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """How much ``moved`` closes the gap between each image's reference top-1 and any other class.

    ``max_j((moved_j - ref_j) - (moved_t - ref_t))`` over classes j other than the reference
    top-1 t, at least 0: an image can flip only when this exceeds its margin.
    """
    reference, moved = np.asarray(reference, np.float64), np.asarray(moved, np.float64)
    top = reference.argmax(axis=1)
    delta = moved - reference
    closing = delta - delta[np.arange(len(delta)), top][:, None]
    closing[np.arange(len(delta)), top] = -np.inf
    return np.maximum(closing.max(axis=1), 0.0)


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (summed in log space; n in the thousands is fine)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    terms = [_log_pmf(j, n, p) for j in range(k, n + 1)]
    top = max(terms)
    if top == -math.inf:
        return 0.0
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson_lower(successes: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound of a binomial proportion (Clopper-Pearson, exact).

    The p at which seeing ``successes`` or more of ``n`` has probability 1 - confidence;
    for successes == n that is (1 - confidence) ** (1 / n): 256 of 256 gives 0.9884.
    """
    if n <= 0:
        return 0.0
    if successes <= 0:
        return 0.0
    alpha = 1.0 - confidence
    low, high = 0.0, successes / n
    for _ in range(60):  # bisection: binomial_sf rises with p
        middle = (low + high) / 2
        if binomial_sf(successes, n, middle) < alpha:
            low = middle
        else:
            high = middle
    return low


def images_to_show(target: float, confidence: float = 0.95) -> int | None:
    """The fewest images that can show agreement ``target`` at ``confidence``: with n images all
    agreeing the one-sided lower bound is (1 - confidence) ** (1 / n), so n >= ln(1 - confidence)
    / ln(target); 0.99 takes 299, 0.98 149, 0.95 59. None for a target of 1 (no finite set shows it).
    """
    if target <= 0.0:
        return 1
    if target >= 1.0:
        return None
    n = max(1, math.ceil(math.log(1.0 - confidence) / math.log(target)))
    while clopper_pearson_lower(n, n, confidence) < target:  # the closed form, checked by the bound itself
        n += 1
    while n > 1 and clopper_pearson_lower(n - 1, n - 1, confidence) >= target:
        n -= 1
    return n


def paired_accuracy_test(keras_right: np.ndarray, artifact_right: np.ndarray, max_drop: float,
                         alpha: float = 0.05) -> dict[str, Any]:
    """Whether the artifact's accuracy is significantly more than ``max_drop`` below Keras's.

    Only discordant images carry information: ``b`` Keras right and the artifact wrong, ``c``
    the reverse; the drop is (b - c) / N. Given b + c discordant images, a drop of exactly
    ``max_drop`` means each is a loss with probability p0 = (1 + N * max_drop / (b + c)) / 2;
    the one-sided exact binomial test (McNemar's, shifted by the allowed drop) asks how likely
    b or more losses are at p0. The drop is significant when that p-value is below ``alpha``.
    """
    keras_right, artifact_right = np.asarray(keras_right, bool), np.asarray(artifact_right, bool)
    n = int(len(keras_right))
    b = int(np.sum(keras_right & ~artifact_right))
    c = int(np.sum(~keras_right & artifact_right))
    discordant = b + c
    if discordant == 0:
        p_value = 1.0
    else:
        p0 = min(1.0, (1.0 + n * max_drop / discordant) / 2)
        p_value = binomial_sf(b, discordant, p0)
    return {"images": n, "keras_right_artifact_wrong": b, "artifact_right_keras_wrong": c,
            "drop": (b - c) / n if n else 0.0, "max_drop": max_drop, "alpha": alpha,
            "p_value": p_value, "significant": p_value < alpha}


def decided_agreement(reference: np.ndarray, predicted_index: np.ndarray, min_margin: float) -> dict[str, Any]:
    """Top-1 agreement with the reference on the images whose reference margin is >= ``min_margin``."""
    decided = margins(reference) >= min_margin
    agree = np.asarray(predicted_index) == np.asarray(reference).argmax(axis=1)
    count, agreeing = int(decided.sum()), int((agree & decided).sum())
    return {"min_margin": float(min_margin), "decided_images": count,
            "decided_share": count / len(decided) if len(decided) else 0.0,
            "agreement": agreeing / count if count else 1.0, "disagreeing": count - agreeing,
            "lower_bound_95": clopper_pearson_lower(agreeing, count)}
