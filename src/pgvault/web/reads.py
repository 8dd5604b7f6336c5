"""What one page reads from the repository: each record folder listed once per request.

The overview asks, for every database, for its manifests, drill records, run history and
lock: four listings and a read of each record per database, 1,400 requests for 200
databases, which on S3 is seconds. ``Reads.view()`` gives a page a read-only view of the
storage in which each record folder (``RECORD_PREFIXES``) is listed once, when first
asked for, and every narrower listing is cut from it. A record's bytes are kept across
requests only while the listing still shows the same object (key, size, modification
time and, where the store lists it, ETag): the listing of the request itself decides, so
the page shows the repository as it is, never a copy that can drift from it. Records the
listing names and the cache lacks are read in parallel. Anything else (WAL, backup data,
writes) goes straight to the storage.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from pgvault import catalog
from pgvault.errors import NotFound, StorageError
from pgvault.storage.base import ObjectInfo, Storage

RECORD_PREFIXES = (catalog.MANIFESTS, catalog.DRILLS, catalog.STATUS, catalog.LOCKS)
"""Folders of small records that every status reads (catalog.py's layout)."""
MAX_RECORD = 1 << 20
"""A record larger than this is read when asked for, not kept."""
CACHE_BYTES = 64 << 20
READERS = 8
"""Records read at once after a listing names new ones (S3: one request each)."""

Version = tuple[int, float, str | None]


def _version(info: ObjectInfo) -> Version:
    return info.size, info.modified.timestamp(), info.etag


class Reads:
    """The records' bytes, kept across requests while the listings say they are unchanged."""

    def __init__(self, storage: Storage, *, cache_bytes: int = CACHE_BYTES) -> None:
        self.storage = storage
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, tuple[Version, bytes]] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def view(self) -> View:
        """A read view for one request (not shared between requests)."""
        return View(self)

    def cached(self, info: ObjectInfo) -> bytes | None:
        with self._lock:
            found = self._cache.get(info.key)
            if found is None or found[0] != _version(info):
                return None
            self._cache.move_to_end(info.key)
            return found[1]

    def keep(self, info: ObjectInfo, data: bytes) -> None:
        if len(data) > MAX_RECORD or len(data) != info.size:
            return  # changed between the listing and the read: the next request reads it
        with self._lock:
            old = self._cache.pop(info.key, None)
            if old is not None:
                self._held -= len(old[1])
            self._cache[info.key] = (_version(info), data)
            self._held += len(data)
            while self._held > self.cache_bytes and self._cache:
                _, (_, dropped) = self._cache.popitem(last=False)
                self._held -= len(dropped)

    def forget(self, keys: Iterable[str]) -> None:
        """Drop keys the listing no longer shows, so a deleted record's bytes go too."""
        with self._lock:
            for key in keys:
                old = self._cache.pop(key, None)
                if old is not None:
                    self._held -= len(old[1])

    def known(self, prefix: str) -> list[str]:
        with self._lock:
            return [k for k in self._cache if k.startswith(prefix)]


class View:
    """A Storage for one request's reads: record folders listed once, records cached."""

    def __init__(self, reads: Reads) -> None:
        self._reads = reads
        self._storage = reads.storage
        self._listed: dict[str, tuple[list[str], dict[str, ObjectInfo]] | StorageError] = {}
        self._lock = threading.Lock()
        self.requests = 0
        """Listings and reads this view sent to the storage (what a test counts)."""
        self._counting = threading.Lock()

    def _count(self) -> None:
        with self._counting:
            self.requests += 1

    @property
    def url(self) -> str:
        return self._storage.url

    @property
    def base(self) -> Storage:
        """The storage this view reads."""
        return self._storage

    def __getattr__(self, name: str) -> Any:
        # put, create, delete, replace_if, ...: a page never writes, an action's job uses
        # the storage itself; delegated so the view is a Storage wherever one is asked.
        return getattr(self._storage, name)

    def _folder(self, key: str) -> str | None:
        return next((p for p in RECORD_PREFIXES if key.startswith(p)), None)

    def _listing(self, folder: str) -> tuple[list[str], dict[str, ObjectInfo]]:
        with self._lock:
            if not self._listed:
                self._list_all()
            found = self._listed[folder]
            if isinstance(found, StorageError):
                raise found
            return found

    def _list_all(self) -> None:
        """List every record folder at once (a page needs them all: on S3 the listings
        run side by side), then read the records the cache lacks, several at a time."""
        def listed(folder: str) -> list[ObjectInfo] | StorageError:
            try:
                return list(self._storage.list(folder))
            except StorageError as exc:
                return exc
            finally:
                self._count()

        if self._storage.url.startswith(("file:", "memory:")):
            results = [listed(folder) for folder in RECORD_PREFIXES]  # no wait to overlap
        else:
            with ThreadPoolExecutor(len(RECORD_PREFIXES)) as pool:
                results = list(pool.map(listed, RECORD_PREFIXES))
        missing = []
        for folder, infos in zip(RECORD_PREFIXES, results, strict=True):
            if isinstance(infos, StorageError):
                self._listed[folder] = infos
                continue
            by_key = {info.key: info for info in infos}
            self._listed[folder] = ([info.key for info in infos], by_key)
            self._reads.forget([k for k in self._reads.known(folder) if k not in by_key])
            missing += [info for info in infos if info.size <= MAX_RECORD
                        and self._reads.cached(info) is None]
        if len(missing) > 1 and not self._storage.url.startswith(("file:", "memory:")):
            with ThreadPoolExecutor(min(READERS, len(missing))) as pool:
                list(pool.map(self._prefetch, missing))

    def _prefetch(self, info: ObjectInfo) -> None:
        with contextlib.suppress(StorageError):  # the read it was for says why, if asked
            self._fetch(info)

    def _fetch(self, info: ObjectInfo) -> bytes:
        data = self._storage.read_bytes(info.key)
        self._count()
        self._reads.keep(info, data)
        return data

    def signature(self, database: str) -> tuple[tuple[str, Version], ...] | None:
        """Every record of ``database`` as this request lists it (key and version): equal
        signatures mean equal records, so what was built from them can be reused. None
        while a lock is held (who holds it, and whether it is stale, changes with time)."""
        segment = catalog.db_segment(database)
        if any(True for _ in self.list(catalog.lock_key(database))) or any(
                True for _ in self.list(catalog.snapshot_lock_key(database))):
            return None
        found = []
        for folder in (catalog.MANIFESTS, catalog.DRILLS, catalog.STATUS):
            found += [(info.key, _version(info)) for info in self.list(f"{folder}{segment}/")]
        return tuple(found)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        folder = self._folder(prefix)
        if folder is None:
            self._count()
            yield from self._storage.list(prefix)
            return
        keys, by_key = self._listing(folder)
        for key in keys[bisect.bisect_left(keys, prefix):]:
            if not key.startswith(prefix):
                break
            yield by_key[key]

    def stat(self, key: str) -> ObjectInfo:
        folder = self._folder(key)
        if folder is None:
            return self._storage.stat(key)
        info = self._listing(folder)[1].get(key)
        if info is None:
            raise NotFound(f"{self.url}: no object {key}")
        return info

    def read_bytes(self, key: str) -> bytes:
        folder = self._folder(key)
        if folder is None:
            self._count()
            return self._storage.read_bytes(key)
        info = self._listing(folder)[1].get(key)
        if info is None:
            raise NotFound(f"{self.url}: no object {key} (as this request listed it)")
        data = self._reads.cached(info)
        return data if data is not None else self._fetch(info)

    def open(self, key: str) -> BinaryIO:
        return self._storage.open(key)
