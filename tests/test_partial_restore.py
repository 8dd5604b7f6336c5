"""restore --schema/--table: the selected objects come back with what they need, or it fails.

A source database with schemas public, sales and "Weird.Schema" (serial and identity keys,
an enum, foreign keys, an index, a check, a trigger and its function, comments, grants, a
partitioned table, views) is backed up through the CLI and restored in parts, streamed (-j 1)
and spooled (-j 2); every restored table is compared with its source: columns and defaults,
constraints, indexes, triggers, comments, grants, rows, and the next value of its sequences.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cli_runner import one_line_error, pgvault
from dbcompare import _table_hash
from fixtures_pg import NewName
from pgvault.pg.cluster import EphemeralCluster
from test_split_dump import SPLIT_SQL, split_backup

READER = "pgvault_partial_reader"

SOURCE_SQL = f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER}') THEN
    CREATE ROLE {READER};
  END IF;
END $$;
CREATE SCHEMA sales;
COMMENT ON SCHEMA sales IS 'what we sold';
GRANT USAGE ON SCHEMA sales TO {READER};
CREATE SCHEMA "Weird.Schema";
CREATE TYPE sales.status AS ENUM ('new', 'paid');

CREATE TABLE public.customers (id serial PRIMARY KEY, name text NOT NULL UNIQUE);
COMMENT ON TABLE public.customers IS 'who buys';
CREATE TABLE public.other (id int PRIMARY KEY);

CREATE TABLE sales.orders (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  customer_id int REFERENCES public.customers (id),
  amount numeric CHECK (amount >= 0),
  st sales.status NOT NULL DEFAULT 'new',
  created date DEFAULT '2026-01-01');
COMMENT ON TABLE sales.orders IS 'orders';
COMMENT ON COLUMN sales.orders.amount IS 'in cents';
GRANT SELECT ON sales.orders TO {READER};
CREATE INDEX orders_created ON sales.orders (created);

CREATE TABLE sales.lines (
  id serial PRIMARY KEY,
  order_id bigint NOT NULL REFERENCES sales.orders (id),
  qty int);
CREATE INDEX lines_order ON sales.lines (order_id);
CREATE FUNCTION sales.default_qty() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN NEW.qty := coalesce(NEW.qty, 1); RETURN NEW; END$$;
CREATE TRIGGER lines_qty BEFORE INSERT ON sales.lines
  FOR EACH ROW EXECUTE FUNCTION sales.default_qty();

CREATE VIEW sales.big_orders AS SELECT id, amount FROM sales.orders WHERE amount > 10;
CREATE VIEW sales.customer_orders AS
  SELECT c.name, o.amount FROM sales.orders o JOIN public.customers c ON c.id = o.customer_id;

CREATE TABLE sales.events (id int, at date NOT NULL, PRIMARY KEY (id, at))
  PARTITION BY RANGE (at);
CREATE TABLE sales.events_2025 PARTITION OF sales.events
  FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE sales.events_2026 PARTITION OF sales.events
  FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');

CREATE TABLE "Weird.Schema"."T x" (id serial PRIMARY KEY, "Val.ue" text, "UP" int);
COMMENT ON COLUMN "Weird.Schema"."T x"."Val.ue" IS 'dotted';
CREATE TABLE "Weird.Schema".orders (id int PRIMARY KEY);

INSERT INTO public.customers (name) SELECT 'c' || g FROM generate_series(1, 30) g;
INSERT INTO public.other SELECT generate_series(1, 5);
INSERT INTO sales.orders (customer_id, amount)
  SELECT 1 + g % 30, g FROM generate_series(1, 200) g;
INSERT INTO sales.lines (order_id, qty) SELECT 1 + g % 200, g FROM generate_series(1, 500) g;
INSERT INTO sales.events SELECT g, DATE '2025-06-01' + g * 3 FROM generate_series(1, 100) g;
INSERT INTO "Weird.Schema"."T x" ("Val.ue", "UP") SELECT 'v' || g, g FROM generate_series(1, 40) g;
INSERT INTO "Weird.Schema".orders SELECT generate_series(1, 3);
-- Sequences ahead of the rows: a restore must bring their values, not max(id).
SELECT nextval('public.customers_id_seq') FROM generate_series(1, 7);
DELETE FROM sales.lines WHERE id > 490;
SELECT setval('"Weird.Schema"."T x_id_seq"', 1000);
"""

