"""Keys over time: several keys on one bucket, per-version keys, point-in-time views, rekey.

Objects are put straight into RGW with boto3 under different SSE-C keys (as other tools and
earlier key rotations leave them); the real daemon and the real ``s3ssefs rekey`` command must
then read, show and re-encrypt them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import S3SSEFS, Rgw, mount_stats, new_key

from s3ssefs.keys import Key, KeyFile

pytestmark = [pytest.mark.mounted, pytest.mark.servers()]  # RGW and LocalStack (conftest)


def sse(k: Key) -> dict[str, Any]:
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": k.raw}


def write_keyfile(path: Path, keys: list[Key], current: Key,
                  mapping: list[tuple[str, str | None, str]] = ()) -> Path:  # type: ignore[assignment]
    kf = KeyFile({k.id: k for k in keys}, current.id)
    for p, v, kid in mapping:
        kf.add_map(p, v, kid)
    kf.save(path)
    return path


def s3ssefs(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*S3SSEFS, *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.allow_warnings  # the object no key opens is logged
def test_objects_under_three_keys_and_plain_all_read_and_learned_keys_persist(
        rgw: Rgw, bucket: str, s3: Any, tmp_path: Path, mount_factory: Any) -> None:
    a, b, c = new_key("a"), new_key("b"), new_key("c")
    stranger = new_key("not-in-file")
    content: dict[str, bytes] = {}
    for i, k in enumerate([a, b, c, None] * 3):
        name = f"d/obj{i}-{k.id if k else 'plain'}"
        content[name] = os.urandom(2000 + i)
        s3.put_object(Bucket=bucket, Key=name, Body=content[name], **(sse(k) if k else {}))
    s3.put_object(Bucket=bucket, Key="d/locked", Body=b"x" * 10, **sse(stranger))
    keys = write_keyfile(tmp_path / "k.toml", [a, b, c], current=c)

    m = mount_factory(bucket, keys=keys)
    listing = subprocess.run(["ls", "-l", str(m.path / "d")], capture_output=True, text=True)
    assert listing.returncode == 0
    assert "locked" in listing.stdout  # listed even though no key opens it
    for name, body in content.items():
        assert (m.path / name).read_bytes() == body
    with pytest.raises(PermissionError):
        (m.path / "d/locked").read_bytes()
    first = mount_stats(m)
    assert first.get("key_trials", 0) > 0  # objects under a and b needed a guess

    # a remount remembers which key opened what (by id, in the cache dir): no more guessing
    m.remount()
    for name, body in content.items():
        assert (m.path / name).read_bytes() == body
    second = mount_stats(m)
    assert second.get("key_trials", 0) == 0
    assert second["requests"].get("head", 0) <= len(content) + 2
    assert os.getxattr(m.path / "d/obj0-a", "user.s3ssefs.key") == b"a"
    assert os.getxattr(m.path / "d/obj3-plain", "user.s3ssefs.key") == b"none"


def _versions(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    vs = s3.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    return sorted((v for v in vs if v["Key"] == key), key=lambda v: v["LastModified"])


def test_three_versions_under_three_keys_through_as_of_and_the_map(
        rgw: Rgw, bucket: str, s3: Any, tmp_path: Path, mount_factory: Any) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    a, b, c = new_key("a"), new_key("b"), new_key("c")
    bodies = []
    for k in (a, b, c):
        body = f"version under {k.id}: ".encode() + os.urandom(3000)
        bodies.append(body)
        s3.put_object(Bucket=bucket, Key=f"only-{k.id}.txt", Body=body, **sse(k))
        s3.put_object(Bucket=bucket, Key="doc.txt", Body=body, **sse(k))
        # versions a whole second apart: AWS and LocalStack list LastModified to the second,
        # and --as-of picks the version by it
        time.sleep(1.05 - time.time() % 1.0)
    vs = _versions(s3, bucket, "doc.txt")
    assert len(vs) == 3
    # the map names each old version's key (by version, or by path): no trial needed
    keys = write_keyfile(tmp_path / "k.toml", [a, b, c], current=c,
                         mapping=[("doc.txt", vs[0]["VersionId"], "a"),
                                  ("doc.txt", vs[1]["VersionId"], "b"),
                                  ("only-a.txt", None, "a"), ("only-b.txt", None, "b")])
    for i, v in enumerate(vs):
        when = v["LastModified"].astimezone(dt.UTC).isoformat()
        m = mount_factory(bucket, "--as-of", when, keys=keys)
        assert (m.path / "doc.txt").read_bytes() == bodies[i]
        assert os.getxattr(m.path / "doc.txt", "user.s3ssefs.version") == \
            v["VersionId"].encode()
        assert os.getxattr(m.path / "doc.txt", "user.s3ssefs.key") == [b"a", b"b", b"c"][i]
        names = sorted(os.listdir(m.path))
        assert names == sorted(["doc.txt"] + [f"only-{k.id}.txt" for k in (a, b, c)[:i + 1]])
        assert mount_stats(m).get("key_trials", 0) == 0
        with pytest.raises(OSError):  # read-only view
            (m.path / "new.txt").write_bytes(b"no")
        m.umount()

    # a delete marker hides the object from views after it
    s3.delete_object(Bucket=bucket, Key="doc.txt")
    m = mount_factory(bucket, keys=keys)
    assert not (m.path / "doc.txt").exists()
    m.umount()
    later = dt.datetime.now(dt.UTC).isoformat()
    m = mount_factory(bucket, "--as-of", later, keys=keys)
    assert not (m.path / "doc.txt").exists()
    assert (m.path / "only-c.txt").read_bytes() == bodies[2]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _rekey_args(rgw: Rgw, bucket: str, keys: Path, *extra: str) -> list[str]:
    return ["rekey", bucket, "--keyfile", str(keys), "--endpoint", rgw.endpoint,
            "--ca-bundle", str(rgw.ca), "--part-size", "5M", *extra]


def test_rekey_two_hundred_objects_resumes_after_kill_and_dry_run_changes_nothing(
        rgw: Rgw, bucket: str, s3: Any, tmp_path: Path) -> None:
    old, new = new_key("old"), new_key("new")
    from concurrent.futures import ThreadPoolExecutor

    bodies: dict[str, bytes] = {}
    for i in range(200):
        size = (6 << 20) + i if i in (7, 150) else 500 + i  # two above the 5 MiB part size
        bodies[f"r/{i:03d}"] = os.urandom(size)
    meta = {"mode": "33188", "uid": "1000", "gid": "1000", "mtime": "1700000000"}

    def put(item: tuple[str, bytes]) -> None:
        s3.put_object(Bucket=bucket, Key=item[0], Body=item[1], Metadata=meta, **sse(old))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, bodies.items()))
    keys = write_keyfile(tmp_path / "k.toml", [old, new], current=new)

    etags = {k: s3.head_object(Bucket=bucket, Key=k, **sse(old))["ETag"] for k in bodies}
    r = s3ssefs(*_rekey_args(rgw, bucket, keys, "--dry-run"))
    assert r.returncode == 0, r.stderr
    assert "200 to re-encrypt" in r.stdout
    assert {k: s3.head_object(Bucket=bucket, Key=k, **sse(old))["ETag"] for k in bodies} == etags

    # start, let it get some way, kill it hard, run again
    # an object rekeyed is rewritten, so its LastModified changes: one LIST tells how far the
    # run got (its order is not the listing's). Stop it (SIGSTOP) once 40 are done, count
    # exactly, then kill it
    def listed() -> dict[str, Any]:
        r = s3.list_objects_v2(Bucket=bucket, Prefix="r/")
        return {o["Key"]: o["LastModified"] for o in r.get("Contents", [])}

    written = listed()  # before the run starts
    proc = subprocess.Popen([*S3SSEFS, *_rekey_args(rgw, bucket, keys, "--jobs", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def changed() -> int:
        return sum(1 for k, t in listed().items() if t != written[k])

    done_before = 0
    try:
        while proc.poll() is None:
            if changed() >= 40:
                proc.send_signal(signal.SIGSTOP)
                done_before = changed()
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 40 <= done_before < 200, done_before
    r = s3ssefs(*_rekey_args(rgw, bucket, keys))
    assert r.returncode == 0, r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    redone = int(summary.split(": ")[1].split(" re-encrypted")[0])
    skipped = int(summary.split("; ")[1].split(" already")[0])
    assert redone + skipped == 200
    assert skipped >= done_before  # nothing done before the kill was copied again
    assert "streamed" in summary or "server-side" in summary

    for k, body in bodies.items():
        got = s3.get_object(Bucket=bucket, Key=k, **sse(new))
        assert _sha(got["Body"].read()) == _sha(body)
        assert got["Metadata"] == meta
        for wrong in (None, old):
            with pytest.raises(ClientError):
                s3.head_object(Bucket=bucket, Key=k, **(sse(wrong) if wrong else {}))
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert all(u["Key"] in bodies for u in uploads)  # only what the SIGKILL left behind


def _opens_with(s3: Any, bucket: str, key: str, k: Key) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key, **sse(k))
        return True
    except ClientError:
        return False


def test_rekey_of_a_versioned_bucket_maps_the_old_versions(
        rgw: Rgw, bucket: str, s3: Any, tmp_path: Path) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old, new = new_key("old"), new_key("new")
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"v/{i}", Body=b"x" * (100 + i), **sse(old))
    s3.put_object(Bucket=bucket, Key="v/plain", Body=b"plain")
    keys = write_keyfile(tmp_path / "k.toml", [old, new], current=new)
    r = s3ssefs(*_rekey_args(rgw, bucket, keys))
    assert r.returncode == 0, r.stderr
    kf = KeyFile.load(keys)  # still valid
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    mapped = {(e.path, e.version): e.key for e in kf.map}
    for i in range(3):
        vs = _versions(s3, bucket, f"v/{i}")
        assert len(vs) == 2
        # the replaced one (not the latest: both may carry the same second, as on LocalStack)
        replaced = next(v for v in vs if not v["IsLatest"])
        assert mapped[(f"v/{i}", replaced["VersionId"])] == "old"
        assert _opens_with(s3, bucket, f"v/{i}", new)
    # the plain object is encrypted in place
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key="v/plain")
    assert s3.get_object(Bucket=bucket, Key="v/plain", **sse(new))["Body"].read() == b"plain"
