"""Encryption for everything this program puts on local disk.

Objects are encrypted in S3 with the customer's key, so their plaintext must not end up in the
clear in the block cache or the write spill either.  Each mount makes a random AES-256-GCM key,
keeps it in memory only and forgets it when it exits: whatever a mount leaves on disk (after a
crash, say) cannot be read by anyone, not even the next mount.

GCM authenticates as well as encrypts, and callers pass *associated data* naming what a blob
is (which object, which block); a file that was truncated, corrupted or swapped for another
fails to open instead of returning wrong data.  Nonces are random: at 96 bits that is safe for
far more blobs than one mount writes.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
"""How many bytes :meth:`LocalCipher.seal` adds to its input."""


class CorruptBlock(Exception):
    """A sealed blob failed authentication or is truncated."""


class LocalCipher:
    """AES-256-GCM with a random key made per mount, held only in memory."""

    def __init__(self) -> None:
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))

    def __repr__(self) -> str:
        return "<LocalCipher>"  # never show key material

    def seal(self, plaintext: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        """Encrypt and authenticate; returns ``nonce || ciphertext || tag``."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def seal_into(self, plaintext: bytes | bytearray | memoryview, aad: bytes,
                  out: memoryview) -> int:
        """:meth:`seal` written into ``out`` (at least ``len(plaintext) + OVERHEAD`` bytes);
        returns the blob's length."""
        n = len(plaintext) + OVERHEAD
        nonce = os.urandom(NONCE_SIZE)
        out[:NONCE_SIZE] = nonce
        self._aead.encrypt_into(nonce, plaintext, aad, out[NONCE_SIZE:n])
        return n

    def open_into(self, blob: bytes | bytearray | memoryview, aad: bytes,
                  out: memoryview) -> None:
        """:meth:`open` into ``out`` (exactly ``len(blob) - OVERHEAD`` bytes)."""
        if len(blob) < OVERHEAD:
            raise CorruptBlock(f"sealed blob too short ({len(blob)} bytes)")
        view = memoryview(blob)
        try:
            self._aead.decrypt_into(view[:NONCE_SIZE], view[NONCE_SIZE:], aad, out)
        except InvalidTag:
            raise CorruptBlock("sealed blob failed authentication") from None

    def open(self, blob: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        """Return the plaintext of a blob made by :meth:`seal` with the same ``aad``."""
        if len(blob) < OVERHEAD:
            raise CorruptBlock(f"sealed blob too short ({len(blob)} bytes)")
        view = memoryview(blob)
        try:
            return self._aead.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
        except InvalidTag:
            raise CorruptBlock("sealed blob failed authentication") from None


class BufferPool:
    """A few reusable, page-aligned buffers for blobs on their way to or from disk.

    A fresh megabyte buffer per block costs a page fault per 4 KiB the first time it is
    written (the kernel hands out zeroed pages); sealing into, or reading into, a reused one
    costs none.  That was most of the CPU of putting a block in the cache.  Buffers are
    anonymous mappings, so they start on a page boundary and whole pages long, as ``O_DIRECT``
    I/O requires (:mod:`s3ssefs.cache`).
    """

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    @contextmanager
    def take(self, size: int) -> Iterator[memoryview]:
        """A writable view of ``size`` bytes, valid until the ``with`` block ends."""
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None or len(buf) < size:
            buf = mmap.mmap(-1, max(-(-size // mmap.PAGESIZE), 1) * mmap.PAGESIZE,
                            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            yield memoryview(buf)[:size]
        finally:
            with self._lock:
                if len(self._free) < self._keep:
                    self._free.append(buf)
