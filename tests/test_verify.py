"""Restore drills end to end: real clusters, the real CLI, damaged backups caught and named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql

from cli_runner import PGVAULT, one_line_error, pgvault
from dbcompare import assert_databases_equal
from pgvault import config
from pgvault.catalog import Catalog
from pgvault.errors import ConfigError
from pgvault.model import LEVELS, Manifest, VerifyReport, from_dict, from_json
from pgvault.ops.verify import OUTPUT_TAIL
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage.memory import MemoryStorage

PRISMA_TABLE = """
CREATE TABLE public._prisma_migrations (
    id varchar(36) PRIMARY KEY, checksum varchar(64) NOT NULL, finished_at timestamptz,
    migration_name varchar(255) NOT NULL, logs text, rolled_back_at timestamptz,
    started_at timestamptz NOT NULL DEFAULT now(), applied_steps_count integer NOT NULL DEFAULT 0
);
INSERT INTO public._prisma_migrations VALUES
    ('a1', 'c0ffee01', '2026-01-01 10:00:01+00', '20260101_init', NULL, NULL,
     '2026-01-01 10:00:00+00', 1),
    ('b2', 'c0ffee02', '2026-02-02 10:00:01+00', '20260202_orders', NULL, NULL,
     '2026-02-02 10:00:00+00', 1),
    ('c3', 'c0ffee03', NULL, '20260303_tried', 'rolled back by hand', '2026-03-03 11:00:00+00',
     '2026-03-03 10:00:00+00', 0);
"""
FAILED_PRISMA_ROW = """
INSERT INTO public._prisma_migrations VALUES
    ('d4', 'c0ffee04', NULL, '20260404_broken', 'ERROR: column exists', NULL,
     '2026-04-04 10:00:00+00', 0);
"""
OTHER_MIGRATION_TABLES = """
CREATE SCHEMA py;
CREATE TABLE py.alembic_version (version_num varchar(32) PRIMARY KEY);
INSERT INTO py.alembic_version VALUES ('3f2a9c1d');
CREATE TABLE py.django_migrations (id serial PRIMARY KEY, app varchar(255), name varchar(255),
                                   applied timestamptz);
INSERT INTO py.django_migrations (app, name, applied)
VALUES ('shop', '0001_initial', '2026-01-01'), ('shop', '0002_orders', '2026-02-01');
"""
# The smoke test a team would run: the restored copy, not the source, with its migrations.
SMOKE_COMMAND = (
    'test "$PGDATABASE" = "${DATABASE_URL##*/}" && case "$PGDATABASE" in pgvault_verify_*) ;; '
    '*) exit 3;; esac && test "$(psql -XAtc "SELECT count(*) FROM _prisma_migrations")" = 3 '
    "&& echo smoke-ok"
)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drill_tmp() -> Iterator[Path]:
    """TMPDIR of every pgvault run here: ephemeral clusters land in it, so leftovers show."""
    path = Path(tempfile.mkdtemp(prefix="pgvault-verify-tests-", dir="/tmp"))
    path.chmod(0o711)  # the postgres OS user must reach the clusters inside
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _databases(cluster: EphemeralCluster) -> set[str]:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def _drill_processes(drill_tmp: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(drill_tmp) in cmdline:
            found.append(f"{proc.pid}: {cmdline}")
    return found


@pytest.fixture(autouse=True)
def nothing_survives(drill_tmp: Path, pg_cluster: EphemeralCluster) -> Iterator[None]:
    """After every test: no scratch database, no ephemeral cluster folder or process."""
    yield
    leftovers = {d for d in _databases(pg_cluster)
                 if d.startswith(("pgvault_verify_", "pgvault_tmp_"))}
    assert not leftovers, f"scratch databases survived: {leftovers}"
    assert list(drill_tmp.iterdir()) == [], "ephemeral cluster folders survived"
    assert _drill_processes(drill_tmp) == [], "ephemeral cluster processes survived"


@pytest.fixture(scope="module")
def source(pg_cluster: EphemeralCluster, _rich_template: str) -> Iterator[str]:
    """The rich sample database plus Prisma, Alembic and Django migration tables."""
    name = f"verify_src_{uuid.uuid4().hex[:8]}"
    template = _rich_template.rsplit("/", 1)[1]
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)))
    url = pg_cluster.url(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PRISMA_TABLE)
        conn.execute(OTHER_MIGRATION_TABLES)
    yield url
    _drop(pg_cluster, name)


def _drop(cluster: EphemeralCluster, name: str) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture(scope="module")
def good_repo(source: str, pg_cluster: EphemeralCluster,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good local backup of ``source``, restored once and compared with it."""
    root = tmp_path_factory.mktemp("verify") / "repo"
    pgvault("backup", "--dbname", source, "--repo", f"file://{root}")
    target = f"restored_{uuid.uuid4().hex[:8]}"
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--repo",
            f"file://{root}")
    try:
        assert_databases_equal(source, pg_cluster.url(target))
    finally:
        _drop(pg_cluster, target)
    return root


