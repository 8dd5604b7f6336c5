"""3-2-1 copies (`pgvault copy`): killed copies finish exactly, restores from a copy, per-repo
retention, and the copy lag in status/check. Real parts: PostgreSQL clusters, moto's S3
server over HTTP, real `pgvault` processes killed with SIGKILL."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess as sp
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

from cli_runner import PGVAULT, clean_env, pgvault
from dbcompare import assert_databases_equal
from pgvault.catalog import Catalog
from pgvault.config import load as config_load
from pgvault.model import new_backup_id
from pgvault.pg.cluster import EphemeralCluster
from pgvault.retention import Candidate
from pgvault.storage import open_storage
from pgvault.storage.base import Storage
from pgvault.storage.s3 import S3Options
from test_prune import at, fabricate

MakeDb = Callable[..., str]


def write_config(path: Path, repos: list[dict[str, object]], extra: str = "") -> Path:
    """A config file with these [[repos]] (inline tables as TOML text)."""
    lines = [extra]
    for repo in repos:
        lines.append("[[repos]]")
        for key, value in repo.items():
            inline = isinstance(value, str) and value.startswith("{")
            lines.append(f"{key} = {value if inline else json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def snapshot(storage: Storage) -> dict[str, bytes]:
    """Every manifest and data object of a repository, by key, with its bytes."""
    return {info.key: storage.read_bytes(info.key)
            for prefix in ("manifests/", "backups/") for info in storage.list(prefix)}


def assert_consistent(target: Storage, source: Storage) -> None:
    """What a copy (killed or not) may leave: only the source's manifests, each complete
    with the source's bytes, and otherwise only data objects equal to the source's."""
    src = snapshot(source)
    for key, data in snapshot(target).items():
        assert src.get(key) == data, f"{key} differs from the source's"
    for manifest in Catalog(target).list():
        for artifact in manifest.artifacts:
            assert target.stat(artifact.key).size == artifact.size


def fill(url: str, rows: int, generation: int) -> None:
    """Rows that compress poorly (hex digests), so a copy takes long enough to be killed."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS blob (id serial PRIMARY KEY, g int, data text)")
        conn.execute("INSERT INTO blob (g, data) SELECT %s, string_agg(md5(random()::text || "
                     "i::text), '') FROM generate_series(1, %s) g, generate_series(1, 8) i "
                     "GROUP BY g", (generation, rows))


