"""tf.data pipelines from decoded uint8 images.

Images stay uint8 in memory (a quarter of float32) and are cast batch by batch; the
model's first layer does the backbone's scaling.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def pixel_batches(images: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """uint8 images -> batches of float32 pixels, cast per batch to keep memory small."""
    return (
        tf.data.Dataset.from_tensor_slices(images)
        .batch(batch_size)
        .map(lambda x: tf.cast(x, tf.float32), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


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
    images: np.ndarray, y: np.ndarray, batch_size: int, seed: int, augment: keras.Sequential | None
) -> tf.data.Dataset:
    """Shuffled (seeded, anew each epoch) batches of float32 pixels and class indices."""
    ds = tf.data.Dataset.from_tensor_slices((images, y)).shuffle(
        len(y), seed=seed, reshuffle_each_iteration=True
    ).batch(batch_size)
    ds = ds.map(lambda x, t: (tf.cast(x, tf.float32), t), num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        ds = ds.map(lambda x, t: (augment(x, training=True), t), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def validation_batches(images: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batches of float32 pixels and class indices, in order."""
    ds = tf.data.Dataset.from_tensor_slices((images, y)).batch(batch_size)
    return ds.map(lambda x, t: (tf.cast(x, tf.float32), t)).prefetch(tf.data.AUTOTUNE)
