"""A big table's rows restored by several COPY sessions at once (engines/pg_restore.py).

The split threshold and piece size are lowered so that small test tables go through the
same path as a big one; everything else (pg_restore, psql, the server) is real.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from cli_runner import one_line_error, pgvault
from dbcompare import assert_databases_equal
from fixtures_pg import NewName
from pgvault.catalog import Catalog
from pgvault.engines import pg_restore
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage.local import LocalStorage

# What COPY text must escape (tab, newline, carriage return, backslash, a line that is only
# "\."), NULLs in every type, bytea with every byte value, large jsonb, non-ASCII text.
SOURCE_SQL = r"""
CREATE TABLE kinds (id int PRIMARY KEY, label text NOT NULL);
INSERT INTO kinds SELECT g, 'kind ' || g FROM generate_series(0, 9) g;
CREATE TABLE big (
    id bigserial PRIMARY KEY, kind int REFERENCES kinds (id), note text, raw bytea,
    doc jsonb, amount numeric(14, 4), at timestamptz);
INSERT INTO big SELECT g, g % 10,
    CASE WHEN g % 7 = 0 THEN NULL
         WHEN g % 7 = 1 THEN E'line one\nline two\ttabbed\\back\\\\slashes\r\n\\.\n'
         WHEN g % 7 = 2 THEN E'\\.'
         WHEN g % 7 = 3 THEN 'ünïcødé ✓ ' || g
         ELSE md5(g::text) || repeat(' word', (g % 30)::int) END,
    CASE WHEN g % 5 = 0 THEN NULL
         ELSE decode(md5(g::text), 'hex') || '\x000a0d5c09ff'::bytea END,
    CASE WHEN g % 11 = 0 THEN NULL
         WHEN g % 500 = 1 THEN (SELECT jsonb_agg(jsonb_build_object(
             'k', i, 'text', E'quote " back \\ nl \n', 'arr', jsonb_build_array(i, null)))
             FROM generate_series(1, 2000) i)
         ELSE jsonb_build_object('g', g, 's', E'tab\there', 'n', null) END,
    CASE WHEN g % 13 = 0 THEN NULL ELSE g * 1.2345 END,
    CASE WHEN g % 17 = 0 THEN NULL ELSE timestamptz '2024-01-01' + g * interval '1 s' END
FROM generate_series(1, 30000) g;
SELECT setval('big_id_seq', 30000);
CREATE INDEX big_note ON big (note);
CREATE TABLE refs (id int PRIMARY KEY, big_id bigint REFERENCES big (id));
INSERT INTO refs SELECT g, g * 3 FROM generate_series(1, 5000) g;
CREATE MATERIALIZED VIEW big_summary AS SELECT count(*) AS n, max(id) AS top FROM big;
"""


@pytest.fixture
def small_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables of a megabyte split, in pieces of 64 KiB (defaults: 32 MiB, 1 MiB)."""
    monkeypatch.setattr(pg_restore, "SPLIT_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(pg_restore, "PIECE", 64 << 10)


def _backup(url: str, root: Path) -> str:
    repo = f"file://{root}"
    pgvault("backup", "--dbname", url, "--repo", repo)
    return repo


def test_a_big_table_loads_in_two_streams_and_equals_its_source(
    make_db: Callable[..., str], tmp_path: Path, new_name: NewName,
    pg_cluster: EphemeralCluster, small_split: None,
) -> None:
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SOURCE_SQL)
    repo = _backup(url, tmp_path / "repo")
    target = new_name()
    out = pgvault("--log-format", "json", "restore", "latest", "--to", target, "--dbname",
                  pg_cluster.url(), "--repo", repo, "-j", "2")
    assert "restore: loading public.big in 2 streams" in out.stderr
    assert "restore: loading public.kinds" not in out.stderr  # small: one COPY
    assert_databases_equal(url, pg_cluster.url(target))
    with psycopg.connect(pg_cluster.url(target)) as conn:
        # Built after the rows arrived: the view counts them all, the keys hold.
        assert conn.execute("SELECT n, top FROM big_summary").fetchone() == (30000, 30000)
        assert conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
                            ).fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'big'"
                            ).fetchone() == (2,)
        # The loads' settings are the sessions' own: nothing stays on the database.
        assert conn.execute("SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d "
                            "ON d.oid = s.setdatabase WHERE d.datname = current_database()"
                            ).fetchone() == (0,)

    # The stock tools restore the same backup: zstd -d | pg_restore (README).
    stock = new_name()
    artifact = Catalog(LocalStorage(tmp_path / "repo")).get("latest", None).artifact("db.dump")
    subprocess.run(["createdb", "-h", "127.0.0.1", "-p", str(pg_cluster.port), "-U",
                    "postgres", stock], check=True)
    subprocess.run(f"zstd -dc '{tmp_path / 'repo' / artifact.key}' | "
                   f"'{pg_cluster.bindir / 'pg_restore'}' --exit-on-error -d "
                   f"'{pg_cluster.url(stock)}'", shell=True, check=True)
    assert_databases_equal(url, pg_cluster.url(stock))


