"""What a backup does before pg_dump starts: psql connects while the rest of pgvault is
still being imported, and the transaction-pooler check's two sessions start together; the
sessions started early are used by the backup, or closed when it never gets that far."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from cli_runner import clean_env
from pgvault.engines import logical
from pgvault.engines.logical import connecting, started_sessions
from pgvault.pg.conninfo import ConnInfo
from pgvault.pg.psql import PsqlSession

SPY = """
import subprocess, sys
real = subprocess.Popen.__init__
seen = []
def spy(self, args, *a, **k):
    name = str(args[0]).rsplit("/", 1)[-1]
    if name == "psql" and not seen:
        print("jobs imported at psql's start:", "pgvault.ops.jobs" in sys.modules,
              file=sys.stderr)
    if "--format=custom" in [str(x) for x in args]:
        print("psql sessions before pg_dump:", seen.count("psql"), file=sys.stderr)
    seen.append(name)
    real(self, args, *a, **k)
subprocess.Popen.__init__ = spy
from pgvault.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_psql_connects_before_the_backup_is_imported_and_its_sessions_are_used(
    make_db: Callable[..., str], tmp_path: Path
) -> None:
    """psql starts before ops.jobs (and what it imports, ~20 ms) is imported; the two
    sessions started then are the backup's snapshot session and the pooler check's: no
    third is started before pg_dump."""
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 10) AS x")
    proc = subprocess.run(
        [sys.executable, "-c", SPY, "backup", "--dbname", url, "--repo",
         f"file://{tmp_path / 'repo'}"],
        env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "jobs imported at psql's start: False" in proc.stderr, proc.stderr
    assert "psql sessions before pg_dump: 2" in proc.stderr, proc.stderr


def test_sessions_started_early_are_handed_over_once_or_closed(
    make_db: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_db()
    conn = ConnInfo.parse(url)
    made: list[PsqlSession] = []

    class Recorded(PsqlSession):
        def __init__(self, conn: ConnInfo) -> None:
            super().__init__(conn)
            made.append(self)

    monkeypatch.setattr(logical, "PsqlSession", Recorded)
    with connecting(conn):
        assert started_sessions(ConnInfo.parse(url + "_other")) is None
        taken = started_sessions(conn)
        assert taken is not None
        session, other = taken
        assert other is not None
        assert started_sessions(conn) is None, "handed over once"
        assert session.preflight().backend_pid != other.preflight().backend_pid
        session.close()
        other.close()
    made.clear()
    with connecting(conn):
        assert len(made) == 2
    assert all(s.proc.returncode is not None for s in made), "unused ones end with the block"
    assert started_sessions(conn) is None, "nothing outlives the block"
