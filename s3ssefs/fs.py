"""The FUSE operations: a thin mapping of kernel requests onto the inode table
(:mod:`s3ssefs.inodes`), open files (:mod:`s3ssefs.files`), keys (:mod:`s3ssefs.keyring`) and
the object store (:mod:`s3ssefs.store`).

Every handler runs on the one trio thread; anything that blocks goes through the store's
worker threads.  Every failure is an :class:`~s3ssefs.errors.FsError` carrying its errno,
turned into ``FUSEError`` in one place (:func:`_fuse_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from s3ssefs.aio import gather
from s3ssefs.blocks import Buf, ObjectRef
from s3ssefs.config import MountConfig
from s3ssefs.errors import FsError
from s3ssefs.files import Ctx, FileData, WriteFailed
from s3ssefs.inodes import (
    MAX_CACHED_ENTRIES,
    ROOT,
    InodeTable,
    Listing,
    Node,
    check_name,
    join,
    stamp,
)
from s3ssefs.keyring import PLAIN, KeyRing
from s3ssefs.keys import Key
from s3ssefs.meta import (
    XATTR,
    Attrs,
    attrs_from_object,
    format_xattrs,
    merge_foreign,
    metadata_for,
    parse_xattrs,
    storable_xattr_name,
    xattr_room,
)
from s3ssefs.metaindex import Entry, MetaIndex, settled
from s3ssefs.store import ListPage, ObjectInfo, ObjectStore
from s3ssefs.view import LiveView

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

XATTRS = (b"user.s3ssefs.key", b"user.s3ssefs.version", b"user.s3ssefs.etag")
S3_KEY_MAX = 1024
SMALL_REWRITE = 1 << 20  # metadata changes of files up to this size re-PUT the bytes


def _fuse_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """The one place an FsError becomes the errno the kernel sees."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("internal error in %s [EIO]", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _now_ns() -> int:
    return time.time_ns()


# ``ls -l`` stats entries in the order readdir gave them: each lookup of a listed file whose
# attributes are not known yet starts HEADs for the next entries, a window that doubles while
# the lookups follow the listing (as readahead does for reads).  A plain ``ls`` sends none.
PREFETCH_START = 8
PREFETCH_MAX = 256
# the files' HEADs of a window go to worker threads in batches, each one after another in one
# job (ObjectStore.head_many): at least PREFETCH_JOBS batches while the window is small (so
# the next lookups wait for a few HEADs, not a window's), of at most PREFETCH_BATCH HEADs
PREFETCH_JOBS = 4
PREFETCH_BATCH = 8
LISTED_DIRS = 8  # directories whose listing order is kept for this
# a directory in which this many lookups found nothing (per 1,000 entries it held, a LIST
# page) is listed again for the next lookup once its listing has expired (Filesystem._listing)
RELIST_LOOKUPS = 16
RELIST_PAGE = 1000


@dataclass
class ListedOrder:
    """The files one readdir showed before their HEAD, in order, with their listing hints."""

    names: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    hints: dict[str, tuple[bool, int, str, float]] = field(default_factory=dict)
    next_expected: int = -1
    window: int = 0
    ahead_to: int = -1

    def add(self, name: str, hint: tuple[bool, int, str, float]) -> None:
        if name not in self.index:
            self.index[name] = len(self.names)
            self.names.append(name)
        self.hints[name] = hint

    def ahead(self, name: str) -> list[str]:
        """The names to prefetch now that ``name`` was looked up."""
        i = self.index.get(name)
        if i is None:
            return []
        if i == self.next_expected:
            self.window = min(max(self.window * 2, PREFETCH_START), PREFETCH_MAX)
        else:
            self.window = PREFETCH_START
            self.ahead_to = i
        self.next_expected = i + 1
        if self.ahead_to - i > self.window // 2:
            return []
        start, end = max(i + 1, self.ahead_to + 1), min(len(self.names), i + 1 + self.window)
        self.ahead_to = max(self.ahead_to, end - 1)
        return self.names[start:end]


@dataclass
class DirHandle:
    node: Node
    pos: int = 0  # index of the next entry the stream yields
    stream: AsyncIterator[tuple[str, Node]] | None = None
    pending: list[tuple[int, str, Node]] = field(default_factory=list)


def _renewable(node: Node) -> bool:
    """A file whose attributes a listing may renew (:meth:`Filesystem._renew`): confirmed
    against a listing before (``indexed``), in S3, not open here, opened by a key."""
    return (node.indexed is not None and not node.is_dir and node.data is None
            and node.remote and not node.locked)


