"""The real ``s3ssefs`` and ``mount.s3ssefs`` commands: key file management, mount refusals,
``umount``, signals, ``stats``, the fstab helper through mount(8), and the daemon's hygiene.

Every command runs as a subprocess, the way a user or systemd runs it.  Refusals must be one
line on stderr, a non-zero exit, nothing mounted, and (for key commands) the key file unchanged
byte for byte.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import S3SSEFS, Mounted, Rgw, key_forms, new_key

from s3ssefs.daemon import registry_path
from s3ssefs.keys import Key, KeyFile

pytestmark = pytest.mark.rgw
MOUNT_HELPER = Path(sys.executable).parent / "mount.s3ssefs"


def run(*args: str | Path, input: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*S3SSEFS, *map(str, args)], input=input, capture_output=True,
                          env=env, timeout=timeout)


def one_line(r: subprocess.CompletedProcess[Any], *, code: int | None = 1) -> str:
    """The process failed with exactly one line on stderr; returns it."""
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    if code is None:
        assert r.returncode != 0, f"expected failure, got 0; stderr: {err!r}"
    else:
        assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr: {err!r}"
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {err!r}"
    return lines[0]


def fingerprint(raw: bytes) -> str:
    return base64.b64encode(hashlib.md5(raw).digest()).decode()


def listed(path: Path) -> dict[str, tuple[str, bool]]:
    """``keys list`` parsed: id → (fingerprint, current?); also checks no key leaks."""
    r = run("keys", "list", path)
    assert r.returncode == 0, r.stderr
    kf = KeyFile.load(path)
    for k in kf.keys.values():
        for form in key_forms(k.raw):
            assert form not in r.stdout and form not in r.stderr, "keys list shows a key"
    out: dict[str, tuple[str, bool]] = {}
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("ID")
    for line in lines[1:]:
        if line.startswith("map:"):
            continue
        parts = line.split()
        out[parts[0]] = (parts[1], parts[2:] == ["*"])
    return out


def private_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def sse(key: Key) -> dict[str, Any]:
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key.raw}


def sha256_object(s3: Any, bucket: str, name: str, key: Key) -> tuple[str, int]:
    body = s3.get_object(Bucket=bucket, Key=name, **sse(key))["Body"]
    h = hashlib.sha256()
    n = 0
    while chunk := body.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def wait_exit(pid: int, timeout: float) -> None:
    """Block until process ``pid`` is gone (pidfd, no polling)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    assert ready, f"process {pid} still running after {timeout}s"


# ====================================================================== key files
def test_keygen_and_list(tmp_path: Path) -> None:
    k = tmp_path / "k"
    r = run("keygen", k)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(k.stat().st_mode) == 0o600
    kf = KeyFile.load(k)
    (key,) = kf.keys.values()
    for form in key_forms(key.raw):
        assert form not in r.stdout + r.stderr
    assert listed(k) == {key.id: (fingerprint(key.raw), True)}

    before = k.read_bytes()
    line = one_line(run("keygen", k))
    assert "exists" in line
    assert k.read_bytes() == before


