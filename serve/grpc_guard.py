"""The public gRPC endpoint of ``edgeclf serve``: the guard's rules (:mod:`edgeclf.serve.guard`)
in front of Triton's private gRPC port, bounded by what grpcio offers."""

from __future__ import annotations

import threading
from typing import Iterable

from edgeclf.serve.guard import GRPC_ALLOWED, GRPC_SERVICE, ConnectionLimits, Limits, RequestRefused, \
    check_grpc_infer, one_line_error


def grpc_guard(address: str, upstream: str, limits: Limits, connections: ConnectionLimits | None = None):
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

    Returns the started ``grpc.Server``.
    """
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from tritonclient.grpc import service_pb2

    connections = connections or ConnectionLimits()
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

    streams = threading.BoundedSemaphore(connections.max_streams)

    def stream(method: str):
        call = channel.stream_stream(method)

        def handler(requests: Iterable[bytes], context):
            if not streams.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the server runs its maximum of {connections.max_streams} streams; try again later")
            try:
                yield from relay(requests, context)
            finally:
                streams.release()

        def relay(requests: Iterable[bytes], context):
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

    server = grpc.server(ThreadPoolExecutor(max_workers=connections.threads, thread_name_prefix="edgeclf-grpc-guard"),
                         handlers=[Generic()], maximum_concurrent_rpcs=connections.max_concurrent_rpcs,
                         options=[("grpc.max_receive_message_length", limits.max_request_bytes),
                                  ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0),
                                  ("grpc.max_allowed_incoming_connections", connections.max_connections),
                                  ("grpc.server_handshake_timeout_ms", int(connections.header_timeout_s * 1000)),
                                  ("grpc.max_connection_idle_ms", int(connections.idle_timeout_s * 1000))])
    if server.add_insecure_port(address) == 0:  # older grpcio reports a failed bind this way
        channel.close()
        raise RuntimeError(f"Failed to bind to address {address}")
    server.start()
    server.edgeclf_channel = channel  # closed with the server
    return server
