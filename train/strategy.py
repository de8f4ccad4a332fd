"""tf.distribute strategies behind the ``--strategy`` option."""

from __future__ import annotations

import json
import os
import warnings
from typing import TYPE_CHECKING

from edgeclf.errors import InvalidInputError

if TYPE_CHECKING:
    import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multiworker")


def make_strategy(name: str) -> "tf.distribute.Strategy":
    """Create a distribution strategy by name.

    - ``default``: one device (TensorFlow's default strategy).
    - ``mirrored``: synchronous data parallelism on one host, over every GPU; on a
      machine without GPUs, over every logical CPU device (useful for testing).
    - ``multiworker``: synchronous data parallelism across hosts; each host runs the
      same command with ``TF_CONFIG`` describing the cluster and its own task.

    The batch size given to training is the global batch, split across replicas.
    """
    import tensorflow as tf
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multiworker":
        config = os.environ.get("TF_CONFIG")
        if not config:
            warnings.warn("TF_CONFIG is not set: MultiWorkerMirroredStrategy runs as a single worker.")
        else:
            try:
                json.loads(config)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"TF_CONFIG is not valid JSON ({exc}). Received: {config[:200]!r}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise InvalidInputError(f"unknown strategy {name!r}; expected one of {list(STRATEGIES)}.")


def is_chief(strategy) -> bool:
    """Whether this process writes outputs: always, except non-chief multi-worker tasks."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0
