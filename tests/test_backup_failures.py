"""A pg_dump killed mid-run: the backup fails loudly, names the signal, and leaves no backup."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from cli_runner import pgvault, stalled_backup


def _dumping_child(parent: subprocess.Popen[str], timeout: float = 30) -> psutil.Process:
    """The pg_dump that streams the archive (not a short-lived `pg_dump --version`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(parent.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.name() == "pg_dump" and "--format=custom" in child.cmdline():
                    return child
        time.sleep(0.02)
    raise AssertionError("no dumping pg_dump child appeared")


def test_killed_pg_dump_fails_the_backup_with_one_line(
    make_db: Callable[..., str], tmp_path: Path
) -> None:
    url = make_db()
    repo_dir = tmp_path / "repo"
    # pg_dump waits on a locked table, so it is alive and mid-dump when we kill it.
    with stalled_backup(url, f"file://{repo_dir}", "--no-globals") as proc:
        _dumping_child(proc).send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 8, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["pgvault: pg_dump was killed by signal 9"]
    assert not list(repo_dir.glob("manifests/**/*.json"))
    assert not list(repo_dir.glob("backups/**/*")) or not [
        p for p in repo_dir.glob("backups/**/*") if p.is_file()]
    # The next run succeeds, and what it stored restores to the same rows.
    pgvault("backup", "--dbname", url, "--repo", f"file://{repo_dir}", "--no-globals")
    shown = json.loads(pgvault("show", "--json", "--repo", f"file://{repo_dir}").stdout)
    assert [(t["name"], t["rows"]) for t in shown["facts"]["tables"]] == [("t", 1000)]
