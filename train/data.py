"""Labelled image data: loaders, the label mapping and the train/validation split.

Every loader returns an :class:`ImageSet` of decoded uint8 RGB images at the model's
input size, or, with ``lazy=True``, an :class:`ImageFiles`: the same list of files and
labels, decoded again batch by batch when a pipeline reads them, so that memory does
not grow with the number of images. Either way every file is decoded once up front,
in parallel, with the same decoder as the device runtime (:mod:`edgeclf.images`); a
corrupt file is therefore found before training starts, never mid-epoch.

Unreadable images: by default they are skipped, listed in a warning and recorded in
the bundle (``training.skipped_images``); with ``strict=True`` (CLI ``--strict``)
the first one fails the run. A class left with fewer than two images is an error.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edgeclf import limits
from edgeclf.errors import DataError, ImageDecodeError
from edgeclf.images import IMAGE_EXTENSIONS, load_image
from edgeclf.progress import progress

_INT_NAME = re.compile(r"[+-]?[0-9]+", re.ASCII)
BUILTIN_DATASETS = ("digits",)
#: How images reach training: all decoded in memory, streamed from the files, or chosen by size.
INPUT_MODES = ("auto", "memory", "stream")
#: Under ``auto``, data sets whose decoded pixels exceed this are streamed (1 GiB: about
#: 4,000 images at 299x299). Streaming costs nothing measurable where the network's
#: compute dominates (BENCHMARKS.md, "Training input"), so the bound is about memory.
IN_MEMORY_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class LabelMap:
    """Class index <-> integer label. ``labels`` is sorted; index ``i`` means ``labels[i]``."""

    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        labels = tuple(int(v) for v in self.labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise DataError(f"labels must be at least two distinct integers. Received: {list(self.labels)}")
        object.__setattr__(self, "labels", tuple(sorted(labels)))

    @classmethod
    def from_values(cls, values: Iterable[int], labels: Sequence[int] | None = None) -> "LabelMap":
        """The map for ``values``: the declared ``labels`` if given, else the values seen."""
        seen = sorted({int(v) for v in values})
        if labels is None:
            return cls(tuple(seen))
        label_map = cls(tuple(labels))
        unknown = sorted(set(seen) - set(label_map.labels))
        if unknown:
            raise DataError(
                f"the data holds labels {unknown} that are not in the declared labels "
                f"{list(label_map.labels)}. Received values: {seen}"
            )
        return label_map

    def encode(self, values: np.ndarray | Sequence[int]) -> np.ndarray:
        """Integer labels -> class indices (int64)."""
        values = np.asarray(values, dtype=np.int64)
        table = np.asarray(self.labels, dtype=np.int64)
        idx = np.searchsorted(table, values)
        idx_clipped = np.minimum(idx, len(table) - 1)
        bad = table[idx_clipped] != values
        if np.any(bad):
            raise DataError(f"values {sorted(set(values[bad].tolist()))} are not labels {list(self.labels)}.")
        return idx_clipped.astype(np.int64)

    def decode(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Class indices -> integer labels (int64)."""
        return np.asarray(self.labels, dtype=np.int64)[np.asarray(indices, dtype=np.int64)]


class _Labelled:
    """What in-memory and lazy image sets share: labels, sources and the class check."""

    values: np.ndarray
    named_labels: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def all_labels(self) -> list[int]:
        return sorted(set(self.values.tolist()) | set(self.named_labels))

    def check_classes(self, label_map: LabelMap, what: str = "the data") -> None:
        """Every class must have at least two images (one to train on, one to check)."""
        counts = {label: int(np.sum(self.values == label)) for label in label_map.labels}
        few = {label: n for label, n in counts.items() if n < 2}
        if few:
            raise DataError(
                f"every class needs at least 2 images; in {what} these have fewer: "
                + ", ".join(f"label {k}: {v}" for k, v in few.items())
            )


@dataclass
class ImageSet(_Labelled):
    """Decoded images with their integer labels.

    Attributes:
        images: uint8 array [N, H, W, 3], RGB.
        values: int64 array [N] of integer labels (not class indices).
        sources: where each image came from (file path or a synthetic name).
        skipped: (source, reason) for each image that could not be decoded.
    """

    images: np.ndarray
    values: np.ndarray
    sources: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Labels the source names (label folders, CSV rows), including any whose images
    #: were all unreadable, so that such a class is reported rather than dropped.
    named_labels: tuple[int, ...] = ()

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.images.shape[1]), int(self.images.shape[2]))

    def subset(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[idx], self.values[idx], [self.sources[i] for i in idx], [],
                        self.named_labels)

    def pixels(self, idx: np.ndarray) -> np.ndarray:
        """uint8 images ``idx`` (in that order), [len(idx), H, W, 3]."""
        return self.images[np.asarray(idx, dtype=np.int64)]


