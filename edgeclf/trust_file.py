"""``trust.npz``: what the device needs to say how far to trust a reading, named by bundle.json.

Export writes it with its record (``bundle.json["trust"]``: file, size, sha256, temperature,
how each part was fitted and on how many images); the device reads it back checked, like
every artifact: size and sha256 against the record, members and shapes against the model
before any array is read, every value finite. numpy only.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.bundle import Bundle, update_bundle
from edgeclf.errors import BundleError
from edgeclf.fsio import atomic_write_bytes, sha256_file, storage_errors
from edgeclf.trust import Familiarity
from edgeclf.verification import read_npz

TRUST_FILE = "trust.npz"
TRUST_FORMAT = "edgeclf-trust/1"
#: means [K, D], basis [D, r], eigenvalues [r], residual [], held-out familiarity scores [n],
#: held-out interval scores [n], the Keras model's familiarity scores of the verification images [V].
MEMBERS = ("means.npy", "basis.npy", "eigenvalues.npy", "residual.npy", "familiarity_calibration.npy",
           "interval_calibration.npy", "reference_scores.npy")
#: How a trust record describes an inner block's embedding; records written before
#: ``familiarity.block`` existed name the block only this way.
POOLED_BLOCK_TEXT = "global average pool of "
#: A 2048-wide embedding at rank 256 takes about 2 MB; a full-rank 4096-wide one 64 MB.
MAX_TRUST_BYTES = 96 << 20


@dataclass(frozen=True)
class Trust:
    """The bundle's calibration: ``temperature``, ``familiarity`` (with its held-out scores),
    ``interval_calibration`` (held-out interval scores), ``reference_scores`` (Keras familiarity
    scores of the verification images, in their order) and the bundle.json ``record``."""

    temperature: float
    familiarity: Familiarity
    interval_calibration: np.ndarray
    reference_scores: np.ndarray
    record: dict[str, Any]


def write_trust(bundle_path: str | Path, trust: Trust) -> dict[str, Any]:
    """Write ``trust.npz`` and its record together, under the bundle's lock. Returns the record."""
    f = trust.familiarity
    buffer = io.BytesIO()
    np.savez_compressed(buffer, means=f.means.astype(np.float32), basis=f.basis.astype(np.float32),
                        eigenvalues=f.eigenvalues.astype(np.float32), residual=np.float64(f.residual),
                        familiarity_calibration=f.calibration.astype(np.float32),
                        interval_calibration=trust.interval_calibration.astype(np.float32),
                        reference_scores=trust.reference_scores.astype(np.float32))
    with update_bundle(bundle_path) as bundle:
        path = bundle.path / TRUST_FILE
        with storage_errors(path, buffer.tell()):
            atomic_write_bytes(path, buffer.getvalue())
        record = {"file": TRUST_FILE, "format": TRUST_FORMAT, "sha256": sha256_file(path),
                  "size_bytes": path.stat().st_size, **trust.record}
        bundle.meta["trust"] = record
    return record


def load_trust(bundle: Bundle) -> Trust | None:
    """The bundle's trust file, checked; None where the bundle has none (exported before edgeclf
    fitted one: the caller says so in one line and goes on without it).

    Raises:
        BundleError: the file is missing, altered, over its budget, malformed, of other shapes than
            the model's, or holds values that are not finite or not positive where they must be.
    """
    record = bundle.meta.get("trust")
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("format") != TRUST_FORMAT:
        raise BundleError(f"bundle.json's trust record is not one this edgeclf reads (format {TRUST_FORMAT!r}). "
                          f"Received: {str(record)[:200]}")
    path = bundle.inside(record.get("file"), "trust.file")
    if not path.is_file():
        raise BundleError(f"{path} is missing; bundle.json records it as the trust file. Re-export the bundle")
    size = path.stat().st_size
    if size > MAX_TRUST_BYTES or size != record.get("size_bytes") or sha256_file(path) != record.get("sha256"):
        raise BundleError(f"{path.name} differs from the trust file export wrote (size or sha256 against bundle.json; "
                          f"a trust file of another bundle?): re-export the bundle. Received: {size:,} bytes")
    classes = len(bundle.labels)
    arrays = read_npz(path, MEMBERS, MAX_TRUST_BYTES, lambda headers: _check_shapes(headers, path, classes),
                      what="the trust file")
    bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
    eigen, residual = arrays["eigenvalues.npy"], float(arrays["residual.npy"])
    temperature = record.get("temperature")
    if bad or not (eigen > 0).all() or not residual > 0 or not _positive(temperature):
        raise BundleError(f"{path.name} holds values that are NaN, infinite or not positive where they must be "
                          f"(arrays {bad}, eigenvalues > 0, residual > 0, temperature > 0): it is not one export "
                          f"wrote; re-export the bundle. Received: temperature {temperature!r}, residual {residual!r}")
    familiarity = Familiarity(arrays["means.npy"].astype(np.float64), arrays["basis.npy"].astype(np.float64),
                              eigen.astype(np.float64), residual,
                              np.sort(arrays["familiarity_calibration.npy"]))
    return Trust(float(temperature), familiarity, np.sort(arrays["interval_calibration.npy"]),
                 arrays["reference_scores.npy"], record)


