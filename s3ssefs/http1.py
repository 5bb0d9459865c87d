"""A small keep-alive HTTP/1.1 client: the transport under :mod:`s3ssefs.wire`.

urllib3 and ``http.client`` spend more CPU per request (header objects, ``email`` parsing,
five Python layers per socket read) than signing and sending the request costs, and this
client spends about half of what they do on a small request (docs/benchmarks.md).  When the
daemon shares its cores with the server, that CPU bounds ``ls -l``, small files and random
reads.

It does only what S3 answers need: one request at a time per connection (no pipelining),
``Content-Length``, chunked and read-to-close bodies, 1xx answers skipped, ``Connection:
close`` honoured.  Bodies are read straight into one ``bytearray``, allocated without being
zeroed first (:func:`_unfilled`).  Certificates and host names are checked as urllib3 checks
them (``ssl.create_default_context``).

Failures raise :class:`ConnectionLost` (an ``OSError``), and the caller decides on retrying.
One case is handled here, because every keep-alive client must: a reused idle connection that
the server had closed (the request gets no byte of answer) is retried once on a new
connection.  The requests we send are idempotent.

The pool also keeps how long the server took to answer the last few small requests sent while
at most one other was in flight (:meth:`Pool.fastest_answer`): the round trip plus the
server's least work, which says how far away the server is (see :mod:`s3ssefs.streams`).
Large answers and busy moments are left out: a server busy with a cold read takes many round
trips' time to start answering a large GET, and a HEAD among 16 in flight waits its turn.
"""

from __future__ import annotations

import contextlib
import ctypes
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

MAX_HEAD = 64 << 10  # an answer's status line and headers; S3's are ~1 KiB
_RECV = 64 << 10
_NO_BODY = frozenset({204, 304})
_SMALL_BODY = 16 << 10  # a request body sent in one record with its head
ANSWERS_KEPT = 256  # answer times kept for fastest_answer(): of small answers...
_SMALL_ANSWER = 64 << 10  # ...(a HEAD, a LIST page, a random read's fragment)...
_QUIET = 2  # ...to requests sent with at most this many in flight, themselves included


class Pieces:
    """A request body made of several buffers, sent one after another as they are.

    A multipart part is the file's blocks: joining them into one ``bytes`` first cost a copy
    of every byte written, into a part's worth of freshly faulted pages, and held each block
    twice while its part was on its way.  The buffers must not change until the request is
    answered (the store may send them again on a retry)."""

    __slots__ = ("bufs", "size")

    def __init__(self, bufs: Iterable[bytes | bytearray | memoryview]) -> None:
        self.bufs = list(bufs)
        self.size = sum(len(b) for b in self.bufs)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.bufs)


Body = bytes | bytearray | memoryview | Pieces


def body_pieces(body: Body) -> list[bytes | bytearray | memoryview]:
    """The buffers ``body`` is sent as."""
    return body.bufs if isinstance(body, Pieces) else [body]


_resize = ctypes.pythonapi.PyByteArray_Resize
_resize.argtypes = [ctypes.py_object, ctypes.c_ssize_t]
_resize.restype = ctypes.c_int


def _unfilled(n: int) -> bytearray:
    """A ``bytearray`` of ``n`` bytes whose content is whatever the allocator had there.

    ``bytearray(n)`` zeroes its ``n`` bytes while holding the GIL, and a streaming GET's
    body is 8 MiB: in a cold read that zeroing showed in ``perf`` and ``py-spy``, and the
    first touch of fresh pages (nearly all of the daemon's page faults) came there too, under
    the GIL, where it now comes in the socket read with the GIL released.  The caller
    overwrites every byte before anyone sees the buffer (:meth:`_Conn.read_into` fills it
    exactly or raises).
    """
    b = bytearray()
    if n and _resize(b, n):
        raise MemoryError(f"no memory for a {n}-byte body")
    return b


