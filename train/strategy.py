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


def make_strategy(name: str, peer_timeout: float = 300.0) -> "tf.distribute.Strategy":
    """Create a distribution strategy by name.

    - ``default``: one device (TensorFlow's default strategy).
    - ``mirrored``: synchronous data parallelism on one host, over every GPU; on a
      machine without GPUs, over every logical CPU device (useful for testing).
    - ``multiworker``: synchronous data parallelism across hosts; each host runs the
      same command with ``TF_CONFIG`` describing the cluster and its own task.

    The batch size given to training is the global batch, split across replicas. A
    multi-worker run first waits up to ``peer_timeout`` seconds for every peer to listen
    (:func:`wait_for_peers`): TensorFlow itself would wait forever.
    """
    import tensorflow as tf
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            warnings.warn("TF_CONFIG is not set: MultiWorkerMirroredStrategy runs as a single worker.")
        config = check_tf_config()
        if config is not None:
            wait_for_peers(config, peer_timeout)
        return _reduces_nested_batches(tf.distribute.MultiWorkerMirroredStrategy())
    raise InvalidInputError(f"unknown strategy {name!r}; expected one of {list(STRATEGIES)}.")


def _reduces_nested_batches(strategy):
    """``strategy`` whose ``reduce`` also takes an (x, y) batch, as Keras' ``fit`` gives it.

    Before training, Keras 3 (3.15 here; keras-team/keras#20585) reduces the first
    distributed batch, a tuple, only to learn its shapes. ``reduce`` takes one value, and
    MultiWorkerMirroredStrategy with two workers fails on the tuple ("Attempt to convert
    a value (PerReplica...)"), so every multi-worker ``fit`` did. A nested value gets each
    leaf's local replica here: the shapes Keras wants, without a collective.

    Each step, Keras then averages the replicas' scalar loss and metrics with ``axis=0``,
    which a scalar has not: those are averaged across replicas only (``axis=None``). Other
    values are reduced as before.
    """
    import tensorflow as tf

    reduce = strategy.reduce

    def nested_or_single(reduce_op, value, axis=None):
        if not isinstance(value, (tuple, list, dict)):
            local = strategy.experimental_local_results(value)[0] \
                if isinstance(value, tf.distribute.DistributedValues) else value
            if axis is not None and getattr(local, "shape", None) is not None and local.shape.rank == 0:
                axis = None  # a scalar (a step's loss or metric): only across replicas
            return reduce(reduce_op, value, axis=axis)
        return tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues)
            else v, value)

    strategy.reduce = nested_or_single
    return strategy


def is_chief(strategy) -> bool:
    """Whether this process writes outputs: always, except non-chief multi-worker tasks."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def check_tf_config(text: str | None = None) -> dict | None:
    """The cluster in ``TF_CONFIG`` (``text``, else the environment's), checked before
    TensorFlow waits on it: a mistake there otherwise shows as a hang or a gRPC traceback.

    Raises:
        InvalidInputError: not JSON, no ``cluster`` of role -> ["host:port", ...] lists, a
            ``task`` whose type or index is not in the cluster, or an address listed twice.
    """
    text = os.environ.get("TF_CONFIG") if text is None else text
    if not text:
        return None
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidInputError(f"TF_CONFIG is not valid JSON ({reason}). Received: {text[:200]!r}") from None
    expected = ('expected {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}. '
                f"Received: {text[:200]!r}")
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(hosts, list) and hosts and all(isinstance(h, str) and ":" in h for h in hosts)
            for hosts in cluster.values()):
        raise InvalidInputError(f"TF_CONFIG needs a cluster of role -> list of host:port; {expected}")
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int) \
            or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise InvalidInputError(f"TF_CONFIG's task must name a role and an index in its cluster; {expected}")
    for host in (h for hosts in cluster.values() for h in hosts):
        _host_port(host, text)
    addresses = [host for hosts in cluster.values() for host in hosts]
    twice = sorted({host for host in addresses if addresses.count(host) > 1})
    if twice:
        raise InvalidInputError(f"TF_CONFIG lists {', '.join(twice)} more than once: each worker needs its own "
                                f"host:port. Received: {text[:200]!r}")
    return config


def _host_port(address: str, text: str) -> tuple[str, int]:
    """"host:port" (or "[v6]:port") split, the port a number in 1..65535."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        raise InvalidInputError(f"TF_CONFIG address {address!r} needs host:port with a port in 1..65535. "
                                f"Received: {text[:200]!r}")
    return host.strip("[]"), int(port)


