"""The public HTTP endpoint of ``edgeclf serve``: the guard's rules (:mod:`edgeclf.serve.guard`)
in front of Triton's private HTTP port, with bounded connections and threads.

One selector thread holds every open HTTP connection: it accepts, reads each request's line and headers (and a
body up to ``BUFFERED_BODY_BYTES``) without blocking, and closes a connection idle past
``--idle-timeout`` or whose head (then body) is not complete within ``--header-timeout``; a
larger body is read by a worker and must arrive at ``MIN_BODY_RATE`` or better. Only a
complete request goes to the fixed pool of ``--guard-threads`` workers; after the answer a
kept-alive connection goes back to the selector. So idle and slow clients (slowloris) cost a
socket and a few hundred bytes, never a thread; a worker waits on a client only for such a
large body, at that rate. At ``--max-connections`` a new connection closes the one that has waited longest for its
request (a slow one is answered 503 first), so held connections cannot lock new clients
out; only when every connection carries a request being answered is the new one refused,
503 with one line of JSON, at once and without a thread. Clients that disconnect or time out
are logged as one debug line, never a traceback; refusals as one warning line per 10 s.
The gRPC endpoint has the same kind of bounds from grpcio (:mod:`edgeclf.serve.grpc_guard`).
"""

from __future__ import annotations

import http
import http.client
import json
import logging
import math
import queue
import re
import selectors
import socket
import threading
import time
from collections import Counter, OrderedDict
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from edgeclf.serve.guard import (_INFER_PATH, ConnectionLimits, Limits, RequestRefused, check_http_infer,
                                 one_line_error)

#: A request line and headers larger than this are answered 431 and the connection closed.
MAX_HEAD_BYTES = 64 * 1024
#: Bodies up to this size are collected by the selector thread (within a header timeout of their own) before
#: a worker takes the request.
BUFFERED_BODY_BYTES = 256 * 1024
#: A larger body, read by a worker, must arrive within the header timeout plus one second per this many bytes.
MIN_BODY_RATE = 256 * 1024
_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: A client connection's socket errors (reset, broken pipe, timed out; closed at shutdown): one debug line,
#: never a traceback. The upstream's are answered 502 where they happen.
_CLIENT_GONE = (OSError,)
_WAIT, _HEAD, _BODY = "wait", "head", "body"
#: Connections refused or closed to make room are logged as one line at most this often.
PRESSURE_LOG_S = 10.0
logger = logging.getLogger("edgeclf.serve.guard")


def _busy_answer(max_connections: int) -> bytes:
    body = json.dumps({"error": f"the server holds its maximum of {max_connections} connections "
                                f"(--max-connections); try again later"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _body_length(head: bytes) -> int | None:
    """The Content-Length a selector thread may collect before a worker takes the request; None: hand over now
    (a body the worker streams or refuses, chunked encoding, ``Expect: 100-continue``)."""
    length = None
    for line in head.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name in (b"transfer-encoding", b"expect"):
            return None
        if name == b"content-length" and length is None:  # the first, as the handler reads it
            try:
                length = int(value.strip())
            except ValueError:
                return None
    length = length or 0
    return length if 0 <= length <= BUFFERED_BODY_BYTES else None


class _Connection:
    """A client connection: its socket, the bytes received and not yet handled, and when it is dropped."""

    __slots__ = ("sock", "address", "buffer", "state", "deadline", "scanned", "need")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.buffer = bytearray()
        self.state = _HEAD
        self.deadline = deadline
        self.scanned = 0  # bytes of ``buffer`` searched for the end of the headers
        self.need = 0  # bytes of ``buffer`` that make the whole request (state _BODY)


class _Reader:
    """The handler's ``rfile``: the bytes the selector thread collected, then the socket, under one deadline."""

    def __init__(self, sock: socket.socket, data: bytes, deadline: float) -> None:
        self._sock = sock
        self._buffer = bytearray(data)
        self.deadline = deadline

    def _fill(self) -> bool:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client did not send its request in time")
        self._sock.settimeout(remaining)
        chunk = self._sock.recv(65536)
        self._buffer += chunk
        return bool(chunk)

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readline(self, limit: int = -1) -> bytes:
        scanned = 0
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0:
                size = end + 1
                break
            scanned = len(self._buffer)
            if 0 <= limit <= scanned or not self._fill():
                size = scanned
                break
        return self._take(size if limit < 0 else min(size, limit))

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buffer) < size) and self._fill():
            pass
        return self._take(len(self._buffer) if size < 0 else min(size, len(self._buffer)))

    def left(self) -> bytes:
        """Bytes received beyond the request handled (a pipelined next request)."""
        return bytes(self._buffer)


