"""A lean request path for the hot small S3 calls: HEAD, ranged GET, PUT and LIST.

Profiling ``ls -l`` and small-file creation showed boto3 spending most of its CPU per small
request on its model machinery (parameter validation, event hooks, response parsing with
dateutil, 1,000 times per listing page): several times what signing and sending the same
request with our own SigV4 signer costs.  With the daemon sharing two cores with the
server, that CPU is the limit of ``ls -l`` and of creating many small files, so those calls
take this path.  Requests go over :mod:`s3ssefs.http1`, our small keep-alive HTTP/1.1 client,
because urllib3 and ``http.client`` cost more CPU per request than the signing and the
request itself (figures in docs/benchmarks.md).

It makes *first attempts* only, never a second client: a request that fails in a way worth
retrying without an answer (no connection, a reset, a body cut off) raises :class:`Retry`;
an error answer is raised as the botocore ``ClientError`` boto3 would give.  Both go to
:meth:`~s3ssefs.store.ObjectStore._call`, whose one retry policy decides and repeats the
request through boto3 (so a server this path does not suit is still served), and whose one
errno map applies unchanged.  SSE-C headers come from :func:`s3ssefs.keys.sse_c_headers`, the header
form of ``sse_c_params``.

Only path-style endpoints (``--endpoint``, as for RGW, MinIO and the like) use it; AWS's
virtual-hosted addressing and proxies stay with boto3.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote_plus, urlsplit
from xml.etree import ElementTree

from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.utils import get_environ_proxies

from .http1 import Body, ConnectionLost, Pool, body_pieces, tls_context

UNSIGNED = "UNSIGNED-PAYLOAD"

# response header → the boto3 field our code reads
_HEADER_FIELDS = {
    "etag": "ETag",
    "x-amz-version-id": "VersionId",
    "x-amz-server-side-encryption": "ServerSideEncryption",
    "x-amz-server-side-encryption-customer-algorithm": "SSECustomerAlgorithm",
    "x-amz-server-side-encryption-customer-key-md5": "SSECustomerKeyMD5",
    "x-amz-server-side-encryption-aws-kms-key-id": "SSEKMSKeyId",
    "content-type": "ContentType",
}


class Retry(Exception):
    """This attempt never got an answer (no connection, a reset, a body cut off, an unreadable
    reply): worth repeating, which the store's retry policy does through boto3."""


def usable(endpoint: str | None) -> bool:
    """The lean path serves path-style endpoints reached without a proxy."""
    return bool(endpoint) and not get_environ_proxies(endpoint)


