"""Layer 2: the ObjectStore against a real Ceph RGW 16 (HTTPS, self-signed CA, SSE-C).

What a user cares about here: data written with a key is unreadable without that key, and the
store says EACCES (not EIO, not garbage); reads at any offset return exactly the stored bytes;
large files survive multipart uploads; copies (rename, chmod, rekey) keep the data, change the
metadata or the key as asked and never leave plaintext in the bucket; huge directories list in
pages; misconfigurations fail with the right errno; and no key ever reaches a log line.

The tests about keys and the S3 dialect (marked ``servers()``) also run against LocalStack's S3
(``tests/s3second-up.sh``), which answers SSE-C as AWS documents it; where it answers
otherwise than RGW, the test says which answer each gives.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import assert_no_key_material, sse

from s3ssefs.config import ConfigError, MountConfig
from s3ssefs.errors import FsError
from s3ssefs.keys import Key
from s3ssefs.logsetup import RedactingFilter
from s3ssefs.store import ObjectStore

MiB = 1 << 20


# --- helpers ---------------------------------------------------------------------------------


def make_store(rgw: Any, bucket: str, **kw: Any) -> ObjectStore:
    opts: dict[str, Any] = {"bucket": bucket, "endpoint": rgw.endpoint, "ca_bundle": rgw.ca,
                            "keyfile": Path("/unused"), "part_size": 5 * MiB,
                            "multipart_threshold": 5 * MiB}
    opts.update(kw)
    return ObjectStore(MountConfig(**opts))


def data(n: int) -> bytes:
    return os.urandom(n)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def bytes_moved(store: ObjectStore) -> tuple[int, int]:
    s = store.stats.snapshot()
    return s.get("bytes_down", 0), s.get("bytes_up", 0)


async def read_all(store: ObjectStore, name: str, key: Key | None, size: int) -> bytes:
    return await store.get_range(name, 0, size, key)


def assert_keyless_get_fails(s3: Any, bucket: str, name: str) -> None:
    """A plain client that sends no key gets an error, never the bytes."""
    with pytest.raises(ClientError) as ei:
        s3.get_object(Bucket=bucket, Key=name)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 403)
    with pytest.raises(ClientError) as ei:
        s3.head_object(Bucket=bucket, Key=name)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 403)


async def assert_eacces(coro: Awaitable[Any]) -> None:
    with pytest.raises(FsError) as ei:
        await coro
    assert ei.value.errno == errno.EACCES, str(ei.value)


async def multipart_put(store: ObjectStore, name: str, parts: list[bytes], key: Key | None,
                        metadata: dict[str, str] | None = None) -> None:
    upload_id = await store.create_multipart(name, key, metadata)
    etags = [(n, await store.upload_part(name, upload_id, n, body, key))
             for n, body in enumerate(parts, start=1)]
    await store.complete_multipart(name, upload_id, etags, key)


# --- keys ------------------------------------------------------------------------------------


@pytest.mark.servers()
async def test_object_is_unreadable_without_its_key(rgw, bucket, s3, key, other_key) -> None:
    store = make_store(rgw, bucket)
    body = data(100_000)
    info = await store.put("secret.bin", body, key, {"mode": "33188"})
    assert info.sse_c_md5 == key.fingerprint

    assert await read_all(store, "secret.bin", key, len(body)) == body
    head = await store.head("secret.bin", key)
    assert head.size == len(body)
    assert head.sse_c_md5 == key.fingerprint
    assert head.metadata == {"mode": "33188"}

    for wrong in (None, other_key):
        await assert_eacces(store.get_range("secret.bin", 0, 10, wrong))
        await assert_eacces(store.head("secret.bin", wrong))
    assert_keyless_get_fails(s3, bucket, "secret.bin")


@pytest.mark.servers()
async def test_heads_in_one_batch_each_get_their_own_answer(rgw, bucket, key, other_key,
                                                            ) -> None:
    """``head_many`` (``ls -l``'s prefetch): in order, each object its own metadata, or the
    errno its HEAD failed with (a wrong key EACCES, a missing object ENOENT); one failure
    does not fail the others, and nothing is raised."""
    store = make_store(rgw, bucket)
    assert store.can_head_many()
    for i in range(4):
        await store.put(f"h{i}", data(10 + i), key, {"mode": str(0o100600 + i)})
    await store.put("plain", b"p", None, {"mode": "33188"})
    got = await store.head_many([("h0", key), ("h1", other_key), ("missing", key),
                                 ("h2", None), ("h3", key), ("plain", None)])
    assert [g.errno if isinstance(g, FsError) else (g.size, g.metadata["mode"])
            for g in got] == [(10, str(0o100600)), errno.EACCES, errno.ENOENT, errno.EACCES,
                              (13, str(0o100603)), (1, "33188")]
    assert got[0].sse_c_md5 == key.fingerprint  # type: ignore[union-attr]


# --- ranged reads ----------------------------------------------------------------------------


@pytest.mark.servers()
async def test_ranged_reads_at_unaligned_offsets(rgw, bucket, key) -> None:
    store = make_store(rgw, bucket)
    size = 3 * MiB + 4321  # not a multiple of RGW's 4 KiB encryption chunk
    body = data(size)
    await store.put("ranges.bin", body, key)
    cases = [(0, 1), (1, 2), (4095, 4097), (4096, 8192), (12_345, 1 * MiB + 77),
             (MiB - 1, 2 * MiB + 1), (size - 4321, size), (size - 1, size),
             (size - 100, size + 500),  # crosses the end: only what exists
             (0, size)]
    for start, end in cases:
        got = await store.get_range("ranges.bin", start, end, key)
        assert got == body[start:end], f"range [{start}, {end}) differs"
    for start, end in [(size, size + 10), (size + 1000, size + 5000)]:
        assert await store.get_range("ranges.bin", start, end, key) == b""
    assert await store.get_range("ranges.bin", 50, 50, key) == b""


async def test_small_reads_of_cached_blocks_read_the_cache_not_s3(rgw, bucket, key, tmp_path,
                                                                 monkeypatch) -> None:
    """A file read once, then at random after its blocks have left memory (a program that
    scans a file, then seeks in it): every small read is right and costs no request, and
    reads from disk only the chunks of the cached block that hold it, not the whole block."""
    import random

    import trio

    from s3ssefs import cache as cache_mod
    from s3ssefs.blocks import BlockSource, ObjectRef
    from s3ssefs.cache import BlockCache
    from s3ssefs.crypto import LocalCipher

    store = make_store(rgw, bucket)
    size = 3 * MiB + 777
    body = data(size)
    await store.put("scan.bin", body, key)
    cache = BlockCache(tmp_path / "cache", 64 * MiB, LocalCipher())
    source = BlockSource(store, cache, MiB, store.stats, mem_bytes=MiB)  # memory for a block
    ref = ObjectRef("scan.bin", "etag", size, key)
    async with trio.open_nursery() as nursery:  # closing it waits for the cache puts
        source.nursery = nursery
        assert b"".join(await source.blocks(ref, 0, 3)) == body
    source.nursery = None
    gets = store.stats.snapshot()["requests"]["get"]
    read_sizes: list[int] = []
    real_preadv = os.preadv

    def preadv(fd: int, buffers: list[Any], offset: int) -> int:
        read_sizes.append(sum(len(b) for b in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(cache_mod.os, "preadv", preadv)
    rng = random.Random(4)
    chunk = cache_mod.CHUNK
    offsets = [rng.randrange(0, 2 * MiB - 8192) for _ in range(30)] + [chunk - 10, MiB - 5]
    hits = cache.hits
    for off in offsets:
        n = min(4096, MiB - off % MiB)  # inside one block, as the kernel's reads are
        assert bytes(await source.piece(ref, off, off + n)) == body[off:off + n], off
    assert store.stats.snapshot()["requests"]["get"] == gets
    assert cache.hits - hits == len(offsets)  # blocks 0 and 1 are no longer in memory
    assert max(read_sizes) <= 2 * (chunk + cache_mod.PAGE)


async def test_a_small_read_does_not_wait_for_a_block_get_under_way(rgw, bucket, key,
                                                                   tmp_path) -> None:
    """A small random read whose block another GET is fetching (readahead, or a region of
    ``random_readahead``, which may be 8 MiB long or queued behind others) is answered by
    its own short fragment GET, with the right bytes, instead of waiting for that GET."""
    import trio

    from s3ssefs.blocks import BlockSource, ObjectRef
    from s3ssefs.cache import BlockCache
    from s3ssefs.crypto import LocalCipher

    store = make_store(rgw, bucket)
    body = data(2 * MiB)
    await store.put("busy.bin", body, key)
    source = BlockSource(store, BlockCache(tmp_path / "cache", 8 * MiB, LocalCipher()), MiB,
                         store.stats)
    ref = ObjectRef("busy.bin", "etag", len(body), key)
    never = trio.Event()  # a GET of block 1 that does not finish while the read runs
    source.inflight[(ref.cache_id, 1)] = never
    off = MiB + 12345
    with trio.fail_after(60):
        assert bytes(await source.piece(ref, off, off + 4096)) == body[off:off + 4096]
    assert store.stats.snapshot()["fragment_gets"] == 1


def _file_for_pages(store: ObjectStore, source: Any, ref: Any, tmp_path: Path,
                    pages: Any) -> Any:
    """A FileData of ``ref`` as FS.open makes it, whose page-cache hand-offs go to ``pages``."""
    import stat

    from s3ssefs.crypto import LocalCipher
    from s3ssefs.files import Ctx, FileData
    from s3ssefs.inodes import Node
    from s3ssefs.meta import Attrs

    ctx = Ctx(store=store, source=source, cipher=LocalCipher(), spill_dir=tmp_path,
              block_size=MiB, part_size=8 * MiB, multipart_threshold=8 * MiB,
              s3key=lambda p: p, write_key=lambda: ref.sse_key, metadata=lambda n: {},
              stats=store.stats, pages=pages)
    node = Node(ino=7, path=ref.s3key, attrs=Attrs(mode=stat.S_IFREG | 0o644, uid=0, gid=0,
                                                   size=ref.size, mtime_ns=0, ctime_ns=0))
    node.data = FileData(ctx, node, ref)
    return node.data


async def test_random_readahead_hands_regions_to_the_kernel_only_while_the_file_is_unchanged(
        rgw, bucket, key, tmp_path) -> None:
    """``random_readahead`` with the kernel's page cache: the region around a random read is
    handed over whole, with the object's bytes, and kept out of the disk cache.  A writer
    that opens while a region's GET is under way (FS.open counts it in ``page_blockers``)
    stops that hand-off, and the region goes to the disk cache instead.  A read that reaches
    the daemon in a region handed over, for a block memory no longer has, means the kernel
    let the pages go: the region is fetched again (and only then)."""
    import trio

    from s3ssefs.blocks import BlockSource, ObjectRef
    from s3ssefs.cache import BlockCache
    from s3ssefs.crypto import LocalCipher
    from s3ssefs.pages import KernelPages

    store = make_store(rgw, bucket)
    body = data(24 * MiB)
    await store.put("regions.bin", body, key)
    cache = BlockCache(tmp_path / "cache", 64 * MiB, LocalCipher())
    source = BlockSource(store, cache, MiB, store.stats, random_ahead=8 * MiB)
    ref = ObjectRef("regions.bin", "etag", len(body), key)
    stored: list[tuple[int, int, bytes]] = []
    f = _file_for_pages(store, source, ref, tmp_path,
                        KernelPages(lambda ino, off, d: stored.append((ino, off, bytes(d)))))
    cid = ref.cache_id

    async with trio.open_nursery() as nursery:  # closing it waits for the region
        source.nursery = nursery
        assert bytes(await f.read(3 * MiB + 5, 4096)) == body[3 * MiB + 5:3 * MiB + 4101]
    assert [(ino, off) for ino, off, _ in stored] == [(7, b * MiB) for b in range(8)]
    assert b"".join(d for *_, d in stored) == body[:8 * MiB]
    assert not [b for b in range(8) if (cid, b) in cache]

    stored.clear()
    async with trio.open_nursery() as nursery:
        source.nursery = nursery
        source.region_prefetch(ref, 9, 23, f._publish)  # as a read there would, then...
        f.page_blockers += 1  # ...a writer opens before the region's GET has ended
    assert stored == []
    assert all((cid, b) in cache for b in range(8, 16))
    f.page_blockers -= 1

    fetched = store.stats.snapshot()["random_ahead_blocks"]
    async with trio.open_nursery() as nursery:
        source.nursery = nursery
        source.region_prefetch(ref, 2, 23, f._publish)  # block 2 still in memory: a race
        source.region_prefetch(ref, 12, 23, f._publish)  # region 1 is in the disk cache
    assert store.stats.snapshot()["random_ahead_blocks"] == fetched
    source.forget(ref)  # memory lets region 0 go; the read of block 2 reached us
    async with trio.open_nursery() as nursery:
        source.nursery = nursery
        source.region_prefetch(ref, 2, 23, f._publish)
    assert store.stats.snapshot()["random_ahead_blocks"] == fetched + 8
    assert b"".join(d for *_, d in stored) == body[:8 * MiB]


async def test_settling_an_inode_waits_for_its_page_cache_hand_offs(tmp_path) -> None:
    """What must not meet a hand-off to the kernel's page cache (an open, a truncate) waits
    for the ones in flight for that inode, and only for those."""
    import threading

    import trio
    import trio.testing

    from s3ssefs.pages import KernelPages

    release = threading.Event()
    pages = KernelPages(lambda ino, off, d: release.wait(30))
    settled: list[int] = []

    async def settle(ino: int) -> None:
        await pages.settle(ino)
        settled.append(ino)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pages.put, 7, [(0, b"x" * 4096)])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(settle, 7)
            nursery.start_soon(settle, 8)
            await trio.testing.wait_all_tasks_blocked()
            assert settled == [8]
            release.set()
        assert settled == [8, 7]


async def test_streaming_a_file_larger_than_the_cache_keeps_what_the_cache_held(
        rgw, bucket, key, tmp_path) -> None:
    """A sequential reader's readahead through an object larger than the whole cache does not
    fill the cache (an LRU streamed through would keep none of it and lose the rest): a file
    cached before is still read without a request afterwards.  Blocks of the same big object
    that a reader asks for directly (not readahead) are still cached, and readahead of an
    object that fits is cached on its second pass (not its first), unless ``cache_stream_max``
    is below its size."""
    import trio
    import trio.testing

    from s3ssefs.blocks import BlockSource, ObjectRef
    from s3ssefs.cache import BlockCache
    from s3ssefs.crypto import LocalCipher

    store = make_store(rgw, bucket)
    small, big, fits = data(MiB + 5), data(6 * MiB), data(2 * MiB)
    await store.put("small.bin", small, key)
    await store.put("big.bin", big, key)
    await store.put("fits.bin", fits, key)
    cache = BlockCache(tmp_path / "cache", 4 * MiB, LocalCipher())
    source = BlockSource(store, cache, MiB, store.stats, mem_bytes=8 * MiB)
    r_small = ObjectRef("small.bin", "e1", len(small), key)
    r_big = ObjectRef("big.bin", "e2", len(big), key)
    r_fits = ObjectRef("fits.bin", "e3", len(fits), key)

    async def read_all(ref: ObjectRef, body: bytes, readahead: bool) -> None:
        async with trio.open_nursery() as nursery:  # closing it waits for the cache puts
            source.nursery = nursery
            if readahead:  # as a sequential reader's read does before it waits
                source.prefetch(ref, 0, source.nblocks(ref) - 1)
                await trio.testing.wait_all_tasks_blocked()  # the GETs are under way
            got = [bytes(b) for b in await source.blocks(ref, 0, source.nblocks(ref) - 1)]
            assert b"".join(got) == body
        source.nursery = None

    await read_all(r_small, small, readahead=False)
    assert all((r_small.cache_id, b) in cache for b in range(2))
    await read_all(r_big, big, readahead=True)
    assert not [b for b in range(6) if (r_big.cache_id, b) in cache]
    assert store.stats.snapshot()["cache_streamed"] == 6
    assert all((r_small.cache_id, b) in cache for b in range(2))
    gets = store.stats.snapshot()["requests"]["get"]
    fresh = BlockSource(store, cache, MiB, store.stats)  # nothing in memory: the disk cache
    assert b"".join([bytes(b) for b in await fresh.blocks(r_small, 0, 1)]) == small
    assert store.stats.snapshot()["requests"]["get"] == gets

    async with trio.open_nursery() as nursery:  # a read of one block, not readahead
        fresh.nursery = nursery
        assert bytes((await fresh.blocks(r_big, 3, 3))[0]) == big[3 * MiB:4 * MiB]
    fresh.nursery = None
    assert (r_big.cache_id, 3) in cache
    # readahead of an object that fits: cached when it is fetched a second time, not the first
    await read_all(r_fits, fits, readahead=True)
    assert not [b for b in range(2) if (r_fits.cache_id, b) in cache]
    source.forget(r_fits)  # as if memory had let it go
    await read_all(r_fits, fits, readahead=True)
    assert all((r_fits.cache_id, b) in cache for b in range(2))

    # cache_stream_max lowers the bound (read-once mounts): then nothing streamed is cached,
    # not even on a second pass
    source = BlockSource(store, cache, MiB, store.stats, stream_max=0)
    r_once = ObjectRef("fits.bin", "e4", len(fits), key)
    for _ in range(2):
        await read_all(r_once, fits, readahead=True)
        source.forget(r_once)
    assert not [b for b in range(2) if (r_once.cache_id, b) in cache]


async def test_a_sequential_reader_leaves_no_block_it_has_read_in_memory(
        rgw, bucket, key, tmp_path) -> None:
    """Blocks a sequential reader has had to their end are in the kernel's page cache: the
    memory LRU lets them go (SERVED_LAG blocks behind the reader), and keeps what readahead
    fetched ahead of it (every block fetched exactly once), also when the reads do not start
    at block boundaries.  A block read only in part, or read out of sequence, stays."""
    import trio

    from s3ssefs.blocks import BlockSource, ObjectRef
    from s3ssefs.cache import BlockCache
    from s3ssefs.crypto import LocalCipher
    from s3ssefs.files import SERVED_LAG

    store = make_store(rgw, bucket)
    n = SERVED_LAG + 8
    body = data(n * MiB + 100)
    await store.put("seq.bin", body, key)
    cache = BlockCache(tmp_path / "cache", 64 * MiB, LocalCipher())
    source = BlockSource(store, cache, MiB, store.stats)
    ref = ObjectRef("seq.bin", "etag", len(body), key)
    cid = ref.cache_id
    misses = store.stats.snapshot().get("cache_misses", 0)
    async with trio.open_nursery() as nursery:
        source.nursery = nursery
        f = _file_for_pages(store, source, ref, tmp_path, None)
        got = [bytes(await f.read(0, MiB // 2))]  # half a block: kept
        got.append(bytes(await f.read(MiB // 2, MiB // 2)))
        for b in range(1, n + 1):
            got.append(bytes(await f.read(b * MiB, MiB)))
            in_mem = {x for x in range(b + 1) if (cid, x) in source.mem}
            assert in_mem == set(range(max(0, b - SERVED_LAG + 1), b + 1))
        assert b"".join(got) == body
        assert store.stats.snapshot()["cache_misses"] - misses == n + 1  # none fetched twice

        g = _file_for_pages(store, source, ref, tmp_path, None)  # reads out of sequence
        for b in (2, 0):
            assert bytes(await g.read(b * MiB, MiB)) == body[b * MiB:(b + 1) * MiB]
        assert (cid, 2) in source.mem and (cid, 0) in source.mem

        # the kernel's reads 4 KiB off the block boundaries (it read one page on its own),
        # each spanning two blocks, with that lone page read again behind the stream: the
        # blocks passed still leave, and none is fetched twice
        ref4 = ObjectRef("seq.bin", "etag4", len(body), key)
        cid4 = ref4.cache_id
        misses = store.stats.snapshot()["cache_misses"]
        h = _file_for_pages(store, source, ref4, tmp_path, None)
        got = [bytes(await h.read(0, 4096))]
        for b in range(n - 1):
            got.append(bytes(await h.read(b * MiB + 4096, MiB)))
            if b == 3:
                assert bytes(await h.read(3 * MiB, 4096)) == body[3 * MiB:3 * MiB + 4096]
            in_mem = {x for x in range(b + 1) if (cid4, x) in source.mem}
            assert in_mem == set(range(max(0, b - SERVED_LAG + 1), b + 1))
        got.append(bytes(await h.read((n - 1) * MiB + 4096, 2 * MiB)))  # to the end
        assert b"".join(got) == body
        assert store.stats.snapshot()["cache_misses"] - misses == n + 1
        nursery.cancel_scope.cancel()
    source.nursery = None


async def test_many_sequential_readers_share_the_memory_and_fetch_each_block_once(
        rgw, bucket, key, tmp_path) -> None:
    """Files read in sequence at once share half the memory LRU for their readahead: with
    each file's own window (up to 64 MiB), four readers of 16 MiB files would fetch 64 MiB
    ahead into a 16 MiB LRU, which let blocks go before they were read and fetched them
    again.  Here every block is fetched once, and a reader that closes gives its share back."""
    import trio
    import trio.testing

    from s3ssefs.blocks import BlockSource, ObjectRef
    from s3ssefs.cache import BlockCache
    from s3ssefs.crypto import LocalCipher

    store = make_store(rgw, bucket)
    n_files, n_blocks = 4, 16
    bodies = [data(n_blocks * MiB) for _ in range(n_files)]
    for i, body in enumerate(bodies):
        await store.put(f"many/{i}.bin", body, key)
    cache = BlockCache(tmp_path / "cache", 64 * MiB, LocalCipher())
    source = BlockSource(store, cache, MiB, store.stats, mem_bytes=16 * MiB)
    refs = [ObjectRef(f"many/{i}.bin", f"e{i}", n_blocks * MiB, key) for i in range(n_files)]
    misses = store.stats.snapshot().get("cache_misses", 0)
    async with trio.open_nursery() as nursery:
        source.nursery = nursery
        files = [_file_for_pages(store, source, r, tmp_path, None) for r in refs]
        got: list[list[bytes]] = [[] for _ in refs]
        for b in range(n_blocks):
            for i, f in enumerate(files):
                got[i].append(bytes(await f.read(b * MiB, MiB)))
                await trio.testing.wait_all_tasks_blocked()  # let readahead run ahead
            if b == 1:
                assert len(source.streaming) == n_files
        assert [b"".join(g) for g in got] == bodies
        assert store.stats.snapshot()["cache_misses"] - misses == n_files * n_blocks

        g = _file_for_pages(store, source, refs[0], tmp_path, None)
        await g.read(0, MiB)
        assert g in source.streaming
        await g.close()
        assert g not in source.streaming
        nursery.cancel_scope.cancel()
    source.nursery = None


# --- multipart -------------------------------------------------------------------------------


@pytest.mark.servers()
async def test_multipart_upload_reads_back_whole(rgw, bucket, s3, key) -> None:
    store = make_store(rgw, bucket)
    parts = [data(5 * MiB), data(5 * MiB), data(1 * MiB)]
    whole = b"".join(parts)
    await multipart_put(store, "big.bin", parts, key, {"mode": "33152"})

    head = await store.head("big.bin", key)
    assert head.size == len(whole)
    assert head.sse_c_md5 == key.fingerprint
    assert head.metadata == {"mode": "33152"}
    assert sha(await read_all(store, "big.bin", key, len(whole))) == sha(whole)
    # a read across the part boundaries
    start, end = 5 * MiB - 3, 10 * MiB + 3
    assert await store.get_range("big.bin", start, end, key) == whole[start:end]
    assert_keyless_get_fails(s3, bucket, "big.bin")


async def test_files_written_at_once_send_a_bounded_number_of_parts(rgw, bucket, key,
                                                                     tmp_path) -> None:
    """Each part on its way to S3 is held in memory, so the parts sent at once are bounded
    per mount (Ctx.part_slots), not only per file: four files written at once, with room for
    two parts in the mount, never have more than two uploads under way, and every file
    arrives whole."""
    import stat

    import trio
    import trio.testing

    from s3ssefs.blocks import BlockSource
    from s3ssefs.cache import BlockCache
    from s3ssefs.crypto import LocalCipher
    from s3ssefs.files import Ctx, FileData
    from s3ssefs.inodes import Node
    from s3ssefs.meta import Attrs

    store = make_store(rgw, bucket)
    source = BlockSource(store, BlockCache(tmp_path / "cache", 64 * MiB, LocalCipher()), MiB,
                         store.stats)
    ctx = Ctx(store=store, source=source, cipher=LocalCipher(), spill_dir=tmp_path,
              block_size=MiB, part_size=5 * MiB, multipart_threshold=5 * MiB,
              s3key=lambda p: p, write_key=lambda: key, metadata=lambda n: {},
              stats=store.stats, part_slots=trio.Semaphore(2))
    under_way, most = 0, 0
    real_upload_part = store.upload_part

    async def upload_part(*args: Any, **kw: Any) -> str:
        nonlocal under_way, most
        under_way += 1
        most = max(most, under_way)
        try:
            # every writer goes as far as it can before this part is sent
            await trio.testing.wait_all_tasks_blocked()
            return await real_upload_part(*args, **kw)
        finally:
            under_way -= 1

    store.upload_part = upload_part  # type: ignore[method-assign]
    bodies = {f"w/{i}.bin": data(11 * MiB) for i in range(4)}  # 2 whole parts and a tail

    async def write(path: str, body: bytes) -> None:
        node = Node(ino=10, path=path, attrs=Attrs(mode=stat.S_IFREG | 0o644, uid=0, gid=0,
                                                   size=0, mtime_ns=0, ctime_ns=0))
        f = FileData(ctx, node, None)
        node.data = f
        for off in range(0, len(body), MiB):
            await f.write(off, body[off:off + MiB])
        await f.flush()
        await f.close()

    async with trio.open_nursery() as nursery:
        ctx.nursery = source.nursery = nursery
        async with trio.open_nursery() as writers:
            for path, body in bodies.items():
                writers.start_soon(write, path, body)
        nursery.cancel_scope.cancel()
    source.nursery = None
    assert most == 2
    for path, body in bodies.items():
        assert sha(await read_all(store, path, key, len(body))) == sha(body)


def _writer(store: ObjectStore, key: Key, tmp_path: Path, path: str) -> Any:
    """A FileData of a new file as FS.create makes it (1 MiB blocks, 5 MiB parts, so a part
    is 5 blocks and memory holds 7), with the mount's block source."""
    import stat

    from s3ssefs.blocks import BlockSource
    from s3ssefs.cache import BlockCache
    from s3ssefs.crypto import LocalCipher
    from s3ssefs.files import Ctx, FileData
    from s3ssefs.inodes import Node
    from s3ssefs.meta import Attrs

    source = BlockSource(store, BlockCache(tmp_path / "cache", 64 * MiB, LocalCipher()), MiB,
                         store.stats)
    ctx = Ctx(store=store, source=source, cipher=LocalCipher(), spill_dir=tmp_path,
              block_size=MiB, part_size=5 * MiB, multipart_threshold=5 * MiB,
              s3key=lambda p: p, write_key=lambda: key, metadata=lambda n: {},
              stats=store.stats)
    node = Node(ino=11, path=path, attrs=Attrs(mode=stat.S_IFREG | 0o644, uid=0, gid=0,
                                                size=0, mtime_ns=0, ctime_ns=0))
    node.data = FileData(ctx, node, None)
    return node.data


async def _write_in_order(f: Any, body: bytes) -> None:
    for off in range(0, len(body), MiB):
        await f.write(off, body[off:off + MiB])


def _keys(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


async def test_a_file_written_in_order_goes_to_s3_without_the_spill(rgw, bucket, s3, key,
                                                                     tmp_path) -> None:
    """The parts of a file written from empty in order go to S3 straight from memory: of
    its blocks, only the first part's are sealed into the spill (a program that patches a
    header rewrites them); the others need no copy once their part is on its way.  The
    file reads back whole while it is written and arrives whole."""
    import trio

    store = make_store(rgw, bucket)
    body = data(23 * MiB)  # 4 whole parts and a tail
    f = _writer(store, key, tmp_path, "stream.bin")
    async with trio.open_nursery() as nursery:
        f.ctx.nursery = f.ctx.source.nursery = nursery
        await _write_in_order(f, body)
        for off in (MiB + 7, 7 * MiB + 3, 22 * MiB):  # spill, a part, memory
            assert bytes(await f.read(off, 4096)) == body[off:off + 4096]
        await f.flush()
        await f.close()
        nursery.cancel_scope.cancel()
    stats = store.stats.snapshot()
    # blocks left memory (23 MiB does not fit in what a file may hold), and of those only
    # the first part's (5 MiB parts of 1 MiB blocks, as _writer sets) went to the spill
    assert stats.get("spill_skipped", 0) > 0, stats
    assert 0 < stats.get("spill_blocks", 0) <= 5, stats
    # (whether the read of a sent part completed the upload early depends on whether its
    # upload had finished by then: a race with the server, left alone here; the next test
    # reads back what only S3 has on purpose)
    assert sha(await read_all(store, "stream.bin", key, len(body))) == sha(body)
    assert _keys(s3, bucket) == ["stream.bin"]


async def test_reading_back_what_only_s3_has_completes_the_upload_so_far(
        rgw, bucket, s3, key, tmp_path) -> None:
    """A block whose only copy is a part S3 has (written in order, sent, let go of) is read
    back and then partly rewritten while the file is still being written: S3 cannot read a
    part before its upload is completed, so the upload is completed with the parts so far,
    which the file then reads and copies from.  Nothing is lost and the file arrives whole,
    under its own key only."""
    import trio

    store = make_store(rgw, bucket)
    body = bytearray(data(23 * MiB))
    f = _writer(store, key, tmp_path, "back.bin")
    async with trio.open_nursery() as nursery:
        f.ctx.nursery = f.ctx.source.nursery = nursery
        await _write_in_order(f, body[:17 * MiB])
        await f._wait_parts()
        assert {6, 8} <= f.sent_only  # the blocks read and patched below: only S3 has them
        off = 6 * MiB + 100
        assert bytes(await f.read(off, 4096)) == body[off:off + 4096]
        assert store.stats.snapshot()["uploads_completed_early"] == 1
        head = s3.head_object(Bucket=bucket, Key="back.bin", **sse(key))
        assert head["ContentLength"] == 15 * MiB  # the 3 parts sent, until close
        patch = data(3000)
        await f.write(8 * MiB + 5, patch)  # into a block the early object holds
        body[8 * MiB + 5:8 * MiB + 5 + len(patch)] = patch
        await _write_in_order_from(f, body, 17 * MiB)
        await f.flush()
        await f.close()
        nursery.cancel_scope.cancel()
    assert sha(await read_all(store, "back.bin", key, len(body))) == sha(bytes(body))
    assert _keys(s3, bucket) == ["back.bin"]


async def _write_in_order_from(f: Any, body: bytes | bytearray, start: int) -> None:
    for off in range(start, len(body), MiB):
        await f.write(off, bytes(body[off:off + MiB]))


async def test_a_file_renamed_truncated_or_unlinked_after_parts_were_sent_loses_nothing(
        rgw, bucket, s3, key, tmp_path) -> None:
    """The upload cannot go on as it is when the file is renamed (another key), cut short,
    or unlinked while open: the parts S3 has are completed early, the file keeps its
    content, and no object is left behind under the old name."""
    import trio

    store = make_store(rgw, bucket)
    body = data(17 * MiB)
    for name in ("ren", "cut", "gone"):
        (tmp_path / name).mkdir()
    files = {name: _writer(store, key, tmp_path / name, name) for name in ("ren", "cut", "gone")}
    async with trio.open_nursery() as nursery:
        for f in files.values():
            f.ctx.nursery = f.ctx.source.nursery = nursery
            await _write_in_order(f, body)
            await f._wait_parts()
            assert f.sent_only
        ren, cut, gone = files["ren"], files["cut"], files["gone"]
        ren.node.path = "renamed"  # FS.rename moves the node, then uploads under the new key
        await ren.flush()
        await cut.truncate(8 * MiB + 100)
        await cut.flush()
        await gone.detach_from_object()  # FS.unlink; the open handle still reads it all
        assert bytes(await gone.read(6 * MiB, 2 * MiB)) == body[6 * MiB:8 * MiB]
        assert bytes(await gone.read(16 * MiB, MiB)) == body[16 * MiB:]
        for f in files.values():
            await f.close()
        nursery.cancel_scope.cancel()
    # closed, they hold no memory the mount counts against its writers (WRITE_MEMORY)
    assert [f.ctx.write_memory.blocks for f in files.values()] == [0, 0, 0]
    assert store.stats.snapshot()["uploads_completed_early"] == 3
    assert sorted(_keys(s3, bucket)) == ["cut", "renamed"]
    assert sha(await read_all(store, "renamed", key, len(body))) == sha(body)
    assert sha(await read_all(store, "cut", key, 8 * MiB + 100)) == sha(body[:8 * MiB + 100])


async def test_blocks_of_a_part_whose_upload_failed_are_kept(rgw, bucket, s3, key,
                                                              tmp_path) -> None:
    """A part fails on its way after its blocks have left memory unspilled: they go back to
    memory, and close sends the part again from them."""
    import trio

    store = make_store(rgw, bucket)
    body = data(23 * MiB)
    f = _writer(store, key, tmp_path, "flaky.bin")
    real_upload_part = store.upload_part
    failed: list[list[int]] = []
    written = trio.Event()

    async def upload_part(s3key: str, upload_id: str, number: int, *a: Any, **kw: Any) -> str:
        if number == 2 and not failed:
            await written.wait()
            failed.append(sorted(f.in_part))
            raise FsError(errno.EIO, "injected")
        return await real_upload_part(s3key, upload_id, number, *a, **kw)

    store.upload_part = upload_part  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        f.ctx.nursery = f.ctx.source.nursery = nursery
        await _write_in_order(f, body)
        written.set()
        await f.flush()
        await f.close()
        nursery.cancel_scope.cancel()
    assert f.ctx.write_memory.blocks == 0
    # part 2's blocks were only in its buffer when it failed
    assert len(failed) == 1 and set(range(5, 10)) <= set(failed[0])
    assert sha(await read_all(store, "flaky.bin", key, len(body))) == sha(body)


async def test_a_part_on_its_way_does_not_change_when_its_blocks_are_rewritten(
        rgw, bucket, s3, key, tmp_path) -> None:
    """A part is sent as the blocks it is made of, not a copy of them.  A program that
    writes in small pieces fills its blocks in place; rewriting one while its part is on its
    way must not change the bytes being sent (a retry sends them again), and the rewrite
    reaches S3 at close."""
    import trio

    store = make_store(rgw, bucket)
    body = bytearray(data(12 * MiB))
    f = _writer(store, key, tmp_path, "patched.bin")
    real_upload_part = store.upload_part
    rewritten = trio.Event()
    seen: dict[int, bytes] = {}

    async def upload_part(s3key: str, upload_id: str, number: int, part: Any,
                          *a: Any, **kw: Any) -> str:
        if number == 2 and 2 not in seen:
            await rewritten.wait()
            seen[2] = bytes(part)  # what is on its way, after the rewrite
        return await real_upload_part(s3key, upload_id, number, part, *a, **kw)

    store.upload_part = upload_part  # type: ignore[method-assign]
    piece = 256 << 10
    async with trio.open_nursery() as nursery:
        f.ctx.nursery = f.ctx.source.nursery = nursery
        for off in range(0, len(body), piece):
            await f.write(off, bytes(body[off:off + piece]))
        sent = bytes(body[5 * MiB:10 * MiB])
        at = 7 * MiB + 1000  # inside part 2, which is on its way
        await f.write(at, b"patched")
        body[at:at + 7] = b"patched"
        rewritten.set()
        await f.flush()
        await f.close()
        nursery.cancel_scope.cancel()
    assert seen[2] == sent
    got = await read_all(store, "patched.bin", key, len(body))
    assert got[at:at + 7] == b"patched" and sha(got) == sha(bytes(body))


# --- copy ------------------------------------------------------------------------------------


@pytest.mark.servers()
async def test_copy_same_key_new_metadata_stays_on_server(rgw, bucket, s3, key) -> None:
    store = make_store(rgw, bucket)
    size = 7 * MiB  # two parts in the multipart copy
    body = data(size)
    await store.put("src.bin", body, key, {"mode": "33188", "mtime": "1"})
    down0, up0 = bytes_moved(store)

    new_meta = {"mode": "33261", "mtime": "1700000000"}
    await store.copy("src.bin", "dst.bin", key, key, new_meta, size)

    down1, up1 = bytes_moved(store)
    assert down1 - down0 < size and up1 - up0 < size, "copy moved the data through the client"
    head = await store.head("dst.bin", key)
    assert head.metadata == new_meta
    assert head.size == size
    assert head.sse_c_md5 == key.fingerprint
    assert sha(await read_all(store, "dst.bin", key, size)) == sha(body)
    # the source is untouched
    assert (await store.head("src.bin", key)).metadata == {"mode": "33188", "mtime": "1"}
    assert_keyless_get_fails(s3, bucket, "dst.bin")

    # in place (what chmod/utimens do): same object, new metadata, same data
    down2, up2 = bytes_moved(store)
    await store.copy("dst.bin", "dst.bin", key, key, {"mode": "33188"}, size)
    down3, up3 = bytes_moved(store)
    assert down3 - down2 < size and up3 - up2 < size
    assert (await store.head("dst.bin", key)).metadata == {"mode": "33188"}
    assert sha(await read_all(store, "dst.bin", key, size)) == sha(body)


@pytest.mark.servers()
async def test_copy_to_another_key_streams_or_stays_on_the_server(rgw, bucket, s3, key,
                                                                 other_key) -> None:
    """RGW (Ceph 16) refuses both server-side copies between two SSE-C keys, so the bytes pass
    through us; LocalStack (as AWS documents) copies between keys with CopyObject."""
    store = make_store(rgw, bucket)
    size = 5 * MiB + 1000  # two parts when streamed
    body = data(size)
    await store.put("old.bin", body, key, {"mode": "33188"})
    down0, up0 = bytes_moved(store)

    await store.copy("old.bin", "new.bin", key, other_key, None, size)

    down1, up1 = bytes_moved(store)
    if rgw.name == "rgw":
        assert down1 - down0 >= size and up1 - up0 >= size  # the streaming fallback did it
        assert store.caps.copy_object_sse_c is False
    else:
        assert (down1, up1) == (down0, up0)  # server-side
        assert store.caps.copy_object_sse_c is True
    assert sha(await read_all(store, "new.bin", other_key, size)) == sha(body)
    head = await store.head("new.bin", other_key)
    assert head.sse_c_md5 == other_key.fingerprint
    assert head.metadata == {"mode": "33188"}  # metadata=None keeps the source's
    await assert_eacces(store.head("new.bin", key))
    await assert_eacces(store.get_range("new.bin", 0, 10, key))
    assert_keyless_get_fails(s3, bucket, "new.bin")
    # no unfinished multipart upload is left behind (by a refused UploadPartCopy either)
    assert await store.list_multipart_uploads("") == []


@pytest.mark.servers()
async def test_copy_plain_object_to_key_encrypts(rgw, bucket, s3, key) -> None:
    store = make_store(rgw, bucket)
    size = 300_000
    body = data(size)
    await store.put("plain.bin", body, None)
    assert (await store.get_range("plain.bin", 0, size, None)) == body  # plain stays readable

    await store.copy("plain.bin", "enc.bin", None, key, {"mode": "33188"}, size)

    # CopyObject was tried (fresh store) and its plaintext result rejected
    assert store.stats.snapshot()["requests"].get("copy", 0) >= 1
    assert_keyless_get_fails(s3, bucket, "enc.bin")
    head = await store.head("enc.bin", key)
    assert head.sse_c_md5 == key.fingerprint
    assert head.metadata == {"mode": "33188"}
    assert await read_all(store, "enc.bin", key, size) == body
    assert await store.list_multipart_uploads("") == []


# --- every write path encrypts ---------------------------------------------------------------


async def _w_put(store: ObjectStore, key: Key, other: Key, body: bytes) -> str:
    await store.put("w/put", body, key)
    return "w/put"


async def _w_multipart(store: ObjectStore, key: Key, other: Key, body: bytes) -> str:
    await multipart_put(store, "w/mp", [body], key)
    return "w/mp"


async def _w_copy_same_key(store: ObjectStore, key: Key, other: Key, body: bytes) -> str:
    await store.put("w/src", body, key)
    await store.copy("w/src", "w/copy", key, key, {"mode": "33188"}, len(body))
    return "w/copy"


async def _w_copy_other_key(store: ObjectStore, key: Key, other: Key, body: bytes) -> str:
    await store.put("w/src", body, other)
    await store.copy("w/src", "w/copy", other, key, {"mode": "33188"}, len(body))
    return "w/copy"


async def _w_copy_from_plain(store: ObjectStore, key: Key, other: Key, body: bytes) -> str:
    await store.put("w/src", body, None)
    await store.copy("w/src", "w/copy", None, key, {"mode": "33188"}, len(body))
    return "w/copy"


WRITERS: dict[str, Callable[[ObjectStore, Key, Key, bytes], Awaitable[str]]] = {
    "put": _w_put,
    "multipart": _w_multipart,
    "copy_same_key": _w_copy_same_key,
    "copy_other_key": _w_copy_other_key,
    "copy_from_plain": _w_copy_from_plain,
}


@pytest.mark.servers()
@pytest.mark.parametrize("path", list(WRITERS))
async def test_every_write_is_encrypted(rgw, bucket, s3, key, other_key, path) -> None:
    store = make_store(rgw, bucket)
    body = data(70_000)
    name = await WRITERS[path](store, key, other_key, body)
    assert_keyless_get_fails(s3, bucket, name)
    assert (await store.head(name, key)).sse_c_md5 == key.fingerprint
    assert await read_all(store, name, key, len(body)) == body


# --- listing ---------------------------------------------------------------------------------


@pytest.mark.servers()
async def test_listing_streams_pages(rgw, bucket, s3) -> None:
    n = 2500
    names = [f"big/d{i % 10}/f{i:04d}" for i in range(n)]
    botolog = logging.getLogger("botocore")
    old_level = botolog.level
    botolog.setLevel(logging.WARNING)  # 2,500 setup requests at DEBUG would dominate the run
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"), names))
    finally:
        botolog.setLevel(old_level)
    store = make_store(rgw, bucket)

    pages = [p async for p in store.list_pages("big/", delimiter=None)]
    assert len(pages) > 1
    assert all(len(p.objects) <= 1000 for p in pages)
    seen = [o.key for p in pages for o in p.objects]
    assert len(seen) == n and set(seen) == set(names)
    assert all(not p.prefixes for p in pages)

    pages = [p async for p in store.list_pages("big/", delimiter="/")]
    prefixes = [q for p in pages for q in p.prefixes]
    assert sorted(prefixes) == [f"big/d{j}/" for j in range(10)]
    assert not [o for p in pages for o in p.objects]

    pages = [p async for p in store.list_pages("big/d3/", delimiter="/")]
    got = sorted(o.key for p in pages for o in p.objects)
    assert got == sorted(k for k in names if k.startswith("big/d3/"))
    assert all(o.size == 1 for p in pages for o in p.objects)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.servers()
async def test_missing_object_and_bucket_are_enoent(rgw, bucket, key) -> None:
    store = make_store(rgw, bucket)
    for k in (key, None):
        with pytest.raises(FsError) as ei:
            await store.head("nope", k)
        assert ei.value.errno == errno.ENOENT
        with pytest.raises(FsError) as ei:
            await store.get_range("nope", 0, 100, k)
        assert ei.value.errno == errno.ENOENT
    await store.check_bucket()  # the bucket that exists is fine

    gone = make_store(rgw, bucket + "-missing")
    with pytest.raises(FsError) as ei:
        await gone.check_bucket()
    assert ei.value.errno == errno.ENOENT


async def test_plain_http_is_refused(rgw, bucket, s3, key) -> None:
    with pytest.raises(ConfigError):
        MountConfig(bucket=bucket, endpoint=rgw.http_endpoint, keyfile=Path("/unused"))

    https = make_store(rgw, bucket)
    await https.put("over-https.bin", b"hello", key)

    store = make_store(rgw, bucket, endpoint=rgw.http_endpoint, ca_bundle=None, allow_http=True)
    # RGW (rgw_crypt_require_ssl) refuses SSE-C in clear (400 InvalidRequest, which the one
    # errno map makes EACCES, as it does AWS's answer); the store must not report success
    with pytest.raises(FsError) as ei:
        await store.put("over-http.bin", b"hello", key)
    assert ei.value.errno == errno.EACCES, str(ei.value)
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="over-http.bin")
    with pytest.raises(FsError) as ei:
        await store.get_range("over-https.bin", 0, 5, key)
    assert ei.value.errno == errno.EACCES, str(ei.value)


async def test_wrong_credentials_are_eacces(rgw, bucket, key, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "bogus-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "bogus-secret-key-0123456789")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    store = make_store(rgw, bucket)
    with pytest.raises(FsError) as ei:
        await store.check_bucket()
    assert ei.value.errno == errno.EACCES, str(ei.value)
    await assert_eacces(store.put("x", b"data", key))
    await assert_eacces(store.head("x", key))


# --- logs ------------------------------------------------------------------------------------


@pytest.mark.servers()
async def test_debug_log_never_shows_the_key(rgw, bucket, key) -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.DEBUG)
    handler.addFilter(RedactingFilter())
    botolog = logging.getLogger("botocore")
    old_level = botolog.level
    botolog.setLevel(logging.DEBUG)
    botolog.addHandler(handler)
    try:
        store = make_store(rgw, bucket)
        body = data(10_000)
        await store.put("log/a", body, key)
        assert await read_all(store, "log/a", key, len(body)) == body
        await store.copy("log/a", "log/b", key, key, {"mode": "33188"}, len(body))
        # RGW: the multipart copy ran; LocalStack: CopyObject did, with copy-source keys
        assert store.caps.copy_object_sse_c is (rgw.name != "rgw")
        assert await read_all(store, "log/b", key, len(body)) == body
    finally:
        botolog.removeHandler(handler)
        botolog.setLevel(old_level)
    text = buf.getvalue()
    if rgw.name == "rgw":
        assert "UploadPartCopy" in text or "upload_part_copy" in text.lower() \
            or "uploadId" in text
    assert_no_key_material(text.encode("utf-8", "surrogateescape"), "botocore DEBUG log")
    assert "<redacted>" in text
    assert "x-amz-server-side-encryption-customer-key" in text.lower()
    assert "x-amz-copy-source-server-side-encryption-customer-key" in text.lower()


# --- the lean request path -------------------------------------------------------------------


ODD_KEYS = ["lean/plain", "lean/with space+plus&amp=eq?q", "lean/ünï©ødé/ƒ", "lean/a//b",
            "lean/a/./b", "lean/x", "lean/x/y", "lean/%41%2F~tilde"]


def _same(a: Any, b: Any) -> dict[str, Any]:
    """The fields of two ObjectInfo that must agree (mtime only to the second: HEAD's
    Last-Modified has no fraction)."""
    return {f: (getattr(a, f), getattr(b, f)) for f in
            ("key", "size", "etag", "metadata", "version_id", "sse_c_md5", "sse")
            if getattr(a, f) != getattr(b, f)}


@pytest.mark.servers()
async def test_lean_path_answers_exactly_as_boto3(rgw, bucket, s3, key, other_key) -> None:
    """HEAD, ranged GET, PUT and LIST go through the lean path (:mod:`s3ssefs.wire`) unless
    boto3_only: both must see the same objects, bytes, metadata, errors and echoes, on odd
    names too, and the lean path must really be the one used."""
    lean, boto = make_store(rgw, bucket), make_store(rgw, bucket, boto3_only=True)
    assert lean.wire is not None and boto.wire is None
    bodies = {k: data(3000 + i) for i, k in enumerate(ODD_KEYS)}
    for i, (k, body) in enumerate(bodies.items()):
        writer = lean if i % 2 else boto  # each path reads what the other wrote
        info = await writer.put(k, body, key, {"mode": "33188", "mtime": str(1700000000 + i)},
                                content_type="text/plain")
        assert info.sse_c_md5 == key.fingerprint
    calls: list[str] = []
    real_send = lean.wire._send

    def counting_send(method: str, k: str | None, *a: Any, **kw: Any) -> Any:
        calls.append(method)
        return real_send(method, k, *a, **kw)

    lean.wire._send = counting_send  # type: ignore[method-assign]
    for k, body in bodies.items():
        a, b = await lean.head(k, key), await boto.head(k, key)
        assert not _same(a, b), k
        assert int(a.mtime) == int(b.mtime)
        assert a.metadata["mode"] == "33188"
        for start, end in ((0, len(body)), (17, 2049), (len(body) - 5, len(body) + 100),
                           (len(body), len(body) + 10)):
            got = await lean.get_range(k, start, end, key)
            assert got == await boto.get_range(k, start, end, key) == body[start:end], (k, start)
        for wrong in (None, other_key):
            await assert_eacces(lean.head(k, wrong))
            await assert_eacces(lean.get_range(k, 0, 10, wrong))
    # LocalStack 4.13 drops a non-ASCII key that follows a continuation token (boto3 alone
    # shows it too): one page there
    page = 3 if rgw.name == "rgw" else 1000
    for delim in ("/", None):
        got_lean = [(o.key, o.size, o.etag, o.mtime) async for p in
                    lean.list_pages("lean/", delimiter=delim, page_size=page) for o in p.objects]
        got_boto = [(o.key, o.size, o.etag, o.mtime) async for p in
                    boto.list_pages("lean/", delimiter=delim, page_size=page) for o in p.objects]
        assert got_lean == got_boto
        pre_lean = [q async for p in lean.list_pages("lean/", delimiter=delim) for q in p.prefixes]
        pre_boto = [q async for p in boto.list_pages("lean/", delimiter=delim) for q in p.prefixes]
        assert pre_lean == pre_boto
    assert sorted(k for k, *_ in got_lean) == sorted(ODD_KEYS)
    with pytest.raises(FsError) as e:
        await lean.head("lean/missing", key)
    assert e.value.errno == errno.ENOENT
    assert calls.count("HEAD") >= len(ODD_KEYS) * 3 and "GET" in calls
    assert lean.stats.snapshot().get("retries", 0) == 0  # nothing fell back to boto3
    # what the lean PUT stored, boto3 itself reads back with the same headers
    for k in ODD_KEYS[1::2]:
        r = s3.get_object(Bucket=bucket, Key=k, SSECustomerAlgorithm="AES256",
                          SSECustomerKey=key.raw)
        assert r["Body"].read() == bodies[k] and r["ContentType"] == "text/plain"
        assert r["Metadata"]["mode"] == "33188"
    assert_keyless_get_fails(s3, bucket, ODD_KEYS[1])


@pytest.mark.servers()
async def test_lean_upload_parts_are_stored_exactly(rgw, bucket, s3, key) -> None:
    """Multipart parts go through the lean path too: what they upload, boto3 reads back with
    the key, and only with it."""
    lean = make_store(rgw, bucket)
    assert lean.wire is not None
    sent: list[str] = []
    real_send = lean.wire._send

    def counting_send(method: str, k: str | None, query: str, *a: Any, **kw: Any) -> Any:
        sent.append(f"{method} {query.split('&')[0]}")
        return real_send(method, k, query, *a, **kw)

    lean.wire._send = counting_send  # type: ignore[method-assign]
    k = ODD_KEYS[-1] + ".parts"
    parts = [data(5 << 20), data(123_457)]
    upload_id = await lean.create_multipart(k, key)
    etags = [await lean.upload_part(k, upload_id, n + 1, body, key)
             for n, body in enumerate(parts)]
    await lean.complete_multipart(k, upload_id, list(zip((1, 2), etags, strict=True)), key)
    assert sent == ["PUT partNumber=1", "PUT partNumber=2"]
    r = s3.get_object(Bucket=bucket, Key=k, SSECustomerAlgorithm="AES256", SSECustomerKey=key.raw)
    assert r["Body"].read() == b"".join(parts)
    assert_keyless_get_fails(s3, bucket, k)


def test_lean_signer_matches_botocore(monkeypatch) -> None:
    """The lean path's own SigV4 (a tenth of botocore's CPU) signs byte for byte as botocore
    does, session token, query, metadata with runs of spaces and an encoded key included."""
    import datetime as dt
    import time as time_mod

    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from s3ssefs.wire import Signer

    when = dt.datetime(2026, 11, 23, 15, 4, 5, tzinfo=dt.UTC)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when)
    monkeypatch.setattr(time_mod, "gmtime", lambda *a: when.timetuple())
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "tok/en+=")
    empty_sha = hashlib.sha256(b"").hexdigest()  # what botocore puts there for no body
    headers = {"X-Amz-Content-SHA256": empty_sha, "Range": "bytes=0-9",
               "x-amz-meta-note": "two  spaces\tand tab", "Content-Length": "0"}
    path, query = "/bucket/dir/%C3%BCn%20i%2Bcode/a//b", "prefix=a%2Fb&versionId=x%2By"
    ours = Signer(creds, "eu-west-3").sign("GET", "127.0.0.1:7443", path, query, headers)
    req = AWSRequest("GET", f"https://127.0.0.1:7443{path}?{query}", headers=dict(headers))
    botocore.auth.S3SigV4Auth(creds, "s3", "eu-west-3").add_auth(req)
    theirs = dict(req.headers.items())
    for h in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
        assert ours[h] == theirs[h], h


