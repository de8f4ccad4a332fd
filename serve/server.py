"""``edgeclf serve``: the Predictor behind a real Triton Inference Server (PyTriton).

Two models, both answering the integer label (decoded by argmax, or by median with
``decoding``), its confidence and the logits, and where the bundle has a trust file
(:mod:`edgeclf.trust`) how far to trust it: ``interval`` (lowest, highest label at the
``coverage`` asked for), ``familiar`` with its ``p_value``, and the ``embedding`` they come from:

    NAME        pixels  uint8 [N, H, W, 3]  RGB at the model's size. Triton checks dtype and
                                            shape per request, and its dynamic batcher groups
                                            requests from all clients into one backend call.
    NAME_image  image   bytes [N, 1]        encoded image files (PNG, JPEG, ...), decoded as
                                            in training, then sent on to NAME.

Why two: with dynamic batching one backend call serves many requests, and an error in
that call fails all of them. A file that does not decode is a fault of one request, so
``NAME_image`` runs each request on its own (several at once, one per instance) and
only the decoded pixels meet other clients' requests in ``NAME``'s batcher.

Triton itself listens on private loopback ports; the public HTTP and gRPC ports belong
to :mod:`edgeclf.serve.guard`, which refuses what Triton 2.51 cannot hold (a declared
shape of 10**12 images aborts it), turns Triton's error answers into one line and bounds
connections and threads (--max-connections, --guard-threads, --idle-timeout, --header-timeout).

Bound to 127.0.0.1 unless told otherwise; SIGTERM or SIGINT stops the server after the
requests in flight are answered.
"""

from __future__ import annotations

import os
import signal
import socket
import sysconfig
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeclf.decoding import check_decoding
from edgeclf.errors import BackendUnavailableError, InvalidInputError, PortInUseError, ServerError
from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS
from edgeclf.serve.grpc_guard import GrpcGuard
from edgeclf.serve.guard import ConnectionLimits, Limits
from edgeclf.serve.triton_config import Batching, check_model_name
from edgeclf.trust import DEFAULT_ALPHA, DEFAULT_COVERAGE

# On shutdown Triton waits this long for the requests in flight, then as long again for
# the models to unload. Inference takes well under a second on CPU; the bound matters
# because PyTriton's instances of a model whose callable has raised (a request that did
# not decode) never finish unloading, and Triton would wait out the whole timeout.
EXIT_TIMEOUT_S = 10
#: A model's second and later instances fetch their configuration from its first through a
#: Unix socket within one second (PyTriton's handshake); on a busy 2-core machine that can
#: fail ("Connection refused" in get_config_from_handshake_server) and the load with it.
#: Triton is then started again, at most this many times in all.
TRITON_STARTS = 3
HANDSHAKE_RACE = "get_config_from_handshake_server"
#: Open files this process needs besides the public connections (Triton clients, the model, logs).
FILES_RESERVED = 256


@dataclass(frozen=True)
class ServeOptions:
    """Where and how ``edgeclf serve`` listens and batches."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    name: str = "edgeclf"
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None
    batching: Batching = field(default_factory=Batching)
    image_instances: int = 4  # requests of NAME_image decoded at the same time
    max_request_mb: float = 64.0  # larger requests are refused before they are read
    log_file: Path | None = None  # Triton's own log (default: a new file in the temp directory)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # NAME_image refuses larger images before decoding them
    decoding: str = "argmax"  # of the label output: argmax, or median (edgeclf.decoding)
    alpha: float = DEFAULT_ALPHA  # an image is unfamiliar at or below this p-value (edgeclf.trust)
    coverage: float | None = DEFAULT_COVERAGE  # of the interval output; None: no interval
    max_connections: int = 1024  # open connections per public endpoint; more are refused at once
    guard_threads: int = 64  # threads answering requests per public endpoint
    idle_timeout: float = 10.0  # seconds a kept-alive connection may wait for its next request
    header_timeout: float = 10.0  # seconds a request's line and headers may take to arrive

    def __post_init__(self) -> None:
        self.connection_limits()  # InvalidInputError for a value out of range, when the options are made
        check_decoding(self.decoding)

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(max_connections=self.max_connections, threads=self.guard_threads,
                                idle_timeout_s=self.idle_timeout, header_timeout_s=self.header_timeout)

    def ports(self) -> dict[str, int]:
        return {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}


_PORT_NAMES = {"http": "HTTP", "grpc": "gRPC", "metrics": "metrics"}


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Fail early, with the port's name, if a port is invalid, repeated or taken.

    Raises:
        InvalidInputError: a port outside 1..65535, or one port given twice.
        PortInUseError: something already listens on ``host:port``.
    """
    for what, port in ports.items():
        if not 1 <= port <= 65535:
            raise InvalidInputError(f"--{what}-port must be in 1..65535. Received: {port}")
    seen: dict[int, str] = {}
    for what, port in ports.items():
        if port in seen:
            raise InvalidInputError(f"--{what}-port and --{seen[port]}-port are both {port}; each needs its own port")
        seen[port] = what
    for what, port in ports.items():
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As the server will: a port in TIME_WAIT is free, one with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise PortInUseError(f"{_PORT_NAMES[what]} port {port} on {host} is not available "
                                     f"({exc.strerror}); stop what uses it or choose another with --{what}-port") from None