@pytest.fixture
def repo(good_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the good repository, free to damage."""
    return Path(shutil.copytree(good_repo, tmp_path / "repo"))


def run(repo: Path | str, *args: str, drill_tmp: Path, expect: int | None = 0,
        env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    url = repo if isinstance(repo, str) else f"file://{repo}"
    return pgvault("verify", *args, "--repo", url, env={"TMPDIR": str(drill_tmp), **(env or {})},
                   expect=expect, timeout=timeout)


def report_of(proc: subprocess.CompletedProcess[str]) -> VerifyReport:
    return from_json(VerifyReport, proc.stdout)


def statuses(report: VerifyReport) -> dict[str, str]:
    return {check.name: check.status for check in report.checks}


def dump_file(repo: Path) -> Path:
    (path,) = repo.rglob("db.dump.zst")
    return path


def manifest_file(repo: Path) -> Path:
    (path,) = repo.glob("manifests/*/*.json")
    return path


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pgvault.toml"
    path.write_text(text)
    return str(path)


# -- good backups pass every level ----------------------------------------------------------


def test_every_level_passes_on_a_good_local_backup(
    repo: Path, drill_tmp: Path, pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, f'''
[verify]
command = {json.dumps(SMOKE_COMMAND)}
command_timeout_seconds = 60
[[verify.sql]]
name = "orders exist"
query = "SELECT count(*) > 600 FROM app.orders"
[[verify.sql]]
name = "no order without customer"
query = """SELECT NOT EXISTS (SELECT 1 FROM app.orders o
           LEFT JOIN app.customers c ON c.id = o.customer_id WHERE c.id IS NULL)"""
''')
    for level in LEVELS:
        # The deepest level uses the default ephemeral cluster; the others the test server.
        where = [] if level == "command" else ["--server", pg_cluster.url()]
        report = report_of(run(repo, "--config", cfg, "--level", level, "--json", *where,
                               drill_tmp=drill_tmp))
        assert report.passed, report.checks
        assert {c.level for c in report.checks} == set(LEVELS[: LEVELS.index(level) + 1])
        assert all(c.status == "pass" for c in report.checks), report.checks
        if level != "integrity":
            assert report.restore_seconds is not None and report.restore_seconds > 0
            assert report.rto_met is True and report.bytes_read == dump_file(repo).stat().st_size
    # The last (command) drill ran on an ephemeral cluster, with the backup's roles and owners.
    assert report.where.startswith("ephemeral PostgreSQL")
    assert "with owners and privileges" in next(c.detail for c in report.checks
                                                if c.name == "restore")
    assert "smoke-ok" in report.command_output
    migrations = next(c.detail for c in report.checks if c.name == "migrations")
    assert "latest 20260202_orders" in migrations and "latest 3f2a9c1d" in migrations

    # The drill records sit beside the backup: list shows the last, show the history.
    listed = pgvault("list", "--repo", f"file://{repo}").stdout
    assert "PASS command" in listed
    listed_json = json.loads(pgvault("list", "--json", "--repo", f"file://{repo}").stdout)
    assert listed_json[0]["last_drill"]["level"] == "command"
    assert listed_json[0]["last_drill"]["passed"] is True
    shown = pgvault("show", "latest", "--repo", f"file://{repo}").stdout
    assert [line.split()[3] for line in shown.splitlines() if line.startswith("drill ")] == \
        [level + ("," if level != "integrity" else "") for level in LEVELS]


def test_good_s3_backup_passes_and_keep_leaves_a_faithful_copy(
    source: str, s3_server: str, s3_bucket: str, drill_tmp: Path, tmp_path: Path
) -> None:
    env = {"PGVAULT_S3__ENDPOINT_URL": s3_server, "PGVAULT_S3__PATH_STYLE": "true",
           "PGVAULT_VERIFY__COMMAND": SMOKE_COMMAND}
    repo_url = f"s3://{s3_bucket}/team/app"
    pgvault("backup", "--dbname", source, "--repo", repo_url, env=env)
    report = report_of(run(repo_url, "--level", "integrity", "--json", env=env,
                           drill_tmp=drill_tmp))
    assert report.passed and statuses(report) == {"db.dump": "pass", "globals.sql": "pass"}

    proc = run(repo_url, "--keep", "--json", env=env, drill_tmp=drill_tmp)
    report = report_of(proc)
    assert report.level == "command" and report.passed, report.checks
    kept = proc.stderr.splitlines()
    db_line = next(line for line in kept if line.startswith("scratch database kept"))
    stop_line = next(line for line in kept if line.startswith("cluster kept running"))
    scratch_url = db_line.split("psql ", 1)[1].strip("'")
    try:
        # What the drill restored is the source, row for row and object for object.
        assert_databases_equal(source, scratch_url)
    finally:
        subprocess.run(stop_line.split("stop it with: ", 1)[1], shell=True, check=True,
                       capture_output=True)
    assert list(drill_tmp.iterdir()) == []
    drills = list(catalog_of(repo_url, s3_server).last_drills().values())
    assert [d.level for d in drills] == ["command"]


def catalog_of(url: str, s3_endpoint: str | None = None) -> Catalog:
    from pgvault.storage import open_storage
    from pgvault.storage.s3 import S3Options

    options = S3Options(endpoint_url=s3_endpoint, region="us-east-1", path_style=True)
    return Catalog(open_storage(url, options if s3_endpoint else None))


# -- damaged backups are caught and named ---------------------------------------------------


@pytest.mark.parametrize("level", ["integrity", "restore"])
def test_one_flipped_bit_in_the_dump_is_caught(
    level: str, repo: Path, drill_tmp: Path
) -> None:
    dump = dump_file(repo)
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x10
    dump.write_bytes(bytes(data))
    proc = run(repo, "--level", level, drill_tmp=drill_tmp, expect=6)
    line = one_line_error(proc)
    assert "is damaged: db.dump" in line and "db.dump.zst" in line, line
    assert "FAIL  integrity  db.dump" in proc.stdout
    assert "PASS  restore" not in proc.stdout and "FAILED" in proc.stdout


def test_truncated_artifacts_are_caught(repo: Path, drill_tmp: Path) -> None:
    dump = dump_file(repo)
    whole = dump.read_bytes()
    dump.write_bytes(whole[: len(whole) // 2])
    line = one_line_error(run(repo, "--level", "integrity", drill_tmp=drill_tmp, expect=6))
    assert "db.dump" in line and "truncated" in line, line

    # Cut just before the zstd frame's 4-byte checksum trailer, with a manifest rewritten to
    # match the cut file: the digest agrees, so only the decoder can notice.
    cut = whole[:-4]
    dump.write_bytes(cut)
    path = manifest_file(repo)
    manifest = json.loads(path.read_text())
    for artifact in manifest["artifacts"]:
        if artifact["name"] == "db.dump":
            artifact["size"] = len(cut)
            artifact["sha256"] = hashlib.sha256(cut).hexdigest()
    path.write_text(json.dumps(manifest))
    # Named by id: after the first drill's integrity failure it is never 'latest' again.
    line = one_line_error(run(repo, manifest["id"], "--level", "integrity",
                              drill_tmp=drill_tmp, expect=6))
    assert "db.dump" in line and "zstd stream is truncated" in line, line


def test_deleted_artifact_is_caught(repo: Path, drill_tmp: Path) -> None:
    (globals_sql,) = repo.rglob("globals.sql.zst")
    globals_sql.unlink()
    proc = run(repo, drill_tmp=drill_tmp, expect=6)
    line = one_line_error(proc)
    assert "globals.sql" in line and "missing" in line, line


def test_manifest_whose_facts_differ_fails_the_facts_check(
    repo: Path, drill_tmp: Path, pg_cluster: EphemeralCluster
) -> None:
    path = manifest_file(repo)
    manifest = json.loads(path.read_text())
    orders = next(t for t in manifest["facts"]["tables"] if t["name"] == "orders")
    orders["rows"] += 1
    manifest["facts"]["schema_fingerprint"]["sections"]["indexes"] = "0" * 64
    manifest["facts"]["schema_fingerprint"]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    # The stored bytes are intact: integrity passes, and only the facts level tells.
    run(repo, "--level", "integrity", drill_tmp=drill_tmp)
    proc = run(repo, "--level", "facts", "--server", pg_cluster.url(), drill_tmp=drill_tmp,
               expect=10)
    line = one_line_error(proc)
    assert "rows" in line and "app.orders has 601 rows, 602 recorded" in line, line
    assert "FAIL  facts      schema" in proc.stdout and "differs in indexes" in proc.stdout
    assert "PASS  facts      migrations" in proc.stdout


def test_manifest_from_before_fingerprints_skips_those_checks(
    repo: Path, drill_tmp: Path, pg_cluster: EphemeralCluster
) -> None:
    path = manifest_file(repo)
    manifest = json.loads(path.read_text())
    for key in ("schema_fingerprint", "migrations", "schema_filter"):
        del manifest["facts"][key]
    path.write_text(json.dumps(manifest))
    report = report_of(run(repo, "--level", "facts", "--server", pg_cluster.url(), "--json",
                           drill_tmp=drill_tmp))
    assert statuses(report) | {"schema": "skip", "migrations": "skip"} == statuses(report)
    assert report.passed


def test_failed_prisma_migration_fails_the_facts_check(
    make_db: Any, pg_cluster: EphemeralCluster, tmp_path: Path, drill_tmp: Path
) -> None:
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PRISMA_TABLE)
        conn.execute(FAILED_PRISMA_ROW)
    repo = tmp_path / "repo"
    pgvault("backup", "--dbname", url, "--repo", f"file://{repo}")
    recorded = from_json(Manifest, manifest_file(repo).read_bytes()).facts.migrations
    assert recorded is not None and recorded[0].failed == ["20260404_broken"]
    proc = run(repo, "--level", "facts", "--server", pg_cluster.url(), "--keep",
               drill_tmp=drill_tmp, expect=10)
    kept, line = proc.stderr.splitlines()  # --keep says where the copy is, then the error
    assert "migrations" in line and "20260404_broken" in line, line
    scratch = kept.split("psql ", 1)[1].strip("'")
    try:  # the drill restored the source faithfully; the failure is in the data itself
        assert_databases_equal(url, scratch)
    finally:
        _drop(pg_cluster, scratch.rsplit("/", 1)[1])


def test_false_sql_assertion_fails_and_is_named(
    repo: Path, drill_tmp: Path, pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, """
[[verify.sql]]
name = "customers exist"
query = "SELECT count(*) = 300 FROM app.customers"
[[verify.sql]]
name = "no legacy orders"
query = "SELECT count(*) = 0 FROM app.orders WHERE placed_at < '2000-01-01'"
[[verify.sql]]
name = "not a boolean"
query = "SELECT 1"
""")
    proc = run(repo, "--config", cfg, "--server", pg_cluster.url(), drill_tmp=drill_tmp,
               expect=10)
    line = one_line_error(proc)
    assert "sql no legacy orders: returned false" in line, line
    assert "PASS  assertions sql customers exist" in proc.stdout
    assert "FAIL  assertions sql not a boolean" in proc.stdout


def test_command_exiting_1_fails_and_its_output_tail_is_kept(
    repo: Path, drill_tmp: Path, pg_cluster: EphemeralCluster
) -> None:
    # The server's password reaches the command in PGPASSFILE only, never in its environment
    # (the test cluster trusts every connection; the password is only carried, not checked).
    server = pg_cluster.url().replace("postgres@", "postgres:pw-8d1f@")
    command = ("P=pw-; P=${P}8d1f; grep -q \":$P\\$\" \"$PGPASSFILE\" && ! env | grep -q \"$P\" "
               "&& psql -XAtc 'SELECT 1' >/dev/null || exit 2; "
               "head -c 300000 /dev/zero | tr '\\0' x; echo; echo 'migrate status: drift'; exit 1")
    # Through the environment: a password on the command line is refused (ps shows it).
    proc = run(repo, "--json", drill_tmp=drill_tmp, expect=10,
               env={"PGVAULT_VERIFY__COMMAND": command, "PGVAULT_VERIFY__SERVER": server})
    report = report_of(proc)
    assert statuses(report)["command"] == "fail"
    assert len(report.command_output.encode()) <= OUTPUT_TAIL
    assert report.command_output.endswith("migrate status: drift\n")
    line = one_line_error(proc)
    assert "command: exit 1" in line and "drift" in line, line


def test_command_hanging_past_its_timeout_is_killed(
    repo: Path, drill_tmp: Path, pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    command = f"sleep 300 & echo $! > {pid_file}; wait"
    started = time.monotonic()
    proc = run(repo, "--server", pg_cluster.url(), drill_tmp=drill_tmp, expect=10,
               env={"PGVAULT_VERIFY__COMMAND": command,
                    "PGVAULT_VERIFY__COMMAND_TIMEOUT_SECONDS": "1"})
    assert time.monotonic() - started < 60
    line = one_line_error(proc)
    assert "command: did not finish within 1.0s" in line, line
    assert _gone(int(pid_file.read_text())), "the command's background child survived"


def _gone(pid: int, wait: float = 5.0) -> bool:
    """True once ``pid`` has exited (a zombie awaiting its new parent's reaping counts)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_restore_slower_than_the_rto_objective_fails_the_objective(
    repo: Path, drill_tmp: Path, pg_cluster: EphemeralCluster
) -> None:
    proc = run(repo, "--level", "facts", "--server", pg_cluster.url(), "--json",
               drill_tmp=drill_tmp, expect=10,
               env={"PGVAULT_OBJECTIVES__RTO_MINUTES": "0.0001"})
    report = report_of(proc)
    assert report.rto_met is False and report.rto_objective_seconds == pytest.approx(0.006)
    assert [c.name for c in report.failures] == ["rto"]  # the data itself is right
    assert "rto: restore took" in one_line_error(proc)


def test_ctrl_c_removes_the_scratch_database_and_cluster(
    repo: Path, drill_tmp: Path, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    env.update(TMPDIR=str(drill_tmp), PGVAULT_VERIFY__COMMAND=f"touch {started}; sleep 300")
    proc = subprocess.Popen([PGVAULT, "verify", "--repo", f"file://{repo}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    assert list(drill_tmp.iterdir()) != []  # the cluster is up while the command runs
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "pgvault: interrupted"
    # nothing_survives checks the folder and processes; no drill record for an interrupt.
    assert not list(repo.glob("drills/**/*.json"))


# -- records, several backups, verify after backup --------------------------------------------


def test_verify_all_and_after_backup(
    repo: Path, source: str, drill_tmp: Path, tmp_path: Path
) -> None:
    env = {"TMPDIR": str(drill_tmp), "PGVAULT_VERIFY_AFTER_BACKUP": "true",
           "PGVAULT_VERIFY__LEVEL": "restore", "PGVAULT_PRUNE_AFTER_BACKUP": "true",
           "PGVAULT_RETENTION__KEEP_LAST": "5"}
    proc = pgvault("backup", "--dbname", source, "--repo", f"file://{repo}", env=env)
    assert "PASSED restore drill" in proc.stderr
    assert "pruned" in proc.stderr  # a passing drill lets prune run
    reports = json.loads(run(repo, "all", "--level", "integrity", "--json",
                             drill_tmp=drill_tmp).stdout)
    assert len(reports) == 2 and all(r["checks"] for r in reports)
    records = catalog_of(f"file://{repo}").last_drills()
    assert sorted(r.level for r in records.values()) == ["integrity", "integrity"]
    newest = max(records)
    assert [d.level for d in catalog_of(f"file://{repo}").drills(*newest)] == \
        ["restore", "integrity"]

    dump_file_of = sorted(repo.rglob("db.dump.zst"))[0]
    dump_file_of.write_bytes(b"garbage")
    proc = pgvault("verify", "all", "--level", "integrity", "--repo", f"file://{repo}",
                   env={"TMPDIR": str(drill_tmp)}, expect=6)
    assert "(1 of 2 backups failed)" in one_line_error(proc)

    # A new backup whose drill fails (too slow) is kept and reported, and prunes nothing:
    # keep_last = 1 would otherwise remove both older backups.
    env.update(PGVAULT_RETENTION__KEEP_LAST="1", PGVAULT_OBJECTIVES__RTO_MINUTES="0.0001")
    proc = pgvault("backup", "--dbname", source, "--repo", f"file://{repo}", env=env, expect=10)
    assert "rto: restore took" in proc.stderr.splitlines()[-1]
    assert len(json.loads(pgvault("list", "--json", "--repo", f"file://{repo}").stdout)) == 3


def test_deleting_a_backup_deletes_its_drills_and_stray_drills_are_orphans() -> None:
    storage = MemoryStorage()
    catalog = Catalog(storage)
    now = from_dict(Manifest, {
        "id": "20261125T010000.000Z-aaaaaa", "database": "app",
        "started_at": "2026-11-25T01:00:00Z", "finished_at": "2026-11-25T01:00:01Z",
        "pgvault_version": "test", "artifacts": [{"name": "db.dump", "key":
            "backups/app/20261125T010000.000Z-aaaaaa/db.dump", "size": 1, "sha256": "x",
            "raw_size": 1}]})
    storage.put_bytes(now.artifacts[0].key, b"x")
    catalog.commit(now)
    for minute in (10, 20):
        catalog.record_drill(VerifyReport(
            backup_id=now.id, database="app", level="integrity",
            started_at=datetime(2026, 11, 25, 1, minute, 0, tzinfo=UTC),
            finished_at=datetime(2026, 11, 25, 1, minute, 1, tzinfo=UTC)))
    assert [d.started_at.minute for d in catalog.drills("app", now.id)] == [10, 20]
    assert catalog.orphans() == []
    catalog.delete(now)
    assert list(storage.list("")) == []

    # A drill recorded after its backup was deleted (a race with prune) is an orphan.
    catalog.record_drill(VerifyReport(backup_id=now.id, database="app", level="integrity",
                                      started_at=now.started_at, finished_at=now.finished_at))
    (orphan,) = catalog.orphans()
    assert orphan.backup_id == now.id and orphan.objects[0].key.startswith("drills/app/")


def test_verify_config_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGVAULT_CONFIG", "PGVAULT_VERIFY__LEVEL", "PGVAULT_VERIFY__COMMAND"):
        monkeypatch.delenv(name, raising=False)
    assert config.load({}, os.environ).verify.default_level() == "facts"
    assert config.load({}, os.environ).verify_after_backup is False
    cfg = write_config(tmp_path, """
verify_after_backup = true
[verify]
server = "postgresql://drills:s3cret@staging/postgres"
command = "npx prisma migrate status"
[[verify.sql]]
name = "x"
query = "SELECT true"
""")
    settings = config.load({}, os.environ, cfg)
    assert settings.verify_after_backup and settings.verify.default_level() == "command"
    assert "s3cret" not in repr(settings.verify)
    assert settings.verify.sql[0].name == "x"
    with pytest.raises(ConfigError, match=r"verify\.levle"):
        config.load({}, os.environ, write_config(tmp_path, '[verify]\nlevle = "facts"\n'))
    with pytest.raises(ConfigError, match=r"verify\.level"):
        config.load({}, os.environ, write_config(tmp_path, '[verify]\nlevel = "deep"\n'))


def test_encrypted_backup_drills_with_its_identity(
    make_db: Any, pg_cluster: EphemeralCluster, tmp_path: Path, drill_tmp: Path
) -> None:
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g")
    key = tmp_path / "key.txt"
    recipient = pgvault("keygen", "--output", str(key)).stdout.strip()
    repo = tmp_path / "repo"
    pgvault("backup", "--dbname", url, "--repo", f"file://{repo}",
            env={"PGVAULT_AGE_RECIPIENTS": recipient})
    report = report_of(run(repo, "--level", "facts", "--server", pg_cluster.url(), "--json",
                           "--identity-file", str(key), drill_tmp=drill_tmp))
    assert report.passed and statuses(report)["rows"] == "pass", report.checks
    # Without the key the drill cannot judge the backup: a key error, not "damaged".
    proc = run(repo, "--level", "integrity", drill_tmp=drill_tmp, expect=11)
    assert "damaged" not in one_line_error(proc)


def test_migration_tables_of_each_tool_are_fingerprinted(make_db: Any) -> None:
    from pgvault.engines.logical import LogicalEngine
    from pgvault.pg.conninfo import ConnInfo

    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PRISMA_TABLE + FAILED_PRISMA_ROW + OTHER_MIGRATION_TABLES)
        conn.execute("""
CREATE SCHEMA golang;
CREATE TABLE golang.schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL);
INSERT INTO golang.schema_migrations VALUES (20260105, true);
CREATE TABLE public.schema_migrations (version varchar PRIMARY KEY);
INSERT INTO public.schema_migrations VALUES ('20250101000000'), ('20260101000000');
CREATE TABLE public.flyway_schema_history (installed_rank int PRIMARY KEY, version varchar(50),
    description varchar(200), success boolean NOT NULL);
INSERT INTO public.flyway_schema_history VALUES (1, '1', 'init', true), (2, '2', 'orders', true),
    (3, '3', 'broken', false);
""")
    engine = LogicalEngine(ConnInfo.parse(url))
    with engine.snapshot() as snapshot:
        facts = engine.facts(snapshot)
    assert facts.migrations is not None
    found = {f"{t.schema_name}.{t.name}": (t.rows, t.latest, t.failed) for t in facts.migrations}
    assert found == {
        "golang.schema_migrations": (1, "20260105", ["20260105"]),
        "public._prisma_migrations": (4, "20260202_orders", ["20260404_broken"]),
        "public.flyway_schema_history": (3, "2", ["3"]),
        "public.schema_migrations": (2, "20260101000000", []),  # Rails: no dirty column
        "py.alembic_version": (1, "3f2a9c1d", []),
        "py.django_migrations": (2, "shop.0002_orders", []),
    }
    assert facts.schema_fingerprint is not None and facts.schema_fingerprint.objects["relations"]
