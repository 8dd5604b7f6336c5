"""Facts and drills tell the truth: a backup's facts are exactly its dump, a drill names what
differs, and what pg_dump itself cannot reproduce is a named warning, never a failure."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cli_runner import PGVAULT, clean_env, one_line_error, pgvault
from pgvault.model import Manifest, SchemaFingerprint, VerifyReport, from_json
from pgvault.ops.verify import compare_entries
from pgvault.pg.cluster import EphemeralCluster

# PostgreSQL regression-style objects, and the two things pg_dump cannot reproduce: an
# inheritance child whose parent gained a column after it, and foreign keys a partitioned
# table copies onto its partitions (one partition ATTACHed with a key of its own name).
REGRESSION_OBJECTS = r"""
CREATE SCHEMA inv;
CREATE DOMAIN inv.sku AS text CHECK (VALUE ~ '^[A-Z]{3}-[0-9]+$');
CREATE TYPE inv.state AS ENUM ('new', 'paid', 'shipped');
CREATE TYPE inv.money2 AS (amount numeric(12, 2), currency char(3));
CREATE TYPE inv.span AS RANGE (subtype = int4);
CREATE TABLE inv.customers (id int PRIMARY KEY, name text NOT NULL, region text);
INSERT INTO inv.customers SELECT g, 'c' || g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END
FROM generate_series(1, 40) g;
ALTER TABLE inv.customers ENABLE ROW LEVEL SECURITY;
CREATE POLICY eu_only ON inv.customers FOR SELECT USING (region = 'eu');
CREATE TABLE inv.items (
    sku inv.sku PRIMARY KEY, price inv.money2, state inv.state DEFAULT 'new',
    net numeric, gross numeric GENERATED ALWAYS AS (net * 1.2) STORED);
INSERT INTO inv.items (sku, price, net) SELECT 'ABC-' || g, ROW(g, 'EUR')::inv.money2, g
FROM generate_series(1, 25) g;
CREATE TABLE inv.bookings (room int, during tsrange, seats inv.span,
    EXCLUDE USING gist (during WITH &&));
INSERT INTO inv.bookings SELECT g, tsrange('2026-01-01'::timestamp + g * interval '1 day',
    '2026-01-01'::timestamp + (g + 1) * interval '1 day'), inv.span(1, g + 2)
FROM generate_series(1, 30) g;
CREATE UNLOGGED TABLE inv.cache (k text PRIMARY KEY, v jsonb);
INSERT INTO inv.cache SELECT 'k' || g, jsonb_build_object('g', g) FROM generate_series(1, 12) g;
CREATE MATERIALIZED VIEW inv.per_region AS SELECT region, count(*) AS n
FROM inv.customers GROUP BY region;

-- inheritance: the parent gains a column after the child exists
CREATE TABLE inv.events (id int, at timestamptz DEFAULT '2026-01-01 00:00+00');
CREATE TABLE inv.click_events (button text) INHERITS (inv.events);
ALTER TABLE inv.events ADD COLUMN source text DEFAULT 'web';
INSERT INTO inv.events (id) SELECT generate_series(1, 5);
INSERT INTO inv.click_events (id, button, source) SELECT g, 'b' || g, 'app'
FROM generate_series(1, 7) g;

-- partitioned tables with foreign keys: copies on partitions made and ATTACHed
CREATE TABLE inv.orders (id int, customer_id int, day date, PRIMARY KEY (id, day))
PARTITION BY RANGE (day);
CREATE TABLE inv.orders_2025 PARTITION OF inv.orders
FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
ALTER TABLE inv.orders ADD CONSTRAINT orders_customer FOREIGN KEY (customer_id)
    REFERENCES inv.customers (id);
CREATE TABLE inv.orders_2026 (id int NOT NULL, customer_id int
    CONSTRAINT own_name_for_the_key REFERENCES inv.customers (id), day date NOT NULL);
