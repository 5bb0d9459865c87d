"""Command-line parsing for every ``s3ssefs`` command and the ``mount.s3ssefs`` fstab helper.

No logic lives here: each command parses its arguments into a :class:`MountConfig` or paths and
calls the module that does the work.  Errors are one line on stderr and exit status 1; usage
errors exit 2.  Secrets never travel in argv: keys come from the key file (or stdin for
``keys add --base64-stdin``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from s3ssefs import __version__
from s3ssefs.config import (
    CONNECTION_OPTIONS,
    OPTIONS,
    ConfigError,
    MountConfig,
    split_o_options,
)
from s3ssefs.errors import MountError
from s3ssefs.keys import KeyFile, KeyFileError
from s3ssefs.logsetup import setup_logging, stderr_is_journal

log = logging.getLogger(__name__)

# `mount` exits with this when its options, instance file or key file are unusable: trying again
# cannot help, so the systemd unit does not restart on it (RestartPreventExitStatus=).
EXIT_CONFIG = 78


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _add_mount_options(p: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """The mount options as long options and ``-o``; ``only``: just these (by name)."""
    p.set_defaults(allowed_options=only)
    p.add_argument("-o", dest="o", action="append", default=[], metavar="NAME=VALUE,…",
                   help="options as in fstab (comma-separated)" if only is None else
                   "any of these options as NAME=VALUE, comma-separated")
    for opt in OPTIONS:
        if only is not None and opt.name not in only:
            continue
        flag = "--" + opt.name.replace("_", "-")
        if opt.flag:
            p.add_argument(flag, dest=f"opt_{opt.name}", action="store_const", const="true",
                           help=opt.help)
        else:
            p.add_argument(flag, dest=f"opt_{opt.name}", metavar=opt.metavar, help=opt.help)


def _option_values(args: argparse.Namespace, instance: dict[str, str] | None = None,
                   ) -> dict[str, str]:
    values: dict[str, str] = dict(instance or {})
    values.update(split_o_options(args.o))
    allowed = getattr(args, "allowed_options", None)
    if allowed is not None and (extra := sorted(set(values) - set(allowed))):
        raise UsageError(f"s3ssefs {args.command}: option {extra[0]} does not apply here")
    for opt in OPTIONS:
        v = getattr(args, f"opt_{opt.name}", None)
        if v is not None:
            values[opt.name] = v
    return values


def read_instance_config(path: Path) -> tuple[str | None, str | None, dict[str, str]]:
    """``/etc/s3ssefs/NAME.conf``: ``bucket = …``, ``mountpoint = …``, ``name = value`` lines,
    a flag may stand alone, ``#`` starts a comment."""
    bucket = mountpoint = None
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, eq, value = (s.strip() for s in line.partition("="))
        name = name.replace("-", "_")
        if name == "bucket":
            bucket = value
        elif name == "mountpoint":
            mountpoint = value
        else:
            try:
                values.update(split_o_options([f"{name}={value}" if eq else name]))
            except ConfigError as e:
                raise ConfigError(f"{path}:{n}: {e}") from None
    return bucket, mountpoint, values


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="s3ssefs", description="FUSE filesystem for SSE-C encrypted S3 buckets")
    p.add_argument("--version", action="version", version=f"s3ssefs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount BUCKET[/PREFIX] on MOUNTPOINT")
    m.add_argument("bucket", nargs="?", metavar="BUCKET[/PREFIX]")
    m.add_argument("mountpoint", nargs="?", type=Path)
    m.add_argument("--instance-config", type=Path, help="systemd instance file")
    m.add_argument("--keyfile-source", type=Path, metavar="PATH",
                   help="file the key file's systemd credential was loaded from: its owner "
                        "and mode are checked as the key file's")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--daemonized", action="store_true", help=argparse.SUPPRESS)
    _add_mount_options(m)

    u = sub.add_parser("umount", help="flush, then unmount")
    u.add_argument("mountpoint", type=Path)

    g = sub.add_parser("keygen", help="new key file with one fresh key")
    g.add_argument("path", type=Path)
    g.add_argument("--id", dest="key_id", help="the key's id (default: today's date)")

    k = sub.add_parser("keys", help="manage a key file")
    ks = k.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    kl = ks.add_parser("list", help="ids and fingerprints, never keys")
    kl.add_argument("path", type=Path)
    ka = ks.add_parser("add", help="add a key")
    ka.add_argument("path", type=Path)
    ka.add_argument("--id", dest="key_id", help="the key's id (default: today's date)")
    src = ka.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-file", type=Path, help="file with 32 raw bytes or their base64")
    src.add_argument("--base64-stdin", action="store_true", help="read base64 from stdin")
    ka.add_argument("--current", action="store_true", help="make it the key for new writes")
    kc = ks.add_parser("current", help="set the key for new writes")
    kc.add_argument("path", type=Path)
    kc.add_argument("key_id")
    ki = ks.add_parser("import-s3fs", help="convert s3fs-fuse's key file")
    ki.add_argument("s3fs_file", type=Path)
    ki.add_argument("path", type=Path)

    r = sub.add_parser("rekey", help="re-encrypt objects server-side to one key")
    r.add_argument("bucket", metavar="BUCKET[/PREFIX]")
    r.add_argument("--to", dest="to_key", metavar="ID",
                   help="the key to re-encrypt to (default: the current key)")
    r.add_argument("--dry-run", action="store_true", help="only list what would be done")
    r.add_argument("--jobs", type=int, default=8, metavar="N",
                   help="objects re-encrypted at once (8)")
    _add_mount_options(r, ("keyfile", "part_size", *CONNECTION_OPTIONS))  # part_size: copies

    s = sub.add_parser("stats", help="counters of a live mount")
    s.add_argument("mountpoint", type=Path)
    s.add_argument("--json", action="store_true", help="print the counters as JSON")

    c = sub.add_parser("cleanup", help="abort multipart uploads left by a killed daemon")
    c.add_argument("bucket", metavar="BUCKET[/PREFIX]")
    c.add_argument("--older-than", default="24h", metavar="DURATION",
                   help="only uploads older than this (24h)")
    c.add_argument("--dry-run", action="store_true", help="only list the uploads")
    _add_mount_options(c, CONNECTION_OPTIONS)  # aborting uploads needs no key

    ps = sub.add_parser("presign", help="presigned URL for an object (key sent as headers)")
    ps.add_argument("path", type=Path, help="file under a mount")
    ps.add_argument("--expires", default="1h", metavar="DURATION",
                    help="how long the URL is valid: 30m, 1h, 7d at most (1h)")
    ps.add_argument("--put", action="store_true",
                    help="a URL that uploads (replaces) the object instead of reading it")
    ps.add_argument("--curl", action="store_true",
                    help="print only a curl command line that does the request (it reads the "
                         "key from the key file when it runs)")
    return p


