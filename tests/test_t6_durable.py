"""T6: uploads the server refuses for good, and data that outlives the daemon.

The server refuses in two real ways here: RGW refuses SSE-C over plain HTTP
(``rgw_crypt_require_ssl``), and a bucket policy that denies ``s3:PutObject`` makes every write
a 403 while reads go on.  Both are answers that cannot change on retry.  What a user must see:
a mount that cannot write is refused at mount time; a close() that cannot upload is EIO at
once, without a retry loop hammering the server; and the data of a file whose upload failed
survives SIGKILL and a plain ``umount`` in the encrypted spill, and the next mount of the bucket
with the same cache directory uploads it (beside the object, if that changed meanwhile).

Every file operation runs in a child process with a deadline, so a request that waits forever
fails the test instead of hanging it.
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
from botocore.exceptions import ClientError
from conftest import S3SSEFS, Mounted, Rgw, bucket_sha, mount_stats, sse, wait_for

from s3ssefs.keys import Key

DEADLINE = 120  # a file operation still waiting after this hangs (generous: shared machine)

# A child process writing one file: every write and the close, each error recorded (a program
# told EIO at close still expects its data kept, DESIGN §5).
WRITE = r"""
import json, os, random, sys
path, n, seed, off = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
data = random.Random(seed).randbytes(n)
errors = {}
flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if off < 0 else 0)
fd = os.open(path, flags, 0o644)
for i in range(0, n, 1 << 20):
    try:
        os.pwrite(fd, data[i:i + (1 << 20)], max(off, 0) + i)
    except OSError as e:
        errors.setdefault("write", e.errno)
try:
    os.close(fd)
except OSError as e:
    errors["close"] = e.errno
