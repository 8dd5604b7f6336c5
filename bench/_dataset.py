"""Build the synthetic shop dataset server-side with SQL, in parallel chunks."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import _words as words
import psycopg
from _cluster import PG_BIN
from psycopg import sql

# Bump when the generated data changes, so stale caches are not reused.
DATASET_VERSION = 2
SHOP_DB = "bench_shop"
PGBENCH_DB = "bench_pgbench"

# Rows per customer; bytes per customer (heap + indexes) and the size of an empty
# database, both measured on PostgreSQL 15 (100 MB and 1 GB builds).
ORDERS_PER_CUSTOMER = 4
EVENTS_PER_CUSTOMER = 6
BYTES_PER_CUSTOMER = 4_830
EMPTY_DB_BYTES = 7_700_000
CHUNK_ROWS = 25_000
PGBENCH_MB_PER_SCALE = 15.0  # plus EMPTY_DB_BYTES

_VOCAB = words.vocabulary()
_N = len(_VOCAB)
_SLOT = words.VOCAB_SLOT

SCHEMA = """
CREATE TABLE customers (
    id bigint NOT NULL, first_name text NOT NULL, last_name text NOT NULL,
    email text NOT NULL, phone text, street text NOT NULL, city text NOT NULL,
    postal_code text NOT NULL, country char(2) NOT NULL, created_at timestamptz NOT NULL,
    loyalty_points integer NOT NULL, marketing_opt_in boolean NOT NULL, notes text);
CREATE TABLE orders (
    id bigint NOT NULL, customer_id bigint NOT NULL, status text NOT NULL,
    ordered_at timestamptz NOT NULL, shipped_at timestamptz, total numeric(12,2) NOT NULL,
    currency char(3) NOT NULL, shipping_address text NOT NULL, gift_message text);
CREATE TABLE order_items (
    order_id bigint NOT NULL, line_no smallint NOT NULL, sku text NOT NULL,
    product_name text NOT NULL, quantity integer NOT NULL, unit_price numeric(10,2) NOT NULL,
    discount_pct numeric(5,2) NOT NULL);
CREATE TABLE events (
    id bigint NOT NULL, customer_id bigint, occurred_at timestamptz NOT NULL,
    kind text NOT NULL, session_id uuid NOT NULL, payload jsonb NOT NULL);
"""

INDEXES = [
    "ALTER TABLE customers ADD PRIMARY KEY (id)",
    "ALTER TABLE orders ADD PRIMARY KEY (id)",
    "ALTER TABLE order_items ADD PRIMARY KEY (order_id, line_no)",
    "ALTER TABLE events ADD PRIMARY KEY (id)",
    "CREATE UNIQUE INDEX customers_email_key ON customers (email)",
    "CREATE INDEX orders_customer_id_idx ON orders (customer_id)",
    "CREATE INDEX orders_ordered_at_idx ON orders (ordered_at)",
    "CREATE INDEX events_customer_occurred_idx ON events (customer_id, occurred_at)",
]
FOREIGN_KEYS = [
    ("orders", "orders_customer_fk", "customer_id", "customers"),
    ("order_items", "order_items_order_fk", "order_id", "orders"),
    ("events", "events_customer_fk", "customer_id", "customers"),
]


def _word(zipf: float = 3.0) -> str:
    """SQL for one random vocabulary word, Zipf-like (low ranks are frequent)."""
    return (
        f"rtrim(convert_from(substring(%(vocab)s::bytea from "
        f"floor(power(random(), {zipf}) * {_N})::int * {_SLOT} + 1 for {_SLOT}), 'UTF8'))"
    )


def _fixed_word(expr: str) -> str:
    """SQL for the vocabulary word chosen by an integer expression (deterministic)."""
    return (
        f"rtrim(convert_from(substring(%(vocab)s::bytea from "
        f"(({expr}) %% {_N})::int * {_SLOT} + 1 for {_SLOT}), 'UTF8'))"
    )


def _words(lo: int, hi: int) -> str:
    """SQL for lo..hi random words joined by spaces (extra words each appear with p=0.5)."""
    parts = [_word() for _ in range(lo)]
    parts += [f"CASE WHEN random() < 0.5 THEN {_word()} END" for _ in range(hi - lo)]
    return f"concat_ws(' ', {', '.join(parts)})"


def _sentence(lo: int, hi: int) -> str:
    """SQL for a sentence: a capitalised run of random words ending in a full stop."""
    return f"initcap_first({_words(lo, hi)}) || '.'"


def _pick(param: str) -> str:
    """SQL for a uniformly random element of the text[] parameter named param."""
    return f"(%({param})s::text[])[1 + floor(random() * cardinality(%({param})s::text[]))::int]"


def _ts(start: str = "2019-01-01", years: int = 6) -> str:
    """SQL for a random timestamptz in [start, start + years)."""
    return f"(timestamptz '{start}' + random() * interval '{years} years')"


HELPERS = """
CREATE FUNCTION initcap_first(s text) RETURNS text LANGUAGE sql IMMUTABLE
    RETURN upper(left(s, 1)) || substr(s, 2);
