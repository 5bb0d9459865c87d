"""Layer 3: the file layer (``fs``, ``files``, ``blocks``, ``inodes``) called directly, on the
in-memory store of :mod:`memstore` — no kernel, no server, fast.

What a user cares about here: what a program wrote is what the bucket gets at close, and
what it reads back meanwhile; a large file's parts leave while it is still being written, in
order, and a writer cannot run ahead of uploads that do not move; a failed upload fails
close() with EIO and loses nothing (flush again, or umount, sends it); blocks that leave
memory go to the spill sealed, never in plaintext; a sequential reader is served by GETs
ahead of it, larger than its reads, while a random reader fetches what it reads; a small
change to a large object sends only the parts it touched.  The same against a server with
S3's minimum part size (AWS), where every part but the last must be whole.

Keys come from conftest's ``key`` fixture, so the log check looks for them in every log
line.  The real-server versions of these (test_t2_store, test_t4_posix) stay: they also check the
wire, the keys and the kernel.  Sizes here are tiny (4 KiB blocks, 16 KiB parts, see memfs).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
from memfs import BS, CTX, PS, MemFs, Sizes, memfs, settle
from memstore import AWS, MemStore, Server

from s3ssefs.inodes import ROOT
from s3ssefs.keys import Key


def data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def scaled(server: Server) -> Server:
    """``server`` with its minimum part size (if any) brought down to the fast layer's parts:
    every part but the last must then be whole."""
    return dataclasses.replace(server, min_part=PS if server.min_part else 0)


def parts_sent(store: MemStore, name: str) -> list[int]:
    return [c[2][0] for c in store.calls if c[0] == "upload_part" and c[1] == name]


# --- writing ------------------------------------------------------------------------------------


async def test_a_file_written_in_order_leaves_in_parts_while_it_is_written(
        key: Key, tmp_path: Path) -> None:
    """Parts go to S3 in order as the writer fills them, before close; close completes the
    upload, and the object is exactly what was written."""
    store = MemStore()
    body = data(10 * PS + 123)
    async with memfs(store, key, tmp_path) as m:
        fh = await m.create("big.bin")
        for off in range(0, len(body), BS):
            await m.write(fh, off, body[off:off + BS])
        await settle()
        early = parts_sent(store, "big.bin")
        assert len(early) >= 5, early  # most whole parts left before close()
        assert "big.bin" not in store.objects  # not complete before close
        await m.close(fh)
    assert store.objects["big.bin"].data == body
    sent = parts_sent(store, "big.bin")
    assert sent[:len(early)] == early == sorted(early)
    assert sorted(sent) == list(range(1, 12))  # each part once, the tail at close
    assert store.count("complete_multipart") == 1 and not store.uploads


@pytest.mark.parametrize("at", [5, PS + 5], ids=["header", "second-part"])
async def test_a_part_rewritten_after_it_was_sent_is_sent_again(key: Key, tmp_path: Path,
                                                                 at: int) -> None:
    """A program that goes back and patches what already left (a header at the start, a
    record in a later part whose blocks memory let go) gets the patch into the object: the
    part holding it is sent again, and the object is exactly what was written."""
    store = MemStore()
    body = bytearray(data(6 * PS))
    async with memfs(store, key, tmp_path) as m:
        fh = await m.create("patched.bin")
        for off in range(0, len(body), BS):
            await m.write(fh, off, bytes(body[off:off + BS]))
        await settle()
        part = at // PS + 1
        assert part in parts_sent(store, "patched.bin")  # it left already
        await m.write(fh, at, b"PATCH")
        body[at:at + 5] = b"PATCH"
        await m.close(fh)
    assert store.objects["patched.bin"].data == bytes(body)
    assert parts_sent(store, "patched.bin").count(part) == 2


async def test_a_writer_cannot_run_ahead_of_uploads_that_do_not_move(
        key: Key, tmp_path: Path) -> None:
    """While the server takes no part, the writer waits (its written data is bounded by
    the parts in flight), and goes on as soon as the parts move; nothing is lost."""
    store = MemStore()
    body = data(64 * PS)
    done = 0
    async with memfs(store, key, tmp_path) as m:
        fh = await m.create("slow.bin")
        store.gate("upload_part")

        async def writer() -> None:
            nonlocal done
            for off in range(0, len(body), BS):
                await m.write(fh, off, body[off:off + BS])
                done = off + BS

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await settle()
            assert store.waiting("upload_part") > 0
            held = done
            assert held < len(body) // 2, "the writer ran on while no part was taken"
            await settle()
            assert done == held  # still waiting, not creeping on
            store.release("upload_part")
        await m.close(fh)
    assert store.objects["slow.bin"].data == body


async def test_close_waits_until_the_bucket_has_the_file(key: Key, tmp_path: Path) -> None:
    """close() returns only once the object is complete (close-to-open): while the last
    request is held, close has not returned."""
    store = MemStore()
    body = data(3 * PS + 5)
    async with memfs(store, key, tmp_path) as m:
        fh = await m.create("c.bin")
        await m.write(fh, 0, body)
        store.gate("complete_multipart")
        closed = trio.Event()

        async def close() -> None:
            await m.close(fh)
            closed.set()

        async with trio.open_nursery() as n:
            n.start_soon(close)
            await settle()
            assert store.waiting("complete_multipart") == 1 and not closed.is_set()
            store.release("complete_multipart")
        assert closed.is_set()
        assert store.objects["c.bin"].data == body


@pytest.mark.allow_warnings
@pytest.mark.parametrize("op", ["put", "upload_part", "complete_multipart"])
async def test_a_failed_upload_fails_close_and_keeps_the_data_for_later(
        key: Key, tmp_path: Path, op: str) -> None:
    """The upload fails (after the store's retries): close() gets EIO, the bucket has
    nothing half-made, the file still reads what was written, and umount sends it."""
    store = MemStore()
    body = data(PS // 2 if op == "put" else 3 * PS + 7)
    async with memfs(store, key, tmp_path) as m:
        store.fail(op, count=10**6)  # until the server is back
        fh = await m.create("f.bin")
        await m.write(fh, 0, body)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await m.close(fh)
        assert e.value.errno == errno.EIO
        assert "f.bin" not in store.objects
        assert await m.whole("f.bin") == body  # from the kept data
        assert await m.unmount() == ["f.bin"]  # still failing: named, kept
        store._faults.clear()
        assert await m.unmount() == []
    assert store.objects["f.bin"].data == body
    assert not store.uploads  # no upload left unfinished


# --- the spill ----------------------------------------------------------------------------------


async def test_blocks_leaving_memory_are_sealed_in_the_spill(key: Key, tmp_path: Path) -> None:
    """A file written in random order, larger than what an open file keeps in memory: the
    blocks that leave memory go to the spill, which holds no plaintext block; reads while it
    is open and the object after close are exactly what was written."""
    store = MemStore()
    n = 40
    blocks = [data(BS, seed=b + 1) for b in range(n)]
    order = list(range(n))
    random.Random(7).shuffle(order)
    async with memfs(store, key, tmp_path) as m:
        fh = await m.create("r.bin")
        for b in order:
            await m.write(fh, b * BS, blocks[b])
        assert store.stats.snapshot().get("spill_blocks", 0) > 0
        spilled = b"".join(p.read_bytes() for p in (tmp_path / "spill").iterdir())
        assert spilled
        assert not any(blk[:64] in spilled for blk in blocks), "plaintext in the spill"
        for b in random.Random(8).sample(range(n), 10):
            assert await m.read(fh, b * BS + 100, 200) == blocks[b][100:300]
        await m.close(fh)
    assert store.objects["r.bin"].data == b"".join(blocks)
    assert list((tmp_path / "spill").iterdir()) == []  # gone with the closed file


# --- reading ------------------------------------------------------------------------------------


async def test_a_sequential_reader_is_served_ahead_and_a_random_one_fetches_little(
        key: Key, tmp_path: Path) -> None:
    """Reading a large object start to end costs far fewer GETs than reads, each GET larger
    than a read, in the order of the file; reading a few small random places of another
    costs about one GET each, fetching little more than was read."""
    store = MemStore()
    body = data(200 * BS, seed=1)
    other = data(8 << 20, seed=2)  # random reads fetch around them, by bytes not blocks
    async with memfs(store, key, tmp_path / "w") as m:
        await m.put_file("seq.bin", body, chunk=PS)
        await m.put_file("rnd.bin", other, chunk=64 * BS)
    async with memfs(store, key, tmp_path / "r") as m:
        fh = await m.open("seq.bin", os.O_RDONLY)
        reads = 0
        for off in range(0, len(body), BS // 2):
            assert await m.read(fh, off, BS // 2) == body[off:off + BS // 2]
            reads += 1
        await m.close(fh)
        gets = [c[2] for c in store.calls if c[0] == "get" and c[1] == "seq.bin"]
        assert 0 < len(gets) < reads // 4, (len(gets), reads)
        assert max(e - s for s, e in gets) > BS
        covered = sorted(gets)
        assert sum(e - s for s, e in covered) <= 2 * len(body)  # nothing fetched many times

        fh = await m.open("rnd.bin", os.O_RDONLY)
        rng = random.Random(3)
        places = [rng.randrange(0, len(other) - 100) for _ in range(8)]
        before = store.stats.snapshot().get("bytes_down", 0)
        gets_before = store.count("get")
        for off in places:
            assert await m.read(fh, off, 100) == other[off:off + 100]
        await m.close(fh)
        down = store.stats.snapshot().get("bytes_down", 0) - before
        assert store.count("get") - gets_before <= len(places)
        assert down < len(other) // 8, down


async def test_a_slow_server_gets_several_readahead_gets_at_once(
        key: Key, tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """When each GET takes a while (a far server; trio time, jumped), a sequential reader
    keeps more than one GET in flight: its reads wait for the server's latency once, not
    once per GET."""
    store = MemStore()
    body = data(40 << 20, seed=4)  # several of the largest GETs the readahead makes
    await store.put("far.bin", body, key)
    store.delay["get"] = 0.05
    async with memfs(store, key, tmp_path, sizes=Sizes(block=1 << 20, part=8 << 20,
                                                        threshold=8 << 20)) as m:
        fh = await m.open("far.bin", os.O_RDONLY)
        for off in range(0, len(body), 1 << 20):
            assert await m.read(fh, off, 1 << 20) == body[off:off + (1 << 20)]
        await m.close(fh)
    assert store.peak_in_flight["get"] > 1, store.peak_in_flight


# --- changing an existing object ----------------------------------------------------------------


async def test_a_small_change_to_a_large_object_sends_only_the_parts_it_touched(
        key: Key, tmp_path: Path) -> None:
    """Rewriting a few bytes in the middle of a many-part object uploads the part holding
    them; the others are copied server-side, and the object reads back with the change."""
    store = MemStore()
    body = bytearray(data(12 * PS + 99))
    async with memfs(store, key, tmp_path / "a") as m:
        await m.put_file("big.bin", bytes(body), chunk=PS)
    store.calls.clear()
    async with memfs(store, key, tmp_path / "b") as m:
        fh = await m.open("big.bin")
        at = 5 * PS + 10
        await m.write(fh, at, b"patched")
        body[at:at + 7] = b"patched"
        await m.close(fh)
    assert store.objects["big.bin"].data == bytes(body)
    assert parts_sent(store, "big.bin") == [6]
    assert store.count("upload_part_copy") == 12


# --- names --------------------------------------------------------------------------------------


async def test_an_open_file_renamed_and_removed_keeps_what_its_handle_reads(
        key: Key, tmp_path: Path) -> None:
    """A file being written and renamed is uploaded under its new name only; a file removed
    while open still reads and writes through its handle, and leaves nothing in the
    bucket."""
    store = MemStore()
    async with memfs(store, key, tmp_path) as m:
        fh = await m.create("a.bin")
        await m.write(fh, 0, b"x" * (3 * PS))
        await m.rename("a.bin", "b.bin")
        await m.write(fh, 3 * PS, b"tail")
        await m.close(fh)
        assert sorted(store.objects) == ["b.bin"]
        assert store.objects["b.bin"].data == b"x" * (3 * PS) + b"tail"

        fh = await m.open("b.bin")
        await m.unlink("b.bin")
        assert not await m.exists("b.bin")
        await m.write(fh, 0, b"y")
        assert await m.read(fh, 0, 2) == b"yx"
        await m.close(fh)
        assert store.objects == {}


# --- servers that answer differently ------------------------------------------------------------


@pytest.mark.parametrize("server", [Server(), AWS], ids=["rgw16", "aws"])
async def test_patterns_that_cut_and_regrow_parts_keep_every_part_but_the_last_whole(
        key: Key, tmp_path: Path, server: Server) -> None:
    """A file truncated in the middle of a part and written again past it, and one written
    with a hole: on a server that refuses parts below the minimum (AWS: 5 MiB, here one
    part), every upload still completes and the object is right."""
    store = MemStore(server=scaled(server))
    async with memfs(store, key, tmp_path, sizes=Sizes()) as m:
        want = bytearray(data(6 * PS))
        fh = await m.create("cut.bin")
        await m.write(fh, 0, bytes(want))
        await m.truncate("cut.bin", 2 * PS + 100, fh)
        del want[2 * PS + 100:]
        more = data(3 * PS, seed=9)
        await m.write(fh, len(want), more)
        want += more
        await m.close(fh)
        assert store.objects["cut.bin"].data == bytes(want)

        fh = await m.create("hole.bin")
        await m.write(fh, 5 * PS + 3, b"end")
        await m.close(fh)
        assert store.objects["hole.bin"].data == bytes(5 * PS + 3) + b"end"


async def test_many_files_written_at_once_share_memory_and_all_arrive(
        key: Key, tmp_path: Path) -> None:
    """Several files written at once, interleaved, each reaching the bucket whole."""
    store = MemStore()
    bodies = {f"f{i}": data(7 * PS + i, seed=i) for i in range(6)}
    async with memfs(store, key, tmp_path) as m:
        fhs = {name: await m.create(name) for name in bodies}

        async def write(name: str) -> None:
            b = bodies[name]
            for off in range(0, len(b), BS):
                await m.write(fhs[name], off, b[off:off + BS])

        async with trio.open_nursery() as n:
            for name in bodies:
                n.start_soon(write, name)
        for fh in fhs.values():
            await m.close(fh)
    assert {k: v.data for k, v in store.objects.items()} == bodies



@pytest.mark.parametrize("server", [Server(), AWS], ids=["rgw16", "aws"])
async def test_an_object_stored_without_a_key_reads_back_on_either_server(
        key: Key, tmp_path: Path, server: Server) -> None:
    """An object another client stored without SSE-C: RGW ignores the key sent for it, AWS
    refuses it; the mount finds that no key opens it either way and reads it whole, and a
    change written back through the mount is stored under the mount's key."""
    store = MemStore(server=scaled(server))
    body = data(3 * PS + 1)
    await store.put("plain.bin", body, None)
    async with memfs(store, key, tmp_path) as m:
        assert await m.whole("plain.bin") == body
        fh = await m.open("plain.bin")
        await m.write(fh, 0, b"new")
        await m.close(fh)
    assert store.objects["plain.bin"].data == b"new" + body[3:]
    assert store.objects["plain.bin"].sse_c_md5 == key.fingerprint


async def test_chmod_and_xattrs_of_a_small_file_of_many_blocks_keep_all_its_bytes(
        key: Key, tmp_path: Path) -> None:
    """A closed file smaller than the size whose metadata change re-sends the bytes, but of
    several blocks (any block_size below it): chmod and setxattr keep every byte, not the
    first block's (found by test_t3_model)."""
    store = MemStore()
    body = data(5 * BS + 7)
    async with memfs(store, key, tmp_path / "a") as m:
        await m.put_file("small.bin", body)
        await m.chmod("small.bin", 0o600)
        assert store.objects["small.bin"].data == body
        await m.setxattr("small.bin", b"user.tag", b"v")
        assert store.objects["small.bin"].data == body
        assert await m.whole("small.bin") == body
    async with memfs(store, key, tmp_path / "b") as m:
        assert await m.whole("small.bin") == body
        assert await m.mode("small.bin") == 0o600
        assert await m.user_xattrs("small.bin") == {b"user.tag": b"v"}


@pytest.mark.parametrize("server", [Server(), AWS], ids=["rgw16", "aws"])
async def test_a_large_file_changed_after_a_key_rotation_is_whole_under_the_new_key(
        key: Key, other_key: Key, tmp_path: Path, server: Server) -> None:
    """A many-part file written under the old key, then patched on a mount whose current key
    is new: the whole object ends under the new key with the patch.  The parts it did not
    touch are copied server-side where the server copies between keys (AWS); RGW 16 refuses
    UploadPartCopy between keys, and they are sent through the mount instead."""
    store = MemStore(server=scaled(server))
    body = bytearray(data(8 * PS + 3))
    async with memfs(store, key, tmp_path / "a") as m:
        await m.put_file("big.bin", bytes(body), chunk=PS)
    assert store.objects["big.bin"].sse_c_md5 == key.fingerprint
    store.calls.clear()
    async with memfs(store, other_key, tmp_path / "b", old_keys=(key,)) as m:
        fh = await m.open("big.bin")
        await m.write(fh, 3 * PS + 1, b"rotated")
        body[3 * PS + 1:3 * PS + 8] = b"rotated"
        await m.close(fh)
        assert await m.whole("big.bin") == bytes(body)
    obj = store.objects["big.bin"]
    assert obj.data == bytes(body) and obj.sse_c_md5 == other_key.fingerprint
    sent = parts_sent(store, "big.bin")
    if server.part_copy_between_keys:
        assert sent == [4]  # only the patched part; the others copied
    else:
        assert sorted(sent) == list(range(1, 10))  # refused copies: every part sent


# --- answers older than this mount's own changes ------------------------------------------------


async def listed_around(m: MemFs, store: MemStore,
                        change: Callable[[], Awaitable[None]]) -> dict[str, int]:
    """The root's entries (name → size the kernel is told) from a LIST asked before
    ``change`` and answered after it."""
    listed: dict[str, int] = {}

    async def ls() -> None:
        listed.update(await m.listed_sizes(""))

    async with trio.open_nursery() as n:
        store.gate("list", key="", count=1)  # this LIST; others (rmdir's) pass
        n.start_soon(ls)
        await settle()
        assert store.waiting("list") == 1  # asked; its answer is on its way
        await change()
        store.release("list")
    return listed


async def test_a_listing_answered_after_an_append_here_does_not_undo_it(
        key: Key, tmp_path: Path) -> None:
    """A directory listed (by any program) while a program appends to a file in it: the
    LIST's answer, asked before the append's upload and arriving after it, shows the old
    size.  The mount must not take it over what it wrote itself: neither the listing nor a
    stat afterwards may show the old size (the kernel would cut the next read of the file
    there: test_t6_faults' sixteen processes saw an append vanish)."""
    store = MemStore()
    async with memfs(store, key, tmp_path) as m:
        await m.put_file("f", data(100))

        async def append() -> None:
            fh = await m.open("f", os.O_WRONLY)
            await m.write(fh, 100, data(50, 1))
            await m.close(fh)

        assert await listed_around(m, store, append) == {"f": 150}
        assert await m.size("f") == 150
        assert await m.whole("f") == data(100) + data(50, 1)


async def written_then_changed_elsewhere(m: MemFs, store: MemStore, key: Key) -> int:
    """Files "a" (10 bytes) and "f" (100) written through the mount, then rewritten by another
    client (20 and 120 bytes): a listing shows both changed, and a lookup of "a" sends a HEAD
    ahead for "f".  The inode of "f", which the kernel keeps."""
    await m.put_file("a", data(10))
    await m.put_file("f", data(100))
    f_ino = await m.ino("f")
    await store.put("a", data(20, 2), key, {})
    await store.put("f", data(120, 3), key, {})
    return f_ino


async def test_a_head_answered_after_an_append_here_does_not_undo_it(
        key: Key, tmp_path: Path) -> None:
    """The same for a HEAD the mount sends ahead of lookups (after a listing, for the names
    after the one looked up): asked before a program's append reached S3, answered after,
    it shows the object as it was; a stat afterwards shows what was appended."""
    store = MemStore()
    async with memfs(store, key, tmp_path) as m:
        f_ino = await written_then_changed_elsewhere(m, store, key)
        assert await m.names("") == ["a", "f"]
        store.gate("head", key="f", count=1)
        async with trio.open_nursery() as n:
            n.start_soon(m.ino, "a")
            await settle()
            assert store.waiting("head") == 1  # the HEAD ahead for "f", held
            # the program opens "f" by the name the kernel still knows, appends, closes
            fh = (await m.fs.open(f_ino, os.O_WRONLY, CTX)).fh
            await m.write(fh, 120, data(30, 4))
            await m.close(fh)
            store.release("head")
            await settle()  # the old answer is in
        assert await m.size("f") == 150
        assert await m.whole("f") == data(120, 3) + data(30, 4)


async def test_the_kernel_is_told_when_a_head_ahead_finds_a_file_changed(
        key: Key, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A HEAD sent ahead of lookups that finds a file other than the listing showed (another
    client wrote it again meanwhile) makes the kernel drop the attributes it holds: otherwise
    an open finds nothing new (the mount already knows) and the kernel cuts the read at the
    size it was told before."""
    told: list[int] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode",
                        lambda ino, attr_only=False: told.append(ino))
    store = MemStore()
    async with memfs(store, key, tmp_path) as m:
        f_ino = await written_then_changed_elsewhere(m, store, key)
        assert await m.listed_sizes("") == {"a": 20, "f": 120}  # what the kernel is told
        await store.put("f", data(140, 5), key, {})  # and again, after the listing
        told.clear()
        await m.ino("a")  # sends the HEAD ahead for "f"
        await settle()
        assert f_ino in told
        assert (await m.fs.getattr(f_ino, CTX)).st_size == 140


async def test_a_listing_answered_after_a_removal_here_does_not_bring_it_back(
        key: Key, tmp_path: Path) -> None:
    """A LIST asked before a file and a directory were removed here, answered after: the
    listing shows neither (the kernel would otherwise hold entries for names that are gone,
    and a program's create of the name would meet a file that is not there)."""
    store = MemStore()
    async with memfs(store, key, tmp_path) as m:
        await m.put_file("f", data(100))
        await m.put_file("g", data(10))
        await m.mkdir("d")

        async def remove() -> None:
            await m.unlink("f")
            await m.fs.rmdir(ROOT, b"d", CTX)

        assert sorted(await listed_around(m, store, remove)) == ["g"]
        assert await m.names("") == ["g"]
        assert not await m.exists("f")
