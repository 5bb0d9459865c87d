"""A fault-injecting TCP proxy for the mounted fault tests (threads, standard library only).

It forwards raw TCP to the real RGW, so the TLS stream passes through untouched: point the
daemon at ``https://127.0.0.1:PORT`` and certificate checks still pass (the RGW certificate
names IP 127.0.0.1).  Faults are switched at run time, from the test:

* ``down()`` / ``up()``: the listening socket is closed (new connections are *refused*, as
  for a server that is down) and every open connection is reset; ``up()`` listens again on
  the same port;
* ``reset_after(nbytes, count, direction)``: the next ``count`` connections that carry more
  than ``nbytes`` in ``direction`` (``"up"`` client→server, ``"down"``, ``"any"``) are cut
  with a TCP reset right there — mid-body;
* ``stall(seconds)``: every connection holds its data (both ways) until that time has passed;
* ``latency(seconds)``: each chunk forwarded is delayed that long;
* ``slowdown(count)``: the next ``count`` HTTP requests are answered by the proxy itself —
  a TLS handshake with a certificate for 127.0.0.1 signed by the test CA, then
  ``HTTP/1.1 503 Slow Down`` with S3's ``SlowDown`` XML and ``Connection: close`` — after
  which new connections pass through again.

``stats`` counts connections, resets and canned answers so a test can check a fault fired.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message>"
                 b"<RequestId>faultproxy</RequestId></Error>")


def make_leaf_cert(ca_crt: Path, ca_key: Path, out_dir: Path) -> tuple[Path, Path]:
    """A server certificate for IP 127.0.0.1 signed by the test CA (openssl CLI)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key, csr, crt, ext = (out_dir / n for n in ("proxy.key", "proxy.csr", "proxy.crt",
                                                "proxy.ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    run = [["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", "/CN=127.0.0.1"],
           ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey",
            str(ca_key), "-CAcreateserial", "-CAserial", str(out_dir / "ca.srl"), "-out",
            str(crt), "-days", "2", "-sha256", "-extfile", str(ext)]]
    for argv in run:
        subprocess.run(argv, check=True, capture_output=True)
    return crt, key


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class ProxyStats:
    connections: int = 0
    resets: int = 0
    canned_503: int = 0
    stalled: int = 0  # chunks held back by stall() (the fault really met a request)
    bytes_up: int = 0
    bytes_down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class FaultProxy:
    def __init__(self, target: tuple[str, int], *, tls_cert: tuple[Path, Path] | None = None,
                 port: int = 0) -> None:
        self.target = target
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = False
        self._stall_until = 0.0
        self._latency = 0.0
        self._reset_bytes = 0
        self._reset_count = 0
        self._reset_dir = "any"
        self._slowdown = 0
        self._ssl: ssl.SSLContext | None = None
        if tls_cert is not None:
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(str(tls_cert[0]), str(tls_cert[1]))
        self.port = port
        self._listen()

    # ------------------------------------------------------------------ control
    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def down(self) -> None:
        """Refuse new connections and reset the open ones (the server went away)."""
        with self._lock:
            lst, self._listener = self._listener, None
            conns = list(self._conns)
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        for c in conns:
            _reset(c)
        self.stats.add("resets", len(conns))

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
        self._listen()

    def stall(self, seconds: float) -> None:
        self._stall_until = time.monotonic() + seconds

    def latency(self, seconds: float) -> None:
        self._latency = seconds

    def reset_after(self, nbytes: int, count: int = 1, direction: str = "any") -> None:
        assert direction in ("up", "down", "any")
        with self._lock:
            self._reset_bytes, self._reset_count, self._reset_dir = nbytes, count, direction

    def slowdown(self, count: int) -> None:
        assert self._ssl is not None, "slowdown needs tls_cert"
        with self._lock:
            self._slowdown = count
        self.drop_connections()  # pooled connections would bypass the canned answers

    def drop_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _reset(c)

    def clear(self) -> None:
        """No faults: plain forwarding (and listening)."""
        with self._lock:
            self._stall_until = 0.0
            self._latency = 0.0
            self._reset_count = 0
            self._slowdown = 0
        self.up()

    def close(self) -> None:
        self._closed = True
        self.down()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _listen(self) -> None:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(128)
        self.port = lst.getsockname()[1]
        with self._lock:
            self._listener = lst
        threading.Thread(target=self._accept_loop, args=(lst,), daemon=True).start()

    def _accept_loop(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return  # listener closed: down() or close()
            self.stats.add("connections")
            with self._lock:
                canned = self._slowdown > 0
            target = self._serve_503 if canned else self._forward
            threading.Thread(target=target, args=(client,), daemon=True).start()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._conns.update(socks)

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            self._conns.difference_update(socks)

    def _hold(self) -> None:
        if time.monotonic() < self._stall_until:
            self.stats.add("stalled")
        while time.monotonic() < self._stall_until and not self._closed:
            time.sleep(0.05)
        if self._latency:
            time.sleep(self._latency)

    def _forward(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            _reset(client)
            return
        server.settimeout(None)
        self._track(client, server)
        peer = {client: server, server: client}
        eof: set[socket.socket] = set()
        moved = {"up": 0, "down": 0}
        armed = False  # this connection is one of the next `count` to be reset
        try:
            while len(eof) < 2:
                try:
                    ready, _, _ = select.select([s for s in peer if s not in eof], [], [], 0.5)
                except (OSError, ValueError):
                    return  # reset from outside (down(), drop_connections())
                for s in ready:
                    try:
                        data = s.recv(65536)
                    except OSError:
                        return
                    if not data:
                        eof.add(s)
                        with contextlib.suppress(OSError):
                            peer[s].shutdown(socket.SHUT_WR)
                        continue
                    d = "up" if s is client else "down"
                    self._hold()
                    with self._lock:
                        if not armed and self._reset_count > 0 and \
                                self._reset_dir in (d, "any") and \
                                moved[d] + len(data) > self._reset_bytes:
                            armed = True
                            self._reset_count -= 1
                    if armed:
                        cut = max(0, self._reset_bytes - moved[d])
                        with contextlib.suppress(OSError):
                            peer[s].sendall(data[:cut])
                        self.stats.add("resets")
                        return
                    moved[d] += len(data)
                    self.stats.add("bytes_" + d, len(data))
                    try:
                        peer[s].sendall(data)
                    except OSError:
                        return
        finally:
            self._untrack(client, server)
            _reset(client)
            _reset(server)

    def _serve_503(self, client: socket.socket) -> None:
        """TLS handshake ourselves, then answer requests with 503 SlowDown while any are due."""
        assert self._ssl is not None
        self._track(client)
        try:
            client.settimeout(10)
            tls = self._ssl.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            self._untrack(client)
            _reset(client)
            return
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            # a body not announced with 100-continue is read (and dropped) before answering
            if headers.get(b"expect", b"").lower() != b"100-continue":
                want = int(headers.get(b"content-length", b"0") or 0) - len(rest)
                while want > 0:
                    chunk = tls.recv(min(65536, want))
                    if not chunk:
                        break
                    want -= len(chunk)
            with self._lock:
                self._slowdown = max(0, self._slowdown - 1)
            self.stats.add("canned_503")
            tls.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                        b"x-amz-request-id: faultproxy\r\nConnection: close\r\n"
                        + f"Content-Length: {len(SLOWDOWN_BODY)}\r\n\r\n".encode()
                        + SLOWDOWN_BODY)
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.unwrap()
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            self._untrack(client)
            with contextlib.suppress(OSError):
                tls.close()


# ---------------------------------------------------------------------- an HTTP-level proxy

SSE_C_HEADER = "x-amz-server-side-encryption-customer-algorithm"


def s3_error(status: int, code: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>s3proxy</RequestId></Error>").encode()
    return status, [("Content-Type", "application/xml")], body


class S3Proxy:
    """An HTTPS reverse proxy that reads each S3 request and answer, and can answer as AWS does
    where the server behind it does not.  It serves a certificate for 127.0.0.1 signed by the
    server's test CA (``ca_key`` beside ``ca``), so clients verify it as they verify the
    server, and keeps the ``Host`` header, so RGW's signature checks still pass.  Switches:

    * ``aws_sse_c``: AWS's SSE-C answers — a GET/HEAD with SSE-C headers of an object stored
      without SSE-C is ``400 InvalidRequest`` ("encryption parameters are not applicable"), and
      CompleteMultipartUpload of an upload begun with SSE-C must repeat its SSE-C headers
      (``400 InvalidRequest``: AWS asks for them when the upload used a checksum or a bucket
      policy demands SSE-C headers);
    * ``blocked_sse_c``: a bucket made after April 2026 on AWS — GetBucketEncryption lists
      ``SSE-C`` in ``BlockedEncryptionTypes`` and every write with SSE-C is ``403 AccessDenied``;
    * ``region``: a bucket in that region — a request signed for another is
      ``400 AuthorizationHeaderMalformed`` naming the region (AWS's redirect answer);
    * ``refuse_lean``: a server that rejects a detail of the lean request path
      (:mod:`s3ssefs.wire`, which sends no ``User-Agent``): ``403 SignatureDoesNotMatch``.

    ``requests`` records (method, path?query, had SSE-C headers, status) of every request.
    """

    def __init__(self, endpoint: str, ca: Path, workdir: Path) -> None:
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(endpoint)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 443)
        client_ctx = ssl.create_default_context(cafile=str(ca))
        crt, key = make_leaf_cert(ca, ca.parent / "ca.key", workdir)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(crt), str(key))
        self.aws_sse_c = False
        self.blocked_sse_c = False
        self.refuse_lean = False
        self.region: str | None = None
        self.requests: list[tuple[str, str, bool, int]] = []
        self._sse_c_uploads: set[str] = set()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                keyed = SSE_C_HEADER in {k.lower() for k in self.headers}
                answer = proxy._answer_first(self.command, self.path, self.headers, keyed)
                if answer is None:
                    conn = http.client.HTTPSConnection(*proxy.upstream, context=client_ctx,
                                                       timeout=300)
                    try:
                        conn.putrequest(self.command, self.path, skip_host=True,
                                        skip_accept_encoding=True)
                        for name, value in self.headers.items():
                            if name.lower() not in ("expect", "connection"):
                                conn.putheader(name, value)
                        conn.endheaders(body or None)
                        resp = conn.getresponse()
                        data = resp.read()
                    finally:
                        conn.close()
                    answer = proxy._answer_after(self.command, self.path, keyed, resp.status,
                                                 resp.getheaders(), data)
                status, headers, data = answer
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, keyed, status))
                self.send_response_only(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "connection",
                                            "content-length"):
                        self.send_header(name, value)
                length_out = str(len(data))
                if self.command == "HEAD":
                    length_out = dict((k.lower(), v) for k, v in headers).get(
                        "content-length", "0") if status < 300 else "0"
                self.send_header("Content-Length", length_out)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = server_ctx.wrap_socket(self.server.socket, server_side=True,
                                                    do_handshake_on_connect=False)
        self.endpoint = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _answer_first(self, method: str, path: str, headers: object, keyed: bool,
                      ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """An answer the proxy gives without asking the server, or None."""
        import re
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(path).query, keep_blank_values=True)
        auth = headers.get("Authorization") or ""  # type: ignore[attr-defined]
        m = re.search(r"Credential=[^/]+/\d+/([^/]+)/s3/", auth)
        if self.region and m and m.group(1) != self.region:
            status, hdrs, body = s3_error(
                400, "AuthorizationHeaderMalformed", f"The authorization header is malformed; "
                f"the region '{m.group(1)}' is wrong; expecting '{self.region}'")
            body = body.replace(b"</Error>",
                                f"<Region>{self.region}</Region></Error>".encode())
            return status, [*hdrs, ("x-amz-bucket-region", self.region)], body
        if self.refuse_lean and not headers.get("User-Agent"):  # type: ignore[attr-defined]
            return s3_error(403, "SignatureDoesNotMatch", "The request signature we "
                            "calculated does not match the signature you provided.")
        if self.blocked_sse_c and method == "GET" and "encryption" in query:
            body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<ServerSideEncryptionConfiguration>'
                    b"<Rule><ApplyServerSideEncryptionByDefault><SSEAlgorithm>AES256"
                    b"</SSEAlgorithm></ApplyServerSideEncryptionByDefault>"
                    b"<BlockedEncryptionTypes><EncryptionType>SSE-C</EncryptionType>"
                    b"</BlockedEncryptionTypes></Rule></ServerSideEncryptionConfiguration>")
            return 200, [("Content-Type", "application/xml")], body
        if self.blocked_sse_c and keyed and method in ("PUT", "POST"):
            return s3_error(403, "AccessDenied", "Requests specifying Server Side Encryption "
                            "with Customer provided keys are blocked for this bucket.")
        if self.aws_sse_c and method == "POST" and "uploadId" in query and not keyed:
            with self._lock:
                sse_c = query["uploadId"][0] in self._sse_c_uploads
            if sse_c:
                return s3_error(400, "InvalidRequest", "The multipart upload initiate "
                                "requested encryption. Subsequent part requests must include "
                                "the appropriate encryption parameters.")
        return None

    def _answer_after(self, method: str, path: str, keyed: bool, status: int,
                      headers: list[tuple[str, str]], data: bytes,
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        """The server's answer, or what AWS would have answered instead."""
        import re
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(path).query, keep_blank_values=True)
        low = {k.lower(): v for k, v in headers}
        if method == "POST" and "uploads" in query and keyed and status == 200:
            m = re.search(rb"<UploadId>([^<]+)</UploadId>", data)
            if m:
                with self._lock:
                    self._sse_c_uploads.add(m.group(1).decode())
        # an object stored without SSE-C: RGW echoes no key MD5 to a keyed read, LocalStack
        # echoes its default SSE-S3; AWS refuses the read
        if self.aws_sse_c and keyed and method in ("GET", "HEAD") and status in (200, 206) \
                and "uploadId" not in query and "list-type" not in query \
                and ("x-amz-server-side-encryption" in low
                     or "x-amz-server-side-encryption-customer-key-md5" not in low):
            return s3_error(400, "InvalidRequest", "The encryption parameters are not "
                            "applicable to this object.")
        return status, headers, data

    def count(self, pred: object) -> int:
        with self._lock:
            return sum(1 for r in self.requests if pred(r))  # type: ignore[operator]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> S3Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
