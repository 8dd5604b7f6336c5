"""Run the real `pgvault` console script in a child process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PGVAULT = str(Path(sys.executable).with_name("pgvault"))


def pgvault(
    *args: str,
    env: dict[str, str] | None = None,
    expect: int | None = 0,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run pgvault with ``args``; assert its exit code unless ``expect`` is None."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    for name in ("DATABASE_URL", "DIRECT_URL", "PGDATABASE", "PGPASSWORD"):
        full_env.pop(name, None)
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
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    return lines[0]
