"""Find the PostgreSQL client and server programs that match a server's major version."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from pgvault.errors import DatabaseError

# Debian/Ubuntu (postgresql-common) install each major side by side here.
PG_LIB_DIR = Path("/usr/lib/postgresql")

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def installed_majors() -> list[int]:
    """Majors that have a `/usr/lib/postgresql/<major>/bin` folder, ascending."""
    if not PG_LIB_DIR.is_dir():
        return []
    majors = [
        int(entry.name)
        for entry in PG_LIB_DIR.iterdir()
        if entry.name.isdigit() and (entry / "bin").is_dir()
    ]
    return sorted(majors)


def bindir_for(server_major: int) -> Path:
    """Folder of client tools able to talk to a `server_major` server (same or newer)."""
    exact = PG_LIB_DIR / str(server_major) / "bin"
    if exact.is_dir():
        return exact
    majors = installed_majors()
    newer = [m for m in majors if m >= server_major]
    if newer:
        return PG_LIB_DIR / str(newer[0]) / "bin"
    # pg_dump refuses servers newer than itself, so a PATH pg_dump counts only if new enough.
    on_path = shutil.which("pg_dump")
    path_major: int | None = None
    if on_path is not None:
        try:
            path_major = tool_version(Path(on_path))[0]
        except DatabaseError:
            path_major = None
        if path_major is not None and path_major >= server_major:
            return Path(on_path).parent
    known = [*majors, *([path_major] if path_major is not None else [])]
    found = f"the newest pg_dump here is {max(known)}" if known else "no pg_dump was found"
    raise DatabaseError(
        f"server is PostgreSQL {server_major} but {found}; install postgresql-client-{server_major}"
    )


def tool(name: str, server_major: int) -> Path:
    """Path of client program `name` (e.g. pg_dump) suitable for a `server_major` server."""
    bindir = bindir_for(server_major)
    path = bindir / name
    if not path.is_file():
        raise DatabaseError(
            f"{name} not found in {bindir}; install postgresql-client-{server_major}"
        )
    return path


@functools.cache
def tool_version(path: Path, search_path: str | None = None) -> tuple[int, int]:
    """(major, minor) reported by `path --version`; cached per path (``search_path``: the
    PATH it runs with, by default this process's)."""
    try:
        proc = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            # --version needs nothing from the environment, least of all its secrets.
            env={"PATH": search_path or os.environ.get("PATH", "/usr/bin:/bin"),
                 "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatabaseError(f"could not run {path} --version: {exc}") from exc
    match = _VERSION_RE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit status {proc.returncode}"
        raise DatabaseError(f"could not read the version of {path}: {reason}")
    return int(match.group(1)), int(match.group(2) or 0)
