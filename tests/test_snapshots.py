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
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from cli_runner import pgvault
from dbcompare import assert_databases_equal
from fixtures_kill import has_child, kill_when, start
from http_recorder import Recorder
from pgvault import retention
from pgvault.catalog import Catalog
from pgvault.engines.rds import RdsProvider
from pgvault.engines.snapshots import (
    TAG_BACKUP_ID,
    TAG_DATABASE,
    TAG_MANAGED,
    DrillPlacement,
    ProviderSnapshot,
    snapshot_name,
    wait_available,
)
from pgvault.errors import NotFound, SnapshotFailed
from pgvault.health import AutomatedBackups
from pgvault.model import Manifest, SnapshotFacts, from_json, to_json
from pgvault.ops.snapshot import (
    CopyTarget,
    DrillOptions,
    SnapshotOptions,
    drill_snapshot,
    prune_snapshots,
    snapshot_run,
    take_snapshot,
    wait_copy_slot,
)
from pgvault.ops.verify import VerifyOptions
from pgvault.pg.cluster import EphemeralCluster
from pgvault.pg.conninfo import ConnInfo
from pgvault.retention import Policy
from pgvault.storage import open_storage
from pgvault.storage.memory import MemoryStorage
from test_monitoring import metrics_of

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


def test_sixty_days_keep_exactly_the_gfs_set_under_a_quota_of_15(
        rds_instance: RdsSource, tmp_path: Path, pg_cluster: EphemeralCluster) -> None:
    """60 daily runs (ops.snapshot.snapshot_run, as `pgvault snapshot --prune` runs it)
    with a fake clock: each day a snapshot at home and a copy into a second region, each
    region pruned by its own policy. After every day, pgvault's snapshots in each region
    are exactly what retention.plan keeps of every snapshot taken there so far; neither
    region ever holds more than 15; the others' snapshots are untouched. On day 30 a drill
    dies midway (its instance left tagged with a dead owner): the next day's run leaves
    nothing of it. On day 45 a drill restores the newest snapshot and is timed (moto's
    endpoint is fake: the readiness query goes to the local test cluster)."""
    foreign = ["by-hand", "aws-backup-weekly"]
    rds_instance.foreign_snapshot(foreign[0])
    rds_instance.foreign_snapshot(foreign[1], {"aws:backup:source-resource": "x"})
    # Tagged as pgvault's, but for another database: never this database's to prune.
    other = "pgvault-other-database"
    rds_instance.foreign_snapshot(other, {TAG_MANAGED: "true", TAG_DATABASE: "other",
                                          TAG_BACKUP_ID: "20250101T010000.000Z-abcdef"})
    region, client, key = rds_instance.other_region()
    catalog = Catalog(MemoryStorage())  # 60 days of fsyncs would double the test's time
    provider = RdsProvider("rds", rds_instance.source_id, region=rds_instance.region,
                           endpoint_url=rds_instance.endpoint_url)
    away = RdsProvider("rds", rds_instance.source_id, region=region,
                       endpoint_url=rds_instance.endpoint_url)
    policy = Policy(daily=7, weekly=4, monthly=2)
    away_policy = Policy(daily=3, weekly=2, monthly=1)
    target = CopyTarget(away, key, away_policy)
    options = SnapshotOptions(quota=15, poll=0.01)

    def away_snapshots() -> list[dict[str, object]]:
        found: list[dict[str, object]] = client.describe_db_snapshots(
            SnapshotType="manual")["DBSnapshots"]
        return found

    taken: list[Manifest] = []
    copied: list[Manifest] = []
    most = {rds_instance.region: 0, region: 0}
    drill_seconds = None
    start = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    for day in range(60):
        now = start + timedelta(days=day)
        run = snapshot_run(provider, catalog, "app", options, copies=(target,),
                           policy=policy, clock=lambda n=now: n)
        assert not run.copy_errors and all(not p.errors and p.refused is None
                                           for p in run.prunes)
        taken.append(run.manifest)
        copied += run.copies
        home, there = rds_instance.snapshots(), away_snapshots()
        # Before the prune each region held one more: the one just taken (or copied).
        most[rds_instance.region] = max(most[rds_instance.region],
                                        len(home) + len(run.prunes[0].remove))
        most[region] = max(most[region], len(there) + len(run.prunes[1].remove))
        for snapshots, made, rule in ((home, taken, policy), (there, copied, away_policy)):
            expected = set(retention.plan(made, rule, now).keep)
            ours = {tags_of(s)[TAG_BACKUP_ID] for s in snapshots  # type: ignore[arg-type]
                    if tags_of(s).get(TAG_DATABASE) == "app"}  # type: ignore[arg-type]
            assert ours == expected, f"day {day}"
        assert {m.id for m in catalog.list("app")} == (
            set(retention.plan(taken, policy, now).keep)
            | set(retention.plan(copied, away_policy, now).keep)), f"day {day}"
        if day == 30:  # a drill that dies: its instance stays, tagged with a dead owner
            dead = subprocess.run([sys.executable, "-c", "from pgvault import leftovers; "
                                   "print(leftovers.me().token())"], check=True,
                                  capture_output=True, text=True).stdout.strip()
            provider.restore_drill(run.manifest.snapshot.snapshot_id,  # type: ignore[union-attr]
                                   "pgvault-drill-killed", {
                                       TAG_MANAGED: "true", "pgvault:drill": dead,
                                       "pgvault:drill-started": now.isoformat()},
                                   DrillPlacement())
            assert len(rds_instance.drills()) == 1
        if day == 31:
            assert run.swept == ["pgvault-drill-killed"] and rds_instance.drills() == []
        if day == 45:
            report = drill_snapshot(provider, catalog.storage, run.manifest, DrillOptions(
                verify=VerifyOptions(level="restore", record=False),
                connect=lambda _: ConnInfo.parse(pg_cluster.url()), poll=0.01))
            assert report.passed, report.checks
            drill_seconds = report.restore_seconds
            assert rds_instance.drills() == []
    assert max(most.values()) <= 15
    names = {s["DBSnapshotIdentifier"] for s in rds_instance.snapshots()}
    assert set(foreign) | {other} <= names
    end = start + timedelta(days=59)
    kept = {rds_instance.region: len(retention.plan(taken, policy, end).keep),
            region: len(retention.plan(copied, away_policy, end).keep)}
    assert kept[rds_instance.region] == len(names) - 3 and kept[region] == len(away_snapshots())
    print(f"60 days: kept {kept} of 60 taken per region, at most {most} in each region "
          f"(quota 15); a killed drill's instance removed the next day; drill {drill_seconds} s"
          " to a queryable copy")


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


