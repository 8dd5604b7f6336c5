"""Backups taken as several pg_dumps under one snapshot (--streams), each restored whole.

The big tables' data goes into archives of its own; restore loads it beside the rest and
builds what needs it (indexes, foreign keys to its keys, a materialized view) afterwards.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from cli_runner import one_line_error, pgvault
from dbcompare import assert_databases_equal
from fixtures_pg import NewName
from pgvault.catalog import Catalog
from pgvault.engines.logical import DATA_FORMAT, Table, split_tables
from pgvault.errors import BackupFailed
from pgvault.model import SPLIT_MANIFEST_FORMAT, Manifest, StageSpec
from pgvault.ops import backup as backup_op
from pgvault.ops.backup import BackupOptions, backup
from pgvault.pg.archive import after_loads, read_toc
from pgvault.pg.cluster import EphemeralCluster
from pgvault.pg.conninfo import ConnInfo
from pgvault.storage.local import LocalStorage

MiB = 1 << 20

# Names that a pg_dump --table pattern would misread unquoted: "a*b" would also match "axb"
# (whose data must stay in the main archive), and the other holds a quote and a dot.
SPLIT_SQL = """
CREATE TABLE axb (id int PRIMARY KEY, note text);
INSERT INTO axb SELECT g, 'note ' || g FROM generate_series(1, 100) g;
CREATE TABLE "a*b" (id serial PRIMARY KEY, axb_id int REFERENCES axb (id), payload text);
INSERT INTO "a*b" (axb_id, payload)
  SELECT 1 + g % 100, repeat(md5(g::text), 3) FROM generate_series(1, 40000) g;
CREATE INDEX a_b_payload ON "a*b" (payload);
CREATE TABLE "Odd ""Name"".x" (id int PRIMARY KEY, ab_id int REFERENCES "a*b" (id), v text);
INSERT INTO "Odd ""Name"".x" SELECT g, g, md5(g::text) || md5((g * 7)::text)
  FROM generate_series(1, 30000) g;
