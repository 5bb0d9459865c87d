"""T6: faults — the server and network misbehaving, the daemon dying, many writers at once,
names S3 allows but POSIX does not, and secrets under stress.

Every file operation on a mount under fault runs in a child process with a deadline, so a
FUSE request that waits forever fails the test instead of hanging it.  Network faults come
from :mod:`tests.faultproxy` (raw TCP passthrough to the RGW, TLS untouched; 503 SlowDown
answers from the proxy's own TLS endpoint with a certificate of the test CA).

Run with ``-s`` to see the daemon's peak RSS figures.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    S3SSEFS,
    Mounted,
    Rgw,
    assert_no_key_material,
    bucket_sha,
    key_forms,
    mount_stats,
    sse,
    wait_for,
)
from faultproxy import FaultProxy, make_leaf_cert

from s3ssefs.keys import Key

REQUEST_TIMEOUT = 10
BOUND = 3 * REQUEST_TIMEOUT + 15  # no file operation under fault may take longer

# ---------------------------------------------------------------------- helpers

# A child process doing one file operation: prints one JSON line (ok/errno/stage/seconds).
CHILD = r"""
import hashlib, json, os, random, sys, time
op, path = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
stage = "open"
out = {}
try:
    if op == "write":
        n, seed = int(sys.argv[3]), sys.argv[4]
        data = random.Random(seed).randbytes(n)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        stage = "write"
        for i in range(0, n, 1 << 20):
            os.write(fd, data[i:i + (1 << 20)])
        stage = "close"
        os.close(fd)
        out["sha"] = hashlib.sha256(data).hexdigest()
    elif op == "read":
        fd = os.open(path, os.O_RDONLY)
        stage = "read"
        h = hashlib.sha256()
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
        stage = "close"
        os.close(fd)
        out["sha"] = h.hexdigest()
    elif op == "listdir":
        out["names"] = sorted(os.listdir(path))
    elif op == "stat":
        out["size"] = os.stat(path).st_size
    print(json.dumps({"ok": True, "t": time.monotonic() - t0, **out}))
except OSError as e:
    print(json.dumps({"ok": False, "errno": e.errno, "stage": stage,
                      "t": time.monotonic() - t0}))