# -- runs as jobs, drills, copies ----------------------------------------------------------


def drill_config(tmp_path: Path, source: RdsSource, url: str, copy_url: str,
                 hook: str, prom: Path, server: str, **snapshot: object) -> str:
    """A config whose database is a local PostgreSQL (facts at snapshot time come from it)
    and whose drills' checks reach ``copy_url`` through the test-only override."""
    subnet_group, group = source.network()
    path = tmp_path / "pgvault.toml"
    path.write_text(
        f'repo = "{(tmp_path / "repo").as_uri()}"\ndatabase = "{url}"\n'
        f'[notify]\nwebhook_url = "{hook}"\nevents = ["all"]\n'
        f'[metrics]\ntextfile = "{prom}"\n'
        f'[verify]\nserver = "{server}"\nlevel = "command"\n'
        'command = "test \\"$(psql -Atc \'SELECT count(*) FROM t\')\\" = 500"\n'
        '[[verify.sql]]\nname = "t has rows"\nquery = "SELECT count(*) > 0 FROM t"\n'
        + source.toml(drill_connect_override=copy_url, drill_subnet_group=subnet_group,
                      drill_security_groups=[group], **snapshot))
    return str(path)


def test_snapshot_runs_as_a_job_and_its_drill_checks_a_temporary_instance(
        rds_source: RdsSource, tmp_path: Path, make_db: object, new_name: object,
        pg_cluster: EphemeralCluster, recorder: Recorder) -> None:
    """`pgvault snapshot` through jobs.run (events, history, metrics), then `pgvault verify`
    on the snapshot: moto restores a temporary instance (or cluster) with the configured
    network, tags and no public access; its endpoint is fake, so the drill's checks (facts
    recorded from the source at snapshot time, [[verify.sql]], the command) run against a
    throwaway copy of the source on the local test cluster, named by [snapshot]
    drill_connect_override (the documented test-only seam). The instance is deleted after
    a passing and after a failing drill."""
    url = make_db(prefix="snapdrill")  # type: ignore[operator]
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    copy = new_name()  # type: ignore[operator]
    prom = tmp_path / "pgvault.prom"
    config = drill_config(tmp_path, rds_source, url, pg_cluster.url(copy),
                          f"{recorder.url}/hook", prom, pg_cluster.url())
    done = pgvault("snapshot", "--config", config)
    assert done.stdout.startswith("snapshot "), done.stdout
    events = [r.json() for r in recorder.wait_for("/hook", 2)]
    assert [e["event"] for e in events] == ["snapshot.started", "snapshot.succeeded"]
    [manifest] = json.loads(pgvault("list", "--config", config, "--json").stdout)
    assert manifest["kind"] == "snapshot"
    history = json.loads((tmp_path / "repo" / "status" / Path(url).name
                          / "snapshot.json").read_text())
    assert history["last_success"]["backup_id"] == manifest["id"]
    labels = (("database", Path(url).name),)
    assert metrics_of(prom)[("pgvault_snapshots", labels)] == 1

    # What the provider would restore: the source as it was at the snapshot.
    with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{Path(url).name}"')
    verified = pgvault("verify", manifest["id"], "--config", config)
    text = verified.stdout
    assert "PASSED command drill of " + manifest["id"] in text, text
    for needle in ("PASS  integrity  snapshot", "PASS  restore    restore", "rows",
                   "PASS  assertions sql t has rows", "PASS  command    command",
                   "PASS  restore    cleanup"):
        assert needle in text, (needle, text)
    assert rds_source.drills() == []
    assert rds_source.instances() == [rds_source.source_id] if rds_source.kind == "rds" \
        else rds_source.instances() == []
    events = [r.json() for r in recorder.wait_for("/hook", 3)]
    assert events[-1]["event"] == "verify.succeeded"

    [status] = json.loads(pgvault("status", "--config", config, "--json").stdout)
    drill = status["snapshot_last_drill"]
    assert drill["passed"] and drill["rto_met"] and drill["restore_seconds"] < 30
    assert status["snapshot_rpo_met"] is True and status["last_drill"] is None
    # The logical path beside it: a backup, drilled on the test cluster.
    pgvault("backup", "--config", config)
    pgvault("verify", "latest", "--config", config)
    text = pgvault("status", "--config", config).stdout
    [logical, snap] = [line for line in text.splitlines() if line.startswith("    ")]
    assert logical.startswith("    logical   ") and "RPO met; last drill PASSED, restore " \
        in logical and logical.endswith("RTO met"), text
    assert snap.startswith(f"    snapshot  {manifest['id']}, ") and \
        "RPO met; last drill PASSED, to queryable " in snap and snap.endswith("RTO met"), text
    assert metrics_of(prom)[("pgvault_snapshot_restore_last_duration_seconds", labels)] == \
        drill["restore_seconds"]
    print(f"snapshot drill ({rds_source.kind}): {drill['restore_seconds']} s to a queryable "
          "copy (moto + local PostgreSQL)")

    # A copy that lost rows fails on the facts, names the table, and still goes away.
    with psycopg.connect(pg_cluster.url(copy)) as conn:
        conn.execute("DELETE FROM t WHERE id > 400")
    failed = pgvault("verify", manifest["id"], "--config", config, expect=10)
    assert "FAIL  facts" in failed.stdout and "t" in failed.stdout, failed.stdout
    assert "PASS  restore    cleanup" in failed.stdout
    assert rds_source.drills() == []
    check = pgvault("check", "--config", config, expect=2)
    assert "last snapshot drill failed" in check.stdout, check.stdout


