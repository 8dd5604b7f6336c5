"""`pgvault demo`: the whole job on a throwaway cluster, so anyone can see it work."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from string import Template

from pgvault import pipeline
from pgvault.catalog import Catalog
from pgvault.console import human_bytes, human_seconds
from pgvault.ops.backup import BackupOptions, backup
from pgvault.ops.restore import RestoreOptions, restore
from pgvault.pg.cluster import EphemeralCluster
from pgvault.pg.conninfo import ConnInfo
from pgvault.pg.content import table_digests
from pgvault.storage import open_storage

SAMPLE_SQL = Template("""
CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
CREATE TABLE customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text UNIQUE NOT NULL,
    name text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE TABLE products (
    id serial PRIMARY KEY, sku text UNIQUE NOT NULL, title text NOT NULL,
    price numeric(10, 2) NOT NULL, attributes jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers(id),
    status order_status NOT NULL,
    placed_at timestamptz NOT NULL,
    total numeric(12, 2) NOT NULL
);
CREATE TABLE order_items (
    order_id bigint REFERENCES orders(id), product_id int REFERENCES products(id),
    quantity int NOT NULL CHECK (quantity > 0), PRIMARY KEY (order_id, product_id)
);
CREATE TABLE "_prisma_migrations" (
    id varchar(36) PRIMARY KEY, checksum varchar(64) NOT NULL, finished_at timestamptz,
    migration_name varchar(255) NOT NULL, logs text, rolled_back_at timestamptz,
    started_at timestamptz NOT NULL DEFAULT now(), applied_steps_count int NOT NULL DEFAULT 0
);
INSERT INTO "_prisma_migrations" (id, checksum, finished_at, migration_name, applied_steps_count)
VALUES ('00000000-0000-4000-8000-000000000001', md5('init'), now(), '20250101000000_init', 1);
INSERT INTO customers (email, name, created_at)
SELECT 'customer' || g || '@example.com', 'Customer ' || g,
       timestamptz '2025-01-01' + g * interval '7 minutes'
FROM generate_series(1, $customers) g;
INSERT INTO products (sku, title, price, attributes)
SELECT 'SKU-' || g, 'Product ' || g, round((random() * 200 + 1)::numeric, 2),
       jsonb_build_object('color', (ARRAY['red','green','blue'])[1 + g % 3], 'weight', g % 17)
FROM generate_series(1, 200) g;
INSERT INTO orders (customer_id, status, placed_at, total)
SELECT 1 + (g * 7919) % $customers,
       (ARRAY['new','paid','shipped','cancelled'])[1 + g % 4]::order_status,
       timestamptz '2025-02-01' + g * interval '3 minutes', round((random() * 500)::numeric, 2)
FROM generate_series(1, $orders) g;
INSERT INTO order_items (order_id, product_id, quantity)
SELECT o.id, 1 + (o.id * k) % 200, 1 + k FROM orders o, generate_series(1, 3) k
ON CONFLICT DO NOTHING;
CREATE MATERIALIZED VIEW daily_revenue AS
SELECT date_trunc('day', placed_at) AS day, sum(total) AS revenue FROM orders GROUP BY 1;
""")


def run_demo(repo: str | None, rows: int, echo: Callable[[str], None]) -> bool:
    """Back up, list, restore and compare a sample database; True when everything matches."""
    folder = None
    if repo is None:
        folder = tempfile.mkdtemp(prefix="pgvault-demo-")
        repo = "file://" + str(Path(folder) / "repo")
    echo("starting a throwaway PostgreSQL cluster ...")
    try:
        with EphemeralCluster(settings={"fsync": "off"}) as cluster:
            admin = ConnInfo.parse(cluster.url("postgres"))
            with admin.connect(autocommit=True) as conn:
                conn.execute("CREATE DATABASE shop")
            source = ConnInfo.parse(cluster.url("shop"))
            with source.connect() as conn:
                script = SAMPLE_SQL.substitute(customers=max(rows // 4, 1), orders=rows)
                conn.execute(script.encode())
            echo(f"sample database 'shop' on port {cluster.port}: {rows} orders")

            storage = open_storage(repo)
            manifest = backup(source, storage, BackupOptions(
                stages=pipeline.compression_spec("zstd", None, 2)))
            took = (manifest.finished_at - manifest.started_at).total_seconds()
            echo(f"backed up into {storage.url}: {manifest.id}, "
                 f"{human_bytes(manifest.raw_size)} -> {human_bytes(manifest.size)}, "
                 f"{human_seconds(took)}")
            for m in Catalog(storage).list():
                echo(f"  listed: {m.id}  {m.database}  {human_bytes(m.size)}")

            result = restore(admin, storage, manifest, RestoreOptions(target="shop_restored"))
            echo(f"restored into 'shop_restored' in {human_seconds(result.seconds)} "
                 "(size and sha256 verified while reading)")

            with source.connect() as conn:
                before = table_digests(conn)
            with source.with_dbname("shop_restored").connect() as conn:
                after = table_digests(conn)
            ok = before == after
            for table, (count, digest) in before.items():
                same = after.get(table) == (count, digest)
                mark = "OK  " if same else "DIFF"
                echo(f"  {mark} {table:<32} {count:>8} rows  md5 {digest[:12]}")
            echo("every table matches" if ok else "MISMATCH: the restore differs from the source")
            return ok
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
