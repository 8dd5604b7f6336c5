"""One contract for every storage backend, then what only one backend can show."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from http_recorder import LoopbackServer
from pgvault.errors import (
    AlreadyExists,
    ConfigError,
    Conflict,
    NotFound,
    StorageError,
    TransientStorageError,
)
from pgvault.storage import open_storage
from pgvault.storage.base import Storage
from pgvault.storage.local import LocalStorage
from pgvault.storage.memory import MemoryStorage
from pgvault.storage.s3 import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    S3Options,
    S3Storage,
    part_size,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

MiB = 1 << 20
TiB = 1 << 40


class Boom(Exception):
    """What a failing source stream raises (pg_dump died, say)."""


class Source(io.RawIOBase):
    """A pipe-like stream: short reads of at most 1 MiB, optionally failing at an offset."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._fail_at = fail_at
        self.error = Boom(f"source failed at {fail_at}")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._fail_at is not None and self._pos >= self._fail_at:
            raise self.error
        end = min(self._pos + len(buffer), self._pos + MiB, len(self._data))
        if self._fail_at is not None:
            end = min(end, self._fail_at)
        n = end - self._pos
        memoryview(buffer)[:n] = self._data[self._pos : end]
        self._pos = end
        return n


def stream(data: bytes, fail_at: int | None = None) -> BinaryIO:
    return cast(BinaryIO, Source(data, fail_at))


@functools.cache
def _random_bytes() -> bytes:
    return random.Random(1).randbytes(48 * MiB)


def payload(size: int, offset: int = 0) -> bytes:
    """Incompressible, repeatable test data (slices of one cached random block)."""
    return _random_bytes()[offset : offset + size]


def sha256_of(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(MiB):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Backend:
    storage: Storage
    leftovers: Callable[[], list[str]]  # temp files / unfinished uploads a put left behind


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        root = tmp_path / "repo"
        return Backend(LocalStorage(root), lambda: [str(p) for p in root.rglob(".tmp-*")])
    if request.param == "memory":
        return Backend(MemoryStorage(), lambda: [])
    bucket: str = request.getfixturevalue("s3_bucket")
    options: S3Options = request.getfixturevalue("s3_options")
    client: S3Client = request.getfixturevalue("s3_client")
    storage = S3Storage(bucket, "repo/prefix", replace(options, part_size=5 * MiB))

    def uploads() -> list[str]:
        found = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return [u["Key"] for u in found]

    return Backend(storage, uploads)


@pytest.fixture
def storage(backend: Backend) -> Storage:
    return backend.storage


# -- the contract -------------------------------------------------------------------------


def test_round_trip(storage: Storage) -> None:
    info = storage.put("backups/db/1/db.dump", stream(b"dump bytes"))
    assert (info.key, info.size) == ("backups/db/1/db.dump", 10)
    assert info.modified.tzinfo is not None and info.modified.utcoffset() == UTC.utcoffset(None)
    storage.put_bytes("manifests/db/1.json", b"{}")

    with storage.open("backups/db/1/db.dump") as f:
        assert f.read() == b"dump bytes"
    assert storage.read_bytes("manifests/db/1.json") == b"{}"
    assert storage.stat("backups/db/1/db.dump").size == 10
    assert [i.key for i in storage.list("")] == ["backups/db/1/db.dump", "manifests/db/1.json"]
    assert [i.size for i in storage.list("")] == [10, 2]

    storage.delete(["backups/db/1/db.dump", "manifests/db/1.json"])
    assert list(storage.list("")) == []
    with pytest.raises(NotFound):
        storage.stat("backups/db/1/db.dump")


def test_large_stream_round_trip(storage: Storage) -> None:
    # 40 MiB is eight 5 MiB parts on S3, fed by 1 MiB short reads.
    data = payload(40 * MiB + 123)
    info = storage.put("big/db.dump", stream(data))
    assert info.size == len(data)
    assert storage.stat("big/db.dump").size == len(data)
    with storage.open("big/db.dump") as f:
        assert sha256_of(f) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [5 * MiB, 10 * MiB])
def test_stream_of_exactly_whole_parts(storage: Storage, size: int) -> None:
    data = payload(size, offset=size)
    storage.put("exact", io.BytesIO(data))
    assert storage.read_bytes("exact") == data


