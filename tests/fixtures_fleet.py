"""A fleet on this machine: databases on two local PostgreSQL clusters, a config listing
them as [[databases]], and worker processes running `pgvault run --shard I/N`."""

from __future__ import annotations

import os
import subprocess as sp
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cli_runner import PGVAULT, clean_env
from pgvault.catalog import Catalog
from pgvault.model import Manifest
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage.base import Storage

_FAST = {"fsync": False, "synchronous_commit": False, "full_page_writes": False,
         "max_connections": 100}
PER_CLUSTER = 30


@dataclass
class Fleet:
    clusters: list[EphemeralCluster]
    urls: dict[str, str]
    """database name -> its URL."""

    def server_of(self, name: str) -> str:
        return self.urls[name].split("@", 1)[1].split("/", 1)[0]


def _populate(cluster: EphemeralCluster, prefix: str, count: int) -> dict[str, str]:
    urls = {}
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE fleet_template")
    with psycopg.connect(cluster.url("fleet_template"), autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, owner text, body text);"
                     "INSERT INTO items SELECT g, 'template', md5(g::text) "
                     "FROM generate_series(1, 200) g")
    for n in range(count):
        name = f"{prefix}{n:02d}"
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE fleet_template "
                                 "STRATEGY FILE_COPY").format(
                sql.Identifier(name)))
        with psycopg.connect(cluster.url(name), autocommit=True) as conn:
            # Each database its own content, so a restore of the wrong one cannot pass.
            conn.execute("UPDATE items SET owner = %s WHERE id %% 7 = 0", (name,))
        urls[name] = cluster.url(name)
    return urls


@pytest.fixture(scope="module")
def fleet_dbs() -> Iterator[Fleet]:
    """60 databases, 30 on each of two clusters of this fixture's own (removed whole)."""
    # In memory where there is a tmpfs: 60 databases' files written, then removed, on a
    # disk mounted with discard took ~40 s to delete at the module's end.
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with EphemeralCluster(settings=_FAST, base_dir=base) as first, \
            EphemeralCluster(settings=_FAST, base_dir=base) as second:
        with ThreadPoolExecutor(2) as pool:  # the two clusters filled at once
            a = pool.submit(_populate, first, "fa", PER_CLUSTER)
            b = pool.submit(_populate, second, "fb", PER_CLUSTER)
            urls = a.result() | b.result()
        yield Fleet([first, second], urls)


def write_config(path: Path, urls: dict[str, str], *, extra: str = "",
                 fleet: dict[str, float] | None = None) -> Path:
    settings: dict[str, float] = {
        "window_hours": 24, "max_per_repository": 3, "max_per_server": 1, "lease_seconds": 2,
        "backoff_seconds": 0.5, "backoff_max_seconds": 2} | (fleet or {})
    lines = ["backup_globals = false", extra, "[fleet]"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    for name, url in urls.items():
        lines += ["[[databases]]", f'name = "{name}"', f'url = "{url}"']
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # it holds the URLs
    return path


def start_worker(shard: str, config: Path, repo: str, log: Path) -> sp.Popen[bytes]:
    env = clean_env()
    env["PGVAULT_LOG_FORMAT"] = "text"
    with log.open("ab") as out:
        return sp.Popen([PGVAULT, "run", "--shard", shard, "--config", str(config),
                         "--repo", repo, "--json"], env=env, stdout=out, stderr=sp.STDOUT,
                        start_new_session=True)


def wait_all(workers: list[sp.Popen[bytes]], timeout: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    for proc in workers:
        left = max(deadline - time.monotonic(), 0.1)
        try:
            code = proc.wait(timeout=left)
        except sp.TimeoutExpired:
            for p in workers:
                if p.poll() is None:
                    p.kill()
            raise AssertionError(f"workers did not finish in {timeout} s:\n"
                                 + logs.read_text()[-4000:]) from None
        assert code == 0, f"a worker exited {code}:\n" + logs.read_text()[-4000:]


def backups(storage: Storage) -> dict[str, list[Manifest]]:
    found: dict[str, list[Manifest]] = {}
    for manifest in Catalog(storage).list():
        found.setdefault(manifest.database, []).append(manifest)
    return found


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                    key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def pid_alive(proc: sp.Popen[bytes]) -> bool:
    return proc.poll() is None and os.path.exists(f"/proc/{proc.pid}")
