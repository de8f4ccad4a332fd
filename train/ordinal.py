"""Soft ordinal labels (SORD: Díaz and Marathe, CVPR 2019): a loss that knows 4 is nearer 3 than 8 is.

Cross-entropy against a one-hot target costs a 3 -> 8 mistake what it costs a 3 -> 4 one.
SORD trains against a soft target instead: for true label r_t, class i gets
softmax_i(-alpha * phi(r_t, r_i)), with phi a distance between the integer values
themselves (``abs``: |r_t - r_i|, ``squared``: (r_t - r_i)^2), so a non-contiguous label
set such as -2, 3, 10 weighs its distances by value. The model keeps one logit per class,
so every export format, the runtime, ``verify``, bench and serving work unchanged.

The target table is plain numpy (:func:`soft_labels`); :func:`ordinal_loss` is the Keras loss
made from it, taking the same sparse class indices as cross-entropy.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edgeclf.errors import InvalidInputError

#: The losses of ``train --loss``.
LOSSES = ("crossentropy", "ordinal")
#: phi(r_t, r_i) of ``--ordinal-distance``: a distance between the integer values.
DISTANCES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "abs": lambda a, b: np.abs(a - b),
    "squared": lambda a, b: (a - b) ** 2,
}


def check_loss(loss: str, alpha: float, distance: str) -> None:
    """Raise InvalidInputError for an unknown loss or distance, or alpha not a finite number > 0."""
    if loss not in LOSSES:
        raise InvalidInputError(f"loss must be one of {', '.join(LOSSES)}. Received: {loss!r}")
    if distance not in DISTANCES:
        raise InvalidInputError(f"ordinal distance must be one of {', '.join(DISTANCES)}. Received: {distance!r}")
    from edgeclf import limits

    limits.check("ordinal_alpha", alpha, "ordinal alpha")


def soft_labels(labels: Sequence[int], alpha: float, distance: str = "abs") -> np.ndarray:
    """[K, K] float32: row t is the soft target of true class t, softmax_i(-alpha * phi(labels[t], labels[i]))."""
    check_loss("ordinal", alpha, distance)
    values = np.asarray(labels, dtype=np.float64)
    scores = -alpha * DISTANCES[distance](values[:, None], values[None, :])
    scores -= scores.max(axis=1, keepdims=True)  # each row's largest score is 0 (its own class)
    weights = np.exp(scores)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def ordinal_loss(labels: Sequence[int], alpha: float, distance: str = "abs"):
    """A Keras loss: cross-entropy of the logits against the soft target of each sparse class index."""
    import keras

    table = soft_labels(labels, alpha, distance)

    class SoftOrdinalCrossentropy(keras.losses.Loss):
        def __init__(self, name: str = "soft_ordinal_crossentropy", **kwargs):
            super().__init__(name=name, **kwargs)
            self.table = keras.ops.convert_to_tensor(table)

        def call(self, y_true, y_pred):
            index = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
            target = keras.ops.take(self.table, index, axis=0)
            return keras.losses.categorical_crossentropy(target, y_pred, from_logits=True)

    return SoftOrdinalCrossentropy()
