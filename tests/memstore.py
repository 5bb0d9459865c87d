"""An in-memory object store with the interface of :class:`s3ssefs.store.ObjectStore`, for
fast tests of the file logic (``files``, ``blocks``, ``inodes``, ``fs``) without a server.

It answers as :class:`ObjectStore` does once its retries are done: results as
:class:`ObjectInfo`/:class:`ListPage`, failures as :class:`FsError` with the errno the real
store maps them to.  It is never a stand-in for a server in anything about keys: it remembers
which key fingerprint an object was written with and refuses a read with another (EACCES, as
RGW's 400 becomes), so the file layer's key lookups have something to find, but whether keys
really protect data is tested against RGW only (test_t2_store, test_t4_*).

Hooks, for the cases a real server cannot be made to show on demand:

- :meth:`MemStore.fail`: the next calls of an operation (on a key) fail with an errno;
- :meth:`MemStore.gate`: calls of an operation (on a key; the next few, or all) wait until
  the test lets them go, so a test can hold an upload in flight, or an answer on its way, and
  look at what the file layer does meanwhile (an event, not a sleep).  A HEAD's or a LIST's
  answer is what the bucket held when it was asked, as a server's is: held at a gate, it
  arrives older than what happened meanwhile;
- :attr:`MemStore.delay`: seconds each call of an operation takes (trio time; with
  pytest-trio's ``autojump_clock`` no real time), and :attr:`MemStore.peak_in_flight`, the
  most calls of it under way at once;
- :class:`Server`: where servers answer differently (RGW 16, AWS): whether UploadPartCopy
  may change the key, whether CopyObject takes an SSE-C source, a key sent for a plain
  object, the smallest part but the last;
- :attr:`MemStore.calls`: every call in order, ``(operation, key, detail)``.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio

from s3ssefs.config import MountConfig
from s3ssefs.errors import FsError
from s3ssefs.http1 import Body
from s3ssefs.keys import Key
from s3ssefs.stats import Stats
from s3ssefs.store import Capabilities, ListPage, ObjectInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Server:
    """How the server answers where servers differ."""

    name: str = "rgw"
    part_copy_between_keys: bool = False  # RGW 16 refuses UploadPartCopy across SSE-C keys
    copy_object_sse_c: bool = False  # RGW 16 answers 501 to CopyObject with an SSE-C source
    key_for_plain_object: str = "ignore"  # RGW ignores it; AWS refuses it ("refuse")
    min_part: int = 0  # S3 wants 5 MiB for every part but the last; 0: no minimum


RGW16 = Server()
AWS = Server(name="aws", part_copy_between_keys=True, copy_object_sse_c=True,
             key_for_plain_object="refuse", min_part=5 << 20)


@dataclass
class Obj:
    data: bytes
    etag: str
    mtime: float
    metadata: dict[str, str]
    sse_c_md5: str | None


@dataclass
class _Gate:
    op: str
    key: str | None
    count: int | None  # calls still to hold (None: every call)
    event: trio.Event


@dataclass
class _Upload:
    key: str
    sse_c_md5: str | None
    metadata: dict[str, str]
    parts: dict[int, tuple[str, bytes]] = field(default_factory=dict)


def _fp(key: Key | None) -> str | None:
    return key.fingerprint if key is not None else None


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class MemStore:
    """A bucket in memory behind the ObjectStore interface (see the module docstring)."""

    def __init__(self, bucket: str = "mem", server: Server = RGW16,
                 stats: Stats | None = None) -> None:
        self.bucket = bucket
        self.server = server
        self.stats = stats or Stats()
        self.caps = Capabilities()
        self.cfg: MountConfig | None = None  # the mount's, set by whoever mounts it
        self.objects: dict[str, Obj] = {}
        self.uploads: dict[str, _Upload] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.delay: dict[str, float] = {}
        self.peak_in_flight: dict[str, int] = {}  # most calls of an op under way at once
        self._in_flight: dict[str, int] = {}
        self._faults: list[list[Any]] = []  # [op, key or None, errno, count]
        self._gates: list[_Gate] = []
        self._waiting: dict[str, int] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ hooks
    def fail(self, op: str, err: int = errno.EIO, count: int = 1, key: str | None = None,
             ) -> None:
        """The next ``count`` calls of ``op`` (on ``key``, or any) fail with ``err``."""
        self._faults.append([op, key, err, count])

    def gate(self, op: str, key: str | None = None, count: int | None = None) -> None:
        """Calls of ``op`` (on ``key``, or any; the next ``count``, or all) wait from now on
        until :meth:`release` (see :meth:`waiting`)."""
        self._gates.append(_Gate(op, key, count, trio.Event()))

    def release(self, op: str) -> None:
        for g in [g for g in self._gates if g.op == op]:
            self._gates.remove(g)
            g.event.set()

    def waiting(self, op: str) -> int:
        """How many calls of ``op`` wait at its gate now."""
        return self._waiting.get(op, 0)

    def count(self, op: str) -> int:
        return sum(1 for c in self.calls if c[0] == op)

    async def _enter(self, op: str, key: str, detail: Any = None) -> None:
        self.calls.append((op, key, detail))
        ev = None
        for g in self._gates:
            if g.op == op and (g.key is None or g.key == key) and g.count != 0:
                if g.count is not None:
                    g.count -= 1
                ev = g.event
                break
        if ev is not None:
            self._waiting[op] = self._waiting.get(op, 0) + 1
            try:
                await ev.wait()
            finally:
                self._waiting[op] -= 1
        if self.delay.get(op):
            self._in_flight[op] = self._in_flight.get(op, 0) + 1
            self.peak_in_flight[op] = max(self.peak_in_flight.get(op, 0), self._in_flight[op])
            try:
                await trio.sleep(self.delay[op])
            finally:
                self._in_flight[op] -= 1
        else:
            await trio.lowlevel.checkpoint()  # a request always lets other tasks run
        for f in self._faults:
            if f[0] == op and f[3] > 0 and (f[1] is None or f[1] == key):
                f[3] -= 1
                self.stats.error(op)
                raise FsError(f[2], f"{op} s3://{self.bucket}/{key}: injected failure")
        self.stats.request(op)

    def _readable(self, key: str, sse_key: Key | None) -> Obj:
        obj = self.objects.get(key)
        if obj is None:
            raise FsError(errno.ENOENT, f"s3://{self.bucket}/{key}: 404 NoSuchKey")
        if obj.sse_c_md5 is None:
            if sse_key is not None and self.server.key_for_plain_object == "refuse":
                raise FsError(errno.EACCES, f"s3://{self.bucket}/{key}: 400 (plain object)")
        elif obj.sse_c_md5 != _fp(sse_key):
            raise FsError(errno.EACCES, f"s3://{self.bucket}/{key}: 400 (wrong or no key)")
        return obj

    def _info(self, key: str, obj: Obj) -> ObjectInfo:
        return ObjectInfo(key=key, size=len(obj.data), etag=obj.etag, mtime=obj.mtime,
                          metadata=dict(obj.metadata), sse_c_md5=obj.sse_c_md5)

    def _store(self, key: str, data: bytes, sse_key: Key | None, metadata: dict[str, str] | None,
               etag: str | None = None) -> ObjectInfo:
        obj = Obj(data=bytes(data), etag=etag or _md5(data), mtime=time.time(),
                  metadata=dict(metadata or {}), sse_c_md5=_fp(sse_key))
        self.objects[key] = obj
        return self._info(key, obj)

    # ------------------------------------------------------------------ reads
    def fastest_answer(self) -> float | None:
        return None

    async def head(self, key: str, sse_key: Key | None, version_id: str | None = None,
                   ) -> ObjectInfo:
        try:  # the answer is what the bucket holds when the HEAD is asked
            answer: ObjectInfo | FsError = self._info(key, self._readable(key, sse_key))
        except FsError as e:
            answer = e
        await self._enter("head", key)
        if isinstance(answer, FsError):
            raise answer
        return answer

    def can_head_many(self) -> bool:
        return True

    async def head_many(self, items: list[tuple[str, Key | None]],
                        ) -> list[ObjectInfo | FsError]:
        out: list[ObjectInfo | FsError] = []
        for key, sse_key in items:
            try:
                out.append(await self.head(key, sse_key))
            except FsError as e:
                out.append(e)
        return out

    async def get_range(self, key: str, start: int, end: int, sse_key: Key | None,
                        version_id: str | None = None, if_match: str | None = None,
                        cached: bool = True) -> bytes:
        if end <= start:
            return b""
        await self._enter("get", key, (start, end))
        obj = self._readable(key, sse_key)
        if if_match is not None and if_match != obj.etag:
            raise FsError(errno.ESTALE, f"s3://{self.bucket}/{key}: 412 PreconditionFailed")
        data = obj.data[start:end]
        self.stats.request("get_bytes", down=len(data))
        return data

    async def list_pages(self, prefix: str, delimiter: str | None = "/",
                         start_after: str | None = None, page_size: int = 1000,
                         ) -> AsyncIterator[ListPage]:
        """ListObjectsV2: keys in order, common prefixes folded, ``page_size`` entries (of
        both kinds) a page, as S3 counts MaxKeys."""
        entries: list[tuple[str, ObjectInfo | None]] = []  # as the bucket is when asked
        seen_prefixes: set[str] = set()
        for key in sorted(self.objects):
            if not key.startswith(prefix) or (start_after and key <= start_after):
                continue
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                p = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                if p not in seen_prefixes:
                    seen_prefixes.add(p)
                    entries.append((p, None))
                continue
            entries.append((key, self._info(key, self.objects[key])))
        for i in range(0, max(len(entries), 1), page_size):
            await self._enter("list", prefix)
            chunk = entries[i:i + page_size]
            yield ListPage(prefixes=[k for k, o in chunk if o is None],
                           objects=[ObjectInfo(key=o.key, size=o.size, etag=o.etag,
                                               mtime=o.mtime)
                                    for _, o in chunk if o is not None])

    async def list_version_pages(self, prefix: str, delimiter: str | None = "/",
                                 ) -> AsyncIterator[ListPage]:
        raise FsError(errno.ENOTSUP, "the memory store keeps no versions")
        yield  # an async generator, as the real one

    # ------------------------------------------------------------------ writes
    async def put(self, key: str, body: Body, sse_key: Key | None,
                  metadata: dict[str, str] | None = None,
                  content_type: str | None = None) -> ObjectInfo:
        data = bytes(body)
        await self._enter("put", key, len(data))
        self.stats.request("put_bytes", up=len(data))
        return self._store(key, data, sse_key, metadata)

    async def create_multipart(self, key: str, sse_key: Key | None,
                               metadata: dict[str, str] | None = None) -> str:
        await self._enter("create_multipart", key)
        uid = f"upload-{next(self._ids)}"
        self.uploads[uid] = _Upload(key, _fp(sse_key), dict(metadata or {}))
        return uid

    def _upload(self, key: str, upload_id: str) -> _Upload:
        up = self.uploads.get(upload_id)
        if up is None or up.key != key:
            raise FsError(errno.ENOENT, f"s3://{self.bucket}/{key}: 404 NoSuchUpload")
        return up

    async def upload_part(self, key: str, upload_id: str, part_no: int, body: Body,
                          sse_key: Key | None) -> str:
        data = bytes(body)
        await self._enter("upload_part", key, (part_no, len(data)))
        up = self._upload(key, upload_id)
        if up.sse_c_md5 != _fp(sse_key):
            raise FsError(errno.EACCES, f"s3://{self.bucket}/{key}: 400 part under another key")
        etag = f'"{_md5(data)}"'
        up.parts[part_no] = (etag, data)
        self.stats.request("part_bytes", up=len(data))
        return etag

    async def upload_part_copy(self, key: str, upload_id: str, part_no: int, src_key: str,
                               start: int, end: int, src_sse: Key | None, dst_sse: Key | None,
                               src_version: str | None = None) -> str:
        await self._enter("upload_part_copy", key, (part_no, src_key, start, end))
        up = self._upload(key, upload_id)
        src = self._readable(src_key, src_sse)
        if _fp(src_sse) != _fp(dst_sse) and not self.server.part_copy_between_keys:
            raise FsError(errno.EACCES, f"s3://{self.bucket}/{key}: 400 part copy between keys")
        if end > len(src.data):
            raise FsError(errno.EINVAL, f"s3://{self.bucket}/{key}: 416 InvalidRange")
        data = src.data[start:end]
        etag = f'"{_md5(data)}"'
        up.parts[part_no] = (etag, data)
        return etag

    async def complete_multipart(self, key: str, upload_id: str,
                                 parts: list[tuple[int, str]], sse_key: Key | None,
                                 ) -> ObjectInfo:
        await self._enter("complete_multipart", key, [n for n, _ in parts])
        up = self._upload(key, upload_id)
        if [n for n, _ in parts] != sorted({n for n, _ in parts}) or not parts:
            raise FsError(errno.EINVAL, f"s3://{self.bucket}/{key}: 400 InvalidPartOrder")
        body = []
        for i, (n, etag) in enumerate(parts):
            have = up.parts.get(n)
            if have is None or have[0].strip('"') != etag.strip('"'):
                raise FsError(errno.EINVAL, f"s3://{self.bucket}/{key}: 400 InvalidPart {n}")
            if i < len(parts) - 1 and len(have[1]) < self.server.min_part:
                raise FsError(errno.EINVAL, f"s3://{self.bucket}/{key}: 400 EntityTooSmall")
            body.append(have[1])
        del self.uploads[upload_id]
        data = b"".join(body)
        digests = b"".join(bytes.fromhex(e.strip('"')) for _, e in parts)
        info = self._store(key, data, sse_key, up.metadata,
                           etag=f"{_md5(digests)}-{len(parts)}")
        return ObjectInfo(key=key, size=-1, etag=info.etag, mtime=0.0, sse_c_md5=_fp(sse_key))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._enter("abort_multipart", key)
        self.uploads.pop(upload_id, None)

    async def list_multipart_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        await self._enter("list_uploads", prefix)
        return [(u.key, uid, 0.0) for uid, u in self.uploads.items() if u.key.startswith(prefix)]

    async def delete(self, key: str, version_id: str | None = None) -> None:
        await self._enter("delete", key)
        self.objects.pop(key, None)  # S3 answers 204 for a key that is not there, too

    async def copy(self, src: str, dst: str, src_sse: Key | None, dst_sse: Key | None,
                   metadata: dict[str, str] | None, size: int,
                   src_version: str | None = None) -> ObjectInfo:
        """CopyObject where the server takes it, else as the real store falls back (the
        bytes are the same either way; :attr:`calls` shows which path was taken)."""
        await self._enter("copy", dst, src)
        obj = self._readable(src, src_sse)
        if src_sse is not None and not self.server.copy_object_sse_c and \
                (_fp(src_sse) != _fp(dst_sse) and not self.server.part_copy_between_keys):
            self.calls.append(("stream_copy", dst, src))  # RGW: through the client
        meta = dict(obj.metadata) if metadata is None else dict(metadata)
        info = self._store(dst, obj.data, dst_sse, meta)
        return info
