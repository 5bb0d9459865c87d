"""Blocks of objects for reading: where a byte a program reads comes from.

An object is read in fixed-size blocks.  A block comes from a small in-memory LRU, else from
the encrypted on-disk :class:`~s3ssefs.cache.BlockCache`, else from S3 — consecutive missing
blocks in one ranged GET, several GETs in flight, and a block being fetched for one reader is
awaited, not fetched again, by another.  Open files (:mod:`s3ssefs.files`) ask for the blocks
a read needs and start the readahead of a sequential reader.  A small random read fetches only
what it needs (and, opted into with ``random_readahead``, the region around it in the
background, handed to the kernel's page cache: :mod:`s3ssefs.pages`), and of a block in the
disk cache reads only the chunk holding it.  Fetched blocks go to the disk cache from a worker
thread, off the read's path; those a sequential reader's readahead fetches only the second
time S3 is asked for them (a file read once costs no disk writes, see
``BlockSource._admit``), and never those of an object larger than the whole cache: an LRU
cache streamed through by more than it holds keeps none of it for the next pass (each block is
evicted before it comes round again) and loses everything else it held, so filling it would
cost CPU and disk writes for no hit at all.  ``cache_stream_max`` lowers that bound.
"""

from __future__ import annotations

import errno
import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from s3ssefs import workers
from s3ssefs.aio import gather
from s3ssefs.cache import BlockCache
from s3ssefs.errors import FsError
from s3ssefs.keys import Key
from s3ssefs.stats import Stats
from s3ssefs.store import ObjectStore

log = logging.getLogger(__name__)

# one ranged GET fetches at most MAX_GET bytes, whatever the block size (a sequential
# reader's readahead window is topped up a GET's worth at a time: s3ssefs.files)
MAX_GET = 8 << 20
# a random read of a block we do not have fetches only the FRAGMENT-aligned bytes around it
# (a 4 KiB read costs a 64 KiB GET, not a whole block: less for the server to decrypt and
# send); fragments stay in a small memory LRU and in the encrypted disk cache (as negative
# block numbers), so reading the same places again is local
FRAGMENT = 64 << 10
FRAGMENT_MEM = 32 << 20
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
Buf = bytes | bytearray | memoryview
# hands fetched blocks {block number: content} of an object version to the kernel's page
# cache for the file being read; whether they all went (see s3ssefs.files.FileData._publish)
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
        # files read in sequence whose readahead window is open (see window_cap)
        self.streaming: weakref.WeakSet[object] = weakref.WeakSet()

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
        machine's cores those background GETs slow the reader's own: docs/benchmarks.md has
        the figures.

        A region is fetched once while it is remembered (as many as the disk cache holds,
        most recently read first): its blocks are kept at once, not from their second fetch
        as readahead's are (:meth:`_admit`).  Fetched again whenever memory let them go, a
        file larger than the memory LRU was downloaded over and over by one reader.  The
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

    def window_cap(self, reader: object, most: int) -> int:
        """The readahead window, in blocks, that ``reader`` (a file read in sequence) may
        open: at most ``most``, and all such files' windows together at most half the
        memory LRU, so that what readahead fetches is still in memory when it is read.

        Each file's own limit (64 MiB) is what one reader needs; 16 readers of 128 MiB files
        at once wanted 1 GiB ahead of them from a 256 MiB LRU, which evicted blocks before
        they were read: 3.7 GB fetched for 2 GiB read."""
        self.streaming.add(reader)
        return max(1, min(most, self.mem_max // 2 // len(self.streaming) // self.bs))

    def stream_ended(self, reader: object) -> None:
        """``reader`` no longer reads ahead (it stopped reading in sequence, reached the end,
        or closed): its share goes to the others."""
        self.streaming.discard(reader)

    def demote(self, ref: ObjectRef, b: int) -> None:
        """Make block ``b`` the first the memory LRU lets go: a sequential reader has had it
        (:meth:`FileData._served`), and blocks fetched ahead and not read yet matter more."""
        k = (ref.cache_id, b)
        if k in self.mem:
            self.mem.move_to_end(k, last=False)

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
