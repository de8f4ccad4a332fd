"""The public gRPC endpoint of ``edgeclf serve``: the guard's rules (:mod:`edgeclf.serve.guard`)
in front of Triton's private gRPC port, bounded by what grpcio offers."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Iterator

from edgeclf.serve.guard import GRPC_ALLOWED, GRPC_SERVICE, ConnectionLimits, Limits, RequestRefused, \
    check_grpc_infer, one_line_error


class GrpcGuard:
    """The public gRPC endpoint: a grpcio server passing the allowed methods to Triton's private port.

    Bounded with what grpcio offers (its connections cost no thread): ``connections.threads``
    handler threads; at most ``max_concurrent_rpcs`` calls running or queued, more failed at
    once with RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded"; at most ``max_streams``
    ModelStreamInfer calls (a quiet stream holds a thread), more failed with
    RESOURCE_EXHAUSTED; at most ``max_connections`` connections, more closed by grpcio before
    their handshake (the client sees UNAVAILABLE; channels already connected are unaffected);
    a connection must finish its handshake within the header timeout and is closed after the
    idle timeout without calls. Unlike the HTTP guard, grpcio cannot close a waiting connection
    to make room: slow clients at the cap lock new ones out for up to the header timeout.

    Serving once made; :meth:`stop` ends it.

    Raises:
        RuntimeError: the address cannot be bound (grpcio's "Failed to bind to address").
    """

    def __init__(self, address: str, upstream: str, limits: Limits,
                 connections: ConnectionLimits | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        connections = connections or ConnectionLimits()
        self._channel = grpc.insecure_channel(upstream, options=[
            ("grpc.max_send_message_length", limits.max_request_bytes), ("grpc.max_receive_message_length", -1)])
        executor = ThreadPoolExecutor(max_workers=connections.threads, thread_name_prefix="edgeclf-grpc-guard")
        self._server = grpc.server(
            executor, handlers=[_Relay(self._channel, limits, connections.max_streams)],
            maximum_concurrent_rpcs=connections.max_concurrent_rpcs,
            options=[("grpc.max_receive_message_length", limits.max_request_bytes),
                     ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0),
                     ("grpc.max_allowed_incoming_connections", connections.max_connections),
                     ("grpc.server_handshake_timeout_ms", int(connections.header_timeout_s * 1000)),
                     ("grpc.max_connection_idle_ms", int(connections.idle_timeout_s * 1000))])
        if self._server.add_insecure_port(address) == 0:  # older grpcio reports a failed bind this way
            self._channel.close()
            raise RuntimeError(f"Failed to bind to address {address}")
        self._server.start()

    def stop(self, timeout: float) -> None:
        """Stop taking calls; wait up to ``timeout`` seconds for those running, then close the upstream channel."""
        self._server.stop(grace=timeout).wait()
        self._channel.close()


class _Relay:
    """grpcio's generic handler (it asks only for ``service``): each allowed method relayed upstream, an
    inference request checked first, every other method refused PERMISSION_DENIED."""

    def __init__(self, channel: Any, limits: Limits, max_streams: int) -> None:
        import grpc
        from tritonclient.grpc import service_pb2

        self._grpc, self._request_type = grpc, service_pb2.ModelInferRequest
        self._limits, self._max_streams = limits, max_streams
        self._streams = threading.BoundedSemaphore(max_streams)
        self._status_of = {400: grpc.StatusCode.INVALID_ARGUMENT, 403: grpc.StatusCode.PERMISSION_DENIED,
                           413: grpc.StatusCode.RESOURCE_EXHAUSTED}
        self._handlers = {}
        for name in GRPC_ALLOWED:
            method = f"/{GRPC_SERVICE}/{name}"
            self._handlers[name] = (
                grpc.stream_stream_rpc_method_handler(self._stream(channel.stream_stream(method)))
                if name == "ModelStreamInfer" else
                grpc.unary_unary_rpc_method_handler(self._unary(channel.unary_unary(method), name == "ModelInfer")))

    def service(self, details: Any) -> Any:
        service, _, name = details.method.lstrip("/").partition("/")
        if service == GRPC_SERVICE and name in self._handlers:
            return self._handlers[name]

        def refuse(request: bytes, context: Any) -> None:
            context.abort(self._grpc.StatusCode.PERMISSION_DENIED,
                          f"{details.method} is not allowed through edgeclf serve")
        return self._grpc.unary_unary_rpc_method_handler(refuse)

    def _check(self, raw: bytes, context: Any) -> None:
        """Abort the call if ``raw`` is an inference request the server cannot hold (or not one at all)."""
        try:
            check_grpc_infer(self._request_type.FromString(raw), self._limits)
        except RequestRefused as refused:
            context.abort(self._status_of.get(refused.status, self._grpc.StatusCode.INVALID_ARGUMENT), str(refused))
        except Exception:  # noqa: BLE001 - a message that does not parse
            context.abort(self._grpc.StatusCode.INVALID_ARGUMENT, "the request is not a ModelInferRequest")

    def _relay_error(self, error: Any, context: Any) -> None:
        """Triton's error as one line; a client's (an image that does not decode) INVALID_ARGUMENT."""
        line, client_fault = one_line_error(error.details() or "")
        code = error.code()
        if client_fault and code in (self._grpc.StatusCode.INTERNAL, self._grpc.StatusCode.UNKNOWN):
            code = self._grpc.StatusCode.INVALID_ARGUMENT
        context.abort(code, line)

    def _unary(self, call: Callable, check: bool) -> Callable[[bytes, Any], bytes]:
        def handler(raw: bytes, context: Any) -> bytes:
            if check:
                self._check(raw, context)
            try:
                # Without a client deadline grpcio reports ~9.2e18 s remaining, which as a
                # timeout overflows to an immediate DEADLINE_EXCEEDED: pass no deadline on.
                remaining = context.time_remaining()
                return call(raw, timeout=remaining if remaining < 1e9 else None)
            except self._grpc.RpcError as error:
                self._relay_error(error, context)
        return handler

    def _stream(self, call: Callable) -> Callable[[Iterable[bytes], Any], Iterator[bytes]]:
        def handler(requests: Iterable[bytes], context: Any) -> Iterator[bytes]:
            if not self._streams.acquire(blocking=False):
                context.abort(self._grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the server runs its maximum of {self._max_streams} streams; try again later")
            try:
                yield from call(self._checked(requests, context))
            except self._grpc.RpcError as error:
                self._relay_error(error, context)
            finally:
                self._streams.release()
        return handler

    def _checked(self, requests: Iterable[bytes], context: Any) -> Iterator[bytes]:
        for raw in requests:
            self._check(raw, context)
            yield raw
