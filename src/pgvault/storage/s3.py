"""A repository in an S3 bucket (AWS or any S3-compatible store), via boto3.

Large objects stream up as multipart uploads of growing parts, so neither the size
nor a spool file is needed in advance; see ``part_size`` for the schedule.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import mmap
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urlsplit

from pgvault.errors import (
    AlreadyExists,
    ConfigError,
    Conflict,
    Interrupted,
    NotFound,
    StorageError,
    TransientStorageError,
)
from pgvault.storage.base import STOPPING, ObjectInfo, check_key

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from botocore.response import StreamingBody
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

MiB = 1 << 20
GiB = 1 << 30
_READ = MiB  # a part buffer is filled by reads of at most this: its one transient copy
_SEND = 64 << 10  # botocore reads a part in slices of at most this (hashing, sending)
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
DOUBLE_EVERY = 800
_DELETE_BATCH = 1000  # DeleteObjects limit

# Error codes worth retrying later even though boto3's own retries gave up.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
ATTEMPTS = 3
"""Tries of one request (botocore's standard retries): a stall costs at most this many
io_timeouts, plus backoff, before the operation fails."""
_POLL = 0.2  # seconds between checks of a wait that a signal or a failed part must end
ABANDON_AFTER = 2.0
"""How long a failed or interrupted upload waits for parts still in flight before it aborts
the upload anyway: a part stalled in the network must not hold up the cleanup."""
RESUMES = 5
"""Reconnections a download may make (ranged GETs from the byte reached); the count starts
again once a reconnected stream has carried RESUME_REFILL bytes."""
RESUME_REFILL = 64 * MiB
_RESUME_BACKOFF = 0.25  # seconds, doubled at each resume, at most _RESUME_BACKOFF_MAX
_RESUME_BACKOFF_MAX = 4.0
_URL = re.compile(r"\w+://\S+")


def part_size(number: int, base: int) -> int:
    """Size of part ``number`` (1-based): ``base``, doubled every 800 parts, at most 5 GiB.

    With base 5 MiB, parts 1-800 are 5 MiB (3.9 GiB), 801-1600 10 MiB (11.7 GiB in all),
    and so on; 10,000 parts hold 13.6 TiB, beyond S3's 5 TiB objects.
    """
    return min(base << ((number - 1) // DOUBLE_EVERY), MAX_PART_SIZE)


@dataclass(frozen=True)
class S3Options:
    """How to reach and write a bucket; credentials come from boto3's standard chain."""

    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    sse: str | None = "AES256"  # "AES256", "aws:kms", or None for stores without SSE
    kms_key_id: str | None = None
    verify_tls: bool = True
    # Memory: up to max_concurrency + 1 part buffers (25 MiB by default); see _put_multipart.
    part_size: int = 5 * MiB
    max_concurrency: int = 4
    sse_customer_key: bytes | None = field(default=None, repr=False)
    """SSE-C: a 32-byte key the store encrypts with and forgets; every request sends it."""
    object_lock_mode: str | None = None  # "GOVERNANCE" or "COMPLIANCE"
    object_lock_days: int = 0
    """Object Lock retention of every object written, counted from its upload; when set,
    it overrides ``object_lock_until`` (the fixed rule of old configurations)."""
    object_lock_until: Callable[[datetime], datetime | None] | None = field(
        default=None, compare=False, repr=False)
    """The repository's retention policy's date for an object written at the given
    instant (``retention.hold_after_write``), used when ``object_lock_days`` is 0."""
    io_timeout: float = 60.0
    """Seconds any network wait (connect, send, receive) may go without progress."""
    credentials: tuple[str, str, str | None] | None = field(default=None, repr=False)
    """(key id, secret key, session token) the AWS_*_FILE variables gave; None: boto's chain."""

    def __post_init__(self) -> None:
        if self.sse not in (None, "AES256", "aws:kms"):
            raise ConfigError(f"s3 sse must be AES256, aws:kms or none, not {self.sse!r}")
        if self.kms_key_id and self.sse != "aws:kms":
            raise ConfigError("s3 kms_key_id needs sse = aws:kms")
        if self.sse_customer_key is not None:
            if self.sse is not None:
                raise ConfigError("s3 SSE-C cannot be combined with sse = AES256 or aws:kms")
            if len(self.sse_customer_key) != 32:
                raise ConfigError("the SSE-C key must be 32 bytes (base64 of 32 random bytes)")
        if self.object_lock_mode not in (None, "GOVERNANCE", "COMPLIANCE"):
            raise ConfigError(f"s3 object lock mode must be governance or compliance, not "
                              f"{self.object_lock_mode!r}")
        if self.object_lock_mode and self.object_lock_days < 1 and self.object_lock_until is None:
            raise ConfigError("s3 object lock needs retention of at least 1 day")
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise ConfigError(f"s3 part size must be 5 MiB to 5 GiB, not {self.part_size} bytes")
        if self.max_concurrency < 1:
            raise ConfigError("s3 max_concurrency must be at least 1")
        if not self.io_timeout > 0:
            raise ConfigError(f"the I/O timeout must be above 0 seconds, not {self.io_timeout}")


def _md5(data: bytes | memoryview) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _content_md5(digest: bytes) -> str:
    """Content-MD5 lets the server reject a part corrupted on the way."""
    return base64.b64encode(digest).decode()


def _response_time(response: Any) -> datetime:
    """When the store says it wrote the object (its Date header), else now."""
    date = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date).astimezone(UTC) if date else datetime.now(UTC)
    except ValueError:
        return datetime.now(UTC)


