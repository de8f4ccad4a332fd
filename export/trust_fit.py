"""Fit what the device needs to say how far to trust a reading (applied by :mod:`edgeclf.trust`).

- the temperature: one scalar minimising the negative log-likelihood of held-out logits;
- the familiarity model: class means and one shared covariance of the *training* images'
  embeddings, shrunk by Ledoit-Wolf (fewer images than features: the plain estimate is
  singular), kept as its top eigenpairs plus one variance for the rest;
- the conformal calibration: the held-out images' familiarity scores and interval scores.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from edgeclf.errors import DataError
from edgeclf.trust import Familiarity, expected_calibration_error, interval_scores, scaled_probabilities
from edgeclf.trust_file import Trust

#: Temperatures searched (log-uniform bounds): far outside them a model is broken, not miscalibrated.
TEMPERATURE_RANGE = (0.05, 50.0)
#: Eigenpairs of the shared covariance kept; the rest share one variance. On the main job's bundle
#: (benchmarks/familiarity_study.py, mixed10) ranks 128 to 2048 separated gauges alike (AUROC
#: 0.956-0.957) and 32 worse (0.940); 256 keeps a 2048-wide embedding's file near 2 MB.
DEFAULT_RANK = 256


def nll(logits: np.ndarray, true_index: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), true_index]))


def fit_temperature(logits: np.ndarray, true_index: np.ndarray) -> float:
    """The temperature minimising :func:`nll` (a bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: nll(logits, true_index, math.exp(log_t)), bounds=(lo, hi),
                            method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def crossfit_ece(logits: np.ndarray, true_index: np.ndarray, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """ECE (15 bins) of every held-out image under a temperature fitted on the other folds, against
    the raw logits': what calibration gains on images it was not fitted on."""
    n = len(logits)
    order = np.random.default_rng(seed).permutation(n)
    calibrated = np.empty((n, logits.shape[1]))
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        t = fit_temperature(logits[rest], true_index[rest])
        calibrated[part] = scaled_probabilities(logits[part], t)
    return {"before": expected_calibration_error(scaled_probabilities(logits), true_index),
            "after": expected_calibration_error(calibrated, true_index), "images": int(n), "folds": folds}


def fit_familiarity(embedding: np.ndarray, true_index: np.ndarray, classes: int,
                    rank: int = DEFAULT_RANK) -> Familiarity:
    """Class means and a Ledoit-Wolf shared covariance of training ``embedding`` [N, D].

    Returns a Familiarity without calibration scores (see :func:`with_calibration`).

    Raises:
        DataError: a class has no training image, or the embeddings are not finite.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(embedding, dtype=np.float64)
    if not np.isfinite(x).all():
        raise DataError("the training images' embeddings hold NaN or infinite values: the model is broken. "
                        f"Received: {int((~np.isfinite(x)).sum())} such values")
    counts = np.bincount(true_index, minlength=classes)
    if (counts == 0).any():
        raise DataError(f"every class needs training images to fit familiarity; classes without any: "
                        f"{np.flatnonzero(counts == 0).tolist()}")
    means = np.stack([x[true_index == k].mean(axis=0) for k in range(classes)])
    centred = x - means[true_index]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    values, vectors = np.linalg.eigh(covariance)  # ascending
    keep = min(rank, len(values))
    top = slice(len(values) - keep, None)
    rest = values[:len(values) - keep]
    residual = float(rest.mean()) if len(rest) else float(values.min())
    return Familiarity(means.astype(np.float32), vectors[:, top].astype(np.float32),
                       values[top].astype(np.float32), residual, np.empty(0, dtype=np.float32))


def with_calibration(model: Familiarity, heldout_embedding: np.ndarray) -> Familiarity:
    """``model`` with the held-out images' scores to count p-values against."""
    scores = np.sort(model.scores(heldout_embedding)).astype(np.float32)
    return Familiarity(model.means, model.basis, model.eigenvalues, model.residual, scores)


def interval_calibration(logits: np.ndarray, true_index: np.ndarray, temperature: float) -> np.ndarray:
    """The held-out images' interval scores under the fitted temperature, sorted."""
    return np.sort(interval_scores(scaled_probabilities(logits, temperature), true_index)).astype(np.float32)


def keras_outputs(both, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embedding) for uint8 ``images`` of ``both``, an :func:`edgeclf.train.model.embedding_model`."""
    from edgeclf.train.pipeline import pixel_batches

    logits, embedding = both.predict(pixel_batches(images, batch_size), verbose=0)
    return np.asarray(logits), np.asarray(embedding)


def fit_trust(model, bundle, training, heldout, reference_index: np.ndarray, max_training: int = 5000) -> Trust:
    """Fit the temperature, the familiarity model and the conformal calibration of ``bundle``'s model.

    Args:
        training: the training images (an ImageSet): the familiarity model's Gaussian (at most
            ``max_training`` of them, a reproducible sample).
        heldout: the images training held out: the temperature, the p-values' and the intervals'
            calibration scores.
        reference_index: which held-out images are the verification set's, whose Keras familiarity
            scores the device's are checked against.
    """
    from edgeclf.train.model import embedding_model
    from edgeclf.probe import foreign_probe
    from edgeclf.progress import log
    from edgeclf.runtime.trust_checks import MIN_FLAGGED, PROBE_FRAMES
    from edgeclf.train.data import LabelMap
    from edgeclf.trust import DEFAULT_ALPHA
    from edgeclf.verification import sample_indices

    labels = LabelMap(tuple(bundle.labels))
    backbone = bundle.meta["backbone"]["name"]
    both = embedding_model(model, backbone)
    keep = sample_indices(len(training), max_training)
    _, train_embedding = keras_outputs(both, training.images[keep])
    train_index = labels.encode(np.asarray(training.values)[keep])
    held_logits, held_embedding = keras_outputs(both, heldout.images)
    held_index = labels.encode(heldout.values)
    temperature = fit_temperature(held_logits, held_index)
    familiarity = with_calibration(fit_familiarity(train_embedding, train_index, len(labels.labels)), held_embedding)
    ece = crossfit_ece(held_logits, held_index)
    probe = {kind: float(np.mean(familiarity.p_values(keras_outputs(both, frames)[1]) <= DEFAULT_ALPHA))
             for kind, frames in foreign_probe(*bundle.image_size, PROBE_FRAMES).items()}
    for kind, share in probe.items():
        if share < MIN_FLAGGED:
            warnings.warn(f"the model's familiarity check flags only {share:.0%} of {PROBE_FRAMES} probe frames "
                          f"({kind}) as unfamiliar (at p <= {DEFAULT_ALPHA}): its embedding does not tell them from "
                          f"its images. More training or a pretrained backbone may help; verify waives this probe "
                          f"check for the artifacts", stacklevel=2)
    log(f"trust: temperature {temperature:.3g} (held-out ECE {ece['before']:.3f} -> {ece['after']:.3f} cross-fitted "
        f"on {ece['images']} images); familiarity from {len(keep)} training images' {train_embedding.shape[1]}-wide "
        f"embeddings, calibrated on {len(heldout)} held-out images")
    record = {
        "temperature": temperature,
        "temperature_fitted_on": f"the {len(heldout)} held-out images' Keras logits (minimum NLL)",
        "heldout_ece_15_bins": ece,
        "familiarity": {
            "score": "squared Mahalanobis distance of the embedding to the nearest class mean, one shared "
                     "Ledoit-Wolf covariance (top eigenpairs kept, one variance for the rest)",
            "embedding": get_embedding_source(backbone), "dimension": int(train_embedding.shape[1]),
            "rank": int(familiarity.basis.shape[1]), "training_images": int(len(keep)),
            "calibration_images": int(len(heldout)),
            "p_value": "(1 + held-out images scoring at least as high) / (held-out images + 1)"},
        "interval": {"calibration_images": int(len(heldout)),
                     "score": "1 - the temperature-scaled probability of the true label; the device reports "
                              "the range of labels at or above 1 - the conformal quantile"},
        "reference_images": int(len(reference_index)),
        "probe_flagged_by_keras": probe,
    }
    return Trust(temperature, familiarity, interval_calibration(held_logits, held_index, temperature),
                 familiarity.scores(held_embedding[reference_index]).astype(np.float32), record)


def get_embedding_source(backbone: str) -> str:
    from edgeclf.train.backbones import get_backbone

    block = get_backbone(backbone).familiarity_block
    return f"global average pool of {block}" if block else "the head's input (global average pool of the backbone)"