"""

CUSTOMERS = f"""
INSERT INTO customers
SELECT g, f, l,
    lower(f || '.' || l || g::text || '@' || {_pick("domains")}),
    CASE WHEN random() < 0.9 THEN '+1-' || lpad((floor(random() * 1e3))::int::text, 3, '0')
        || '-' || lpad((floor(random() * 1e7))::int::text, 7, '0') END,
    (1 + floor(random() * 9999))::int::text || ' ' || {_pick("streets")} || ' '
        || {_pick("kinds")},
    {_pick("cities")}, lpad((floor(random() * 99999))::int::text, 5, '0'),
    {_pick("countries")}, {_ts()},
    floor(power(random(), 2) * 20000)::int, random() < 0.35,
    CASE WHEN random() < 0.5 THEN {_sentence(6, 24)} END
FROM (SELECT g, {_pick("first")} AS f, {_pick("last")} AS l
      FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g OFFSET 0) s
"""

ORDERS = f"""
INSERT INTO orders
SELECT g, 1 + floor(random() * %(customers)s)::bigint, st, t,
    CASE WHEN st IN ('shipped', 'delivered', 'returned')
        THEN t + random() * interval '6 days' END,
    round((5 + power(random(), 2) * 600)::numeric, 2),
    (ARRAY['USD','USD','USD','EUR','EUR','GBP','CAD','AUD'])[1 + floor(random() * 8)::int],
    (1 + floor(random() * 9999))::int::text || ' ' || {_pick("streets")} || ' '
        || {_pick("kinds")} || ', ' || {_pick("cities")} || ' '
        || lpad((floor(random() * 99999))::int::text, 5, '0'),
    CASE WHEN random() < 0.08 THEN {_sentence(4, 14)} END
FROM (SELECT g, {_ts()} AS t,
        (ARRAY['delivered','delivered','delivered','delivered','shipped','pending',
               'cancelled','returned'])[1 + floor(random() * 8)::int] AS st
      FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g OFFSET 0) s
"""

ORDER_ITEMS = f"""
INSERT INTO order_items
SELECT o, ln, 'SKU-' || lpad(k::text, 6, '0'),
    initcap({_fixed_word("k * 7919")} || ' ' || {_fixed_word("k * 104729 + 17")}
        || ' ' || {_fixed_word("k * 31 + 5")}),
    1 + floor(power(random(), 4) * 6)::int,
    round((1 + (k * 37 %% 50000) / 100.0)::numeric, 2),
    CASE WHEN random() < 0.2 THEN round((random() * 40)::numeric, 2) ELSE 0 END
FROM (SELECT o, ln, 1 + floor(power(random(), 2) * 50000)::bigint AS k
      FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) o,
           generate_series(1, 1 + ((o * 7919) %% 5)::int) ln OFFSET 0) s
"""

EVENTS = f"""
INSERT INTO events
SELECT g, CASE WHEN random() < 0.2 THEN NULL
              ELSE 1 + floor(random() * %(customers)s)::bigint END,
    {_ts()}, kind, md5(random()::text)::uuid,
    jsonb_strip_nulls(jsonb_build_object(
        'path', '/products/' || (1 + floor(power(random(), 2) * 50000))::int,
        'ip', concat_ws('.', floor(random() * 223 + 1)::int, floor(random() * 256)::int,
                        floor(random() * 256)::int, floor(random() * 256)::int),
        'user_agent', {_pick("agents")},
        'referrer', CASE WHEN random() < 0.5 THEN {_pick("referrers")} END,
        'query', CASE WHEN kind = 'search' THEN {_words(1, 4)} END,
        'review', CASE WHEN kind = 'review' THEN jsonb_build_object(
            'stars', 1 + floor(random() * 5)::int, 'text', {_sentence(10, 40)}) END,
        'cart', CASE WHEN kind IN ('add_to_cart', 'checkout') THEN jsonb_build_array(
            1 + floor(random() * 50000)::int, 1 + floor(random() * 50000)::int) END,
        'duration_ms', floor(power(random(), 3) * 30000)::int))