def test_empty_object(storage: Storage) -> None:
    assert storage.put("empty", stream(b"")).size == 0
    assert storage.stat("empty").size == 0
    assert storage.read_bytes("empty") == b""
    assert [i.key for i in storage.list("")] == ["empty"]


def test_put_replaces(storage: Storage) -> None:
    storage.put_bytes("k", b"old contents")
    storage.put("k", stream(b"new"))
    assert storage.read_bytes("k") == b"new"
    assert storage.stat("k").size == 3
    assert [i.key for i in storage.list("")] == ["k"]


def test_create_is_create_if_absent(storage: Storage) -> None:
    assert storage.create("locks/db.lock", b"first").size == 5
    with pytest.raises(AlreadyExists):
        storage.create("locks/db.lock", b"second")
    assert storage.read_bytes("locks/db.lock") == b"first"
    storage.delete(["locks/db.lock"])
    storage.create("locks/db.lock", b"third")
    assert storage.read_bytes("locks/db.lock") == b"third"


def test_replace_if_is_compare_and_swap(storage: Storage) -> None:
    first = storage.replace_if("fleet/a.json", b"one", None)
    assert first.etag
    with pytest.raises(Conflict):
        storage.replace_if("fleet/a.json", b"again", None)  # exists: not created twice
    data, etag = storage.read_versioned("fleet/a.json")
    assert (data, etag) == (b"one", first.etag)
    second = storage.replace_if("fleet/a.json", b"two", etag)
    assert second.etag and second.etag != etag
    with pytest.raises(Conflict):
        storage.replace_if("fleet/a.json", b"late", etag)  # a writer that read the old one
    assert storage.read_versioned("fleet/a.json") == (b"two", second.etag)
    storage.delete(["fleet/a.json"])
    with pytest.raises(Conflict):
        storage.replace_if("fleet/a.json", b"gone", second.etag)
    with pytest.raises(NotFound):
        storage.read_versioned("fleet/a.json")
    assert [i.key for i in storage.list("fleet/")] == []  # the local lock file is hidden


def test_replace_if_has_one_winner_among_racers(storage: Storage) -> None:
    """Eight writers holding the same version: exactly one replaces it."""
    _, etag = storage.read_versioned(storage.replace_if("race.json", b"v0", None).key)
    barrier = threading.Barrier(8)
    won: list[int] = []

    def racer(n: int) -> None:
        barrier.wait()
        with contextlib.suppress(Conflict):
            storage.replace_if("race.json", f"v1-{n}".encode(), etag)
            won.append(n)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert storage.read_bytes("race.json") == f"v1-{won[0]}".encode()


def test_missing_key_is_not_found(storage: Storage) -> None:
    storage.put_bytes("present/x", b"x")
    for key in ("absent", "present", "present/x/y"):
        with pytest.raises(NotFound):
            storage.open(key)
        with pytest.raises(NotFound):
            storage.stat(key)
        with pytest.raises(NotFound):
            storage.read_bytes(key)


def test_delete_of_missing_keys_is_fine(storage: Storage) -> None:
    storage.put_bytes("a", b"1")
    storage.delete(["never-was", "a", "a", "deep/never/was"])
    storage.delete([])
    assert list(storage.list("")) == []


@pytest.mark.parametrize("fail_at", [0, 3 * MiB, 12 * MiB])
def test_failing_stream_leaves_nothing(backend: Backend, fail_at: int) -> None:
    # 12 MiB fails after S3 has uploaded parts of a multipart upload; 3 MiB before any.
    storage = backend.storage
    storage.put_bytes("db.dump", b"previous good backup")
    source = Source(payload(14 * MiB), fail_at=fail_at)
    with pytest.raises(Boom) as caught:
        storage.put("db.dump", cast(BinaryIO, source))
    assert caught.value is source.error
    assert storage.read_bytes("db.dump") == b"previous good backup"
    with pytest.raises(Boom):
        storage.put("other.dump", stream(payload(14 * MiB), fail_at=fail_at))
    with pytest.raises(NotFound):
        storage.stat("other.dump")
    assert [i.key for i in storage.list("")] == ["db.dump"]
    assert backend.leftovers() == []


