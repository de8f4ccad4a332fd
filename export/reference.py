"""The real images export needs: calibration images and held-out validation images.

By default they are the bundle's own: its training source is loaded again and split
with the recorded seed and fraction (the loaders are deterministic), so calibration
uses training images and validation uses the images training held out.
"""

from __future__ import annotations

from pathlib import Path

from edgeclf.bundle import Bundle
from edgeclf.errors import BundleError, DataError
from edgeclf.train.data import ImageSet, LabelMap, load_dataset, split_stratified


def reference_sets(bundle: Bundle, data: str | Path | None = None) -> tuple[ImageSet, ImageSet]:
    """(calibration images, held-out images) for ``bundle``.

    Args:
        data: labelled data to use instead of the bundle's training source (a folder of
            label folders, a CSV or ``digits``); split like training was.

    Raises:
        BundleError: the bundle was trained on in-memory arrays and ``data`` is not given.
        DataError: the data cannot be read or holds labels the model does not know.
    """
    record = bundle.meta["training"]["data"]
    settings = bundle.meta["training"]["settings"]
    size = bundle.image_size
    source = data if data is not None else record["source"]
    if source == "arrays":
        raise BundleError(
            "the bundle was trained on in-memory arrays, so export cannot reload its images; "
            "pass labelled images with --data (data=...). Received: source='arrays'"
        )
    try:
        if data is not None or record["validation"] == "split":
            full = load_dataset(source, size)
            calibration, heldout = split_stratified(full, float(settings["val_split"]), int(settings["seed"]))
        else:
            calibration, heldout = load_dataset(source, size), load_dataset(record["validation"], size)
    except DataError as exc:
        raise DataError(f"{exc} (export reads the bundle's training images; pass --data to use others)") from None
    label_map = LabelMap(tuple(bundle.labels))
    label_map.encode(heldout.values)  # unknown labels are an error, not a silent miss
    return calibration, heldout
