"""Evaluate a trained bundle on labelled data with the Keras model (the reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.bundle import Bundle, verify_model_file
from edgeclf.errors import BundleError
from edgeclf.fsio import atomic_write_json
from edgeclf.train.data import LabelMap, load_dataset
from edgeclf.decoding import check_decoding, decode_indices, probabilities_of
from edgeclf.train.metrics import classification_metrics, save_confusion_png, save_error_png
from edgeclf.train.trust_metrics import save_reliability_png, trust_metrics
from edgeclf.trust_file import embedding_block, load_trust


def predict_logits(model, images, batch_size: int = 64) -> np.ndarray:
    """Logits of the Keras model for uint8 RGB images: an array, an ImageSet or ImageFiles
    (the reference every artifact meets)."""
    from edgeclf.train.pipeline import pixel_batches

    return np.asarray(model.predict(pixel_batches(images, batch_size), verbose=0))


def load_keras_model(bundle: Bundle):
    """Load the bundle's ``model.keras``, with a typed error if it is missing, altered or corrupt."""
    import keras

    path = verify_model_file(bundle)  # the file training wrote, not a replaced one
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # zip/h5/deserialisation errors come in many types
        raise BundleError(f"cannot load {path}: {exc}") from None


def evaluate_bundle(
    bundle_path: str | Path, data: str | Path, report_dir: str | Path | None = None,
    strict: bool = False, batch_size: int = 64, input_mode: str = "auto", decoding: str = "argmax",
) -> dict[str, Any]:
    """Evaluate the bundle's Keras model on ``data`` (directory, .csv or ``digits``).

    ``input_mode`` as for :func:`edgeclf.train.data.load_dataset`: large sets are streamed.
    ``decoding``: "argmax" or "median" (:mod:`edgeclf.decoding`).

    With the bundle's trust file (written by export), ``metrics["trust"]`` holds the ECE before and
    after the temperature, the intervals' coverage and width and the false-alarm rate of the
    familiarity check on these images (:mod:`edgeclf.train.trust_metrics`).

    Writes ``metrics.json``, ``confusion_matrix.png``, ``abs_error.png`` (the |error|
    distribution) and, with a trust file, ``reliability.png`` to ``report_dir`` if given.

    Raises:
        BundleError: the bundle is missing or corrupt.
        DataError: the data cannot be read or holds labels the model does not know.
    """
    from edgeclf.train.model import embedding_model
    from edgeclf.train.pipeline import pixel_batches

    check_decoding(decoding)
    bundle = Bundle.load(bundle_path)
    model = load_keras_model(bundle)
    images = load_dataset(data, bundle.image_size, strict, input_mode)
    label_map = LabelMap(tuple(bundle.labels))
    label_map.encode(images.values)  # unknown labels are an error, not a silent miss
    trust = load_trust(bundle)
    if trust is None:
        logits, embedding = predict_logits(model, images, batch_size), None
    else:
        both = embedding_model(model, embedding_block(trust.record))
        logits, embedding = (np.asarray(a) for a in both.predict(pixel_batches(images, batch_size), verbose=0))
    predicted = label_map.decode(decode_indices(probabilities_of(logits), decoding))
    metrics = classification_metrics(images.values, predicted, label_map.labels)
    metrics["data"], metrics["decoding"] = str(data), decoding
    metrics["skipped_images"] = [{"source": s, "reason": r} for s, r in images.skipped]
    true_index = label_map.encode(images.values)
    metrics["trust"] = (trust_metrics(trust, logits, embedding, true_index) if trust is not None else
                        {"skipped": "the bundle has no trust file yet (`edgeclf export` fits one)"})
    if report_dir is not None:
        report_dir = Path(report_dir)
        atomic_write_json(report_dir / "metrics.json", metrics)
        save_confusion_png(metrics["confusion_matrix"], report_dir / "confusion_matrix.png", str(data))
        save_error_png(metrics, report_dir / "abs_error.png")
        if trust is not None:
            save_reliability_png(logits, true_index, trust.temperature, report_dir / "reliability.png")
    return metrics