def test_a_copy_killed_anywhere_is_invisible_and_the_rerun_finishes_without_resending(
    make_db: MakeDb, pg_cluster: EphemeralCluster, s3_server: str, s3_bucket: str,
    s3_options: S3Options, tmp_path: Path, target_names: list[str],
) -> None:
    primary = f"file://{tmp_path / 'primary'}"
    config = write_config(tmp_path / "pgvault.toml", [
        {"name": "main", "url": primary, "primary": True},
        # keep_last: every backup of the source is one the copy keeps (same-day backups
        # would otherwise be one daily slot).
        {"name": "offsite", "url": f"s3://{s3_bucket}/app", "retention": "{ keep_last = 10 }"},
    ], f'[s3]\nendpoint_url = "{s3_server}"\npath_style = true\n')
    env = {"PGVAULT_CONFIG": str(config)}
    source = make_db(prefix="copy_src")
    states = []
    for generation in range(3):
        fill(source, 6000, generation)
        pgvault("backup", "--dbname", source, env=env)
        states.append(make_db(source, prefix=f"copy_state{generation}"))
    src = open_storage(primary)
    dst = open_storage(f"s3://{s3_bucket}/app", s3_options)
    objects = [a.key for m in Catalog(src).list() for a in m.artifacts]
    assert len(objects) == 6

    # SIGKILL a real copy once k objects are at the target, for growing k, checking after
    # each kill that the target holds nothing a listing or restore could trust wrongly.
    full_env = clean_env() | env
    killed = 0
    for k in (1, 2, 4, 5):
        proc = sp.Popen([PGVAULT, "copy", "--jobs", "1", "--json"], env=full_env,
                        stdout=sp.PIPE, stderr=sp.PIPE, text=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if sum(1 for _ in dst.list("backups/")) >= k:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        out, _err = proc.communicate()
        killed += not out.strip()  # empty: killed before it finished
        assert_consistent(dst, src)
    assert killed >= 2, "the copies finished before they could be killed"
    # A kill between a backup's last object and its manifest, for certain: the objects
    # stay, the manifest goes (the kills above may or may not have hit that moment).
    newest = Catalog(src).list()[-1]
    dst.delete([f"manifests/{newest.database}/{newest.id}.json"])
    committed = {a.key for m in Catalog(dst).list() for a in m.artifacts}
    pending = {info.key for info in dst.list("backups/")} - committed
    assert pending  # the last kill came after the 5th of 6 objects
    done = json.loads(pgvault("copy", "--json", env=env).stdout)
    assert done["failed"] == {}
    # What was at the target, verified by size and read-back sha256, was not sent again.
    assert done["objects_kept"] == len(pending)
    assert done["objects_sent"] == len(objects) - len(committed) - len(pending)
    assert snapshot(dst) == snapshot(src)  # exactly the source's manifests and objects
    assert not list(dst.list("locks/"))
    again = json.loads(pgvault("copy", "--json", env=env).stdout)
    assert (again["copied"], again["objects_sent"], again["in_sync"]) == ([], 0, 3)

    # The copy alone restores every backup: the primary is gone.
    for info in list(src.list("")):
        src.delete([info.key])
    ids = [m.id for m in Catalog(dst).list()]
    for backup_id, state in zip(ids, states, strict=True):
        target = f"copy_restored_{uuid.uuid4().hex[:10]}"
        target_names.append(target)
        pgvault("restore", backup_id, "--repo", "offsite", "--to", target, "--dbname",
                pg_cluster.url(), env=env)
        assert_databases_equal(state, pg_cluster.url(target))


def test_s3_to_s3_and_to_a_folder_then_verify_and_restore_from_the_copies_and_lag(
    make_db: MakeDb, pg_cluster: EphemeralCluster, s3_server: str, s3_client: Any,
    s3_options: S3Options, tmp_path: Path, target_names: list[str],
    request: pytest.FixtureRequest,
) -> None:
    buckets = [request.getfixturevalue("s3_bucket")]
    other = f"pgvault-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=other)
    request.addfinalizer(lambda: _empty(s3_client, other))
    buckets.append(other)
    folder = tmp_path / "cold"
    config = write_config(tmp_path / "pgvault.toml", [
        {"name": "main", "url": f"s3://{buckets[0]}/app", "primary": True},
        # Per-repository [s3] keys over [s3].
        {"name": "offsite", "url": f"s3://{buckets[1]}/x", "s3": "{ max_concurrency = 2 }",
         "copy_lag_hours": 0.0001},
        {"name": "cold", "url": f"file://{folder}", "retention": "{ keep_daily = 1 }"},
    ], f'[s3]\nendpoint_url = "{s3_server}"\npath_style = true\n'
       '[schedule]\nbackup = "@every 6h"\n')
    env = {"PGVAULT_CONFIG": str(config)}
    settings = config_load({}, clean_env(), config)
    assert (settings.repository_name, settings.s3.max_concurrency) == ("main", 4)
    assert settings.repository("offsite").s3.max_concurrency == 2
    assert settings.repository("offsite").s3.endpoint_url == s3_server
    source = make_db(prefix="copy_s3")
    fill(source, 500, 0)
    pgvault("backup", "--dbname", source, env=env)
    state = make_db(source, prefix="copy_s3_state")

    time.sleep(0.5)  # past offsite's objective of 0.36 s
    status = pgvault("status", "-d", _name(source), env=env, expect=None).stdout
    assert "copy offsite   1 backup(s) behind" in status and "LATE" in status
    assert "copy cold      1 backup(s) behind" in status
    assert "objective 6h" in status  # the default objective: one backup interval
    check = pgvault("check", "-d", _name(source), env=env, expect=1).stdout
    assert check.startswith("PGVAULT WARNING") and "copy offsite is 1 backup(s) behind" in check

    out = pgvault("copy", env=env).stdout
    assert "offsite: 1 backup(s) copied" in out and "cold: 1 backup(s) copied" in out
    main = open_storage(f"s3://{buckets[0]}/app", s3_options)
    offsite = open_storage(f"s3://{buckets[1]}/x", s3_options)
    cold = open_storage(f"file://{folder}")
    assert snapshot(offsite) == snapshot(main) == snapshot(cold)
    lag = json.loads(pgvault("status", "--json", "-d", _name(source), env=env).stdout)
    assert [(c["name"], c["behind"]) for c in lag[0]["copies"]] == [("offsite", 0),
                                                                   ("cold", 0)]
    after = pgvault("check", "-d", _name(source), env=env, expect=None).stdout
    assert "behind" not in after  # (never drilled: still a WARNING of its own)

    for info in list(main.list("")):
        main.delete([info.key])
    verified = pgvault("verify", "latest", "--repo", "cold", "--level", "integrity",
                       "-d", _name(source), env=env)
    assert "PASS" in verified.stdout or "passed" in verified.stdout.lower()
    listed = json.loads(pgvault("list", "--repo", "offsite", "--json", env=env).stdout)
    assert len(listed) == 1
    for repo in ("offsite", "cold"):
        target = f"copy_s3_restored_{uuid.uuid4().hex[:10]}"
        target_names.append(target)
        pgvault("restore", "latest", "--repo", repo, "--to", target,
                "--dbname", pg_cluster.url(), env=env)
        assert_databases_equal(state, pg_cluster.url(target))


def _name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _empty(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket):
        for o in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=o["Key"])
    client.delete_bucket(Bucket=bucket)