FROM (SELECT g, (ARRAY['page_view','page_view','page_view','page_view','search','search',
                       'add_to_cart','checkout','login','review'])
                  [1 + floor(random() * 10)::int] AS kind
      FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g OFFSET 0) s
"""

AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "TrendifyApp/3.2.1 (iOS 17.4)",
]
REFERRERS = [
    "https://www.google.com/", "https://www.bing.com/", "https://duckduckgo.com/",
    "https://www.facebook.com/", "https://t.co/", "https://newsletter.example.com/",
]


@dataclass(frozen=True)
class Plan:
    """Row counts for one dataset size."""

    customers: int
    orders: int
    order_item_orders: int
    events: int

    @classmethod
    def for_size(cls, size_mb: int) -> Plan:
        """Choose row counts so the database is about size_mb on disk."""
        customers = max(1_000, (size_mb * 1024 * 1024 - EMPTY_DB_BYTES) // BYTES_PER_CUSTOMER)
        orders = customers * ORDERS_PER_CUSTOMER
        return cls(customers, orders, orders, customers * EVENTS_PER_CUSTOMER)


def _params() -> dict[str, Any]:
    """Constant query parameters shared by every chunk."""
    return {
        "vocab": words.vocab_bytes(_VOCAB),
        "first": words.FIRST_NAMES,
        "last": words.LAST_NAMES,
        "cities": words.CITIES,
        "streets": words.STREETS,
        "kinds": words.STREET_KINDS,
        "countries": words.COUNTRIES,
        "domains": words.EMAIL_DOMAINS,
        "agents": AGENTS,
        "referrers": REFERRERS,
    }


def _chunks(total: int, size: int = CHUNK_ROWS) -> Iterable[tuple[int, int]]:
    """Split 1..total into inclusive ranges of at most size rows."""
    for lo in range(1, total + 1, size):
        yield lo, min(total, lo + size - 1)


def _parallel(url: str, jobs: list[Callable[[psycopg.Connection[Any]], None]]) -> None:
    """Run jobs on a pool of connections, one per CPU, failing on the first error."""
    workers = max(2, min(8, os.cpu_count() or 2))

    def run(job: Callable[[psycopg.Connection[Any]], None]) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            job(conn)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for fut in [pool.submit(run, j) for j in jobs]:
            fut.result()


def build_shop(admin_url: str, db_url: str, size_mb: int, log: Callable[[str], None]) -> Plan:
    """Create SHOP_DB and fill it to about size_mb; returns the row counts used."""
    plan = Plan.for_size(size_mb)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(SHOP_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SHOP_DB)))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(HELPERS)
        conn.execute(SCHEMA)
    params = _params()
    jobs: list[Callable[[psycopg.Connection[Any]], None]] = []
    tables = [
        (EVENTS, plan.events, CHUNK_ROWS),
        (ORDER_ITEMS, plan.order_item_orders, CHUNK_ROWS // 3),
        (ORDERS, plan.orders, CHUNK_ROWS),
        (CUSTOMERS, plan.customers, CHUNK_ROWS),
    ]
    seed = 0
    for query, total, size in tables:
        for lo, hi in _chunks(total, size):
            seed += 1
            jobs.append(_insert_job(query, {**params, "lo": lo, "hi": hi,
                                            "customers": plan.customers}, seed))
    t0 = time.monotonic()
    log(f"loading {plan.customers:,} customers, {plan.orders:,} orders, "
        f"~{plan.orders * 3:,} order items, {plan.events:,} events in {len(jobs)} chunks")
    _parallel(db_url, jobs)
    log(f"loaded in {time.monotonic() - t0:.1f}s; building indexes and foreign keys")
    _parallel(db_url, [_exec_job(q) for q in INDEXES])
    with psycopg.connect(db_url, autocommit=True) as conn:
        for table, name, col, ref in FOREIGN_KEYS:
            conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({col}) "
                         f"REFERENCES {ref} (id) NOT VALID")
    _parallel(db_url, [_exec_job(f"ALTER TABLE {t} VALIDATE CONSTRAINT {n}")
                       for t, n, _, _ in FOREIGN_KEYS])
    _parallel(db_url, [_exec_job(f"VACUUM (FREEZE, ANALYZE) {t}")
                       for t in ("customers", "orders", "order_items", "events")])
    return plan


def _insert_job(query: str, params: dict[str, Any], seed: int
                ) -> Callable[[psycopg.Connection[Any]], None]:
    """Return a job that inserts one chunk with a fixed random seed (reproducible data)."""

    def job(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT setseed(%s)", [((seed * 7919) % 10_000) / 10_000.0])
        conn.execute(query, params)

    return job


def _exec_job(query: str) -> Callable[[psycopg.Connection[Any]], None]:
    """Return a job that runs one statement."""

    def job(conn: psycopg.Connection[Any]) -> None:
        conn.execute(query)

    return job


def build_pgbench(admin_url: str, db_url: str, size_mb: int) -> int:
    """Create PGBENCH_DB with pgbench -i at a scale near size_mb; returns the scale."""
    scale = max(1, round((size_mb - EMPTY_DB_BYTES / 1024 / 1024) / PGBENCH_MB_PER_SCALE))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(PGBENCH_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PGBENCH_DB)))
    subprocess.run([str(PG_BIN / "pgbench"), "-i", "-q", "--foreign-keys", "-s", str(scale),
                    db_url], check=True, capture_output=True)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("VACUUM (FREEZE, ANALYZE)")
    return scale


def database_size(url: str) -> int:
    """Return pg_database_size of the database url points at."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        assert row is not None
        return int(row[0])


