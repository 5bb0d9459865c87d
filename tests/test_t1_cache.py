"""Layer 1 units: the local cipher, the block cache and the write spill (no S3, no FUSE).

What a user cares about here: data comes back exactly as stored, never wrong; nothing readable
lands on local disk; the cache stays within its size and never fails a read because the disk
is full; the files go away when the mount does.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from s3ssefs import cache as cache_mod
from s3ssefs import spill as spill_mod
from s3ssefs.cache import PAGE, BlockCache
from s3ssefs.crypto import OVERHEAD, CorruptBlock, LocalCipher
from s3ssefs.spill import Spill

MARKER = b"PLAINTEXT-MARKER-4f1c" * 200
OBJECT_NAME = "photos/secret-object-name-7d2a.jpg"


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def disk_used(path: Path) -> int:
    """Bytes of disk the files under ``path`` occupy (holes take none)."""
    return sum(p.stat().st_blocks * 512 for p in files_under(path))


def make_cache(tmp_path: Path, max_bytes: int = 1 << 20) -> BlockCache:
    return BlockCache(tmp_path / "cache", max_bytes, LocalCipher())


def disk_full(real: Callable[..., int], times: int) -> Callable[..., int]:
    """A stand-in for os.write/os.pwrite that fails ``times`` times with ENOSPC, then works."""
    left = [times]

    def fake(*args: object) -> int:
        if left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    return fake


# --- LocalCipher -----------------------------------------------------------------------------


def test_cipher_round_trip_and_authentication() -> None:
    c = LocalCipher()
    blob = c.seal(memoryview(bytearray(b"hello")), b"aad")
    assert len(blob) == 5 + OVERHEAD
    assert c.open(blob, b"aad") == b"hello"
    assert c.open(memoryview(blob), b"aad") == b"hello"
    with pytest.raises(CorruptBlock):
        c.open(blob, b"other aad")
    with pytest.raises(CorruptBlock):
        c.open(blob[:-1] + bytes([blob[-1] ^ 1]), b"aad")
    with pytest.raises(CorruptBlock):
        c.open(blob[:10], b"aad")
    with pytest.raises(CorruptBlock):
        LocalCipher().open(blob, b"aad")  # another mount's key


# --- BlockCache ------------------------------------------------------------------------------


def test_cache_round_trip_and_stats(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    assert cache.get("obj", 0) is None
    cache.put("obj", 0, b"block zero")
    cache.put("obj", 1, b"")
    cache.put("obj", 0, b"block zero again")  # replacing is fine
    assert cache.get("obj", 0) == b"block zero again"
    assert cache.get("obj", 1) == b""
    assert cache.get("other", 0) is None
    assert (cache.hits, cache.misses) == (2, 2)
    assert cache.bytes_used == disk_used(tmp_path) == 2 * PAGE  # a blob takes whole pages
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700


def test_no_plaintext_or_object_names_on_disk(tmp_path: Path) -> None:
    cipher = LocalCipher()
    cache = BlockCache(tmp_path / "cache", 1 << 20, cipher)
    spill = Spill(tmp_path / "cache", cipher, block_size=8192)
    cache.put(OBJECT_NAME, 0, MARKER)
    spill.write_block(0, MARKER[:8192])
    spill.write_block(7, MARKER[:100])
    assert cache.get(OBJECT_NAME, 0) == MARKER
    files = files_under(tmp_path)
    assert len(files) == 2
    for f in files:
        raw = f.read_bytes()
        assert b"PLAINTEXT-MARKER" not in raw
        assert b"secret-object-name" not in raw
        assert "secret" not in f.name and "photos" not in f.name


def test_lru_evicts_least_recently_used_and_stays_within_size(tmp_path: Path) -> None:
    block = PAGE - OVERHEAD  # one page on disk
    cache = make_cache(tmp_path, max_bytes=3 * PAGE)
    for n in range(3):
        cache.put("obj", n, bytes([n]) * block)
    assert cache.get("obj", 0) is not None  # 0 is now the most recently used; 1 the least
    cache.put("obj", 3, b"\3" * block)
    assert cache.get("obj", 1) is None
    assert [cache.get("obj", n) for n in (0, 2, 3)] == [bytes([n]) * block for n in (0, 2, 3)]
    assert cache.bytes_used == disk_used(tmp_path) <= cache.max_bytes

    rng = random.Random(1)
    for i in range(200):
        cache.put(f"o{i % 7}", i % 5, os.urandom(rng.randrange(0, 2 * block)))
        assert cache.bytes_used == disk_used(tmp_path) <= cache.max_bytes


def test_block_larger_than_cache_is_not_stored(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, max_bytes=PAGE)
    cache.put("obj", 0, b"x" * 50)
    cache.put("obj", 1, b"y" * PAGE)
    assert cache.get("obj", 0) == b"x" * 50
    assert cache.get("obj", 1) is None


def test_invalidate_drops_only_that_object(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    for n in range(3):
        cache.put("old-version", n, b"old")
        cache.put("neighbour", n, b"keep")
    cache.invalidate("old-version")
    assert all(cache.get("old-version", n) is None for n in range(3))
    assert all(cache.get("neighbour", n) == b"keep" for n in range(3))
    assert cache.bytes_used == disk_used(tmp_path) == 3 * PAGE  # the space came back


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero"])
def test_damaged_cache_file_is_a_miss_not_wrong_data(tmp_path: Path, damage: str) -> None:
    cache = make_cache(tmp_path)
    cache.put("obj", 0, b"good data" * 100)
    (f,) = files_under(tmp_path)
    raw = bytearray(f.read_bytes())
    if damage == "flip":  # inside the blob (the slot's last page is padded with zeros)
        raw[450] ^= 0x01
        f.write_bytes(raw)
    elif damage == "truncate":
        f.write_bytes(raw[:20])
    else:
        f.write_bytes(bytes(len(raw)))
    assert cache.get("obj", 0) is None
    assert cache.bytes_used == disk_used(tmp_path) == 0
    cache.put("obj", 0, b"fresh")  # the entry works again afterwards
    assert cache.get("obj", 0) == b"fresh"


def test_swapped_cache_slot_is_a_miss(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 1 << 20, LocalCipher())
    cache.put("obj", 0, b"block 0")
    cache.put("obj", 1, b"block 1")
    (f,) = files_under(tmp_path)  # both in one slot file: slot 0 at 0, slot 1 at PAGE
    raw = f.read_bytes()
    f.write_bytes(raw[:PAGE] + raw[:PAGE])
    assert cache.get("obj", 1) is None
    assert cache.get("obj", 0) == b"block 0"


def test_leftovers_of_earlier_mounts_are_removed_other_files_kept(tmp_path: Path) -> None:
    (tmp_path / ("ab" * 32)).write_bytes(b"old sealed block")
    (tmp_path / ("cd" * 32 + ".0123abcd.tmp")).write_bytes(b"half a block")
    (tmp_path / "slots-0123456789abcdef-8").write_bytes(b"old slots")
    (tmp_path / "notes.txt").write_bytes(b"not ours")
    BlockCache(tmp_path, 1 << 20, LocalCipher())
    assert [p.name for p in files_under(tmp_path)] == ["notes.txt"]


def test_clear_and_close_delete_the_files(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    cache.put("a", 0, b"x")
    cache.clear()
    assert disk_used(tmp_path) == 0 and cache.bytes_used == 0
    cache.put("a", 0, b"x")
    cache.put("b", 5, b"y")
    cache.close()
    assert files_under(tmp_path) == []
    cache.put("a", 1, b"after close")
    assert files_under(tmp_path) == []


@pytest.mark.allow_warnings
def test_full_disk_drops_the_block_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache(tmp_path)
    monkeypatch.setattr(cache_mod.os, "pwrite", disk_full(os.pwrite, times=10**9))
    with caplog.at_level(logging.WARNING, logger="s3ssefs.cache"):
        cache.put("obj", 0, b"data")
        cache.put("obj", 1, b"data")
    monkeypatch.undo()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert cache.get("obj", 0) is None and cache.get("obj", 1) is None
    assert disk_used(tmp_path) == 0 and cache.bytes_used == 0
    cache.put("obj", 0, b"data")  # space is back
    assert cache.get("obj", 0) == b"data"


def test_full_disk_evicts_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache(tmp_path)
    cache.put("obj", 0, b"oldest" * 100)
    cache.put("obj", 1, b"newer" * 100)
    monkeypatch.setattr(cache_mod.os, "pwrite", disk_full(os.pwrite, times=1))
    cache.put("obj", 2, b"new" * 100)
    monkeypatch.undo()
    assert cache.get("obj", 2) == b"new" * 100
    assert cache.get("obj", 0) is None  # made room
    assert cache.get("obj", 1) == b"newer" * 100
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert cache.bytes_used == disk_used(tmp_path)


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def on_disk_dir(tmp_path: Path) -> Path:
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], check=True,
                          capture_output=True, text=True).stdout.strip()
    if kind in ("tmpfs", "ramfs"):
        pytest.fail(f"{tmp_path} is on {kind}: this test needs a disk file system")
    return tmp_path


def test_big_blocks_bypass_the_page_cache_fragments_stay(tmp_path: Path) -> None:
    """Blocks over 512 KiB go to disk with O_DIRECT (no page-cache copy of ciphertext), of any
    length; small blobs (random-read fragments) stay buffered, so re-reading them is cheap."""
    cache = BlockCache(on_disk_dir(tmp_path), 64 << 20, LocalCipher())
    rng = random.Random(5)
    big = {n: rng.randbytes(size) for n, size in enumerate(
        [1 << 20, (1 << 20) - 1, (1 << 20) + 3, 700 * 1024 + 5, 2 << 20, 1 << 20])}
    small = {-n - 1: rng.randbytes(64 << 10) for n in range(6)}
    for n, data in {**big, **small}.items():
        cache.put("obj", n, data)
    for n, data in {**big, **small}.items():
        assert cache.get("obj", n) == data
    slot_files = {int(f.name.rsplit("-", 1)[1]): f for f in files_under(tmp_path)}
    assert {c for c in slot_files if c >= cache_mod.DIRECT_FROM_CLASS} == {8, 9, 10}
    for cls, f in slot_files.items():
        if cls >= cache_mod.DIRECT_FROM_CLASS:
            assert resident(f) == 0, f"class {cls} went through the page cache"
        else:
            assert resident(f) >= len(small) * (64 << 10)
    assert cache.bytes_used == disk_used(tmp_path)


def test_range_read_opens_only_the_chunks_it_needs(tmp_path: Path) -> None:
    """A small read of a cached block (a random read) reads and opens only the chunks holding
    it, so it is right wherever it falls (inside a chunk, across two, at the short end),
    still right when another chunk of the block is damaged, and a miss, never wrong data,
    when one of its own chunks is."""
    cache = BlockCache(on_disk_dir(tmp_path), 64 << 20, LocalCipher())
    chunk = cache_mod.CHUNK
    data = random.Random(9).randbytes(4 * chunk + 1000)  # 5 chunks, the last 1000 bytes
    cache.put("obj", 0, data)
    ranges = [(0, 4096), (2 * chunk - 100, 2 * chunk + 4000), (3 * chunk, 4 * chunk),
              (len(data) - 1000, len(data)), (len(data) - 5, len(data)), (123, 124),
              (0, len(data))]
    for start, end in ranges:
        assert cache.get_range("obj", 0, start, end) == data[start:end], (start, end)
    assert cache.get_range("obj", 0, chunk, chunk) == b""
    assert cache.get_range("obj", 0, 0, len(data) + 1) is None  # past its end: no short data
    (f,) = files_under(tmp_path)
    sealed = chunk + OVERHEAD
    with open(f, "r+b") as fh:  # damage chunk 3 only
        fh.seek(3 * sealed + 100)
        byte = fh.read(1)
        fh.seek(3 * sealed + 100)
        fh.write(bytes([byte[0] ^ 1]))
    assert cache.get_range("obj", 0, chunk + 7, chunk + 4103) == data[chunk + 7:chunk + 4103]
    assert cache.get_range("obj", 0, 3 * chunk, 3 * chunk + 4096) is None
    assert ("obj", 0) not in cache  # a damaged block is dropped, not read again
    assert cache.bytes_used == disk_used(tmp_path) == 0


def test_chunk_moved_within_its_block_is_a_miss(tmp_path: Path) -> None:
    """Chunks are bound to their place in the block (as blocks are to object and number): a
    chunk copied over another of the same block fails to open, the untouched one still
    reads."""
    cache = BlockCache(on_disk_dir(tmp_path), 64 << 20, LocalCipher())
    chunk, sealed = cache_mod.CHUNK, cache_mod.CHUNK + OVERHEAD
    data = os.urandom(4 * chunk)
    cache.put("obj", 0, data)
    (f,) = files_under(tmp_path)
    raw = bytearray(f.read_bytes())
    raw[sealed:2 * sealed] = raw[0:sealed]  # chunk 0 copied over chunk 1
    f.write_bytes(raw)
    assert cache.get_range("obj", 0, 0, 100) == data[:100]
    assert cache.get_range("obj", 0, chunk, chunk + 100) is None


def test_o_direct_refused_at_write_goes_on_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file system that opens O_DIRECT but refuses the I/O (EINVAL, other alignment): the
    block is stored all the same, buffered from then on, without a warning."""
    cache = BlockCache(on_disk_dir(tmp_path), 64 << 20, LocalCipher())
    real = os.pwrite
    refused = []

    def picky(fd: int, data: object, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(cache_mod.os, "pwrite", picky)
    blocks = {n: os.urandom(1 << 20) for n in range(3)}
    with caplog.at_level(logging.DEBUG, logger="s3ssefs.cache"):
        for n, data in blocks.items():
            cache.put("obj", n, data)
    monkeypatch.undo()
    assert len(refused) == 1
    assert all(cache.get("obj", n) == data for n, data in blocks.items())
    (f,) = files_under(tmp_path)
    assert resident(f) >= 3 << 20  # buffered now
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_concurrent_put_get_invalidate_stays_consistent(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, max_bytes=20_000)

    def data_for(obj: str, n: int) -> bytes:
        return f"{obj}/{n};".encode() * (50 + 40 * n)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            obj, n = f"o{rng.randrange(4)}", rng.randrange(6)
            action = rng.random()
            if action < 0.45:
                cache.put(obj, n, data_for(obj, n))
            elif action < 0.95:
                assert cache.get(obj, n) in (None, data_for(obj, n))
            else:
                cache.invalidate(obj)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert cache.bytes_used == disk_used(tmp_path) <= cache.max_bytes
    cache.close()
    assert files_under(tmp_path) == []


def test_close_while_threads_read_and_write(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Closing the cache under running puts and gets fails none of them and leaves no file:
    calls in flight finish on descriptors that stay open until the last one leaves (a write
    to a closed one would warn that the cache cannot store blocks), and every call after the
    close is a miss or a no-op."""
    cache = make_cache(tmp_path, max_bytes=1024 * PAGE)
    payload = os.urandom(64 * PAGE)  # long writes: some are in flight when close() runs
    busy = threading.Event()  # the workers are well under way
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(600):
                n = rng.randrange(16)
                if rng.random() < 0.5:
                    cache.put("obj", n, payload)
                else:
                    assert cache.get("obj", n) in (None, payload)
                if i == 100:
                    busy.set()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    busy.wait()
    cache.close()
    for t in threads:
        t.join()
    assert errors == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert files_under(tmp_path) == [] and cache.bytes_used == 0
    assert cache.get("obj", 0) is None


# --- Spill -----------------------------------------------------------------------------------


def test_spill_blocks_rewrite_holes_and_drop(tmp_path: Path) -> None:
    spill = Spill(tmp_path, LocalCipher(), block_size=4096)
    full = os.urandom(4096)
    spill.write_block(0, full)
    spill.write_block(2, bytearray(b"two" * 1000))
    spill.write_block(5, memoryview(b"five"))
    spill.write_block(2, b"short")  # rewriting with less data leaves nothing of the old
    spill.write_block(3, b"")
    assert spill.read_block(0) == full
    assert spill.read_block(2) == b"short"
    assert spill.read_block(3) == b"" and spill.has_block(3)
    assert spill.read_block(5) == b"five"
    assert spill.read_block(1) is None and not spill.has_block(1)
    assert spill.read_block(99) is None
    assert spill.block_numbers() == [0, 2, 3, 5]

    spill.drop_from(2)
    assert spill.block_numbers() == [0]
    assert spill.read_block(2) is None and spill.read_block(5) is None
    assert spill.read_block(0) == full
    assert spill.path.stat().st_size <= 2 * (4096 + 64)  # blocks 2.. gave their space back
    spill.write_block(5, b"again")
    assert spill.read_block(5) == b"again"
    with pytest.raises(ValueError):
        spill.write_block(1, b"x" * 4097)


def test_spill_file_is_private_and_sparse(tmp_path: Path) -> None:
    spill = Spill(tmp_path, LocalCipher(), block_size=1 << 16)
    spill.write_block(1000, b"far away")
    st = spill.path.stat()
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size > 1000 * (1 << 16)
    assert st.st_blocks * 512 < 1 << 20
    assert spill.read_block(1000) == b"far away"


def test_spill_tampered_or_foreign_block_raises(tmp_path: Path) -> None:
    cipher = LocalCipher()
    a, b = Spill(tmp_path, cipher, 1024), Spill(tmp_path, cipher, 1024)
    a.write_block(0, b"A" * 100)
    b.write_block(0, b"B" * 100)
    b.path.write_bytes(a.path.read_bytes())  # same inode: b's fd sees a's slot
    with pytest.raises(CorruptBlock):
        b.read_block(0)
    raw = bytearray(a.path.read_bytes())
    raw[50] ^= 0x40
    a.path.write_bytes(raw)
    with pytest.raises(CorruptBlock):
        a.read_block(0)


def test_spill_close_deletes_file_and_is_idempotent(tmp_path: Path) -> None:
    spills = [Spill(tmp_path, LocalCipher(), 512) for _ in range(3)]
    assert len({s.path for s in spills}) == 3
    for s in spills:
        s.write_block(0, b"data")
        s.close()
        s.close()
    assert files_under(tmp_path) == []


def test_spill_disk_full_raises_enospc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spill = Spill(tmp_path, LocalCipher(), 512)
    monkeypatch.setattr(spill_mod.os, "pwrite", disk_full(os.pwrite, times=1))
    with pytest.raises(OSError) as info:
        spill.write_block(3, b"data")
    assert info.value.errno == errno.ENOSPC
    assert not spill.has_block(3)
    spill.write_block(3, b"data")
    assert spill.read_block(3) == b"data"


def test_spill_concurrent_writes_to_different_blocks(tmp_path: Path) -> None:
    spill = Spill(tmp_path, LocalCipher(), block_size=2048)

    def worker(t: int) -> None:
        for rnd in range(20):
            for n in range(t, 64, 8):
                spill.write_block(n, f"{n}:{rnd};".encode() * (n + 1) * 3)
                assert spill.read_block(n) == f"{n}:{rnd};".encode() * (n + 1) * 3

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert spill.block_numbers() == list(range(64))
    assert all(spill.read_block(n) == f"{n}:19;".encode() * (n + 1) * 3 for n in range(64))


# --- the queue in front of the cache ----------------------------------------------------------
class _Objects:
    """Stands in for the object store (only ``get_range``): this test is about a slow local
    disk, which the real store cannot make."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def get_range(self, key: str, start: int, end: int, sse_key: object,
                        version_id: str | None, cached: bool = True) -> bytes:
        return self.data[start:end]


async def test_slow_cache_disk_bounds_what_waits_to_be_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks fetched while the disk is stuck beyond CACHE_BACKLOG are not queued for the cache
    (each queued put holds its GET's buffer); reads are served all the same, and what was
    queued is cached once the disk moves."""
    import trio

    from s3ssefs import blocks as blocks_mod
    from s3ssefs.blocks import BlockSource, ObjectRef
    from s3ssefs.stats import Stats

    monkeypatch.setattr(blocks_mod, "CACHE_BACKLOG", 10 << 20)
    cache = BlockCache(tmp_path, 64 << 20, LocalCipher())
    disk = threading.Event()
    real_put = cache.put

    def stuck_put(*args: object) -> None:
        disk.wait(30)
        real_put(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "put", stuck_put)
    data = os.urandom(16 << 20)
    stats = Stats()
    source = BlockSource(_Objects(data), cache, 1 << 20, stats)  # type: ignore[arg-type]
    ref = ObjectRef("obj", "etag", len(data), None)
    async with trio.open_nursery() as nursery:
        source.nursery = nursery
        try:
            got = await source.blocks(ref, 0, 15)
            assert b"".join(got) == data
            queued = source.cache_backlog
            skipped = stats.snapshot().get("cache_skipped", 0)
            assert 0 < queued <= 10 << 20  # something waits for the disk, never past the bound
            assert skipped > 0  # 16 MiB fetched, at most 10 MiB queued: the rest not queued
            assert queued + skipped * (1 << 20) == len(data)
        finally:
            disk.set()
    assert source.cache_backlog == 0
    cached = [b for b in range(16) if (ref.cache_id, b) in cache]
    assert len(cached) * (1 << 20) == queued  # what was queued is cached once the disk moves
