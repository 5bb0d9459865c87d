"""MetaIndex: what HEADs told about listed objects, kept across mounts.

An S3 listing gives each object's ETag, size and LastModified but none of its user metadata
(mode, uid, gid, mtime), so right after a mount ``ls -l``, ``find``, ``du`` or ``rsync`` over
a directory would cost one HEAD per file.  This index keeps, per object, what its last HEAD said
(user metadata, the id of the key that opened it, its version) with the ETag, size and
LastModified the object had then.  While a listing shows the same three, the entry stands in
for the HEAD.  Whatever changes an object in S3 gives it a new LastModified, a change of its
metadata alone included (CopyObject with ``MetadataDirective=REPLACE``, a re-PUT of the same
bytes, which on RGW keeps the ETag), so a changed object no longer matches and is HEADed again.

But a listing may count LastModified in whole seconds (AWS, LocalStack; RGW counts
milliseconds): a metadata-only change in the same second as the write before it shows the same
ETag, size and LastModified.  So what was learnt of an object (a HEAD's answer, or a write from
this mount) is kept only once that second had passed when it was learnt, with :data:`SETTLE`
seconds to spare for a request in flight and the two clocks (:func:`settled`); an object
changed just before its HEAD is HEADed again at the next mount, and kept then.

One index per endpoint, bucket and prefix, a SQLite file under the cache directory, so a mount
of the same bucket on another mount point finds it too.  SQLite gives crash safety: a commit
(write-ahead log) is all or nothing, so a daemon killed mid-write leaves the last committed
state.  Authenticity comes from sealing: each entry is AES-GCM sealed with a key derived (HKDF)
from one key of the key file and the index's scope, the entry's id as associated data; the id
is an HMAC of the object's key, so no object name is stored in clear.  A file that does not
open as one of ours (truncated, corrupted, made with another key file, or whose key left the
key file) is discarded whole with one log line and started afresh; so is the whole index when
one entry fails authentication: nothing of a tampered file is trusted.

Bounded by ``meta_index_size``: past it, the entries least recently used (counted in mount
sessions, then in writes to the file within one) are dropped.  An entry's use is kept per
directory, not per entry: a listing reads a directory's entries together, and marking each
one read in every session rewrote the whole index on every remount (as much CPU as the rest
of ``ls -l``).  An entry counts as used when last written or when any entry of its directory
was last read.  Memory: nothing per entry
beyond SQLite's page cache and the entries waiting to be written.  Blocking work runs in
worker threads, one call at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from s3ssefs import workers
from s3ssefs.crypto import CorruptBlock, LocalCipher, derive_key
from s3ssefs.keys import KeyFile
from s3ssefs.stats import Stats
from s3ssefs.store import ObjectInfo

log = logging.getLogger(__name__)

FORMAT = "2"
LABEL = b"s3ssefs metadata index v1\0"
CHECK = b"s3ssefs metadata index"
FLUSH_AT = 512  # entries noted before a write to disk starts
QUERY_CHUNK = 500  # ids per SELECT
KEEP = 0.9  # share of the bound left filled after dropping old entries
SETTLE = 2.0  # seconds past a whole-second LastModified before what a HEAD says is kept
ROW_EXTRA = 40  # bytes an entry takes in the file beyond its sealed blob (id, B-tree cell)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS entries (id BLOB PRIMARY KEY, used INTEGER NOT NULL,
                                    sealed BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dirs (dir BLOB PRIMARY KEY, used INTEGER NOT NULL) WITHOUT ROWID;
"""
STAMPS = 1 << 32  # writes a session may count in an entry's "used" (MetaIndex._stamp)
DIR_ID = 8  # bytes of an entry's id that name its directory (MetaIndex._id)


class _Unusable(Exception):
    """The file on disk is not an index this mount can trust."""


def _busy(e: Exception) -> bool:
    """Another mount of the same bucket holds the file longer than the connection waits:
    nothing wrong with it, so it is left alone."""
    return getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


