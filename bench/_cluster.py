"""A small self-contained PostgreSQL 15 cluster starter for the benchmarks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg

PG_BIN = Path(os.environ.get("PGVAULT_BENCH_PGBIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"

# Settings for the timed phase: a plausible small production server, WAL on, fsync on.
BENCH_SETTINGS: dict[str, str] = {
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "256MB",
    "max_connections": "50",
    "autovacuum": "off",
}

# Settings for the one-off dataset build: durability off, minimal WAL.
BUILD_SETTINGS: dict[str, str] = {
    **BENCH_SETTINGS,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "maintenance_work_mem": "512MB",
}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres(args: list[str]) -> list[str]:
    """Wrap a server command line to run as the postgres OS user when we are root."""
    return args if os.geteuid() != 0 else ["runuser", "-u", PG_USER, "--", *args]


def run_as_postgres(
    args: list[str], *, check: bool = True, new_session: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a server binary as the postgres OS user (initdb refuses root), capturing output."""
    return subprocess.run(
        as_postgres(args), check=check, text=True, capture_output=True,
        start_new_session=new_session,
    )


def chown_postgres(path: Path) -> None:
    """Give a path to the postgres OS user when we run as root."""
    if os.geteuid() == 0:
        shutil.chown(path, user=PG_USER, group=PG_USER)


def initdb(data_dir: Path) -> None:
    """Create a new cluster in data_dir (which must not exist) with trust auth."""
    data_dir.mkdir(parents=True, mode=0o700)
    chown_postgres(data_dir)
    run_as_postgres(
        [
            str(PG_BIN / "initdb"),
            "-D", str(data_dir),
            "-U", PG_USER,
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]
    )


def stop_stale(data_dir: Path) -> None:
    """Stop a server a previous, killed benchmark may have left running on data_dir."""
    if (data_dir / "postmaster.pid").exists():
        run_as_postgres(
            [str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"],
            check=False,
        )


class Cluster:
    """A server running on an existing data dir, on a free port of 127.0.0.1."""

    def __init__(self, data_dir: Path, settings: Mapping[str, str]) -> None:
        """Remember where and how to start; nothing runs until start()."""
        self.data_dir = data_dir
        self.settings = dict(settings)
        self.port = 0
        self.socket_dir: Path | None = None
        self.running = False

    def url(self, dbname: str = "postgres") -> str:
        """Return a libpq URL for dbname on this server."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        stop_stale(self.data_dir)
        self.port = free_port()
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pgvault-bench-sock-"))
        chown_postgres(self.socket_dir)
        opts = {
            **self.settings,
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.socket_dir),
        }
        o = " ".join(f"-c {k}={v}" for k, v in opts.items())
        log = self.data_dir / "bench-server.log"
        # A new session keeps Ctrl-C away from the postmaster: we stop it ourselves.
        try:
            run_as_postgres(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log),
                 "-o", o, "-w", "-t", "120", "start"],
                new_session=True,
            )
        except subprocess.CalledProcessError as e:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {e.stderr}\n{tail}") from e
        self.running = True
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=5):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server (fast mode), then remove the socket folder; safe to call twice."""
        if self.running:
            res = run_as_postgres(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                 "-t", "120", "stop"],
                check=False,
                new_session=True,
            )
            if res.returncode != 0:
                stop_stale(self.data_dir)
            self.running = False
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None
