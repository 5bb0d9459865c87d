"""Spill: an open file's dirty data, kept on local disk (encrypted) until it is uploaded.

Written data can be far larger than memory and must survive a failed upload to be retried
(close-to-open, DESIGN §5), so it goes to a local file; plaintext never may (DESIGN §6), so
each fixed-size block is sealed with the mount's :class:`~s3ssefs.crypto.LocalCipher`.

Layout: block ``i`` lives in slot ``i`` at offset ``i * slot_size``; a slot holds a 4-byte
big-endian length and the sealed blob (the block plus :data:`~s3ssefs.crypto.OVERHEAD`).  Slots
never written are holes in a sparse file, so a write at 10 GiB costs one block of disk.  The
associated data binds a random per-spill id and the block number: a slot copied from another
spill or another block fails to open.

Threads may read and write *different* blocks at once (``pread``/``pwrite`` on one fd; a lock
guards the set of written blocks).  Calls on the same block must not overlap.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from pathlib import Path

from .crypto import OVERHEAD, BufferPool, CorruptBlock, LocalCipher

log = logging.getLogger(__name__)

_HEADER = 4
_buffers = BufferPool()  # shared by every spill: only the blocks in flight need one


class Spill:
    """One open file's dirty data, encrypted at rest in fixed-size blocks, in a sparse file."""

    def __init__(self, directory: Path, cipher: LocalCipher, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, not {block_size}")
        self.block_size = block_size
        self._slot_size = _HEADER + block_size + OVERHEAD
        self._cipher = cipher
        self._id = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._blocks: set[int] = set()
        self.path = Path(directory) / f"spill-{secrets.token_hex(16)}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd: int | None = os.open(self.path, flags, 0o600)

    def __repr__(self) -> str:
        return f"<Spill {self.path.name} blocks={len(self._blocks)}>"

    def _aad(self, block_no: int) -> bytes:
        return b"spill\0" + self._id + block_no.to_bytes(8, "big")

    def _fileno(self) -> int:
        if self._fd is None:
            raise ValueError("spill is closed")
        return self._fd

    def write_block(self, block_no: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` (at most ``block_size`` bytes) as block ``block_no``, replacing it.

        Disk full raises ``OSError(ENOSPC)``.  A failed *re*write leaves the block unreadable
        (:meth:`read_block` raises :class:`CorruptBlock`), never silently old or mixed data.
        """
        if block_no < 0:
            raise ValueError(f"negative block number {block_no}")
        if len(data) > self.block_size:
            raise ValueError(f"{len(data)} bytes do not fit a block of {self.block_size}")
        fd, offset = self._fileno(), block_no * self._slot_size
        with _buffers.take(_HEADER + len(data) + OVERHEAD) as view:
            n = self._cipher.seal_into(data, self._aad(block_no), view[_HEADER:])
            view[:_HEADER] = n.to_bytes(_HEADER, "big")
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        with self._lock:
            self._blocks.add(block_no)

    def read_block(self, block_no: int) -> bytes | None:
        """Exactly the bytes last written to ``block_no``, or None if it holds none."""
        if not self.has_block(block_no):
            return None
        fd, offset = self._fileno(), block_no * self._slot_size
        length = int.from_bytes(os.pread(fd, _HEADER, offset), "big")
        if not OVERHEAD <= length <= self._slot_size - _HEADER:
            raise CorruptBlock(f"spill block {block_no} has a bad length")
        with _buffers.take(length) as blob:
            if os.preadv(fd, [blob], offset + _HEADER) != length:
                raise CorruptBlock(f"spill block {block_no} is truncated")
            return self._cipher.open(blob, self._aad(block_no))

    def has_block(self, block_no: int) -> bool:
        with self._lock:
            return block_no in self._blocks

    def drop_from(self, block_no: int) -> None:
        """Forget blocks ``>= block_no`` and give their disk space back."""
        block_no = max(block_no, 0)
        with self._lock:
            self._blocks = {b for b in self._blocks if b < block_no}
            fd, size = self._fileno(), block_no * self._slot_size
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)

    def block_numbers(self) -> list[int]:
        with self._lock:
            return sorted(self._blocks)

    def close(self) -> None:
        """Delete the file; calling it again does nothing."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._blocks.clear()
        if fd is None:
            return
        os.close(fd)
        self.path.unlink(missing_ok=True)
