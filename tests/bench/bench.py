#!/usr/bin/env python3
"""s3ssefs benchmark: s3ssefs against s3fs-fuse, rclone mount, boto3 and the AWS CRT S3 client,
all on SSE-C.

Never part of the test suite.  Run as root (FUSE mounts, drop_caches, cgroups) from the repo
root:

    .venv/bin/python tests/bench/bench.py --size 1G --runs 5 --json bench.json

The machine it runs on is usually shared and its speed drifts, so the method is built to
compare systems under the same conditions rather than to trust absolute figures:
- interleaved per workload: in each round every system's cold read runs back to back (order
  rotated per round), then every system's write, and so on, never one system for minutes;
- ratios are paired: the median over rounds of s3ssefs's run / the other system's run of the
  same round (summary.py holds the rules), printed with every round's ratio; fewer than
  summary.MIN_ROUNDS rounds give figures, not a verdict;
- every system reads the same objects, written once with SSE-C by a neutral writer (boto3,
  8 MiB parts); each write workload writes into a fresh bucket of its own;
- client CPU is every process of a system's client side (daemon and the workload process:
  fio, ls, the library worker), one cgroup v2 per system, so the kernel's FUSE copies charged
  to the reader count too.

Every system gets the one SSE-C key generated for this invocation, handed to it its own way
(never on argv).  See tests/bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import contextlib
import datetime as dt
import io
import json
import os
import random
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import summary  # tests/bench/summary.py: the pairing and headline rules

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------- helpers
def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def fmt_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n} B"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + ln for ln in lines[-n:])


def drop_page_cache() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def proc_tree_cpu(pid: int) -> float | None:
    """utime+stime (+ waited children) of pid and its live descendants, in seconds."""
    def one(p: int) -> float:
        with open(f"/proc/{p}/stat") as f:
            s = f.read()
        rest = s[s.rfind(")") + 2:].split()
        return sum(int(x) for x in rest[11:15]) / CLK_TCK

    try:
        total = one(pid)
    except OSError:
        return None
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    stack = list(children.get(pid, []))
    while stack:
        c = stack.pop()
        with contextlib.suppress(OSError):
            total += one(c)
        stack.extend(children.get(c, []))
    return total


def cgroup2_parent(runid: str) -> Path | None:
    """A fresh cgroup v2 directory for this invocation's per-system cgroups, or None when there
    is no writable cgroup v2 hierarchy (mounted at /sys/fs/cgroup, or /sys/fs/cgroup/unified
    on a hybrid v1+v2 machine).  No controller is needed: cpu.stat's usage_usec is kept for
    every cgroup."""
    with open("/proc/self/mounts") as f:
        roots = [Path(ln.split()[1]) for ln in f if len(ln.split()) > 2
                 and ln.split()[2] == "cgroup2"]
    for root in roots:
        d = root / f"s3ssefs-bench-{runid}"
        try:
            d.mkdir()
        except OSError:
            continue
        if (d / "cpu.stat").is_file():
            return d
        with contextlib.suppress(OSError):
            d.rmdir()
    return None


def remove_cgroups(parent: Path) -> None:
    """rmdir the per-system cgroups and their parent (each must have no process left)."""
    for d in [*sorted(p for p in parent.iterdir() if p.is_dir()), parent]:
        for _ in range(20):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.25)
        else:
            log(f"could not remove cgroup {d} (a process still in it?)")


class CpuMeter:
    """Client CPU of one system, counted the same way for every system.

    With a cgroup v2 parent: one cgroup per system.  The mount daemon and every workload
    process (fio, ls, the fs worker) start inside it; the library workers move themselves into
    it once Python and the client are loaded, as a daemon's start-up is not counted either.
    cpu.stat's usage_usec is then user + system time of all of them, the kernel's FUSE copies
    (charged to the reading or writing process) included.  Without one: the daemon's process
    tree from /proc plus the harness's waited children (the workload processes and workers,
    their start-up included)."""

    def __init__(self, parent: Path | None, name: str) -> None:
        self.cg: Path | None = None
        if parent is not None:
            self.cg = parent / name
            self.cg.mkdir(exist_ok=True)

    @property
    def procs_file(self) -> str | None:
        return str(self.cg / "cgroup.procs") if self.cg else None

    def wrap(self, cmd: list[str]) -> list[str]:
        """cmd, started inside the cgroup (a shell puts itself there, then execs cmd)."""
        if self.cg is None:
            return cmd
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs_file), *cmd]

    def read(self, daemon_pid: int | None) -> tuple[float, float]:
        """(user + system, system) seconds so far."""
        if self.cg is not None:
            st = dict(ln.split() for ln in (self.cg / "cpu.stat").read_text().splitlines()
                      if len(ln.split()) == 2)
            return int(st["usage_usec"]) / 1e6, int(st.get("system_usec", 0)) / 1e6
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        tree = (proc_tree_cpu(daemon_pid) or 0.0) if daemon_pid else 0.0
        return r.ru_utime + r.ru_stime + tree, r.ru_stime


def parse_exports(text: str) -> dict[str, str]:
    env = {}
    for ln in text.splitlines():
        ln = ln.strip()
        if ln.startswith("export ") and "=" in ln:
            k, v = ln[len("export "):].split("=", 1)
            env[k] = v.strip("'\"")
    return env


def rgw_answers(env: dict[str, str]) -> bool:
    import ssl
    import urllib.error
    import urllib.request

    try:
        ctx = ssl.create_default_context(cafile=env["AWS_CA_BUNDLE"])
        urllib.request.urlopen(env["S3_ENDPOINT"] + "/", timeout=10, context=ctx)
    except urllib.error.HTTPError:
        return True  # 403 for an anonymous request: it answers
    except Exception:
        return False
    return True


def load_rgw_env(state_dir: str | None, allow_up: bool) -> dict[str, str]:
    """The env of the local RGW: its STATE_DIR/env.sh when that RGW answers, else (unless
    --no-rgw-up) what tests/rgw-up.sh prints (it builds the RGW on a fresh machine)."""
    sd = Path(state_dir or os.environ.get("S3SSEFS_RGW_DIR", "/tmp/s3ssefs-rgw"))
    need = ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CA_BUNDLE")
    env: dict[str, str] = {}
    if (sd / "env.sh").is_file():
        env = parse_exports((sd / "env.sh").read_text())
        if all(k in env for k in need) and rgw_answers(env):
            return env
    if not allow_up:
        sys.exit(f"no RGW answering (env {sd / 'env.sh'}) and --no-rgw-up given")
    log("RGW not answering: running tests/rgw-up.sh")
    p = subprocess.run(["bash", str(REPO / "tests" / "rgw-up.sh"), str(sd)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        sys.exit(f"tests/rgw-up.sh failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    env = parse_exports(p.stdout)
    for k in need:
        if k not in env:
            sys.exit(f"tests/rgw-up.sh printed no {k}")
    return env


# --------------------------------------------------------------------------------- processes
class Procs:
    """Every process we start, so that whatever happens they are killed by PID on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.mounts: set[Path] = set()

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    @staticmethod
    def stop(p: subprocess.Popen, grace: float = 10.0) -> None:
        if p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)

    def cleanup(self) -> None:
        for m in list(self.mounts):
            fuse_unmount(m)
        for p in self.procs:
            self.stop(p, 3)


PROCS = Procs()


def in_mount_table(mnt: Path) -> bool:
    """From /proc/self/mountinfo: never touches the mount itself (a stat on a FUSE mount whose
    daemon does not answer blocks until the daemon dies)."""
    target = str(mnt)
    with open("/proc/self/mountinfo") as f:
        for ln in f:
            parts = ln.split()
            if len(parts) > 4 and parts[4].replace("\\040", " ") == target:
                return True
    return False


def fuse_unmount(mnt: Path) -> None:
    if not in_mount_table(mnt):
        PROCS.mounts.discard(mnt)
        return
    for _ in range(5):
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode == 0:
            break
        time.sleep(1)
    else:
        log(f"fusermount3 -u {mnt} kept failing; lazy unmount (-uz)")
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    PROCS.mounts.discard(mnt)


