"""Test fixtures: a real Ceph RGW (started once per session), a fresh bucket per test, keys,
and a log check that fails any test whose logs carry key material or unexpected warnings.

The server comes from ``tests/rgw-up.sh`` (idempotent: reuses a running cluster). If it cannot
start, every test that needs it fails loudly — nothing is skipped.

A test (or module) marked ``servers("rgw", "localstack")`` runs once per server: the ``rgw``
fixture is then also the second S3 implementation of ``tests/s3second-up.sh`` (LocalStack's S3
provider, which answers SSE-C as AWS documents it), so the code is not shaped by one server's
answers.  Where the two legitimately differ, the test says which answer each gives
(``rgw.name``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from s3ssefs.keys import Key, KeyFile

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RGW_DIR = Path(os.environ.get("S3SSEFS_RGW_DIR", "/tmp/s3ssefs-rgw"))
SECOND_DIR = Path(os.environ.get("S3SSEFS_SECOND_DIR", "/tmp/s3ssefs-second"))
SERVERS = ("rgw", "localstack")

# every key a test made: the log check looks for all of their forms
_TEST_KEYS: list[bytes] = []


@dataclass
class Rgw:
    """An S3 server the tests run against (Ceph RGW, or the second one: ``name``)."""

    endpoint: str
    http_endpoint: str
    ca: Path
    access_key: str
    secret_key: str
    env: dict[str, str]
    name: str = "rgw"

    def client(self, **config: Any) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, verify=str(self.ca),
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required", **config))


def _start_rgw() -> Rgw:
    proc = subprocess.run(["bash", str(HERE / "rgw-up.sh"), str(RGW_DIR)], capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"tests/rgw-up.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}",
                    pytrace=False)
    env: dict[str, str] = {}
    for line in (RGW_DIR / "env.sh").read_text().splitlines():
        if line.startswith("export "):
            k, _, v = line[7:].partition("=")
            env[k] = v
    return Rgw(endpoint=env["S3_ENDPOINT"], http_endpoint=env["S3_HTTP_ENDPOINT"],
               ca=Path(env["AWS_CA_BUNDLE"]), access_key=env["AWS_ACCESS_KEY_ID"],
               secret_key=env["AWS_SECRET_ACCESS_KEY"], env=env)


def _start_second(rgw: Rgw) -> Rgw:
    proc = subprocess.run(["bash", str(HERE / "s3second-up.sh"), str(SECOND_DIR)],
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"tests/s3second-up.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}",
                    pytrace=False)
    env: dict[str, str] = {}
    for line in (SECOND_DIR / "env.sh").read_text().splitlines():
        if line.startswith("export "):
            k, _, v = line[7:].partition("=")
            env[k] = v
    # LocalStack takes any credentials: the daemons under test keep RGW's from the environment
    endpoint = env["S3SECOND_ENDPOINT"]
    return Rgw(endpoint=endpoint, http_endpoint=endpoint.replace("https://", "http://"),
               ca=Path(env["S3SECOND_CA_BUNDLE"]), access_key=rgw.access_key,
               secret_key=rgw.secret_key, env=rgw.env, name="localstack")


@pytest.fixture(scope="session")
def ceph_rgw() -> Rgw:
    r = _start_rgw()
    # the daemons and CLI under test find credentials the usual boto3 way
    os.environ.update({k: v for k, v in r.env.items() if k.startswith("AWS_")})
    return r


@pytest.fixture(scope="session")
def second_server(ceph_rgw: Rgw) -> Rgw:
    return _start_second(ceph_rgw)


@pytest.fixture(scope="session")
def rgw(request: pytest.FixtureRequest) -> Rgw:
    """The server under test: Ceph RGW, or per ``servers`` marker each of :data:`SERVERS`."""
    name = getattr(request, "param", "rgw")
    return request.getfixturevalue("ceph_rgw" if name == "rgw" else "second_server")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("servers")
    if marker is not None and "rgw" in metafunc.fixturenames:
        names = list(marker.args or SERVERS)
        assert set(names) <= set(SERVERS), f"unknown servers {names}"
        metafunc.parametrize("rgw", names, indirect=True, scope="session", ids=names)


def _empty_bucket(client: Any, name: str) -> None:
    try:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
            items = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                     for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
            for i in range(0, len(items), 1000):
                client.delete_objects(Bucket=name, Delete={"Objects": items[i:i + 1000]})
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for u in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
        client.delete_bucket(Bucket=name)
    except client.exceptions.NoSuchBucket:
        pass


@pytest.fixture
def s3(rgw: Rgw) -> Any:
    return rgw.client()


@pytest.fixture
def bucket(rgw: Rgw, s3: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty bucket; emptied and removed afterwards (memstore keeps data in RAM)."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    _empty_bucket(s3, name)


def new_key(key_id: str = "k1") -> Key:
    raw = os.urandom(32)
    _TEST_KEYS.append(raw)
    return Key(key_id, raw)


@pytest.fixture
def key() -> Key:
    return new_key("k1")


@pytest.fixture
def other_key() -> Key:
    return new_key("k2")


@pytest.fixture
def keyfile(tmp_path: Path, key: Key) -> Path:
    """A valid key file (mode 0600) whose current key is ``key``."""
    kf = KeyFile.generate("k1")
    kf.keys.clear()
    kf.keys[key.id] = key
    kf.current = key.id
    path = tmp_path / "keys.toml"
    kf.save(path)
    return path


def sse(key: Key) -> dict[str, str]:
    """boto3 parameters that read or write an object with ``key`` (SSE-C)."""
    return {"SSECustomerAlgorithm": "AES256",
            "SSECustomerKey": base64.b64encode(key.raw).decode(),
            "SSECustomerKeyMD5": key.fingerprint}


def bucket_sha(s3: Any, bucket: str, name: str, key: Key) -> str | None:
    """sha256 of the object read with the key (SSE-C), None while it does not exist."""
    try:
        body = s3.get_object(Bucket=bucket, Key=name, **sse(key))["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return hashlib.sha256(body).hexdigest()


def wait_for(pred: Callable[[], Any], timeout: float, step: float = 0.5) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds have passed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def key_forms(raw: bytes) -> list[bytes]:
    """Every spelling of a key that could leak: raw, base64, hex."""
    return [raw, base64.b64encode(raw), raw.hex().encode(), base64.urlsafe_b64encode(raw),
            repr(raw)[2:-1].encode()]


def assert_no_key_material(data: bytes, where: str) -> None:
    for raw in _TEST_KEYS:
        for form in key_forms(raw):
            assert form not in data, f"key material found in {where}"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.text.append(self.format(record))


@pytest.fixture(autouse=True)
def log_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose log (at DEBUG, botocore included, whole test: set-up, call and
    teardown) holds key material, or that logs an unexpected WARNING or worse from s3ssefs
    (mark the test ``allow_warnings`` to expect it)."""
    from s3ssefs.logsetup import RedactingFilter

    handler = _Collect()
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert_no_key_material("\n".join(handler.text).encode("utf-8", "surrogateescape"),
                           "test log")
    if request.node.get_closest_marker("allow_warnings") is None:
        bad = [r for r in handler.records
               if r.levelno >= logging.WARNING and r.name.startswith("s3ssefs")]
        assert not bad, "unexpected warnings: " + "; ".join(r.getMessage() for r in bad)