def use_own_libpython() -> None:
    """Make Triton's Python-backend stub load this interpreter's libpython.

    The stub in PyTriton's wheel links ``libpython3.X.so``; the dynamic loader would take
    the system's copy, and under another build of the same Python version the model then
    fails to load (``'_thread.RLock' object has no attribute '_recursion_count'``). The
    server inherits this process's environment.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not Path(libdir).is_dir():
        return
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


def _pytriton():
    """PyTriton's modules, once the serve extra is known to be there (h11 too: the HTTP guard's parser)."""
    try:
        import h11  # noqa: F401 - imported again where the guards start
        from pytriton import model_config, triton
    except ImportError as exc:
        raise BackendUnavailableError(
            f"edgeclf serve needs PyTriton ({exc}); install it with: pip install 'edgeclf[serve]'"
        ) from None
    return model_config, triton


class _Models:
    """The two inference callables over one Predictor."""

    def __init__(self, predictor, name: str, grpc_url: str) -> None:
        self.predictor = predictor
        self.name = name
        self.grpc_url = grpc_url
        self._local = threading.local()  # one gRPC client per instance thread

    def outputs(self, logits: np.ndarray, embedding: np.ndarray | None = None) -> dict[str, np.ndarray]:
        predictions = self.predictor.decode(logits, embedding=embedding)
        out = {
            "label": np.array([[p.label] for p in predictions], dtype=np.int64),
            "confidence": np.array([[p.confidence] for p in predictions], dtype=np.float32),
            "logits": logits.astype(np.float32),
        }
        if self.predictor.coverage is not None and self.predictor.trust is not None:
            out["interval"] = np.array([p.interval for p in predictions], dtype=np.int64)
        if embedding is not None:
            out["familiar"] = np.array([[p.familiar] for p in predictions], dtype=np.bool_)
            out["p_value"] = np.array([[p.p_value] for p in predictions], dtype=np.float32)
            out["embedding"] = embedding.astype(np.float32)
        return out

    def pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self.outputs(*self.predictor.infer_outputs(np.ascontiguousarray(pixels, dtype=np.uint8)))

    def image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        from edgeclf.images import load_image

        frames = np.stack([load_image(bytes(item), self.predictor.image_size, self.predictor.max_image_pixels)
                           for item in image.reshape(len(image), -1)[:, 0]])
        return self.outputs(*self._forward(frames))

    def _forward(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Send decoded pixels to the pixel model, where they join the dynamic batcher: (logits, embedding)."""
        import tritonclient.grpc as grpcclient

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = grpcclient.InferenceServerClient(self.grpc_url)
        tensor = grpcclient.InferInput("pixels", list(frames.shape), "UINT8")
        tensor.set_data_from_numpy(frames)
        names = ["logits"] + (["embedding"] if self.predictor.scores_familiarity else [])
        result = client.infer(self.name, [tensor], outputs=[grpcclient.InferRequestedOutput(n) for n in names])
        return result.as_numpy("logits"), (result.as_numpy("embedding") if len(names) > 1 else None)


