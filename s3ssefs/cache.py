"""BlockCache: object blocks kept on local disk, encrypted, bounded by size, LRU.

Reading a block from S3 costs a round trip; re-reading it from local disk does not.  The cache
holds blocks of object *versions* (the caller's ``object_id`` is built from key and ETag), so an
entry never goes stale: a new version simply has another id, and :meth:`BlockCache.invalidate`
frees the old one's space early.

Every block is sealed with the mount's :class:`~s3ssefs.crypto.LocalCipher` (the associated
data names object and block, so a file swapped for another fails to open) and stored under a
keyed-HMAC file name that says nothing about the object.  Files of earlier mounts are
unreadable, so they are deleted on start.

The cache is only a cache: a corrupt or vanished file reads as a miss, and a full disk drops
the block (after evicting and retrying once) with one warning per mount instead of failing the
read that wanted to store it.

Threads: many worker threads call in at once.  One lock guards the index, and every rename or
unlink of a final file name happens under it, so "in the index" and "file exists" always agree.
Encryption and the writing and reading of file contents happen outside the lock; a reader that
opened a file just before it was replaced or unlinked still reads a whole, valid blob.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

from .crypto import CorruptBlock, LocalCipher

log = logging.getLogger(__name__)

_OUR_FILE = re.compile(r"[0-9a-f]{64}(\.[0-9a-f]+\.tmp)?")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

_Key = tuple[str, int]


def _aad(object_id: str, block_no: int) -> bytes:
    return f"cache\0{block_no}\0".encode() + object_id.encode("utf-8", "surrogateescape")


def _write_file(path: Path, data: bytes) -> None:
    """Write a new file, removing it again if that fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


class BlockCache:
    """Encrypted on-disk cache of object blocks, bounded by size, LRU."""

    def __init__(self, directory: Path, max_bytes: int, cipher: LocalCipher) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._cipher = cipher
        self._lock = threading.Lock()
        self._index: OrderedDict[_Key, int] = OrderedDict()  # -> size on disk, LRU first
        self._bytes_used = 0
        self._hits = 0
        self._misses = 0
        self._closed = False
        self._warned: set[int] = set()  # errnos already reported

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
        """Bytes of cache files on disk."""
        return self._bytes_used

    def _path(self, key: _Key) -> Path:
        return self.directory / self._cipher.name_for(key[0], str(key[1]))

    def __contains__(self, key: tuple[str, int]) -> bool:
        with self._lock:
            return key in self._index

    def get(self, object_id: str, block_no: int) -> bytes | None:
        """The block's plaintext, or None on a miss (corrupt or vanished files count as one)."""
        key = (object_id, block_no)
        with self._lock:
            if key not in self._index:
                self._misses += 1
                return None
            self._index.move_to_end(key)
        path = self._path(key)
        try:
            data = self._cipher.open(path.read_bytes(), _aad(*key))
        except (OSError, CorruptBlock) as exc:
            log.debug("dropping unreadable cache file %s (block %d): %s", path.name, block_no, exc)
            with self._lock:
                self._misses += 1
                self._drop(key)
            return None
        with self._lock:
            self._hits += 1
        return data

    def put(self, object_id: str, block_no: int, data: bytes) -> None:
        """Store a block, evicting the least recently used ones to stay within ``max_bytes``."""
        key = (object_id, block_no)
        blob = self._cipher.seal(data, _aad(*key))
        if len(blob) > self.max_bytes:
            return
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            _write_file(tmp, blob)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                self._warn_once(exc)
                return
            with self._lock:  # make room for this block, then try once more
                self._evict(self._bytes_used - len(blob))
            try:
                _write_file(tmp, blob)
            except OSError as exc2:
                self._warn_once(exc2)
                return
        with self._lock:
            if self._closed:
                tmp.unlink(missing_ok=True)
                return
            os.replace(tmp, path)
            self._bytes_used -= self._index.pop(key, 0)
            self._index[key] = len(blob)
            self._bytes_used += len(blob)
            self._evict(self.max_bytes)

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
            for key in list(self._index):
                self._drop(key)

    def _drop(self, key: _Key) -> None:
        # Caller holds the lock.
        self._bytes_used -= self._index.pop(key, 0)
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            log.debug("could not delete cache file: %s", exc)

    def _evict(self, limit: int) -> None:
        # Caller holds the lock.
        while self._index and self._bytes_used > max(limit, 0):
            self._drop(next(iter(self._index)))

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
