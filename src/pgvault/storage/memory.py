"""An in-process byte store for unit tests, with the same semantics as the real ones."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

from pgvault.errors import AlreadyExists, Conflict, NotFound
from pgvault.storage.base import ObjectInfo, check_key


class MemoryStorage:
    """Objects live in a dict guarded by a lock; nothing survives the process."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, datetime]] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return "memory://"

    def _store(self, key: str, data: bytes, *, replace: bool) -> ObjectInfo:
        info = ObjectInfo(key, len(data), datetime.now(UTC))
        with self._lock:
            if not replace and key in self._objects:
                raise AlreadyExists(f"memory://{key} already exists")
            self._objects[key] = (data, info.modified)
        return info

    def put(self, key: str, stream: BinaryIO) -> ObjectInfo:
        """Read the whole stream first, so a failing stream stores nothing."""
        check_key(key)
        return self._store(key, stream.read(), replace=True)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._store(check_key(key), bytes(data), replace=True)

    def create(self, key: str, data: bytes) -> ObjectInfo:
        return self._store(check_key(key), bytes(data), replace=False)

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        data, modified = self._get(key)
        return data, _etag(data, modified)

    def replace_if(self, key: str, data: bytes, etag: str | None) -> ObjectInfo:
        check_key(key)
        data = bytes(data)
        with self._lock:
            current = self._objects.get(key)
            if (etag is None) != (current is None) or (
                    current is not None and _etag(*current) != etag):
                raise Conflict(f"memory://{key} is not at version {etag}")
            modified = datetime.now(UTC)
            if current is not None and modified <= current[1]:
                modified = current[1] + timedelta(microseconds=1)  # a new version, always
            self._objects[key] = (data, modified)
        return ObjectInfo(key, len(data), modified, etag=_etag(data, modified))

    def _get(self, key: str) -> tuple[bytes, datetime]:
        check_key(key)
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise NotFound(f"memory://{key} does not exist")
        return found

    def open(self, key: str) -> BinaryIO:
        return io.BytesIO(self._get(key)[0])

    def read_bytes(self, key: str) -> bytes:
        return self._get(key)[0]

    def stat(self, key: str) -> ObjectInfo:
        data, modified = self._get(key)
        return ObjectInfo(key, len(data), modified)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """A snapshot taken at the call, so deleting while iterating is safe."""
        with self._lock:
            found = sorted(
                (k, len(d), m) for k, (d, m) in self._objects.items() if k.startswith(prefix)
            )
        return iter([ObjectInfo(k, size, modified) for k, size, modified in found])

    def delete(self, keys: Iterable[str]) -> None:
        keys = [check_key(k) for k in keys]
        with self._lock:
            for key in keys:
                self._objects.pop(key, None)


def _etag(data: bytes, modified: datetime) -> str:
    # The time is part of the version: rewriting the same bytes is still a new version.
    return hashlib.sha256(data + modified.isoformat().encode()).hexdigest()[:32]
