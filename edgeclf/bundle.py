"""The bundle: the directory contract between train, export and runtime.

``bundle.json`` describes one trained model: its labels (class index -> integer), the
input it takes, the preprocessing, the backbone, how it was trained, its metrics and
(after export) its artifacts. This module reads and writes it and imports nothing
heavy, so the device runtime can use it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeclf.errors import BundleError
from edgeclf.fsio import atomic_write_json, sha256_file

BUNDLE_FORMAT = "edgeclf-bundle/1"
BUNDLE_FILE = "bundle.json"
MODEL_FILE = "model.keras"
CONFUSION_PNG = "confusion_matrix.png"

_REQUIRED_KEYS = ("format", "labels", "input", "preprocessing", "backbone")


@dataclass
class Bundle:
    """A bundle directory and its parsed ``bundle.json``."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[int]:
        """Class index -> integer; decoding is ``labels[argmax(logits)]``."""
        return list(self.meta["labels"])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        return int(self.meta["input"]["height"]), int(self.meta["input"]["width"])

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        """Read and check a bundle directory.

        Raises:
            BundleError: the directory or its ``bundle.json`` is missing, not JSON, of
                another format version, or lacks a required key.
        """
        path = Path(path)
        meta_path = path / BUNDLE_FILE
        if not path.is_dir():
            raise BundleError(f"bundle directory not found. Received: {path}")
        if not meta_path.is_file():
            raise BundleError(
                f"not an edgeclf bundle: the directory has no {BUNDLE_FILE} "
                f"(create one with `edgeclf train DATA --out DIR`). Received: {path}"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"bundle.json is corrupt (not valid JSON: {exc}). Received: {meta_path}") from None
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path} must hold a JSON object. Received: {type(meta).__name__}")
        if meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(
                f"{meta_path} has format {meta.get('format')!r}; this edgeclf reads "
                f"{BUNDLE_FORMAT!r}. Re-create the bundle with this version of edgeclf."
            )
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        if missing:
            raise BundleError(f"{meta_path} lacks required keys {missing}. Received keys: {sorted(meta)}")
        labels = meta["labels"]
        if (
            not isinstance(labels, list)
            or len(labels) < 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
            or labels != sorted(set(labels))
        ):
            raise BundleError(
                f"{meta_path}: 'labels' must be a sorted list of at least two distinct integers. "
                f"Received: {labels!r}"
            )
        spec = meta["input"]
        if not isinstance(spec, dict) or not all(
            isinstance(spec.get(k), int) and spec[k] > 0 for k in ("height", "width", "channels")
        ):
            raise BundleError(
                f"{meta_path}: 'input' must give positive integer height, width and channels. "
                f"Received: {spec!r}"
            )
        return cls(path=path, meta=meta)

    def save(self) -> None:
        """Write ``bundle.json`` atomically."""
        atomic_write_json(self.path / BUNDLE_FILE, self.meta)


def verify_artifact(path: Path, record: dict[str, Any]) -> None:
    """Refuse an artifact whose bytes differ from what export validated and recorded.

    Raises:
        BundleError: the file (or an OpenVINO IR's weights file) is missing, truncated or altered.
    """
    files = [(path, record["sha256"])]
    if "weights_file" in record:
        files.append((path.with_name(record["weights_file"]), record["weights_sha256"]))
    for file, expected in files:
        if not file.is_file():
            raise BundleError(f"{file} is missing; bundle.json records it as an artifact")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(f"{file.name} differs from the file export validated (sha256 {actual[:12]}..., "
                              f"bundle.json says {expected[:12]}...): it was truncated or altered; export again")
