"""MountConfig: every mount option, validated once, in one place.

The same table drives the long options of ``s3ssefs mount``, the ``-o name=value`` syntax of
fstab and ``mount.s3ssefs``, the man page check in the tests, and the systemd instance file
(``/etc/s3ssefs/NAME.conf`` holds ``name=value`` lines).  Nothing else in the package parses
option strings: it receives a :class:`MountConfig`.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import botocore.session

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An option is unknown or its value is invalid; the message is one line for the user."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``2GiB``, ``1048576`` → bytes (binary units, as ``du`` and ``fio`` read them)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"not a size: {text!r} (examples: 4096, 64M, 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on", ""):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {text!r} (use true or false)")


def parse_timestamp(text: str) -> _dt.datetime:
    try:
        ts = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"not an ISO timestamp: {text!r} (example: 2026-10-01T12:00:00Z)") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=_dt.UTC)
    return ts


def parse_octal(text: str) -> int:
    try:
        v = int(text, 8)
    except ValueError:
        raise ConfigError(f"not an octal mode: {text!r} (example: 022)") from None
    if not 0 <= v <= 0o777:
        raise ConfigError(f"umask out of range: {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"not a number: {text!r}") from None
    if v < 0:
        raise ConfigError(f"must not be negative: {text!r}")
    return v


def _pos_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ConfigError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise ConfigError(f"must be positive: {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ConfigError(f"not an integer: {text!r}") from None
    if v < 0:
        raise ConfigError(f"must not be negative: {text!r}")
    return v


def _log_level(text: str) -> str:
    t = text.strip().upper()
    if t not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"unknown log level {text!r} (debug, info, warning, error)")
    return t


def _sse(text: str) -> str:
    t = text.strip()
    if t == "c" or t == "s3" or (t.startswith("kms:") and len(t) > 4):
        return t
    raise ConfigError(f"unknown sse mode {text!r} (c, s3 or kms:KEYID)")


@dataclass(frozen=True)
class Option:
    """One mount option: its name (also the long option ``--name`` with ``-`` for ``_``)."""

    name: str
    parse: Callable[[str], Any]
    help: str
    flag: bool = False  # takes no value on the command line (``--read-only``)
    metavar: str = "VALUE"


OPTIONS: tuple[Option, ...] = (
    Option("keyfile", Path, "key file (TOML, mode 0600), see s3ssefs-keyfile(5)", metavar="PATH"),
    Option("endpoint", str, "S3 endpoint URL (https://…); default: AWS", metavar="URL"),
    Option("region", str, "S3 region (default from the AWS profile, else us-east-1)",
           metavar="NAME"),
    Option("profile", str, "AWS credentials profile name", metavar="NAME"),
    Option("credentials_file", Path, "AWS shared credentials file to read", metavar="PATH"),
    Option("ca_bundle", Path, "CA certificates to trust for the endpoint (wins over AWS_CA_BUNDLE)",
           metavar="PATH"),
    Option("cache_dir", Path, "directory for the encrypted block cache and write spill",
           metavar="DIR"),
    Option("cache_size", parse_size, "upper bound of the block cache on disk (e.g. 2G)",
           metavar="SIZE"),
    Option("cache_stream_max", parse_size,
           "largest file a sequential read puts in the block cache (default: cache_size)",
           metavar="SIZE"),
    Option("meta_index_size", parse_size,
           "upper bound of the encrypted metadata index that spares a HEAD per listed file "
           "after a remount (0: keep none)", metavar="SIZE"),
    Option("random_readahead", parse_size,
           "a small random read that misses also fetches, in the background, the aligned "
           "region of this size around it (default 0: only the 64K around the read)",
           metavar="SIZE"),
    Option("direct_io", parse_bool,
           "reads and writes bypass the kernel's page cache (one copy less for data read or "
           "written once; a file read again is fetched again; shared mmap fails)", flag=True),
    Option("read_only", parse_bool, "mount read-only", flag=True),
    Option("as_of", parse_timestamp, "read-only view of a versioned bucket at this time",
           metavar="TIMESTAMP"),
    Option("allow_other", parse_bool, "let other users access the mount", flag=True),
    Option("uid", _nonneg_int, "owner of objects that carry no uid metadata", metavar="UID"),
    Option("gid", _nonneg_int, "group of objects that carry no gid metadata", metavar="GID"),
    Option("umask", parse_octal, "umask applied to modes of objects without mode metadata",
           metavar="OCTAL"),
    Option("allow_http", parse_bool, "allow an http:// endpoint (loopback testing only)",
           flag=True),
    Option("foreground", parse_bool, "stay in the foreground", flag=True),
    Option("log_level", _log_level, "debug, info, warning or error", metavar="LEVEL"),
    Option("log_file", Path, "log here instead of stderr/syslog", metavar="PATH"),
    Option("attr_ttl", _nonneg_float, "seconds attributes are cached", metavar="SECONDS"),
    Option("dir_ttl", _nonneg_float, "seconds directory listings are cached", metavar="SECONDS"),
    Option("readahead", parse_size, "kernel readahead on the mount (root only; 0: leave it)",
           metavar="SIZE"),
    Option("block_size", parse_size, "read block size (ranged GET unit)", metavar="SIZE"),
    Option("part_size", parse_size, "multipart upload part size (>= 5M)", metavar="SIZE"),
    Option("multipart_threshold", parse_size, "files larger than this upload as multipart",
           metavar="SIZE"),
    Option("max_requests", _pos_int, "S3 requests in flight at once", metavar="N"),
    Option("get_streams", _pos_int,
           "large ranged GETs at once (default: 2, 4 past the cache; 8 from a far server)",
           metavar="N"),
    Option("request_timeout", _nonneg_float,
           "seconds before a request that keeps failing returns EIO", metavar="SECONDS"),
    Option("retry_interval", _nonneg_float,
           "seconds between retries of uploads that failed at close", metavar="SECONDS"),
    Option("boto3_only", parse_bool,
           "send every request through boto3 (no lean path for HEAD, GET and PUT)", flag=True),
    Option("sse", _sse, "encryption for writes: c (key file), s3 or kms:KEYID", metavar="MODE"),
    Option("delete_unreadable", parse_bool,
           "let unlink, rmdir and rename over a name delete objects no key of the mount opens "
           "(refused by default: a wrong key file must not wipe a bucket)", flag=True),
)
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}
# The options of commands that talk to S3 without mounting (rekey, cleanup): the connection
# and logging.  Those commands accept no other.
CONNECTION_OPTIONS = ("endpoint", "region", "profile", "credentials_file", "ca_bundle",
                      "allow_http", "max_requests", "request_timeout", "log_level", "log_file")

# Generic mount(8) options we accept and ignore (or map): fstab users write them.
GENERIC_MOUNT_OPTIONS = ("noatime", "atime", "relatime", "nodev", "nosuid", "dev",
                         "suid", "exec", "noexec", "auto", "noauto", "user", "nouser", "users",
                         "_netdev", "nofail", "defaults", "async", "sync")


@dataclass
class MountConfig:
    """Validated options of one mount (or of one ``rekey`` run, which uses the S3 half)."""

    bucket: str
    prefix: str = ""
    mountpoint: Path | None = None
    keyfile: Path | None = None
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    credentials_file: Path | None = None
    ca_bundle: Path | None = None
    cache_dir: Path | None = None
    cache_size: int = 2 << 30
    cache_stream_max: int | None = None  # None: cache_size
    random_readahead: int = 0
    direct_io: bool = False
    meta_index_size: int = 64 << 20
    read_only: bool = False
    as_of: _dt.datetime | None = None
    allow_other: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int = 0o022
    allow_http: bool = False
    foreground: bool = False
    log_level: str = "INFO"
    log_file: Path | None = None
    attr_ttl: float = 10.0
    dir_ttl: float = 10.0
    readahead: int = 1 << 20
    block_size: int = 1 << 20
    part_size: int = 16 << 20
    multipart_threshold: int = 16 << 20
    max_requests: int = 16
    get_streams: int | None = None  # None: from the server's distance (streams.py)
    request_timeout: float = 60.0
    retry_interval: float = 30.0
    boto3_only: bool = False
    sse: str = "c"
    delete_unreadable: bool = False
    # not an option: commands that send no SSE-C request (cleanup) run without a key file
    require_keyfile: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", self.bucket or ""):
            raise ConfigError(f"not a bucket name: {self.bucket!r}")
        self.prefix = self.prefix.strip("/")
        if self.prefix:
            self.prefix += "/"
        if self.endpoint is not None:
            if not re.match(r"^https?://", self.endpoint):
                raise ConfigError(f"endpoint must start with https:// : {self.endpoint!r}")
            if self.endpoint.startswith("http://") and not self.allow_http:
                raise ConfigError(
                    f"refusing plain-HTTP endpoint {self.endpoint}: SSE-C keys would cross the "
                    "network in clear (use https://, or allow_http for loopback tests)")
            if self.endpoint.startswith("http://") and not _loopback(self.endpoint):
                raise ConfigError(
                    f"allow_http accepts only a loopback endpoint (127.0.0.0/8, ::1, "
                    f"localhost), not {self.endpoint}: SSE-C keys would cross the network in "
                    "clear")
        if self.sse == "c" and self.keyfile is None and self.require_keyfile:
            raise ConfigError("--keyfile is required (or sse=s3 / sse=kms:KEYID)")
        if self.as_of is not None:
            self.read_only = True
        if self.part_size < 5 << 20:
            raise ConfigError("part_size must be at least 5M (the S3 minimum part size)")
        if self.block_size < 4096 or self.block_size & (self.block_size - 1):
            raise ConfigError("block_size must be a power of two of at least 4096")
        if self.part_size % self.block_size:
            # an open file tracks what it rewrote per part by block (files.FileData): a block
            # across two parts would leave the second one's sent copy stale
            up = -(-self.part_size // self.block_size) * self.block_size
            hint = f"{up >> 20}M" if up % (1 << 20) == 0 else f"{up >> 10}K"
            raise ConfigError(f"part_size ({self.part_size}) must be a multiple of block_size "
                              f"({self.block_size}): try part_size={hint}")
        if self.multipart_threshold < 1:
            raise ConfigError("multipart_threshold must be positive")
        if self.part_size > 5 << 30 or self.multipart_threshold > 5 << 30:
            raise ConfigError("part_size and multipart_threshold must be at most 5G (the "
                              "largest part and single PUT S3 takes)")
        if self.ca_bundle is not None:
            check_ca_file(self.ca_bundle, "ca_bundle")
        if self.credentials_file is not None:
            _check_readable(self.credentials_file, "credentials_file")

    def check_sources(self) -> None:
        """What the S3 half of the options points at outside itself: the CA bundle (option,
        ``AWS_CA_BUNDLE`` or the profile's), the profile, and whether any credentials are
        found.  Local checks only (plus the instance-metadata lookup boto3 itself would make),
        run in the foreground before a mount, so a mistake is one line, not a dead daemon."""
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        env_ca = os.environ.get("AWS_CA_BUNDLE")
        if self.ca_bundle is None and env_ca is not None:
            if not env_ca.strip():
                raise ConfigError("AWS_CA_BUNDLE is set but empty: unset it, or name a CA file "
                                  "(or use the ca_bundle option)")
            check_ca_file(Path(env_ca), "AWS_CA_BUNDLE")
        try:
            bs = botocore_session(self)
            profile_ca = bs.get_config_variable("ca_bundle")
            credentials = bs.get_credentials()
        except ProfileNotFound:
            raise ConfigError(self._profile_problem()) from None
        except BotoCoreError as e:
            raise ConfigError(f"AWS credentials or configuration: {e}") from None
        if self.ca_bundle is None and env_ca is None and profile_ca:
            check_ca_file(Path(profile_ca), f"ca_bundle of profile {self._profile_name()!r}")
        if credentials is None:
            raise ConfigError(f"no credentials found (looked in {self._credential_places()})")

    def _profile_name(self) -> str:
        return (self.profile or os.environ.get("AWS_PROFILE")
                or os.environ.get("AWS_DEFAULT_PROFILE") or "default")

    def _config_files(self) -> tuple[str, str]:
        creds = str(self.credentials_file) if self.credentials_file else \
            os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
        return creds, os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")

    def _profile_problem(self) -> str:
        name = self._profile_name()
        where = ("the profile option" if self.profile else
                 "AWS_PROFILE" if os.environ.get("AWS_PROFILE") else "AWS_DEFAULT_PROFILE")
        creds, conf = self._config_files()
        return f"profile {name!r} (from {where}) is in neither {creds} nor {conf}"

    def _credential_places(self) -> str:
        creds, conf = self._config_files()
        profile = self._profile_name()
        if self.credentials_file is not None:
            return f"credentials_file {creds}, profile {profile!r}"
        env = "" if self.profile else "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        return (f"{env}{creds} and {conf} for profile {profile!r}, container and "
                "instance metadata")

    @property
    def bucket_path(self) -> str:
        return f"{self.bucket}/{self.prefix}".rstrip("/")

    @classmethod
    def from_options(cls, bucket_path: str, mountpoint: Path | None,
                     values: dict[str, str], *, require_keyfile: bool = True) -> MountConfig:
        """Build from ``name → raw string`` (already split from ``-o`` or long options)."""
        # "s3ssefs:BUCKET/PREFIX" is how mount(8) lists the source; bucket names have no ":"
        bucket_path = bucket_path.removeprefix("s3ssefs:")
        bucket, _, prefix = bucket_path.strip("/").partition("/")
        kw: dict[str, Any] = {}
        for name, raw in values.items():
            opt = OPTIONS_BY_NAME.get(name)
            if opt is None:
                raise ConfigError(f"unknown option {name!r}")
            if not opt.flag and not raw.strip():
                raise ConfigError(f"option {name} needs a value ({name}={opt.metavar})")
            try:
                kw[name] = opt.parse(raw)
            except ConfigError as e:
                raise ConfigError(f"option {name}: {e}") from None
        return cls(bucket=bucket, prefix=prefix, mountpoint=mountpoint,
                   require_keyfile=require_keyfile, **kw)


def split_o_options(items: Iterable[str]) -> dict[str, str]:
    """``["a=b,c", "d=e"]`` → ``{"a": "b", "c": "", "d": "e"}``; generic mount options dropped.

    ``ro`` and ``rw`` map to ``read_only`` (the last one wins, as in mount(8));
    ``x-systemd.*`` and ``x-*`` options are for other tools.
    """
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            name, eq, value = part.partition("=")
            name = name.strip().replace("-", "_") if not name.startswith("x-") else name
            if name in ("ro", "rw"):
                out["read_only"] = "true" if name == "ro" else "false"
                continue
            if name in GENERIC_MOUNT_OPTIONS or name.startswith("x-") or name == "comment":
                continue
            if name not in OPTIONS_BY_NAME:
                raise ConfigError(f"unknown mount option {name!r}")
            out[name] = value if eq else ("true" if OPTIONS_BY_NAME[name].flag else "")
    return out


def botocore_session(cfg: MountConfig) -> botocore.session.Session:
    """The botocore session (profile, credentials file) every S3 client of ``cfg`` comes from.

    A credentials file named by the option is where the credentials come from: the
    ``AWS_ACCESS_KEY_ID`` variables, which botocore would otherwise try first, are not used.
    """
    import botocore.session  # not at import: the key commands have no use for it

    bs = botocore.session.Session(profile=cfg.profile)
    if cfg.credentials_file is not None:
        bs.set_config_variable("credentials_file", str(cfg.credentials_file))
        bs.get_component("credential_provider").remove("env")
    return bs


def check_ca_file(path: Path, what: str) -> None:
    """A file of PEM certificates OpenSSL can load, or one line saying what is wrong."""
    _check_readable(path, what)
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:
        raise ConfigError(f"{what} {path} holds no PEM certificate") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


def _check_readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def option_names() -> list[str]:
    return [f.name for f in fields(MountConfig) if f.name in OPTIONS_BY_NAME]