print(json.dumps(errors))
"""


def write(path: Path, n: int, seed: str, at: int = -1) -> dict[str, int]:
    """Write ``n`` bytes made from ``seed`` to ``path`` (a new file, or over an existing one
    at offset ``at``) in a child; the errno of the first failed write and of close()."""
    r = subprocess.run([sys.executable, "-c", WRITE, str(path), str(n), seed, str(at)],
                       capture_output=True, text=True, timeout=DEADLINE)
    assert r.returncode == 0, r.stderr[-2000:]
    return {k: int(v) for k, v in json.loads(r.stdout).items()}


def body(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def deny_writes(s3: Any, bucket: str) -> None:
    """Every write to the bucket is then 403 AccessDenied; reads and listings still work."""
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": ["s3:PutObject"],
                       "Resource": [f"arn:aws:s3:::{bucket}/*"]}]}))


def allow_writes(s3: Any, bucket: str) -> None:
    s3.delete_bucket_policy(Bucket=bucket)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*S3SSEFS, *args], capture_output=True, text=True, timeout=timeout)


def journals(m: Mounted) -> list[Path]:
    return sorted(m.cache_dir.rglob("spill-*.journal"))


def kill_daemon(m: Mounted) -> None:
    """SIGKILL the daemon and clear its dead mount (as `s3ssefs umount` does)."""
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30)
    r = cli("umount", str(m.path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(m.path)


def assert_encrypted(s3: Any, bucket: str, name: str) -> None:
    """The object is SSE-C: S3 gives nothing without the key."""
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key=name)


# ====================================================================== refused at mount
def test_http_mount_refused_where_the_server_refuses_sse_c_over_http(
        bucket: str, mount_factory: Any, rgw: Rgw) -> None:
    """--allow-http against a server that refuses SSE-C over HTTP used to mount and then fail
    every close(); now the mount is refused with one line saying why."""
    m = mount_factory(bucket, "--endpoint", rgw.http_endpoint, "--allow-http", mount=False)
    r = subprocess.run(m.argv(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    refusal = [ln for ln in lines if "SSE-C over plain http" in ln]
    assert len(refusal) == 1 and bucket in refusal[0], r.stderr
    assert not os.path.ismount(m.path)


def test_read_only_http_mount_writes_nothing(bucket: str, mount_factory: Any, rgw: Rgw,
                                             s3: Any) -> None:
    """A read-only mount is not refused for a write it will never make (nor does it try)."""
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"plain")
    m = mount_factory(bucket, "--endpoint", rgw.http_endpoint, "--allow-http", "--read-only")
    assert (m.path / "plain.txt").read_bytes() == b"plain"
    assert mount_stats(m)["requests"].get("create_multipart", 0) == 0


# ====================================================================== no retry loop
@pytest.mark.allow_warnings
def test_refused_upload_is_eio_and_not_retried_in_a_loop(
        bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """A 403 at close: EIO at once; the retry loop (every 0.2 s here) does not send it again;
    `s3ssefs umount` tries once, fails naming the file and keeps the mount; once writes are
    allowed again it uploads the file."""
    m = mount_factory(bucket, "--retry-interval", "0.2")
    deny_writes(s3, bucket)
    try:
        assert write(m.path / "refused.txt", 3000, "refused") == {"close": errno.EIO}
        puts = mount_stats(m)["requests"].get("put", 0)
        assert puts >= 1
        time.sleep(3)  # fifteen rounds of the retry loop: none may send the PUT again
        assert mount_stats(m)["requests"].get("put", 0) == puts
        r = cli("umount", str(m.path))
        assert r.returncode == 1 and "refused.txt" in r.stderr, r.stderr
        assert "fusermount3 -u" in r.stderr and "spill" in r.stderr, r.stderr
        assert os.path.ismount(m.path)
        assert mount_stats(m)["requests"].get("put", 0) == puts + 1
    finally:
        allow_writes(s3, bucket)
    m.umount()
    assert bucket_sha(s3, bucket, "refused.txt", key) == sha(body(3000, "refused"))


# ====================================================================== data outlives the daemon
@pytest.mark.allow_warnings
def test_failed_uploads_survive_sigkill_and_the_next_mount_uploads_them(
        bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """Files whose upload was refused — a small new one, a large new one (multipart), a
    patch into the middle of an existing large object — are uploaded, whole and encrypted,
    by the next mount after the daemon was SIGKILLed."""
    m = mount_factory(bucket, "--part-size", "5M", "--multipart-threshold", "5M",
                      "--retry-interval", "3600")
    assert write(m.path / "base.bin", 12 << 20, "base") == {}
    deny_writes(s3, bucket)
    try:
        assert write(m.path / "small.txt", 5000, "small") == {"close": errno.EIO}
        # the writes of a large file go on (the refusal is not asked again per part)
        assert write(m.path / "big.bin", 11 << 20, "big") == {"close": errno.EIO}
        assert write(m.path / "base.bin", 1 << 20, "patch", at=6 << 20) == {"close": errno.EIO}
        kill_daemon(m)
    finally:
        allow_writes(s3, bucket)
    assert bucket_sha(s3, bucket, "small.txt", key) is None  # nothing reached S3 before
    m.mount()
    patched = bytearray(body(12 << 20, "base"))
    patched[6 << 20:7 << 20] = body(1 << 20, "patch")
    want = {"small.txt": body(5000, "small"), "big.bin": body(11 << 20, "big"),
            "base.bin": bytes(patched)}
    for name, data in want.items():
        assert bucket_sha(s3, bucket, name, key) == sha(data), name
        assert_encrypted(s3, bucket, name)
        assert (m.path / name).read_bytes() == data, name
    assert journals(m) == []
    assert not list(m.cache_dir.rglob("spill-*"))
    assert "earlier mount could not upload" in m.log_file.read_text()


@pytest.mark.allow_warnings
@pytest.mark.parametrize("umount", [["umount"], ["umount", "-l"]], ids=["plain", "lazy"])
def test_plain_umount_keeps_what_it_could_not_upload(
        bucket: str, mount_factory: Any, s3: Any, key: Key, umount: list[str]) -> None:
    """A plain or lazy umount (the kernel unmounts; the daemon tries the upload once more
    and exits) no longer discards the file: the next mount uploads it."""
    m = mount_factory(bucket, "--retry-interval", "3600")
    deny_writes(s3, bucket)
    try:
        assert write(m.path / "kept.txt", 70_000, "kept") == {"close": errno.EIO}
        pid = m.pid
        r = subprocess.run([*umount, str(m.path)], capture_output=True, text=True,
                           timeout=DEADLINE)
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), DEADLINE)
    finally:
        allow_writes(s3, bucket)
    m.mount()
    assert bucket_sha(s3, bucket, "kept.txt", key) == sha(body(70_000, "kept"))
    assert journals(m) == []


@pytest.mark.allow_warnings
def test_recovery_does_not_overwrite_an_object_changed_meanwhile(
        bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """The object was changed by someone else after our upload failed: the next mount keeps
    theirs and uploads ours beside it, under a name that says what it is."""
    s3.put_object(Bucket=bucket, Key="doc.txt", Body=b"version 1", **sse(key))
    m = mount_factory(bucket, "--retry-interval", "3600")
    deny_writes(s3, bucket)
    try:
        assert write(m.path / "doc.txt", 4000, "ours") == {"close": errno.EIO}
        kill_daemon(m)
    finally:
        allow_writes(s3, bucket)
    s3.put_object(Bucket=bucket, Key="doc.txt", Body=b"version 2, not ours", **sse(key))
    m.mount()
    assert bucket_sha(s3, bucket, "doc.txt", key) == sha(b"version 2, not ours")
    names = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    kept = [n for n in names if n.startswith("doc.txt.s3ssefs-recovered-")]
    assert len(kept) == 1, names
    assert bucket_sha(s3, bucket, kept[0], key) == sha(body(4000, "ours"))
    assert "changed in S3" in m.log_file.read_text()


@pytest.mark.allow_warnings
def test_a_spill_in_use_is_left_to_its_mount(
        bucket: str, mount_factory: Any, s3: Any, key: Key) -> None:
    """Two mounts of one bucket sharing a cache directory: a mount starting while the other
    holds a file whose upload failed does not take that file from it."""
    a = mount_factory(bucket, "--retry-interval", "3600")
    deny_writes(s3, bucket)
    try:
        assert write(a.path / "held.txt", 1000, "held") == {"close": errno.EIO}
    finally:
        allow_writes(s3, bucket)
    b = mount_factory(bucket, mount=False)
    b.cache_dir = a.cache_dir
    b.mount()
    assert bucket_sha(s3, bucket, "held.txt", key) is None
    b.umount()
    a.umount()  # a uploads it itself
    assert bucket_sha(s3, bucket, "held.txt", key) == sha(body(1000, "held"))
    assert journals(a) == []