def test_a_failing_stream_fails_the_restore_in_one_line_and_leaves_no_database(
    make_db: Callable[..., str], tmp_path: Path, new_name: NewName,
    pg_cluster: EphemeralCluster, small_split: None,
) -> None:
    """A real server error in one COPY session: a check that refuses one row, only in a
    restore's scratch database (the source accepts it)."""
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""
            CREATE FUNCTION accept(id bigint) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
            BEGIN
              IF id = 20000 AND current_database() LIKE 'pgvault\\_tmp\\_%' THEN
                RAISE EXCEPTION 'row % refused', id;
              END IF;
              RETURN true;
            END $$;
            CREATE TABLE big (id bigint PRIMARY KEY CHECK (accept(id)), v text);
            INSERT INTO big SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, 40000) g;
            CREATE INDEX big_v ON big (v);
            CREATE TABLE small (id int PRIMARY KEY);
            INSERT INTO small SELECT generate_series(1, 100);
        """)
    repo = _backup(url, tmp_path / "repo")
    target = new_name()
    proc = pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(),
                   "--repo", repo, "-j", "2", expect=None)
    assert proc.returncode != 0
    line = one_line_error(proc)
    assert "loading public.big in 2 streams" in line and "row 20000 refused" in line, line
    with psycopg.connect(pg_cluster.url()) as conn:
        left = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname = %s OR datname LIKE "
            "'pgvault\\_tmp\\_%%'", [target]).fetchall()]
    assert left == []


@pytest.mark.parametrize("piece", [1, 5, 64])
@pytest.mark.parametrize("read_size", [1, 3, 1000])
def test_rows_are_cut_at_line_ends_up_to_the_end_marker(
    monkeypatch: pytest.MonkeyPatch, piece: int, read_size: int
) -> None:
    """Lines that hold an escaped backslash-dot, a marker split across reads, a row longer
    than a piece; nothing after the marker is handed on."""
    monkeypatch.setattr(pg_restore, "PIECE", piece)
    rows = b"1\tfirst\\n\\\\.\n2\t\\\\.\n" + b"3\t" + b"x" * 200 + b"\n4\t\\N\n"
    text = rows + b"\\.\n\n\n-- trailer\n"
    chunks = [text[i:i + read_size] for i in range(3, len(text), read_size)]
    pieces: list[bytes] = []
    pg_restore.cut_rows(lambda: chunks.pop(0) if chunks else b"", text[:3], pieces.append)
    assert b"".join(pieces) == rows
    assert all(p.endswith(b"\n") for p in pieces)
    if piece == 1 and read_size < 100:  # whole lines as soon as they are there
        assert len(pieces) >= 3
    with pytest.raises(pg_restore.RestoreFailed, match="without its end marker"):
        pg_restore.cut_rows(lambda: b"", b"1\tno end\n", pieces.append)
    pieces.clear()
    pg_restore.cut_rows(lambda: b"", b"\\.\n", pieces.append)  # an empty table
    assert pieces == []
