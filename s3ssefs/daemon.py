"""The mount's lifecycle: checks before mounting, the trio main loop, signals, the control
socket, sd_notify, and a clean unmount that flushes first.

Everything that can make a mount useless is checked *before* the kernel sees it (key file,
bucket, credentials, endpoint, SSE-C blocked on the bucket), so a bad mount fails with one
line and a non-zero exit instead of a mount point that answers EIO.  SIGTERM, SIGINT and
``s3ssefs umount`` all flush every dirty file and then unmount; if some file cannot be
uploaded, ``umount`` reports it and the mount stays so nothing is lost.

A running mount registers itself in the runtime directory (:mod:`s3ssefs.runtime`) with a
unix socket (mode 0600) that answers ``stats``, ``info`` and ``umount``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import resource
import select
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from s3ssefs import workers
from s3ssefs.blocks import BlockSource
from s3ssefs.cache import BlockCache
from s3ssefs.config import MountConfig
from s3ssefs.crypto import LocalCipher
from s3ssefs.errors import FsError, MountError
from s3ssefs.files import Ctx
from s3ssefs.fs import Filesystem
from s3ssefs.keyring import KeyRing, load_keyfile
from s3ssefs.keys import Key, KeyFile
from s3ssefs.logsetup import escape_controls, syslog_available
from s3ssefs.metaindex import open_index, scope_of
from s3ssefs.pages import KernelPages
from s3ssefs.recovery import journals, recover
from s3ssefs.runtime import (
    Refused,
    check_runtime_dir,
    control,
    mount_id,
    registry_path,
    write_private,
)
from s3ssefs.spill import sweep
from s3ssefs.stats import Stats
from s3ssefs.store import ObjectStore
from s3ssefs.view import AsOfView, LiveView

log = logging.getLogger(__name__)
PR_SET_DUMPABLE = 4
RELEASE_GRACE = 2.0  # seconds umount waits for the RELEASE of files just closed


def harden_process() -> None:
    """No core dumps (they would hold keys and plaintext), no ptrace by other users."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt()
MALLOC_KEEP = 64 << 20
MALLOC_MMAP_FROM = 32 << 20
MALLOC_ARENAS = 2


def tune_malloc() -> None:
    """Let glibc reuse freed megabyte buffers instead of handing them back to the kernel.

    Every GET body is a fresh multi-megabyte buffer.  With glibc's defaults most come from new
    mappings or from heap space just trimmed, and the kernel then faults in (and zeroes) each
    4 KiB page.  Serving buffers up to MALLOC_MMAP_FROM from the heaps and keeping up to
    MALLOC_KEEP free at the top of each avoids about half of those faults.  Two arenas, not
    one per thread: with the GIL there is little to contend for, and many arenas each keeping
    MALLOC_KEEP raise the peak RSS of a large read far more than they save.  Not glibc:
    nothing to do.  (Figures in docs/benchmarks.md.)
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
        libc.mallopt(M_TRIM_THRESHOLD, MALLOC_KEEP)
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_FROM)


def default_cache_dir() -> Path:
    env = os.environ.get("CACHE_DIRECTORY")  # systemd's CacheDirectory=
    if env:
        return Path(env.split(":")[0])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "s3ssefs"


def background_log_file(cfg: MountConfig) -> Path | None:
    """Where a daemon in the background logs: the log_file option; else the system log
    (None); else, when no syslog listens on /dev/log, ``daemon.log`` in the mount's
    directory of the cache (made here, mode 0700, as :class:`Mount` makes it)."""
    if cfg.log_file is not None:
        return cfg.log_file
    if syslog_available():
        return None
    assert cfg.mountpoint is not None
    state = (cfg.cache_dir or default_cache_dir()).expanduser() / mount_id(cfg.mountpoint)
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise MountError(f"cannot create {state} for the daemon's log: {e.strerror}") from None
    return state / "daemon.log"


def sd_notify(message: str) -> None:
    """Send one sd_notify datagram (READY=1, STOPPING=1, STATUS=…) if systemd asked for it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("sd_notify %s failed: %s", message.split("=")[0], e)


def load_keys(cfg: MountConfig) -> KeyFile | None:
    if cfg.sse != "c":
        return None
    assert cfg.keyfile is not None
    return load_keyfile(cfg.keyfile)