def output_tensors(predictor) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(name, dtype, shape per image) of what both served models answer for ``predictor``."""
    out = [("label", np.int64, (1,)), ("confidence", np.float32, (1,)),
           ("logits", np.float32, (len(predictor.labels),))]
    if predictor.coverage is not None and predictor.trust is not None:
        out.append(("interval", np.int64, (2,)))
    if predictor.scores_familiarity:
        out += [("familiar", np.bool_, (1,)), ("p_value", np.float32, (1,)),
                ("embedding", np.float32, (predictor.trust.familiarity.dimension,))]
    return out


def _bind(triton, mc, models: _Models, options: ServeOptions, height: int, width: int) -> None:
    from pytriton.decorators import batch

    b = options.batching
    outputs = [mc.Tensor(name=name, dtype=dtype, shape=shape) for name, dtype, shape in output_tensors(models.predictor)]
    triton.bind(
        model_name=options.name,
        infer_func=[batch(models.pixels)] * b.instances,
        inputs=[mc.Tensor(name="pixels", dtype=np.uint8, shape=(height, width, 3))],
        outputs=outputs,
        config=mc.ModelConfig(max_batch_size=b.max_batch, batcher=mc.DynamicBatcher(
            max_queue_delay_microseconds=b.queue_delay_us, preferred_batch_size=b.preferred_sizes())),
        strict=True,
    )
    triton.bind(
        model_name=f"{options.name}_image",
        infer_func=[batch(models.image)] * options.image_instances,
        inputs=[mc.Tensor(name="image", dtype=np.bytes_, shape=(1,))],
        outputs=outputs,
        # No dynamic batcher: each request runs alone, so a file that fails to decode
        # fails its own request only.
        config=mc.ModelConfig(max_batch_size=b.max_batch, batcher=None),
        strict=True,
    )


def serve(bundle: str | Path, options: ServeOptions | None = None,
          on_ready: Callable[[dict[str, Any]], None] | None = None,
          stop: threading.Event | None = None) -> None:
    """Serve ``bundle`` until SIGTERM/SIGINT (or ``stop`` is set), then drain and return.

    Args:
        on_ready: called once with the endpoints and models when requests are accepted.
        stop: set it to stop the server (signals set it too when run in the main thread).

    Raises:
        PortInUseError: a port is taken (checked before anything is loaded).
        BackendUnavailableError: PyTriton or the model's backend library is missing.
        BundleError, IncompatibleArtifactError: as :meth:`Predictor.load`.
    """
    from edgeclf.runtime import Predictor

    options = options or ServeOptions()
    check_model_name(options.name)
    if options.image_instances < 1:
        raise InvalidInputError(f"image instances must be >= 1. Received: {options.image_instances}")
    if not options.max_request_mb > 0:
        raise InvalidInputError(f"--max-request-mb must be > 0. Received: {options.max_request_mb}")
    check_ports(options.host, options.ports())
    raise_file_limit(2 * options.max_connections + FILES_RESERVED, "--max-connections")
    mc, pytriton_triton = _pytriton()
    predictor = Predictor.load(bundle, options.backend, precision=options.precision,
                               batch_size=options.batching.max_batch, threads=options.threads,
                               max_image_pixels=options.max_image_pixels, decoding=options.decoding,
                               alpha=options.alpha, coverage=options.coverage)
    stop = stop or threading.Event()
    previous = None
    guards: list[Any] = []
    try:
        use_own_libpython()
        # Triton logs to a file: read through PyTriton's pipe, its log costs as much CPU as
        # inference when requests fail (each error logs a traceback).
        log_file = options.log_file or _new_log_file()
        previous = _install_signal_handlers(stop)
        for start in range(1, TRITON_STARTS + 1):
            private_http, private_grpc = free_loopback_ports(2)
            models = _Models(predictor, options.name, f"127.0.0.1:{private_grpc}")
            config = pytriton_triton.TritonConfig(
                http_address="127.0.0.1", http_port=private_http, grpc_address="127.0.0.1", grpc_port=private_grpc,
                metrics_address=options.host, metrics_port=options.metrics_port,
                exit_timeout_secs=EXIT_TIMEOUT_S, log_verbose=0, log_file=log_file)
            ready = False
            try:
                with pytriton_triton.Triton(config=config) as triton:
                    height, width = predictor.image_size
                    _bind(triton, mc, models, options, height, width)
                    triton.connect()  # returns once both models are loaded and ready
                    ready = True
                    _start_guards(options, private_http, private_grpc, guards)
                    if on_ready:
                        on_ready({**_endpoints(options, predictor), "log_file": str(log_file)})
                    while not stop.wait(0.5):
                        if not triton.is_alive():
                            raise ServerError(f"the Triton server stopped unexpectedly; its log: {log_file}")
                    _stop_guards(guards)  # no new requests; those in flight are answered
                    # Leaving the block stops Triton, which answers the requests in flight first.
                break
            except Exception as exc:
                if ready or start == TRITON_STARTS or HANDSHAKE_RACE not in str(exc) or stop.is_set():
                    raise
                warnings.warn(f"Triton could not load a model (PyTriton's instance handshake, attempt {start} of "
                              f"{TRITON_STARTS}); starting it again", stacklevel=2)
    finally:
        _stop_guards(guards)
        _restore_signal_handlers(previous)
        predictor.close()


def raise_file_limit(needed: int, option: str) -> None:
    """Let this process open ``needed`` files (sockets), as far as its hard limit allows; warn where it does not."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        target = soft
    if target < needed:
        warnings.warn(f"{option} needs about {needed} open files, but this process may open {target} (ulimit -n); "
                      f"connections beyond that wait until others close", stacklevel=2)


