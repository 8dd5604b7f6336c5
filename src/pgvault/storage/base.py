"""The byte-store interface every repository backend implements."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Protocol, runtime_checkable

from pgvault.errors import StorageError

STOPPING = threading.Event()
"""Set once pgvault is stopping (SIGTERM, Ctrl-C): a backend's waits in any thread, not only
the one the signal interrupts, then give up at once and clean up."""

TEMP_PREFIX = ".tmp-"
"""Key segments starting with this are reserved for a backend's in-progress writes."""


def check_key(key: str) -> str:
    """Return ``key`` if every backend can store it, else raise StorageError.

    A key is non-empty '/'-separated segments: no leading or trailing '/', no empty,
    '.' or '..' segment, no NUL, and no segment starting with ``TEMP_PREFIX``.
    """
    problem = None
    if not key:
        problem = "empty key"
    elif "\0" in key:
        problem = "NUL in key"
    else:
        for segment in key.split("/"):
            if segment in ("", ".", ".."):
                problem = "empty, '.' or '..' segment (or leading/trailing '/')"
            elif segment.startswith(TEMP_PREFIX):
                problem = f"segment starting with {TEMP_PREFIX!r} is reserved"
            if problem:
                break
    if problem:
        raise StorageError(f"invalid storage key {key!r}: {problem}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one stored object."""

    key: str
    size: int
    modified: datetime  # timezone-aware UTC
    locked_until: datetime | None = None
    """S3 Object Lock: the object cannot be deleted before this (only ``stat`` reports it)."""
    etag: str | None = None
    """The version token ``replace_if`` compares (``replace_if`` reports it, and S3's
    ``list``, so a reader can tell a rewritten object from the one it read)."""


class Storage(Protocol):
    """A byte store keyed by '/'-separated strings; knows nothing about backups.

    Every method raises ``pgvault.errors.StorageError`` (or its subclasses
    ``NotFound``, ``AlreadyExists``, ``TransientStorageError``) and nothing else.
    """

    @property
    def url(self) -> str:
        """Where the store is, safe to print (no credentials)."""
        ...

    def put(self, key: str, stream: BinaryIO) -> ObjectInfo:
        """Store everything ``stream.read()`` yields; the key appears only when complete.

        If reading the stream raises, nothing is left under ``key`` (partial uploads are
        aborted, temp files removed) and the stream's exception propagates unchanged.
        """
        ...

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Store a small object atomically, replacing any previous one."""
        ...

    def create(self, key: str, data: bytes) -> ObjectInfo:
        """Store a small object only if ``key`` does not exist; else raise AlreadyExists."""
        ...

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        """A small object's content and its version token (ETag); raises NotFound."""
        ...

    def replace_if(self, key: str, data: bytes, etag: str | None) -> ObjectInfo:
        """Store a small object only if it is still at version ``etag`` (None: only if absent).

        Atomic against every other ``replace_if`` and ``create`` of the key, across
        processes and hosts: S3 PutObject with If-Match / If-None-Match, a folder under an
        advisory lock. Raises Conflict when the object changed, was deleted, or (``etag``
        None) exists; the returned info's ``etag`` is the new version's.
        """
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object's bytes; raises NotFound."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The whole content of a small object; raises NotFound."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Size and time of one object; raises NotFound."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""
        ...

    def delete(self, keys: Iterable[str]) -> None:
        """Remove these keys; keys that do not exist are ignored."""
        ...


@runtime_checkable
class Retaining(Protocol):
    """A store that can lock objects against deletion (S3 Object Lock)."""

    @property
    def locking(self) -> bool:
        """Whether this repository locks what it writes (the two methods below need it)."""
        ...

    def retained_until(self, key: str) -> datetime | None:
        """Until when ``key`` is locked against deletion (None: not locked)."""
        ...

    def extend_retention(self, key: str, until: datetime) -> datetime | None:
        """Retain ``key`` until at least ``until``, never shortening; the date it now has,
        or None when this store locks nothing."""
        ...
