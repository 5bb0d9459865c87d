"""Layer 4: what the mount refuses to do to the bucket, through the real daemon (issue 29).

A key file holding the wrong key must not let anyone delete, rename or replace the objects it
cannot read; sizes one object cannot hold are EFBIG before anything is spent on them; the
mount's root directory has no object, so changing its attributes sends nothing; ordinary
concurrent use (``cat``, ``rm``, ``echo >``) of the same names never gets EIO; and a cache
disk that fills up while a file is being copied over an existing one leaves the old object,
not a partial one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import new_key, sse, wait_for

from s3ssefs.keys import Key, KeyFile

pytestmark = pytest.mark.mounted

MiB = 1 << 20
PS = 16 * MiB  # default part size


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bucket_body(s3: Any, bucket: str, name: str, key: Key | None) -> bytes | None:
    try:
        return s3.get_object(Bucket=bucket, Key=name, **(sse(key) if key else {}))["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def run(*argv: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300,
                          **kw)


def daemon_lines(m: Any, pattern: str) -> list[str]:
    return [line for line in m.log_file.read_text(errors="replace").splitlines()
            if re.search(pattern, line)]


# --- a wrong key file -------------------------------------------------------------------------


@pytest.mark.allow_warnings  # every refusal is logged, as it must be
def test_a_wrong_key_file_cannot_delete_rename_or_replace_what_it_cannot_read(
        bucket: str, s3: Any, tmp_path: Path, mount_factory: Any) -> None:
    """Objects written with key A, mounted with a key file holding only B: rm, rm -r, mv over
    them, rsync over them, cp --remove-destination, mv of them and a new file written over
    them all fail with EACCES, and every A object is still there, intact.  ls -l shows them
    with their size and mode 0000.  Plain objects stay writable and deletable.  Mounted again
    with delete_unreadable, the operator can delete and replace them."""
    a, b = new_key("a"), new_key("b")
    names = ["f1", "dir/x", "dir/y", "f2", "f4", "f5", "f6", "f7"]
    bodies = {n: os.urandom(1000 + i) for i, n in enumerate(names)}
    for n, body in bodies.items():
        s3.put_object(Bucket=bucket, Key=n, Body=body, **sse(a))
    s3.put_object(Bucket=bucket, Key="plain", Body=b"plain")
    s3.put_object(Bucket=bucket, Key="plain2", Body=b"plain")
    keys = tmp_path / "b.toml"
    KeyFile({b.id: b}, b.id).save(keys)
    src = tmp_path / "src"
    src.write_bytes(b"new content\n")

    m = mount_factory(bucket, keys=keys)
    p = m.path
    listing = run("ls", "-l", p)
    assert listing.returncode == 0, listing.stderr
    f1_line = next(line for line in listing.stdout.splitlines() if line.endswith(" f1"))
    assert f1_line.startswith("---------- "), f1_line
    assert f" {len(bodies['f1'])} " in f1_line
    (p / "tmp").write_bytes(b"replacement\n")

    refused = {
        "rm": run("rm", p / "f1"),
        "rm -f": run("rm", "-f", p / "f7"),
        "rm -r": run("rm", "-r", p / "dir"),
        "mv -f": run("mv", "-f", p / "tmp", p / "f2"),
        "rsync": run("rsync", src, p / "f4"),
        "cp --remove-destination": run("cp", "--remove-destination", src, p / "f5"),
        "mv away": run("mv", p / "f6", p / "g6"),
        "write over": run("sh", "-c", f"echo x > {p / 'f6'}"),
    }
    for what, r in refused.items():
        assert r.returncode != 0, f"{what} succeeded"
        assert "ermission denied" in r.stderr, f"{what}: {r.stderr}"
    with pytest.raises(PermissionError):
        os.truncate(p / "f1", 0)
    for n, body in bodies.items():
        assert bucket_body(s3, bucket, n, a) == body, f"{n} was changed"
    assert (p / "tmp").read_bytes() == b"replacement\n"  # mv left it where it was
    lines = daemon_lines(m, r"refusing to delete s3://\S+/f1: no key of this mount opens it")
    assert len(lines) == 1 and b.fingerprint in lines[0], lines

    # objects stored without SSE-C: read, written (under the current key) and deleted as ever
    assert (p / "plain").read_bytes() == b"plain"
    (p / "plain").write_bytes(b"plain 2")
    assert bucket_body(s3, bucket, "plain", b) == b"plain 2"
    os.unlink(p / "plain")
    os.unlink(p / "plain2")
    assert bucket_body(s3, bucket, "plain", None) is None
    assert bucket_body(s3, bucket, "plain2", None) is None

    # the operator who means it
    m.umount()
    m.extra.append("--delete-unreadable")
    m.mount()
    os.unlink(p / "f1")
    assert run("mv", "-f", p / "tmp", p / "f2").returncode == 0
    assert run("rm", "-r", p / "dir").returncode == 0
    assert bucket_body(s3, bucket, "f1", a) is None
    assert bucket_body(s3, bucket, "f2", b) == b"replacement\n"
    assert bucket_body(s3, bucket, "dir/x", a) is None
    assert run("mv", p / "f6", p / "g6").returncode != 0  # a copy needs the key: never
    assert bucket_body(s3, bucket, "f6", a) == bodies["f6"]


# --- sizes and the root ------------------------------------------------------------------------


def test_a_size_one_object_cannot_hold_is_efbig_at_once(mnt: Any) -> None:
    """truncate -s 999999999999999 (a POSIX conformance check does it), ftruncate, write and
    posix_fallocate past 10,000 parts are EFBIG, the file is unchanged and the mount lives
    on; up to the limit a truncate up is allowed (and costs nothing until it is uploaded)."""
    f = mnt.path / "f"
    f.write_bytes(b"hello")
    r = run("truncate", "-s", "999999999999999", f)
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr
    limit = 10_000 * PS
    with pytest.raises(OSError) as ei:
        os.truncate(f, limit + 1)
    assert ei.value.errno == errno.EFBIG
    with open(f, "r+b") as h:
        for call in (lambda: os.ftruncate(h.fileno(), 1 << 50),
                     lambda: os.pwrite(h.fileno(), b"x", limit),
                     lambda: os.posix_fallocate(h.fileno(), limit, 4096)):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EFBIG
        os.ftruncate(h.fileno(), limit)  # allowed: the largest file there can be
        assert os.fstat(h.fileno()).st_size == limit
        os.ftruncate(h.fileno(), 5)
    assert f.read_bytes() == b"hello"
    assert sorted(os.listdir(mnt.path)) == ["f"]


def test_the_root_directory_attributes_stay_local(mount_factory: Any, bucket: str,
                                                  s3: Any) -> None:
    """touch and chmod of the mount point (with and without a prefix) succeed, show, and
    send nothing to the bucket: no object at an empty key (the bucket's own URL) or at the
    prefix's marker."""
    for target in (bucket, f"{bucket}/pre"):
        m = mount_factory(target)
        os.utime(m.path, (1_000_000_000, 1_000_000_000))
        os.chmod(m.path, 0o750)
        st = os.stat(m.path)
        assert (st.st_mtime, st.st_mode & 0o777) == (1_000_000_000, 0o750)
        (m.path / "f").write_bytes(b"x")
        m.umount()
    s3.head_bucket(Bucket=bucket)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    assert keys == ["f", "pre/f"]


# --- concurrency -------------------------------------------------------------------------------


def test_concurrent_cat_rm_and_rewrite_of_the_same_names_never_fail(mnt: Any, s3: Any,
                                                                   bucket: str,
                                                                   key: Key) -> None:
    """10 shell loops of `cat f; rm -f f; echo foo > f` over 5 names: cat may find a name
    gone (ENOENT), nothing else may fail (it was EIO: a reader's close dropped the spill an
    unlink was copying into); every name ends holding foo, in the mount and in the bucket."""
    names = [mnt.path / f"n{i}" for i in range(5)]
    loop = "for i in $(seq 40); do cat \"$1\" >/dev/null; rm -f \"$1\"; echo foo > \"$1\"; done"
    procs = [subprocess.Popen(["sh", "-c", loop, "sh", str(names[j % 5])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for j in range(10)]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        errors += [line for line in err.splitlines() if "No such file or directory" not in line
                   or not line.startswith("cat:")]
    assert not errors, errors
    for n in names:
        assert n.read_bytes() == b"foo\n"
        assert bucket_body(s3, bucket, n.name, key) == b"foo\n"
    assert not daemon_lines(mnt, r" (WARNING|ERROR|CRITICAL) s3ssefs")


def test_a_file_another_client_deleted_is_written_again_at_once(mnt: Any, s3: Any,
                                                               bucket: str, key: Key) -> None:
    """`echo new > f` right after another client deleted f (the kernel still knows the
    name, within attr_ttl): the file is created again, not "No such file"; `cat` of it in
    that window says it is gone."""
    for i in range(3):
        f = mnt.path / f"f{i}"
        f.write_bytes(b"old\n")
        assert f.read_bytes() == b"old\n"
        s3.delete_object(Bucket=bucket, Key=f.name)
        if i == 0:
            assert run("cat", f).returncode != 0
        r = run("sh", "-c", f"echo new > {f}")
        assert r.returncode == 0, r.stderr
        assert f.read_bytes() == b"new\n"
        assert bucket_body(s3, bucket, f.name, key) == b"new\n"


# --- a full cache disk ----------------------------------------------------------------------


@pytest.fixture
def small_cache_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for a mount's cache_dir (requested before mount_factory, so it is
    unmounted after the mount is)."""
    d = tmp_path / "cache0"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(d)],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


@pytest.mark.allow_warnings  # the capped cache_size and the full disk are logged, as they must be
def test_a_full_cache_disk_leaves_the_previous_object_in_place(
        small_cache_disk: Path, mount_factory: Any, bucket: str, s3: Any, key: Key,
        tmp_path: Path) -> None:
    """cp of 64 MiB over a 24 MiB file with the cache on a 16 MiB disk: the copy fails with
    ENOSPC, a log line names the cache directory and how full it is, the multipart upload is
    aborted, and the object (and the file) keep the previous content; cache_size (2G by
    default) was capped at mount.  Smaller files are written fine afterwards."""
    old = os.urandom(24 * MiB)
    s3.put_object(Bucket=bucket, Key="big", Body=old, **sse(key))
    new = tmp_path / "new"
    new.write_bytes(os.urandom(64 * MiB))

    m = mount_factory(bucket, mount=False)
    assert m.cache_dir == small_cache_disk
    m.mount()
    r = run("cp", new, m.path / "big")
    assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
    assert wait_for(lambda: not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), 60)
    assert sha(bucket_body(s3, bucket, "big", key) or b"") == sha(old)
    assert sha((m.path / "big").read_bytes()) == sha(old)
    assert daemon_lines(m, r"cache_size .* is more than the free space in " +
                        re.escape(str(small_cache_disk)))
    full = daemon_lines(m, re.escape(str(small_cache_disk)) + r"\S* is full \(.* used, .* free\)")
    assert full and "ENOSPC" in full[0], full

    (m.path / "small").write_bytes(b"s" * MiB)  # the spill's space came back
    assert bucket_body(s3, bucket, "small", key) == b"s" * MiB
