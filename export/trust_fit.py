"""Fit what the device needs to say how far to trust a reading (applied by :mod:`edgeclf.trust`).

- the temperature: one scalar minimising the negative log-likelihood of held-out logits;
- the familiarity model: class means and one shared covariance of the *training* images'
  embeddings, shrunk by Ledoit-Wolf (fewer images than features: the plain estimate is
  singular), floored (VARIANCE_FLOOR), kept as its top eigenpairs plus one variance for the rest;
- the conformal calibration: the held-out images' familiarity scores and interval scores.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from edgeclf.errors import DataError
from edgeclf.probe import KINDS as PROBE_KINDS
from edgeclf.trust import Familiarity, expected_calibration_error, interval_scores, scaled_probabilities
from edgeclf.trust_file import POOLED_BLOCK_TEXT, Trust

#: Temperatures searched (log-uniform bounds): far outside them a model is broken, not miscalibrated.
TEMPERATURE_RANGE = (0.05, 50.0)
#: Eigenpairs of the shared covariance kept; the rest share one variance. On the main job's bundle
#: (benchmarks/familiarity_study.py, mixed10) ranks 128 to 2048 separated gauges alike (AUROC
#: 0.956-0.957) and 32 worse (0.940); 256 keeps a 2048-wide embedding's file near 2 MB.
DEFAULT_RANK = 256


#: No direction of the shared covariance is given less variance than this share of the mean one.
#: Quantized artifacts move the pooled features: on the 299 px bundle's mixed0, INT8 moved each
#: channel by about a tenth of its spread across images, which in the directions of least variance
#: outweighed everything else: 0.35% of its familiarity decisions agreed with Keras', 87% with a
#: floor of 0.03, 99.65% at 0.1 and 100% at 0.3, while on the 75 px models the floor left every
#: foreign set's AUROC within 0.002. That was one model: retrained, the same floor gave 87.5%, as
#: most of the move is a bias of each channel's own, which export now measures and the device
#: removes (the artifact's ``embedding_offset``: 99.8%); the floor keeps what is left from the
#: directions of least variance.
VARIANCE_FLOOR = 0.3


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
    values = np.maximum(values, VARIANCE_FLOOR * values.mean())
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


def keras_outputs(tapped, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    """[logits, *embeddings] for uint8 ``images`` of ``tapped``, a :func:`edgeclf.train.model.tapped_model`."""
    from edgeclf.train.pipeline import pixel_batches

    return [np.asarray(a) for a in tapped.predict(pixel_batches(images, batch_size), verbose=0)]


def fit_trust(model, bundle, training, heldout, reference_index: np.ndarray, max_training: int = 5000) -> Trust:
    """Fit the temperature, the familiarity model (on the block chosen for it) and the conformal
    calibration of ``bundle``'s model.

    Args:
        training: the training images (an ImageSet): the familiarity model's Gaussian (at most
            ``max_training`` of them, a reproducible sample).
        heldout: the images training held out: the temperature, the p-values' and the intervals'
            calibration scores, and the judges (with foreign frames) of the familiarity block.
        reference_index: which held-out images are the verification set's, whose Keras familiarity
            scores the device's are checked against.
    """
    from edgeclf.export.familiarity_choice import choose_block, foreign_frames
    from edgeclf.progress import log
    from edgeclf.runtime.trust_checks import MIN_FLAGGED, PROBE_FRAMES
    from edgeclf.train.backbones import get_backbone
    from edgeclf.train.data import LabelMap
    from edgeclf.train.model import HEAD_INPUT, tapped_model
    from edgeclf.trust import DEFAULT_ALPHA
    from edgeclf.verification import sample_indices

    labels = LabelMap(tuple(bundle.labels))
    blocks = (*get_backbone(bundle.meta["backbone"]["name"]).familiarity_candidates, HEAD_INPUT)
    tapped = tapped_model(model, blocks)
    keep = sample_indices(len(training), max_training)
    train_embedding = dict(zip(blocks, keras_outputs(tapped, training.images[keep])[1:], strict=True))
    train_index = labels.encode(np.asarray(training.values)[keep])
    held_logits, *held = keras_outputs(tapped, heldout.images)
    held_embedding = dict(zip(blocks, held, strict=True))
    held_index = labels.encode(heldout.values)
    foreign = {kind: dict(zip(blocks, keras_outputs(tapped, frames)[1:], strict=True))
               for kind, frames in foreign_frames(bundle.image_size, PROBE_FRAMES).items()}
    block, familiarity, candidates = choose_block(blocks, train_embedding, train_index, len(labels.labels),
                                                  held_embedding, foreign)
    temperature = fit_temperature(held_logits, held_index)
    ece = crossfit_ece(held_logits, held_index)
    probe = {kind: judged["flagged"] for kind, judged in candidates[block]["foreign"].items() if kind in PROBE_KINDS}
    for kind, share in probe.items():
        if share < MIN_FLAGGED:
            warnings.warn(f"the model's familiarity check flags only {share:.0%} of {PROBE_FRAMES} probe frames "
                          f"({kind}) as unfamiliar (at p <= {DEFAULT_ALPHA}), on the best of its backbone's blocks: "
                          f"its features do not tell them from its images. More training or a pretrained backbone "
                          f"may help; verify waives this probe check for the artifacts", stacklevel=2)
    dimension = familiarity.dimension
    log(f"trust: temperature {temperature:.3g} (held-out ECE {ece['before']:.3f} -> {ece['after']:.3f} cross-fitted "
        f"on {ece['images']} images); familiarity on {block} ({dimension} wide) from {len(keep)} training images, "
        f"calibrated on {len(heldout)} held-out images")
    record = {
        "temperature": temperature,
        "temperature_fitted_on": f"the {len(heldout)} held-out images' Keras logits (minimum NLL)",
        "heldout_ece_15_bins": ece,
        "familiarity": {
            "score": "squared Mahalanobis distance of the embedding to the nearest class mean, one shared "
                     "Ledoit-Wolf covariance (top eigenpairs kept, one variance for the rest)",
            "variance_floor": f"every direction's variance at least {VARIANCE_FLOOR:g} x the mean direction's",
            "block": block,
            "embedding": "the head's input (global average pool of the backbone)" if block == HEAD_INPUT
            else POOLED_BLOCK_TEXT + block,
            "dimension": dimension, "rank": int(familiarity.basis.shape[1]), "training_images": int(len(keep)),
            "calibration_images": int(len(heldout)),
            "p_value": "(1 + held-out images scoring at least as high) / (held-out images + 1)",
            "chosen_by": f"of the candidates, the block flagging most of its worst-flagged foreign kind at p <= "
                         f"{DEFAULT_ALPHA}, then the larger mean AUROC against the held-out images, then the earlier "
                         f"block; judged on {', '.join(f'{len(v[block])} {k}' for k, v in foreign.items())}",
            "candidates": candidates},
        "interval": {"calibration_images": int(len(heldout)),
                     "score": "1 - the largest bar at which the range of the labels whose temperature-scaled "
                              "probability reaches it (with the most probable) holds the true label; the device "
                              "reports that range at the bar 1 - the conformal quantile"},
        "reference_images": int(len(reference_index)),
        "probe_flagged_by_keras": probe,
    }
    return Trust(temperature, familiarity, interval_calibration(held_logits, held_index, temperature),
                 familiarity.scores(held_embedding[block][reference_index]).astype(np.float32), record)