# ---------------------------------------------------------------------- mounts
S3SSEFS = [sys.executable, "-m", "s3ssefs"]


@dataclass
class Mounted:
    """A real s3ssefs daemon serving ``path`` (background mode, as users run it)."""

    bucket: str
    path: Path
    keyfile: Path
    cache_dir: Path
    log_file: Path
    extra: list[str]
    rgw: Rgw

    def argv(self) -> list[str]:
        return [*S3SSEFS, "mount", self.bucket, str(self.path), "--keyfile", str(self.keyfile),
                "--endpoint", self.rgw.endpoint, "--ca-bundle", str(self.rgw.ca),
                "--cache-dir", str(self.cache_dir), "--log-file", str(self.log_file),
                "--log-level", "debug", *self.extra]

    def mount(self) -> None:
        r = subprocess.run(self.argv(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"mount failed: {r.stderr.strip()}\n{self.log_tail()}"
        assert os.path.ismount(self.path)

    def umount(self) -> None:
        r = subprocess.run([*S3SSEFS, "umount", str(self.path)], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"umount failed: {r.stderr.strip()}\n{self.log_tail()}"
        assert not os.path.ismount(self.path)

    def remount(self) -> None:
        self.umount()
        self.mount()

    @property
    def pid(self) -> int:
        import json

        from s3ssefs.daemon import registry_path

        return int(json.loads(registry_path(self.path).read_text())["pid"])

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def force_cleanup(self) -> None:
        if os.path.ismount(self.path) or _stale(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)


def _stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == 107  # ENOTCONN
    return False


def mount_stats(m: Mounted) -> dict[str, Any]:
    """What ``s3ssefs stats --json`` says of a mount (counters and gauges)."""
    r = subprocess.run([*S3SSEFS, "stats", "--json", str(m.path)], capture_output=True,
                       text=True, check=True, timeout=60)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def mount_factory(rgw: Rgw, tmp_path: Path, keyfile: Path) -> Iterator[Any]:
    made: list[Mounted] = []

    def make(bucket: str, *extra: str, keys: Path | None = None, mount: bool = True,
             ) -> Mounted:
        n = len(made)
        mnt = tmp_path / f"mnt{n}"
        mnt.mkdir()
        m = Mounted(bucket=bucket, path=mnt, keyfile=keys or keyfile,
                    cache_dir=tmp_path / f"cache{n}", log_file=tmp_path / f"daemon{n}.log",
                    extra=list(extra), rgw=rgw)
        made.append(m)
        if mount:
            m.mount()
        return m

    yield make
    problems = []
    for m in made:
        if os.path.ismount(m.path):
            r = subprocess.run([*S3SSEFS, "umount", str(m.path)], capture_output=True,
                               text=True, timeout=600)
            if r.returncode != 0:
                problems.append(f"umount {m.path}: {r.stderr.strip()}")
        m.force_cleanup()
        if m.log_file.exists():
            assert_no_key_material(m.log_file.read_bytes(), f"daemon log {m.log_file}")
    assert not problems, "; ".join(problems)


@pytest.fixture
def mnt(mount_factory: Any, bucket: str) -> Mounted:
    """The bucket mounted with the test key file."""
    return mount_factory(bucket)