TABLE_FACTS = """
SELECT json_build_object(
  'columns', (SELECT json_agg(json_build_array(a.attname, format_type(a.atttypid, a.atttypmod),
                a.attnotnull, a.attidentity, pg_get_expr(d.adbin, d.adrelid),
                col_description(a.attrelid, a.attnum)) ORDER BY a.attnum)
              FROM pg_attribute a LEFT JOIN pg_attrdef d
                ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
  'constraints', (SELECT json_agg(json_build_array(conname, pg_get_constraintdef(oid))
                  ORDER BY conname) FROM pg_constraint WHERE conrelid = c.oid),
  'indexes', (SELECT json_agg(pg_get_indexdef(indexrelid)
                ORDER BY pg_get_indexdef(indexrelid)) FROM pg_index WHERE indrelid = c.oid),
  'triggers', (SELECT json_agg(pg_get_triggerdef(oid) ORDER BY tgname) FROM pg_trigger
               WHERE tgrelid = c.oid AND NOT tgisinternal),
  'comment', obj_description(c.oid, 'pg_class'),
  'acl', c.relacl::text,
  'partitions', (SELECT json_agg(i.inhrelid::regclass::text
                   ORDER BY i.inhrelid::regclass::text) FROM pg_inherits i
                 WHERE i.inhparent = c.oid),
  'sequences', (SELECT json_agg(s.seqrelid::regclass::text
                  ORDER BY s.seqrelid::regclass::text) FROM pg_sequence s
                JOIN pg_depend dep ON dep.objid = s.seqrelid AND dep.refobjid = c.oid
                AND dep.deptype IN ('a', 'i')))
FROM pg_class c WHERE c.oid = %s::regclass
"""

USER_RELATIONS = """
SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1
"""


@pytest.fixture(scope="module")
def backed_up(pg_cluster: EphemeralCluster,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """The source database, a repository holding one CLI backup of it, and its id."""
    name = f"partial_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
            sql.Identifier(name)))
    url = pg_cluster.url(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SOURCE_SQL)
    repo = f"file://{tmp_path_factory.mktemp('partial') / 'repo'}"
    backup_id = json.loads(pgvault("backup", "--dbname", url, "--repo", repo, "--json").stdout)
    return url, repo, backup_id["id"]