ALTER TABLE inv.orders ATTACH PARTITION inv.orders_2026
FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO inv.orders SELECT g, 1 + g % 40, DATE '2025-06-01' + g * 3
FROM generate_series(1, 150) g;
CREATE TABLE inv.regions (code text, PRIMARY KEY (code)) PARTITION BY LIST (code);
CREATE TABLE inv.regions_eu PARTITION OF inv.regions FOR VALUES IN ('eu');
CREATE TABLE inv.regions_us PARTITION OF inv.regions FOR VALUES IN ('us');
INSERT INTO inv.regions VALUES ('eu'), ('us');
CREATE TABLE inv.offices (id int, region text REFERENCES inv.regions (code));
INSERT INTO inv.offices VALUES (1, 'eu'), (2, 'us');
"""


def _cli(*args: str, expect: int | None = 0, timeout: float = 300
         ) -> subprocess.CompletedProcess[str]:
    return pgvault(*args, expect=expect, timeout=timeout)


def _manifest(repo: Path) -> Manifest:
    (path,) = repo.glob("manifests/*/*.json")
    return from_json(Manifest, path.read_bytes())


def _drill(repo: Path, server: str, expect: int = 0) -> tuple[VerifyReport, str]:
    proc = _cli("verify", "--level", "facts", "--server", server, "--json", "--repo",
                f"file://{repo}", expect=expect)
    text = _cli("verify", "--level", "facts", "--server", server, "--repo", f"file://{repo}",
                expect=expect).stdout
    return from_json(VerifyReport, proc.stdout), text


def _checks(report: VerifyReport) -> dict[str, Any]:
    return {check.name: check for check in report.checks}


def _rows_by_name(url: str) -> dict[str, str]:
    """Each table's rows by column name (order-free: to_jsonb), digested; ONLY its own rows."""
    out: dict[str, str] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for schema, name in conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm')"
                " AND n.nspname NOT IN ('pg_catalog', 'information_schema')").fetchall():
            query = sql.SQL("SELECT count(*)::text || ':' || coalesce(md5(string_agg("
                            "to_jsonb(x)::text, E'\\n' ORDER BY to_jsonb(x)::text)), '')"
                            " FROM ONLY {} x").format(sql.Identifier(schema, name))
            out[f"{schema}.{name}"] = conn.execute(query).fetchone()[0]  # type: ignore[index]
    return out


def _restore(repo: Path, cluster: EphemeralCluster, name: str) -> str:
    _cli("restore", "latest", "--to", name, "--dbname", cluster.url(), "--repo",
         f"file://{repo}")
    return cluster.url(name)


# -- section 8: the drill names each difference; pg_dump's own limitations are warnings --------


def _fingerprint(**entries: dict[str, str]) -> SchemaFingerprint:
    pairs = {kind: list(objects.items()) for kind, objects in entries.items()}
    sections = {kind: [f"{k} {v}" for k, v in objects.items()]
                for kind, objects in entries.items() if kind in ("columns", "constraints")}
    return SchemaFingerprint.from_sections(sections, pairs)


def test_fingerprint_comparison_names_objects_and_knows_pg_dump_limitations() -> None:
    base = {"columns": {"public.p.a": "int4 f", "public.c.a": "int4 f", "public.c.x": "text f"},
            "column_order": {"public.p": "a"},
            "child_column_order": {"public.c": "a, x"},
            "constraints": {"public.o copy of public.po.fk to public.t": "FOREIGN KEY (a)"},
            "clone_constraint_names": {"public.o copy of public.po.fk to public.t": "po_fk"}}
    same = _fingerprint(**base)
    assert compare_entries(same, _fingerprint(**base)) == (True, "4 objects match", [])

    # Known limitations: named, a warning, with the limitation said.
    moved = dict(base, child_column_order={"public.c": "x, a"},
                 clone_constraint_names={"public.o copy of public.po.fk to public.t": "o_fk"})
    verdict, detail, objects = compare_entries(same, _fingerprint(**moved))
    assert verdict == "warn", detail
    assert objects == ["column order public.c differs",
                       "foreign key copy name public.o copy of public.po.fk to public.t differs"]
    assert "inheritance child's column order" in detail and "public.c" in detail
    assert "partitioned table's foreign key" in detail

    # Real differences fail, each object named: a column's type, a table's own column order
    # (not an inheritance child), a missing and an extra constraint.
    broken = dict(base, columns={**base["columns"], "public.p.a": "int8 f"},
                  column_order={"public.p": "b, a"},
                  constraints={"public.x chk": "CHECK (true)"})
    verdict, detail, objects = compare_entries(same, _fingerprint(**broken))
    assert verdict is False
    assert objects == ["column order public.p differs", "column public.p.a differs",
                       "constraint public.o copy of public.po.fk to public.t is missing",
                       "constraint public.x chk was not recorded"]
    assert all(o in detail for o in objects), detail

    # Hundreds of differences: the text names the first 200, the objects every one.
    many = {f"public.t{i}.a": "int4 f" for i in range(300)}
    verdict, detail, objects = compare_entries(_fingerprint(columns=many),
                                               _fingerprint(columns={}))
    assert verdict is False and len(objects) == 300
    assert "and 100 more: every one in --json" in detail