class ConnectionLost(OSError):
    """The connection failed or the answer was malformed or cut off."""


class Response:
    """One answer: status, headers (lower-case names), body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytearray) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Conn:
    """One connection and the bytes read past the last answer (none, with no pipelining)."""

    __slots__ = ("buf", "reused", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def fill(self) -> int:
        """Read what the socket has (at most _RECV) onto ``buf``; 0 at end of stream."""
        chunk = self.sock.recv(_RECV)
        self.buf += chunk
        return len(chunk)

    def line(self) -> bytes:
        """One CRLF-ended line, without the CRLF."""
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return out
            if len(self.buf) > MAX_HEAD:
                raise ConnectionLost("answer line too long")
            if not self.fill():
                raise ConnectionLost("connection closed in the answer's head")

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: first from ``buf``, then straight from the socket."""
        n, got = len(view), min(len(self.buf), len(view))
        view[:got] = self.buf[:got]
        del self.buf[:got]
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise ConnectionLost(f"body cut off after {got} of {n} bytes")
            got += k


class Pool:
    """Idle keep-alive connections to one server, shared by the worker threads.

    ``maxsize`` bounds the idle connections kept, not the connections open: a thread that
    finds none idle opens one (as urllib3 with ``block=False``).
    """

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, maxsize: int,
                 connect_timeout: float, read_timeout: float) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.maxsize = maxsize
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._answers: deque[float] = deque(maxlen=ANSWERS_KEPT)
        self._in_flight = 0

    # ------------------------------------------------------------------ connections
    def _connect(self) -> _Conn:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    def _take(self) -> _Conn:
        """The most recently used idle connection still open, else a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if _dropped(conn.sock):
                conn.close()
                continue
            conn.reused = True
            return conn

    def _give(self, conn: _Conn) -> None:
        with self._lock:
            if len(self._idle) < self.maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def fastest_answer(self) -> float | None:
        """Seconds from sending a small request to its status line, the least among the last
        ANSWERS_KEPT timed (see the module's docstring); None before the first."""
        with self._lock:
            return min(self._answers, default=None)

    # ------------------------------------------------------------------ requests
    def request(self, method: str, target: str, headers: Iterable[tuple[str, str]],
                body: Body = b"",
                before_send: Callable[[], None] | None = None) -> Response:
        """Send one request and read its whole answer.  ``before_send`` runs before each
        sending, the one retry too, and may raise to stop it (a call given up on)."""
        head = _request_head(method, target, headers)
        with self._lock:
            self._in_flight += 1
            timed = self._in_flight <= _QUIET and len(body) <= _SMALL_BODY
        try:
            if before_send is not None:
                before_send()
            conn = self._open(self._take)
            try:
                return self._exchange(conn, method, head, body, timed)
            except ConnectionLost as e:
                # an idle connection the server closed in the meantime: no byte of answer came
                if not (conn.reused and getattr(e, "before_answer", False)):
                    raise
            if before_send is not None:
                before_send()
            return self._exchange(self._open(self._connect), method, head, body, timed)
        finally:
            with self._lock:
                self._in_flight -= 1

    @staticmethod
    def _open(how: Callable[[], _Conn]) -> _Conn:
        try:
            return how()
        except OSError as e:  # refused, unreachable, a certificate not trusted, a timeout
            raise ConnectionLost(f"{type(e).__name__}: {e}") from e

    def _exchange(self, conn: _Conn, method: str, head: bytes,
                  body: Body, timed: bool = False) -> Response:
        try:
            try:
                sent = time.monotonic()  # after the connection (and its handshake) is made
                if len(body) <= _SMALL_BODY:  # one TLS record for a small request
                    conn.sock.sendall(head + b"".join(body_pieces(body)))
                else:
                    conn.sock.sendall(head)
                    for piece in body_pieces(body):
                        conn.sock.sendall(piece)
                status_line = conn.line()
                answered = time.monotonic() - sent
            except (OSError, ConnectionLost) as e:
                lost = ConnectionLost(f"{type(e).__name__}: {e}")
                # closed or reset before any byte of answer, not slow: a stale idle connection
                # (a timeout is not retried here, or a slow server would cost two timeouts)
                lost.before_answer = (  # type: ignore[attr-defined]
                    not isinstance(e, TimeoutError) and not conn.buf)
                raise lost from e
            resp, keep = self._answer(conn, method, status_line)
            if timed and len(resp.body) <= _SMALL_ANSWER:
                with self._lock:
                    self._answers.append(answered)
        except ConnectionLost:
            conn.close()
            raise
        except OSError as e:  # a timeout, a reset, a TLS failure in the middle of the answer
            conn.close()
            raise ConnectionLost(f"{type(e).__name__}: {e}") from e
        except BaseException:
            conn.close()
            raise
        if keep and not conn.buf:
            self._give(conn)
        else:
            conn.close()
        return resp

    def _answer(self, conn: _Conn, method: str, status_line: bytes) -> tuple[Response, bool]:
        """Status, headers and body; whether the connection may be used again."""
        while True:
            version, status = _status(status_line)
            headers = _headers(conn)
            if not 100 <= status < 200:
                break
            status_line = conn.line()  # 100 Continue and the like: the real answer follows
        keep = version == b"HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if method == "HEAD" or status in _NO_BODY:
            return Response(status, headers, bytearray()), keep
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return Response(status, headers, _chunked(conn)), keep
        length = headers.get("content-length")
        if length is None:  # the body runs to the end of the connection
            while conn.fill():
                pass
            body, conn.buf = conn.buf, bytearray()
            return Response(status, headers, body), False
        if not length.isdigit():  # 1*DIGIT (RFC 9110 §8.6): no sign, no spaces inside
            raise ConnectionLost(f"bad Content-Length {length!r}")
        body = _unfilled(int(length))
        conn.read_into(memoryview(body))
        return Response(status, headers, body), keep


def _request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} would break the request")
        lines.append(f"{name}: {value}")
    if " " in target or "\r" in target or "\n" in target:
        raise ValueError("request target would break the request")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def _status(line: bytes) -> tuple[bytes, int]:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ConnectionLost(f"not an HTTP answer: {line[:40]!r}")
    return parts[0], int(parts[1])


