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
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urlsplit

from pgvault.errors import (
    AlreadyExists,
    ConfigError,
    NotFound,
    StorageError,
    TransientStorageError,
)
from pgvault.storage.base import ObjectInfo, check_key

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
    """Object Lock retention of every object written, counted from its upload."""

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
        if self.object_lock_mode and self.object_lock_days < 1:
            raise ConfigError("s3 object lock needs retention of at least 1 day")
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise ConfigError(f"s3 part size must be 5 MiB to 5 GiB, not {self.part_size} bytes")
        if self.max_concurrency < 1:
            raise ConfigError("s3 max_concurrency must be at least 1")


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


class _Part(io.RawIOBase):
    """A part's bytes for botocore to hash and send: slices of a buffer, never a whole copy."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

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
    """A GetObject body whose read errors become StorageError, like every storage error."""

    def __init__(self, body: StreamingBody, storage: S3Storage, key: str) -> None:
        self._body = body
        self._storage = storage
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        with self._storage._errors("read", self._key):
            data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        """The rest in one call, not RawIOBase's 8 KiB loop (read_bytes uses this)."""
        with self._storage._errors("read", self._key):
            data: bytes = self._body.read()
        return data

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
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self._root = self.prefix + "/" if self.prefix else ""
        self._options = options
        self._boto_errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
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
        )
        try:
            client = botocore.session.get_session().create_client(
                "s3",
                region_name=options.region,
                endpoint_url=options.endpoint_url,
                verify=options.verify_tls,
                config=config,
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
        if isinstance(exc, bx.SSLError):
            return StorageError(f"{where}: {op} failed: TLS error talking to {self._endpoint}")
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

    def _lock(self) -> dict[str, Any]:
        """Object Lock retention for an object written now (none unless configured)."""
        if not self._options.object_lock_mode:
            return {}
        until = datetime.now(UTC) + timedelta(days=self._options.object_lock_days)
        return {"ObjectLockMode": self._options.object_lock_mode,
                "ObjectLockRetainUntilDate": until}

    def _check_etag(self, key: str, etag: str | None, expected: str) -> None:
        """The checksum the store returns must be what we sent: no read-back is needed."""
        if self._etag_is_md5 and etag is not None and etag.strip('"') != expected:
            raise StorageError(f"s3://{self.bucket}/{self._root}{key}: the store's checksum "
                               f"(ETag {etag}) does not match the data sent ({expected})")

    def _put_single(
        self, key: str, full: str, data: bytes | memoryview, **extra: Any
    ) -> ObjectInfo:
        digest = _md5(data)
        body = data if isinstance(data, bytes) else cast(BinaryIO, _Part(data))
        with self._errors("put", key):
            response = self._client.put_object(
                Bucket=self.bucket, Key=full, Body=body, ContentMD5=_content_md5(digest),
                **self._sse, **self._sse_c, **self._lock(), **extra
            )
        self._check_etag(key, response.get("ETag"), digest.hex())
        return ObjectInfo(key, len(data), _response_time(response))

    def _put_multipart(
        self,
        key: str,
        full: str,
        stream: BinaryIO,
        buffers: _Buffers,
        head: list[tuple[mmap.mmap, int]],
    ) -> ObjectInfo:
        """Upload parts with at most ``max_concurrency`` in flight and one more being read.

        So at most ``max_concurrency + 1`` part buffers exist, reused part after part.
        """
        with self._errors("create multipart upload", key):
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, **self._sse, **self._sse_c, **self._lock()
            )["UploadId"]
        base = self._options.part_size
        workers = self._options.max_concurrency
        slots = threading.Semaphore(workers)
        failed = threading.Event()
        futures: list[Future[tuple[str, bytes]]] = []
        total = 0

        def done(future: Future[tuple[str, bytes]]) -> None:
            slots.release()
            if not future.cancelled() and future.exception() is not None:
                failed.set()

        pool = ThreadPoolExecutor(workers, thread_name_prefix="pgvault-s3")
        try:
            number = 1
            buffer, size = head.pop(0)
            while size:
                if number > MAX_PARTS:
                    raise StorageError(f"{self.url}/{key}: stream exceeds {MAX_PARTS} parts")
                slots.acquire()
                if failed.is_set():
                    break  # stop reading; the failed part's error is raised below
                total += size
                future = pool.submit(self._upload_part, key, full, upload_id, number,
                                     buffers, buffer, size)
                future.add_done_callback(done)
                futures.append(future)
                number += 1
                buffer, size = (head.pop(0) if head
                                else buffers.fill(stream, part_size(number, base)))
            results = [f.result() for f in futures]
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
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)  # a part still in flight could outlive the abort
            self._abort(key, full, upload_id, exc)
            raise
        finally:
            pool.shutdown(wait=True)
        # A multipart ETag is the MD5 of the parts' MD5s and the part count; checking it
        # (instead of reading the object back) lets a writer without read rights verify.
        combined = hashlib.md5(b"".join(digest for _, digest in results),
                               usedforsecurity=False).hexdigest()
        self._check_etag(key, response.get("ETag"), f"{combined}-{len(results)}")
        return ObjectInfo(key, total, _response_time(response))

    def _upload_part(self, key: str, full: str, upload_id: str, number: int,
                     buffers: _Buffers, buffer: mmap.mmap, size: int) -> tuple[str, bytes]:
        """Upload one part; its buffer is free again before the next part may be read."""
        try:
            data = memoryview(buffer)[:size]
            digest = _md5(data)
            with self._errors(f"upload part {number}", key):
                response = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=cast(BinaryIO, _Part(data)),
                    ContentMD5=_content_md5(digest),
                    **self._sse_c,
                )
        finally:
            buffers.give(buffer)
        self._check_etag(f"{key} part {number}", response.get("ETag"), digest.hex())
        return response["ETag"], digest

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
            body = self._client.get_object(Bucket=self.bucket, Key=self._full(key),
                                           **self._sse_c)["Body"]
        return io.BufferedReader(_Body(body, self, key), buffer_size=MiB)

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
                    yield ObjectInfo(name, obj["Size"], obj["LastModified"].astimezone(UTC))

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


def _classify(code: str, status: int) -> type[StorageError]:
    """Which StorageError an S3 error code (and HTTP status, if known) stands for."""
    if code in _NOT_FOUND_CODES:
        return NotFound
    if code == "PreconditionFailed" or status == 412:
        return AlreadyExists
    if code in _TRANSIENT_CODES or status >= 500:
        return TransientStorageError
    return StorageError
