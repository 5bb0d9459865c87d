"""The inode table: which path each inode number names, its attributes, and the kernel's
lookup counts.

A path is relative to the mount's prefix, without a leading slash; the root is ``""``.  The S3
key of a file is ``prefix + path`` and of a directory marker ``prefix + path + "/"``.  Inodes
live while the kernel holds a lookup reference or a file is open; attributes are refreshed
from S3 after ``attr_ttl`` seconds (close-to-open: an ``open`` always revalidates).

Directory listings are remembered for ``dir_ttl`` seconds when they are small enough
(``MAX_CACHED_ENTRIES``), which answers negative lookups (``create`` of a new name) without a
request (and a directory whose lookups keep finding nothing is listed again when its listing
expires); a larger directory is always streamed and never held whole in memory.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyfuse3

from s3ssefs.errors import FsError
from s3ssefs.keys import Key
from s3ssefs.meta import Attrs

if TYPE_CHECKING:
    from s3ssefs.files import FileData

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
MAX_CACHED_ENTRIES = 20_000
NAME_MAX = 255
# names removed here remembered with their stamp(), for a LIST asked before and answered
# after a removal (InodeTable.removed_since): LISTs in flight are few, and short
REMOVED_NAMES = 4096

_stamps = itertools.count(1)


def stamp() -> int:
    """A number above every one handed out before.  Taken when a HEAD or LIST is asked and
    when this mount changes an object (:attr:`Node.changed`): an answer asked before the
    change arrives older than what the mount knows (a LIST sent before an append's upload,
    answered after it) and must not undo it."""
    return next(_stamps)


@dataclass(slots=True)
class Node:
    """One file, directory, symlink or special file the kernel knows by number."""

    ino: int
    path: str
    attrs: Attrs
    fetched: float = 0.0  # monotonic time attrs came from S3 (0: never / must revalidate)
    lookups: int = 0
    etag: str = ""
    version_id: str | None = None
    sse_key: Key | None = None
    locked: bool = False  # exists, but no key opens it: listable, not readable
    has_marker: bool = False  # directory with a "path/" object (vs implied by its children)
    remote: bool = True  # an object exists in S3 for it (False: created here, not yet flushed)
    just_probed: bool = False  # a lookup read it from S3 for the open that follows
    link_target: bytes | None = None
    data: FileData | None = None  # shared state of the open handles
    # (etag, size) of the content the kernel may still hold pages of from the last open:
    # an open that finds the object unchanged lets the kernel keep them (see FS.open)
    page_id: tuple[str, int] | None = None
    open_count: int = 0
    metadata: dict[str, str] = field(default_factory=dict)  # foreign x-amz-meta-* to keep
    unlinked: bool = False  # no name leads to it any more (st_nlink 0 while it is open)
    # LastModified its last HEAD said (None: unknown, as after a write from here)
    server_mtime: float | None = None
    # (etag, size, LastModified) of the listing the metadata index last kept it with
    indexed: tuple[str, int, float] | None = None
    # stamp() of this mount's last change of its object: answers asked before say less
    changed: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.attrs.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.attrs.mode)

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    def entry(self, ttl: float) -> pyfuse3.EntryAttributes:
        a = self.attrs
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.ino
        e.generation = 0
        e.entry_timeout = ttl
        e.attr_timeout = ttl
        e.st_mode = a.mode
        # a directory's link count is not known without listing it: 1, as btrfs and many
        # FUSE file systems say, which tells find (fts) not to count on it
        e.st_nlink = 0 if self.unlinked else 1
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        size = self.data.size if self.data is not None else a.size
        e.st_size = size
        e.st_blksize = 1 << 20
        e.st_blocks = (size + 511) // 512
        e.st_atime_ns = a.mtime_ns if a.atime_ns is None else a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e


@dataclass(slots=True)
class Listing:
    """A directory's children as last listed: name → (is_dir, size, etag, mtime)."""

    entries: dict[str, tuple[bool, int, str, float]]
    fetched: float
    asked: int = 0  # stamp() of when the LIST was asked (see Node.changed)
    # lookups in the directory that found nothing (from this listing, or from S3 once it had
    # expired): what pays for listing it again (Filesystem._listing)
    misses: int = 0