# A year of daily backups at 01:00 UTC ending Sunday 2026-12-06 (ISO week 49).
YEAR = [date(2025, 12, 7) + timedelta(n) for n in range(365)]
# 7 daily / 4 weekly / 3 monthly (the primary): Nov 30..Dec 6, the Sundays ending weeks
# 48, 47, 46, and October's newest.
PRIMARY_KEPT = {date(2026, 11, 30) + timedelta(n) for n in range(7)} | {
    date(2026, 11, 29), date(2026, 11, 22), date(2026, 11, 15), date(2026, 10, 31)}
# 12 monthly (the cold copy): each month's newest, Jan 2026 .. Dec 2026.
COLD_KEPT = {date(2026, 12, 6)} | {date(2026, m + 1, 1) - timedelta(1) for m in range(1, 12)}


def test_each_repository_keeps_what_its_own_policy_says_over_a_year(tmp_path: Path) -> None:
    primary, cold = tmp_path / "primary", tmp_path / "cold"
    config = write_config(tmp_path / "pgvault.toml", [
        {"name": "main", "url": f"file://{primary}", "primary": True},
        {"name": "cold", "url": f"file://{cold}",
         "retention": "{ keep_daily = 0, keep_weekly = 0, keep_monthly = 12 }"},
    ])
    env = {"PGVAULT_CONFIG": str(config)}
    # Backups cannot be taken in the past: their manifests are fabricated as test_prune's.
    src = open_storage(f"file://{primary}")
    made = {day: fabricate(src, at(f"{day}T01:00")) for day in YEAR}
    assert len(COLD_KEPT) == 12 and len(PRIMARY_KEPT) == 11

    # A copy brings only what the copy's policy keeps: nothing it would prune again.
    report = json.loads(pgvault("copy", "--json", env=env).stdout)
    assert (len(report["copied"]), report["not_kept"]) == (12, 353)
    dst = open_storage(f"file://{cold}")
    assert {m.id for m in Catalog(dst).list()} == {made[d].id for d in COLD_KEPT}

    # An object of the right size but other bytes at the target is sent again.
    one = made[date(2026, 6, 30)]
    damaged = cold / one.artifacts[0].key
    damaged.write_bytes(b"X" + damaged.read_bytes()[1:])
    dst.delete([f"manifests/app/{one.id}.json"])
    redo = json.loads(pgvault("copy", one.id, "--json", env=env).stdout)
    assert (redo["copied"], redo["objects_sent"], redo["objects_kept"]) == (
        [f"app/{one.id}"], 1, 1)
    assert dst.read_bytes(one.artifacts[0].key) == src.read_bytes(one.artifacts[0].key)

    refused = pgvault("prune", env=env, expect=2)  # the primary would lose > half
    assert "== repository main" in refused.stdout and "== repository cold" in refused.stdout
    out = pgvault("prune", "--force", env=env).stdout
    assert "app: 11 kept, 354 removed" in out and "app: 12 kept, 0 removed" in out
    assert {m.id for m in Catalog(src).list()} == {made[d].id for d in PRIMARY_KEPT}
    assert {m.id for m in Catalog(dst).list()} == {made[d].id for d in COLD_KEPT}
    assert pgvault("prune", "--repo", "cold", "--dry-run", env=env).stdout.count("KEEP") == 12

    # The next day's backup: the copy gets it, and its own prune drops last month's...
    made[date(2026, 12, 7)] = fabricate(src, at("2026-12-07T01:00"))
    again = json.loads(pgvault("copy", "--json", env=env).stdout)
    assert again["copied"] == [f"app/{made[date(2026, 12, 7)].id}"]
    pgvault("prune", "--repo", "cold", env=env)
    assert {m.id for m in Catalog(dst).list()} == {
        made[d].id for d in COLD_KEPT - {date(2026, 12, 6)} | {date(2026, 12, 7)}}
    # ...which the next copy does not bring back.
    assert json.loads(pgvault("copy", "--json", env=env).stdout)["copied"] == []