def _regression_db(make_db: Callable[..., str]) -> str:
    """A new database holding REGRESSION_OBJECTS."""
    source = make_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(REGRESSION_OBJECTS)
    return source


def test_drill_of_a_database_pg_dump_cannot_reproduce_warns_by_name(
    make_db: Callable[..., str], pg_cluster: EphemeralCluster, new_name: Callable[[], str],
    tmp_path: Path,
) -> None:
    source = _regression_db(make_db)
    repo = tmp_path / "repo"
    backup = _cli("backup", "--dbname", source, "--repo", f"file://{repo}", "--no-globals")
    # One vocabulary: materialized views are not tables, in backup, show and verify.
    assert "11 tables, 1 materialized view (275 rows)" in backup.stdout, backup.stdout
    shown = _cli("show", "latest", "--repo", f"file://{repo}").stdout
    assert "tables    11 tables, 1 materialized view (275 rows)" in shown, shown

    report, text = _drill(repo, pg_cluster.url())
    checks = _checks(report)
    assert report.passed, report.checks
    assert checks["rows"].status == "pass"
    assert checks["rows"].detail.startswith("11 tables (273 rows), as recorded; "
                                            "1 materialized view refreshed"), checks["rows"]
    schema = checks["schema"]
    assert schema.status == "warn", schema
    assert schema.objects == [
        "column order inv.click_events differs",
        "foreign key copy name inv.orders_2026 copy of inv.orders.orders_customer to "
        "inv.customers differs"]
    assert "inheritance child's column order" in schema.detail
    assert "WARN  facts      schema" in text and "inv.click_events" in text
    assert "PASSED facts drill" in text

    # The restore holds the source's rows, column by column name.
    restored = _restore(repo, pg_cluster, new_name())
    assert _rows_by_name(restored) == _rows_by_name(source)


def test_a_real_schema_difference_fails_naming_the_object(
    make_db: Callable[..., str], pg_cluster: EphemeralCluster, new_name: Callable[[], str],
    tmp_path: Path,
) -> None:
    source = _regression_db(make_db)
    repo = tmp_path / "repo"
    _cli("backup", "--dbname", source, "--repo", f"file://{repo}", "--no-globals")
    restored = _restore(repo, pg_cluster, new_name())
    assert _rows_by_name(restored) == _rows_by_name(source)
    # The recorded facts say a column had another default than the dump restores: what a
    # restore that lost a default would show.
    (path,) = repo.glob("manifests/*/*.json")
    manifest = json.loads(path.read_text())
    entries = manifest["facts"]["schema_fingerprint"]["entries"]
    entries["columns"]["inv.items.state"] = "0" * 16
    entries["child_column_order"]["inv.click_events"] = "0" * 16  # still only a warning
    path.write_text(json.dumps(manifest))
    report, text = _drill(repo, pg_cluster.url(), expect=10)
    schema = _checks(report)["schema"]
    assert schema.status == "fail"
    assert schema.objects == ["column inv.items.state differs"], schema
    assert "FAIL  facts      schema" in text and "column inv.items.state differs" in text


# -- section 6: facts are exactly the dump, under concurrent DDL and lock timeouts -------------


