"""Provider snapshots (RDS, Aurora) as backups: created tagged, recorded, listed, audited,
pruned by GFS over pgvault's own snapshots only, under the region's quota.

AWS is moto's server mode over HTTP on loopback (tests/fixtures_rds.py). moto makes a
snapshot "available" at once, so the bounded wait's timeout is shown against a stand-in
provider that never finishes. A snapshot restored by moto has a fake endpoint: the
comparison of a restored snapshot with its source is of what the RDS API says about
both (engine, version, storage), not of rows; the rows are compared for the logical
backup taken beside it, restored into the local test cluster.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from cli_runner import pgvault
from dbcompare import assert_databases_equal
from pgvault import retention
from pgvault.catalog import Catalog
from pgvault.engines.rds import RdsProvider
from pgvault.engines.snapshots import (
    TAG_BACKUP_ID,
    TAG_DATABASE,
    TAG_MANAGED,
    ProviderSnapshot,
    snapshot_name,
    wait_available,
)
from pgvault.errors import NotFound, SnapshotFailed
from pgvault.health import AutomatedBackups
from pgvault.model import Manifest, SnapshotFacts, from_json, to_json
from pgvault.ops.snapshot import SnapshotOptions, prune_snapshots, take_snapshot
from pgvault.pg.cluster import EphemeralCluster
from pgvault.retention import Policy
from pgvault.storage import open_storage
from pgvault.storage.memory import MemoryStorage

if TYPE_CHECKING:
    from fixtures_rds import MakeSource, RdsSource

pytest_plugins = ["fixtures_rds"]


def tags_of(snapshot: Mapping[str, object]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in snapshot.get("TagList", [])}  # type: ignore[attr-defined]


def write_config(tmp_path: Path, source: RdsSource, *, database: str = "app",
                 retention_toml: str = "", **snapshot: object) -> str:
    path = tmp_path / "pgvault.toml"
    path.write_text(f'repo = "{(tmp_path / "repo").as_uri()}"\ndatabase = "{database}"\n'
                    + retention_toml + source.toml(**snapshot))
    return str(path)


def test_snapshot_is_tagged_recorded_listed_and_in_status(rds_source: RdsSource,
                                                          tmp_path: Path) -> None:
    config = write_config(tmp_path, rds_source)
    done = pgvault("snapshot", "--config", config)
    assert done.stdout.startswith("snapshot "), done.stdout
    [made] = rds_source.snapshots()
    tags = tags_of(made)
    assert tags[TAG_MANAGED] == "true" and tags[TAG_DATABASE] == "app"
    listed = json.loads(pgvault("list", "--config", config, "--json").stdout)
    assert [(e["id"], e["kind"], e["database"]) for e in listed] == [
        (tags[TAG_BACKUP_ID], "snapshot", "app")]
    manifest = Catalog(open_storage((tmp_path / "repo").as_uri())).get(tags[TAG_BACKUP_ID])
    facts = manifest.snapshot
    assert isinstance(facts, SnapshotFacts)
    id_key = "DBSnapshotIdentifier" if rds_source.kind == "rds" else "DBClusterSnapshotIdentifier"
    assert (facts.provider, facts.region, facts.source_id, facts.snapshot_id,
            facts.engine_version) == (rds_source.kind, rds_source.region,
                                      rds_source.source_id, made[id_key], "15.4")
    assert manifest.artifacts == [] and manifest.finished_at >= manifest.started_at

    text = pgvault("status", "--config", config).stdout
    assert f"snapshots      1, newest {manifest.id}" in text, text
    assert f"automated      {rds_source.kind} {rds_source.source_id}: " in text, text
    assert "kept 7 days (policy 7)" in text, text
    [status] = json.loads(pgvault("status", "--config", config, "--json").stdout)
    assert status["newest_snapshot"]["snapshot_id"] == facts.snapshot_id
    assert status["automated_backups"]["retention_days"] == 7
    assert status["rpo_met"] is True

    # The provider restores a snapshot; pgvault refuses to and says so.
    refused = pgvault("restore", "latest", "--config", config, "--to", "app_copy", expect=5)
    assert "only provider snapshots" in refused.stderr
    # Restored by the provider (moto: metadata only), the copy matches its source.
    client = rds_source.client
    if rds_source.kind == "rds":
        client.restore_db_instance_from_db_snapshot(
            DBInstanceIdentifier=f"{rds_source.source_id}-drill",
            DBSnapshotIdentifier=facts.snapshot_id, DBInstanceClass="db.t3.micro")
        source, copy = (client.describe_db_instances(DBInstanceIdentifier=name)["DBInstances"][0]
                        for name in (rds_source.source_id, f"{rds_source.source_id}-drill"))
        keys: tuple[str, ...] = ("Engine", "EngineVersion", "AllocatedStorage")
    else:
        client.restore_db_cluster_from_snapshot(
            DBClusterIdentifier=f"{rds_source.source_id}-drill",
            SnapshotIdentifier=facts.snapshot_id, Engine="aurora-postgresql")
        source, copy = (client.describe_db_clusters(DBClusterIdentifier=name)["DBClusters"][0]
                        for name in (rds_source.source_id, f"{rds_source.source_id}-drill"))
        keys = ("Engine", "EngineVersion")
    assert {k: copy[k] for k in keys} == {k: source[k] for k in keys}


def test_automated_backups_shorter_than_policy_warn_in_check(make_rds_source: MakeSource,
                                                             tmp_path: Path) -> None:
    source = make_rds_source("rds", retention_days=3)
    config = write_config(tmp_path, source, retention_toml="[retention]\nkeep_daily = 14\n")
    pgvault("snapshot", "--config", config)
    check = pgvault("check", "--config", config, expect=1)
    assert check.stdout.startswith("PGVAULT WARNING"), check.stdout
    assert (f"rds {source.source_id}: automated backups are kept 3 days, shorter than the "
            "14 days the policy asks") in check.stdout
    # A provider that cannot be asked is a warning naming why, never a traceback.
    broken = write_config(tmp_path, source, endpoint_url="http://127.0.0.1:9")
    check = pgvault("check", "--config", broken, expect=1)
    assert "automated backups could not be audited" in check.stdout, check.stdout


def test_quota_refuses_at_the_limit_and_warns_from_80_percent(rds_instance: RdsSource,
                                                              tmp_path: Path) -> None:
    rds_instance.foreign_snapshot("by-hand-1")
    rds_instance.foreign_snapshot("by-hand-2")
    config = write_config(tmp_path, rds_instance, quota=4)
    first = pgvault("snapshot", "--config", config)  # 3 of 4: 75%, no warning
    assert "warning" not in first.stderr
    second = pgvault("snapshot", "--config", config)  # 4 of 4
    assert "pgvault: warning: 4 of 4 manual rds snapshots" in second.stderr, second.stderr
    third = pgvault("snapshot", "--config", config, expect=14)
    assert third.stderr.strip().splitlines()[-1] == (
        f"pgvault: refused: 4 manual rds snapshots in {rds_instance.region} reach the quota "
        "of 4; nothing was created (prune with `pgvault snapshot prune`, delete snapshots "
        "pgvault did not make, or raise [snapshot] quota once AWS has raised it)")
    assert len(rds_instance.snapshots()) == 4
    assert len(json.loads(pgvault("list", "--config", config, "--json").stdout)) == 2


def test_sixty_days_keep_exactly_the_gfs_set_under_a_quota_of_15(rds_instance: RdsSource,
                                                                 tmp_path: Path) -> None:
    """Daily runs with a fake clock (the times the manifests record): after each day's
    snapshot and prune, pgvault's snapshots are exactly what retention.plan keeps of every
    snapshot taken so far; the region never holds more than 15; the others are untouched."""
    foreign = ["by-hand", "aws-backup-weekly"]
    rds_instance.foreign_snapshot(foreign[0])
    rds_instance.foreign_snapshot(foreign[1], {"aws:backup:source-resource": "x"})
    # Tagged as pgvault's, but for another database: never this database's to prune.
    other = "pgvault-other-database"
    rds_instance.foreign_snapshot(other, {TAG_MANAGED: "true", TAG_DATABASE: "other",
                                          TAG_BACKUP_ID: "20250101T010000.000Z-abcdef"})
    catalog = Catalog(MemoryStorage())  # 60 days of fsyncs would double the test's time
    provider = RdsProvider("rds", rds_instance.source_id, region=rds_instance.region,
                           endpoint_url=rds_instance.endpoint_url)
    policy = Policy(daily=7, weekly=4, monthly=2)
    options = SnapshotOptions(quota=15, poll=0.01)
    taken: list[Manifest] = []
    most = 0
    start = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    for day in range(60):
        now = start + timedelta(days=day)
        taken.append(take_snapshot(provider, catalog, "app", options, clock=lambda n=now: n))
        report = prune_snapshots(provider, catalog, "app", policy, now=now)
        assert not report.errors and report.refused is None
        # Before today's prune the region held one more: the one just taken.
        region = rds_instance.snapshots()
        most = max(most, len(region) + len(report.remove))
        expected = set(retention.plan(taken, policy, now).keep)
        ours = {tags_of(s)[TAG_BACKUP_ID] for s in region
                if tags_of(s).get(TAG_DATABASE) == "app"}
        assert ours == expected, f"day {day}"
        assert {m.id for m in catalog.list("app")} == expected, f"day {day}"
    assert most <= 15
    names = {s["DBSnapshotIdentifier"] for s in rds_instance.snapshots()}
    assert set(foreign) | {other} <= names
    final = retention.plan(taken, policy, start + timedelta(days=59))
    print(f"60 days: {len(final.keep)} snapshots kept of 60 taken, at most {most} in the "
          "region (quota 15)")
    assert len(final.keep) == len(names) - 3


def test_prune_deletes_unrecorded_pgvault_snapshots_after_a_day_and_drops_missing_ones(
        rds_instance: RdsSource, tmp_path: Path) -> None:
    catalog = Catalog(open_storage((tmp_path / "repo").as_uri()))
    provider = RdsProvider("rds", rds_instance.source_id, region=rds_instance.region,
                           endpoint_url=rds_instance.endpoint_url)
    now = datetime(2026, 3, 1, 1, 0, tzinfo=UTC)
    kept = take_snapshot(provider, catalog, "app", SnapshotOptions(poll=0.01),
                         clock=lambda: now - timedelta(days=1))
    gone = take_snapshot(provider, catalog, "app", SnapshotOptions(poll=0.01),
                         clock=lambda: now)
    assert isinstance(gone.snapshot, SnapshotFacts)
    provider.delete(gone.snapshot.snapshot_id)  # by hand, behind pgvault's back
    # A snapshot whose wait ran out: tagged, never recorded.
    stray_id = "20260227T010000.000Z-abcdef"
    stray = snapshot_name(rds_instance.source_id, stray_id)
    rds_instance.foreign_snapshot(stray, {TAG_MANAGED: "true", TAG_DATABASE: "app",
                                          TAG_BACKUP_ID: stray_id})
    report = prune_snapshots(provider, catalog, "app", Policy(daily=7), now=now)
    assert [m.id for m, _ in report.keep] == [kept.id]
    assert [m.id for m, _ in report.remove] == [gone.id]
    assert report.orphans == [stray]
    assert [m.id for m in catalog.list("app")] == [kept.id]
    assert provider.describe(stray) is None


def test_logical_backups_and_snapshots_side_by_side(rds_instance: RdsSource, tmp_path: Path,
                                                    make_db: object, new_name: object,
                                                    pg_cluster: EphemeralCluster) -> None:
    url = make_db(prefix="snap")  # type: ignore[operator]
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    config = write_config(tmp_path, rds_instance, database=url)
    pgvault("backup", "--config", config)
    pgvault("snapshot", "--config", config)
    text = pgvault("status", "--config", config).stdout
    assert "newest backup  " in text and "snapshots      1, newest" in text, text
    [status] = json.loads(pgvault("status", "--config", config, "--json").stdout)
    assert status["backups"] == 1 and status["snapshots"] == 1
    # `pgvault prune` plans the repository's own backups; snapshots are snapshot prune's.
    pgvault("prune", "--config", config, "--force")
    assert len(rds_instance.snapshots()) == 1
    assert sorted(e["kind"] for e in json.loads(
        pgvault("list", "--config", config, "--json").stdout)) == ["logical", "snapshot"]
    # 'latest' is the logical backup, the newest pgvault restores.
    target = new_name()  # type: ignore[operator]
    pgvault("restore", "latest", "--config", config, "-d", url, "--to", target)
    assert_databases_equal(url, pg_cluster.url(target))


class _NeverDone:
    """A stand-in provider whose snapshot stays "creating" (moto's are available at once)."""

    kind, region, source_id = "rds", "eu-west-1", "app"

    def describe(self, snapshot_id: str) -> ProviderSnapshot | None:
        return ProviderSnapshot(snapshot_id, "arn", "app", "creating")


def test_the_wait_is_bounded_with_one_clear_line() -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    with pytest.raises(SnapshotFailed) as caught:
        wait_available(_NeverDone(), "pgvault-app-x", timeout=90, poll=15,  # type: ignore[arg-type]
                       sleep=sleep, monotonic=lambda: clock[0])
    assert str(caught.value) == (
        "rds snapshot pgvault-app-x was not available after 90 s (status 'creating'); it is "
        "not recorded, and `pgvault snapshot prune` deletes it once it is a day old "
        "([snapshot] wait_timeout_seconds)")
    assert clock[0] == 90


def test_snapshot_names_are_valid_rds_identifiers() -> None:
    name = snapshot_name("App-Prod", "20260101T010000.000Z-0a1b2c")
    assert name == "pgvault-app-prod-20260101t010000-000z-0a1b2c"
    assert name[0].isalpha() and "--" not in name and not name.endswith("-")


def test_old_manifests_read_and_keep_their_bytes() -> None:
    old = (b'{"format":1,"id":"20260101T010000.000Z-abcdef","kind":"logical",'
           b'"database":"app","started_at":"2026-01-01T01:00:00Z",'
           b'"finished_at":"2026-01-01T01:01:00Z","pgvault_version":"0.1",'
           b'"artifacts":[],"physical":null}')
    manifest = from_json(Manifest, old)
    assert "snapshot" not in json.loads(to_json(manifest))
    assert to_json(from_json(Manifest, to_json(manifest))) == to_json(manifest)


def test_automated_backup_problems() -> None:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    fine = AutomatedBackups("rds", "app", "available", 7, now - timedelta(minutes=5), 7)
    assert fine.problems(now, 24) == []
    stopped = AutomatedBackups("rds", "app", "stopped", 7, now - timedelta(hours=30), 7)
    assert stopped.problems(now, 24) == [
        "rds app: automated backups do not run: the instance is stopped",
        "rds app: automated backups: latest restorable time is 30.0h old (RPO 24h)"]
    assert AutomatedBackups("aurora", "c", "available", 0).problems(now, 24) == [
        "aurora c: automated backups are off (backup retention period 0 days)"]


def test_restore_latest_names_a_snapshot_only_database(tmp_path: Path) -> None:
    storage = open_storage((tmp_path / "repo").as_uri())
    at = datetime(2026, 1, 1, tzinfo=UTC)
    Catalog(storage).commit(Manifest(
        id="20260101T000000.000Z-abcdef", kind="snapshot", database="app", started_at=at,
        finished_at=at, pgvault_version="t", artifacts=[],
        snapshot=SnapshotFacts(provider="rds", region="r", snapshot_id="s", arn="a",
                               source_id="app", engine="postgres", engine_version="15",
                               size_gb=1, encrypted=False)))
    with pytest.raises(NotFound, match="only provider snapshots"):
        Catalog(storage).latest("app")


def test_databases_entries_name_their_own_snapshot_source(rds_instance: RdsSource,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "pgvault.toml"
    path.write_text(f'repo = "{(tmp_path / "repo").as_uri()}"\n'
                    '[[databases]]\nname = "app"\n'
                    + rds_instance.toml("[databases.snapshot]")
                    + '[[databases]]\nname = "other"\n')
    pgvault("snapshot", "--config", str(path), "-d", "app")
    [made] = rds_instance.snapshots()
    assert tags_of(made)[TAG_DATABASE] == "app"
    refused = pgvault("snapshot", "--config", str(path), "-d", "other", expect=3)
    assert refused.stderr.strip() == ("pgvault: no [snapshot] section configured for "
                                      "database 'other': see pgvault snapshot --help")
    dry = pgvault("snapshot", "prune", "--config", str(path), "--dry-run").stdout
    assert dry.startswith("snapshots of app (rds instance "), dry
