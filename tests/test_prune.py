"""Prune: retention applied to a repository, orphan collection, pins, locks, and the CLI."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import msgspec
import psycopg
import pytest

from cli_runner import pgvault
from dbcompare import assert_databases_equal
from pgvault.catalog import Catalog, artifact_key, lock_key
from pgvault.errors import StorageError, UsageError
from pgvault.lock import hold
from pgvault.model import Artifact, Manifest, Pin, backup_id_time, from_json, new_backup_id
from pgvault.ops.pin import pin, unpin
from pgvault.ops.prune import ORPHAN_DELAY, Policy, PruneReport, prune, prune_after_backup, roles
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage
from pgvault.storage.base import ObjectInfo, Storage
from pgvault.storage.memory import MemoryStorage

MakeDb = Callable[..., str]

STALE = timedelta(hours=12)
DEFAULT = Policy()  # 7 daily, 4 weekly, 3 monthly


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def fabricate(storage: Storage, when: datetime, database: str = "app",
              pinned: bool = False) -> Manifest:
    """Store a backup's data objects and commit its manifest, as a backup taken at `when`."""
    backup_id = new_backup_id(when)
    artifacts = []
    for name, filename in (("db.dump", "db.dump.zst"), ("globals.sql", "globals.sql.zst")):
        key = artifact_key(database, backup_id, filename)
        data = f"{backup_id} {name}".encode()
        storage.put_bytes(key, data)
        artifacts.append(Artifact(name=name, key=key, size=len(data), raw_size=len(data),
                                  sha256=hashlib.sha256(data).hexdigest()))
    manifest = Manifest(id=backup_id, database=database, started_at=when,
                        finished_at=when + timedelta(minutes=3), pgvault_version="test",
                        artifacts=artifacts,
                        pin=Pin(reason="audit", at=when) if pinned else None)
    Catalog(storage).commit(manifest)
    return manifest


def sixty_days(storage: MemoryStorage, database: str = "app") -> dict[date, Manifest]:
    """One backup a day at 01:00 UTC from Thu 2026-01-01 to Sun 2026-03-01 (60 days)."""
    first = date(2026, 1, 1)
    days = [first + timedelta(n) for n in range(60)]
    return {d: fabricate(storage, at(f"{d}T01:00"), database) for d in days}


def keys(storage: MemoryStorage, prefix: str = "") -> set[str]:
    return {info.key for info in storage.list(prefix)}


def run(storage: MemoryStorage, policy: Policy = DEFAULT, *, dry_run: bool = False,
        now: datetime | None = None, orphan_delay: timedelta = ORPHAN_DELAY,
        force: bool = False) -> PruneReport:
    return prune(storage, policy, dry_run=dry_run, now=now or datetime.now(UTC),
                 orphan_delay=orphan_delay, lock_stale_after=STALE, force=force)


# Under 7 daily / 4 weekly / 3 monthly, 60 dailies ending Sunday 2026-03-01 keep: the 7 newest
# days; the Sundays ending ISO weeks 8, 7 and 6 (week 9's is Mar 1 itself); and the newest of
# January. The month rule's third slot is Jan 31, so the "oldest" extension has no count left.
EXPECTED_KEPT = {
    date(2026, 3, 1): ["daily 1/7", "weekly 1/4", "monthly 1/3", "newest"],
    date(2026, 2, 28): ["daily 2/7", "monthly 2/3"],
    **{date(2026, 2, d): [f"daily {30 - d}/7"] for d in range(23, 28)},
    date(2026, 2, 22): ["weekly 2/4"],
    date(2026, 2, 15): ["weekly 3/4"],
    date(2026, 2, 8): ["weekly 4/4"],
    date(2026, 1, 31): ["monthly 3/3"],
}