"""


def child(op: str, path: Path, *args: Any, deadline: float = BOUND) -> dict[str, Any]:
    """Run one file operation in a child process; fail the test if it outlives ``deadline``."""
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", CHILD, op, str(path), *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate(timeout=30)
        pytest.fail(f"{op} {path} still waiting after {deadline:.0f}s: a FUSE request hangs")
    assert p.returncode == 0, f"{op} {path}: child crashed: {err[-2000:]}"
    r: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    r["wall"] = time.monotonic() - t0
    return r


def data_sha(n: int, seed: str) -> str:
    return hashlib.sha256(random.Random(seed).randbytes(n)).hexdigest()


def put_sse(s3: Any, bucket: str, name: str, body: bytes, key: Key) -> None:
    s3.put_object(Bucket=bucket, Key=name, Body=body, **sse(key))


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*S3SSEFS, *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def proxy_cert(rgw: Rgw, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tls = rgw.ca.parent
    return make_leaf_cert(tls / "ca.crt", tls / "ca.key", tmp_path_factory.mktemp("proxytls"))


@pytest.fixture
def proxy(rgw: Rgw, proxy_cert: tuple[Path, Path]) -> Any:
    host, _, port = rgw.endpoint.removeprefix("https://").partition(":")
    with FaultProxy((host, int(port)), tls_cert=proxy_cert) as p:
        yield p


def proxied(mount_factory: Any, bucket: str, proxy: FaultProxy, *extra: str) -> Mounted:
    m: Mounted = mount_factory(bucket, "--endpoint", proxy.endpoint, "--request-timeout",
                               str(REQUEST_TIMEOUT), *extra)
    return m


# ====================================================================== 1. server and network
@pytest.mark.allow_warnings
def test_reads_complete_through_resets_503_and_short_stalls(
        proxy: FaultProxy, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """Reads in flight survive 503 SlowDown answers, connection resets before the answer,
    short stalls and latency: the reader gets the right bytes, never EIO."""
    size = 3 << 20
    for i in range(5):
        put_sse(s3, bucket, f"r{i}", random.Random(f"r{i}").randbytes(size), key)
    m = proxied(mount_factory, bucket, proxy)
    want = {i: data_sha(size, f"r{i}") for i in range(5)}

    proxy.slowdown(2)  # the next 2 requests: 503 SlowDown (backoff stays below the deadline)
    r = child("read", m.path / "r0")
    assert r["ok"] and r["sha"] == want[0], r
    assert proxy.stats.canned_503 == 2

    proxy.drop_connections()
    proxy.reset_after(0, count=3, direction="up")  # 3 connections die with the request
    r = child("read", m.path / "r1")
    assert r["ok"] and r["sha"] == want[1], r

    proxy.stall(3)  # below read_timeout: just slow
    r = child("read", m.path / "r2")
    assert r["ok"] and r["sha"] == want[2], r
    assert proxy.stats.stalled >= 1, "the read never met the stall (test tests nothing)"

    proxy.latency(0.05)
    r = child("read", m.path / "r3")
    proxy.latency(0)
    assert r["ok"] and r["sha"] == want[3], r


@pytest.mark.allow_warnings
def test_read_survives_reset_mid_body(proxy: FaultProxy, bucket: str, mount_factory: Any,
                                      s3: Any, key: Key) -> None:
    """A connection reset in the middle of a GET's body (after the 200 and part of the
    data): the read must be retried, not answered with EIO."""
    size = 3 << 20
    put_sse(s3, bucket, "mid", random.Random("mid").randbytes(size), key)
    m = proxied(mount_factory, bucket, proxy)
    assert child("listdir", m.path)["ok"]
    proxy.reset_after(256 << 10, count=1, direction="down")
    r = child("read", m.path / "mid")
    assert proxy.stats.resets >= 1
    assert r["ok"], f"reader got errno {r.get('errno')} at {r.get('stage')} after a reset " \
                    f"mid-body (no retry of a broken response body)"
    assert r["sha"] == data_sha(size, "mid")
    assert "internal error" not in m.log_file.read_text(errors="replace"), \
        "a broken response body became an internal error (EIO to the FUSE read)"


@pytest.mark.allow_warnings
def test_reset_during_readahead_keeps_daemon_alive(proxy: FaultProxy, bucket: str,
                                                   mount_factory: Any, s3: Any, key: Key) -> None:
    size = 24 << 20
    put_sse(s3, bucket, "seq", random.Random("seq").randbytes(size), key)
    m = proxied(mount_factory, bucket, proxy)
    pid = m.pid
    assert child("listdir", m.path)["ok"]
    proxy.reset_after(1536 << 10, count=6, direction="down")
    child("read", m.path / "seq")  # may fail: the mid-body bug above
    assert proxy.stats.resets >= 1, "the read met no reset (test tests nothing)"
    proxy.clear()
    r = child("read", m.path / "seq")
    assert r["ok"] and r["sha"] == data_sha(size, "seq"), r
    assert Path(f"/proc/{pid}").exists(), "daemon died after a connection reset in readahead"


def test_a_far_server_gets_more_streaming_gets(proxy: FaultProxy, bucket: str,
                                             mount_factory: Any, s3: Any, key: Key) -> None:
    """A server that takes long to answer (the proxy holds every chunk 10 ms each way, which
    also caps each connection's rate, as a far server's rate per connection does) gets more
    streaming GETs at once than any near server would, and a sequential read keeps more of
    them in flight; ``-o get_streams=`` fixes the count whatever the distance.  Every mount
    keeps to the count it reports, and every read is right.  (How many streams each distance
    gets is the code's tuning, tested as a rule in test_t1_streams, not pinned here; whether
    RGW on this machine counts as near depends on the machine, so nothing here assumes it.)"""
    from s3ssefs.streams import stream_counts

    size = 64 << 20
    put_sse(s3, bucket, "far", random.Random("far").randbytes(size), key)
    for i in range(4):
        put_sse(s3, bucket, f"small{i}", b"x", key)

    def within_own_count(got: dict[str, Any]) -> None:  # the peak counts both kinds
        assert 0 < got["get_streams_peak"] <= got["get_streams"] + got["get_streams_uncached"]

    near = mount_factory(bucket)
    for i in range(4):  # a few small requests (HEADs) to time the server by
        assert child("stat", near.path / f"small{i}")["ok"]
    r = child("read", near.path / "far")
    assert r["ok"] and r["sha"] == data_sha(size, "far"), r

    fixed = mount_factory(bucket, "-o", "get_streams=6")  # the option wins over the distance
    r = child("read", fixed.path / "far")
    assert r["ok"] and r["sha"] == data_sha(size, "far"), r
    got = mount_stats(fixed)
    assert (got["get_streams"], got["get_streams_uncached"]) == (6, 6), got
    within_own_count(got)

    proxy.latency(0.01)  # from the start: no quick answer of the mount's own is timed
    far = proxied(mount_factory, bucket, proxy)
    for i in range(4):
        assert child("stat", far.path / f"small{i}")["ok"]
    r = child("read", far.path / "far")
    proxy.latency(0)
    assert r["ok"] and r["sha"] == data_sha(size, "far"), r
    got = mount_stats(far)
    assert got["server_answer_us"] >= 20000, got  # the proxy held the request and the answer
    within_own_count(got)
    nearest = max(stream_counts(0.0, None, 1 << 20))  # what a server answering at once gets
    assert got["get_streams_peak"] > nearest, got
    assert f"streaming GETs at once: {got['get_streams']}, {got['get_streams_uncached']}" \
        in far.log_file.read_text()


@pytest.mark.allow_warnings
def test_stat_after_listing_through_503_answers_shows_every_files_own_attributes(
        proxy: FaultProxy, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """Stat after a listing (what ``ls -l`` does) HEADs the entries ahead of the one asked
    for, several to a worker thread.  When the server answers some of those HEADs 503
    SlowDown, the lookups ask again: every file shows its own mode, owner and time, none the
    mount's defaults, and no stat fails."""
    want = {}
    for i in range(40):
        mode = 0o100400 | (i % 64) << 3
        meta = {"mode": str(mode), "uid": str(1000 + i), "gid": str(2000 + i),
                "mtime": str(1_600_000_000 + i)}
        s3.put_object(Bucket=bucket, Key=f"d/f{i:02d}", Body=b"x" * i, Metadata=meta, **sse(key))
        want[f"f{i:02d}"] = (mode, 1000 + i, 2000 + i, i, 1_600_000_000 + i)
    m = proxied(mount_factory, bucket, proxy)
    names = os.listdir(m.path / "d")
    assert sorted(names) == sorted(want)
    proxy.drop_connections()
    proxy.slowdown(12)  # the next 12 requests, each on a new connection
    got = {}
    for name in names:  # in the listing's order, as ls -l stats them
        st = os.lstat(m.path / "d" / name)
        got[name] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, int(st.st_mtime))
    assert got == want
    assert proxy.stats.canned_503 == 12