class Filesystem(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, cfg: MountConfig, store: ObjectStore, keyring: KeyRing, ctx: Ctx,
                 view: LiveView | None = None, index: MetaIndex | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.store = store
        self.keyring = keyring
        # what the bucket shows: live, or as it was at cfg.as_of (reads go through the view)
        self.view = view or LiveView(store, keyring)
        self.ctx = ctx
        self.index = index  # what HEADs said in earlier mounts (s3ssefs.metaindex)
        self.ttl = cfg.attr_ttl
        now = _now_ns()
        root = Attrs(mode=stat.S_IFDIR | (0o777 & ~cfg.umask), uid=cfg.uid, gid=cfg.gid,
                     size=0, mtime_ns=now, ctime_ns=now)
        self.inodes = InodeTable(root)
        self.handles: dict[int, Node] = {}
        self.dirs: dict[int, DirHandle] = {}
        self.writers: set[int] = set()  # handles opened for writing
        # handles that keep fetched data out of the kernel's page cache: writers, O_DIRECT
        self.page_blockers: set[int] = set()
        self._next_fh = 1
        self._listed: OrderedDict[str, ListedOrder] = OrderedDict()  # by directory path
        self._heads: dict[str, trio.Event] = {}  # prefetch HEADs in flight, by path
        self._relisting: dict[str, trio.Event] = {}  # directories being listed again
        self._renewing: dict[str, trio.Event] = {}  # directories whose nodes a LIST renews
        self._removing: dict[int, trio.Event] = {}  # files being unlinked, by inode
        self._too_big: set[str] = set()  # directories found too large to list for lookups
        # when this mount last created, removed or renamed an entry in a directory (by
        # path): its mtime and ctime, kept in memory over what S3 says (_probe_dir)
        self._dir_changed: dict[str, int] = {}
        ctx.s3key = self.s3key
        ctx.write_key = lambda: keyring.current
        ctx.metadata = self.metadata

    # ------------------------------------------------------------------ names
    def s3key(self, path: str) -> str:
        return self.cfg.prefix + path

    def dirkey(self, path: str) -> str:
        return self.cfg.prefix + path + "/" if path else self.cfg.prefix

    def _child(self, parent: Node, name: bytes) -> str:
        """The path of ``name`` in ``parent``; ENAMETOOLONG past S3's 1024-byte key limit
        (with room for a directory marker's slash)."""
        path = join(parent.path, check_name(name))
        if len(self.s3key(path).encode()) > S3_KEY_MAX - 1:
            raise FsError(errno.ENAMETOOLONG, f"S3 key for {path!r} too long")
        return path

    def metadata(self, node: Node) -> dict[str, str]:
        return merge_foreign(node.metadata, metadata_for(node.attrs))

    def _attrs(self, info: ObjectInfo, is_dir: bool) -> Attrs:
        return attrs_from_object(info.metadata, 0 if is_dir else info.size, info.mtime,
                                 is_dir=is_dir, default_uid=self.cfg.uid,
                                 default_gid=self.cfg.gid, umask=self.cfg.umask)

    def _check_writable(self) -> None:
        if self.cfg.read_only:
            raise FsError(errno.EROFS, "read-only mount")

    def _fh(self, node: Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = node
        return fh

    # ------------------------------------------------------------------ probing S3
    async def _probe(self, path: str, hint: tuple[bool, int, str, float] | None = None,
                     listed: tuple[bool, int, str, float] | None = None) -> Node:
        """Find what ``path`` is in S3 (file, symlink, directory) and make/refresh its node.
        What a HEAD says of a file goes to the metadata index with the listing that showed
        it: ``hint``, else ``listed`` (a listing older than ``dir_ttl``, which only this may
        use: an entry is kept only if the HEAD finds the object the listing showed)."""
        if hint is None or not hint[0]:
            asked = stamp()
            try:
                info, key = await self.view.head(path, self.s3key(path))
            except FsError as e:
                if e.errno == errno.EACCES and hint is not None:
                    return self._locked_node(path, hint, asked)
                if e.errno == errno.EACCES:
                    return self._locked_node(path, await self._list_hint(path), asked)
                if e.errno != errno.ENOENT:
                    raise
            else:
                if hint is None or not hint[0]:
                    node = self._changed_since(path, asked)
                    if node is not None:
                        return node
                    node = self._file_node(path, info, key)
                    seen = hint if hint is not None else listed
                    if seen is not None:
                        self._index_note(node, seen, info, key)
                    return node
        return await self._probe_dir(path)

    async def _list_hint(self, path: str) -> tuple[bool, int, str, float]:
        async for page in self.view.list_pages(self.s3key(path), delimiter="/", page_size=2):
            for o in page.objects:
                if o.key == self.s3key(path):
                    return (False, o.size, o.etag, o.mtime)
        return (False, 0, "", 0.0)

    async def _probe_dir(self, path: str) -> Node:
        prefix = self.dirkey(path)
        marker: ObjectInfo | None = None
        exists = False
        async for page in self.view.list_pages(prefix, delimiter=None, page_size=2):
            exists = bool(page.objects)
            marker = next((o for o in page.objects if o.key == prefix), None)
            break
        if not exists:
            raise FsError(errno.ENOENT, f"no such file: {path}")
        has_marker = marker is not None
        info = ObjectInfo(key=prefix, size=0, etag="", mtime=time.time())
        key = None
        locked = False  # a marker no key opens: the directory stays usable, its marker stays
        known = await self._indexed_marker(marker) if marker is not None else None
        if known is not None:  # the marker as the index keeps it: no HEAD
            info, key = known
        elif marker is not None:
            try:
                info, key = await self.view.head(path + "/", prefix)
            except FsError as e:
                if e.errno not in (errno.EACCES, errno.ENOENT):
                    raise
                locked = e.errno == errno.EACCES
            else:
                self._index_marker(marker, info, key)
        node = self.inodes.find(path)
        attrs = self._attrs(info, is_dir=True)
        changed = self._dir_changed.get(path)
        if changed is not None:
            attrs.mtime_ns = max(attrs.mtime_ns, changed)
            attrs.ctime_ns = max(attrs.ctime_ns, changed)
        if node is None or not node.is_dir:
            node = self.inodes.create(path, attrs)
        else:
            node.attrs = attrs
        node.has_marker = has_marker
        node.locked = locked
        node.sse_key = key
        node.metadata = info.metadata
        node.fetched = time.monotonic()
        return node

    def _changed_since(self, path: str, asked: int) -> Node | None:
        """The node of ``path`` if this mount changed its object after ``asked``: what a HEAD
        or LIST asked then says of it is older than what the mount knows, and is not taken."""
        node = self.inodes.find(path)
        return node if node is not None and node.changed > asked else None

    def _file_node(self, path: str, info: ObjectInfo, key: Any) -> Node:
        """The node of a file as a HEAD (or the metadata index) says it is now."""
        attrs = self._attrs(info, is_dir=False)
        node = self.inodes.find(path)
        if node is None or stat.S_IFMT(node.attrs.mode) != stat.S_IFMT(attrs.mode):
            # a new inode when the type changes (a listed entry turns out to be a symlink):
            # the kernel refuses an inode whose type changes under it
            node = self.inodes.create(path, attrs)
        elif node.data is None or not node.data.dirty:
            if node.etag != info.etag:
                node.link_target = None
            if (node.etag, node.attrs.size) != (info.etag, attrs.size):
                self._forget_kernel_attrs(node)
            node.attrs = attrs
        node.etag = info.etag
        node.version_id = info.version_id
        node.server_mtime = info.mtime
        node.sse_key = key
        node.metadata = info.metadata
        node.locked = False
        node.remote = True
        node.fetched = time.monotonic()
        return node

    def _listed_node(self, path: str, hint: tuple[bool, int, str, float], asked: int,
                     ) -> Node:
        """A node for a listed object not HEADed yet: size and time from the listing, mode and
        owner from what we knew or the mount's defaults; not fresh, so a lookup HEADs it."""
        node = self.inodes.find(path)
        if node is not None and node.changed > asked:
            return node
        if node is None or node.is_dir:
            node = self.inodes.create(path, attrs_from_object(
                {}, hint[1], hint[3], is_dir=False, default_uid=self.cfg.uid,
                default_gid=self.cfg.gid, umask=self.cfg.umask))
            node.remote = True
            node.fetched = -math.inf
        elif node.etag != hint[2] and (node.data is None or not node.data.dirty):
            node.attrs.size = hint[1]
            node.attrs.mtime_ns = node.attrs.ctime_ns = int(hint[3] * 1e9)
            node.fetched = -math.inf
        return node

    def _locked_node(self, path: str, hint: tuple[bool, int, str, float], asked: int,
                     ) -> Node:
        """A node for an object no key of the mount opens: size and time from the listing,
        owner from the mount's defaults, and no permission bits at all (mode 0000), since
        its real mode is in metadata only its key reveals; a regular file, unless it was
        known as something else (a symlink) before."""
        node = self.inodes.find(path)
        if node is not None and node.changed > asked:
            return node
        known = node is not None and not node.is_dir
        kind = stat.S_IFMT(node.attrs.mode) if node is not None and known else stat.S_IFREG
        mtime = int(hint[3] * 1e9)
        attrs = Attrs(mode=kind, uid=self.cfg.uid, gid=self.cfg.gid, size=hint[1],
                      mtime_ns=mtime, ctime_ns=mtime)
        if node is None or not known:
            node = self.inodes.create(path, attrs)
        node.attrs = attrs
        node.sse_key = None
        node.etag = hint[2]
        node.locked = True
        node.fetched = time.monotonic()
        return node

    def _fresh(self, node: Node) -> bool:
        if node.ino == ROOT or node.data is not None or not node.remote:
            return True
        return time.monotonic() - node.fetched < self.ttl

    async def _lookup(self, parent: Node, name: str) -> Node:
        if name == ".":
            return parent
        if name == "..":
            return self.inodes.find(parent.path.rpartition("/")[0]) or self.inodes.get(ROOT)
        path = self._child(parent, name.encode())
        node = self.inodes.find(path)
        if node is not None and (self._fresh(node) or await self._renew(node)):
            return node
        self._prefetch_after(parent.path, name)
        pending = self._heads.get(path)
        if pending is not None:
            await pending.wait()
            node = self.inodes.find(path)
            if node is not None and self._fresh(node):
                node.just_probed = True
                return node
        lst = await self._listing(parent.path)
        hint = None
        if lst is not None:
            hint = lst.entries.get(name)
            if hint is None:
                self.inodes.missed(parent.path)
                raise FsError(errno.ENOENT, f"no such file: {path}")
        if lst is not None and hint is not None and not hint[0] and hint[2]:  # as S3 listed it
            indexed = await self._indexed(parent.path, {name: hint}, lst.asked)
            if name in indexed:
                return indexed[name]
        order = self._listed.get(parent.path) if hint is None else None
        try:
            node = await self._probe(path, hint, order.hints.get(name) if order else None)
        except FsError as e:
            if e.errno == errno.ENOENT:
                self.inodes.missed(parent.path)
            raise
        node.just_probed = True
        return node

    async def _listing(self, dpath: str) -> Listing | None:
        """The listing of ``dpath`` remembered within ``dir_ttl``, for a lookup.  Without
        one, the directory is listed (again) first when enough lookups in it found nothing
        to pay for that (:data:`RELIST_LOOKUPS` per page of what it last held): a program
        creating files one after another in a directory for longer than ``dir_ttl`` then
        costs one LIST page per ``dir_ttl`` instead of a HEAD and a LIST for every name it
        creates."""
        lst = self.inodes.listing(dpath, self.cfg.dir_ttl)
        if lst is not None:
            return lst
        old = self.inodes.listings.get(dpath)
        if old is None or dpath in self._too_big or \
                old.misses < RELIST_LOOKUPS * (len(old.entries) // RELIST_PAGE + 1):
            return None
        running = self._relisting.get(dpath)
        if running is not None:  # another lookup is listing it: wait for that one
            await running.wait()
            return self.inodes.listing(dpath, self.cfg.dir_ttl)
        self._relisting[dpath] = done = trio.Event()
        try:
            await self._relist(dpath, old)
        finally:
            del self._relisting[dpath]
            done.set()
        return self.inodes.listing(dpath, self.cfg.dir_ttl)

    async def _relist(self, dpath: str, old: Listing) -> None:
        """List ``dpath`` again in place of its expired listing ``old``.  What this mount
        changed in the directory while the LIST ran (a file created, one removed) wins over
        the LIST's answer, which may be from before it; a listing invalidated meanwhile (a
        rename) is not replaced.  A directory too large to remember is not listed again;
        after a failure, only once as many lookups have found nothing again."""
        before = dict(old.entries)
        prefix = self.dirkey(dpath)
        entries: dict[str, tuple[bool, int, str, float]] = {}
        asked = stamp()
        try:
            async for page in self.view.list_pages(prefix, delimiter="/"):
                dirs, files = self._page_names(dpath, prefix, page)
                entries.update((name, (True, 0, "", 0.0)) for name in dirs)
                entries.update((name, (False, o.size, o.etag, o.mtime))
                               for name, o in files.items())
                if len(entries) > MAX_CACHED_ENTRIES:
                    self._too_big.add(dpath)
                    return
        except FsError as e:  # the lookup goes on without it, as if there were none
            log.debug("listing %s again failed: %s", dpath or "/", e)
            old.misses = 0
            return
        if self.inodes.listings.get(dpath) is not old:
            return
        for name in before.keys() | old.entries.keys():
            if before.get(name) != old.entries.get(name):
                if name in old.entries:
                    entries[name] = old.entries[name]
                else:
                    entries.pop(name, None)
        for name, entry in old.entries.items():  # being written, not in S3 yet
            node = self.inodes.find(join(dpath, name))
            if name not in entries and node is not None and not node.remote:
                entries[name] = entry
        self.inodes.remember_listing(dpath, entries, asked)

    def _prefetch_after(self, dpath: str, name: str) -> None:
        """Start HEADs for the listed entries after ``name`` (see :class:`ListedOrder`)."""
        order = self._listed.get(dpath)
        nursery = self.ctx.nursery
        if order is None or nursery is None:
            return
        files: list[tuple[str, tuple[bool, int, str, float]]] = []
        for nxt in order.ahead(name):
            path = join(dpath, nxt)
            node = self.inodes.find(path)
            if path in self._heads or (node is not None and self._fresh(node)):
                continue
            self._heads[path] = trio.Event()
            hint = order.hints[nxt]
            if hint[0] or not self.view.can_head_many():
                nursery.start_soon(self._prefetch_head, path, hint)
            else:
                files.append((path, hint))
        size = max(1, min(PREFETCH_BATCH, -(-len(files) // PREFETCH_JOBS)))
        for i in range(0, len(files), size):
            nursery.start_soon(self._prefetch_heads, files[i:i + size])

    async def _prefetch_head(self, path: str, hint: tuple[bool, int, str, float]) -> None:
        try:
            await self._probe(path, hint)
        except Exception as e:  # the lookup that wants it will try again and report
            log.debug("prefetch HEAD of %s failed: %s", path, e)
        finally:
            self._heads.pop(path).set()

    async def _prefetch_heads(self, files: list[tuple[str, tuple[bool, int, str, float]]],
                              ) -> None:
        """:meth:`_prefetch_head` of several listed files in one batch (as :meth:`_probe`
        would: a node, or a locked node for a file no key opens); a file gone since the
        listing, or whose HEAD failed, is left to its lookup."""
        try:
            asked = stamp()
            got = await self.view.head_many([(p, self.s3key(p)) for p, _ in files])
            for (path, hint), res in zip(files, got, strict=True):
                if self._changed_since(path, asked) is not None:
                    continue
                if not isinstance(res, FsError):
                    self._index_note(self._file_node(path, *res), hint, *res)
                elif res.errno == errno.EACCES:
                    self._locked_node(path, hint, asked)
        except Exception as e:
            log.debug("prefetch HEADs from %s on failed: %s", files[0][0], e)
        finally:
            for path, _ in files:
                self._heads.pop(path).set()

    # ------------------------------------------------------------------ metadata index
    async def _indexed(self, dpath: str, hints: dict[str, tuple[bool, int, str, float]],
                       asked: int) -> dict[str, Node]:
        """Nodes for the listed files of ``dpath`` (name → listing hint, from a LIST asked at
        ``asked``) that the metadata index knows as the listing shows them: what their HEAD
        would say, without one."""
        if self.index is None or not hints:
            return {}
        got = await self.index.lookup([(self.s3key(join(dpath, name)), h[2], h[1], h[3])
                                       for name, h in hints.items() if not h[0]])
        self._index_flush(self.index.due())  # entries read are marked as used
        out: dict[str, Node] = {}
        for name, hint in hints.items():
            path = join(dpath, name)
            s3key = self.s3key(path)
            e = got.get(s3key)
            if e is None:
                continue
            known, key = self._entry_key(e)
            if not known:
                continue
            node = self.inodes.find(path)
            if node is not None and (node.data is not None or node.changed > asked):
                continue  # open or changed here since: what this mount knows wins
            node = self._file_node(path, e.info(s3key), key)
            node.indexed = (hint[2], hint[1], hint[3])
            if node.is_link and e.link is not None:
                node.link_target = e.link
            self.keyring.learn(s3key, key, e.etag)
            out[name] = node
        return out

    async def _indexed_marker(self, marker: ObjectInfo) -> tuple[ObjectInfo, Key | None] | None:
        """What the metadata index keeps of a directory marker as a listing shows it (the
        same rule as for files), or None: a HEAD must say."""
        if self.index is None or not marker.etag:
            return None
        e = (await self.index.lookup([(marker.key, marker.etag, marker.size,
                                       marker.mtime)])).get(marker.key)
        if e is None:
            return None
        known, key = self._entry_key(e)
        if not known:
            return None
        self.keyring.learn(marker.key, key, e.etag)
        return e.info(marker.key), key

    def _entry_key(self, e: Entry) -> tuple[bool, Key | None]:
        """The key an index entry names (None: an object stored without SSE-C), and whether
        it is known: not once that key has left the key file, when S3 must say (a HEAD)
        what opens the object now."""
        if e.key_id == PLAIN:
            return True, None
        key = self.keyring.by_id(e.key_id)
        return key is not None, key

    def _index_marker(self, marker: ObjectInfo, info: ObjectInfo, key: Key | None) -> None:
        """Keep what a HEAD said (just now) of a directory marker a listing showed, as
        :meth:`_index_note` does for a file."""
        if self.index is None or not marker.etag or not settled(marker.mtime, time.time()) or \
                (info.etag, info.size, int(info.mtime)) != \
                (marker.etag, marker.size, int(marker.mtime)):
            return
        self._index_flush(self.index.note(marker.key, Entry(
            marker.etag, marker.size, marker.mtime, info.mtime, key.id if key else PLAIN,
            info.version_id, dict(info.metadata))))

    def _index_note(self, node: Node, hint: tuple[bool, int, str, float], info: ObjectInfo,
                    key: Key | None) -> None:
        """Keep what a HEAD said (just now) of a listed file, if the object is still the one
        the listing showed (a HEAD's LastModified is the listing's, to the second) and the
        listing could show a later change (:func:`~s3ssefs.metaindex.settled`)."""
        if self.index is None or hint[0] or not hint[2] or \
                (info.etag, info.size, int(info.mtime)) != (hint[2], hint[1], int(hint[3])) or \
                not settled(hint[3], time.time()):
            return
        node.indexed = (hint[2], hint[1], hint[3])
        self._index_flush(self.index.note(self.s3key(node.path), Entry(
            hint[2], hint[1], hint[3], info.mtime, key.id if key else PLAIN, info.version_id,
            dict(info.metadata))))

    def _index_keep(self, node: Node, o: ObjectInfo) -> None:
        """Keep what this mount knows of a listed file it has fresh attributes of (it wrote
        or HEADed it) when the listing shows the object it knows: same ETag and size, and
        the LastModified its HEAD said, to the second (after a write from here that is not
        known, and the listing's is taken); and only if it learnt that late enough for the
        listing to show a later change (:func:`~s3ssefs.metaindex.settled`).  What a HEAD
        said is kept only if the HEAD came after the listed LastModified's second had ended:
        the HEAD counts seconds, so a listing's object changed in the same second as the one
        it saw (metadata alone: same ETag and size) would otherwise pass for it."""
        known_at = time.time() - (time.monotonic() - node.fetched)
        if self.index is None or node.locked or not node.remote or node.is_dir or \
                node.etag != o.etag or node.attrs.size != o.size or node.data is not None or \
                node.indexed == (o.etag, o.size, o.mtime) or \
                (node.server_mtime is not None and int(node.server_mtime) != int(o.mtime)) or \
                not settled(float(int(o.mtime)) if node.server_mtime is not None else o.mtime,
                            known_at):
            return
        node.indexed = (o.etag, o.size, o.mtime)
        self._index_node(node)

    def _index_node(self, node: Node) -> None:
        """Keep what this mount knows of ``node`` for the listing ``node.indexed`` names:
        the metadata its HEAD said (so the mount's uid, gid and umask defaults apply to what
        it lacks, as for a HEAD), or after a write from here, the metadata written."""
        assert self.index is not None and node.indexed is not None
        etag, size, mtime = node.indexed
        key = node.sse_key
        head = node.server_mtime
        self._index_flush(self.index.note(self.s3key(node.path), Entry(
            etag, size, mtime, mtime if head is None else head, key.id if key else PLAIN,
            node.version_id, self.metadata(node) if head is None else dict(node.metadata),
            node.link_target if node.is_link else None)))

    def _index_forget(self, s3key: str) -> None:
        if self.index is not None:
            self._index_flush(self.index.forget(s3key))

    def _index_flush(self, due: bool) -> None:
        if due and self.index is not None and self.ctx.nursery is not None:
            self.ctx.nursery.start_soon(self.index.flush)

    async def _refresh(self, node: Node) -> None:
        if self._fresh(node) or await self._renew(node):
            return
        if node.is_dir:
            await self._probe_dir(node.path)
        else:
            fresh = await self._probe(node.path)
            if fresh is not node:
                raise FsError(errno.ESTALE, f"{node.path} was replaced")

    async def _renew(self, node: Node) -> bool:
        """Make ``node``, a listed file whose attributes expired, fresh again from one LIST
        page of its directory starting at its name, if the page shows it unchanged; every
        other expired node the page shows unchanged is renewed with it.  A program that
        reads a large directory's names first and stats them after (find, du: GNU fts) may
        take longer than attr_ttl to get there, and would then cost a HEAD per name; this
        costs a LIST per 1,000.  Unchanged is the metadata index's rule: the listing shows the
        ETag, size and LastModified the node's attributes were last confirmed with
        (``Node.indexed``).  Not while a listing of the directory is still remembered (a
        lookup takes its hint from that) nor as of a time (versions are listed whole)."""
        dpath = node.path.rpartition("/")[0]
        if not _renewable(node) or dpath not in self._listed or self.cfg.as_of is not None or \
                self.inodes.listing(dpath, self.cfg.dir_ttl) is not None:
            return False
        running = self._renewing.get(dpath)
        if running is not None:  # another lookup in the directory is renewing: its page
            await running.wait()
            return self._fresh(node)
        self._renewing[dpath] = done = trio.Event()
        try:
            prefix = self.dirkey(dpath)
            asked, at = stamp(), time.monotonic()
            # from just before the name: S3 lists the keys after start_after
            async for page in self.view.list_pages(prefix, delimiter="/",
                                                   start_after=self.s3key(node.path)[:-1]):
                for name, o in self._page_names(dpath, prefix, page)[1].items():
                    n = self.inodes.find(join(dpath, name))
                    if n is not None and _renewable(n) and n.changed <= asked and \
                            n.indexed == (o.etag, o.size, o.mtime) and n.etag == o.etag:
                        n.fetched = max(n.fetched, at)
                break
        except FsError as e:  # the lookup goes on as if this had not been tried
            log.debug("renewing %s from a listing failed: %s", node.path, e)
        finally:
            del self._renewing[dpath]
            done.set()
        return self._fresh(node)

    async def _revalidate(self, node: Node) -> None:
        """Close-to-open: an open looks at S3 again whatever the TTL says (another client may
        have closed a new version a moment ago); a changed object makes the kernel drop the
        attributes it cached (:meth:`_file_node`)."""
        fresh = await self._probe(node.path)
        if fresh is not node:
            raise FsError(errno.ESTALE, f"{node.path} was replaced")

    def _forget_kernel_attrs(self, node: Node) -> None:
        """Make the kernel drop the attributes it holds of ``node``, which changed under it:
        it would keep them for attr_ttl and cut a read of the new content at the old size
        (an open that finds nothing new since the mount last looked does not tell it)."""
        if node.lookups == 0 and node.open_count == 0:
            return  # the kernel holds none
        try:  # attributes only, no writeback cache: does not block
            pyfuse3.invalidate_inode(node.ino, attr_only=True)
        except OSError as e:
            log.debug("could not invalidate attributes of %s: %s", node.path, e)

    # ------------------------------------------------------------------ lookups & attributes
    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None,
                     ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        try:
            node = await self._lookup(parent, check_name(name))
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            # a negative entry the kernel may keep for the TTL: `cp`'s stat and its
            # open(O_CREAT) then cost one lookup, not two
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self.ttl
            return neg
        node.lookups += 1
        return node.entry(self.ttl)

    def forget(self, inode_list: list[tuple[int, int]]) -> None:  # type: ignore[override]
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self.inodes.get(inode)
        try:
            await self._refresh(node)
        except FsError as e:
            if e.errno != errno.ENOENT or node.open_count == 0:
                raise
        return node.entry(self.ttl)

    @_fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any,
                      ) -> pyfuse3.EntryAttributes:
        self._check_writable()
        node = self.inodes.get(inode)
        if node.locked:
            raise FsError(errno.EACCES, f"no key opens {node.path}")
        a = replace(node.attrs)
        changed = False
        if fields.update_mode:
            a.mode = stat.S_IFMT(a.mode) | stat.S_IMODE(attr.st_mode)
            changed = True
        if fields.update_uid:
            a.uid = attr.st_uid
            changed = True
        if fields.update_gid:
            a.gid = attr.st_gid
            changed = True
        if fields.update_mtime:
            a.mtime_ns = attr.st_mtime_ns
            self._dir_changed.pop(node.path, None)  # an explicit time wins over our own
            changed = True
        if fields.update_atime:  # only when asked (utimensat): reads leave it (noatime)
            a.atime_ns = attr.st_atime_ns
            changed = True
        if changed or fields.update_size:
            a.ctime_ns = _now_ns()
        if fields.update_size:
            if node.is_dir:
                raise FsError(errno.EISDIR, "truncate of a directory")
            if not fields.update_mtime:
                a.mtime_ns = _now_ns()
            data, temporary = await self._data_for(node)
            try:
                await data.truncate(attr.st_size)
                await self._settle_pages(node)  # no page of the old content may land after
                node.attrs = a
                if temporary:
                    await data.flush()
            finally:
                if temporary:
                    await self._drop_data(node)
            return node.entry(self.ttl)
        if not changed:
            return node.entry(self.ttl)
        old = node.attrs
        node.attrs = a
        try:
            await self._persist_attrs(node)
        except BaseException:
            node.attrs = old
            raise
        return node.entry(self.ttl)

    async def _persist_attrs(self, node: Node) -> None:
        """Write changed attributes: with the data if it is dirty, else rewrite the metadata
        server-side (or re-PUT a small object)."""
        if node.data is not None and node.data.dirty:
            return  # the upload at flush carries the new attributes
        if not node.remote or node.ino == ROOT:
            # the root has no object of its own (its key would be the bucket's URL, or the
            # prefix another mount may share): its attributes are the mount point's, in memory
            return
        meta = self.metadata(node)
        if node.is_dir:
            info = await self.store.put(self.dirkey(node.path), b"", self.keyring.current, meta)
            node.has_marker = True
            node.sse_key = self.keyring.current
            node.changed = stamp()
            return
        key = node.sse_key
        s3key = self.s3key(node.path)
        if node.attrs.size <= SMALL_REWRITE:
            ref = ObjectRef(s3key, node.etag, node.attrs.size, key, node.version_id)
            body = b"".join(await self.ctx.source.blocks(
                ref, 0, self.ctx.source.nblocks(ref) - 1)) if ref.size else b""
            info = await self.store.put(s3key, body, key, meta)
        else:
            info = await self.store.copy(s3key, s3key, key, key, meta, node.attrs.size)
        if not info.etag:
            info = await self.store.head(s3key, key)
        self.keyring.learn(s3key, key, info.etag)
        if node.data is not None and node.data.base is not None:
            node.data.base = replace(node.data.base, etag=info.etag,
                                     version_id=info.version_id)
        node.etag = info.etag
        node.version_id = info.version_id
        node.server_mtime = None
        node.fetched = time.monotonic()
        node.changed = stamp()

    async def _data_for(self, node: Node) -> tuple[FileData, bool]:
        """The node's open-file state, or a temporary one (truncate of a closed file)."""
        if node.data is not None:
            return node.data, False
        node.data = FileData(self.ctx, node, self._base_ref(node))
        return node.data, True

    def _base_ref(self, node: Node) -> ObjectRef | None:
        if not node.remote:
            return None
        return ObjectRef(self.s3key(node.path), node.etag, node.attrs.size, node.sse_key,
                         node.version_id)

    async def _drop_data(self, node: Node) -> None:
        data = node.data
        if data is None or node.open_count > 0:
            return
        if data.dirty and not data.unlinked and data.failed is None:
            return  # kept for retry; flush_all tries again
        node.data = None
        # what the kernel's pages hold now: the content as it stands in S3 (flushed)
        node.page_id = (node.etag, node.attrs.size) if node.remote else None
        if data.failed is not None and data.dirty and not data.unlinked:
            self._drop_changes(node, data.failed)
        await data.close()

    def _drop_changes(self, node: Node, why: FsError) -> None:
        """The last handle of a file whose write failed has closed: its changes are dropped
        (FileData._fail), and it is again what S3 holds, if anything."""
        if node.remote:
            log.error("s3://%s/%s keeps its previous content: the changes made to it are "
                      "dropped, as %s", self.store.bucket, self.s3key(node.path), why.args[0])
            node.page_id = None
            node.fetched = 0.0  # its attributes come from S3 again
            self._forget_kernel_attrs(node)
        else:
            log.error("s3://%s/%s is not created, as %s", self.store.bucket,
                      self.s3key(node.path), why.args[0])
            self.inodes.listing_remove(node.path)
            self.inodes.detach(node)

    # ------------------------------------------------------------------ directories
    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self.inodes.get(inode)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR, node.path)
        fh = self._next_fh
        self._next_fh += 1
        self.dirs[fh] = DirHandle(node)
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self.dirs[fh]
        if start_id == 0 or start_id < h.pos - len(h.pending):
            h.stream = self._with_dots(h.node)
            h.pos = 0
            h.pending = []
        h.pending = [p for p in h.pending if p[0] >= start_id]
        while True:
            while h.pending:
                idx, name, node = h.pending[0]
                # attributes not from a HEAD yet: the kernel must look the entry up again
                # before it trusts them (ls -l), and a plain ls costs no HEAD at all
                ttl = self.ttl if self._fresh(node) else 0.0
                if not pyfuse3.readdir_reply(token, name.encode(), node.entry(ttl), idx + 1):
                    return
                if name not in (".", ".."):  # the kernel takes no reference on those
                    node.lookups += 1
                h.pending.pop(0)
            assert h.stream is not None
            try:
                name, node = await h.stream.__anext__()
            except StopAsyncIteration:
                return
            h.pending.append((h.pos, name, node))
            h.pos += 1

    async def _with_dots(self, dnode: Node) -> AsyncIterator[tuple[str, Node]]:
        """``.`` and ``..`` first, as every POSIX file system lists them (``ls -a``,
        ``find``'s link counting), then the directory's entries."""
        yield ".", dnode
        parent = self.inodes.find(dnode.path.rpartition("/")[0]) if dnode.path else None
        yield "..", parent or dnode
        async for entry in self._entries(dnode):
            yield entry

    async def _entries(self, dnode: Node) -> AsyncIterator[tuple[str, Node]]:
        """A directory's entries, page by page: S3's, plus files created here not yet
        uploaded.  Sizes and times come from the listing; mode/uid/gid need a HEAD, which a
        later lookup makes (and prefetches for the entries after it), so listing sends none."""
        dpath = dnode.path
        prefix = self.dirkey(dpath)
        seen: set[str] = set()
        remembered: dict[str, tuple[bool, int, str, float]] = {}
        complete = True
        order = ListedOrder()
        asked = stamp()
        self._listed.pop(dpath, None)
        self._listed[dpath] = order
        while len(self._listed) > LISTED_DIRS:
            self._listed.popitem(last=False)
        async for page in self._pages_ahead(prefix):
            dirs, files = self._page_names(dpath, prefix, page)
            results: dict[str, Node] = {}
            stale: dict[str, tuple[bool, int, str, float]] = {}
            for name, o in files.items():
                path = join(dpath, name)
                node = self.inodes.find(path)
                if node is None and self.inodes.removed_since(path, asked):
                    continue  # removed here since the LIST was asked
                if node is not None and node.changed > asked:
                    continue  # changed here since the LIST was asked: what the mount knows
                if node is None or not self._fresh(node) or (node.etag != o.etag and \
                        (node.data is None or not node.data.dirty)):
                    stale[name] = (False, o.size, o.etag, o.mtime)
                else:
                    self._index_keep(node, o)
            indexed = await self._indexed(dpath, stale, asked)
            for name, hint in stale.items():
                path = join(dpath, name)
                results[path] = indexed.get(name) or self._listed_node(path, hint, asked)
                # the indexed ones too: a program that stats them only after attr_ttl (find
                # or du reading 50,000 names first, on a loaded machine) then looks them up
                # again, and those lookups' HEADs go ahead in windows, not one at a time
                order.add(name, hint)
            for name in sorted(list(dirs) + list(files)):
                path = join(dpath, name)
                if name in dirs:
                    node = self.inodes.find(path)
                    if node is None and self.inodes.removed_since(path, asked):
                        continue  # removed here since the LIST was asked
                    if node is None or not node.is_dir:
                        # mode and owner live on the marker (if any): a lookup finds out
                        now = time.time()
                        node = self.inodes.create(path, self._attrs(
                            ObjectInfo(key=dirs[name], size=0, etag="", mtime=now), True))
                        node.fetched = -math.inf
                    if not self._fresh(node):
                        order.add(name, (True, 0, "", 0.0))
                    remembered[name] = (True, 0, "", 0.0)
                else:
                    node = results.get(path) or self.inodes.find(path)
                    if node is None:
                        continue
                    o = files[name]
                    remembered[name] = (False, o.size, o.etag, o.mtime) \
                        if node.changed <= asked else (False, node.attrs.size, "", 0.0)
                seen.add(name)
                yield name, node
            if len(remembered) > 20_000:
                complete = False
                remembered.clear()
        # files created (or renamed) here that S3 does not have yet, or had not when asked
        pre = dpath + "/" if dpath else ""
        for path, node in list(self.inodes.by_path.items()):
            if path.startswith(pre) and "/" not in path[len(pre):] and path != dpath:
                name = path[len(pre):]
                if name not in seen and (not node.remote or node.changed > asked):
                    remembered[name] = (node.is_dir, node.attrs.size, "", 0.0)
                    yield name, node
        if complete:
            self.inodes.remember_listing(dpath, remembered, asked)

    async def _pages_ahead(self, prefix: str) -> AsyncIterator[ListPage]:
        """The listing pages of directory ``prefix``, the next one asked for while this one
        is used (one page ahead, a task in the mount's nursery): a large directory's pages
        cost the wait for each LIST or the work on the page before it (index, nodes, the
        kernel's copy), whichever is longer, not both.  The task stops once the pages are
        no longer wanted (the channel closed); its end is sent as ``None``, so a task
        cancelled midway (at unmount) never passes for a complete listing."""
        nursery = self.ctx.nursery
        if nursery is None:
            async for page in self.view.list_pages(prefix, delimiter="/"):
                yield page
            return
        send: trio.MemorySendChannel[ListPage | Exception | None]
        recv: trio.MemoryReceiveChannel[ListPage | Exception | None]
        send, recv = trio.open_memory_channel(0)

        async def produce() -> None:
            async with send:
                try:
                    async for page in self.view.list_pages(prefix, delimiter="/"):
                        await send.send(page)
                    await send.send(None)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # nobody reads the pages any more
                except Exception as e:  # the reader raises it
                    with contextlib.suppress(trio.BrokenResourceError,
                                             trio.ClosedResourceError):
                        await send.send(e)

        nursery.start_soon(produce)
        async with recv:
            async for item in recv:
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        raise FsError(errno.EIO, f"listing of {prefix!r} cut short")

    def _page_names(self, dpath: str, prefix: str, page: ListPage,
                    ) -> tuple[dict[str, str], dict[str, ObjectInfo]]:
        """The subdirectories (name → prefix) and files (name → object) of one listing page
        of directory ``dpath``: names a file system can show, the directory winning over a
        file of the same name."""
        dirs = {}
        for p in page.prefixes:
            name = p[len(prefix):-1]
            if self._valid_name(name, p):
                dirs[name] = p
        files = {}
        for o in page.objects:
            name = o.key[len(prefix):]
            if o.key == prefix or not self._valid_name(name, o.key):
                continue
            known = self.inodes.find(join(dpath, name))
            if name in dirs or (known is not None and known.is_dir):
                log.info("s3://%s/%s: a file and a directory share this name; "
                         "showing the directory", self.store.bucket, o.key)
                continue
            files[name] = o
        return dirs, files

    def _valid_name(self, name: str, key: str) -> bool:
        if not name or name in (".", "..") or "/" in name or \
                len(name.encode("utf-8", "surrogateescape")) > 255:
            log.info("s3://%s/%s: name cannot be shown in a directory; skipped",
                     self.store.bucket, key)
            return False
        return True

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @_fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any,
                    ) -> pyfuse3.EntryAttributes:
        self._check_writable()
        parent = self.inodes.get(parent_inode)
        path = self._child(parent, name)
        now = _now_ns()
        attrs = Attrs(mode=stat.S_IFDIR | stat.S_IMODE(mode), uid=ctx.uid,
                      gid=self._new_gid(parent, ctx), size=0, mtime_ns=now, ctime_ns=now)
        if parent.attrs.mode & stat.S_ISGID:
            attrs.mode |= stat.S_ISGID
        await self.store.put(self.dirkey(path), b"", self.keyring.current,
                             metadata_for(attrs))
        node = self.inodes.create(path, attrs, has_marker=True, sse_key=self.keyring.current,
                                  changed=stamp())
        node.fetched = time.monotonic()
        node.lookups += 1
        self.inodes.listing_add(path, True)
        # new and empty: names in it need no lookup
        self.inodes.remember_listing(path, {}, stamp())
        self._entries_changed(parent)
        return node.entry(self.ttl)

    def _new_gid(self, parent: Node, ctx: Any) -> int:
        return parent.attrs.gid if parent.attrs.mode & stat.S_ISGID else ctx.gid

    def _entries_changed(self, *parents: Node) -> None:
        """An entry was created, removed or renamed in ``parents``: their mtime and ctime are
        now (in memory, for the mount's life; not written to S3)."""
        now = _now_ns()
        for p in parents:
            p.attrs.mtime_ns = p.attrs.ctime_ns = now
            self._dir_changed[p.path] = now

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_writable()
        parent = self.inodes.get(parent_inode)
        text = check_name(name)
        try:
            node = await self._lookup(parent, text)
        except FsError as e:
            # a directory implied by its objects (no marker) vanished from S3 with its last
            # entry: the kernel still shows it, so `rm -r` must be able to remove it
            known = self.inodes.find(join(parent.path, text))
            if e.errno != errno.ENOENT or known is None or not known.is_dir:
                raise
            node = known
        if not node.is_dir:
            raise FsError(errno.ENOTDIR, node.path)
        await self._check_empty(node)
        self._guard_unreadable(node, "delete")
        prefix = self.dirkey(node.path)
        try:
            await self.store.delete(prefix)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
        self.inodes.detach(node)
        self.inodes.listing_remove(node.path)
        self.inodes.invalidate_listing(node.path)
        self._dir_changed.pop(node.path, None)
        self._entries_changed(parent)

    async def _check_empty(self, node: Node) -> None:
        prefix = self.dirkey(node.path)
        async for page in self.store.list_pages(prefix, delimiter=None, page_size=2):
            if any(o.key != prefix for o in page.objects):
                raise FsError(errno.ENOTEMPTY, node.path)
            break
        pre = node.path + "/"
        if any(p.startswith(pre) and not n.remote for p, n in self.inodes.by_path.items()):
            raise FsError(errno.ENOTEMPTY, node.path)

    # ------------------------------------------------------------------ files
    @_fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any,
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_writable()
        parent = self.inodes.get(parent_inode)
        path = self._child(parent, name)
        known = self.inodes.find(path)
        if known is not None:  # an object the kernel has not heard of yet (or no longer)
            self._guard_unreadable(known, "replace")
        now = _now_ns()
        attrs = Attrs(mode=stat.S_IFREG | stat.S_IMODE(mode), uid=ctx.uid,
                      gid=self._new_gid(parent, ctx), size=0, mtime_ns=now, ctime_ns=now)
        node = self.inodes.create(path, attrs, remote=False, changed=stamp())
        node.fetched = time.monotonic()
        node.data = FileData(self.ctx, node, None)
        node.data.page_blockers += 1
        node.open_count += 1
        node.lookups += 1
        self.inodes.listing_add(path, False)
        self._entries_changed(parent)
        fh = self._fh(node)
        self.writers.add(fh)
        self.page_blockers.add(fh)
        return pyfuse3.FileInfo(fh=fh, direct_io=self.cfg.direct_io), node.entry(self.ttl)

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.inodes.get(inode)
        if node.is_dir:
            raise FsError(errno.EISDIR, node.path)
        writing = flags & (os.O_WRONLY | os.O_RDWR) or flags & os.O_TRUNC
        if writing:
            self._check_writable()
        orphan = False  # removed since the kernel looked the name up: see _opened_removed
        removing = self._removing.get(inode)
        if removing is not None:  # an unlink of it is under way: its object is going
            await removing.wait()
        if node.data is None and self.inodes.find(node.path) is not node:
            orphan = self._opened_removed(node, flags, here=not node.remote)
        # close-to-open: look at S3 again, unless the lookup that led here just did
        just_probed, node.just_probed = node.just_probed, False
        if node.data is None and node.remote and not just_probed and not orphan \
                and self.cfg.as_of is None:
            try:
                await self._revalidate(node)
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise
                here = inode in self._removing or not node.remote
                self.inodes.listing_remove(node.path)  # gone: the name no longer means it
                self.inodes.detach(node)
                orphan = self._opened_removed(node, flags, here)
        if node.locked:
            log.warning("no key opens s3://%s/%s [EACCES]", self.store.bucket,
                        self.s3key(node.path))
            raise FsError(errno.EACCES, f"no key opens {node.path}")
        # the kernel's page cache outlives a close: keep it when what it may hold is what S3
        # has now (NFS's close-to-open), so a file read again is not fetched or decrypted
        # again; drop it when another client changed the object (or we cannot tell)
        keep = node.data is not None or (node.remote and
                                         node.page_id == (node.etag, node.attrs.size))
        if node.data is None:
            node.data = FileData(self.ctx, node, None if orphan else self._base_ref(node))
            node.data.unlinked = orphan
        data = node.data
        node.open_count += 1
        blocks_pages = bool(writing or flags & os.O_DIRECT)
        if blocks_pages:
            data.page_blockers += 1
        try:
            if flags & os.O_TRUNC and data.size:
                await data.truncate(0)
                node.attrs.mtime_ns = node.attrs.ctime_ns = _now_ns()
            # pages fetched for a reader and not yet in the kernel: none may land once this
            # open has returned (over a writer's pages, or after the kernel dropped the old
            # content), and no new ones start while it is open (FileData._pages_ok)
            await self._settle_pages(node)
        except BaseException:
            node.open_count -= 1
            if blocks_pages:
                data.page_blockers -= 1
            raise
        fh = self._fh(node)
        if writing:
            self.writers.add(fh)
        if blocks_pages:
            self.page_blockers.add(fh)
        return pyfuse3.FileInfo(fh=fh, keep_cache=bool(keep), direct_io=self.cfg.direct_io)

    def _opened_removed(self, node: Node, flags: int, here: bool) -> bool:
        """An open of a file removed since the kernel looked its name up (``here``: its object
        was deleted by this mount, as when `rm f` and `echo foo > f` race).  A
        program that truncates a file removed here opens it as an unlinked file, as on a
        local file system where the unlink came just after the open: what it writes goes
        nowhere (True).  Any other writer gets ESTALE, on which the kernel looks the name
        up again and opens, or creates if asked to, what it names now; a reader finds the
        file gone (ENOENT)."""
        writing = flags & (os.O_WRONLY | os.O_RDWR)
        if here and writing and flags & os.O_TRUNC:
            node.remote = False
            return True
        raise FsError(errno.ESTALE if writing else errno.ENOENT, f"{node.path} was removed")

    async def _settle_pages(self, node: Node) -> None:
        """Wait until no fetched data is on its way into the kernel's pages of ``node``."""
        if self.ctx.pages is not None:
            await self.ctx.pages.settle(node.ino)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> Buf:
        node = self.handles[fh]
        assert node.data is not None
        return await node.data.read(off, size)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.handles[fh]
        assert node.data is not None
        n = await node.data.write(off, buf)
        node.attrs.mtime_ns = node.attrs.ctime_ns = _now_ns()
        return n

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        # a reader's close() uploads nothing: it must not fail (or wait) on a writer's
        # pending upload; fsync, the retry loop and umount still upload
        if fh in self.writers:
            await self._flush_node(self.handles[fh])

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._flush_node(self.handles[fh])

    async def _flush_node(self, node: Node) -> None:
        data = node.data
        if data is None:
            return
        try:
            await data.flush()
        except WriteFailed:
            raise  # reported when the write failed, and when the changes are dropped
        except FsError as e:
            log.error("upload of s3://%s/%s failed, data kept locally for retry: %s",
                      self.store.bucket, self.s3key(node.path), e)
            raise FsError(errno.EIO, str(e)) from None
        node.server_mtime = None
        self.keyring.learn(self.s3key(node.path), node.sse_key, node.etag)
        self.inodes.listing_add(node.path, False, data.size)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        node = self.handles.pop(fh)
        self.writers.discard(fh)
        if fh in self.page_blockers:
            self.page_blockers.discard(fh)
            if node.data is not None:
                node.data.page_blockers -= 1
        node.open_count -= 1
        if node.open_count == 0:
            await self._drop_data(node)
            self.inodes.forget(node.ino, 0)

    # ------------------------------------------------------------------ names
    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_writable()
        parent = self.inodes.get(parent_inode)
        node = await self._lookup(parent, check_name(name))
        if node.is_dir:
            raise FsError(errno.EISDIR, node.path)
        self._guard_unreadable(node, "delete")
        await self._remove_file(node)
        self._entries_changed(parent)

    def _guard_unreadable(self, node: Node, what: str) -> None:
        """EACCES for deleting or replacing an object no key of this mount opens (a wrong key
        file must not be able to wipe a bucket), unless the mount was told it may
        (delete_unreadable).  Renaming one is never possible: copying it needs its key."""
        if not node.locked or node.ino == ROOT:
            return
        s3key = self.dirkey(node.path) if node.is_dir else self.s3key(node.path)
        if self.cfg.delete_unreadable and what != "rename":
            log.warning("%s s3://%s/%s, which no key of this mount opens (delete_unreadable)",
                        "deleting" if what == "delete" else "replacing", self.store.bucket,
                        s3key)
            return
        hint = "" if what == "rename" else "; the option delete_unreadable allows it"
        log.warning("refusing to %s s3://%s/%s: no key of this mount opens it (tried %s)%s "
                    "[EACCES]", what, self.store.bucket, s3key, self.keyring.tried(s3key), hint)
        raise FsError(errno.EACCES, f"no key opens {node.path}")

    async def _remove_file(self, node: Node) -> None:
        done = self._removing[node.ino] = trio.Event()  # see open
        try:
            if node.data is not None:
                await node.data.detach_from_object()
            if node.remote:
                try:
                    await self.store.delete(self.s3key(node.path))
                except FsError as e:
                    if e.errno != errno.ENOENT:
                        raise
            node.remote = False
            self.keyring.forget(self.s3key(node.path))
            self._index_forget(self.s3key(node.path))
            self.inodes.listing_remove(node.path)
            self.inodes.detach(node)
        finally:
            del self._removing[node.ino]
            done.set()

    @_fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self._check_writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old_parent = self.inodes.get(parent_inode_old)
        new_parent = self.inodes.get(parent_inode_new)
        node = await self._lookup(old_parent, check_name(name_old))
        new_path = self._child(new_parent, name_new)
        if new_path == node.path:
            return
        self._guard_unreadable(node, "rename")
        if node.is_dir and (new_path + "/").startswith(node.path + "/"):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")
        try:
            target: Node | None = await self._lookup(new_parent, check_name(name_new))
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            target = None
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FsError(errno.EEXIST, new_path)
            if node.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR, new_path)
            if not node.is_dir and target.is_dir:
                raise FsError(errno.EISDIR, new_path)
            if target.is_dir:
                await self._check_empty(target)
            self._guard_unreadable(target, "replace")
        # the renamed inode's ctime changes (written with the copy of a file)
        node.attrs.ctime_ns = _now_ns()
        if node.is_dir:
            await self._rename_dir(node, new_path, target)
        else:
            await self._rename_file(node, new_path, target)
        self._entries_changed(old_parent, new_parent)

    async def _rename_file(self, node: Node, new_path: str, target: Node | None) -> None:
        old_path = node.path
        old_key, new_key = self.s3key(old_path), self.s3key(new_path)
        if target is not None and target.data is not None:
            await target.data.detach_from_object()
        data = node.data
        if (data is not None and data.dirty) or not node.remote:
            # not in S3 (or stale there): upload straight to the new name
            was_remote = node.remote
            self.inodes.move(node, new_path)
            if data is not None:
                await self._flush_node(node)
            if was_remote:
                await self.store.delete(old_key)
        else:
            info = await self.store.copy(old_key, new_key, node.sse_key, node.sse_key,
                                         self.metadata(node), node.attrs.size,
                                         node.version_id)
            await self.store.delete(old_key)
            self.inodes.move(node, new_path)
            if not info.etag:
                info = await self.store.head(new_key, node.sse_key)
            node.etag = info.etag
            node.version_id = info.version_id
            node.server_mtime = None
            node.changed = stamp()
            if data is not None:
                data.renamed(info)
        self.keyring.rename(old_key, new_key)
        self.keyring.learn(new_key, node.sse_key, node.etag)
        self._index_forget(old_key)
        if target is not None:
            target.remote = False
        self.inodes.listing_remove(old_path)
        self.inodes.listing_add(new_path, False, node.attrs.size)

    async def _rename_dir(self, node: Node, new_path: str, target: Node | None) -> None:
        """Every object below the directory is copied then deleted, in parallel; not atomic."""
        old_path = node.path
        pre = old_path + "/"
        for p, n in list(self.inodes.by_path.items()):
            if p.startswith(pre) and n.data is not None and n.data.dirty:
                await self._flush_node(n)
        old_prefix, new_prefix = self.dirkey(old_path), self.dirkey(new_path)
        if target is not None and target.has_marker:
            await self.store.delete(new_prefix)

        heads: dict[str, tuple[ObjectInfo, Any]] = {}

        async def head_one(o: ObjectInfo) -> None:
            heads[o.key] = await self.keyring.head(o.key[len(self.cfg.prefix):], o.key)

        async def move_one(o: ObjectInfo) -> None:
            info, key = heads.pop(o.key)
            dst = new_prefix + o.key[len(old_prefix):]
            await self.store.copy(o.key, dst, key, key, info.metadata, o.size)
            await self.store.delete(o.key)
            self.keyring.rename(o.key, dst)

        async for page in self.store.list_pages(old_prefix, delimiter=None):
            # every object of the page is opened first: one no key opens (EACCES, logged
            # with the fingerprints tried) stops the move before any of them is copied
            heads.clear()
            await gather((functools.partial(head_one, o) for o in page.objects),
                         limit=self.cfg.max_requests)
            await gather((functools.partial(move_one, o) for o in page.objects),
                         limit=self.cfg.max_requests)
        self.inodes.move(node, new_path)
        for p in [p for p in self._dir_changed if p == old_path or p.startswith(pre)]:
            self._dir_changed[new_path + p[len(old_path):]] = self._dir_changed.pop(p)
        for p, n in list(self.inodes.by_path.items()):
            if p == new_path or p.startswith(new_path + "/"):
                n.fetched = 0.0  # new ETags: look again
                if n.data is not None and n.data.base is not None:
                    n.data.base = replace(n.data.base, s3key=self.s3key(p))
        node.fetched = time.monotonic()

    @_fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any,
                      ) -> pyfuse3.EntryAttributes:
        self._check_writable()
        parent = self.inodes.get(parent_inode)
        path = self._child(parent, name)
        now = _now_ns()
        attrs = Attrs(mode=stat.S_IFLNK | 0o777, uid=ctx.uid, gid=self._new_gid(parent, ctx),
                      size=len(target), mtime_ns=now, ctime_ns=now)
        key = self.keyring.current
        info = await self.store.put(self.s3key(path), target, key, metadata_for(attrs))
        node = self.inodes.create(path, attrs, etag=info.etag, sse_key=key, link_target=target,
                                  changed=stamp())
        node.fetched = time.monotonic()
        node.lookups += 1
        self.keyring.learn(self.s3key(path), key, info.etag)
        self.inodes.listing_add(path, False, len(target))
        self._entries_changed(parent)
        return node.entry(self.ttl)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self.inodes.get(inode)
        if not node.is_link:
            raise FsError(errno.EINVAL, node.path)
        if node.link_target is None:
            node.link_target = bytes(await self.store.get_range(
                self.s3key(node.path), 0, max(node.attrs.size, 1) + 4096, node.sse_key,
                node.version_id))
            if self.index is not None and node.indexed is not None and \
                    node.indexed[0] == node.etag:
                self._index_node(node)  # with its target: ls -l reads it each time
        return node.link_target

    @_fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any,
                    ) -> pyfuse3.EntryAttributes:
        self._check_writable()
        parent = self.inodes.get(parent_inode)
        path = self._child(parent, name)
        now = _now_ns()
        attrs = Attrs(mode=mode, uid=ctx.uid, gid=self._new_gid(parent, ctx), size=0,
                      mtime_ns=now, ctime_ns=now, rdev=rdev)
        key = self.keyring.current
        info = await self.store.put(self.s3key(path), b"", key, metadata_for(attrs))
        node = self.inodes.create(path, attrs, etag=info.etag, sse_key=key, changed=stamp())
        node.fetched = time.monotonic()
        node.lookups += 1
        self.inodes.listing_add(path, False)
        self._entries_changed(parent)
        return node.entry(self.ttl)

    @_fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any,
                   ) -> pyfuse3.EntryAttributes:
        raise FsError(errno.EPERM, "hard links are not supported")

    @_fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 1 << 20
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
        s.f_files = s.f_ffree = s.f_favail = 1 << 30
        s.f_namemax = 255
        return s

    @_fuse_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True

    # ------------------------------------------------------------------ xattrs
    # user.* attributes live in the object's x-amz-meta-xattr, as s3fs keeps them (meta.py);
    # user.s3ssefs.* are read-only and describe the object.  No security labels, ACLs or
    # trusted attributes here: "not supported", as on a file system without them, and not
    # "none on this file".  ls -l asks for security.selinux and system.posix_acl_access of
    # every file it lists until it hears ENOTSUP; then it asks no more on this mount.
    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        node = self.inodes.get(inode)
        if name == b"user.s3ssefs.key":
            return (node.sse_key.id if node.sse_key else "none").encode()
        if name == b"user.s3ssefs.version":
            return (node.version_id or "null").encode()
        if name == b"user.s3ssefs.etag":
            return node.etag.encode()
        if not name.startswith(b"user."):
            raise FsError(errno.ENOTSUP, "only user.* attributes")
        value = (await self._xattrs(node)).get(name)
        if value is None:
            raise FsError(pyfuse3.ENOATTR, "no such attribute")
        return value

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        node = self.inodes.get(inode)
        own = [] if node.is_dir else list(XATTRS)
        return own + sorted(await self._xattrs(node))

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        node = self._xattr_target(inode, name)
        xattrs = await self._xattrs(node)
        if not storable_xattr_name(name):
            raise FsError(errno.EINVAL, 'an attribute name with ", , or : cannot be stored')
        room = xattr_room(self.metadata(node))
        if len(format_xattrs({name: value})) > room:
            raise FsError(errno.E2BIG, "attribute larger than S3's user metadata allows")
        xattrs[name] = value
        header = format_xattrs(xattrs)
        if len(header) > room:
            raise FsError(errno.ENOSPC, "no room left in S3's user metadata of this object")
        await self._store_xattrs(node, header)

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        node = self._xattr_target(inode, name)
        xattrs = await self._xattrs(node)
        if xattrs.pop(name, None) is None:
            raise FsError(pyfuse3.ENOATTR, "no such attribute")
        await self._store_xattrs(node, format_xattrs(xattrs) if xattrs else None)

    def _xattr_target(self, inode: int, name: bytes) -> Node:
        self._check_writable()
        node = self.inodes.get(inode)
        if not name.startswith(b"user."):
            raise FsError(errno.ENOTSUP, "only user.* attributes")
        if name.startswith(b"user.s3ssefs."):
            raise FsError(errno.EPERM, "user.s3ssefs.* attributes are read-only")
        if node.locked:
            raise FsError(errno.EACCES, f"no key opens {node.path}")
        if not node.path:
            raise FsError(errno.EPERM, "the mount point has no object to hold attributes")
        return node

    async def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        """The node's user attributes, from metadata at most attr_ttl old (a listed entry's
        HEAD may not have been made yet)."""
        if node.remote and (node.data is None or not node.data.dirty):
            await self._refresh(node)
        return parse_xattrs(node.metadata.get(XATTR))

    async def _store_xattrs(self, node: Node, header: str | None) -> None:
        """New attributes: with the data if it is dirty, else by rewriting the metadata as
        chmod does (a large object is copied server-side, never sent again)."""
        old_meta, old_attrs = node.metadata, node.attrs
        node.metadata = {k: v for k, v in node.metadata.items() if k != XATTR}
        if header is not None:
            node.metadata[XATTR] = header
        node.attrs = replace(node.attrs, ctime_ns=_now_ns())
        try:
            await self._persist_attrs(node)
        except BaseException:
            node.metadata, node.attrs = old_meta, old_attrs
            raise

    # ------------------------------------------------------------------ shutdown
    async def flush_all(self) -> list[str]:
        """Upload every dirty file; the paths that could not be uploaded."""
        failed = []
        for node in list(self.inodes.by_ino.values()):
            if node.data is not None and node.data.dirty and not node.data.unlinked \
                    and node.data.failed is None:
                try:
                    await self._flush_node(node)
                except FsError:
                    failed.append(node.path)
        self.keyring.save()
        if self.index is not None:
            await self.index.flush()
        return failed

    async def retry_loop(self, interval: float = 30.0) -> None:
        """Retry uploads that failed at close, until they succeed or the mount ends; not
        those the server refused for good (``FsError.permanent``: a 403, SSE-C refused):
        sending them again only repeats the refusal and the error line.  The next close,
        fsync or umount of such a file tries once more."""
        while True:
            await trio.sleep(interval)
            for node in list(self.inodes.by_ino.values()):
                data = node.data
                if data is not None and data.dirty and node.open_count == 0 \
                        and not data.unlinked \
                        and not (data.failure is not None and data.failure.permanent):
                    try:
                        await self._flush_node(node)
                        await self._drop_data(node)
                        self.inodes.forget(node.ino, 0)
                    except FsError:
                        pass
            self.keyring.save()
            if self.index is not None:
                await self.index.flush()
