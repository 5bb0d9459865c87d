"""BlockCache: object blocks kept on local disk, encrypted, bounded by size, LRU.

Reading a block from S3 costs a round trip; re-reading it from local disk does not.  The cache
holds blocks of object *versions* (the caller's ``object_id`` is built from key and ETag), so an
entry never goes stale: a new version simply has another id, and :meth:`BlockCache.invalidate`
frees the old one's space early.

Every block is sealed with the mount's :class:`~s3ssefs.crypto.LocalCipher`, in chunks of
CHUNK bytes each sealed on its own, so a small read of a cached block reads and opens only
the chunk holding it (:meth:`BlockCache.get_range`), not the whole block.  Chunks are not
much smaller than 256 KiB, because each costs a call into the cipher that lets go of the GIL,
which whole-block reads pay once per chunk (docs/benchmarks.md has the figures).  Each
chunk's associated data names object, block, chunk and the block's length, so a chunk read
from the wrong place fails to open.  Nothing on disk names an object.  Files of earlier mounts
are unreadable, so they are deleted on start.

Layout: sealed blobs live in sparse *slot files*, one per size class.  Class ``c`` holds slots
of ``4096 << c`` bytes, slot ``n`` at offset ``n * (4096 << c)``; a blob goes to the smallest
class it fits.  A freed slot's pages go back to the file system at once (a punched hole) and
the slot is reused by the next blob of its class.  One file per class, not one per block:
creating, renaming and deleting a file per block made ext4 spend more CPU on inode allocation
than the cache spent on encryption.  ``bytes_used`` counts
the 4 KiB pages the blobs occupy, which is what they take on disk.

Slot files of blobs over 512 KiB (whole blocks) are opened with ``O_DIRECT``: blobs go between
our (page-aligned, whole-page) buffers and the disk without passing through the page cache.
Buffered, every cached block was copied into freshly allocated page-cache pages, and that copy
was the largest single cost of a cold read in ``perf``, for
ciphertext nobody else reads; hot blocks are kept decrypted in the memory LRU above this cache,
and the kernel keeps what readers read.  Smaller blobs (fragments of random reads) stay
buffered, so re-reading one is a page-cache hit.  File systems without ``O_DIRECT`` (tmpfs
before Linux 6.6) get buffered I/O.

The cache is only a cache: a damaged slot reads as a miss, and a full disk drops the block
(after evicting and retrying once) with one warning per mount instead of failing the read that
wanted to store it.

Threads: many worker threads call in at once.  One lock guards the index, the free slots and
the file descriptors; ``pread``/``pwrite`` of blob contents and encryption happen outside it.
A reader whose slot was freed or reused meanwhile reads a blob that fails authentication, which
is a miss, never wrong data.  A writer fills a slot it has taken out of the free list, and the
entry enters the index only once the write is complete.  The files' descriptors stay open until
the last call in flight has left, so no descriptor number is reused under a running call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import heapq
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from .crypto import OVERHEAD, BufferPool, CorruptBlock, LocalCipher

log = logging.getLogger(__name__)

PAGE = 4096
_OUR_FILE = re.compile(r"[0-9a-f]{64}(\.[0-9a-f]+\.tmp)?|slots-[0-9a-f]{16}-[0-9]+")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE

# slot files of blobs over 512 KiB (slots of 1 MiB and more) bypass the page cache; smaller ones
# (the fragments random reads fetch) stay in it: re-reading one costs microseconds, not a disk read
DIRECT_FROM_CLASS = 8

# plaintext bytes per separately sealed chunk of a blob (see above); a sealed chunk is SEALED
# bytes long
CHUNK = 256 << 10
SEALED = CHUNK + OVERHEAD

_Key = tuple[str, int]
T = TypeVar("T")


class _Entry(NamedTuple):
    cls: int  # size class: slots of PAGE << cls bytes
    slot: int
    length: int  # of the sealed blob


def _aad(object_id: str, block_no: int, chunk: int, plain: int) -> bytes:
    return (f"cache\0{block_no}\0{chunk}\0{plain}\0".encode()
            + object_id.encode("utf-8", "surrogateescape"))


def _chunks(plain: int) -> int:
    """Chunks of a ``plain``-byte block (an empty block is one empty chunk)."""
    return max(1, -(-plain // CHUNK))


def _sealed_length(plain: int) -> int:
    """Length of the blob of a ``plain``-byte block: every chunk adds OVERHEAD."""
    return plain + _chunks(plain) * OVERHEAD


def _plain_length(length: int) -> int:
    return length - -(-length // SEALED) * OVERHEAD


def _pages(length: int) -> int:
    """Bytes of disk a blob of ``length`` bytes occupies."""
    return -(-length // PAGE) * PAGE


def _class_of(length: int) -> int:
    return max(0, (length - 1).bit_length() - PAGE.bit_length() + 1)


def _load_fallocate() -> Any:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def _punch(fd: int, offset: int, length: int) -> None:
    """Give ``[offset, offset+length)`` of the file back to the file system (a hole)."""
    if _fallocate is None or _fallocate(fd, _PUNCH_HOLE, offset, length) != 0:
        code = ctypes.get_errno() if _fallocate is not None else errno.ENOSYS
        raise OSError(code, os.strerror(code))


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class BlockCache:
    """Encrypted on-disk cache of object blocks, bounded by size, LRU."""

    def __init__(self, directory: Path, max_bytes: int, cipher: LocalCipher) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._cipher = cipher
        self._lock = threading.Lock()
        self._index: OrderedDict[_Key, _Entry] = OrderedDict()  # LRU first
        self._bytes_used = 0
        self._hits = 0
        self._misses = 0
        self._closed = False
        self._busy = 0  # calls between taking a descriptor and being done with it
        self._warned: set[int] = set()  # errnos already reported
        self._files: dict[int, tuple[int, Path]] = {}  # class -> (fd, path)
        self._free: dict[int, list[int]] = {}  # class -> freed slots (a heap: lowest first)
        self._next: dict[int, int] = {}  # class -> first never-used slot
        self._tag = secrets.token_hex(8)
        self._buffers = BufferPool()
        self._direct = hasattr(os, "O_DIRECT")  # until a file system refuses it

        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Only names we make: a cache directory pointed at the wrong place loses nothing else.
        removed = 0
        for entry in os.scandir(self.directory):
            if _OUR_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        if removed:
            log.debug("removed %d cache files of an earlier mount", removed)

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    @property
    def bytes_used(self) -> int:
        """Bytes of disk the cached blobs occupy (whole 4 KiB pages)."""
        return self._bytes_used

    def __contains__(self, key: tuple[str, int]) -> bool:
        with self._lock:
            return key in self._index

    def get(self, object_id: str, block_no: int) -> memoryview | None:
        """The block's plaintext (read-only), or None on a miss (a damaged slot counts as
        one)."""
        return self._read(object_id, block_no, 0, None)

    def get_range(self, object_id: str, block_no: int, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the block, reading and opening only the chunks that
        hold them; None on a miss, or if the block is shorter than ``end``."""
        if end <= start:
            return b""
        got = self._read(object_id, block_no, start, end)
        return None if got is None else bytes(got)

    def _read(self, object_id: str, block_no: int, start: int,
              end: int | None) -> memoryview | None:
        key = (object_id, block_no)
        with self._lock:
            entry = self._index.get(key)
            plain = -1 if entry is None else _plain_length(entry.length)
            if entry is None or (end is not None and end > plain):
                self._misses += 1
                return None
            self._index.move_to_end(key)
            fd = self._files[entry.cls][0]
            self._busy += 1
        end = plain if end is None else end
        first, last = start // CHUNK, max(0, end - 1) // CHUNK
        lo = first * SEALED // PAGE * PAGE  # O_DIRECT reads whole, aligned pages
        hi = min((last + 1) * SEALED, entry.length)
        data: bytearray | None = None
        try:
            with self._buffers.take(_pages(hi - lo)) as buf:
                n = self._io(os.preadv, fd, [buf], entry.slot * (PAGE << entry.cls) + lo)
                if n < hi - lo:
                    raise CorruptBlock(f"cache slot holds {lo + n} of {hi} bytes")
                data = bytearray((last - first) * CHUNK + min(CHUNK, plain - last * CHUNK))
                out = memoryview(data)
                for c in range(first, last + 1):
                    at = c * SEALED - lo
                    sealed = buf[at:at + min(SEALED, entry.length - c * SEALED)]
                    into = out[(c - first) * CHUNK:(c - first) * CHUNK + len(sealed) - OVERHEAD]
                    self._cipher.open_into(sealed, _aad(object_id, block_no, c, plain), into)
        except (OSError, CorruptBlock) as exc:
            data = None
            log.debug("dropping unreadable cache slot (block %d): %s", block_no, exc)
        with self._lock:
            self._leave()
            if data is None:
                self._misses += 1
                if self._index.get(key) is entry:
                    self._drop(key)
                return None
            self._hits += 1
        return memoryview(data).toreadonly()[start - first * CHUNK:end - first * CHUNK]

    def put(self, object_id: str, block_no: int, data: bytes | memoryview) -> None:
        """Store a block, evicting the least recently used ones to stay within ``max_bytes``."""
        key = (object_id, block_no)
        plain = len(data)
        length = _sealed_length(plain)
        size = _pages(length)
        if size > self.max_bytes:
            return
        cls = _class_of(length)
        with self._lock:
            if self._closed:
                return
            try:
                fd = self._file(cls)
            except OSError as exc:
                failure: OSError | None = exc
            else:
                failure = None
                entry = _Entry(cls, self._take_slot(cls), length)
                self._busy += 1
        if failure is not None:
            self._warn_once(failure)
            return
        stored = False
        try:
            with self._buffers.take(size) as blob:  # whole pages, for O_DIRECT
                view = memoryview(data)
                for c in range(_chunks(plain)):
                    self._cipher.seal_into(view[c * CHUNK:(c + 1) * CHUNK],
                                           _aad(object_id, block_no, c, plain),
                                           blob[c * SEALED:])
                blob[length:] = bytes(size - length)
                stored = self._write(fd, blob, entry.slot * (PAGE << cls), size)
        finally:
            with self._lock:
                if stored and not self._closed:
                    if key in self._index:
                        self._drop(key)
                    self._index[key] = entry
                    self._bytes_used += size
                    self._evict(self.max_bytes)
                elif not self._closed:
                    self._free_slot(entry)
                self._leave()

    def _write(self, fd: int, blob: memoryview, offset: int, size: int) -> bool:
        """Write a blob to its slot; on a full disk evict ``size`` bytes' worth and try once
        more.  False (with one warning per mount and errno) if it could not be stored."""
        try:
            self._io(_pwrite_all, fd, blob, offset)
            return True
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                self._warn_once(exc)
                return False
        with self._lock:  # make room for this block, then try once more
            self._evict(self._bytes_used - size)
        try:
            self._io(_pwrite_all, fd, blob, offset)
            return True
        except OSError as exc:
            self._warn_once(exc)
            return False

    def _io(self, call: Callable[[int, Any, int], T], fd: int, buf: Any, offset: int) -> T:
        """``call(fd, buf, offset)``; if ``O_DIRECT`` I/O is refused (EINVAL: a file system
        or device wanting other alignment), go on with buffered I/O and try once more."""
        try:
            return call(fd, buf, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
        self._stop_direct()
        return call(fd, buf, offset)

    def _stop_direct(self) -> None:
        with self._lock:
            self._buffered_io()

    def invalidate(self, object_id: str) -> None:
        """Drop every block of ``object_id``."""
        with self._lock:
            for key in [k for k in self._index if k[0] == object_id]:
                self._drop(key)

    def clear(self) -> None:
        """Drop every block."""
        with self._lock:
            for key in list(self._index):
                self._drop(key)

    def close(self) -> None:
        """Delete every file this cache made; later puts store nothing."""
        with self._lock:
            self._closed = True
            self._index.clear()
            self._bytes_used = 0
            for _, path in self._files.values():
                path.unlink(missing_ok=True)
            if self._busy == 0:
                self._close_files()

    # ------------------------------------------------------------------ under the lock
    def _file(self, cls: int) -> int:
        if cls not in self._files:
            path = self.directory / f"slots-{self._tag}-{cls}"
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            fd = -1
            if self._direct and cls >= DIRECT_FROM_CLASS:
                try:
                    fd = os.open(path, flags | os.O_EXCL | os.O_DIRECT, 0o600)
                except OSError as exc:  # EINVAL: no O_DIRECT here (tmpfs before Linux 6.6)
                    if exc.errno != errno.EINVAL:
                        raise
                    self._buffered_io()
            if fd < 0:
                fd = os.open(path, flags | os.O_EXCL, 0o600)
            self._files[cls] = (fd, path)
        return self._files[cls][0]

    def _buffered_io(self) -> None:
        if not self._direct:
            return
        self._direct = False
        for fd, _ in self._files.values():
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        log.debug("block cache in %s: O_DIRECT refused, using buffered I/O", self.directory)

    def _take_slot(self, cls: int) -> int:
        free = self._free.get(cls)
        if free:
            return heapq.heappop(free)
        slot = self._next.get(cls, 0)
        self._next[cls] = slot + 1
        return slot

    def _free_slot(self, entry: _Entry) -> None:
        try:
            _punch(self._files[entry.cls][0], entry.slot * (PAGE << entry.cls), PAGE << entry.cls)
        except OSError as exc:  # the blob stays (sealed) until the slot is reused
            log.debug("could not free cache space: %s", exc)
        heapq.heappush(self._free.setdefault(entry.cls, []), entry.slot)

    def _drop(self, key: _Key) -> None:
        entry = self._index.pop(key)
        self._bytes_used -= _pages(entry.length)
        self._free_slot(entry)

    def _evict(self, limit: int) -> None:
        while self._index and self._bytes_used > max(limit, 0):
            self._drop(next(iter(self._index)))

    def _leave(self) -> None:
        self._busy -= 1
        if self._closed and self._busy == 0:
            self._close_files()

    def _close_files(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def _warn_once(self, exc: OSError) -> None:
        code = exc.errno or 0
        with self._lock:
            if code in self._warned:
                return
            self._warned.add(code)
        log.warning(
            "block cache in %s cannot store blocks (%s); reading on without caching them",
            self.directory,
            os.strerror(code) if code else exc,
        )
