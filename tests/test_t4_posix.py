"""Layer 4: POSIX behaviour of the real mounted daemon, driven as a legacy program drives it.

Every test mounts a fresh bucket with the real ``s3ssefs`` daemon (background mode) and uses
ordinary file calls and real commands (sqlite, tar, cp, rsync, dd, ls) on it, then checks what
a user would see: the same bytes after a remount, modes and times kept, the errors POSIX
promises, and, through boto3, that every object that reached the bucket is unreadable without
the key and carries the metadata s3fs-fuse writes (DESIGN §4–§6).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import mmap
import os
import random
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import mount_stats

from s3ssefs.keys import Key

MiB = 1 << 20
BS = MiB  # default block size
PS = 16 * MiB  # default part size and multipart threshold


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def daemon_log_clean(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """The daemons' own logs (every mount of the test, read after they unmounted) carry no
    s3ssefs warning or error either: log_check only sees this process's logging."""
    yield
    if request.node.get_closest_marker("allow_warnings") is not None:
        return
    bad = [line for log in tmp_path.glob("daemon*.log")
           for line in log.read_text(errors="replace").splitlines()
           if re.search(r" (WARNING|ERROR|CRITICAL) s3ssefs", line)]
    assert not bad, "daemon logged: " + "\n".join(bad[:5])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` reproducible, incompressible-enough bytes (cheaper than urandom for big files)."""
    return random.Random(seed).randbytes(n)


def sse(key: Key) -> dict[str, Any]:
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key.raw}


def assert_sealed(s3: Any, bucket: str, s3key: str, key: Key, body: bytes | None) -> None:
    """The object cannot be read without the key; with it, its bytes are ``body``."""
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key=s3key)
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key=s3key)
    got = s3.get_object(Bucket=bucket, Key=s3key, **sse(key))
    data = got["Body"].read()
    assert got["SSECustomerAlgorithm"] == "AES256"
    if body is not None:
        assert len(data) == len(body) and sha(data) == sha(body), s3key


def s3meta(s3: Any, bucket: str, s3key: str, key: Key) -> dict[str, str]:
    return s3.head_object(Bucket=bucket, Key=s3key, **sse(key))["Metadata"]


def all_keys(s3: Any, bucket: str) -> set[str]:
    out: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update(o["Key"] for o in page.get("Contents", []))
    return out


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_big(path: Path, total: int, seed: int = 0, chunk: int = 4 * MiB) -> str:
    """Write ``total`` pseudo-random bytes in ``chunk`` pieces; their sha256."""
    h = hashlib.sha256()
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = total
        while left:
            buf = rnd.randbytes(min(chunk, left))
            f.write(buf)
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    assert r.returncode == 0, f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()}"
    return r


def stats(root: Path) -> dict[str, tuple[int, int, int]]:
    """Relative path → (st_mode, int(st_mtime), st_size) of everything below ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            out[str(p.relative_to(root))] = (st.st_mode, int(st.st_mtime), size)
    return out


def same_tree(got: dict[str, tuple[int, int, int]], want: dict[str, tuple[int, int, int]],
              ) -> bool:
    """Same names and modes; same mtime and size for everything but directories (whose
    mtime changes as entries are added, so tools set it last — or not at all)."""
    def norm(t: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, ...]]:
        return {k: (v[0],) if stat.S_ISDIR(v[0]) else v for k, v in t.items()}

    assert norm(got) == norm(want)
    return True


def scan_for(root: Path, needle: bytes) -> list[str]:
    """Files below ``root`` whose raw bytes contain ``needle``."""
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
            hits.append(str(p))
    return hits


# --- data round trips ------------------------------------------------------------------------

SIZES = [0, 1, BS - 1, BS, BS + 1, PS - 1, PS, PS + 1]


def test_round_trip_block_and_part_boundaries(mnt: Any, s3: Any, bucket: str, key: Key) -> None:
    """Files of 0, 1 byte and one byte either side of the block and part sizes read back
    unchanged, before and after a remount, and S3 holds exactly those bytes, sealed."""
    want = {}
    for i, n in enumerate(SIZES):
        data = pattern(n, seed=i)
        write_file(mnt.path / f"f{n}", data)
        want[f"f{n}"] = data
        assert (mnt.path / f"f{n}").stat().st_size == n
        assert (mnt.path / f"f{n}").read_bytes() == data
    mnt.remount()
    for name, data in want.items():
        assert (mnt.path / name).stat().st_size == len(data)
        assert sha_file(mnt.path / name) == sha(data), name
        assert_sealed(s3, bucket, name, key, data)


def test_round_trip_300mib_survives_remount(mnt: Any, tmp_path: Path) -> None:
    """A 300 MiB file (a streamed multipart upload) has the same sha256 read back at once and
    after a remount (read through S3, not the writer's spill)."""
    f = mnt.path / "big.bin"
    digest = write_big(f, 300 * MiB, seed=300)
    assert f.stat().st_size == 300 * MiB
    assert list(mnt.cache_dir.rglob("spill-*")) == []  # uploaded: the local copy is gone
    assert sha_file(f) == digest
    mnt.remount()
    assert f.stat().st_size == 300 * MiB
    assert sha_file(f) == digest
    f.unlink()
    assert not f.exists()


# --- everything that reaches the bucket is sealed with the key --------------------------------


def test_every_write_path_leaves_sealed_objects(mnt: Any, s3: Any, bucket: str,
                                                key: Key) -> None:
    """Single PUT, streamed multipart, chmod's server-side copy, rename's copy, directory
    markers and symlinks: none of them leaves an object readable without the key."""
    small = pattern(1000, 1)
    write_file(mnt.path / "small.txt", small)
    assert_sealed(s3, bucket, "small.txt", key, small)

    big = pattern(PS + 3 * MiB, 2)  # > multipart threshold
    write_file(mnt.path / "multi.bin", big)
    assert_sealed(s3, bucket, "multi.bin", key, big)

    medium = pattern(3 * MiB + 5, 3)  # > 1 MiB: chmod copies server-side
    write_file(mnt.path / "medium.bin", medium)
    etag = s3.head_object(Bucket=bucket, Key="medium.bin", **sse(key))["ETag"]
    os.chmod(mnt.path / "medium.bin", 0o600)
    head = s3.head_object(Bucket=bucket, Key="medium.bin", **sse(key))
    assert head["ETag"] != etag  # the object was rewritten…
    assert int(head["Metadata"]["mode"]) == stat.S_IFREG | 0o600
    assert_sealed(s3, bucket, "medium.bin", key, medium)  # …still sealed, same bytes

    os.chmod(mnt.path / "small.txt", 0o640)  # small: re-PUT of the bytes
    assert_sealed(s3, bucket, "small.txt", key, small)

    os.rename(mnt.path / "medium.bin", mnt.path / "renamed.bin")
    os.rename(mnt.path / "small.txt", mnt.path / "renamed.txt")
    os.rename(mnt.path / "multi.bin", mnt.path / "renamed-multi.bin")
    assert_sealed(s3, bucket, "renamed.bin", key, medium)
    assert_sealed(s3, bucket, "renamed.txt", key, small)
    assert_sealed(s3, bucket, "renamed-multi.bin", key, big)

    os.mkdir(mnt.path / "d")
    assert_sealed(s3, bucket, "d/", key, b"")
    os.chmod(mnt.path / "d", 0o750)
    assert_sealed(s3, bucket, "d/", key, b"")
    os.symlink("renamed.txt", mnt.path / "link")
    assert_sealed(s3, bucket, "link", key, b"renamed.txt")

    assert all_keys(s3, bucket) == {"renamed.bin", "renamed.txt", "renamed-multi.bin", "d/",
                                    "link"}
    for name in ("renamed.bin", "renamed.txt", "renamed-multi.bin"):
        os.unlink(mnt.path / name)


# --- legacy programs -------------------------------------------------------------------------


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite_database(mnt: Any, journal: str) -> None:
    """sqlite creates, fills (several transactions, thousands of rows) and checks a database
    on the mount, with a rollback journal and with a write-ahead log (shared mmap); it is
    still intact and complete after a remount."""
    db = mnt.path / "app.db"
    con = sqlite3.connect(db)
    assert con.execute(f"PRAGMA journal_mode={journal}").fetchone()[0] == journal
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
    con.execute("CREATE INDEX t_name ON t (name)")
    rnd = random.Random(7)
    for tx in range(5):
        with con:
            con.executemany("INSERT INTO t (name, blob) VALUES (?, ?)",
                            [(f"row-{tx}-{i}", rnd.randbytes(rnd.randrange(10, 400)))
                             for i in range(1000)])
    with con:
        con.execute("DELETE FROM t WHERE id % 7 = 0")
        con.execute("UPDATE t SET name = name || '-u' WHERE id % 5 = 0")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    count = con.execute("SELECT count(*) FROM t").fetchone()[0]
    total = con.execute("SELECT sum(length(blob)) FROM t").fetchone()[0]
    con.close()
    assert count == 5000 - 5000 // 7

    mnt.remount()
    r = run("sqlite3", db, "PRAGMA integrity_check; SELECT count(*), sum(length(blob)) FROM t;")
    assert r.stdout.split() == ["ok", f"{count}|{total}"]
    con = sqlite3.connect(db)
    with con:
        con.execute("INSERT INTO t (name, blob) VALUES ('after', x'00ff')")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == count + 1
    con.close()
    assert sorted(os.listdir(mnt.path)) == ["app.db"]


def _make_tarball(path: Path) -> None:
    rnd = random.Random(11)
    with tarfile.open(path, "w:gz") as tar:
        for i in range(220):
            depth = rnd.randrange(0, 4)
            parts = [f"d{rnd.randrange(4)}" for _ in range(depth)]
            name = "/".join(["proj", *parts, f"file {i}.dat"])
            size = rnd.choice([0, 1, 100, 4096, 70_000, BS - 1, BS + 1])
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = rnd.choice([0o644, 0o600, 0o755])
            info.mtime = 1_600_000_000 + i * 3600
            tar.addfile(info, io.BytesIO(rnd.randbytes(size)))
        for d in ("proj/empty", "proj/d1/empty2"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("proj/link-to-d0")
        info.type = tarfile.SYMTYPE
        info.linkname = "d0"
        tar.addfile(info)


def test_tar_extract_matches_local(mnt: Any, tmp_path: Path) -> None:
    """Hundreds of files in nested directories extracted by tar onto the mount are what tar
    extracts locally (diff -r), also after a remount."""
    tarball = tmp_path / "proj.tar.gz"
    _make_tarball(tarball)
    local = tmp_path / "local"
    local.mkdir()
    run("tar", "-xzf", tarball, "-C", local)
    run("tar", "-xzf", tarball, "-C", mnt.path)
    run("diff", "-r", "--no-dereference", local / "proj", mnt.path / "proj")
    want = stats(local / "proj")
    assert len(want) > 240
    assert same_tree(stats(mnt.path / "proj"), want)
    mnt.remount()
    run("diff", "-r", "--no-dereference", local / "proj", mnt.path / "proj")
    assert same_tree(stats(mnt.path / "proj"), want)


def _tree(root: Path) -> None:
    rnd = random.Random(5)
    for i, sub in enumerate(["", "a", "a/b", "c"]):
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        for j in range(4):
            f = d / f"f{i}{j}.txt"
            f.write_bytes(rnd.randbytes(rnd.choice([0, 10, 5000, BS + 17])))
            os.chmod(f, rnd.choice([0o600, 0o640, 0o755, 0o444]))
            os.utime(f, (1_500_000_000 + i * 100 + j, 1_500_000_000 + i * 100 + j))
    os.chmod(root / "a/b", 0o700)
    os.symlink("a/b/f20.txt", root / "rel-link")
    for sub in ["a/b", "a", "c", ""]:
        os.utime(root / sub, (1_400_000_000, 1_400_000_000))


@pytest.mark.parametrize("tool", ["cp", "rsync"])
def test_copy_tools_keep_mode_and_mtime(mnt: Any, tmp_path: Path, tool: str) -> None:
    """``cp -a`` and ``rsync -a`` onto the mount keep every file's mode, mtime and size, also
    after a remount, and copying back gives identical files."""
    src = tmp_path / "src"
    _tree(src)
    dst = mnt.path / "dst"
    if tool == "cp":
        run("cp", "-a", src, dst)
    else:
        run("rsync", "-a", f"{src}/", f"{dst}/")
    want = stats(src)
    want_files = {k: v for k, v in want.items() if not stat.S_ISDIR(v[0])}
    got = stats(dst)
    assert {k: v for k, v in got.items() if not stat.S_ISDIR(v[0])} == want_files
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    mnt.remount()
    got = stats(dst)
    assert {k: v for k, v in got.items() if not stat.S_ISDIR(v[0])} == want_files
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    back = tmp_path / "back"
    run("cp", "-a", dst, back)
    run("diff", "-r", "--no-dereference", src, back)


# --- write patterns --------------------------------------------------------------------------


def test_editor_save_pattern(mnt: Any, s3: Any, bucket: str, key: Key) -> None:
    """Write a temp file, fsync, rename it over the original (vim/emacs/atomic-save): the new
    content is there, the old one is gone, the temp name too; also for a reader who opened
    the original before the save."""
    orig = mnt.path / "notes.txt"
    orig.write_bytes(b"old content\n" * 1000)
    reader = open(orig, "rb")  # noqa: SIM115 - must stay open across the save
    new = b"new content, longer than before\n" * 2000
    tmp = mnt.path / ".notes.txt.swp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, new)
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, orig)
    assert orig.read_bytes() == new
    assert not tmp.exists()
    assert sorted(os.listdir(mnt.path)) == ["notes.txt"]
    assert reader.read() == b"old content\n" * 1000  # POSIX: the old inode lives on
    reader.close()
    assert all_keys(s3, bucket) == {"notes.txt"}
    assert_sealed(s3, bucket, "notes.txt", key, new)
    mnt.remount()
    assert orig.read_bytes() == new


def test_appends(mnt: Any) -> None:
    """Opening with 'ab' several times appends each time; two append handles open at once
    both land at the end."""
    f = mnt.path / "log.txt"
    want = b""
    for i in range(5):
        line = f"line {i}\n".encode() * (i * 50_000 + 1)
        with open(f, "ab") as h:
            h.write(line)
        want += line
        assert f.read_bytes() == want
    with open(f, "ab", buffering=0) as a, open(f, "ab", buffering=0) as b:
        a.write(b"A1\n")
        b.write(b"B1\n")
        a.write(b"A2\n")
    want += b"A1\nB1\nA2\n"
    assert f.read_bytes() == want
    mnt.remount()
    assert f.read_bytes() == want
    assert f.stat().st_size == len(want)


def test_random_dd_writes_into_large_file(mnt: Any, tmp_path: Path) -> None:
    """dd conv=notrunc and pwrite at random offsets into a 40 MiB file give the same sha256
    as the same writes on a local copy, also after remount (untouched parts are copied
    server-side)."""
    size = 40 * MiB
    local = tmp_path / "local.bin"
    remote = mnt.path / "data.bin"
    digest = write_big(local, size, seed=40)
    shutil.copyfile(local, remote)
    assert sha_file(remote) == digest
    mnt.remount()  # the edits below start from the object in S3

    rnd = random.Random(41)
    patch = tmp_path / "patch"
    patch.write_bytes(rnd.randbytes(3 * 4096))
    # parts 0 and 2 change, part 1 (16–32 MiB) never does: it is copied server-side
    for off in (0, 2500 * 4096, 2 * PS + 300 * 4096):
        assert off % 4096 == 0 and off + 3 * 4096 < size  # dd's seek counts 4096-byte blocks
        for target in (local, remote):
            run("dd", f"if={patch}", f"of={target}", "bs=4096", f"seek={off // 4096}",
                "conv=notrunc", "status=none")
    edits = [(PS - 10, rnd.randbytes(10)), (2 * PS + 5, rnd.randbytes(100_000)),
             (size - 3, rnd.randbytes(3)), (12345, rnd.randbytes(1))]
    for path in (local, remote):
        fd = os.open(path, os.O_WRONLY)
        for off, buf in edits:
            assert os.pwrite(fd, buf, off) == len(buf)
        os.close(fd)
    assert remote.stat().st_size == local.stat().st_size == size
    assert sha_file(remote) == sha_file(local)
    mnt.remount()
    assert sha_file(remote) == sha_file(local)
    remote.unlink()


def test_truncate_down_and_up(mnt: Any) -> None:
    """truncate on a path and ftruncate on an open fd, down and up, across block boundaries:
    the kept bytes are unchanged and the grown tail reads as zeros, also after a remount."""
    f = mnt.path / "t.bin"
    data = pattern(3 * BS + 100, 9)
    f.write_bytes(data)
    os.truncate(f, BS + 10)
    assert f.read_bytes() == data[:BS + 10]
    os.truncate(f, 2 * BS + 50)
    want = data[:BS + 10] + bytes(BS + 40)
    assert f.read_bytes() == want
    with open(f, "r+b") as h:
        os.ftruncate(h.fileno(), 100)
        assert os.fstat(h.fileno()).st_size == 100
        h.seek(0)
        assert h.read() == data[:100]
        os.ftruncate(h.fileno(), 5000)
        h.seek(200)
        h.write(b"xyz")
    want = data[:100] + bytes(100) + b"xyz" + bytes(5000 - 203)
    assert f.read_bytes() == want
    os.truncate(f, 0)
    assert f.read_bytes() == b""
    os.truncate(f, BS + 1)
    assert f.read_bytes() == bytes(BS + 1)
    with open(f, "r+b") as h:  # truncate of a large file below the multipart threshold
        h.write(data[:1000])
        os.ftruncate(h.fileno(), PS + 2)
    want = data[:1000] + bytes(PS + 2 - 1000)
    mnt.remount()
    assert f.stat().st_size == PS + 2
    assert sha_file(f) == sha(want)
    os.truncate(f, 999)
    assert f.read_bytes() == data[:999]
    mnt.remount()
    assert f.read_bytes() == data[:999]


def test_rewrites_of_multipart_files(mnt: Any) -> None:
    """Overwriting a multipart object with a small file, appending to one whose last part is
    short, and writing past the end of a small file (a hole of zeros) all read back right,
    also after a remount."""
    big, grown, holey = mnt.path / "big", mnt.path / "grown", mnt.path / "holey"
    big.write_bytes(pattern(PS + 4 * MiB, 1))
    grown_data = pattern(PS + BS + 7, 2)
    grown.write_bytes(grown_data)
    holey.write_bytes(b"head")
    mnt.remount()
    with open(big, "wb") as h:  # O_TRUNC of a multipart object
        h.write(b"tiny now")
    with open(grown, "ab") as h:  # part 0 untouched, short part 1 grows
        h.write(b"tail" * 1000)
    grown_data += b"tail" * 1000
    fd = os.open(holey, os.O_WRONLY)
    os.pwrite(fd, b"far", 3 * BS + 5)
    os.close(fd)
    holey_data = b"head" + bytes(3 * BS + 1) + b"far"
    for _ in range(2):
        assert big.read_bytes() == b"tiny now"
        assert sha_file(grown) == sha(grown_data)
        assert holey.read_bytes() == holey_data
        mnt.remount()
    big.unlink()
    grown.unlink()


def test_rename_chmod_unlink_while_writing(mnt: Any, s3: Any, bucket: str, key: Key) -> None:
    """A file still open for writing can be renamed, chmod-ed and unlinked: after close the
    new name holds everything written (before and after the rename) with the new mode, and
    an unlinked file never reaches the bucket though its handle reads all it wrote."""
    a, b = mnt.path / "a.part", mnt.path / "b.done"
    first, second = pattern(2 * BS + 1, 3), pattern(BS, 4)
    with open(a, "wb") as h:
        h.write(first)
        os.rename(a, b)
        os.chmod(b, 0o604)
        h.write(second)
    assert sorted(os.listdir(mnt.path)) == ["b.done"]
    assert b.read_bytes() == first + second
    assert all_keys(s3, bucket) == {"b.done"}
    assert int(s3meta(s3, bucket, "b.done", key)["mode"]) == stat.S_IFREG | 0o604

    gone = mnt.path / "scratch"
    with open(gone, "w+b") as h:
        h.write(first)
        os.unlink(gone)
        h.write(second)
        h.flush()
        os.fsync(h.fileno())
        h.seek(0)
        assert h.read() == first + second
        assert "scratch" not in os.listdir(mnt.path)
    assert all_keys(s3, bucket) == {"b.done"}

    big = mnt.path / "big.tmp"  # past the multipart threshold: parts already sent
    with open(big, "wb") as h:
        h.write(pattern(PS + 2 * MiB, 5))
        os.rename(big, mnt.path / "big.bin")
        h.write(b"end")
    assert sha_file(mnt.path / "big.bin") == sha(pattern(PS + 2 * MiB, 5) + b"end")
    assert all_keys(s3, bucket) == {"b.done", "big.bin"}
    mnt.remount()
    assert b.read_bytes() == first + second
    assert stat.S_IMODE(b.stat().st_mode) == 0o604
    assert (mnt.path / "big.bin").stat().st_size == PS + 2 * MiB + 3
    os.unlink(mnt.path / "big.bin")


# --- names and directories -------------------------------------------------------------------


def test_directories(mnt: Any, s3: Any, bucket: str) -> None:
    """mkdir/rmdir; rmdir of a non-empty directory is ENOTEMPTY; a directory with nested
    content renames whole; rename over an existing file replaces it."""
    os.mkdir(mnt.path / "empty")
    assert (mnt.path / "empty").is_dir()
    os.rmdir(mnt.path / "empty")
    assert not (mnt.path / "empty").exists()
    with pytest.raises(FileNotFoundError):
        os.rmdir(mnt.path / "empty")

    top = mnt.path / "top"
    (top / "sub" / "deeper").mkdir(parents=True)
    files = {"a.txt": b"a" * 10, "sub/b.txt": pattern(BS + 3, 1),
             "sub/deeper/c.txt": b"c", "sub/deeper/empty.txt": b""}
    for rel, data in files.items():
        (top / rel).write_bytes(data)
    with pytest.raises(OSError) as ei:
        os.rmdir(top)
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as ei:
        os.rmdir(top / "sub" / "deeper")
    assert ei.value.errno == errno.ENOTEMPTY

    with pytest.raises(FileExistsError):
        os.mkdir(top)
    os.rename(top, mnt.path / "moved")
    assert not top.exists()
    for rel, data in files.items():
        assert (mnt.path / "moved" / rel).read_bytes() == data
    assert sorted(os.listdir(mnt.path / "moved" / "sub")) == ["b.txt", "deeper"]
    assert not any(k.startswith("top/") for k in all_keys(s3, bucket))

    (mnt.path / "x").write_bytes(b"source")
    (mnt.path / "y").write_bytes(b"target to be replaced")
    os.rename(mnt.path / "x", mnt.path / "y")
    assert (mnt.path / "y").read_bytes() == b"source"
    assert not (mnt.path / "x").exists()

    os.mkdir(mnt.path / "e")
    (mnt.path / "full").mkdir()
    (mnt.path / "full" / "f").write_bytes(b"f")
    for src, dst, err in (("moved", "full", errno.ENOTEMPTY), ("y", "e", errno.EISDIR),
                          ("moved", "y", errno.ENOTDIR), ("moved", "moved/sub/x", errno.EINVAL)):
        with pytest.raises(OSError) as ei:
            os.rename(mnt.path / src, mnt.path / dst)
        assert ei.value.errno == err, (src, dst)
    shutil.rmtree(mnt.path / "full")
    os.rename(mnt.path / "moved", mnt.path / "e")  # over an empty directory is allowed
    assert (mnt.path / "e" / "sub" / "deeper" / "c.txt").read_bytes() == b"c"

    mnt.remount()
    assert sorted(os.listdir(mnt.path)) == ["e", "y"]
    for rel, data in files.items():
        assert (mnt.path / "e" / rel).read_bytes() == data
    shutil.rmtree(mnt.path / "e")
    assert sorted(os.listdir(mnt.path)) == ["y"]
    assert all_keys(s3, bucket) == {"y"}


def test_unlink_while_open(mnt: Any, s3: Any, bucket: str) -> None:
    """An open handle keeps reading the whole content after the name is unlinked; the name
    is gone from the listing and the bucket at once."""
    f = mnt.path / "doomed.bin"
    data = pattern(3 * BS + 77, 3)
    f.write_bytes(data)
    mnt.remount()  # the reader must get its bytes from S3, not from the writer
    with open(f, "rb") as h:
        assert h.read(100) == data[:100]
        os.unlink(f)
        assert "doomed.bin" not in os.listdir(mnt.path)
        assert not f.exists()
        assert all_keys(s3, bucket) == set()
        assert h.read() == data[100:]
        h.seek(0)
        assert h.read() == data
    assert not f.exists()


def test_rename_while_open_for_reading(mnt: Any) -> None:
    """Handles opened before a directory rename, a file rename or a chmod (all server-side
    copies) keep reading the same bytes."""
    d = mnt.path / "d"
    d.mkdir()
    data, big = pattern(5 * BS + 3, 1), pattern(PS + 3 * BS, 2)
    (d / "f").write_bytes(data)
    (d / "g").write_bytes(big)
    mnt.remount()  # reads come from S3
    with open(d / "f", "rb") as h, open(d / "g", "rb") as h2:
        assert h.read(100) == data[:100]
        assert h2.read(100) == big[:100]
        os.rename(d, mnt.path / "e")
        assert h.read(2 * BS) == data[100:100 + 2 * BS]
        os.rename(mnt.path / "e" / "f", mnt.path / "e" / "f2")
        os.chmod(mnt.path / "e" / "f2", 0o600)
        assert h.read() == data[100 + 2 * BS:]
        assert h2.read() == big[100:]
    assert sorted(os.listdir(mnt.path / "e")) == ["f2", "g"]
    assert (mnt.path / "e" / "f2").read_bytes() == data
    os.unlink(mnt.path / "e" / "g")


def test_implied_directories(mnt: Any, s3: Any, bucket: str, key: Key) -> None:
    """Directories that exist only as key prefixes (written by the aws CLI or s3fs, no
    marker) list, rename and ``rm -r`` like any other, also after the rename forgot them."""
    for k in ("imp/a/b.txt", "imp/a/c/d.txt", "imp/e.txt"):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode(), **sse(key))
    assert sorted(os.listdir(mnt.path / "imp")) == ["a", "e.txt"]
    assert (mnt.path / "imp" / "a").is_dir()
    assert (mnt.path / "imp" / "a" / "c" / "d.txt").read_bytes() == b"imp/a/c/d.txt"
    os.rename(mnt.path / "imp", mnt.path / "moved")
    assert (mnt.path / "moved" / "a" / "b.txt").read_bytes() == b"imp/a/b.txt"
    shutil.rmtree(mnt.path / "moved")
    assert os.listdir(mnt.path) == []
    assert all_keys(s3, bucket) == set()


def test_dot_entries_are_listed(mnt: Any, s3: Any, bucket: str, key: Key) -> None:
    """``ls -a`` shows ``.`` and ``..`` first, with the inode numbers of the directory and
    its parent, at the root, in a directory made here and in one that is only a prefix."""
    (mnt.path / "made" / "sub").mkdir(parents=True)
    s3.put_object(Bucket=bucket, Key="implied/x.txt", Body=b"x", **sse(key))
    for d, parent in ((mnt.path, mnt.path), (mnt.path / "made", mnt.path),
                      (mnt.path / "made" / "sub", mnt.path / "made"),
                      (mnt.path / "implied", mnt.path)):
        out = subprocess.run(["ls", "-a1i", str(d)], check=True, capture_output=True,
                             text=True).stdout.split("\n")
        (dot_ino, dot), (dotdot_ino, dotdot) = (ln.split() for ln in out[:2])
        assert (dot, dotdot) == (".", "..")
        if d != mnt.path:  # the root's ".." is outside the mount
            assert int(dot_ino) == d.stat().st_ino
            assert int(dotdot_ino) == parent.stat().st_ino
    assert sorted(os.listdir(mnt.path / "implied")) == ["x.txt"]
    assert sorted(os.listdir(mnt.path / "made")) == ["sub"]


def test_symlinks(mnt: Any, s3: Any, bucket: str, key: Key) -> None:
    """Relative and absolute symlinks: readlink, following them, ``ls -l``; in S3 the body
    is the target and x-amz-meta-mode has S_IFLNK (s3fs's way)."""
    (mnt.path / "dir").mkdir()
    (mnt.path / "dir" / "target.txt").write_bytes(b"pointed at")
    os.symlink("dir/target.txt", mnt.path / "rel")
    abs_target = str(mnt.path / "dir" / "target.txt")
    os.symlink(abs_target, mnt.path / "abs")
    os.symlink("nowhere", mnt.path / "dangling")
    for _ in range(2):
        assert os.readlink(mnt.path / "rel") == "dir/target.txt"
        assert os.readlink(mnt.path / "abs") == abs_target
        assert (mnt.path / "rel").read_bytes() == b"pointed at"
        assert (mnt.path / "abs").read_bytes() == b"pointed at"
        assert (mnt.path / "rel").is_symlink() and stat.S_ISLNK(
            os.lstat(mnt.path / "rel").st_mode)
        assert os.lstat(mnt.path / "rel").st_size == len("dir/target.txt")
        assert not (mnt.path / "dangling").exists()
        ls = run("ls", "-l", mnt.path).stdout
        assert "rel -> dir/target.txt" in ls
        assert f"abs -> {abs_target}" in ls
        assert any(line.startswith("l") and "dangling -> nowhere" in line
                   for line in ls.splitlines())
        for name, target in (("rel", "dir/target.txt"), ("abs", abs_target)):
            body = s3.get_object(Bucket=bucket, Key=name, **sse(key))["Body"].read()
            assert body == target.encode()
            assert stat.S_ISLNK(int(s3meta(s3, bucket, name, key)["mode"]))
        mnt.remount()
    os.unlink(mnt.path / "rel")
    assert (mnt.path / "dir" / "target.txt").exists()


def test_names(mnt: Any, s3: Any, bucket: str) -> None:
    """Spaces, unicode and a 255-byte name work (also as directories and rename targets);
    256 bytes is ENAMETOOLONG."""
    names = ["with space.txt", "café ü 日本.txt", "x" * 255, "日" * 85, "é" * 127 + "x"]
    for n in names:
        assert len(n.encode()) <= 255
        (mnt.path / n).write_bytes(n.encode())
    os.mkdir(mnt.path / "dir ü 日")
    os.rename(mnt.path / "with space.txt", mnt.path / "dir ü 日" / ("y" * 255))
    for bad in ("z" * 256, "é" * 128, "日" * 85 + "z"):
        assert len(bad.encode()) == 256
        with pytest.raises(OSError) as ei:
            (mnt.path / bad).write_bytes(b"no")
        assert ei.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as ei:
            os.mkdir(mnt.path / bad)
        assert ei.value.errno == errno.ENAMETOOLONG
    mnt.remount()
    assert sorted(os.listdir(mnt.path)) == sorted([*names[1:], "dir ü 日"])
    for n in names[1:]:
        assert (mnt.path / n).read_bytes() == n.encode()
    assert (mnt.path / "dir ü 日" / ("y" * 255)).read_bytes() == b"with space.txt"
    assert "café ü 日本.txt" in all_keys(s3, bucket)


# --- visibility to other processes and mounts ------------------------------------------------


def test_close_to_open_visibility(mnt: Any, mount_factory: Any, bucket: str) -> None:
    """A second mount of the bucket sees a file once the first mount's writer has closed it
    (and its new content after a rewrite); another process on the same mount sees it too."""
    other = mount_factory(bucket)
    f1, f2 = mnt.path / "shared.txt", other.path / "shared.txt"
    data = pattern(2 * BS + 5, 21)
    with open(f1, "wb") as h:
        h.write(data)
    assert f2.read_bytes() == data
    r = subprocess.run([sys.executable, "-c",
                        "import sys,hashlib;"
                        "print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())",
                        str(f1)], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == sha(data)

    for data2 in (b"rewritten shorter by the second mount\n", pattern(3 * BS, 23)):
        with open(f2, "wb") as h:
            h.write(data2)
        with open(f1, "rb") as h:  # stat alone may answer from the attribute cache (TTL)
            assert os.fstat(h.fileno()).st_size == len(data2)
            assert h.read() == data2
        assert run("sha256sum", f1).stdout.split()[0] == sha(data2)

    big = pattern(PS + BS, 22)
    with open(other.path / "big.bin", "wb") as h:
        h.write(big)
    assert sha_file(mnt.path / "big.bin") == sha(big)
    os.unlink(mnt.path / "big.bin")


def test_a_directory_filled_for_longer_than_dir_ttl_is_listed_again_not_probed_per_name(
        mount_factory: Any, bucket: str, s3: Any, key: Key) -> None:
    """A program creating files one after another in one directory for longer than
    ``dir_ttl``: after a few names probed one by one (a HEAD and a LIST each), the new names
    are answered from the directory's listing, listed again each time it expires.  A file
    another client puts there meanwhile shows up once the listing is renewed, and no file
    the mount made goes missing."""
    m = mount_factory(bucket, "--dir-ttl", "1")
    out = m.path / "out"
    out.mkdir()
    before = mount_stats(m)["requests"]
    made = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 or len(made) < 100:  # five listings' lives at least
        made.append(f"f{len(made):05d}")
        (out / made[-1]).write_bytes(made[-1].encode())
        if len(made) == 10:
            s3.put_object(Bucket=bucket, Key="out/theirs", Body=b"t", **sse(key))
    elapsed = time.monotonic() - t0
    after = mount_stats(m)["requests"]
    heads = after.get("head", 0) - before.get("head", 0)
    lists = after.get("list", 0) - before.get("list", 0)
    assert len(made) >= 100 and heads <= 20, (heads, len(made))  # 16 probed one by one
    # One LIST per name probed, then one listing per dir_ttl (1 s) that expired: a listing
    # of the directory is as many LIST pages as it has thousands of entries, so the bound
    # counts listings, not requests, whatever number of files this machine made meanwhile.
    pages = len(made) // 1000 + 1
    assert lists <= heads + (elapsed + 2) * pages, (lists, elapsed, len(made))
    assert (out / "theirs").read_bytes() == b"t"
    assert sorted(os.listdir(out)) == sorted([*made, "theirs"])
    for name in made[::17]:
        assert (out / name).read_bytes() == name.encode()


# --- metadata as s3fs writes it --------------------------------------------------------------


def test_metadata_is_s3fs_compatible(mnt: Any, s3: Any, bucket: str, key: Key) -> None:
    """chmod, chown and utime reach x-amz-meta-mode (decimal, with S_IFREG), -uid, -gid and
    -mtime (seconds), for small files (re-PUT) and large ones (server-side copy)."""
    for name, size in (("small", 100), ("large", 2 * BS + 1)):
        f = mnt.path / name
        data = pattern(size, size)
        f.write_bytes(data)
        os.chmod(f, 0o640)
        os.chown(f, 1234, 2345)
        os.utime(f, (1_234_567_890, 1_234_567_890))
        meta = s3meta(s3, bucket, name, key)
        assert meta["mode"] == str(stat.S_IFREG | 0o640), meta
        assert meta["uid"] == "1234" and meta["gid"] == "2345", meta
        assert meta["mtime"].split(".")[0] == "1234567890", meta
        st = f.stat()
        assert (st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime)) == \
            (stat.S_IFREG | 0o640, 1234, 2345, 1_234_567_890)
        mnt.remount()
        st = f.stat()
        assert (st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime)) == \
            (stat.S_IFREG | 0o640, 1234, 2345, 1_234_567_890)
        assert f.read_bytes() == data
        assert_sealed(s3, bucket, name, key, data)
    os.mkdir(mnt.path / "d", 0o711)
    meta = s3meta(s3, bucket, "d/", key)
    assert meta["mode"] == str(stat.S_IFDIR | 0o711)
    os.utime(mnt.path / "small", (0, 0))  # the epoch is a time like any other
    assert s3meta(s3, bucket, "small", key)["mtime"] == "0"
    mnt.remount()
    assert os.stat(mnt.path / "small").st_mtime == 0


def test_fifo_and_hard_link(mnt: Any) -> None:
    """mkfifo makes a FIFO that is still one after a remount; hard links are EPERM."""
    os.mkfifo(mnt.path / "pipe")
    os.chmod(mnt.path / "pipe", 0o620)
    assert stat.S_ISFIFO(os.stat(mnt.path / "pipe").st_mode)
    (mnt.path / "file").write_bytes(b"x")
    with pytest.raises(OSError) as ei:
        os.link(mnt.path / "file", mnt.path / "hard")
    assert ei.value.errno == errno.EPERM
    assert not (mnt.path / "hard").exists()
    mnt.remount()
    st = os.stat(mnt.path / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620


def test_extended_attributes(mnt: Any, key: Key) -> None:
    """Each file has three read-only ``user.s3ssefs.*`` attributes (its key's id, version,
    ETag) beside the ``user.*`` ones set on it.  Security labels, ACLs and trusted attributes
    are not supported at all (ENOTSUP, as on a file system without them, not ENODATA): that is
    what makes ``ls -l`` ask for them once per mount instead of twice per file, and it shows no
    ``.`` or ``+`` after the mode."""
    f = mnt.path / "x.txt"
    f.write_bytes(b"x")
    assert sorted(os.listxattr(f)) == ["user.s3ssefs.etag", "user.s3ssefs.key",
                                       "user.s3ssefs.version"]
    assert os.getxattr(f, "user.s3ssefs.key") == key.id.encode()
    for name, err in (("user.other", errno.ENODATA), ("security.selinux", errno.ENOTSUP),
                      ("system.posix_acl_access", errno.ENOTSUP),
                      ("system.posix_acl_default", errno.ENOTSUP), ("trusted.x", errno.ENOTSUP)):
        with pytest.raises(OSError) as ei:
            os.getxattr(f, name)
        assert ei.value.errno == err, name
    for name, err in (("security.selinux", errno.ENOTSUP), ("trusted.x", errno.ENOTSUP),
                      ("user.s3ssefs.key", errno.EPERM), ('user.a"b', errno.EINVAL),
                      ("user.a,b", errno.EINVAL), ("user.a:b", errno.EINVAL)):
        with pytest.raises(OSError) as ei:
            os.setxattr(f, name, b"v")
        assert ei.value.errno == err, name
    with pytest.raises(OSError) as ei:
        os.removexattr(f, "user.other")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:  # the mount point is no object
        os.setxattr(mnt.path, "user.note", b"v")
    assert ei.value.errno == errno.EPERM
    listing = run("ls", "-l", mnt.path).stdout.splitlines()
    assert len(listing) == 2 and len(listing[1].split()[0]) == 10, listing


def test_user_extended_attributes_are_stored(mnt: Any, bucket: str, s3: Any, key: Key) -> None:
    """``user.*`` attributes are kept in the object (s3fs's ``x-amz-meta-xattr``): set,
    replaced, listed, removed, on files, directories and files still open for writing; they
    outlive chmod and a remount, and the file's content is unchanged."""
    f = mnt.path / "doc.txt"
    f.write_bytes(b"content")
    value = bytes(range(256))  # any bytes, NULs included
    os.setxattr(f, "user.tag", b"blue")
    os.setxattr(f, "user.DOSATTRIB", value)
    os.setxattr(f, "user.empty", b"")
    os.setxattr(f, "user.tag", b"green")  # replaced
    os.chmod(f, 0o600)
    d = mnt.path / "dir"
    d.mkdir()
    os.setxattr(d, "user.xdg.comment", "Ünïcode".encode())
    with open(mnt.path / "open.bin", "wb") as w:
        w.write(b"w" * 1000)
        os.setxattr(w.fileno(), "user.while-open", b"1")
        w.write(b"w" * 1000)
    head = s3.head_object(Bucket=bucket, Key="doc.txt", SSECustomerAlgorithm="AES256",
                          SSECustomerKey=key.raw)
    assert "xattr" in head["Metadata"] and head["ContentLength"] == len(b"content")

    mnt.remount()
    assert sorted(n for n in os.listxattr(f) if not n.startswith("user.s3ssefs.")) == [
        "user.DOSATTRIB", "user.empty", "user.tag"]
    assert os.getxattr(f, "user.tag") == b"green"
    assert os.getxattr(f, "user.DOSATTRIB") == value
    assert os.getxattr(f, "user.empty") == b""
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600 and f.read_bytes() == b"content"
    assert os.getxattr(d, "user.xdg.comment") == "Ünïcode".encode()
    assert os.getxattr(mnt.path / "open.bin", "user.while-open") == b"1"
    assert (mnt.path / "open.bin").read_bytes() == b"w" * 2000

    os.removexattr(f, "user.tag")
    os.removexattr(f, "user.DOSATTRIB")
    os.removexattr(f, "user.empty")
    mnt.remount()
    assert sorted(os.listxattr(f)) == ["user.s3ssefs.etag", "user.s3ssefs.key",
                                       "user.s3ssefs.version"]
    meta = s3.head_object(Bucket=bucket, Key="doc.txt", SSECustomerAlgorithm="AES256",
                          SSECustomerKey=key.raw)["Metadata"]
    assert "xattr" not in meta


def test_extended_attributes_bounded_by_s3_metadata(mnt: Any) -> None:
    """S3 keeps at most 2 KiB of user metadata per object (AWS): a value that can never fit is
    E2BIG, one that does not fit beside the attributes already there is ENOSPC, and what was
    stored before stays."""
    f = mnt.path / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.a", b"a" * 1000)
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user.big", b"b" * 2048)
    assert ei.value.errno == errno.E2BIG
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user.b", b"b" * 1000)
    assert ei.value.errno == errno.ENOSPC
    assert os.getxattr(f, "user.a") == b"a" * 1000
    os.removexattr(f, "user.a")
    os.setxattr(f, "user.b", b"b" * 1000)  # room again
    assert os.getxattr(f, "user.b") == b"b" * 1000


def test_setxattr_on_a_large_file_sends_no_data(mnt: Any, bucket: str, s3: Any,
                                                key: Key) -> None:
    """Setting an attribute rewrites metadata only: a large object is copied server-side."""
    f = mnt.path / "large.bin"
    data = os.urandom(8 << 20)
    f.write_bytes(data)
    before = mount_stats(mnt).get("bytes_up", 0)
    os.setxattr(f, "user.tag", b"v")
    assert mount_stats(mnt).get("bytes_up", 0) - before < 64 << 10
    got = s3.get_object(Bucket=bucket, Key="large.bin", SSECustomerAlgorithm="AES256",
                        SSECustomerKey=key.raw)
    assert got["Body"].read() == data and "xattr" in got["Metadata"]


# --- no plaintext on local disk --------------------------------------------------------------


def test_no_plaintext_in_cache_or_spill(mnt: Any) -> None:
    """A distinctive plaintext marker never appears in the cache dir: not in the spill while
    a large file is being written (checked before close), not in cached blocks after reading
    it back, not after unmount.  (The log_check fixture and mount teardown check that no key
    material reached the logs, the daemon's DEBUG log included.)"""
    marker = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    chunk = (marker + b"\n") * (MiB // (len(marker) + 1))
    f = mnt.path / "secret.txt"
    with open(f, "wb") as h:
        for _ in range(24):  # 24 MiB: more than the in-memory budget, and multipart
            h.write(chunk)
        h.flush()
        assert list((mnt.cache_dir).rglob("spill-*")), "expected a spill file"
        assert scan_for(mnt.cache_dir, marker) == []
        assert scan_for(mnt.cache_dir, marker[:16]) == []
    mnt.remount()
    with open(f, "rb") as h:
        while h.read(4 * MiB):
            pass
    with open(f, "rb") as h:  # again: from the block cache
        assert h.read(len(marker)) == marker
    assert scan_for(mnt.cache_dir, marker) == []
    mnt.umount()
    assert any(p.is_file() for p in mnt.cache_dir.rglob("*"))
    assert scan_for(mnt.cache_dir, marker) == []
    assert scan_for(mnt.cache_dir, marker[:16]) == []
    mnt.mount()
    f.unlink()



def test_chmod_while_a_large_file_is_written(mnt: Any, s3: Any, bucket: str, key: Key) -> None:
    """A mode change made while a multipart upload is streaming is not lost, and the stored
    mtime is about when the file was closed (not when its upload began)."""
    f = mnt.path / "growing.bin"
    data = pattern(2 * PS + BS, 31)
    with open(f, "wb") as h:
        h.write(data[:PS + BS])  # the first part is on its way
        os.fchmod(h.fileno(), 0o600)
        h.write(data[PS + BS:])
    closed = time.time()
    meta = s3meta(s3, bucket, "growing.bin", key)
    assert meta["mode"] == str(stat.S_IFREG | 0o600), meta
    mnt.remount()
    st = os.stat(mnt.path / "growing.bin")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert abs(st.st_mtime - closed) < 30
    assert sha_file(mnt.path / "growing.bin") == sha(data)


def test_a_file_copied_in_goes_to_s3_from_memory_and_reads_back_while_written(
        mnt: Any, s3: Any, bucket: str, key: Key) -> None:
    """A file written in order (cp, dd, a download) goes to S3 part by part straight from
    memory: of its blocks, only the first part's are sealed into the spill.  A file read
    back while it is being written, where only S3 has it and the kernel's pages are gone,
    returns what was written (the upload so far is completed to read it), and both arrive
    whole."""
    from s3ssefs.daemon import control

    first = pattern(4 * PS, seed=41)
    before = mount_stats(mnt)
    with open(mnt.path / "copied.bin", "wb") as h:
        for off in range(0, len(first), MiB):
            h.write(first[off:off + MiB])
    after = mount_stats(mnt)
    spilled = after.get("spill_blocks", 0) - before.get("spill_blocks", 0)
    assert spilled <= PS // BS, f"{spilled} blocks of a file written in order spilled"
    assert sha(s3.get_object(Bucket=bucket, Key="copied.bin", **sse(key))["Body"].read()) \
        == sha(first)

    second = pattern(4 * PS + 5, seed=42)
    fd = os.open(mnt.path / "reread.bin", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for off in range(0, 3 * PS + 4 * BS, MiB):
            os.pwrite(fd, second[off:off + MiB], off)
        # a part still on its way is read from its buffer: wait until S3 has the first
        # three (asking in-process: a child process would close the file, and so flush it)
        deadline = time.monotonic() + 60
        while (control(mnt.path, "stats")["requests"].get("upload_part", 0)
               - after["requests"].get("upload_part", 0) < 3 and time.monotonic() < deadline):
            time.sleep(0.05)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # the second part (only S3 has it), the first (spilled), the third, and the last
        # blocks written (in memory)
        for off in (PS + 4 * BS + 17, 10, 2 * PS + BS + 3, 3 * PS + 2 * BS):
            assert os.pread(fd, 8192, off) == second[off:off + 8192], off
        stats = control(mnt.path, "stats")
        assert stats.get("uploads_completed_early", 0) == 1, stats
        assert stats["requests"]["complete_multipart"] \
            == after["requests"]["complete_multipart"] + 1
        for off in range(3 * PS + 4 * BS, len(second), MiB):
            os.pwrite(fd, second[off:off + MiB], off)
    finally:
        os.close(fd)
    assert sha(s3.get_object(Bucket=bucket, Key="reread.bin", **sse(key))["Body"].read()) \
        == sha(second)


# --- random reads ----------------------------------------------------------------------------


def test_random_reads_fetch_little_and_repeat_locally(mnt: Any, s3: Any, bucket: str,
                                                      key: Key) -> None:
    """Random 4 KiB reads (as fio or a database does, with POSIX_FADV_RANDOM) of an 8 MiB
    object return the right bytes, each costing a small ranged GET rather than a whole block,
    and reading the same places again costs no request at all."""
    body = pattern(8 * MiB, seed=5)
    s3.put_object(Bucket=bucket, Key="rand.bin", Body=body, **sse(key))
    rng = random.Random(3)
    offsets = [rng.randrange(0, len(body) // 4096) * 4096 for _ in range(40)]
    path = mnt.path / "rand.bin"
    before = mount_stats(mnt)
    for _round in range(2):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for off in offsets:
                assert os.pread(fd, 4096, off) == body[off:off + 4096], off
        finally:
            os.close(fd)
        if _round == 0:
            first = mount_stats(mnt)
    after = mount_stats(mnt)
    gets = first["requests"].get("get", 0) - before["requests"].get("get", 0)
    down = first.get("bytes_down", 0) - before.get("bytes_down", 0)
    assert 0 < gets <= len(offsets)
    assert down <= len(offsets) * 64 * 1024, f"{down} bytes fetched for {len(offsets)} 4K reads"
    assert after["requests"].get("get", 0) == first["requests"].get("get", 0)


def _regions_settled(m: Any) -> dict[str, Any]:
    """A mount's stats once no ``random_readahead`` region fetch is pending, its hand-off to
    the kernel included (a deadline, not a sleep)."""
    deadline = time.monotonic() + 60
    while True:
        stats = mount_stats(m)
        if stats.get("random_ahead_pending", 0) == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def _resident_pages(fd: int, offset: int, length: int) -> int:
    """How many pages of ``[offset, offset + length)`` of the open file ``fd`` are in the
    kernel's page cache (mincore of a mapping that is never touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        vec = (ctypes.c_ubyte * (-(-length // mmap.PAGESIZE)))()
        if libc.mincore(addr, length, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(v & 1 for v in vec)
    finally:
        libc.munmap(addr, length)


def test_random_readahead_fetches_the_region_around_a_random_read(
        mount_factory: Any, s3: Any, bucket: str, key: Key) -> None:
    """With ``-o random_readahead=8M`` a random 4 KiB read that misses returns the right
    bytes and fetches the 8 MiB region around it in the background (and only that region):
    random reads there afterwards cost no request.  A read in another region fetches that
    region too.  (That the read does not wait for the region: test_t2_store.)"""
    body = pattern(32 * MiB, seed=12)
    s3.put_object(Bucket=bucket, Key="dense.bin", Body=body, **sse(key))
    m = mount_factory(bucket, "-o", "random_readahead=8M")
    rng = random.Random(8)
    settled = partial(_regions_settled, m)
    fd = os.open(m.path / "dense.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        before = mount_stats(m)
        off = 9 * MiB + 4096  # in region 1 (8-16 MiB)
        assert os.pread(fd, 4096, off) == body[off:off + 4096]
        first = settled()
        assert first.get("random_ahead_pending", 0) == 0, "region fetch still pending after 60 s"
        down = first["bytes_down"] - before.get("bytes_down", 0)
        assert 8 * MiB <= down <= 8 * MiB + 128 * 1024, down  # the region and one fragment
        for _ in range(40):
            off = rng.randrange(8 * MiB, 16 * MiB - 4096)
            assert os.pread(fd, 4096, off) == body[off:off + 4096], off
        again = mount_stats(m)
        assert again["requests"]["get"] == first["requests"]["get"]
        off = 30 * MiB + 123  # region 3
        assert os.pread(fd, 4096, off) == body[off:off + 4096]
        last = settled()
        assert 8 * MiB <= last["bytes_down"] - again["bytes_down"] <= 8 * MiB + 128 * 1024
    finally:
        os.close(fd)


def test_random_readahead_hands_the_region_to_the_page_cache(
        mount_factory: Any, s3: Any, bucket: str, key: Key) -> None:
    """The region fetched around a random read goes into the kernel's page cache, so the
    reads that follow there are answered by the kernel without reaching the daemon (the
    pages are resident before anyone reads them); nothing else is put there.  Pages the
    kernel lets go are read back correctly, from the daemon's memory, with no new GET."""
    region = 8 * MiB
    body = pattern(4 * region, seed=13)
    s3.put_object(Bucket=bucket, Key="shuffle.bin", Body=body, **sse(key))
    m = mount_factory(bucket, "-o", "random_readahead=8M")
    fd = os.open(m.path / "shuffle.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert _resident_pages(fd, 0, len(body)) == 0
        off = region + 3 * MiB + 4096  # in region 1
        assert os.pread(fd, 4096, off) == body[off:off + 4096]
        stats = _regions_settled(m)
        assert stats.get("random_ahead_pending", 0) == 0, "region fetch still pending after 60 s"
        assert stats.get("random_ahead_to_kernel") == region // MiB, stats
        # all of it, less the odd page a busy kernel lets go (without the hand-off, only the
        # page read would be there)
        assert _resident_pages(fd, region, region) >= 0.95 * region // mmap.PAGESIZE
        assert _resident_pages(fd, 2 * region, 2 * region) == 0  # regions 2, 3: never read
        rng = random.Random(5)
        for _ in range(40):
            off = rng.randrange(region, 2 * region - 4096)
            assert os.pread(fd, 4096, off) == body[off:off + 4096], off
        # the kernel lets the pages go: reads come to the daemon again, which still has them
        os.posix_fadvise(fd, region, region, os.POSIX_FADV_DONTNEED)
        assert _resident_pages(fd, region, region) == 0
        for _ in range(40):
            off = rng.randrange(region, 2 * region - 4096)
            assert os.pread(fd, 4096, off) == body[off:off + 4096], off
        assert mount_stats(m)["requests"]["get"] == stats["requests"]["get"]
    finally:
        os.close(fd)


def test_a_file_open_for_writing_gets_no_region_in_the_page_cache(
        mount_factory: Any, s3: Any, bucket: str, key: Key) -> None:
    """While a file is open for writing, a region fetched around a random read is not put
    into the kernel's page cache (older content there could outlive a write): it goes to the
    disk cache, and what is written is read back next to it and uploaded.  (A writer that
    opens while the region is on its way: test_t2_store.)"""
    region = 8 * MiB
    body = pattern(2 * region, seed=14)
    s3.put_object(Bucket=bucket, Key="live.bin", Body=body, **sse(key))
    m = mount_factory(bucket, "-o", "random_readahead=8M")
    new = pattern(4096, seed=15)
    at = region + 5 * MiB
    wfd = os.open(m.path / "live.bin", os.O_RDWR)
    fd = os.open(m.path / "live.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        off = region + MiB + 100
        assert os.pread(fd, 4096, off) == body[off:off + 4096]
        stats = _regions_settled(m)
        assert stats.get("random_ahead_pending", 0) == 0, "region fetch still pending after 60 s"
        assert stats.get("random_ahead_blocks") == region // MiB
        assert stats.get("random_ahead_to_kernel", 0) == 0
        assert _resident_pages(fd, region + 2 * MiB, 6 * MiB) == 0
        assert stats["cache_bytes"] >= region
        assert os.pwrite(wfd, new, at) == len(new)
        rng = random.Random(6)
        for _ in range(20):
            off = rng.randrange(region, 2 * region - 4096)
            want = (body[:at] + new + body[at + len(new):])[off:off + 4096]
            assert os.pread(fd, 4096, off) == want, off
        assert os.pread(fd, 4096, at) == new
    finally:
        os.close(fd)
        os.close(wfd)
    got = s3.get_object(Bucket=bucket, Key="live.bin", **sse(key))["Body"].read()
    assert got == body[:at] + new + body[at + len(new):]


def _cached_pages(path: Path) -> int:
    """Pages of ``path`` in the kernel's page cache, by cachestat(2) (Linux 6.5): unlike
    mincore it needs no mapping, which a direct_io file refuses to share."""
    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback",
                                                    "nr_evicted", "nr_recently_evicted")]

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        rng, st = Range(0, 0), Stat()  # len 0: to the end of the file
        if libc.syscall(451, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:  # cachestat
            raise OSError(ctypes.get_errno(), "cachestat failed")
        return int(st.nr_cache)
    finally:
        os.close(fd)


def test_direct_io_keeps_file_data_out_of_the_page_cache(mount_factory: Any, s3: Any,
                                                         bucket: str, key: Key) -> None:
    """With ``-o direct_io`` what a program reads or writes bypasses the kernel's page cache
    (on the default mount the same read leaves the file there): reads return the object's
    bytes, a write and an append reach S3, a private mapping reads the file, and a shared one
    is refused with ENODEV, as the kernel does for any direct_io file."""
    body = pattern(24 * MiB + 123, seed=16)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=body, **sse(key))
    plain = mount_factory(bucket)
    assert (plain.path / "big.bin").read_bytes() == body
    assert _cached_pages(plain.path / "big.bin") > 0  # the check sees what a read leaves
    plain.umount()

    m = mount_factory(bucket, "-o", "direct_io")
    with open(m.path / "big.bin", "rb", buffering=0) as f:
        got = b"".join(iter(partial(f.read, MiB), b""))
    assert got == body
    assert _cached_pages(m.path / "big.bin") == 0

    new = pattern(3 * MiB + 7, seed=17)
    with open(m.path / "new.bin", "wb", buffering=0) as f:
        for i in range(0, len(new), MiB):
            f.write(new[i:i + MiB])
    with open(m.path / "new.bin", "ab", buffering=0) as f:
        f.write(b"tail")
    assert _cached_pages(m.path / "new.bin") == 0
    assert os.stat(m.path / "new.bin").st_size == len(new) + 4
    got = s3.get_object(Bucket=bucket, Key="new.bin", **sse(key))["Body"].read()
    assert got == new + b"tail"

    fd = os.open(m.path / "big.bin", os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mp:
            assert mp[20 * MiB:20 * MiB + 4096] == body[20 * MiB:20 * MiB + 4096]
        with pytest.raises(OSError) as e:
            mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert e.value.errno == errno.ENODEV
    finally:
        os.close(fd)


def test_kernel_readahead_is_raised_on_the_mount(mnt: Any) -> None:
    """The mount's kernel readahead is raised above the 128 KiB the FUSE handshake leaves (so
    the kernel sends fewer, larger reads): set after the handshake, which would otherwise cap
    it back.  How far it is raised is tuning, not pinned here."""
    dev = os.stat(mnt.path).st_dev
    ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
    assert int(ra) > 128


def test_a_file_read_once_is_not_written_to_the_block_cache(mount_factory: Any, s3: Any,
                                                            bucket: str, key: Key) -> None:
    """Reading a file start to end returns the right bytes and writes its readahead blocks to
    no disk: they are served from memory (counted as ``cache_streamed``) and cached only when
    S3 is asked for them a second time (test_t2_store covers that second pass)."""
    body = pattern(24 * MiB, seed=9)
    s3.put_object(Bucket=bucket, Key="once.bin", Body=body, **sse(key))
    m = mount_factory(bucket)
    assert hashlib.sha256((m.path / "once.bin").read_bytes()).digest() == \
        hashlib.sha256(body).digest()
    stats = mount_stats(m)
    assert stats.get("cache_streamed", 0) >= 16  # all but the first blocks come from readahead
    assert stats["cache_bytes"] < 4 * MiB


def test_a_file_read_again_unchanged_costs_no_request(mount_factory: Any, s3: Any, bucket: str,
                                                      key: Key) -> None:
    """An open that finds the object unchanged in S3 lets the kernel keep the pages it read
    before (close-to-open, as NFS does): reading the file again asks the daemon only for the
    odd page the kernel let go meanwhile (a busy machine loses a few single pages of a
    file read once; an open that dropped them all would leave none).  After another client
    rewrote it, even at the same size, the next open reads the new bytes."""
    body = pattern(8 * MiB, seed=31)
    meta = {"mtime": "1700000000"}  # the rewrite keeps it: no attribute tells them apart
    s3.put_object(Bucket=bucket, Key="again.bin", Body=body, Metadata=meta, **sse(key))
    m = mount_factory(bucket)
    f = m.path / "again.bin"
    assert f.read_bytes() == body
    before = mount_stats(m)
    pages = len(body) // mmap.PAGESIZE
    fd = os.open(f, os.O_RDONLY)
    try:
        kept = _resident_pages(fd, 0, len(body))  # after the open, before any read
        again = b"".join(iter(partial(os.read, fd, MiB), b""))
    finally:
        os.close(fd)
    after = mount_stats(m)
    assert again == body
    assert kept >= pages * 0.95
    lost = pages - kept  # each one read of at most a 64 KiB fragment, from S3 or a cache
    assert after["bytes_down"] - before["bytes_down"] <= lost * (64 << 10)
    assert after.get("cache_hits", 0) - before.get("cache_hits", 0) <= lost
    assert after["requests"]["head"] > before["requests"]["head"]  # the open looked at S3

    body2 = pattern(8 * MiB, seed=32)
    s3.put_object(Bucket=bucket, Key="again.bin", Body=body2, Metadata=meta, **sse(key))
    assert f.stat().st_mtime == 1700000000
    assert f.read_bytes() == body2


def test_chmod_and_xattr_keep_every_byte_with_a_small_block_size(
        mount_factory: Any, bucket: str, s3: Any, key: Key) -> None:
    """With ``-o block_size=64K``, a closed 100 KB file (two blocks, small enough that a
    metadata change sends its bytes again) keeps all of them through chmod and setxattr:
    the rewrite used to send only the first block, cutting the object to 64 KiB."""
    m = mount_factory(bucket, "-o", "block_size=64K")
    body = os.urandom(100_000)
    (m.path / "f.bin").write_bytes(body)
    os.chmod(m.path / "f.bin", 0o600)
    os.setxattr(m.path / "f.bin", "user.tag", b"v")
    got = s3.get_object(Bucket=bucket, Key="f.bin", SSECustomerAlgorithm="AES256",
                        SSECustomerKey=key.raw)["Body"].read()
    assert len(got) == len(body) and sha(got) == sha(body)
    m.remount()
    assert (m.path / "f.bin").read_bytes() == body
    assert stat.S_IMODE(os.stat(m.path / "f.bin").st_mode) == 0o600
    assert os.getxattr(m.path / "f.bin", "user.tag") == b"v"
