"""Open files: where every byte a program writes goes, and how its reads are driven.

Reading: the blocks of the object a file was opened on come from :mod:`s3ssefs.blocks`.
While a file is read sequentially its readahead window doubles (4 -> 64 MiB; less when many
files are read at once, which share half the memory LRU) and is topped up a GET's worth at a
time; a small random read fetches only what it needs.

Writing (:class:`FileData`): written blocks live in memory while they are being filled and in
the encrypted :class:`~s3ssefs.spill.Spill` after that, so nothing acknowledged depends on
memory alone and no plaintext touches the disk.  A file above ``multipart_threshold`` becomes a
multipart upload whose parts are sent in the background as soon as the writer has filled them
(at most ``PARTS_IN_FLIGHT`` at once per file and ``PARTS_TOTAL`` per mount, which is also the
writers' back-pressure), so close() waits only for the tail.  A part rewritten after it was
sent is sent again at flush.  Parts the program never touched in an existing object are
copied server-side (UploadPartCopy), so a small change in a large file uploads only the parts
it changed.  flush/fsync return when S3 has the data; if the upload fails they raise EIO and
everything stays dirty for the next try.

A failed flush is also the moment data becomes owed to S3 whatever happens to the daemon: the
program was told its close() failed and the data kept (DESIGN §5).  So every block of the file
goes to the spill and the spill's journal is written (:meth:`FileData._keep`); on an SSE-C
mount the next mount uploads it if this one never does (:mod:`s3ssefs.recovery`).  Data written
and not yet closed was never promised and is not journaled.  Why the upload failed is kept
(:attr:`FileData.failure`): an answer that cannot change (``FsError.permanent``) is not retried
in the background, only by the next close, fsync or umount.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from s3ssefs import workers
from s3ssefs.aio import gather
from s3ssefs.blocks import BlockSource, Buf, ObjectRef
from s3ssefs.cache import DISK_FULL, disk_usage
from s3ssefs.crypto import CorruptBlock, LocalCipher
from s3ssefs.errors import FsError
from s3ssefs.http1 import Pieces
from s3ssefs.inodes import stamp
from s3ssefs.keys import Key
from s3ssefs.meta import CTIME, MTIME
from s3ssefs.pages import KernelPages
from s3ssefs.spill import Spill
from s3ssefs.stats import Stats
from s3ssefs.store import ObjectInfo, ObjectStore, max_object_size

if TYPE_CHECKING:
    from s3ssefs.inodes import Node

log = logging.getLogger(__name__)

# a sequential reader's window starts at READAHEAD_START and doubles to READAHEAD_MAX (in
# bytes, whatever the block size).  It is topped up whenever a GET's worth of it (at most half
# of it) has been read, not only at half: from a far server, whose GETs are bound by latency,
# that keeps 6.9 GETs in flight on average instead of 6.3 (235 -> 246 MiB/s through
# tests/bench/farproxy.py); a near server reads as fast either way.
READAHEAD_START = 4 << 20
READAHEAD_MAX = 64 << 20
# how far behind the stream a read may start and still count as sequential (see
# FileData._readahead): twice the largest read the kernel sends
SEQ_SLACK = 2 << 20
PARTS_IN_FLIGHT = 4
# parts being sent at once across the mount, each held in memory until S3 has it (see
# FileData._start_part): 16 writers at once held 1.2 GB with only the per-file bound
PARTS_TOTAL = 8
# blocks a sequential reader has read whole that memory keeps before letting go (FileData._served)
SERVED_LAG = 4
# blocks being written that all open files of a mount hold in memory at most (beyond one
# each): past it, a writer moves its own oldest blocks to the spill (FileData._evict_mem).
# 16 files written at once, a part and two blocks each (288 MiB), stay within it: at 256 MiB
# they spilled some blocks, and wrote 0.9x as fast on 1.15x the CPU
WRITE_MEMORY = 320 << 20


class WriteMemory:
    """How many blocks being written the mount's open files hold in memory, against the
    most they may (WRITE_MEMORY).  Each file keeps up to a part and two blocks in memory,
    so that its parts are sent from there; without a bound for the mount, a hundred large
    files written at once (or held open by a program that appends to them now and then)
    would hold 1.8 GiB."""

    def __init__(self, most: int) -> None:
        self.blocks = 0
        self.most = most


class _Mem(OrderedDict[int, Buf]):
    """One file's blocks in memory, oldest first, counted in the mount's
    :class:`WriteMemory` as they come and go (``OrderedDict``'s own ``pop``, ``popitem`` and
    ``clear`` do not go through ``__delitem__``, so each is counted here)."""

    def __init__(self, total: WriteMemory) -> None:
        super().__init__()
        self.total = total

    def __setitem__(self, b: int, data: Buf) -> None:
        if b not in self:
            self.total.blocks += 1
        super().__setitem__(b, data)

    def __delitem__(self, b: int) -> None:
        super().__delitem__(b)
        self.total.blocks -= 1

    def pop(self, b: int, *default: Any) -> Any:  # type: ignore[override]
        if b in self:
            self.total.blocks -= 1
        return super().pop(b, *default)

    def popitem(self, last: bool = True) -> tuple[int, Buf]:
        item = super().popitem(last)
        self.total.blocks -= 1
        return item

    def clear(self) -> None:
        self.total.blocks -= len(self)
        super().clear()


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
    # parts being sent by all files (PARTS_TOTAL); each file also has its own PARTS_IN_FLIGHT
    part_slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(PARTS_TOTAL))
    # blocks being written held by all files (WRITE_MEMORY in blocks of this mount's size)
    write_memory: WriteMemory = field(init=False)
    # the largest file one object can hold with this part size: EFBIG past it
    max_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.write_memory = WriteMemory(max(1, WRITE_MEMORY // self.block_size))
        self.max_size = max_object_size(self.part_size)
        # what a write changed is tracked per part by block (FileData.part_gen): a block
        # across two parts would leave the second part's sent copy stale
        if self.part_size % self.block_size:
            raise ValueError("part_size must be a multiple of block_size")


@dataclass
class _Upload:
    s3key: str
    upload_id: str
    sse_key: Key | None
    meta: dict[str, str]  # what it was created with (no times: see _upload_meta)
    sent: dict[int, tuple[str, int]] = field(default_factory=dict)  # part → (etag, gen)
    running: dict[int, trio.Event] = field(default_factory=dict)
    # part → (gen, blocks) of each part on its way: where reads find its blocks once they
    # have left memory unspilled (FileData._let_go)
    bufs: dict[int, tuple[int, Pieces]] = field(default_factory=dict)
    tried: int = -1  # the highest part ever sent or tried: the server may hold it
    error: FsError | None = None


def _upload_meta(meta: dict[str, str]) -> dict[str, str]:
    """Metadata for a streamed upload, created while the program is still writing: without
    mtime/ctime, which are not known yet; S3's LastModified (the completion, about close()
    time) stands in for them, as s3fs also reads it."""
    return {k: v for k, v in meta.items() if k not in (MTIME, CTIME)}


class _SentOnly(FsError):
    """A block whose only copy is a part already sent was wanted (see FileData._let_go);
    the caller completes the upload early and tries again.  An EIO if it ever escapes."""

    def __init__(self, block: int) -> None:
        super().__init__(errno.EIO, f"block {block} is only in a part already sent")


class WriteFailed(FsError):
    """A write to this open file failed earlier (:meth:`FileData._fail`)."""


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
        self.mem = _Mem(ctx.write_memory)
        self.mem_max = self.ps // self.bs + 2
        self.local: set[int] = set()  # blocks whose content is ours (mem or spill)
        self.part_gen: dict[int, int] = {}
        self.upload: _Upload | None = None
        self.dirty = base is None  # a new file must be uploaded even if empty
        self.unlinked = False
        # a write failed (see _fail): the content is never uploaded, and is dropped at close
        self.failed: WriteFailed | None = None
        self.closed = False  # close() has begun: work for the handles stops (detach_from_object)
        # open handles writing, or reading past the page cache (O_DIRECT): while there is
        # one, nothing fetched is handed to the kernel's page cache (see _publish)
        self.page_blockers = 0
        self.lock = trio.Lock()
        self._part_slots = trio.Semaphore(PARTS_IN_FLIGHT)
        self._seq_next = 0
        self._served_blocks: deque[int] = deque()  # see _served
        self._window = 0
        self._ahead_to = -1
        # a file written from empty, every write at its end (cp, dd, a download): the blocks
        # of its parts after the first need no spill copy once their part is on its way
        # (see _let_go): block → part while that part's upload runs, and the blocks whose
        # only copy is a part S3 has
        self._appending = self.size == 0 and self.base_valid == 0
        self.in_part: dict[int, int] = {}
        self.sent_only: set[int] = set()
        # (key, SSE-C key) of an upload completed early, if any (see _complete_early)
        self._interim: tuple[str, Key | None] | None = None
        self.failure: FsError | None = None  # why the last flush failed (see _keep)

    @classmethod
    def recovered(cls, ctx: Ctx, node: Node, base: ObjectRef | None, base_valid: int,
                  size: int, spill: Spill) -> FileData:
        """A file an earlier mount left in ``spill`` (:mod:`s3ssefs.recovery`): its blocks
        there, the rest from ``base`` up to ``base_valid``; dirty, to be flushed."""
        data = cls(ctx, node, base)
        data.size, data.base_valid = size, base_valid if base is not None else 0
        data.spill = spill
        data.local = {b for b in spill.block_numbers() if b * data.bs < size}
        data.dirty = True
        data._appending = False
        return data

    # ------------------------------------------------------------------ block contents
    def _extent(self, b: int) -> int:
        """Bytes of block ``b`` inside the file."""
        return max(0, min(self.bs, self.size - b * self.bs))

    async def _local_block(self, b: int) -> Buf:
        data = self.mem.get(b)
        if data is not None:
            return data
        p = self.in_part.get(b)
        if p is not None and self.upload is not None and p in self.upload.bufs:
            return self.upload.bufs[p][1].bufs[b - p * self.ps // self.bs]
        if b in self.sent_only:
            raise _SentOnly(b)
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
        """Bytes ``start..end`` of the file, copied once: slices of the blocks are joined,
        not the whole blocks joined and then sliced."""
        if end <= start:
            return b""
        first, last = start // self.bs, (end - 1) // self.bs
        parts = [memoryview(b) for b in await self._blocks(first, last)]
        parts[-1] = parts[-1][:end - last * self.bs]
        parts[0] = parts[0][start - first * self.bs:]
        return b"".join(parts)

    async def _pieces(self, start: int, end: int) -> Pieces:
        """Bytes ``start..end`` of the file (``start`` at a block's start, ``end`` at one or
        at the end of the file) as the blocks that hold them, to be sent as they are: a
        part or a small file's body, with no copy.  A block being written in place (a
        ``bytearray``) is frozen: memory keeps a read-only view of it instead, so a later
        write to it copies it first and never changes what is on its way."""
        if end <= start:
            return Pieces([])
        first = start // self.bs
        blocks = await self._blocks(first, (end - 1) // self.bs)
        for i, blk in enumerate(blocks):
            if isinstance(blk, bytearray):
                blocks[i] = frozen = memoryview(blk).toreadonly()
                if self.mem.get(first + i) is blk:
                    self.mem[first + i] = frozen
        return Pieces(blocks)

    # ------------------------------------------------------------------ read
    async def read(self, off: int, size: int) -> Buf:
        while True:
            try:
                return await self._read(off, size)
            except _SentOnly:  # written here, and now only in a part S3 has
                async with self.lock:
                    await self._complete_early()

    async def _read(self, off: int, size: int) -> Buf:
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
            data: Buf = memoryview(block)[start:start + (end - off)]
        else:
            data = await self._range(off, end)
        if self._window and self.base is not None and end <= self.base_valid:
            self._passed(first, end)
        return data

    def _passed(self, first: int, end: int) -> None:
        """A sequential read that began in block ``first`` ended at ``end``: the base blocks
        it finished (read up to their end, or to the end of the object) are served.

        The kernel's reads are usually whole blocks, but not always: with 8 readers at once,
        one read in eight came 4 KiB off a block boundary (the kernel had read one page on
        its own, as when a page readahead brought in was reclaimed before it was read), and
        every read of that file after it spanned two blocks.  Marking only reads that end a
        block would then keep every block of the file in memory until the LRU evicted it."""
        done = end // self.bs if end < self.base_valid else (end - 1) // self.bs + 1
        for b in range(first, done):
            if b not in self.local:
                self._served(b)

    def _served(self, b: int) -> None:
        """A sequential reader has had all of block ``b``: memory lets it go, SERVED_LAG
        blocks later.

        The kernel now holds the block in its page cache and the reader will not ask for it
        again, so keeping it would only duplicate those pages; memory is for the blocks
        readahead fetched ahead of the reader.  Dropped, the blocks a 1 GiB read passes
        through reuse a few readahead windows' worth of memory instead of filling the whole
        LRU with freshly faulted pages.  The lag is for a readahead task started before this
        read but not yet run: it would find the block gone and fetch it again."""
        assert self.base is not None
        self.ctx.source.demote(self.base, b)
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
        """Grow the window while reads stay sequential; prefetch base blocks ahead.

        A read that starts up to SEQ_SLACK behind where the stream has got to still counts
        as sequential once a window is open: the kernel sometimes reads one page on its own,
        out of order with its readahead (seen with 8 readers at once), and starting the
        window again from READAHEAD_START there cost the reader its GETs in flight.  A read
        that skips ahead does not: a reader that skips parts of a file should not fetch
        them."""
        source = self.ctx.source
        if off == self._seq_next or (
                self._window and self._seq_next - SEQ_SLACK <= off < self._seq_next):
            most = max(1, READAHEAD_MAX // self.bs)
            if self.base is not None and self._ahead_to < (self.base_valid - 1) // self.bs:
                most = source.window_cap(self, most)
            else:
                source.stream_ended(self)  # nothing left to fetch ahead
            self._window = min(max(self._window * 2, max(1, READAHEAD_START // self.bs)), most)
            self._seq_next = max(self._seq_next, end)
        else:
            if self._window:
                source.stream_ended(self)
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
        self._check_size(off + len(data))
        try:
            return await self._write(off, data)
        except FsError as e:  # what the file holds now is not what was meant: see _fail
            self._fail(e)
            raise

    async def _write(self, off: int, data: bytes) -> int:
        async with self.lock:
            self._refuse_if_failed()
            n = len(data)
            end = off + n
            if off != self.size:
                self._appending = False  # see _let_go
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
                            blk = await self._block_locked(b) if b * self.bs < self.size \
                                else b""
                        blk = bytearray(blk)
                        self.mem[b] = blk
                    self.mem.move_to_end(b)
                    if len(blk) < s:
                        blk.extend(bytes(s - len(blk)))
                    blk[s:e] = chunk
                self.in_part.pop(b, None)
                self.sent_only.discard(b)
                self.local.add(b)
                p = b * self.bs // self.ps
                self.part_gen[p] = self.part_gen.get(p, 0) + 1
                pos = b * self.bs + e
            self.size = max(self.size, end)
            self.dirty = True
            await self._evict_mem()
            await self._stream_parts(end)
        return n

    def _check_size(self, size: int) -> None:
        """EFBIG for a size one object cannot hold (see :func:`~s3ssefs.store.max_object_size`),
        before anything changes."""
        if size > self.ctx.max_size:
            raise FsError(errno.EFBIG, f"{self.node.path}: {size} bytes is more than one object "
                          f"holds ({self.ctx.max_size})")

    def _fail(self, e: FsError) -> None:
        """A write returned an error: the program knows its file is not what it meant to write
        (cp stops half-way through), so that content must never replace the object.  From now
        on writes, truncates and flushes of this file fail, nothing is uploaded, the upload
        under way is aborted when the last handle closes, and the object keeps its previous
        content (the file system layer drops the changes then)."""
        if self.failed is None:
            self.failed = WriteFailed(e.errno, f"a write to {self.node.path} failed ({e})")

    def _refuse_if_failed(self) -> None:
        if self.failed is not None:
            raise WriteFailed(self.failed.errno, self.failed.args[0])

    async def _block_locked(self, b: int) -> Buf:
        """Block ``b``'s content, with the file's lock held."""
        try:
            return (await self._blocks(b, b))[0]
        except _SentOnly:
            await self._complete_early()
            return (await self._blocks(b, b))[0]

    async def _evict_mem(self, keep: int | None = None) -> None:
        """Move blocks beyond the in-memory budget to the encrypted spill (unless their
        part keeps them: :meth:`_let_go`).  The budget is the file's own (a part and two
        blocks), and less while the mount's open files hold more than WRITE_MEMORY between
        them: the writer then gives up its oldest blocks, down to the one it is filling."""
        keep = self.mem_max if keep is None else keep
        total = self.ctx.write_memory
        over = total.blocks - total.most
        if over > 0:
            keep = max(1, min(keep, len(self.mem) - over))
        while len(self.mem) > keep:
            b, blk = self.mem.popitem(last=False)
            if self._let_go(b):
                self.ctx.stats.add("spill_skipped")
            else:
                await self._spill_write(b, blk)
        self.ctx.stats.peak("write_memory_peak", total.blocks * self.bs)

    def _let_go(self, b: int) -> bool:
        """Whether block ``b``, leaving memory, can do without a copy in the spill.

        For a file written from empty, every write at its end (cp, dd, a download), the parts
        after the first go to S3 straight from memory: a block whose part is on its way is
        read from that part's buffer meanwhile, and once S3 has the part, the part is its
        copy.  Sealing and writing every block to the spill as well was a large share of a
        write's CPU.  The spill is for what S3 does not have yet: blocks of parts not
        sent, of a part whose upload failed (put back in memory, then spilled), and of the
        first part, which a program that patches a header at the end rewrites (re-sent from
        the spill at close).  If a block whose only copy is a sent part is wanted after all
        (read back, partly rewritten, or the upload must start over), S3 has no way to read a
        part before the upload is completed: :meth:`_complete_early`."""
        p = b * self.bs // self.ps
        up = self.upload
        if not self._appending or p == 0 or up is None:
            return False
        gen = self.part_gen.get(p)
        if p in up.bufs and up.bufs[p][0] == gen:
            self.in_part[b] = p
            return True
        if up.sent.get(p, ("", -1))[1] == gen:
            self.sent_only.add(b)
            return True
        return False

    def _ensure_spill(self) -> Spill:
        if self.spill is None:
            # sealed under the key writes use, so the next mount can open it (spill.py)
            self.spill = Spill(self.ctx.spill_dir, self.ctx.cipher, self.bs,
                               key=self.ctx.write_key())
        return self.spill

    async def _spill_write(self, b: int, blk: Buf) -> None:
        self.ctx.stats.add("spill_blocks")
        try:
            try:
                await self._spill_write_once(b, blk)
            except OSError as e:
                # the disk is full: the block cache on it gives way to written data, which
                # has no other copy (then one more try)
                if e.errno not in DISK_FULL or not await workers.run_sync(
                        self.ctx.source.cache.free_up, 2 * self.bs):
                    raise
                await self._spill_write_once(b, blk)
        except OSError as e:
            self.mem[b] = bytearray(blk)  # keep it: nothing acknowledged is dropped
            if e.errno in DISK_FULL:
                log.error("cache directory %s is full (%s): cannot keep what is written to "
                          "s3://%s/%s until it is uploaded [%s]", self.ctx.spill_dir.parent,
                          disk_usage(self.ctx.spill_dir), self.ctx.store.bucket,
                          self.ctx.s3key(self.node.path), errno.errorcode[e.errno])
            raise FsError(e.errno or errno.EIO, f"spill write failed: {e.strerror}") from None

    async def _spill_write_once(self, b: int, blk: Buf) -> None:
        spill = self._ensure_spill()
        # blk left self.mem: nothing changes it while the thread seals it
        await workers.run_sync(spill.write_block, b, blk)

    async def truncate(self, new_size: int) -> None:
        self._check_size(new_size)
        async with self.lock:
            self._refuse_if_failed()
            await self._wait_parts()
            if new_size < self.size:
                nb = math.ceil(new_size / self.bs)
                if any(b < nb for b in self.sent_only):
                    await self._complete_early()
                self.sent_only.clear()  # all of them cut off
                # parts S3 holds now hold bytes cut off: start again (and _complete_early
                # never meets a part of bytes since cut)
                await self._abort_upload()
                for b in [b for b in self.local if b >= nb]:
                    self.local.discard(b)
                    self.mem.pop(b, None)
                if self.spill is not None:
                    await workers.run_sync(self.spill.drop_from, nb)
                if new_size % self.bs:
                    b = new_size // self.bs
                    blk = await self._block_locked(b)
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
            self._appending = new_size == 0 and self.base_valid == 0
            if self.spill is not None and self.spill.journaled:
                await self._keep()  # the journal must not name blocks cut off

    # ------------------------------------------------------------------ streaming parts
    async def _stream_parts(self, written_to: int) -> None:
        """Send every part the writer has completely filled (in the background).  Not once
        the server has refused this file's upload for good (``FsError.permanent``): asking
        again for every part written would only repeat the refusal; close() reports it."""
        if self.size <= self.ctx.multipart_threshold and self.upload is None:
            return
        refused = self.failure or (self.upload.error if self.upload is not None else None)
        if refused is not None and refused.permanent:
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
            if any(b not in self.local or b in self.sent_only for b in range(first, last + 1)):
                continue  # part mixes old data or data only S3 has: see flush
            try:
                await self._start_part(p, gen)
            except FsError as e:
                if not e.permanent:
                    raise
                self.failure = e  # the data is kept; the flush tries once more
                return

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
        """Send part ``p`` in the background once this file has fewer than PARTS_IN_FLIGHT
        parts and the mount fewer than PARTS_TOTAL on their way; the writer waits until
        then, which is its back-pressure.  A part is sent as its blocks (:meth:`_pieces`),
        which it keeps until S3 has it, so each slot is up to a part's worth of memory."""
        await self._part_slots.acquire()
        try:
            await self.ctx.part_slots.acquire()
        except BaseException:
            self._part_slots.release()
            raise
        try:
            data = await self._pieces(p * self.ps, min((p + 1) * self.ps, self.size))
            up = await self._ensure_upload()
        except BaseException:
            self.ctx.part_slots.release()
            self._part_slots.release()
            raise
        done = trio.Event()
        up.running[p] = done
        up.bufs[p] = (gen, data)
        up.tried = max(up.tried, p)

        async def send() -> None:
            sent = False
            try:
                etag = await self.ctx.store.upload_part(up.s3key, up.upload_id, p + 1, data,
                                                        up.sse_key)
                up.sent[p] = (etag, gen)
                sent = True
            except FsError as e:
                up.error = e
            except Exception as e:  # kept for flush to report as EIO; the mount lives on
                log.error("upload of part %d of %s failed: %r", p + 1, up.s3key, e)
                up.error = FsError(errno.EIO, f"part {p + 1}: {type(e).__name__}")
            finally:
                up.running.pop(p, None)
                up.bufs.pop(p, None)
                self._part_settled(up, p, gen, data, sent)
                self.ctx.part_slots.release()
                self._part_slots.release()
                done.set()

        assert self.ctx.nursery is not None
        self.ctx.nursery.start_soon(send)

    def _part_settled(self, up: _Upload, p: int, gen: int, data: Pieces, sent: bool) -> None:
        """Part ``p``'s upload has ended: the blocks that left memory while it ran now have S3's
        part as their copy, or, if it failed or was rewritten meanwhile, go back to memory
        (and from there to the spill as the writer goes on: nothing acknowledged is lost)."""
        moved = [b for b, q in self.in_part.items() if q == p]
        for b in moved:
            del self.in_part[b]
            if sent and self.part_gen.get(p) == gen and self.upload is up:
                self.sent_only.add(b)
            else:
                self.mem[b] = data.bufs[b - p * self.ps // self.bs]

    async def _complete_early(self) -> None:
        """Make the blocks whose only copy is a part already sent readable again (with the
        file's lock held).

        S3 cannot read a part before its upload is completed, so the upload is completed
        with the parts so far: the object at the key holds the file's first parts, and
        becomes the file's base, read and copied from as any object is.  RGW completes an
        upload only with every part it holds, so each part up to the highest ever tried that
        S3 does not have for sure (never sent, or its upload failed: then all of it is
        here) is sent first.  close() replaces that object with the whole file; if the file
        has been renamed or unlinked meanwhile, it is deleted.  Only a file read back or
        rewritten where it was already sent, while it is still being written, pays this.
        Never after a write failed: that would put a partial file in place of the object."""
        self._refuse_if_failed()
        await self._wait_parts()
        if not self.sent_only:
            return
        if self.upload is not None:  # (else completed before, and the HEAD below failed)
            await self._complete_so_far(self.upload)
        assert self._interim is not None
        s3key, key = self._interim
        info = await self.ctx.store.head(s3key, key)
        if self.base is not None:
            self.ctx.source.forget(self.base)
        self.base = ObjectRef(s3key, info.etag, info.size, key, info.version_id)
        self.base_valid = min(info.size, self.size)
        self.local -= self.sent_only
        self.sent_only.clear()

    async def _complete_so_far(self, up: _Upload) -> None:
        """Complete ``up`` with every part S3 may hold (see :meth:`_complete_early`)."""
        etags = []
        for q in range(max([up.tried, *up.sent]) + 1):
            sent = up.sent.get(q)
            etag = sent[0] if sent is not None else \
                await self._send_part(up, q, self.part_gen.get(q, 0), up.sse_key)
            etags.append((q + 1, etag))
        log.info("%s is read back or rewritten where it was already sent while it is being "
                 "written: its upload is completed with the parts so far, until close",
                 up.s3key)
        await self.ctx.store.complete_multipart(up.s3key, up.upload_id, etags, up.sse_key)
        self.ctx.stats.add("uploads_completed_early")
        self.upload = None
        self._appending = False
        self._interim = (up.s3key, up.sse_key)

    async def _send_part(self, up: _Upload, p: int, gen: int, key: Key | None) -> str:
        """Send part ``p`` of the file's content now (in one of the mount's part slots) and
        record it as sent at generation ``gen``; its ETag."""
        async with self.ctx.part_slots:
            data = await self._pieces(p * self.ps, min((p + 1) * self.ps, self.size))
            etag = await self.ctx.store.upload_part(up.s3key, up.upload_id, p + 1, data, key)
        up.sent[p] = (etag, gen)
        return etag

    async def _drop_interim(self, keep: str | None) -> None:
        """Delete the object an early completion left (:meth:`_complete_early`) unless it is
        at ``keep``, where the file's own object has replaced it."""
        interim, self._interim = self._interim, None
        if interim is None or interim[0] == keep:
            return
        try:
            await self.ctx.store.delete(interim[0])
        except FsError as e:
            if e.errno != errno.ENOENT:
                log.warning("could not delete s3://%s/%s, left by an upload completed early: "
                            "%s", self.ctx.store.bucket, interim[0], e)

    async def _wait_parts(self) -> None:
        up = self.upload
        if up is None:
            return
        while up.running:
            await next(iter(up.running.values())).wait()

    # ------------------------------------------------------------------ flush
    async def flush(self) -> None:
        """Upload if anything changed; return only when S3 has it (EIO otherwise, with the
        data kept for the next try and the next mount: :meth:`keep`)."""
        try:
            await self._flush()
        except FsError as e:
            await self.keep(e)
            raise

    async def _flush(self) -> None:
        async with self.lock:
            if not self.dirty or self.unlinked:
                return
            self._refuse_if_failed()
            await self._wait_parts()
            s3key = self.ctx.s3key(self.node.path)
            key = self.ctx.write_key()
            meta = self.ctx.metadata(self.node)
            if self.sent_only and not self._completes_as_is(s3key):
                await self._complete_early()
            if self.upload is not None and (self.upload.s3key != s3key
                                            or self.size <= self.ctx.multipart_threshold):
                await self._abort_upload()
            if self.size > self.ctx.multipart_threshold:
                info = await self._finish_multipart(s3key, key, meta)
            else:
                body = await self._pieces(0, self.size)
                info = await self.ctx.store.put(s3key, body, key, meta)
            self._uploaded(s3key, info, key)
            await self._drop_interim(s3key)

    async def keep(self, failure: FsError) -> None:
        """A flush failed with ``failure``: keep the file's data for the next try and for
        the next mount (:meth:`_keep`), and remember why (see :attr:`failure`)."""
        with trio.CancelScope(shield=True):
            async with self.lock:
                self.failure = failure
                if self.dirty and not self.unlinked:
                    await self._keep()

    async def _keep(self) -> None:
        """A flush failed (lock held): put every block of the file in the spill and write its
        journal, so the data survives the daemon (SIGKILL, a plain umount): see the module
        docstring.  Only what cannot be kept is logged; the flush's own failure is the
        caller's to report."""
        where = f"s3://{self.ctx.store.bucket}/{self.ctx.s3key(self.node.path)}"
        await self._wait_parts()
        if self.sent_only:
            try:
                await self._complete_early()
            except FsError as e:
                log.error("%s: blocks %s are only in an unfinished multipart upload (%s): "
                          "they are lost if the daemon ends before an upload succeeds",
                          where, sorted(self.sent_only), e)
        self._appending = False  # no more blocks whose only copy is a part (see _let_go)
        try:
            spill = self._ensure_spill()
            while self.mem:
                b, blk = self.mem.popitem(last=False)
                await self._spill_write(b, blk)
            if spill.recoverable:
                await workers.run_sync(spill.write_journal, self._journal_info())
        except (OSError, FsError) as e:
            log.error("%s: could not keep its data in the spill in %s for the next mount "
                      "(%s); it is only in this daemon's memory until an upload succeeds",
                      where, self.ctx.spill_dir, e)

    def _journal_info(self) -> dict[str, Any]:
        """What the next mount needs to upload the file (spill.Spill.write_journal): where
        it goes, its size and attributes, and the object its unwritten blocks come from."""
        base = self.base
        attrs = self.node.attrs
        return {
            "bucket": self.ctx.store.bucket, "endpoint": self.ctx.store.cfg.endpoint,
            "s3key": self.ctx.s3key(self.node.path), "size": self.size,
            "attrs": {"mode": attrs.mode, "uid": attrs.uid, "gid": attrs.gid,
                      "mtime_ns": attrs.mtime_ns, "ctime_ns": attrs.ctime_ns},
            "metadata": self.node.metadata, "time": time.time(),
            "base": None if base is None else {
                "s3key": base.s3key, "etag": base.etag, "size": base.size,
                "valid": self.base_valid, "version_id": base.version_id,
                "key": base.sse_key.fingerprint if base.sse_key else None},
        }

    def _completes_as_is(self, s3key: str) -> bool:
        """Whether the upload under way can be completed without the blocks only S3 has:
        same key, still multipart, and every part holding such blocks sent as it stands."""
        up = self.upload
        return (up is not None and up.s3key == s3key
                and self.size > self.ctx.multipart_threshold
                and all(up.sent.get(p, ("", -1))[1] == self.part_gen.get(p)
                        for p in {b * self.bs // self.ps for b in self.sent_only}))

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
            up.tried = max(up.tried, p)
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
            etags[p] = await self._send_part(up, p, gen, key)

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
        self.failure = None
        if self.base is not None:
            self.ctx.source.forget(self.base)
        self.base = ObjectRef(s3key, info.etag, self.size, key, info.version_id)
        self.base_valid = self.size
        self.mem.clear()
        self.local.clear()
        self.in_part.clear()
        self.sent_only.clear()
        self._appending = self.size == 0
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
        node.changed = stamp()

    # ------------------------------------------------------------------ unlink while open
    async def detach_from_object(self) -> None:
        """The object is about to be deleted: copy what we still read from it into the spill,
        so the open handles keep reading the same bytes."""
        async with self.lock:
            await self._wait_parts()
            if self.sent_only and self.failed is None:  # (a failed file is never completed)
                await self._complete_early()
            if self.base is not None:
                for b in range(math.ceil(min(self.base_valid, self.size) / self.bs)):
                    if self.closed:  # the last handle went meanwhile: nobody will read them
                        break
                    if b not in self.local:
                        blk = (await self._blocks(b, b))[0]
                        await self._spill_write(b, blk)
                        self.local.add(b)
                self.ctx.source.forget(self.base)
            self.base = None
            self.base_valid = 0
            await self._abort_upload()
            await self._drop_interim(None)  # the file's object is going: so does that one
            self.unlinked = True
            if self.spill is not None:  # nothing is owed to S3 any more
                await workers.run_sync(self.spill.drop_journal)

    def renamed(self, info: ObjectInfo | None) -> None:
        """The object was copied to the node's new path."""
        if self.base is not None and info is not None:
            self.base = replace(self.base, s3key=self.ctx.s3key(self.node.path),
                                etag=info.etag or self.base.etag,
                                version_id=info.version_id)

    async def close(self) -> None:
        """Drop everything local, once whatever holds the lock (a flush, a detach) is done:
        their work uses the spill this deletes."""
        self.closed = True
        async with self.lock:
            await self._close_locked()

    async def _close_locked(self) -> None:
        self.ctx.source.stream_ended(self)
        await self._abort_upload()
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self.mem.clear()
        self.in_part.clear()
        self.sent_only.clear()