def test_default_policy_over_sixty_days_keeps_exactly_the_expected_backups() -> None:
    storage = MemoryStorage()
    backups = sixty_days(storage)
    # A first prune of a long history removes most of it: that takes --force.
    report = run(storage, force=True)
    plan = report.databases["app"]
    assert {d.id: list(d.reasons) for d in plan.keep} == {
        backups[day].id: why for day, why in EXPECTED_KEPT.items()
    }
    assert [d.id for d in plan.keep] == [backups[day].id for day in sorted(EXPECTED_KEPT,
                                                                          reverse=True)]
    removed = [m for day, m in backups.items() if day not in EXPECTED_KEPT]
    assert len(removed) == 49
    assert [d.id for d in plan.remove] == [m.id for m in reversed(removed)]
    assert all(d.reasons == () for d in plan.remove)
    # Nothing of a removed backup is left; everything of a kept one is.
    assert [m.id for m in Catalog(storage).list()] == [backups[d].id for d in sorted(
        EXPECTED_KEPT)]
    for m in removed:
        assert not keys(storage, f"backups/app/{m.id}/")
    for day in EXPECTED_KEPT:
        assert keys(storage, f"backups/app/{backups[day].id}/") == {
            a.key for a in backups[day].artifacts}
    assert report.orphans == [] and report.skipped == {}


def test_pinned_backup_survives_until_unpinned() -> None:
    storage = MemoryStorage()
    backups = sixty_days(storage)
    old = backups[date(2026, 1, 5)]
    pinned = pin(storage, old.id[:15], reason="  before migration 42 ", now=at("2026-03-02T00:00"))
    assert pinned.pin == Pin(reason="before migration 42", at=at("2026-03-02T00:00"))
    report = run(storage, force=True)
    kept = {d.id: d.reasons for d in report.databases["app"].keep}
    assert kept[old.id] == ("pinned",)
    assert Catalog(storage).get(old.id).pin == pinned.pin
    assert roles(Catalog(storage).list(), DEFAULT)[old.id] == "pinned"

    unpinned, was = unpin(storage, old.id)
    assert was == pinned.pin and unpinned.pin is None
    assert unpin(storage, old.id)[1] is None  # unpinning twice is harmless
    report = run(storage)
    assert [d.id for d in report.databases["app"].remove] == [old.id]
    with pytest.raises(UsageError, match="reason"):
        pin(storage, "latest", reason=" ", now=at("2026-03-02T00:00"))


def test_a_pin_written_after_planning_wins_over_the_plan() -> None:
    """A user pins a backup while prune runs: prune re-reads each manifest before deleting."""

    class PinDuringPrune(MemoryStorage):
        target = ""
        reads = 0

        def read_bytes(self, key: str) -> bytes:
            if key.endswith(f"/{self.target}.json"):
                self.reads += 1
                if self.reads == 2:  # the first read planned; pin before the second
                    manifest = from_json(Manifest, super().read_bytes(key))
                    Catalog(self).update(msgspec.structs.replace(
                        manifest, pin=Pin(reason="late", at=at("2026-03-02T00:00"))))
            return super().read_bytes(key)

    storage = PinDuringPrune()
    backups = sixty_days(storage)
    storage.target = backups[date(2026, 1, 5)].id
    report = run(storage, force=True)
    plan = report.databases["app"]
    assert storage.target in {d.id for d in plan.keep}
    assert storage.target not in {d.id for d in plan.remove}
    assert len(plan.remove) == 48
    assert Catalog(storage).get(storage.target).pinned


def test_manifest_is_deleted_before_data_and_a_later_prune_finishes() -> None:
    class DataDeleteFails(MemoryStorage):
        def __init__(self) -> None:
            super().__init__()
            self.fail = True
            self.deleted: list[str] = []

        def delete(self, keys: Iterable[str]) -> None:
            keys = list(keys)
            if self.fail and any(k.startswith("backups/") for k in keys):
                raise StorageError("simulated: permission denied deleting data")
            self.deleted.extend(keys)
            super().delete(keys)

    storage = DataDeleteFails()
    first = fabricate(storage, at("2026-01-01T01:00"))
    second = fabricate(storage, at("2026-01-02T01:00"))
    newest = fabricate(storage, at("2026-01-03T01:00"))
    policy = Policy(daily=1, weekly=0, monthly=0)
    with pytest.raises(StorageError, match="simulated"):
        run(storage, policy, force=True)
    # Removal runs newest first: the manifest of Jan 2 went, then deleting its data failed.
    assert storage.deleted[0] == f"manifests/app/{second.id}.json"
    assert not any(k.startswith("backups/") for k in storage.deleted)
    # So it is no longer a backup at all, and its data is an orphan ...
    assert second.id not in {m.id for m in Catalog(storage).list()}
    assert keys(storage, f"backups/app/{second.id}/") == {a.key for a in second.artifacts}
    # ... that a later prune collects once the safety delay has passed.
    storage.fail = False
    report = run(storage, policy)
    assert [d.id for d in report.databases["app"].remove] == [first.id]
    assert report.orphans_left == sorted(a.key for a in second.artifacts)
    report = run(storage, policy, now=datetime.now(UTC) + timedelta(days=2))
    assert report.orphans == sorted(a.key for a in second.artifacts)
    assert [m.id for m in Catalog(storage).list()] == [newest.id]
    assert keys(storage, "backups/") == {a.key for a in newest.artifacts}


