"""AWS's SSE-C rules, on both test servers: what s3ssefs must do where AWS answers otherwise
than Ceph RGW.

Each test runs against RGW and against LocalStack's S3 (``servers()``), through
:class:`faultproxy.S3Proxy` where AWS answers something neither server does: a keyed read of a
plain object refused with 400, a CompleteMultipartUpload that must repeat the upload's SSE-C
headers, a bucket that blocks SSE-C writes, a server that refuses a detail of the lean request
path, a bucket in another region.  What a user sees:

* files above multipart_threshold close without error and read back;
* plain objects stay readable (after one refused key, not one per key in the key file) and are
  never "no key opens";
* a server that refuses the lean path's requests (or a bucket in another region than the one
  configured) is served by boto3 alone, with one log line, instead of every file showing as
  "no key opens";
* a bucket that blocks SSE-C refuses the mount with one clear line;
* ``rekey`` never puts old bytes over a file written since its listing, and on a versioned bucket
  an interrupted run keeps the key-map entries of what it did.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from botocore.exceptions import ClientError
from conftest import S3SSEFS, Rgw, new_key, sse
from faultproxy import S3Proxy

from s3ssefs.config import MountConfig
from s3ssefs.errors import FsError
from s3ssefs.keyring import KeyRing
from s3ssefs.keys import Key, KeyFile
from s3ssefs.rekey import rekey
from s3ssefs.store import ObjectStore

MiB = 1 << 20
pytestmark = pytest.mark.servers()


@pytest.fixture
def proxy(rgw: Rgw, tmp_path: Path) -> Iterator[S3Proxy]:
    p = S3Proxy(rgw.endpoint, rgw.ca, tmp_path / "proxy-tls")
    yield p
    p.close()


def make_store(endpoint: str, rgw: Rgw, bucket: str, **kw: Any) -> ObjectStore:
    opts: dict[str, Any] = {"bucket": bucket, "endpoint": endpoint, "ca_bundle": rgw.ca,
                            "keyfile": Path("/unused"), "part_size": 5 * MiB,
                            "multipart_threshold": 5 * MiB, "request_timeout": 30}
    opts.update(kw)
    return ObjectStore(MountConfig(**opts))


def keyfile_with(path: Path, keys: list[Key], current: Key) -> Path:
    KeyFile({k.id: k for k in keys}, current.id).save(path)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- what each server answers ----------------------------------------------------------------


def _status(call: Any) -> int:
    try:
        call()
    except ClientError as e:
        return int(e.response["ResponseMetadata"]["HTTPStatusCode"])
    return 200


def test_each_server_refuses_a_wrong_key_and_a_keyless_read(
        rgw: Rgw, bucket: str, s3: Any, key: Key, other_key: Key) -> None:
    """Before the suite trusts a server with tests about keys, it must refuse a read with a
    wrong key and one with none.  Where they differ, as the README's table says: a wrong key is
    400 on RGW, 403 on LocalStack (as on AWS); CopyObject from an SSE-C source is 501 on RGW
    (s3ssefs then copies with UploadPartCopy, or through memory between two keys) and works
    on LocalStack, also from one key to another."""
    s3.put_object(Bucket=bucket, Key="sealed", Body=b"sealed", **sse(key))
    wrong = _status(lambda: s3.get_object(Bucket=bucket, Key="sealed", **sse(other_key)))
    keyless = _status(lambda: s3.get_object(Bucket=bucket, Key="sealed"))
    head_wrong = _status(lambda: s3.head_object(Bucket=bucket, Key="sealed", **sse(other_key)))
    copy = _status(lambda: s3.copy_object(
        Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "sealed"},
        CopySourceSSECustomerAlgorithm="AES256", CopySourceSSECustomerKey=key.raw,
        **sse(other_key)))
    expected = {"rgw": (400, 400, 400, 501), "localstack": (403, 400, 403, 200)}[rgw.name]
    assert (wrong, keyless, head_wrong, copy) == expected


# --- CompleteMultipartUpload ----------------------------------------------------------------


def test_a_multipart_file_closes_where_completion_must_repeat_the_key(
        rgw: Rgw, bucket: str, s3: Any, key: Key, proxy: S3Proxy, mount_factory: Any) -> None:
    """A file above multipart_threshold written through a mount closes without error and reads
    back, where CompleteMultipartUpload must carry the upload's SSE-C headers."""
    proxy.aws_sse_c = True
    m = mount_factory(bucket, "--endpoint", proxy.endpoint, "-o",
                      "multipart_threshold=5M,part_size=5M")
    body = os.urandom(12 * MiB + 123)
    (m.path / "big.bin").write_bytes(body)  # close() is where the upload completes
    completions = proxy.count(lambda r: r[0] == "POST" and "uploadId=" in r[1])
    assert completions >= 1
    assert proxy.count(lambda r: r[0] == "POST" and "uploadId=" in r[1] and r[2]) \
        == completions
    got = s3.get_object(Bucket=bucket, Key="big.bin", **sse(key))
    assert got["SSECustomerKeyMD5"] == key.fingerprint
    assert sha(got["Body"].read()) == sha(body)