# ---------------------------------------------------------------------- commands
def cmd_mount(args: argparse.Namespace) -> int:
    instance: dict[str, str] = {}
    bucket, mountpoint = args.bucket, args.mountpoint
    if args.instance_config:
        ib, im, instance = read_instance_config(args.instance_config)
        bucket = bucket or ib
        mountpoint = mountpoint or (Path(im) if im else None)
    if not bucket or not mountpoint:
        raise UsageError("s3ssefs mount: BUCKET[/PREFIX] and MOUNTPOINT are required")
    values = _option_values(args, instance)
    cfg = MountConfig.from_options(bucket, Path(mountpoint), values)
    if args.keyfile_source is not None:
        KeyFile.load(args.keyfile_source)  # LoadCredential= copies it with mode 0400
    if cfg.foreground or args.daemonized:
        from s3ssefs.daemon import run_foreground

        try:
            setup_logging(cfg.log_level, cfg.log_file, foreground=not args.daemonized)
        except OSError as e:
            raise MountError(f"cannot open log file {cfg.log_file}: {e.strerror}") from None
        return run_foreground(cfg, args.ready_fd)
    return _spawn_daemon(bucket, Path(mountpoint), values)


def _spawn_daemon(bucket: str, mountpoint: Path, values: dict[str, str]) -> int:
    """Start the daemon in its own session and wait until the mount answers (or fails)."""
    r, w = os.pipe()
    opts = ",".join(f"{k}={v}" for k, v in values.items() if "," not in v)
    argv = [sys.executable, "-m", "s3ssefs", "mount", bucket, str(mountpoint), "--daemonized",
            "--ready-fd", str(w)]
    if opts:
        argv += ["-o", opts]
    for k, v in values.items():
        if "," in v:
            argv.append(f"--{k.replace('_', '-')}={v}")
    log_file = values.get("log_file")
    try:
        with open(os.devnull, "r+b") as devnull:
            err = open(log_file, "ab") if log_file else devnull  # noqa: SIM115
            try:
                proc = subprocess.Popen(argv, stdin=devnull, stdout=devnull, stderr=err,
                                        pass_fds=(w,), start_new_session=True, close_fds=True)
            finally:
                if log_file:
                    err.close()
    except OSError as e:  # log file not writable, interpreter not executable, …
        os.close(r)
        os.close(w)
        raise MountError(f"cannot start the mount daemon: {e.strerror}: {e.filename}") from None
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "OK":
        return 0
    if line.startswith("ERR "):
        raise MountError(line[4:])
    code = proc.wait()
    raise MountError(f"the mount daemon exited with status {code} before mounting")