class AgedStorage(MemoryStorage):
    """MemoryStorage whose objects can be backdated, as if written long ago."""

    def __init__(self) -> None:
        super().__init__()
        self.age: dict[str, timedelta] = {}

    def _aged(self, info: ObjectInfo) -> ObjectInfo:
        return ObjectInfo(info.key, info.size, info.modified - self.age.get(info.key, timedelta()))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return iter([self._aged(info) for info in super().list(prefix)])

    def stat(self, key: str) -> ObjectInfo:
        return self._aged(super().stat(key))


def test_orphans_are_removed_only_when_old_by_both_the_id_and_the_files() -> None:
    storage = AgedStorage()
    now = datetime.now(UTC)
    committed = fabricate(storage, now - timedelta(days=3))

    def orphan(backup_id: str, written_ago: timedelta) -> str:
        key = artifact_key("app", backup_id, "db.dump.zst")
        storage.put_bytes(key, b"partial")
        storage.age[key] = written_ago
        return key

    fresh = orphan(new_backup_id(now - timedelta(hours=1)), timedelta())
    # A backup running for 3 days on another host: old id, data still being written.
    running = orphan(new_backup_id(now - timedelta(days=3)), timedelta())
    # A clock-skewed writer: recent id, but the store dates the data long ago.
    skewed = orphan(new_backup_id(now - timedelta(hours=1)), timedelta(days=2))
    foreign = orphan("not-a-pgvault-id", timedelta(days=30))
    old = orphan(new_backup_id(now - timedelta(days=3)), timedelta(days=2))
    old_second = artifact_key("app", old.split("/")[2], "globals.sql.zst")
    storage.put_bytes(old_second, b"partial")
    storage.age[old_second] = timedelta(hours=23)  # one young file keeps the whole backup
    report = run(storage, now=now)
    assert report.orphans == []
    storage.age[old_second] = timedelta(hours=25)
    report = run(storage, now=now)
    assert report.orphans == sorted([old, old_second])
    assert sorted(report.orphans_left) == sorted([fresh, running, skewed, foreign])
    assert keys(storage, "backups/") == {fresh, running, skewed, foreign} | {
        a.key for a in committed.artifacts}
    # The delay is a parameter; the committed backup's data is never an orphan.
    report = run(storage, now=datetime.now(UTC), orphan_delay=timedelta(minutes=0))
    assert sorted(report.orphans) == sorted([fresh, running, skewed])
    assert keys(storage, "backups/") == {foreign} | {a.key for a in committed.artifacts}


def test_orphans_of_a_database_without_any_manifest_are_collected() -> None:
    storage = MemoryStorage()
    key = artifact_key("gone db", new_backup_id(at("2026-01-01T00:00")), "db.dump.zst")
    storage.put_bytes(key, b"x")
    report = run(storage, now=datetime.now(UTC) + timedelta(days=2))
    assert report.to_json() == {
        "databases": {"gone db": {"keep": [], "remove": []}}, "orphans": [key]}
    assert keys(storage) == set()