@pytest.mark.allow_warnings
def test_slowdown_storm_gives_eio_in_bounded_time_then_retried(
        proxy: FaultProxy, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """The server answers 503 SlowDown to everything: close() returns EIO within about
    request_timeout (botocore's backoff is cut by the deadline); once it stops, the retry
    loop uploads the kept data."""
    m = proxied(mount_factory, bucket, proxy, "--retry-interval", "1", "--dir-ttl", "120")
    assert child("listdir", m.path)["ok"]
    proxy.slowdown(10_000)
    w = child("write", m.path / "storm", 1 << 20, "storm")
    assert not w["ok"] and w["errno"] == errno.EIO and w["stage"] == "close", w
    assert w["wall"] < REQUEST_TIMEOUT + 10, w
    assert proxy.stats.canned_503 >= 3
    proxy.clear()
    assert wait_for(lambda: bucket_sha(s3, bucket, "storm", key) is not None, 60)
    assert bucket_sha(s3, bucket, "storm", key) == data_sha(1 << 20, "storm")
    m.umount()


@pytest.mark.allow_warnings
def test_writes_complete_through_resets_and_503(proxy: FaultProxy, bucket: str,
                                                mount_factory: Any, s3: Any, key: Key) -> None:
    """close() succeeds after botocore retries: resets mid-upload, 503 SlowDown, a short
    stall; the object in the bucket is whole (single PUT and multipart)."""
    m = proxied(mount_factory, bucket, proxy, "--part-size", "5M", "--multipart-threshold",
                "5M")
    assert child("listdir", m.path)["ok"]

    proxy.reset_after(300 << 10, count=2, direction="up")  # cut two PUT bodies mid-way
    r = child("write", m.path / "w1", 2 << 20, "w1")
    assert r["ok"], r
    assert proxy.stats.resets >= 2
    assert bucket_sha(s3, bucket, "w1", key) == data_sha(2 << 20, "w1")

    proxy.slowdown(2)
    r = child("write", m.path / "w2", 1 << 20, "w2")
    assert r["ok"], r
    assert bucket_sha(s3, bucket, "w2", key) == data_sha(1 << 20, "w2")

    # multipart: parts streamed while writing, one part upload reset mid-body
    proxy.reset_after(1 << 20, count=1, direction="up")
    r = child("write", m.path / "w3", 12 << 20, "w3")
    assert r["ok"], r
    assert bucket_sha(s3, bucket, "w3", key) == data_sha(12 << 20, "w3")

    proxy.stall(3)
    r = child("write", m.path / "w4", 1 << 20, "w4")
    assert r["ok"], r
    assert bucket_sha(s3, bucket, "w4", key) == data_sha(1 << 20, "w4")


@pytest.mark.allow_warnings
def test_stalled_server_gives_eio_in_bounded_time(
        proxy: FaultProxy, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """A server that accepts but never answers: reads and close() return EIO within about
    request_timeout, never hang; the written data is kept and lands once traffic flows."""
    put_sse(s3, bucket, "big", random.Random("big").randbytes(2 << 20), key)
    m = proxied(mount_factory, bucket, proxy, "--retry-interval", "1", "--dir-ttl", "120",
                "--attr-ttl", "120")
    assert child("listdir", m.path)["ok"]
    proxy.stall(3600)
    proxy.drop_connections()
    r = child("read", m.path / "big")
    assert not r["ok"] and r["errno"] == errno.EIO, r
    assert r["wall"] < 2 * REQUEST_TIMEOUT + 10, r
    w = child("write", m.path / "stalled", 1 << 20, "stalled")
    assert not w["ok"] and w["errno"] == errno.EIO and w["stage"] == "close", w
    assert w["wall"] < 2 * REQUEST_TIMEOUT + 10, w
    proxy.clear()
    proxy.drop_connections()
    assert wait_for(lambda: bucket_sha(s3, bucket, "stalled", key) is not None, 60), \
        "the write that failed at close never reached the bucket"
    assert bucket_sha(s3, bucket, "stalled", key) == data_sha(1 << 20, "stalled")
    r = child("read", m.path / "big")
    assert r["ok"] and r["sha"] == data_sha(2 << 20, "big"), r
    m.umount()  # nothing left dirty
    assert bucket_sha(s3, bucket, "stalled", key) == data_sha(1 << 20, "stalled")


@pytest.mark.allow_warnings
def test_close_fails_while_down_then_retry_delivers(
        proxy: FaultProxy, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """Server down (connections refused): close() returns EIO quickly; the data stays in the
    spill and the retry loop uploads it once the server is back."""
    m = proxied(mount_factory, bucket, proxy, "--retry-interval", "1", "--dir-ttl", "120")
    assert child("listdir", m.path)["ok"]
    proxy.down()
    w = child("write", m.path / "down.bin", 3 << 20, "down")
    assert not w["ok"] and w["errno"] == errno.EIO and w["stage"] == "close", w
    assert w["wall"] < REQUEST_TIMEOUT + 10, w
    # two retry rounds meet the server still down: nothing may be dropped
    def failures() -> int:
        return m.log_file.read_text(errors="replace").count("down.bin failed, data kept")

    assert wait_for(lambda: failures() >= 3, BOUND), \
        "the retry loop never retried while the server was down"
    proxy.up()
    assert wait_for(lambda: bucket_sha(s3, bucket, "down.bin", key) is not None, 60), \
        "the spilled write never reached the bucket after the server came back"
    assert bucket_sha(s3, bucket, "down.bin", key) == data_sha(3 << 20, "down")
    r = child("read", m.path / "down.bin")
    assert r["ok"] and r["sha"] == data_sha(3 << 20, "down"), r
    m.umount()


@pytest.mark.allow_warnings
def test_umount_while_down_names_the_file_then_succeeds(
        proxy: FaultProxy, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """`s3ssefs umount` while the server is down exits 1 naming the file it could not
    upload and keeps the mount; once the server is back it succeeds and the file is whole."""
    m = proxied(mount_factory, bucket, proxy, "--retry-interval", "3600", "--dir-ttl", "120")
    assert child("listdir", m.path)["ok"]
    proxy.down()
    w = child("write", m.path / "pending.dat", 2 << 20, "pending")
    assert not w["ok"] and w["errno"] == errno.EIO, w
    r = cli("umount", str(m.path), timeout=BOUND * 2)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "pending.dat" in r.stderr, r.stderr
    assert os.path.ismount(m.path)
    proxy.up()
    m.umount()
    assert bucket_sha(s3, bucket, "pending.dat", key) == data_sha(2 << 20, "pending")


# ====================================================================== 2. daemon death
WRITER = r"""
import os, random, sys, time
path, n = sys.argv[1], int(sys.argv[2])
data = random.Random("big").randbytes(1 << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(n):
    os.write(fd, data)
    print(i + 1, flush=True)
    time.sleep(0.05)
os.close(fd)
print("closed", flush=True)
"""


@pytest.mark.allow_warnings
def test_kill_9_during_multipart_upload(mnt: Mounted, bucket: str, s3: Any, key: Key,
                                        rgw: Rgw) -> None:
    small = {f"done{i}.txt": random.Random(i).randbytes(100_000 + i) for i in range(3)}
    for name, body in small.items():
        (mnt.path / name).write_bytes(body)
    pid = mnt.pid
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt.path / "big.bin"), "64"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert w.stdout is not None
        written = 0
        for line in w.stdout:
            written = int(line) if line.strip().isdigit() else written
            if written >= 40:
                break
        assert written >= 40, "writer stopped early"
        assert wait_for(lambda: s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), 30), \
            "no multipart upload under way"
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10)
    finally:
        w.kill()
        w.wait(timeout=30)
    # every file closed before the kill is whole; the half-done one is not an object
    for name, body in small.items():
        assert bucket_sha(s3, bucket, name, key) == hashlib.sha256(body).hexdigest(), name
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "big.bin" not in keys
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["big.bin"]
    # the dead daemon's mount: ENOTCONN until `s3ssefs umount` clears it
    with pytest.raises(OSError) as ei:
        os.stat(mnt.path)
    assert ei.value.errno == errno.ENOTCONN
    r = cli("umount", str(mnt.path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mnt.path)
    os.stat(mnt.path)
    # and `cleanup` aborts the leftover upload
    r = cli("cleanup", bucket, "--older-than", "0", "--endpoint", rgw.endpoint,
            "--ca-bundle", str(rgw.ca), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 unfinished upload(s) aborted" in r.stdout, r.stdout
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    # a new mount works and shows the closed files only
    mnt.mount()
    assert sorted(os.listdir(mnt.path)) == sorted(small)


def test_cleanup_needs_no_keyfile(bucket: str, s3: Any, rgw: Rgw) -> None:
    s3.create_multipart_upload(Bucket=bucket, Key="left-over")
    r = cli("cleanup", bucket, "--older-than", "0", "--endpoint", rgw.endpoint,
            "--ca-bundle", str(rgw.ca), timeout=120)
    assert r.returncode == 0, r.stderr
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


# ====================================================================== 3. concurrency
WORKER = r"""
import errno, hashlib, json, os, random, sys, time
tree, wid, seconds, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rng = random.Random(wid)
names = [f"p{wid:02d}_f{j}" for j in range(4)]
model = {}            # name -> sha256 of what we last closed
content = {}          # name -> bytes (small)
errors = []
ops = {"write": 0, "append": 0, "read": 0, "rename": 0, "list": 0, "unlink": 0}
end = time.monotonic() + seconds
sub = os.path.join(tree, "sub")
def p(name):
    return os.path.join(sub if name.endswith("f3") else tree, name)
while time.monotonic() < end:
    op = rng.choice(["write", "write", "append", "read", "read", "rename", "list", "unlink"])
    name = rng.choice(names)
    try:
        if op == "write":
            data = rng.randbytes(rng.randrange(0, 150_000))
            with open(p(name), "wb") as f:
                f.write(data)
            content[name] = data
        elif op == "append":
            data = rng.randbytes(rng.randrange(1, 5000))
            with open(p(name), "ab") as f:
                f.write(data)
            content[name] = content.get(name, b"") + data
        elif op == "read":
            try:
                with open(p(name), "rb") as f:
                    got = f.read()
            except FileNotFoundError:
                got = None
            if got != content.get(name):
                errors.append(f"read {name}: {None if got is None else len(got)} bytes, "
                              f"model {None if name not in content else len(content[name])}")
        elif op == "rename":
            src = rng.choice([n for n in names if n in content] or [name])
            if src in content and src != name:
                os.rename(p(src), p(name))
                content[name] = content.pop(src)
            else:
                continue
        elif op == "list":
            mine = {n for n in os.listdir(tree) + os.listdir(sub) if n.startswith(f"p{wid:02d}_")}
            if mine != set(content):
                errors.append(f"listing {sorted(mine)} != model {sorted(content)}")
        elif op == "unlink":
            if name in content:
                os.unlink(p(name))
                del content[name]
            else:
                continue
        ops[op] += 1
    except OSError as e:
        errors.append(f"{op} {name}: {errno.errorcode.get(e.errno, e.errno)} {e}")
json.dump({"model": {n: hashlib.sha256(d).hexdigest() for n, d in content.items()},
           "errors": errors, "ops": ops}, open(out, "w"))
"""


def check_model(root: Path, models: list[dict[str, str]]) -> list[str]:
    bad = []
    for wid, model in enumerate(models):
        for j in range(4):
            name = f"p{wid:02d}_f{j}"
            path = root / ("tree/sub" if j == 3 else "tree") / name
            try:
                got: str | None = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                got = None
            if got != model.get(name):
                bad.append(f"{name}: {'missing' if got is None else 'different'}"
                           f"{'' if name in model else ' (should not exist)'}")
    return bad


def test_sixteen_processes_in_one_tree(mnt: Mounted, bucket: str, s3: Any,
                                       tmp_path: Path) -> None:
    (mnt.path / "tree" / "sub").mkdir(parents=True)
    procs = []
    t0 = time.monotonic()
    for wid in range(16):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(mnt.path / "tree"), str(wid), "20",
             str(tmp_path / f"w{wid}.json")], stderr=subprocess.PIPE, text=True))
    for pr in procs:
        try:
            _, err = pr.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker hangs (FUSE request never answered)")
        assert pr.returncode == 0, err[-2000:]
    results = [json.loads((tmp_path / f"w{wid}.json").read_text()) for wid in range(16)]
    total = {k: sum(r["ops"][k] for r in results) for k in results[0]["ops"]}
    print(f"\n16 workers, {time.monotonic() - t0:.1f}s: {total}")
    errors = [e for r in results for e in r["errors"]]
    assert not errors, f"{len(errors)} errors, first: {errors[:10]}"
    models = [r["model"] for r in results]
    assert sum(total.values()) > 200, "workers did hardly anything"
    bad = check_model(mnt.path, models)
    assert not bad, f"mount differs from the model: {bad[:10]}"
    mnt.remount()
    bad = check_model(mnt.path, models)
    assert not bad, f"after remount, bucket differs from the model: {bad[:10]}"
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])}
    want = {f"tree/{'sub/' if n.endswith('f3') else ''}{n}" for m in models for n in m}
    assert {k for k in keys if not k.endswith("/")} == want