@dataclass
class ImageFiles(_Labelled):
    """Image files with their integer labels, decoded only when read.

    Every file in ``sources`` decoded once when the set was made (see :func:`scan`),
    so reading it again fails only if the file changed since.

    Attributes:
        sources: image file paths.
        values: int64 array [N] of integer labels.
        image_size: (height, width) every image is resized to.
        skipped: (source, reason) for each image that could not be decoded.
    """

    sources: list[str]
    values: np.ndarray
    image_size: tuple[int, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    named_labels: tuple[int, ...] = ()

    def subset(self, idx: np.ndarray) -> "ImageFiles":
        return ImageFiles([self.sources[i] for i in idx], self.values[idx], self.image_size, [],
                          self.named_labels)

    def pixels(self, idx: np.ndarray) -> np.ndarray:
        """Decode images ``idx`` (in that order), in parallel: [len(idx), H, W, 3] uint8."""
        paths = [self.sources[int(i)] for i in np.asarray(idx).reshape(-1)]
        out = np.empty((len(paths), *self.image_size, 3), dtype=np.uint8)
        for k, image in enumerate(_decoder_pool().map(lambda p: load_image(p, self.image_size), paths)):
            out[k] = image
        return out


def _decode_threads() -> int:
    return max(2, os.cpu_count() or 2)


@functools.lru_cache(maxsize=None)
def _decoder_pool() -> ThreadPoolExecutor:
    """One pool for every streamed batch (not one started per batch). Pillow releases the GIL
    while decoding, so its threads use every core."""
    return ThreadPoolExecutor(max_workers=_decode_threads(), thread_name_prefix="edgeclf-decode")


def parse_label(text: str, where: str) -> int:
    """Parse an integer label (folder name or CSV cell), with a clear error."""
    if not _INT_NAME.fullmatch(text.strip()):
        raise DataError(f"label must be an integer (e.g. 0, 3, -1, 12). Received: {text!r} in {where}")
    return int(text.strip())


def _decode_all(
    items: list[tuple[str, int]], image_size: tuple[int, int], strict: bool,
    named_labels: Iterable[int] = (), lazy: bool = False,
) -> ImageSet | ImageFiles:
    """Decode (path, label) pairs in parallel; skip or fail on unreadable files.

    ``lazy``: keep only the list of files that decoded (an :class:`ImageFiles`), not the
    pixels, so that memory stays flat however many images there are.
    """

    def decode(path: str) -> np.ndarray | str | None:
        try:
            image = load_image(path, image_size)
            return None if lazy else image
        except ImageDecodeError as exc:
            if strict:
                raise
            return str(exc)

    with ThreadPoolExecutor(max_workers=_decode_threads()) as pool:
        decoded = list(progress(pool.map(decode, [p for p, _ in items]), total=len(items),
                                what="checking images" if lazy else "decoding images", unit="img"))
    keep = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    skipped = [(items[i][0], d) for i, d in enumerate(decoded) if isinstance(d, str)]
    if skipped:
        listing = "\n".join(f"  {src}: {reason}" for src, reason in skipped)
        warnings.warn(f"skipped {len(skipped)} unreadable image(s):\n{listing}", stacklevel=3)
    if not keep:
        raise DataError(f"none of the {len(items)} image files could be read. Received (first): {skipped[0][0]}")
    values = np.asarray([items[i][1] for i in keep], dtype=np.int64)
    sources = [items[i][0] for i in keep]
    named = tuple(sorted({label for _, label in items} | set(named_labels)))
    if lazy:
        return ImageFiles(sources, values, tuple(image_size), skipped, named)
    return ImageSet(np.stack([decoded[i] for i in keep]), values, sources, skipped, named)


def load_folder(root: str | Path, image_size: tuple[int, int], strict: bool = False,
                lazy: bool = False) -> ImageSet | ImageFiles:
    """Load a directory with one subfolder per integer label (``0/``, ``-1/``, ``12/``).

    Files with extensions JPEG/PNG/BMP/GIF are read, recursively inside each label
    folder; hidden files and other extensions are ignored. ``lazy``: return an
    :class:`ImageFiles` (pixels decoded when read) instead of an :class:`ImageSet`.

    Raises:
        DataError: the directory is missing or holds no label folders or no images, a
            subfolder name is not an integer, or every file is unreadable.
    """
    items, folders = _list_folder(Path(root))
    return _decode_all(items, image_size, strict, named_labels=folders, lazy=lazy)


def _list_folder(root: Path) -> tuple[list[tuple[str, int]], dict[int, Path]]:
    """(path, label) of every image in a folder dataset, and its label folders."""
    if not root.exists():
        raise DataError(f"data directory not found. Received: {root}")
    if not root.is_dir():
        raise DataError(f"expected a directory of label folders, a .csv file or 'digits'. Received: {root}")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    subdirs = sorted(p for p in entries if p.is_dir())
    if not subdirs:
        found = f"it holds {len(entries)} file(s) but no subfolders" if entries else "it is empty"
        raise DataError(
            f"data directory {root} has no label folders ({found}); expected one subfolder "
            "per integer label (e.g. 0/, 3/, -1/) holding JPEG/PNG/BMP/GIF images."
        )
    items: list[tuple[str, int]] = []
    folders: dict[int, Path] = {}
    for sub in subdirs:
        label = parse_label(sub.name, f"folder {sub}")
        if label in folders:
            raise DataError(
                f"folders {folders[label].name!r} and {sub.name!r} both mean label {label}; "
                f"merge them. Received: {root}"
            )
        folders[label] = sub
        files = sorted(
            p for p in sub.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        items.extend((str(p), label) for p in files)
    if not items:
        raise DataError(f"data directory has label folders but no JPEG/PNG/BMP/GIF images. Received: {root}")
    return items, folders


def load_csv(path: str | Path, image_size: tuple[int, int], strict: bool = False,
             lazy: bool = False) -> ImageSet | ImageFiles:
    """Load a CSV of ``path,label`` rows.

    A first row whose second cell is ``label`` is a header and skipped; blank rows and
    rows starting with ``#`` are ignored. Relative image paths are taken relative to
    the CSV file's directory. ``lazy`` as for :func:`load_folder`.
    """
    return _decode_all(_list_csv(Path(path)), image_size, strict, lazy=lazy)


def _list_csv(path: Path) -> list[tuple[str, int]]:
    """(path, label) of every row of a CSV dataset."""
    if not path.is_file():
        raise DataError(f"CSV file not found. Received: {path}")
    items: list[tuple[str, int]] = []
    first = True
    try:
        # utf-8-sig: spreadsheet programs often start CSV files with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
                    continue
                where = f"{path}:{reader.line_num}"
                if len(row) < 2:
                    raise DataError(f"{where}: expected 'path,label'. Received: {row!r}")
                if first and row[1].strip().lower() == "label":
                    first = False
                    continue  # the header row "path,label"
                first = False
                image_path = Path(row[0].strip())
                if not image_path.is_absolute():
                    image_path = path.parent / image_path
                items.append((str(image_path), parse_label(row[1], where)))
    except UnicodeDecodeError as exc:
        raise DataError(f"CSV file is not UTF-8 text ({exc}). Received: {path}") from None
    if not items:
        raise DataError(f"CSV file lists no images; expected rows of 'path,label'. Received: {path}")
    return items


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as uint8 8x8 grayscale (ink bright) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return gray, digits.target.astype(np.int64)


def load_digits_set(image_size: tuple[int, int]) -> ImageSet:
    """The 1,797 real handwritten digits shipped inside scikit-learn, upscaled to RGB."""
    gray, values = _digits_raw()
    return from_arrays(gray, values, image_size, source_prefix="digits")


def from_arrays(
    images: np.ndarray,
    values: Sequence[int] | np.ndarray,
    image_size: tuple[int, int] | None = None,
    source_prefix: str = "array",
) -> ImageSet:
    """Wrap numpy images and integer labels, converting to uint8 RGB at ``image_size``.

    Args:
        images: [N, H, W] grayscale or [N, H, W, C] with C in {1, 3, 4}; uint8, or
            floats already in 0..255.
        values: N integer labels.
    """
    from PIL import Image

    images = np.asarray(images)
    values = np.asarray(values)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise DataError(
            f"images must be [N, H, W] or [N, H, W, C] with C in 1, 3, 4. Received: shape={images.shape}"
        )
    if images.shape[0] == 0 or min(images.shape[1:3]) == 0:
        raise DataError(f"images must hold at least one image of at least 1x1 pixels. Received: shape={images.shape}")
    if values.ndim != 1 or values.shape[0] != images.shape[0]:
        raise DataError(
            f"need one label per image. Received: {images.shape[0]} images, labels shape={values.shape}"
        )
    if not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"labels must be integers. Received: dtype={values.dtype}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating) or not np.all(np.isfinite(images)):
            raise DataError(f"images must be uint8 or finite floats in 0..255. Received: dtype={images.dtype}")
        if images.min() < 0 or images.max() > 255:
            raise DataError(
                f"float images must be in 0..255. Received: range {images.min():.3g}..{images.max():.3g}"
            )
        images = np.rint(images).astype(np.uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    target = tuple(image_size) if image_size is not None else images.shape[1:3]
    if images.shape[1:3] == target and images.ndim == 4 and images.shape[-1] == 3:
        out = images
    else:  # the same conversion and resize as for image files
        out = np.stack([load_image(Image.fromarray(img), target) for img in images])
    return ImageSet(out, values.astype(np.int64), [f"{source_prefix}[{i}]" for i in range(len(values))])


def load_dataset(source: str | Path, image_size: tuple[int, int], strict: bool = False,
                 input_mode: str = "memory") -> ImageSet | ImageFiles:
    """Load ``digits``, a ``.csv`` of path,label, or a directory of label folders.

    ``input_mode``: ``memory`` decodes every image into an :class:`ImageSet`; ``stream``
    returns an :class:`ImageFiles`, decoded batch by batch when read; ``auto`` streams
    when the decoded images would take more than :data:`IN_MEMORY_MAX_BYTES`. The
    built-in ``digits`` (1,797 images from arrays) is always in memory.
    """
    if input_mode not in INPUT_MODES:
        raise DataError(f"input mode must be one of {list(INPUT_MODES)}. Received: {input_mode!r}")
    if str(source) in BUILTIN_DATASETS:
        return load_digits_set(image_size)
    path = Path(source)
    if path.suffix.lower() == ".csv":
        items, folders = _list_csv(path), {}
    else:
        items, folders = _list_folder(path)
    return _decode_all(items, image_size, strict, named_labels=folders,
                       lazy=streams(input_mode, len(items), image_size))


def streams(input_mode: str, count: int, image_size: tuple[int, int]) -> bool:
    """Whether ``count`` images at ``image_size`` are read lazily under ``input_mode``."""
    if input_mode == "auto":
        return count * image_size[0] * image_size[1] * 3 > IN_MEMORY_MAX_BYTES
    return input_mode == "stream"


def split_stratified(data: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Stratified train/validation split, reproducible through ``seed``."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation split must be between 0 and 1 (exclusive). Received: {val_fraction}")
    idx = np.arange(len(data))
    try:
        train_idx, val_idx = train_test_split(
            idx, test_size=val_fraction, random_state=seed, stratify=data.values
        )
    except ValueError as exc:
        raise DataError(f"cannot split {len(data)} images stratified by class: {exc}") from None
    return data.subset(np.sort(train_idx)), data.subset(np.sort(val_idx))


def write_digits_folder(
    out: str | Path, holdout: float = 0.2, seed: int = 0, size: int = 32, overwrite: bool = False
) -> dict[str, int]:
    """Write scikit-learn's digits as real PNG files: ``out/train/<label>/`` and ``out/test/<label>/``.

    The result is an ordinary folder dataset, so the main job exercises the same
    file-reading path as a user's own images. Returns the number of files per split.
    """
    from PIL import Image
    from sklearn.model_selection import train_test_split

    from edgeclf.fsio import staged_directory

    if not 0.0 < holdout < 1.0:
        raise DataError(f"holdout must be between 0 and 1 (exclusive). Received: {holdout}")
    if size < 8:
        raise DataError(f"size must be at least 8 pixels (the scans are 8x8). Received: {size}")
    gray, values = _digits_raw()
    limits.check_dataset_pixels(len(values), size, "dataset digits")
    idx = np.arange(len(values))
    train_idx, test_idx = train_test_split(idx, test_size=holdout, random_state=seed, stratify=values)
    counts = {}
    with staged_directory(out, overwrite=overwrite) as stage:
        for split, split_idx in (("train", train_idx), ("test", test_idx)):
            for i in np.sort(split_idx):
                folder = stage / split / str(int(values[i]))
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(gray[i]).resize((size, size), Image.Resampling.BICUBIC)
                img.save(folder / f"digit_{i:04d}.png")
            counts[split] = int(len(split_idx))
    print(f"wrote {counts['train']} train and {counts['test']} test PNG images to {out}", file=sys.stderr)
    return counts