def test_a_physical_backup_takes_its_clusters_archived_wal_along() -> None:
    from pgvault.ops.copy import copy
    from pgvault.retention import Policy
    from pgvault.storage.memory import MemoryStorage

    src, dst = MemoryStorage(), MemoryStorage()
    manifest = fabricate(src, at("2026-12-01T01:00"), database="main")
    physical = msgspec.structs.replace(manifest, kind="physical")
    Catalog(src).commit(physical)
    wal = [f"wal/main/00000001/00000001000000000000000{n}/{str(n) * 64}.zst" for n in (1, 2)]
    for key in wal:
        src.put_bytes(key, key.encode())
    src.put_bytes("wal/main/identity.json", b'{"system_identifier": "1"}')
    src.put_bytes("wal/main/push-failures.json", b"{}")  # the source's own record
    report = copy(src, dst, name="cold", policy=Policy(), now=at("2026-12-02T00:00"))
    assert report.copied == [f"main/{manifest.id}"] and report.objects_sent == 4
    assert {i.key for i in dst.list("wal/")} == {*wal, "wal/main/identity.json"}
    assert all(dst.read_bytes(k) == src.read_bytes(k) for k in wal)
    again = copy(src, dst, name="cold", policy=Policy(), now=at("2026-12-02T00:00"))
    assert (again.copied, again.objects_sent, again.in_sync) == ([], 0, 1)


def test_copies_keep_the_sources_encrypted_bytes_and_a_repository_may_refuse_plain_ones(
    make_db: MakeDb, pg_cluster: EphemeralCluster, tmp_path: Path, target_names: list[str],
) -> None:
    from test_encryption import keygen

    primary, vault_dir, plain = tmp_path / "primary", tmp_path / "vault", tmp_path / "plain"
    config = write_config(tmp_path / "pgvault.toml", [
        {"name": "main", "url": f"file://{primary}", "primary": True},
        {"name": "vault", "url": f"file://{vault_dir}", "require_encrypted": True,
         "retention": "{ keep_last = 10 }"},
        {"name": "plain", "url": f"file://{plain}", "retention": "{ keep_last = 10 }"},
    ])
    env = {"PGVAULT_CONFIG": str(config)}
    source = make_db(prefix="enc_copy_src")
    fill(source, 50, 0)
    pgvault("backup", "--dbname", source, env=env)
    unencrypted = Catalog(open_storage(f"file://{primary}")).list()[0]
    refused = pgvault("copy", env=env, expect=8)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgvault: copy to vault failed: 1 backup(s)")
    assert f"backup {unencrypted.id} is not (db.dump" in lines[0]
    assert "requires encrypted backups (require_encrypted = true)" in lines[0]
    assert "plain: 1 backup(s) copied" in refused.stdout  # the others are not held up
    assert not list(open_storage(f"file://{vault_dir}").list("backups/"))
    # A backup straight into it is refused too, before anything is written.
    direct = pgvault("backup", "--dbname", source, "--repo", "vault", env=env, expect=3)
    assert direct.stderr.strip().splitlines() == [
        "pgvault: repository vault requires encrypted backups ([[repos]] require_encrypted = "
        "true): set encryption.recipients or encryption.passphrase"]
    assert not list(open_storage(f"file://{vault_dir}").list(""))

    # Encrypted to a recipient: the copy needs no identity (none is configured) and keeps
    # the source's bytes exactly (no re-encryption); the copy restores with the identity.
    recipient = keygen(tmp_path / "restore-key.txt")
    fill(source, 50, 1)
    pgvault("backup", "--dbname", source, env=env | {"PGVAULT_AGE_RECIPIENTS": recipient})
    state = make_db(source, prefix="enc_copy_state")
    main_storage = open_storage(f"file://{primary}")
    encrypted = Catalog(main_storage).list()[-1]
    assert all(s.name == "age" for a in encrypted.artifacts for s in a.stages[-1:])
    out = pgvault("copy", "--to", "vault", encrypted.id, env=env).stdout
    assert "vault: 1 backup(s) copied" in out
    vault = open_storage(f"file://{vault_dir}")
    for artifact in encrypted.artifacts:
        assert vault.read_bytes(artifact.key) == main_storage.read_bytes(artifact.key)
    assert [m.id for m in Catalog(vault).list()] == [encrypted.id]
    target = f"enc_copy_restored_{uuid.uuid4().hex[:10]}"
    target_names.append(target)
    pgvault("restore", "latest", "--repo", "vault", "--to", target, "-d", pg_cluster.url(),
            "--identity-file", str(tmp_path / "restore-key.txt"), env=env)
    assert_databases_equal(state, pg_cluster.url(target))


