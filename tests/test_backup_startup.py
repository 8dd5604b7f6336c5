"""A backup's start: preflight and the repository lock overlap, and a failure of either
leaves the repository as it was; facts are counted beside the dump without parallel workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cli_runner import one_line_error, pgvault
from fixtures_pg import NewName
from pgvault.catalog import lock_key
from pgvault.engines import logical
from pgvault.engines.logical import LogicalEngine
from pgvault.errors import LockHeld
from pgvault.lock import acquire
from pgvault.ops.backup import _preflight_and_lock
from pgvault.pg.cluster import EphemeralCluster
from pgvault.pg.conninfo import ConnInfo
from pgvault.pg.psql import ServerInfo
from pgvault.storage.memory import MemoryStorage

HOUR = timedelta(hours=1)


def test_failed_preflight_leaves_no_lock_and_wins_over_a_held_one(
    pg_cluster: EphemeralCluster, new_name: NewName, tmp_path: Path
) -> None:
    missing = new_name()  # never created: connecting fails after the lock attempt began
    repo = tmp_path / "repo"
    proc = pgvault("backup", "--dbname", pg_cluster.url(missing), "--repo", f"file://{repo}",
                   expect=4)
    assert missing in one_line_error(proc)
    assert not list(repo.rglob("*.lock"))

    lock = repo / "locks" / f"{missing}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "operation": "backup",
                         "since": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                         "token": "theirs"})
    lock.write_text(holder)
    # A real process: the lock's holder (this test) must be another live process.
    proc = pgvault("backup", "--dbname", pg_cluster.url(missing), "--repo", f"file://{repo}",
                   expect=4, subprocess=True)
    assert "cannot connect" in one_line_error(proc)
    assert lock.read_text() == holder, "another process's lock is never touched"


@dataclass
class _Session:
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class _Engine:
    """Names one database in its connection while the server reports another."""

    conn: ConnInfo
    database: str
    session_made: _Session | None = None

    def session(self) -> _Session:
        self.session_made = _Session()
        return self.session_made

    def preflight(self, connection: Any) -> ServerInfo:
        return ServerInfo(database=self.database, version="15.0", version_num=150000,
                          is_superuser=True)


def _locks(storage: MemoryStorage) -> list[str]:
    return [info.key for info in storage.list("locks/")]


def test_the_lock_follows_the_database_the_server_names() -> None:
    storage = MemoryStorage()
    engine: Any = _Engine(ConnInfo.parse("dbname=guessed"), database="actual")
    with _preflight_and_lock(engine, storage, HOUR) as (session, server):
        assert server.database == "actual"
        assert _locks(storage) == [lock_key("actual")]
    assert session.closed and _locks(storage) == []


def test_a_held_lock_fails_the_start_and_closes_the_session() -> None:
    storage = MemoryStorage()
    theirs = acquire(storage, lock_key("app"), "backup", stale_after=HOUR, name="app")
    engine: Any = _Engine(ConnInfo.parse("dbname=app"), database="app")
    with pytest.raises(LockHeld, match="locked by backup"), \
            _preflight_and_lock(engine, storage, HOUR):
        pytest.fail("the block must not run without the lock")
    assert engine.session_made.closed
    assert _locks(storage) == [theirs.key]


def test_without_a_database_name_the_lock_waits_for_preflight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: list[str] = []
    real_acquire: Callable[..., Any] = acquire

    def spy(storage: Any, database: str, *args: Any, **kwargs: Any) -> Any:
        taken.append(database)
        return real_acquire(storage, database, *args, **kwargs)

    monkeypatch.setattr("pgvault.ops.backup.acquire", spy)
    storage = MemoryStorage()
    engine: Any = _Engine(ConnInfo.parse("host=localhost"), database="postgres")
    with _preflight_and_lock(engine, storage, HOUR):
        assert _locks(storage) == [lock_key("postgres")]
    assert taken == [lock_key("postgres")]


def test_facts_count_exactly_without_parallel_workers(make_db: Callable[..., str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
    engine = LogicalEngine(ConnInfo.parse(url))
    seen: list[tuple[str, str]] = []
    real = logical._serial_scans

    def spy(cur: Any) -> None:
        real(cur)
        seen.append(cur.execute("SELECT current_setting('max_parallel_workers_per_gather'),"
                                " current_setting('statement_timeout')").fetchone())

    # facts() ends its transaction (and so its settings) before it returns: look inside.
    monkeypatch.setattr(logical, "_serial_scans", spy)
    with engine.snapshot() as snapshot:
        facts = engine.facts(snapshot)
    assert seen == [("0", "0")], "the counts run serially, leaving the CPU to pg_dump's backend"
    assert [(t.name, t.rows) for t in facts.tables] == [("t", 1000)]


STARTS_PG_DUMP = """
import subprocess, sys
real = subprocess.Popen.__init__
def spy(self, args, *a, **k):
    if "--format=custom" in [str(x) for x in args]:
        print("psycopg imported before pg_dump:", "psycopg" in sys.modules, file=sys.stderr)
    real(self, args, *a, **k)
