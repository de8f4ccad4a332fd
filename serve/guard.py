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

Connections and threads are bounded too (:class:`ConnectionLimits`): see
:mod:`edgeclf.serve.http_guard` and :mod:`edgeclf.serve.grpc_guard`, the two public endpoints.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from edgeclf import limits
from edgeclf.limits import is_int

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
            or not all(is_int(d) and d >= 0 for d in shape)):
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


@dataclass(frozen=True)
class ConnectionLimits:
    """How many clients the guards hold at once, with how many threads, and how long a client may take.

    Raises:
        InvalidInputError: a value outside its range (named by its ``edgeclf serve`` option).
    """

    max_connections: int = 1024  # open HTTP connections (and gRPC connections); more are refused at once
    threads: int = 64  # HTTP worker threads (and gRPC handler threads)
    idle_timeout_s: float = 10.0  # a kept-alive connection with no new request is closed after this
    header_timeout_s: float = 10.0  # a request's line and headers (and a small body) must arrive within this

    def __post_init__(self) -> None:
        limits.check("connections", self.max_connections, "--max-connections")
        limits.check("threads", self.threads, "--guard-threads")
        limits.check("serve_timeout", self.idle_timeout_s, "--idle-timeout")
        limits.check("serve_timeout", self.header_timeout_s, "--header-timeout")

    @property
    def max_concurrent_rpcs(self) -> int:
        """gRPC calls running or queued at once; grpcio fails more with RESOURCE_EXHAUSTED at once."""
        return 4 * self.threads

    @property
    def max_streams(self) -> int:
        """ModelStreamInfer calls at once: each holds a handler thread while its client is quiet."""
        return max(1, self.threads // 2)