# --------------------------------------------------------------------------------- S3 side
class S3:
    """The harness's own boto3 client: buckets, seeding, durability polls, encryption checks."""

    def __init__(self, ctx: Ctx) -> None:
        import boto3
        from botocore.config import Config

        self.ctx = ctx
        self.c = boto3.client(
            "s3", endpoint_url=ctx.endpoint, verify=ctx.ca,
            config=Config(max_pool_connections=32, retries={"max_attempts": 5, "mode": "standard"},
                          s3={"addressing_style": "path"}))
        self.sse = dict(SSECustomerAlgorithm="AES256", SSECustomerKey=ctx.key)

    def create_bucket(self, b: str) -> None:
        self.c.create_bucket(Bucket=b)

    def delete_bucket(self, b: str) -> None:
        with contextlib.suppress(Exception):
            for page in self.c.get_paginator("list_objects_v2").paginate(Bucket=b):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                for i in range(0, len(keys), 1000):
                    self.c.delete_objects(Bucket=b, Delete={"Objects": keys[i:i + 1000],
                                                            "Quiet": True})
            for u in self.c.list_multipart_uploads(Bucket=b).get("Uploads", []):
                self.c.abort_multipart_upload(Bucket=b, Key=u["Key"], UploadId=u["UploadId"])
        try:
            self.c.delete_bucket(Bucket=b)
        except Exception as e:
            log(f"could not delete bucket {b}: {e}")

    def warm_up(self, size: int) -> float:
        """Write and delete ``size`` bytes once before anything is measured: the first write
        to a fresh bluestore pays for allocating its space (the system measured first ran at
        104 MiB/s, against 146-165 in later runs).  Returns the seconds it took."""
        from boto3.s3.transfer import TransferConfig

        b = f"bench-{self.ctx.runid}-warmup"
        t0 = time.monotonic()
        self.create_bucket(b)
        try:
            self.c.upload_fileobj(io.BytesIO(os.urandom(size)), b, "warmup", ExtraArgs=self.sse,
                                  Config=TransferConfig(multipart_chunksize=8 * MiB,
                                                        max_concurrency=8))
        finally:
            self.delete_bucket(b)
        return time.monotonic() - t0

    def listing(self, b: str, prefix: str) -> dict[str, int]:
        out = {}
        for page in self.c.get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def wait_until(self, b: str, prefix: str, pred, timeout: float) -> float:
        """Poll the listing until pred(listing) holds; returns the time it first held."""
        t_end = time.monotonic() + timeout
        while True:
            if pred(self.listing(b, prefix)):
                return time.monotonic()
            if time.monotonic() > t_end:
                raise TimeoutError(f"not durable in s3://{b}/{prefix} after {timeout:.0f} s")
            time.sleep(0.05)

    def meta(self, mtime: int | None = None) -> dict[str, str]:
        # what s3fs writes (and s3ssefs reads): regular file 0644, root, mtime in seconds
        return {"mode": str(0o100644), "uid": str(os.getuid()), "gid": str(os.getgid()),
                "mtime": str(int(time.time()) if mtime is None else mtime)}

    def seed(self, b: str, key: str, size: int, mtime: int | None = None) -> None:
        """Upload `size` random bytes with SSE-C, untimed: the neutral writer of every object
        the systems read (multipart above 8 MiB in 8 MiB parts, the default of boto3's and the
        CRT's transfer managers; no mount under test wrote it)."""
        part = 8 * MiB
        buf = os.urandom(min(size, part))
        if size <= part:
            self.c.put_object(Bucket=b, Key=key, Body=buf[:size], Metadata=self.meta(mtime),
                              **self.sse)
            return
        up = self.c.create_multipart_upload(Bucket=b, Key=key, Metadata=self.meta(), **self.sse)
        n = (size + part - 1) // part

        def put(i: int) -> dict:
            ln = min(part, size - i * part)
            r = self.c.upload_part(Bucket=b, Key=key, UploadId=up["UploadId"], PartNumber=i + 1,
                                   Body=buf[:ln], **self.sse)
            return {"PartNumber": i + 1, "ETag": r["ETag"]}

        with cf.ThreadPoolExecutor(8) as ex:
            parts = list(ex.map(put, range(n)))
        self.c.complete_multipart_upload(Bucket=b, Key=key, UploadId=up["UploadId"],
                                         MultipartUpload={"Parts": parts})

    def seed_many(self, b: str, keys: list[str], size: int,
                  mtimes: list[int] | None = None) -> None:
        times = mtimes or [None] * len(keys)
        with cf.ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda kt: self.seed(b, kt[0], size, kt[1]),
                        zip(keys, times, strict=True)))

    def encryption(self, b: str, key: str) -> str:
        """'sse-c' if a keyless GET and a keyless HEAD fail and a keyed HEAD says AES256,
        'PLAINTEXT' if a keyless GET returns data, else a short description."""
        from botocore.exceptions import ClientError

        try:
            self.c.get_object(Bucket=b, Key=key, Range="bytes=0-0")["Body"].read()
            return "PLAINTEXT"
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchKey", "404"):
                return "missing"
        try:
            self.c.head_object(Bucket=b, Key=key)
            return "keyless HEAD answers"
        except ClientError:
            pass
        try:
            h = self.c.head_object(Bucket=b, Key=key, **self.sse)
        except ClientError as e:
            return f"unreadable with our key ({e.response.get('Error', {}).get('Code')})"
        return "sse-c" if h.get("SSECustomerAlgorithm") == "AES256" else "encrypted?"


# --------------------------------------------------------------------------------- context
@dataclass
class Ctx:
    args: argparse.Namespace
    env: dict[str, str]            # process env + RGW env (boto3, s3ssefs)
    endpoint: str
    ca: str
    key: bytes
    work: Path
    runid: str
    size: int
    par_size: int
    par_n: int
    rename_size: int
    small_n: int
    rand_n: int
    meta_n: int = 5000
    s3: S3 | None = None
    systems: dict = field(default_factory=dict)
    fio_start: float = 0.0  # see fio_start_up
    fio_start_cpu: tuple[float, float] = (0.0, 0.0)  # (user + system, system) s, the same
    cg_parent: Path | None = None  # see CpuMeter
    read_bucket: str = ""  # the objects every system reads (see seed_read_bucket)

    @property
    def key_b64(self) -> str:
        return base64.b64encode(self.key).decode()


# --------------------------------------------------------------------------------- systems
class MountError(RuntimeError):
    pass