@dataclass(slots=True)
class Entry:
    """What a HEAD said of one object, and how a listing showed it then."""

    etag: str
    size: int
    listed_mtime: float  # LastModified as a listing shows it (the validity check)
    head_mtime: float  # LastModified as the HEAD said it (what attributes use)
    key_id: str  # "" for an object stored without SSE-C
    version_id: str | None
    metadata: dict[str, str]
    link: bytes | None = None  # a symlink's target (its body), once read: ls -l shows it

    def matches(self, etag: str, size: int, mtime: float) -> bool:
        return bool(etag) and (self.etag, self.size, self.listed_mtime) == (etag, size, mtime)

    def info(self, s3key: str) -> ObjectInfo:
        return ObjectInfo(key=s3key, size=self.size, etag=self.etag, mtime=self.head_mtime,
                          metadata=dict(self.metadata), version_id=self.version_id)

    def pack(self) -> bytes:
        """Fields joined by NUL, which no header (so no ETag, id or metadata) and no symlink
        target can hold; a version id or target of ``None`` is empty, as neither can be."""
        link = self.link.decode("utf-8", "surrogateescape") if self.link else ""
        fields = [self.etag, str(self.size), repr(self.listed_mtime), repr(self.head_mtime),
                  self.key_id, self.version_id or "", link]
        for k, v in self.metadata.items():
            fields += (k, v)
        return "\0".join(fields).encode("utf-8", "surrogateescape")

    @classmethod
    def unpack(cls, raw: bytes) -> Entry:
        f = raw.decode("utf-8", "surrogateescape").split("\0")
        if len(f) < 7 or len(f) % 2 == 0:
            raise ValueError("malformed entry")
        return cls(f[0], int(f[1]), float(f[2]), float(f[3]), f[4], f[5] or None,
                   dict(zip(f[7::2], f[8::2], strict=True)),
                   f[6].encode("utf-8", "surrogateescape") or None)


def settled(listed_mtime: float, known_at: float) -> bool:
    """Whether what was learnt of an object at ``known_at`` (wall clock) may stand in later
    mounts for the object a listing shows with LastModified ``listed_mtime``: always when the
    listing counts milliseconds, else only when that second had passed (see the module
    docstring) -- a later change of the object then has another LastModified."""
    return listed_mtime != int(listed_mtime) or known_at >= int(listed_mtime) + 1 + SETTLE


def index_path(cache_dir: Path, scope: str) -> Path:
    """The index file of one endpoint/bucket/prefix (``scope``) under ``cache_dir``."""
    return cache_dir / "meta" / (hashlib.sha256(scope.encode()).hexdigest()[:32] + ".idx")


