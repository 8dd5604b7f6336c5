"""Wall time of one fleet window: W worker processes (`pgvault run --shard i/W`) backing up
D small databases spread over two local clusters into one local repository.

    .venv/bin/python bench/fleet.py                      # D in 30,60 x W in 1,2,4
    .venv/bin/python bench/fleet.py --databases 300 --workers 1,2,4 --per-server 2

Each cell is a fresh repository; the databases are made once (copies of a 200-row
template, fsync off). It prints a Markdown table; it is a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from psycopg import sql

from pgvault.catalog import Catalog
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage

PGVAULT = str(Path(sys.executable).with_name("pgvault"))
FAST = {"fsync": False, "synchronous_commit": False, "full_page_writes": False,
        "max_connections": 100}


def populate(cluster: EphemeralCluster, prefix: str, count: int) -> dict[str, str]:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE fleet_template")
    with psycopg.connect(cluster.url("fleet_template"), autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, body text);"
                     "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 200) g")
    urls = {}
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        for n in range(count):
            name = f"{prefix}{n:03d}"
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE fleet_template STRATEGY "
                                 "FILE_COPY").format(sql.Identifier(name)))
            urls[name] = cluster.url(name)
    return urls


def one_window(urls: dict[str, str], workers: int, args: argparse.Namespace,
               work: Path) -> float:
    repo = (work / f"repo-{len(urls)}-{workers}").as_uri()
    config = work / f"fleet-{len(urls)}-{workers}.toml"
    lines = ["backup_globals = false", "[fleet]",
             f"max_per_repository = {args.per_repository}",
             f"max_per_server = {args.per_server}"]
    for name, url in urls.items():
        lines += ["[[databases]]", f'name = "{name}"', f'url = "{url}"']
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o600)
    started = time.monotonic()
    procs = [subprocess.Popen([PGVAULT, "run", "--shard", f"{i}/{workers}", "--config",
                               str(config), "--repo", repo], stderr=subprocess.DEVNULL)
             for i in range(workers)]
    codes = [p.wait() for p in procs]
    elapsed = time.monotonic() - started
    if any(codes):
        raise SystemExit(f"a worker failed: {codes}")
    found = Catalog(open_storage(repo)).list()
    if len(found) != len(urls) or len({m.database for m in found}) != len(urls):
        raise SystemExit(f"{len(found)} backups for {len(urls)} databases")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--databases", default="30,60")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--per-server", type=int, default=2)
    parser.add_argument("--per-repository", type=int, default=4)
    args = parser.parse_args()
    sizes = [int(x) for x in args.databases.split(",")]
    counts = [int(x) for x in args.workers.split(",")]
    biggest = max(sizes)
    with EphemeralCluster(settings=FAST) as a, EphemeralCluster(settings=FAST) as b, \
            tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(2) as pool:
            fa = pool.submit(populate, a, "a", (biggest + 1) // 2)
            fb = pool.submit(populate, b, "b", biggest // 2)
            everything = fa.result() | fb.result()
        names = sorted(everything, key=lambda n: (int(n[1:]), n))  # both servers alike
        print(f"caps: {args.per_repository} per repository, {args.per_server} per server; "
              "2 servers, local folder repository")
        print("| databases | " + " | ".join(f"{w} worker(s)" for w in counts) + " |")
        print("| --- |" + " --- |" * len(counts))
        for size in sizes:
            urls = {n: everything[n] for n in names[:size]}
            cells = [one_window(urls, w, args, Path(tmp)) for w in counts]
            print(f"| {size} | " + " | ".join(f"{c:.1f} s" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