CREATE TABLE rest_big (id int PRIMARY KEY, v text);
INSERT INTO rest_big SELECT g, md5(g::text) FROM generate_series(1, 12000) g;
CREATE MATERIALIZED VIEW ab_summary AS SELECT count(*) AS n, max(id) AS top FROM "a*b";
"""


@pytest.fixture
def split_db(rich_db: str) -> str:
    with psycopg.connect(rich_db, autocommit=True) as conn:
        conn.execute(SPLIT_SQL)
        conn.execute("ANALYZE")
    return rich_db


def split_backup(url: str, root: Path, stages: list[StageSpec] | None = None) -> Manifest:
    """Three streams, with a threshold small enough for test tables (the default is 64 MiB)."""
    options = BackupOptions(stages=stages or [StageSpec(name="zstd", level=1)], streams=3,
                            split_min_bytes=MiB)
    return backup(ConnInfo.parse(url), LocalStorage(root), options)


def test_split_tables_takes_big_tables_apart_while_the_rest_stays_big() -> None:
    tables = [Table("s", "a", 500), Table("s", "b", 300), Table("s", "c", 120)]
    assert split_tables(tables, 1000, streams=4, min_bytes=100) == tables[:2]
    assert split_tables(tables, 1000, streams=2, min_bytes=100) == tables[:1]
    assert split_tables(tables, 1000, streams=1, min_bytes=100) == []
    # One table that is nearly all of the database: a second stream would have nothing to do.
    assert split_tables(tables[:1], 550, streams=4, min_bytes=100) == []
    assert split_tables(tables, 1000, streams=4, min_bytes=400) == tables[:1]
    assert split_tables(tables, 1000, streams=4, min_bytes=600) == []


def test_a_split_backup_restores_whole_spooled_and_streamed(
    split_db: str, tmp_path: Path, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    root = tmp_path / "repo"
    manifest = split_backup(split_db, root)
    assert manifest.format == SPLIT_MANIFEST_FORMAT
    names = [a.name for a in manifest.artifacts]
    assert names == ["db.dump", "db.data-1.dump", "db.data-2.dump", "globals.sql"]
    parts = [a for a in manifest.artifacts if a.format == DATA_FORMAT]
    assert all(p.frames for p in parts)  # zstd frames, as the main archive has
    # Each part holds one table's rows and nothing else; the main archive leaves them out.
    pg_restore = pg_cluster.bindir / "pg_restore"
    listed = {}
    for artifact in manifest.artifacts[:3]:
        plain = tmp_path / artifact.name
        subprocess.run(["zstd", "-dqf", str(root / artifact.key), "-o", str(plain)], check=True)
        toc = subprocess.run([pg_restore, "-l", plain], check=True, capture_output=True,
                             text=True).stdout
        listed[artifact.name] = [line for line in toc.splitlines() if " TABLE DATA " in line]
    assert len(listed["db.data-1.dump"]) == 1 and " a*b " in listed["db.data-1.dump"][0]
    assert len(listed["db.data-2.dump"]) == 1 and "Odd" in listed["db.data-2.dump"][0]
    assert not any(" a*b " in line or "Odd" in line for line in listed["db.dump"])
    assert any(" axb " in line for line in listed["db.dump"])
    # What waits for the parts' rows, read from the main archive's table of contents.
    toc = read_toc((tmp_path / "db.dump").read_bytes())
    names = {e.dump_id: f"{e.desc} {e.tag}" for e in toc.entries}
    after = after_loads(toc)
    assert {names[i] for i in after.ready} >= {
        "CONSTRAINT a*b a*b_pkey", "INDEX a_b_payload", 'CONSTRAINT Odd "Name".x Odd "Name".x_pkey',
        'FK CONSTRAINT Odd "Name".x Odd "Name".x_ab_id_fkey'}
    assert {names[i] for i in after.last} >= {
        "FK CONSTRAINT a*b a*b_axb_id_fkey", "MATERIALIZED VIEW DATA ab_summary"}
    assert not {names[i] for i in after.waiting} & {
        "CONSTRAINT axb axb_pkey", "CONSTRAINT rest_big rest_big_pkey", "TABLE DATA axb"}

    for jobs in ("2", "1"):  # spooled main archive beside streamed parts; all streamed
        target = new_name()
        pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(),
                "--repo", f"file://{root}", "-j", jobs)
        assert_databases_equal(split_db, pg_cluster.url(target))
        with psycopg.connect(pg_cluster.url(target)) as conn:
            # Refreshed after its table's data arrived, not over an empty table.
            assert conn.execute("SELECT n, top FROM ab_summary").fetchone() == (40000, 40000)
            assert conn.execute("SELECT nextval(pg_get_serial_sequence('\"a*b\"', 'id'))"
                                ).fetchone() == (40001,)
            indexes = {r[0] for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'a*b'").fetchall()}
            assert indexes == {"a*b_pkey", "a_b_payload"}
            fks = conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND "
                               "conrelid IN ('\"a*b\"'::regclass, '\"Odd \"\"Name\"\".x\"'"
                               "::regclass)").fetchone()
            assert fks == (2,)


def test_a_split_encrypted_backup_restores_with_stock_tools(
    split_db: str, tmp_path: Path, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    """docs: age -d | zstd -d | pg_restore, pre-data, then the parts, then the rest."""
    key = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    recipient = next(line.split(": ")[1] for line in key.read_text().splitlines()
                     if line.startswith("# public key: "))
    root = tmp_path / "repo"
    manifest = split_backup(split_db, root, [StageSpec(name="zstd", level=1),
                                             StageSpec(name="age", recipients=(recipient,))])
    main, *parts = [root / a.key for a in manifest.artifacts if a.name.startswith("db.")]
    assert main.name == "db.dump.zst.age" and len(parts) == 2
    target = new_name()
    url = pg_cluster.url(target)
    pg_restore = pg_cluster.bindir / "pg_restore"
    subprocess.run(["createdb", "-h", "127.0.0.1", "-p", str(pg_cluster.port), "-U",
                    "postgres", target], check=True)

    def restore(archive: Path, *options: str) -> None:
        subprocess.run(f"age -d -i '{key}' '{archive}' | zstd -dc | '{pg_restore}' "
                       f"--exit-on-error {' '.join(options)} -d '{url}'", shell=True,
                       check=True)

    restore(main, "--section=pre-data")
    for part in parts:
        restore(part)
    restore(main, "--section=data", "--section=post-data")
    assert_databases_equal(split_db, url)


def test_a_failed_part_dump_stops_the_backup_and_leaves_nothing(
    split_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table gone between its choice and its dump: pg_dump --strict-names fails for real.

    Only the choice of tables is replaced; the dumps, the failure and the clean-up are real.
    """
    chosen = [Table("public", "rest_big", 1), Table("public", "no such table", 1)]
    monkeypatch.setattr(backup_op, "split_tables", lambda *_, **__: chosen)
    root = tmp_path / "repo"
    with pytest.raises(BackupFailed, match=r"pg_dump failed.*no matching tables"):
        split_backup(split_db, root)
    assert Catalog(LocalStorage(root)).list() == []
    left = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    assert left == [], "no data may survive a failure"