def restore(backed: tuple[str, str, str], cluster: EphemeralCluster, target: str, jobs: str,
            *selection: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    return pgvault("restore", backed[2], "--to", target, "--dbname", cluster.url(),
                   "--repo", backed[1], "-j", jobs, *selection, expect=expect)


def facts(url: str, table: str) -> dict[str, Any]:
    """What a table is, as the catalog says; its rows' hash; its sequences' next values."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(TABLE_FACTS, (table,)).fetchone()
        assert row is not None
        found: dict[str, Any] = row[0]
        found["rows"] = _table_hash(conn, sql.SQL(table))
        found["next"] = {seq: next_value(conn, seq) for seq in found["sequences"] or []}
    return found


def next_value(conn: psycopg.Connection[Any], sequence: str) -> int:
    """The value nextval would give, without taking it."""
    row = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(
        sql.SQL(sequence))).fetchone()
    assert row is not None
    return int(row[0]) + (1 if row[1] else 0)


def relations(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return sorted(r[0] for r in conn.execute(USER_RELATIONS).fetchall())


def same_tables(source: str, target: str, *tables: str,
                without: dict[str, set[str]] | None = None) -> None:
    """Each table as in the source, less the constraints ``without`` names for it."""
    for table in tables:
        want, got = facts(source, table), facts(target, table)
        gone = (without or {}).get(table, set())
        want["constraints"] = [c for c in want["constraints"] or [] if c[0] not in gone] or None
        assert got == want, table


def databases(cluster: EphemeralCluster) -> set[str]:
    with psycopg.connect(cluster.url()) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def test_names_parse_as_sql_reads_them() -> None:
    from pgvault.pg.archive import parse_name  # here: the old code had none (see the report)

    assert parse_name("sales.orders") == [("sales", "sales"), ("orders", "orders")]
    assert parse_name('"Weird.Schema"."T x"') == [("Weird.Schema",) * 2, ("T x",) * 2]
    assert parse_name('Sales."Odd ""q"""') == [("sales", "Sales"), ('Odd "q"',) * 2]
    for bad in ('"open', "a..b", ".a", "a."):
        with pytest.raises(ValueError):
            parse_name(bad)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_schema_comes_back_with_itself_and_what_its_tables_need(
    backed_up: tuple[str, str, str], pg_cluster: EphemeralCluster, new_name: NewName, jobs: str
) -> None:
    source = backed_up[0]
    target = new_name()
    out = restore(backed_up, pg_cluster, target, jobs, "--schema", "sales")
    url = pg_cluster.url(target)
    assert relations(url) == [r for r in relations(source) if r.startswith("sales.")
                              and r != "sales.customer_orders"]
    # The foreign key to public.customers and the view reading it need a table not restored:
    # left out, and each named.
    assert "orders_customer_id_fkey on sales.orders (needs table public.customers)" in out.stderr
    assert "view sales.customer_orders (needs table public.customers)" in out.stderr
    same_tables(source, url, "sales.orders", "sales.lines", "sales.events",
                "sales.events_2025", "sales.events_2026",
                without={"sales.orders": {"orders_customer_id_fkey"}})
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT obj_description('sales'::regnamespace, 'pg_namespace'), "
                            f"has_schema_privilege('{READER}', 'sales', 'USAGE')"
                            ).fetchone() == ("what we sold", True)
        # The trigger's function came along; serial and identity continue where they were.
        assert conn.execute("INSERT INTO sales.lines (order_id) VALUES (1) RETURNING id, qty"
                            ).fetchone() == (501, 1)
        assert conn.execute("INSERT INTO sales.orders (amount) VALUES (1) RETURNING id"
                            ).fetchone() == (201,)
        assert conn.execute("SELECT count(*) FROM sales.big_orders").fetchone() == (190,)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_tables_come_back_qualified_quoted_and_with_their_sequences(
    backed_up: tuple[str, str, str], pg_cluster: EphemeralCluster, new_name: NewName, jobs: str
) -> None:
    """Two --table flags: a serial table in public (the README's shape), a quoted one."""
    source = backed_up[0]
    target = new_name()
    out = restore(backed_up, pg_cluster, target, jobs, "--table", "customers",
                  "--table", '"Weird.Schema"."T x"')
    url = pg_cluster.url(target)
    assert relations(url) == sorted(['"Weird.Schema"."T x"', '"Weird.Schema"."T x_id_seq"',
                                     "public.customers", "public.customers_id_seq"])
    same_tables(source, url, "public.customers", '"Weird.Schema"."T x"')
    with psycopg.connect(url, autocommit=True) as conn:
        # nextval gives the source's next value: 30 rows, 7 more values taken.
        assert conn.execute("SELECT nextval(pg_get_serial_sequence('customers', 'id'))"
                            ).fetchone() == (38,)
        assert conn.execute("""SELECT nextval(pg_get_serial_sequence('"Weird.Schema"."T x"',"""
                            " 'id'))").fetchone() == (1001,)
    # A view of customers is not a part of it: named, so it can be asked for.
    assert "view sales.customer_orders (depends on table public.customers" in out.stderr


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_schema_qualified_table_brings_its_schema_type_and_identity(
    backed_up: tuple[str, str, str], pg_cluster: EphemeralCluster, new_name: NewName, jobs: str
) -> None:
    source = backed_up[0]
    target = new_name()
    out = restore(backed_up, pg_cluster, target, jobs, "--table", "sales.orders")
    url = pg_cluster.url(target)
    assert relations(url) == ["sales.orders", "sales.orders_id_seq"]
    same_tables(source, url, "sales.orders", without={"sales.orders": {"orders_customer_id_fkey"}})
    assert "orders_customer_id_fkey on sales.orders (needs table public.customers)" in out.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT obj_description('sales'::regnamespace, 'pg_namespace')"
                            ).fetchone() == ("what we sold",)
        assert conn.execute("INSERT INTO sales.orders (amount) VALUES (5) RETURNING id, st"
                            ).fetchone() == (201, "new")
    # Named with the table it reads, a view comes too; a foreign key between two restored
    # tables is kept.
    target = new_name()
    restore(backed_up, pg_cluster, target, jobs, "--table", "sales.orders", "--table",
            "sales.big_orders", "--table", "sales.lines", "--table", "public.customers")
    url = pg_cluster.url(target)
    same_tables(source, url, "sales.orders", "sales.lines", "public.customers")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM sales.big_orders").fetchone() == (190,)


