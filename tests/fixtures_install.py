"""pgvault installed the way deploy/README.md and README.md tell users to install it.

A venv built on Debian's own /usr/bin/python3 in a folder every OS user may read and
execute (the tests' stand-in for /opt/pgvault), with pgvault pip-installed from a copy of
this repository's sources (as the Dockerfile copies them), with the pinned dependencies
when constraints.txt exists. Built once per test process (~15 s) and shared by the test
modules that import it.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3")


def copy_sources(destination: Path) -> Path:
    """What an install needs from a checkout: pip builds in place, so never in the repo."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, destination / name)
    shutil.copytree(REPO / "src", destination / "src",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    return destination


# Test runs only: byte-compiling botocore and boto3 is half the CPU of an install, and the
# recipes' own text stays exactly as users paste it.
PIP_ENV = {"PIP_NO_COMPILE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def pip_install(venv: Path, source: Path) -> None:
    constraints = ["-c", str(source / "constraints.txt")] \
        if (source / "constraints.txt").exists() else []
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                           *constraints, str(source)],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, **PIP_ENV})
    assert proc.returncode == 0, proc.stdout + proc.stderr


@functools.cache
def _build() -> Path:
    base = Path(tempfile.mkdtemp(prefix="pgvault-opt-", dir="/tmp"))
    atexit.register(shutil.rmtree, base, True)
    base.chmod(0o755)  # as /opt: every user passes through
    venv = base / "pgvault"
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", str(venv)], check=True,
                   capture_output=True)
    pip_install(venv, copy_sources(base / "src-copy"))
    return venv


@pytest.fixture(scope="session")
def installed_pgvault() -> Path:
    """The `pgvault` program of a venv on /usr/bin/python3, installed from the repository."""
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 (Debian's Python) on this machine")
    return _build() / "bin" / "pgvault"
