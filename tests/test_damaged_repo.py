"""A damaged backup or record is named, never trusted, and never blocks the rest (issue 17).

Real parts: real backups of a real cluster taken by the real CLI; the repository a folder or
moto's S3 server over HTTP; damage done to the stored bytes themselves (a flipped bit,
a truncated or emptied object), exactly as a failing disk or a botched copy would.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cli_runner import one_line_error, pgvault
from dbcompare import assert_databases_equal
from fixtures_pg import NewName
from pgvault.catalog import Catalog, drill_prefix, manifest_key, status_key
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage
from pgvault.storage.base import Storage

KEEP_LAST_1 = {"PGVAULT_RETENTION__KEEP_LAST": "1", "PGVAULT_RETENTION__KEEP_DAILY": "0",
               "PGVAULT_RETENTION__KEEP_WEEKLY": "0", "PGVAULT_RETENTION__KEEP_MONTHLY": "0"}


@dataclass(frozen=True)
class History:
    """Three real backups of one database, oldest first, and a frozen copy of each state."""

    folder: Path
    database: str
    ids: list[str]
    states: list[str]  # URLs of databases holding what each backup must restore to


@pytest.fixture(scope="module")
def history(pg_cluster: EphemeralCluster,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    folder = tmp_path_factory.mktemp("pristine") / "repo"
    name = f"damaged_src_{uuid.uuid4().hex[:8]}"
    created = [name]
    with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    source = pg_cluster.url(name)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, generation int, note text)")
    states = []
    for generation in range(3):
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("INSERT INTO orders (generation, note) SELECT %s, md5(g::text) "
                         "FROM generate_series(1, 300) g", (generation,))
        pgvault("backup", "--dbname", source, "--no-globals", "--repo", f"file://{folder}")
        state = f"damaged_state{generation}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(state), sql.Identifier(name)))
        created.append(state)
        states.append(pg_cluster.url(state))
    ids = [m["id"] for m in json.loads(pgvault("list", "--json", "--repo",
                                               f"file://{folder}").stdout)]
    assert len(ids) == 3
    yield History(folder, name, ids, states)
    with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
        for db in created:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(db)))


@dataclass(frozen=True)
class Repo:
    url: str
    env: dict[str, str]
    storage: Storage


@pytest.fixture(params=["file", "s3"])
def repo(request: pytest.FixtureRequest, history: History, tmp_path: Path) -> Repo:
    """A copy of the pristine repository, in a folder or in a bucket, for one test to damage."""
    if request.param == "s3":
        url = f"s3://{request.getfixturevalue('s3_bucket')}/team/app"
        env = {"PGVAULT_S3__ENDPOINT_URL": request.getfixturevalue("s3_server"),
               "PGVAULT_S3__PATH_STYLE": "true"}
        storage = open_storage(url, request.getfixturevalue("s3_options"))
    else:
        url, env = f"file://{tmp_path / 'repo'}", {}
        storage = open_storage(url)
    pristine = open_storage(f"file://{history.folder}")
    for info in pristine.list(""):
        storage.put_bytes(info.key, pristine.read_bytes(info.key))
    return Repo(url, {**env, "PGVAULT_REPO": url}, storage)


def flip_bit(data: bytes) -> bytes:
    """The middle byte with its high bit flipped: no longer UTF-8, so no longer JSON."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x80]) + data[middle + 1:]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "flipped bit": flip_bit,
    "truncated": lambda data: data[: len(data) // 2],
    "emptied": lambda data: b"",
}


def damage(storage: Storage, key: str, how: str) -> None:
    storage.put_bytes(key, DAMAGE[how](storage.read_bytes(key)))


def restore(repo: Repo, ref: str, pg_cluster: EphemeralCluster,
            new_name: NewName) -> tuple[str, str]:
    """Restore ``ref`` into a new database; (its URL, what restore said on stderr)."""
    target = new_name()
    proc = pgvault("restore", ref, "--to", target, "--dbname", pg_cluster.url(), env=repo.env)
    return pg_cluster.url(target), proc.stderr


# -- section 3: one damaged manifest ----------------------------------------------------


