"""The verification set: the held-out reference export validates against, kept in the bundle.

``verification.npz`` holds the uint8 pixels at the model's input size, the true integer
labels and the Keras reference logits of a reproducible sample of the images training
held out. Export writes it and validates every artifact on it; ``edgeclf verify`` and
``edgeclf bench`` read it on the device, with numpy alone: the device needs neither
TensorFlow nor the training images to check that an artifact still gives Keras's answers.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.bundle import Bundle, update_bundle
from edgeclf.errors import BundleError
from edgeclf.fsio import atomic_write_bytes, sha256_file, storage_errors

VERIFICATION_FILE = "verification.npz"
#: Held-out images kept by default: every one up to 2,000. 256 cannot show 0.99 agreement even
#: when all agree (one-sided 95% lower bound 0.988); about 1,200 at 0.995 observed can.
DEFAULT_IMAGES = 2000


@dataclass(frozen=True)
class VerificationSet:
    images: np.ndarray  # uint8 [N, H, W, 3]
    values: np.ndarray  # int64 [N]: the true integers
    logits: np.ndarray  # float32 [N, K]: the Keras model's

    def __len__(self) -> int:
        return len(self.values)


def sample_indices(count: int, cap: int, seed: int = 0) -> np.ndarray:
    """A reproducible uniform sample of ``min(cap, count)`` indices, in order."""
    if cap >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).permutation(count)[:cap])


def write_verification_set(bundle_path: str | Path, reference: VerificationSet, drawn: dict[str, Any]) -> dict:
    """Write ``verification.npz`` and its bundle.json record together, under the bundle's lock.

    Returns:
        The record: file, sha256, size, image count and how the images were drawn.
    """
    buffer = io.BytesIO()
    np.savez_compressed(buffer, pixels=reference.images.astype(np.uint8), labels=reference.values.astype(np.int64),
                        logits=reference.logits.astype(np.float32))
    with update_bundle(bundle_path) as bundle:  # file and record change together: no reader sees a mismatch
        path = bundle.path / VERIFICATION_FILE
        with storage_errors(path, buffer.tell()):
            atomic_write_bytes(path, buffer.getvalue())
        record = {"file": VERIFICATION_FILE, "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
                  "images": len(reference), "image_size": list(reference.images.shape[1:3]), "drawn": drawn}
        bundle.meta["verification_set"] = record
    return record


def load_verification_set(bundle: Bundle) -> VerificationSet:
    """The bundle's verification set, checked against its record and against the bundle.

    Raises:
        BundleError: the bundle has none (exported by an older edgeclf), or the file is
            missing, altered (size or sha256), or does not fit the model.
    """
    record = bundle.meta.get("verification_set")
    if record is None:
        raise BundleError(f"{bundle.path} has no verification set: it was exported by an older edgeclf "
                          f"(or never exported). Re-export it where TensorFlow is installed: "
                          f"edgeclf export {bundle.path}")
    path = bundle.inside(record.get("file"), "verification_set.file")
    if not path.is_file():
        raise BundleError(f"{path} is missing; bundle.json records it as the verification set. Re-export the bundle")
    if path.stat().st_size != record.get("size_bytes") or sha256_file(path) != record.get("sha256"):
        raise BundleError(f"{path.name} differs from the verification set export wrote (size or sha256 against "
                          f"bundle.json): it was altered or truncated; re-export the bundle")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, values, logits = npz["pixels"], npz["labels"], npz["logits"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleError(f"cannot read the verification set {path}: {exc}") from None
    height, width = bundle.image_size
    n, classes = len(values), len(bundle.labels)
    if (images.dtype != np.uint8 or images.shape != (n, height, width, 3) or logits.shape != (n, classes)
            or values.ndim != 1 or n == 0):
        raise BundleError(f"{path.name} does not fit this model: expected pixels uint8 [N, {height}, {width}, 3], "
                          f"labels [N] and logits [N, {classes}] with N > 0. Received: pixels {images.dtype} "
                          f"{list(images.shape)}, labels {list(values.shape)}, logits {list(logits.shape)}")
    unknown = sorted(set(values.tolist()) - set(bundle.labels))
    if unknown:
        raise BundleError(f"{path.name} holds labels {unknown} the model does not know (its labels: {bundle.labels})")
    return VerificationSet(images, values.astype(np.int64), logits.astype(np.float32))