class System:
    """One client under test.  Subclasses say how to mount, unmount and empty caches."""

    name = "?"
    is_mount = True
    mount_timeout = 30.0
    workloads: tuple[str, ...] | None = None  # the ones it runs; None: all

    @classmethod
    def does(cls, workload: str) -> bool:
        return cls.workloads is None or workload in cls.workloads

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.dir = ctx.work / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mnt = self.dir / "mnt"
        self.cache = self.dir / "cache"
        self.logf = self.dir / "mount.log"
        self.proc: subprocess.Popen | None = None
        self.bucket = ""
        self.meter = CpuMeter(ctx.cg_parent, self.name)
        # CPU of fio's start-ups and exits on this system so far, taken off its CPU as their
        # time is taken off fio's times (fio_start_up): the library workers' start-up is not
        # counted either
        self.start_up_cpu = (0.0, 0.0)
        self.prepare()

    # -- hooks
    def prepare(self) -> None:
        """Write key/config files (once per invocation)."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def mount(self) -> None:
        if not self.is_mount:
            return
        self.mnt.mkdir(exist_ok=True)
        self.cache.mkdir(exist_ok=True)
        cmd, env = self.command()
        with open(self.logf, "a") as lf:
            lf.write(f"\n===== {time.strftime('%T')} mount {self.bucket}\n")
            lf.flush()
            self.proc = PROCS.start(self.meter.wrap(cmd), env=env, stdout=lf,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.dir)
        PROCS.mounts.add(self.mnt)
        t_end = time.monotonic() + self.mount_timeout
        what = "no mount"
        while True:
            if self.proc.poll() is not None:
                raise MountError(f"{self.name}: mount process exited with rc {self.proc.returncode}"
                                 f" (log {self.logf}):\n{tail(self.logf)}")
            if in_mount_table(self.mnt):
                # in the mount table is not enough: the daemon must answer (FUSE INIT, getattr)
                what = "mounted but not answering stat"
                probe = subprocess.Popen(["stat", "-c", "%i", str(self.mnt)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    if probe.wait(max(0.5, min(5.0, t_end - time.monotonic()))) == 0:
                        return
                except subprocess.TimeoutExpired:
                    pass
                finally:
                    if probe.poll() is None:
                        self.abort()  # releases the probe blocked in the kernel
                        probe.kill()
                        probe.wait()
                        raise MountError(f"{self.name}: {what} after {self.mount_timeout:.0f} s "
                                         f"(log {self.logf}):\n{tail(self.logf)}")
            if time.monotonic() > t_end:
                self.abort()
                raise MountError(f"{self.name}: {what} at {self.mnt} after "
                                 f"{self.mount_timeout:.0f} s (log {self.logf}):\n"
                                 f"{tail(self.logf)}")
            time.sleep(0.1)

    def abort(self) -> None:
        """Hung or failed mount: kill the daemon by PID (which fails every pending request)
        and detach the mount point."""
        if self.proc is not None:
            Procs.stop(self.proc, 3)
        if in_mount_table(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        PROCS.mounts.discard(self.mnt)
        self.proc = None

    def run(self, cmd: list[str], input: str | None = None,
            what: str | None = None) -> tuple[float, str]:
        """Run a command that works on the mount, with the step time limit.  If it does not
        finish the mount is taken as hung: aborted (so the command is released), MountError.
        Returns (wall seconds, stdout)."""
        t0 = time.monotonic()
        p = subprocess.Popen(self.meter.wrap(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(input, timeout=self.ctx.args.timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            p.kill()
            p.communicate()
            raise MountError(f"{self.name}: {Path(cmd[0]).name} on the mount did not finish in "
                             f"{self.ctx.args.timeout:.0f} s; mount aborted "
                             f"(log {self.logf}):\n{tail(self.logf)}") from None
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{what or Path(cmd[0]).name} failed (rc {p.returncode}): "
                               f"{(err or '').strip()[-1500:]} {(out or '').strip()[-300:]}")
        return wall, out

    def fsop(self, **spec) -> dict:
        """A file operation on the mount, done by a child process (see fs_worker)."""
        _, out = self.run([sys.executable, __file__, "--fs-worker"], json.dumps(spec),
                          what=spec["op"])
        return json.loads(out)

    def unmount(self) -> None:
        if not self.is_mount:
            return
        fuse_unmount(self.mnt)
        if self.proc is not None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: mount process {self.proc.pid} still alive 60 s after unmount;"
                    " terminating it")
                Procs.stop(self.proc)
            self.proc = None

    def clear_cache(self) -> None:
        if self.cache.exists():
            shutil.rmtree(self.cache)
        self.cache.mkdir()

    def cold(self) -> None:
        """Empty every cache: (re)mount self.bucket with an empty cache dir and drop the page
        cache.  Every workload starts from here."""
        self.unmount()
        self.clear_cache()
        if not drop_page_cache():
            self.ctx.args._warn_dropcache = True
        self.mount()

    def remount(self) -> None:
        """Unmount, drop the page cache and mount self.bucket again, keeping the cache dir:
        what a system keeps across mounts (s3ssefs's metadata index) it keeps here."""
        self.unmount()
        if not drop_page_cache():
            self.ctx.args._warn_dropcache = True
        self.mount()

    def cpu(self) -> tuple[float, float]:
        """(user + system, system) seconds of this system's client side so far, fio's
        start-ups not counted."""
        total, system = self.meter.read(self.proc.pid if self.proc is not None else None)
        return total - self.start_up_cpu[0], system - self.start_up_cpu[1]

    def path(self, rel: str) -> Path:
        return self.mnt / rel


class S3ssefs(System):
    name = "s3ssefs"

    def prepare(self) -> None:
        self.keyfile = self.dir / "keys.toml"
        fd = os.open(self.keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'version = 1\ncurrent = "k1"\n\n[keys]\n"k1" = "{self.ctx.key_b64}"\n')
        os.chmod(self.keyfile, 0o600)

    def command(self):
        a = self.ctx.args
        cmd = [a.python, "-m", "s3ssefs", "mount", self.bucket, str(self.mnt),
               "--keyfile", str(self.keyfile), "--endpoint", self.ctx.endpoint,
               "--ca-bundle", self.ctx.ca, "--cache-dir", str(self.cache), "--foreground",
               *a.s3ssefs_opt]
        env = dict(self.ctx.env)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return cmd, env


class S3ssefsReadOnce(S3ssefs):
    """s3ssefs with ``-o cache_stream_max=0``: sequential reads never fill the block cache,
    not even on a second pass (the default's first pass does not either).  Only the read
    workloads (the others do not differ)."""

    name = "s3ssefs-once"
    workloads = ("read-cold", "read-warm", "par-read")

    def command(self):
        cmd, env = super().command()
        return [*cmd, "-o", "cache_stream_max=0"], env


class S3ssefsRandomAhead(S3ssefs):
    """s3ssefs with ``-o random_readahead=8M``: a small random read that misses also fetches
    the 8 MiB around it in the background.  Only the random-read workloads."""

    name = "s3ssefs-ahead"
    workloads = ("rand-cold", "rand-warm")

    def command(self):
        cmd, env = super().command()
        return [*cmd, "-o", "random_readahead=8M"], env


class S3ssefsDirect(S3ssefs):
    """s3ssefs with ``-o direct_io``: reads and writes bypass the kernel's page cache, so data
    read or written once is copied once less, and a warm re-read is fetched again (from the
    block cache, or S3).  The bulk workloads only."""

    name = "s3ssefs-direct"
    workloads = ("write", "read-cold", "read-warm", "par-read")

    def command(self):
        cmd, env = super().command()
        return [*cmd, "-o", "direct_io"], env


class S3fs(System):
    """Debian s3fs-fuse.  Key file: one key per line; a line longer than 32 chars is taken as
    base64 (s3fs PushbackSseKeys), so we write the base64 of the 32 random bytes.

    ``kernel_cache`` (its documented option for keeping the page cache across opens) is on:
    without it a warm re-read goes back to S3, and each peer gets its best documented options.
    s3fs 1.90 sends every HEAD first without the SSE-C headers and, on RGW's 400, again with
    the first key of the key file: its log shows one "failed a request(400 ...)" per file it
    stats, and its ls -l pays two HEADs per file.  That is how s3fs works, not a setup
    error."""

    name = "s3fs"
    extra: tuple[str, ...] = ()

    def prepare(self) -> None:
        self.keyfile = self.dir / "sse-c.key"
        self.passwd = self.dir / "passwd"
        for path, text in ((self.keyfile, self.ctx.key_b64 + "\n"),
                           (self.passwd, f"{self.ctx.env['AWS_ACCESS_KEY_ID']}:"
                                         f"{self.ctx.env['AWS_SECRET_ACCESS_KEY']}\n")):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(path, 0o600)

    def command(self):
        opts = [f"url={self.ctx.endpoint}", "use_path_request_style",
                f"passwd_file={self.passwd}", f"use_sse=custom:{self.keyfile}",
                "kernel_cache", "dbglevel=warn", *self.extra, *self.ctx.args.s3fs_opt]
        cmd = ["s3fs", self.bucket, str(self.mnt), "-f", "-o", ",".join(opts)]
        env = {k: v for k, v in self.ctx.env.items() if not k.startswith("AWS_")}
        env["CURL_CA_BUNDLE"] = self.ctx.ca  # s3fs reads it and sets CURLOPT_CAINFO
        return cmd, env


class S3fsNoMultipart(S3fs):
    """nomultipart: s3fs 1.90's multipart upload of a new file is stored without SSE-C on
    Ceph 16; a single PUT is encrypted.  Only the big write (the others are s3fs's)."""

    name = "s3fs-nomp"
    extra = ("nomultipart",)
    workloads = ("write",)


class S3fsNoCopyApi(S3fs):
    """nocopyapi: rename = download + upload.  On Ceph 16 CopyObject of an SSE-C source answers
    501 (plain s3fs: rename fails with EOPNOTSUPP), and s3fs 1.90's multipart upload of a new
    file is stored without SSE-C unless nocopyapi is set."""

    name = "s3fs-nocopy"
    extra = ("nocopyapi",)
    workloads = ("write", "rename")


class S3fsCache(S3fs):
    name = "s3fs-cache"

    @property
    def extra(self):  # type: ignore[override]
        return (f"use_cache={self.cache}",)


class Rclone(System):
    mode = "writes"

    def prepare(self) -> None:
        self.conf = self.dir / "rclone.conf"
        e = self.ctx.env
        text = ("[bench]\ntype = s3\nprovider = Ceph\nenv_auth = false\n"
                f"access_key_id = {e['AWS_ACCESS_KEY_ID']}\n"
                f"secret_access_key = {e['AWS_SECRET_ACCESS_KEY']}\n"
                f"endpoint = {self.ctx.endpoint}\nregion = {e.get('AWS_DEFAULT_REGION', '')}\n"
                "sse_customer_algorithm = AES256\n"
                f"sse_customer_key_base64 = {self.ctx.key_b64}\n")
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def command(self):
        a = self.ctx.args
        cmd = ["rclone", "mount", f"bench:{self.bucket}", str(self.mnt),
               "--config", str(self.conf), "--ca-cert", self.ctx.ca,
               "--cache-dir", str(self.cache), "--vfs-cache-mode", self.mode,
               "--vfs-write-back", a.rclone_write_back, *a.rclone_opt]
        # rclone refuses to start with AWS_CA_BUNDLE set (it uses --ca-cert instead)
        env = {k: v for k, v in self.ctx.env.items() if not k.startswith("AWS_")}
        return cmd, env


class RcloneWrites(Rclone):
    """rclone's mode for writing; for reading, rclone-full is its best documented option (a
    random read of rclone-writes takes ~30 ms, 2,000 of them a minute), so only the writes."""

    name = "rclone-writes"
    mode = "writes"
    workloads = ("write", "small", "rename")


class RcloneFull(Rclone):
    name = "rclone-full"
    mode = "full"


class Boto3(System):
    """Direct boto3, no mount: parallel ranged GETs and multipart PUTs of one process.
    Workloads run in a worker subprocess.  No cache, so no warm workloads."""

    name = "boto3"
    is_mount = False
    workloads = ("write", "read-cold", "rand-cold", "small", "ls", "rename", "par-read",
                 "meta")
    flag = "--boto3-worker"

    threads: int | None = None  # None: --boto3-threads
    self_cpu: float | None = None  # the last worker's own rusage of its timed part

    def worker(self, op: str, **kw) -> dict:
        spec = {"op": op, "bucket": self.bucket, "endpoint": self.ctx.endpoint, "ca": self.ctx.ca,
                "key_b64": self.ctx.key_b64,
                "threads": self.threads or self.ctx.args.boto3_threads,
                "part": self.ctx.args.boto3_part, "cgroup": self.meter.procs_file, **kw}
        p = subprocess.run([sys.executable, __file__, self.flag], input=json.dumps(spec),
                           capture_output=True, text=True, env=self.ctx.env, timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"{self.name} worker {op} failed:\n{p.stderr[-2000:]}")
        out = json.loads(p.stdout)
        self.self_cpu = out.get("cpu")
        return out


class Crt(Boto3):
    """The AWS CRT S3 client (awscrt, native C; the client mountpoint-s3 is built on): one
    object written with its auto-split multipart PUT and read with its auto-ranged GET, its
    own part size and concurrency.  The strongest client-side baseline of the big-file
    workloads."""

    name = "crt"
    workloads = ("write", "read-cold", "par-read")
    flag = "--crt-worker"


class Boto3Serial(Boto3):
    """boto3 one request at a time: the small-file reference of issue #6's targets (a program
    that writes files one after another, as a mount's user does, waits for each PUT)."""

    name = "boto3-serial"
    threads = 1
    workloads = ("small",)


SYSTEMS = {c.name: c for c in (S3ssefs, S3ssefsReadOnce, S3ssefsRandomAhead, S3ssefsDirect,
                               S3fs, S3fsNoCopyApi, S3fsNoMultipart, S3fsCache, RcloneWrites,
                               RcloneFull, Boto3, Crt, Boto3Serial)}
# s3ssefs-once, s3ssefs-ahead, s3ssefs-direct and s3fs-cache on request (--systems): they keep
# a full run of the default size and --runs within ~40 minutes
DEFAULT_SYSTEMS = ("s3ssefs,s3fs,s3fs-nocopy,s3fs-nomp,rclone-writes,rclone-full,boto3,crt,"
                   "boto3-serial")


# --------------------------------------------------------------------------------- fio
def fio_start_up(work: Path) -> tuple[float, tuple[float, float]]:
    """fio's own start-up and exit: the shortest of 3 runs reading 1 MiB of a local file,
    in wall seconds and in CPU (user + system, system) seconds.

    Every fio time is taken from exec to exit, so open and close on the mount are in it, and
    so is this fixed ~0.3 s that no mount can shorten.  The boto3 worker's clock starts after
    Python, boto3 and the client are loaded; subtracting fio's start-up from fio's times makes
    the two measure the same thing (on a 1 GiB read at 430 MiB/s it is 12% of the time).  The
    same goes for CPU: fio's start-up takes ~0.1 CPU s, 0.4 s/GiB on a 256 MiB workload, which
    the workers' CPU does not include either."""
    f = work / "fio-start-up.bin"
    f.write_bytes(os.urandom(MiB))
    walls, cpus = [], []
    for _ in range(3):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        subprocess.run(["fio", "--output-format=json", "--name=start", "--rw=read", "--bs=1M",
                        "--size=1M", "--readonly", f"--filename={f}", *FIO_COMMON],
                       check=True, capture_output=True)
        walls.append(time.monotonic() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                     r1.ru_stime - r0.ru_stime))
    f.unlink()
    return min(walls), min(cpus)


