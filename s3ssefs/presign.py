"""``s3ssefs presign``: a presigned URL for one file of a live mount, bound to its SSE-C key.

A presigned URL lets a program without S3 credentials (curl, another host, a colleague) fetch
or upload one object.  With SSE-C the key has to travel with that request too; the question is
where.  In the query string it would end up in proxy and server access logs, shell and browser
history.  So the URL is signed with the three SSE-C headers (algorithm, key, key MD5) as
*signed headers*: the URL alone is refused (the signature does not match), the client adds the
headers, and the printed ``curl`` line reads the key from the key file when it runs, so the key
itself is never printed.  Whatever botocore version signs it, the URL is checked for key
material before it is shown.

The mount is found by walking up from the path to a mount point that a running s3ssefs daemon
registered (:func:`s3ssefs.daemon.registry_path`); the registry says bucket, prefix, endpoint,
credentials profile, CA and key file.  The key for a GET is the one the mount itself opened the
object with (its ``user.s3ssefs.key`` attribute); a PUT uses the key file's current key, as the
mount would.  Mounts with ``sse=s3`` or ``sse=kms:ID`` need no key headers to read; a PUT URL
for them signs the ``x-amz-server-side-encryption`` headers the upload must carry.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from s3ssefs.config import ConfigError, MountConfig
from s3ssefs.daemon import registry_path
from s3ssefs.errors import MountError
from s3ssefs.keys import SSE_ALGORITHM, Key, KeyFile, sse_c_params
from s3ssefs.store import provider_params, s3_client

log = logging.getLogger(__name__)

MAX_EXPIRES = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week
KEY_HEADER = "x-amz-server-side-encryption-customer-key"
ALGORITHM_HEADER = "x-amz-server-side-encryption-customer-algorithm"
MD5_HEADER = "x-amz-server-side-encryption-customer-key-MD5"


def find_mount(path: Path) -> tuple[Path, dict[str, Any], Path]:
    """(mount point, its registry entry, the resolved path) of the live mount holding ``path``."""
    absolute = Path(os.path.abspath(path))
    if os.path.lexists(absolute):
        resolved = Path(os.path.realpath(absolute))
    else:  # a PUT may name a file that does not exist yet
        resolved = Path(os.path.realpath(absolute.parent)) / absolute.name
    for candidate in (resolved, *resolved.parents):
        if not os.path.ismount(candidate):
            continue
        reg = registry_path(candidate)
        if not reg.exists():
            continue
        info: dict[str, Any] = json.loads(reg.read_text())
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            raise MountError(f"the s3ssefs mount on {candidate} has no running daemon") from None
        except PermissionError:
            pass
        if "bucket_name" not in info:
            raise MountError(f"the mount on {candidate} was started by an older s3ssefs; "
                             "remount it to presign")
        return candidate, info, resolved
    raise MountError(f"{path} is not under a running s3ssefs mount")


def _config(info: dict[str, Any]) -> MountConfig:
    def opt_path(name: str) -> Path | None:
        return Path(info[name]) if info.get(name) else None

    try:
        return MountConfig(bucket=info["bucket_name"], prefix=info.get("prefix") or "",
                           endpoint=info.get("endpoint"), region=info.get("region"),
                           profile=info.get("profile"),
                           credentials_file=opt_path("credentials_file"),
                           ca_bundle=opt_path("ca_bundle"),
                           allow_http=bool(info.get("allow_http")),
                           keyfile=opt_path("keyfile"), sse=info.get("sse") or "c")
    except ConfigError as e:
        raise MountError(f"the mount's options no longer hold: {e}") from None


def _read_key(cfg: MountConfig, resolved: Path, put: bool) -> Key | None:
    """The SSE-C key the request needs: current for a PUT, the object's own for a GET."""
    assert cfg.keyfile is not None
    kf = KeyFile.load(cfg.keyfile)
    if put:
        return kf.current_key
    try:
        key_id = os.getxattr(resolved, "user.s3ssefs.key").decode()
    except OSError:
        return kf.current_key
    if key_id == "none":
        return None  # stored without SSE-C: no headers
    key = kf.by_id(key_id)
    if key is None:
        raise MountError(f"key {key_id!r} that opens {resolved} is no longer in {cfg.keyfile}")
    return key