# ====================================================================== 4. bad input
def test_names_posix_cannot_hold(mnt: Mounted, bucket: str, s3: Any, key: Key) -> None:
    with pytest.raises(OSError) as ei:
        os.open(mnt.path / ("n" * 256), os.O_CREAT | os.O_WRONLY, 0o644)
    assert ei.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as ei:
        os.open(bytes(mnt.path) + b"/bad-\xff\xfe.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        os.mkdir(bytes(mnt.path) + b"/dir-\xc3")
    assert ei.value.errno == errno.EINVAL
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not keys, keys


@pytest.mark.allow_warnings
def test_path_longer_than_s3_key_limit(mnt: Mounted, bucket: str, s3: Any) -> None:
    deep = mnt.path
    err = None
    for i in range(6):  # 6 levels of 200 bytes: the key passes 1024 bytes at the last one
        deep = deep / (chr(ord("a") + i) * 200)
        try:
            os.mkdir(deep)
        except OSError as e:
            err = e
            break
    assert err is not None and err.errno == errno.ENAMETOOLONG, err
    with pytest.raises(OSError) as ei:
        os.open(deep.parent / ("f" * 250), os.O_CREAT | os.O_WRONLY, 0o644)
    assert ei.value.errno == errno.ENAMETOOLONG
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert all(len(k.encode()) <= 1024 for k in keys)


def test_odd_keys_in_the_bucket(mnt: Mounted, bucket: str, s3: Any, key: Key) -> None:
    """Keys other tools write: ``a//b``, ``a/./b``, ``x`` next to ``x/y``, a bare ``dir/``
    marker, ``..`` — the mount lists them without crashing and shows or skips each."""
    for name in ("a//b", "a/./b", "a/ok", "x", "x/y", "q/../r", "plain"):
        put_sse(s3, bucket, name, name.encode(), key)
    s3.put_object(Bucket=bucket, Key="dir/", Body=b"")
    r = subprocess.run(["ls", "-laR", str(mnt.path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(mnt.path)) == ["a", "dir", "plain", "q", "x"]
    assert sorted(os.listdir(mnt.path / "a")) == ["ok"]
    assert (mnt.path / "a" / "ok").read_bytes() == b"a/ok"
    assert os.path.isdir(mnt.path / "x")  # the directory wins over the same-named file
    assert (mnt.path / "x" / "y").read_bytes() == b"x/y"
    assert os.listdir(mnt.path / "dir") == []
    assert os.listdir(mnt.path / "q") == []
    assert (mnt.path / "plain").read_bytes() == b"plain"
    # the daemon is still alive and serving
    (mnt.path / "after").write_bytes(b"alive")
    assert (mnt.path / "after").read_bytes() == b"alive"
    log = mnt.log_file.read_text(errors="replace")
    assert "a file and a directory share this name" in log
    assert "cannot be shown in a directory" in log


# ====================================================================== 5. secrets
def _scan(paths: list[Path], marker: bytes, what: str) -> int:
    n = 0
    for p in paths:
        try:
            data = p.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            continue
        n += 1
        assert_no_key_material(data, f"{what} {p}")
        assert marker not in data, f"plaintext marker found in {what} {p}"
    return n


def test_no_secrets_in_logs_proc_cache_or_spill(bucket: str, mount_factory: Any, key: Key,
                                                keyfile: Path) -> None:
    m = mount_factory(bucket, "--part-size", "5M", "--multipart-threshold", "5M")
    pid = m.pid
    marker = b"MARKER-" + os.urandom(8).hex().encode() + b"-PLAINTEXT"
    block = (marker + b"." * 100) * (4096 // (len(marker) + 100) + 1)
    chunk = (block * 256)[:1 << 20]
    assert marker in chunk

    def everything(tag: str) -> None:
        files = [p for p in m.cache_dir.rglob("*") if p.is_file()]
        n = _scan(files, marker, f"cache dir ({tag})")
        _scan([m.log_file], marker, f"daemon log ({tag})")
        _scan([Path(f"/proc/{pid}/cmdline"), Path(f"/proc/{pid}/environ")], marker,
              f"/proc ({tag})")
        print(f"\n{tag}: scanned {n} cache/spill files, log {m.log_file.stat().st_size} B")

    kf_text = keyfile.read_bytes()
    with open(m.path / "secret.bin", "wb") as f:
        for _ in range(14):  # beyond the in-memory budget: blocks go to the spill
            f.write(chunk)
        f.flush()
        spills = [p for p in m.cache_dir.rglob("spill-*") if p.stat().st_size]
        assert spills, "no spill file while the file is open (test does not test the spill)"
        everything("open, partly written")
        f.write(chunk)
    assert (m.path / "secret.bin").read_bytes() == chunk * 15
    # read it back through a fresh mount so blocks come from S3 into the disk cache: a block
    # at a time from the end (a first sequential read would be served from memory only)
    m.remount()
    pid = m.pid
    with open(m.path / "secret.bin", "rb") as h:
        assert b"".join(os.pread(h.fileno(), len(chunk), i * len(chunk))
                        for i in reversed(range(15))) == chunk * 15
    # cache writes happen off the read path: wait until all 15 blocks are on disk
    assert wait_for(lambda: _tree_bytes(m.cache_dir) >= 15 << 20, 30, 0.1), \
        f"blocks not cached: {_tree_bytes(m.cache_dir)} bytes in {m.cache_dir}"
    everything("after reading")
    # no keys in argv/env at all, and not the key file's text either
    for f in ("cmdline", "environ"):
        data = Path(f"/proc/{pid}/{f}").read_bytes()
        assert kf_text not in data
        for form in key_forms(key.raw):
            assert form not in data
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = [ln for ln in limits.splitlines() if ln.startswith("Max core file size")]
    assert core and core[0].split()[4:6] == ["0", "0"], core


# ====================================================================== RSS figures
def _tree_bytes(root: Path) -> int:
    """Disk used by the files under ``root`` (the cache's slot files are sparse)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


@pytest.mark.allow_warnings  # the cache says once that the disk is full
def test_cache_dir_on_a_small_tmpfs_that_fills_up(
        bucket: str, s3: Any, key: Key, mount_factory: Any, tmp_path: Path) -> None:
    """The cache dir on a 24 MiB tmpfs: a 40 MiB object still reads back exactly (the cache
    drops what does not fit and stays within its bound); a 64 MiB write either succeeds or
    fails with ENOSPC, and what reaches the bucket is never corrupt; the mount keeps working."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(tiny)], check=True)
    try:
        body = os.urandom(40 << 20)
        s3.put_object(Bucket=bucket, Key="seeded.bin", Body=body,
                      SSECustomerAlgorithm="AES256", SSECustomerKey=key.raw)
        m = mount_factory(bucket, "--cache-dir", str(tiny), "--cache-size", "8M")
        got = (m.path / "seeded.bin").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
        # the bound, plus one block (and its last page) in flight
        assert _tree_bytes(tiny) <= (8 << 20) + (1 << 20) + 4096

        big = os.urandom(64 << 20)
        failed = None
        try:
            with open(m.path / "big.bin", "wb") as f:
                for off in range(0, len(big), 1 << 20):
                    f.write(big[off:off + (1 << 20)])
        except OSError as e:
            failed = e.errno
        assert failed in (None, errno.ENOSPC), f"unexpected errno {failed}"
        try:
            stored = s3.get_object(Bucket=bucket, Key="big.bin", SSECustomerAlgorithm="AES256",
                                   SSECustomerKey=key.raw)["Body"].read()
        except s3.exceptions.NoSuchKey:
            stored = b""
        if failed is None:
            assert stored == big
        else:  # never corrupt: whatever landed is what the program wrote, from the start
            assert stored == big[:len(stored)]

        (m.path / "after.txt").write_bytes(b"still works")
        assert (m.path / "after.txt").read_bytes() == b"still works"
        m.umount()
    finally:
        subprocess.run(["umount", "-l", str(tiny)], capture_output=True)
