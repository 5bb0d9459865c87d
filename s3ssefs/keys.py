"""The key file: SSE-C keys, which one writes, which old one opens what, and the SSE-C parameters.

SSE-C means S3 never stores the key: whoever loses the key loses the data, and whoever reads the
key reads the data.  So this module is strict in both directions.  The key file is refused unless
it is a private regular file (mode 0600 or tighter, owned by us or root, no symlink — checked with
``fstat`` on the descriptor we then read, so nothing can swap the file in between), every key is
exactly 32 bytes, every reference names a key that exists, and nothing unknown is silently
ignored (a typo in ``version`` of a ``[[map]]`` entry would otherwise widen it to every version).
Saving is atomic, so a crash mid-write never leaves a half key file behind.

Key bytes never appear in a ``repr``, a log line or an exception message; errors name the file,
the key id or the line number instead.  :func:`sse_c_params` is the single place that turns a
:class:`Key` into boto3 request parameters, so the store cannot get the header set wrong.

The lookup order for reading an object (DESIGN §3) lives in :meth:`KeyFile.candidates`.  Import
from s3fs-fuse follows s3fs's own parser (``S3fsCurl::PushbackSseKeys``): lines are trimmed,
blank lines and lines starting with ``#`` are skipped, a line of at most 32 characters is the raw
key itself, a longer one is base64, and the first key is the one s3fs writes with.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as _dt
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

log = logging.getLogger(__name__)

KEY_BYTES = 32
FORMAT_VERSION = 1
SSE_ALGORITHM = "AES256"

# A key file is a few keys and a map (about 100 bytes an entry): anything larger than this is
# not a key file but a file named by mistake (a disk image, a log) that we need not read.
_MAX_FILE_BYTES = 64 << 10
_TOP_LEVEL_FIELDS = ("version", "current", "keys", "map")
_MAP_FIELDS = ("path", "version", "key")
_MAX_ID_CHARS = 128


class KeyFileError(Exception):
    """The key file (or an operation on it) is invalid; the message is one line for the user.

    The message names the file, the key id or the line, never key material.
    """


@dataclass(frozen=True, repr=False)
class Key:
    """One SSE-C key: an id for people and 32 secret bytes for S3."""

    id: str
    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_BYTES:
            size = len(self.raw) if isinstance(self.raw, bytes | bytearray) else "non-bytes"
            raise KeyFileError(f"key {self.id!r} must be exactly {KEY_BYTES} bytes, got {size}")
        problem = _id_problem(self.id)
        if problem:
            raise KeyFileError(problem)

    @property
    def fingerprint(self) -> str:
        """base64 of MD5(raw), as S3 echoes it in ``…-server-side-encryption-customer-key-MD5``."""
        digest = hashlib.md5(self.raw, usedforsecurity=False).digest()
        return base64.b64encode(digest).decode("ascii")

    def __repr__(self) -> str:
        return f"Key(id={self.id!r}, fingerprint={self.fingerprint!r})"

    __str__ = __repr__


@dataclass(frozen=True)
class MapEntry:
    """An object (``version`` None: every version of it) that needs a key other than ``current``."""

    path: str
    version: str | None
    key: str


def sse_c_params(key: Key | None, *, copy_source: bool = False) -> dict[str, Any]:
    """boto3 parameters for SSE-C with ``key``; ``{}`` for an object stored without SSE-C.

    With ``copy_source`` the parameters describe the source of CopyObject / UploadPartCopy.
    boto3 base64-encodes the key and adds its MD5 itself.
    """
    if key is None:
        return {}
    prefix = "CopySourceSSECustomer" if copy_source else "SSECustomer"
    return {f"{prefix}Algorithm": SSE_ALGORITHM, f"{prefix}Key": key.raw}


def sse_c_headers(key: Key | None) -> dict[str, str]:
    """The HTTP headers of :func:`sse_c_params` (what boto3 sends for them), for the lean
    request path of :mod:`s3ssefs.wire`; ``{}`` without SSE-C."""
    if key is None:
        return {}
    return {"x-amz-server-side-encryption-customer-algorithm": SSE_ALGORITHM,
            "x-amz-server-side-encryption-customer-key":
                base64.b64encode(key.raw).decode("ascii"),
            "x-amz-server-side-encryption-customer-key-MD5": key.fingerprint}


def fresh_key() -> bytes:
    """32 random bytes, never starting with 0x00: s3fs-fuse reads a key through a C string
    and fails on a leading NUL, so such a key would break s3fs on the same bucket (this drops
    1/256 of the key space, 0.006 bits)."""
    while True:
        raw = os.urandom(KEY_BYTES)
        if raw[0] != 0:
            return raw


def _id_problem(key_id: object) -> str | None:
    """Why ``key_id`` cannot be a key id, or None.  Ids go into one-line messages and logs."""
    if not isinstance(key_id, str):
        return f"a key id must be a string, not {type(key_id).__name__}"
    if not key_id.strip():
        return "a key id must not be empty"
    if len(key_id) > _MAX_ID_CHARS:
        return f"key id {key_id[:20]!r}… is longer than {_MAX_ID_CHARS} characters"
    if not key_id.isprintable():
        return f"key id {key_id!r} contains control characters"
    return None


def _today() -> str:
    return _dt.date.today().isoformat()


def _read_private_file(path: Path, what: str) -> bytes:
    """Read ``path`` if it is a private regular file; the checks use ``fstat`` on the read fd."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise KeyFileError(f"{what} {path} is not readable by this user") from None
    except OSError as e:
        if e.errno == errno.ELOOP and path.is_symlink():
            raise KeyFileError(
                f"{what} {path} is a symlink; point to the file itself ({path.resolve()})"
            ) from None
        raise KeyFileError(f"{what} {path} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{what} {path} is not a regular file")
        euid = os.geteuid()
        if st.st_uid not in (euid, 0):
            raise KeyFileError(
                f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {euid}) "
                "or root; chown it"
            )
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}, which lets others "
                f"read it; run: chmod 600 {path}"
            )
        if st.st_size > _MAX_FILE_BYTES:
            raise KeyFileError(f"{what} {path} is too large to be a key file "
                               f"({st.st_size} bytes; at most {_MAX_FILE_BYTES >> 10} KiB)")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > _MAX_FILE_BYTES:
                raise KeyFileError(f"{what} {path} is too large to be a key file")
        return b"".join(chunks)
    except OSError as e:
        raise KeyFileError(f"{what} {path} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)


_TOML_COORD = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)$")
# tomllib quotes the offending character; it may be part of a key, so it never reaches a message.
_TOML_CHAR = re.compile(r"(invalid character|Illegal character) '.*?'")


