"""The trust boundary of the commands: a state directory another user planted, a control
socket served by someone else, a state file written through a link.

A user without ``XDG_RUNTIME_DIR`` (su, sudo -u, cron) keeps the mount's state in
``/tmp/s3ssefs-UID``, a name any user can create first.  These tests play that other user
(uid 65534 owns the planted directory; the test, as root, serves its socket) and run the real
commands as the victim, a uid of their own, through the system ``python3`` (the test's
interpreter may live under root's home, which other users cannot enter).  What must hold: the
victim's commands refuse with one line, never write through the attacker's links, and never
print a ``curl`` line that would send the key to the attacker's endpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Rgw, new_key

from s3ssefs.keys import KeyFile
from s3ssefs.runtime import mount_id, write_private

ATTACKER = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Victim:
    uid: int
    home: Path
    keyfile: Path
    env: dict[str, str]

    @property
    def runtime(self) -> Path:
        return Path(f"/tmp/s3ssefs-{self.uid}")

    def run(self, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SYSTEM_PYTHON, "-S", "-m", "s3ssefs", *map(str, args)],
                              user=self.uid, group=self.uid, extra_groups=[], env=self.env,
                              cwd=self.home, capture_output=True, text=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0, f"expected failure, got 0; stdout {r.stdout!r}"
    lines = r.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {r.stderr!r}"
    return lines[0]


@pytest.fixture
def victim(rgw: Rgw) -> Iterator[Victim]:
    site = sysconfig.get_paths()["purelib"]
    ver = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert ver == str(sys.version_info[:2]), f"{SYSTEM_PYTHON} is {ver}: cannot run the venv"
    uid = random.randrange(200_000, 260_000)
    home = Path(tempfile.mkdtemp(prefix="s3ssefs-victim-", dir="/tmp"))
    os.chown(home, uid, uid)
    keyfile = home / "keys.toml"
    k = new_key("k1")
    KeyFile({k.id: k}, k.id).save(keyfile)
    os.chown(keyfile, uid, uid)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": f"{ROOT}:{site}",
           **{n: v for n, v in rgw.env.items() if n.startswith("AWS_")}}
    v = Victim(uid, home, keyfile, env)
    try:
        yield v
    finally:
        for p in sorted(home.iterdir()):
            if os.path.ismount(p):
                subprocess.run(["umount", "-l", str(p)], check=False)
        shutil.rmtree(home, ignore_errors=True)
        if v.runtime.is_symlink():
            v.runtime.unlink()
        shutil.rmtree(v.runtime, ignore_errors=True)


def plant(v: Victim) -> Path:
    """The attacker's runtime directory for the victim: theirs, mode 0777."""
    d = v.runtime
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    os.chown(d, ATTACKER, ATTACKER)
    return d


class FakeDaemon:
    """A control socket served by this (root) process: records every command it receives."""

    def __init__(self, path: Path, owner: int) -> None:
        self.path = path
        self.commands: list[bytes] = []
        self.connections = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chown(path, owner, owner)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                data = conn.recv(1024)
                if data:
                    self.commands.append(data)
                    reply = {"failed": [], "requests": {}, "errors": {},
                             **registry_for(Path("/"), self.path, Path("/"))}
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


def tmpfs_mount(v: Victim) -> Path:
    """A real mount point the victim owns, with a file in it (the attacker names it)."""
    mnt = v.home / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"uid={v.uid},gid={v.uid}", "t4-victim",
                    str(mnt)], check=True)
    (mnt / "f").write_text("x")
    os.chown(mnt / "f", v.uid, v.uid)
    return mnt


def registry_for(mnt: Path, sock: Path, keyfile: Path) -> dict[str, Any]:
    """What the old registry file held: presign trusted every field of it."""
    return {"pid": 1, "mountpoint": str(mnt), "socket": str(sock), "bucket": "victims-bucket",
            "bucket_name": "victims-bucket", "prefix": "", "endpoint": "http://127.0.0.1:9999",
            "region": None, "profile": None, "credentials_file": None, "ca_bundle": None,
            "keyfile": str(keyfile), "allow_http": True, "sse": "c", "read_only": False,
            "as_of": None}