def test_cli_streams_option_splits_and_verify_drills_the_whole_backup(
    make_db: Callable[..., str], tmp_path: Path, pg_cluster: EphemeralCluster
) -> None:
    """The real threshold (64 MiB): a 70 MB table goes apart, the rest (70 MB) stays."""
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        for name in ("big", "other"):
            conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
            conn.execute(f"INSERT INTO {name} SELECT g, repeat(md5(g::text), 3) "
                         "FROM generate_series(1, 560000) g")
    repo = f"file://{tmp_path / 'repo'}"
    out = pgvault("backup", "--dbname", url, "--repo", repo, "--streams", "2", "--json")
    manifest = json.loads(out.stdout)
    assert manifest["format"] == SPLIT_MANIFEST_FORMAT
    assert [a["name"] for a in manifest["artifacts"]][:2] == ["db.dump", "db.data-1.dump"]
    report = json.loads(pgvault("verify", "latest", "--repo", repo, "--server",
                                pg_cluster.url(), "--level", "facts", "--json").stdout)
    checks = report["checks"]
    assert [c for c in checks if c["status"] == "fail"] == []
    integrity = {c["name"] for c in checks if c["level"] == "integrity"}
    assert {"db.dump", "db.data-1.dump"} <= integrity
    assert any(c["level"] == "facts" for c in checks)
    assert report["bytes_read"] == sum(a["size"] for a in manifest["artifacts"][:2])
    # One stream (the default): one archive, readable by any pgvault.
    single = json.loads(pgvault("backup", "--dbname", url, "--repo", repo, "--json").stdout)
    assert single["format"] == 1
    assert single["artifacts"][0]["name"] == "db.dump"
    assert not any(a["name"].startswith("db.data-") for a in single["artifacts"])


def test_a_manifest_from_a_newer_pgvault_is_refused_in_one_line(
    make_db: Callable[..., str], tmp_path: Path, pg_cluster: EphemeralCluster
) -> None:
    url = make_db()
    repo = f"file://{tmp_path / 'repo'}"
    pgvault("backup", "--dbname", url, "--repo", repo)
    (path,) = (tmp_path / "repo").glob("manifests/**/*.json")
    data = json.loads(path.read_text())
    data["format"] = 99
    path.write_text(json.dumps(data))
    proc = pgvault("restore", "latest", "--to", "never_made", "--dbname", pg_cluster.url(),
                   "--repo", repo, expect=None)
    assert proc.returncode != 0
    assert "written by a newer pgvault (manifest format 99)" in one_line_error(proc)