def test_a_partitioned_table_brings_its_partitions(
    backed_up: tuple[str, str, str], pg_cluster: EphemeralCluster, new_name: NewName
) -> None:
    source = backed_up[0]
    target = new_name()
    restore(backed_up, pg_cluster, target, "2", "--table", "sales.events")
    url = pg_cluster.url(target)
    assert relations(url) == ["sales.events", "sales.events_2025", "sales.events_2026"]
    same_tables(source, url, "sales.events", "sales.events_2025", "sales.events_2026")
    # One partition alone is restored as a table of its own, and says so.
    target = new_name()
    out = restore(backed_up, pg_cluster, target, "1", "--table", "sales.events_2026")
    assert relations(pg_cluster.url(target)) == ["sales.events_2026"]
    assert "table attach events_2026 in schema sales (needs table sales.events)" in out.stderr


def test_an_unqualified_name_in_two_schemas_is_ambiguous_unless_a_schema_says(
    backed_up: tuple[str, str, str], pg_cluster: EphemeralCluster, new_name: NewName
) -> None:
    before = databases(pg_cluster)
    proc = restore(backed_up, pg_cluster, new_name(), "1", "--table", "orders", expect=2)
    assert 'is in schemas Weird.Schema, sales: name one' in one_line_error(proc)
    assert databases(pg_cluster) == before
    target = new_name()
    restore(backed_up, pg_cluster, target, "1", "--schema", "Weird.Schema", "--table", "orders")
    assert relations(pg_cluster.url(target)) == ['"Weird.Schema".orders']


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_selection_that_matches_nothing_fails_before_creating_anything(
    backed_up: tuple[str, str, str], pg_cluster: EphemeralCluster, new_name: NewName, jobs: str,
    tmp_path: Path
) -> None:
    before = databases(pg_cluster)
    target = new_name()
    spools = tmp_path / "spools"
    spools.mkdir()
    proc = pgvault("restore", backed_up[2], "--to", target, "--dbname", pg_cluster.url(),
                   "--repo", backed_up[1], "-j", jobs, "--schema", "nosuch", "--table",
                   "sales.ordrs", expect=2, env={"TMPDIR": str(spools)})
    line = one_line_error(proc)
    assert "no schema nosuch" in line and "no table sales.ordrs" in line, line
    assert "did you mean sales.orders" in line
    assert databases(pg_cluster) == before  # neither the target nor a pgvault_tmp_ one
    assert list(spools.iterdir()) == []
    # A table that cannot exist without another one not asked for: named, nothing made.
    proc = restore(backed_up, pg_cluster, new_name(), jobs, "--table", "sales.customer_orders",
                   expect=2)
    assert "--table sales.customer_orders needs table" in one_line_error(proc)
    assert databases(pg_cluster) == before


@pytest.fixture
def split_db(rich_db: str) -> str:
    """test_split_dump's tables: "a*b" and "Odd ""Name"".x" big enough to be taken apart."""
    with psycopg.connect(rich_db, autocommit=True) as conn:
        conn.execute(SPLIT_SQL)
        conn.execute("ANALYZE")
    return rich_db


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_split_backup_restores_a_table_taken_apart_and_skips_the_other_parts(
    split_db: str, tmp_path: Path, new_name: NewName, pg_cluster: EphemeralCluster, jobs: str
) -> None:
    """Format 2: "a*b"'s rows are in db.data-1.dump, axb's in the main archive."""
    root = tmp_path / "repo"
    manifest = split_backup(split_db, root)
    assert [a.name for a in manifest.artifacts][:3] == [
        "db.dump", "db.data-1.dump", "db.data-2.dump"]
    target = new_name()
    out = pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(),
                  "--repo", f"file://{root}", "-j", jobs, "--table", '"a*b"', "--table", "axb")
    url = pg_cluster.url(target)
    assert relations(url) == sorted(["public.axb", 'public."a*b"', 'public."a*b_id_seq"'])
    same_tables(split_db, url, "public.axb", 'public."a*b"')
    with psycopg.connect(url) as conn:
        assert conn.execute("""SELECT nextval(pg_get_serial_sequence('"a*b"', 'id'))"""
                            ).fetchone() == (40001,)
    # The foreign key of the table not restored ("Odd ""Name"".x") is its own, not named.
    assert "Odd" not in out.stderr


def test_restore_help_teaches_the_selection() -> None:
    text = pgvault("restore", "--help").stdout
    assert "--table sales.orders" in text and "--schema sales" in text

