"""T6: the daemon's memory stays bounded on a large directory and a large file.

DESIGN §5: listing streams ListObjectsV2 pages (a directory must not need all its keys in
memory at once) and large files stream through the encrypted spill as multipart uploads.  Here
a directory of 50,000 objects is listed and a 2 GiB file copied in and read back, and the
daemon's peak RSS (VmHWM from /proc) is checked against a bound derived below.

The figures are printed (``pytest -s``) and logged (one INFO line of ``tests.scale``);
docs/benchmarks.md ("Daemon memory") quotes them, README's "Reliability" sums them up.
The RGW keeps its data in RAM (memstore), so each test deletes what it created, in a
``finally``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from conftest import RGW_DIR, Mounted, Rgw, mount_stats

from s3ssefs.keys import Key

log = logging.getLogger("tests.scale")

MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------- helpers
def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size of a process (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def record(line: str) -> None:
    """A figure for the report: on stdout (pytest -s) and in the test log."""
    print(f"\n{line}")
    log.info("%s", line)


def child_json(code: str, *args: str, timeout: float) -> dict[str, Any]:
    """Run ``code`` in a child Python (a FUSE request that hangs fails the test, not the run);
    its last stdout line is JSON."""
    try:
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"child still running after {timeout:.0f}s: a FUSE request hangs")
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def osd_bytes() -> tuple[int, int]:
    """(used, available) bytes of the memstore OSD, from its admin socket (``ceph df`` shows
    nothing on this cluster: it has no mgr)."""
    r = subprocess.run(["ceph", "-c", str(RGW_DIR / "ceph.conf"), "daemon", "osd.0",
                        "perf", "dump"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    osd = json.loads(r.stdout)["osd"]
    return int(osd["stat_bytes_used"]), int(osd["stat_bytes_avail"])


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


def collect_garbage() -> None:
    """Let RGW free deleted data now instead of after rgw_gc_obj_min_wait."""
    subprocess.run(["timeout", "120", "radosgw-admin", "-c", str(RGW_DIR / "ceph.conf"), "gc",
                    "process", "--include-all"], capture_output=True, timeout=150)


# ====================================================================== 50,000 objects
N_OBJECTS = 50_000


class FastPut:
    """Zero-byte PUTs over keep-alive HTTPS connections, signed by botocore's SigV4 signer.

    boto3 spends ~2 ms of client CPU per request; on this 2-core machine, which RGW shares,
    50,000 PUTs through boto3 take ~125 s, and ~60 s signed by botocore but sent with
    http.client.  The objects are plain: listing memory does not depend on encryption."""

    def __init__(self, rgw: Rgw) -> None:
        self.url = urlsplit(rgw.endpoint)
        self.tls = ssl.create_default_context(cafile=str(rgw.ca))
        self.signer = S3SigV4Auth(Credentials(rgw.access_key, rgw.secret_key), "s3",
                                  "us-east-1")
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        c = getattr(self.local, "conn", None)
        if c is None:
            c = self.local.conn = http.client.HTTPSConnection(
                self.url.hostname or "127.0.0.1", self.url.port, context=self.tls, timeout=60)
        return c

    def put(self, bucket: str, key: str) -> None:
        path = f"/{quote(bucket)}/{quote(key, safe='/~')}"
        req = AWSRequest("PUT", f"{self.url.scheme}://{self.url.netloc}{path}", data=b"")
        self.signer.add_auth(req)
        c = self._conn()
        c.request("PUT", path, body=b"", headers=dict(req.headers.items()))
        resp = c.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body[:500])


def parallel(fn: Callable[[int], None], items: range | list[int], threads: int) -> None:
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(fn, items))


def delete_prefix(rgw: Rgw, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix``: DeleteObjects in batches of 1000, in parallel."""
    s3 = rgw.client(max_pool_connections=16)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]
    batches = [keys[i:i + 1000] for i in range(0, len(keys), 1000)]

    def delete(i: int) -> None:
        r = s3.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in batches[i]], "Quiet": True})
        assert not r.get("Errors"), r["Errors"][:3]

    parallel(delete, range(len(batches)), 16)
    return len(keys)


LISTER = r"""
import hashlib, json, os, random, stat, sys, time
d = sys.argv[1]
t0 = time.monotonic()
names = os.listdir(d)
t_list = time.monotonic() - t0
sample = random.Random(7).sample(sorted(names), min(100, len(names)))
t0 = time.monotonic()
odd = []
for n in sample:
    st = os.stat(os.path.join(d, n))
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        odd.append([n, st.st_mode, st.st_size])
t_stat = time.monotonic() - t0
print(json.dumps({"n": len(names), "unique": len(set(names)), "t_list": t_list,
                  "t_stat": t_stat, "odd": odd[:10],
                  "digest": hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()}))
"""