def free_loopback_ports(count: int) -> list[int]:
    """``count`` ports free on 127.0.0.1 now (for Triton's private endpoints)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start_guards(options: ServeOptions, private_http: int, private_grpc: int, guards: list[Any]) -> None:
    """Start the public HTTP and gRPC endpoints, each checking requests before Triton sees them,
    appending each to ``guards`` as it starts (so a failure still stops the ones started)."""
    from edgeclf.serve.http_guard import HttpGuard  # h11: not needed to parse serve's options

    limits = Limits(max_batch=options.batching.max_batch, max_request_bytes=int(options.max_request_mb * 2**20))
    connections = options.connection_limits()
    try:
        http_guard = HttpGuard((options.host, options.http_port), ("127.0.0.1", private_http), limits, connections)
    except OSError as exc:  # taken since check_ports looked
        raise PortInUseError(f"HTTP port {options.http_port} on {options.host} is not available "
                             f"({exc.strerror}); choose another with --http-port") from None
    guards.append(http_guard)
    threading.Thread(target=http_guard.serve_forever, name="edgeclf-http-guard", daemon=True).start()
    host = f"[{options.host}]" if ":" in options.host else options.host
    try:
        guards.append(GrpcGuard(f"{host}:{options.grpc_port}", f"127.0.0.1:{private_grpc}", limits, connections))
    except RuntimeError as exc:  # grpcio: "Failed to bind to address"
        raise PortInUseError(f"gRPC port {options.grpc_port} on {options.host} is not available ({exc}); "
                             f"choose another with --grpc-port") from None


def _stop_guards(guards: list[Any]) -> None:
    while guards:
        guards.pop().stop(EXIT_TIMEOUT_S)


def _new_log_file() -> Path:
    handle, name = tempfile.mkstemp(prefix="edgeclf-triton-", suffix=".log")
    os.close(handle)  # Triton opens the file itself
    return Path(name)


def _endpoints(options: ServeOptions, predictor) -> dict[str, Any]:
    described = predictor.describe()
    return {
        "http": f"http://{options.host}:{options.http_port}",
        "grpc": f"{options.host}:{options.grpc_port}",
        "metrics": f"http://{options.host}:{options.metrics_port}/metrics",
        "models": [options.name, f"{options.name}_image"],
        "artifact": described["artifact"], "backend": described.get("backend"),
        "labels": predictor.labels, "input": described["input"], "trust": described["trust"],
        "outputs": [name for name, _, _ in output_tensors(predictor)],
        "batching": {"max_batch": options.batching.max_batch,
                     "preferred": options.batching.preferred_sizes(),
                     "queue_delay_us": options.batching.queue_delay_us},
    }


def _install_signal_handlers(stop: threading.Event) -> dict[int, Any] | None:
    if threading.current_thread() is not threading.main_thread():
        return None  # only the main thread may set handlers; the caller uses ``stop``
    handler = lambda signum, frame: stop.set()  # noqa: E731
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(previous: dict[int, Any] | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)


def print_ready(info: dict[str, Any]) -> None:
    """The CLI's start-up summary: what is served where, and how to stop it."""
    name, image = info["models"]
    size = info["input"]
    print(f"serving {info['artifact']} ({info['backend']}); labels {info['labels']}")
    print(f"  model {name!r}: pixels uint8 [N,{size['height']},{size['width']},3] -> label int64 [N,1], "
          + ", ".join(info["outputs"][1:]))
    print(f"  model {image!r}: image bytes [N,1] (encoded image files) -> the same outputs")
    print(f"  {info['trust']}")
    b = info["batching"]
    print(f"  dynamic batching: max {b['max_batch']}, preferred {b['preferred']}, "
          f"queue delay {b['queue_delay_us']} us")
    print(f"HTTP    {info['http']}  (health: {info['http']}/v2/health/ready)")
    print(f"gRPC    {info['grpc']}")
    print(f"metrics {info['metrics']}")
    print(f"Triton log: {info['log_file']}")
    print("ready; SIGTERM or Ctrl+C stops after the requests in flight are answered", flush=True)