def cmd_umount(args: argparse.Namespace) -> int:
    from s3ssefs.daemon import umount

    return umount(args.mountpoint)


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.path.exists() or args.path.is_symlink():
        raise MountError(f"{args.path} already exists; not overwriting a key file")
    kf = KeyFile.generate(args.key_id)
    kf.save(args.path)
    k = kf.current_key
    print(f"wrote {args.path}: key {k.id} (fingerprint {k.fingerprint}), mode 0600")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    if args.keys_command == "import-s3fs":
        if args.path.exists() or args.path.is_symlink():
            raise MountError(f"{args.path} already exists; not overwriting a key file")
        kf = KeyFile.import_s3fs(args.s3fs_file)
        kf.save(args.path)
        print(f"wrote {args.path}: {len(kf.keys)} key(s), current {kf.current}")
        return 0
    kf = KeyFile.load(args.path)
    if args.keys_command == "list":
        print(f"{'ID':24} {'FINGERPRINT (key MD5)':28} CURRENT")
        for k in reversed(list(kf.keys.values())):
            print(f"{k.id:24} {k.fingerprint:28} {'*' if k.id == kf.current else ''}")
        for e in kf.map:
            print(f"map: {e.path}" + (f" version {e.version}" if e.version else "")
                  + f" -> {e.key}")
        return 0
    if args.keys_command == "add":
        if args.from_file:
            try:
                data = args.from_file.read_bytes()
            except OSError as e:
                raise MountError(f"cannot read {args.from_file}: {e.strerror}") from None
        else:
            data = sys.stdin.buffer.read()
        raw = _decode_key_input(data)
        key = kf.add(raw, args.key_id, make_current=args.current)
        kf.save()
        print(f"added key {key.id} (fingerprint {key.fingerprint})"
              + (", now current" if args.current else ""))
        return 0
    if args.keys_command == "current":
        kf.set_current(args.key_id)
        kf.save()
        print(f"current key is now {args.key_id}")
        return 0
    raise UsageError(f"unknown keys command {args.keys_command}")


def _decode_key_input(data: bytes) -> bytes:
    if len(data) == 32:
        return data
    text = data.strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MountError("key input is neither 32 raw bytes nor base64 of 32 bytes") from None
    if len(raw) != 32:
        raise MountError(f"key input decodes to {len(raw)} bytes; SSE-C keys are 32 bytes")
    return raw


def _s3_config(args: argparse.Namespace, *, require_keyfile: bool = True) -> MountConfig:
    return MountConfig.from_options(args.bucket, None, _option_values(args),
                                    require_keyfile=require_keyfile)