@pytest.mark.allow_warnings  # the refused write is logged
async def test_a_completion_that_echoes_another_encryption_fails_and_leaves_nothing(
        rgw: Rgw, bucket: str, s3: Any, key: Key, other_key: Key, proxy: S3Proxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(rgw.endpoint, rgw, bucket)
    real = store.client.complete_multipart_upload

    def lying(**kw: Any) -> Any:  # the answer of a server that used another key
        r = real(**kw)
        return {**r, "SSECustomerAlgorithm": "AES256",
                "SSECustomerKeyMD5": other_key.fingerprint}

    monkeypatch.setattr(store.client, "complete_multipart_upload", lying)
    upload = await store.create_multipart("mp.bin", key)
    etag = await store.upload_part("mp.bin", upload, 1, b"x" * (5 * MiB), key)
    with pytest.raises(FsError) as ei:
        await store.complete_multipart("mp.bin", upload, [(1, etag)], key)
    assert ei.value.errno == errno.EIO
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


# --- plain objects and wrong keys -------------------------------------------------------------


@pytest.mark.allow_warnings  # "no key opens" the stranger's object
async def test_a_plain_object_opens_after_one_refused_key_and_a_wrong_key_is_eacces(
        rgw: Rgw, bucket: str, s3: Any, proxy: S3Proxy) -> None:
    """With AWS's answers (400 to a key sent for a plain object, 403 or 400 to a wrong key),
    a plain object is opened with no key after one refused HEAD, not one per key in the file;
    an SSE-C object still opens with its key; one no key opens is EACCES."""
    proxy.aws_sse_c = True
    a, b, c, stranger = new_key("a"), new_key("b"), new_key("c"), new_key("x")
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"plain")
    s3.put_object(Bucket=bucket, Key="under-c.txt", Body=b"c", **sse(c))
    s3.put_object(Bucket=bucket, Key="stranger.txt", Body=b"x", **sse(stranger))
    kf = KeyFile({k.id: k for k in (a, b, c)}, a.id)
    store = make_store(proxy.endpoint, rgw, bucket)
    ring = KeyRing(kf, store)

    info, k = await ring.head("plain.txt", "plain.txt")
    assert k is None and info.size == 5
    assert proxy.count(lambda r: r[1].endswith("/plain.txt") and r[2] and r[3] == 400) == 1
    assert await store.get_range("plain.txt", 0, 5, None) == b"plain"

    info, k = await ring.head("under-c.txt", "under-c.txt")
    assert k is not None and k.id == "c"
    with pytest.raises(FsError) as ei:
        await ring.head("stranger.txt", "stranger.txt")
    assert ei.value.errno == errno.EACCES


def test_a_mount_reads_plain_and_keyed_files_with_aws_answers(
        rgw: Rgw, bucket: str, s3: Any, key: Key, proxy: S3Proxy, mount_factory: Any) -> None:
    proxy.aws_sse_c = True
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"plain")
    s3.put_object(Bucket=bucket, Key="sealed.txt", Body=b"sealed", **sse(key))
    m = mount_factory(bucket, "--endpoint", proxy.endpoint)
    assert sorted(os.listdir(m.path)) == ["plain.txt", "sealed.txt"]
    assert (m.path / "plain.txt").read_bytes() == b"plain"
    assert (m.path / "sealed.txt").read_bytes() == b"sealed"


# --- the lean request path ---------------------------------------------------------------------


@pytest.mark.allow_warnings  # the one line that says the lean path is off
async def test_a_server_that_refuses_the_lean_path_is_served_by_boto3(
        rgw: Rgw, bucket: str, s3: Any, key: Key, proxy: S3Proxy,
        caplog: pytest.LogCaptureFixture) -> None:
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"hello", **sse(key))
    proxy.refuse_lean = True
    store = make_store(proxy.endpoint, rgw, bucket)
    assert store.wire is not None
    with caplog.at_level(logging.WARNING, logger="s3ssefs"):
        await store.check_lean_path()
        assert store.wire is None
        assert (await store.head("a.txt", key)).size == 5
        assert await store.get_range("a.txt", 0, 5, key) == b"hello"
        await store.put("b.txt", b"world", key)
    lines = [r for r in caplog.records if r.name.startswith("s3ssefs")]
    assert len(lines) == 1 and "lean request path" in lines[0].getMessage()
    assert s3.get_object(Bucket=bucket, Key="b.txt", **sse(key))["Body"].read() == b"world"