def test_list_by_prefix_in_key_order(storage: Storage) -> None:
    keys = ["a/1", "a/2", "a-b", "ab/c", "b/1", "a/sub/x", "a/sub-y", "a.txt"]
    for key in random.Random(7).sample(keys, len(keys)):
        storage.put_bytes(key, key.encode())
    assert [i.key for i in storage.list("")] == sorted(keys)
    assert [i.key for i in storage.list("a/")] == ["a/1", "a/2", "a/sub-y", "a/sub/x"]
    assert [i.key for i in storage.list("a/sub")] == ["a/sub-y", "a/sub/x"]
    assert [i.key for i in storage.list("a")] == sorted(k for k in keys if k.startswith("a"))
    assert [i.key for i in storage.list("zzz/")] == []
    assert {i.key: i.size for i in storage.list("b/")} == {"b/1": 3}


INVALID_KEYS = ["", "/abs", "a//b", "a/", "..", "a/../b", "./a", "a/.tmp-x", "nul\0"]


def test_invalid_keys_are_rejected_everywhere(storage: Storage) -> None:
    for key in INVALID_KEYS:
        with pytest.raises(StorageError, match="invalid storage key"):
            storage.put_bytes(key, b"x")
        with pytest.raises(StorageError, match="invalid storage key"):
            storage.put(key, stream(b"x"))
        with pytest.raises(StorageError, match="invalid storage key"):
            storage.create(key, b"x")
        with pytest.raises(StorageError, match="invalid storage key"):
            storage.stat(key)
        with pytest.raises(StorageError, match="invalid storage key"):
            storage.open(key)
        with pytest.raises(StorageError, match="invalid storage key"):
            storage.delete([key])
    assert list(storage.list("")) == []


# -- local folder -------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_local_modes_ignore_umask(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "repo"
    storage = LocalStorage(root)
    old = os.umask(umask)
    try:
        storage.put("backups/db/1/db.dump", stream(b"x"))
        storage.put_bytes("manifests/db/1.json", b"{}")
        storage.create("locks/db.lock", b"me")
    finally:
        os.umask(old)
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_local_keys_stay_under_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "repo")
    for key in ("../escape", "a/../../escape", "/etc/escape"):
        with pytest.raises(StorageError):
            storage.put_bytes(key, b"x")
    assert not (tmp_path / "escape").exists()
    assert not Path("/etc/escape").exists()


def test_local_os_errors_name_the_path(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "repo")
    storage.put_bytes("a", b"file where a folder is needed")
    with pytest.raises(StorageError) as caught:
        storage.put_bytes("a/b", b"x")
    assert not isinstance(caught.value, NotFound)
    message = str(caught.value)
    assert str(tmp_path / "repo" / "a") in message and "Not a directory" in message
    assert "\n" not in message


def test_local_list_ignores_temp_files_and_missing_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "repo")
    assert list(storage.list("")) == []
    storage.put_bytes("a/b", b"x")
    (tmp_path / "repo" / "a" / ".tmp-crashed-put").write_bytes(b"half")
    assert [i.key for i in storage.list("")] == ["a/b"]


def test_local_delete_prunes_empty_folders(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    storage = LocalStorage(root)
    storage.put_bytes("backups/db/1/db.dump", b"x")
    storage.put_bytes("backups/db/2/db.dump", b"x")
    storage.delete(["backups/db/1/db.dump"])
    assert sorted(p.name for p in (root / "backups" / "db").iterdir()) == ["2"]
    storage.delete(["backups/db/2/db.dump"])
    assert list(root.iterdir()) == []
    storage.put_bytes("backups/db/3/db.dump", b"again")
    assert storage.read_bytes("backups/db/3/db.dump") == b"again"


@pytest.mark.parametrize("after", ["open", "fsync", "replace", "link"])
def test_local_interrupt_at_any_step_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str
) -> None:
    # A Ctrl-C is handled at the first bytecode after a system call returns. CI once caught
    # one right after open(2) created the temp file (a loaded host, the test watching for
    # that file): it was left behind. Signal timing cannot be forced from outside, so the
    # call itself raises KeyboardInterrupt once it has done its work.
    root = tmp_path / "repo"
    storage = LocalStorage(root)
    real = getattr(os, after)

    def on_temp_file(target: Any) -> bool:
        # fsync takes a descriptor (the folders' own fsyncs must not count); the rest a path.
        path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else target
        return Path(path).name.startswith(".tmp-")

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if on_temp_file(args[0]):
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(os, after, interrupted)
    with pytest.raises(KeyboardInterrupt):
        if after == "link":
            storage.create("backups/db/1/lock", b"x" * 100)
        else:
            storage.put("backups/db/1/db.dump", stream(payload(3 * MiB)))
    monkeypatch.undo()
    left = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert not [name for name in left if name.startswith(".tmp-")], left


