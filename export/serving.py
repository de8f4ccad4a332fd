"""The serving function every exported graph is converted from.

uint8 NHWC RGB ``pixels`` in; the cast to float32 and the model (whose first layer does
the backbone's scaling) inside; ``logits``, the integer ``label`` and the ``embedding``
out. The embedding is the pooled output of the backbone block export chose for the
familiarity check (:mod:`edgeclf.export.familiarity_choice`): the device scores how familiar
an image is from it (:mod:`edgeclf.trust`), since the logits of noise or a black frame are
as confident as those of a real image. The labels table is
created inside the function: an eager constant would become an extra input.
"""

from __future__ import annotations

from typing import Callable

from edgeclf.bundle import Bundle

#: The graph's outputs, in order: ``logits`` first, so whatever reads the first output still gets them.
OUTPUT_ORDER = ("logits", "label", "embedding")


def serving_function(model, bundle: Bundle) -> tuple[Callable, "object"]:
    """(serve, input spec) for the bundle's Keras ``model``; ``serve`` is not yet traced.

    ``model`` gives [logits, embedding] (an :func:`edgeclf.train.model.embedding_model`, as export
    passes it), or logits alone: its embedding is then the block the bundle's trust record names."""
    import tensorflow as tf

    from edgeclf.train.model import embedding_model
    from edgeclf.trust_file import embedding_block

    height, width = bundle.image_size
    labels = list(bundle.labels)
    spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name="pixels")
    both = model if len(model.outputs) == 2 else embedding_model(model, embedding_block(bundle.meta.get("trust")))

    def serve(pixels):
        logits, embedding = both(tf.cast(pixels, tf.float32), training=False)
        table = tf.constant(labels, dtype=tf.int64)
        label = tf.gather(table, tf.argmax(logits, axis=-1, output_type=tf.int64))
        return {"logits": tf.identity(logits, name="logits"), "label": tf.identity(label, name="label"),
                "embedding": tf.identity(embedding, name="embedding")}

    return serve, spec

