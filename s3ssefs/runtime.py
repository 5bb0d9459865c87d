"""Where a running mount can be found, and how a command makes sure it talks to its own daemon.

A mount registers itself in the runtime directory: ``/run/s3ssefs`` for root,
``$XDG_RUNTIME_DIR/s3ssefs`` for a user with a login session, and ``/tmp/s3ssefs-UID``
otherwise (su, sudo -u, cron, ssh without pam_systemd).  The last one lives in a directory
every user can write, so another user may have created it first: a state file written
through their symlink would overwrite a file of ours, and a state file they wrote could
point ``s3ssefs presign`` at their own endpoint, which would then receive our SSE-C key.
Hence three rules:

- the runtime directory is used only if it is a real directory owned by us that nobody else
  can write (made with mode 0700 if missing); anything else is refused with one line;
- files in it are written to a fresh name (``O_EXCL | O_NOFOLLOW``) and renamed into place;
- what a command learns about a mount (its options, its PID) comes from the live daemon over
  its control socket, after the kernel's word (``SO_PEERCRED``) that the process answering
  runs as us.  The JSON file next to the socket is for people and scripts; nothing that
  sends a key trusts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from s3ssefs.errors import MountError

log = logging.getLogger(__name__)


class NotRegistered(MountError):
    """No mount of ours is registered on that mount point."""


class Refused(MountError):
    """The runtime directory or the socket in it is not ours alone: nothing there is used."""


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/s3ssefs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "s3ssefs" if xdg else Path(f"/tmp/s3ssefs-{os.getuid()}")


def mount_id(mountpoint: Path) -> str:
    """Stable id of a mount point; never called on a path we are serving (it stats it)."""
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]


def registry_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{mount_id(mountpoint)}.json"


def socket_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{mount_id(mountpoint)}.sock"


def check_runtime_dir(*, create: bool) -> Path:
    """The runtime directory, if it is ours alone; made (mode 0700) when ``create``.

    Raises :class:`NotRegistered` when it does not exist and ``create`` is false, and
    :class:`Refused` (one line, with the fix) when someone else owns it or can write it.
    """
    path = runtime_dir()
    if create:
        if os.geteuid() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise MountError(f"cannot create the runtime directory {path}: {e.strerror}") \
                from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotRegistered(f"no s3ssefs mount is registered here ({path} does not exist)") \
            from None
    except OSError as e:
        raise MountError(f"runtime directory {path}: {e.strerror}") from None
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"runtime directory {path} is not a directory (a symlink?); "
                         "refusing to use it: remove it")
    if st.st_uid != euid:
        raise Refused(f"runtime directory {path} belongs to uid {st.st_uid}, not to you "
                         f"(uid {euid}); another user may have planted it: refusing to use it "
                         "(remove it, or set XDG_RUNTIME_DIR)")
    if st.st_mode & 0o022:
        raise Refused(f"runtime directory {path} has mode {stat.S_IMODE(st.st_mode):04o}, "
                         f"writable by others; refusing to use it (run: chmod 700 {path})")
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``path`` (mode 0600) without following a link: a fresh file, renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # replaces a link itself, never its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _peer(s: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel knows it."""
    fmt = "3i"
    data = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, data)
    return pid, uid, gid


def control(mountpoint: Path, command: str, timeout: float = 3600.0) -> dict[str, Any]:
    """Send one command to the daemon serving ``mountpoint``, if it runs as us.

    The reply's ``pid`` is the daemon's PID as the kernel reports it for the socket.
    """
    try:
        check_runtime_dir(create=False)
    except NotRegistered:
        raise NotRegistered(f"no s3ssefs mount is registered on {mountpoint}") from None
    path = socket_path(mountpoint)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotRegistered(f"no s3ssefs mount is registered on {mountpoint}") from None
    euid = os.geteuid()
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != euid:
        raise Refused(f"{path} is not a control socket of yours; refusing to use it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as e:
            raise MountError(f"the mount on {mountpoint} does not answer: {e.strerror}") \
                from None
        pid, uid, _ = _peer(s)
        if uid != euid:
            raise Refused(f"the control socket of {mountpoint} is served by uid {uid}, "
                             f"not by you (uid {euid}); refusing to talk to it")
        try:
            s.sendall(command.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise MountError(f"the mount on {mountpoint} does not answer: {e}") from None
    try:
        reply: dict[str, Any] = json.loads(buf)
    except ValueError:
        raise MountError(f"the mount on {mountpoint} gave no answer to {command!r} "
                         "(it may be shutting down)") from None
    reply["pid"] = pid
    return reply