subprocess.Popen.__init__ = spy
from pgvault.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_pg_dump_starts_before_psycopg_is_imported(
    make_db: Callable[..., str], new_name: NewName, tmp_path: Path
) -> None:
    """psql holds the snapshot, so the ~0.15 s of psycopg's import and connect overlap the dump."""
    import subprocess
    import sys

    from cli_runner import clean_env

    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS x")
    proc = subprocess.run(
        [sys.executable, "-c", STARTS_PG_DUMP, "backup", "--dbname", url, "--repo",
         f"file://{tmp_path / 'repo'}"],
        env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "psycopg imported before pg_dump: False" in proc.stderr
    restored = new_name()
    target = url.rsplit("/", 1)[0] + "/" + restored
    pgvault("restore", "--dbname", url, "--to", restored, "--repo", f"file://{tmp_path / 'repo'}")
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (100,)


def test_a_refused_snapshot_export_or_import_still_records_facts(
    make_db: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Poolers may refuse to export or import a snapshot: the facts then use their own."""
    from pgvault.engines.logical import Snapshot
    from pgvault.pg import psql

    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 7) AS x")
    engine = LogicalEngine(ConnInfo.parse(url))
    monkeypatch.setattr(psql, "EXPORT_SQL", psql.EXPORT_SQL.replace(
        "pg_export_snapshot()", "pg_export_snapshot_refused()"))
    with engine.snapshot() as snapshot:
        assert snapshot.snapshot_id is None
        assert [(t.name, t.rows) for t in engine.facts(snapshot).tables] == [("t", 7)]
    unknown = Snapshot(snapshot_id="0000000F-0000FFFF-1")  # not exported by anyone
    try:
        assert [(t.name, t.rows) for t in engine.facts(unknown).tables] == [("t", 7)]
    finally:
        unknown.connection.close()


def test_every_command_is_in_the_lazy_map_and_a_run_imports_only_its_own() -> None:
    import importlib
    import pkgutil

    import pgvault.cli
    from pgvault.cli.app import COMMANDS, cli

    for module in pkgutil.iter_modules(pgvault.cli.__path__):
        importlib.import_module(f"pgvault.cli.{module.name}")
    defined = {name: cmd.callback.__module__.rsplit(".", 1)[-1]
               for name, cmd in cli.commands.items() if cmd.callback is not None}
    assert defined == COMMANDS, "a new command needs its line in cli/app.py COMMANDS"
    script = ("import sys; from pgvault.cli import main; code = main(sys.argv[1:]); "
              "print(sorted(m for m in sys.modules if m.startswith('pgvault.cli.')))")
    for argv, wanted in ((["--version"], ["pgvault.cli.app"]),
                         (["wal-push", "--help"], ["pgvault.cli.app", "pgvault.cli.physical"])):
        out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                             text=True, check=True).stdout.splitlines()[-1]
        assert out == repr(wanted), (argv, out)