def table_counts(url: str) -> dict[str, int]:
    """Return exact row counts of every user table, for checking restores."""
    with psycopg.connect(url) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables "
            "ORDER BY 1").fetchall()]
        out = {}
        for t in tables:
            row = conn.execute(f"SELECT count(*) FROM {t}").fetchone()
            assert row is not None
            out[t] = int(row[0])
        return out


# ---------------------------------------------------------------- restore shapes (issue 21)

# Bump when a shape's generator changes, so stale caches are not reused.
SHAPES_VERSION = 1
SHAPES = ("mid", "big", "bigidx", "pgbench")
SHAPE_DBS = {name: f"shape_{name}" for name in SHAPES}
MID_TABLES = 40
# On-disk bytes per row, heap and indexes, measured on PostgreSQL 15 (100 MB builds).
MID_ROW_BYTES = 190
BIG_ROW_BYTES = 520
BIGIDX_ROW_BYTES = 330

# Text with what COPY must escape (tab, newline, backslash), NULLs, jsonb and numerics.
BIG_SCHEMA = """
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL,
    created_at timestamptz NOT NULL);
CREATE TABLE events (id bigint PRIMARY KEY, customer_id bigint, kind text NOT NULL,
    payload jsonb NOT NULL, at timestamptz NOT NULL);
CREATE TABLE orders (id bigint NOT NULL, customer_id bigint NOT NULL, status text NOT NULL,
    note text, attrs jsonb NOT NULL, total numeric(12,2) NOT NULL,
    ordered_at timestamptz NOT NULL, shipped_at timestamptz);
"""
BIG_ORDERS = """
INSERT INTO orders SELECT g, 1 + (g * 7919) %% %(customers)s,
    (ARRAY['delivered','shipped','pending','cancelled'])[1 + g %% 4],
    CASE WHEN g %% 5 = 0 THEN NULL
         ELSE md5(g::text) || E'\\t' || md5((g + 1)::text) || E'\\n' || repeat('x', (g %% 40)::int)
              || E' \\\\ ' || md5((g * 3)::text) END,
    jsonb_build_object('sku', 'SKU-' || (g %% 50000), 'qty', 1 + g %% 7,
                       'tags', jsonb_build_array(md5((g * 5)::text), g %% 13),
                       'gift', g %% 11 = 0),
    round((5 + (g * 37 %% 60000) / 100.0)::numeric, 2),
    timestamptz '2020-01-01' + g * interval '7 seconds',
    CASE WHEN g %% 3 = 0 THEN timestamptz '2020-01-02' + g * interval '7 seconds' END
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g
"""
BIGIDX_SCHEMA = """
CREATE TABLE lookup (id int PRIMARY KEY, label text NOT NULL);
CREATE TABLE items (id bigint NOT NULL, a int NOT NULL, b bigint NOT NULL, c text NOT NULL,
    d timestamptz NOT NULL, e numeric(12,2), f text);
"""
BIGIDX_ITEMS = """
INSERT INTO items SELECT g, (g * 7919) %% 100000, (g * 104729) %% 1000003,
    md5(g::text), timestamptz '2021-01-01' + ((g * 31) %% 9000000) * interval '1 second',
    round(((g * 13) %% 100000 / 7.0)::numeric, 2),
    CASE WHEN g %% 4 = 0 THEN NULL ELSE repeat(md5((g * 7)::text), (1 + g %% 3)::int) END
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g
"""
BIGIDX_INDEXES = [
    "ALTER TABLE items ADD PRIMARY KEY (id)",
    "CREATE INDEX items_a ON items (a)",
    "CREATE INDEX items_b ON items (b)",
    "CREATE INDEX items_c ON items (c)",
    "CREATE INDEX items_d ON items (d)",
]


