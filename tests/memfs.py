"""The mount's file layer (:class:`s3ssefs.fs.Filesystem` and all below it) on a
:class:`~memstore.MemStore`, driven by calling its pyfuse3 operations directly: no kernel, no
server, no daemon.  What the daemon builds in ``Mount.__init__`` is built here the same way,
with small blocks and parts so that spilling, multipart uploads and readahead happen with
kilobytes instead of megabytes.

The kernel's part is played by the test: ``lookup`` before ``open``, one ``release`` per
``open``/``create``, ``flush`` at every ``close()``; a request context is a stand-in with the
fields the operations read (uid, gid, pid, umask).
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import trio
import trio.testing
from memstore import MemStore

from s3ssefs.blocks import BlockSource
from s3ssefs.cache import BlockCache
from s3ssefs.config import MountConfig
from s3ssefs.crypto import LocalCipher
from s3ssefs.files import Ctx
from s3ssefs.fs import Filesystem
from s3ssefs.inodes import ROOT
from s3ssefs.keyring import KeyRing
from s3ssefs.keys import Key, KeyFile
from s3ssefs.view import LiveView

BS = 4096  # block size of the fast tests
PS = 4 * BS  # part size: a part is four blocks, memory holds six per file
CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)


def setattr_fields(**on: bool) -> Any:
    """A stand-in for pyfuse3.SetattrFields (whose attributes cannot be set from Python)."""
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
             "update_gid", "update_size")
    return SimpleNamespace(**{n: on.get(n, False) for n in names})


@dataclass
class Sizes:
    block: int = BS
    part: int = PS
    threshold: int = PS
    cache: int = 64 * BS


class MemFs:
    """One 'mount' of a MemStore: a Filesystem with its key ring, caches and spill."""

    def __init__(self, store: MemStore, key: Key, state: Path, nursery: trio.Nursery,
                 sizes: Sizes | None = None, old_keys: tuple[Key, ...] = (), **cfg: Any,
                 ) -> None:
        self.store = store
        self.sizes = sizes or Sizes()
        state.mkdir(parents=True, exist_ok=True)
        # ``key`` writes; ``old_keys`` (a rotation's earlier keys) still read
        kf = KeyFile({k.id: k for k in (*old_keys, key)}, key.id)
        self.cfg = MountConfig(bucket=store.bucket, keyfile=state / "unused", **cfg)
        store.cfg = self.cfg  # as ObjectStore holds the mount's configuration
        cipher = LocalCipher()
        (state / "spill").mkdir(exist_ok=True)
        self.cache = BlockCache(state / "blocks", self.sizes.cache, cipher)
        self.keyring = KeyRing(kf, store, state)  # type: ignore[arg-type]
        source = BlockSource(store, self.cache, self.sizes.block, store.stats)  # type: ignore[arg-type]
        self.ctx = Ctx(store=store, source=source, cipher=cipher,  # type: ignore[arg-type]
                       spill_dir=state / "spill", block_size=self.sizes.block,
                       part_size=self.sizes.part, multipart_threshold=self.sizes.threshold,
                       s3key=str, write_key=lambda: None, metadata=lambda n: {},
                       stats=store.stats)
        self.ctx.nursery = source.nursery = nursery
        self.fs = Filesystem(self.cfg, store, self.keyring, self.ctx,  # type: ignore[arg-type]
                             LiveView(store, self.keyring))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ as the kernel asks
    async def ino(self, path: str) -> int:
        """The inode of ``path`` ('a/b'), looked up name by name as the kernel does."""
        ino = ROOT
        for name in [p for p in path.split("/") if p]:
            e = await self.fs.lookup(ino, name.encode(), CTX)
            if e.st_ino == 0:
                raise pyfuse3.FUSEError(2)
            ino = e.st_ino
        return ino

    async def _parent(self, path: str) -> tuple[int, bytes]:
        d, _, name = path.rpartition("/")
        return await self.ino(d), name.encode()

    async def create(self, path: str, mode: int = 0o644) -> int:
        parent, name = await self._parent(path)
        fi, _ = await self.fs.create(parent, name, mode, os.O_RDWR | os.O_CREAT, CTX)
        return fi.fh

    async def open(self, path: str, flags: int = os.O_RDWR) -> int:
        fi = await self.fs.open(await self.ino(path), flags, CTX)
        return fi.fh

    async def close(self, fh: int) -> None:
        """close(): flush (EIO reaches the program), then release (always)."""
        try:
            await self.fs.flush(fh)
        finally:
            await self.fs.release(fh)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(await self.fs.read(fh, off, size))

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await self.fs.write(fh, off, data)

    async def truncate(self, path: str, size: int, fh: int | None = None) -> None:
        attr = pyfuse3.EntryAttributes()
        attr.st_size = size
        await self.fs.setattr(await self.ino(path), attr, setattr_fields(update_size=True), fh,
                              CTX)

    async def size(self, path: str) -> int:
        return (await self.fs.getattr(await self.ino(path), CTX)).st_size

    async def exists(self, path: str) -> bool:
        parent, name = await self._parent(path)
        return (await self.fs.lookup(parent, name, CTX)).st_ino != 0

    async def is_file(self, path: str) -> bool:
        e = await self.fs.getattr(await self.ino(path), CTX)
        return stat.S_ISREG(e.st_mode)

    async def chmod(self, path: str, mode: int) -> None:
        attr = pyfuse3.EntryAttributes()
        attr.st_mode = mode
        await self.fs.setattr(await self.ino(path), attr, setattr_fields(update_mode=True),
                              None, CTX)

    async def mode(self, path: str) -> int:
        return stat.S_IMODE((await self.fs.getattr(await self.ino(path), CTX)).st_mode)

    async def setxattr(self, path: str, name: bytes, value: bytes) -> None:
        await self.fs.setxattr(await self.ino(path), name, value, CTX)

    async def getxattr(self, path: str, name: bytes) -> bytes:
        return await self.fs.getxattr(await self.ino(path), name, CTX)

    async def removexattr(self, path: str, name: bytes) -> None:
        await self.fs.removexattr(await self.ino(path), name, CTX)

    async def user_xattrs(self, path: str) -> dict[bytes, bytes]:
        """The user.* attributes a program can set, as listxattr and getxattr show them."""
        ino = await self.ino(path)
        names = [n for n in await self.fs.listxattr(ino, CTX)
                 if not n.startswith(b"user.s3ssefs.")]
        return {n: await self.fs.getxattr(ino, n, CTX) for n in names}

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        op, on = await self._parent(old)
        np, nn = await self._parent(new)
        await self.fs.rename(op, on, np, nn, flags, CTX)

    async def unlink(self, path: str) -> None:
        parent, name = await self._parent(path)
        await self.fs.unlink(parent, name, CTX)

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name = await self._parent(path)
        await self.fs.mkdir(parent, name, mode, CTX)

    async def names(self, path: str = "") -> list[str]:
        """A directory's entries as readdir would list them (without . and ..)."""
        node = self.fs.inodes.get(await self.ino(path))
        return sorted([name async for name, _ in self.fs._entries(node)])

    async def listed_sizes(self, path: str = "") -> dict[str, int]:
        """A directory's entries with the size readdirplus would tell the kernel of each."""
        node = self.fs.inodes.get(await self.ino(path))
        return {name: n.entry(self.fs.ttl).st_size async for name, n in self.fs._entries(node)}

    async def whole(self, path: str) -> bytes:
        fh = await self.open(path, os.O_RDONLY)
        try:
            out = bytearray()
            while chunk := await self.read(fh, len(out), 3 * BS + 5):
                out += chunk
            return bytes(out)
        finally:
            await self.close(fh)

    async def put_file(self, path: str, data: bytes, chunk: int = BS) -> None:
        fh = await self.create(path)
        try:
            for off in range(0, len(data), chunk):
                await self.write(fh, off, data[off:off + chunk])
        finally:
            await self.close(fh)

    async def unmount(self) -> list[str]:
        """What umount does: upload every dirty file; the paths that could not be."""
        return await self.fs.flush_all()


async def settle(deadline: float = 30) -> None:
    """Until every task waits for something other than a worker thread (a spill or cache
    write in a thread is work going on, which ``wait_all_tasks_blocked`` alone counts as
    waiting).  A deadline, not a sleep: a test that looks at a state in which nothing can
    move any more."""
    threads = trio.to_thread.current_default_thread_limiter()
    with trio.fail_after(deadline):
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if threads.borrowed_tokens == 0:
                await trio.testing.wait_all_tasks_blocked()
                if threads.borrowed_tokens == 0:
                    return
            await trio.sleep(0.001)  # a thread is still at work: let it hand back


@asynccontextmanager
async def memfs(store: MemStore, key: Key, state: Path, **kw: Any) -> AsyncIterator[MemFs]:
    """A MemFs with its background tasks (part uploads, readahead) in a nursery that ends
    with it."""
    async with trio.open_nursery() as nursery:
        m = MemFs(store, key, state, nursery, **kw)
        try:
            yield m
        finally:
            nursery.cancel_scope.cancel()