def test_a_held_lock_skips_that_database_and_prunes_the_others() -> None:
    storage = MemoryStorage()
    sixty_days(storage, "app")
    sixty_days(storage, "billing")
    before = keys(storage, "backups/app/") | keys(storage, "manifests/app/")
    with hold(storage, lock_key("app"), "backup", stale_after=STALE, name="app"):
        report = run(storage, force=True)
        assert "app" in report.skipped and "locked by backup" in report.skipped["app"]
        assert "app" not in report.databases
        assert len(report.databases["billing"].remove) == 49
        assert keys(storage, "backups/app/") | keys(storage, "manifests/app/") == before
        # A dry run changes nothing, so it needs no lock and still shows the plan.
        dry = run(storage, dry_run=True, force=True)
        assert len(dry.databases["app"].remove) == 49 and dry.skipped == {}
        assert "skipped (locked): app" in report.summary()
    assert len(run(storage, force=True).databases["app"].remove) == 49
    assert keys(storage, "locks/") == set()  # prune releases its lock


def test_dry_run_deletes_nothing_and_reports_what_prune_would_do() -> None:
    storage = MemoryStorage()
    sixty_days(storage)
    storage.put_bytes(artifact_key("app", new_backup_id(at("2026-01-01T00:00")), "db.dump"), b"")
    before = {info.key: info for info in storage.list("")}
    later = datetime.now(UTC) + timedelta(days=2)
    dry = run(storage, dry_run=True, now=later, force=True)
    assert {info.key: info for info in storage.list("")} == before
    real = run(storage, now=later, force=True)
    assert dry.to_json() == real.to_json()
    assert "would be removed" in dry.summary() and len(dry.orphans) == 1


def test_prune_twice_removes_nothing_more() -> None:
    storage = MemoryStorage()
    sixty_days(storage)
    first = run(storage, now=datetime.now(UTC) + timedelta(days=2), force=True)
    after_first = keys(storage)
    second = run(storage, now=datetime.now(UTC) + timedelta(days=2))
    assert keys(storage) == after_first
    assert second.to_json()["databases"]["app"]["remove"] == []
    assert second.to_json()["databases"]["app"]["keep"] == (
        first.to_json()["databases"]["app"]["keep"])
    assert second.orphans == []


def test_json_shape_is_exact() -> None:
    storage = MemoryStorage()
    a = fabricate(storage, at("2026-03-01T01:00"))
    b = fabricate(storage, at("2026-03-02T01:00"))
    c = fabricate(storage, at("2026-03-02T05:30"), pinned=True)
    d = fabricate(storage, at("2026-03-03T01:00"), database="billing")
    orphan = artifact_key("app", new_backup_id(at("2026-02-01T00:00")), "db.dump.zst")
    storage.put_bytes(orphan, b"")
    report = run(storage, Policy(daily=1, weekly=0, monthly=0),
                 now=datetime.now(UTC) + timedelta(days=2), force=True)
    document = report.to_json()
    assert document == {
        "databases": {
            "app": {
                "keep": [{"id": c.id, "time": "2026-03-02T05:30:00+00:00",
                          "reasons": ["daily 1/1", "newest", "pinned"]}],
                "remove": [
                    {"id": b.id, "time": "2026-03-02T01:00:00+00:00", "reasons": [],
                     "because": "no rule keeps it"},
                    {"id": a.id, "time": "2026-03-01T01:00:00+00:00", "reasons": [],
                     "because": "no rule keeps it"},
                ],
            },
            "billing": {
                "keep": [{"id": d.id, "time": "2026-03-03T01:00:00+00:00",
                          "reasons": ["daily 1/1", "newest"]}],
                "remove": [],
            },
        },
        "orphans": [orphan],
    }
    assert json.loads(json.dumps(document)) == document


def test_roles_name_the_rules_that_keep_each_backup() -> None:
    storage = MemoryStorage()
    backups = sixty_days(storage)
    found = roles(Catalog(storage).list(), DEFAULT)
    assert found[backups[date(2026, 3, 1)].id] == "daily,weekly,monthly,newest"
    assert found[backups[date(2026, 2, 28)].id] == "daily,monthly"
    assert found[backups[date(2026, 2, 22)].id] == "weekly"
    assert found[backups[date(2026, 1, 1)].id] == "—"
    assert sum(role == "—" for role in found.values()) == 49