def _fresh_db(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _ranged(query: str, total: int, params: dict[str, Any] | None = None
            ) -> list[Callable[[psycopg.Connection[Any]], None]]:
    return [_exec_params_job(query, {**(params or {}), "lo": lo, "hi": hi})
            for lo, hi in _chunks(total, 100_000)]


def _exec_params_job(query: str, params: dict[str, Any]
                     ) -> Callable[[psycopg.Connection[Any]], None]:
    def job(conn: psycopg.Connection[Any]) -> None:
        conn.execute(query, params)

    return job


def build_shape(shape: str, admin_url: str, db_url: str, size_mb: int) -> None:
    """Create shape's database (SHAPE_DBS) of about size_mb; deterministic (no random())."""
    if shape == "pgbench":
        scale = max(1, round(size_mb / PGBENCH_MB_PER_SCALE))
        _fresh_db(admin_url, SHAPE_DBS[shape])
        subprocess.run([str(PG_BIN / "pgbench"), "-i", "-q", "--foreign-keys", "-s",
                        str(scale), db_url], check=True, capture_output=True)
        _parallel(db_url, [_exec_job("VACUUM (FREEZE, ANALYZE)")])
        return
    _fresh_db(admin_url, SHAPE_DBS[shape])
    size = size_mb * 1024 * 1024
    if shape == "mid":  # many mid-sized tables, a key and an index each
        rows = max(1_000, size // MID_ROW_BYTES // MID_TABLES)
        names = [f"t{i:02d}" for i in range(1, MID_TABLES + 1)]
        with psycopg.connect(db_url, autocommit=True) as conn:
            for t in names:
                conn.execute(f"CREATE TABLE {t} (id bigint PRIMARY KEY, a int NOT NULL, "
                             "b text, c timestamptz NOT NULL, d numeric(10,2))")
        _parallel(db_url, [_exec_job(
            f"INSERT INTO {t} SELECT g, (g * 7919) % 100000, "
            f"CASE WHEN g % 6 = 0 THEN NULL ELSE md5(g::text) || ' {t}' END, "
            "timestamptz '2022-01-01' + g * interval '1 minute', (g % 100000) / 100.0 "
            f"FROM generate_series(1, {rows}) g") for t in names])
        _parallel(db_url, [_exec_job(f"CREATE INDEX {t}_a ON {t} (a)") for t in names])
    elif shape == "big":  # one big table holds most of the data
        orders = max(10_000, int(size * 0.85) // BIG_ROW_BYTES)
        customers = max(1_000, orders // 20)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(BIG_SCHEMA)
            conn.execute(
                "INSERT INTO customers SELECT g, 'name ' || g, 'c' || g || '@example.com', "
                "timestamptz '2019-01-01' + g * interval '1 hour' "
                f"FROM generate_series(1, {customers}) g")
            conn.execute(
                "INSERT INTO events SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE g % "
                f"{customers} + 1 END, (ARRAY['view','search','cart'])[1 + g % 3], "
                "jsonb_build_object('path', '/p/' || g, 'ua', repeat('Mozilla ', 1 + g % 4)), "
                "timestamptz '2023-01-01' + g * interval '1 second' "
                f"FROM generate_series(1, {customers * 2}) g")
        _parallel(db_url, _ranged(BIG_ORDERS, orders, {"customers": customers}))
        _parallel(db_url, [_exec_job("ALTER TABLE orders ADD PRIMARY KEY (id)"),
                           _exec_job("CREATE INDEX orders_customer ON orders (customer_id)")])
    elif shape == "bigidx":  # a big table with several indexes
        rows = max(10_000, int(size * 0.95) // BIGIDX_ROW_BYTES)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(BIGIDX_SCHEMA)
            conn.execute("INSERT INTO lookup SELECT g, 'label ' || g "
                         "FROM generate_series(1, 1000) g")
        _parallel(db_url, _ranged(BIGIDX_ITEMS, rows))
        _parallel(db_url, [_exec_job(q) for q in BIGIDX_INDEXES])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    _parallel(db_url, [_exec_job("VACUUM (FREEZE, ANALYZE)")])