def _headers(conn: _Conn) -> dict[str, str]:
    """Header lines up to the blank one, names lower-cased; a repeated header's values are
    joined with ", " (RFC 9110 §5.3)."""
    out: dict[str, str] = {}
    size = 0
    while True:
        line = conn.line()
        if not line:
            return out
        size += len(line)
        if size > MAX_HEAD:
            raise ConnectionLost("answer head too long")
        name, sep, value = line.partition(b":")
        if not sep:
            raise ConnectionLost(f"malformed header line {line[:40]!r}")
        key = name.strip().lower().decode("latin-1")
        text = value.strip().decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text


def _chunked(conn: _Conn) -> bytearray:
    body = bytearray()
    while True:
        size_line = conn.line().split(b";", 1)[0].strip()
        try:
            n = int(size_line, 16)
        except ValueError:
            raise ConnectionLost(f"bad chunk size {size_line[:20]!r}") from None
        if n == 0:
            while conn.line():  # trailers, up to the blank line
                pass
            return body
        start = len(body)
        body.extend(bytes(n))
        conn.read_into(memoryview(body)[start:])
        if conn.line():
            raise ConnectionLost("chunk not followed by CRLF")


def _dropped(sock: socket.socket) -> bool:
    """An idle connection is readable only if the server closed it (or broke protocol)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        p = select.poll()
        p.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(p.poll(0))
    except (OSError, ValueError):
        return True


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Certificate and host name checked; ``ca_bundle``, else the system's CAs."""
    return ssl.create_default_context(cafile=ca_bundle)
