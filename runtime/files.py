"""Predicting image files and directories, each failure reported without stopping the rest."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import EdgeclfError
from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS
from edgeclf.runtime.decode_ahead import DEFAULT_DECODE_THREADS, decode_ahead
from edgeclf.runtime.inputs import image_frames


def image_paths(inputs: Iterable[str | os.PathLike]) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for each image file, directories read recursively (sorted); (path, error)
    for an input that does not exist or a directory without images."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                yield path, f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under this directory"
            for p in found:
                yield p, None
        elif path.exists():
            yield path, None  # any name: a file that is not an image fails at decoding, by name
        else:
            yield path, _missing_reason(path)


def _missing_reason(path: Path) -> str:
    """Why ``path`` cannot be opened: "no such file or directory", or the real reason
    (a symlink loop, a permission) that ``Path.exists`` hides."""
    try:
        os.stat(path)
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return "no such file or directory"


def predict_paths(predictor, inputs: Iterable[str | os.PathLike], top_k: int = 1) -> Iterator[dict[str, Any]]:
    """One record per file, in input order: ``{"file", "label", "index", "confidence"[, "top_k"]}``
    or ``{"file", "error"}``. Files are decoded on the predictor's decode threads, a batch ahead
    of the backend, and inferred in batches."""
    pending: list[tuple[Path, np.ndarray | str]] = []  # a frame, or the error that replaced it

    def flush() -> Iterator[dict[str, Any]]:
        frames = [item for _, item in pending if isinstance(item, np.ndarray)]
        predictions: list[dict[str, Any]] | str = []
        if frames:
            try:
                predictions = [p.to_dict() for p in predictor.predict_batch(np.concatenate(frames), top_k)]
            except EdgeclfError as exc:
                predictions = str(exc)
        answers = iter(predictions) if isinstance(predictions, list) else None
        for path, item in pending:
            if isinstance(item, str):
                yield {"file": str(path), "error": item}
            elif answers is None:
                yield {"file": str(path), "error": predictions}
            else:
                yield {"file": str(path), **next(answers)}
        pending.clear()

    decoded = 0
    max_pixels = getattr(predictor, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)  # each file's pixel budget

    def frames(entry: tuple[Path, str | None]) -> np.ndarray | str:
        path, problem = entry
        return problem if problem is not None else image_frames(path, predictor.image_size, str(path), max_pixels)

    # The next batch decodes on the decode threads while the backend runs this one.
    threads = getattr(predictor, "decode_threads", DEFAULT_DECODE_THREADS)
    with closing(decode_ahead(image_paths(inputs), frames, threads, 2 * predictor.batch_size)) as ahead:
        for (path, _), item in ahead:
            pending.append((path, str(item) if isinstance(item, EdgeclfError) else item))
            decoded += isinstance(item, np.ndarray)
            if decoded >= predictor.batch_size:
                yield from flush()
                decoded = 0
    yield from flush()