@pytest.mark.parametrize("how", list(DAMAGE))
def test_one_damaged_manifest_is_named_and_every_other_backup_stays_usable(
    how: str, repo: Repo, history: History, pg_cluster: EphemeralCluster, new_name: NewName,
) -> None:
    oldest, middle, newest = history.ids
    db = history.database
    damaged_key = manifest_key(db, newest)
    damage(repo.storage, damaged_key, how)

    # list: the damaged one is there, INVALID with its reason; the others as always.
    listed = pgvault("list", env=repo.env)
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(rows) == set(history.ids)
    assert re.search(rf"^{newest} +{db} +INVALID: manifest is damaged: ", listed.stdout, re.M)
    assert "INVALID" not in rows[oldest] + rows[middle]
    assert "warning: manifest is damaged: " in listed.stderr and damaged_key in listed.stderr
    as_json = {m["id"]: m for m in json.loads(pgvault("list", "--json", env=repo.env).stdout)}
    assert as_json[newest]["valid"] is False and "damaged" in as_json[newest]["error"]
    assert as_json[newest]["manifest"] == damaged_key
    assert as_json[oldest]["valid"] is True and as_json[middle]["valid"] is True

    # show: the others as always; the damaged one exits 6 saying why.
    assert f"backup    {oldest}" in pgvault("show", oldest, env=repo.env).stdout
    assert f"backup    {middle}" in pgvault("show", "latest", "-d", db, env=repo.env).stdout
    line = one_line_error(pgvault("show", newest, env=repo.env, expect=6))
    assert line.startswith(f"pgvault: backup {newest} of '{db}' is unusable: manifest is "
                           "damaged: ") and damaged_key in line

    # status and check report the damage; the newest good backup still meets the RPO.
    status = pgvault("status", "-d", db, env=repo.env)
    assert f"newest backup  {middle}" in status.stdout
    assert f"cannot trust   {newest}: manifest is damaged" in status.stdout
    assert "state          WARNING: 1 backup cannot be trusted" in status.stdout
    (entry,) = json.loads(pgvault("status", "-d", db, "--json", env=repo.env).stdout)
    assert entry["newest"]["id"] == middle and entry["backups"] == 2
    assert [b["id"] for b in entry["bad"]] == [newest]
    check = pgvault("check", "-d", db, env=repo.env, expect=1)
    assert check.stdout.startswith(f"PGVAULT WARNING - {db}: 1 backup cannot be trusted "
                                   f"({newest}: manifest is damaged")

    # restore: an intact id by name, and 'latest' = the newest that can be trusted.
    target, _ = restore(repo, oldest, pg_cluster, new_name)
    assert_databases_equal(history.states[0], target)
    target, said = restore(repo, "latest", pg_cluster, new_name)
    assert_databases_equal(history.states[1], target)
    assert f"latest backup of {db} is {middle}; passed over {newest}: manifest is damaged" \
        in said
    one_line_error(pgvault("restore", newest, "--to", new_name(), "--dbname", pg_cluster.url(),
                           env=repo.env, expect=6))

    # prune acts on nothing of a database whose listing hides a backup, unless forced ...
    before = {info.key for info in repo.storage.list("")}
    refused = one_line_error(pgvault("prune", env={**repo.env, **KEEP_LAST_1}, expect=6))
    assert refused.startswith(f"pgvault: prune of {db} refused: 1 manifest damaged (backup "
                              f"{newest}: manifest is damaged")
    assert damaged_key in refused and "prune --force" in refused
    assert {info.key for info in repo.storage.list("")} == before
    # ... and forced, it prunes the readable ones and leaves every byte of the damaged one.
    forced = pgvault("prune", "--force", env={**repo.env, **KEEP_LAST_1})
    assert re.search(rf"^  REMOVE +{oldest} .* no rule keeps it$", forced.stdout, re.M)
    assert re.search(rf"^  LEFT +{newest} .*damaged manifest: not planned, not touched$",
                     forced.stdout, re.M)
    after = {info.key for info in repo.storage.list("")}
    assert {k for k in before if newest in k} <= after
    assert not {k for k in after if oldest in k}
    target, _ = restore(repo, "latest", pg_cluster, new_name)
    assert_databases_equal(history.states[1], target)


def test_a_manifest_that_still_parses_but_names_another_backup_is_damaged(
    repo: Repo, history: History, pg_cluster: EphemeralCluster, new_name: NewName,
) -> None:
    """A flipped bit inside the id leaves valid JSON: the key it is stored under decides."""
    middle = history.ids[1]
    key = manifest_key(history.database, middle)
    data = repo.storage.read_bytes(key)
    at = data.index(middle.encode()) + len(middle) - 1  # the last hex digit of the id
    repo.storage.put_bytes(key, data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])
    line = one_line_error(pgvault("show", middle, env=repo.env, expect=6))
    assert "manifest is damaged: it names backup" in line
    listed = pgvault("list", env=repo.env).stdout
    assert re.search(rf"^{middle} .*INVALID: manifest is damaged: it names backup", listed, re.M)
    target, _ = restore(repo, "latest", pg_cluster, new_name)
    assert_databases_equal(history.states[2], target)