def _fill(stream: BinaryIO, view: memoryview) -> int:
    """Read into ``view`` until it is full or the stream ends; the number of bytes read."""
    have = 0
    while have < len(view) and (chunk := stream.read(min(_READ, len(view) - have))):
        view[have : have + len(chunk)] = chunk
        have += len(chunk)
    return have


class _Buffers:
    """The part buffers of one upload, each reused once its part is acknowledged.

    Anonymous maps rather than bytes: pages a short part never touches cost nothing, and a
    dropped buffer goes back to the system at once, where malloc would keep freed parts.
    """

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def fill(self, stream: BinaryIO, size: int) -> tuple[mmap.mmap, int]:
        """A buffer holding the stream's next ``size`` bytes (fewer only at its end)."""
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None or len(buffer) < size:  # parts grow: a smaller buffer is dropped
            buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        try:
            return buffer, _fill(stream, memoryview(buffer)[:size])
        except BaseException:
            self.give(buffer)
            raise

    def give(self, buffer: mmap.mmap) -> None:
        """Return a buffer whose bytes are no longer needed."""
        with self._lock:
            self._free.append(buffer)


class _Cancelled(Exception):
    """Raised into botocore's sending of a part whose upload has been given up."""


class _Upload:
    """What the threads of one multipart upload share with the thread that started them."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.lock = threading.Lock()
        self.aborted = False


def _check_stopping() -> None:
    if STOPPING.is_set():
        raise Interrupted("stopped while uploading")


def _result(future: Future[Any]) -> Any:
    """The future's result, waiting in timed steps that a signal or STOPPING ends."""
    while not wait([future], timeout=_POLL).done:
        _check_stopping()
    return future.result()