def test_keys_add_current_and_import(tmp_path: Path) -> None:
    k = tmp_path / "k"
    assert run("keygen", k, "--id", "first").returncode == 0
    first = KeyFile.load(k).keys["first"]

    raw_file = new_key().raw
    f_raw = tmp_path / "raw.bin"
    f_raw.write_bytes(raw_file)
    r = run("keys", "add", k, "--id", "raw", "--from-file", f_raw)
    assert r.returncode == 0, r.stderr

    b64_file = new_key().raw
    f_b64 = tmp_path / "b64.txt"
    f_b64.write_text(base64.b64encode(b64_file).decode() + "\n")
    r = run("keys", "add", k, "--id", "b64", "--from-file", f_b64)
    assert r.returncode == 0, r.stderr

    raw_stdin = new_key().raw
    r = run("keys", "add", k, "--id", "stdin", "--base64-stdin", "--current",
            input=base64.b64encode(raw_stdin) + b"\n")
    assert r.returncode == 0, r.stderr
    assert listed(k) == {
        "first": (fingerprint(first.raw), False), "raw": (fingerprint(raw_file), False),
        "b64": (fingerprint(b64_file), False), "stdin": (fingerprint(raw_stdin), True)}
    assert stat.S_IMODE(k.stat().st_mode) == 0o600

    r = run("keys", "current", k, "raw")
    assert r.returncode == 0, r.stderr
    assert {i for i, (_, cur) in listed(k).items() if cur} == {"raw"}

    # s3fs-fuse's file: one key per line (base64, or 32 raw characters); the first writes
    a, b = new_key().raw, b"0123456789abcdefghijklmnopqrstuv"
    s3fs = private_file(tmp_path / "s3fs-keys",
                        b"# s3fs keys\n" + base64.b64encode(a) + b"\n\n" + b + b"\n")
    out = tmp_path / "imported.toml"
    r = run("keys", "import-s3fs", s3fs, out)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert listed(out) == {"s3fs-1": (fingerprint(a), True), "s3fs-2": (fingerprint(b), False)}
    before = out.read_bytes()
    assert "exists" in one_line(run("keys", "import-s3fs", s3fs, out))
    assert out.read_bytes() == before
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for cmd in (("keygen", dangling), ("keys", "import-s3fs", s3fs, dangling)):
        assert "exists" in one_line(run(*cmd))
        assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_keys_malformed_input_leaves_file_unchanged(tmp_path: Path) -> None:
    k = tmp_path / "k"
    assert run("keygen", k, "--id", "first").returncode == 0
    existing = KeyFile.load(k).keys["first"]
    before = k.read_bytes()

    def refused(*args: str | Path, input: bytes | None = None) -> str:
        line = one_line(run(*args, input=input))
        assert k.read_bytes() == before, f"key file changed by {args}"
        return line

    short = tmp_path / "short"
    short.write_bytes(os.urandom(31))
    refused("keys", "add", k, "--from-file", short)
    b64_16 = tmp_path / "b64-16"
    b64_16.write_text(base64.b64encode(os.urandom(16)).decode())
    assert "16 bytes" in refused("keys", "add", k, "--from-file", b64_16)
    refused("keys", "add", k, "--base64-stdin", input=b"this is not base64 at all!\n")
    refused("keys", "add", k, "--base64-stdin", input=b"")
    good = base64.b64encode(new_key().raw) + b"\n"
    for bad_id in ("", "   ", "tab\there", "x" * 200, "first"):
        refused("keys", "add", k, "--id", bad_id, "--base64-stdin", input=good)
    assert "already" in refused("keys", "add", k, "--base64-stdin",
                                input=base64.b64encode(existing.raw))
    assert "nosuch" in refused("keys", "current", k, "nosuch")
    missing = tmp_path / "missing"
    refused("keys", "add", k, "--from-file", missing)

    # the key file itself malformed: refused, untouched
    loose = tmp_path / "loose"
    loose.write_bytes(before)
    loose.chmod(0o644)
    for args in (("keys", "list", loose), ("keys", "current", loose, "first"),
                 ("keys", "add", loose, "--base64-stdin")):
        line = one_line(run(*args, input=good))
        assert "0644" in line
        assert loose.read_bytes() == before
    for form in key_forms(existing.raw):
        assert form.decode(errors="replace") not in line

    # import-s3fs: bad line → nothing written
    out = tmp_path / "imported"
    for body in (b"short\n", b"!" * 44 + b"\n", base64.b64encode(os.urandom(20)) + b"\n", b"#\n"):
        s3fs = private_file(tmp_path / "s3fs", body)
        one_line(run("keys", "import-s3fs", s3fs, out))
        assert not out.exists()
    s3fs.chmod(0o644)
    assert "0644" in one_line(run("keys", "import-s3fs", s3fs, out))


