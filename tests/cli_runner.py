"""Run the real `pgvault` console script in a child process, as a user would."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg

PGVAULT = str(Path(sys.executable).with_name("pgvault"))


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would configure pgvault."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    for name in ("DATABASE_URL", "DIRECT_URL", "PGDATABASE", "PGPASSWORD"):
        env.pop(name, None)
    return env


@contextlib.contextmanager
def stalled_backup(url: str, repo: str, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """A running `pgvault backup` whose pg_dump waits, for the block, on a locked table ``t``."""
    with psycopg.connect(url) as blocker:
        blocker.execute("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000)")
        blocker.commit()
        blocker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        proc = subprocess.Popen([PGVAULT, "backup", "--dbname", url, "--repo", repo, *extra],
                                env=clean_env(), stderr=subprocess.PIPE, text=True)
        try:
            yield proc
        except BaseException:
            proc.kill()
            proc.wait()
            raise


def pgvault(
    *args: str,
    env: dict[str, str] | None = None,
    expect: int | None = 0,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run pgvault with ``args``; assert its exit code unless ``expect`` is None."""
    full_env = clean_env()
    full_env.update(env or {})
    proc = subprocess.run(
        [PGVAULT, *args], env=full_env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    if expect is not None:
        assert proc.returncode == expect, (
            f"pgvault {' '.join(args)} exited {proc.returncode}, expected {expect}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The error a failed run printed: exactly one line, no traceback."""
    # 'restore latest' names the backup it chose before it starts: information, not an error.
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith("latest backup of ")]
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    return lines[0]