def _toml_problem(err: tomllib.TOMLDecodeError) -> str:
    """tomllib's error as one line without file content, with its line and column."""
    text = str(err).splitlines()[0] if str(err) else "invalid TOML"
    m = _TOML_COORD.search(text)
    where = m.group(1) if m else "unknown position"
    msg = _TOML_COORD.sub("", text)
    msg = _TOML_CHAR.sub(r"\1", msg)
    if msg.startswith(("Cannot overwrite a value", "Cannot declare")):
        return (
            f"a key or table is defined twice at {where} (duplicate key id? "
            "every id in [keys] must be unique)"
        )
    return f"not valid TOML at {where}: {msg}"


def b64decode_standard(text: str | bytes) -> bytes:
    """Standard base64 (RFC 4648 §4: ``A-Z a-z 0-9 + /``, ``=`` padding), the one spelling
    of a key everywhere (key file, ``keys add``, s3fs import), as ``base64`` and
    ``openssl rand -base64`` write it; the URL-safe alphabet is refused by name."""
    t = text.strip()
    chars = t if isinstance(t, bytes) else t.encode("ascii", "replace")
    if b"-" in chars or b"_" in chars:
        raise ValueError("URL-safe base64 (- and _); write it in standard base64 (+ and /)")
    try:
        return base64.b64decode(chars, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not standard base64 (A-Z a-z 0-9 + / and = padding)") from None


def _decode_key(value: object, key_id: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"key {key_id!r} must be a base64 string, not {type(value).__name__}")
    try:
        raw = b64decode_standard(value)
    except ValueError as e:
        raise ValueError(f"key {key_id!r} is not valid base64: {e}") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(
            f"key {key_id!r} decodes to {len(raw)} bytes, not {KEY_BYTES} "
            "(make one with: head -c 32 /dev/urandom | base64)"
        )
    return raw


def _parse_document(doc: dict[str, Any]) -> tuple[str, dict[str, Key], list[MapEntry]]:
    """Validate a parsed key file; raises ValueError with a one-line message (no file name)."""
    unknown = [k for k in doc if k not in _TOP_LEVEL_FIELDS]
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(_TOP_LEVEL_FIELDS)})"
        )
    if "version" not in doc:
        raise ValueError(f"missing 'version = {FORMAT_VERSION}'")
    version = doc["version"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(
            f"version {version!r} is not supported (this s3ssefs reads version {FORMAT_VERSION})"
        )

    table = doc.get("keys")
    if not isinstance(table, dict) or not table:
        raise ValueError("no keys: a [keys] table with at least one key is required")
    keys: dict[str, Key] = {}
    seen_fp: dict[str, str] = {}
    for key_id, value in table.items():
        problem = _id_problem(key_id)
        if problem:
            raise ValueError(problem)
        key = Key(key_id, _decode_key(value, key_id))
        other = seen_fp.get(key.fingerprint)
        if other is not None:
            raise ValueError(
                f"keys {other!r} and {key_id!r} are the same key (fingerprint {key.fingerprint}); "
                "keep one id"
            )
        seen_fp[key.fingerprint] = key_id
        keys[key_id] = key

    if "current" not in doc:
        raise ValueError("missing 'current = \"ID\"': which key encrypts new writes")
    current = doc["current"]
    if not isinstance(current, str):
        raise ValueError("'current' must be a key id string")
    if current not in keys:
        raise ValueError(f"current = {current!r} names no key in [keys]")

    raw_map = doc.get("map", [])
    if not isinstance(raw_map, list):
        raise ValueError("'map' must be an array of tables ([[map]])")
    entries: list[MapEntry] = []
    seen: set[tuple[str, str | None]] = set()
    for n, item in enumerate(raw_map, start=1):
        where = f"[[map]] entry {n}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} is not a table")
        extra = [k for k in item if k not in _MAP_FIELDS]
        if extra:
            raise ValueError(
                f"{where} has unknown field(s) {', '.join(map(repr, extra))} "
                f"(known: {', '.join(_MAP_FIELDS)})"
            )
        path = item.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where} needs 'path', a non-empty string")
        entry_version = item.get("version")
        if entry_version is not None and (not isinstance(entry_version, str) or not entry_version):
            raise ValueError(f"{where} ({path!r}): 'version' must be a non-empty string")
        key_id = item.get("key")
        if not isinstance(key_id, str):
            raise ValueError(f"{where} ({path!r}) needs 'key', a key id string")
        if key_id not in keys:
            raise ValueError(f"{where} ({path!r}) names key {key_id!r}, which is not in [keys]")
        if (path, entry_version) in seen:
            raise ValueError(f"{where} repeats path {path!r} with the same version")
        seen.add((path, entry_version))
        entries.append(MapEntry(path, entry_version, key_id))
    return current, keys, entries


