"""Run the `pgvault` command as a user would: in this process by default, or as a real one.

``pgvault(...)`` calls ``pgvault.cli.main(argv, env)`` here, capturing what it prints: the
same CompletedProcess a child process gives, at a fraction of the cost (no interpreter
start-up, no imports), and its coverage counts. ``pgvault(..., subprocess=True)`` (or
``pgvault_process``) starts the real console script: for what only a process shows —
signals, its argv as others see it (ps, /proc), its start-up time, its stdin, its PID as a
lock owner, anything process-wide.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess as sp
import sys
import tempfile
from collections.abc import Iterator, Mapping
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
def stalled_backup(url: str, repo: str, *extra: str) -> Iterator[sp.Popen[str]]:
    """A running `pgvault backup` whose pg_dump waits, for the block, on a locked table ``t``."""
    with psycopg.connect(url) as blocker:
        blocker.execute("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000)")
        blocker.commit()
        blocker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        proc = sp.Popen([PGVAULT, "backup", "--dbname", url, "--repo", repo, *extra],
                        env=clean_env(), stderr=sp.PIPE, text=True)
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
    subprocess: bool | None = None,
) -> sp.CompletedProcess[str]:
    """Run pgvault with ``args``; assert its exit code unless ``expect`` is None.

    ``env`` is laid over this process's environment without pgvault's own variables
    (clean_env). ``subprocess``: run the real console script in a child process (None:
    when CLI_RUNNER_SUBPROCESS=1, to compare the two ways or time them). ``timeout``
    bounds a child process only.
    """
    full_env = clean_env()
    full_env.update(env or {})
    if subprocess is None:
        subprocess = os.environ.get("CLI_RUNNER_SUBPROCESS") == "1"
    if subprocess:
        proc = sp.run(
            [PGVAULT, *args], env=full_env, capture_output=True, text=True, timeout=timeout,
            check=False,
        )
    else:
        proc = _in_process(list(args), full_env)
    if expect is not None:
        assert proc.returncode == expect, (
            f"pgvault {' '.join(args)} exited {proc.returncode}, expected {expect}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def pgvault_process(*args: str, env: dict[str, str] | None = None, expect: int | None = 0,
                    timeout: float = 300) -> sp.CompletedProcess[str]:
    """``pgvault(...)`` in a real child process (signals, argv, start-up, PID, stdin)."""
    return pgvault(*args, env=env, expect=expect, timeout=timeout, subprocess=True)


def _in_process(argv: list[str], env: Mapping[str, str]) -> sp.CompletedProcess[str]:
    """main(argv, env) here, stdout and stderr captured.

    pgvault itself reads only ``env``; libpq and botocore read the process environment,
    which a real run gets from exec: it is ``env`` for the call, and put back after it.
    """
    from pgvault.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        _replace_environ(env)
        # The standard library caches TMPDIR at its first look; a real run starts afresh.
        tempfile.tempdir = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv, env)
    finally:
        _replace_environ(saved)
        tempfile.tempdir = None
    return sp.CompletedProcess([PGVAULT, *argv], code, out.getvalue(), err.getvalue())


def _replace_environ(env: Mapping[str, str]) -> None:
    for name in [name for name in os.environ if name not in env]:
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def one_line_error(proc: sp.CompletedProcess[str]) -> str:
    """The error a failed run printed: exactly one line, no traceback."""
    # 'restore latest' names the backup it chose before it starts: information, not an error.
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith("latest backup of ")]
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    return lines[0]
