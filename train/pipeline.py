"""tf.data pipelines that read images (or cached features) by index.

Every pipeline is a stream of index batches mapped through a reader: an in-memory
:class:`ImageSet` gathers its uint8 pixels, an :class:`ImageFiles` decodes its files
with the runtime's Pillow decoder, in parallel, prefetched. Both read the same indices
in the same order, so they give identical batches for the same seed.

Training order is ``epoch_order(n, seed, epoch)``: a permutation that depends on the
epoch number alone, not on how many epochs this process has run, so that a resumed run
sees the batches an uninterrupted one would. Images stay uint8 until the batch is
cast; the model's first layer does the backbone's scaling.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import keras
import numpy as np
import tensorflow as tf


class Readable(Protocol):
    """An image set that :func:`pixel_batches` can read: ImageSet, ImageFiles."""

    image_size: tuple[int, int]

    def __len__(self) -> int: ...

    def pixels(self, idx: np.ndarray) -> np.ndarray: ...


class _Arrays:
    """uint8 (or float 0..255) images [N, H, W, 3] as a :class:`Readable`."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self.image_size = (int(images.shape[1]), int(images.shape[2]))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pixels(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.images[idx])


def readable(data) -> Readable:
    """``data`` itself if it reads by index, or a wrapper of an image array."""
    return data if hasattr(data, "pixels") else _Arrays(np.asarray(data))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the ``n`` training images in ``epoch`` (0-based), from ``seed`` and ``epoch`` alone."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def _index_batches(n: int, batch_size: int, seed: int | None = None, first_epoch: int = 0,
                   epochs: int = 1) -> tf.data.Dataset:
    """Index batches: in order (``seed=None``), or epochs ``first_epoch..epochs-1`` shuffled."""
    if seed is None:
        return tf.data.Dataset.range(n).batch(batch_size)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.numpy_function(lambda e: epoch_order(n, seed, int(e)), [epoch], tf.int64, stateful=False)
        return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(order, [n])).batch(batch_size)

    return tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)


def _read(indices: tf.data.Dataset, reader: Callable[[np.ndarray], np.ndarray], dtype: tf.DType,
          shape: tuple[int, ...], labels: np.ndarray | None) -> tf.data.Dataset:
    """Map index batches to ``reader(idx)`` (as float32), paired with ``labels[idx]`` if given."""
    y = None if labels is None else tf.constant(np.asarray(labels, dtype=np.int64))

    def read(idx: tf.Tensor):
        x = tf.numpy_function(reader, [idx], dtype, stateful=False)
        x = tf.cast(tf.ensure_shape(x, [None, *shape]), tf.float32)
        return x if y is None else (x, tf.gather(y, idx))

    # Parallel calls keep their order (deterministic by default), so batches do not depend on timing.
    return indices.map(read, num_parallel_calls=tf.data.AUTOTUNE)


def pixel_batches(data, batch_size: int) -> tf.data.Dataset:
    """Batches of float32 pixels of ``data`` (image set or uint8 array), in order."""
    data = readable(data)
    ds = _read(_index_batches(len(data), batch_size), data.pixels, tf.uint8, (*data.image_size, 3), None)
    return ds.prefetch(tf.data.AUTOTUNE)


def augmenter(flip: bool) -> keras.Sequential:
    """Small geometric jitter; flips only on request (a flipped 2 is not a 2)."""
    layers = [
        keras.layers.RandomRotation(0.04, fill_mode="nearest"),
        keras.layers.RandomZoom(0.1, fill_mode="nearest"),
        keras.layers.RandomTranslation(0.08, 0.08, fill_mode="nearest"),
    ]
    if flip:
        layers.insert(0, keras.layers.RandomFlip("horizontal"))
    return keras.Sequential(layers, name="augment")


def training_batches(
    data, y: np.ndarray, batch_size: int, seed: int, augment: keras.Sequential | None,
    first_epoch: int = 0, epochs: int = 1,
) -> tf.data.Dataset:
    """Batches of float32 pixels and class indices for epochs ``first_epoch..epochs-1``.

    Each epoch is :func:`epoch_order`; pass ``steps_per_epoch`` to ``fit``, which then
    reads on through one iterator instead of restarting it every epoch.
    """
    data = readable(data)
    ds = _read(_index_batches(len(data), batch_size, seed, first_epoch, epochs), data.pixels, tf.uint8,
               (*data.image_size, 3), y)
    if augment is not None:
        ds = ds.map(lambda x, t: (augment(x, training=True), t), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def validation_batches(data, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batches of float32 pixels and class indices, in order."""
    data = readable(data)
    ds = _read(_index_batches(len(data), batch_size), data.pixels, tf.uint8, (*data.image_size, 3), y)
    return ds.prefetch(tf.data.AUTOTUNE)


def feature_batches(features: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = None,
                    first_epoch: int = 0, epochs: int = 1) -> tf.data.Dataset:
    """Batches of cached (memory-mapped) features and class indices; shuffled as
    :func:`training_batches` when ``seed`` is given, else in order. Only the rows of each
    batch are read from disk."""
    indices = _index_batches(len(features), batch_size, seed, first_epoch, epochs)
    ds = _read(indices, lambda idx: np.asarray(features[idx]), tf.float32, features.shape[1:], y)
    return ds.prefetch(tf.data.AUTOTUNE)