def test_a_failed_snapshot_run_is_recorded_and_announced(rds_instance: RdsSource,
                                                         tmp_path: Path,
                                                         recorder: Recorder) -> None:
    rds_instance.foreign_snapshot("by-hand")
    path = tmp_path / "pgvault.toml"
    path.write_text(f'repo = "{(tmp_path / "repo").as_uri()}"\ndatabase = "app"\n'
                    f'[notify]\nwebhook_url = "{recorder.url}/hook"\nevents = ["all"]\n'
                    + rds_instance.toml(quota=1))
    refused = pgvault("snapshot", "--config", str(path), expect=14)
    assert "reach the quota of 1" in refused.stderr
    events = [r.json() for r in recorder.wait_for("/hook", 2)]
    assert [e["event"] for e in events] == ["snapshot.started", "snapshot.failed"]
    assert "reach the quota of 1" in events[1]["error"]
    history = json.loads((tmp_path / "repo" / "status" / "app" / "snapshot.json").read_text())
    assert history["failures_total"] == 1 and history["last_success"] is None


def test_a_killed_drill_leaves_a_tagged_instance_the_next_run_deletes(
        rds_instance: RdsSource, tmp_path: Path, make_db: object,
        pg_cluster: EphemeralCluster, recorder: Recorder) -> None:
    """A real `pgvault verify` SIGKILLed while its command runs against the restored copy:
    the temporary instance stays, tagged with the dead owner; the next `pgvault snapshot`
    deletes it (moto's endpoint is fake: the checks go to a local database through the
    test-only drill_connect_override)."""
    url = make_db(prefix="snapkill")  # type: ignore[operator]
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    config = drill_config(tmp_path, rds_instance, url, url, f"{recorder.url}/hook",
                          tmp_path / "p.prom", pg_cluster.url(), facts=False)
    text = Path(config).read_text().replace('command = "test', 'command = "sleep 60; test')
    Path(config).write_text(text)
    pgvault("snapshot", "--config", config)
    [manifest] = json.loads(pgvault("list", "--config", config, "--json").stdout)
    recorded = Catalog(open_storage((tmp_path / "repo").as_uri())).get(manifest["id"])
    assert recorded.facts.tables == []  # [snapshot] facts = false: no rows counted
    proc = start("verify", manifest["id"], "--config", config, env={})
    kill_when(proc, has_child("sleep"))
    [left] = rds_instance.drills()
    assert {t["Key"] for t in left["TagList"]} >= {"pgvault:drill", "pgvault:drill-started",
                                                   TAG_MANAGED, TAG_BACKUP_ID}
    again = pgvault("snapshot", "--config", config)
    assert f"deleted the drill instance {left['DBInstanceIdentifier']}" in again.stderr
    assert rds_instance.drills() == []