def _key_reader(keyfile: Path, key_id: str) -> str:
    """Shell text that prints the key's base64 from the key file when the command runs."""
    code = ('import base64,sys,tomllib; '
            'k=tomllib.load(open(sys.argv[1],"rb"))["keys"][sys.argv[2]]; '
            'print(base64.b64encode(base64.b64decode(k)).decode())')
    return f"$(python3 -c {shlex.quote(code)} {shlex.quote(str(keyfile))} {shlex.quote(key_id)})"


def _assert_no_key(url: str, key: Key) -> None:
    raw = key.raw
    forms = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(), raw.hex()}
    decoded = " ".join(" ".join(v) for v in parse_qs(urlsplit(url).query).values())
    if "customer-key=" in url.lower() or any(f in url or f in decoded for f in forms):
        raise MountError("this botocore puts the SSE-C key into presigned URLs; refusing")


def presign(path: Path, expires: float, put: bool, curl_only: bool = False) -> str:
    """The text ``s3ssefs presign`` prints: URL, required headers, a ready curl line (or with
    ``curl_only`` that line alone, to run as it is)."""
    if not 1 <= expires <= MAX_EXPIRES:
        raise MountError(f"--expires must be between 1s and 7d (SigV4 limit), not {expires:.0f}s")
    mountpoint, info, resolved = find_mount(path)
    rel = resolved.relative_to(mountpoint).as_posix()
    if rel == ".":
        raise MountError(f"{path} is the mount point; name a file under it")
    if resolved.is_dir():
        raise MountError(f"{path} is a directory; presign a file")
    if not put and not resolved.exists():
        raise MountError(f"{path}: no such file")
    if put and info.get("read_only"):
        raise MountError(f"the mount on {mountpoint} is read-only; no PUT URL for it")
    cfg = _config(info)
    s3key = cfg.prefix + rel
    params: dict[str, Any] = {"Bucket": cfg.bucket, "Key": s3key}
    headers: list[tuple[str, str, str]] = []  # (name, value for curl, value shown)
    key: Key | None = None
    if cfg.sse == "c":
        key = _read_key(cfg, resolved, put)
        if key is not None:
            assert cfg.keyfile is not None
            params.update(sse_c_params(key))
            headers = [(ALGORITHM_HEADER, SSE_ALGORITHM, SSE_ALGORITHM),
                       (KEY_HEADER, _key_reader(cfg.keyfile, key.id),
                        f"<base64 of key {key.id!r} in {cfg.keyfile}>"),
                       (MD5_HEADER, key.fingerprint, key.fingerprint)]
    elif put:
        provider = provider_params(cfg.sse)
        params.update(provider)
        headers = [("x-amz-server-side-encryption", provider["ServerSideEncryption"],
                    provider["ServerSideEncryption"])]
        if "SSEKMSKeyId" in provider:
            headers.append(("x-amz-server-side-encryption-aws-kms-key-id",
                            provider["SSEKMSKeyId"], provider["SSEKMSKeyId"]))
    client = s3_client(cfg)
    url: str = client.generate_presigned_url("put_object" if put else "get_object",
                                             Params=params, ExpiresIn=int(expires))
    if key is not None:
        _assert_no_key(url, key)
    signed = parse_qs(urlsplit(url).query).get("X-Amz-SignedHeaders", [""])[0].split(";")
    missing = [h for h, _, _ in headers if h.lower() not in signed]
    if missing:
        raise MountError(f"the URL does not sign {', '.join(missing)}; refusing to print it")

    name = shlex.quote(resolved.name)
    curl = ["curl", "--fail", "--show-error"]
    if cfg.ca_bundle is not None:
        curl += ["--cacert", shlex.quote(str(cfg.ca_bundle))]
    for h, value, _ in headers:
        if value.startswith("$("):
            curl += ["-H", f'"{h}: {value}"']
        else:
            curl += ["-H", shlex.quote(f"{h}: {value}")]
    curl += ["-T", name] if put else ["-o", name]
    curl.append(shlex.quote(url))
    if curl_only:
        return " ".join(curl) + "\n"
    lines = [url]
    if headers:
        lines.append("Headers the client must send with it (the URL alone is refused):")
        lines += [f"  {h}: {shown}" for h, _, shown in headers]
    else:
        lines.append("No extra headers needed.")
    lines.append("With curl (reads the key from the key file as it runs):" if key else
                 "With curl:")
    lines.append("  " + " ".join(curl))
    return "\n".join(lines) + "\n"


def run_presign(path: Path, expires: float, put: bool, curl_only: bool = False) -> int:
    print(presign(path, expires, put, curl_only), end="")
    return 0