async def preflight(store: ObjectStore, cfg: MountConfig, write_key: Key | None) -> None:
    """Fail with one clear line when the bucket cannot be used (``write_key``: the key
    writes use, None without SSE-C)."""
    try:
        await store.check_bucket()
    except FsError as e:
        where = cfg.endpoint or "AWS S3"
        if e.errno == errno.ENOENT:
            raise MountError(f"bucket {cfg.bucket!r} does not exist at {where}") from None
        if e.errno == errno.EACCES:
            raise MountError(f"access to bucket {cfg.bucket!r} refused at {where}: check the "
                             "credentials (profile, credentials_file, AWS_* variables)") from None
        raise MountError(f"cannot reach {where}: {e}") from None
    await store.check_lean_path()
    enc = await store.bucket_encryption()
    if enc:
        for rule in enc.get("Rules", []):
            blocked = rule.get("BlockedEncryptionTypes", {}).get("EncryptionType", [])
            if "SSE-C" in blocked and cfg.sse == "c":
                raise MountError(
                    f"bucket {cfg.bucket!r} blocks SSE-C (BlockedEncryptionTypes); allow it "
                    "with put-bucket-encryption (remove SSE-C from BlockedEncryptionTypes) "
                    "or mount with sse=s3 / sse=kms:KEYID")
            default = rule.get("ApplyServerSideEncryptionByDefault", {})
            if default:
                log.info("bucket default encryption: %s", default.get("SSEAlgorithm"))
    if not cfg.read_only:
        await probe_write(store, cfg, write_key)


async def probe_write(store: ObjectStore, cfg: MountConfig, write_key: Key | None) -> None:
    """The mount's first write, tried now: a server that refuses every write (SSE-C over
    plain HTTP on RGW, a 403, SSE-C blocked) fails the mount with one line, instead of a
    mount whose every close() is EIO (see ObjectStore.probe_write)."""
    try:
        problem = await store.probe_write(write_key)
    except FsError as e:
        hint = ""
        if cfg.sse == "c" and (cfg.endpoint or "").startswith("http://") \
                and e.errno == errno.EACCES:
            hint = ("; the server refuses SSE-C over plain http:// (RGW: "
                    "rgw_crypt_require_ssl): use https")
        elif e.errno == errno.EACCES:
            hint = "; check the credentials' write permission, or mount read_only"
        raise MountError(f"test write with sse={cfg.sse} to bucket {cfg.bucket!r} "
                         f"failed: {e}{hint}") from None
    if problem and cfg.sse == "s3":
        raise MountError("server ignores SSE-S3 (no encryption echoed): objects would be "
                         "stored unencrypted; use sse=c or sse=kms:KEYID")
    if problem:
        raise MountError(f"server did not confirm sse={cfg.sse} on a test write "
                         f"({problem}); objects would not be encrypted as asked")


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.discard("default_permissions")
    # noatime: reads never change an atime; only utimensat sets one (x-amz-meta-atime)
    opts |= {f"fsname=s3ssefs:{cfg.bucket_path}", "subtype=s3ssefs", "default_permissions",
             "noatime"}
    if cfg.allow_other:
        opts.add("allow_other")
    if cfg.read_only:
        opts.add("ro")
    return opts


