"""The lean path's HTTP/1.1 transport (:mod:`s3ssefs.http1`) against a scripted local server.

RGW answers every request well, so the cases a keep-alive client must survive (a server that
closed an idle connection, a body cut off, chunked and read-to-close bodies, 1xx answers) are
played here by a small plain-TCP server on 127.0.0.1.  This stands in for fault injection only:
that the transport talks to RGW over TLS, with SSE-C, is checked in test_t2_store.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from s3ssefs.http1 import ConnectionLost, Pieces, Pool

# what the server does for (connection number, request number on it): bytes to send, then
# keep the connection open; or (bytes, True) to close after sending them
Script = Callable[[int, int], "bytes | tuple[bytes, bool]"]


class ScriptedServer:
    """Accepts connections and answers each request as ``script`` says; records requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request head)
        self.bodies: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                n = self.connections
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(sock, n), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, sock: socket.socket, conn_no: int) -> None:
        buf = b""
        with sock:
            for req_no in range(1000):
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += sock.recv(65536)
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    self.requests.append((conn_no, head))
                    self.bodies.append(body)
                answer = self.script(conn_no, req_no)
                close = False
                if isinstance(answer, tuple):
                    answer, close = answer
                sock.sendall(answer)
                if close:
                    sock.shutdown(socket.SHUT_RDWR)
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Script], tuple[ScriptedServer, Pool]]]:
    made: list[tuple[ScriptedServer, Pool]] = []

    def start(script: Script) -> tuple[ScriptedServer, Pool]:
        server = ScriptedServer(script)
        pool = Pool("127.0.0.1", server.port, None, maxsize=4, connect_timeout=5,
                    read_timeout=5)
        made.append((server, pool))
        return server, pool

    yield start
    for server, pool in made:
        pool.close()
        server.close()


