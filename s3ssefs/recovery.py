"""Recovery: upload what an earlier mount owed S3 and never sent.

A file whose upload failed is kept in its encrypted spill with a journal (:mod:`s3ssefs.spill`,
written by :meth:`FileData._keep <s3ssefs.files.FileData._keep>`).  If the daemon then ends
without uploading it — SIGKILL, the OOM killer, a power cut, a plain or lazy ``umount`` while
the server still refuses — the spill and journal stay in the cache directory.  The next
writable mount of the same bucket (same endpoint, a prefix that holds the file) with the same
cache directory, whatever its mount point, uploads each such file before the mount appears,
through the ordinary flush path (:class:`~s3ssefs.files.FileData`), under the ``current`` key.

The object may have changed in S3 meanwhile (another client, another mount).  Then the old
content is not overwritten: the recovered file goes up beside it as
``NAME.s3ssefs-recovered-<UTC time>`` and a warning says so, for a person to compare.  A file
whose unwritten parts come from an object that is gone (changed, in an unversioned bucket) or
whose key the key file no longer holds cannot be rebuilt: it is left where it is, with one
error line naming it, and tried again by the next mount.  A spill still locked by a live
process (a mount sharing the cache directory) is never touched.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from s3ssefs import workers
from s3ssefs.blocks import ObjectRef
from s3ssefs.config import MountConfig
from s3ssefs.crypto import CorruptBlock
from s3ssefs.errors import FsError
from s3ssefs.files import Ctx, FileData
from s3ssefs.inodes import Node
from s3ssefs.keyring import KeyRing
from s3ssefs.keys import Key
from s3ssefs.meta import Attrs
from s3ssefs.spill import JOURNAL_SUFFIX, Spill

log = logging.getLogger(__name__)

CONFLICT_TAG = ".s3ssefs-recovered-"


def journals(cache_base: Path) -> list[Path]:
    """Every spill journal under a cache directory (each mount point has its own state
    directory there; a file is recovered by whichever mount of its bucket comes next)."""
    return sorted(cache_base.glob(f"*/spill/spill-*{JOURNAL_SUFFIX}"))


async def recover(ctx: Ctx, keyring: KeyRing, cfg: MountConfig, cache_base: Path) -> None:
    """Upload every file an earlier mount of this bucket left in a spill (module docstring)."""
    keyfile = keyring.keyfile
    if keyfile is None or cfg.read_only:
        return  # only SSE-C spills are recoverable; a read-only mount writes nothing
    for journal in journals(cache_base):
        own = journal.parent == ctx.spill_dir
        try:
            spill, info = await workers.run_sync(Spill.reopen, journal, keyfile.by_fingerprint)
        except (BlockingIOError, FileNotFoundError):
            continue  # in use by a live process, or just uploaded by it
        except LookupError as e:
            (log.error if own else log.info)(
                "%s was left by a mount that could not upload it, sealed under key "
                "fingerprint %s, which %s does not hold; left in place", journal, e,
                cfg.keyfile)
            continue
        except (CorruptBlock, OSError, ValueError, KeyError, TypeError) as e:
            log.error("cannot read %s, left by a mount that could not upload a file: %s",
                      journal, e)
            continue
        s3key = str(info.get("s3key", ""))
        if info.get("bucket") != ctx.store.bucket or info.get("endpoint") != cfg.endpoint \
                or not s3key.startswith(cfg.prefix) or s3key == cfg.prefix:
            log.info("%s holds s3://%s/%s (endpoint %s), not this mount's: left for a mount "
                     "of that bucket", journal, info.get("bucket"), s3key, info.get("endpoint"))
            spill.release()
            continue
        try:
            await _recover_one(ctx, keyring, cfg, spill, info)
        except (FsError, CorruptBlock, OSError, ValueError, KeyError, TypeError) as e:
            log.error("could not upload s3://%s/%s, left by an earlier mount in %s: %s; "
                      "kept there for the next mount", ctx.store.bucket, s3key, spill.path, e)
            spill.release()


async def _matches(ctx: Ctx, s3key: str, etag: str | None, key: Key | None) -> bool:
    """Whether the object at ``s3key`` is still the version with ``etag`` (None: whether
    there is no object there).  A HEAD the key does not open means another object."""
    try:
        info = await ctx.store.head(s3key, key)
    except FsError as e:
        if e.errno == errno.ENOENT:
            return etag is None
        if e.errno == errno.EACCES:
            return False
        raise
    return etag is not None and info.etag == etag


async def _recover_one(ctx: Ctx, keyring: KeyRing, cfg: MountConfig, spill: Spill,
                       info: dict[str, Any]) -> None:
    store = ctx.store
    assert keyring.keyfile is not None
    s3key: str = info["s3key"]
    size = int(info["size"])
    bs = spill.block_size
    if bs != ctx.block_size:
        ctx = replace(ctx, block_size=bs)  # raises ValueError if the part size does not fit
    blocks = {b for b in spill.block_numbers() if b * bs < size}
    base: dict[str, Any] | None = info.get("base")
    ref = None
    valid = 0
    base_key = None
    if base is not None:
        base_key = keyring.keyfile.by_fingerprint(base["key"]) if base["key"] else None
        if base["key"] and base_key is None:
            raise FsError(errno.EACCES, f"the key file no longer holds key {base['key']}, "
                          "which opens the object the file was based on")
        ref = ObjectRef(base["s3key"], base["etag"], int(base["size"]), base_key,
                        base["version_id"])
        valid = min(int(base["valid"]), size)
        needed = any(b not in blocks for b in range(math.ceil(valid / bs)))
        if not needed:
            ref, valid = None, 0
        elif not base["version_id"] and not await _matches(ctx, ref.s3key, ref.etag,
                                                           base_key):
            raise FsError(errno.ESTALE, f"s3://{store.bucket}/{ref.s3key}, which holds the "
                          "parts of the file that were not rewritten, changed since")
    if base is not None and base["s3key"] == s3key:  # replaces what it was based on
        free = await _matches(ctx, s3key, base["etag"], base_key)
    else:
        free = await _matches(ctx, s3key, None, keyring.current)
    path = s3key[len(cfg.prefix):]
    if not free:
        path += CONFLICT_TAG + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    a = info["attrs"]
    node = Node(ino=0, path=path, attrs=Attrs(mode=a["mode"], uid=a["uid"], gid=a["gid"],
                                              size=size, mtime_ns=a["mtime_ns"],
                                              ctime_ns=a["ctime_ns"]),
                metadata=dict(info.get("metadata") or {}), remote=False)
    data = FileData.recovered(ctx, node, ref, valid, size, spill)
    await data.flush()
    keyring.learn(ctx.s3key(path), node.sse_key, node.etag)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info.get("time", 0))))
    if free:
        log.warning("uploaded s3://%s/%s (%d bytes): an earlier mount could not upload it "
                    "(since %s) and left it in its spill", store.bucket, s3key, size, when)
    else:
        log.warning("s3://%s/%s changed in S3 after an earlier mount failed to upload it "
                    "(%s): that mount's data is uploaded beside it as s3://%s/%s; compare "
                    "them and keep what you want", store.bucket, s3key, when, store.bucket,
                    ctx.s3key(path))
