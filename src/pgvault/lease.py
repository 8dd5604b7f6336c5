"""Lease objects in the repository: claimed by a conditional write, renewed on their ETag.

A lease is one small object (``catalog.fleet_lease_key``, ``catalog.fleet_slot_key``)
holding a ``fleet.LeaseRecord``. Every write is ``storage.replace_if`` on the version
just read (S3 If-None-Match / If-Match; a folder under flock), so of two workers that read
the same version only one writes the next: that is the whole of the mutual exclusion, and
it holds whatever shards the workers think they have. A holder renews before
``expires``; one that stops renewing (killed, paused, partitioned) loses the lease to the
first worker that finds it expired, and learns so at its next renewal (Conflict), which
sets its ``lost`` event.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec

from pgvault import fleet, logs
from pgvault.errors import Conflict, NotFound, StorageError
from pgvault.fleet import LeaseRecord
from pgvault.storage.base import Storage

log = logs.get("lease")


def read(storage: Storage, key: str) -> tuple[LeaseRecord | None, str | None]:
    """The record at ``key`` and its version; (None, None) when there is none. A record
    that cannot be decoded comes back as None with its version, so it can be replaced."""
    try:
        data, etag = storage.read_versioned(key)
    except NotFound:
        return None, None
    return fleet.decode(data), etag


@dataclass
class Lease:
    """A lease this process holds: its key, the record it wrote and that record's version."""

    storage: Storage
    key: str
    record: LeaseRecord
    etag: str
    lost: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def claim(cls, storage: Storage, key: str, record: LeaseRecord,
              etag: str | None) -> Lease:
        """Write ``record`` over the version ``etag`` (None: only if absent); Conflict when
        another worker wrote first."""
        info = storage.replace_if(key, fleet.encode(record), etag)
        assert info.etag is not None
        return cls(storage, key, record, info.etag)

    def write(self, record: LeaseRecord) -> None:
        """Replace our record (renewal, or the final state); Conflict: it is not ours any
        more, and ``lost`` is set."""
        with self._lock:
            if self.lost.is_set():
                raise Conflict(f"{self.key}: the lease was lost")
            try:
                info = self.storage.replace_if(self.key, fleet.encode(record), self.etag)
            except Conflict:
                self.lost.set()
                raise
            assert info.etag is not None
            self.record, self.etag = record, info.etag

    def renew(self, now: datetime, length: timedelta) -> None:
        self.write(msgspec.structs.replace(self.record, expires=now + length, updated=now))

    def release(self, now: datetime) -> None:
        """Give a slot back (best effort: an unreleased slot frees itself when it expires)."""
        with contextlib.suppress(StorageError):
            self.write(msgspec.structs.replace(self.record, state="free", expires=None,
                                               updated=now))


def take_slot(storage: Storage, keys: Iterable[str], holder: str, now: datetime,
              length: timedelta) -> Lease | None:
    """One free slot among ``keys`` (a cap of len(keys) jobs), or None when all are held."""
    for key in keys:
        record, etag = read(storage, key)
        if not fleet.slot_free(record, now):
            continue
        with contextlib.suppress(Conflict):
            return Lease.claim(storage, key, LeaseRecord(
                state="running", holder=holder, expires=now + length, updated=now), etag)
    return None


class Keeper:
    """Renews leases in a thread every third of their length while a job runs.

    A renewal refused (Conflict) means the lease was taken over: ``on_lost`` is called
    once, and the job must not claim its result. A storage error is retried at the next
    beat; the lease may expire meanwhile, and then a renewal is refused too.
    """

    def __init__(self, leases: list[Lease], length: timedelta, clock: Callable[[], datetime],
                 on_lost: Callable[[Lease], None]) -> None:
        self.leases = leases
        self.length = length
        self.clock = clock
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> Keeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        beat = max(self.length.total_seconds() / 3, 0.05)
        while not self._stop.wait(beat):
            for lease in self.leases:
                if lease.lost.is_set():
                    continue
                try:
                    lease.renew(self.clock(), self.length)
                except Conflict:
                    # The job's owner says so in one line, naming the taker.
                    log.info("lease %s was taken over", lease.key)
                    self.on_lost(lease)
                except StorageError as exc:
                    log.warning("could not renew the lease %s: %s", lease.key, exc)