def test_local_open_is_buffered(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "repo")
    storage.put_bytes("k", b"abc")
    with storage.open("k") as f:
        assert isinstance(f, io.BufferedReader)


# -- S3 -----------------------------------------------------------------------------------


def test_part_schedule_fits_5_tib_in_10000_parts() -> None:
    for base in (MIN_PART_SIZE, 8 * MiB, 64 * MiB):
        sizes = [part_size(n, base) for n in range(1, MAX_PARTS + 1)]
        assert sum(sizes) >= 5 * TiB
        assert all(MIN_PART_SIZE <= s <= MAX_PART_SIZE for s in sizes)
        assert sizes == sorted(sizes)
    # Small backups use small parts: the first 800 parts (6.25 GiB at 8 MiB) stay at base.
    assert {part_size(n, 8 * MiB) for n in range(1, 801)} == {8 * MiB}
    assert part_size(801, 8 * MiB) == 16 * MiB
    assert part_size(MAX_PARTS, 8 * MiB) == MAX_PART_SIZE


def test_s3_options_are_validated() -> None:
    with pytest.raises(ConfigError):
        S3Options(part_size=1 * MiB)
    with pytest.raises(ConfigError):
        S3Options(sse="aws:kms:dsse")
    with pytest.raises(ConfigError):
        S3Options(kms_key_id="k")
    with pytest.raises(ConfigError):
        S3Options(max_concurrency=0)


def record_requests(storage: S3Storage, operation: str) -> list[dict[str, str]]:
    """Headers of every ``operation`` request the storage's client sends."""
    seen: list[dict[str, str]] = []

    def hook(request: Any, **_: Any) -> None:
        seen.append(
            {
                k.lower(): v.decode() if isinstance(v, bytes) else v
                for k, v in request.headers.items()
            }
        )

    storage._client.meta.events.register(f"before-send.s3.{operation}", hook)
    return seen


def test_s3_writes_use_sse_and_content_md5(
    s3_bucket: str, s3_options: S3Options, s3_client: S3Client
) -> None:
    storage = S3Storage(s3_bucket, "p", replace(s3_options, part_size=5 * MiB))
    client = s3_client
    parts = record_requests(storage, "UploadPart")
    puts = record_requests(storage, "PutObject")
    storage.put("big", stream(payload(12 * MiB)))
    storage.put_bytes("small", b"x")
    storage.create("created", b"x")
    assert len(parts) == 3 and len(puts) == 2
    for headers in parts + puts:
        assert "content-md5" in headers
        # No aws-chunked CRC trailers, which many S3-compatible stores refuse.
        assert not any(h.startswith("x-amz-checksum-") or h == "x-amz-trailer" for h in headers)
    assert puts[1]["if-none-match"] == "*"
    for key in ("p/big", "p/small", "p/created"):
        assert client.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"
    assert client.head_object(Bucket=s3_bucket, Key="p/big")["ETag"].endswith('-3"')