class _Writer:
    """The handler's ``wfile``: unbuffered, each write sent whole within ``timeout`` seconds."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout

    def write(self, data: bytes) -> int:
        self._sock.settimeout(self._timeout)
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass


class HttpGuard:
    """The public HTTP endpoint: checks each request, forwards it to Triton's private port.

    One selector thread holds every open connection (accepting, collecting request heads and
    small bodies, timing out idle and slow clients); ``connections.threads`` worker threads
    take complete requests from a queue. Same interface as ``socketserver``'s servers:
    ``serve_forever`` in a thread of the caller's, then ``shutdown`` and ``server_close``.
    """

    request_queue_size = 1024  # listen backlog: many clients connect at once

    def __init__(self, address: tuple[str, int], upstream: tuple[str, int], limits: Limits,
                 connections: ConnectionLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        # What the selector thread's deadlines (idle, header) and the 10 s log window are counted on: a test
        # moves it by hand, so that which connection is cut off never depends on how busy the machine is.
        self._clock = clock
        self.limits = limits
        self.connections = connections or ConnectionLimits()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(self.request_queue_size)
            self.socket.setblocking(False)
        except BaseException:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()[:2]
        self._busy = _busy_answer(self.connections.max_connections)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._work: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        self._returned: queue.SimpleQueue[_Connection] = queue.SimpleQueue()
        # fd -> connection waiting in the selector, longest waiting first (selector thread only)
        self._held: OrderedDict[int, _Connection] = OrderedDict()
        self._open: set[_Connection] = set()  # every open connection, wherever it is
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._stopping = False
        self._serving = threading.Event()
        self._stopped = threading.Event()
        self._accept_paused_until = 0.0
        self._pressure: Counter[str] = Counter()  # connections refused or closed early, by why (logged every 10 s)
        self._pressure_logged_at = -PRESSURE_LOG_S

    @property
    def open_connections(self) -> int:
        """Connections open now (held idle, being read, queued or being answered)."""
        with self._lock:
            return len(self._open)

    @property
    def waiting_connections(self) -> int:
        """Connections held by the selector thread: idle, or still sending their request."""
        return len(self._held)

    @property
    def incomplete_requests(self) -> int:
        """Held connections that have sent part of a request (its line, headers or body), not all of it."""
        return sum(1 for conn in tuple(self._held.values()) if conn.buffer)

    # -- the selector thread ------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept and serve until :meth:`shutdown` (run it in a thread of its own)."""
        if self._stopping:
            self._stopped.set()
            return
        self._serving.set()
        for i in range(self.connections.threads):
            worker = threading.Thread(target=self._work_loop, name=f"edgeclf-http-guard-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self._selector.register(self.socket, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        next_sweep = 0.0
        try:
            while not self._stopping:
                now = self._clock()
                if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    self._selector.register(self.socket, selectors.EVENT_READ, None)
                for key, _ in self._selector.select(timeout=0.1):
                    try:
                        if key.data is None:
                            self._accept()
                        elif key.data is self._wake_r:
                            self._take_back()
                        else:
                            self._receive(key.data)
                    except Exception:  # noqa: BLE001 - a bug: log it, drop that client, keep serving the others
                        logger.exception("HTTP guard: unexpected error")
                        if isinstance(key.data, _Connection):
                            self._drop(key.data)
                if now >= next_sweep:
                    next_sweep = now + 0.1
                    self._sweep(now)
        finally:
            for conn in list(self._held.values()):
                self._drop(conn)
            self._log_pressure(math.inf)
            self._stopped.set()

    def _accept(self) -> None:
        for _ in range(256):  # then serve the others before accepting more
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors or memory: stop accepting for a moment
                self._selector.unregister(self.socket)
                self._accept_paused_until = time.monotonic() + 0.1
                self._note(f"accept failed: {exc.strerror or exc}")
                return
            with self._lock:
                full = len(self._open) >= self.connections.max_connections
            if full and self._held:
                # Make room: the connection that has waited longest for a request (idle, or slow) is closed;
                # it holds no request a worker has begun, and an attacker's connections cannot lock others out.
                oldest = next(iter(self._held.values()))
                self._note(f"closed waiting connections to make room (--max-connections "
                           f"{self.connections.max_connections})")
                if oldest.buffer:
                    self._answer_and_drop(oldest, 503, "the server closed this connection, slow to send its "
                                                       "request, to make room for others; send it again")
                else:
                    self._drop(oldest)
            elif full:  # every connection is a request being answered: refused at once, without a thread
                try:
                    sock.setblocking(False)
                    sock.send(self._busy)
                except OSError:
                    pass
                sock.close()
                self._note(f"refused, over --max-connections {self.connections.max_connections} requests in flight")
                continue
            sock.setblocking(False)
            conn = _Connection(sock, address, self._clock() + self.connections.header_timeout_s)
            with self._lock:
                self._open.add(conn)
            self._hold(conn)

    def _note(self, why: str) -> None:
        """Count a connection refused or closed early; :meth:`_sweep` logs the counts (one line every 10 s)."""
        self._pressure[why] += 1

    def _hold(self, conn: _Connection) -> None:
        self._held[conn.sock.fileno()] = conn
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _receive(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client closed (or reset) the connection
            self._drop(conn)
            return
        if conn.state == _WAIT:
            conn.state, conn.deadline = _HEAD, self._clock() + self.connections.header_timeout_s
        conn.buffer += data
        self._advance(conn)

    def _advance(self, conn: _Connection) -> None:
        """Hand the connection to the workers once its request (head, and a small body) is here."""
        if conn.state in (_WAIT, _HEAD):
            end = _HEAD_END.search(conn.buffer, max(0, conn.scanned - 3))
            conn.scanned = len(conn.buffer)
            if end is None:
                if len(conn.buffer) > MAX_HEAD_BYTES:
                    self._answer_and_drop(conn, 431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")
                return
            length = _body_length(bytes(conn.buffer[:end.end()]))
            if length is None:
                self._dispatch(conn)
                return
            # The body (up to BUFFERED_BODY_BYTES) gets a header timeout of its own.
            conn.state, conn.need = _BODY, end.end() + length
            conn.deadline = self._clock() + self.connections.header_timeout_s
        if conn.state == _BODY and len(conn.buffer) >= conn.need:
            self._dispatch(conn)

    def _dispatch(self, conn: _Connection) -> None:
        self._selector.unregister(conn.sock)
        del self._held[conn.sock.fileno()]
        self._work.put(conn)

    def _take_back(self) -> None:
        """Connections the workers answered and keep alive: back to waiting in the selector."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                conn = self._returned.get_nowait()
            except queue.Empty:
                return
            conn.sock.setblocking(False)
            now = self._clock()
            if conn.buffer:  # a pipelined request began already
                conn.state, conn.deadline = _HEAD, now + self.connections.header_timeout_s
            else:
                conn.state, conn.deadline = _WAIT, now + self.connections.idle_timeout_s
            conn.scanned = 0
            self._hold(conn)
            self._advance(conn)

    def _sweep(self, now: float) -> None:
        """Close the connections idle past --idle-timeout or slow past --header-timeout; log the pressure."""
        for conn in [c for c in self._held.values() if c.deadline <= now]:
            logger.debug("HTTP guard: closed %s connection from %s (timed out)",
                         "an idle" if conn.state == _WAIT else "a slow", conn.address)
            self._drop(conn)
        self._log_pressure(now)

    def _log_pressure(self, now: float) -> None:
        """One warning line with the connections refused or closed early since the last (at most every 10 s)."""
        if self._pressure and now - self._pressure_logged_at >= PRESSURE_LOG_S:
            logger.warning("HTTP guard: %s", "; ".join(f"{why}: {count}" for why, count in self._pressure.items()))
            self._pressure.clear()
            self._pressure_logged_at = now

    def _answer_and_drop(self, conn: _Connection, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        phrase = http.HTTPStatus(status).phrase
        try:
            conn.sock.send(f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nConnection: close\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        except OSError:
            pass
        self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        """Close a connection held by the selector thread."""
        if self._held.pop(conn.sock.fileno(), None) is not None:
            self._selector.unregister(conn.sock)
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        with self._lock:
            self._open.discard(conn)
        conn.sock.close()

    # -- the workers --------------------------------------------------------------------

    def _work_loop(self) -> None:
        while True:
            conn = self._work.get()
            if conn is None:
                return
            if self._serve_one(conn) and not self._stopping:
                self._returned.put(conn)
                try:
                    self._wake_w.send(b"\0")
                except OSError:  # the wake-up pipe is full: the selector thread is waking already
                    pass
            else:
                self._close(conn)

    def _serve_one(self, conn: _Connection) -> bool:
        """Answer the connection's request; whether to keep the connection open."""
        timeout = self.connections.header_timeout_s
        try:
            conn.sock.setblocking(True)
            reader = _Reader(conn.sock, bytes(conn.buffer), time.monotonic() + timeout)
            handler = _HttpHandler(reader, _Writer(conn.sock, timeout), conn.address, self)
            conn.buffer = bytearray(reader.left())
            return not handler.close_connection
        except _CLIENT_GONE as exc:
            logger.debug("HTTP guard: client %s went away (%s)", conn.address, type(exc).__name__)
        except Exception:  # noqa: BLE001 - a bug: its traceback, once; the other clients are served on
            logger.exception("HTTP guard: unexpected error answering %s", conn.address)
        return False

    # -- stopping -----------------------------------------------------------------------

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting and close the idle connections; wait (up to ``timeout`` seconds) for the
        requests already received to be answered."""
        self._stopping = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if self._serving.is_set():
            self._stopped.wait(timeout)
        for _ in self._workers:
            self._work.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def server_close(self) -> None:
        """Close the listening socket and every connection still open."""
        self._stopping = True
        self.socket.close()
        with self._lock:
            left = list(self._open)
        for conn in left:
            self._close(conn)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class _HttpHandler(BaseHTTPRequestHandler):
    """One request of a connection (the guard's worker calls it once per request)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as Triton's own endpoint
    server: HttpGuard
    _FORWARDED = ("Content-Type", "Inference-Header-Content-Length", "Accept", "Accept-Encoding")
    _RETURNED = ("Content-Type", "Inference-Header-Content-Length", "Content-Encoding")

    def __init__(self, rfile: _Reader, wfile: _Writer, client_address: Any, server: HttpGuard) -> None:
        self.rfile, self.wfile = rfile, wfile
        self.client_address = client_address
        self.server = server
        self.close_connection = True
        self.handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet, as Triton's endpoint is
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's errors (a malformed request line, headers too long) as one line of JSON."""
        self.close_connection = True
        data = json.dumps({"error": message or self.responses.get(code, ("error",))[0]}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

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
        if not length:
            return b""
        # A body the selector thread did not collect whole: at least MIN_BODY_RATE bytes/s after the header timeout.
        self.rfile.deadline = (time.monotonic() + self.server.connections.header_timeout_s
                               + length / MIN_BODY_RATE)
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionAbortedError("the client closed the connection before sending the whole body")
        return body

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


