"""The request guard in front of Triton: refuse what the server cannot hold, before it allocates.

PyTriton 0.7 bundles Triton 2.51, whose HTTP front end sizes a JSON input's buffer from
the *declared* shape before it checks the batch size: one request declaring
``[10**12, H, W, 3]`` aborts the server (``std::bad_alloc``). Its gRPC front end takes
messages up to 2 GiB. PyTriton has no hook that runs before Triton reads a request, so
``edgeclf serve`` runs Triton on private loopback ports and puts this guard on the public
ones. For every request it:

- refuses a body larger than ``max_request_bytes`` without reading it (HTTP 413; gRPC
  RESOURCE_EXHAUSTED, enforced by grpcio on the message's length prefix);
- reads an inference request's header (JSON, or the KServe v2 binary extension's JSON
  part) and refuses, with 400 / INVALID_ARGUMENT and one line: a shape that is not a list
  of non-negative integers, a batch above ``max_batch``, a declared size above the byte
  limit, JSON data whose element count disagrees with the shape or whose values do not
  fit the datatype (a UINT8 pixel of 256), compressed or chunked bodies, and inputs in
  shared memory;
- passes only the read-only and inference endpoints (no model unloading, no shared
  memory registration, no log or trace settings from the network);
- turns Triton's error answers into one line: a Python model's traceback (with server
  paths) becomes its last line, ``ImageDecodeError: not a readable image ...``.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

#: Bytes per element of each KServe v2 datatype (BYTES: variable, at least a 4-byte length).
DTYPE_BYTES = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
               "INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8, "BYTES": 4}
INT_RANGES = {"UINT8": (0, 255), "UINT16": (0, 65535), "UINT32": (0, 2**32 - 1), "UINT64": (0, 2**64 - 1),
              "INT8": (-128, 127), "INT16": (-32768, 32767), "INT32": (-2**31, 2**31 - 1),
              "INT64": (-2**63, 2**63 - 1)}
_INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
#: The last "SomeError: message" line of a traceback.
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(?P<name>\w+(?:Error|Exception)): (?P<message>.+)$")
#: Errors a client causes (the image model's decode errors): answered 400, not 500.
CLIENT_ERRORS = ("ImageDecodeError", "InvalidInputError")
#: gRPC methods passed through; the rest (model load/unload, shared memory, logging, tracing) are refused.
GRPC_ALLOWED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                "ModelStatistics", "ModelInfer", "ModelStreamInfer")
GRPC_SERVICE = "inference.GRPCInferenceService"


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_request_bytes: int


class RequestRefused(Exception):
    """A request the guard will not pass on; the message is the one line the client gets."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _flatten(data: Any, limit: int) -> list[Any]:
    """Nested JSON lists -> flat list, iteratively (no recursion), stopping past ``limit`` items."""
    out: list[Any] = []
    stack = [iter(data if isinstance(data, list) else [data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
            if len(out) > limit:
                break
    return out


_END = object()


def check_input(name: Any, datatype: Any, shape: Any, limits: Limits, data: Any = None,
                has_data: bool = False) -> None:
    """Refuse one input tensor the server cannot or should not take.

    Raises:
        RequestRefused: naming the input, what it declared and what is accepted.
    """
    label = f"input {name!r}"
    if datatype not in DTYPE_BYTES:
        raise RequestRefused(f"{label}: unknown datatype {str(datatype)[:20]!r}; expected one of {sorted(DTYPE_BYTES)}")
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise RequestRefused(f"{label}: shape must be a non-empty list of non-negative integers. "
                             f"Received: {str(shape)[:80]}")
    if shape[0] > limits.max_batch:
        raise RequestRefused(f"{label}: batch of {shape[0]} exceeds the server's max batch {limits.max_batch}; "
                             f"split the request")
    count = 1
    for dim in shape:
        count *= dim
    if count * DTYPE_BYTES[datatype] > limits.max_request_bytes:
        raise RequestRefused(f"{label}: shape {list(shape)} declares {count * DTYPE_BYTES[datatype]} bytes, over the "
                             f"server's request limit of {limits.max_request_bytes} bytes (--max-request-mb)", 413)
    if not has_data:
        return
    values = _flatten(data, count)
    if len(values) != count:
        raise RequestRefused(f"{label}: shape {list(shape)} needs {count} values; the request holds "
                             f"{'more' if len(values) > count else len(values)}")
    bounds = INT_RANGES.get(datatype)
    if bounds is not None:
        low, high = bounds
        bad = next((v for v in values if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high), None)
        if bad is not None:
            raise RequestRefused(f"{label}: {datatype} values must be integers in {low}..{high}. "
                                 f"Received: {str(bad)[:40]}")


def check_http_infer(body: bytes, header_length: str | None, limits: Limits) -> None:
    """Refuse a KServe v2 HTTP inference request (JSON, or binary extension) the server cannot hold."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise RequestRefused(f"Inference-Header-Content-Length must be an integer. "
                                 f"Received: {header_length[:20]!r}") from None
        if not 0 <= size <= len(body):
            raise RequestRefused(f"Inference-Header-Content-Length {size} is outside the body of {len(body)} bytes")
        header_bytes = body[:size]
    else:
        header_bytes = body
    try:
        request = json.loads(header_bytes)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:80]
        raise RequestRefused(f"the request is not valid JSON ({reason})") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise RequestRefused("the request must be a JSON object with a non-empty 'inputs' list")
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise RequestRefused(f"each input must be a JSON object. Received: {str(tensor)[:40]}")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestRefused("an input's parameters must be a JSON object")
        if "shared_memory_region" in parameters:
            raise RequestRefused("inputs in shared memory are not accepted over the network", 403)
        check_input(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), limits,
                    tensor.get("data"), has_data="binary_data_size" not in parameters)


def check_grpc_infer(request, limits: Limits) -> None:
    """Refuse a gRPC ``ModelInferRequest`` the server cannot hold."""
    if not request.inputs:
        raise RequestRefused("the request has no inputs")
    raw = len(request.raw_input_contents) > 0
    for tensor in request.inputs:
        if "shared_memory_region" in tensor.parameters:
            raise RequestRefused("inputs in shared memory are not accepted over the network", 403)
        contents = tensor.contents
        field = next((f for f in ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                                  "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents")
                      if len(getattr(contents, f))), None)
        check_input(tensor.name, tensor.datatype, list(tensor.shape), limits,
                    list(getattr(contents, field)) if field else None, has_data=field is not None and not raw)


def one_line_error(text: str) -> tuple[str, bool]:
    """Triton's error text as one line, and whether the client caused it.

    A Python model's error carries the whole traceback, with the server's paths; the
    client gets its last line only.
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if "Traceback" in text:
        for line in reversed(lines):
            match = _EXCEPTION_LINE.match(line)
            if match:
                return f"{match['name']}: {match['message']}", match["name"] in CLIENT_ERRORS
        return "the model failed on this request (see the server's log)", False
    return " ".join(lines), False


class HttpGuard(ThreadingHTTPServer):
    """The public HTTP endpoint: checks each request, forwards it to Triton's private port."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # many clients connect at once (socketserver's default is 5)

    def __init__(self, address: tuple[str, int], upstream: tuple[str, int], limits: Limits) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _HttpHandler)
        self.upstream = upstream
        self.limits = limits


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Triton's own endpoint
    timeout = 120  # seconds a connection may sit idle or half-sent before it is closed
    server: HttpGuard
    _FORWARDED = ("Content-Type", "Inference-Header-Content-Length", "Accept", "Accept-Encoding")
    _RETURNED = ("Content-Type", "Inference-Header-Content-Length", "Content-Encoding")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet, as Triton's endpoint is
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def do_PUT(self) -> None:  # noqa: N802
        self._refuse(RequestRefused("method not allowed through edgeclf serve", 405))

    do_DELETE = do_PATCH = do_PUT

    def _handle(self) -> None:
        try:
            body = self._read_body()
            if self.command == "POST":
                if not _INFER_PATH.match(self.path.split("?")[0]):
                    raise RequestRefused(f"POST {self.path[:80]} is not allowed through edgeclf serve; "
                                         f"only inference requests are", 403)
                check_http_infer(body, self.headers.get("Inference-Header-Content-Length"), self.server.limits)
            elif not self.path.startswith("/v2"):
                raise RequestRefused(f"no such endpoint: {self.path[:80]}", 404)
        except RequestRefused as refused:
            self._refuse(refused)
            return
        self._forward(body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestRefused("chunked request bodies are not accepted; send Content-Length", 411)
        if self.headers.get("Content-Encoding", "identity").lower() != "identity":
            self.close_connection = True
            raise RequestRefused("compressed request bodies are not accepted; send them uncompressed", 415)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RequestRefused("Content-Length must be a non-negative integer")
        if length > self.server.limits.max_request_bytes:
            self.close_connection = True  # the body is never read: drop the connection after answering
            raise RequestRefused(f"request body of {length} bytes exceeds the server's limit of "
                                 f"{self.server.limits.max_request_bytes} bytes (--max-request-mb)", 413)
        return self.rfile.read(length) if length else b""

    def _upstream(self) -> http.client.HTTPConnection:
        connection = getattr(_connections, "connection", None)
        if connection is None:
            connection = _connections.connection = http.client.HTTPConnection(*self.server.upstream, timeout=300)
        return connection

    def _forward(self, body: bytes) -> None:
        headers = {k: self.headers[k] for k in self._FORWARDED if self.headers.get(k) is not None}
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed meanwhile
            connection = self._upstream()
            try:
                connection.request(self.command, self.path, body=body if self.command == "POST" else None,
                                   headers=headers)
                response = connection.getresponse()
                data = response.read()
                break
            except (OSError, http.client.HTTPException):
                connection.close()
                _connections.connection = None
                if attempt == 2:
                    self._refuse(RequestRefused("the inference server did not answer", 502))
                    return
        status = response.status
        out_headers = {k: response.getheader(k) for k in self._RETURNED if response.getheader(k) is not None}
        if status >= 400:  # Triton sends its errors as JSON or, from a model, as text/plain JSON
            try:
                message = json.loads(data).get("error", "")
            except (ValueError, AttributeError):
                message = data.decode("utf-8", "replace")
            line, client_fault = one_line_error(message)
            if client_fault and status >= 500:
                status = 400
            data = json.dumps({"error": line}).encode()
            out_headers = {"Content-Type": "application/json"}
        self.send_response(status)
        for key, value in out_headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _refuse(self, refused: RequestRefused) -> None:
        data = json.dumps({"error": str(refused)}).encode()
        self.send_response(refused.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


_connections = threading.local()  # one upstream connection per handler thread


def grpc_guard(address: str, upstream: str, limits: Limits, workers: int = 32):
    """The public gRPC endpoint: a grpcio server passing the allowed methods to Triton's private port.

    Returns the started ``grpc.Server``.
    """
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from tritonclient.grpc import service_pb2

    status_of = {400: grpc.StatusCode.INVALID_ARGUMENT, 403: grpc.StatusCode.PERMISSION_DENIED,
                 413: grpc.StatusCode.RESOURCE_EXHAUSTED}
    channel = grpc.insecure_channel(upstream, options=[("grpc.max_send_message_length", limits.max_request_bytes),
                                                       ("grpc.max_receive_message_length", -1)])

    def relay_error(error: grpc.RpcError, context) -> None:
        line, client_fault = one_line_error(error.details() or "")
        code = error.code()
        if client_fault and code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            code = grpc.StatusCode.INVALID_ARGUMENT
        context.abort(code, line)

    def unary(method: str, check: bool):
        call = channel.unary_unary(method)

        def handler(raw: bytes, context):
            if check:
                try:
                    check_grpc_infer(service_pb2.ModelInferRequest.FromString(raw), limits)
                except RequestRefused as refused:
                    context.abort(status_of.get(refused.status, grpc.StatusCode.INVALID_ARGUMENT), str(refused))
                except Exception:  # noqa: BLE001 - a message that does not parse
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a ModelInferRequest")
            try:
                # Without a client deadline grpcio reports ~9.2e18 s remaining, which as a
                # timeout overflows to an immediate DEADLINE_EXCEEDED: pass no deadline on.
                remaining = context.time_remaining()
                return call(raw, timeout=remaining if remaining < 1e9 else None)
            except grpc.RpcError as error:
                relay_error(error, context)
        return grpc.unary_unary_rpc_method_handler(handler)

    def stream(method: str):
        call = channel.stream_stream(method)

        def handler(requests: Iterable[bytes], context):
            def checked():
                for raw in requests:
                    try:
                        check_grpc_infer(service_pb2.ModelInferRequest.FromString(raw), limits)
                    except RequestRefused as refused:
                        context.abort(status_of.get(refused.status, grpc.StatusCode.INVALID_ARGUMENT), str(refused))
                    yield raw
            try:
                yield from call(checked())
            except grpc.RpcError as error:
                relay_error(error, context)
        return grpc.stream_stream_rpc_method_handler(handler)

    handlers = {name: (stream(f"/{GRPC_SERVICE}/{name}") if name == "ModelStreamInfer"
                       else unary(f"/{GRPC_SERVICE}/{name}", check=name == "ModelInfer"))
                for name in GRPC_ALLOWED}

    class Generic(grpc.GenericRpcHandler):
        def service(self, details):
            service, _, name = details.method.lstrip("/").partition("/")
            if service == GRPC_SERVICE and name in handlers:
                return handlers[name]

            def refuse(request, context):
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"{details.method} is not allowed through edgeclf serve")
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(ThreadPoolExecutor(max_workers=workers), handlers=[Generic()],
                         options=[("grpc.max_receive_message_length", limits.max_request_bytes),
                                  ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
    if server.add_insecure_port(address) == 0:  # older grpcio reports a failed bind this way
        channel.close()
        raise RuntimeError(f"Failed to bind to address {address}")
    server.start()
    server.edgeclf_channel = channel  # closed with the server
    return server
