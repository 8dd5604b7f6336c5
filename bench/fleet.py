"""Fleet mode on this machine: D small databases on a few local clusters, W worker
processes (`pgvault run --shard i/W`) against one repository (a folder, or S3 through moto
on loopback).

    .venv/bin/python bench/fleet.py                        # scaling: D in 50,300 x W in 1,2,4
    .venv/bin/python bench/fleet.py --repeat 3 --s3        # ... also with an S3 repository
    .venv/bin/python bench/fleet.py --simulate --databases 300   # faults, on folder and S3

Scaling: each cell is one window's wall time with a fresh repository; the cells of a
round run in alternating order (the machine is shared) and the table gives the median
and the spread. Simulate: 3 workers, two SIGKILLed mid-run and restarted, one SIGSTOPped
past its lease and then continued, beside a replacement; it counts backups per database
(duplicates), the most backups observed at once in the repository and on each server
(from the manifests' times, against both caps), then fakes a 24 h outage (one catch-up
run each, and none more), and restores a sample to compare with its source. The
databases are made once (copies of a 200-row template, fsync off). It prints Markdown;
it is a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from _s3 import BUCKET, MotoServer
from psycopg import sql

from pgvault import catalog, config, lease
from pgvault.catalog import Catalog
from pgvault.fleet import Shard
from pgvault.model import Manifest
from pgvault.ops.fleet import run_shard
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage
from pgvault.storage.base import Storage
from pgvault.storage.s3 import S3Options, S3Storage

PGVAULT = str(Path(sys.executable).with_name("pgvault"))
FAST = {"fsync": False, "synchronous_commit": False, "full_page_writes": False,
        "max_connections": 100}


def populate(cluster: EphemeralCluster, prefix: str, count: int) -> dict[str, str]:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE fleet_template")
    with psycopg.connect(cluster.url("fleet_template"), autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, owner text, body text);"
                     "INSERT INTO items SELECT g, 'template', md5(g::text) "
                     "FROM generate_series(1, 200) g")
    urls = {}
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        for n in range(count):
            name = f"{prefix}{n:03d}"
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE fleet_template STRATEGY "
                                 "FILE_COPY").format(sql.Identifier(name)))
            urls[name] = cluster.url(name)
    for name, url in urls.items():  # each its own content: a wrong restore cannot pass
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE items SET owner = %s WHERE id %% 7 = 0", (name,))
    return urls


class Repo:
    """Where one run's repository is: a folder, or a prefix of the moto bucket."""

    def __init__(self, work: Path, moto: MotoServer | None, label: str) -> None:
        self.moto = moto
        if moto is None:
            self.url = (work / f"repo-{label}").as_uri()
            self.env: dict[str, str] = {}
            self.extra = ""
        else:
            self.url = f"s3://{BUCKET}/{label}"
            self.env = {**moto.env(), "PGVAULT_S3__ENDPOINT_URL": moto.url,
                        "PGVAULT_S3__PATH_STYLE": "true", "PGVAULT_S3__REGION": "us-east-1"}
            self.extra = (f'[s3]\nendpoint_url = "{moto.url}"\nregion = "us-east-1"\n'
                          "path_style = true")

    def storage(self) -> Storage:
        if self.moto is None:
            return open_storage(self.url)
        os.environ.update(self.moto.env())
        return S3Storage(BUCKET, self.url.split("/", 3)[3], S3Options(
            endpoint_url=self.moto.url, region="us-east-1", path_style=True))


