"""The installed unit under a real systemd: ``s3ssefs@NAME.service`` started, used and stopped.

s3ssefs is installed for real (``make install`` into the default PREFIX, ``make uninstall``
afterwards), and a real systemd boots as PID 1 of new namespaces (``tests/systemd-sandbox.sh``:
the machine's own PID 1 need not be systemd) with the installed unit directory on its unit
path, sharing the host's network (the test RGW on loopback) and file systems.  The mount point
is a shared mount, so the FUSE mount the unit makes is the host's too: files are written from
here, as an operator's programs would.  systemd is driven with ``systemctl`` through
``nsenter``, and what it reports (states, results, the journal) is what the tests check.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Rgw, sse

from s3ssefs.keys import Key

pytestmark = pytest.mark.mounted

ROOT = Path(__file__).resolve().parent.parent
SANDBOX = ROOT / "tests" / "systemd-sandbox.sh"
UNIT_DIR = Path("/usr/local/lib/systemd/system")  # where `make install` puts the unit
ETC = Path("/etc/s3ssefs")


def _run(argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed() -> Iterator[None]:
    """``make install`` into /usr/local (and /sbin, /etc/s3ssefs); ``make uninstall`` after."""
    for tool in ("nsenter", "unshare", "findmnt", "make"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: apt-get install -y util-linux make", pytrace=False)
    _run(["make", "-C", str(ROOT), "install"])
    try:
        assert (UNIT_DIR / "s3ssefs@.service").is_file()
        yield
    finally:
        _run(["make", "-C", str(ROOT), "uninstall"])


@dataclass
class Sandbox:
    pid: int
    mounts: Path  # a shared mount made before boot: mounts below it show on both sides

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv],
                              capture_output=True, text=True, timeout=600)
        if check:
            assert proc.returncode == 0, f"{argv}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-P", prop, unit).stdout.strip()

    def journal(self, unit: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "--no-pager", "-o", "json", "-u", unit).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sandbox(installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    work = tmp_path_factory.mktemp("systemd")
    mounts = work / "mnt"
    mounts.mkdir()
    _run(["mount", "--bind", str(mounts), str(mounts)])
    try:
        _run(["mount", "--make-shared", str(mounts)])
        proc = subprocess.run(["bash", str(SANDBOX), "boot", str(work), str(UNIT_DIR)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"systemd-sandbox.sh boot:\n{proc.stdout}{proc.stderr}"
        try:
            yield Sandbox(int(proc.stdout.split()[-1]), mounts)
        finally:
            _run(["bash", str(SANDBOX), "poweroff", str(work)])
    finally:
        subprocess.run(["umount", "-l", str(mounts)], capture_output=True)


@dataclass
class Instance:
    name: str
    unit: str
    mountpoint: Path
    keyfile: Path
    credentials: Path


@pytest.fixture
def instance(sandbox: Sandbox, rgw: Rgw, bucket: str, keyfile: Path) -> Iterator[Instance]:
    """/etc/s3ssefs/NAME.{conf,key,aws} for the test bucket, and a mount point both see."""
    name = f"t5{uuid.uuid4().hex[:10]}"
    mnt = sandbox.mounts / name
    mnt.mkdir()
    inst = Instance(name, f"s3ssefs@{name}.service", mnt, ETC / f"{name}.key", ETC / f"{name}.aws")
    (ETC / f"{name}.conf").write_text(
        f"bucket = {bucket}\nmountpoint = {mnt}\nendpoint = {rgw.endpoint}\n"
        f"region = us-east-1\nca_bundle = {rgw.ca}\nlog_level = debug\n")
    inst.keyfile.write_bytes(keyfile.read_bytes())
    inst.keyfile.chmod(0o600)
    fd = os.open(inst.credentials, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[default]\naws_access_key_id = {rgw.access_key}\n"
                f"aws_secret_access_key = {rgw.secret_key}\n")
    try:
        yield inst
    finally:
        sandbox.systemctl("stop", inst.unit, check=False)
        sandbox.systemctl("reset-failed", inst.unit, check=False)
        for suffix in ("conf", "key", "aws"):
            (ETC / f"{name}.{suffix}").unlink(missing_ok=True)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        mnt.rmdir()
        shutil.rmtree(Path("/var/cache/s3ssefs") / name, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/var/cache/s3ssefs").rmdir()


def test_installed_commands_are_found(installed: None) -> None:
    """After ``make install``: the command on root's PATH, the helper where mount(8) looks, the
    man pages where man(1) looks."""
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    root_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert shutil.which("s3ssefs", path=root_path) == "/usr/local/bin/s3ssefs"
    assert _run(["/usr/local/bin/s3ssefs", "--version"]).stdout.startswith("s3ssefs ")
    assert "BUCKET" in _run(["/sbin/mount.s3ssefs", "--help"]).stdout
    for section, page in (("1", "s3ssefs"), ("5", "s3ssefs-keyfile"), ("8", "mount.s3ssefs")):
        proc = subprocess.run(["man", "-w", section, page], capture_output=True, text=True,
                              env=env, timeout=60)
        found = os.path.realpath(proc.stdout.strip())  # Debian: /usr/local/man -> share/man
        assert found == f"/usr/local/share/man/man{section}/{page}.{section}", (
            page, proc.stdout, proc.stderr)


def _messages(entries: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(int(e.get("PRIORITY", -1)), str(e.get("MESSAGE", ""))) for e in entries]


def test_unit_runs_the_mount_with_credentials_and_stops_clean(
        sandbox: Sandbox, instance: Instance, bucket: str, s3: Any, key: Key) -> None:
    # Type=notify: start returns once the daemon said READY=1, i.e. once the mount answers
    sandbox.systemctl("start", instance.unit)
    assert sandbox.show(instance.unit, "ActiveState") == "active"
    assert sandbox.show(instance.unit, "SubState") == "running"
    assert os.path.ismount(instance.mountpoint)

    # the key file and the credentials reach the daemon as LoadCredential= copies
    main_pid = sandbox.show(instance.unit, "MainPID")
    argv = sandbox.run("cat", f"/proc/{main_pid}/cmdline").stdout.split("\0")
    creds = f"/run/credentials/{instance.unit}"
    assert argv[argv.index("--keyfile") + 1] == f"{creds}/keyfile"
    assert argv[argv.index("--credentials-file") + 1] == f"{creds}/aws-credentials"
    for cred, source in (("keyfile", instance.keyfile), ("aws-credentials", instance.credentials)):
        assert sandbox.run("cat", f"{creds}/{cred}").stdout == source.read_text()
        assert sandbox.run("stat", "-c", "%a %U", f"{creds}/{cred}").stdout.split() == [
            "400", "root"]
    environ = sandbox.run("cat", f"/proc/{main_pid}/environ").stdout
    assert "AWS_" not in environ and base64.b64encode(key.raw).decode() not in environ

    # a file written on the host lands in the bucket, encrypted with the key file's key
    (instance.mountpoint / "hello.txt").write_bytes(b"written through systemd\n")
    body = s3.get_object(Bucket=bucket, Key="hello.txt", **sse(key))["Body"].read()
    assert body == b"written through systemd\n"
    with pytest.raises(s3.exceptions.ClientError):
        s3.get_object(Bucket=bucket, Key="hello.txt")

    # stop with a file still open for writing: the daemon uploads it, unmounts, exits 0
    data = os.urandom(3 << 20)
    fd = os.open(instance.mountpoint / "pending.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        sandbox.systemctl("stop", instance.unit)
    finally:
        try:
            os.close(fd)
        except OSError as e:  # the mount is gone
            assert e.errno in (errno.ENOTCONN, errno.EIO), e
    assert sandbox.show(instance.unit, "ActiveState") == "inactive"
    assert sandbox.show(instance.unit, "Result") == "success"
    assert not os.path.ismount(instance.mountpoint)
    assert s3.get_object(Bucket=bucket, Key="pending.bin", **sse(key))["Body"].read() == data

    # the daemon's log (DEBUG, botocore's included) is in the journal, each record at its own
    # level, no key in it
    messages = _messages(sandbox.journal(instance.unit))
    levels = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3}
    ours = [(p, m) for p, m in messages if m.split(" ", 1)[0] in levels]
    assert {m.split()[0] for _, m in ours} >= {"DEBUG", "INFO"}, messages
    assert all(p == levels[m.split()[0]] for p, m in ours), ours
    assert not any(m.startswith("<") for _, m in messages)
    assert base64.b64encode(key.raw).decode() not in json.dumps(messages)


def test_a_key_file_others_can_read_fails_the_unit(
        sandbox: Sandbox, instance: Instance) -> None:
    instance.keyfile.chmod(0o644)
    r = sandbox.systemctl("start", instance.unit, check=False)
    assert r.returncode != 0
    assert sandbox.show(instance.unit, "ActiveState") == "failed"  # not restarted: exit 78
    assert sandbox.show(instance.unit, "Result") == "exit-code"
    assert sandbox.show(instance.unit, "ExecMainStatus") == "78"
    assert not os.path.ismount(instance.mountpoint)
    reason = (f"s3ssefs: key file {instance.keyfile} has mode 0644, which lets others read it; "
              f"run: chmod 600 {instance.keyfile}")
    assert (3, reason) in _messages(sandbox.journal(instance.unit))