@pytest.mark.allow_warnings
async def test_a_lean_refusal_boto3_does_not_get_turns_the_lean_path_off_later(
        rgw: Rgw, bucket: str, s3: Any, key: Key, proxy: S3Proxy) -> None:
    """The server starts refusing the lean path after the mount's check (a changed proxy, a
    new signing rule): the write still succeeds, through boto3, and the lean path stays off."""
    store = make_store(proxy.endpoint, rgw, bucket)
    await store.check_lean_path()
    assert store.wire is not None
    proxy.refuse_lean = True
    await store.put("c.txt", b"later", key)
    assert store.wire is None
    assert s3.get_object(Bucket=bucket, Key="c.txt", **sse(key))["Body"].read() == b"later"


@pytest.mark.allow_warnings
def test_a_mount_on_a_server_that_refuses_the_lean_path_reads_every_file(
        rgw: Rgw, bucket: str, s3: Any, key: Key, proxy: S3Proxy, mount_factory: Any) -> None:
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"f{i}", Body=b"%d" % i, **sse(key))
    proxy.refuse_lean = True
    m = mount_factory(bucket, "--endpoint", proxy.endpoint)
    assert [(m.path / f"f{i}").read_bytes() for i in range(3)] == [b"0", b"1", b"2"]
    (m.path / "new").write_bytes(b"new")
    assert s3.get_object(Bucket=bucket, Key="new", **sse(key))["Body"].read() == b"new"
    assert "using boto3 alone" in m.log_file.read_text()


@pytest.mark.allow_warnings
async def test_a_bucket_in_another_region_is_served_with_one_log_line(
        rgw: Rgw, bucket: str, s3: Any, key: Key, proxy: S3Proxy,
        caplog: pytest.LogCaptureFixture) -> None:
    """AWS answers a request signed for the wrong region with 400 AuthorizationHeaderMalformed
    naming the bucket's region: boto3 follows it, the lean path (signed for the configured
    region) does not, so the mount's check turns the lean path off and says why."""
    s3.put_object(Bucket=bucket, Key="far.txt", Body=b"far", **sse(key))
    proxy.region = "eu-west-1"
    store = make_store(proxy.endpoint, rgw, bucket, region="us-east-1")
    with caplog.at_level(logging.WARNING, logger="s3ssefs"):
        await store.check_bucket()
        await store.check_lean_path()
        assert await store.get_range("far.txt", 0, 3, key) == b"far"
        await store.put("near.txt", b"near", key)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("s3ssefs")]
    assert len(lines) == 1 and "AuthorizationHeaderMalformed" in lines[0], lines
    assert s3.get_object(Bucket=bucket, Key="near.txt", **sse(key))["Body"].read() == b"near"


# --- a bucket that blocks SSE-C ------------------------------------------------------------------


