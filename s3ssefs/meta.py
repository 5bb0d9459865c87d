"""Object headers ⇄ stat attributes, the way s3fs-fuse writes them.

s3fs keeps POSIX attributes in user metadata: ``x-amz-meta-mode`` (decimal, with the file type
bits), ``-uid``, ``-gid``, ``-mtime`` (decimal seconds; s3fs ≥ 1.88 may add ``.nanoseconds``),
and ``-rdev`` for device nodes and FIFOs.  A symlink is an object whose body is the target and
whose mode has ``S_IFLNK``; a directory marker is a zero-byte ``name/`` object.  Using the same
spelling lets s3fs, rclone and the aws CLI share a bucket with s3ssefs.

Extended attributes are kept as s3fs ``-o use_xattr`` keeps them: all of an object's in one
``x-amz-meta-xattr`` header, the URL-encoded text ``{"name":"base64 of value",...}``.  s3fs
splits that text at ``,`` and ``:`` without JSON escapes, so a name holding ``"``, ``,`` or
``:`` cannot be stored.  S3 bounds all of an object's user metadata (AWS: 2 KiB, names and
values); the attributes get what the other metadata leaves.
"""

from __future__ import annotations

import base64
import binascii
import logging
import stat
from dataclasses import dataclass
from urllib.parse import quote_from_bytes, unquote_to_bytes

log = logging.getLogger(__name__)

# boto3's Metadata dict is keyed without the "x-amz-meta-" prefix
MODE, UID, GID, MTIME, RDEV, ATIME, CTIME = "mode", "uid", "gid", "mtime", "rdev", "atime", "ctime"
XATTR = "xattr"
USER_METADATA_MAX = 2048  # AWS: the names and values of an object's x-amz-meta-*, together
_TIME_MAX = len("1700000000.123456789")  # a time may grow to this when it is next written


@dataclass(slots=True)
class Attrs:
    """What ``stat`` shows for one object; times in nanoseconds."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


def _int(meta: dict[str, str], name: str) -> int | None:
    v = meta.get(name)
    if v is None:
        return None
    try:
        return int(v.strip())
    except ValueError:
        log.debug("ignoring malformed x-amz-meta-%s", name)
        return None


def parse_time_ns(text: str | None) -> int | None:
    """``"1700000000"`` or ``"1700000000.123456789"`` → ns since the epoch."""
    if text is None:
        return None
    sec, _, frac = text.strip().partition(".")
    try:
        ns = int(sec) * 1_000_000_000
        if frac:
            ns += int((frac + "000000000")[:9])
    except ValueError:
        return None
    return ns


def format_time(ns: int) -> str:
    """Seconds, with nanoseconds only when there are any (s3fs reads both)."""
    sec, rem = divmod(ns, 1_000_000_000)
    return str(sec) if rem == 0 else f"{sec}.{rem:09d}"


def attrs_from_object(meta: dict[str, str], size: int, last_modified: float, *,
                      is_dir: bool, default_uid: int, default_gid: int, umask: int) -> Attrs:
    """Stat attributes of an object from its metadata, with mount defaults for what is missing."""
    mode = _int(meta, MODE)
    kind = stat.S_IFDIR if is_dir else stat.S_IFREG
    if mode is None or mode <= 0:
        mode = kind | ((0o777 if is_dir else 0o666) & ~umask)
    elif stat.S_IFMT(mode) == 0:
        mode |= kind  # some tools store only permission bits
    elif is_dir and not stat.S_ISDIR(mode):
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
    uid = _int(meta, UID)
    gid = _int(meta, GID)
    lm_ns = int(last_modified * 1_000_000_000)
    # "0" is a real time (tar and touch -d @0 set it): only a missing/malformed value defaults
    mtime = parse_time_ns(meta.get(MTIME))
    mtime = lm_ns if mtime is None else mtime
    ctime = parse_time_ns(meta.get(CTIME))
    ctime = mtime if ctime is None else ctime
    return Attrs(mode=mode, uid=default_uid if uid is None else uid,
                 gid=default_gid if gid is None else gid, size=size, mtime_ns=mtime,
                 ctime_ns=ctime, rdev=_int(meta, RDEV) or 0)


def metadata_for(attrs: Attrs) -> dict[str, str]:
    """The user metadata s3fs would write for these attributes."""
    meta = {MODE: str(attrs.mode), UID: str(attrs.uid), GID: str(attrs.gid),
            MTIME: format_time(attrs.mtime_ns), CTIME: format_time(attrs.ctime_ns)}
    if attrs.rdev:
        meta[RDEV] = str(attrs.rdev)
    return meta


def merge_foreign(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """New attribute metadata, keeping keys other tools wrote (``x-amz-meta-…`` we don't own)."""
    out = {k: v for k, v in old.items() if k not in (MODE, UID, GID, MTIME, RDEV, ATIME, CTIME)}
    out.update(new)
    return out


def parse_xattrs(raw: str | None) -> dict[bytes, bytes]:
    """Names and values of an ``x-amz-meta-xattr`` header (s3fs's format); pairs that do not
    parse are left out, as s3fs leaves them out."""
    if not raw:
        return {}
    text = unquote_to_bytes(raw)
    start, end = text.find(b"{"), text.rfind(b"}")
    if start < 0 or end <= start:
        log.debug("ignoring an x-amz-meta-xattr that is not {...}")
        return {}
    out: dict[bytes, bytes] = {}
    for pair in text[start + 1:end].split(b","):
        name, sep, value = (part.strip() for part in pair.partition(b":"))
        if not sep or len(name) < 2 or len(value) < 2 or name[:1] != b'"' \
                or name[-1:] != b'"' or value[:1] != b'"' or value[-1:] != b'"':
            continue
        try:
            out[name[1:-1]] = base64.b64decode(value[1:-1])
        except (binascii.Error, ValueError):
            log.debug("ignoring an extended attribute whose value is not base64")
    return out


def format_xattrs(xattrs: dict[bytes, bytes]) -> str:
    """The ``x-amz-meta-xattr`` header for these attributes, as s3fs writes it."""
    body = b",".join(b'"%s":"%s"' % (name, base64.b64encode(value))
                     for name, value in sorted(xattrs.items()))
    return quote_from_bytes(b"{" + body + b"}", safe="/")


def storable_xattr_name(name: bytes) -> bool:
    """Whether s3fs's format can hold this name (it has no escapes)."""
    return not any(c in name for c in b'",:')


def xattr_room(meta: dict[str, str]) -> int:
    """Characters the ``xattr`` header may have beside the rest of this user metadata (whose
    times are counted at their longest, so a later utimens still fits)."""
    used = sum(len(k.encode()) + (max(len(v.encode()), _TIME_MAX) if k in (MTIME, CTIME, ATIME)
                                  else len(v.encode()))
               for k, v in meta.items() if k != XATTR)
    return USER_METADATA_MAX - used - len(XATTR)
