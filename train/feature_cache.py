"""Phase 1's frozen-backbone features, computed once and kept on disk.

The features of a frozen backbone depend only on its weights, the image size, the
images and how they are decoded and scaled. They are written once, as ``.npy`` files
that later reads memory-map (rows are read batch by batch, never the whole array),
under a key made of exactly those inputs. A later run with the same key (another head
learning rate, more phase-1 epochs, a resumed run) reads them instead of running the
backbone again.

Key inputs: the backbone's name and a sha256 of all its weights as they are when
phase 1 starts (so a random backbone's seed, its BatchNormalization estimate and
``--init-from`` all count), the image size, the preprocessing and decoder, and each
image in order: path, size and modification time for files, decoded up front or streamed
(as make and ccache do: reading every file's bytes would cost as much as decoding it), a
sha256 of the pixels for arrays that came from no file.

An entry is written into a temporary folder and renamed into place, so a reader never
sees half of one, and two processes computing the same key (two workers on one host)
both end up reading one complete copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import DataError, InvalidInputError
from edgeclf.fsio import read_json
from edgeclf.images import DECODE_SPEC
from edgeclf.progress import log, progress

#: Bumped when the layout or the meaning of a cache entry changes.
CACHE_FORMAT = 1
SPLITS = ("train", "val")
#: meta.json holds the entry's description: about a kilobyte.
MAX_META_BYTES = 1 << 20


def default_cache_dir() -> Path:
    """``$EDGECLF_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgeclf``, else ``~/.cache/edgeclf``."""
    if os.environ.get("EDGECLF_CACHE_DIR"):
        return Path(os.environ["EDGECLF_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeclf"


def weights_sha256(model) -> str:
    """sha256 of every weight of ``model`` (trainable or not), in order."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def images_sha256(data) -> str:
    """sha256 naming the images of ``data`` in order (see the module docstring)."""
    digest = hashlib.sha256()
    # Images read from files are named by the files, whether decoded up front or streamed, so
    # that both inputs share a key; arrays (from_arrays, the built-in digits) by their pixels.
    if hasattr(data, "images") and not all(os.path.isfile(source) for source in data.sources):
        digest.update(str(data.images.shape).encode())
        digest.update(np.ascontiguousarray(data.images).tobytes())
        return digest.hexdigest()
    for source in data.sources:
        try:
            st = os.stat(source)
        except OSError as exc:
            raise DataError(f"image file disappeared during training ({exc}). Received: {source}") from None
        digest.update(f"{os.path.abspath(source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class FeatureCache:
    """The cache entry for one backbone state and one pair of image lists."""

    def __init__(self, root: str | Path, description: dict[str, Any]):
        self.description = description
        self.key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
        self.root = Path(root)
        self.path = self.root / "features" / self.key[:32]

    @classmethod
    def for_backbone(cls, root, backbone, spec, image_size, train_set, val_set) -> "FeatureCache":
        return cls(root, {
            "format": CACHE_FORMAT,
            "backbone": spec.name,
            "weights_sha256": weights_sha256(backbone),
            "image_size": list(image_size),
            "feature_width": int(backbone.output.shape[-1]),  # pooling keeps the channels
            "preprocessing": spec.preprocessing,
            "decode": DECODE_SPEC,
            "train_images": [len(train_set), images_sha256(train_set)],
            "val_images": [len(val_set), images_sha256(val_set)],
        })

    def load(self, quiet: bool = False) -> dict[str, np.ndarray] | None:
        """The cached features as read-only memory maps, or None when this key has none.

        An entry is used only if each file holds float32 rows of the described width, as
        many as the images it caches, all finite: anything else (a truncated or edited file,
        NaN) is a miss, said once unless ``quiet``, and computed again.
        """
        try:
            meta = read_json(self.path / "meta.json", MAX_META_BYTES)
        except FileNotFoundError:
            return None  # not computed yet
        except (OSError, ValueError) as exc:
            if not quiet:
                log(f"feature cache entry {self.path} is damaged (meta.json: {exc}): computing it again")
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("description"), dict):
            if not quiet:
                log(f"feature cache entry {self.path} is damaged (meta.json holds no description): computing it again")
            return None
        if meta["description"] != self.description:
            return None  # a 128-bit prefix collision, or an entry from another format
        features = {}
        for split in SPLITS:
            try:
                path = self.path / f"{split}.npy"
                if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block np.load forever
                    raise ValueError("not a regular file")
                features[split] = np.load(path, mmap_mode="r", allow_pickle=False)
                problem = self._problem(split, features[split])
            except (OSError, ValueError) as exc:
                problem = f"unreadable ({exc})"
            if problem:
                if not quiet:
                    log(f"feature cache entry {self.path} is damaged ({split}.npy {problem}): computing it again")
                return None
        return features

    def _problem(self, split: str, array: np.ndarray) -> str | None:
        """What is wrong with ``array`` as the features of ``split``, or None."""
        rows = self.description[f"{split}_images"][0]
        width = self.description["feature_width"]
        if array.dtype != np.float32 or array.shape != (rows, width):
            return f"holds {array.dtype} {array.shape}, expected float32 ({rows}, {width})"
        for start in range(0, rows, 4096):  # in slices: a memory map is not read whole
            if not np.isfinite(array[start:start + 4096]).all():
                return "holds NaN or infinite values"
        return None

    def compute(self, extractor, sets: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
        """Run ``extractor`` over ``sets`` (``train``, ``val``) into a new entry; return it memory-mapped."""
        import tensorflow as tf

        from edgeclf.train.pipeline import pixel_batches, steps_per_epoch

        # One traced graph for every batch: calling the model eagerly ran InceptionV3 at 75x75
        # 3.7x slower than Keras' predict (25.5 s against 6.9 s for 1,437 images), and predict
        # itself would gather every worker's rows under MultiWorkerMirroredStrategy.
        features_of = tf.function(lambda x: extractor(x, training=False), input_signature=[
            tf.TensorSpec([None, *extractor.input_shape[1:]], tf.float32)])

        try:
            self.root.joinpath("features").mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{self.key[:32]}.", dir=self.path.parent))
        except OSError as exc:
            raise InvalidInputError(f"cannot write the feature cache ({exc}). Received: {self.root}; pass "
                                    f"--feature-cache-dir DIR (a writable folder) or --no-feature-cache") from None
        try:
            dim = int(extractor.output_shape[-1])
            for split in SPLITS:
                data = sets[split]
                out = np.lib.format.open_memmap(stage / f"{split}.npy", mode="w+", dtype=np.float32,
                                                shape=(len(data), dim))
                row = 0
                batches = pixel_batches(data, batch_size)
                for x in progress(batches, steps_per_epoch(len(data), batch_size),
                                  f"backbone features of the {split} images", unit="batch"):
                    f = np.asarray(features_of(x))
                    out[row:row + len(f)] = f
                    row += len(f)
                out.flush()
                del out
            (stage / "meta.json").write_text(json.dumps({"description": self.description}, indent=1))
            self._publish(stage)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        features = self.load()
        if features is None:
            raise DataError(f"feature cache entry {self.path} could not be read back after writing it")
        return features

    def _publish(self, stage: Path) -> None:
        """Rename ``stage`` into place; a damaged entry is replaced, a complete one (another
        process's) kept."""
        if self.path.exists() and self.load(quiet=True) is None:
            shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.rename(stage, self.path)
        except OSError:
            if self.load(quiet=True) is None:
                raise
            log(f"feature cache {self.path} was written meanwhile by another process; using it")
