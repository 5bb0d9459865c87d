"""Layer 4: encryption modes — every write verified, SSE-S3 / SSE-KMS, presigned URLs.

What a user cares about here:

* a server that answers a write without echoing the encryption it was asked for has stored
  plaintext (s3fs 1.90 on Ceph 16 never noticed): the write fails with EIO and nothing readable
  stays in the bucket.  A fault-injecting HTTPS proxy between us and RGW strips the echo
  headers, so the test sees exactly what such a server would send;
* ``sse=kms:ID`` mounts with no key file, every object it writes is SSE-KMS under that key, and
  anyone with credentials reads it without key headers;
* ``sse=s3`` is refused at mount time on Ceph 16, which accepts ``AES256`` and ignores it (and
  works where the server honours it: LocalStack, AWS);
* ``s3ssefs presign`` prints a URL that works only together with the SSE-C headers, never
  contains the key, and a ready curl line that fetches or uploads the exact bytes.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.exceptions import ClientError
from conftest import S3SSEFS, Rgw, assert_no_key_material
from faultproxy import S3Proxy

from s3ssefs.config import MountConfig
from s3ssefs.errors import FsError
from s3ssefs.keys import Key
from s3ssefs.store import ObjectStore, _same_kms_key

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.servers()  # RGW and LocalStack's S3 (see conftest)
MiB = 1 << 20
KMS_KEY = "testkey-1"  # rgw_crypt_s3_kms_encryption_keys in tests/rgw-up.sh


# --- a proxy that makes RGW look like a server storing plaintext ----------------------------


class EchoStrippingProxy(S3Proxy):
    """:class:`faultproxy.S3Proxy` to the server, dropping every
    ``x-amz-server-side-encryption*`` response header while ``strip`` is set: a server that
    stores what it is sent in plaintext and says nothing of keys."""

    def __init__(self, rgw: Rgw, workdir: Path) -> None:
        super().__init__(rgw.endpoint, rgw.ca, workdir)
        self.strip = True
        self.stripped = 0

    def _answer_after(self, method: str, path: str, keyed: bool, status: int,
                      headers: list[tuple[str, str]], data: bytes,
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        status, headers, data = super()._answer_after(method, path, keyed, status, headers,
                                                      data)
        if self.strip:
            kept = [(k, v) for k, v in headers
                    if not k.lower().startswith("x-amz-server-side-encryption")]
            with self._lock:
                self.stripped += len(headers) - len(kept)
            headers = kept
        return status, headers, data


@pytest.fixture
def proxy(rgw: Rgw, tmp_path: Path) -> Iterator[EchoStrippingProxy]:
    p = EchoStrippingProxy(rgw, tmp_path / "proxy-tls")
    yield p
    p.close()


def make_store(endpoint: str, rgw: Rgw, bucket: str, **kw: Any) -> ObjectStore:
    opts: dict[str, Any] = {"bucket": bucket, "endpoint": endpoint, "ca_bundle": rgw.ca,
                            "keyfile": Path("/unused"), "part_size": 5 * MiB,
                            "multipart_threshold": 5 * MiB}
    opts.update(kw)
    return ObjectStore(MountConfig(**opts))


def keys_in(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def sse(key: Key) -> dict[str, Any]:
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key.raw}


def assert_sealed(s3: Any, bucket: str, name: str, key: Key, body: bytes) -> None:
    """Unreadable without the key, exactly ``body`` with it."""
    with pytest.raises(ClientError) as ei:
        s3.get_object(Bucket=bucket, Key=name)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 403)
    r = s3.get_object(Bucket=bucket, Key=name, **sse(key))
    assert r["SSECustomerKeyMD5"] == key.fingerprint
    assert r["Body"].read() == body


async def expect_eio(coro: Any) -> FsError:
    with pytest.raises(FsError) as ei:
        await coro
    assert ei.value.errno == errno.EIO, str(ei.value)
    return ei.value


# --- 1. every write is verified --------------------------------------------------------------


@pytest.mark.allow_warnings
async def test_put_without_echo_fails_and_the_plaintext_is_deleted(
        rgw, proxy, bucket, s3, key) -> None:
    store = make_store(proxy.endpoint, rgw, bucket)
    err = await expect_eio(store.put("f.txt", b"secret data", key))
    assert "did not confirm SSE-C" in str(err)
    assert proxy.stripped > 0
    assert keys_in(s3, bucket) == []

    proxy.strip = False  # the same store through an honest server works
    await store.put("f.txt", b"secret data", key)
    assert_sealed(s3, bucket, "f.txt", key, b"secret data")


@pytest.mark.allow_warnings
async def test_multipart_without_echo_fails_and_the_upload_is_aborted(
        rgw, proxy, bucket, s3, key) -> None:
    store = make_store(proxy.endpoint, rgw, bucket)
    await expect_eio(store.create_multipart("big.bin", key))
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    # a part the server does not vouch for fails too (the caller then aborts)
    direct = make_store(rgw.endpoint, rgw, bucket)
    upload_id = await direct.create_multipart("big.bin", key)
    await expect_eio(store.upload_part("big.bin", upload_id, 1, os.urandom(MiB), key))
    await direct.abort_multipart("big.bin", upload_id)
    assert keys_in(s3, bucket) == []


@pytest.mark.allow_warnings
async def test_copy_without_echo_fails_and_leaves_no_target(rgw, proxy, bucket, s3, key) -> None:
    body = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="src", Body=body, **sse(key))
    store = make_store(proxy.endpoint, rgw, bucket)
    # CopyObject (501 on RGW) and then the multipart copy: neither is confirmed
    await expect_eio(store.copy("src", "dst", key, key, {"mode": "33188"}, len(body)))
    assert keys_in(s3, bucket) == ["src"]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert_sealed(s3, bucket, "src", key, body)


def test_mounted_write_without_echo_fails_close_with_eio(
        rgw, proxy, bucket, s3, key, mount_factory) -> None:
    # a server that does not echo SSE-C is refused at mount: the mount tries its first write
    refused = mount_factory(bucket, "--endpoint", proxy.endpoint, mount=False)
    r = subprocess.run(refused.argv(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "did not confirm sse=c" in r.stderr, r.stderr
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # one that stops echoing later fails close() with EIO
    proxy.strip = False
    m = mount_factory(bucket, "--endpoint", proxy.endpoint)
    proxy.strip = True
    path = m.path / "f.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"secret data")
    with pytest.raises(OSError) as ei:
        os.close(fd)
    assert ei.value.errno == errno.EIO
    assert keys_in(s3, bucket) == []
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    # the data was kept, not dropped: once the server is honest it goes up, encrypted
    proxy.strip = False
    m.umount()
    assert keys_in(s3, bucket) == ["f.txt"]
    assert_sealed(s3, bucket, "f.txt", key, b"secret data")


# --- 2. provider-managed encryption ----------------------------------------------------------


def test_kms_key_ids_match_as_aws_echoes_them() -> None:
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab"
    assert _same_kms_key("1234abcd-12ab", arn)
    assert _same_kms_key(arn, "1234abcd-12ab")
    assert _same_kms_key("testkey-1", "testkey-1")
    assert _same_kms_key("alias/backup", arn)  # an alias names whatever key it points to
    assert not _same_kms_key("testkey-1", "testkey-2")
    assert not _same_kms_key("testkey-1", None)


async def test_store_kms_writes_are_confirmed(rgw, bucket, s3) -> None:
    store = make_store(rgw.endpoint, rgw, bucket, keyfile=None, sse=f"kms:{KMS_KEY}")
    body = os.urandom(200_000)
    info = await store.put("k.bin", body, None)
    assert info.sse == "aws:kms"
    head = s3.head_object(Bucket=bucket, Key="k.bin")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert _same_kms_key(KMS_KEY, head["SSEKMSKeyId"])  # LocalStack, as AWS: the ARN
    # reads need no key headers at all
    assert await store.get_range("k.bin", 0, len(body), None) == body
    # RGW answers CopyObject of a KMS source with 501; the multipart copy works, under KMS
    await store.copy("k.bin", "k2.bin", None, None, {"mode": "33188"}, len(body))
    head = s3.head_object(Bucket=bucket, Key="k2.bin")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert _same_kms_key(KMS_KEY, head["SSEKMSKeyId"])  # LocalStack, as AWS: the ARN
    assert head["Metadata"] == {"mode": "33188"}
    assert s3.get_object(Bucket=bucket, Key="k2.bin")["Body"].read() == body


@pytest.mark.allow_warnings
async def test_store_kms_write_without_echo_fails(rgw, proxy, bucket, s3) -> None:
    store = make_store(proxy.endpoint, rgw, bucket, keyfile=None, sse=f"kms:{KMS_KEY}")
    err = await expect_eio(store.put("k.bin", b"data", None))
    assert "aws:kms" in str(err)
    assert keys_in(s3, bucket) == []


def _argv_without_keyfile(argv: list[str]) -> list[str]:
    i = argv.index("--keyfile")
    return argv[:i] + argv[i + 2:]


def test_kms_mount_needs_no_key_file_and_writes_kms(rgw, bucket, s3, mount_factory) -> None:
    m = mount_factory(bucket, "--sse", f"kms:{KMS_KEY}", "--part-size", "5M",
                      "--multipart-threshold", "5M", mount=False)
    r = subprocess.run(_argv_without_keyfile(m.argv()), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"{r.stderr}\n{m.log_tail()}"
    assert os.path.ismount(m.path)
    small, big = os.urandom(10_000), os.urandom(11 * MiB)
    (m.path / "small.txt").write_bytes(small)
    (m.path / "big.bin").write_bytes(big)
    (m.path / "d").mkdir()
    os.rename(m.path / "small.txt", m.path / "d" / "moved.txt")
    os.chmod(m.path / "big.bin", 0o600)
    m.umount()

    assert sorted(keys_in(s3, bucket)) == ["big.bin", "d/", "d/moved.txt"]  # no probe left
    for name, body in (("d/moved.txt", small), ("big.bin", big)):
        head = s3.head_object(Bucket=bucket, Key=name)
        assert head["ServerSideEncryption"] == "aws:kms", name
        assert _same_kms_key(KMS_KEY, head["SSEKMSKeyId"])
        assert "SSECustomerKeyMD5" not in head
        assert s3.get_object(Bucket=bucket, Key=name)["Body"].read() == body
    assert int(s3.head_object(Bucket=bucket, Key="big.bin")["Metadata"]["mode"]) & 0o777 == 0o600

    m.mount()  # a key file passed along with sse=kms is simply not used
    assert (m.path / "d" / "moved.txt").read_bytes() == small
    assert (m.path / "big.bin").read_bytes() == big
    (m.path / "again.txt").write_bytes(b"again")
    m.umount()
    head = s3.head_object(Bucket=bucket, Key="again.txt")
    assert (head["ServerSideEncryption"], head.get("SSECustomerKeyMD5")) == ("aws:kms", None)


def test_sse_s3_mount_is_refused_where_the_server_ignores_it(
        rgw, bucket, s3, mount_factory) -> None:
    m = mount_factory(bucket, "--sse", "s3", mount=False)
    r = subprocess.run(_argv_without_keyfile(m.argv()), capture_output=True, text=True,
                       timeout=120)
    if rgw.name != "rgw":  # LocalStack honours SSE-S3: the mount works and its writes say so
        assert r.returncode == 0, r.stderr
        (m.path / "s3.txt").write_bytes(b"sse-s3")
        m.umount()
        head = s3.head_object(Bucket=bucket, Key="s3.txt")
        assert (head["ServerSideEncryption"], head.get("SSECustomerKeyMD5")) == ("AES256", None)
        assert keys_in(s3, bucket) == ["s3.txt"]
        return
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "s3ssefs: server ignores SSE-S3 (no encryption echoed): objects would be stored "
        "unencrypted; use sse=c or sse=kms:KEYID"]
    assert not os.path.ismount(m.path)
    assert keys_in(s3, bucket) == []  # the probe did not stay

    # nothing is written by a read-only mount, so there is nothing to refuse
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"plain")
    ro = mount_factory(bucket, "--sse", "s3", "--read-only", mount=False)
    r = subprocess.run(_argv_without_keyfile(ro.argv()), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (ro.path / "plain.txt").read_bytes() == b"plain"


# --- 3. presigned URLs -----------------------------------------------------------------------


def presign(*args: str) -> tuple[str, str, str]:
    """(URL, curl line, whole output) of ``s3ssefs presign``."""
    r = subprocess.run([*S3SSEFS, "presign", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    curl = [ln.strip() for ln in lines if ln.strip().startswith("curl ")]
    assert len(curl) == 1, r.stdout
    return lines[0], curl[0], r.stdout


def test_presign_example_of_the_manual_runs(bucket, key, mnt, tmp_path) -> None:
    """The presign line of s3ssefs(1)'s EXAMPLES, run as printed (naming this test's file):
    it fetches the file's exact bytes, and fails loudly if it cannot."""
    page = subprocess.run(["mandoc", "-T", "ascii", "-O", "width=250",
                           str(ROOT / "man" / "s3ssefs.1")], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    page = re.sub(r".\x08", "", page)
    (line,) = [ln.strip() for ln in page.splitlines() if ln.strip().startswith("$ s3ssefs presign")]
    assert "~/photos/2026/beach.jpg" in line
    body = os.urandom(300_000)
    (mnt.path / "beach.jpg").write_bytes(body)
    command = line[2:].replace("~/photos/2026/beach.jpg", shlex.quote(str(mnt.path / "beach.jpg")))
    work = tmp_path / "client"
    work.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (work / "beach.jpg").read_bytes() == body


def curl_status(*args: str) -> int:
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *args],
                       capture_output=True, text=True, timeout=60)
    return int(r.stdout)


