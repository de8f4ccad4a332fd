"""The public HTTP endpoint of ``edgeclf serve``: the guard's rules (:mod:`edgeclf.serve.guard`)
in front of Triton's private HTTP port, with bounded connections and threads.

Each request is parsed once, by h11: an HTTP/1.1 protocol machine in pure Python that does no
I/O of its own, so the guard keeps its threads and its bounds. One selector thread holds every
open connection: it accepts, feeds each connection's bytes to its parser without blocking, and
closes a connection idle past ``--idle-timeout`` or whose head (then body, up to
``BUFFERED_BODY_BYTES``) is not complete within ``--header-timeout``. Only a request whose head
is complete goes to the fixed pool of ``--guard-threads`` workers; a larger body is read there
and must arrive at ``MIN_BODY_RATE`` or better. After the answer a kept-alive connection goes
back to the selector. So idle and slow clients (slowloris) cost a socket and about a kilobyte,
never a thread.

At ``--max-connections`` a new connection closes the one that has waited longest for its
request (a slow one is answered 503 first), so held connections cannot lock new clients out;
only when every connection carries a request being answered is the new one refused, 503 with
one line of JSON, at once and without a thread. Clients that disconnect or time out are logged
as one debug line, never a traceback; refusals as one warning line per 10 s. The gRPC endpoint
has the same kind of bounds from grpcio (:mod:`edgeclf.serve.grpc_guard`).
"""

from __future__ import annotations

import enum
import http
import http.client
import json
import logging
import math
import queue
import selectors
import socket
import threading
import time
from collections import Counter, OrderedDict
from typing import Any, Callable

import h11

from edgeclf.serve.guard import (_INFER_PATH, ConnectionLimits, Limits, RequestRefused, check_http_infer,
                                 one_line_error)

#: A request line and headers larger than this are answered 431 and the connection closed.
MAX_HEAD_BYTES = 64 * 1024
#: Bodies up to this size are collected by the selector thread (within a header timeout of their own) before
#: a worker takes the request.
BUFFERED_BODY_BYTES = 256 * 1024
#: A larger body, read by a worker, must arrive within the header timeout plus one second per this many bytes.
MIN_BODY_RATE = 256 * 1024
#: A client connection's socket errors (reset, broken pipe, timed out; closed at shutdown) and a body it
#: broke off: one debug line, never a traceback. The upstream's are answered 502 where they happen.
_CLIENT_GONE = (OSError, h11.RemoteProtocolError)
#: Connections refused or closed to make room are logged as one line at most this often.
PRESSURE_LOG_S = 10.0
#: The methods passed on (GET and HEAD to the read-only endpoints, POST to inference), and those refused 405.
_PASSED, _REFUSED = ("GET", "HEAD", "POST"), ("PUT", "DELETE", "PATCH")
#: Request headers passed to Triton, and response headers passed back.
_FORWARDED = ("content-type", "inference-header-content-length", "accept", "accept-encoding")
_RETURNED = ("Content-Type", "Inference-Header-Content-Length", "Content-Encoding")
logger = logging.getLogger("edgeclf.serve.guard")


class _Phase(enum.Enum):
    """Where a connection held by the selector thread is, which decides its deadline."""

    IDLE = "idle"  # between requests: --idle-timeout
    HEAD = "head"  # a request line and headers begun: --header-timeout
    BODY = "body"  # a small body being collected: a header timeout of its own


def _answer(parser: h11.Connection, status: int, body: bytes, headers: list[tuple[str, str]],
            close: bool = False, head: bool = False) -> bytes:
    """The bytes of one whole response, through ``parser``; none of the body for a HEAD request."""
    headers = [*headers, ("Content-Length", str(len(body)))] + ([("Connection", "close")] if close else [])
    data = parser.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
    if body and not head:
        data += parser.send(h11.Data(data=body))
    return data + parser.send(h11.EndOfMessage())


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:  # a status Triton invented: the line without a phrase
        return ""


