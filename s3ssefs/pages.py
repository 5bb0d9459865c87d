"""KernelPages: put file content we fetched into the kernel's page cache (FUSE notify_store).

With ``random_readahead`` a random read that misses starts a background GET of the region
around it.  The kernel only keeps the pages a program read, so every later read in that
region used to come back to the daemon as a FUSE request, and a block the memory LRU had let
go was read from the encrypted disk cache: a thread hop, a disk read and a decryption per
4 KiB read.  Handing the fetched region to the kernel instead makes those reads page-cache
hits that never reach us, and the region need not be sealed and written to disk at all (the
disk writes had also stalled single reads; figures in docs/benchmarks.md).

The store is a write to ``/dev/fuse`` in which the kernel locks each page it fills.  A page
is also locked while the kernel waits for our answer to a read of it, and answers come from
the trio thread; so a store runs in a worker thread, never on the trio thread, or it could
wait for a page whose read waits for it.

A store must never put old content over newer pages.  Callers start one only for a file whose
content is exactly the fetched object version (no handle open for writing, nothing written or
truncated), and everything that may change the content or the kernel's idea of it (an open,
a setattr) first waits, with :meth:`KernelPages.settle`, for the stores in flight for that
inode: after that, the check the caller made still holds for any store that follows.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence

import trio

from s3ssefs import workers

log = logging.getLogger(__name__)

Buf = bytes | bytearray | memoryview
Store = Callable[[int, int, Buf], None]


class KernelPages:
    """Stores into the kernel's page cache, and the ones in flight per inode."""

    def __init__(self, store: Store) -> None:
        self._store = store  # pyfuse3.notify_store, once the FUSE session is up
        self._busy: dict[int, int] = {}
        self._idle: dict[int, trio.Event] = {}
        self._limiter = trio.CapacityLimiter(1)  # a memory copy each: no use in parallel
        self.enabled = True  # until the kernel says it cannot (ENOSYS)

    async def put(self, ino: int, pieces: Sequence[tuple[int, Buf]]) -> bool:
        """Store ``(offset, data)`` pieces of inode ``ino``; whether all were stored.

        Counted as in flight from the call on, before anything can run in between, so a
        :meth:`settle` that starts after the caller's checks waits for it."""
        if not self.enabled:
            return False
        self._busy[ino] = self._busy.get(ino, 0) + 1
        try:
            await workers.run_sync(self._put_all, ino, pieces, limiter=self._limiter)
        except OSError as e:  # ENOENT: the kernel has forgotten the inode meanwhile
            if e.errno == errno.ENOSYS:
                self.enabled = False
            log.debug("could not hand pages of inode %d to the kernel: %s", ino, e)
            return False
        finally:
            self._busy[ino] -= 1
            if not self._busy[ino]:
                del self._busy[ino]
                idle = self._idle.pop(ino, None)
                if idle is not None:
                    idle.set()
        return True

    def _put_all(self, ino: int, pieces: Sequence[tuple[int, Buf]]) -> None:
        for offset, data in pieces:
            if len(data):
                self._store(ino, offset, data)

    async def settle(self, ino: int) -> None:
        """Return once no store for ``ino`` is in flight."""
        while ino in self._busy:
            idle = self._idle.get(ino)
            if idle is None:
                idle = self._idle[ino] = trio.Event()
            await idle.wait()