def test_listing_50000_objects_keeps_memory_bounded(
        rgw: Rgw, bucket: str, mount_factory: Any) -> None:
    """`ls` of a directory of 50,000 objects lists every name once, `stat` of a sample
    works, and the daemon's peak RSS stays under the bound: per listed entry it may keep
    the kernel's inode (readdirplus hands each one a lookup reference) and the key map's
    line, nothing that grows with the listing's pages."""
    names = [f"o{i:05d}" for i in range(N_OBJECTS)]
    fast = FastPut(rgw)
    # long TTLs: what one listing or `ls -l` learned stays (the memory worst case) and the
    # last `ls` answers from it instead of 50,000 more HEADs
    m: Mounted = mount_factory(bucket, "--attr-ttl", "3600", "--dir-ttl", "3600")
    pid = m.pid
    base = vm_hwm_mib(pid)
    try:
        t0 = time.monotonic()
        parallel(lambda i: fast.put(bucket, f"many/{names[i]}"), range(N_OBJECTS), 16)
        t_create = time.monotonic() - t0

        r = child_json(LISTER, str(m.path / "many"), timeout=900)
        assert r["n"] == N_OBJECTS and r["unique"] == N_OBJECTS, (r["n"], r["unique"])
        assert r["digest"] == hashlib.sha256("\n".join(names).encode()).hexdigest()
        assert not r["odd"], f"stat of listed entries: {r['odd']}"
        after_listdir = vm_hwm_mib(pid)

        t0 = time.monotonic()
        ls = subprocess.run(["ls", "-l", str(m.path / "many")], capture_output=True,
                            text=True, timeout=600)
        t_ls = time.monotonic() - t0
        assert ls.returncode == 0, ls.stderr[-2000:]
        lines = ls.stdout.splitlines()
        assert lines[0].startswith("total") and len(lines) == N_OBJECTS + 1
        assert sum(1 for ln in lines[1:] if ln.startswith("-rw")) == N_OBJECTS
        peak = vm_hwm_mib(pid)  # every entry HEADed and held: the worst case

        again = subprocess.run(["ls", "-1", str(m.path / "many")], capture_output=True,
                               text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        assert again.stdout.split() == names
        after_again = vm_hwm_mib(pid)
    finally:
        t0 = time.monotonic()
        deleted = delete_prefix(rgw, bucket, "many/")
        t_delete = time.monotonic() - t0
    per_entry = (peak - base) * 1024 / N_OBJECTS
    record(f"50,000-object listing: daemon VmHWM {base:.0f} MiB after mount, "
           f"{after_listdir:.0f} MiB after os.listdir ({r['t_list']:.1f}s) + 100 stats "
           f"({r['t_stat']:.1f}s), {peak:.0f} MiB after `ls -l` ({t_ls:.1f}s), "
           f"{after_again:.0f} MiB after another `ls`: "
           f"{per_entry:.2f} KiB per entry; creating the objects took {t_create:.1f}s, "
           f"deleting {deleted} took {t_delete:.1f}s")
    # What may grow with the directory: the inode of each listed entry (readdirplus gives
    # the kernel a reference it holds until it forgets the inode) and its line in the key
    # map, ~1.5 KiB together (measured 1.4-1.7).  2 KiB per entry is the bound: the pages,
    # the HEAD results and the listing cache (dropped beyond 20,000 entries) must not add.
    assert per_entry < 2.0, f"{per_entry:.2f} KiB per listed entry (bound 2 KiB)"
    # listing it again must not grow it: nothing is kept per listing
    assert after_again - peak < 8, \
        f"listing the directory again grew the peak from {peak:.0f} to {after_again:.0f} MiB"


# ====================================================================== a 2 GiB file
WRITER = r"""
import hashlib, json, os, random, sys, time
path, n_mib = sys.argv[1], int(sys.argv[2])
blocks = [random.Random(i).randbytes(1 << 20) for i in range(16)]
h = hashlib.sha256()
t0 = time.monotonic()
with open(path, "wb") as f:
    for i in range(n_mib):
        chunk = i.to_bytes(8, "big") + blocks[i % 16][8:]  # no two MiB alike
        h.update(chunk)
        f.write(chunk)
t_write = time.monotonic() - t0
print(json.dumps({"sha": h.hexdigest(), "t": t_write}))
"""

READER = r"""
import hashlib, json, sys, time
h = hashlib.sha256()
n = 0
t0 = time.monotonic()
with open(sys.argv[1], "rb", buffering=0) as f:
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
print(json.dumps({"sha": h.hexdigest(), "n": n, "t": time.monotonic() - t0}))
"""


def test_copy_of_a_2gib_file_keeps_memory_bounded(
        rgw: Rgw, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """A 2 GiB file streamed into the mount (1 MiB writes) lands whole, reads back whole
    through a fresh mount, and the daemon's peak RSS stays far below the file's size: writes
    hold a part and two blocks per file in memory plus 4 parts in flight, reads the block LRU
    (256 MiB) plus the readahead window (64 blocks)."""
    size_mib = 2048
    used0, avail0 = osd_bytes()
    need = size_mib * MiB
    assert avail0 > need + 512 * MiB, \
        f"the RGW's memstore has {avail0 / GiB:.1f} GiB free; the test needs 2.5 GiB"
    assert mem_available() > 2 * need + GiB, "not enough host RAM for 2 GiB in memstore"
    m: Mounted = mount_factory(bucket)
    pid = m.pid
    base = vm_hwm_mib(pid)
    try:
        w = child_json(WRITER, str(m.path / "big.bin"), str(size_mib), timeout=900)
        peak_write = vm_hwm_mib(pid)
        head = s3.head_object(Bucket=bucket, Key="big.bin", SSECustomerAlgorithm="AES256",
                              SSECustomerKey=key.raw)
        assert head["ContentLength"] == size_mib * MiB
        used1, _ = osd_bytes()

        m.remount()
        pid = m.pid
        base_read = vm_hwm_mib(pid)
        r = child_json(READER, str(m.path / "big.bin"), timeout=900)
        peak_read = vm_hwm_mib(pid)
        assert r["n"] == size_mib * MiB
        assert r["sha"] == w["sha"], "the file read back differs from what was written"
    finally:
        s3.delete_object(Bucket=bucket, Key="big.bin")
        collect_garbage()
    record(f"2 GiB copy: daemon VmHWM {base:.0f} MiB after mount, {peak_write:.0f} MiB after "
           f"writing ({w['t']:.1f}s, {size_mib / w['t']:.0f} MiB/s to close); new mount "
           f"{base_read:.0f} MiB, {peak_read:.0f} MiB after reading it back ({r['t']:.1f}s, "
           f"{size_mib / r['t']:.0f} MiB/s); RGW memstore used {used0 / GiB:.2f} GiB before, "
           f"{used1 / GiB:.2f} GiB with the file")
    # writing (part_size 16 MiB): the part being filled + 2 blocks, 4 parts in flight (sent
    # as their blocks, not copied into a request body), and 64 MiB of slack for the allocator
    write_bound = base + (16 + 2) + 4 * 16 + 64
    assert peak_write < write_bound, f"write peak {peak_write:.0f} MiB > {write_bound:.0f}"
    # reading: the 256 MiB block LRU, the readahead window (64 blocks of 1 MiB), the GET
    # responses in flight (the same 64 MiB, twice while urllib3 joins the body) and slack
    read_bound = base_read + 256 + 64 + 2 * 64 + 64
    assert peak_read < read_bound, f"read peak {peak_read:.0f} MiB > {read_bound:.0f}"


# ====================================================================== many files at once
MANY_WRITERS = r"""
import hashlib, json, os, random, sys, time
d, n, n_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = random.Random(7).randbytes(1 << 20)
fds = [os.open(f"{d}/w{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for i in range(n)]
hs = [hashlib.sha256() for _ in range(n)]
t0 = time.monotonic()
for m in range(n_mib):  # a MiB to each file in turn: every file is being filled at once
    for i, fd in enumerate(fds):
        chunk = (i << 32 | m).to_bytes(8, "big") + base[8:]
        hs[i].update(chunk)
        assert os.write(fd, chunk) == len(chunk)
for fd in fds:
    os.close(fd)
print(json.dumps({"sha": [h.hexdigest() for h in hs], "t": time.monotonic() - t0}))
"""


def test_many_files_written_at_once_share_a_bounded_memory(
        rgw: Rgw, bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """48 files of 20 MiB written at once (a MiB to each in turn) land whole, and the daemon
    holds at most WRITE_MEMORY (320 MiB) of their blocks between them, plus the block each
    is filling: past it, writers move their oldest blocks to the encrypted spill.  Each file
    alone would keep a part and two blocks (18 MiB) in memory: 864 MiB for 48."""
    from s3ssefs.files import PARTS_TOTAL, WRITE_MEMORY

    n, n_mib = 48, 20
    m: Mounted = mount_factory(bucket)
    pid = m.pid
    base = vm_hwm_mib(pid)
    try:
        w = child_json(MANY_WRITERS, str(m.path), str(n), str(n_mib), timeout=900)
        peak = vm_hwm_mib(pid)
        held = mount_stats(m)["write_memory_peak"]
        for i, want in enumerate(w["sha"]):
            got = s3.get_object(Bucket=bucket, Key=f"w{i}.bin", SSECustomerAlgorithm="AES256",
                                SSECustomerKey=key.raw)["Body"].read()
            assert len(got) == n_mib * MiB and hashlib.sha256(got).hexdigest() == want, \
                f"w{i}.bin differs from what was written"
    finally:
        for i in range(n):
            s3.delete_object(Bucket=bucket, Key=f"w{i}.bin")
        collect_garbage()
    record(f"{n} files of {n_mib} MiB written at once: daemon VmHWM {base:.0f} MiB after "
           f"mount, {peak:.0f} MiB after ({n * n_mib / w['t']:.0f} MiB/s to the last close); "
           f"blocks being written held in memory at most {held / MiB:.0f} MiB")
    assert held <= WRITE_MEMORY + n * MiB, f"{held / MiB:.0f} MiB of blocks held in memory"
    # those blocks, the parts in flight (16 MiB each) and 64 MiB of slack for the allocator
    bound = base + (WRITE_MEMORY + n * MiB + PARTS_TOTAL * 16 * MiB) / MiB + 64
    assert peak < bound, f"peak {peak:.0f} MiB > {bound:.0f}"