def error_answer(parser: h11.Connection, status: int, message: str, close: bool = False, head: bool = False,
                 headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The guard's every refusal: ``status`` and one line of JSON, ``{"error": message}``."""
    body = json.dumps({"error": message}).encode()
    return _answer(parser, status, body, [("Content-Type", "application/json"), *headers], close, head)


def _busy_answer(max_connections: int) -> bytes:
    """The 503 a connection over the cap gets before it sends anything (made once: h11 lets a server answer
    a connection that has sent no request, as for a malformed one)."""
    return error_answer(h11.Connection(h11.SERVER), 503, f"the server holds its maximum of {max_connections} "
                        f"connections (--max-connections); try again later", close=True,
                        headers=(("Retry-After", "1"),))


class _Connection:
    """A client connection: its socket, its parser, the request being received, and when it is dropped."""

    __slots__ = ("sock", "address", "parser", "phase", "deadline", "request", "body")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.phase = _Phase.HEAD
        self.deadline = deadline
        self.request: h11.Request | None = None
        self.body = bytearray()  # the request's body as far as it has come

    @property
    def begun(self) -> bool:
        """Whether part of a request (its line, headers or body) has come and not all of it."""
        return self.parser.their_state is not h11.IDLE or bool(self.parser.trailing_data[0])


class HttpGuard:
    """The public HTTP endpoint: checks each request, forwards it to Triton's private port.

    One selector thread holds every open connection (accepting, parsing request heads and
    collecting small bodies, timing out idle and slow clients); ``connections.threads`` worker
    threads take requests whose head is complete from a queue. Same interface as
    ``socketserver``'s servers: ``serve_forever`` in a thread of the caller's, then ``shutdown``
    and ``server_close``.
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
        return sum(1 for conn in tuple(self._held.values()) if conn.begun)

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
                if oldest.begun:
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
        if conn.phase is _Phase.IDLE:
            conn.phase, conn.deadline = _Phase.HEAD, self._clock() + self.connections.header_timeout_s
        conn.parser.receive_data(data)
        self._advance(conn)

    def _advance(self, conn: _Connection) -> None:
        """Parse what has come; hand the connection to the workers once its request's head is here, and a
        small body whole."""
        while True:
            try:
                event = conn.parser.next_event()
            except h11.RemoteProtocolError as exc:  # a malformed request, or a head over MAX_HEAD_BYTES
                self._answer_and_drop(conn, exc.error_status_hint, f"malformed HTTP request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                conn.request = event
                if not _collected_here(conn):
                    self._dispatch(conn)
                    return
                # The body (up to BUFFERED_BODY_BYTES) gets a header timeout of its own.
                conn.phase, conn.deadline = _Phase.BODY, self._clock() + self.connections.header_timeout_s
            elif isinstance(event, h11.Data):
                conn.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch(conn)
                return

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
            if conn.begun:  # a pipelined request began already
                conn.phase, conn.deadline = _Phase.HEAD, now + self.connections.header_timeout_s
            else:
                conn.phase, conn.deadline = _Phase.IDLE, now + self.connections.idle_timeout_s
            self._hold(conn)
            self._advance(conn)

    def _sweep(self, now: float) -> None:
        """Close the connections idle past --idle-timeout or slow past --header-timeout; log the pressure."""
        for conn in [c for c in self._held.values() if c.deadline <= now]:
            logger.debug("HTTP guard: closed %s connection from %s (timed out)",
                         "an idle" if conn.phase is _Phase.IDLE else "a slow", conn.address)
            self._drop(conn)
        self._log_pressure(now)

    def _log_pressure(self, now: float) -> None:
        """One warning line with the connections refused or closed early since the last (at most every 10 s)."""
        if self._pressure and now - self._pressure_logged_at >= PRESSURE_LOG_S:
            logger.warning("HTTP guard: %s", "; ".join(f"{why}: {count}" for why, count in self._pressure.items()))
            self._pressure.clear()
            self._pressure_logged_at = now

    def _answer_and_drop(self, conn: _Connection, status: int, message: str) -> None:
        head = conn.request is not None and conn.request.method == b"HEAD"
        try:
            conn.sock.send(error_answer(conn.parser, status, message, close=True, head=head))
        except (OSError, h11.LocalProtocolError):
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
        """Answer the connection's request; whether to keep the connection open (the next request may
        have begun already: the parser holds its bytes)."""
        try:
            conn.sock.setblocking(True)
            _Exchange(self, conn).answer()
            if conn.parser.our_state is h11.DONE and conn.parser.their_state is h11.DONE:
                conn.parser.start_next_cycle()
                conn.request, conn.body = None, bytearray()
                return True
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

    def stop(self, timeout: float) -> None:
        """:meth:`shutdown`, then :meth:`server_close` (the gRPC guard's one call)."""
        self.shutdown(timeout)
        self.server_close()

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


def _header(request: h11.Request, name: str) -> str | None:
    """The first value of the header ``name`` (lower case; h11 lowers every name)."""
    wanted = name.encode()
    return next((value.decode("latin-1") for key, value in request.headers if key == wanted), None)


def _declared_length(request: h11.Request) -> int | None:
    """The request's Content-Length (h11 has checked it is one non-negative integer), None if absent."""
    value = _header(request, "content-length")
    return None if value is None else int(value)


def _collected_here(conn: _Connection) -> bool:
    """Whether the selector thread collects the body before a worker takes the request: a small one it
    can hold, with nothing to refuse or answer first (chunked encoding, ``Expect: 100-continue``)."""
    request = conn.request
    length = _declared_length(request)
    return (bool(length) and length <= BUFFERED_BODY_BYTES and _header(request, "transfer-encoding") is None
            and not conn.parser.they_are_waiting_for_100_continue)


class _Exchange:
    """One request of a connection, answered by a worker: checked, its body read, forwarded, answered."""

    def __init__(self, guard: HttpGuard, conn: _Connection) -> None:
        self.guard, self.conn = guard, conn
        self.request = conn.request
        self.method = self.request.method.decode("ascii", "replace")
        self.path = self.request.target.decode("latin-1")
        self.close = False  # answer with Connection: close (the body is left unread)

    def answer(self) -> None:
        parser, head = self.conn.parser, self.method == "HEAD"
        try:
            status, data, headers = self._forward(self._checked_body())
            reply = _answer(parser, status, data, headers, head=head)
        except RequestRefused as refused:
            reply = error_answer(parser, refused.status, str(refused), close=self.close, head=head)
        self._send(reply)

    def _send(self, data: bytes) -> None:
        self.conn.sock.settimeout(self.guard.connections.header_timeout_s)
        self.conn.sock.sendall(data)

    def _refuse_unread(self, message: str, status: int) -> RequestRefused:
        self.close = True  # the body is never read: the connection is closed after the answer
        return RequestRefused(message, status)

    def _checked_body(self) -> bytes:
        """The request's body, read once its head has passed; RequestRefused where it does not."""
        request, limits = self.request, self.guard.limits
        if self.method in _REFUSED:
            raise RequestRefused("method not allowed through edgeclf serve", 405)
        if self.method not in _PASSED:
            raise self._refuse_unread(f"Unsupported method ({self.method!r})", 501)
        if _header(request, "transfer-encoding") is not None:
            raise self._refuse_unread("chunked request bodies are not accepted; send Content-Length", 411)
        if (_header(request, "content-encoding") or "identity").lower() != "identity":
            raise self._refuse_unread("compressed request bodies are not accepted; send them uncompressed", 415)
        length = _declared_length(request) or 0
        if length > limits.max_request_bytes:
            raise self._refuse_unread(f"request body of {length} bytes exceeds the server's limit of "
                                      f"{limits.max_request_bytes} bytes (--max-request-mb)", 413)
        body = self._read_body(length)
        if self.method == "POST":
            if not _INFER_PATH.match(self.path.split("?")[0]):
                raise RequestRefused(f"POST {self.path[:80]} is not allowed through edgeclf serve; "
                                     f"only inference requests are", 403)
            check_http_infer(body, _header(request, "inference-header-content-length"), limits)
        elif not self.path.startswith("/v2"):
            raise RequestRefused(f"no such endpoint: {self.path[:80]}", 404)
        return body

    def _read_body(self, length: int) -> bytes:
        """The rest of the body the selector thread did not collect, at MIN_BODY_RATE or better."""
        conn, parser = self.conn, self.conn.parser
        if parser.their_state is h11.DONE:
            return bytes(conn.body)
        if parser.they_are_waiting_for_100_continue:
            self._send(parser.send(h11.InformationalResponse(status_code=100, headers=[])))
        deadline = time.monotonic() + self.guard.connections.header_timeout_s + length / MIN_BODY_RATE
        while True:
            event = parser.next_event()
            if isinstance(event, h11.Data):
                conn.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(conn.body)
            elif event is h11.NEED_DATA:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the client did not send its request in time")
                conn.sock.settimeout(remaining)
                parser.receive_data(conn.sock.recv(65536))  # b"": h11 raises that the body broke off

    def _forward(self, body: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
        """Triton's answer to the request: its status, body and the headers passed back."""
        headers = {name: value for name in _FORWARDED if (value := _header(self.request, name)) is not None}
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed meanwhile
            connection = self._upstream()
            try:
                connection.request(self.method, self.path, body=body if self.method == "POST" else None,
                                   headers=headers)
                response = connection.getresponse()
                data = response.read()
                break
            except (OSError, http.client.HTTPException):
                connection.close()
                _connections.connection = None
                if attempt == 2:
                    raise RequestRefused("the inference server did not answer", 502) from None
        status = response.status
        if status < 400:
            return status, data, [(k, v) for k in _RETURNED if (v := response.getheader(k)) is not None]
        try:  # Triton sends its errors as JSON or, from a model, as text/plain JSON
            message = json.loads(data).get("error", "")
        except (ValueError, AttributeError):
            message = data.decode("utf-8", "replace")
        line, client_fault = one_line_error(message)
        raise RequestRefused(line, 400 if client_fault and status >= 500 else status)

    def _upstream(self) -> http.client.HTTPConnection:
        connection = getattr(_connections, "connection", None)
        if connection is None:
            connection = _connections.connection = http.client.HTTPConnection(*self.guard.upstream, timeout=300)
        return connection


_connections = threading.local()  # one upstream connection per worker thread