def write_config(path: Path, urls: dict[str, str], repo: Repo, fleet: dict[str, float]) -> Path:
    lines = ["backup_globals = false", repo.extra, "[fleet]"]
    lines += [f"{key} = {value}" for key, value in fleet.items()]
    for name, url in urls.items():
        lines += ["[[databases]]", f'name = "{name}"', f'url = "{url}"']
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def start(shard: str, cfg: Path, repo: Repo, log: Path | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, **repo.env, "PGVAULT_LOG_FORMAT": "text"}
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen([PGVAULT, "run", "--shard", shard, "--config", str(cfg),
                                 "--repo", repo.url], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log is not None and not isinstance(out, int):
            out.close()


def backups(storage: Storage) -> dict[str, list[Manifest]]:
    found: dict[str, list[Manifest]] = {}
    for manifest in Catalog(storage).list():
        found.setdefault(manifest.database, []).append(manifest)
    return found


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def holds_a_lease(storage: Storage, urls: dict[str, str], pid: int) -> bool:
    for name in urls:
        record, _ = lease.read(storage, catalog.fleet_lease_key(name))
        if record is not None and record.state == "running" and \
                record.holder.split(" ")[1:2] == [str(pid)]:
            return True
    return False


def server_of(url: str) -> str:
    return url.split("@", 1)[-1].split("/", 1)[0].split("?")[0]


# ---------------------------------------------------------------- scaling

def one_window(urls: dict[str, str], workers: int, args: argparse.Namespace, repo: Repo,
               work: Path) -> float:
    cfg = write_config(work / f"fleet-{len(urls)}-{workers}.toml", urls, repo, {
        "max_per_repository": args.per_repository, "max_per_server": args.per_server})
    started = time.monotonic()
    procs = [start(f"{i}/{workers}", cfg, repo) for i in range(workers)]
    codes = [p.wait() for p in procs]
    elapsed = time.monotonic() - started
    if any(codes):
        raise SystemExit(f"a worker failed: {codes}")
    found = backups(repo.storage())
    if sorted(found) != sorted(urls) or any(len(ms) != 1 for ms in found.values()):
        raise SystemExit(f"{sum(map(len, found.values()))} backups for {len(urls)} databases")
    return elapsed


def scaling(everything: dict[str, str], names: list[str], args: argparse.Namespace,
            moto: MotoServer | None, work: Path) -> None:
    sizes = [int(x) for x in args.databases.split(",")]
    counts = [int(x) for x in args.workers.split(",")]
    cells = [(d, w) for d in sizes for w in counts]
    times: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
    for round_ in range(args.repeat):
        order = cells if round_ % 2 == 0 else cells[::-1]
        for size, workers in order:
            urls = {n: everything[n] for n in names[:size]}
            label = f"scale-{size}-{workers}-{round_}"
            times[(size, workers)].append(one_window(urls, workers, args,
                                                     Repo(work, moto, label), work))
            if moto is not None:
                moto.clear(label + "/")
    kind = "S3 (moto on loopback)" if moto is not None else "local folder"
    print(f"\n{kind}; caps {args.per_repository} per repository, {args.per_server} per "
          f"server; {args.clusters} servers; median of {args.repeat} (min-max)")
    print("| databases | " + " | ".join(f"{w} worker(s)" for w in counts) + " |")
    print("| --- |" + " --- |" * len(counts))
    for size in sizes:
        row = []
        for w in counts:
            t = times[(size, w)]
            row.append(f"{statistics.median(t):.1f} s ({min(t):.1f}-{max(t):.1f})")
        print(f"| {size} | " + " | ".join(row) + " |", flush=True)


# ---------------------------------------------------------------- simulation

def simulate(urls: dict[str, str], clusters: list[EphemeralCluster], moto: MotoServer | None,
             work: Path, label: str) -> dict[str, Any]:
    repo = Repo(work, moto, label)
    caps = {"max_per_repository": 3, "max_per_server": 1}
    cfg = write_config(work / f"sim-{label}.toml", urls, repo, {
        "window_hours": 24, "lease_seconds": 2, "backoff_seconds": 0.5,
        "backoff_max_seconds": 2, **caps})
    log = work / f"sim-{label}.log"
    storage = repo.storage()
    started = time.monotonic()
    workers = [start(f"{i}/3", cfg, repo, log) for i in range(3)]
    events = []
    try:
        def made() -> int:
            return sum(map(len, backups(storage).values()))

        while made() < len(urls) // 10:
            time.sleep(0.2)
        # Paused while it holds a database's lease (mid-backup), past that lease.
        deadline = time.monotonic() + 60
        while not holds_a_lease(storage, urls, workers[2].pid) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(workers[2].pid, signal.SIGSTOP)
        events.append(f"worker 2/3 paused at {made()} backups")
        os.kill(workers[1].pid, signal.SIGKILL)
        workers[1].wait()
        workers[1] = start("1/3", cfg, repo, log)
        workers.append(start("2/3", cfg, repo, log))  # the paused one's replacement
        events.append("worker 1/3 killed and restarted, a replacement 2/3 started")
        time.sleep(5)  # past the paused worker's 2 s leases
        while made() < len(urls) // 2:
            time.sleep(0.2)
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].wait()
        workers[0] = start("0/3", cfg, repo, log)
        events.append(f"worker 0/3 killed at {made()} backups and restarted")
        os.kill(workers[2].pid, signal.SIGCONT)
        events.append("worker 2/3 continued")
        codes = [p.wait(timeout=1800) for p in workers]
    finally:
        for p in workers:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    wall = time.monotonic() - started
    found = backups(storage)
    per_db = Counter({n: len(found.get(n, [])) for n in urls})
    intervals = [(m.started_at, m.finished_at) for ms in found.values() for m in ms]
    servers = {server_of(u) for u in urls.values()}
    per_server = max(max_overlap([(m.started_at, m.finished_at) for n, ms in found.items()
                                  for m in ms if server_of(urls[n]) == s]) for s in servers)
    text = log.read_text()
    result: dict[str, Any] = {
        "repository": "S3 (moto)" if moto is not None else "folder", "databases": len(urls),
        "exit codes": codes, "wall s": round(wall, 1),
        "backups": sum(per_db.values()), "databases with one": sum(1 for c in per_db.values()
                                                                  if c == 1),
        "duplicates": sum(c - 1 for c in per_db.values() if c > 1),
        "without": sum(1 for c in per_db.values() if c == 0),
        "max at once (cap 3)": max_overlap(intervals),
        "max at once per server (cap 1)": per_server,
        "leases taken over": text.count(" taken over (lease of"),
        "gave way to a taker (lease taken over)": text.count("was taken over by")
        + text.count("lease taken over by"),
        "events": events}
    # A 24 h outage: nobody ran; one worker comes back a day later (a faked clock).
    settings = config.load({"repo": repo.url}, repo.env, str(cfg))
    clock_at = [datetime.now(UTC) + timedelta(hours=24, minutes=1)]

    def sleep(seconds: float) -> None:
        clock_at[0] += timedelta(seconds=seconds)

    os.environ.update(repo.env)
    catch_up = run_shard(settings, Shard(0, 1), clock=lambda: clock_at[0], sleep=sleep,
                         storage=storage)
    again = run_shard(settings, Shard(0, 1), clock=lambda: clock_at[0], sleep=sleep,
                      storage=storage)
    after = backups(storage)
    result["catch-up runs"] = len(catch_up.backed_up)
    result["catch-up runs more than one"] = sum(
        1 for n in urls if len(after.get(n, [])) - per_db[n] != 1)
    result["second run that day"] = len(again.backed_up)
    # Nothing lost: restore a sample and compare its rows with the source.
    sample = random.Random(7).sample(sorted(urls), 5)
    ok = 0
    for name in sample:
        manifest = sorted(after[name], key=lambda m: m.started_at)[-1]
        server = urls[name].rsplit("/", 1)[0]
        target = f"r_{name}"
        env = {**os.environ, **repo.env}
        subprocess.run([PGVAULT, "restore", manifest.id, "--to", target, "--dbname",
                        f"{server}/postgres", "--repo", repo.url, "-j", "1"], env=env,
                       check=True, capture_output=True)
        digest = "SELECT md5(string_agg(id || owner || body, ',' ORDER BY id)) FROM items"
        with psycopg.connect(urls[name]) as a, psycopg.connect(f"{server}/{target}") as b:
            ok += a.execute(digest).fetchone() == b.execute(digest).fetchone()
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                sql.Identifier(target)))
    result["sample restored equal"] = f"{ok} of {len(sample)}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--databases", default="50,300")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--per-server", type=int, default=2)
    parser.add_argument("--per-repository", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--s3", action="store_true", help="also with an S3 repository")
    parser.add_argument("--only-s3", action="store_true",
                        help="the scaling table with an S3 repository only")
    parser.add_argument("--simulate", action="store_true",
                        help="the fault simulation instead of the scaling table")
    args = parser.parse_args()
    biggest = max(int(x) for x in args.databases.split(","))
    per = -(-biggest // args.clusters)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clusters = [EphemeralCluster(settings=FAST) for _ in range(args.clusters)]
        moto = (MotoServer(work / "moto") if args.s3 or args.only_s3 or args.simulate
                else None)
        try:
            for c in clusters:
                c.__enter__()
            made = time.monotonic()
            with ThreadPoolExecutor(args.clusters) as pool:
                parts = list(pool.map(lambda i: populate(clusters[i], chr(97 + i), per),
                                      range(args.clusters)))
            everything = {k: v for part in parts for k, v in part.items()}
            print(f"{len(everything)} databases on {args.clusters} clusters made in "
                  f"{time.monotonic() - made:.0f} s", flush=True)
            # Interleaved, so any prefix spreads over every server.
            names = sorted(everything, key=lambda n: (int(n[1:]), n))
            if moto is not None:
                moto.start()
            if args.simulate:
                urls = {n: everything[n] for n in names[:biggest]}
                for which in ([None, moto] if moto is not None else [None]):
                    result = simulate(urls, clusters, which, work,
                                      "sim-s3" if which is not None else "sim-folder")
                    print("\n" + "\n".join(f"- {k}: {v}" for k, v in result.items()),
                          flush=True)
                return
            if not args.only_s3:
                scaling(everything, names, args, None, work)
            if moto is not None:
                scaling(everything, names, args, moto, work)
        finally:
            if moto is not None:
                moto.stop()
            for c in clusters:
                c.stop()


if __name__ == "__main__":
    main()
