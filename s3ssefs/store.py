"""ObjectStore: every S3 call s3ssefs makes, async, with SSE-C, one retry policy, one errno map.

boto3 is synchronous, so each call runs in a worker thread (:mod:`s3ssefs.workers`); one
``CapacityLimiter`` bounds the calls in flight, and botocore's connection pool is sized to
match so no thread waits for a socket.  The one retry policy is
:meth:`ObjectStore._call`'s: throttling, 5xx and connection errors are retried with a
doubling backoff until the call's deadline (``request_timeout``), after which the caller gets
EIO and a stuck thread is abandoned, so no FUSE request waits forever.  The hot small calls
(HEAD, ranged GET, PUT, LIST) first try the lean path of :mod:`s3ssefs.wire`, a third of
boto3's CPU per request; what it cannot finish, boto3 tries.  The lean path is our own SigV4
and HTTP/1.1, and an error *answer* to it is final, so it is not trusted blindly: before a
mount uses it, :meth:`ObjectStore.check_lean_path` makes the mount's first LIST and a HEAD both
ways and compares, and a signature refusal boto3 does not get later turns it off too — on a
server that rejects some detail of it, every object would otherwise show as "no key opens".

SSE-C parameters come from :func:`s3ssefs.keys.sse_c_params` alone, and how a write *we* make
is encrypted is decided in one place, :meth:`ObjectStore.write_params`: with a key, SSE-C under
it; without one, the mount's provider-managed mode (``sse=s3`` → ``AES256``, ``sse=kms:ID`` →
``aws:kms`` with that key id), or nothing on an ``sse=c`` mount (a plain object stays plain).
Reads never carry provider parameters: S3 decrypts SSE-S3/KMS objects by itself.  Servers
differ and this module hides it:

* a wrong or missing key is 403 on AWS but ``400 InvalidArgument`` on Ceph RGW, and a keyless
  HEAD of an SSE-C object on RGW is a bare 400: all map to EACCES;
* RGW (Ceph 16) answers CopyObject of an SSE-C source with ``501 NotImplemented`` but accepts
  CreateMultipartUpload + UploadPartCopy under the same key, so :meth:`ObjectStore.copy` tries
  CopyObject, then the multipart copy, then (for a change of key the server refuses) streams the
  data through memory — never through local disk.  What worked is remembered per store.

Every write checks that the server echoed the encryption it was asked for (SSE-C: algorithm and
our key's MD5; SSE-S3/KMS: the algorithm and, for KMS, the key id): a server that silently
stores plaintext (s3fs 1.90 on Ceph 16 shows this happens; Ceph 16 also accepts and ignores
``AES256``) fails the write with EIO and the object is deleted or the upload aborted.  RGW
echoes nothing on UploadPartCopy and CompleteMultipartUpload, so those rest on the echo of the
upload's CreateMultipartUpload.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import boto3
import trio
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    SSLError,
)
from urllib3.exceptions import HTTPError

from s3ssefs import workers
from s3ssefs.aio import gather
from s3ssefs.config import MountConfig, botocore_session
from s3ssefs.errors import FsError
from s3ssefs.http1 import Body, Pieces
from s3ssefs.keys import SSE_ALGORITHM, Key, sse_c_headers, sse_c_params
from s3ssefs.stats import Stats
from s3ssefs.streams import stream_counts
from s3ssefs.wire import Retry, WireClient
from s3ssefs.wire import usable as wire_usable

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_PART = 5 << 20
BULK_GET = 1 << 20  # a GET at least this large streams a body (how many at once: streams.py)
MAX_SINGLE_COPY = 5 << 30
MAX_PARTS = 10_000  # parts of one multipart upload
MAX_OBJECT = 5 << 40  # the largest object S3 stores


def max_object_size(part_size: int) -> int:
    """The largest file a mount writing parts of ``part_size`` can store as one object."""
    return min(MAX_PARTS * part_size, MAX_OBJECT)


@dataclass
class ObjectInfo:
    """What a HEAD (or a listing) tells about one object version."""

    key: str
    size: int
    etag: str
    mtime: float
    metadata: dict[str, str] = field(default_factory=dict)
    version_id: str | None = None
    sse_c_md5: str | None = None  # fingerprint of the SSE-C key the server says it used
    sse: str | None = None  # "AES256" / "aws:kms" for provider-managed encryption
    is_latest: bool = True
    delete_marker: bool = False


@dataclass
class ListPage:
    prefixes: list[str]
    objects: list[ObjectInfo]


@dataclass
class Capabilities:
    """What this server turned out to support (``None`` = not tried yet)."""

    copy_object_sse_c: bool | None = None
    part_copy_cross_key: bool | None = None
    # the status a read with a wrong SSE-C key gets: 400 on RGW, 403 on AWS (where a 400 to a
    # read with a key means the object is not SSE-C)
    wrong_key_status: int | None = None


def provider_params(sse: str) -> dict[str, str]:
    """boto3 parameters of a provider-managed mode (``s3``, ``kms:ID``); ``{}`` for ``c``."""
    if sse == "s3":
        return {"ServerSideEncryption": "AES256"}
    if sse.startswith("kms:"):
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": sse[4:]}
    return {}


def _same_kms_key(wanted: str, echoed: str | None) -> bool:
    """AWS echoes a key ARN for a bare id (and for an alias, whose target we cannot know)."""
    if not echoed:
        return False
    if wanted == echoed or echoed.endswith(("/" + wanted, ":" + wanted)) \
            or wanted.endswith(("/" + echoed, ":" + echoed)):
        return True
    return wanted.startswith("alias/") or ":alias/" in wanted


def boto_session(cfg: MountConfig) -> boto3.Session:
    """The session (profile, credentials file) every client of this mount comes from."""
    return boto3.Session(botocore_session=botocore_session(cfg))


def s3_client(cfg: MountConfig, session: boto3.Session | None = None) -> Any:
    """A boto3 S3 client for ``cfg``'s endpoint, region, credentials and CA (also used by
    ``s3ssefs presign``, so its URLs are signed exactly as the mount signs its requests)."""
    session = session or boto_session(cfg)
    region = cfg.region or session.region_name or "us-east-1"
    config = Config(
        region_name=region,
        signature_version="s3v4",
        # over TLS the body needs no SHA-256 in the signature (UNSIGNED-PAYLOAD, as the AWS
        # CLI streams): hashing every part cost ~6% of a sequential write's CPU
        s3={"addressing_style": "path" if cfg.endpoint else "auto",
            "payload_signing_enabled": not (cfg.endpoint or "https").startswith("https")},
        # retries are ObjectStore._call's, not botocore's (see there)
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=cfg.max_requests + 4,
        connect_timeout=10,
        read_timeout=read_timeout(cfg),
        tcp_keepalive=True,
        # Ceph 16 does not understand aws-chunked bodies with trailing checksums
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # the endpoint is an option we validate (https only): never AWS_ENDPOINT_URL
        ignore_configured_endpoint_urls=True,
    )
    verify: bool | str = str(cfg.ca_bundle) if cfg.ca_bundle else True
    if cfg.ca_bundle is None:
        verify = None  # type: ignore[assignment]  # botocore then honours AWS_CA_BUNDLE
    return session.client("s3", endpoint_url=cfg.endpoint, config=config, verify=verify)


def read_timeout(cfg: MountConfig) -> float:
    """How long one attempt may wait for the server (the deadline covers all attempts)."""
    return max(5.0, min(60.0, cfg.request_timeout / 2))


class RequestAbandoned(Exception):
    """Raised inside a worker thread whose call the caller has given up on."""


_call_state = threading.local()


def _refuse_abandoned(**_: Any) -> None:
    """Before each attempt is sent (boto3's and the lean path's): not if the caller gave up."""
    ev = getattr(_call_state, "abandoned", None)
    if ev is not None and ev.is_set():
        raise RequestAbandoned("the caller gave up on this request")


def _joined(fn: Callable[..., T]) -> Callable[..., T]:
    """A boto3 call whose ``Body`` may be :class:`~s3ssefs.http1.Pieces`: boto3 takes one
    buffer, so the pieces are joined, but only when boto3 sends it (a retry, or no lean
    path)."""
    def call(**kw: Any) -> T:
        body = kw.get("Body")
        if isinstance(body, Pieces):
            kw["Body"] = bytes(body)
        return fn(**kw)
    return call


def _copy_if_match(etag: str | None) -> dict[str, str]:
    """CopyObject / UploadPartCopy only from the source whose ETag is ``etag``."""
    return {"CopySourceIfMatch": f'"{etag}"'} if etag else {}


def _version_query(version_id: str | None) -> str:
    return f"versionId={quote(version_id, safe='')}" if version_id else ""


def _ts(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


def _head_info(key: str, r: dict[str, Any]) -> ObjectInfo:
    """What a HEAD answered (boto3's or the lean path's dict), as an ObjectInfo."""
    return ObjectInfo(key=key, size=int(r.get("ContentLength", 0)),
                      etag=str(r.get("ETag", "")).strip('"'),
                      mtime=_ts(r.get("LastModified")), metadata=dict(r.get("Metadata", {})),
                      version_id=r.get("VersionId"), sse_c_md5=r.get("SSECustomerKeyMD5"),
                      sse=r.get("ServerSideEncryption"))


RETRY_FIRST = 0.25  # seconds before the first retry; doubles each time
RETRY_MAX = 4.0
MOUNT_CHECK_TIMEOUT = 5.0  # the checks at mount fail fast: a typo is likelier than an outage
# answers that say the request itself was malformed or mis-signed: from the lean path but not
# from boto3, they are the lean path's fault
_LEAN_SUSPECT_CODES = frozenset({"SignatureDoesNotMatch", "AuthorizationHeaderMalformed",
                                 "XAmzContentSHA256Mismatch", "InvalidDigest"})
_RETRY_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                          "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
                          # a clock or credentials boto3 refreshes on the next attempt
                          "RequestTimeTooSkewed", "ExpiredToken", "RequestExpired"})


# a name holding one of these cannot be listed as a prefix on Ceph RGW (it answers 500)
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")

# ListObjectsV2 parameters as boto3 names them → as the query string names them
_LIST_QUERY = {"Prefix": "prefix", "MaxKeys": "max-keys", "Delimiter": "delimiter",
               "ContinuationToken": "continuation-token", "StartAfter": "start-after"}


def _retryable(e: BaseException) -> bool:
    """Whether trying the same request again later may succeed."""
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        # not 501: NotImplemented is an answer (RGW's CopyObject with SSE-C), not a fault
        return status in (408, 429, 500, 502, 503, 504) or code in _RETRY_CODES
    if isinstance(e, SSLError):
        return "CERTIFICATE_VERIFY_FAILED" not in str(e)
    if isinstance(e, Retry):  # the lean path's "try again"
        return True
    if isinstance(e, NoCredentialsError | RequestAbandoned | ParamValidationError):
        return False
    # no connection, reset, timeout, a body cut off mid-read, an unreadable answer
    return isinstance(e, BotoCoreError | HTTPError | OSError)


def _check_object_key(kw: dict[str, Any], what: str) -> None:
    """Refuse a request about an object whose key is empty: it would name the bucket itself
    (a PUT there creates the bucket, a DELETE removes it).  No caller means that; it is a
    bug, stopped here before anything is sent."""
    source = kw.get("CopySource")
    if ("Key" in kw and not kw["Key"]) or (isinstance(source, dict) and not source.get("Key")):
        log.error("%s: refusing a request with an empty object key (it would name the bucket)",
                  what)
        raise FsError(errno.EINVAL, f"{what}: empty object key")


def _error_code(e: BaseException) -> str | None:
    """The S3 error code of an answer (None for no answer)."""
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return None


def _describe(e: BaseException) -> str:
    if isinstance(e, Retry):
        return str(e)
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        return f"{status} {err.get('Code', '')}".strip()
    return type(e).__name__


def _failure(e: BaseException, what: str) -> FsError:
    """The FsError a failed request becomes (ClientErrors through the one errno map)."""
    if isinstance(e, ClientError):
        return _map_client_error(e, what)
    if isinstance(e, NoCredentialsError):
        return FsError(errno.EACCES, f"{what}: no S3 credentials found", permanent=True)
    if isinstance(e, SSLError):
        verify = "CERTIFICATE_VERIFY_FAILED" in str(e)
        hint = "; check ca_bundle" if verify else ""
        return FsError(errno.EIO, f"{what}: TLS failure{hint}", permanent=verify)
    if isinstance(e, Retry):
        return FsError(errno.EIO, f"{what}: {e}")
    if isinstance(e, BotoCoreError | HTTPError | OSError | RequestAbandoned):
        return FsError(errno.EIO, f"{what}: {type(e).__name__}")
    raise e


def _map_client_error(e: ClientError, what: str) -> FsError:
    """The one S3-error → errno map, which also says which answers are permanent (see
    :mod:`s3ssefs.errors`): a refusal (403, RGW's 400 for SSE-C, a missing bucket) comes back
    the same however often the request is sent; a missing *object* is an answer about that
    object, not a fault to retry, and is left as it is."""
    err = e.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    msg = f"{what}: {status} {code}".strip()
    if code in ("NoSuchKey", "NotFound", "NoSuchUpload", "NoSuchVersion") or status == 404:
        if code == "NoSuchBucket":
            return FsError(errno.ENOENT, f"{what}: bucket does not exist", permanent=True)
        return FsError(errno.ENOENT, msg)
    if code == "BucketNotEmpty":
        return FsError(errno.ENOTEMPTY, msg)
    if code == "KeyTooLongError":
        return FsError(errno.ENAMETOOLONG, msg)
    if code in ("NotImplemented",) or status == 501:
        return FsError(errno.ENOTSUP, msg)
    if code == "InvalidRange" or status == 416:
        return FsError(errno.EINVAL, msg)
    if code == "PreconditionFailed" or status == 412:
        return FsError(errno.ESTALE, msg)
    if status == 403:
        # (a skewed clock or an expired token is retried before it gets here: _RETRY_CODES)
        return FsError(errno.EACCES, msg, status, permanent=code not in _RETRY_CODES)
    if status == 400 and code in ("", "400", "BadRequest", "InvalidArgument", "InvalidRequest",
                                  "InvalidEncryptionAlgorithmError"):
        # RGW: wrong or missing SSE-C key, or SSE-C over plain HTTP (rgw_crypt_require_ssl);
        # AWS: missing key / key for a plain object
        return FsError(errno.EACCES, msg, status, permanent=True)
    if code in ("SlowDown", "Throttling", "ServiceUnavailable", "InternalError",
                "RequestTimeout") or status >= 500:
        return FsError(errno.EIO, msg)
    if status == 400:
        return FsError(errno.EINVAL, msg)
    return FsError(errno.EIO, msg)


class ObjectStore:
    """Async S3 access for one bucket. Keys passed in are :class:`Key` objects or ``None``."""

    def __init__(self, cfg: MountConfig, stats: Stats | None = None) -> None:
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.stats = stats or Stats()
        self.caps = Capabilities()
        self.limiter = trio.CapacityLimiter(cfg.max_requests)
        # Streaming GETs have limits of their own, set by how far the server is (streams.py).
        # Each reads its body into its own buffer, so besides the GIL it is the memory in
        # flight they bound.  Small requests (HEAD, fragments, LIST) keep max_requests.
        self.bulk = trio.CapacityLimiter(1)
        self.bulk_uncached = trio.CapacityLimiter(1)
        self._size_streams(stream_counts(None, cfg.get_streams, cfg.max_requests))
        self.part_size = cfg.part_size
        self._provider = provider_params(cfg.sse)
        session = boto_session(cfg)
        self.client = self._make_client(session)
        self.wire = self._make_wire(session)

    # ------------------------------------------------------------------ set-up
    def _make_client(self, session: boto3.Session) -> Any:
        client = s3_client(self.cfg, session)
        # botocore retries inside the worker thread; once we gave up on a call (deadline),
        # a late attempt must not reach the server (a late PUT could overwrite newer data)
        client.meta.events.register("before-send.s3", _refuse_abandoned)
        return client

    def _make_wire(self, session: boto3.Session) -> WireClient | None:
        """The lean path for HEAD/GET/PUT, where it applies (see :mod:`s3ssefs.wire`)."""
        credentials = session.get_credentials()
        if credentials is None or self.cfg.boto3_only \
                or not wire_usable(self.cfg.endpoint):
            return None
        assert self.cfg.endpoint is not None
        # the CA boto3 trusts: ours, else AWS_CA_BUNDLE / the profile's ca_bundle, else the
        # system's (otherwise every lean attempt would fail TLS and wait for a retry)
        ca = str(self.cfg.ca_bundle) if self.cfg.ca_bundle else \
            session._session.get_config_variable("ca_bundle")
        return WireClient(self.cfg.endpoint, self.bucket, self.client.meta.region_name,
                          credentials, ca,
                          pool_size=self.cfg.max_requests + 4, connect_timeout=10,
                          read_timeout=read_timeout(self.cfg), before_send=_refuse_abandoned)

    # ------------------------------------------------------------------ the one call path
    async def _call(self, kind: str, what: str, fn: Callable[..., T], /,
                    lean: Callable[[], T] | None = None, timeout: float | None = None,
                    **kw: Any) -> T:
        """Run one S3 request in a worker thread: the one retry policy, deadline, stats and
        error mapping.

        ``lean`` is the same request on the lean path (:mod:`s3ssefs.wire`), the first attempt;
        retries go through the boto3 call ``fn``, so a server the lean path does not suit
        still gets served.  A failure worth retrying (no
        connection, a reset, a body cut off, 5xx, SlowDown) is retried after a backoff that
        doubles from RETRY_FIRST to RETRY_MAX, until ``timeout`` (``request_timeout``) is
        spent: a server restarting for a few seconds costs a pause, not an EIO.  botocore's
        own retries are off (its retry allowance, shared by the client, ran dry during an
        outage and left later requests with none)."""
        _check_object_key(kw, what)
        limit = self.cfg.request_timeout if timeout is None else timeout
        deadline = trio.current_time() + limit
        delay = RETRY_FIRST
        retries = 0
        suspect: str | None = None  # the lean attempt's refusal, if boto3 must confirm it
        if self.wire is None:
            lean = None
        while True:
            attempt = lean if lean is not None and retries == 0 else partial(fn, **kw)
            try:
                resp = await self._in_worker(attempt, deadline)
            except trio.TooSlowError:
                self.stats.error(kind)
                log.warning("%s: no answer within %.0fs [EIO]", what, limit)
                raise FsError(errno.EIO, f"{what}: timed out") from None
            except Exception as e:
                if suspect is not None and _error_code(e) not in (None, suspect):
                    self._lean_off(f"{what}: the lean path was answered {suspect}, boto3 "
                                   f"{_describe(e)}")
                if attempt is lean and _error_code(e) in _LEAN_SUSPECT_CODES:
                    suspect = _error_code(e)  # boto3 says whether it is the request's fault
                    retries += 1
                    continue
                if _retryable(e) and trio.current_time() + delay < deadline:
                    retries += 1
                    self.stats.add("retries")
                    log.debug("%s: %s; retry %d in %.1fs", what, _describe(e), retries, delay)
                    await trio.sleep(delay * random.uniform(0.75, 1.0))
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                raise self._failed(kind, what, e, retries) from None
            if suspect is not None:
                self._lean_off(f"{what}: the lean path was answered {suspect}, boto3 was not")
            self.stats.request(kind, retries=retries)
            return resp

    def _lean_off(self, why: str) -> None:
        """Stop using the lean path on this store (one log line, once)."""
        if self.wire is not None:
            self.wire = None
            log.warning("the server answers the lean request path otherwise than boto3 (%s): "
                        "using boto3 alone from now on", why)

    async def check_lean_path(self) -> None:
        """Before the lean path serves a mount: the mount's first LIST and a HEAD of a name
        that does not exist, each sent both ways.  An answer the lean path gets that boto3 does
        not (a refused signature, a 400 where boto3 gets 200, other keys listed) turns the lean
        path off for this store.  A request neither could finish decides nothing."""
        if self.wire is None:
            return
        wire = self.wire
        prefix = self.cfg.prefix
        probe = f"{prefix}.s3ssefs-lean-check-{os.urandom(6).hex()}"
        pairs: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
            (f"LIST s3://{self.bucket}/{prefix}",
             partial(wire.list_objects_v2, {"prefix": prefix, "max-keys": "2"}),
             partial(self.client.list_objects_v2, Bucket=self.bucket, Prefix=prefix,
                     MaxKeys=2)),
            (self._what("HEAD", probe), partial(wire.head_object, probe, {}),
             partial(self.client.head_object, Bucket=self.bucket, Key=probe))]
        deadline = trio.current_time() + min(self.cfg.request_timeout, MOUNT_CHECK_TIMEOUT)
        for what, lean, boto in pairs:
            answers: list[tuple[str, Any]] = []
            for fn in (lean, boto):
                try:
                    r = await self._in_worker(fn, deadline)
                except trio.TooSlowError:
                    return
                except ClientError as e:
                    answers.append(("error", _describe(e)))
                except Exception:
                    return  # no answer (transport): nothing to compare
                else:
                    answers.append(("ok", sorted(o["Key"] for o in r.get("Contents", []))))
            if answers[0] != answers[1]:
                self._lean_off(f"{what}: lean {answers[0][1] or 'ok'}, boto3 "
                               f"{answers[1][1] or 'ok'}")
                return

    async def _in_worker(self, fn: Callable[[], T], deadline: float) -> T:
        """``fn()`` in a worker thread under the store's limiter, given up at ``deadline``
        (trio.TooSlowError): the thread then sends no further request (_refuse_abandoned)."""
        abandoned = threading.Event()

        def run() -> T:
            _call_state.abandoned = abandoned
            try:
                return fn()
            finally:
                _call_state.abandoned = None

        try:
            with trio.fail_at(deadline):
                return await workers.run_sync(run, limiter=self.limiter, abandon_on_cancel=True)
        except trio.TooSlowError:
            abandoned.set()
            raise

    def _failed(self, kind: str, what: str, e: BaseException, retries: int = 0) -> FsError:
        """A request failed for good: counted (an answer as a request, anything else as an
        error) and mapped through the one errno map."""
        if isinstance(e, ClientError):
            self.stats.request(kind, retries=retries)
        else:
            self.stats.error(kind)
        return _failure(e, what)

    async def _guarded(self, kind: str, what: str, fn: Callable[..., T], /,
                       lean: Callable[[], T] | None = None, **kw: Any) -> T:
        """:meth:`_call`, logging the failure once (bucket, key, status, errno) at WARNING
        for the errors a user should hear about and DEBUG for the expected ones."""
        try:
            return await self._call(kind, what, fn, lean, **kw)
        except FsError as e:
            if e.errno in (errno.ENOENT, errno.EACCES, errno.ESTALE):
                # the caller's answer (no such object, no key, changed since): it decides
                log.debug("%s failed: %s", kind, e)
            else:
                self.stats.error(kind)
                log.warning("s3://%s %s failed: %s", self.bucket, kind, e)
            raise

    def _what(self, op: str, key: str) -> str:
        return f"{op} s3://{self.bucket}/{key}"

    # ------------------------------------------------------------------ checks at mount
    async def check_bucket(self) -> None:
        """HEAD the bucket: missing bucket, refused credentials, unreachable endpoint."""
        await self._call("head_bucket", f"bucket {self.bucket}", self.client.head_bucket,
                         timeout=min(self.cfg.request_timeout, MOUNT_CHECK_TIMEOUT),
                         Bucket=self.bucket)

    async def bucket_encryption(self) -> dict[str, Any] | None:
        try:
            resp = await self._call("get_bucket_encryption", f"bucket {self.bucket}",
                                    self.client.get_bucket_encryption, Bucket=self.bucket)
        except FsError:
            return None
        return resp.get("ServerSideEncryptionConfiguration")

    async def versioning_enabled(self) -> bool:
        r = await self._call("get_bucket_versioning", f"bucket {self.bucket}",
                             self.client.get_bucket_versioning, Bucket=self.bucket)
        return r.get("Status") == "Enabled"

    # ------------------------------------------------------------------ reads
    async def head(self, key: str, sse_key: Key | None, version_id: str | None = None,
                   ) -> ObjectInfo:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **sse_c_params(sse_key)}
        if version_id:
            kw["VersionId"] = version_id
        lean = None
        if self.wire is not None:
            lean = partial(self.wire.head_object, key, sse_c_headers(sse_key),
                           _version_query(version_id))
        r = await self._call("head", self._what("HEAD", key), self.client.head_object, lean,
                             **kw)
        return _head_info(key, r)

    def can_head_many(self) -> bool:
        return self.wire is not None

    async def head_many(self, items: list[tuple[str, Key | None]],
                        ) -> list[ObjectInfo | FsError]:
        """HEADs of several objects, one after another in one worker job on the lean path
        (:meth:`can_head_many`).  This is for guesses, ``ls -l``'s prefetch of the entries it
        will stat next: one hand-off to a worker thread and back for a few HEADs instead of
        one each.  Each HEAD gets its answer or the error it failed with (through the one
        errno map), not retried and not logged: the lookup that wants a failed one makes the
        HEAD again through :meth:`head`, with the retry policy and the error report.  Not
        answered within ``request_timeout``: EIO for those left."""
        wire = self.wire
        assert wire is not None
        for key, _ in items:
            _check_object_key({"Key": key}, self._what("HEAD", key))

        def run() -> list[ObjectInfo | FsError]:
            out: list[ObjectInfo | FsError] = []
            for key, sse_key in items:
                try:
                    r = wire.head_object(key, sse_c_headers(sse_key))
                except RequestAbandoned:
                    raise
                except Exception as e:
                    out.append(self._failed("head", self._what("HEAD", key), e))
                    continue
                self.stats.request("head")
                out.append(_head_info(key, r))
            return out

        try:
            return await self._in_worker(run, trio.current_time() + self.cfg.request_timeout)
        except trio.TooSlowError:
            return [FsError(errno.EIO, f"{self._what('HEAD', key)}: timed out")
                    for key, _ in items]

    async def get_range(self, key: str, start: int, end: int, sse_key: Key | None,
                        version_id: str | None = None, if_match: str | None = None,
                        cached: bool = True) -> bytes:
        """Bytes ``[start, end)``; fewer at the end of the object; empty past it.
        ``cached=False``: the caller will not put them in the disk cache (more such GETs may
        stream at once)."""
        if end <= start:
            return b""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key,
                              "Range": f"bytes={start}-{end - 1}", **sse_c_params(sse_key)}
        if version_id:
            kw["VersionId"] = version_id
        if if_match:
            kw["IfMatch"] = f'"{if_match}"'

        def get(**kw2: Any) -> dict[str, Any]:
            try:
                r = self.client.get_object(**kw2)
            except ClientError as e:
                # 416: the range starts at or past the end; that is EOF, not a failure
                if (e.response.get("Error", {}).get("Code") == "InvalidRange"
                        or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416):
                    return {"Data": b"", "ResponseMetadata": e.response.get("ResponseMetadata",
                                                                            {})}
                raise
            with r["Body"] as body:
                r["Data"] = body.read()
            return r

        lean = None
        if self.wire is not None:
            headers = {"Range": kw["Range"], **sse_c_headers(sse_key)}
            if if_match:
                headers["If-Match"] = kw["IfMatch"]
            lean = partial(self.wire.get_range, key, headers, _version_query(version_id))
        if end - start >= BULK_GET:
            async with self._streams(cached):
                self.stats.peak("get_streams_peak", self.bulk.borrowed_tokens
                                + self.bulk_uncached.borrowed_tokens)
                r = await self._guarded("get", self._what("GET", key), get, lean, **kw)
        else:
            r = await self._guarded("get", self._what("GET", key), get, lean, **kw)
        data: bytes = r["Data"]
        self.stats.request("get_bytes", down=len(data))
        return data

    def _streams(self, cached: bool) -> trio.CapacityLimiter:
        """The limiter a streaming GET waits on, its size set from the server's latest
        fastest answer (a far server gets more streams, see :mod:`s3ssefs.streams`)."""
        fastest = self.fastest_answer()
        counts = stream_counts(fastest, self.cfg.get_streams, self.cfg.max_requests)
        if (self.bulk.total_tokens, self.bulk_uncached.total_tokens) != counts:
            log.info("streaming GETs at once: %d, %d for blocks past the cache (the server's "
                     "fastest recent answer took %.1f ms)", *counts, (fastest or 0.0) * 1000)
            self._size_streams(counts)
        return self.bulk if cached else self.bulk_uncached

    def _size_streams(self, counts: tuple[int, int]) -> None:
        """(cached, uncached) streaming GETs at once: the limiters and their gauges."""
        self.bulk.total_tokens, self.bulk_uncached.total_tokens = counts
        self.stats.set("get_streams", counts[0])
        self.stats.set("get_streams_uncached", counts[1])

    def fastest_answer(self) -> float | None:
        """Seconds the server took to answer the quickest of the recent small requests (None
        before the first, or with ``boto3_only``): see :mod:`s3ssefs.streams`."""
        return self.wire.fastest_answer() if self.wire is not None else None

    async def list_pages(self, prefix: str, delimiter: str | None = "/",
                         start_after: str | None = None, page_size: int = 1000,
                         ) -> AsyncIterator[ListPage]:
        """ListObjectsV2, one page at a time: a million keys never sit in memory at once."""
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": page_size}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            elif start_after:
                kw["StartAfter"] = start_after
            lean = None
            if self.wire is not None:
                lean = partial(self.wire.list_objects_v2,
                               {q: str(kw[p]) for p, q in _LIST_QUERY.items() if p in kw})
            what = f"LIST s3://{self.bucket}/{prefix}"
            if _CONTROL_CHARS.search(prefix):
                r = await self._list_control_prefix(what, lean, kw)
            else:
                r = await self._guarded("list", what, self.client.list_objects_v2, lean, **kw)
            yield ListPage(
                prefixes=[p["Prefix"] for p in r.get("CommonPrefixes", [])],
                objects=[ObjectInfo(key=o["Key"], size=int(o.get("Size", 0)),
                                    etag=str(o.get("ETag", "")).strip('"'),
                                    mtime=_ts(o.get("LastModified")))
                         for o in r.get("Contents", [])])
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")
            if not token:
                return

    async def _list_control_prefix(self, what: str, lean: Callable[[], Any] | None,
                                   kw: dict[str, Any]) -> Any:
        """A LIST whose prefix holds a control character: Ceph RGW answers those with a bare
        500 every time, so they get the short deadline of the mount checks, and the error
        says what the server refused instead of "500"."""
        try:
            return await self._call("list", what, self.client.list_objects_v2, lean,
                                    timeout=min(self.cfg.request_timeout, MOUNT_CHECK_TIMEOUT),
                                    **kw)
        except FsError as e:
            if e.errno != errno.EIO:
                raise
            self.stats.error("list")
            log.warning("%s failed: the server refused to list a prefix holding a control "
                        "character (%s) [EIO]", what, e)
            raise FsError(errno.EIO, f"{what}: the server refused to list a prefix holding a "
                          "control character") from None

    async def list_version_pages(self, prefix: str, delimiter: str | None = "/",
                                 ) -> AsyncIterator[ListPage]:
        """ListObjectVersions pages; delete markers come back with ``delete_marker=True``."""
        key_marker: str | None = None
        vid_marker: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if delimiter:
                kw["Delimiter"] = delimiter
            if key_marker:
                kw["KeyMarker"] = key_marker
                if vid_marker:
                    kw["VersionIdMarker"] = vid_marker
            r = await self._guarded("list_versions", f"LISTVERSIONS s3://{self.bucket}/{prefix}",
                                    self.client.list_object_versions, **kw)
            objs = [ObjectInfo(key=o["Key"], size=int(o.get("Size", 0)),
                               etag=str(o.get("ETag", "")).strip('"'),
                               mtime=_ts(o.get("LastModified")), version_id=o.get("VersionId"),
                               is_latest=bool(o.get("IsLatest")))
                    for o in r.get("Versions", [])]
            objs += [ObjectInfo(key=o["Key"], size=0, etag="", mtime=_ts(o.get("LastModified")),
                                version_id=o.get("VersionId"), is_latest=bool(o.get("IsLatest")),
                                delete_marker=True)
                     for o in r.get("DeleteMarkers", [])]
            yield ListPage(prefixes=[p["Prefix"] for p in r.get("CommonPrefixes", [])],
                           objects=objs)
            if not r.get("IsTruncated"):
                return
            key_marker = r.get("NextKeyMarker")
            vid_marker = r.get("NextVersionIdMarker")
            if not key_marker:
                return

    async def probe_write(self, sse_key: Key | None) -> str | None:
        """Try the mount's first write before the mount exists; why the server cannot be
        trusted with it, or None.  A refusal raises :class:`FsError` (permanent or not).

        With SSE-C (``sse_key``): CreateMultipartUpload under the key, then its abort.  That
        is what a write needs (permission to write, SSE-C accepted: RGW refuses it over
        plain HTTP, AWS buckets may block it; the key's MD5 echoed) and leaves nothing
        behind, not even a version in a versioned bucket.  With SSE-S3/KMS only a real object
        shows whether the server honours it (Ceph 16 accepts ``AES256`` and stores
        plaintext): a tiny one is PUT, checked and deleted, under a name with 48 random bits
        (``.s3ssefs-probe-…``) that no user file will have."""
        name = f"{self.cfg.prefix}.s3ssefs-probe-{os.urandom(6).hex()}"
        if sse_key is not None:
            what = self._what("CreateMultipartUpload", name)
            r = await self._call("create_multipart", what, self.client.create_multipart_upload,
                                 Bucket=self.bucket, Key=name,
                                 **self.write_params(sse_key))
            try:
                return self._echo_problem(r, sse_key)
            finally:
                await self.abort_multipart(name, r["UploadId"])
        what = self._what("PUT", name)
        r = await self._call("put", what, self.client.put_object,
                             Bucket=self.bucket, Key=name, Body=b"s3ssefs write probe",
                             **self.write_params(None))
        try:
            return self._echo_problem(r, None)
        finally:
            await self._delete_quietly(name, r.get("VersionId"))

    # ------------------------------------------------------------------ writes
    def write_params(self, sse_key: Key | None) -> dict[str, Any]:
        """The one place that says how a write we make is encrypted (PUT, CreateMultipartUpload,
        CopyObject's target): SSE-C under ``sse_key``; without one, the mount's sse=s3/kms
        mode, or nothing on an sse=c mount."""
        if sse_key is not None:
            return sse_c_params(sse_key)
        return dict(self._provider)

    def _echo_problem(self, resp: dict[str, Any], sse_key: Key | None) -> str | None:
        """Why the response does not prove the write was encrypted as asked, or None."""
        if sse_key is not None:
            if (resp.get("SSECustomerAlgorithm") != SSE_ALGORITHM
                    or resp.get("SSECustomerKeyMD5") != sse_key.fingerprint):
                return ("server did not confirm SSE-C encryption (no algorithm and key MD5 "
                        "echoed)")
            return None
        if not self._provider:
            return None
        wanted = self._provider["ServerSideEncryption"]
        echoed = resp.get("ServerSideEncryption")
        if echoed != wanted:
            return f"server did not confirm {wanted} encryption (echoed {echoed or 'nothing'})"
        kms_id = self._provider.get("SSEKMSKeyId")
        if kms_id and not _same_kms_key(kms_id, resp.get("SSEKMSKeyId")):
            return (f"server encrypted with KMS key {resp.get('SSEKMSKeyId') or '(none)'}, "
                    f"not {kms_id}")
        return None

    def _check_echo(self, resp: dict[str, Any], sse_key: Key | None, what: str) -> None:
        """The server must say it encrypted as asked; otherwise it stored plaintext."""
        problem = self._echo_problem(resp, sse_key)
        if problem:
            raise FsError(errno.EIO, f"{what}: {problem}; refusing to leave plaintext in the "
                          "bucket", permanent=True)

    async def _check_stored(self, resp: dict[str, Any], key: str, sse_key: Key | None,
                            what: str) -> None:
        """:meth:`_check_echo` for an object already in place: one that is not encrypted as
        asked is deleted (that version) before the error goes up."""
        try:
            self._check_echo(resp, sse_key, what)
        except FsError as e:
            log.error("%s", e)
            await self._delete_quietly(key, resp.get("VersionId"))
            raise

    async def put(self, key: str, body: Body, sse_key: Key | None,
                  metadata: dict[str, str] | None = None,
                  content_type: str | None = None) -> ObjectInfo:
        what = self._what("PUT", key)
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body,
                              "Metadata": metadata or {}, **self.write_params(sse_key)}
        if content_type:
            kw["ContentType"] = content_type
        lean = None
        if self.wire is not None and (sse_key is not None or not self._provider) \
                and all(k.isascii() and v.isascii() for k, v in (metadata or {}).items()):
            headers = {f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}
            if content_type:
                headers["Content-Type"] = content_type
            lean = partial(self.wire.put_object, key, {**headers, **sse_c_headers(sse_key)},
                           body)
        r = await self._guarded("put", what, _joined(self.client.put_object), lean, **kw)
        self.stats.request("put_bytes", up=len(body))
        await self._check_stored(r, key, sse_key, what)
        return ObjectInfo(key=key, size=len(body), etag=str(r.get("ETag", "")).strip('"'),
                          mtime=0.0, metadata=dict(metadata or {}),
                          version_id=r.get("VersionId"),
                          sse_c_md5=r.get("SSECustomerKeyMD5"), sse=r.get("ServerSideEncryption"))

    async def create_multipart(self, key: str, sse_key: Key | None,
                               metadata: dict[str, str] | None = None) -> str:
        what = self._what("CreateMultipartUpload", key)
        r = await self._guarded("create_multipart", what, self.client.create_multipart_upload,
                                Bucket=self.bucket, Key=key, Metadata=metadata or {},
                                **self.write_params(sse_key))
        upload_id: str = r["UploadId"]
        try:
            self._check_echo(r, sse_key, what)
        except FsError as e:
            log.error("%s", e)
            await self.abort_multipart(key, upload_id)
            raise
        return upload_id

    async def upload_part(self, key: str, upload_id: str, part_no: int, body: Body,
                          sse_key: Key | None) -> str:
        what = self._what(f"UploadPart {part_no}", key)
        lean = None
        if self.wire is not None:
            lean = partial(self.wire.upload_part, key, upload_id, part_no,
                           sse_c_headers(sse_key), body)
        r = await self._guarded("upload_part", what, _joined(self.client.upload_part), lean,
                                Bucket=self.bucket, Key=key, UploadId=upload_id,
                                PartNumber=part_no, Body=body, **sse_c_params(sse_key))
        self.stats.request("part_bytes", up=len(body))
        self._check_echo(r, sse_key, what)
        return str(r["ETag"])

    async def upload_part_copy(self, key: str, upload_id: str, part_no: int, src_key: str,
                               start: int, end: int, src_sse: Key | None, dst_sse: Key | None,
                               src_version: str | None = None, if_match: str | None = None,
                               ) -> str:
        """Copy bytes ``[start, end)`` of ``src_key`` into part ``part_no`` on the server
        (ESTALE when ``if_match`` is not the source's ETag any more)."""
        source: dict[str, str] = {"Bucket": self.bucket, "Key": src_key}
        if src_version:
            source["VersionId"] = src_version
        what = self._what(f"UploadPartCopy {part_no}", key)
        r = await self._guarded("upload_part_copy", what, self.client.upload_part_copy,
                                Bucket=self.bucket, Key=key, UploadId=upload_id,
                                PartNumber=part_no, CopySource=source,
                                CopySourceRange=f"bytes={start}-{end - 1}",
                                **_copy_if_match(if_match), **sse_c_params(dst_sse),
                                **sse_c_params(src_sse, copy_source=True))
        # RGW echoes nothing here; the upload's CreateMultipartUpload echo vouches for it
        return str(r["CopyPartResult"]["ETag"])

    async def complete_multipart(self, key: str, upload_id: str,
                                 parts: list[tuple[int, str]], sse_key: Key | None,
                                 ) -> ObjectInfo:
        """Finish an upload.  The SSE-C headers go with it: AWS requires them when the upload
        used a checksum or a bucket policy demands them (boto3's transfer manager always sends
        them), and an echo, where the server gives one, must name our key."""
        what = self._what("CompleteMultipartUpload", key)
        r = await self._guarded(
            "complete_multipart", what, self.client.complete_multipart_upload,
            Bucket=self.bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]},
            **sse_c_params(sse_key))
        if any(r.get(h) for h in ("SSECustomerAlgorithm", "SSECustomerKeyMD5",
                                  "ServerSideEncryption")):
            # RGW echoes nothing here (the CreateMultipartUpload echo vouches for the upload);
            # an echo that names another encryption is a server that ignored ours
            await self._check_stored(r, key, sse_key, what)
        return ObjectInfo(key=key, size=-1, etag=str(r.get("ETag", "")).strip('"'), mtime=0.0,
                          version_id=r.get("VersionId"), sse_c_md5=sse_key and sse_key.fingerprint)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._call("abort_multipart", self._what("AbortMultipartUpload", key),
                             self.client.abort_multipart_upload, Bucket=self.bucket, Key=key,
                             UploadId=upload_id)
        except FsError as e:
            if e.errno != errno.ENOENT:
                log.warning("s3://%s abort of upload for %s failed: %s", self.bucket, key, e)

    async def list_multipart_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """(key, upload_id, initiated) of every unfinished upload under ``prefix``."""
        out: list[tuple[str, str, float]] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            r = await self._guarded("list_uploads", f"LISTUPLOADS s3://{self.bucket}/{prefix}",
                                    self.client.list_multipart_uploads, **kw)
            out += [(u["Key"], u["UploadId"], _ts(u.get("Initiated")))
                    for u in r.get("Uploads", [])]
            if not r.get("IsTruncated"):
                return out
            kw["KeyMarker"] = r.get("NextKeyMarker")
            kw["UploadIdMarker"] = r.get("NextUploadIdMarker")

    async def delete(self, key: str, version_id: str | None = None) -> None:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id:
            kw["VersionId"] = version_id
        await self._guarded("delete", self._what("DELETE", key), self.client.delete_object, **kw)

    async def _delete_quietly(self, key: str, version_id: str | None = None) -> None:
        try:
            await self.delete(key, version_id)
        except FsError as e:
            log.error("could not delete unencrypted object s3://%s/%s: %s", self.bucket, key, e)

    # ------------------------------------------------------------------ server-side copy
    async def copy(self, src: str, dst: str, src_sse: Key | None, dst_sse: Key | None,
                   metadata: dict[str, str] | None, size: int,
                   src_version: str | None = None, if_match: str | None = None,
                   ) -> ObjectInfo:
        """Copy ``src`` to ``dst`` (optionally with new metadata and a new key).

        Tries, in order, what the server can do without the data passing through us:
        CopyObject, then a multipart copy (UploadPartCopy); where the server refuses both
        (RGW and a change of key), streams ranged GETs into a multipart PUT held in memory.
        ``metadata=None`` keeps the source's metadata.  With ``if_match`` every read of the
        source is conditional on that ETag: a source written since fails the copy with ESTALE
        and nothing replaces ``dst`` (rekey must not put old bytes over a newer write).
        """
        if metadata is None:
            metadata = (await self.head(src, src_sse, src_version)).metadata
        if size == 0 and if_match is None:
            return await self.put(dst, b"", dst_sse, metadata)
        encrypted = src_sse is not None or dst_sse is not None or bool(self._provider)
        if size <= MAX_SINGLE_COPY and (not encrypted or self.caps.copy_object_sse_c
                                        is not False):
            try:
                return await self._copy_object(src, dst, src_sse, dst_sse, metadata, src_version,
                                               if_match)
            except FsError as e:
                if not encrypted or e.errno not in (errno.ENOTSUP, errno.EIO):
                    raise
                # 501 (RGW with an SSE-C or SSE-KMS source) or no encryption echoed (RGW with a
                # plain source and an SSE-C target stores plaintext): never use CopyObject again
                self.caps.copy_object_sse_c = False
                log.info("server cannot CopyObject with SSE-C (%s); using multipart copy", e)
        same_key = (src_sse is None and dst_sse is None) or (
            src_sse is not None and dst_sse is not None and src_sse.raw == dst_sse.raw)
        if same_key or self.caps.part_copy_cross_key is not False:
            try:
                return await self._multipart_copy(src, dst, src_sse, dst_sse, metadata, size,
                                                  src_version, if_match)
            except FsError as e:
                if same_key or e.errno not in (errno.ENOTSUP, errno.EACCES, errno.EINVAL):
                    raise
                self.caps.part_copy_cross_key = False
                log.info("server refuses UploadPartCopy between keys; streaming instead")
        return await self._stream_copy(src, dst, src_sse, dst_sse, metadata, size, src_version,
                                       if_match)

    async def _copy_object(self, src: str, dst: str, src_sse: Key | None, dst_sse: Key | None,
                           metadata: dict[str, str], src_version: str | None,
                           if_match: str | None = None) -> ObjectInfo:
        source: dict[str, str] = {"Bucket": self.bucket, "Key": src}
        if src_version:
            source["VersionId"] = src_version
        what = self._what("CopyObject", dst)
        r = await self._call("copy", what, self.client.copy_object, Bucket=self.bucket,
                             Key=dst, CopySource=source, Metadata=metadata,
                             MetadataDirective="REPLACE", **_copy_if_match(if_match),
                             **self.write_params(dst_sse),
                             **sse_c_params(src_sse, copy_source=True))
        try:
            self._check_echo(r, dst_sse, what)
        except FsError:
            # a plaintext copy must not stay; but an in-place copy on an unversioned bucket
            # *is* the only copy of the data: leave it (it was plain before) for the fallback
            if src != dst or r.get("VersionId"):
                await self._delete_quietly(dst, r.get("VersionId"))
            raise
        if src_sse is not None or dst_sse is not None or self._provider:
            self.caps.copy_object_sse_c = True
        res = r.get("CopyObjectResult", {})
        return ObjectInfo(key=dst, size=-1, etag=str(res.get("ETag", "")).strip('"'),
                          mtime=_ts(res.get("LastModified")), metadata=metadata,
                          version_id=r.get("VersionId"), sse_c_md5=r.get("SSECustomerKeyMD5"),
                          sse=r.get("ServerSideEncryption"))

    def _ranges(self, size: int) -> list[tuple[int, int, int]]:
        part = max(self.part_size, -(-size // 10000))
        return [(i + 1, off, min(off + part, size)) for i, off in enumerate(range(0, size, part))]

    async def _multipart_copy(self, src: str, dst: str, src_sse: Key | None,
                              dst_sse: Key | None, metadata: dict[str, str], size: int,
                              src_version: str | None, if_match: str | None = None,
                              ) -> ObjectInfo:
        upload_id = await self.create_multipart(dst, dst_sse, metadata)
        etags: dict[int, str] = {}
        try:
            async def one(no: int, start: int, end: int) -> None:
                etags[no] = await self.upload_part_copy(dst, upload_id, no, src, start, end,
                                                        src_sse, dst_sse, src_version,
                                                        if_match)

            await gather(partial(one, *r) for r in self._ranges(size))
            info = await self.complete_multipart(dst, upload_id, sorted(etags.items()), dst_sse)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.abort_multipart(dst, upload_id)
            raise
        if src_sse is not None and dst_sse is not None and src_sse.raw != dst_sse.raw:
            self.caps.part_copy_cross_key = True
        info.size = size
        info.metadata = metadata
        return info

    async def _stream_copy(self, src: str, dst: str, src_sse: Key | None, dst_sse: Key | None,
                           metadata: dict[str, str], size: int,
                           src_version: str | None, if_match: str | None = None,
                           ) -> ObjectInfo:
        """Ranged GETs under the old key feed parts under the new one; a few parts in memory."""
        if size <= self.part_size:
            # an empty source has no GET to carry the condition: a HEAD does
            if size == 0 and if_match \
                    and (await self.head(src, src_sse, src_version)).etag != if_match:
                raise FsError(errno.ESTALE, f"{self._what('GET', src)}: changed")
            data = await self.get_range(src, 0, size, src_sse, src_version, if_match)
            return await self.put(dst, data, dst_sse, metadata)
        upload_id = await self.create_multipart(dst, dst_sse, metadata)
        etags: dict[int, str] = {}
        try:
            async def one(no: int, start: int, end: int) -> None:
                data = await self.get_range(src, start, end, src_sse, src_version, if_match)
                etags[no] = await self.upload_part(dst, upload_id, no, data, dst_sse)

            # at most 4 parts in memory at once
            await gather((partial(one, *r) for r in self._ranges(size)), limit=4)
            info = await self.complete_multipart(dst, upload_id, sorted(etags.items()), dst_sse)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.abort_multipart(dst, upload_id)
            raise
        info.size = size
        info.metadata = metadata
        return info