def embedding_block(record: Any) -> str | None:
    """The backbone block whose pooled output is the graphs' ``embedding``, from a trust record
    (``bundle.json["trust"]``); None: the head's input, or a bundle with no trust record yet."""
    familiarity = record.get("familiarity") if isinstance(record, dict) else None
    if not isinstance(familiarity, dict):
        return None
    if "block" in familiarity:
        return familiarity["block"]
    # Exported before export chose the block: the record only described it.
    described = str(familiarity.get("embedding", ""))
    return described.removeprefix(POOLED_BLOCK_TEXT) if described.startswith(POOLED_BLOCK_TEXT) else None


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_shapes(headers: dict, path: Path, classes: int) -> None:
    shapes = {name.removesuffix(".npy"): (shape, dtype) for name, (shape, dtype, _) in headers.items()}
    means, basis, eigen = shapes["means"][0], shapes["basis"][0], shapes["eigenvalues"][0]
    floats = all(dtype.kind == "f" for _, dtype in shapes.values())
    vectors = all(len(shapes[k][0]) == 1 and shapes[k][0][0] >= 1
                  for k in ("familiarity_calibration", "interval_calibration", "reference_scores"))
    fits = (floats and vectors and len(means) == 2 and means[0] == classes and len(basis) == 2
            and basis[0] == means[1] and 1 <= basis[1] <= basis[0] and eigen == (basis[1],)
            and shapes["residual"][0] == ())
    if not fits:
        raise BundleError(f"{path.name} does not fit this model: expected float means [{classes}, D], basis [D, r], "
                          f"eigenvalues [r], a scalar residual and non-empty score vectors. Received: "
                          + ", ".join(f"{k} {d} {list(s)}" for k, (s, d) in shapes.items()))


def offset_record(artifact: np.ndarray, keras: np.ndarray) -> dict[str, Any]:
    """An artifact record's ``embedding_offset``: the mean of its embedding less Keras' over the same
    training images (``artifact``, ``keras``: [N, D]), with how far that moves each channel."""
    offset = (np.asarray(artifact, np.float64) - np.asarray(keras, np.float64)).mean(axis=0)
    spread = np.asarray(keras, np.float64).std(axis=0)
    relative = np.abs(offset) / np.where(spread > 0, spread, np.inf)
    return {"values": [float(f"{v:.6g}") for v in offset], "images": int(len(keras)),
            "measured_on": "training images (INT8 calibration): mean of the artifact's embedding less Keras'",
            "median_shift_of_spread": float(np.median(relative)), "largest_shift_of_spread": float(relative.max())}


def embedding_offset(record: dict[str, Any] | None, trust: Trust | None) -> np.ndarray | None:
    """The offset an artifact's record says its embedding sits off Keras', as float32 [D]; None without
    one (or without a trust file, which alone scores embeddings).

    Raises:
        BundleError: an offset that is not D finite numbers, D the familiarity model's width.
    """
    found = (record or {}).get("embedding_offset")
    if found is None or trust is None:
        return None
    values = found.get("values") if isinstance(found, dict) else None
    dimension = trust.familiarity.dimension
    try:
        offset = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        offset = np.empty(0, dtype=np.float32)
    if offset.shape != (dimension,) or not np.isfinite(offset).all():
        raise BundleError(f"bundle.json's embedding_offset must be {dimension} finite numbers (the familiarity "
                          f"model's width); the bundle is damaged: export it again. Received: "
                          f"{str(values)[:80]}")
    return offset
