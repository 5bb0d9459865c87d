"""T6: the real RGW process stopped and restarted under a live mount.

test_t6_faults.py simulates a dead server with a TCP proxy; here ``radosgw`` itself goes away
(SIGTERM, as an admin or a crash-looping unit would) and comes back, so connections are refused
by the kernel, keep-alive connections die with the process and a new process answers with new
sockets.  The cluster's data lives in the OSD (memstore), so stopping radosgw loses nothing
server-side.  The :class:`RadosGw` helper stops it by PID and restarts it exactly as
``tests/rgw-up.sh`` does; its fixture always leaves a running radosgw behind, pass or fail,
because the rest of the session shares it.

Every file operation under the outage runs in a child process with a deadline, so a FUSE
request that waits forever fails the test instead of hanging it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import RGW_DIR, S3SSEFS, Mounted, Rgw, bucket_sha, sse, wait_for

from s3ssefs.keys import Key

log = logging.getLogger("tests.restart")

REQUEST_TIMEOUT = 5
OUTAGE = 3  # seconds radosgw stays down while a read is in flight (at least)
BOUND = 3 * REQUEST_TIMEOUT + 15  # no file operation during the outage may take longer


# ---------------------------------------------------------------------- radosgw control
class RadosGw:
    """The test cluster's radosgw process: stop it by PID, start it as rgw-up.sh does."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.conf = state_dir / "ceph.conf"
        self.pidfile = state_dir / "run" / "client.rgw.a.pid"
        self.outages = 0

    def pid(self) -> int | None:
        """PID of the running radosgw of *this* cluster (its argv names our ceph.conf)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        if not argv or not argv[0].endswith(b"radosgw") or str(self.conf).encode() not in argv:
            return None
        return pid

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM radosgw and wait for the process to be gone; seconds it took."""
        pid = self.pid()
        assert pid is not None, "radosgw is not running"
        t0 = time.monotonic()
        pidfd = os.pidfd_open(pid)  # not our child: a pidfd tells when it exits
        try:
            os.kill(pid, signal.SIGTERM)
            ready, _, _ = select.select([pidfd], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                ready, _, _ = select.select([pidfd], [], [], 30)
            assert ready, f"radosgw {pid} survives SIGKILL"
        finally:
            os.close(pidfd)
        self.outages += 1
        return time.monotonic() - t0

    def answers(self) -> bool:
        """rgw-up.sh's readiness check: both frontends answer an HTTP request."""
        http = ["curl", "-s", "-o", "/dev/null", "--max-time", "5", "http://127.0.0.1:7480/"]
        https = ["curl", "-s", "-o", "/dev/null", "--max-time", "5", "--cacert",
                 str(self.dir / "tls" / "ca.crt"), "https://127.0.0.1:7443/"]
        return all(subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
                   for argv in (http, https))

    def start(self, timeout: float = 120) -> float:
        """Start radosgw (it daemonizes) and wait until it answers; seconds it took."""
        t0 = time.monotonic()
        if self.pid() is None:
            with open(self.dir / "log" / "rgw-start.log", "ab") as err:
                r = subprocess.run(["radosgw", "-c", str(self.conf), "-n", "client.rgw.a"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=err, timeout=120, start_new_session=True)
            assert r.returncode == 0, \
                f"radosgw failed to start (see {self.dir}/log/client.rgw.a.log)"
        assert wait_for(self.answers, timeout, step=0.2), \
            f"radosgw not answering {timeout:.0f}s after start"
        return time.monotonic() - t0


@pytest.fixture
def radosgw(rgw: Rgw, bucket: str, mount_factory: Any) -> Iterator[RadosGw]:
    """The radosgw to stop and start; running again when the test ends, however it ends.

    It depends on ``bucket`` and ``mount_factory`` so its teardown runs before theirs: the
    mounts flush and the bucket is emptied against a live server."""
    gw = RadosGw(RGW_DIR)
    assert gw.pid() is not None and gw.answers(), "radosgw of the test cluster is not up"
    try:
        yield gw
    finally:
        if gw.pid() is None or not gw.answers():
            gw.start()


# ---------------------------------------------------------------------- helpers
def data(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def spill_bytes(m: Mounted) -> int:
    return sum(p.stat().st_size for p in m.cache_dir.rglob("spill-*") if p.is_file())


def refusals(m: Mounted) -> int:
    """Connection attempts of the daemon that met a closed port (botocore logs each failed
    attempt's traceback at DEBUG, the level the tests mount with)."""
    return m.log_file.read_text(errors="replace").count("ConnectionRefusedError: [Errno 111]")


# A child process doing file operations, one JSON object per line on stdout.  ``gate`` lines
# make it wait for a line on stdin, so the test decides when the next step happens.
CHILD = r"""
import hashlib, json, os, random, sys, time
op, path = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
stage = "open"
out = {}
def say(**kw):
    print(json.dumps(kw), flush=True)
try:
    if op in ("write", "hold"):
        n, seed = int(sys.argv[3]), sys.argv[4]
        data = random.Random(seed).randbytes(n)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        stage = "write"
        for i in range(0, n, 1 << 20):
            os.write(fd, data[i:i + (1 << 20)])
        if op == "hold":  # written, still open: wait for the test, then close
            say(gate="written")
            sys.stdin.readline()
            t0 = time.monotonic()
        stage = "close"
        os.close(fd)
        out["sha"] = hashlib.sha256(data).hexdigest()
    elif op == "read":
        gate, pace = int(sys.argv[3]), float(sys.argv[4])
        fd = os.open(path, os.O_RDONLY)
        stage = "read"
        h = hashlib.sha256()
        got = 0
        while True:
            if got == gate:
                say(gate="read", bytes=got)
                sys.stdin.readline()
                t0 = time.monotonic()
            elif pace and got > gate:
                time.sleep(pace)  # a steady consumer (a player, a copy to a slow disk)
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
            got += len(b)
        stage = "close"
        os.close(fd)
        out["sha"] = h.hexdigest()
        out["bytes"] = got
    elif op == "listdir":
        out["names"] = sorted(os.listdir(path))
    say(ok=True, t=time.monotonic() - t0, **out)
except OSError as e:
    say(ok=False, errno=e.errno, stage=stage, t=time.monotonic() - t0)
"""


class Child:
    """One child process running CHILD; lines are read by a thread so waits have deadlines."""

    def __init__(self, op: str, path: Path, *args: Any) -> None:
        self.what = f"{op} {path.name}"
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, op, str(path), *map(str, args)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next(self, deadline: float = BOUND) -> dict[str, Any]:
        """The child's next line; fails the test if it does not come within ``deadline``."""
        try:
            line = self.lines.get(timeout=deadline)
        except queue.Empty:
            self.kill()
            pytest.fail(f"{self.what}: nothing after {deadline:.0f}s: a FUSE request hangs")
        if line is None:
            self.p.wait(timeout=30)
            err = self.p.stderr.read() if self.p.stderr else ""
            pytest.fail(f"{self.what}: child exited {self.p.returncode}: {err[-2000:]}")
        r: dict[str, Any] = json.loads(line)
        r["wall"] = time.monotonic() - self.t0
        return r

    def go(self) -> None:
        """Release a child waiting at a gate."""
        assert self.p.stdin is not None
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        self.t0 = time.monotonic()

    def result(self, deadline: float = BOUND) -> dict[str, Any]:
        r = self.next(deadline)
        self.p.wait(timeout=30)
        return r

    def kill(self) -> None:
        self.p.kill()
        self.p.wait(timeout=30)


def run(op: str, path: Path, *args: Any, deadline: float = BOUND) -> dict[str, Any]:
    """One file operation in a child process, with a deadline."""
    return Child(op, path, *args).result(deadline)


def read_whole(path: Path) -> dict[str, Any]:
    """Read a file through the mount in a child process (no gate, no pacing)."""
    return run("read", path, -1, 0)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*S3SSEFS, *args], capture_output=True, text=True, timeout=timeout)


def record(line: str) -> None:
    """A figure for the report: on stdout (pytest -s) and in the test log."""
    print(f"\n{line}")
    log.info("%s", line)


# ====================================================================== tests
@pytest.mark.allow_warnings
def test_close_while_radosgw_is_down_then_retry_uploads(
        radosgw: RadosGw, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """A file written and closed while radosgw is stopped: close() returns EIO within about
    request_timeout (never a hang, never a silent success), the data waits in the encrypted
    spill through failed retry rounds, and once radosgw is back the retry loop uploads it —
    whole, under the SSE-C key — without any action from the user."""
    size = 10 << 20  # > part_size/block_size + 2 blocks: part of it must be in the spill
    m = mount_factory(bucket, "--request-timeout", str(REQUEST_TIMEOUT), "--retry-interval",
                      "1", "--dir-ttl", "300", "--part-size", "5M")
    assert run("listdir", m.path)["ok"]  # the listing answers the new name's lookup later

    down = radosgw.stop()
    w = run("write", m.path / "down.bin", size, "down")
    assert not w["ok"] and w["errno"] == errno.EIO and w["stage"] == "close", w
    assert w["wall"] < REQUEST_TIMEOUT + 10, w
    assert spill_bytes(m) >= 3 << 20, "the written data is not in the spill"
    # the retry loop meets the dead server again: the data stays put
    failures = m.log_file.read_text(errors="replace").count("down.bin failed, data kept")
    assert wait_for(lambda: m.log_file.read_text(errors="replace")
                    .count("down.bin failed, data kept") > failures, BOUND), \
        "the retry loop never retried while radosgw was down"
    assert spill_bytes(m) >= 3 << 20

    up = radosgw.start()
    t0 = time.monotonic()
    assert wait_for(lambda: bucket_sha(s3, bucket, "down.bin", key) is not None, 60), \
        "the spilled write never reached the bucket after radosgw came back"
    delivered = time.monotonic() - t0
    assert bucket_sha(s3, bucket, "down.bin", key) == sha(data(size, "down"))
    with pytest.raises(ClientError):  # stored encrypted: no key, no data
        s3.get_object(Bucket=bucket, Key="down.bin")
    assert wait_for(lambda: spill_bytes(m) == 0, 30), "spill not dropped after the upload"
    r = read_whole(m.path / "down.bin")
    assert r["ok"] and r["sha"] == sha(data(size, "down")), r
    record(f"radosgw restart: stop {down:.1f}s, start {up:.1f}s; close() -> EIO after "
           f"{w['wall']:.1f}s; uploaded by the retry loop {delivered:.1f}s after the restart")
    m.umount()


@pytest.mark.allow_warnings
def test_read_in_flight_across_a_radosgw_restart(
        radosgw: RadosGw, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """A program reading a 128 MiB file while radosgw is stopped for a few seconds and started
    again: the outage is shorter than request_timeout, so the read completes with the right
    bytes (the daemon's requests meet the closed port and are retried with backoff), and the
    mount serves the file again afterwards without a remount."""
    size = 128 << 20
    body = data(size, "big")
    s3.put_object(Bucket=bucket, Key="big.bin", Body=body, **sse(key))
    # the file is twice the largest readahead window (64 MiB), so the reader needs the server
    # during and after the outage; request_timeout is longer than the outage
    timeout = 15
    m = mount_factory(bucket, "--request-timeout", str(timeout))
    reader = Child("read", m.path / "big.bin", 4 << 20, 0.05)  # then ~20 MiB/s
    try:
        gate = reader.next()
        assert gate.get("gate") == "read", gate
        seen = refusals(m)
        reader.go()
        radosgw.stop()
        t_stop = time.monotonic()
        # the outage: OUTAGE seconds, and until the daemon has met the closed port a few times
        assert wait_for(lambda: refusals(m) >= seen + 4 and
                        time.monotonic() - t_stop >= OUTAGE, BOUND, step=0.1), \
            "the reader finished without meeting the stopped server (test tests nothing)"
        outage = time.monotonic() - t_stop
        met = refusals(m) - seen
        radosgw.start()
        r = reader.result(deadline=3 * timeout + 15)
    finally:
        if reader.p.poll() is None:
            reader.kill()
    assert r["ok"], f"the read failed although the outage was shorter than the timeout: {r}"
    assert r["bytes"] == size and r["sha"] == sha(body), "wrong bytes after the restart"
    again = read_whole(m.path / "big.bin")
    assert again["ok"] and again["sha"] == sha(body), again
    record(f"read across a radosgw restart ({outage:.1f}s down, {met} refused connections): "
           f"completed {r['wall']:.1f}s after the stop; re-read ok")
    m.umount()


@pytest.mark.allow_warnings
def test_umount_while_radosgw_is_down_names_unflushed_files(
        radosgw: RadosGw, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """`s3ssefs umount` while radosgw is stopped, with one file closed with EIO and one still
    open for writing: it exits 1 naming both and the mount stays; once radosgw is back the
    open file closes fine, umount exits 0 and both objects are whole."""
    m = mount_factory(bucket, "--request-timeout", str(REQUEST_TIMEOUT), "--retry-interval",
                      "3600", "--dir-ttl", "300")
    assert run("listdir", m.path)["ok"]
    holder = Child("hold", m.path / "open.bin", 2 << 20, "open")
    try:
        gate = holder.next()
        assert gate.get("gate") == "written", gate
        radosgw.stop()
        w = run("write", m.path / "closed.bin", 1 << 20, "closed")
        assert not w["ok"] and w["errno"] == errno.EIO and w["stage"] == "close", w

        t0 = time.monotonic()
        r = cli("umount", str(m.path), timeout=4 * BOUND)
        took = time.monotonic() - t0
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert "could not upload 2 file(s), still mounted" in r.stderr, r.stderr
        assert "closed.bin" in r.stderr and "open.bin" in r.stderr, r.stderr
        assert took < 2 * REQUEST_TIMEOUT + 20, f"umount took {took:.0f}s"
        assert os.path.ismount(m.path)

        radosgw.start()
        holder.go()
        h = holder.result()
        assert h["ok"], h
    finally:
        if holder.p.poll() is None:
            holder.kill()
    m.umount()
    assert bucket_sha(s3, bucket, "open.bin", key) == sha(data(2 << 20, "open"))
    assert bucket_sha(s3, bucket, "closed.bin", key) == sha(data(1 << 20, "closed"))
    record(f"umount with radosgw down: exit 1 after {took:.1f}s: {r.stderr.strip()}")


@pytest.mark.allow_warnings
def test_cat_of_a_file_waiting_for_upload_while_radosgw_is_down(
        radosgw: RadosGw, bucket: str, mount_factory: Any) -> None:
    """While radosgw is down, a file whose close() failed is still there for its user:
    `cat` prints its bytes and exits 0.  Reading does not upload, so the reader's close()
    must not report the writer's pending upload.

    Fails until fixed in the daemon: ``Filesystem.flush`` (s3ssefs/fs.py) uploads the dirty
    file on the close of *any* descriptor, read-only ones included, and turns the failed
    upload into EIO for the reader (`cat: ...: Input/output error`, exit 1)."""
    m = mount_factory(bucket, "--request-timeout", str(REQUEST_TIMEOUT), "--retry-interval",
                      "3600", "--dir-ttl", "300")
    assert run("listdir", m.path)["ok"]
    radosgw.stop()
    w = run("write", m.path / "pending.txt", 1 << 20, "pending")
    assert not w["ok"] and w["errno"] == errno.EIO and w["stage"] == "close", w
    r = subprocess.run(["cat", str(m.path / "pending.txt")], capture_output=True,
                       timeout=BOUND)
    assert r.stdout == data(1 << 20, "pending"), "cat did not get the file's bytes"
    assert r.returncode == 0, f"cat exited {r.returncode}: {r.stderr.decode().strip()}"
    radosgw.start()
    m.umount()  # the retry interval is an hour: umount uploads it, or fails
