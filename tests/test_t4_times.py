"""Layer 4: the times and link counts POSIX programs check, on a real mount.

``make``, ``rsync``, ``find -newer`` and backup tools look at a directory's mtime and ctime
(changed by every entry created, removed or renamed in it), a renamed file's ctime, an atime
set on purpose, a directory's link count (``find``'s leaf optimisation) and the link count of
an open file whose name is gone.  What is kept where is in the README's Semantics section.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from conftest import sse

from s3ssefs.keys import Key

PAST = 1_000_000_000  # a time before anything this test does


def set_past(p: Path) -> None:
    os.utime(p, (PAST, PAST))
    assert os.stat(p).st_mtime == PAST


def test_a_directory_s_times_change_with_its_entries(mount_factory: Any, bucket: str) -> None:
    # attributes revalidated from S3 at every stat: what the mount keeps in memory must win
    m = mount_factory(bucket, "--attr-ttl", "0")
    d, e = m.path / "d", m.path / "e"
    d.mkdir()
    e.mkdir()

    def changes(op: Any, *dirs: Path) -> None:
        before = {p: os.stat(p) for p in dirs}
        for p in dirs:
            set_past(p)
        ctimes = {p: os.stat(p).st_ctime_ns for p in dirs}
        op()
        for p in dirs:
            st = os.stat(p)
            assert st.st_mtime > PAST, (op, p)
            assert st.st_ctime_ns > ctimes[p] and st.st_ctime_ns >= before[p].st_ctime_ns, (op, p)

    changes(lambda: (d / "f").write_bytes(b"x"), d)  # create
    changes(lambda: os.mkdir(d / "sub"), d)
    changes(lambda: os.symlink("f", d / "ln"), d)
    changes(lambda: os.rename(d / "f", d / "g"), d)  # rename within
    changes(lambda: os.rename(d / "g", e / "g"), d, e)  # rename across
    changes(lambda: os.unlink(e / "g"), e)  # remove
    changes(lambda: os.rmdir(d / "sub"), d)
    # the root too (its times are the mount's own, never set: see what changes)
    before = os.stat(m.path)
    (m.path / "top").write_bytes(b"y")
    after = os.stat(m.path)
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
    # an explicit time set afterwards is what stat shows (and S3 keeps)
    os.utime(d, (PAST, PAST))
    assert os.stat(d).st_mtime == PAST
    m.remount()
    assert os.stat(d).st_mtime == PAST


def test_rename_changes_the_ctime_of_what_is_renamed(mnt: Any) -> None:
    f = mnt.path / "f"
    f.write_bytes(b"data")
    (mnt.path / "dir").mkdir()
    for old, new in ((f, mnt.path / "g"), (mnt.path / "dir", mnt.path / "dir2")):
        before = os.stat(old).st_ctime_ns
        mtime = os.stat(old).st_mtime_ns
        os.rename(old, new)
        st = os.stat(new)
        assert st.st_ctime_ns > before, new
        assert st.st_mtime_ns == mtime, new  # the content did not change
    after = os.stat(mnt.path / "g").st_ctime_ns
    mnt.remount()  # a file's ctime went to S3 with the copy
    assert os.stat(mnt.path / "g").st_ctime_ns == after


def test_an_atime_set_on_purpose_is_kept_and_reads_leave_it(mnt: Any, s3: Any, bucket: str,
                                                            key: Key) -> None:
    assert os.statvfs(mnt.path).f_flag & os.ST_NOATIME  # said in /proc/mounts too
    f = mnt.path / "f"
    f.write_bytes(b"data")
    st = os.stat(f)
    assert st.st_atime_ns == st.st_mtime_ns  # none stored: the mtime stands in
    os.utime(f, ns=(1_234_567_890_123_456_789, 1_300_000_000_000_000_000))
    assert f.read_bytes() == b"data"  # a read does not touch it
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_234_567_890_123_456_789,
                                                1_300_000_000_000_000_000)
    meta = s3.head_object(Bucket=bucket, Key="f", **sse(key))["Metadata"]
    assert meta["atime"] == "1234567890.123456789", meta  # as s3fs-fuse spells it
    # touch -a sets the atime alone
    subprocess.run(["touch", "-a", "-d", "@1400000000", str(f)], check=True)
    mnt.remount()
    assert f.read_bytes() == b"data"
    st = os.stat(f)
    assert (st.st_atime, st.st_mtime) == (1_400_000_000, 1_300_000_000)


def test_directories_have_one_link_and_find_walks_them_all(mnt: Any, tmp_path: Path) -> None:
    want = []
    for d in ("a", "a/b", "a/b/c", "a/d", "a/d/e"):
        (mnt.path / d).mkdir()
        (mnt.path / d / "f").write_bytes(b"x")
        want += [d, f"{d}/f"]
    assert os.stat(mnt.path / "a").st_nlink == 1
    assert os.stat(mnt.path / "a" / "b" / "c").st_nlink == 1
    assert os.stat(mnt.path / "a" / "f").st_nlink == 1

    def found() -> list[str]:
        r = subprocess.run(["find", "a"], cwd=mnt.path, capture_output=True, text=True,
                           check=True)
        return sorted(r.stdout.split())

    assert found() == sorted(want)
    mnt.remount()  # nothing known yet: find still descends everywhere
    assert found() == sorted(want)


def test_an_open_file_whose_name_is_gone_has_no_links(mnt: Any) -> None:
    f, g = mnt.path / "f", mnt.path / "g"
    f.write_bytes(b"f data")
    g.write_bytes(b"g data")
    with open(f, "rb") as fh, open(g, "rb") as gh:
        assert os.fstat(fh.fileno()).st_nlink == 1
        os.unlink(f)
        assert os.fstat(fh.fileno()).st_nlink == 0
        assert fh.read() == b"f data"
        (mnt.path / "h").write_bytes(b"h data")
        os.rename(mnt.path / "h", g)  # g's old inode loses its name
        assert os.fstat(gh.fileno()).st_nlink == 0
        assert gh.read() == b"g data"
    assert os.stat(g).st_nlink == 1
