"""Counters of a live mount: requests by kind, bytes, cache hits, retries, errors; and a few
gauges (``set``, ``peak``), such as the streaming GETs allowed at once.

Updated from worker threads and the trio thread alike, hence the lock. ``s3ssefs stats``
reads them through the control file the daemon serves (see ``fs.py``).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    def request(self, kind: str, *, up: int = 0, down: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.requests[kind] += 1
            if up:
                self.counters["bytes_up"] += up
            if down:
                self.counters["bytes_down"] += down
            if retries:
                self.counters["retries"] += retries

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def set(self, name: str, value: int) -> None:
        """A gauge: the value now (e.g. how many streaming GETs may run at once)."""
        with self._lock:
            self.counters[name] = value

    def peak(self, name: str, value: int) -> None:
        """The largest value seen."""
        with self._lock:
            if value > self.counters[name]:
                self.counters[name] = value

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self.requests), "errors": dict(self.errors),
                    **dict(self.counters)}

    def format(self) -> str:
        s = self.snapshot()
        lines = ["requests:"]
        lines += [f"  {k:24} {v}" for k, v in sorted(s.pop("requests").items())]
        errs = s.pop("errors")
        lines.append(f"errors: {sum(errs.values())}")
        lines += [f"  {k:24} {v}" for k, v in sorted(errs.items())]
        for k in ("bytes_up", "bytes_down", "retries", "cache_hits", "cache_misses"):
            lines.append(f"{k + ':':26} {s.pop(k, 0)}")
        lines += [f"{k + ':':26} {v}" for k, v in sorted(s.items())]
        return "\n".join(lines) + "\n"