def test_the_daemon_copies_after_each_backup_and_on_a_copys_own_schedule(
    make_db: MakeDb, pg_cluster: EphemeralCluster, tmp_path: Path, target_names: list[str],
) -> None:
    from test_daemon import DaemonProcess

    primary, cold, offsite = tmp_path / "primary", tmp_path / "cold", tmp_path / "offsite"
    source = make_db(prefix="daemon_copy_src")
    fill(source, 50, 0)
    config = write_config(tmp_path / "pgvault.toml", [
        {"name": "main", "url": f"file://{primary}", "primary": True},
        {"name": "cold", "url": f"file://{cold}", "copy_after_backup": True},
        {"name": "offsite", "url": f"file://{offsite}", "copy_schedule": "@every 2s"},
    ], f'database = "{source}"\n[schedule]\nbackup = "@every 1h"\nrun_on_start = true\n'
       '[daemon]\nmax_copies = 2\n')
    daemon = DaemonProcess(tmp_path, str(config), {})
    try:
        def copied() -> bool:
            return all(Catalog(open_storage(f"file://{where}")).list()
                       for where in (cold, offsite))

        daemon.wait_until("both copies", copied, timeout=60)
        behind = "pgvault_copy_behind_backups"
        daemon.wait_until("the metrics to show them", lambda: sum(
            1 for (name, labels), value in daemon.metrics().items()
            if name == behind and value == 0) == 2, timeout=30)
    finally:
        assert daemon.stop() == 0
    entries = daemon.log_entries()
    assert any("copy of daemon_copy_src" in e.get("message", "") and "cold: 1 backup(s) "
               "copied" in e.get("message", "") for e in entries), daemon.log()
    main = open_storage(f"file://{primary}")
    assert snapshot(open_storage(f"file://{cold}")) == snapshot(main)
    assert snapshot(open_storage(f"file://{offsite}")) == snapshot(main)
    target = f"daemon_copy_restored_{uuid.uuid4().hex[:10]}"
    target_names.append(target)
    pgvault("restore", "latest", "--repo", "cold", "--to", target, "-d", pg_cluster.url(),
            env={"PGVAULT_CONFIG": str(config)})
    assert_databases_equal(source, pg_cluster.url(target))


