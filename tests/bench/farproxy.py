"""A TCP proxy that makes the local RGW look far away: for ``bench.py --far``.

Every connection through it gets a one-way delay (each chunk is held that long before it is
passed on, in both directions, without holding up the chunks behind it) and a rate cap of its
own, as a server across a network gives: round trips of twice the delay, and a rate per
connection (AWS quotes ~85-90 MB/s per connection to S3).  At most WINDOW bytes wait in the
proxy per direction, so a reader that stops reading stops the sender, as TCP's window does.

The TLS stream passes through untouched (the RGW certificate names 127.0.0.1, where this
listens).  This machine has no ``netem`` (``CONFIG_NET_SCH_NETEM`` unset), hence a proxy; its
own CPU is taken from the same two cores as everything else, and is the same for every system
measured through it.

    python farproxy.py TARGET_PORT DELAY_MS RATE_MIBS    # prints the port it listens on
"""

from __future__ import annotations

import collections
import contextlib
import socket
import sys
import threading
import time

WINDOW = 4 << 20
CHUNK = 256 << 10


class _Link:
    """One proxied connection: both sockets are shut when a direction fails, and closed once
    both directions have ended."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.socks = (a, b)
        self.ended = 0
        self.lock = threading.Lock()

    def fail(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv()

    def end(self) -> None:
        with self.lock:
            self.ended += 1
            last = self.ended == 2
        if last:
            for s in self.socks:
                s.close()


def _pipe(link: _Link, src: socket.socket, dst: socket.socket, delay: float,
          rate: float) -> None:
    """Move bytes from ``src`` to ``dst``, each chunk ``delay`` late, at most ``rate`` B/s."""
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    cv = threading.Condition()
    state = {"held": 0, "dead": False}

    def read() -> None:
        while True:
            try:
                data = src.recv(CHUNK)
            except OSError:
                data = b""
            with cv:
                while state["held"] > WINDOW and not state["dead"]:
                    cv.wait()
                if not state["dead"]:
                    queue.append((time.monotonic() + delay, data))
                    state["held"] += len(data)
                    cv.notify_all()
            if not data:
                return

    def write() -> None:
        free_at = 0.0  # when the cap lets the next byte go
        try:
            while True:
                with cv:
                    while not queue:
                        cv.wait()
                    due, data = queue.popleft()
                    state["held"] -= len(data)
                    cv.notify_all()
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                wait = max(due, free_at) - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                except OSError:
                    with cv:
                        state["dead"] = True
                        cv.notify_all()
                    link.fail()
                    return
                free_at = max(time.monotonic(), free_at) + len(data) / rate
        finally:
            link.end()

    for fn in (read, write):
        threading.Thread(target=fn, daemon=True).start()


def main() -> None:
    target, delay, rate = int(sys.argv[1]), float(sys.argv[2]) / 1000, float(sys.argv[3]) * 2**20
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(("127.0.0.1", target))
        except OSError:
            client.close()
            continue
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, server)
        _pipe(link, client, server, delay, rate)
        _pipe(link, server, client, delay, rate)


if __name__ == "__main__":
    main()
