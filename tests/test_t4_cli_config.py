"""Bad configuration is one line naming the thing, from the command itself, before any daemon;
the daemon's log never goes into the void and is private; and the smaller promises of the
command line: ``-o ro,rw`` as mount(8) reads it, ``allow_http`` for loopback only, key files
that are plainly not key files, control characters in names that cannot forge log lines, and
``s3ssefs umount`` of a mount still in use.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import S3SSEFS, Mounted, Rgw, assert_no_key_material, bucket_sha, new_key

from s3ssefs.keys import Key, KeyFile
from s3ssefs.logsetup import setup_logging, syslog_available
from s3ssefs.runtime import mount_id, registry_path

pytestmark = pytest.mark.rgw
EX_CONFIG = 78


def run(*args: str | Path, input: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*S3SSEFS, *map(str, args)], input=input, capture_output=True,
                          env=env, timeout=timeout, text=input is None)


def one_line(r: subprocess.CompletedProcess[Any], status: int = 1) -> str:
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == status, f"exit {r.returncode}, expected {status}; stderr: {err!r}"
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {err!r}"
    return lines[0]


def without(argv: list[str], option: str) -> list[str]:
    i = argv.index(option)
    return argv[:i] + argv[i + 2:]


def refused_in_foreground(m: Mounted, argv: list[str], env: dict[str, str] | None = None,
                          ) -> str:
    """Refused with one line by the command itself: no daemon ever started (it would have
    created the log file), nothing mounted."""
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    line = one_line(r, EX_CONFIG)  # mount's status for unusable options (systemd stops there)
    assert not os.path.ismount(m.path)
    assert not m.log_file.exists(), f"a daemon was started: {m.log_tail()}"
    return line


def test_bad_configuration_is_one_line_before_any_daemon(mount_factory: Any, bucket: str,
                                                         tmp_path: Path) -> None:
    m = mount_factory(bucket, mount=False)
    argv = m.argv()
    no_ca = without(argv, "--ca-bundle")
    env = dict(os.environ)

    line = refused_in_foreground(m, [*argv, "--profile", "nosuch"])
    assert "nosuch" in line and "profile" in line
    line = refused_in_foreground(m, argv, {**env, "AWS_PROFILE": "nosuch"})
    assert "nosuch" in line and "AWS_PROFILE" in line
    line = refused_in_foreground(m, no_ca, {**env, "AWS_CA_BUNDLE": ""})
    assert "AWS_CA_BUNDLE" in line and "empty" in line
    line = refused_in_foreground(m, no_ca, {**env, "AWS_CA_BUNDLE": "/nonexistent"})
    assert "AWS_CA_BUNDLE" in line and "/nonexistent" in line
    line = refused_in_foreground(m, [*argv, "--ca-bundle", "/etc/passwd"])
    assert "/etc/passwd" in line and "certificate" in line
    missing = tmp_path / "no-such-credentials"
    line = refused_in_foreground(m, [*argv, "--credentials-file", str(missing)])
    assert str(missing) in line
    line = refused_in_foreground(m, [*without(argv, "--keyfile"), "-o", "keyfile"])
    assert "keyfile" in line and "needs a value" in line

    home = tmp_path / "empty-home"
    home.mkdir()
    bare = {k: v for k, v in env.items()
            if not k.startswith("AWS_") or k in ("AWS_CA_BUNDLE", "AWS_DEFAULT_REGION")}
    bare.update(HOME=str(home), AWS_EC2_METADATA_DISABLED="true")
    line = refused_in_foreground(m, argv, bare)
    assert "no credentials found" in line and str(home) not in line and "~/.aws" in line


def test_credentials_file_wins_over_the_environment(mount_factory: Any, bucket: str,
                                                    tmp_path: Path, rgw: Rgw) -> None:
    """--credentials-file names where the credentials come from: AWS_ACCESS_KEY_ID in the
    environment (here bogus) no longer takes their place."""
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {rgw.access_key}\n"
                     f"aws_secret_access_key = {rgw.secret_key}\n")
    creds.chmod(0o600)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "BOGUSBOGUSBOGUS", "AWS_SECRET_ACCESS_KEY": "no"}
    m = mount_factory(bucket, "--credentials-file", str(creds), mount=False)
    r = subprocess.run(m.argv(), capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, f"{r.stderr}\n{m.log_tail()}"
    (m.path / "f").write_bytes(b"via the credentials file\n")
    m.umount()


def test_log_file_is_private(mnt: Mounted) -> None:
    assert stat.S_IMODE(mnt.log_file.stat().st_mode) == 0o600


def test_background_daemon_never_logs_into_the_void(mount_factory: Any, bucket: str) -> None:
    m = mount_factory(bucket, mount=False)
    argv = without(m.argv(), "--log-file")
    r = subprocess.run([*argv, "--log-level", "info"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.path.ismount(m.path)
    log_file = m.cache_dir / mount_id(m.path) / "daemon.log"
    if syslog_available():
        assert r.stderr == "" and not log_file.exists()
        return
    assert r.stderr.strip() == f"s3ssefs: no syslog socket (/dev/log): the daemon logs to " \
                               f"{log_file}"
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert f"mounted s3://{bucket}" in log_file.read_text()
    m.umount()
    assert_no_key_material(log_file.read_bytes(), str(log_file))


def test_allow_http_only_for_loopback(mount_factory: Any, bucket: str) -> None:
    m = mount_factory(bucket, mount=False)
    for url in ("http://192.0.2.1", "http://example.com:7480", "http://[2001:db8::1]:80"):
        line = refused_in_foreground(m, [*m.argv(), "--allow-http", "--endpoint", url])
        assert "loopback" in line and url in line


@pytest.mark.parametrize(("opts", "read_only"), [("ro,rw", False), ("rw,ro", True)])
def test_rw_ro_last_one_wins(mount_factory: Any, bucket: str, opts: str,
                             read_only: bool) -> None:
    m = mount_factory(bucket, "-o", opts)
    if read_only:
        with pytest.raises(OSError) as e:
            (m.path / "f").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
    else:
        (m.path / "f").write_bytes(b"x")
        assert (m.path / "f").read_bytes() == b"x"


def test_key_file_too_large_or_url_safe(tmp_path: Path, key: Key) -> None:
    big = tmp_path / "big.toml"
    KeyFile({key.id: key}, key.id).save(big)
    with open(big, "a") as f:
        f.write("# padding\n" * 7000)  # 70 KB of comments: a valid TOML file, not a key file
    line = one_line(run("keys", "list", big))
    assert "too large" in line and str(big) in line

    # a key whose standard base64 has a + or /, written URL-safe
    while b"+" not in (std := base64.b64encode(raw := new_key().raw)) and b"/" not in std:
        pass
    url = base64.urlsafe_b64encode(raw).decode()
    kf = tmp_path / "url.toml"
    kf.write_text(f'version = 1\ncurrent = "u"\n[keys]\n"u" = "{url}"\n')
    kf.chmod(0o600)
    assert "URL-safe" in one_line(run("keys", "list", kf))
    good = tmp_path / "good.toml"
    assert run("keygen", good).returncode == 0
    before = good.read_bytes()
    assert "URL-safe" in one_line(run("keys", "add", good, "--base64-stdin",
                                      input=url.encode() + b"\n"))
    assert good.read_bytes() == before


def test_control_characters_cannot_forge_log_lines(tmp_path: Path) -> None:
    log_file = tmp_path / "log"
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        setup_logging("INFO", log_file)
        logging.getLogger("s3ssefs.test").info("cannot read %s", "a\nERROR forged line\x01\u2028")
        try:
            raise ValueError("name b\nERROR forged in a traceback")
        except ValueError:
            logging.getLogger("s3ssefs.test").exception("failed on %s", "c\rd")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
    text = log_file.read_text()
    for line in text.splitlines():  # a record's first line, or an indented traceback line
        assert line[:4].isdigit() or line.startswith("  | "), text
    assert "a\\x0aERROR forged line\\x01\\u2028" in text
    assert "c\\x0dd" in text and "  | ERROR forged in a traceback" in text


@pytest.mark.allow_warnings
def test_listing_a_name_with_a_control_character_says_what_was_refused(
        mnt: Mounted, s3: Any, bucket: str, key: Key) -> None:
    s3.put_object(Bucket=bucket, Key="d\x01/x", Body=b"x")
    try:
        names = os.listdir(mnt.path)
        assert "d\x01" in names
        with pytest.raises(OSError) as e:
            os.listdir(mnt.path / "d\x01")
        assert e.value.errno == errno.EIO
    finally:  # DeleteObjects (XML) cannot name it: the bucket fixture could not remove it
        s3.delete_object(Bucket=bucket, Key="d\x01/x")
    log = mnt.log_file.read_text()
    assert "refused to list a prefix holding a control character" in log
    assert "d\\x01/" in log and "d\x01" not in log


def test_umount_of_a_mount_in_use(mnt: Mounted, bucket: str, s3: Any, key: Key) -> None:
    """A reader and a writer open: the writer's data is uploaded, then ``umount`` refuses
    with one line and exit 1 (as umount(8) with a busy filesystem); the mount keeps serving
    both; once they are closed it unmounts."""
    (mnt.path / "r.txt").write_bytes(b"read me\n")
    reader = open(mnt.path / "r.txt", "rb")  # noqa: SIM115
    writer = open(mnt.path / "w.txt", "wb")  # noqa: SIM115
    try:
        writer.write(b"written, not closed\n")
        writer.flush()
        r = run("umount", mnt.path)
        line = one_line(r)
        assert "busy" in line and "/r.txt" in line and "/w.txt" in line
        assert os.path.ismount(mnt.path)
        assert bucket_sha(s3, bucket, "w.txt", key) == \
            hashlib.sha256(b"written, not closed\n").hexdigest(), "writer's data not uploaded"
        assert reader.read() == b"read me\n"
        writer.write(b"more\n")
    finally:
        reader.close()
        writer.close()
    r = run("umount", mnt.path)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mnt.path)
    assert not registry_path(mnt.path).exists()
    assert bucket_sha(s3, bucket, "w.txt", key) == \
        hashlib.sha256(b"written, not closed\nmore\n").hexdigest()