def test_s3_sse_kms_with_key_id(s3_bucket: str, s3_options: S3Options, s3_client: S3Client) -> None:
    kms = boto3.client("kms", endpoint_url=s3_options.endpoint_url)
    key_id = kms.create_key(Description="pgvault test")["KeyMetadata"]["KeyId"]
    options = replace(s3_options, sse="aws:kms", kms_key_id=key_id, part_size=5 * MiB)
    storage = S3Storage(s3_bucket, "", options)
    storage.put("big", stream(payload(11 * MiB)))
    storage.put_bytes("small", b"x")
    for key in ("big", "small"):
        head = s3_client.head_object(Bucket=s3_bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms"
        assert key_id in head["SSEKMSKeyId"]


def test_s3_without_sse_sends_no_sse_header(s3_bucket: str, s3_options: S3Options) -> None:
    storage = S3Storage(s3_bucket, "", replace(s3_options, sse=None))
    puts = record_requests(storage, "PutObject")
    storage.put_bytes("k", b"x")
    assert "x-amz-server-side-encryption" not in puts[0]


def test_s3_prefix_isolates_keys(
    s3_bucket: str, s3_options: S3Options, s3_client: S3Client
) -> None:
    client = s3_client
    client.put_object(Bucket=s3_bucket, Key="other/x", Body=b"not ours")
    client.put_object(Bucket=s3_bucket, Key="repo/", Body=b"")  # a console "folder"
    storage = S3Storage(s3_bucket, "/repo/", s3_options)
    assert storage.url == f"s3://{s3_bucket}/repo"
    storage.put_bytes("a/b", b"x")
    assert [i.key for i in storage.list("")] == ["a/b"]
    assert client.get_object(Bucket=s3_bucket, Key="repo/a/b")["Body"].read() == b"x"
    assert S3Storage(s3_bucket, "", s3_options).url == f"s3://{s3_bucket}"


def test_s3_failed_part_aborts_the_upload(
    s3_bucket: str, s3_options: S3Options, s3_client: S3Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage = S3Storage(s3_bucket, "", replace(s3_options, part_size=5 * MiB))

    def fail_part_3(request: Any, **_: Any) -> AWSResponse | None:
        return _fail_with_500(request) if "partNumber=3" in request.url else None

    storage._client.meta.events.register("before-send.s3.UploadPart", fail_part_3)
    with pytest.raises(TransientStorageError, match=r"upload part 3 failed: InternalError"):
        storage.put("big", stream(payload(30 * MiB)))
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    with pytest.raises(NotFound):
        storage.stat("big")


class _Raw:
    """The raw body of a canned botocore response."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def _fail_with_500(request: Any, **_: Any) -> AWSResponse:
    body = b"<Error><Code>InternalError</Code><Message>disk on fire</Message></Error>"
    return AWSResponse(request.url, 500, {}, _Raw(body))


def test_s3_abort_failure_is_noted_on_the_stream_error(
    s3_bucket: str, s3_options: S3Options, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage = S3Storage(s3_bucket, "", replace(s3_options, part_size=5 * MiB))
    storage._client.meta.events.register("before-send.s3.AbortMultipartUpload", _fail_with_500)
    source = Source(payload(14 * MiB), fail_at=12 * MiB)
    with pytest.raises(Boom) as caught:
        storage.put("big", cast(BinaryIO, source))
    assert caught.value is source.error
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == 1 and "abort multipart upload failed: InternalError" in notes[0]


def test_s3_parts_in_flight_are_bounded(s3_bucket: str, s3_options: S3Options) -> None:
    storage = S3Storage(s3_bucket, "", replace(s3_options, part_size=5 * MiB, max_concurrency=2))
    lock = threading.Lock()
    active, peak = 0, 0

    def slow_part(**_: Any) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1

    storage._client.meta.events.register("before-send.s3.UploadPart", slow_part)
    data = payload(20 * MiB)
    storage.put("big", stream(data))
    assert peak == 2
    assert storage.read_bytes("big") == data


# Run in a fresh process so its peak RSS (VmHWM, reset just before the put) is the put's own.
_SLOW_PUT = """
import io, sys, time
from pathlib import Path
from pgvault.storage.s3 import S3Options, S3Storage

MiB = 1 << 20
endpoint, bucket, part, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


class Pipe(io.RawIOBase):
    left = 60 * MiB
    block = bytes(range(256)) * 4096

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), MiB, self.left)  # short reads, as from pg_dump's pipe
        buffer[:n] = self.block[:n]
        self.left -= n
        return n


def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith(field))


storage = S3Storage(bucket, "", S3Options(endpoint_url=endpoint, path_style=True,
                                          part_size=part, max_concurrency=workers))