class Signer:
    """AWS Signature Version 4 for S3 requests, with the day's signing key kept.

    botocore's ``S3SigV4Auth`` rebuilds the request and derives the key anew each time, a
    large share of a lean HEAD's CPU; this keeps the day's key and does a fraction of that
    work.  Every header we
    send is signed.  Checked against the server (a bad signature is a 403) by the store tests.
    """

    def __init__(self, credentials: Credentials, region: str) -> None:
        self._credentials = credentials
        self._region = region
        self._day_key: tuple[str, str, bytes] | None = None  # (date, secret, signing key)

    def _signing_key(self, date: str, secret: str) -> bytes:
        cached = self._day_key
        if cached is not None and cached[0] == date and cached[1] == secret:
            return cached[2]
        k = hmac.digest(("AWS4" + secret).encode(), date.encode(), "sha256")
        for part in (self._region, "s3", "aws4_request"):
            k = hmac.digest(k, part.encode(), "sha256")
        self._day_key = (date, secret, k)
        return k

    def sign(self, method: str, host: str, path: str, query: str,
             headers: dict[str, str]) -> dict[str, str]:
        """``headers`` plus Host, X-Amz-Date, the session token and Authorization.
        ``path`` and ``query`` are already URI-encoded (query sorted), as sent."""
        creds = self._credentials.get_frozen_credentials()
        now = time.gmtime()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", now)
        date = amz_date[:8]
        out = dict(headers)
        out["Host"] = host
        out["X-Amz-Date"] = amz_date
        if creds.token:
            out["X-Amz-Security-Token"] = creds.token
        canon = sorted((k.lower(), " ".join(str(v).split())) for k, v in out.items())
        signed = ";".join(k for k, _ in canon)
        request = "\n".join((method, path, query, "".join(f"{k}:{v}\n" for k, v in canon),
                             signed, out["X-Amz-Content-SHA256"]))
        scope = f"{date}/{self._region}/s3/aws4_request"
        to_sign = "\n".join(("AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(request.encode()).hexdigest()))
        sig = hmac.new(self._signing_key(date, creds.secret_key), to_sign.encode(),
                       "sha256").hexdigest()
        out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={sig}")
        return out


class WireClient:
    """Signs and sends single requests; every method runs in a worker thread."""

    def __init__(self, endpoint: str, bucket: str, region: str, credentials: Credentials,
                 ca_bundle: str | None, pool_size: int, connect_timeout: float,
                 read_timeout: float, before_send: Callable[[], None]) -> None:
        parts = urlsplit(endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.netloc.rpartition("@")[2]
        self._root = parts.path.rstrip("/") + "/" + quote(bucket, safe="")
        self._signer = Signer(credentials, region)
        self._before_send = before_send
        default_port = 443 if self._https else 80
        self._pool = Pool(parts.hostname or "", parts.port or default_port,
                          tls_context(ca_bundle) if self._https else None, maxsize=pool_size,
                          connect_timeout=connect_timeout, read_timeout=read_timeout)

    def fastest_answer(self) -> float | None:
        """See :meth:`s3ssefs.http1.Pool.fastest_answer`."""
        return self._pool.fastest_answer()

    # ------------------------------------------------------------------ the calls
    def head_object(self, key: str, headers: dict[str, str], query: str = "") -> dict[str, Any]:
        status, hdrs, _ = self._send("HEAD", key, query, headers, b"", "HeadObject")
        return _fields(hdrs, status)

    def get_range(self, key: str, headers: dict[str, str], query: str = "") -> dict[str, Any]:
        """GET with a Range header; 416 (range past the end) is returned as empty data."""
        status, hdrs, body = self._send("GET", key, query, headers, b"", "GetObject",
                                        ok_statuses=(200, 206, 416))
        out = _fields(hdrs, status)
        out["Data"] = b"" if status == 416 else body
        return out

    def put_object(self, key: str, headers: dict[str, str], body: Body) -> dict[str, Any]:
        status, hdrs, _ = self._send("PUT", key, "", headers, body, "PutObject")
        return _fields(hdrs, status)

    def upload_part(self, key: str, upload_id: str, part_no: int, headers: dict[str, str],
                    body: Body) -> dict[str, Any]:
        """One part of a multipart upload, each of the body's buffers sent in one piece
        (boto3 streams it in 16 KiB writes, which costs far more CPU on a large part)."""
        query = f"partNumber={part_no}&uploadId={quote(upload_id, safe='-_.~')}"
        status, hdrs, _ = self._send("PUT", key, query, headers, body, "UploadPart")
        return _fields(hdrs, status)

    def list_objects_v2(self, params: dict[str, str]) -> dict[str, Any]:
        """One ListObjectsV2 page (``params``: prefix, delimiter, max-keys, …), keys asked
        URL-encoded (as boto3 does, so any byte in a key survives the XML) and decoded."""
        query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                         for k, v in sorted({**params, "list-type": "2",
                                             "encoding-type": "url"}.items()))
        _, _, body = self._send("GET", None, query, {}, b"", "ListObjectsV2")
        return _parse_list(body)

    # ------------------------------------------------------------------ plumbing
    def _send(self, method: str, key: str | None, query: str, headers: dict[str, str], body: Body,
              op: str, ok_statuses: tuple[int, ...] = (200, 204, 206),
              ) -> tuple[int, dict[str, str], bytearray]:
        path = self._root if key is None else f"{self._root}/{quote(key.encode(), safe='/~')}"
        target = f"{path}?{query}" if query else path
        req_headers = dict(headers)
        req_headers["X-Amz-Content-SHA256"] = UNSIGNED if self._https else _sha256(body)
        if body or method == "PUT":
            req_headers["Content-Length"] = str(len(body))
        signed = self._signer.sign(method, self._host, path, query, req_headers)
        try:
            resp = self._pool.request(method, target, signed.items(), body,
                                      before_send=self._before_send)
        except ConnectionLost as e:  # what failed, e.g. "body cut off after 60 of 100 bytes"
            raise Retry(f"{op}: {e}") from e
        status, data = resp.status, resp.body
        if status in ok_statuses:
            return status, resp.headers, data
        # every answer, 5xx and SlowDown too, goes to the store's one retry policy as boto3
        # would raise it
        code, message = _error_code(data, status)
        raise ClientError({"Error": {"Code": code, "Message": message},
                           "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 0,
                                                "HTTPHeaders": dict(resp.headers)}},
                          op)


def _sha256(body: Body) -> str:
    h = hashlib.sha256()
    for piece in body_pieces(body):
        h.update(piece)
    return h.hexdigest()


def _fields(headers: Any, status: int) -> dict[str, Any]:
    """The response headers as the boto3 fields :mod:`s3ssefs.store` reads."""
    out: dict[str, Any] = {"ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 0}}
    meta: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low.startswith("x-amz-meta-"):
            meta[name[11:]] = value
        elif low in _HEADER_FIELDS:
            out[_HEADER_FIELDS[low]] = value
        elif low == "content-length":
            out["ContentLength"] = int(value)
        elif low == "last-modified":
            out["LastModified"] = _http_date(value)
    out["Metadata"] = meta
    return out


def _parse_list(body: bytes) -> dict[str, Any]:
    """A ListObjectsV2 answer in boto3's shape (the fields :mod:`s3ssefs.store` reads)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise Retry(f"ListObjectsV2: unreadable answer ({e})") from None
    contents: list[dict[str, Any]] = []
    prefixes: list[dict[str, str]] = []
    out: dict[str, Any] = {"Contents": contents, "CommonPrefixes": prefixes,
                           "ResponseMetadata": {"HTTPStatusCode": 200, "RetryAttempts": 0}}
    encoded = False
    for el in root:
        tag = el.tag.rpartition("}")[2]
        if tag == "Contents":
            item: dict[str, Any] = {}
            for f in el:
                ftag = f.tag.rpartition("}")[2]
                if ftag == "Key":
                    item["Key"] = f.text or ""
                elif ftag == "Size":
                    item["Size"] = int(f.text or 0)
                elif ftag == "ETag":
                    item["ETag"] = f.text or ""
                elif ftag == "LastModified":
                    item["LastModified"] = _iso_date(f.text or "")
            contents.append(item)
        elif tag == "CommonPrefixes":
            prefixes.append({"Prefix": el.findtext("{*}Prefix") or ""})
        elif tag == "IsTruncated":
            out["IsTruncated"] = (el.text or "").strip() == "true"
        elif tag == "NextContinuationToken":
            out["NextContinuationToken"] = el.text or ""
        elif tag == "EncodingType":
            encoded = (el.text or "") == "url"
    if encoded:
        for item in contents:
            item["Key"] = unquote_plus(item["Key"])
        for p in prefixes:
            p["Prefix"] = unquote_plus(p["Prefix"])
    return out


def _iso_date(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _http_date(value: str) -> datetime | None:
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None


def _error_code(body: bytes, status: int) -> tuple[str, str]:
    """Code and message of an S3 error body; a body-less answer (HEAD) gives the status,
    as botocore does."""
    if body:
        try:
            root = ElementTree.fromstring(body)
            code = root.findtext("Code") or ""
            if code:
                return code, root.findtext("Message") or ""
        except ElementTree.ParseError:
            pass
    return str(status), ""