# -- section 3: damaged drill and status records ----------------------------------------


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_drill_and_status_records_are_reported_never_fatal(
    how: str, repo: Repo, history: History, pg_cluster: EphemeralCluster, new_name: NewName,
) -> None:
    oldest, _, newest = history.ids
    db = history.database
    for backup_id in (newest, oldest):
        pgvault("verify", backup_id, "--level", "integrity", env=repo.env)
    (drill,) = [i.key for i in repo.storage.list(drill_prefix(db, newest))]
    damage(repo.storage, drill, how)
    history_key = status_key(db, "backup")
    repo.storage.put_bytes(history_key, b'{"last_success": 3}')
    (older_drill,) = [i.key for i in repo.storage.list(drill_prefix(db, oldest))]
    damage(repo.storage, older_drill, how)

    listed = pgvault("list", env=repo.env)
    assert len(listed.stdout.splitlines()) == 4 and "INVALID" not in listed.stdout
    assert "warning: drill record is damaged: " in listed.stderr and drill in listed.stderr
    shown = pgvault("show", newest, env=repo.env).stdout
    assert re.search(rf"^drill     drill record is damaged: .* \({re.escape(drill)}\)$",
                     shown, re.M)
    status = pgvault("status", "-d", db, env=repo.env)
    assert "damaged        drill record is damaged: " in status.stdout
    assert f"damaged        run history of '{db}' is damaged: " in status.stdout
    assert "state          WARNING: " in status.stdout
    (entry,) = json.loads(pgvault("status", "-d", db, "--json", env=repo.env).stdout)
    assert len(entry["damaged_records"]) == 3 and entry["bad"] == []
    check = pgvault("check", "-d", db, env=repo.env, expect=1)
    assert "drill record is damaged" in check.stdout and "run history" in check.stdout
    target, said = restore(repo, "latest", pg_cluster, new_name)
    assert f"latest backup of {db} is {newest}\n" in said
    assert_databases_equal(history.states[2], target)
    assert "no rule keeps it" in pgvault("prune", "--dry-run",
                                         env={**repo.env, **KEEP_LAST_1}).stdout


# -- section 2: a backup known bad never counts, never is 'latest' ----------------------


def test_a_backup_that_failed_integrity_is_never_latest_and_never_outlives_a_good_one(
    repo: Repo, history: History, pg_cluster: EphemeralCluster, new_name: NewName,
) -> None:
    _, middle, newest = history.ids
    db = history.database
    catalog = Catalog(repo.storage)
    # One flipped bit in the newest backup's data; its drill records the integrity failure.
    (dump,) = [a for a in catalog.get(newest).artifacts if a.name == "db.dump"]
    damage(repo.storage, dump.key, "flipped bit")
    failed = pgvault("verify", newest, "--level", "integrity", env=repo.env, expect=6)
    assert f"backup {newest} is damaged" in failed.stderr

    listed = pgvault("list", env=repo.env).stdout
    assert re.search(rf"^{newest} .*FAIL integrity +BAD: integrity check failed", listed, re.M)
    target, said = restore(repo, "latest", pg_cluster, new_name)
    assert f"latest backup of {db} is {middle}; passed over {newest}: integrity check " \
           "failed in the drill of " in said
    assert_databases_equal(history.states[1], target)
    assert f"backup    {middle}" in pgvault("show", "latest", env=repo.env).stdout
    status = pgvault("status", "-d", db, env=repo.env, expect=12)  # the last drill failed
    assert f"newest backup  {middle}" in status.stdout
    assert f"cannot trust   {newest}: integrity check failed" in status.stdout

    # keep_last 1: the damaged newest fills no slot, so the newest good one is what is kept.
    pruned = pgvault("prune", "--dry-run", env={**repo.env, **KEEP_LAST_1})
    assert re.search(rf"^  KEEP +{middle} .* last 1/1, newest$", pruned.stdout, re.M)
    assert re.search(rf"^  REMOVE +{newest} .* known bad: integrity check failed", pruned.stdout,
                     re.M)
    # Two of three at once is more than half: refused, one line naming why and the flag.
    refused = one_line_error(pgvault("prune", env={**repo.env, **KEEP_LAST_1}, expect=2))
    assert refused == (f"pgvault: prune of {db} refused: it would remove 2 of 3 backups (more "
                       "than half); check it with prune --dry-run, then apply it with prune "
                       "--force")
    assert len(catalog.list(db)) == 3
    pgvault("prune", "--force", env={**repo.env, **KEEP_LAST_1})
    assert [m.id for m in catalog.list(db)] == [middle]
    target, _ = restore(repo, "latest", pg_cluster, new_name)
    assert_databases_equal(history.states[1], target)
    # The one good backup left is never removed, however the policy is set.
    again = pgvault("prune", "--force", env={**repo.env, **KEEP_LAST_1})
    assert f"{db}: 1 kept, 0 removed" in again.stdout


def test_two_backups_newest_damaged_keep_last_one_keeps_the_restorable_one(
    repo: Repo, history: History, pg_cluster: EphemeralCluster, new_name: NewName,
) -> None:
    """The issue's own case, without any --force: two backups, the newest damaged."""
    oldest, middle, newest = history.ids  # the oldest is deleted first: two are left
    db = history.database
    catalog = Catalog(repo.storage)
    catalog.delete(catalog.get(oldest))
    (dump,) = [a for a in catalog.get(newest).artifacts if a.name == "db.dump"]
    damage(repo.storage, dump.key, "truncated")
    pgvault("verify", newest, "--level", "integrity", env=repo.env, expect=6)
    text = pgvault("prune", env={**repo.env, **KEEP_LAST_1}).stdout
    assert f"{db}: 1 kept, 1 removed" in text
    assert [m.id for m in catalog.list(db)] == [middle]
    target, said = restore(repo, "latest", pg_cluster, new_name)
    assert f"latest backup of {db} is {middle}\n" in said
    assert_databases_equal(history.states[1], target)
