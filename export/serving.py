"""The serving function every exported graph is converted from.

uint8 NHWC RGB ``pixels`` in; the cast to float32 and the model (whose first layer does
the backbone's scaling) inside; ``logits`` and the integer ``label`` out. The labels
table is created inside the function: an eager constant would become an extra input.
"""

from __future__ import annotations

from typing import Callable

from edgeclf.bundle import Bundle


def serving_function(model, bundle: Bundle) -> tuple[Callable, "object"]:
    """(serve, input spec) for the bundle's Keras ``model``; ``serve`` is not yet traced."""
    import tensorflow as tf

    height, width = bundle.image_size
    labels = list(bundle.labels)
    spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name="pixels")

    def serve(pixels):
        logits = model(tf.cast(pixels, tf.float32), training=False)
        table = tf.constant(labels, dtype=tf.int64)
        label = tf.gather(table, tf.argmax(logits, axis=-1, output_type=tf.int64))
        return {"logits": tf.identity(logits, name="logits"), "label": tf.identity(label, name="label")}

    return serve, spec