class MetaIndex:
    """The persistent index of one mount's bucket/prefix (see the module docstring)."""

    def __init__(self, path: Path, keyfile: KeyFile, scope: str, max_bytes: int,
                 stats: Stats | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.stats = stats
        self._keyfile = keyfile
        self._scope = scope.encode()
        self._lock = threading.Lock()  # the connection, one thread at a time
        self._db: sqlite3.Connection | None = None
        self._cipher: LocalCipher | None = None
        self._name_key = b""
        self._session = 0
        self._writes = 0  # writes to the file this session (see _stamp)
        # trio thread only: entries noted (None: forgotten) and the directories read from,
        # not yet written; the directories marked used this session already
        self._pending: dict[str, Entry | None] = {}
        self._touched: set[bytes] = set()
        self._marked: set[bytes] = set()
        self._flush_lock = trio.Lock()
        self._flush_due = False
        with self._lock:
            self._open()

    def __repr__(self) -> str:
        return f"<MetaIndex {self.path}>"  # never show key material

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            self._create()
            return
        try:
            self._connect()
            self._load()
        except (sqlite3.DatabaseError, _Unusable, CorruptBlock, ValueError, KeyError) as e:
            if _busy(e):
                log.info("metadata index %s busy (%s): none this mount", self.path, e)
                self._close()
                return
            self._discard(str(e) or type(e).__name__)

    def _connect(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA journal_size_limit=1048576")

    def _meta(self) -> dict[str, bytes]:
        assert self._db is not None
        return {str(n): bytes(v) for n, v in self._db.execute("SELECT name, value FROM meta")}

    def _keys(self, key_id: str, salt: bytes) -> None:
        key = self._keyfile.by_id(key_id)
        if key is None:
            raise _Unusable(f"made with key {key_id!r}, which the key file no longer has")
        material = derive_key(key.raw, salt, LABEL + self._scope, 64)
        self._cipher = LocalCipher(material[:32])
        self._name_key = material[32:]

    def _load(self) -> None:
        assert self._db is not None
        meta = self._meta()
        if meta.get("format") != FORMAT.encode():
            raise _Unusable("not an index of this format")
        self._keys(meta["key_id"].decode(), meta["salt"])
        assert self._cipher is not None
        try:
            self._cipher.open(meta["check"], b"check")
        except CorruptBlock:
            raise _Unusable("sealed with another key (a different key file?)") from None
        self._session = int(meta["session"]) + 1
        with self._db:
            self._db.execute("UPDATE meta SET value=? WHERE name='session'",
                             (str(self._session).encode(),))

    def _create(self) -> None:
        for p in self._files():
            p.unlink(missing_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._connect()
        assert self._db is not None
        key_id = self._keyfile.current
        salt = os.urandom(16)
        self._keys(key_id, salt)
        assert self._cipher is not None
        self._session = 1
        with self._db:
            self._db.executescript(SCHEMA)
            self._db.executemany("INSERT INTO meta(name, value) VALUES (?, ?)", [
                ("format", FORMAT.encode()), ("key_id", key_id.encode()), ("salt", salt),
                ("check", self._cipher.seal(CHECK, b"check")), ("session", b"1")])

    def _files(self) -> list[Path]:
        return [self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"),
                Path(f"{self.path}-journal")]

    def _discard(self, why: str) -> None:
        """Throw the index away and start an empty one (called with the lock held)."""
        log.info("metadata index %s discarded (%s); starting a new one", self.path, why)
        self._close()
        try:
            self._create()
        except (OSError, sqlite3.Error, _Unusable) as e:
            log.info("metadata index %s not available: %s", self.path, e)
            self._close()

    def _close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None
        self._cipher = None

    def _id(self, s3key: str) -> bytes:
        """A keyed hash of the directory, then of the name: the entries of one directory
        lie together in the file, as a listing asks for them."""
        d, _, name = s3key.rpartition("/")
        k = self._name_key
        return (hashlib.blake2b(d.encode("utf-8", "surrogateescape"), key=k, digest_size=8,
                                person=b"dir").digest() +
                hashlib.blake2b(name.encode("utf-8", "surrogateescape"), key=k,
                                digest_size=12, person=b"name").digest())

    # ------------------------------------------------------------------ reading
    async def lookup(self, items: list[tuple[str, str, int, float]]) -> dict[str, Entry]:
        """The entries valid for objects a listing shows as ``(s3key, etag, size, mtime)``."""
        found: dict[str, Entry] = {}
        ask: list[tuple[str, str, int, float]] = []
        for item in items:
            if item[0] in self._pending:
                e = self._pending[item[0]]
                if e is not None and e.matches(*item[1:]):
                    found[item[0]] = e
            else:
                ask.append(item)
        if ask:
            got, touched = await workers.run_sync(self._lookup, ask)
            found.update(got)
            self._touched |= touched - self._marked
        if self.stats is not None and found:
            self.stats.add("meta_index_hits", len(found))
        return found

    def _lookup(self, items: list[tuple[str, str, int, float]],
                ) -> tuple[dict[str, Entry], set[bytes]]:
        found: dict[str, Entry] = {}
        touched: set[bytes] = set()
        with self._lock:
            if self._db is None or self._cipher is None:
                return found, touched
            try:
                ids = {self._id(it[0]): it for it in items}
                keys = list(ids)
                for i in range(0, len(keys), QUERY_CHUNK):
                    chunk = keys[i:i + QUERY_CHUNK]
                    rows = self._db.execute(
                        "SELECT id, sealed FROM entries WHERE id IN "
                        f"({','.join('?' * len(chunk))})", chunk).fetchall()
                    for rid, sealed in rows:
                        rid = bytes(rid)
                        s3key, etag, size, mtime = ids[rid]
                        e = Entry.unpack(self._cipher.open(sealed, rid))
                        if e.matches(etag, size, mtime):
                            found[s3key] = e
                            touched.add(rid[:DIR_ID])
            except (sqlite3.DatabaseError, CorruptBlock, ValueError, TypeError, KeyError) as e:
                if not _busy(e):
                    self._discard(f"unreadable: {e}")
                return {}, set()
        return found, touched

    # ------------------------------------------------------------------ writing
    def note(self, s3key: str, entry: Entry) -> bool:
        """Remember ``entry`` for ``s3key``; True when a :meth:`flush` should start."""
        self._pending[s3key] = entry
        return self.due()

    def forget(self, s3key: str) -> bool:
        """``s3key`` is gone (or renamed): drop its entry; True as :meth:`note`."""
        self._pending[s3key] = None
        return self.due()

    def due(self) -> bool:
        """True (once) when enough was noted or read to start a :meth:`flush`."""
        if self._flush_due or len(self._pending) + len(self._touched) < FLUSH_AT:
            return False
        self._flush_due = True
        return True

    async def flush(self) -> None:
        """Write what was noted (in a worker thread)."""
        async with self._flush_lock:
            self._flush_due = False
            if not self._pending and not self._touched:
                return
            pending, self._pending = self._pending, {}
            touched, self._touched = self._touched, set()
            self._marked |= touched
            await workers.run_sync(self._write, pending, touched)

    def close(self) -> None:
        """Write what is left and close the file (blocking: at unmount)."""
        pending, self._pending = self._pending, {}
        touched, self._touched = self._touched, set()
        self._write(pending, touched)
        with self._lock:
            self._close()

    def _stamp(self) -> int:
        """When an entry was written or its directory read: the session, then the write in
        it, so that of the entries of one session the first written go first."""
        self._writes += 1
        return self._session * STAMPS + self._writes

    def _write(self, pending: dict[str, Entry | None], touched: set[bytes]) -> None:
        with self._lock:
            if self._db is None or self._cipher is None:
                return
            cipher = self._cipher
            used = self._stamp()
            put, drop = [], []
            for s3key, e in pending.items():
                rid = self._id(s3key)
                if e is None:
                    drop.append((rid,))
                else:
                    put.append((rid, used, cipher.seal(e.pack(), rid)))
            try:
                with self._db:
                    self._db.executemany("DELETE FROM entries WHERE id=?", drop)
                    self._db.executemany("INSERT OR REPLACE INTO dirs(dir, used) VALUES (?, ?)",
                                         [(d, used) for d in touched])
                    self._bound(sum(len(p[2]) + ROW_EXTRA for p in put))
                    self._db.executemany(
                        "INSERT OR REPLACE INTO entries(id, used, sealed) VALUES (?, ?, ?)", put)
                if self._pragma("page_count") * self._pragma("page_size") > 2 * self.max_bytes:
                    self._db.execute("VACUUM")  # a bound lowered since the file grew
            except sqlite3.DatabaseError as e:
                if _busy(e):  # another mount's turn: these entries are simply not kept
                    log.debug("metadata index busy, %d entries not kept", len(put))
                else:
                    self._discard(f"write failed: {e}")

    def _pragma(self, name: str) -> int:
        assert self._db is not None
        return int(self._db.execute(f"PRAGMA {name}").fetchone()[0])

    def _bound(self, incoming: int) -> None:
        """Make room for about ``incoming`` bytes of entries within ``max_bytes``: when the
        pages in use and those would pass it, drop the entries used longest ago, down to
        :data:`KEEP` of the bound (so this happens once in many writes, not at each)."""
        assert self._db is not None
        live = (self._pragma("page_count") - self._pragma("freelist_count")) * \
            self._pragma("page_size")
        if live + incoming <= self.max_bytes:
            return
        count = int(self._db.execute("SELECT count(*) FROM entries").fetchone()[0])
        if not count:
            return
        per_entry = live / count
        keep = max(0, int((KEEP * self.max_bytes - incoming) / per_entry))
        if keep >= count:
            return
        self._db.execute(
            "DELETE FROM entries WHERE id IN (SELECT e.id FROM entries e LEFT JOIN dirs d "
            f"ON d.dir = substr(e.id, 1, {DIR_ID}) "
            "ORDER BY max(e.used, coalesce(d.used, 0)) LIMIT ?)", (count - keep,))
        self._db.execute(f"DELETE FROM dirs WHERE dir NOT IN (SELECT substr(id, 1, {DIR_ID}) "
                         "FROM entries)")
        log.debug("metadata index: dropped %d old entries (bound %d bytes)", count - keep,
                  self.max_bytes)


def open_index(cache_dir: Path, keyfile: KeyFile | None, scope: str, max_bytes: int,
               stats: Stats | None = None) -> MetaIndex | None:
    """The mount's index, or None when there is none to keep: no key file to seal it with
    (``sse=s3``/``kms``) or a bound of 0; a cache directory that cannot hold it is said once."""
    if keyfile is None or max_bytes <= 0:
        return None
    try:
        return MetaIndex(index_path(cache_dir, scope), keyfile, scope, max_bytes, stats)
    except (OSError, sqlite3.Error, _Unusable) as e:
        log.info("no metadata index (%s): listings are followed by HEADs", e)
        return None


def scope_of(cfg: Any) -> str:
    """What one index covers: endpoint, bucket and prefix of a mount config."""
    return f"{cfg.endpoint or 'aws'}\0{cfg.bucket}\0{cfg.prefix}"
