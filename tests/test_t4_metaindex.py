"""Layer 4: the metadata index (s3ssefs.metaindex) on a real mount and RGW.

Right after a remount, ``ls -l`` of an unchanged directory needs no HEAD per file: what the
HEADs of an earlier mount said comes from the encrypted index in the cache directory.  These
tests check what a user sees: the right modes, owners and times with no HEAD, and every change
another client made between mounts (new content, metadata alone, a deleted object) shown; a
damaged index or one made with another key file is thrown away, never believed.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Rgw, assert_no_key_material, mount_stats, new_key, sse, wait_for

from s3ssefs.keys import Key, KeyFile
from s3ssefs.metaindex import SETTLE

N = 40  # files per directory: enough for several HEAD batches, small for a shared machine
# attributes kept long enough that the directory itself is not looked up again in a test
LONG = ("--attr-ttl", "600")


def ls_l(path: Path) -> dict[str, tuple[int, int, int, int, int]]:
    """What ``ls -l`` reads: the entries, then an lstat of each."""
    out = {}
    for e in os.scandir(path):
        st = e.stat(follow_symlinks=False)
        out[e.name] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, int(st.st_mtime))
    return out


def heads(m: Any) -> int:
    """HEADs the mount sent so far.  The files are at the top of the bucket: a directory
    would cost its own lookup whenever the kernel forgets it (the index is about files)."""
    return int(mount_stats(m)["requests"].get("head", 0))


def index_files(m: Any) -> list[Path]:
    return sorted((m.cache_dir / "meta").glob("*.idx"))


def fill(m: Any, s3: Any, bucket: str, key: Key) -> dict[str, tuple[int, int, int, int, int]]:
    """N files, half written through the mount, half by another client with s3fs metadata,
    each with its own mode, owner and mtime; what ``ls -l`` must show of them."""
    want = {}
    d = m.path
    for i in range(N):
        name, mode, uid, gid, mtime = f"f{i:03d}", 0o600 + i % 8, 1000 + i, 2000 + i, 10**9 + i
        body = name.encode() * (i + 1)
        if i % 2:
            s3.put_object(Bucket=bucket, Key=name, Body=body, **sse(key), Metadata={
                "mode": str(stat.S_IFREG | mode), "uid": str(uid), "gid": str(gid),
                "mtime": str(mtime)})
        else:
            (d / name).write_bytes(body)
            os.chmod(d / name, mode)
            os.chown(d / name, uid, gid)
            os.utime(d / name, (mtime, mtime))
        want[name] = (stat.S_IFREG | mode, uid, gid, len(body), mtime)
    return want


def listed(s3: Any, bucket: str, name: str) -> tuple[str, int, Any]:
    """ETag, size and LastModified of ``name`` as a listing shows them."""
    o = next(o for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"] == name)
    return o["ETag"], o["Size"], o["LastModified"]


def settle(s3: Any, bucket: str) -> None:
    """Wait until the newest object's LastModified second has long passed: on a server that
    lists whole seconds, what the mount learns of an object written in the same second is
    not kept (a change in that second would not show), so it is HEADed again next time."""
    newest = max(o["LastModified"].timestamp()
                 for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert wait_for(lambda: time.time() >= int(newest) + 1 + SETTLE, timeout=30, step=0.2)


@pytest.mark.servers("rgw", "localstack")
def test_ls_l_after_a_remount_sends_no_head(mount_factory: Any, s3: Any, bucket: str,
                                            key: Key, tmp_path: Path) -> None:
    m = mount_factory(bucket, *LONG)
    want = fill(m, s3, bucket, key)
    # the files settled and a new mount: what was learnt as they were written is not kept
    # where the listing counts whole seconds, and the kernel may or may not still hold them
    settle(s3, bucket)
    m.remount()
    assert ls_l(m.path) == want  # HEADed once, here
    m.remount()
    before = heads(m)
    assert ls_l(m.path) == want
    assert heads(m) == before, "ls -l after a remount sent HEADs"
    # find, du, rsync and a plain stat of each name look at the same attributes
    assert {p.name: p.lstat().st_mode for p in m.path.rglob("*")} == \
        {n: w[0] for n, w in want.items()}
    for cmd in (["find", ".", "-newer", "f000", "-printf", "%m %u %s %T@\n"], ["du", "-s", "."],
                ["rsync", "-an", "--itemize-changes", "./", str(tmp_path / "copy")]):
        subprocess.run(cmd, cwd=m.path, check=True, capture_output=True)
    assert heads(m) == before
    # reading still checks S3 (close-to-open) and gets the content
    assert (m.path / "f001").read_bytes() == b"f001" * 2
    blob = b"".join(p.read_bytes() for p in index_files(m))
    assert blob and b"f001" not in blob and b"1000000001" not in blob  # sealed, names hashed


def test_changes_by_another_client_between_mounts_are_shown(mount_factory: Any, s3: Any,
                                                           bucket: str, key: Key) -> None:
    m = mount_factory(bucket, *LONG)
    want = fill(m, s3, bucket, key)
    s3.put_object(Bucket=bucket, Key="plain", Body=b"plain", Metadata={"mode": "33188"})
    want["plain"] = (stat.S_IFREG | 0o644, 0, 0, 5, 0)
    settle(s3, bucket)  # so that all of it is kept, however soon after the writes ls runs
    got = ls_l(m.path)
    want["plain"] = (*want["plain"][:4], got["plain"][4])
    assert got == want
    m.umount()

    def listed_(name: str) -> tuple[str, int, Any]:
        return listed(s3, bucket, name)

    # new content (new ETag)
    s3.put_object(Bucket=bucket, Key="f000", Body=b"new", **sse(key),
                  Metadata={"mode": str(stat.S_IFREG | 0o444), "uid": "7", "gid": "8",
                            "mtime": "1500000000"})
    want["f000"] = (stat.S_IFREG | 0o444, 7, 8, 3, 1_500_000_000)
    # the same bytes again with other metadata: RGW keeps the ETag, LastModified moves
    old = listed_("f002")
    s3.put_object(Bucket=bucket, Key="f002", Body=b"f002" * 3, **sse(key),
                  Metadata={"mode": str(stat.S_IFREG | 0o400), "uid": "9", "gid": "9",
                            "mtime": "1600000000"})
    new = listed_("f002")
    assert new[:2] == old[:2] and new[2] != old[2], (old, new)
    want["f002"] = (stat.S_IFREG | 0o400, 9, 9, 12, 1_600_000_000)
    # metadata alone, by CopyObject with MetadataDirective=REPLACE (RGW refuses it for an
    # SSE-C source with 501, so on an unencrypted object): same ETag, new LastModified
    old = listed_("plain")
    s3.copy_object(Bucket=bucket, Key="plain", CopySource={"Bucket": bucket, "Key": "plain"},
                   Metadata={"mode": str(stat.S_IFREG | 0o604), "uid": "5", "gid": "6",
                             "mtime": "1700000000"}, MetadataDirective="REPLACE")
    new = listed_("plain")
    assert new[:2] == old[:2] and new[2] != old[2], (old, new)
    want["plain"] = (stat.S_IFREG | 0o604, 5, 6, 5, 1_700_000_000)
    # deleted
    s3.delete_object(Bucket=bucket, Key="f003")
    del want["f003"]

    m.mount()
    before = heads(m)
    assert ls_l(m.path) == want
    asked = heads(m) - before
    assert 3 <= asked < N // 2, f"{asked} HEADs for 3 changed objects among {N}"
    assert (m.path / "f000").read_bytes() == b"new"
    assert not (m.path / "f003").exists()


@pytest.mark.servers("rgw", "localstack")
def test_a_metadata_change_in_the_second_of_the_write_before_is_shown(
        mount_factory: Any, s3: Any, bucket: str, rgw: Rgw) -> None:
    """Another client changes an object's metadata alone (CopyObject onto itself with
    ``MetadataDirective=REPLACE``; unencrypted, as RGW refuses it for an SSE-C source) right
    after the mount HEADed it: ETag and size stay, and where the listing counts whole
    seconds (LocalStack, as AWS) so may LastModified.  After a remount the new mode shows."""
    m = mount_factory(bucket, *LONG)
    names, same = [], False
    while not same and len(names) < 20:
        name = f"f{len(names)}"
        names.append(name)
        s3.put_object(Bucket=bucket, Key=name, Body=b"same",
                      Metadata={"mode": str(stat.S_IFREG | 0o600)})
        before = listed(s3, bucket, name)
        assert ls_l(m.path)[name][0] == stat.S_IFREG | 0o600  # HEADed by the mount
        s3.copy_object(Bucket=bucket, Key=name, CopySource={"Bucket": bucket, "Key": name},
                       Metadata={"mode": str(stat.S_IFREG | 0o644)},
                       MetadataDirective="REPLACE")
        same = listed(s3, bucket, name) == before
    # RGW lists milliseconds, and every change shows.  LocalStack lists whole seconds: a
    # change in the second of the write before is unseen by a listing, which happens on the
    # first tries here (how often depends on how fast this machine is: not asserted)
    if rgw.name != "localstack":
        assert not same, names
    m.remount()
    got = ls_l(m.path)
    assert {n: got[n][0] for n in names} == {n: stat.S_IFREG | 0o644 for n in names}


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_index_is_discarded(mount_factory: Any, s3: Any, bucket: str, key: Key,
                                      damage: str) -> None:
    m = mount_factory(bucket, *LONG)
    want = fill(m, s3, bucket, key)
    settle(s3, bucket)  # so that all of it is kept, however soon after the writes ls runs
    assert ls_l(m.path) == want
    m.umount()
    (f,) = index_files(m)
    data = bytearray(f.read_bytes())
    if damage == "truncate":  # as a crash in the middle of writing it could leave it
        f.write_bytes(data[:len(data) // 2 + 100])
    else:  # every page past the first one scribbled on
        for i in range(4096, len(data), 97):
            data[i] ^= 0x5A
        f.write_bytes(data)
    m.mount()
    before = heads(m)
    assert ls_l(m.path) == want
    if damage == "truncate":
        assert heads(m) - before >= N, "a truncated index was used"
        assert re.search(r"metadata index .* discarded", m.log_file.read_text())
    m.remount()  # the new index is whole again
    before = heads(m)
    assert ls_l(m.path) == want
    assert heads(m) == before


def test_an_index_made_with_another_key_file_is_not_used(mount_factory: Any, s3: Any,
                                                         bucket: str, key: Key,
                                                         tmp_path: Path) -> None:
    m = mount_factory(bucket, *LONG)
    want = fill(m, s3, bucket, key)
    assert ls_l(m.path) == want
    m.umount()
    # another key file whose current key has the same id but other bytes; the old key is
    # still in it under another id, so every object stays readable (by trial)
    other = KeyFile.generate("k1")
    other.keys.clear()
    other.keys["k1"] = new_key("k1")
    other.keys["old"] = Key("old", key.raw)
    other.current = "k1"
    path = tmp_path / "other.toml"
    other.save(path)
    m2 = mount_factory(bucket, *LONG, keys=path, mount=False)
    m2.cache_dir = m.cache_dir  # the first mount's cache directory, index included
    m2.mount()
    before = heads(m2)
    assert ls_l(m2.path) == want
    assert heads(m2) - before >= N, "an index sealed with another key file was used"
    assert re.search(r"metadata index .* discarded \(sealed with another key",
                     m2.log_file.read_text())
    m2.umount()
    for f in (m.cache_dir / "meta").iterdir():
        assert_no_key_material(f.read_bytes(), str(f))


def test_what_the_mount_knows_is_not_kept_for_an_object_changed_since(
        mount_factory: Any, s3: Any, bucket: str, key: Key) -> None:
    """A file this mount HEADed, then changed by another client in its metadata alone (same
    ETag on RGW) while the mount still trusts its attributes: the next listing shows another
    LastModified, so what the mount knows is not kept for that listing."""
    m = mount_factory(bucket, *LONG)

    def put(mode: int) -> int:
        s3.put_object(Bucket=bucket, Key="f", Body=b"same", **sse(key),
                      Metadata={"mode": str(stat.S_IFREG | mode)})
        return int(s3.head_object(Bucket=bucket, Key="f", **sse(key))["LastModified"]
                   .timestamp())

    first = put(0o600)
    assert (m.path / "f").stat().st_mode == stat.S_IFREG | 0o600  # one HEAD, no listing
    while put(0o644) == first:  # LastModified counts seconds in a HEAD
        pass
    assert ls_l(m.path)["f"][0] == stat.S_IFREG | 0o600  # attr_ttl: not asked again yet
    m.remount()
    assert ls_l(m.path)["f"][0] == stat.S_IFREG | 0o644


def test_symlinks_after_a_remount_need_no_request(mount_factory: Any, s3: Any, bucket: str,
                                                  key: Key) -> None:
    """``ls -l`` reads every symlink's target: it is kept with the link's metadata."""
    m = mount_factory(bucket, *LONG)
    want = {}
    for i in range(10):
        os.symlink(f"target-{i}" * (i + 1), m.path / f"l{i}")
        want[f"l{i}"] = f"target-{i}" * (i + 1)
    # one made by another client, as s3fs stores a symlink
    s3.put_object(Bucket=bucket, Key="other", Body=b"../elsewhere", **sse(key),
                  Metadata={"mode": str(stat.S_IFLNK | 0o777)})
    want["other"] = "../elsewhere"
    settle(s3, bucket)  # so that all of it is kept, however soon after the writes ls runs
    subprocess.run(["ls", "-l", str(m.path)], check=True, capture_output=True)
    m.remount()
    before = mount_stats(m)["requests"]
    r = subprocess.run(["ls", "-l", str(m.path)], check=True, capture_output=True, text=True)
    after = mount_stats(m)["requests"]
    assert {n: os.readlink(m.path / n) for n in want} == want
    for name, target in want.items():
        assert f"{name} -> {target}" in r.stdout
    asked = {k: after.get(k, 0) - before.get(k, 0) for k in ("head", "get")}
    assert asked == {"head": 0, "get": 0}, asked
    # what the object lacks (uid, gid) is still the mount's default, not the last mount's
    m.umount()
    m.extra += ["--uid", "4242", "--gid", "4343"]
    m.mount()
    before = heads(m)
    assert ls_l(m.path)["other"][1:3] == (4242, 4343)
    assert heads(m) == before  # from the index
    assert os.readlink(m.path / "other") == "../elsewhere"


@pytest.mark.servers("rgw", "localstack")
def test_directory_markers_after_a_remount_need_no_head(mount_factory: Any, s3: Any,
                                                        bucket: str, key: Key) -> None:
    """A directory's mode, owner and time are on its marker object (``dir/``): kept like a
    file's, so ``ls -l`` after a remount sends no HEAD per subdirectory, and a marker
    another client changed between mounts is read again."""
    m = mount_factory(bucket, *LONG)
    want = {}
    for i in range(10):
        d = m.path / f"d{i}"
        d.mkdir()
        os.chmod(d, 0o700 + i % 8 * 0o10)
        os.chown(d, 1000 + i, 2000 + i)
        os.utime(d, (10**9 + i, 10**9 + i))
        want[d.name] = (stat.S_IFDIR | 0o700 + i % 8 * 0o10, 1000 + i, 2000 + i, 0, 10**9 + i)
    settle(s3, bucket)
    m.remount()
    assert ls_l(m.path) == want  # each marker HEADed once, here
    m.remount()
    before = heads(m)
    assert ls_l(m.path) == want
    assert heads(m) == before, "ls -l after a remount sent HEADs for directory markers"
    m.umount()
    s3.put_object(Bucket=bucket, Key="d3/", Body=b"", **sse(key), Metadata={
        "mode": str(stat.S_IFDIR | 0o755), "uid": "7", "gid": "8", "mtime": "1500000000"})
    want["d3"] = (stat.S_IFDIR | 0o755, 7, 8, 0, 1_500_000_000)
    m.mount()
    before = heads(m)
    assert ls_l(m.path) == want
    assert heads(m) - before == 1


def test_names_stated_after_their_attributes_expired_cost_a_listing_not_a_head_each(
        mount_factory: Any, s3: Any, bucket: str, key: Key) -> None:
    """find and du read a directory's names first and stat them after (GNU fts): in a large
    directory on a busy machine, after attr_ttl and dir_ttl have passed.  The expired names
    are renewed from a LIST page checked against what the index keeps, not by a HEAD each;
    an object another client changed meanwhile is still HEADed, and shown changed."""
    ttl = 2
    m = mount_factory(bucket, "--attr-ttl", str(ttl), "--dir-ttl", str(ttl))
    want = fill(m, s3, bucket, key)
    settle(s3, bucket)
    m.remount()
    assert ls_l(m.path) == want  # HEADed once: what they said goes to the index
    m.remount()
    names = sorted(os.listdir(m.path))  # answered from the index, attributes for ttl s
    mode, uid, gid, _, mtime = want["f003"]
    s3.put_object(Bucket=bucket, Key="f003", Body=b"changed", **sse(key), Metadata={
        "mode": str(mode), "uid": str(uid), "gid": str(gid), "mtime": str(mtime)})
    want["f003"] = (mode, uid, gid, 7, mtime)
    before = heads(m)
    time.sleep(ttl + 0.5)  # the condition under test: the attributes and listing expired
    got = {}
    for n in names:
        st = os.lstat(m.path / n)
        got[n] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, int(st.st_mtime))
    assert got == want
    assert heads(m) - before == 1, "expired names were HEADed one by one"


@pytest.mark.servers("rgw", "localstack")
def test_a_file_whose_key_left_the_key_file_is_asked_about_again(
        mount_factory: Any, s3: Any, bucket: str, key: Key, other_key: Key,
        tmp_path: Path) -> None:
    """An index entry names the key that opened its object.  When that key has left the key
    file (the index itself still opens: it is sealed with another key), the entry is not
    believed: the object is HEADed again, and shows as what it now is, a file no key of the
    mount opens (EACCES); a file of the remaining key reads as before."""
    both, only = KeyFile.generate("k1"), KeyFile.generate("k1")
    for kf in (both, only):
        kf.keys.clear()
        kf.keys["k1"] = key
        kf.current = "k1"
    both.keys["k2"] = Key("k2", other_key.raw)
    both.save(tmp_path / "both.toml")
    only.save(tmp_path / "only.toml")
    s3.put_object(Bucket=bucket, Key="mine", Body=b"k1's", **sse(key))
    s3.put_object(Bucket=bucket, Key="theirs", Body=b"k2's", **sse(other_key))
    settle(s3, bucket)
    m = mount_factory(bucket, *LONG, keys=tmp_path / "both.toml")
    assert (m.path / "theirs").read_bytes() == b"k2's"
    assert set(ls_l(m.path)) == {"mine", "theirs"}
    m.umount()

    m2 = mount_factory(bucket, *LONG, keys=tmp_path / "only.toml", mount=False)
    m2.cache_dir = m.cache_dir  # the index the first mount filled
    m2.mount()
    before = heads(m2)
    assert set(ls_l(m2.path)) == {"mine", "theirs"}
    assert heads(m2) > before, "the entry of a key that left the key file was believed"
    with pytest.raises(PermissionError):
        (m2.path / "theirs").read_bytes()
    assert (m2.path / "mine").read_bytes() == b"k1's"