def test_prune_after_backup_touches_only_that_database() -> None:
    storage = MemoryStorage()
    sixty_days(storage, "app")
    sixty_days(storage, "billing")
    # Never forced: the first mass removal waits for an operator's prune --force.
    with pytest.raises(UsageError, match=r"prune of app refused: it would remove 49 of 60 "
                       r"backups \(more than half\).*prune --force"):
        prune_after_backup(storage, DEFAULT, database="app", lock_stale_after=STALE)
    assert len(Catalog(storage).list("app")) == 60
    prune(storage, DEFAULT, dry_run=False, now=datetime.now(UTC), lock_stale_after=STALE,
          database="app", force=True)
    fabricate(storage, at("2026-03-02T01:00"), "app")
    report = prune_after_backup(storage, DEFAULT, database="app", lock_stale_after=STALE)
    assert list(report.databases) == ["app"] and not report.dry_run
    # Monday Mar 2 opens ISO week 10: Feb 23 leaves the daily rule, Feb 8 the weekly one.
    assert len(Catalog(storage).list("app")) == 10
    assert len(Catalog(storage).list("billing")) == 60
    assert report.summary() == "pruned app: 2 backups removed, 10 kept, 0 orphaned objects removed"


def test_backup_id_time_reads_the_id_new_backup_id_wrote() -> None:
    moment = datetime(2026, 11, 25, 9, 1, 2, 345678, tzinfo=UTC)
    assert backup_id_time(new_backup_id(moment)) == moment.replace(microsecond=345000)
    assert backup_id_time("latest") is None
    assert backup_id_time("20261399T250000.000Z-abcdef") is None


# -- end to end: real backups, the real CLI, every survivor restored and compared ---------

# Faked backup times, oldest first. With keep_daily=1, keep_weekly=0, keep_monthly=2 the plan
# keeps #4 (daily, monthly March, newest) and #2 (monthly February); #0 survives by its pin.
FAKED_TIMES = ["2026-01-10T01:00", "2026-02-10T01:00", "2026-02-20T01:00",
               "2026-03-01T01:00", "2026-03-01T05:00"]