@pytest.mark.servers()
async def test_lean_path_trusts_the_ca_boto3_trusts(rgw, bucket, key, monkeypatch) -> None:
    """Without --ca-bundle, boto3 trusts AWS_CA_BUNDLE; the lean path must too, or each of its
    attempts would fail TLS and wait for a retry."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(rgw.ca))
    store = make_store(rgw, bucket, ca_bundle=None)
    await store.put("ca.bin", b"x" * 10, key)
    assert (await store.head("ca.bin", key)).size == 10
    assert await store.get_range("ca.bin", 0, 10, key) == b"x" * 10
    assert store.stats.snapshot().get("retries", 0) == 0


@pytest.mark.servers()
def test_lean_transport_refuses_a_server_it_does_not_trust(rgw) -> None:
    """The lean path's own TLS checks the certificate: RGW's, signed by our test CA, is refused
    with the system's CAs and accepted with ours."""
    from urllib.parse import urlsplit

    from s3ssefs.http1 import ConnectionLost, Pool, tls_context

    parts = urlsplit(rgw.endpoint)
    host, port = parts.hostname or "", parts.port or 443
    untrusting = Pool(host, port, tls_context(None), maxsize=1, connect_timeout=5,
                      read_timeout=5)
    with pytest.raises(ConnectionLost, match="CERTIFICATE_VERIFY_FAILED"):
        untrusting.request("GET", "/", [("Host", parts.netloc)])
    trusting = Pool(host, port, tls_context(str(rgw.ca)), maxsize=1, connect_timeout=5,
                    read_timeout=5)
    answer = trusting.request("GET", "/", [("Host", parts.netloc)])  # anonymous ListBuckets
    # (LocalStack answers an anonymous GET / with an empty 200)
    assert answer.status == 200
    assert b"ListAllMyBucketsResult" in answer.body or rgw.name != "rgw"
    trusting.close()


@pytest.mark.allow_warnings  # each refusal is logged as the bug it would be
async def test_no_request_with_an_empty_object_key_is_ever_built(rgw, bucket, s3, key) -> None:
    """An empty object key names the bucket itself (a PUT there is CreateBucket, a DELETE
    removes it): the store refuses every such request, on both paths, before sending it."""
    store = make_store(rgw, bucket)
    calls = [store.put("", b"x", key), store.delete(""), store.head("", key),
             store.get_range("", 0, 10, key), store.create_multipart("", key),
             store.copy("", "dst", key, key, {}, 10), store.copy("src", "", key, key, {}, 10)]
    for call in calls:
        with pytest.raises(FsError) as ei:
            await call
        assert "empty object key" in str(ei.value)
    with pytest.raises(FsError):
        await store.head_many([("", key)])
    assert store.stats.snapshot().get("requests", {}) == {}
    s3.head_bucket(Bucket=bucket)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