@contextlib.contextmanager
def _ddl_churn(url: str) -> Iterator[list[int]]:
    """A thread creating a table ddl_<k> with k rows every 20 ms, and dropping an older one
    every 0.5 s (pg_dump fails when a drop lands between its snapshot and its locks)."""
    stop = threading.Event()
    made: list[int] = []

    def churn() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = 0")
            k = 0
            while not stop.is_set():
                k += 1
                with conn.transaction():
                    conn.execute(sql.SQL("CREATE TABLE {} (k int)").format(
                        sql.Identifier(f"ddl_{k}")))
                    conn.execute(sql.SQL("INSERT INTO {} SELECT generate_series(1, %s)").format(
                        sql.Identifier(f"ddl_{k}")), (k,))
                made.append(k)
                if k % 25 == 0:
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                        sql.Identifier(f"ddl_{k - 20}")))
                time.sleep(0.02)

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    try:
        yield made
    finally:
        stop.set()
        worker.join(60)


def _backup_until_it_lands(url: str, repo: Path,
                           tries: int = 10) -> subprocess.CompletedProcess[str]:
    """pg_dump itself fails when a table goes between the snapshot and its lock: then the
    backup must fail with one line and leave nothing; the next try normally lands."""
    for _ in range(tries):
        proc = _cli("backup", "--dbname", url, "--repo", f"file://{repo}", "--no-globals",
                    expect=None)
        if proc.returncode == 0:
            return proc
        assert proc.returncode == 8, proc.stderr
        one_line_error(proc)
        assert not list(repo.glob("manifests/*/*.json"))
    raise AssertionError("no backup landed under DDL churn")


def test_backup_under_concurrent_ddl_records_exactly_what_the_dump_holds(
    make_db: Callable[..., str], pg_cluster: EphemeralCluster, new_name: Callable[[], str],
    tmp_path: Path,
) -> None:
    source = make_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE stable (x int); INSERT INTO stable"
                     " SELECT generate_series(1, 1000000)")
    repo = tmp_path / "repo"
    with _ddl_churn(source) as made:
        while len(made) < 20:
            time.sleep(0.01)
        proc = _backup_until_it_lands(source, repo)
    manifest = _manifest(repo)
    skipped = {t.name for t in manifest.facts.unrecorded_tables()}
    # Every uncounted table is said in the output and the manifest, by name.
    for name in skipped:
        assert any(name in w for w in manifest.warnings), manifest.warnings
        assert name in proc.stderr, proc.stderr
    counted = {t.name: t.rows for t in manifest.facts.tables}
    restored = _restore(repo, pg_cluster, new_name())
    rows = _rows_by_name(restored)
    in_dump = {name.split(".", 1)[1] for name in rows}
    # The facts' table set is the dump's: each table counted, or named as not counted.
    assert in_dump == set(counted) | skipped, (in_dump, counted, skipped)
    for name in in_dump - {"stable"}:
        k = int(name.removeprefix("ddl_"))
        assert rows[f"public.{name}"].startswith(f"{k}:"), (name, rows[f"public.{name}"])
        if name in counted:
            assert counted[name] == k
    assert counted["stable"] == 1000000
    assert _rows_by_name(source)["public.stable"] == rows["public.stable"]

    report, _ = _drill(repo, pg_cluster.url())
    assert report.passed, report.checks
    checks = _checks(report)
    assert checks["rows"].status == "pass"
    assert {n.removeprefix("rows public.") for n, c in checks.items()
            if n.startswith("rows ") and c.status == "skip"} == skipped


