"""Leases in the repository: one claim wins, renewals keep it, expiry lets it be taken over,
and the old holder learns it lost; on a folder, in memory and on S3 (moto over HTTP)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgvault import fleet, lease
from pgvault.errors import Conflict
from pgvault.fleet import LeaseRecord
from pgvault.lease import Keeper, Lease
from pgvault.storage.base import Storage
from pgvault.storage.local import LocalStorage
from pgvault.storage.memory import MemoryStorage
from pgvault.storage.s3 import S3Options, S3Storage

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "repo")
    if request.param == "memory":
        return MemoryStorage()
    bucket: str = request.getfixturevalue("s3_bucket")
    options: S3Options = request.getfixturevalue("s3_options")
    return S3Storage(bucket, "fleet-test", options)


def running(holder: str, at: datetime = NOW) -> LeaseRecord:
    return LeaseRecord(state="running", window=1, holder=holder, expires=at + MINUTE)


def test_one_claim_wins_and_the_loser_sees_the_winner(storage: Storage) -> None:
    key = "fleet/leases/app.json"
    assert lease.read(storage, key) == (None, None)
    won = Lease.claim(storage, key, running("a 1 x"), None)
    with pytest.raises(Conflict):
        Lease.claim(storage, key, running("b 2 y"), None)
    record, etag = lease.read(storage, key)
    assert record is not None and record.holder == "a 1 x" and etag == won.etag


def test_renewal_keeps_the_lease_and_a_takeover_ends_it(storage: Storage) -> None:
    key = "fleet/leases/app.json"
    held = Lease.claim(storage, key, running("a 1 x"), None)
    held.renew(NOW + MINUTE / 2, MINUTE)
    record, etag = lease.read(storage, key)
    assert record is not None and record.expires == NOW + MINUTE * 1.5
    # b read the lease once it expired and takes it over on that version...
    later = NOW + MINUTE * 2
    assert fleet.expired(record, later)
    assert fleet.decide("app", record, later, fleet.Timing(window=timedelta(days=1))
                        ).action == "take"
    Lease.claim(storage, key, running("b 2 y", later), etag)
    # ...so a's next renewal is refused, and a knows it lost.
    with pytest.raises(Conflict):
        held.renew(later, MINUTE)
    assert held.lost.is_set()
    with pytest.raises(Conflict):
        held.write(fleet.finished(held.record, later, "some-backup"))
    record, _ = lease.read(storage, key)
    assert record is not None and record.holder == "b 2 y" and record.state == "running"


def test_two_takers_of_an_expired_lease_one_wins(storage: Storage) -> None:
    key = "fleet/leases/app.json"
    Lease.claim(storage, key, running("dead 1 x"), None)
    _, etag = lease.read(storage, key)
    barrier = threading.Barrier(4)
    won: list[str] = []

    def take(name: str) -> None:
        barrier.wait()
        try:
            Lease.claim(storage, key, running(name, NOW + MINUTE * 5), etag)
            won.append(name)
        except Conflict:
            pass

    threads = [threading.Thread(target=take, args=(f"w{n} {n} t",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    record, _ = lease.read(storage, key)
    assert record is not None and record.holder == won[0]


def test_slots_cap_holders_and_free_again(storage: Storage) -> None:
    keys = [f"fleet/slots/server/db1%3A5432/{n}.json" for n in range(2)]
    first = lease.take_slot(storage, keys, "a 1 x", NOW, MINUTE)
    second = lease.take_slot(storage, keys, "b 2 y", NOW, MINUTE)
    assert first is not None and second is not None and first.key != second.key
    assert lease.take_slot(storage, keys, "c 3 z", NOW, MINUTE) is None  # the cap is 2
    first.release(NOW)
    third = lease.take_slot(storage, keys, "c 3 z", NOW, MINUTE)
    assert third is not None and third.key == first.key
    # A holder that stops renewing frees its slot when its lease runs out.
    assert lease.take_slot(storage, keys, "d 4 w", NOW + MINUTE * 2, MINUTE) is not None


def test_a_damaged_lease_is_replaced_not_fatal(storage: Storage) -> None:
    key = "fleet/leases/app.json"
    storage.put_bytes(key, b"{not json")
    record, etag = lease.read(storage, key)
    assert record is None and etag is not None
    Lease.claim(storage, key, running("a 1 x"), etag)
    assert lease.read(storage, key)[0] == running("a 1 x")


def test_keeper_renews_in_the_background_and_reports_a_loss() -> None:
    storage = MemoryStorage()
    key = "fleet/leases/app.json"
    length = timedelta(seconds=0.3)
    held = Lease.claim(storage, key, replace_expires(running("a 1 x"), length), None)
    lost: list[str] = []
    with Keeper([held], length, lambda: datetime.now(UTC),
                on_lost=lambda gone: lost.append(gone.key)):
        time.sleep(0.5)  # longer than the lease: only the renewals keep it
        record, etag = lease.read(storage, key)
        assert record is not None and not fleet.expired(record, datetime.now(UTC))
        Lease.claim(storage, key, running("b 2 y"), etag)  # taken over (e.g. we were paused)
        time.sleep(0.3)
    assert lost == [key] and held.lost.is_set()


def replace_expires(record: LeaseRecord, length: timedelta) -> LeaseRecord:
    import msgspec

    return msgspec.structs.replace(record, expires=datetime.now(UTC) + length)