class _Part(io.RawIOBase):
    """A part's bytes for botocore to hash and send: slices of a buffer, never a whole copy."""

    def __init__(self, view: memoryview, cancelled: threading.Event | None = None) -> None:
        super().__init__()
        self._view = view
        self._pos = 0
        self._cancelled = cancelled

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # botocore measures the body by seeking and rewinds it to retry

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, start + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if self._cancelled is not None and self._cancelled.is_set():
            raise _Cancelled("upload given up")
        # Short reads are allowed; small ones keep each sending thread's copies small.
        left = max(0, len(self._view) - self._pos)
        n = left if size is None or size < 0 else min(size, _SEND, left)
        data = self._view[self._pos : self._pos + n].tobytes()
        self._pos += n
        return data

    def readinto(self, buffer: WriteableBuffer) -> int:
        target = memoryview(buffer).cast("B")
        n = min(len(target), max(0, len(self._view) - self._pos))
        target[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


def _one_line(text: str) -> str:
    """A server message fit for our one-line errors, with any URL (maybe presigned) removed."""
    text = " ".join(_URL.sub("<url>", text).split())
    return text if len(text) <= 200 else text[:197] + "..."


class _Body(io.RawIOBase):
    """A GetObject body that resumes where it broke; read errors become StorageError.

    A broken or stalled stream is read on from the byte reached by a ranged GET that only
    matches the same object (If-Match on its ETag), so the bytes returned are exactly the
    object's and the reader's own digest still covers every one of them.
    """

    def __init__(self, storage: S3Storage, key: str, response: Any) -> None:
        self._storage = storage
        self._key = key
        self._body: StreamingBody = response["Body"]
        self._etag: str | None = response.get("ETag")
        self._size: int | None = response.get("ContentLength")
        self._pos = 0
        self._resumes = 0
        self._since = 0  # bytes read since the last resume

    def readable(self) -> bool:
        return True

    def _read(self, size: int | None) -> bytes:
        while True:
            if self._size is not None and self._pos >= self._size and self._resumes:
                return b""  # it broke after the last byte: nothing is left to fetch
            try:
                data: bytes = self._body.read(size)
            except self._storage._stream_errors as exc:
                self._resume(exc)
                continue
            except self._storage._boto_errors as exc:
                raise self._storage._error("read", self._key, exc) from exc
            self._pos += len(data)
            self._since += len(data)
            if self._since >= RESUME_REFILL:
                self._resumes = 0  # a long download may meet several unrelated faults
            return data

    def _resume(self, exc: Exception) -> None:
        """Reconnect at ``_pos``, at most RESUMES times; else raise the error, with the count."""
        while True:
            if self._etag is None or self._resumes >= RESUMES:
                error = self._storage._error("read", self._key, exc)
                if self._resumes:
                    of = f" of {self._size}" if self._size is not None else ""
                    error = type(error)(f"{error}; gave up after {self._resumes} resumed "
                                        f"reads, at byte {self._pos}{of}")
                raise error from exc
            time.sleep(min(_RESUME_BACKOFF * 2**self._resumes, _RESUME_BACKOFF_MAX))
            self._resumes += 1
            self._since = 0
            with contextlib.suppress(Exception):
                self._body.close()
            try:
                self._body = self._storage._get_from(self._key, self._pos, self._etag)
                return
            except self._storage._stream_errors as again:
                exc = again

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        """The rest in one call, not RawIOBase's 8 KiB loop (read_bytes uses this)."""
        parts = []
        while data := self._read(None):
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Storage:
    """Objects under ``prefix`` in ``bucket``; SSE on every write unless options say none."""

    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        # Imported here: botocore takes 0.15 s or more to import, which file repositories need
        # not pay. botocore alone, not boto3: its resources and s3transfer cost 3 MB of memory.
        import botocore.session
        from botocore import exceptions as bx
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._head_for_retention = False  # set once the store lacks GetObjectRetention
        if self.prefix:
            check_key(self.prefix)
        self._root = self.prefix + "/" if self.prefix else ""
        self._options = options
        self._boto_errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
        # What a broken, reset or stalled connection raises: a download resumes after them.
        self._stream_errors: tuple[type[Exception], ...] = (
            bx.HTTPClientError, bx.ConnectionError, bx.IncompleteReadError)
        self._sse: dict[str, Any] = {}
        if options.sse:
            self._sse["ServerSideEncryption"] = options.sse
        if options.kms_key_id:
            self._sse["SSEKMSKeyId"] = options.kms_key_id
        # SSE-C goes on every request that touches object data, reads included.
        self._sse_c: dict[str, Any] = {}
        if options.sse_customer_key is not None:
            self._sse_c = {"SSECustomerAlgorithm": "AES256",
                           "SSECustomerKey": options.sse_customer_key}
        # Only plain and SSE-S3 objects have the MD5 of their content as ETag.
        self._etag_is_md5 = options.sse in (None, "AES256") and not self._sse_c
        config = Config(
            s3={"addressing_style": "path" if options.path_style else "auto"},
            # We send Content-MD5 ourselves; botocore's default CRC32 trailers
            # (aws-chunked) are refused by many S3-compatible stores.
            request_checksum_calculation="when_required",
            max_pool_connections=max(10, options.max_concurrency + 2),
            user_agent_extra="pgvault",
            # urllib3 sends a request under the connect timeout and waits for the answer
            # under the read timeout, and each send is one slice of at most _SEND bytes (see
            # _Part): so both bound how long any wait may go without progress.
            connect_timeout=options.io_timeout,
            read_timeout=options.io_timeout,
            retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
            tcp_keepalive=True,
        )
        try:
            client = botocore.session.get_session().create_client(
                "s3",
                region_name=options.region,
                endpoint_url=options.endpoint_url,
                verify=options.verify_tls,
                config=config,
                **_credentials(options.credentials),
            )
        except (BotoCoreError, ValueError) as exc:
            raise ConfigError(
                f"{self.url}: cannot set up the S3 client: {_one_line(str(exc))}"
            ) from exc
        self._client = cast("S3Client", client)
        self._endpoint = urlsplit(self._client.meta.endpoint_url).netloc.rpartition("@")[2]

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _full(self, key: str) -> str:
        return self._root + check_key(key)

    def _error(self, op: str, key: str, exc: Exception) -> StorageError:
        """One line naming bucket, key, operation and S3 code; never credentials or URLs."""
        from botocore import exceptions as bx

        where = f"s3://{self.bucket}/{self._root}{key}"
        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or "Unknown")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            text = _one_line(str(error.get("Message") or ""))
            message = f"{where}: {op} failed: {code} (HTTP {status})" + (
                f": {text}" if text else ""
            )
            return _classify(code, status)(message)
        if _timed_out(exc):
            return TransientStorageError(
                f"{where}: {op} failed: no progress for {self._options.io_timeout:g} s talking "
                f"to {self._endpoint} ({ATTEMPTS} tries; io_timeout_seconds, env "
                "PGVAULT_IO_TIMEOUT_SECONDS)"
            )
        if isinstance(exc, bx.SSLError):
            return StorageError(f"{where}: {op} failed: TLS error talking to {self._endpoint}")
        if isinstance(exc, bx.EndpointConnectionError):
            return TransientStorageError(
                f"{where}: {op} failed: cannot connect to {self._endpoint} ({ATTEMPTS} tries; "
                "connection refused or host unreachable)"
            )
        if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.IncompleteReadError):
            return TransientStorageError(
                f"{where}: {op} failed: {type(exc).__name__} talking to {self._endpoint}"
            )
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return StorageError(f"{where}: {op} failed: no usable AWS credentials")
        return StorageError(f"{where}: {op} failed: {type(exc).__name__}: {_one_line(str(exc))}")

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """Translate boto errors raised in the block; leave every other exception alone."""
        try:
            yield
        except self._boto_errors as exc:
            raise self._error(op, key, exc) from exc

    def put(self, key: str, stream: BinaryIO) -> ObjectInfo:
        """One PutObject below one part; else a multipart upload, aborted on any failure."""
        full = self._full(key)
        base = self._options.part_size
        buffers = _Buffers()
        head = [buffers.fill(stream, base)]
        if head[0][1] == base:
            head.append(buffers.fill(stream, part_size(2, base)))
        if len(head) == 1 or not head[1][1]:
            buffer, size = head[0]
            return self._put_single(key, full, memoryview(buffer)[:size] if size else b"")
        return self._put_multipart(key, full, stream, buffers, head)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._put_single(key, self._full(key), bytes(data))

    def create(self, key: str, data: bytes) -> ObjectInfo:
        """PutObject with If-None-Match: *, which the server refuses (412) if the key exists."""
        return self._put_single(key, self._full(key), bytes(data), IfNoneMatch="*")

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        with self._errors("get", key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._full(key),
                                               **self._sse_c)
            return response["Body"].read(), response["ETag"]

    def replace_if(self, key: str, data: bytes, etag: str | None) -> ObjectInfo:
        """PutObject with If-Match on ``etag`` (If-None-Match: * when None): S3 refuses a
        changed object with 412, a missing one with 404, a write racing ours with 409."""
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            return self._put_single(key, self._full(key), bytes(data), **condition)
        except StorageError as exc:
            cause = exc.__cause__
            from botocore.exceptions import ClientError

            if isinstance(cause, ClientError):
                status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status in (404, 409, 412):
                    raise Conflict(f"s3://{self.bucket}/{self._root}{key} is not at version "
                                   f"{etag}: {exc}") from None
            raise

    def _lock(self) -> dict[str, Any]:
        """Object Lock retention for an object written now (none unless configured)."""
        if not self._options.object_lock_mode:
            return {}
        now = datetime.now(UTC)
        days, by_policy = self._options.object_lock_days, self._options.object_lock_until
        until = now + timedelta(days=days) if days or by_policy is None else by_policy(now)
        if until is None:
            raise ConfigError("s3 object lock: the retention policy gives no date to lock "
                              "until (keep_last alone); set object_lock days")
        return {"ObjectLockMode": self._options.object_lock_mode,
                "ObjectLockRetainUntilDate": until}

    def extend_retention(self, key: str, until: datetime) -> datetime | None:
        """Object Lock: retain ``key`` until at least ``until``; never shortens.

        Returns the object's retention date after the call, or None when this repository
        locks nothing. The current date is read first, so an object already retained
        longer is left as it is (PutObjectRetention cannot shorten a COMPLIANCE date, nor a
        GOVERNANCE one without bypass, which pgvault never asks for). The mode stays the
        object's own.
        """
        mode = self._options.object_lock_mode
        if not mode:
            return None
        full = self._full(key)
        held, have = self._retention(key, full)
        if have is not None and have >= until:
            return have
        with self._errors("put retention", key):
            self._client.put_object_retention(
                Bucket=self.bucket, Key=full,
                Retention=cast(Any, {"Mode": held or mode, "RetainUntilDate": until}))
        return until

    @property
    def locking(self) -> bool:
        return bool(self._options.object_lock_mode)

    def retained_until(self, key: str) -> datetime | None:
        return self._retention(key, self._full(key))[1]

    def _retention(self, key: str, full: str) -> tuple[str | None, datetime | None]:
        """An object's Object Lock mode and date (None, None: it has none).

        GetObjectRetention needs only s3:GetObjectRetention, not the right to read the
        data; a store without it (moto answers 500) is asked by HeadObject from then on.
        """
        from botocore.exceptions import ClientError

        if not self._head_for_retention:
            with self._errors("get retention", key):
                try:
                    got = self._client.get_object_retention(Bucket=self.bucket, Key=full)
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code")
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if code == "NoSuchObjectLockConfiguration":
                        return None, None
                    if code != "NotImplemented" and status < 500:
                        raise
                    self._head_for_retention = True
                else:
                    retention = got.get("Retention", {})
                    date = retention.get("RetainUntilDate")
                    return retention.get("Mode"), date.astimezone(UTC) if date else None
        with self._errors("head", key):
            head = self._client.head_object(Bucket=self.bucket, Key=full, **self._sse_c)
        date = head.get("ObjectLockRetainUntilDate")
        return head.get("ObjectLockMode"), date.astimezone(UTC) if date else None

    def _check_etag(self, key: str, etag: str | None, expected: str) -> None:
        """The checksum the store returns must be what we sent: no read-back is needed."""
        if self._etag_is_md5 and etag is not None and etag.strip('"') != expected:
            raise StorageError(f"s3://{self.bucket}/{self._root}{key}: the store's checksum "
                               f"(ETag {etag}) does not match the data sent ({expected})")

    def _put_single(
        self, key: str, full: str, data: bytes | memoryview, **extra: Any
    ) -> ObjectInfo:
        digest = _md5(data)
        # Always sent in slices: a whole bytes body would be one sendall, which the socket
        # timeout bounds as a whole, so a slow but moving upload could time out.
        body = cast(BinaryIO, _Part(memoryview(data)))
        with self._errors("put", key):
            response = self._client.put_object(
                Bucket=self.bucket, Key=full, Body=body, ContentMD5=_content_md5(digest),
                **self._sse, **self._sse_c, **self._lock(), **extra
            )
        self._check_etag(key, response.get("ETag"), digest.hex())
        return ObjectInfo(key, len(data), _response_time(response), etag=response.get("ETag"))

    def _put_multipart(
        self,
        key: str,
        full: str,
        stream: BinaryIO,
        buffers: _Buffers,
        head: list[tuple[mmap.mmap, int]],
    ) -> ObjectInfo:
        """Upload parts with at most ``max_concurrency`` in flight and one more being read.

        So at most ``max_concurrency + 1`` part buffers exist, reused part after part. Each
        part goes in a daemon thread of its own: on a failure or a signal, a part stalled in
        the network is abandoned (the upload is aborted after ABANDON_AFTER seconds) and
        cannot keep the process from exiting.
        """
        with self._errors("create multipart upload", key):
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, **self._sse, **self._sse_c, **self._lock()
            )["UploadId"]
        base = self._options.part_size
        slots = threading.Semaphore(self._options.max_concurrency)
        failed = threading.Event()
        upload = _Upload()
        futures: list[Future[tuple[str, bytes]]] = []
        threads: list[threading.Thread] = []
        total = 0

        def done(future: Future[tuple[str, bytes]]) -> None:
            slots.release()
            if future.exception() is not None:
                failed.set()

        try:
            number = 1
            buffer, size = head.pop(0)
            while size:
                if number > MAX_PARTS:
                    raise StorageError(f"{self.url}/{key}: stream exceeds {MAX_PARTS} parts")
                while not slots.acquire(timeout=_POLL):
                    _check_stopping()  # timed: also a signal to another thread ends the wait
                if failed.is_set():
                    slots.release()
                    break  # stop reading; the failed part's error is raised below
                total += size
                future: Future[tuple[str, bytes]] = Future()
                future.add_done_callback(done)
                thread = threading.Thread(
                    target=self._upload_part, daemon=True, name=f"pgvault-s3-{number}",
                    args=(future, upload, key, full, upload_id, number, buffers, buffer, size))
                thread.start()
                futures.append(future)
                threads.append(thread)
                number += 1
                buffer, size = (head.pop(0) if head
                                else buffers.fill(stream, part_size(number, base)))
            results = [_result(f) for f in futures]
            parts: list[CompletedPartTypeDef] = [
                {"PartNumber": n, "ETag": etag} for n, (etag, _) in enumerate(results, 1)
            ]
            with self._errors("complete multipart upload", key):
                response = self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException as exc:
            upload.cancelled.set()  # parts still sending stop at their next slice
            deadline = time.monotonic() + ABANDON_AFTER
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            # A part that outlives the abort aborts again when it ends (see _upload_part).
            with upload.lock:
                upload.aborted = True
            self._abort(key, full, upload_id, exc)
            raise
        # A multipart ETag is the MD5 of the parts' MD5s and the part count; checking it
        # (instead of reading the object back) lets a writer without read rights verify.
        combined = hashlib.md5(b"".join(digest for _, digest in results),
                               usedforsecurity=False).hexdigest()
        self._check_etag(key, response.get("ETag"), f"{combined}-{len(results)}")
        return ObjectInfo(key, total, _response_time(response))

    def _upload_part(self, future: Future[tuple[str, bytes]], upload: _Upload, key: str,
                     full: str, upload_id: str, number: int, buffers: _Buffers,
                     buffer: mmap.mmap, size: int) -> None:
        """Upload one part into ``future``; its buffer is free again before the next is read."""
        try:
            data = memoryview(buffer)[:size]
            digest = _md5(data)
            with self._errors(f"upload part {number}", key):
                response = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=cast(BinaryIO, _Part(data, upload.cancelled)),
                    ContentMD5=_content_md5(digest),
                    **self._sse_c,
                )
            self._check_etag(f"{key} part {number}", response.get("ETag"), digest.hex())
        except BaseException as exc:
            buffers.give(buffer)
            future.set_exception(exc)
            return
        buffers.give(buffer)
        with upload.lock:
            late = upload.aborted
        if late:
            # Stored after the abort: S3 may then keep it, so abort again (best effort).
            with contextlib.suppress(*self._boto_errors):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                    UploadId=upload_id)
        future.set_result((response["ETag"], digest))

    def _abort(self, key: str, full: str, upload_id: str, exc: BaseException) -> None:
        """Abort the upload; if that fails too, say so on ``exc`` without replacing it."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except self._boto_errors as abort_exc:
            exc.add_note(
                f"{self._error('abort multipart upload', key, abort_exc)}; upload {upload_id} "
                "is left behind (a lifecycle rule for incomplete uploads removes it)"
            )

    def open(self, key: str) -> BinaryIO:
        """A buffered reader over the GetObject body; read errors are StorageErrors too."""
        with self._errors("get", key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._full(key),
                                               **self._sse_c)
        return io.BufferedReader(_Body(self, key, response), buffer_size=MiB)

    def _get_from(self, key: str, start: int, etag: str) -> StreamingBody:
        """The object's bytes from ``start`` on, if it is still the object with ``etag``."""
        from botocore.exceptions import ClientError

        where = f"s3://{self.bucket}/{self._root}{key}"
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._full(key),
                                               Range=f"bytes={start}-", IfMatch=etag,
                                               **self._sse_c)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:
                raise StorageError(f"{where}: read failed: the object changed while it was "
                                   f"read (no longer ETag {etag}); not resumed") from exc
            raise self._error("read", key, exc) from exc
        if not str(response.get("ContentRange", "")).startswith(f"bytes {start}-"):
            response["Body"].close()
            raise StorageError(f"{where}: read failed: the store ignored the range of a "
                               "resumed read")
        return response["Body"]

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def stat(self, key: str) -> ObjectInfo:
        with self._errors("head", key):
            response = self._client.head_object(Bucket=self.bucket, Key=self._full(key),
                                                **self._sse_c)
        until = response.get("ObjectLockRetainUntilDate")
        return ObjectInfo(key, response["ContentLength"], response["LastModified"].astimezone(UTC),
                          locked_until=until.astimezone(UTC) if until else None)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """ListObjectsV2 pages, in S3's key order (UTF-8 bytes, as str comparison)."""
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors("list", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._root + prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(self._root) :]
                    if not name or name.endswith("/"):
                        continue  # a console's "folder" marker, not an object of ours
                    yield ObjectInfo(name, obj["Size"], obj["LastModified"].astimezone(UTC),
                                     etag=obj.get("ETag"))

    def delete(self, keys: Iterable[str]) -> None:
        """DeleteObjects in batches of 1000; S3 already treats missing keys as deleted.

        A single key (a lock, a manifest) goes by DeleteObject: the same IAM action, and
        stores and policy simulators that judge DeleteObjects by the bucket agree with it.
        """
        names = [self._full(k) for k in keys]
        if len(names) == 1:
            with self._errors("delete", names[0][len(self._root) :]):
                self._client.delete_object(Bucket=self.bucket, Key=names[0])
            return
        for start in range(0, len(names), _DELETE_BATCH):
            batch = names[start : start + _DELETE_BATCH]
            with self._errors("delete", batch[0][len(self._root) :]):
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            for error in response.get("Errors", []):
                code = error.get("Code", "Unknown")
                if code != "NoSuchKey":
                    raise _classify(code, 0)(
                        f"s3://{self.bucket}/{error.get('Key')}: delete failed: {code}: "
                        + _one_line(error.get("Message", ""))
                    )


