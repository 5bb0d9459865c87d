"""Open files: where every byte read or written goes.

Reading (:class:`BlockSource`): an object is read in fixed-size blocks.  A block comes from a
small in-memory LRU, else from the encrypted on-disk :class:`~s3ssefs.cache.BlockCache`, else
from S3 — consecutive missing blocks in one ranged GET, several GETs in flight, and a block
being fetched for one reader is awaited, not fetched again, by another.  While a file is read
sequentially the readahead window doubles (4 → 64 MiB); a small random read fetches only what
it needs (and, opted into with ``random_readahead``, the region around it in the background,
handed to the kernel's page cache: :mod:`s3ssefs.pages`), and of a block in the disk cache
reads only the chunk holding it.  Fetched blocks go to the disk cache from a worker thread, off
the read's path; those a sequential reader's readahead fetches only the second time S3 is asked
for them (a file read once costs no disk writes, see ``BlockSource._admit``), and never those
of an object larger than the whole cache: an LRU cache streamed through by more than it holds
keeps none of it for the next pass (each block is evicted before it comes round again) and
loses everything else it held, so filling it would cost CPU and disk writes for no hit at
all.  ``cache_stream_max`` lowers that bound.

Writing (:class:`FileData`): written blocks live in memory while they are being filled and in
the encrypted :class:`~s3ssefs.spill.Spill` after that, so nothing acknowledged depends on
memory alone and no plaintext touches the disk.  A file above ``multipart_threshold`` becomes a
multipart upload whose parts are sent in the background as soon as the writer has filled them
(at most ``PARTS_IN_FLIGHT`` at once, which is also the writer's back-pressure), so close()
waits only for the tail.  A part rewritten after it was sent is sent again at flush.  Parts the
program never touched in an existing object are copied server-side (UploadPartCopy), so a
small change in a large file uploads only the parts it changed.  flush/fsync return when S3
has the data; if the upload fails they raise EIO and everything stays dirty for the next try.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from s3ssefs import workers
from s3ssefs.aio import gather
from s3ssefs.cache import BlockCache
from s3ssefs.crypto import CorruptBlock, LocalCipher
from s3ssefs.errors import FsError
from s3ssefs.keys import Key
from s3ssefs.meta import CTIME, MTIME
from s3ssefs.pages import KernelPages
from s3ssefs.spill import Spill
from s3ssefs.stats import Stats
from s3ssefs.store import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from s3ssefs.inodes import Node

log = logging.getLogger(__name__)

# in bytes, so they hold whatever the block size: one ranged GET fetches at most MAX_GET
# bytes; a sequential reader's window starts at READAHEAD_START and doubles to READAHEAD_MAX.
# It is topped up whenever a GET's worth of it (at most half of it) has been read, not only
# at half: from a far server, whose GETs are bound by latency, that keeps 6.9 GETs in flight
# on average instead of 6.3 (235 -> 246 MiB/s through tests/bench/farproxy.py); the same near
MAX_GET = 8 << 20
# a random read of a block we do not have fetches only the FRAGMENT-aligned bytes around it
# (a 4 KiB read costs a 64 KiB GET, not a whole block: less for the server to decrypt and
# send); fragments stay in a small memory LRU and in the encrypted disk cache (as negative
# block numbers), so reading the same places again is local
FRAGMENT = 64 << 10
FRAGMENT_MEM = 32 << 20
READAHEAD_START = 4 << 20
READAHEAD_MAX = 64 << 20
PARTS_IN_FLIGHT = 4
# cached blocks wanted at once are read by up to CACHE_READERS threads, CACHE_READ_RUN or more
# each (one thread per block would cost more in hand-offs than it saves)
CACHE_READERS = 4
CACHE_READ_RUN = 4
CACHE_BACKLOG = 64 << 20
# blocks a sequential reader's readahead fetched once and did not cache, remembered (by name
# only) so that fetching one again caches it: at most this many, oldest forgotten first
SEEN_MAX = 1 << 20
# random_readahead: regions whose GETs are queued or running at once (more random misses in
# new regions meanwhile fetch fragments only): enough to keep the streams busy, and a reader
# that stops leaves at most this many regions to fetch
REGIONS_PENDING = 8
# blocks a sequential reader has read whole that memory keeps before letting go (FileData._served)
SERVED_LAG = 4
Buf = bytes | bytearray | memoryview
# hands fetched blocks {block number: content} of an object version to the kernel's page
# cache for the file being read; whether they all went (see FileData._publish)
Publish = Callable[["ObjectRef", dict[int, Buf]], Awaitable[bool]]


@dataclass(frozen=True)
class ObjectRef:
    """One version of one object, as the reader needs it."""

    s3key: str
    etag: str
    size: int
    sse_key: Key | None
    version_id: str | None = None

    @property
    def cache_id(self) -> str:
        return f"{self.s3key}\0{self.version_id or ''}\0{self.etag}"


class BlockSource:
    """Blocks of objects: memory LRU → disk cache → ranged GETs, deduplicated."""

    def __init__(self, store: ObjectStore, cache: BlockCache, block_size: int, stats: Stats,
                 mem_bytes: int = 256 << 20, stream_max: int | None = None,
                 random_ahead: int = 0) -> None:
        self.store = store
        self.cache = cache
        # readahead of an object larger than this is not cached (see _fetch_run)
        self.stream_max = cache.max_bytes if stream_max is None else stream_max
        self.bs = block_size
        self.stats = stats
        self.mem: OrderedDict[tuple[str, int], Buf] = OrderedDict()
        self.mem_bytes = 0
        self.mem_max = mem_bytes
        self.max_get_blocks = max(1, MAX_GET // block_size)
        self.frags: OrderedDict[tuple[str, int], Buf] = OrderedDict()
        self.frag_bytes = 0
        self.inflight: dict[tuple[str, int], trio.Event] = {}
        self.nursery: trio.Nursery | None = None
        self.cache_backlog = 0  # bytes handed to _cache_put and not yet written
        # readahead blocks fetched once and not cached (see _admit)
        self.seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.seen_max = min(SEEN_MAX, max(1024, 2 * cache.max_bytes // block_size))
        # random_readahead, in blocks (0: off); regions fetched lately, and whether they went
        # to the kernel's page cache instead of the disk cache (see region_prefetch)
        self.region = -(-random_ahead // block_size) if random_ahead > 0 else 0
        self.regions: OrderedDict[tuple[str, int], bool] = OrderedDict()
        self.regions_max = max(64, cache.max_bytes // max(1, self.region * block_size))
        self.regions_pending = 0

    def _mem_get(self, k: tuple[str, int]) -> Buf | None:
        data = self.mem.get(k)
        if data is not None:
            self.mem.move_to_end(k)
        return data

    def _mem_put(self, k: tuple[str, int], data: Buf) -> None:
        old = self.mem.pop(k, None)
        if old is not None:
            self.mem_bytes -= len(old)
        self.mem[k] = data
        self.mem_bytes += len(data)
        while self.mem_bytes > self.mem_max and self.mem:
            _, ev = self.mem.popitem(last=False)
            self.mem_bytes -= len(ev)

    def nblocks(self, ref: ObjectRef) -> int:
        return math.ceil(ref.size / self.bs)

    async def blocks(self, ref: ObjectRef, first: int, last: int) -> list[Buf]:
        """Blocks ``first..last`` (inclusive) of ``ref``; the last one may be short."""
        last = min(last, self.nblocks(ref) - 1)
        if last < first:
            return []
        cid = ref.cache_id
        out: dict[int, Buf] = {}
        for b in range(first, last + 1):
            data = self._mem_get((cid, b))
            if data is not None:
                out[b] = data
        if len(out) == last - first + 1:
            self.stats.add("cache_hits", len(out))
            return [out[b] for b in range(first, last + 1)]
        await self._ensure(ref, [b for b in range(first, last + 1) if b not in out])
        for b in range(first, last + 1):
            if b not in out:
                data = self._mem_get((cid, b))
                if data is None:  # evicted between fetch and now: fetch it alone
                    await self._fetch_run(ref, b, b)
                    data = self._mem_get((cid, b))
                    if data is None:
                        raise FsError(errno.EIO, f"block {b} of {ref.s3key} vanished")
                out[b] = data
        return [out[b] for b in range(first, last + 1)]

    async def _ensure(self, ref: ObjectRef, wanted: list[int], stream: bool = False,
                      disk: bool = True) -> None:
        """Bring ``wanted`` blocks into memory: wait for in-flight ones, read cached ones,
        fetch the rest in runs of consecutive blocks (``stream``: for a sequential reader's
        readahead, see :meth:`_fetch_run`; ``disk=False``: keep them out of the disk cache)."""
        cid = ref.cache_id
        waits = [self.inflight[(cid, b)] for b in wanted if (cid, b) in self.inflight]
        todo = [b for b in wanted if (cid, b) not in self.inflight and (cid, b) not in self.mem]
        on_disk = [b for b in todo if (cid, b) in self.cache]  # no thread hop for a sure miss
        if on_disk:
            cached = await self._cache_get(cid, on_disk)
            hits = {b: d for b, d in cached.items() if d is not None}
            self.stats.add("cache_hits", len(hits))
            for b, d in hits.items():
                self._mem_put((cid, b), d)
            todo = [b for b in todo if b not in hits]
            waits += [self.inflight[(cid, b)] for b in todo if (cid, b) in self.inflight]
            todo = [b for b in todo if (cid, b) not in self.inflight]
        runs: list[tuple[int, int]] = []
        for b in todo:
            if runs and runs[-1][1] == b - 1 and b - runs[-1][0] < self.max_get_blocks:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((b, b))
        if runs:
            self.stats.add("cache_misses", len(todo))
            # claimed now, before the GETs' tasks start: a read or readahead that comes in
            # meanwhile waits for them instead of fetching the same blocks again
            claims = {b: trio.Event() for b in todo}
            for b, ev in claims.items():
                self.inflight[(cid, b)] = ev
            try:
                await gather(partial(self._fetch_run, ref, a, z, stream, disk,
                                     {b: claims[b] for b in range(a, z + 1)})
                             for a, z in runs)
            finally:
                self._release(cid, claims)  # those of runs that never started
        for ev in waits:
            await ev.wait()

    def _release(self, cid: str, events: dict[int, trio.Event]) -> None:
        for b, ev in events.items():
            if self.inflight.get((cid, b)) is ev:
                del self.inflight[(cid, b)]
            ev.set()

    async def _cache_get(self, cid: str, blocks: list[int]) -> dict[int, Buf | None]:
        """Read ``blocks`` from the disk cache, several threads at once for a long run: the
        cache reads the disk directly (no page cache), so serial reads would wait for each."""
        def read(part: list[int]) -> dict[int, Buf | None]:
            return {b: self.cache.get(cid, b) for b in part}

        n = min(CACHE_READERS, -(-len(blocks) // CACHE_READ_RUN))
        if n <= 1:
            return await workers.run_sync(read, blocks)
        size = -(-len(blocks) // n)
        out: dict[int, Buf | None] = {}

        async def read_into_out(part: list[int]) -> None:
            out.update(await workers.run_sync(read, part))

        await gather(partial(read_into_out, blocks[i:i + size])
                     for i in range(0, len(blocks), size))
        return out

    async def _fetch_run(self, ref: ObjectRef, first: int, last: int,
                         stream: bool = False, disk: bool = True,
                         claimed: dict[int, trio.Event] | None = None) -> None:
        """GET blocks ``first..last`` into memory, then those :meth:`_admit` lets in into the
        disk cache (a sequential reader's readahead, ``stream``, only from its second pass;
        none with ``disk=False``).  ``claimed``: their in-flight events, registered by the
        caller; else those not in flight are registered here."""
        cid = ref.cache_id
        events = claimed
        if events is None:
            events = {}
            for b in range(first, last + 1):
                if (cid, b) not in self.inflight:
                    events[b] = self.inflight[(cid, b)] = trio.Event()
        admit = self._admit(ref, first, last, stream) if disk else set()
        try:
            start, end = first * self.bs, min((last + 1) * self.bs, ref.size)
            data = await self.store.get_range(ref.s3key, start, end, ref.sse_key, ref.version_id,
                                              cached=bool(admit))
            if len(data) != end - start:
                raise FsError(errno.EIO, f"short read of {ref.s3key}: object changed?")
            view = memoryview(data)  # blocks share the GET's buffer: no copy per block
            blocks = {b: view[(b - first) * self.bs:(b - first + 1) * self.bs]
                      for b in range(first, last + 1)}
            for b, d in blocks.items():
                self._mem_put((cid, b), d)
        finally:
            self._release(cid, events)
        if admit:
            self._queue_cache_put(cid, {b: d for b, d in blocks.items() if b in admit})
        if len(admit) < len(blocks):
            self.stats.add("cache_streamed", len(blocks) - len(admit))

    def _admit(self, ref: ObjectRef, first: int, last: int, stream: bool) -> set[int]:
        """Which of blocks ``first..last`` go to the disk cache once fetched.

        A block a reader asks for: always.  A block of a sequential reader's readahead: only
        the second time it is fetched from S3 in this mount, and never in an object larger
        than ``stream_max``.  Most big files are read once, start to end (a copy, a backup,
        a video), and a file read again within a mount is mostly still in the kernel's page
        cache (FS.open keeps it), so a first pass that sealed and wrote every block would cost
        a cold read about a third of its speed here for blocks nobody asks for again; a block
        fetched a second time is one the page cache let go, and is kept.  Scan-resistant
        caches admit the same way (2Q's ghost list, TinyLFU's doorkeeper).
        """
        blocks = range(first, last + 1)
        if not stream:
            return set(blocks)
        if ref.size > self.stream_max:
            return set()
        cid, seen, admit = ref.cache_id, self.seen, set()
        for b in blocks:
            if (cid, b) in seen:
                del seen[(cid, b)]
                admit.add(b)
            else:
                seen[(cid, b)] = None
        while len(seen) > self.seen_max:
            seen.popitem(last=False)
        return admit

    def _queue_cache_put(self, cid: str, blocks: dict[int, Buf]) -> None:
        """Write ``blocks`` to the disk cache in the background, unless CACHE_BACKLOG bytes
        already wait for a disk slower than the network: then they are not cached (each
        waiting put holds its GET's buffer, so an unbounded queue would grow memory)."""
        if self.nursery is None:
            return
        size = sum(len(d) for d in blocks.values())
        if self.cache_backlog + size > CACHE_BACKLOG:
            self.stats.add("cache_skipped", len(blocks))
            return
        self.cache_backlog += size
        self.nursery.start_soon(self._cache_put, cid, blocks, size)

    async def _cache_put(self, cid: str, blocks: dict[int, Buf], size: int) -> None:
        try:
            await workers.run_sync(lambda: [self.cache.put(cid, b, d)
                                            for b, d in blocks.items()])
        except Exception as e:  # only a cache: a failure costs a later GET, nothing more
            log.debug("caching blocks failed: %s", e)
        finally:
            self.cache_backlog -= size

    def prefetch(self, ref: ObjectRef, first: int, last: int) -> None:
        """Start fetching blocks in the background; errors are left to the real read."""
        last = min(last, self.nblocks(ref) - 1)
        cid = ref.cache_id
        want = [b for b in range(first, last + 1)
                if (cid, b) not in self.mem and (cid, b) not in self.inflight]
        if not want or self.nursery is None:
            return
        self.nursery.start_soon(self._background_ensure, ref, want, True, "readahead")

    async def _background_ensure(self, ref: ObjectRef, want: list[int], stream: bool,
                                 what: str, disk: bool = True) -> bool:
        """:meth:`_ensure` as a background task: nothing it meets may take the mount down,
        and the real read meets any error again.  Whether it succeeded."""
        try:
            await self._ensure(ref, want, stream=stream, disk=disk)
        except Exception as e:
            log.debug("%s of %s failed: %s", what, ref.s3key, e)
            return False
        return True

    def region_prefetch(self, ref: ObjectRef, b: int, last: int,
                        publish: Publish | None = None) -> None:
        """``random_readahead``: fetch, in the background, the blocks of the region around
        block ``b`` (no further than block ``last``) that are neither in memory nor in the
        disk cache, so that later random reads there cost no request.  ``publish``, if the
        reader's file may take them, hands the fetched blocks to the kernel's page cache
        (see :mod:`s3ssefs.pages`); else, or if it declines them at the end, they go to the
        disk cache.

        Off by default.  It pays when a program reads most of a large file in random order
        (a shuffle over a training set): then the file is soon fetched in large GETs,
        several at once, and the random reads are served locally.  It costs a sparse reader
        (lookups here and there) a whole region per read, and on a server that shares the
        machine's cores those background GETs slow the reader's own: the README's
        performance section has the figures.

        A region is fetched once while it is remembered (as many as the disk cache holds,
        most recently read first): its blocks are kept at once, not from their second fetch
        as readahead's are (:meth:`_admit`).  Fetched again whenever memory let them go, a
        file larger than the memory LRU was downloaded over and over by one reader: 2,000
        reads of 1 GiB ran at 1.1x boto3 serial instead of 1.9x, on 1.6x the CPU.  The
        exception is a region handed to the kernel: a read of it that reaches us and finds
        its block in neither memory nor the disk cache means the kernel has let the pages
        go, and the region is fetched again."""
        if not self.region or self.nursery is None:
            return
        cid, r = ref.cache_id, b // self.region
        if (cid, r) in self.regions:
            if not (self.regions[(cid, r)] and (cid, b) not in self.mem
                    and (cid, b) not in self.inflight and (cid, b) not in self.cache):
                self.regions.move_to_end((cid, r))
                return
            del self.regions[(cid, r)]  # the kernel's pages of it are gone: fetch it again
        if self.regions_pending >= REGIONS_PENDING:
            return  # a reader outrunning the GETs: its reads fetch fragments meanwhile
        first, last = r * self.region, min(last, (r + 1) * self.region - 1,
                                           self.nblocks(ref) - 1)
        want = [x for x in range(first, last + 1)
                if (cid, x) not in self.mem and (cid, x) not in self.inflight
                and (cid, x) not in self.cache]
        self.regions[(cid, r)] = False
        while len(self.regions) > self.regions_max:
            self.regions.popitem(last=False)
        if not want:
            return
        self.stats.add("random_ahead_blocks", len(want))
        self.regions_pending += 1
        self.stats.set("random_ahead_pending", self.regions_pending)

        async def run() -> None:
            try:
                if not await self._background_ensure(ref, want, False, "random readahead",
                                                     disk=publish is None):
                    self.regions.pop((cid, r), None)  # a later read there tries again
                elif publish is not None:
                    await self._publish_region(ref, r, want, publish)
            finally:
                self.regions_pending -= 1
                self.stats.set("random_ahead_pending", self.regions_pending)

        self.nursery.start_soon(run)

    async def _publish_region(self, ref: ObjectRef, r: int, fetched: list[int],
                              publish: Publish) -> None:
        """Hand the fetched blocks of region ``r`` to the kernel; those it does not take go
        to the disk cache, as they would have without ``publish``."""
        cid = ref.cache_id
        blocks: dict[int, Buf] = {}
        for x in fetched:
            d = self._mem_get((cid, x))
            if d is not None:
                blocks[x] = d
        if await publish(ref, blocks):
            self.stats.add("random_ahead_to_kernel", len(blocks))
            if (cid, r) in self.regions:
                self.regions[(cid, r)] = True
        elif blocks:
            self._queue_cache_put(cid, blocks)

    def drop(self, ref: ObjectRef, b: int) -> None:
        """Let memory go of block ``b`` (a sequential reader is done with it, see
        :meth:`FileData._served`)."""
        data = self.mem.pop((ref.cache_id, b), None)
        if data is not None:
            self.mem_bytes -= len(data)

    def forget(self, ref: ObjectRef) -> None:
        cid = ref.cache_id
        for k in [k for k in self.mem if k[0] == cid]:
            self.mem_bytes -= len(self.mem.pop(k))
        for k in [k for k in self.frags if k[0] == cid]:
            self.frag_bytes -= len(self.frags.pop(k))

    async def piece(self, ref: ObjectRef, start: int, end: int) -> Buf:
        """Bytes ``[start, end)`` of ``ref`` (inside one block) for a small random read:
        from the block in memory, else the chunks of it the disk cache holds that cover the
        range (not the whole block), else fragments.  It does not wait for the block if a GET
        of it is under way: that GET may be 8 MiB long, or still queued behind others, and a
        fragment takes one short request."""
        cid = ref.cache_id
        b = start // self.bs
        lo, hi = start - b * self.bs, end - b * self.bs
        block = self._mem_get((cid, b))
        got: Buf | None = None
        if block is not None and len(block) >= hi:
            got = memoryview(block)[lo:hi]
        elif (cid, b) in self.cache:
            got = await workers.run_sync(self.cache.get_range, cid, b, lo, hi)
        if got is None:
            return await self.fragments(ref, start, end)
        self.stats.add("cache_hits")
        return got

    async def fragments(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``ref`` (inside one block) for a random read: from the
        fragment LRU, else one GET of the missing FRAGMENT-aligned span."""
        cid = ref.cache_id
        first, last = start // FRAGMENT, (end - 1) // FRAGMENT
        have: dict[int, Buf | None] = {f: self.frags.get((cid, f))
                                       for f in range(first, last + 1)}
        # ask the disk cache (in a thread) only for what its index holds: a cold read would
        # otherwise pay a thread round trip for nothing
        on_disk = [f for f, d in have.items() if d is None and (cid, _frag_block(f)) in self.cache]
        if on_disk:
            cached = await workers.run_sync(
                lambda: {f: self.cache.get(cid, _frag_block(f)) for f in on_disk})
            for f, d in cached.items():
                if d is not None:
                    have[f] = d
                    self._frag_put((cid, f), d)
        missing = [f for f, d in have.items() if d is None]
        if missing:
            lo, hi = missing[0] * FRAGMENT, min((missing[-1] + 1) * FRAGMENT, ref.size)
            data = await self.store.get_range(ref.s3key, lo, hi, ref.sse_key, ref.version_id)
            if len(data) != hi - lo:
                raise FsError(errno.EIO, f"short read of {ref.s3key}: object changed?")
            self.stats.add("fragment_gets")
            got = {}
            for f in range(missing[0], missing[-1] + 1):
                piece = bytes(data[(f - missing[0]) * FRAGMENT:(f - missing[0] + 1) * FRAGMENT])
                have[f] = got[_frag_block(f)] = piece
                self._frag_put((cid, f), piece)
            self._queue_cache_put(cid, got)
        for f in have:
            self.frags.move_to_end((cid, f))
        joined = b"".join(have[f] or b"" for f in range(first, last + 1))
        return joined[start - first * FRAGMENT:end - first * FRAGMENT]

    def _frag_put(self, k: tuple[str, int], data: Buf) -> None:
        old = self.frags.pop(k, None)
        self.frag_bytes += len(data) - (len(old) if old is not None else 0)
        self.frags[k] = data
        while self.frag_bytes > FRAGMENT_MEM and self.frags:
            _, ev = self.frags.popitem(last=False)
            self.frag_bytes -= len(ev)


def _frag_block(f: int) -> int:
    """The disk cache's block number for fragment ``f`` (negative: never a real block)."""
    return -1 - f


@dataclass
class Ctx:
    """What open files need from the mount."""

    store: ObjectStore
    source: BlockSource
    cipher: LocalCipher
    spill_dir: Path
    block_size: int
    part_size: int
    multipart_threshold: int
    s3key: Callable[[str], str]
    write_key: Callable[[], Key | None]
    metadata: Callable[[Node], dict[str, str]]
    nursery: trio.Nursery | None = None
    stats: Stats = field(default_factory=Stats)
    pages: KernelPages | None = None  # the kernel's page cache, once the FUSE session is up


@dataclass
class _Upload:
    s3key: str
    upload_id: str
    sse_key: Key | None
    meta: dict[str, str]  # what it was created with (no times: see _upload_meta)
    sent: dict[int, tuple[str, int]] = field(default_factory=dict)  # part → (etag, gen)
    running: dict[int, trio.Event] = field(default_factory=dict)
    error: FsError | None = None


def _upload_meta(meta: dict[str, str]) -> dict[str, str]:
    """Metadata for a streamed upload, created while the program is still writing: without
    mtime/ctime, which are not known yet; S3's LastModified (the completion, about close()
    time) stands in for them, as s3fs also reads it."""
    return {k: v for k, v in meta.items() if k not in (MTIME, CTIME)}


class FileData:
    """The content of one open file, shared by all its handles."""

    def __init__(self, ctx: Ctx, node: Node, base: ObjectRef | None) -> None:
        self.ctx = ctx
        self.node = node
        self.bs = ctx.block_size
        self.ps = ctx.part_size
        self.base = base
        self.size = base.size if base else 0
        self.base_valid = self.size
        self.spill: Spill | None = None
        # blocks being written: a bytearray, or the FUSE write's own buffer for a whole block
        self.mem: OrderedDict[int, Buf] = OrderedDict()
        self.mem_max = self.ps // self.bs + 2
        self.local: set[int] = set()  # blocks whose content is ours (mem or spill)
        self.part_gen: dict[int, int] = {}
        self.upload: _Upload | None = None
        self.dirty = base is None  # a new file must be uploaded even if empty
        self.unlinked = False
        # open handles writing, or reading past the page cache (O_DIRECT): while there is
        # one, nothing fetched is handed to the kernel's page cache (see _publish)
        self.page_blockers = 0
        self.lock = trio.Lock()
        self._part_slots = trio.Semaphore(PARTS_IN_FLIGHT)
        self._seq_next = 0
        self._served_blocks: deque[int] = deque()  # see _served
        self._window = 0
        self._ahead_to = -1

    # ------------------------------------------------------------------ block contents
    def _extent(self, b: int) -> int:
        """Bytes of block ``b`` inside the file."""
        return max(0, min(self.bs, self.size - b * self.bs))

    async def _local_block(self, b: int) -> Buf:
        data = self.mem.get(b)
        if data is not None:
            return data
        spill = self.spill
        assert spill is not None
        try:
            got = await workers.run_sync(spill.read_block, b)
        except CorruptBlock:
            raise FsError(errno.EIO, f"spill block {b} of {self.node.path} corrupt") from None
        return got or b""

    async def _base_blocks(self, first: int, last: int) -> dict[int, Buf]:
        """Base-object content of blocks ``first..last``, cut at ``base_valid``."""
        if self.base is None or first * self.bs >= self.base_valid:
            return {}
        last = min(last, (self.base_valid - 1) // self.bs)
        blocks = await self.ctx.source.blocks(self.base, first, last)
        out = {}
        for i, data in enumerate(blocks):
            b = first + i
            keep = self.base_valid - b * self.bs
            out[b] = data if keep >= len(data) else data[:keep]
        return out

    async def _blocks(self, first: int, last: int) -> list[Buf]:
        """Logical content of blocks ``first..last``, each exactly its extent long."""
        base_wanted = [b for b in range(first, last + 1) if b not in self.local]
        base = await self._base_blocks(min(base_wanted), max(base_wanted)) if base_wanted else {}
        out: list[Buf] = []
        for b in range(first, last + 1):
            data = await self._local_block(b) if b in self.local else base.get(b, b"")
            ext = self._extent(b)
            if len(data) < ext:
                data = bytes(data) + bytes(ext - len(data))
            elif len(data) > ext:
                data = data[:ext]
            out.append(data)
        return out

    async def _range(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        first, last = start // self.bs, (end - 1) // self.bs
        blocks = await self._blocks(first, last)
        buf = b"".join(blocks)
        off = start - first * self.bs
        return buf[off:off + (end - start)]

    # ------------------------------------------------------------------ read
    async def read(self, off: int, size: int) -> Buf:
        end = min(off + size, self.size)
        if end <= off:
            return b""
        self._readahead(off, end)
        first = off // self.bs
        source = self.ctx.source
        if (not self._window and self.base is not None and end <= self.base_valid
                and first == (end - 1) // self.bs and first not in self.local
                and end - off <= self.bs // 4):
            # a small random read: what it needs of a block we have, else fetch just around it
            # (and with random_readahead, the region around it in the background)
            if source.region:  # the page-cache check only when there is a region to fetch
                source.region_prefetch(self.base, first, (self.base_valid - 1) // self.bs,
                                       self._publish if self._pages_ok(self.base) else None)
            return await source.piece(self.base, off, end)
        if first == (end - 1) // self.bs and first not in self.local:
            # within one block of the object (the kernel's 1 MiB reads are one block each):
            # hand FUSE a view of it, no copy.  Not for a block written here: that may be a
            # bytearray, which an exported view would stop from growing
            (block,) = await self._blocks(first, first)
            start = off - first * self.bs
            if self._window and self.base is not None and start + (end - off) == len(block) \
                    and end <= self.base_valid:
                self._served(first)
            return memoryview(block)[start:start + (end - off)]
        return await self._range(off, end)

    def _served(self, b: int) -> None:
        """A sequential reader has had all of block ``b``: memory lets it go, SERVED_LAG
        blocks later.

        The kernel now holds the block in its page cache and the reader will not ask for it
        again, so keeping it would only duplicate those pages; memory is for the blocks
        readahead fetched ahead of the reader.  Dropped, the blocks a 1 GiB read passes
        through reuse a few readahead windows' worth of memory instead of filling the whole
        LRU with freshly faulted pages: a cold read made a quarter of the page faults, on 7%
        less daemon CPU.  The lag is for a readahead task started before this read but not
        yet run: it would find the block gone and fetch it again."""
        assert self.base is not None
        self._served_blocks.append(b)
        if len(self._served_blocks) > SERVED_LAG:
            self.ctx.source.drop(self.base, self._served_blocks.popleft())

    def _pages_ok(self, ref: ObjectRef) -> bool:
        """Whether the file's content is exactly object version ``ref``, with no handle that
        writes or reads past the page cache: then its pages may be filled for the kernel."""
        return (self.ctx.pages is not None and self.ctx.pages.enabled
                and self.node.data is self and ref == self.base and not self.page_blockers
                and not self.local and not self.dirty and self.upload is None
                and self.size == self.base_valid == ref.size)

    async def _publish(self, ref: ObjectRef, blocks: dict[int, Buf]) -> bool:
        """Hand ``blocks`` of ``ref`` to the kernel's page cache if the file still is
        exactly ``ref`` (checked again: a writer may have opened it since the fetch began),
        so that reads of them no longer reach the daemon."""
        if not blocks or not self._pages_ok(ref):
            return False
        assert self.ctx.pages is not None
        return await self.ctx.pages.put(self.node.ino, [(b * self.bs, blocks[b])
                                                        for b in sorted(blocks)])

    def _readahead(self, off: int, end: int) -> None:
        """Grow the window while reads stay sequential; prefetch base blocks ahead."""
        if off == self._seq_next:
            self._window = min(max(self._window * 2, max(1, READAHEAD_START // self.bs)),
                               max(1, READAHEAD_MAX // self.bs))
        else:
            self._window = 0
            self._ahead_to = -1
        self._seq_next = end
        if not self._window or self.base is None:
            return
        cur = (end - 1) // self.bs
        step = min(self.ctx.source.max_get_blocks, self._window // 2)
        if self._ahead_to - cur > self._window - step:
            return  # less than a GET's worth (or half a small window) to top up
        first = max(cur + 1, self._ahead_to + 1)
        last = min(cur + self._window, (self.base_valid - 1) // self.bs)
        last_clean = last
        while last_clean >= first and last_clean in self.local:
            last_clean -= 1
        if last_clean >= first:
            self.ctx.source.prefetch(self.base, first, last_clean)
        self._ahead_to = max(self._ahead_to, last)

    # ------------------------------------------------------------------ write
    async def write(self, off: int, data: bytes) -> int:
        async with self.lock:
            n = len(data)
            end = off + n
            pos = off
            view = memoryview(data)
            while pos < end:
                b = pos // self.bs
                s = pos - b * self.bs
                e = min(self.bs, end - b * self.bs)
                chunk = view[pos - off:pos - off + (e - s)]
                if s == 0 and e == self.bs:
                    # a whole block (the kernel's 1 MiB writes): keep the write's buffer as
                    # it is, no copy; it is never changed in place (bytes or a view of bytes)
                    self.mem.pop(b, None)
                    self.mem[b] = data if len(chunk) == n else chunk
                else:
                    blk = self.mem.get(b)
                    if not isinstance(blk, bytearray):
                        if blk is None:
                            blk = (await self._blocks(b, b))[0] if b * self.bs < self.size \
                                else b""
                        blk = bytearray(blk)
                        self.mem[b] = blk
                    self.mem.move_to_end(b)
                    if len(blk) < s:
                        blk.extend(bytes(s - len(blk)))
                    blk[s:e] = chunk
                self.local.add(b)
                p = b * self.bs // self.ps
                self.part_gen[p] = self.part_gen.get(p, 0) + 1
                pos = b * self.bs + e
            self.size = max(self.size, end)
            self.dirty = True
            await self._evict_mem()
            await self._stream_parts(end)
        return n

    async def _evict_mem(self, keep: int | None = None) -> None:
        """Move blocks beyond the in-memory budget to the encrypted spill."""
        keep = self.mem_max if keep is None else keep
        while len(self.mem) > keep:
            b, blk = self.mem.popitem(last=False)
            await self._spill_write(b, blk)

    async def _spill_write(self, b: int, blk: Buf) -> None:
        if self.spill is None:
            self.spill = Spill(self.ctx.spill_dir, self.ctx.cipher, self.bs)
        spill = self.spill
        try:
            # blk left self.mem: nothing changes it while the thread seals it
            await workers.run_sync(spill.write_block, b, blk)
        except OSError as e:
            self.mem[b] = bytearray(blk)  # keep it: nothing acknowledged is dropped
            raise FsError(e.errno or errno.EIO, f"spill write failed: {e.strerror}") from None

    async def truncate(self, new_size: int) -> None:
        async with self.lock:
            await self._wait_parts()
            if new_size < self.size:
                nb = math.ceil(new_size / self.bs)
                for b in [b for b in self.local if b >= nb]:
                    self.local.discard(b)
                    self.mem.pop(b, None)
                if self.spill is not None:
                    await workers.run_sync(self.spill.drop_from, nb)
                if new_size % self.bs:
                    b = new_size // self.bs
                    blk = (await self._blocks(b, b))[0]
                    self.mem[b] = bytearray(blk[:new_size - b * self.bs])
                    self.local.add(b)
                self.base_valid = min(self.base_valid, new_size)
                first_part = new_size // self.ps
                for p in list(self.part_gen):
                    if p >= first_part:
                        self.part_gen[p] += 1
            else:
                # the part holding the old end grows: its sent copy is stale
                p = self.size // self.ps
                self.part_gen[p] = self.part_gen.get(p, 0) + 1
            self.size = new_size
            self.dirty = True

    # ------------------------------------------------------------------ streaming parts
    async def _stream_parts(self, written_to: int) -> None:
        """Send every part the writer has completely filled (in the background)."""
        if self.size <= self.ctx.multipart_threshold and self.upload is None:
            return
        last_full = written_to // self.ps - 1
        # only the parts just behind the writer: a sequential writer completes them in order,
        # and any other part is sent at flush (scanning from part 0 would cost O(parts) a write)
        for p in range(max(0, last_full - 1), last_full + 1):
            up = self.upload
            gen = self.part_gen.get(p)
            if gen is None:
                continue
            if up is not None and (up.sent.get(p, ("", -1))[1] == gen or p in up.running):
                continue
            first, last = p * self.ps // self.bs, ((p + 1) * self.ps - 1) // self.bs
            if any(b not in self.local for b in range(first, last + 1)):
                continue  # part mixes old data: copied or assembled at flush
            await self._start_part(p, gen)

    async def _ensure_upload(self) -> _Upload:
        if self.upload is None:
            key = self.ctx.write_key()
            s3key = self.ctx.s3key(self.node.path)
            meta = _upload_meta(self.ctx.metadata(self.node))
            uid = await self.ctx.store.create_multipart(s3key, key, meta)
            if self.upload is None:
                self.upload = _Upload(s3key, uid, key, meta)
            else:  # another task created one meanwhile
                await self.ctx.store.abort_multipart(s3key, uid)
        return self.upload

    async def _start_part(self, p: int, gen: int) -> None:
        await self._part_slots.acquire()
        try:
            data = await self._range(p * self.ps, min((p + 1) * self.ps, self.size))
            up = await self._ensure_upload()
        except BaseException:
            self._part_slots.release()
            raise
        done = trio.Event()
        up.running[p] = done

        async def send() -> None:
            try:
                etag = await self.ctx.store.upload_part(up.s3key, up.upload_id, p + 1, data,
                                                        up.sse_key)
                up.sent[p] = (etag, gen)
            except FsError as e:
                up.error = e
            except Exception as e:  # kept for flush to report as EIO; the mount lives on
                log.error("upload of part %d of %s failed: %r", p + 1, up.s3key, e)
                up.error = FsError(errno.EIO, f"part {p + 1}: {type(e).__name__}")
            finally:
                up.running.pop(p, None)
                self._part_slots.release()
                done.set()

        assert self.ctx.nursery is not None
        self.ctx.nursery.start_soon(send)

    async def _wait_parts(self) -> None:
        up = self.upload
        if up is None:
            return
        while up.running:
            await next(iter(up.running.values())).wait()

    # ------------------------------------------------------------------ flush
    async def flush(self) -> None:
        """Upload if anything changed; return only when S3 has it (EIO otherwise)."""
        async with self.lock:
            if not self.dirty or self.unlinked:
                return
            await self._wait_parts()
            s3key = self.ctx.s3key(self.node.path)
            key = self.ctx.write_key()
            meta = self.ctx.metadata(self.node)
            if self.upload is not None and (self.upload.s3key != s3key
                                            or self.size <= self.ctx.multipart_threshold):
                await self._abort_upload()
            if self.size > self.ctx.multipart_threshold:
                info = await self._finish_multipart(s3key, key, meta)
            else:
                body = await self._range(0, self.size)
                info = await self.ctx.store.put(s3key, body, key, meta)
            self._uploaded(s3key, info, key)

    async def _abort_upload(self) -> None:
        up, self.upload = self.upload, None
        if up is not None:
            await self.ctx.store.abort_multipart(up.s3key, up.upload_id)

    async def _finish_multipart(self, s3key: str, key: Key | None,
                                meta: dict[str, str]) -> ObjectInfo:
        up = self.upload
        if up is not None and up.error is not None:
            log.info("retrying upload of %s after: %s", s3key, up.error)
            up.error = None
        up = await self._ensure_upload()
        nparts = max(1, math.ceil(self.size / self.ps))
        etags: dict[int, str] = {}

        async def part(p: int) -> None:
            start, end = p * self.ps, min((p + 1) * self.ps, self.size)
            gen = self.part_gen.get(p, 0)
            sent = up.sent.get(p)
            if sent is not None and sent[1] == gen:
                etags[p] = sent[0]
                return
            first, last = start // self.bs, (end - 1) // self.bs
            clean = all(b not in self.local for b in range(first, last + 1))
            if clean and self.base is not None and end <= self.base_valid:
                try:
                    etags[p] = await self.ctx.store.upload_part_copy(
                        s3key, up.upload_id, p + 1, self.base.s3key, start, end,
                        self.base.sse_key, key, self.base.version_id)
                    up.sent[p] = (etags[p], gen)
                    return
                except FsError as e:
                    if e.errno not in (errno.EACCES, errno.ENOTSUP, errno.EINVAL):
                        raise
                    log.debug("part copy refused (%s); uploading part %d", e, p + 1)
            data = await self._range(start, end)
            etags[p] = await self.ctx.store.upload_part(s3key, up.upload_id, p + 1, data,
                                                        key)
            up.sent[p] = (etags[p], gen)

        await gather((partial(part, p) for p in range(nparts)), limit=PARTS_IN_FLIGHT)
        info = await self.ctx.store.complete_multipart(
            s3key, up.upload_id, [(p + 1, etags[p]) for p in range(nparts)], key)
        self.upload = None
        final = _upload_meta(meta)
        if final != up.meta:  # chmod/chown while it was being written: rewrite in place
            info = await self.ctx.store.copy(s3key, s3key, key, key, final, self.size)
        if not info.etag:  # RGW answers some completions and copies without an ETag
            info = await self.ctx.store.head(s3key, key)
        return info

    def _uploaded(self, s3key: str, info: ObjectInfo, key: Key | None) -> None:
        """S3 has everything: the new object becomes the base, local state is dropped."""
        if self.base is not None:
            self.ctx.source.forget(self.base)
        self.base = ObjectRef(s3key, info.etag, self.size, key, info.version_id)
        self.base_valid = self.size
        self.mem.clear()
        self.local.clear()
        self.part_gen.clear()
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self.dirty = False
        node = self.node
        node.etag = info.etag
        node.version_id = info.version_id
        node.sse_key = key
        node.remote = True
        node.attrs.size = self.size
        node.fetched = time.monotonic()

    # ------------------------------------------------------------------ unlink while open
    async def detach_from_object(self) -> None:
        """The object is about to be deleted: copy what we still read from it into the spill,
        so the open handles keep reading the same bytes."""
        async with self.lock:
            await self._wait_parts()
            if self.base is not None:
                for b in range(math.ceil(min(self.base_valid, self.size) / self.bs)):
                    if b not in self.local:
                        blk = (await self._blocks(b, b))[0]
                        await self._spill_write(b, blk)
                        self.local.add(b)
                self.ctx.source.forget(self.base)
            self.base = None
            self.base_valid = 0
            await self._abort_upload()
            self.unlinked = True

    def renamed(self, info: ObjectInfo | None) -> None:
        """The object was copied to the node's new path."""
        if self.base is not None and info is not None:
            self.base = replace(self.base, s3key=self.ctx.s3key(self.node.path),
                                etag=info.etag or self.base.etag,
                                version_id=info.version_id)

    async def close(self) -> None:
        await self._abort_upload()
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self.mem.clear()