def test_a_bucket_that_blocks_sse_c_refuses_the_mount(
        rgw: Rgw, bucket: str, proxy: S3Proxy, mount_factory: Any) -> None:
    proxy.blocked_sse_c = True
    m = mount_factory(bucket, "--endpoint", proxy.endpoint, mount=False)
    r = subprocess.run(m.argv(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "blocks SSE-C" in r.stderr
    assert not os.path.ismount(m.path)


# --- rekey and concurrent writes ---------------------------------------------------------------


def _cfg(rgw: Rgw, bucket: str, keys: Path) -> MountConfig:
    return MountConfig(bucket=bucket, endpoint=rgw.endpoint, ca_bundle=rgw.ca, keyfile=keys,
                       part_size=5 * MiB)


@pytest.mark.parametrize("size", [1000, 12 * MiB])
async def test_rekey_leaves_a_file_written_since_its_listing(
        rgw: Rgw, bucket: str, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        size: int) -> None:
    """Another client writes the file after rekey listed it and looked at it, just before the
    copy: the copy must not put the listed (older) bytes over it; it is reported as changed."""
    old, new = new_key("old"), new_key("new")
    s3.put_object(Bucket=bucket, Key="f", Body=b"o" * size, **sse(old))
    s3.put_object(Bucket=bucket, Key="g", Body=b"g" * 10, **sse(old))
    keys = keyfile_with(tmp_path / "k.toml", [old, new], new)
    real_copy = ObjectStore.copy

    async def copy_after_a_write(self: ObjectStore, src: str, *a: Any, **kw: Any) -> Any:
        if src == "f":  # the other client's write lands now
            await trio.to_thread.run_sync(partial(
                s3.put_object, Bucket=bucket, Key="f", Body=b"theirs", **sse(old)))
        return await real_copy(self, src, *a, **kw)

    monkeypatch.setattr(ObjectStore, "copy", copy_after_a_write)
    kf = KeyFile.load(keys)
    tally, _ = await rekey(_cfg(rgw, bucket, keys), kf, kf.by_id("new"))  # type: ignore[arg-type]
    assert tally.changed == ["f"] and tally.rekeyed == 1 and not tally.failed
    assert s3.get_object(Bucket=bucket, Key="f", **sse(old))["Body"].read() == b"theirs"
    assert s3.get_object(Bucket=bucket, Key="g", **sse(new))["Body"].read() == b"g" * 10
    assert [u for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == []


async def test_rekey_skips_a_file_changed_between_listing_and_its_head(
        rgw: Rgw, bucket: str, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    old, new = new_key("old"), new_key("new")
    s3.put_object(Bucket=bucket, Key="f", Body=b"listed", **sse(old))
    keys = keyfile_with(tmp_path / "k.toml", [old, new], new)
    real_head = KeyRing.head

    async def head_after_a_write(self: KeyRing, rel: str, s3key: str, *a: Any,
                                 **kw: Any) -> Any:
        await trio.to_thread.run_sync(partial(
            s3.put_object, Bucket=bucket, Key=s3key, Body=b"theirs", **sse(old)))
        return await real_head(self, rel, s3key, *a, **kw)

    monkeypatch.setattr(KeyRing, "head", head_after_a_write)
    kf = KeyFile.load(keys)
    tally, _ = await rekey(_cfg(rgw, bucket, keys), kf, kf.by_id("new"))  # type: ignore[arg-type]
    assert tally.changed == ["f"] and tally.rekeyed == 0
    assert s3.get_object(Bucket=bucket, Key="f", **sse(old))["Body"].read() == b"theirs"


@pytest.mark.allow_warnings  # the failed run logs its failure
def test_an_interrupted_rekey_of_a_versioned_bucket_keeps_the_map_of_what_it_did(
        rgw: Rgw, bucket: str, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old, new = new_key("old"), new_key("new")
    for i in range(4):
        s3.put_object(Bucket=bucket, Key=f"v{i}", Body=b"x" * (10 + i), **sse(old))
    keys = keyfile_with(tmp_path / "k.toml", [old, new], new)
    real_copy = ObjectStore.copy
    done: list[str] = []

    async def copy_then_die(self: ObjectStore, src: str, *a: Any, **kw: Any) -> Any:
        if len(done) == 2:
            raise KeyboardInterrupt  # the run is stopped here
        r = await real_copy(self, src, *a, **kw)
        done.append(src)
        return r

    monkeypatch.setattr(ObjectStore, "copy", copy_then_die)
    kf = KeyFile.load(keys)
    with pytest.raises((KeyboardInterrupt, BaseExceptionGroup)):
        trio.run(partial(rekey, _cfg(rgw, bucket, keys), kf, kf.by_id("new"), jobs=1))
    entries = KeyFile.load(keys).map
    assert {e.path for e in entries} == set(done) and len(done) == 2
    for e in entries:  # the replaced version is still readable with the map's key
        assert e.key == "old" and e.version
        assert s3.get_object(Bucket=bucket, Key=e.path, VersionId=e.version,
                             **sse(old))["Body"].read().startswith(b"x")


def test_rekey_cli_reports_what_changed(rgw: Rgw, bucket: str, s3: Any, tmp_path: Path) -> None:
    """Nothing changes meanwhile here: the summary line says so (0 changed meanwhile)."""
    old, new = new_key("old"), new_key("new")
    s3.put_object(Bucket=bucket, Key="a", Body=b"a", **sse(old))
    keys = keyfile_with(tmp_path / "k.toml", [old, new], new)
    r = subprocess.run([*S3SSEFS, "rekey", bucket, "--keyfile", str(keys), "--endpoint",
                        rgw.endpoint, "--ca-bundle", str(rgw.ca)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 re-encrypted" in r.stdout and "0 changed meanwhile" in r.stdout