# ====================================================================== mount refusals
def refuse_mount(m: Mounted, argv: list[str], env: dict[str, str] | None = None,
                 timeout: float = 180) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    line = one_line(r, code=None)
    assert not os.path.ismount(m.path), "mounted anyway"
    assert not registry_path(m.path).exists()
    return line


def test_mount_refusals(mount_factory: Any, bucket: str, tmp_path: Path, key: Key,
                        rgw: Rgw) -> None:
    # key file readable by others
    loose = tmp_path / "loose.toml"
    KeyFile({key.id: key}, key.id).save(loose)
    loose.chmod(0o644)
    m = mount_factory(bucket, keys=loose, mount=False)
    assert "0644" in refuse_mount(m, m.argv())

    # key file that is not TOML
    bad = private_file(tmp_path / "bad.toml", b'version = 1\ncurrent = "k1"\n[keys\n')
    m = mount_factory(bucket, keys=bad, mount=False)
    assert "TOML" in refuse_mount(m, m.argv())

    # bucket that does not exist
    nob = f"t-missing-{uuid.uuid4().hex[:8]}"
    m = mount_factory(nob, mount=False)
    line = refuse_mount(m, m.argv())
    assert nob in line and "does not exist" in line

    # credentials the server does not know
    m = mount_factory(bucket, mount=False)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "BOGUSBOGUSBOGUS", "AWS_SECRET_ACCESS_KEY": "nope"}
    assert "credentials" in refuse_mount(m, m.argv(), env=env)

    # nothing listens there
    m = mount_factory(bucket, mount=False)
    assert "127.0.0.1:1" in refuse_mount(m, [*m.argv(), "--endpoint", "https://127.0.0.1:1"])

    # plain HTTP: refused before any request (a listener here sees no connection)
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(8)
        port = lsn.getsockname()[1]
        m = mount_factory(bucket, mount=False)
        line = refuse_mount(m, [*m.argv(), "--endpoint", f"http://127.0.0.1:{port}"])
        assert "http" in line.lower() and "allow_http" in line
        lsn.setblocking(False)
        with pytest.raises(BlockingIOError):
            lsn.accept()
    # same through -o, and the real plain-HTTP endpoint
    m = mount_factory(bucket, mount=False)
    argv = m.argv()
    i = argv.index("--endpoint")
    del argv[i:i + 2]
    assert "allow_http" in refuse_mount(m, [*argv, "-o", f"endpoint={rgw.http_endpoint}"])

    # mount point that does not exist
    m = mount_factory(bucket, mount=False)
    m.path.rmdir()
    assert f"{m.path} does not exist" in refuse_mount(m, m.argv())
    m.path.write_text("a file")
    assert f"{m.path} is not a directory" in refuse_mount(m, m.argv())
    m.path.unlink()

    # log file that cannot be written, in the background and in the foreground
    m = mount_factory(bucket, mount=False)
    nolog = tmp_path / "no-such-dir" / "log"
    assert str(nolog) in refuse_mount(m, [*m.argv(), "--log-file", str(nolog)])
    assert str(nolog) in refuse_mount(m, [*m.argv(), "--log-file", str(nolog), "--foreground"])

    # unknown option
    m = mount_factory(bucket, mount=False)
    assert "bogus" in refuse_mount(m, [*m.argv(), "-o", "bogus=1"])
    assert "bogus" in refuse_mount(m, [*m.argv(), "-o", "ro,bogus"])

    # parts that are not whole blocks: a rewrite of a block across two parts would be lost
    m = mount_factory(bucket, mount=False)
    line = refuse_mount(m, [*m.argv(), "-o", "block_size=4M,part_size=6M"])
    assert "part_size (6291456) must be a multiple of block_size" in line
    assert "part_size=8M" in line


