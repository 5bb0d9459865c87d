"""``s3ssefs rekey``: re-encrypt every object under a prefix to one key.

Each object is opened the way the mount opens it (:class:`~s3ssefs.keyring.KeyRing`: map,
learned, current, the rest), then copied onto itself under the target key by
:meth:`ObjectStore.copy <s3ssefs.store.ObjectStore.copy>`, which uses what the server allows:
CopyObject with copy-source SSE-C, else UploadPartCopy between keys (both server-side, no data
through us), else ranged GETs under the old key feeding a multipart PUT under the new one, a few
parts in memory, never local disk (Ceph 16 refuses both server-side forms between keys).
Which one ran is reported once in the summary.

Objects already under the target key are skipped, so an interrupted run resumes where it
stopped; plain and SSE-S3 objects are encrypted in place; objects no key opens are listed and
left alone.  On a versioned bucket the version that was replaced keeps its old key, and a
``[[map]]`` entry for it is written to the key file (atomically, mode kept) right after its
copy, so an interrupted run loses none.

A file written (through a mount or any client) between the listing and the copy must not be
replaced by the older bytes re-encrypted: every copy reads its source only while the source
still has the ETag the listing showed (``x-amz-copy-source-if-match``, or ``If-Match`` on the
ranged GETs of the streamed copy).  An object that changed is left as it is and reported; the
next run takes it.
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import trio

from s3ssefs.aio import gather
from s3ssefs.config import MountConfig
from s3ssefs.errors import FsError, MountError
from s3ssefs.keyring import KeyRing, load_keyfile
from s3ssefs.keys import Key, KeyFile
from s3ssefs.store import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)


@dataclass
class Tally:
    rekeyed: int = 0
    rekeyed_bytes: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # written since the listing: left alone
    seen: int = 0
    seen_bytes: int = 0
    planned: list[str] = field(default_factory=list)


class Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        t = self.tally
        sys.stderr.write(f"\rrekey: {t.seen} objects ({t.seen_bytes / 2**20:.1f} MiB) seen, "
                         f"{t.rekeyed} re-encrypted ({t.rekeyed_bytes / 2**20:.1f} MiB), "
                         f"{t.skipped} already done, {len(t.locked)} locked ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            self.update(force=True)
            sys.stderr.write("\n")


def method_summary(store: ObjectStore) -> str:
    caps = store.caps
    if caps.copy_object_sse_c:
        return "server-side (CopyObject)"
    if caps.part_copy_cross_key:
        return "server-side (UploadPartCopy)"
    if caps.part_copy_cross_key is False:
        return "streamed through memory (the server refuses server-side copies between keys)"
    return "no copy was needed"


async def rekey(cfg: MountConfig, keyfile: KeyFile, target: Key, *, dry_run: bool = False,
                jobs: int = 8) -> tuple[Tally, str]:
    store = ObjectStore(cfg)
    keyring = KeyRing(keyfile, store)
    tally = Tally()
    progress = Progress(tally)
    versioned = await store.versioning_enabled()
    await store.check_lean_path()

    async def one(o: ObjectInfo) -> None:
        rel = o.key[len(cfg.prefix):]
        tally.seen += 1
        tally.seen_bytes += o.size
        try:
            info, key = await keyring.head(rel, o.key)
        except FsError as e:
            if e.errno == errno.EACCES:
                tally.locked.append(o.key)
                return
            if e.errno == errno.ENOENT:  # deleted since the listing
                return
            raise
        if key is not None and key.raw == target.raw:
            tally.skipped += 1
            return
        if dry_run:
            tally.planned.append(f"{o.key}: {key.id if key else 'unencrypted'} -> {target.id}")
            return
        if info.etag != o.etag:
            tally.changed.append(o.key)
            return
        try:
            await store.copy(o.key, o.key, key, target, info.metadata, info.size,
                             if_match=o.etag)
        except FsError as e:
            if e.errno == errno.ESTALE:  # written since the listing: theirs stays
                tally.changed.append(o.key)
                return
            log.error("rekey of s3://%s/%s failed: %s", cfg.bucket, o.key, e)
            tally.failed.append(o.key)
            return
        if versioned and info.version_id and key is not None:
            # saved at once: an interrupted run must not leave that version unreadable
            keyfile.add_map(rel, info.version_id, key.id)
            keyfile.save()
        tally.rekeyed += 1
        tally.rekeyed_bytes += info.size
        progress.update()

    async for page in store.list_pages(cfg.prefix, delimiter=None):
        await gather((partial(one, o) for o in page.objects), limit=jobs)
        progress.update()
    progress.done()
    return tally, method_summary(store)


def run_rekey(cfg: MountConfig, to_key: str | None, dry_run: bool, jobs: int) -> int:
    if cfg.keyfile is None:
        raise MountError("rekey needs --keyfile")
    keyfile = load_keyfile(cfg.keyfile)
    target = keyfile.by_id(to_key) if to_key else keyfile.current_key
    if target is None:
        raise MountError(f"no key {to_key!r} in {cfg.keyfile}")
    tally, method = trio.run(partial(rekey, cfg, keyfile, target, dry_run=dry_run, jobs=jobs))
    if dry_run:
        for line in tally.planned:
            print(f"would re-encrypt {line}")
    for k in tally.locked:
        print(f"no key opens s3://{cfg.bucket}/{k}: left alone")
    for k in tally.changed:
        print(f"s3://{cfg.bucket}/{k} changed during rekey: left alone (run rekey again)")
    print(f"rekey s3://{cfg.bucket_path} to {target.id}: "
          + (f"{len(tally.planned)} to re-encrypt" if dry_run else
             f"{tally.rekeyed} re-encrypted ({tally.rekeyed_bytes} bytes), method: {method}")
          + f"; {tally.skipped} already under {target.id}; {len(tally.locked)} no key opens; "
          f"{len(tally.changed)} changed meanwhile; {len(tally.failed)} failed")
    return 1 if tally.failed or tally.changed else 0