def test_mount_refuses_a_planted_runtime_dir(victim: Victim, rgw: Rgw, bucket: str) -> None:
    d = plant(victim)
    mnt = victim.home / "mnt"
    mnt.mkdir()
    os.chown(mnt, victim.uid, victim.uid)
    precious = victim.home / "important.txt"
    precious.write_text("the victim's file\n")
    os.chown(precious, victim.uid, victim.uid)
    (d / f"{mount_id(mnt)}.json").symlink_to(precious)
    r = victim.run("mount", bucket, mnt, "--keyfile", victim.keyfile,
                   "--endpoint", rgw.endpoint, "--ca-bundle", rgw.ca,
                   "--cache-dir", victim.home / "cache", "--log-file", victim.home / "log")
    line = one_line(r)
    assert str(d) in line and f"uid {ATTACKER}" in line, line
    assert not os.path.ismount(mnt)
    assert precious.read_text() == "the victim's file\n"
    # a directory of ours that others may write is refused too
    os.chown(d, victim.uid, victim.uid)
    (d / f"{mount_id(mnt)}.json").unlink()
    r = victim.run("mount", bucket, mnt, "--keyfile", victim.keyfile,
                   "--endpoint", rgw.endpoint, "--ca-bundle", rgw.ca,
                   "--cache-dir", victim.home / "cache", "--log-file", victim.home / "log")
    line = one_line(r)
    assert str(d) in line and "0777" in line, line


def test_presign_stats_umount_ignore_a_planted_state_file(victim: Victim) -> None:
    d = plant(victim)
    mnt = tmpfs_mount(victim)
    sock = d / f"{mount_id(mnt)}.sock"
    fake = FakeDaemon(sock, ATTACKER)
    try:
        (d / f"{mount_id(mnt)}.json").write_text(json.dumps(
            registry_for(mnt, sock, victim.keyfile)))
        r = victim.run("presign", mnt / "f")
        assert "127.0.0.1:9999" not in r.stdout, "presign sent the key to the planted endpoint"
        assert str(d) in one_line(r)
        for cmd in ("stats", "umount"):
            r = victim.run(cmd, mnt)
            assert str(d) in one_line(r), cmd
        assert fake.connections == 0, f"talked to the planted socket: {fake.commands}"
    finally:
        fake.close()
    assert os.path.ismount(mnt)


def test_control_socket_served_by_another_uid_is_refused(victim: Victim) -> None:
    """Even in a directory of ours: the daemon must run as us (SO_PEERCRED), not as root."""
    d = victim.runtime
    d.mkdir(mode=0o700)
    os.chown(d, victim.uid, victim.uid)
    mnt = tmpfs_mount(victim)
    sock = d / f"{mount_id(mnt)}.sock"
    fake = FakeDaemon(sock, victim.uid)  # the socket file is the victim's; its server is root
    try:
        reg = d / f"{mount_id(mnt)}.json"
        reg.write_text(json.dumps(registry_for(mnt, sock, victim.keyfile)))
        os.chown(reg, victim.uid, victim.uid)
        for cmd in (("presign", mnt / "f"), ("stats", mnt), ("umount", mnt)):
            r = victim.run(*cmd)
            assert "127.0.0.1:9999" not in r.stdout
            assert "served by uid 0" in one_line(r), cmd
        assert fake.commands == [], f"sent commands to a daemon of another uid: {fake.commands}"
    finally:
        fake.close()


def test_state_file_replaces_a_link_never_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("untouched\n")
    link = tmp_path / "state.json"
    link.symlink_to(target)
    write_private(link, '{"pid": 1}')
    assert target.read_text() == "untouched\n"
    assert not link.is_symlink()
    assert link.read_text() == '{"pid": 1}'
    assert (link.stat().st_mode & 0o777) == 0o600


def test_runtime_dir_that_is_a_link_is_refused(victim: Victim) -> None:
    """A link to a directory of the victim's is no better: the attacker can repoint it."""
    theirs = victim.home / "elsewhere"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, victim.uid, victim.uid)
    victim.runtime.symlink_to(theirs)
    mnt = tmpfs_mount(victim)
    for cmd in (("stats", mnt), ("umount", mnt), ("presign", mnt / "f")):
        line = one_line(victim.run(*cmd))
        assert str(victim.runtime) in line and "symlink" in line, line
    assert list(theirs.iterdir()) == []