def test_a_copy_with_its_own_s3_keys_into_an_object_lock_bucket_gets_its_retention(
    make_db: MakeDb, pg_cluster: EphemeralCluster, iam_s3: Any, tmp_path: Path,
    target_names: list[str],
) -> None:
    """The copy's bucket is on a moto server enforcing IAM: the process's own AWS_* keys
    (the session's dummy ones) are refused there, so only the copy's keys can write it."""
    locked = iam_s3.bucket(object_lock=True)
    keys = iam_s3.user({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{locked}", f"arn:aws:s3:::{locked}/*"]}]})
    for name, value in keys.items():
        (tmp_path / name).write_text(value + "\n")
        (tmp_path / name).chmod(0o600)
    primary = tmp_path / "primary"
    config = write_config(tmp_path / "pgvault.toml", [
        {"name": "main", "url": f"file://{primary}", "primary": True},
        {"name": "offsite", "url": f"s3://{locked}/app", "credentials_env": "OFFSITE",
         "retention": "{ keep_daily = 30 }",
         "s3": f'{{ endpoint_url = "{iam_s3.endpoint}", object_lock = {{ mode = '
               '"governance", days = 30 } }'},
    ], "[s3]\npath_style = true\n")
    env = {"PGVAULT_CONFIG": str(config)}
    source = make_db(prefix="lock_copy_src")
    fill(source, 50, 0)
    pgvault("backup", "--dbname", source, env=env)
    missing_keys = pgvault("copy", env=env, expect=3)
    assert missing_keys.stderr.strip().splitlines() == [
        "pgvault: copy to offsite failed: [[repos]] offsite: credentials_env = 'OFFSITE' needs "
        "OFFSITE_AWS_ACCESS_KEY_ID and OFFSITE_AWS_SECRET_ACCESS_KEY (or their _FILE) (run "
        "pgvault copy again once the cause is fixed)"]
    env |= {f"OFFSITE_{name}_FILE": str(tmp_path / name) for name in keys}
    done = pgvault("copy", env=env)
    assert "offsite: 1 backup(s) copied" in done.stdout
    assert keys["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr

    # Every object the copy wrote carries the copy's own Object Lock retention.
    manifest = Catalog(open_storage(f"file://{primary}")).list()[0]
    before = datetime.now(UTC)
    for key in [f"app/{a.key}" for a in manifest.artifacts] + [
            f"app/manifests/{manifest.database}/{manifest.id}.json"]:
        head = iam_s3.admin.head_object(Bucket=locked, Key=key)
        assert head["ObjectLockMode"] == "GOVERNANCE"
        until = head["ObjectLockRetainUntilDate"]
        assert timedelta(days=29, hours=23) < until - before < timedelta(days=30, hours=1)
    target = f"lock_copy_restored_{uuid.uuid4().hex[:10]}"
    target_names.append(target)
    pgvault("restore", "latest", "--repo", "offsite", "--to", target, "-d", pg_cluster.url(),
            env=env)
    assert_databases_equal(source, pg_cluster.url(target))


@pytest.fixture
def lock_bucket(s3_client: Any) -> Iterator[str]:
    """A bucket with Object Lock on; emptied afterwards, bypassing GOVERNANCE retention."""
    name = f"pgvault-lock-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    yield name
    for page in s3_client.get_paginator("list_object_versions").paginate(Bucket=name):
        for version in page.get("Versions", []) + page.get("DeleteMarkers", []):
            s3_client.delete_object(Bucket=name, Key=version["Key"],
                                    VersionId=version["VersionId"],
                                    BypassGovernanceRetention=True)
    s3_client.delete_bucket(Bucket=name)


def test_object_lock_dates_follow_the_copy_targets_policy_and_prune_extends_them(
    s3_server: str, s3_client: Any, lock_bucket: str, tmp_path: Path,
) -> None:
    """2 daily / 3 weekly at the target: a copied object is locked for its daily slot
    (2 days from its write); a prune a day later extends the backup that holds last week's
    slot to the Monday that slot may lapse and a pinned one by its write hold again, leaves
    the newest backup's date alone, and leaves a backup it would remove but that is still
    locked, saying until when.

    The backups are fabricated (storage only, nothing to restore); the Object Lock is
    moto's, enforced on its real clock, so the times are set around the real now."""
    from pgvault.ops.copy import copy
    from pgvault.ops.prune import prune
    from pgvault.retention import Policy
    from pgvault.storage.memory import MemoryStorage
    from pgvault.vault import s3_options

    # The wiring: a repository's [s3] object_lock without days takes its own policy's date.
    config = write_config(tmp_path / "pgvault.toml", [
        {"name": "main", "url": f"file://{tmp_path / 'main'}", "primary": True},
        {"name": "offsite", "url": f"s3://{lock_bucket}/app",
         "retention": "{ keep_daily = 2, keep_weekly = 3, keep_monthly = 0 }",
         "s3": f'{{ endpoint_url = "{s3_server}", object_lock = {{ mode = "governance" }} }}'},
    ], "[s3]\npath_style = true\nsse = \"none\"\n")
    options = s3_options(config_load({}, clean_env(), config).repository("offsite"))
    policy = Policy(daily=2, weekly=3, monthly=0)
    probe = at("2026-12-07T01:00")
    assert options.object_lock_mode == "GOVERNANCE"
    assert options.object_lock_until is not None
    assert options.object_lock_until(probe) == probe + timedelta(days=2)

    real = datetime.now(UTC).replace(microsecond=0)
    day = real.replace(hour=1, minute=0, second=0)  # today 01:00 UTC, the newest backup
    src = MemoryStorage()
    # Today, last Sunday, last Friday, and a pinned one the Thursday a week before.
    newest, last_week, gone = (fabricate(src, day - timedelta(days=n), database="main")
                               for n in (0, 1 + day.weekday(), 3 + day.weekday()))
    pinned = fabricate(src, day - timedelta(days=11 + day.weekday()), database="main",
                       pinned=True)
    target = open_storage(f"s3://{lock_bucket}/app", options)
    before = datetime.now(UTC).replace(microsecond=0)
    report = copy(src, target, name="offsite", policy=policy, now=real)
    assert sorted(report.copied) == sorted(f"main/{m.id}" for m in (newest, last_week, pinned))
    report = copy(src, target, name="offsite", policy=policy, now=real, ref=gone.id)
    assert report.copied == [f"main/{gone.id}"]
    after = datetime.now(UTC) + timedelta(seconds=1)

    def dates(manifest: Any) -> set[datetime]:
        keys = [f"app/{a.key}" for a in manifest.artifacts] + [
            f"app/manifests/main/{manifest.id}.json"]
        found = set()
        for key in keys:
            # moto 5.2 has no GetObjectRetention; HeadObject shows the same retention.
            got = s3_client.head_object(Bucket=lock_bucket, Key=key)
            assert got["ObjectLockMode"] == "GOVERNANCE"
            found.add(got["ObjectLockRetainUntilDate"].astimezone(UTC))
        return found

    written = {m.id: dates(m) for m in (newest, last_week, gone, pinned)}
    for found in written.values():
        assert all(before + timedelta(days=2) <= d <= after + timedelta(days=2) for d in found)

    # A day later: last_week holds weekly 2/3 (and daily 2/2), which lapses no sooner than
    # two Mondays after the newest backup's week's; pinned holds weekly 3/3 (one Monday)
    # and its pin (the write hold from prune's now); newest holds only slot-1 places (no
    # date); gone is due for removal but locked for another day.
    this_monday = (day - timedelta(days=day.weekday())).replace(hour=0)
    later = real + timedelta(days=1)
    want = {last_week.id: this_monday + timedelta(weeks=2),
            pinned.id: max(this_monday + timedelta(weeks=1), later + timedelta(days=2))}
    # One of gone's data objects is locked longer than its manifest (a rule changed since):
    # prune must not try to delete it either, and names the latest date.
    held = max(written[gone.id]) + timedelta(days=3)
    s3_client.put_object_retention(Bucket=lock_bucket, Key=f"app/{gone.artifacts[0].key}",
                                   Retention={"Mode": "GOVERNANCE", "RetainUntilDate": held})
    pruned = prune(target, policy, dry_run=False, now=later,
                   lock_stale_after=timedelta(hours=1))
    assert pruned.extended == want
    assert dates(last_week) == {want[last_week.id]}
    assert dates(pinned) == {want[pinned.id]}
    assert dates(newest) == written[newest.id]
    assert pruned.locked == {gone.id: held}
    kept = {d.id: d.reasons for d in pruned.databases["main"].keep}
    assert kept[gone.id] == (f"object lock until {held:%Y-%m-%d %H:%M} UTC",)
    assert {m.id for m in Catalog(target).list()} == {newest.id, last_week.id, gone.id,
                                                        pinned.id}
    assert "S3 Object Lock extended for 2 backups; 1 backup kept under S3 Object Lock" in \
        pruned.summary()
    assert pruned.to_json()["extended"] == {i: d.isoformat() for i, d in want.items()}

    # Prune again: nothing shortens, nothing extends twice.
    again = prune(target, policy, dry_run=False, now=later,
                  lock_stale_after=timedelta(hours=1))
    assert again.extended == want
    assert dates(last_week) == {want[last_week.id]}


def test_the_lag_of_a_copy_that_does_not_answer_is_what_the_source_knows_within_a_deadline(
) -> None:
    """The metrics after a backup read each copy's lag; a stalled copy must not hold them for
    its retries. The stall is a sleeping opener (a stalled network is tested in
    test_copy_faults with a real proxy)."""
    from types import SimpleNamespace

    from pgvault.ops.copy import copy_states, record_run
    from pgvault.retention import Policy
    from pgvault.storage.memory import MemoryStorage

    src, dst = MemoryStorage(), MemoryStorage()
    made = [fabricate(src, at(f"2026-12-0{day}T01:00"), database="main") for day in (1, 2, 3)]
    source = Catalog(src)
    record_run(source, "cold", at("2026-12-01T02:00"), report=None)  # copied up to day 1
    record_run(source, "cold", at("2026-12-03T02:00"), error="cannot connect to s3.example")

    def stalled() -> Any:
        time.sleep(5)
        return SimpleNamespace(catalog=Catalog(dst), policy=Policy())

    started = time.monotonic()
    (state,) = copy_states(source, [("cold", stalled, timedelta(hours=24))], "main",
                           at("2026-12-03T03:00"), timeout=0.2)
    assert time.monotonic() - started < 2
    assert state.unreadable == "repository cold did not answer within 0.2 s"
    assert (state.behind, state.newest_missing) == (2, made[-1].started_at)
    assert state.last_error == "cannot connect to s3.example"

    (state,) = copy_states(source, [("cold", lambda: SimpleNamespace(
        catalog=Catalog(dst), policy=Policy(daily=7)), timedelta(hours=24))], "main",
        at("2026-12-03T03:00"))
    assert (state.unreadable, state.behind) == (None, 3)


def test_each_repository_prunes_its_base_backups_by_its_own_policy_and_keeps_their_wal(
) -> None:
    """A faked year of weekly base backups with their WAL (memory storage, a fixed clock):
    the primary keeps 7/4/3, the cold copy 12 monthly, and each keeps exactly the WAL its
    own kept base backups need to restore, never less."""
    from pgvault.catalog import wal_identity_key, wal_object_key
    from pgvault.engines.physical import needed_wal
    from pgvault.model import Artifact, Manifest, PhysicalFacts
    from pgvault.ops.copy import copy
    from pgvault.ops.prune import prune
    from pgvault.ops.wal import archived
    from pgvault.pg import wal
    from pgvault.retention import Policy, plan
    from pgvault.storage.memory import MemoryStorage

    size = 1 << 20
    src, cold = MemoryStorage(), MemoryStorage()
    src.put_bytes(wal_identity_key("main"), json.dumps(
        {"system_identifier": "7", "wal_segment_size": size}).encode())
    made = []
    sundays = [date(2025, 12, 7) + timedelta(weeks=n) for n in range(53)]
    for number, day in enumerate(sundays):
        when = at(f"{day}T01:00")
        start = 10 * number + 5
        facts = PhysicalFacts(
            system_identifier="7", wal_segment_size=size, timeline=1,
            start_lsn=wal.format_lsn(start * size + 0x28),
            stop_lsn=wal.format_lsn((start + 1) * size + 0x100),
            start_wal=wal.segment_name(1, start, size),
            stop_wal=wal.segment_name(1, start + 1, size), stop_timeline=1, stop_time=when,
            wal_included=False)
        backup_id = new_backup_id(when)
        body = f"base of {day}".encode()
        key = f"backups/main/{backup_id}/base.tar.zst"
        src.put_bytes(key, body)
        manifest = Manifest(id=backup_id, kind="physical", database="main", started_at=when,
                            finished_at=when, pgvault_version="test", physical=facts,
                            artifacts=[Artifact(name="base.tar", key=key, size=len(body),
                                                raw_size=len(body),
                                                sha256=hashlib.sha256(body).hexdigest())])
        Catalog(src).commit(manifest)
        made.append(manifest)
    for segment in range(1, 10 * len(sundays) + 10):
        name = wal.segment_name(1, segment, size)
        digest = hashlib.sha256(name.encode()).hexdigest()
        src.put_bytes(wal_object_key("main", name, digest, ".zst"), name.encode())

    now = at("2026-12-06T12:00")
    primary_policy, cold_policy = Policy(daily=7, weekly=4, monthly=3), Policy(
        daily=0, weekly=0, monthly=12)
    report = copy(src, cold, name="cold", policy=cold_policy, now=now)
    assert report.failed == {} and len(report.copied) == 12
    for storage, policy in ((src, primary_policy), (cold, cold_policy)):
        # (the primary loses 46 of 53: more than half, which needs force)
        pruned = prune(storage, policy, dry_run=False, now=now, force=True,
                       lock_stale_after=timedelta(hours=1))
        kept = Catalog(storage).list("main")
        wanted = plan([Candidate(m.id, m.started_at, None) for m in made], policy, now).keep
        assert {m.id for m in kept} == set(wanted)  # exactly what its own policy says
        present = {f.wal.name for f in archived(storage, "main")}
        oldest = min(int(m.physical.start_wal[8:], 16) for m in kept if m.physical)
        for manifest in kept:  # every kept base backup restores from this repository alone
            assert manifest.physical is not None
            assert set(needed_wal(manifest.physical, None)) <= present
        assert min(wal.parse_wal_name(n).segno(size) for n in present) == oldest  # type: ignore[union-attr]
        assert pruned.wal
    # Weekly backups: the primary's 7 daily slots hold the 7 newest (Oct 25 .. Dec 6), which
    # also fill its weekly and monthly ones; the cold copy holds each month's newest.
    assert len(Catalog(src).list()) == 7 and len(Catalog(cold).list()) == 12


def test_a_copy_takes_an_incremental_base_backup_together_with_its_parent() -> None:
    """A cold copy keeping only the newest base backup: when that one is an incremental,
    the full it is built on comes along (a copy of the child alone would not restore)."""
    from pgvault.model import PhysicalFacts
    from pgvault.ops.copy import copy
    from pgvault.retention import Policy
    from pgvault.storage.memory import MemoryStorage

    def physical(when: str, parent: str | None) -> str:
        manifest = fabricate(src, at(when), database="main")
        facts = PhysicalFacts(
            system_identifier="7", wal_segment_size=1 << 24, timeline=1, start_lsn="0/1000028",
            stop_lsn="0/2000100", start_wal="000000010000000000000001",
            stop_wal="000000010000000000000002", stop_timeline=1, stop_time=at(when),
            wal_included=True, **({} if parent is None else {"parent": parent}))
        Catalog(src).commit(msgspec.structs.replace(manifest, kind="physical", physical=facts))
        return manifest.id

    src, dst = MemoryStorage(), MemoryStorage()
    full = physical("2026-10-04T01:00", None)
    physical("2026-11-01T01:00", None)  # an older full nothing depends on
    child = physical("2026-12-05T01:00", full)
    report = copy(src, dst, name="cold", policy=Policy(daily=1, weekly=0, monthly=0),
                  now=at("2026-12-06T00:00"))
    assert report.failed == {}
    assert sorted(report.copied) == sorted([f"main/{full}", f"main/{child}"])
    assert {m.id for m in Catalog(dst).list()} == {full, child}
