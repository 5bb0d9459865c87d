"""The systemd contract: ``Type=notify`` readiness and stopping, as systemd itself sees it.

The daemon runs in the foreground as the unit runs it, with ``NOTIFY_SOCKET`` pointing at a
unix datagram socket this test owns; the messages that arrive there are what systemd would act
on.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import S3SSEFS, Rgw

pytestmark = pytest.mark.mounted


def _receive(sock: socket.socket, timeout: float) -> str:
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, f"no sd_notify message within {timeout}s"
    return sock.recv(4096).decode()


def test_ready_only_once_the_mount_answers_and_stopping_on_sigterm(
        rgw: Rgw, bucket: str, s3: object, keyfile: Path, tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, NOTIFY_SOCKET=str(notify))
    proc = subprocess.Popen(
        [*S3SSEFS, "mount", bucket, str(mnt), "--foreground", "--keyfile", str(keyfile),
         "--endpoint", rgw.endpoint, "--ca-bundle", str(rgw.ca),
         "--cache-dir", str(tmp_path / "cache"), "--log-file", str(tmp_path / "d.log")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        msg = _receive(sock, 60)
        # READY is sent only after the daemon answered a stat of its own mount point
        assert "READY=1" in msg.split("\n")
        assert os.path.ismount(mnt)
        (mnt / "f.txt").write_bytes(b"written before stop")

        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _receive(sock, 60).split("\n")
        assert proc.wait(timeout=120) == 0
        assert not os.path.ismount(mnt)
        # flushed before it stopped: the object is in the bucket
        body = s3.get_object(Bucket=bucket, Key="f.txt",  # type: ignore[attr-defined]
                             **_sse(keyfile))["Body"].read()
        assert body == b"written before stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        sock.close()


def test_no_ready_when_the_mount_cannot_start(rgw: Rgw, keyfile: Path, tmp_path: Path) -> None:
    """A mount that fails its checks exits non-zero and never claims readiness."""
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        [*S3SSEFS, "mount", "no-such-bucket-s3ssefs", str(mnt), "--foreground", "--keyfile",
         str(keyfile), "--endpoint", rgw.endpoint, "--ca-bundle", str(rgw.ca),
         "--cache-dir", str(tmp_path / "cache")],
        env=dict(os.environ, NOTIFY_SOCKET=str(notify)), capture_output=True, text=True,
        timeout=120)
    assert r.returncode == 1
    assert "does not exist" in r.stderr
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)
    sock.close()
    assert not os.path.ismount(mnt)


def _sse(keyfile: Path) -> dict[str, object]:
    from s3ssefs.keys import KeyFile

    return {"SSECustomerAlgorithm": "AES256",
            "SSECustomerKey": KeyFile.load(keyfile).current_key.raw}
