"""s3fs-fuse 1.90 and s3ssefs on the same bucket with the same SSE-C key (DESIGN §4).

What one tool writes the other reads back with the same content, size, mode and mtime (whole
seconds: s3fs keeps seconds).  s3fs 1.90 stores multipart uploads *unencrypted* on Ceph 16, so
s3fs always runs with ``nomultipart`` here, and every object s3fs wrote is checked to be SSE-C.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import Mounted, Rgw, new_key

from s3ssefs.keys import Key

pytestmark = [pytest.mark.rgw, pytest.mark.mounted]
BIG = 24 << 20  # above s3ssefs's multipart threshold (16M)


@pytest.fixture
def key() -> Key:
    """A random key s3fs 1.90 accepts: it refuses one whose first byte is 0 ("failed to load
    use_sse custom key file": its MD5 helper takes a leading NUL for an empty string), so one
    random key in 256 (including ``s3ssefs keygen``'s) cannot be shared with s3fs."""
    while True:
        k = new_key("k1")
        if k.raw[0] != 0:
            return k


class S3fs:
    """A real s3fs-fuse in the foreground (``-f``), in a background process."""

    def __init__(self, rgw: Rgw, bucket: str, path: Path, tmp: Path, key: Key,
                 *extra: str) -> None:
        self.path = path
        passwd = tmp / "s3fs-passwd"
        passwd.write_text(f"{rgw.access_key}:{rgw.secret_key}\n")
        passwd.chmod(0o600)
        keys = tmp / "s3fs-sse-keys"
        keys.write_bytes(base64.b64encode(key.raw) + b"\n")  # > 32 chars: s3fs reads base64
        keys.chmod(0o600)
        self.log = tmp / "s3fs.log"
        opts = ",".join([f"url={rgw.endpoint}", "use_path_request_style",
                         f"passwd_file={passwd}", f"use_sse=custom:{keys}", "nomultipart",
                         "stat_cache_expire=1", *extra])
        env = {**os.environ, "CURL_CA_BUNDLE": str(rgw.ca)}
        path.mkdir(exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["s3fs", bucket, str(path), "-f", "-o", opts], env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self._wait_mounted(60)
        except BaseException:
            self.stop()
            raise

    def _wait_mounted(self, timeout: float) -> None:
        """Bounded wait on the condition, blocking on the s3fs process between checks."""
        for _ in range(int(timeout / 0.05)):
            if os.path.ismount(self.path):
                return
            try:
                code = self.proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"s3fs exited with {code}: {self.log.read_text()[-2000:]}")
        pytest.fail(f"s3fs did not mount within {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)


@pytest.fixture
def s3fs_factory(rgw: Rgw, tmp_path: Path, key: Key) -> Iterator[Any]:
    made: list[S3fs] = []

    def make(bucket: str, *extra: str) -> S3fs:
        m = S3fs(rgw, bucket, tmp_path / f"s3fs{len(made)}", tmp_path, key, *extra)
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            m.stop()


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def summary(root: Path, names: list[str]) -> dict[str, tuple[Any, ...]]:
    """What must agree between the tools: type+mode, size, mtime (s), content or target."""
    out: dict[str, tuple[Any, ...]] = {}
    for name in names:
        p = root / name
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            body: str = os.readlink(p)
        elif stat.S_ISDIR(st.st_mode):
            body = ",".join(sorted(os.listdir(p)))
        else:
            body = digest(p)
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        out[name] = (stat.filemode(st.st_mode), size, int(st.st_mtime), body)
    return out


def write(path: Path, data: bytes, mode: int | None = None,
          mtime_ns: int | None = None, *, on_fd: bool) -> None:
    """Write a file; set mode and mtime by path after close, or (``on_fd``) on the open
    descriptor before close: s3fs 1.90 changes the attributes of a closed SSE-C object with
    CopyObject, which Ceph 16 refuses (501 → EOPNOTSUPP), but folds them into the upload of an
    open one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if on_fd and mode is not None:
            os.fchmod(fd, mode)
        if on_fd and mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)
    if not on_fd and mode is not None:
        os.chmod(path, mode)
    if not on_fd and mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def make_tree(root: Path, *, on_fd: bool = False) -> list[str]:
    write(root / "small.txt", b"hello from one tool to the other\n", 0o640, on_fd=on_fd)
    write(root / "big.bin", os.urandom(BIG), 0o600, 1_600_000_000 * 10**9, on_fd=on_fd)
    write(root / "frac.txt", b"mtime with a fraction\n", None, 1_650_000_000_750_000_000,
          on_fd=on_fd)
    (root / "d").mkdir()
    write(root / "d" / "inner.txt", b"inside a directory\n", on_fd=on_fd)
    os.symlink("small.txt", root / "link")
    return ["small.txt", "big.bin", "frac.txt", "d", "d/inner.txt", "link"]


def check_expected(view: dict[str, tuple[Any, ...]]) -> None:
    assert view["small.txt"][0] == "-rw-r-----"
    assert view["big.bin"][:3] == ("-rw-------", BIG, 1_600_000_000)
    assert view["frac.txt"][2] == 1_650_000_000
    assert view["d"][0].startswith("d") and view["d"][3] == "inner.txt"
    assert view["link"][0].startswith("l") and view["link"][3] == "small.txt"


def assert_sse_c(s3: Any, bucket: str, key: Key) -> None:
    """Every object is SSE-C with ``key``: unreadable without it, the server echoes its MD5."""
    fp = base64.b64encode(hashlib.md5(key.raw).digest()).decode()
    objects = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert objects
    for o in objects:
        with pytest.raises(ClientError):
            s3.head_object(Bucket=bucket, Key=o["Key"])
        h = s3.head_object(Bucket=bucket, Key=o["Key"], SSECustomerAlgorithm="AES256",
                           SSECustomerKey=key.raw)
        assert h["SSECustomerKeyMD5"] == fp, o["Key"]


def test_s3ssefs_writes_s3fs_reads(mnt: Mounted, bucket: str, s3: Any, key: Key,
                                   s3fs_factory: Any) -> None:
    names = make_tree(mnt.path)
    mine = summary(mnt.path, names)
    check_expected(mine)
    assert_sse_c(s3, bucket, key)
    meta = s3.head_object(Bucket=bucket, Key="frac.txt", SSECustomerAlgorithm="AES256",
                          SSECustomerKey=key.raw)["Metadata"]
    assert meta["mtime"].split(".")[0] == "1650000000", meta
    theirs = summary(s3fs_factory(bucket).path, names)
    assert theirs == mine


def test_s3fs_writes_s3ssefs_reads(mount_factory: Any, bucket: str, s3: Any, key: Key,
                                   s3fs_factory: Any) -> None:
    writer = s3fs_factory(bucket)
    names = make_tree(writer.path, on_fd=True)
    writer.stop()
    assert_sse_c(s3, bucket, key)
    meta = s3.head_object(Bucket=bucket, Key="frac.txt", SSECustomerAlgorithm="AES256",
                          SSECustomerKey=key.raw)["Metadata"]
    assert meta["mtime"] == "1650000000.750000000", meta  # s3fs 1.90 keeps nanoseconds too
    theirs = summary(s3fs_factory(bucket).path, names)  # a fresh s3fs: no stale stat cache
    check_expected(theirs)
    mine = summary(mount_factory(bucket).path, names)
    assert mine == theirs


def test_extended_attributes_both_ways(mount_factory: Any, bucket: str, s3: Any, key: Key,
                                       s3fs_factory: Any) -> None:
    """``user.*`` attributes set through either file system read back through the other
    (s3fs with ``-o use_xattr,nocopyapi``), on files and directories, binary values included; and an
    attribute removed on one side is gone on the other."""
    ours = mount_factory(bucket)
    (ours.path / "mine.txt").write_bytes(b"mine")
    (ours.path / "dir").mkdir()
    binary = bytes(range(200))
    os.setxattr(ours.path / "mine.txt", "user.from-s3ssefs", b"hello s3fs")
    os.setxattr(ours.path / "mine.txt", "user.binary", binary)
    os.setxattr(ours.path / "mine.txt", "user.drop", b"x")
    os.setxattr(ours.path / "dir", "user.dir-note", b"d")
    ours.umount()

    theirs = s3fs_factory(bucket, "use_xattr")
    assert os.getxattr(theirs.path / "mine.txt", "user.from-s3ssefs") == b"hello s3fs"
    assert os.getxattr(theirs.path / "mine.txt", "user.binary") == binary
    assert os.getxattr(theirs.path / "dir", "user.dir-note") == b"d"
    # s3fs 1.90 changes the metadata of a closed object with CopyObject, which Ceph 16
    # refuses for SSE-C objects (501: setxattr is ENOTSUP); on a file open for writing the
    # attributes go up with its data, so that is how s3fs sets them here
    with open(theirs.path / "theirs.txt", "wb") as f:
        f.write(b"theirs")
        os.setxattr(f.fileno(), "user.from-s3fs", b"hello s3ssefs")
    with open(theirs.path / "mine.txt", "r+b") as f:
        f.write(b"mine")
        f.flush()
        os.setxattr(f.fileno(), "user.from-s3fs", binary[::-1])
        os.removexattr(f.fileno(), "user.drop")
    theirs.stop()
    assert_sse_c(s3, bucket, key)

    ours.mount()
    assert os.getxattr(ours.path / "theirs.txt", "user.from-s3fs") == b"hello s3ssefs"
    mine = ours.path / "mine.txt"
    assert {n: os.getxattr(mine, n) for n in os.listxattr(mine)
            if not n.startswith("user.s3ssefs.")} == {
        "user.from-s3ssefs": b"hello s3fs", "user.binary": binary,
        "user.from-s3fs": binary[::-1]}
    assert mine.read_bytes() == b"mine"
