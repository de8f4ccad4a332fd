"""The verification set: the held-out reference export validates against, kept in the bundle.

``verification.npz`` holds the uint8 pixels at the model's input size, the true integer
labels and the Keras reference logits of a reproducible sample of the images training
held out. Export writes it and validates every artifact on it; ``edgeclf verify`` and
``edgeclf bench`` read it on the device, with numpy alone: the device needs neither
TensorFlow nor the training images to check that an artifact still gives Keras's answers.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from edgeclf.bundle import Bundle, update_bundle
from edgeclf.errors import BundleError, InvalidInputError
from edgeclf.fsio import atomic_write_bytes, sha256_file, storage_errors
from edgeclf.limits import is_int

VERIFICATION_FILE = "verification.npz"
#: Held-out images kept by default: every one up to 2,000. 256 cannot show 0.99 agreement even
#: when all agree (one-sided 95% lower bound 0.988); about 1,200 at 0.995 observed can.
DEFAULT_IMAGES = 2000
#: The arrays of verification.npz, in the order of :class:`VerificationSet`'s fields.
MEMBERS = ("pixels.npy", "labels.npy", "logits.npy")
#: The most bytes a verification set may take decompressed (and on disk). The default 2,000 images
#: take 536 MB at 299x299 (3 bytes a pixel; labels and logits are small beside them), 34 MB at
#: 75x75: 1 GiB leaves room for larger inputs or more images, and bounds what a forged set can
#: make a device allocate (a 2 MB zip of zeros declares 2 GiB).
MAX_VERIFICATION_BYTES = 1 << 30


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


def verification_bytes(images: int, height: int, width: int, classes: int) -> int:
    """The bytes a verification set of ``images`` takes decompressed (uint8 pixels, int64 labels,
    float32 logits), without the few hundred bytes of .npy headers."""
    return images * (height * width * 3 + 8 + 4 * classes)


def check_verification_size(images: int, height: int, width: int, classes: int) -> None:
    """Refuse a verification set that ``edgeclf verify`` would refuse to read as too large.

    Raises:
        InvalidInputError: it would take more than MAX_VERIFICATION_BYTES decompressed.
    """
    needed = verification_bytes(images, height, width, classes)
    if needed > MAX_VERIFICATION_BYTES - 4096:  # room for the three .npy headers
        most = (MAX_VERIFICATION_BYTES - 4096) // verification_bytes(1, height, width, classes)
        raise InvalidInputError(f"a verification set of {images} images at {height}x{width} takes {needed:,} bytes, "
                                f"over the budget of {MAX_VERIFICATION_BYTES:,} that verify reads: keep at most "
                                f"{most} images (--verification-images). Received: {images} images")


def write_verification_set(bundle_path: str | Path, reference: VerificationSet, drawn: dict[str, Any]) -> dict:
    """Write ``verification.npz`` and its bundle.json record together, under the bundle's lock.

    Returns:
        The record: file, sha256, size, image count and how the images were drawn.

    Raises:
        InvalidInputError: the set is over the budget verify reads (:func:`check_verification_size`).
    """
    check_verification_size(len(reference), reference.images.shape[1], reference.images.shape[2],
                            reference.logits.shape[1])
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


def load_verification_set(bundle: Bundle, max_bytes: int | None = None) -> VerificationSet:
    """The bundle's verification set, checked against its record and against the bundle.

    Bounded before it allocates: the file's size, then the zip's members (exactly pixels, labels
    and logits, stored or deflated, their declared sizes within ``max_bytes``), then each
    member's .npy header (dtype and shape against the model: uint8 pixels [N, H, W, 3], integer
    labels [N], float logits [N, K], N the count bundle.json records) and the size it implies
    against the size the zip declares, all before any array data is decompressed.

    Args:
        max_bytes: the most bytes the set may take decompressed (default MAX_VERIFICATION_BYTES).

    Raises:
        BundleError: the bundle has none (exported by an older edgeclf), or the file is
            missing, altered (size or sha256), over the budget, malformed, or does not fit the model.
    """
    limit = MAX_VERIFICATION_BYTES if max_bytes is None else max_bytes
    record = bundle.meta.get("verification_set")
    if record is None:
        raise BundleError(f"{bundle.path} has no verification set: it was exported by an older edgeclf "
                          f"(or never exported). Re-export it where TensorFlow is installed: "
                          f"edgeclf export {bundle.path}")
    path = bundle.inside(record.get("file"), "verification_set.file")
    if not path.is_file():
        raise BundleError(f"{path} is missing; bundle.json records it as the verification set. Re-export the bundle")
    size = path.stat().st_size
    if size > limit:
        raise BundleError(f"{path.name} is {size:,} bytes, over the verification set's budget of {limit:,} bytes: "
                          f"it is not one export wrote; re-export the bundle. Received: {size:,} bytes")
    if size != record.get("size_bytes") or sha256_file(path) != record.get("sha256"):
        raise BundleError(f"{path.name} differs from the verification set export wrote (size or sha256 against "
                          f"bundle.json): it was altered or truncated; re-export the bundle")
    height, width = bundle.image_size
    classes = len(bundle.labels)
    recorded = record.get("images")
    arrays = read_npz(path, MEMBERS, limit, lambda headers: _check_shapes(
        headers, path, height, width, classes, recorded if is_int(recorded) and recorded >= 1 else None))
    images, values, logits = (arrays[name] for name in MEMBERS)
    if not np.isfinite(logits).all():
        raise BundleError(f"{path.name} holds Keras logits that are NaN or infinite: it is not one export wrote; "
                          f"re-export the bundle. Received: {int((~np.isfinite(logits)).sum())} such values")
    unknown = sorted(set(values.tolist()) - set(bundle.labels))
    if unknown:
        raise BundleError(f"{path.name} holds labels {unknown} the model does not know (its labels: {bundle.labels})")
    return VerificationSet(images, values.astype(np.int64), logits.astype(np.float32))


def read_npz(path: Path, members: tuple[str, ...], limit: int, check,
             what: str = "the verification set") -> dict[str, np.ndarray]:
    """The arrays of the .npz at ``path``, bounded before anything is decompressed: exactly ``members``,
    stored or deflated, declaring at most ``limit`` bytes in all, each .npy header consistent with the
    size the zip declares; ``check(headers)`` (name -> (shape, dtype, bytes)) raises where the shapes do
    not fit, before any array is read.

    Raises:
        BundleError: the file is not such an archive, or ``check`` refused it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = _members(archive, path, limit, members, what)
            headers = {name: _header(archive, infos[name], path) for name in members}
            check(headers)
            return {name: _read(archive, infos[name], headers[name], path) for name in members}
    except BundleError:
        raise
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error, MemoryError) as exc:
        raise BundleError(f"cannot read {what} {path}: {exc}") from None