def cmd_stats(args: argparse.Namespace) -> int:
    import json

    from s3ssefs.daemon import control
    from s3ssefs.stats import Stats

    reply = control(args.mountpoint, "stats", timeout=30)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0
    s = Stats()
    s.requests.update(reply.pop("requests", {}))
    s.errors.update(reply.pop("errors", {}))
    reply.pop("pid", None)
    s.counters.update({k: v for k, v in reply.items() if isinstance(v, int)})
    sys.stdout.write(s.format())
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    import time

    import trio

    from s3ssefs.store import ObjectStore

    cfg = _s3_config(args, require_keyfile=False)  # aborting uploads sends no key
    setup_logging(cfg.log_level, cfg.log_file)
    age = _parse_duration(args.older_than)

    async def run() -> int:
        store = ObjectStore(cfg)
        uploads = await store.list_multipart_uploads(cfg.prefix)
        cutoff = time.time() - age
        old = [u for u in uploads if u[2] <= cutoff]
        for key, upload_id, _ in old:
            print(("would abort " if args.dry_run else "aborting ") + f"s3://{cfg.bucket}/{key}")
            if not args.dry_run:
                await store.abort_multipart(key, upload_id)
        print(f"{len(old)} unfinished upload(s) "
              + ("found" if args.dry_run else "aborted")
              + f", {len(uploads) - len(old)} newer left alone")
        return 0

    return trio.run(run)


def _parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise ConfigError(f"not a duration: {text!r} (examples: 30m, 24h, 7d)") from None


def cmd_rekey(args: argparse.Namespace) -> int:
    from s3ssefs.rekey import run_rekey

    cfg = _s3_config(args)
    setup_logging(cfg.log_level, cfg.log_file)
    return run_rekey(cfg, to_key=args.to_key, dry_run=args.dry_run, jobs=args.jobs)


def cmd_presign(args: argparse.Namespace) -> int:
    from s3ssefs.presign import run_presign

    return run_presign(args.path, expires=_parse_duration(args.expires), put=args.put,
                       curl_only=args.curl)


COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "keygen": cmd_keygen, "keys": cmd_keys,
            "rekey": cmd_rekey, "stats": cmd_stats, "cleanup": cmd_cleanup,
            "presign": cmd_presign}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except (ConfigError, KeyFileError, MountError) as e:
        print(f"{'<3>' if stderr_is_journal() else ''}s3ssefs: {e}", file=sys.stderr)
        if args.command == "mount" and isinstance(e, (ConfigError, KeyFileError)):
            return EXIT_CONFIG
        return 1
    except KeyboardInterrupt:
        return 130


def build_helper_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mount.s3ssefs")
    p.add_argument("spec", metavar="BUCKET[/PREFIX]",
                   help="what to mount; s3ssefs:BUCKET/PREFIX, as mount(8) lists it, also works")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("-o", dest="o", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma-separated, as in fstab (see s3ssefs(1))")
    p.add_argument("-s", action="store_true", help="tolerate sloppy options (ignored)")
    p.add_argument("-f", action="store_true", help="fake: check the options only")
    p.add_argument("-n", action="store_true", help="do not write /etc/mtab (ignored)")
    p.add_argument("-v", action="store_true", help="verbose")
    p.add_argument("-t", dest="type", help=argparse.SUPPRESS)
    return p


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``mount -t s3ssefs SPEC DIR -o opts`` runs ``mount.s3ssefs SPEC DIR [-sfnv] -o opts``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_helper_parser().parse_args(argv)
        values = split_o_options(args.o)
        if args.v:
            values.setdefault("log_level", "info")
        MountConfig.from_options(args.spec, args.mountpoint, values)
        if args.f:
            return 0
        values.pop("foreground", None)
        return _spawn_daemon(args.spec, args.mountpoint, values)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except (ConfigError, KeyFileError, MountError) as e:
        print(f"mount.s3ssefs: {e}", file=sys.stderr)
        return 1