def _parse_text(data: bytes) -> tuple[str, dict[str, Key], list[MapEntry]]:
    """Bytes of a key file → (current, keys, map); ValueError with a one-line message."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(_toml_problem(e)) from None
    except RecursionError:
        raise ValueError("not valid TOML: nested too deeply") from None
    return _parse_document(doc)


class KeyFile:
    """The keys of one mount: which key writes (``current``), which keys read, and the map.

    ``keys`` keeps file order, which is age order: the last key is the newest.  Change the map
    through :meth:`add_map` / :meth:`remove_map`; ``map`` returns a copy.
    """

    version: int = FORMAT_VERSION

    def __init__(
        self,
        keys: dict[str, Key],
        current: str,
        map: Iterable[MapEntry] = (),
        path: Path | None = None,
    ) -> None:
        self.path = path
        self.keys = dict(keys)
        self.current = current
        self._map: dict[tuple[str, str | None], MapEntry] = {}
        for entry in map:
            self._map[(entry.path, entry.version)] = entry
        self._check()

    def __repr__(self) -> str:
        return (
            f"KeyFile(path={str(self.path) if self.path else None!r}, current={self.current!r}, "
            f"keys={list(self.keys)!r}, map_entries={len(self._map)})"
        )

    __str__ = __repr__

    # -- reading and writing ------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> KeyFile:
        """Read and validate the key file at ``path``; KeyFileError says what is wrong."""
        path = Path(path)
        data = _read_private_file(path, "key file")
        try:
            current, keys, entries = _parse_text(data)
        except (ValueError, KeyFileError) as e:
            raise KeyFileError(f"key file {path}: {e}") from None
        log.debug("loaded key file %s: %d key(s), %d map entries", path, len(keys), len(entries))
        return cls(keys, current, entries, path=path)

    def to_toml(self) -> str:
        """The key file as TOML text (contains the keys: handle as a secret)."""
        doc: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "current": self.current,
            "keys": {
                key_id: base64.b64encode(key.raw).decode("ascii")
                for key_id, key in self.keys.items()
            },
        }
        if self._map:
            entries: list[dict[str, str]] = []
            for e in self._map.values():
                entry = {"path": e.path}
                if e.version is not None:
                    entry["version"] = e.version
                entry["key"] = e.key
                entries.append(entry)
            doc["map"] = entries
        header = "# s3ssefs key file, see s3ssefs-keyfile(5). Secret: keep it mode 0600.\n"
        return header + tomli_w.dumps(doc)

    def save(self, path: Path | None = None) -> None:
        """Write atomically (temp file 0600 in the same directory, fsync, rename, fsync dir).

        The text is validated by parsing it back first: on any error nothing is written.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise KeyFileError("no path to save the key file to")
        text = self.to_toml()
        data = text.encode("utf-8")
        if len(data) > _MAX_FILE_BYTES:
            raise KeyFileError(f"the key file would grow to {len(data)} bytes, more than "
                               f"{_MAX_FILE_BYTES >> 10} KiB; not saved (fewer [[map]] entries: "
                               "one without version covers every version of a path)")
        try:
            _parse_text(data)
        except (ValueError, KeyFileError) as e:
            raise KeyFileError(f"key file {target} not saved: {e}") from None

        directory = target.parent
        tmp = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            existing = None
        except OSError as e:
            raise KeyFileError(f"key file {target} not saved: {e.strerror}") from None
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise KeyFileError(
                f"key file {target} not saved: cannot create a file in {directory}: {e.strerror}"
            ) from None
        try:
            try:
                os.fchmod(fd, 0o600)
                # root rewriting a user's key file must leave it usable by that user
                if existing is not None and os.geteuid() == 0 and existing.st_uid != 0:
                    os.fchown(fd, existing.st_uid, existing.st_gid)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise KeyFileError(f"key file {target} not saved: {e.strerror}") from None
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            log.warning("key file %s saved, but syncing %s failed: %s", target, directory, e)
        self.path = target
        log.info("saved key file %s (%d key(s), current %r)", target, len(self.keys), self.current)

    # -- building and changing ----------------------------------------------------------------

    @classmethod
    def generate(cls, key_id: str | None = None) -> KeyFile:
        """A new key file with one fresh random key, which is current (id: today's date)."""
        key = Key(key_id if key_id is not None else _today(), fresh_key())
        return cls({key.id: key}, key.id)

    def _free_id(self) -> str:
        candidate = _today()
        n = len(self.keys) + 1
        while candidate in self.keys:
            candidate = f"key-{n}"
            n += 1
        return candidate

    def add(self, raw: bytes, key_id: str | None = None, *, make_current: bool = False) -> Key:
        """Add a key as the newest; refuse a wrong length, a taken id or a key already present.

        Without ``key_id`` the id is today's date, or ``key-N`` when that is taken.
        """
        if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_BYTES:
            size = len(raw) if isinstance(raw, bytes | bytearray) else type(raw).__name__
            raise KeyFileError(f"a key must be exactly {KEY_BYTES} bytes, got {size}")
        if key_id is None:
            key_id = self._free_id()
        elif key_id in self.keys:
            raise KeyFileError(f"key id {key_id!r} is already in the key file")
        key = Key(key_id, bytes(raw))
        if key.raw[0] == 0:
            log.warning("key %r starts with a zero byte: s3fs-fuse cannot load such a key "
                        "(other tools can)", key_id)
        same = self.by_fingerprint(key.fingerprint)
        if same is not None:
            raise KeyFileError(f"this key is already in the key file as {same.id!r}")
        self.keys[key_id] = key
        if make_current:
            self.current = key_id
        return key

    def set_current(self, key_id: str) -> None:
        """Make ``key_id`` the key for every new write."""
        if key_id not in self.keys:
            raise KeyFileError(f"no key {key_id!r} in the key file (have: {', '.join(self.keys)})")
        self.current = key_id

    def add_map(self, path: str, version: str | None, key_id: str) -> None:
        """Record that ``path`` (one version, or every version if None) needs ``key_id``."""
        if not isinstance(path, str) or not path:
            raise KeyFileError("a map entry needs a non-empty path")
        if version is not None and (not isinstance(version, str) or not version):
            raise KeyFileError(f"map entry {path!r}: version must be a non-empty string or None")
        if key_id not in self.keys:
            raise KeyFileError(f"map entry {path!r}: no key {key_id!r} in the key file")
        self._map.pop((path, version), None)  # a replaced entry moves to the end
        self._map[(path, version)] = MapEntry(path, version, key_id)

    def remove_map(self, path: str, version: str | None) -> bool:
        """Forget the map entry for exactly (path, version); True if there was one."""
        return self._map.pop((path, version), None) is not None

    @property
    def map(self) -> list[MapEntry]:
        return list(self._map.values())

    def _check(self) -> None:
        """Invariants of an in-memory KeyFile (load and save check the text itself)."""
        if not self.keys:
            raise KeyFileError("a key file needs at least one key")
        for key_id, key in self.keys.items():
            if key.id != key_id:
                raise KeyFileError(f"key {key.id!r} is filed under id {key_id!r}")
        if self.current not in self.keys:
            raise KeyFileError(f"current = {self.current!r} names no key in the key file")
        for entry in self._map.values():
            if entry.key not in self.keys:
                raise KeyFileError(f"map entry {entry.path!r} names no key {entry.key!r}")

    # -- lookup -------------------------------------------------------------------------------

    @property
    def current_key(self) -> Key:
        try:
            return self.keys[self.current]
        except KeyError:
            raise KeyFileError(f"current = {self.current!r} names no key in the key file") from None

    def by_id(self, key_id: str) -> Key | None:
        return self.keys.get(key_id)

    def by_fingerprint(self, fp: str) -> Key | None:
        """The key whose MD5 fingerprint (as S3 reports it) is ``fp``."""
        for key in self.keys.values():
            if key.fingerprint == fp:
                return key
        return None

    def candidates(
        self, path: str, version: str | None = None, learned: str | None = None
    ) -> list[Key]:
        """Keys to try for ``path`` (at ``version``), most likely first, each once (DESIGN §3).

        Map entry for (path, version) → map entry for path → the key learned for this object
        (if it is still in the file) → current → every other key, newest first.
        """
        order: list[str] = []
        if version is not None:
            exact = self._map.get((path, version))
            if exact is not None:
                order.append(exact.key)
        any_version = self._map.get((path, None))
        if any_version is not None:
            order.append(any_version.key)
        if learned is not None:
            order.append(learned)
        order.append(self.current)
        order.extend(reversed(self.keys))
        result: list[Key] = []
        seen: set[str] = set()
        for key_id in order:
            key = self.keys.get(key_id)
            if key is not None and key_id not in seen:
                seen.add(key_id)
                result.append(key)
        return result

    # -- migration ----------------------------------------------------------------------------

    @classmethod
    def import_s3fs(cls, s3fs_file: Path) -> KeyFile:
        """Keys from s3fs-fuse's ``use_sse=custom:FILE`` file; its first key becomes current.

        Ids are ``s3fs-1``, ``s3fs-2``, … in s3fs's order.  They are filed oldest-last-used
        first so that "every other key, newest first" tries them in s3fs's own order.  The
        returned KeyFile has no path: save it where it belongs.
        """
        s3fs_file = Path(s3fs_file)
        data = _read_private_file(s3fs_file, "s3fs key file")
        found: list[Key] = []
        first_line: dict[str, int] = {}
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            text = line.strip()
            if not text or text.startswith(b"#"):
                continue
            where = f"s3fs key file {s3fs_file}, line {lineno}"
            if len(text) <= KEY_BYTES:
                if len(text) != KEY_BYTES:
                    raise KeyFileError(
                        f"{where}: a raw key must be exactly {KEY_BYTES} characters "
                        f"(this one has {len(text)})"
                    )
                raw = text
            else:
                try:
                    raw = b64decode_standard(text)
                except ValueError as e:
                    raise KeyFileError(
                        f"{where}: neither a {KEY_BYTES}-character key nor valid base64 ({e})"
                    ) from None
                if len(raw) != KEY_BYTES:
                    raise KeyFileError(
                        f"{where}: base64 of {len(raw)} bytes, SSE-C needs {KEY_BYTES}"
                    )
            key = Key(f"s3fs-{len(found) + 1}", raw)
            if key.fingerprint in first_line:
                log.warning(
                    "%s repeats the key on line %d; skipped", where, first_line[key.fingerprint]
                )
                continue
            first_line[key.fingerprint] = lineno
            found.append(key)
        if not found:
            raise KeyFileError(f"s3fs key file {s3fs_file} holds no key")
        keys = {key.id: key for key in reversed(found)}
        return cls(keys, found[0].id)