def _own_address(config: dict) -> str:
    return config["cluster"][config["task"]["type"]][config["task"]["index"]]


def wait_for_peers(config: dict, timeout: float, poll: float = 0.5) -> None:
    """Wait until every other task in ``config`` accepts a TCP connection, or fail after ``timeout`` s.

    While it waits, this task listens on its own address, so peers that start at the same
    time see each other; each connection names the task that made it, and the listener stays
    up until every peer has reached it once (or the timeout ends), then closes before
    TensorFlow binds there. So no peer is left waiting on a listener that closed while that
    peer was not scheduled, however busy the machine. The wait is plain Python: SIGINT and
    SIGTERM end it at once.

    Raises:
        InvalidInputError: a peer still unreachable after ``timeout`` seconds (named).
    """
    import socket
    import time

    own = _own_address(config)
    peers = [h for hosts in config["cluster"].values() for h in hosts if h != own]
    if not peers:
        return
    listener = None
    try:
        listener = socket.create_server(_host_port(own, own), reuse_port=False)
        listener.setblocking(False)
    except OSError:
        listener = None  # not an address of this host, or taken: the peers then wait for TensorFlow's server
    deadline = time.monotonic() + timeout
    waiting = list(peers)
    callers = _Callers(listener)

    def connect_timeout() -> float:
        return max(0.05, min(poll, 2.0, deadline - time.monotonic()))

    try:
        while waiting:
            callers.answer()
            # Each connect waits at most ``poll`` seconds, and none starts after the deadline:
            # many unanswering peers (connects that time out) cannot stretch the wait.
            waiting = [peer for peer in waiting
                       if time.monotonic() >= deadline or not _reachable(peer, own, connect_timeout())]
            if waiting and time.monotonic() >= deadline:
                raise InvalidInputError(
                    f"multi-worker training could not reach {', '.join(waiting)} within {timeout:g} s (--peer-timeout): "
                    f"start every worker of TF_CONFIG, and check the addresses and firewalls. Received: "
                    f"{len(peers)} peer(s) of {own}")
            if waiting:
                time.sleep(poll)
        # Peers that have not reached this listener yet are still waiting for it.
        while listener is not None and not callers.heard >= set(peers) and time.monotonic() < deadline:
            callers.answer()
            time.sleep(0.05)
    finally:
        callers.close()
        if listener is not None:
            listener.close()


class _Callers:
    """The connections peers make to this task's listener while it waits, and who has made one."""

    MAX_OPEN = 64  # connections yet to name their task: a stray client cannot make it hold more

    def __init__(self, listener) -> None:
        self.listener = listener
        self.heard: set[str] = set()
        self.open: list[tuple[object, bytes]] = []

    def answer(self) -> None:
        """Accept the connections waiting on the listener; note the task each one names, then close it."""
        while self.listener is not None:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # BlockingIOError: none waiting
                break
            connection.setblocking(False)
            self.open.append((connection, b""))
            if len(self.open) > self.MAX_OPEN:
                self.open.pop(0)[0].close()
        still = []
        for connection, data in self.open:
            try:
                chunk = connection.recv(256)
            except BlockingIOError:
                chunk = None
            except OSError:
                chunk = b""
            if chunk is None or (chunk and b"\n" not in data + chunk and len(data + chunk) < 256):
                still.append((connection, data + (chunk or b"")))
                continue
            self.heard.add((data + chunk).split(b"\n")[0].decode("ascii", "replace"))
            connection.close()
        self.open = still

    def close(self) -> None:
        for connection, _ in self.open:
            connection.close()
        self.open = []


def _reachable(address: str, own: str, timeout: float) -> bool:
    """Whether ``address`` accepts a connection; the connection names ``own``, the task making it."""
    import socket

    try:
        with socket.create_connection(_host_port(address, address), timeout=timeout) as connection:
            connection.sendall(own.encode("ascii", "replace") + b"\n")
            return True
    except OSError:
        return False