def _members(archive: zipfile.ZipFile, path: Path, limit: int,
             members: tuple[str, ...] = MEMBERS, what: str = "the verification set") -> dict[str, zipfile.ZipInfo]:
    """The zip's members by name: exactly ``members``, stored or deflated, unencrypted, their declared
    decompressed sizes summing to at most ``limit`` (nothing is decompressed to learn this)."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if sorted(names) != sorted(members):
        shown = names[:10] + ([f"... {len(names) - 10} more"] if len(names) > 10 else [])
        raise BundleError(f"{path.name} must hold exactly {list(members)}; it is not one export wrote, re-export the "
                          f"bundle. Received: {len(names)} members {shown}")
    for info in infos:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
            raise BundleError(f"{path.name}: member {info.filename} is encrypted or compressed with method "
                              f"{info.compress_type}; expected stored or deflated (as numpy writes). "
                              f"Received: method {info.compress_type}, flags {info.flag_bits:#x}")
    declared = sum(info.file_size for info in infos)
    if declared > limit:
        raise BundleError(f"{path.name} declares {declared:,} bytes once decompressed, over {what}'s "
                          f"budget of {limit:,} bytes (a compressed file of {path.stat().st_size:,} bytes): refused "
                          f"before decompressing. Received: " + ", ".join(f"{i.filename} {i.file_size:,} bytes"
                                                                          for i in infos))
    return {info.filename: info for info in infos}


def _header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data bytes) from a member's .npy header, read from the start of its stream;
    the data's size (computed without overflow) must be what the zip declares for the member."""
    with archive.open(info) as fh:
        try:
            version = npformat.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = npformat.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = npformat.read_array_header_2_0(fh)
            else:
                raise ValueError(f".npy format version {version[0]}.{version[1]}; expected 1.0 or 2.0")
        except ValueError as exc:
            raise BundleError(f"{path.name}: member {info.filename} has no valid .npy header ({exc}); "
                              f"re-export the bundle") from None
        offset = fh.tell()
    if any(side < 0 for side in shape):
        raise BundleError(f"{path.name}: member {info.filename} declares a negative shape. Received: {shape}")
    data = math.prod(shape) * dtype.itemsize  # Python integers: no int64 overflow
    if dtype.hasobject or offset + data != info.file_size:
        raise BundleError(f"{path.name}: member {info.filename}'s header declares {dtype} {list(shape)}, "
                          f"{data:,} bytes of data, but the zip declares {info.file_size - offset:,}: it is not one "
                          f"export wrote; re-export the bundle. Received: shape {shape}, dtype {dtype}")
    return tuple(shape), dtype, data


def _check_shapes(headers: dict, path: Path, height: int, width: int, classes: int, recorded: int | None) -> int:
    """N, once the headers agree with the model and with each other (and with bundle.json's image count)."""
    (pixels, pixels_dtype, _), (labels, labels_dtype, _), (logits, logits_dtype, _) = \
        (headers[name] for name in MEMBERS)
    n = labels[0] if len(labels) == 1 else -1
    fits = (pixels_dtype == np.uint8 and labels_dtype.kind in "iu" and labels_dtype.itemsize <= 8
            and logits_dtype.kind == "f" and logits_dtype.itemsize in (4, 8)
            and n >= 1 and pixels == (n, height, width, 3) and logits == (n, classes))
    if not fits:
        raise BundleError(f"{path.name} does not fit this model: expected pixels uint8 [N, {height}, {width}, 3], "
                          f"labels int [N] and logits float32 [N, {classes}] with N > 0. Received: pixels "
                          f"{pixels_dtype} {list(pixels)}, labels {labels_dtype} {list(labels)}, logits "
                          f"{logits_dtype} {list(logits)}")
    if recorded is not None and n != recorded:
        raise BundleError(f"{path.name} holds {n} images, but bundle.json records {recorded} "
                          f"(verification_set.images): re-export the bundle. Received: {n} images")
    return n


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, header: tuple, path: Path) -> np.ndarray:
    """A member's array, of the shape its checked header declared; its CRC is checked to the end."""
    with archive.open(info) as fh:
        array = npformat.read_array(fh, allow_pickle=False)
        if fh.read(1):  # also reaches the end of the stream, where zipfile checks the CRC
            raise BundleError(f"{path.name}: member {info.filename} holds data past its array; re-export the bundle")
    if array.shape != header[0]:
        raise BundleError(f"{path.name}: member {info.filename} changed shape while read: {array.shape}")
    return array