def _unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def set_kernel_readahead(mountpoint: Path, size: int) -> None:
    """Ask the kernel to read ahead ``size`` bytes on this mount.

    A FUSE mount's backing device starts with the kernel's 128 KiB readahead, so a sequential
    reader reaches us as 128 KiB requests, one or two at a time; at 1 MiB the kernel sends
    1 MiB requests (the FUSE maximum) and keeps several in flight, which doubled cold
    sequential reads in our measurement.  Only root may change it; otherwise we say so once.
    Called once the mount answers: the FUSE handshake (INIT) caps readahead at what it offered
    (128 KiB), so a value set before it completes is lost.  The device is found in mountinfo.
    """
    if size <= 0:
        return
    dev = None
    target = str(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                    dev = fields[2]  # the last mount there wins: ours is the newest
    except OSError:
        return
    if dev is None:
        return
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{max(4, size >> 10)}\n")
    except OSError as e:
        log.info("kernel readahead left at its default (%s); reads use 128 KiB requests",
                 e.strerror or e)


class Mount:
    """One running mount: the objects, the FUSE session, the control socket."""

    def __init__(self, cfg: MountConfig, keyfile: KeyFile | None) -> None:
        assert cfg.mountpoint is not None
        self.cfg = cfg
        self.mountpoint = cfg.mountpoint.resolve()
        self.id = mount_id(self.mountpoint)  # before mounting: a stat of our own mount deadlocks
        self.stats = Stats()
        self.store = ObjectStore(cfg, self.stats)
        base = (cfg.cache_dir or default_cache_dir()).expanduser()
        self.cache_base = base
        self.state_dir = base / self.id
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        spill_dir = self.state_dir / "spill"
        spill_dir.mkdir(exist_ok=True, mode=0o700)
        # what an earlier mount left and owes nobody goes; journaled spills stay for recovery
        sweep(spill_dir)
        self.cipher = LocalCipher()
        self.cache = BlockCache(self.state_dir / "blocks", cfg.cache_size, self.cipher)
        self.keyring = KeyRing(keyfile, self.store, self.state_dir)
        source = BlockSource(self.store, self.cache, cfg.block_size, self.stats,
                             stream_max=cfg.cache_stream_max,
                             random_ahead=cfg.random_readahead)
        self.ctx = Ctx(store=self.store, source=source, cipher=self.cipher, spill_dir=spill_dir,
                       block_size=cfg.block_size, part_size=cfg.part_size,
                       multipart_threshold=cfg.multipart_threshold, s3key=str,
                       write_key=lambda: None, metadata=lambda n: {}, stats=self.stats)
        view = (AsOfView(self.store, self.keyring, cfg.as_of) if cfg.as_of is not None
                else LiveView(self.store, self.keyring))
        # an as_of view shows old versions, which a HEAD names: no index for it
        self.index = None if cfg.as_of is not None else open_index(
            base, keyfile, scope_of(cfg), cfg.meta_index_size, self.stats)
        self.fs = Filesystem(cfg, self.store, self.keyring, self.ctx, view, self.index)
        self.failed: list[str] = []
        self._stopping = False

    async def _stop(self) -> list[str]:
        """Flush everything; unmount only if nothing is left behind."""
        failed = await self.fs.flush_all()
        if failed:
            log.error("could not upload %d file(s), mount kept: %s; %s", len(failed),
                      ", ".join(failed), self._left_behind())
            return failed
        if not self._stopping:
            self._stopping = True
            sd_notify("STOPPING=1")
            pyfuse3.terminate()
        return []

    def _open_paths(self) -> list[str]:
        return sorted({"/" + n.path for n in self.fs.handles.values()}
                      | {"/" + h.node.path for h in self.fs.dirs.values()})

    async def _umount(self) -> dict[str, Any]:
        """``s3ssefs umount``: flush everything, then unmount unless a program still has a
        file or directory open (as umount(8) refuses a busy filesystem): then the data is
        uploaded and the mount stays."""
        failed = await self.fs.flush_all()
        if failed:
            log.error("could not upload %d file(s), mount kept: %s", len(failed),
                      ", ".join(failed))
            return {"failed": failed, "kept": self.cfg.sse == "c"}
        # a close(2) returns before the kernel's RELEASE reaches us: give those a moment
        with trio.move_on_after(RELEASE_GRACE):
            while self._open_paths():
                await trio.sleep(RELEASE_GRACE / 20)
        busy = self._open_paths()
        if busy:
            log.info("umount refused: %d open: %s", len(busy), ", ".join(busy))
            return {"failed": [], "busy": busy}
        return {"failed": await self._stop(), "kept": self.cfg.sse == "c"}

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    self.keyring.save()
                    continue
                log.info("signal %s: flushing and unmounting", signal.Signals(sig).name)
                self.failed = await self._stop()
                if self.failed and sig == signal.SIGINT:
                    continue

    async def _control(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock_path = check_runtime_dir(create=True) / f"{self.id}.sock"
        sock_path.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(str(sock_path))
        finally:
            os.umask(old)
        sock.listen(4)
        listener = trio.SocketListener(sock)
        task_status.started(sock_path)

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                cmd = (await stream.receive_some(1024)).decode().strip()
                reply: dict[str, Any]
                if cmd == "stats":
                    reply = self.stats.snapshot()
                    reply["cache_bytes"] = self.cache.bytes_used
                    fastest = self.store.fastest_answer()
                    if fastest is not None:
                        reply["server_answer_us"] = round(fastest * 1e6)
                elif cmd == "info":
                    reply = self.info()
                elif cmd == "umount":
                    reply = await self._umount()
                else:
                    reply = {"error": f"unknown command {cmd!r}"}
                await stream.send_all(json.dumps(reply).encode() + b"\n")

        await trio.serve_listeners(handle, [listener])

    async def run(self, ready_fd: int | None) -> int:
        await preflight(self.store, self.cfg, self.keyring.current)
        # before the mount appears, so nobody opens a file while its old data goes up
        if journals(self.cache_base):
            async with trio.open_nursery() as n:
                n.start_soon(_still_starting)
                await recover(self.ctx, self.keyring, self.cfg, self.cache_base)
                n.cancel_scope.cancel()
        pyfuse3.init(self.fs, str(self.mountpoint), fuse_options(self.cfg))
        if not self.cfg.direct_io:  # with direct_io no read looks in the kernel's pages
            self.ctx.pages = KernelPages(pyfuse3.notify_store)  # needs the session init made
        registry = check_runtime_dir(create=True) / f"{self.id}.json"
        try:
            async with trio.open_nursery() as n:
                self.ctx.nursery = n
                self.ctx.source.nursery = n
                sock_path = await n.start(self._control)
                # for people and scripts; commands ask the daemon itself (runtime.control)
                write_private(registry, json.dumps({
                    "pid": os.getpid(), "mountpoint": str(self.mountpoint),
                    "socket": str(sock_path), "bucket": self.cfg.bucket_path}))
                n.start_soon(self._signals)
                n.start_soon(self.fs.retry_loop, max(0.1, self.cfg.retry_interval))
                n.start_soon(self._announce, ready_fd)
                await pyfuse3.main()
                # unmounted (by us, or by fusermount -u): upload what is left
                with trio.CancelScope(shield=True):
                    self.failed = await self.fs.flush_all()
                n.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            registry.unlink(missing_ok=True)
            registry.with_suffix(".sock").unlink(missing_ok=True)
            self.keyring.save()
            if self.index is not None:
                self.index.close()
            self.cache.close()
        if self.failed:
            log.error("unmounted with %d file(s) not uploaded: %s; %s", len(self.failed),
                      ", ".join(self.failed), self._left_behind())
            return 1
        return 0

    def _left_behind(self) -> str:
        """Where the data of files not uploaded is, and what becomes of it."""
        if self.cfg.sse != "c":
            return ("their data is lost: the spill of an sse=s3/kms mount is sealed with a "
                    "key that dies with the daemon")
        return (f"their data is kept, encrypted, in {self.ctx.spill_dir}: if this daemon "
                f"ends first, the next mount of {self.cfg.bucket_path} with cache_dir "
                f"{self.cache_base} uploads it")
    def info(self) -> dict[str, Any]:
        """What ``s3ssefs presign`` needs to know of this mount: the key file's path, never a
        key."""
        cfg = self.cfg
        return {
            "mountpoint": str(self.mountpoint), "bucket": cfg.bucket_path,
            "bucket_name": cfg.bucket, "prefix": cfg.prefix, "endpoint": cfg.endpoint,
            "region": cfg.region, "profile": cfg.profile,
            **{name: str(p.expanduser().resolve()) if p is not None else None
               for name, p in (("credentials_file", cfg.credentials_file),
                               ("ca_bundle", cfg.ca_bundle),
                               ("keyfile", cfg.keyfile if cfg.sse == "c" else None))},
            "allow_http": cfg.allow_http, "sse": cfg.sse, "read_only": cfg.read_only,
            "as_of": cfg.as_of.isoformat() if cfg.as_of else None}

    async def _announce(self, ready_fd: int | None) -> None:
        """Tell the parent / systemd the mount is up once it answers a stat."""
        await workers.run_sync(os.stat, str(self.mountpoint))
        # only now: the kernel lowers readahead to what the FUSE handshake said, and the
        # handshake is over once the mount answers
        set_kernel_readahead(self.mountpoint, self.cfg.readahead)
        log.info("mounted s3://%s on %s", self.cfg.bucket_path, self.mountpoint)
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"OK\n")
                os.close(ready_fd)
        sd_notify("READY=1")


async def _still_starting(step: float = 20.0) -> None:
    """While files left by an earlier mount go up (which may take long), keep systemd from
    taking the start for hung (TimeoutStartSec), which would kill the upload and start it over
    at the next start, for ever."""
    while True:
        sd_notify(f"EXTEND_TIMEOUT_USEC={int(3 * step * 1e6)}")
        await trio.sleep(step)


def clear_stale_mount(mountpoint: Path) -> None:
    """A dead daemon leaves 'Transport endpoint is not connected': unmount it lazily."""
    try:
        os.statvfs(mountpoint)  # always asks the daemon; a stat may come from the attr cache
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            log.info("clearing stale mount on %s", mountpoint)
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                           capture_output=True)