def test_copies_go_to_each_region_with_its_key_and_are_pruned_by_its_own_policy(
        rds_instance: RdsSource, tmp_path: Path) -> None:
    region, client, key = rds_instance.other_region()
    path = tmp_path / "pgvault.toml"
    path.write_text(f'repo = "{(tmp_path / "repo").as_uri()}"\ndatabase = "app"\n'
                    + rds_instance.toml()
                    + f'[[snapshot.copies]]\nregion = "{region}"\nkms_key_id = "{key}"\n'
                    'retention = { keep_last = 1, keep_daily = 0, keep_weekly = 0, '
                    'keep_monthly = 0 }\n')
    for _ in range(2):
        out = pgvault("snapshot", "--config", str(path), "--prune").stdout
    assert "copy " in out and f"({region})" in out, out
    [copied] = client.describe_db_snapshots(SnapshotType="manual")["DBSnapshots"]
    assert copied["KmsKeyId"] == key
    tags = tags_of(copied)
    assert tags[TAG_MANAGED] == "true" and tags["pgvault:copy-of"].startswith(
        f"arn:aws:rds:{rds_instance.region}:")
    assert len(rds_instance.snapshots()) == 2  # [retention] keep_daily 7 at home
    listed = json.loads(pgvault("list", "--config", str(path), "--json").stdout)
    assert len(listed) == 3
    catalog = Catalog(open_storage((tmp_path / "repo").as_uri()))
    home = {m.id: m for m in catalog.list("app") if isinstance(m.snapshot, SnapshotFacts)
            and m.snapshot.region == rds_instance.region}
    [copy] = [m for m in catalog.list("app") if isinstance(m.snapshot, SnapshotFacts)
              and m.snapshot.region == region]  # keep_last = 1 there: the older copy went
    assert isinstance(copy.snapshot, SnapshotFacts)
    assert copy.id == tags[TAG_BACKUP_ID] and copy.snapshot.kms_key_id == key
    source = home[copy.snapshot.copy_of or ""]  # the newer of the two at home
    assert copy.started_at == source.started_at == max(m.started_at for m in home.values())
    assert tags["pgvault:copy-of"] == source.snapshot.arn  # type: ignore[union-attr]


class _BusyRegion:
    """A stand-in destination whose copy slots free up one poll at a time (moto's copies
    finish at once, so the wait for a slot needs a provider that reports them running)."""

    kind, region, source_id = "rds", "eu-central-1", "app"

    def __init__(self, busy: list[int]) -> None:
        self.busy = busy

    def in_progress(self) -> int:
        return self.busy.pop(0) if len(self.busy) > 1 else self.busy[0]


def test_copies_wait_for_a_slot_in_the_destination_region() -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    options = SnapshotOptions(poll=10, wait_timeout=60, max_concurrent_copies=5,
                              sleep=sleep, monotonic=lambda: clock[0])
    assert wait_copy_slot(_BusyRegion([5, 6, 5, 4]), options) == 4  # type: ignore[arg-type]
    assert clock[0] == 30
    with pytest.raises(SnapshotFailed) as caught:
        wait_copy_slot(_BusyRegion([5]), options)  # type: ignore[arg-type]
    assert str(caught.value) == (
        "no copy slot in eu-central-1 after 60 s: 5 snapshots are being made there (limit 5,"
        " [snapshot] max_concurrent_copies)")
