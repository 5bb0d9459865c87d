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

A spill made with a key file's key (an SSE-C mount) is *recoverable*: it is sealed under a key
derived from that key and a random salt (:meth:`LocalCipher.derived`), and once an upload of its
file has failed, a journal beside it (``spill-….journal``, written by rename so it is whole or
absent) names the file, its size, its blocks and what it was based on, sealed the same way.
The salt and the key's fingerprint are the journal's clear header: the next mount
(:mod:`s3ssefs.recovery`) finds the key with them, reopens the spill and uploads the file.
While a process uses a spill it holds an exclusive ``flock`` on it: a mount sharing the cache
directory never takes (or sweeps away) a spill that is still in use.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .crypto import OVERHEAD, BufferPool, CorruptBlock, LocalCipher
from .keys import Key

log = logging.getLogger(__name__)

_HEADER = 4
JOURNAL_MAGIC = b"s3ssefs-spill-journal 1\n"
JOURNAL_SUFFIX = ".journal"
_buffers = BufferPool()  # shared by every spill: only the blocks in flight need one


class Spill:
    """One open file's dirty data, encrypted at rest in fixed-size blocks, in a sparse file.

    ``key``: the key file's key writes use; the spill is then recoverable (see the module
    docstring), else sealed with ``cipher``, the mount's random in-memory key."""

    def __init__(self, directory: Path, cipher: LocalCipher, block_size: int,
                 key: Key | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, not {block_size}")
        self.block_size = block_size
        self._slot_size = _HEADER + block_size + OVERHEAD
        self._id = secrets.token_bytes(16)
        self._salt = secrets.token_bytes(16) if key is not None else None
        self._key_fp = key.fingerprint if key is not None else None
        self._cipher = LocalCipher.derived(key.raw, self._salt, b"spill") \
            if key is not None and self._salt is not None else cipher
        self._lock = threading.Lock()
        self._blocks: set[int] = set()
        self.journaled = False  # a journal names this spill's file (write_journal)
        self.path = Path(directory) / f"spill-{secrets.token_hex(16)}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd: int | None = os.open(self.path, flags, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @classmethod
    def reopen(cls, journal: Path, key_for: Callable[[str], Key | None],
               ) -> tuple[Spill, dict[str, Any]]:
        """The spill a journal describes, locked for this process, and the journal's content.

        ``key_for(fingerprint)`` is the key file's key with that fingerprint, or None.
        Raises :class:`CorruptBlock` for a journal that does not open (another key file's,
        or damaged), ``LookupError`` when no key of ``key_for`` fits, ``BlockingIOError``
        while another process holds the spill, ``OSError`` otherwise."""
        path = journal.with_suffix("")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # first: the journal is then ours
            raw = journal.read_bytes()
            if not raw.startswith(JOURNAL_MAGIC):
                raise CorruptBlock(f"{journal.name} is not a spill journal")
            head, _, blob = raw[len(JOURNAL_MAGIC):].partition(b"\n")
            try:
                header = json.loads(head)
                salt, fp = bytes.fromhex(header["salt"]), str(header["key"])
                spill_id, block_size = bytes.fromhex(header["id"]), int(header["block_size"])
            except (ValueError, KeyError, TypeError):
                raise CorruptBlock(f"{journal.name} has a bad header") from None
            key = key_for(fp)
            if key is None:
                raise LookupError(fp)
            cipher = LocalCipher.derived(key.raw, salt, b"spill")
            body = json.loads(cipher.open(blob, b"journal\0" + spill_id))
            blocks = {int(b) for b in body["blocks"]}
        except BaseException:
            os.close(fd)
            raise
        spill = cls.__new__(cls)
        spill.block_size = block_size
        spill._slot_size = _HEADER + block_size + OVERHEAD
        spill._id, spill._salt, spill._key_fp, spill._cipher = spill_id, salt, fp, cipher
        spill._lock = threading.Lock()
        spill._blocks = blocks
        spill.journaled = True
        spill.path = path
        spill._fd = fd
        return spill, body

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

    @property
    def recoverable(self) -> bool:
        """Whether a journal can be written (the spill is sealed under a key file's key)."""
        return self._salt is not None

    @property
    def journal_path(self) -> Path:
        return self.path.with_name(self.path.name + JOURNAL_SUFFIX)

    def write_journal(self, info: dict[str, Any]) -> None:
        """Record ``info`` (what the file is, JSON) and the blocks held now, sealed, so that
        the next mount can upload the file if this process never does.  The journal is
        written to a temporary file, synced and renamed over the old one, with the spill's
        data synced first: after a crash it is the old journal or the new, and the blocks
        it names are on disk."""
        assert self._salt is not None and self._key_fp is not None
        fd = self._fileno()
        header = json.dumps({"salt": self._salt.hex(), "key": self._key_fp,
                             "id": self._id.hex(), "block_size": self.block_size})
        body = json.dumps({**info, "blocks": self.block_numbers()}).encode()
        sealed = self._cipher.seal(body, b"journal\0" + self._id)
        os.fsync(fd)
        tmp = self.path.with_name(self.path.name + ".tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                      | os.O_NOFOLLOW, 0o600)
        try:
            os.write(out, JOURNAL_MAGIC + header.encode() + b"\n" + sealed)
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(tmp, self.journal_path)
        self.journaled = True
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def drop_journal(self) -> None:
        """The file no longer needs recovering (uploaded, or unlinked)."""
        self.journal_path.unlink(missing_ok=True)
        self.journaled = False

    def close(self) -> None:
        """Delete the file and its journal; calling it again does nothing."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._blocks.clear()
        if fd is None:
            return
        self.drop_journal()
        self.path.unlink(missing_ok=True)
        os.close(fd)  # the lock goes last: nobody may take a spill half deleted

    def release(self) -> None:
        """Close without deleting: the file and its journal stay for the next mount."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def sweep(directory: Path) -> None:
    """Delete the spills in ``directory`` that no process uses and no journal keeps: left
    by a mount that ended before they needed recovering, they hold nothing owed to S3."""
    for path in directory.glob("spill-*"):
        if path.name.endswith((JOURNAL_SUFFIX, ".tmp")):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
            continue
        if path.with_name(path.name + JOURNAL_SUFFIX).exists():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except OSError:
            pass  # in use
        finally:
            os.close(fd)