def fio(sysm: System, args: list[str], jobfile: str | None = None) -> tuple[float, dict]:
    """Run fio on the mount; (wall seconds from exec to exit, so open and close included,
    less fio's own start-up (:func:`fio_start_up`); fio's JSON)."""
    cmd = ["fio", "--output-format=json"]
    if jobfile is not None:
        jf = sysm.dir / "job.fio"
        jf.write_text(jobfile)
        cmd.append(str(jf))
    cmd += args
    wall, stdout = sysm.run(cmd)
    sysm.start_up_cpu = (sysm.start_up_cpu[0] + sysm.ctx.fio_start_cpu[0],
                         sysm.start_up_cpu[1] + sysm.ctx.fio_start_cpu[1])
    try:
        out = json.loads(stdout[stdout.index("{"):])
    except ValueError:
        out = {}
    for job in out.get("jobs", []):
        if job.get("error"):
            raise RuntimeError(f"fio job error {job['error']}")
    return max(wall - sysm.ctx.fio_start, 1e-3), out


FIO_COMMON = ["--ioengine=psync", "--thread", "--invalidate=0", "--fallocate=none",
              "--direct=0"]


# --------------------------------------------------------------------------------- workloads
@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool


class Measure:
    """Collects one round's metrics of one system."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.cpu: dict[str, tuple[float, float | None]] = {}  # workload -> (cpu s, GiB or None)
        self.enc: dict[str, str] = {}
        self.errors: list[str] = []
        self.extra: dict[str, object] = {}


BIG = "bench/big.bin"
SMALL_DIR = "bench/small"
REN_SRC, REN_DST = "bench/ren/src.bin", "bench/ren/dst.bin"
PAR_DIR = "bench/par"
META_DIR = "bench/meta"
# the metadata workload: each command over META_DIR right after a remount (see w_meta)
META_CMDS = {
    "meta_ls": ("ls -l", lambda d: ["ls", "-l", d]),
    "meta_find": ("find -newer", lambda d: ["find", d, "-type", "f", "-newer", f"{d}/f00000",
                                            "-printf", "%m %u %s %T@\n"]),
    "meta_du": ("du -s", lambda d: ["du", "-s", d]),
    "meta_rsync": ("rsync -an", lambda d: ["rsync", "-an", "--itemize-changes", f"{d}/",
                                          d + ".copy-that-is-never-written/"]),
}


def metrics(ctx: Ctx) -> list[Metric]:
    s, r = fmt_size(ctx.size), fmt_size(ctx.rename_size)
    return [
        Metric("write_close", f"seq write {s}, to close", "MiB/s", True),
        Metric("write_durable", f"seq write {s}, to durable", "MiB/s", True),
        Metric("read_cold", f"seq read {s}, cold", "MiB/s", True),
        Metric("read_warm", f"seq re-read {s}, warm", "MiB/s", True),
        Metric("rand_cold", f"{ctx.rand_n} rand 4K reads, cold mount", "ops/s", True),
        Metric("rand_warm", f"{ctx.rand_n} rand 4K reads, warm", "ops/s", True),
        Metric("small_close", f"create {ctx.small_n} x 4 KiB, to close", "s", False),
        Metric("small_durable", f"create {ctx.small_n} x 4 KiB, to durable", "s", False),
        Metric("ls_cold", f"ls -l of {ctx.small_n} files, cold", "s", False),
        Metric("rename_return", f"rename {r}, rename() returns", "s", False),
        Metric("rename_durable", f"rename {r}, to durable", "s", False),
        Metric("par_read", f"{ctx.par_n} readers x {fmt_size(ctx.par_size)}, cold", "MiB/s",
               True),
        *[Metric(k, f"{what} of {ctx.meta_n} files after a remount (boto3: one LIST)", "s",
                 False) for k, (what, _) in META_CMDS.items()],
    ]


WORKLOADS = ["write", "read-cold", "read-warm", "rand-cold", "rand-warm", "small", "ls",
             "rename", "par-read", "meta"]


# the workloads that read the shared objects of the read bucket; the others write, each into a
# fresh bucket of its own
READ_WORKLOADS = ("read-cold", "read-warm", "rand-cold", "rand-warm", "ls", "par-read", "meta")


class Runner:
    """One workload of one system in one round.  The system is already mounted cold on its
    bucket (the read bucket, or a fresh one for a write workload)."""

    def __init__(self, ctx: Ctx, sysm: System, m: Measure) -> None:
        self.ctx, self.sys, self.m = ctx, sysm, m
        self.s3 = ctx.s3

    @contextlib.contextmanager
    def cpu_of(self, workload: str, gib: float | None):
        """CPU of this system's client side over the block (see CpuMeter)."""
        c0, s0 = self.sys.cpu()
        yield
        c1, s1 = self.sys.cpu()
        self.m.cpu[workload] = (c1 - c0, gib)
        self.m.extra[f"{workload}_cpu_system_s"] = round(s1 - s0, 4)
        if not self.sys.is_mount:  # a cross-check: the worker's own rusage of its timed part
            self.m.extra[f"{workload}_worker_rusage_s"] = getattr(self.sys, "self_cpu", None)

    def check_enc(self, what: str, key: str) -> None:
        st = self.s3.encryption(self.sys.bucket, key)
        self.m.enc[what] = st
        if st != "sse-c":
            log(f"  WARNING {self.sys.name}: {what} object {key} is {st}")

    # -- workloads
    def w_write(self) -> None:
        ctx, b, size = self.ctx, self.sys.bucket, self.ctx.size
        if self.sys.is_mount:  # set-up, untimed (a child process's start-up, as in w_small)
            self.sys.fsop(op="mkdir", path=str(self.sys.path("bench")))
        with self.cpu_of("write", size / GiB):
            t0 = time.monotonic()
            if self.sys.is_mount:
                # create_on_open: one open(O_CREAT) then the writes, as cp/dd do (without it
                # fio creates the file empty, closes it and reopens it: s3fs then takes another
                # upload path, one that does send SSE-C on its multipart parts)
                wall, _ = fio(self.sys, ["--name=write", "--rw=write", "--bs=1M",
                                         f"--size={size}", "--create_on_open=1",
                                         f"--filename={self.sys.path(BIG)}", *FIO_COMMON])
                # fio's time and the listing's, less fio's start-up and exit (fio_start_up),
                # as for every other fio time: the library worker's clock starts after its own
                t_close = t0 + wall
                t_dur = self.s3.wait_until(b, BIG, lambda ls: ls.get(BIG) == size,
                                           ctx.args.timeout) - ctx.fio_start
            else:
                r = self.sys.worker("put_big", key=BIG, size=size)
                t_close = t_dur = t0 + r["wall"]
        self.m.values["write_close"] = size / MiB / (t_close - t0)
        self.m.values["write_durable"] = size / MiB / (t_dur - t0)
        self.check_enc("big file", BIG)

    def w_read_cold(self) -> None:
        self._seq_read("read_cold")

    def w_read_warm(self) -> None:
        self._seq_read(None)  # fills the caches, untimed
        self._seq_read("read_warm")

    def _seq_read(self, metric: str | None) -> None:
        size = self.ctx.size
        with (self.cpu_of(metric.replace("_", "-"), size / GiB) if metric
              else contextlib.nullcontext()):
            if self.sys.is_mount:
                wall, _ = fio(self.sys, ["--name=read", "--rw=read", "--bs=1M", f"--size={size}",
                                         "--readonly", f"--filename={self.sys.path(BIG)}",
                                         *FIO_COMMON])
            else:
                wall = self.sys.worker("get_big", key=BIG, size=size)["wall"]
        if metric:
            self.m.values[metric] = size / MiB / wall

    def w_rand_cold(self) -> None:
        self._rand("rand_cold")

    def w_rand_warm(self) -> None:
        self._rand(None)  # the same offsets, untimed
        self._rand("rand_warm")

    def _rand(self, metric: str | None) -> None:
        n, size = self.ctx.rand_n, self.ctx.size
        with (self.cpu_of(metric.replace("_", "-"), None) if metric
              else contextlib.nullcontext()):
            if self.sys.is_mount:
                wall, out = fio(self.sys, [
                    "--name=rand", "--rw=randread", "--bs=4k", f"--size={size}",
                    f"--number_ios={n}", "--randrepeat=1", "--randseed=20261123",
                    "--norandommap", "--readonly", f"--filename={self.sys.path(BIG)}",
                    *FIO_COMMON])
                ios = sum(j["read"].get("total_ios", 0) for j in out.get("jobs", [])) or n
                self.m.extra[f"{metric or 'warmup'}_fio_iops"] = sum(j["read"]["iops"]
                                                         for j in out.get("jobs", []))
            else:
                wall = self.sys.worker("rand", key=BIG, size=size, n=n, seed=20261123)["wall"]
                ios = n
        if metric:
            self.m.values[metric] = ios / wall

    def w_small(self) -> None:
        ctx, b, n = self.ctx, self.sys.bucket, self.ctx.small_n
        data = os.urandom(4096)
        with self.cpu_of("small", None):
            t0 = time.monotonic()
            if self.sys.is_mount:
                self.sys.fsop(op="mkdir", path=str(self.sys.path(SMALL_DIR)))
                t0 = time.monotonic()
                r = self.sys.fsop(op="small", dir=str(self.sys.path(SMALL_DIR)), n=n,
                                  data=base64.b64encode(data).decode())
                t_close = t0 + r["wall"]
                pre = SMALL_DIR + "/"
                t_dur = self.s3.wait_until(
                    b, pre, lambda ls: sum(1 for k, v in ls.items()
                                           if v == 4096 and k != pre) >= n, ctx.args.timeout)
            else:
                r = self.sys.worker("put_small", prefix=SMALL_DIR + "/f", n=n)
                t_close = t_dur = t0 + r["wall"]
        self.m.values["small_close"] = t_close - t0
        self.m.values["small_durable"] = t_dur - t0
        self.check_enc("small file", f"{SMALL_DIR}/f{n - 1:05d}")

    def w_ls(self) -> None:
        with self.cpu_of("ls", None):
            if self.sys.is_mount:
                wall, out = self.sys.run(["ls", "-l", str(self.sys.path(SMALL_DIR))])
                got = sum(1 for ln in out.splitlines() if ln.startswith("-"))
            else:
                r = self.sys.worker("list", prefix=SMALL_DIR + "/")
                wall, got = r["wall"], r["count"]
        if got != self.ctx.small_n:
            raise RuntimeError(f"ls -l showed {got} files, expected {self.ctx.small_n}")
        self.m.values["ls_cold"] = wall

    def w_meta(self) -> None:
        """Metadata over an unchanged directory of meta_n files, each command right after a
        remount (page cache dropped, cache dir kept), after one ls -l in an earlier mount of
        the same cache dir: what a user running rsync or find over a tree again waits for.
        The library's figure is one bare LIST of the prefix (the reference of issue #33).
        No CPU figure: every command runs in a mount of its own."""
        n = self.ctx.meta_n
        if not self.sys.is_mount:
            for k in META_CMDS:
                r = self.sys.worker("list", prefix=META_DIR + "/")
                if r["count"] != n:
                    raise RuntimeError(f"LIST gave {r['count']} objects, expected {n}")
                self.m.values[k] = r["wall"]
            return
        d = str(self.sys.path(META_DIR))
        self.sys.run(["ls", "-l", d])  # the earlier mount that saw the tree
        for k, (what, cmd) in META_CMDS.items():
            self.sys.remount()
            wall, out = self.sys.run(cmd(d), what=what)
            got = {"meta_ls": sum(1 for ln in out.splitlines() if ln.startswith("-")),
                   "meta_rsync": sum(1 for ln in out.splitlines() if ln.startswith(">f"))
                   }.get(k, n)  # find's and du's output depend on what mtimes a peer reads
            if got != n:
                raise RuntimeError(f"{what} saw {got} files, expected {n}:\n{out[-300:]}")
            self.m.values[k] = wall

    def before_rename(self) -> None:
        """Seeded before the mount, so that no system has seen the directory yet."""
        log(f"  seeding {REN_SRC} ({fmt_size(self.ctx.rename_size)}) with boto3")
        self.s3.seed(self.sys.bucket, REN_SRC, self.ctx.rename_size)

    def w_rename(self) -> None:
        ctx, b, size = self.ctx, self.sys.bucket, self.ctx.rename_size
        with self.cpu_of("rename", None):
            t0 = time.monotonic()
            if self.sys.is_mount:
                r = self.sys.fsop(op="rename", src=str(self.sys.path(REN_SRC)),
                                  dst=str(self.sys.path(REN_DST)))
                t0 = time.monotonic() - r["wall"]  # the rename() call itself, not the child
                t_ret = time.monotonic()
                t_dur = self.s3.wait_until(
                    b, "bench/ren/",
                    lambda ls: ls.get(REN_DST) == size and REN_SRC not in ls, ctx.args.timeout)
            else:
                r = self.sys.worker("rename", src=REN_SRC, dst=REN_DST, size=size)
                t_ret = t_dur = t0 + r["wall"]
        self.m.values["rename_return"] = t_ret - t0
        self.m.values["rename_durable"] = t_dur - t0
        self.check_enc("renamed file", REN_DST)

    def w_par_read(self) -> None:
        n, size = self.ctx.par_n, self.ctx.par_size
        keys = par_keys(self.ctx)
        with self.cpu_of("par-read", n * size / GiB):
            if self.sys.is_mount:
                job = "[global]\nrw=read\nbs=1M\nioengine=psync\nthread\n" \
                      f"invalidate=0\nsize={size}\n"
                for i, k in enumerate(keys):
                    job += f"[r{i}]\nfilename={self.sys.path(k)}\n"
                wall, _ = fio(self.sys, ["--readonly"], jobfile=job)
            else:
                wall = self.sys.worker("par_get", keys=keys, size=size)["wall"]
        self.m.values["par_read"] = n * size / MiB / wall


