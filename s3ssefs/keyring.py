"""KeyRing: which key opens an object, found in the key file's order and remembered.

The key file (:mod:`s3ssefs.keys`) says in which order to try keys for a path; this module does
the trying.  A wrong guess costs one HEAD (never a GET of data): on RGW a HEAD with the wrong key
is a bare 400, on AWS a 403, both EACCES from the store.  The key that worked is remembered per
object by *id* — in memory, and in ``learned.json`` in the cache directory so a remount does not
guess again — together with the object's ETag, so a changed object is tried afresh.

Objects stored without SSE-C are opened with no key: ``None`` is the last candidate, and an
object whose HEAD echoes no customer-key MD5, or echoes SSE-S3/KMS, is plain (RGW and
LocalStack ignore a key sent for a plain object).  AWS refuses a key sent for a plain object
with 400 but a wrong key with 403, so a 400 to a keyed HEAD moves "no key" to the next trial —
unless this server is known to answer a wrong key with 400 (RGW: learned the first time another
key opened an object after a refusal).  A plain object thus costs one refused HEAD, not one
per key in the file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path

from s3ssefs.errors import FsError, MountError
from s3ssefs.keys import Key, KeyFile, KeyFileError
from s3ssefs.logsetup import register_secret
from s3ssefs.store import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

PLAIN = ""  # learned "key id" of an object stored without SSE-C


def load_keyfile(path: Path) -> KeyFile:
    """Load a key file for use (mount, rekey): one clear line if it is bad, and every key's
    printable forms registered so no log line can carry them."""
    try:
        kf = KeyFile.load(path)
    except KeyFileError as e:
        raise MountError(str(e)) from None
    for k in kf.keys.values():
        register_secret(k.raw)
    return kf


class KeyRing:
    def __init__(self, keyfile: KeyFile | None, store: ObjectStore,
                 state_dir: Path | None = None) -> None:
        self.keyfile = keyfile
        self.store = store
        self._path = state_dir / "learned.json" if state_dir else None
        self._learned: dict[str, tuple[str, str]] = {}  # s3 key → (key id, etag)
        # s3 key → the fingerprints tried on it, for objects no key opens (in memory only)
        self._refused: dict[str, str] = {}
        self._lock = threading.Lock()
        self._dirty = False
        if self._path and self._path.exists():
            try:
                raw = json.loads(self._path.read_text())
                self._learned = {k: (v[0], v[1]) for k, v in raw.items()}
            except (OSError, ValueError, TypeError, IndexError):
                log.info("ignoring unreadable %s", self._path)

    @property
    def current(self) -> Key | None:
        """The key every new write uses (``None`` for sse=s3/kms mounts)."""
        return self.keyfile.current_key if self.keyfile else None

    def by_id(self, key_id: str | None) -> Key | None:
        if not key_id or self.keyfile is None:
            return None
        return self.keyfile.by_id(key_id)

    def learned_id(self, s3key: str) -> str | None:
        with self._lock:
            v = self._learned.get(s3key)
        return v[0] if v else None

    def learn(self, s3key: str, key: Key | None, etag: str) -> None:
        kid = key.id if key else PLAIN
        with self._lock:
            self._refused.pop(s3key, None)
            if self._learned.get(s3key) != (kid, etag):
                self._learned[s3key] = (kid, etag)
                self._dirty = True

    def tried(self, s3key: str) -> str:
        """The fingerprints :meth:`head` last tried on ``s3key`` when none opened it."""
        with self._lock:
            return self._refused.get(s3key, "every key of the mount")

    def forget(self, s3key: str) -> None:
        with self._lock:
            self._refused.pop(s3key, None)
            if self._learned.pop(s3key, None) is not None:
                self._dirty = True

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            v = self._learned.pop(old, None)
            if v is not None:
                self._learned[new] = v
                self._dirty = True

    def save(self) -> None:
        """Persist learned ids (ids and ETags only: never a key)."""
        if not self._path:
            return
        with self._lock:
            if not self._dirty:
                return
            data = json.dumps(self._learned)
            self._dirty = False
        tmp = self._path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, self._path)
        except OSError as e:
            log.info("could not save learned keys: %s", e)

    def candidates(self, rel_path: str, s3key: str, version: str | None) -> list[Key | None]:
        learned = self.learned_id(s3key)
        keys: list[Key | None] = []
        if learned == PLAIN:
            keys.append(None)
        if self.keyfile is not None:
            keys += self.keyfile.candidates(rel_path, version, learned or None)
        if None not in keys:
            keys.append(None)
        return keys

    def _opened(self, s3key: str, key: Key | None, info: ObjectInfo, failed: int) -> Key | None:
        """The key that opens ``s3key``, now that a HEAD with ``key`` answered ``info`` after
        ``failed`` candidates did not; remembered for the object's next opening."""
        if key is not None and (info.sse_c_md5 is None or info.sse is not None):
            # a plain object answered a keyed HEAD: it needs no key.  RGW echoes no key MD5;
            # LocalStack echoes ours but also the SSE-S3 the object really has
            key = None
        elif key is None and info.sse_c_md5 is not None and self.keyfile:
            key = self.keyfile.by_fingerprint(info.sse_c_md5)
        self.learn(s3key, key, info.etag)
        if failed and key is not None:
            self.store.stats.add("key_trials", failed)
        return key

    def can_head_many(self) -> bool:
        return self.store.can_head_many()

    async def head_many(self, items: list[tuple[str, str]],
                        ) -> list[tuple[ObjectInfo, Key | None] | FsError]:
        """:meth:`head` of several objects (``(rel_path, s3key)`` each), for guesses (see
        :meth:`ObjectStore.head_many`): all at once with each one's first candidate key; the
        objects that key does not open then try the others, one by one.  Each gets what
        :meth:`head` would return, or the FsError it would raise."""
        firsts = [self.candidates(rel, s3key, None)[0] for rel, s3key in items]
        got = await self.store.head_many(
            [(s3key, k) for (_, s3key), k in zip(items, firsts, strict=True)])
        out: list[tuple[ObjectInfo, Key | None] | FsError] = []
        for (rel, s3key), key, res in zip(items, firsts, got, strict=True):
            if isinstance(res, ObjectInfo):
                out.append((res, self._opened(s3key, key, res, 0)))
            elif res.errno == errno.EACCES:
                try:
                    out.append(await self.head(rel, s3key, refused=(key,),
                                               refused_status=res.status))
                except FsError as e:
                    out.append(e)
            else:
                out.append(res)
        return out

    async def head(self, rel_path: str, s3key: str, version: str | None = None,
                   refused: tuple[Key | None, ...] = (), refused_status: int | None = None,
                   ) -> tuple[ObjectInfo, Key | None]:
        """HEAD the object with each candidate key until one opens it (but those it is known
        to have ``refused`` already, with ``refused_status``).

        Raises ENOENT when there is no such object, EACCES (with one log line naming the object
        and the fingerprints tried) when no key opens it.
        """
        tried = [k.fingerprint if k else "no key" for k in refused]
        todo = [k for k in self.candidates(rel_path, s3key, version) if k not in refused]
        caps = self.store.caps

        def refused_with(status: int | None) -> None:
            if status == 400 and caps.wrong_key_status != 400 and None in todo:
                todo.remove(None)  # AWS: "not applicable", a plain object
                todo.insert(0, None)

        # the status a keyed HEAD of this object was refused with
        refusal = refused_status if any(k is not None for k in refused) else None
        refused_with(refusal)
        while todo:
            key = todo.pop(0)
            try:
                info = await self.store.head(s3key, key, version)
            except FsError as e:
                if e.errno == errno.EACCES:
                    tried.append(key.fingerprint if key else "no key")
                    if key is not None:
                        refusal = e.status
                        refused_with(e.status)
                    continue
                raise
            if key is not None and refusal is not None:
                caps.wrong_key_status = refusal  # a wrong key is what got that answer
            return info, self._opened(s3key, key, info, len(tried))
        with self._lock:
            self._refused[s3key] = ", ".join(tried)
        log.warning("no key opens s3://%s/%s (tried %s) [EACCES]", self.store.bucket, s3key,
                    ", ".join(tried))
        raise FsError(errno.EACCES, f"no key opens s3://{self.store.bucket}/{s3key}")