# ====================================================================== umount
def test_umount_flushes(mnt: Mounted, bucket: str, s3: Any, key: Key) -> None:
    data = b"written then unmounted\n" * 10
    with open(mnt.path / "small.txt", "wb") as f:
        f.write(data)
    pid = mnt.pid
    r = run("umount", mnt.path)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mnt.path)
    wait_exit(pid, 60)
    assert s3.get_object(Bucket=bucket, Key="small.txt", **sse(key))["Body"].read() == data


def test_umount_of_something_else(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    one_line(run("umount", plain))
    one_line(run("umount", tmp_path / "does-not-exist"))
    # another filesystem mounted there is left alone
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "t4-tmpfs", str(other)], check=True)
    try:
        (other / "marker").write_text("x")
        one_line(run("umount", other))
        assert os.path.ismount(other), "s3ssefs umount unmounted a tmpfs"
        assert (other / "marker").read_text() == "x"
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)


def test_second_mount_on_same_point_refused(mnt: Mounted) -> None:
    pid = mnt.pid
    r = subprocess.run(mnt.argv(), capture_output=True, text=True, timeout=120)
    assert "already mounted" in one_line(r)
    assert mnt.pid == pid
    targets = subprocess.run(["findmnt", "-n", "-o", "TARGET", str(mnt.path)],
                             capture_output=True, text=True).stdout.splitlines()
    assert len(targets) == 1, targets
    roundtrip(mnt, "still-served")


def test_dead_daemon_leaves_stale_mount(mnt: Mounted, bucket: str, s3: Any, key: Key) -> None:
    """SIGKILL leaves 'Transport endpoint is not connected': ``umount`` clears it, and so does
    a new mount on the same point."""
    (mnt.path / "before.txt").write_bytes(b"closed before the kill\n")
    for clear_with in ("umount", "mount"):
        pid = mnt.pid
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid, 60)
        with pytest.raises(OSError) as e:
            os.listdir(mnt.path)  # a stat may be answered from the kernel's attribute cache
        assert e.value.errno == 107  # ENOTCONN
        if clear_with == "umount":
            r = run("umount", mnt.path)
            assert r.returncode == 0, r.stderr
            assert not os.path.ismount(mnt.path)
        mnt.mount()
        assert (mnt.path / "before.txt").read_bytes() == b"closed before the kill\n"
    assert s3.head_object(Bucket=bucket, Key="before.txt", **sse(key))["ContentLength"] == 23


# ====================================================================== signals
def test_sigterm_with_open_dirty_file(mnt: Mounted, bucket: str, s3: Any, key: Key) -> None:
    """SIGTERM while a 40 MiB file is written but not closed: the daemon flushes, unmounts and
    exits; the object in the bucket is complete, and the program's close() then gets
    ENOTCONN (the mount is gone), not a silent success."""
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    fd = os.open(mnt.path / "big.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(40):
            chunk = block[i:] + block[:i]
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        pid = mnt.pid
        os.kill(pid, signal.SIGTERM)
        wait_exit(pid, 300)
    finally:
        closed = 0
        try:
            os.close(fd)
        except OSError as e:
            closed = e.errno
    assert closed == errno.ENOTCONN, "close() of a file whose mount went away: " + \
        (os.strerror(closed) if closed else "no error")
    assert not os.path.ismount(mnt.path)
    assert sha256_object(s3, bucket, "big.bin", key) == (h.hexdigest(), 40 << 20)


WRITER = r"""
import hashlib, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
h, done, err, i = hashlib.sha256(), 0, 0, 0
try:
    while True:  # until the mount goes away under it
        view = memoryview(i.to_bytes(8, "big") * (1 << 17))
        while view:
            n = os.write(fd, view)
            h.update(view[:n])
            done += n
            view = view[n:]
        i += 1
        if done == 8 << 20:
            print("started", flush=True)
except OSError as e:
    err = e.errno
try:
    os.close(fd)
except OSError:
    pass
print(done, h.hexdigest(), err, flush=True)
"""


def test_sigterm_while_a_program_keeps_writing(mnt: Mounted, bucket: str, s3: Any,
                                                key: Key) -> None:
    """SIGTERM while another process keeps writing: the daemon uploads what was written and
    unmounts, the writer's next write() fails with ENOTCONN (the mount is gone; it neither
    hangs nor succeeds into nothing), and every byte whose write() succeeded is in the
    bucket, and nothing else."""
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt.path / "stream.bin")],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout is not None
        assert w.stdout.readline().strip() == "started"
        pid = mnt.pid
        os.kill(pid, signal.SIGTERM)
        done, digest, err = w.stdout.readline().split()
        assert w.wait(timeout=300) == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    wait_exit(pid, 300)
    assert int(err) == errno.ENOTCONN, os.strerror(int(err)) if int(err) else "no error"
    assert not os.path.ismount(mnt.path)
    assert sha256_object(s3, bucket, "stream.bin", key) == (digest, int(done))


