"""Layer 3: the mount's file layer against a reference model, driven by hypothesis.

A :class:`RuleBasedStateMachine` opens, creates, writes, reads, truncates, renames, removes,
fsyncs and closes files, makes, renames and removes directories, through the mount's own FUSE
operations (on the in-memory store of :mod:`memstore`, no kernel), remounts, and checks every
read and every listing against a plain model: a dict of names to contents, open handles
pointing at a content (so a file renamed or removed while open, or whose directory is
renamed, goes on reading and writing through its handles, as POSIX says).  After every step, each
file that no handle holds open is in the bucket exactly as the model has it (close-to-open),
and the bucket holds no object the model does not.  This is how mountpoint-s3 checks its
file system against a reference model; hypothesis shrinks any failure to a short sequence of
calls.

Variants: with S3's minimum part size (AWS), with uploads that fail at close (EIO, the
data kept and sent by a later close, fsync or umount), and with less memory for the blocks
being written than one file alone would keep.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import pytest
import trio
from conftest import new_key
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from memfs import BS, PS, MemFs
from memstore import MemStore, Server

from s3ssefs.files import WriteMemory

T = TypeVar("T")
NAMES = ["a", "b", "c", "d/x", "d/y", "e/x"]
DIRS = ["d", "e"]
XATTR_NAMES = [b"user.a", b"user.tag.b"]
MAX_HANDLES = 4
UPLOADS = ("put", "create_multipart", "upload_part", "complete_multipart", "copy",
           "upload_part_copy")


class TrioThread:
    """A trio run in a thread of its own, kept across the machine's steps (the mount's
    background tasks live in its nursery); each step runs one call in it."""

    def __init__(self) -> None:
        ready = threading.Event()
        self.error: BaseException | None = None

        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as n:
                self.nursery = n
                ready.set()
                await trio.sleep_forever()

        def run() -> None:
            try:
                trio.run(main)
            except BaseException as e:  # seen by stop()
                self.error = e

        self.thread = threading.Thread(target=run, name="model-trio", daemon=True)
        self.thread.start()
        ready.wait(30)

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def stop(self) -> None:
        trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self.token)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the mount's tasks did not end"
        if self.error is not None:
            raise self.error


@dataclass(eq=False)
class Content:
    """What one file holds (shared by its name and its open handles)."""

    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o644
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    dirty: bool = True  # changed since the bucket last had it
    pending: bool = False  # a close failed: the bucket may lag until a later upload


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class FileLayer(RuleBasedStateMachine):
    server = Server()
    faults = False
    write_memory: int | None = None  # blocks all open files may hold (None: the mount's)

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="s3ssefs-model-"))
        self.key = new_key("k1")  # the log check looks for it in every log line
        self.store = MemStore(server=self.server)
        self.loop = TrioThread()
        self.mounts = 0
        self.m = self._mount()
        self.names: dict[str, Content] = {}
        self.handles: dict[int, tuple[Content, bool]] = {}  # fh -> (content, opened to write)
        self.dirs = {"d"}
        self.call(self.m.mkdir, "d")

    def _mount(self) -> MemFs:
        self.mounts += 1
        m = MemFs(self.store, self.key, self.tmp / f"mount{self.mounts}", self.loop.nursery)
        if self.write_memory is not None:  # before any file takes its share of it
            m.ctx.write_memory = WriteMemory(self.write_memory)
        return m

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.loop.run(fn, *args)

    def teardown(self) -> None:
        try:
            self.loop.stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _errno(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> int:
        try:
            self.call(fn, *args)
        except pyfuse3.FUSEError as e:
            return e.errno
        return 0

    def _handle(self, i: int) -> int:
        return sorted(self.handles)[i % len(self.handles)]

    def _name_of(self, c: Content) -> str | None:
        return next((n for n, x in self.names.items() if x is c), None)

    def _uploaded(self, c: Content) -> None:
        c.dirty = c.pending = False

    def _parent_exists(self, name: str) -> bool:
        return "/" not in name or name.split("/")[0] in self.dirs

    # ------------------------------------------------------------------ files
    @precondition(lambda self: len(self.handles) < MAX_HANDLES)
    @rule(name=st.sampled_from(NAMES))
    def create(self, name: str) -> None:
        if name in self.names:  # open(O_CREAT) of an existing file opens it
            return self.open(name, write=True, trunc=False)
        if not self._parent_exists(name):
            assert self._errno(self.m.create, name) == errno.ENOENT
            return
        fh = self.call(self.m.create, name)
        self.names[name] = c = Content()
        self.handles[fh] = (c, True)

    @precondition(lambda self: len(self.handles) < MAX_HANDLES)
    @rule(name=st.sampled_from(NAMES), write=st.booleans(), trunc=st.booleans())
    def open(self, name: str, write: bool, trunc: bool) -> None:
        flags = (os.O_RDWR | (os.O_TRUNC if trunc else 0)) if write else os.O_RDONLY
        if name not in self.names:
            assert self._errno(self.m.open, name, flags) == errno.ENOENT
            return
        fh = self.call(self.m.open, name, flags)
        c = self.names[name]
        if write and trunc and c.data:
            c.data.clear()
            c.dirty = True
        self.handles[fh] = (c, write)

    @precondition(lambda self: any(w for _, w in self.handles.values()))
    @rule(i=st.integers(0, 7),
          off=st.one_of(st.integers(0, 24 * BS), st.integers(0, 24).map(lambda b: b * BS)),
          n=st.one_of(st.integers(1, 3 * BS), st.sampled_from([BS, 2 * BS, PS])),
          seed=st.integers(0, 1 << 16))
    def write(self, i: int, off: int, n: int, seed: int) -> None:
        writers = sorted(fh for fh, (_, w) in self.handles.items() if w)
        fh = writers[i % len(writers)]
        c = self.handles[fh][0]
        off = min(off, len(c.data) + 2 * BS)  # holes, but not far past the end
        buf = _bytes(n, seed)
        assert self.call(self.m.write, fh, off, buf) == n
        if len(c.data) < off:
            c.data.extend(bytes(off - len(c.data)))
        c.data[off:off + n] = buf
        c.dirty = True

    @precondition(lambda self: any(w for _, w in self.handles.values()))
    @rule(i=st.integers(0, 7), blocks=st.integers(1, 2 * PS // BS), seed=st.integers(0, 99))
    def append(self, i: int, blocks: int, seed: int) -> None:
        """Whole blocks at the end, as cp and dd write: parts leave while it is written."""
        writers = sorted(fh for fh, (_, w) in self.handles.items() if w)
        fh = writers[i % len(writers)]
        c = self.handles[fh][0]
        if len(c.data) > 24 * BS:
            return
        for k in range(blocks):
            self.write(i, len(c.data), BS, seed + k)

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), off=st.integers(0, 32 * BS), n=st.integers(1, 4 * BS))
    def read(self, i: int, off: int, n: int) -> None:
        fh = self._handle(i)
        c = self.handles[fh][0]
        off = min(off, len(c.data) + BS)
        assert self.call(self.m.read, fh, off, n) == bytes(c.data[off:off + n])

    @precondition(lambda self: any(w for _, w in self.handles.values()))
    @rule(i=st.integers(0, 7), size=st.integers(0, 30 * BS))
    def truncate_open(self, i: int, size: int) -> None:
        writers = sorted(fh for fh, (_, w) in self.handles.items() if w)
        fh = writers[i % len(writers)]
        c = self.handles[fh][0]
        name = self._name_of(c)
        if name is None:
            return  # ftruncate of a removed file: the kernel has no name to ask with
        self.call(self.m.truncate, name, size, fh)
        self._resize(c, size)
        c.dirty = True

    @rule(name=st.sampled_from(NAMES), size=st.integers(0, 30 * BS))
    def truncate_closed(self, name: str, size: int) -> None:
        c = self.names.get(name)
        if c is None:
            assert self._errno(self.m.truncate, name, size) == errno.ENOENT
            return
        if any(x is c for x, _ in self.handles.values()):
            return  # see truncate_open
        if self.faults and c.pending:
            return  # its kept data would be uploaded (or fail) here: see close_failing
        self.call(self.m.truncate, name, size)
        self._resize(c, size)
        self._uploaded(c)  # truncate of a closed file uploads it at once

    @staticmethod
    def _resize(c: Content, size: int) -> None:
        if size < len(c.data):
            del c.data[size:]
        else:
            c.data.extend(bytes(size - len(c.data)))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7))
    def fsync(self, i: int) -> None:
        fh = self._handle(i)
        c = self.handles[fh][0]
        self.call(self.m.fs.fsync, fh, False)
        name = self._name_of(c)
        if name is not None:
            self._uploaded(c)
            assert self.store.objects[name].data == c.data

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7))
    def close(self, i: int) -> None:
        fh = self._handle(i)
        c, writer = self.handles.pop(fh)
        self.call(self.m.close, fh)
        if writer and self._name_of(c) is not None:
            self._uploaded(c)

    @precondition(lambda self: self.faults and any(w for _, w in self.handles.values()))
    @rule(i=st.integers(0, 7), op=st.sampled_from(UPLOADS))
    def close_failing(self, i: int, op: str) -> None:
        """The server refuses uploads while this handle closes: EIO if there was anything
        to upload, and the data stays for a later close, fsync or umount."""
        writers = sorted(fh for fh, (_, w) in self.handles.items() if w)
        fh = writers[i % len(writers)]
        c = self.handles.pop(fh)[0]
        linked = self._name_of(c) is not None
        for o in UPLOADS:
            self.store.fail(o, count=1 << 30)
        try:
            got = self._errno(self.m.close, fh)
        finally:
            self.store._faults.clear()
        if linked and c.dirty:
            assert got == errno.EIO
            c.pending = True
        else:
            assert got == 0

    @rule(name=st.sampled_from(NAMES))
    def read_whole(self, name: str) -> None:
        """open, read to the end, close: as ``cat`` does (and a reopen, close-to-open)."""
        if len(self.handles) >= MAX_HANDLES:
            return
        c = self.names.get(name)
        if c is None:
            assert self._errno(self.m.whole, name) == errno.ENOENT
            return
        assert self.call(self.m.whole, name) == bytes(c.data)

    # ------------------------------------------------------------------ metadata
    @rule(name=st.sampled_from(NAMES), mode=st.integers(0o400, 0o777))
    def chmod(self, name: str, mode: int) -> None:
        c = self.names.get(name)
        if c is None:
            assert self._errno(self.m.chmod, name, mode) == errno.ENOENT
            return
        self.call(self.m.chmod, name, mode)
        c.mode = mode
        assert self.call(self.m.mode, name) == mode

    @rule(name=st.sampled_from(NAMES), attr=st.sampled_from(XATTR_NAMES),
          value=st.binary(max_size=24))
    def setxattr(self, name: str, attr: bytes, value: bytes) -> None:
        c = self.names.get(name)
        if c is None:
            assert self._errno(self.m.setxattr, name, attr, value) == errno.ENOENT
            return
        self.call(self.m.setxattr, name, attr, value)
        c.xattrs[attr] = value

    @rule(name=st.sampled_from(NAMES), attr=st.sampled_from(XATTR_NAMES))
    def removexattr(self, name: str, attr: bytes) -> None:
        c = self.names.get(name)
        if c is None:
            assert self._errno(self.m.removexattr, name, attr) == errno.ENOENT
            return
        got = self._errno(self.m.removexattr, name, attr)
        if attr in c.xattrs:
            assert got == 0, got
            del c.xattrs[attr]
        else:
            assert got == pyfuse3.ENOATTR, got

    @rule(name=st.sampled_from(NAMES))
    def getxattrs(self, name: str) -> None:
        c = self.names.get(name)
        if c is not None:
            assert self.call(self.m.user_xattrs, name) == c.xattrs

    # ------------------------------------------------------------------ names
    @rule(old=st.sampled_from(NAMES), new=st.sampled_from(NAMES))
    def rename(self, old: str, new: str) -> None:
        if old not in self.names:
            assert self._errno(self.m.rename, old, new) == errno.ENOENT
            return
        if not self._parent_exists(new):
            assert self._errno(self.m.rename, old, new) == errno.ENOENT
            return
        c = self.names[old]
        target = self.names.get(new)
        if self.faults and (c.pending or (target is not None and target.pending)):
            return  # would upload kept data now: covered by close, fsync and umount
        self.call(self.m.rename, old, new)
        if old != new:
            self.names[new] = self.names.pop(old)
            self._uploaded(c)  # renamed: uploaded under the new name (dirty) or copied

    @rule(name=st.sampled_from(NAMES))
    def unlink(self, name: str) -> None:
        if name not in self.names:
            assert self._errno(self.m.unlink, name) == errno.ENOENT
            return
        self.call(self.m.unlink, name)
        del self.names[name]

    @rule()
    def listdir(self) -> None:
        assert self.call(self.m.names, "") == sorted(
            {n for n in self.names if "/" not in n} | self.dirs)
        for d in self.dirs:
            assert self.call(self.m.names, d) == self._files_in(d)

    def _files_in(self, d: str) -> list[str]:
        return sorted(n[len(d) + 1:] for n in self.names if n.startswith(d + "/"))

    # ------------------------------------------------------------------ directories
    @rule(d=st.sampled_from(DIRS))
    def mkdir(self, d: str) -> None:
        if d in self.dirs:
            return  # the kernel answers EEXIST from its lookup, never asking
        self.call(self.m.mkdir, d)
        self.dirs.add(d)

    @rule(d=st.sampled_from(DIRS))
    def rmdir(self, d: str) -> None:
        got = self._errno(self._rmdir, d.encode())
        if d not in self.dirs:
            assert got == errno.ENOENT, got
        elif self._files_in(d):
            assert got == errno.ENOTEMPTY, got
        else:
            assert got == 0, got
            self.dirs.discard(d)

    async def _rmdir(self, name: bytes) -> None:
        await self.m.fs.rmdir(pyfuse3.ROOT_INODE, name, None)

    @rule(src=st.sampled_from(DIRS), dst=st.sampled_from(DIRS))
    def rename_dir(self, src: str, dst: str) -> None:
        """A directory renamed (its objects copied and deleted), with files in it open or
        not: every file reads the same under its new name, handles go on working."""
        if src not in self.dirs:
            assert self._errno(self.m.rename, src, dst) == errno.ENOENT
            return
        moving = [n for n in self.names if n.startswith(src + "/")]
        if self.faults and any(self.names[n].pending for n in moving):
            return  # would upload kept data now: covered by close, fsync and umount
        if src != dst and dst in self.dirs and self._files_in(dst):
            assert self._errno(self.m.rename, src, dst) == errno.ENOTEMPTY
            return
        self.call(self.m.rename, src, dst)
        if src == dst:
            return
        self.dirs.discard(src)
        self.dirs.add(dst)
        for n in moving:
            c = self.names.pop(n)
            self.names[dst + n[len(src):]] = c
            self._uploaded(c)  # dirty files are uploaded before the move

    @precondition(lambda self: not self.handles)
    @rule()
    def remount(self) -> None:
        """umount (every kept upload is sent) and mount again, with empty caches."""
        assert self.call(self.m.unmount) == []
        for c in self.names.values():
            self._uploaded(c)
        self.m = self._mount()
        for name, c in self.names.items():
            assert self.call(self.m.whole, name) == bytes(c.data)
            assert self.call(self.m.mode, name) == c.mode
            assert self.call(self.m.user_xattrs, name) == c.xattrs

    # ------------------------------------------------------------------ what always holds
    @invariant()
    def closed_files_are_in_the_bucket_as_written(self) -> None:
        held = {id(c) for c, _ in self.handles.values()}
        for name, c in self.names.items():
            if id(c) not in held and not c.pending:
                obj = self.store.objects.get(name)
                assert obj is not None, f"{name} is not in the bucket"
                assert obj.data == c.data, f"{name} differs in the bucket"
        extra = set(self.store.objects) - set(self.names) - {d + "/" for d in self.dirs}
        assert not extra, f"objects the model does not have: {extra}"


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class AwsFileLayer(FileLayer):
    """A server that refuses a part below its minimum but the last (AWS; here a part)."""

    server = Server(name="aws", min_part=PS)


class FailingFileLayer(FileLayer):
    faults = True


class TightFileLayer(FileLayer):
    """Open files hold fewer blocks between them than one file alone would: writers give
    up their oldest blocks to the spill, or to parts on their way."""

    write_memory = 5


TestFileLayer = FileLayer.TestCase
TestFileLayer.settings = SETTINGS
TestFileLayerOnAws = AwsFileLayer.TestCase
TestFileLayerOnAws.settings = settings(SETTINGS, max_examples=25)
TestFileLayerWithFailingUploads = pytest.mark.allow_warnings(FailingFileLayer.TestCase)
TestFileLayerWithFailingUploads.settings = settings(SETTINGS, max_examples=40)
TestFileLayerInTightMemory = TightFileLayer.TestCase
TestFileLayerInTightMemory.settings = settings(SETTINGS, max_examples=30)