storage._client.meta.events.register("before-send.s3.UploadPart", lambda **_: time.sleep(0.05))
storage.put_bytes("warm-up", b"x")
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS")
storage.put("big", Pipe())
print((kib("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_s3_put_memory_is_its_part_buffers(s3_bucket: str, s3_options: S3Options) -> None:
    """A slow 60 MiB upload peaks near (max_concurrency + 1) parts: no copies of them."""
    part, workers = 5 * MiB, 2
    out = subprocess.run(
        [sys.executable, "-c", _SLOW_PUT, str(s3_options.endpoint_url), s3_bucket, str(part),
         str(workers)],
        capture_output=True, text=True, check=True, timeout=120,
    )
    growth = int(out.stdout)
    # Joined reads, then bytes objects malloc kept once freed, took twice as much (32 MiB).
    assert growth <= (workers + 1) * part + 5 * MiB


def test_s3_retried_part_is_sent_whole(
    s3_bucket: str, s3_options: S3Options, s3_client: S3Client
) -> None:
    storage = S3Storage(s3_bucket, "", replace(s3_options, part_size=5 * MiB))
    failed: list[int] = []

    def fail_once_midway(request: Any, **_: Any) -> AWSResponse | None:
        if "partNumber=2" in request.url and not failed:
            failed.append(len(request.body.read(MiB)))  # a connection lost partway
            return _fail_with_500(request)
        return None

    storage._client.meta.events.register("before-send.s3.UploadPart", fail_once_midway)
    data = payload(12 * MiB)
    storage.put("big", stream(data))
    assert failed  # the retry had to rewind the part to its start
    assert s3_client.get_object(Bucket=s3_bucket, Key="big")["Body"].read() == data


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_s3_unreachable_endpoint_error_holds_no_secret(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "SECRETabcdef0123456789pgvaultSECRET"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPGVAULTDISTINCT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    options = S3Options(endpoint_url=f"http://127.0.0.1:{_closed_port()}", path_style=True)
    storage = S3Storage("my-bucket", "pre", options)
    for call in (
        lambda: storage.put_bytes("k", b"x"),
        lambda: storage.stat("k"),
        lambda: list(storage.list("")),
        lambda: storage.put("big", stream(payload(9 * MiB))),
    ):
        with pytest.raises(StorageError) as caught:
            call()
        message = str(caught.value)
        assert isinstance(caught.value, TransientStorageError)
        assert "s3://my-bucket/pre/" in message
        assert secret not in message and "AKIAPGVAULTDISTINCT" not in message
        assert "\n" not in message


class _Always500(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # so "Expect: 100-continue" is answered, not waited out

    def _fail(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b"<Error><Code>InternalError</Code><Message>We are down</Message></Error>"
        self.send_response(500)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _fail

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def failing_endpoint(s3_server: str) -> Iterator[str]:
    """An HTTP server answering 500 InternalError to everything (s3_server sets the AWS env)."""
    server = LoopbackServer(("127.0.0.1", 0), _Always500)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_s3_server_errors_are_transient_not_success(
    failing_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage = S3Storage("b", "", S3Options(endpoint_url=failing_endpoint, path_style=True))
    calls: list[Callable[[], object]] = [
        lambda: storage.put_bytes("k", b"x"),
        lambda: storage.create("k", b"x"),
        lambda: storage.put("k", stream(payload(9 * MiB))),
        lambda: storage.open("k"),
        lambda: storage.stat("k"),
        lambda: list(storage.list("")),
        lambda: storage.delete(["k"]),
    ]
    for call in calls:
        with pytest.raises(TransientStorageError, match=r"s3://b/k?.*(InternalError|500)"):
            call()


def test_s3_missing_bucket_is_not_not_found(s3_server: str, s3_options: S3Options) -> None:
    storage = S3Storage("pgvault-no-such-bucket", "", s3_options)
    with pytest.raises(StorageError, match="NoSuchBucket") as caught:
        storage.read_bytes("k")
    assert not isinstance(caught.value, NotFound)


# -- open_storage -------------------------------------------------------------------------


def test_open_storage_picks_the_backend(tmp_path: Path, s3_options: S3Options) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    local = open_storage(tmp_path.as_uri())
    assert isinstance(local, LocalStorage) and local.url == tmp_path.as_uri()
    assert isinstance(open_storage("memory://"), MemoryStorage)
    s3 = open_storage("s3://bucket/some/prefix", s3_options)
    assert isinstance(s3, S3Storage) and s3.url == "s3://bucket/some/prefix"
    with pytest.raises(ConfigError, match="'ftp'"):
        open_storage("ftp://host/path")
    with pytest.raises(ConfigError):
        open_storage("s3://")


def test_open_storage_does_not_import_boto3_for_files(tmp_path: Path) -> None:
    code = (
        "import sys; from pgvault.storage import open_storage; "
        f"open_storage({str(tmp_path)!r}).put_bytes('k', b'x'); "
        "print('boto3' in sys.modules, 'botocore' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