# ====================================================================== stats
def test_stats(mnt: Mounted) -> None:
    data = os.urandom(3 << 20)
    (mnt.path / "s.bin").write_bytes(data)
    mnt.remount()  # cold cache: the read below goes to S3
    assert (mnt.path / "s.bin").read_bytes() == data
    r = run("stats", mnt.path)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert "requests:" in text
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    assert int(fields["bytes_down"]) >= len(data)
    r = run("stats", mnt.path, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert sum(s["requests"].values()) > 0
    assert s["bytes_down"] >= len(data)
    assert s["pid"] == mnt.pid
    one_line(run("stats", mnt.path.parent))


# ====================================================================== fstab helper
def helper_opts(m: Mounted) -> str:
    return (f"keyfile={m.keyfile},endpoint={m.rgw.endpoint},ca_bundle={m.rgw.ca},"
            f"cache_dir={m.cache_dir},log_file={m.log_file},"
            "_netdev,nofail,noatime,x-systemd.automount")


def roundtrip(m: Mounted, name: str) -> None:
    data = os.urandom(4096)
    (m.path / name).write_bytes(data)
    assert (m.path / name).read_bytes() == data


def test_mount_helper(mount_factory: Any, bucket: str) -> None:
    m = mount_factory(bucket, mount=False)
    r = subprocess.run([str(MOUNT_HELPER), bucket, str(m.path), "-o", helper_opts(m)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{r.stderr}\n{m.log_tail()}"
    assert os.path.ismount(m.path)
    roundtrip(m, "via-helper")
    m.umount()

    r = subprocess.run([str(MOUNT_HELPER), bucket, str(m.path), "-o", helper_opts(m) + ",bogus=1"],
                       capture_output=True, text=True, timeout=120)
    assert "bogus" in one_line(r)
    assert not os.path.ismount(m.path)
    # -f (fake): checks the options, mounts nothing
    r = subprocess.run([str(MOUNT_HELPER), bucket, str(m.path), "-f", "-o", helper_opts(m)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(m.path)


@pytest.fixture
def sbin_helper() -> Any:
    """/sbin/mount.s3ssefs, so mount(8) finds it; removed afterwards."""
    path = Path("/sbin/mount.s3ssefs")
    assert not path.exists(), f"{path} exists already; not replacing someone else's helper"
    path.write_text(f'#!/bin/sh\nexec "{MOUNT_HELPER}" "$@"\n')
    path.chmod(0o755)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_mount_t_s3ssefs(mount_factory: Any, bucket: str, sbin_helper: Path) -> None:
    m = mount_factory(bucket, mount=False)
    # the source as fstab has it, and as mount(8) lists it
    for source, unmount in ((bucket, "umount(8)"), (f"s3ssefs:{bucket}", "s3ssefs umount")):
        r = subprocess.run(["mount", "-t", "s3ssefs", source, str(m.path), "-o", helper_opts(m)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{r.stderr}\n{m.log_tail()}"
        assert os.path.ismount(m.path)
        fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", str(m.path)],
                                capture_output=True, text=True).stdout.strip()
        assert fstype == "fuse.s3ssefs"
        listed = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(m.path)],
                                capture_output=True, text=True).stdout.strip()
        assert listed == f"s3ssefs:{bucket}"
        roundtrip(m, unmount.replace(" ", "-"))
        pid = m.pid
        if unmount == "umount(8)":
            r = subprocess.run(["umount", str(m.path)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        else:
            m.umount()
        wait_exit(pid, 60)
        assert not os.path.ismount(m.path)
        assert not registry_path(m.path).exists()

    r = subprocess.run(["mount", "-t", "s3ssefs", bucket, str(m.path), "-o",
                        helper_opts(m) + ",bogus=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "bogus" in r.stderr
    assert not os.path.ismount(m.path)


# ====================================================================== daemon hygiene
def test_the_daemon_shows_no_key_and_writes_none_to_disk(mnt: Mounted, key: Key) -> None:
    """The running daemon: no key in its command line or environment, core dumps off (hard
    limit 0), the key file not held open or mapped, and no file it writes (block cache,
    encrypted spill, key-ring state, the runtime registry) holds the key in any spelling,
    while a file is open with blocks in the spill and after it was read back."""
    pid = mnt.pid
    for name in ("cmdline", "environ"):
        data = Path(f"/proc/{pid}/{name}").read_bytes()
        for form in key_forms(key.raw):
            assert form not in data, f"key material in /proc/PID/{name}"
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    (core,) = [line for line in limits if line.startswith("Max core file size")]
    assert core.split()[4:6] == ["0", "0"], core
    keyfile = os.path.realpath(mnt.keyfile)

    def held_open() -> list[str]:
        fds = Path(f"/proc/{pid}/fd")
        paths = []
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                paths.append(os.readlink(fd))
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        return paths + [line.split()[-1] for line in maps if len(line.split()) >= 6]

    def files_written() -> list[Path]:  # the mount's own: other mounts share the runtime dir
        return [p for p in mnt.cache_dir.rglob("*") if p.is_file()] + \
            [registry_path(mnt.path)]

    def assert_no_key_on_disk() -> set[str]:
        """Scans the files; the names of the directories that held some."""
        assert keyfile not in held_open(), "the daemon keeps the key file open"
        files = files_written()
        for f in files:
            with contextlib.suppress(OSError):  # a spill file may go while we look
                data = f.read_bytes()
                for form in key_forms(key.raw):
                    assert form not in data, f"key material in {f}"
        return {p.parent.name for p in files}

    body = os.urandom(24 << 20)
    fd = os.open(mnt.path / "spilled.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        # written back to front, so its blocks leave memory for the spill, not for a part
        for off in range(len(body) - (1 << 20), -1, -(1 << 20)):
            os.pwrite(fd, body[off:off + (1 << 20)], off)
        assert "spill" in assert_no_key_on_disk(), "nothing spilled: the scan saw no spill"
    finally:
        os.close(fd)
    mnt.remount()  # a cold block cache: the read below fills it
    pid = mnt.pid
    assert (mnt.path / "spilled.bin").read_bytes() == body
    assert "blocks" in {p.name for p in mnt.cache_dir.rglob("*")}, "no block cache to scan"
    assert_no_key_on_disk()


def test_harden_process_makes_the_process_undumpable() -> None:
    """What harden_process() does that is not visible from outside the daemon while the
    tests run as root (no ptrace, no core by PR_SET_DUMPABLE 0), checked in a process that
    calls it; the daemon's own core limit is checked above."""
    r = subprocess.run([sys.executable, "-c", "import ctypes; from s3ssefs.daemon import "
                        "harden_process as h; h(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "0"  # PR_GET_DUMPABLE
