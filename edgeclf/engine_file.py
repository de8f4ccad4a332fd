"""The edgeclf TensorRT engine file: a JSON header, then the serialized TensorRT plan.

A raw plan says nothing about itself and only runs on the TensorRT version and GPUs it
was built for; a wrong one fails deep inside TensorRT. The header lets a reader refuse
a mismatch with a clear message before deserializing, and lets a lone engine be
decoded to integers without the bundle. Layout::

    MAGIC (12 bytes) | header length (uint64, little-endian) | header (UTF-8 JSON) | plan

Reading needs neither TensorFlow nor TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from edgeclf.errors import BundleError, IncompatibleArtifactError
from edgeclf.fsio import atomic_write_bytes, parse_json
from edgeclf.limits import is_int

MAGIC = b"EDGECLF-TRT\n"
FORMAT = "edgeclf-engine/1"
_LENGTH = struct.Struct("<Q")
#: A header is a few kB; anything near this is a corrupt length field, not a header.
_MAX_HEADER_BYTES = 16 << 20


def write_engine(path: str | Path, header: dict[str, Any], plan: bytes) -> dict[str, Any]:
    """Atomically write ``header`` + ``plan`` to ``path``; returns the header as written.

    ``format``, ``plan_bytes`` and ``plan_sha256`` are added so a reader can detect a
    truncated or altered plan.
    """
    header = {**header, "format": FORMAT, "plan_bytes": len(plan),
              "plan_sha256": hashlib.sha256(plan).hexdigest()}
    text = json.dumps(header, sort_keys=True).encode("utf-8")
    atomic_write_bytes(path, MAGIC + _LENGTH.pack(len(text)) + text + plan)
    return header


def _read_header(handle, path: Path) -> dict[str, Any]:
    magic = handle.read(len(MAGIC))
    if magic != MAGIC:
        raise BundleError(f"{path} is not an edgeclf TensorRT engine: it does not begin with {MAGIC!r} "
                          f"(found {magic[:12]!r}). Build one with `edgeclf export BUNDLE --format tensorrt`.")
    raw = handle.read(_LENGTH.size)
    if len(raw) != _LENGTH.size:
        raise BundleError(f"{path} is truncated: it ends inside the engine header")
    (length,) = _LENGTH.unpack(raw)
    if length > _MAX_HEADER_BYTES:
        raise BundleError(f"{path}: engine header length {length} is implausible; the file is corrupt")
    text = handle.read(length)
    if len(text) != length:
        raise BundleError(f"{path} is truncated: it ends inside the engine header")
    try:
        header = parse_json(text, "the engine header")
    except ValueError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise BundleError(f"{path}: engine header format {found!r} is not supported; expected {FORMAT!r}")
    _check_header(header, path)
    return header


#: (key path, check, what it must be): what readers of a header rely on.
_HEADER_FIELDS = (
    ("tensorrt.flavour", lambda v: isinstance(v, str), "a string"),
    ("tensorrt.version", lambda v: isinstance(v, str), "a string"),
    ("target.compute_capabilities", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
     "a list of strings such as ['8.6']"),
    ("profile.max", lambda v: isinstance(v, list) and bool(v) and is_int(v[0]) and v[0] > 0,
     "a list beginning with a positive batch size"),
    ("plan_bytes", lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    ("plan_sha256", lambda v: isinstance(v, str), "a string"),
)


def _check_header(header: dict[str, Any], path: Path) -> None:
    for dotted, ok, expected in _HEADER_FIELDS:
        value: Any = header
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is None or not ok(value):
            raise BundleError(f"{path}: engine header field {dotted!r} must be {expected}. "
                              f"Received: {str(value)[:80]}")


def read_engine_header(path: str | Path) -> dict[str, Any]:
    """The header of an engine file, without reading the plan."""
    path = Path(path)
    with open(path, "rb") as handle:
        return _read_header(handle, path)


def read_engine(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """(header, plan) of an engine file; the plan's size and sha256 are checked."""
    path = Path(path)
    with open(path, "rb") as handle:
        header = _read_header(handle, path)
        plan = handle.read()
    if len(plan) != header["plan_bytes"] or hashlib.sha256(plan).hexdigest() != header["plan_sha256"]:
        raise BundleError(f"{path}: the TensorRT plan is truncated or altered ({len(plan)} bytes, "
                          f"header says {header['plan_bytes']}; sha256 checked)")
    return header, plan


def check_engine_compatible(header: dict[str, Any], flavour: str, version: str,
                            compute_capability: str | None) -> None:
    """Raise if an engine cannot run with this TensorRT (``flavour``, ``version``) on this GPU.

    Args:
        compute_capability: the GPU's, as "8.6"; None skips the GPU check.

    Raises:
        IncompatibleArtifactError: naming what the engine was built for and what is here.
    """
    built = header["tensorrt"]
    if built["flavour"] != flavour or built["version"] != version:
        raise IncompatibleArtifactError(
            f"engine built with {built['flavour']} {built['version']}, but {flavour} {version} is installed; "
            f"install that version or rebuild the engine here with `edgeclf export BUNDLE --format tensorrt`"
        )
    targets = header["target"]["compute_capabilities"]
    if compute_capability is not None and compute_capability not in targets:
        raise IncompatibleArtifactError(
            f"engine built for GPU compute capabilities {targets}, but this GPU is {compute_capability}; "
            f"rebuild it with --trt-compute-capability {compute_capability}"
        )