def _timed_out(exc: BaseException) -> bool:
    """Whether a socket timeout is behind ``exc``, however deep botocore wrapped it."""
    from botocore import exceptions as bx
    from urllib3.exceptions import NewConnectionError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen or isinstance(error, NewConnectionError):
            # urllib3 derives NewConnectionError (refused, unreachable) from its timeout
            # class; a connect that timed out raises ConnectTimeoutError itself.
            continue
        seen.add(id(error))
        if isinstance(error, TimeoutError | Urllib3Timeout | bx.ReadTimeoutError
                      | bx.ConnectTimeoutError):
            return True
        kwargs = getattr(error, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        todo += [e for e in (error.__cause__, error.__context__, inner, *error.args)
                 if isinstance(e, BaseException)]
    return False


def _classify(code: str, status: int) -> type[StorageError]:
    """Which StorageError an S3 error code (and HTTP status, if known) stands for."""
    if code in _NOT_FOUND_CODES:
        return NotFound
    if code == "PreconditionFailed" or status == 412:
        return AlreadyExists
    if code in _TRANSIENT_CODES or status >= 500:
        return TransientStorageError
    return StorageError


def _credentials(given: tuple[str, str, str | None] | None) -> dict[str, Any]:
    """create_client's credential arguments: none, so boto's chain decides, unless given."""
    if given is None:
        return {}
    key_id, secret, token = given
    return {"aws_access_key_id": key_id, "aws_secret_access_key": secret,
            "aws_session_token": token}
