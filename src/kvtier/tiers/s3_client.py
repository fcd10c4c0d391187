"""A small S3 client: the six calls kvtier's object tier makes, over plain HTTP(S), signed
with AWS Signature Version 4.

Why not boto3 or obstore (measured in docs/architecture.md): a GET here lands straight in the
caller's buffers (``readinto`` on the response, as the disk tier's ``preadv``), where the
clients return a new bytes object to copy again; the conditional write (``If-None-Match: *``)
is one header; nothing else is sent (boto3 >= 1.36 adds CRC checksum headers by default, which
some S3-compatible servers reject). One connection per thread: the tier's throughput comes
from several threads' requests in flight.

Credentials: :mod:`kvtier.tiers.s3_credentials`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import http.client
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence

from kvtier.errors import ConfigError
from kvtier.tiers.base import front, scatter
from kvtier.tiers.s3_credentials import Credentials

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class S3Error(OSError):
    """The store answered with an error (``status``, S3's ``code``) or could not be reached."""

    def __init__(self, message: str, status: int = 0, code: str = ""):
        super().__init__(message)
        self.status, self.code = status, code


def _quote(text: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(text, safe=safe)


def _query(query: dict[str, str]) -> str:
    """The canonical query string (sorted, every reserved character escaped)."""
    return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class S3Client:
    """Path-style requests to ``endpoint`` (``http://host:port`` or ``https://...``), or
    virtual-hosted ones to AWS (``https://BUCKET.s3.REGION.amazonaws.com``) when ``endpoint``
    is empty. Thread-safe: each thread keeps its own connection."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        region: str,
        credentials: Credentials,
        timeout_s: float = 5.0,
    ):
        self.bucket, self.region, self.timeout_s = bucket, region, timeout_s
        self._creds = credentials
        if endpoint:
            url = urllib.parse.urlsplit(endpoint)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(f"endpoint: expected http(s)://host[:port], got {endpoint!r}")
            self._https = url.scheme == "https"
            default = ":443" if self._https else ":80"  # signed as a client sends it: bare
            self.host = url.netloc.removesuffix(default)
            self._base = f"/{bucket}/"
        elif "." in bucket:  # a dotted name does not match the wildcard certificate
            self._https = True
            self.host = f"s3.{region}.amazonaws.com"
            self._base = f"/{bucket}/"
        else:
            self._https = True
            self.host = f"{bucket}.s3.{region}.amazonaws.com"
            self._base = "/"
        self._local = threading.local()
        self._open: set[http.client.HTTPConnection] = set()
        self._open_lock = threading.Lock()
        self._keys: dict[str, bytes] = {}  # signing key per day

    # -- requests ----------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self.host, timeout=self.timeout_s)
            self._local.conn = conn
            with self._open_lock:
                self._open.add(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._open_lock:
                self._open.discard(conn)

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = _hmac(("AWS4" + self._creds.secret_key).encode(), day)
            for part in (self.region, "s3", "aws4_request"):
                key = _hmac(key, part)
            self._keys = {day: key}
        return key

    def _headers(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        payload_sha: str,
        extra: dict[str, str],
        now: datetime.datetime | None = None,
    ) -> dict[str, str]:
        """The request's headers, signed (SigV4) at ``now`` (the current time)."""
        now = now or datetime.datetime.now(datetime.UTC)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        headers = {"host": self.host, "x-amz-content-sha256": payload_sha, "x-amz-date": stamp}
        if self._creds.token:
            headers["x-amz-security-token"] = self._creds.token
        headers.update({k.lower(): v for k, v in extra.items()})
        signed = sorted(headers)
        canonical = "\n".join(
            [
                method,
                path,
                _query(query),
                "".join(f"{k}:{headers[k].strip()}\n" for k in signed),
                ";".join(signed),
                payload_sha,
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self._creds.access_key}/{scope},"
            f" SignedHeaders={';'.join(signed)}, Signature={signature}"
        )
        return headers

    def _send(
        self,
        method: str,
        name: str | None,
        query: dict[str, str] | None = None,
        body: memoryview | bytes | bytearray = b"",
        extra: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        """Send one request and return the response with its body unread. ``name``: an
        object name (None: the bucket itself)."""
        path = self._base + _quote(name, safe="-_.~/") if name is not None else self._base
        if name is None and path != "/":
            path = path.rstrip("/")
        query = query or {}
        view = memoryview(body).cast("B")
        sha = hashlib.sha256(view).hexdigest() if view.nbytes else EMPTY_SHA256
        headers = self._headers(method, path, query, sha, extra or {})
        if method == "PUT":
            headers["content-length"] = str(view.nbytes)
        target = path + ("?" + _query(query) if query else "")
        for attempt in range(2):  # a kept-alive connection the server closed: once more
            conn = self._connection()
            try:
                conn.request(method, target, body=view if view.nbytes else None, headers=headers)
                return conn.getresponse()
            except (ConnectionError, http.client.HTTPException, TimeoutError, OSError) as exc:
                self._drop_connection()
                fresh = isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError)
                if attempt == 0 and fresh:
                    continue
                raise S3Error(f"S3 {method} {self.host}: {exc}") from exc
            except ValueError:  # a header value http.client refuses: never echo it
                self._drop_connection()
                raise S3Error(f"S3 {method} {self.host}: a header value was refused") from None
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _reading(self, response: http.client.HTTPResponse) -> Iterator[http.client.HTTPResponse]:
        """``response``, closed after; a body left half-read (a time-out, a short read) takes
        the connection with it, which would otherwise hand the next request its rest."""
        try:
            yield response
        except BaseException:
            self._drop_connection()
            raise
        finally:
            response.close()

    def _error(self, method: str, response: http.client.HTTPResponse) -> S3Error:
        body = response.read()
        code = ""
        try:
            found = ET.fromstring(body).find("Code") if body else None
            code = found.text or "" if found is not None else ""
        except ET.ParseError:
            pass
        return S3Error(
            f"S3 {method} {self.host}: HTTP {response.status} {code or response.reason}",
            response.status,
            code,
        )

    # -- the calls ---------------------------------------------------------------------------

    def get_into(self, name: str, buffers: Sequence[memoryview]) -> int | None:
        """Read an object into ``buffers`` (their front if smaller; see Tier.read_into_many):
        its size, or None if there is no such object. A larger object is read and dropped."""
        with self._reading(self._send("GET", name)) as response:
            size = self._found(response)
            if size is None:
                return None
            if size < 0 or size > sum(b.nbytes for b in buffers):  # no length, or too large
                return scatter(response.read(), buffers)
            self._read_body(response, front(buffers, size), name)
            return size

    def get(self, name: str) -> bytearray | None:
        """An object's bytes, or None if there is no such object."""
        with self._reading(self._send("GET", name)) as response:
            size = self._found(response)
            if size is None:
                return None
            if size < 0:
                return bytearray(response.read())
            data = bytearray(size)
            self._read_body(response, [memoryview(data)], name)
            return data

    def _found(self, response: http.client.HTTPResponse) -> int | None:
        """A GET's body length (-1 if not given), None for no such object; raises for an
        error."""
        if response.status == 404:
            response.read()
            return None
        if response.status != 200:
            raise self._error("GET", response)
        return int(response.getheader("content-length") or -1)

    @staticmethod
    def _read_body(
        response: http.client.HTTPResponse, buffers: Sequence[memoryview], name: str
    ) -> None:
        """Fill ``buffers`` from the body, in order (readinto: no copy in between)."""
        for buf in buffers:
            got = 0
            while got < buf.nbytes:
                n = response.readinto(buf[got:])
                if not n:
                    raise S3Error(f"S3 GET {name}: the body ended early")
                got += n

    def get_range(self, name: str, nbytes: int) -> bytes | None:
        """The first ``nbytes`` of an object (fewer if it is shorter), or None."""
        with self._reading(
            self._send("GET", name, extra={"range": f"bytes=0-{nbytes - 1}"})
        ) as response:
            body = response.read()
            if response.status == 404:
                return None
            if response.status not in (200, 206):
                raise S3Error(f"S3 GET {name}: HTTP {response.status}", response.status)
            return body[:nbytes]

    def put(self, name: str, body: memoryview | bytes | bytearray, only_new: bool = False) -> bool:
        """Store an object; with ``only_new`` (``If-None-Match: *``), only if there is none of
        that name: False then (HTTP 412), the existing object kept."""
        extra = {"if-none-match": "*"} if only_new else {}
        with self._reading(self._send("PUT", name, body=body, extra=extra)) as response:
            if response.status in (200, 201, 204):
                response.read()
                return True
            if response.status == 412 and only_new:
                response.read()
                return False
            raise self._error("PUT", response)

    def head(self, name: str) -> int | None:
        """An object's size, or None if there is no such object."""
        with self._reading(self._send("HEAD", name)) as response:
            response.read()
            if response.status == 404:
                return None
            if response.status != 200:
                raise S3Error(f"S3 HEAD {name}: HTTP {response.status}", response.status)
            return int(response.getheader("content-length") or 0)

    def delete(self, name: str) -> None:
        with self._reading(self._send("DELETE", name)) as response:
            if response.status not in (200, 204, 404):
                raise self._error("DELETE", response)
            response.read()

    def list(self, prefix: str, page: int = 1000) -> Iterator[tuple[str, int, str]]:
        """(name, size, last modified as ISO 8601 text) of every object under ``prefix``, a
        page of ``page`` at a time (ListObjectsV2)."""
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": str(page)}
            if token:
                query["continuation-token"] = token
            with self._reading(self._send("GET", None, query=query)) as response:
                if response.status != 200:
                    raise self._error("LIST", response)
                root = ET.fromstring(response.read())
            for item in root.iter(_NS + "Contents"):
                key, size = item.findtext(_NS + "Key"), item.findtext(_NS + "Size")
                if key is not None:
                    yield key, int(size or 0), item.findtext(_NS + "LastModified") or ""
            token = root.findtext(_NS + "NextContinuationToken") or ""
            if root.findtext(_NS + "IsTruncated") != "true" or not token:
                return

    def create_bucket(self) -> None:
        """Create the bucket; an existing one of ours is fine."""
        body = b""
        if self.region not in ("", "us-east-1"):
            body = (
                f"<CreateBucketConfiguration><LocationConstraint>{self.region}"
                "</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        with self._reading(self._send("PUT", None, body=body)) as response:
            if response.status in (200, 204):
                response.read()
                return
            error = self._error("CREATE BUCKET", response)
            if error.code != "BucketAlreadyOwnedByYou":
                raise error

    def close(self) -> None:
        """Close every thread's connection (a later call opens a new one)."""
        with self._open_lock:
            conns, self._open = self._open, set()
        for conn in conns:
            conn.close()
        self._local = threading.local()
