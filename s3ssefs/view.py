"""What the mount shows of the bucket: the objects as they are now, or as they were at a time.

:class:`LiveView` passes listings and HEADs straight to the store and the key ring.
:class:`AsOfView` (``as_of=TIMESTAMP``, read-only) answers the same questions from
ListObjectVersions: for each key the newest version whose LastModified is not after the
timestamp, hidden if that version is a delete marker.  Each version is then opened with its own
key (the key file's map by version, by path, then trial), so a bucket rotated through several
keys reads back whole at any point in its history.
"""

from __future__ import annotations

import datetime as _dt
import errno
from collections.abc import AsyncIterator

from s3ssefs.errors import FsError
from s3ssefs.keyring import KeyRing
from s3ssefs.keys import Key
from s3ssefs.store import ListPage, ObjectInfo, ObjectStore


class LiveView:
    """The bucket as it is now."""

    def __init__(self, store: ObjectStore, keyring: KeyRing) -> None:
        self.store = store
        self.keyring = keyring

    def list_pages(self, prefix: str, delimiter: str | None = "/", page_size: int = 1000,
                   start_after: str | None = None) -> AsyncIterator[ListPage]:
        return self.store.list_pages(prefix, delimiter=delimiter, page_size=page_size,
                                     start_after=start_after)

    async def head(self, rel_path: str, s3key: str) -> tuple[ObjectInfo, Key | None]:
        return await self.keyring.head(rel_path, s3key)

    def can_head_many(self) -> bool:
        return self.keyring.can_head_many()

    async def head_many(self, items: list[tuple[str, str]],
                        ) -> list[tuple[ObjectInfo, Key | None] | FsError]:
        """See :meth:`KeyRing.head_many`."""
        return await self.keyring.head_many(items)


class AsOfView(LiveView):
    """The bucket as it was at ``when`` (a versioned bucket; read-only)."""

    def __init__(self, store: ObjectStore, keyring: KeyRing, when: _dt.datetime) -> None:
        super().__init__(store, keyring)
        self.when = when.timestamp()
        self._chosen: dict[str, ObjectInfo] = {}  # s3 key → the version shown

    async def _versions(self, prefix: str, delimiter: str | None,
                        ) -> AsyncIterator[tuple[list[str], list[ObjectInfo]]]:
        """Per ListObjectVersions page: prefixes, and the version of each key shown at
        ``when``.  Versions of one key come newest first and may span pages."""
        current_key: str | None = None
        decided = False
        async for page in self.store.list_version_pages(prefix, delimiter=delimiter):
            shown: list[ObjectInfo] = []
            for v in sorted(page.objects, key=lambda o: (o.key, -o.mtime)):
                if v.key != current_key:
                    current_key, decided = v.key, False
                if decided or v.mtime > self.when:
                    continue
                decided = True
                if not v.delete_marker:
                    self._chosen[v.key] = v
                    shown.append(v)
            yield page.prefixes, shown

    async def list_pages(self, prefix: str, delimiter: str | None = "/",  # type: ignore[override]
                         page_size: int = 1000, start_after: str | None = None,
                         ) -> AsyncIterator[ListPage]:
        async for prefixes, shown in self._versions(prefix, delimiter):
            if start_after:
                prefixes = [p for p in prefixes if p > start_after]
                shown = [o for o in shown if o.key > start_after]
            yield ListPage(prefixes=prefixes, objects=shown)

    def can_head_many(self) -> bool:
        return False  # each HEAD names the version shown

    async def head(self, rel_path: str, s3key: str) -> tuple[ObjectInfo, Key | None]:
        v = self._chosen.get(s3key)
        if v is None:
            async for _, shown in self._versions(s3key, None):
                for o in shown:
                    if o.key == s3key:
                        v = o
        if v is None:
            raise FsError(errno.ENOENT, f"{rel_path} did not exist at that time")
        info, key = await self.keyring.head(rel_path, s3key, v.version_id)
        info.version_id = v.version_id
        return info, key