def ok(body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_bodies_come_whole_over_one_kept_alive_connection(serve) -> None:
    big = os.urandom(3 << 20)  # many socket reads, straight into the body's buffer
    answers = [ok(b"first"), ok(big, "ETag: \"e1\"", "x-amz-meta-Mode: 33188"), ok(b"")]
    server, pool = serve(lambda c, r: answers[r])
    assert pool.request("GET", "/b/k1", [("Host", "h")]).body == b"first"
    resp = pool.request("PUT", "/b/k2", [("Content-Length", "4")], b"data")
    assert resp.status == 200 and resp.body == big
    assert resp.headers["etag"] == '"e1"' and resp.headers["x-amz-meta-mode"] == "33188"
    assert pool.request("HEAD", "/b/k3", []).body == b""
    assert server.connections == 1
    assert [h.split(b"\r\n")[0] for _, h in server.requests] == [
        b"GET /b/k1 HTTP/1.1", b"PUT /b/k2 HTTP/1.1", b"HEAD /b/k3 HTTP/1.1"]
    assert server.bodies[1] == b"data"


def test_a_body_in_pieces_arrives_as_one(serve) -> None:
    """A part is sent as its blocks, unjoined (:class:`~s3ssefs.http1.Pieces`): the server
    gets the bytes in order, whatever the pieces' kinds, small bodies and large."""
    blocks = [os.urandom(1 << 20), bytearray(os.urandom(1 << 20)),
              memoryview(os.urandom(3 << 20))[5:(1 << 20) + 5], b""]
    small = [b"ab", memoryview(b"cde"), bytearray(b"f")]
    server, pool = serve(lambda c, r: ok(b""))
    for body in (Pieces(blocks), Pieces(small), Pieces([])):
        assert len(body) == sum(len(b) for b in body.bufs)
        pool.request("PUT", "/b/k", [("Content-Length", str(len(body)))], body)
    assert server.bodies == [b"".join(blocks), b"abcdef", b""]
    assert server.connections == 1


def test_a_head_answer_has_no_body_even_with_a_length(serve) -> None:
    server, pool = serve(lambda c, r: b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    for _ in range(2):
        resp = pool.request("HEAD", "/b/k", [])
        assert resp.body == b"" and resp.headers["content-length"] == "5000"
    assert server.connections == 1


def test_chunked_bodies_after_a_100_continue(serve) -> None:
    answer = (b"HTTP/1.1 100 Continue\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n")
    server, pool = serve(lambda c, r: answer)
    for _ in range(2):
        resp = pool.request("GET", "/b/k", [])
        assert (resp.status, bytes(resp.body)) == (200, b"hello world")
    assert server.connections == 1


def test_connection_close_and_a_body_read_to_the_end(serve) -> None:
    server, pool = serve(lambda c, r: (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it",
                                       True))
    for _ in range(2):
        assert pool.request("GET", "/b/k", []).body == b"all of it"
    assert server.connections == 2


def test_an_idle_connection_the_server_closed_is_replaced_without_an_error(serve) -> None:
    """The server closes an idle keep-alive connection: closed before the next request (seen
    when it is taken), or as the request arrives (no byte of answer): both are retried once,
    on a new connection, and the caller sees only the answer."""
    server, pool = serve(lambda c, r: (ok(b"a"), True) if c == 0 else ok(b"b"))
    assert pool.request("GET", "/b/k", []).body == b"a"
    assert pool.request("GET", "/b/k", []).body == b"b"
    assert server.connections == 2

    # closes without answering the second request on each connection
    server, pool = serve(lambda c, r: ok(b"x") if r == 0 else (b"", True))
    for _ in range(3):
        assert pool.request("GET", "/b/k", []).body == b"x"
    assert server.connections == 3
    assert len(server.requests) == 5  # 3 answered, 2 dropped unanswered and sent again


def test_the_one_retry_asks_before_sending_again(serve) -> None:
    """A call given up on (the store's deadline passed) must not reach the server late: the
    retry on a new connection asks ``before_send`` again, and its refusal stops it."""
    server, pool = serve(lambda c, r: ok(b"x") if r == 0 else (b"", True))
    asked = []

    def before_send() -> None:
        asked.append(1)
        if len(asked) == 3:
            raise RuntimeError("abandoned")

    length = [("Content-Length", "2")]
    assert pool.request("PUT", "/b/k", length, b"v1", before_send=before_send).body == b"x"
    with pytest.raises(RuntimeError, match="abandoned"):
        pool.request("PUT", "/b/k", length, b"v2", before_send=before_send)
    assert len(asked) == 3
    assert server.bodies == [b"v1", b"v2"] and server.connections == 1


def test_a_body_cut_off_is_an_error_not_short_data(serve) -> None:
    server, pool = serve(lambda c, r: (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
                                       + b"x" * 60, True))
    with pytest.raises(ConnectionLost, match="60 of 100"):
        pool.request("GET", "/b/k", [])
    # a new connection closed before any answer is an error too: no endless retrying
    server, pool = serve(lambda c, r: (b"", True))
    with pytest.raises(ConnectionLost):
        pool.request("GET", "/b/k", [])
    assert server.connections == 1


def test_an_answer_begun_then_cut_is_not_sent_again(serve) -> None:
    """Only a connection closed before any byte of answer is retried: once the server began
    answering, the request reached it, and the failure goes to the caller's retry policy."""
    server, pool = serve(lambda c, r: ok(b"x") if r == 0 else (b"HTTP/1.1 2", True))
    assert pool.request("GET", "/b/k", []).body == b"x"
    with pytest.raises(ConnectionLost):
        pool.request("GET", "/b/k", [])
    assert server.connections == 1 and len(server.requests) == 2


def test_malformed_answers_are_errors(serve) -> None:
    for answer in (b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        _, pool = serve(lambda c, r, a=answer: (a, True))
        with pytest.raises(ConnectionLost):
            pool.request("GET", "/b/k", [])


def test_a_header_that_would_split_the_request_is_refused(serve) -> None:
    server, pool = serve(lambda c, r: ok(b""))
    for headers, target in (([("x-amz-meta-a", "1\r\nX-Evil: 2")], "/b/k"),
                            ([("Bad\nName", "v")], "/b/k"), ([], "/b/k HTTP/1.1\r\nX: y")):
        with pytest.raises(ValueError):
            pool.request("GET", target, headers)
    assert server.connections == 0 and server.requests == []


def test_nothing_listening_is_a_connection_error() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    pool = Pool("127.0.0.1", port, None, maxsize=2, connect_timeout=5, read_timeout=5)
    with pytest.raises(ConnectionLost, match="ConnectionRefused"):
        pool.request("GET", "/b/k", [])


def test_fastest_answer_times_small_answers_sent_at_quiet_moments(serve) -> None:
    """The pool keeps the least time the server took to answer a small request (how far away
    it is, which sets the streaming GETs in :mod:`s3ssefs.streams`): large answers and
    requests sent with two others in flight are left out, as a busy server's are slow."""
    held = threading.Event()
    holder: list[ScriptedServer] = []

    def script(c: int, r: int) -> bytes:
        head = [h for n, h in holder[0].requests if n == c][-1]
        path = head.split(b" ")[1]
        if path == b"/hold":
            held.wait(10)
        else:
            time.sleep({b"/slow": 0.5, b"/big": 0.02, b"/mid": 0.03}.get(path, 0.0))
        return ok(os.urandom(128 << 10) if path == b"/big" else b"x")

    server, pool = serve(script)
    holder.append(server)
    assert pool.fastest_answer() is None
    pool.request("GET", "/slow", [])
    slow = pool.fastest_answer()
    assert slow is not None and slow >= 0.5  # the server took that long: no answer is faster
    assert len(pool.request("GET", "/big", []).body) == 128 << 10  # quicker, but large
    assert pool.fastest_answer() == slow  # not timed
    pool.request("HEAD", "/mid", [])
    mid = pool.fastest_answer()
    assert mid is not None and 0.03 <= mid < slow  # the least so far

    # two requests held by the server: the third, answered at once, is not timed
    threads = [threading.Thread(target=pool.request, args=("GET", "/hold", []))
               for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while sum(h.startswith(b"GET /hold") for _, h in server.requests) < 2:
        assert time.monotonic() < deadline, "the held requests never reached the server"
        time.sleep(0.005)
    pool.request("GET", "/fast", [])
    assert pool.fastest_answer() == mid  # answered at once, but not timed
    held.set()
    for t in threads:
        t.join(10)