def check_name(name: bytes) -> str:
    """A FUSE name → our str path component, or ENAMETOOLONG / EINVAL."""
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, "name too long")
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        # S3 keys are UTF-8: a name that is not cannot be stored
        raise FsError(errno.EINVAL, "name is not valid UTF-8") from None
    return text


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class InodeTable:
    def __init__(self, root_attrs: Attrs) -> None:
        self._next = ROOT + 1
        self.by_ino: dict[int, Node] = {}
        self.by_path: dict[str, Node] = {}
        self.listings: dict[str, Listing] = {}
        self._removed: OrderedDict[str, int] = OrderedDict()  # path → stamp() of its removal
        root = Node(ino=ROOT, path="", attrs=root_attrs, fetched=float("inf"))
        root.lookups = 1
        self._add(root)

    def _add(self, node: Node) -> None:
        self.by_ino[node.ino] = node
        self.by_path[node.path] = node

    def get(self, ino: int) -> Node:
        node = self.by_ino.get(ino)
        if node is None:
            raise FsError(errno.ENOENT, f"stale inode {ino}")
        return node

    def find(self, path: str) -> Node | None:
        return self.by_path.get(path)

    def create(self, path: str, attrs: Attrs, **kw: object) -> Node:
        """A node for ``path``; an existing node for that path is replaced (and unlinked)."""
        old = self.by_path.get(path)
        if old is not None:
            self.detach(old)
        node = Node(ino=self._next, path=path, attrs=attrs, **kw)  # type: ignore[arg-type]
        self._next += 1
        self._add(node)
        return node

    def detach(self, node: Node) -> None:
        """The path no longer names this node (unlink, replaced by rename); the inode lives on
        while the kernel or an open handle still refers to it."""
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]
        node.unlinked = True
        self._maybe_drop(node)

    def forget(self, ino: int, n: int) -> None:
        node = self.by_ino.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups = max(0, node.lookups - n)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups > 0 or node.open_count > 0 or node.ino == ROOT:
            return
        if node.data is not None and node.data.dirty:
            return  # failed upload still waiting to be retried
        self.by_ino.pop(node.ino, None)
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]

    def move(self, node: Node, new_path: str) -> None:
        """Rename ``node`` (and, for a directory, every known node below it)."""
        old_path = node.path
        target = self.by_path.get(new_path)
        if target is not None and target is not node:
            self.detach(target)
        moves = [node]
        if node.is_dir:
            pre = old_path + "/"
            moves += [n for p, n in self.by_path.items() if p.startswith(pre)]
        for n in moves:
            if self.by_path.get(n.path) is n:
                del self.by_path[n.path]
        for n in moves:
            n.path = new_path + n.path[len(old_path):]
            self.by_path[n.path] = n
        self.invalidate_listing(old_path)
        self.invalidate_listing(new_path)

    # ------------------------------------------------------------------ listing cache
    def listing(self, dir_path: str, ttl: float) -> Listing | None:
        lst = self.listings.get(dir_path)
        if lst is None or time.monotonic() - lst.fetched > ttl:
            return None
        return lst

    def remember_listing(self, dir_path: str, entries: dict[str, tuple[bool, int, str, float]],
                         asked: int) -> None:
        if len(entries) <= MAX_CACHED_ENTRIES:
            self.listings[dir_path] = Listing(entries, time.monotonic(), asked)

    def missed(self, dir_path: str) -> None:
        """A lookup in ``dir_path`` found nothing: counted on its listing, kept expired (and
        empty) just for that when there is none."""
        lst = self.listings.get(dir_path)
        if lst is None:
            lst = self.listings[dir_path] = Listing({}, -math.inf)
        lst.misses += 1

    def listing_add(self, path: str, is_dir: bool, size: int = 0) -> None:
        parent, _, name = path.rpartition("/")
        lst = self.listings.get(parent)
        if lst is not None:
            lst.entries[name] = (is_dir, size, "", time.time())

    def listing_remove(self, path: str) -> None:
        """``path`` names nothing any more (removed, renamed away, found gone)."""
        parent, _, name = path.rpartition("/")
        lst = self.listings.get(parent)
        if lst is not None:
            lst.entries.pop(name, None)
        self._removed.pop(path, None)
        self._removed[path] = stamp()
        while len(self._removed) > REMOVED_NAMES:
            self._removed.popitem(last=False)

    def removed_since(self, path: str, asked: int) -> bool:
        """Whether ``path`` was removed here after a LIST asked at ``asked``, which may then
        still show it."""
        return self._removed.get(path, 0) > asked

    def invalidate_listing(self, path: str) -> None:
        """Forget the listings of ``path``, its parent, and every directory below it."""
        parent = path.rpartition("/")[0]
        self.listings.pop(parent, None)
        pre = path + "/"
        for p in [p for p in self.listings if p == path or p.startswith(pre)]:
            del self.listings[p]