def _waiting(url: str, table: str, application: str = "", pid: int = 0) -> bool:
    """A backend waits for a lock on ``table``: one of ``application``'s, or ``pid``."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.relation = %s::regclass AND NOT l.granted"
            " AND (a.application_name = %s OR a.pid = %s)",
            (table, application, pid)).fetchone()
    return bool(row and row[0])


def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_count_that_times_out_on_a_lock_is_a_warning_and_a_named_skip(
    make_db: Callable[..., str], pg_cluster: EphemeralCluster, new_name: Callable[[], str],
    tmp_path: Path,
) -> None:
    source = make_db()
    dbname = source.rsplit("/", 1)[1]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE busy (x int); INSERT INTO busy SELECT generate_series(1, 50);"
                     "CREATE TABLE calm (x int); INSERT INTO calm SELECT generate_series(1, 70)")
        # A team's own bound on lock waits, which the counts honour (pg_dump does not).
        conn.execute(sql.SQL("ALTER DATABASE {} SET lock_timeout = '300ms'").format(
            sql.Identifier(dbname)))
    repo = tmp_path / "repo"
    first = psycopg.connect(source, autocommit=True)
    second = psycopg.connect(source, autocommit=True)
    second.execute("SET lock_timeout = 0")
    try:
        first.execute("BEGIN; LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
        proc = subprocess.Popen(
            [PGVAULT, "backup", "--dbname", source, "--repo", f"file://{repo}", "--no-globals"],
            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _until(lambda: _waiting(source, "busy", "pg_dump"))
            # A migration queues for the table behind pg_dump, and holds it past the dump.
            locker = threading.Thread(target=second.execute, args=(
                "BEGIN; LOCK TABLE busy IN ACCESS EXCLUSIVE MODE",), daemon=True)
            locker.start()
            _until(lambda: _waiting(source, "busy", pid=second.info.backend_pid))
            time.sleep(1.0)  # the counts time out meanwhile
            first.execute("COMMIT")
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        locker.join(30)
    finally:
        with contextlib.suppress(Exception):
            second.execute("COMMIT")
        first.close()
        second.close()
    assert proc.returncode == 0, err
    assert 'rows of public.busy not counted (canceling statement due to lock timeout)' in err
    manifest = _manifest(repo)
    assert [(t.name, t.reason) for t in manifest.facts.unrecorded_tables()] == [
        ("busy", "canceling statement due to lock timeout")]
    assert any("public.busy" in w for w in manifest.warnings)
    assert [(t.name, t.rows) for t in manifest.facts.tables] == [("calm", 70)]
    assert "1 table (70 rows), 1 table not counted" in out

    restored = _restore(repo, pg_cluster, new_name())
    assert _rows_by_name(restored) == _rows_by_name(source)
    report, text = _drill(repo, pg_cluster.url())
    assert report.passed, report.checks
    checks = _checks(report)
    assert checks["rows"].status == "pass"
    assert checks["rows public.busy"].status == "skip"
    assert "lock timeout" in checks["rows public.busy"].detail
    assert "SKIP  facts      rows public.busy" in text



def test_an_encrypted_backup_names_no_object_in_its_manifest_and_its_drill_still_does(
    make_db: Callable[..., str], pg_cluster: EphemeralCluster, new_name: Callable[[], str],
    tmp_path: Path,
) -> None:
    source = _regression_db(make_db)
    with psycopg.connect(source, autocommit=True) as conn:
        columns = {name for (name,) in conn.execute(
            "SELECT attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'inv' AND a.attnum > 0").fetchall()}
    key = tmp_path / "key.txt"
    recipient = pgvault("keygen", "--output", str(key)).stdout.strip()
    repo = tmp_path / "repo"
    env = {"PGVAULT_AGE_RECIPIENTS": recipient}
    pgvault("backup", "--dbname", source, "--repo", f"file://{repo}", "--no-globals", env=env)
    (path,) = repo.glob("manifests/*/*.json")
    stored = json.loads(path.read_text())["facts"]["schema_fingerprint"]
    assert stored["sealed_key"], "the entries' key travels encrypted beside them"
    names = {name for kind in stored["entries"].values() for name in kind}
    assert names and all(len(name) == 16 and int(name, 16) >= 0 for name in names), names
    # Table names (and row counts) are facts in clear text by design; no column name is.
    tables = {t["name"] for t in json.loads(path.read_text())["facts"]["tables"]}
    words = {name for name in columns if len(name) > 4 and not any(name in t for t in tables)}
    assert words and not [w for w in words if w in path.read_text()], "a column name in clear"

    proc = pgvault("verify", "--level", "facts", "--server", pg_cluster.url(), "--json",
                   "--identity-file", str(key), "--repo", f"file://{repo}", env=env)
    report = from_json(VerifyReport, proc.stdout)
    assert report.passed, report.checks
    schema = _checks(report)["schema"]
    assert schema.status == "warn", schema
    assert "column order inv.click_events differs" in schema.objects, schema.objects
    # Without the identity the drill cannot even restore: nothing is compared blind.
    pgvault("verify", "--level", "facts", "--server", pg_cluster.url(), "--repo",
            f"file://{repo}", env=env, expect=11)

    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--identity-file",
            str(key), "--repo", f"file://{repo}", env=env)
    assert _rows_by_name(pg_cluster.url(target)) == _rows_by_name(source)