def prepare(cfg: MountConfig) -> KeyFile | None:
    """The checks before a mount that need no server: key file, mount point, runtime
    directory, no other s3ssefs on the mount point.  Run by the command in the foreground
    (so each mistake is one line on the terminal) and again by the daemon."""
    assert cfg.mountpoint is not None
    keyfile = load_keys(cfg)
    clear_stale_mount(cfg.mountpoint)
    pid = registered_pid(cfg.mountpoint)
    if pid is not None:
        raise MountError(f"{cfg.mountpoint} is already mounted by s3ssefs (pid {pid}); "
                         "run s3ssefs umount first")
    if not cfg.mountpoint.is_dir():
        what = "is not a directory" if cfg.mountpoint.exists() else "does not exist"
        raise MountError(f"mount point {cfg.mountpoint} {what}")
    check_runtime_dir(create=True)
    return keyfile


def run_foreground(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Mount and serve until unmounted. Returns the exit status."""
    assert cfg.mountpoint is not None
    harden_process()
    tune_malloc()

    def fail(msg: str) -> int:
        log.error("%s", msg)
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"ERR {escape_controls(msg)}\n".encode())
        return 1

    try:
        keyfile = prepare(cfg)
        mount = Mount(cfg, keyfile)
        return trio.run(mount.run, ready_fd)
    except MountError as e:
        return fail(str(e))
    except RuntimeError as e:  # pyfuse3.init: mount refused by the kernel
        return fail(f"cannot mount on {cfg.mountpoint}: {e}")
    except Exception as e:  # a bug: say so in one line, with the details in the log
        log.exception("unexpected error before or while mounting")
        return fail(f"unexpected error: {type(e).__name__}: {e}")


def mounted_fstype(mountpoint: Path) -> str | None:
    """Type of the filesystem mounted exactly on ``mountpoint`` (``fuse.s3ssefs``…), or None.

    Read from ``/proc/self/mountinfo``, so it works on a dead daemon's mount too."""
    target = os.path.realpath(mountpoint)
    fstype = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                head, _, tail = line.partition(" - ")
                fields = head.split()
                where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                               fields[4]) if len(fields) > 4 else None
                if where == target and tail:
                    fstype = tail.split()[0]  # the last one listed is the one on top
    except OSError:
        return None
    return fstype


