"""pgvault installed the way README.md tells users to install it for WAL archiving.

The fixture runs README's "Where to install pgvault for WAL archiving" block as written,
from a copy of this repository's sources (as a checkout), with /opt, /usr/local/bin and
/etc moved under a temporary root that every OS user may pass (apt-get aside; `sudo -u
postgres` as runuser, since sudo may not be installed): a venv on Debian's /usr/bin/python3
with the pinned dependencies. Built once per test process and shared by the test modules
that import it.
"""

from __future__ import annotations

import atexit
import functools
import os
import pwd
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


def readme_install_block() -> list[str]:
    """README's install commands for WAL archiving, one a line, comments dropped."""
    section = (REPO / "README.md").read_text().split(
        "### Where to install pgvault for WAL archiving\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines()
            if line.strip() and not line.startswith("#")]


@functools.cache
def _build() -> Path:
    root = Path(tempfile.mkdtemp(prefix="pgvault-opt-", dir="/tmp"))
    atexit.register(shutil.rmtree, root, True)
    root.chmod(0o755)  # as /: every user passes through
    checkout = copy_sources(root / "checkout")
    (checkout / "pgvault.toml").write_text('repo = "file:///var/backups/pgvault"\n')
    for folder in ("usr/local/bin", "etc"):
        (root / folder).mkdir(parents=True)
    runuser = shutil.which("runuser") or "runuser"
    lines = []
    for line in readme_install_block():
        command = line.replace("sudo -u postgres ", f"{runuser} -u postgres -- ")
        command = command.replace("sudo ", "")
        if command.split()[0] == "apt-get":
            continue
        for prefix in ("/opt/pgvault", "/usr/local/bin/", "/etc/"):
            command = command.replace(f" {prefix}", f" {root}{prefix}")
            if command.startswith(prefix):
                command = f"{root}{command}"
        lines.append(command)
    ran = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=checkout,
                         capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, **PIP_ENV})
    assert ran.returncode == 0, "README's install block failed:\n" + "\n".join(lines) + \
        "\n" + ran.stdout + ran.stderr
    assert "pgvault" in ran.stdout  # the last line: --version, run as postgres
    config = root / "etc" / "pgvault.toml"
    assert (config.stat().st_mode & 0o777, config.stat().st_gid) == \
        (0o640, pwd.getpwnam("postgres").pw_gid)
    return root / "opt" / "pgvault"


@pytest.fixture(scope="session")
def installed_pgvault() -> Path:
    """The `pgvault` program of a venv on /usr/bin/python3, installed from the repository."""
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 (Debian's Python) on this machine")
    return _build() / "bin" / "pgvault"