def test_presigned_get_needs_the_headers_and_never_holds_the_key(
        rgw, bucket, s3, key, mnt, tmp_path) -> None:
    body = os.urandom(300_000)
    (mnt.path / "dir").mkdir()
    (mnt.path / "dir" / "report.pdf").write_bytes(body)

    url, curl, out = presign(str(mnt.path / "dir" / "report.pdf"), "--expires", "2h")
    assert_no_key_material(out.encode(), "presign output")
    assert "customer-key=" not in url.lower()
    q = parse_qs(urlsplit(url).query)
    assert q["X-Amz-Expires"] == ["7200"]
    assert set(q["X-Amz-SignedHeaders"][0].split(";")) >= {
        "x-amz-server-side-encryption-customer-algorithm",
        "x-amz-server-side-encryption-customer-key",
        "x-amz-server-side-encryption-customer-key-md5"}
    assert f"x-amz-server-side-encryption-customer-key-MD5: {key.fingerprint}" in out

    # the printed curl line, run as is, fetches the exact bytes
    work = tmp_path / "client"
    work.mkdir()
    r = subprocess.run(["bash", "-c", curl], cwd=work, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (work / "report.pdf").read_bytes() == body

    # the URL alone is refused; so is the URL with a wrong key
    assert 400 <= curl_status("--cacert", str(rgw.ca), url) < 500
    wrong = os.urandom(32)
    bad = ["x-amz-server-side-encryption-customer-algorithm: AES256",
           f"x-amz-server-side-encryption-customer-key: {base64.b64encode(wrong).decode()}",
           "x-amz-server-side-encryption-customer-key-MD5: "
           + base64.b64encode(hashlib.md5(wrong, usedforsecurity=False).digest()).decode()]
    headers = [arg for h in bad for arg in ("-H", h)]
    assert 400 <= curl_status("--cacert", str(rgw.ca), *headers, url) < 500


def test_presigned_put_uploads_sse_c_data(rgw, bucket, s3, key, mnt, tmp_path) -> None:
    body = os.urandom(123_456)
    work = tmp_path / "client"
    work.mkdir()
    (work / "upload.bin").write_bytes(body)
    (mnt.path / "in").mkdir()

    url, curl, out = presign(str(mnt.path / "in" / "upload.bin"), "--put")
    assert_no_key_material(out.encode(), "presign output")
    assert " -T upload.bin " in f" {curl} "
    if rgw.name == "rgw":  # LocalStack checks no signature: the URL alone works there
        assert 400 <= curl_status("--cacert", str(rgw.ca), "-T", str(work / "upload.bin"),
                                  url) < 500
        assert keys_in(s3, bucket) == ["in/"]

    r = subprocess.run(["bash", "-c", curl], cwd=work, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert_sealed(s3, bucket, "in/upload.bin", key, body)


def test_presign_refuses_paths_outside_a_mount(tmp_path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    r = subprocess.run([*S3SSEFS, "presign", str(tmp_path / "f")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"s3ssefs: {tmp_path / 'f'} is not under a running s3ssefs mount"]


def test_presign_on_a_kms_mount(rgw, bucket, s3, mount_factory, tmp_path) -> None:
    m = mount_factory(bucket, "--sse", f"kms:{KMS_KEY}")
    (m.path / "r.txt").write_bytes(b"kms data")
    url, curl, out = presign(str(m.path / "r.txt"))
    assert "No extra headers needed." in out
    assert subprocess.run(["curl", "-sf", "--cacert", str(rgw.ca), url], capture_output=True,
                          timeout=60).stdout == b"kms data"

    work = tmp_path / "client"
    work.mkdir()
    (work / "up.txt").write_bytes(b"uploaded")
    url, curl, out = presign(str(m.path / "up.txt"), "--put")
    assert "x-amz-server-side-encryption: aws:kms" in out
    r = subprocess.run(["bash", "-c", curl], cwd=work, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    head = s3.head_object(Bucket=bucket, Key="up.txt")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert _same_kms_key(KMS_KEY, head["SSEKMSKeyId"])  # LocalStack, as AWS: the ARN