def registered_pid(mountpoint: Path) -> int | None:
    """PID of the live daemon serving ``mountpoint`` (it answers its socket), or None."""
    try:
        return int(control(mountpoint, "stats", timeout=30)["pid"])
    except Refused:
        raise
    except (MountError, ValueError, KeyError, TypeError):
        return None


def umount(mountpoint: Path, timeout: float = 3600.0) -> int:
    """Flush then unmount; handles a dead daemon's stale mount too."""
    mountpoint = Path(os.path.realpath(mountpoint))
    try:
        reply = control(mountpoint, "umount", timeout)
    except Refused:
        raise
    except MountError as e:
        # no live daemon: maybe a stale mount left by a killed one, but never anything else
        fstype = mounted_fstype(mountpoint)
        if fstype is not None and fstype != "fuse.s3ssefs":
            raise MountError(f"{mountpoint} is a {fstype} mount, not s3ssefs; left alone") from None
        if fstype is None:
            raise MountError(str(e)) from None
        r = subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                           text=True)
        if r.returncode == 0:
            registry_path(mountpoint).unlink(missing_ok=True)
            print(f"s3ssefs: {mountpoint}: no running daemon; stale mount removed")
            return 0
        raise MountError(str(e)) from None
    if reply.get("failed"):
        then = ("the data stays in the encrypted spill and the next mount of the bucket with "
                "the same cache directory uploads it" if reply.get("kept") else
                "the data of an sse=s3/kms mount is then lost")
        raise MountError(f"could not upload {len(reply['failed'])} file(s), still mounted: "
                         + ", ".join(reply["failed"]) + "; fix the cause (the daemon's log "
                         "says it) and run s3ssefs umount again, or unmount with "
                         f"fusermount3 -u: {then}")
    if reply.get("busy"):
        busy = reply["busy"]
        raise MountError(f"{mountpoint} is busy: {len(busy)} file(s) or directories open "
                         f"({', '.join(busy[:5])}{', …' if len(busy) > 5 else ''}); their data "
                         "is uploaded, the mount stays (close them, or use umount -l)")
    # the daemon unmounts and exits once flushed: wait for its exit, not a guess
    try:
        pidfd = os.pidfd_open(int(reply["pid"]))
    except ProcessLookupError:
        return 0
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        raise MountError(f"the daemon of {mountpoint} did not exit within {timeout:.0f}s")
    return 0