def par_keys(ctx: Ctx) -> list[str]:
    return [f"{PAR_DIR}/r{i}.bin" for i in range(ctx.par_n)]


def seed_read_bucket(ctx: Ctx, workloads: list[str]) -> None:
    """The objects of the read workloads, written once by boto3 (see S3.seed) into one bucket
    every system reads: the same bytes, parts and metadata for all."""
    b = ctx.read_bucket
    ctx.s3.create_bucket(b)
    t0 = time.monotonic()
    if {"read-cold", "read-warm", "rand-cold", "rand-warm"} & set(workloads):
        ctx.s3.seed(b, BIG, ctx.size)
    if "ls" in workloads:
        ctx.s3.seed_many(b, [f"{SMALL_DIR}/f{i:05d}" for i in range(ctx.small_n)], 4096)
    if "par-read" in workloads:
        ctx.s3.seed_many(b, par_keys(ctx), ctx.par_size)
    if "meta" in workloads:  # mtimes one a second apart, the newest an hour ago
        first = int(time.time()) - 3600 - ctx.meta_n
        ctx.s3.seed_many(b, [f"{META_DIR}/f{i:05d}" for i in range(ctx.meta_n)], 100,
                         mtimes=[first + i for i in range(ctx.meta_n)])
    log(f"read bucket {b} seeded by boto3 in {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------------- fs worker
def fs_worker() -> None:
    """Subprocess: one file operation on a mount (so that a hung mount cannot hang the
    harness), timed inside; prints {"wall": s}."""
    spec = json.loads(sys.stdin.read())
    op = spec["op"]
    t0 = time.monotonic()
    if op == "mkdir":
        os.makedirs(spec["path"], exist_ok=True)
    elif op == "small":  # n files, one open-write-close each, as cp or tar would
        data = base64.b64decode(spec["data"])
        t0 = time.monotonic()
        for i in range(spec["n"]):
            fd = os.open(os.path.join(spec["dir"], f"f{i:05d}"),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
    elif op == "rename":
        os.rename(spec["src"], spec["dst"])
    else:
        raise SystemExit(f"unknown op {op}")
    print(json.dumps({"wall": time.monotonic() - t0}))


def fs_worker_main() -> int:
    try:
        fs_worker()
    except OSError as e:
        print(f"{type(e).__name__}: [Errno {e.errno}] {e.strerror}: {e.filename}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------- boto3 worker
def boto3_worker() -> None:
    """Subprocess: read a JSON spec on stdin, run one boto3 workload, print wall and CPU."""
    import boto3
    from botocore.config import Config

    spec = json.loads(sys.stdin.read())
    threads, part = spec["threads"], spec["part"]
    c = boto3.client("s3", endpoint_url=spec["endpoint"], verify=spec["ca"],
                     config=Config(max_pool_connections=threads + 8,
                                   retries={"max_attempts": 5, "mode": "standard"},
                                   s3={"addressing_style": "path"}))
    sse = dict(SSECustomerAlgorithm="AES256", SSECustomerKey=base64.b64decode(spec["key_b64"]))
    b, op = spec["bucket"], spec["op"]
    meta = {"mode": str(0o100644), "uid": str(os.getuid()), "gid": str(os.getgid()),
            "mtime": str(int(time.time()))}
    buf = os.urandom(part)  # reused for every part / file, as fio reuses its buffer
    out: dict = {}
    join_cgroup(spec)

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def drain(body) -> int:
        n = 0
        while chunk := body.read(MiB):
            n += len(chunk)
        return n

    c0, t0 = cpu(), time.monotonic()
    if op == "put_big":
        size, key = spec["size"], spec["key"]
        if size <= part:
            c.put_object(Bucket=b, Key=key, Body=buf[:size], Metadata=meta, **sse)
        else:
            up = c.create_multipart_upload(Bucket=b, Key=key, Metadata=meta, **sse)

            def put(i: int) -> dict:
                ln = min(part, size - i * part)
                r = c.upload_part(Bucket=b, Key=key, UploadId=up["UploadId"], PartNumber=i + 1,
                                  Body=buf[:ln], **sse)
                return {"PartNumber": i + 1, "ETag": r["ETag"]}

            with cf.ThreadPoolExecutor(threads) as ex:
                parts = list(ex.map(put, range((size + part - 1) // part)))
            c.complete_multipart_upload(Bucket=b, Key=key, UploadId=up["UploadId"],
                                        MultipartUpload={"Parts": parts})
    elif op == "get_big":
        size, key = spec["size"], spec["key"]

        def get(off: int) -> int:
            end = min(size, off + part) - 1
            return drain(c.get_object(Bucket=b, Key=key, Range=f"bytes={off}-{end}",
                                      **sse)["Body"])

        with cf.ThreadPoolExecutor(threads) as ex:
            got = sum(ex.map(get, range(0, size, part)))
        assert got == size, (got, size)
    elif op == "rand":
        rnd = random.Random(spec["seed"])
        blocks = spec["size"] // 4096
        for _ in range(spec["n"]):
            off = rnd.randrange(blocks) * 4096
            r = c.get_object(Bucket=b, Key=spec["key"], Range=f"bytes={off}-{off + 4095}", **sse)
            assert len(r["Body"].read()) == 4096
    elif op == "put_small":
        def put1(i: int) -> None:
            c.put_object(Bucket=b, Key=f"{spec['prefix']}{i:05d}", Body=buf[:4096],
                         Metadata=meta, **sse)

        with cf.ThreadPoolExecutor(threads) as ex:
            list(ex.map(put1, range(spec["n"])))
    elif op == "list":
        n = 0
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=spec["prefix"]):
            n += len(page.get("Contents", []))
        out["count"] = n
    elif op == "rename":
        # Ceph 16 answers CopyObject of an SSE-C source with 501: multipart UploadPartCopy
        src, dst, size = spec["src"], spec["dst"], spec["size"]
        csse = dict(CopySourceSSECustomerAlgorithm="AES256",
                    CopySourceSSECustomerKey=sse["SSECustomerKey"])
        up = c.create_multipart_upload(Bucket=b, Key=dst, Metadata=meta, **sse)
        cpart = max(part, 16 * MiB)

        def copy(i: int) -> dict:
            off = i * cpart
            r = c.upload_part_copy(Bucket=b, Key=dst, UploadId=up["UploadId"], PartNumber=i + 1,
                                   CopySource={"Bucket": b, "Key": src},
                                   CopySourceRange=f"bytes={off}-{min(size, off + cpart) - 1}",
                                   **sse, **csse)
            return {"PartNumber": i + 1, "ETag": r["CopyPartResult"]["ETag"]}

        with cf.ThreadPoolExecutor(threads) as ex:
            parts = list(ex.map(copy, range(max(1, (size + cpart - 1) // cpart))))
        c.complete_multipart_upload(Bucket=b, Key=dst, UploadId=up["UploadId"],
                                    MultipartUpload={"Parts": parts})
        c.delete_object(Bucket=b, Key=src)
    elif op == "par_get":
        def getall(key: str) -> int:
            return drain(c.get_object(Bucket=b, Key=key, **sse)["Body"])

        with cf.ThreadPoolExecutor(len(spec["keys"])) as ex:
            got = sum(ex.map(getall, spec["keys"]))
        assert got == spec["size"] * len(spec["keys"])
    else:
        raise SystemExit(f"unknown op {op}")
    out.update(wall=time.monotonic() - t0, cpu=cpu() - c0)
    print(json.dumps(out))


def join_cgroup(spec: dict) -> None:
    """A worker, loaded and with its client made, moves itself (all its threads) into its
    system's cgroup: from here on its CPU is counted (see CpuMeter)."""
    if spec.get("cgroup"):
        with open(spec["cgroup"], "w") as f:
            f.write(f"{os.getpid()}\n")


class RepeatStream(io.RawIOBase):
    """`size` bytes made of one buffer repeated: a request body that costs no memory."""

    def __init__(self, buf: bytes, size: int) -> None:
        self.buf, self.size, self.pos = memoryview(buf), size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, min(self.size, base + offset))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = min(len(mv), self.size - self.pos)
        done = 0
        while done < n:
            off = (self.pos + done) % len(self.buf)
            k = min(n - done, len(self.buf) - off)
            mv[done:done + k] = self.buf[off:off + k]
            done += k
        self.pos += n
        return n


def crt_worker() -> None:
    """Subprocess: one workload with the AWS CRT S3 client (awscrt.s3.S3Client.make_request:
    PUT_OBJECT splits into a parallel multipart upload, GET_OBJECT into parallel ranged GETs,
    both with the client's own part size and concurrency), the three SSE-C headers on every
    request; prints wall and CPU."""
    import hashlib
    from urllib.parse import urlsplit

    from awscrt import auth, http, s3
    from awscrt import io as crtio

    spec = json.loads(sys.stdin.read())
    url = urlsplit(spec["endpoint"])
    key = base64.b64decode(spec["key_b64"])
    sse = [("x-amz-server-side-encryption-customer-algorithm", "AES256"),
           ("x-amz-server-side-encryption-customer-key", spec["key_b64"]),
           ("x-amz-server-side-encryption-customer-key-md5",
            base64.b64encode(hashlib.md5(key).digest()).decode())]
    elg = crtio.EventLoopGroup()
    boot = crtio.ClientBootstrap(elg, crtio.DefaultHostResolver(elg))
    topt = crtio.TlsContextOptions()
    topt.override_default_trust_store_from_path(ca_filepath=spec["ca"])
    tls = crtio.ClientTlsContext(topt).new_connection_options()
    tls.set_server_name(url.hostname or "")
    client = s3.S3Client(bootstrap=boot, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                         credential_provider=auth.AwsCredentialsProvider.new_environment(),
                         tls_mode=s3.S3RequestTlsMode.ENABLED, tls_connection_options=tls)
    b, op = spec["bucket"], spec["op"]
    meta = [("x-amz-meta-mode", str(0o100644)), ("x-amz-meta-uid", str(os.getuid())),
            ("x-amz-meta-gid", str(os.getgid())), ("x-amz-meta-mtime", str(int(time.time())))]

    def request(method: str, k: str, extra=(), body=None) -> http.HttpRequest:
        headers = http.HttpHeaders([("Host", url.netloc), *sse, *extra])
        return http.HttpRequest(method, f"/{b}/{k}", headers, body)

    def get(k: str):
        got = [0]

        def on_body(chunk, offset, **kw) -> None:
            got[0] += len(chunk)

        mr = client.make_request(type=s3.S3RequestType.GET_OBJECT, request=request("GET", k),
                                 on_body=on_body)
        return mr, got

    join_cgroup(spec)
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    if op == "put_big":
        size = spec["size"]
        body = RepeatStream(os.urandom(8 * MiB), size)
        req = request("PUT", spec["key"], [("Content-Length", str(size)), *meta], body)
        client.make_request(type=s3.S3RequestType.PUT_OBJECT, request=req).finished_future \
            .result(3600)
    elif op in ("get_big", "par_get"):
        keys = spec["keys"] if op == "par_get" else [spec["key"]]
        reqs = [get(k) for k in keys]
        for mr, _ in reqs:
            mr.finished_future.result(3600)
        got = sum(g[0] for _, g in reqs)
        assert got == spec["size"] * len(keys), (got, spec["size"], len(keys))
    else:
        raise SystemExit(f"crt worker: no op {op}")
    wall = time.monotonic() - t0
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "cpu": c1.ru_utime + c1.ru_stime - c0.ru_utime
                      - c0.ru_stime}))


# --------------------------------------------------------------------------------- main loop
def run_workload(ctx: Ctx, cls, rnd: int, w: str, m: Measure) -> None:
    """One workload of one system in round rnd: cold mount on its bucket (the read bucket, or a
    fresh one it writes into and that is deleted afterwards), the workload, unmount."""
    if cls.name not in ctx.systems:
        ctx.systems[cls.name] = cls(ctx)
    sysm: System = ctx.systems[cls.name]
    r = Runner(ctx, sysm, m)
    own = w not in READ_WORKLOADS
    sysm.bucket = (f"bench-{ctx.runid}-{sysm.name}-r{rnd}-{w}" if own else ctx.read_bucket)
    t = time.monotonic()
    try:
        if own:
            ctx.s3.create_bucket(sysm.bucket)
            if hasattr(r, "before_" + w):
                getattr(r, "before_" + w)()
        try:
            sysm.cold()
        except MountError as e:
            m.errors.append(f"{w}: {e}")
            log(f"  {sysm.name} {w}: mount FAILED: {e}")
            return
        before = set(m.values)
        getattr(r, "w_" + w.replace("-", "_"))()
        shown = {k: round(v, 2) for k, v in m.values.items() if k not in before}
        log(f"  {sysm.name:<13} {w} in {time.monotonic() - t:.1f} s  {shown}")
    except MountError as e:
        m.errors.append(f"{w}: {e}")
        log(f"  {sysm.name} {w}: mount FAILED: {e}")
    except Exception as e:
        why = f"{w}: {type(e).__name__}: {e}"
        if sysm.is_mount:
            why += f"\n  last lines of {sysm.logf}:\n{tail(sysm.logf, 4)}"
        m.errors.append(why)
        log(f"  ERROR {sysm.name} {why}")
        if ctx.args.verbose:
            traceback.print_exc()
    finally:
        sysm.unmount()
        if own and not ctx.args.keep:
            ctx.s3.delete_bucket(sysm.bucket)


def rotated(names: list[str], rnd: int) -> list[str]:
    k = (rnd - 1) % len(names) if names else 0
    return names[k:] + names[:k]


def summarize(ctx: Ctx, names: list[str], per: dict[str, list[Measure]]) -> dict:
    res: dict = {"systems": {}}
    for name in names:
        ms = per[name]
        d: dict = {"metrics": {}, "cpu": {}, "encryption": {}, "errors": [], "runs": len(ms)}
        for met in metrics(ctx):
            rounds = [m.values.get(met.key) for m in ms]  # ms[i] is round i + 1
            vals = [v for v in rounds if v is not None]
            if vals:
                d["metrics"][met.key] = {"unit": met.unit, "rounds": rounds, "values": vals,
                                         "median": statistics.median(vals),
                                         "min": min(vals), "max": max(vals)}
        wls = sorted({w for m in ms for w in m.cpu if not w.startswith("_")},
                     key=lambda w: WORKLOADS.index(w) if w in WORKLOADS else 99)
        for w in wls:
            rounds: list[float | None] = []
            unit = "s"
            for m in ms:
                if w in m.cpu:
                    c, gib = m.cpu[w]
                    rounds.append(c / gib if gib else c)
                    unit = "s/GiB" if gib else "s"
                else:
                    rounds.append(None)
            vals = [v for v in rounds if v is not None]
            d["cpu"][w] = {"unit": unit, "rounds": rounds, "values": vals,
                           "median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        for m in ms:
            for what, st in m.enc.items():
                prev = d["encryption"].get(what)
                if prev is None or (st != "sse-c" and prev == "sse-c"):
                    d["encryption"][what] = st
        for i, m in enumerate(ms):
            d["errors"].extend(f"round {i + 1}: {e}" for e in m.errors)
        d["extra"] = [m.extra for m in ms]
        res["systems"][name] = d
    return res


def add_ratios(res: dict, base: str) -> None:
    """Paired ratios of base to every other system (summary.paired), per round and median."""
    res["ratio_base"] = base
    res["ratios"] = {}
    if base not in res["systems"]:
        return
    for name in res["systems"]:
        if name == base:
            continue
        rr = {}
        for k in res["systems"][base]["metrics"]:
            per_round = summary.paired(res, base, name, k)
            med, n = summary.paired_median(per_round)
            if med is not None:
                rr[k] = {"rounds": per_round, "median": med, "n": n}
        res["ratios"][name] = rr


fmt_val = summary.fmt


def cell(d: dict | None) -> str:
    if not d:
        return "-"
    if len(d["values"]) == 1:
        return fmt_val(d["median"])
    return f"{fmt_val(d['median'])} ({fmt_val(d['min'])}-{fmt_val(d['max'])})"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    w = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i])  # noqa: E731
                               for i, c in enumerate(r))
    print(line(header))
    print("  ".join("-" * x for x in w))
    for r in rows:
        print(line(r))


def start_far_proxy(spec: str, endpoint: str) -> str:
    """Start farproxy.py in front of RGW; the endpoint to use instead (same CA, 127.0.0.1)."""
    try:
        delay, rate = (float(x) for x in spec.split(","))
    except ValueError:
        sys.exit(f"--far wants MS,MIBS (e.g. 10,80), not {spec!r}")
    port = endpoint.rsplit(":", 1)[1].rstrip("/")
    p = PROCS.start([sys.executable, str(Path(__file__).with_name("farproxy.py")), port,
                     str(delay), str(rate)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip() if p.stdout else ""
    if not line.isdigit():
        sys.exit("farproxy.py did not start")
    log(f"far: {delay:g} ms each way, {rate:g} MiB/s per connection, through port {line}")
    return f"https://127.0.0.1:{line}"


def report(ctx: Ctx, names: list[str], res: dict) -> None:
    S = res["systems"]
    print()
    far = f" (far: {ctx.args.far})" if ctx.args.far else ""
    print(f"s3ssefs benchmark  {res['meta']['date']}  RGW {ctx.endpoint}{far}  "
          f"runs={ctx.args.runs}  cells: median (min-max)")
    rows = []
    for met in metrics(ctx):
        if not any(met.key in S[n]["metrics"] for n in names):
            continue
        rows.append([met.label, met.unit + ("" if met.higher_better else " (lower=better)"),
                     *[cell(S[n]["metrics"].get(met.key)) for n in names]])
    enc_row = ["SSE-C at rest (keyless GET fails)", ""]
    for n in names:
        bad = [f"{w}" for w, st in S[n]["encryption"].items() if st != "sse-c"]
        enc_row.append("stored plaintext! (" + ",".join(bad) + ")" if bad else
                       ("ok" if S[n]["encryption"] else "-"))
    rows.append(enc_row)
    print_table(rows, ["workload", "unit", *names])

    print()
    print(f"client CPU of each system: {summary.CPU_METHODS[res['meta']['cpu_method']]}")
    cpu_rows = []
    for w in WORKLOADS:
        if not any(w in S[n]["cpu"] for n in names):
            continue
        unit = next(S[n]["cpu"][w]["unit"] for n in names if w in S[n]["cpu"])
        cpu_rows.append([w, "CPU " + unit, *[cell(S[n]["cpu"].get(w)) for n in names]])
    if cpu_rows:
        print_table(cpu_rows, ["workload", "unit", *names])

    base = res["ratio_base"]
    if base in S and any(res["ratios"].get(n) for n in names if n != base):
        print()
        print(f"paired ratios {base} / system: median over rounds of the two runs of the same "
              f"round (>1: {base} better; times inverted), then each round's ratio")
        rr = []
        for met in metrics(ctx):
            for n in names:
                got = res["ratios"].get(n, {}).get(met.key)
                if n == base or not got:
                    continue
                rounds = " ".join("-" if x is None else f"{x:.2f}" for x in got["rounds"])
                rr.append([met.label, n, f"{got['median']:.2f}", str(got["n"]), rounds])
        print_table(rr, ["workload", "vs", "median", "rounds", "per round"])
        short = min(v["n"] for d in res["ratios"].values() for v in d.values())
        if short < summary.MIN_ROUNDS:
            print(f"only {short} paired round(s) in some rows: fewer than {summary.MIN_ROUNDS}, "
                  "so figures, not a verdict")
        print()
        print(summary.markdown(res, base))
    elif base in S:
        print(f"\n(no ratios: {base} produced no figures)")

    errs = [(n, e) for n in names for e in S[n]["errors"]]
    if errs:
        print()
        print("errors:")
        for n, e in errs:
            first, *rest = e.splitlines()
            print(f"  {n}: {first}")
            for ln in rest[-8:]:
                print(f"      {ln}")
    if getattr(ctx.args, "_warn_dropcache", False):
        print("\nWARNING: could not write /proc/sys/vm/drop_caches (not root?): page cache "
              "was not dropped for cold runs")


def versions(ctx: Ctx) -> dict[str, str]:
    out = {}
    for name, cmd in (("s3fs", ["s3fs", "--version"]), ("rclone", ["rclone", "version"]),
                      ("fio", ["fio", "--version"])):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            out[name] = (p.stdout or p.stderr).splitlines()[0].strip()
        except Exception as e:
            out[name] = f"? ({e})"
    import boto3
    out["boto3"] = boto3.__version__
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        out["awscrt"] = version("awscrt")
    out["python"] = sys.version.split()[0]
    with contextlib.suppress(Exception):
        out["s3ssefs_git"] = subprocess.run(["git", "-C", str(REPO), "describe", "--always",
                                             "--dirty"], capture_output=True, text=True,
                                            timeout=10).stdout.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None and ("--boto3-worker" in sys.argv[1:] or "--crt-worker" in sys.argv[1:]):
        (boto3_worker if "--boto3-worker" in sys.argv[1:] else crt_worker)()
        # no interpreter teardown: it would count in the worker's cgroup, as a daemon's
        # shutdown does not in its own
        sys.stdout.flush()
        os._exit(0)
    if argv is None and "--fs-worker" in sys.argv[1:]:
        return fs_worker_main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS,
                    help=f"comma list of {', '.join(SYSTEMS)} (default {DEFAULT_SYSTEMS})")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma list of {', '.join(WORKLOADS)} (default: all)")
    ap.add_argument("--size", default="1G", help="big file size (default 1G)")
    ap.add_argument("--runs", type=int, default=summary.MIN_ROUNDS,
                    help=f"rounds (default {summary.MIN_ROUNDS}, the fewest that give a verdict)")
    ap.add_argument("--json", metavar="FILE", help="write results as JSON here")
    ap.add_argument("--par-size", help="size of each parallel-reader file (default size/8)")
    ap.add_argument("--par-n", type=int, default=8, help="parallel readers (default 8)")
    ap.add_argument("--rename-size", help="size of the renamed file (default size*100/1024)")
    ap.add_argument("--small-n", type=int, default=1000, help="small files (default 1000)")
    ap.add_argument("--rand-n", type=int, default=2000, help="random 4K reads (default 2000)")
    ap.add_argument("--meta-n", type=int, default=5000,
                    help="files of the metadata workload (default 5000; 50000 for the large "
                         "figure: seeding and each peer's first ls -l then take minutes)")
    ap.add_argument("--boto3-threads", type=int, default=16)
    ap.add_argument("--boto3-part", default="8M", help="boto3 part / range size (default 8M)")
    ap.add_argument("--rclone-write-back", default="5s",
                    help="rclone --vfs-write-back (default 5s, rclone's own default)")
    ap.add_argument("--s3ssefs-opt", action="append", default=[], metavar="ARG",
                    help="extra argument for s3ssefs mount (repeatable)")
    ap.add_argument("--s3fs-opt", action="append", default=[], metavar="OPT",
                    help="extra s3fs -o option (repeatable)")
    ap.add_argument("--rclone-opt", action="append", default=[], metavar="ARG",
                    help="extra rclone mount argument (repeatable)")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"),
                    help="interpreter for s3ssefs (default .venv/bin/python)")
    ap.add_argument("--ratio-base", default="s3ssefs",
                    help="system the ratios are computed for (default s3ssefs)")
    ap.add_argument("--far", metavar="MS,MIBS",
                    help="reach RGW through farproxy.py: MS of delay each way and a cap of "
                         "MIBS MiB/s per connection (e.g. 10,80), as a server across a network")
    ap.add_argument("--rgw-dir", help="state dir of tests/rgw-up.sh (default its own)")
    ap.add_argument("--no-rgw-up", action="store_true",
                    help="never run tests/rgw-up.sh (by default only when no RGW answers)")
    ap.add_argument("--workdir", help="parent of the temp dir (mount points, caches, logs)")
    ap.add_argument("--timeout", type=float, default=600,
                    help="per-step limit in seconds (fio, durability wait)")
    ap.add_argument("--keep", action="store_true",
                    help="keep buckets and the temp dir (keys, configs, logs) for debugging")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.boto3_part = parse_size(args.boto3_part)

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for n in names:
        if n not in SYSTEMS:
            ap.error(f"unknown system {n!r}; known: {', '.join(SYSTEMS)}")
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    workloads = [w for w in WORKLOADS if w in workloads]  # the order of WORKLOADS
    if os.geteuid() != 0:
        log("WARNING: not root: FUSE mounts may work, drop_caches will not")
    for tool in ("fio", "fusermount3") + (("s3fs",) if any(n.startswith("s3fs") for n in names)
                                          else ()) + (("rclone",) if any(
                                              n.startswith("rclone") for n in names) else ()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (Debian: apt-get install {tool.replace('3', '')})")

    rgw = load_rgw_env(args.rgw_dir, not args.no_rgw_up)
    env = dict(os.environ)
    env.update(rgw)
    os.environ.update(rgw)  # our own boto3 (checksum settings for Ceph 16, CA, credentials)
    endpoint = rgw["S3_ENDPOINT"]
    if args.far:
        endpoint = start_far_proxy(args.far, endpoint)
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="s3ssefs-bench-", dir=args.workdir))
    os.chmod(work, 0o700)
    ctx = Ctx(args=args, env=env, endpoint=endpoint, ca=rgw["AWS_CA_BUNDLE"],
              key=os.urandom(32), work=work, runid=os.urandom(3).hex(), size=size,
              par_size=parse_size(args.par_size) if args.par_size else max(MiB, size // 8),
              par_n=args.par_n,
              rename_size=(parse_size(args.rename_size) if args.rename_size
                           else max(MiB, size * 100 // 1024 // MiB * MiB)),
              small_n=args.small_n, rand_n=args.rand_n, meta_n=args.meta_n)
    ctx.s3 = S3(ctx)
    ctx.read_bucket = f"bench-{ctx.runid}-read"
    ctx.cg_parent = cgroup2_parent(ctx.runid)
    cpu_method = "cgroup" if ctx.cg_parent else "proc"
    if ctx.cg_parent is None:
        log("WARNING: no writable cgroup v2 hierarchy: client CPU is the daemon's process tree "
            "plus the workload processes (library workers with their start-up)")
    log(f"workdir {work}  runid {ctx.runid}  systems {names}  workloads {workloads}")
    log(f"sizes: big {fmt_size(size)}, par {ctx.par_n} x {fmt_size(ctx.par_size)}, "
        f"rename {fmt_size(ctx.rename_size)}, {ctx.small_n} small, {ctx.rand_n} rand")

    def on_signal(sig, frame):
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    per: dict[str, list[Measure]] = {n: [] for n in names}
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    interrupted = False
    t_start = time.monotonic()
    round_s: list[float] = []
    try:
        log(f"warm-up: wrote and deleted {fmt_size(size)} in {ctx.s3.warm_up(size):.1f} s")
        ctx.fio_start, ctx.fio_start_cpu = fio_start_up(work)
        log(f"fio starts and exits in {ctx.fio_start:.3f} s, {ctx.fio_start_cpu[0]:.3f} CPU s: "
            "taken off every fio time and CPU (the library workers' clocks and CPU count start "
            "after their start-up)")
        seed_read_bucket(ctx, [w for w in workloads if w in READ_WORKLOADS])
        for rnd in range(1, args.runs + 1):
            t_round = time.monotonic()
            log(f"round {rnd} of {args.runs}")
            for n in names:
                per[n].append(Measure())
            for w in workloads:
                for n in rotated([n for n in names if SYSTEMS[n].does(w)], rnd):
                    run_workload(ctx, SYSTEMS[n], rnd, w, per[n][-1])
            round_s.append(time.monotonic() - t_round)
            left = statistics.mean(round_s) * (args.runs - rnd)
            log(f"round {rnd} took {round_s[-1] / 60:.1f} min; ~{left / 60:.0f} min to go")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up, reporting what was measured")
    finally:
        PROCS.cleanup()
        if not args.keep:
            ctx.s3.delete_bucket(ctx.read_bucket)
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work} and the buckets bench-{ctx.runid}-*")
        if ctx.cg_parent is not None:
            remove_cgroups(ctx.cg_parent)

    res = summarize(ctx, names, per)
    res["meta"] = {"date": started, "endpoint": ctx.endpoint, "far": args.far,
                   "command": "tests/bench/bench.py " + shlex.join(sys.argv[1:] if argv is None
                                                                   else argv),
                   "elapsed_s": round(time.monotonic() - t_start, 1), "round_s": round_s,
                   "cpu_method": cpu_method, "read_bucket_writer": "boto3, 8 MiB parts",
                   "runs": args.runs, "fio_start_up_s": ctx.fio_start,
                   "fio_start_up_cpu_s": ctx.fio_start_cpu[0],
                   "interrupted": interrupted, "systems": names, "workloads": workloads,
                   "sizes": {"big": size, "par_size": ctx.par_size, "par_n": ctx.par_n,
                             "rename": ctx.rename_size, "small_n": ctx.small_n,
                             "rand_n": ctx.rand_n, "meta_n": ctx.meta_n},
                   "options": {"rclone_write_back": args.rclone_write_back,
                               "boto3_threads": args.boto3_threads,
                               "boto3_part": args.boto3_part, "s3ssefs_opt": args.s3ssefs_opt,
                               "s3fs_opt": args.s3fs_opt, "rclone_opt": args.rclone_opt},
                   "versions": versions(ctx), "cpus": os.cpu_count(),
                   "metrics": {m.key: {"label": m.label, "unit": m.unit,
                                       "higher_better": m.higher_better} for m in metrics(ctx)}}
    add_ratios(res, args.ratio_base)
    report(ctx, names, res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