KEPT = {4: "daily 1/1, monthly 1/2, newest", 2: "monthly 2/2", 0: "pinned"}
RETENTION_ENV = {"PGVAULT_RETENTION__KEEP_DAILY": "1", "PGVAULT_RETENTION__KEEP_WEEKLY": "0",
                 "PGVAULT_RETENTION__KEEP_MONTHLY": "2"}


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_prune_through_the_cli_then_every_survivor_restores(
    backend: str, request: pytest.FixtureRequest, pg_cluster: EphemeralCluster,
    make_db: MakeDb, target_names: list[str], tmp_path: Path,
) -> None:
    if backend == "s3":
        server = request.getfixturevalue("s3_server")
        repo = f"s3://{request.getfixturevalue('s3_bucket')}/team/app"
        env = {"PGVAULT_S3__ENDPOINT_URL": server, "PGVAULT_S3__PATH_STYLE": "true"}
        storage = open_storage(repo, request.getfixturevalue("s3_options"))
    else:
        repo = f"file://{tmp_path / 'repo'}"
        env = {}
        storage = open_storage(repo)
    env |= {"PGVAULT_REPO": repo, **RETENTION_ENV}
    source = make_db(prefix="prune_src")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE events (id serial PRIMARY KEY, generation int, note text)")

    # Five real backups of a database that changes between them; a frozen copy of each
    # state (CREATE DATABASE ... TEMPLATE) is what that backup must restore to.
    states: list[str] = []
    for generation in range(5):
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("INSERT INTO events (generation, note) SELECT %s, md5(g::text) "
                         "FROM generate_series(1, 200 * (%s + 1)) g", (generation, generation))
            conn.execute("DELETE FROM events WHERE id %% 7 = %s", (generation,))
        pgvault("backup", "--dbname", source, "--no-globals", env=env)
        states.append(make_db(source, prefix=f"prune_state{generation}"))

    # Backups cannot be taken in the past, so their manifests are rewritten with faked
    # started_at/finished_at (the time retention reads); ids and data stay as taken.
    catalog = Catalog(storage)
    ids = [m.id for m in catalog.list()]
    assert len(ids) == 5
    for backup_id, faked in zip(ids, FAKED_TIMES, strict=True):
        manifest = catalog.get(backup_id)
        took = manifest.finished_at - manifest.started_at
        catalog.update(msgspec.structs.replace(manifest, started_at=at(faked),
                                               finished_at=at(faked) + took))

    out = pgvault("pin", ids[0][:20], "--reason", "audit 2026", env=env).stdout
    assert out.startswith(f"pinned {ids[0]} (") and "audit 2026" in out
    before = {info.key for info in storage.list("")}
    dry = json.loads(pgvault("prune", "--dry-run", "--json", env=env).stdout)
    assert {info.key for info in storage.list("")} == before
    (database,) = dry["databases"]
    assert {d["id"]: ", ".join(d["reasons"]) for d in dry["databases"][database]["keep"]} == {
        ids[i]: why for i, why in KEPT.items()}
    assert [d["id"] for d in dry["databases"][database]["remove"]] == [ids[3], ids[1]]

    text = pgvault("prune", env=env).stdout
    assert "Keeps the newest backup of each of the last 1 day and 2 months" in text
    assert f"{database}: 3 kept, 2 removed" in text
    lines = {line.split()[1]: line.split()[0] for line in text.splitlines()
             if line.startswith("  ")}
    assert lines == {ids[0]: "KEEP", ids[1]: "REMOVE", ids[2]: "KEEP", ids[3]: "REMOVE",
                     ids[4]: "KEEP"}
    assert re.search(rf"^  KEEP +{ids[4]} +2026-03-01 05:00 +daily 1/1, monthly 1/2, newest$",
                     text, re.M)
    assert re.search(rf"^  REMOVE +{ids[3]} +2026-03-01 01:00  no rule keeps it$", text, re.M)
    survivors = [m["id"] for m in json.loads(pgvault("list", "--json", env=env).stdout)]
    assert survivors == [ids[0], ids[2], ids[4]]
    remaining = {info.key.split("/")[2] for info in storage.list("backups/")}
    assert remaining == set(survivors)
    assert not list(storage.list("locks/"))
    again = json.loads(pgvault("prune", "--json", env=env).stdout)
    assert again["databases"][database]["remove"] == [] and again["orphans"] == []

    for index in (0, 2, 4):
        target = f"prune_restored_{uuid.uuid4().hex[:10]}"
        target_names.append(target)
        pgvault("restore", ids[index], "--to", target, "--dbname", pg_cluster.url(), env=env)
        assert_databases_equal(states[index], pg_cluster.url(target))

    unpinned = pgvault("unpin", ids[0], env=env).stdout
    assert unpinned.startswith(f"unpinned {ids[0]}") and "audit 2026" in unpinned
    assert "REMOVE" in pgvault("prune", "--dry-run", env=env).stdout


def test_prune_cli_exits_7_when_a_database_is_locked(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    storage = open_storage(f"file://{repo}")
    for day in ("2026-01-01", "2026-01-02"):
        fabricate(storage, at(f"{day}T01:00"))
    storage.put_bytes("locks/app.lock", json.dumps({
        "host": "elsewhere", "pid": 1, "operation": "backup",
        "since": datetime.now(UTC).isoformat()}).encode())
    env = {"PGVAULT_REPO": f"file://{repo}", "PGVAULT_RETENTION__KEEP_LAST": "1",
           "PGVAULT_RETENTION__KEEP_DAILY": "0", "PGVAULT_RETENTION__KEEP_WEEKLY": "0",
           "PGVAULT_RETENTION__KEEP_MONTHLY": "0"}
    proc = pgvault("prune", env=env, expect=7)
    assert "pgvault: skipped app: database 'app' is locked by backup" in proc.stderr
    assert proc.stderr.rstrip().endswith("1 database(s) not pruned: locked; run again later")
    assert len(Catalog(storage).list()) == 2
    help_text = pgvault("prune", "--help").stdout
    assert "keep_within" in help_text and "pgvault prune --dry-run" in help_text
