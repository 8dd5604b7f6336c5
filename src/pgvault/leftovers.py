"""What a killed pgvault left behind: found by the next run, removed when provably dead, reported.

SIGKILL runs no cleanup, so everything private a run creates is named for its owner: the
process id, that process's start time (a pid is reused; pid and start time never are within
one boot) and a tag for this host (its boot and pid namespace). A run removes only what
belongs to a process of this host that is no longer running:

- private folders ``$TMPDIR/pgvault-<kind>-<owner>-*`` (a restore's pg_restore lists, the
  password file where no in-memory file can be had), named with their owner;
- scratch clusters ``$TMPDIR/pgvault-pg-*`` of ``pg/cluster.py``, whose owner is in their
  marker file (OWNER_FILE): their postmaster is stopped at once, then the folder removed;
  a cluster handed over (``verify --keep``, a physical restore's server) is never touched;
- scratch databases ``pgvault_tmp_*``/``pgvault_verify_*`` named by ``database_name``, on
  the server a restore or drill connects to.

Passwords and decrypted spools never reach a file name at all (pg/conninfo.py: an
in-memory file; engines/spool.py: an unnamed file), so there is no secret to sweep.
Older pgvault versions named folders with random letters only: such a password folder or
spool that has not changed for LEGACY_AGE is removed too (nothing of a live run waits that
long to read it), while their clusters stay, since a kept one looks just like a dead one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pgvault import logs

log = logs.get("leftovers")

OWNER_FILE = "pgvault-owner.json"
LEGACY_AGE = 3600.0
STOP_WAIT = 15.0
DATABASE_PREFIXES = ("pgvault_tmp_", "pgvault_verify_")

_FOLDER = re.compile(r"pgvault-([a-z]+)-(\d+)\.(\d+)\.([0-9a-f]{8})-")
_LEGACY_FOLDER = re.compile(r"pgvault-(pass|restore)-[a-z0-9_]{8}")
_DATABASE = re.compile(r"(pgvault_(?:tmp|verify)_)(\d+)_(\d+)_([0-9a-f]{8})_[0-9a-f]+")


@dataclass(frozen=True)
class Owner:
    """A process on a host: what a leftover is named for."""

    pid: int
    start: int  # clock ticks after boot (/proc/PID/stat); 0 where there is no /proc
    host: str

    def token(self) -> str:
        return f"{self.pid}.{self.start}.{self.host}"

    def here(self) -> bool:
        """Whether the process would run on this host (same boot, same pid namespace)."""
        return self.host == _host_tag()

    def dead(self) -> bool:
        """Provably gone: of this host, and no such process (or a zombie) any more."""
        if not self.here():
            return False
        if self.start == 0:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        found = _stat(self.pid)
        return found is None or found[1] != self.start or found[0] in "ZX"


def me() -> Owner:
    """This process (computed per call: a forked child is another owner)."""
    found = _stat(os.getpid())
    return Owner(os.getpid(), found[1] if found else 0, _host_tag())


def folder_prefix(kind: str) -> str:
    """The name prefix of this process's private folders of ``kind`` (lowercase letters),
    for ``tempfile.mkdtemp``/``TemporaryDirectory(prefix=...)``."""
    return f"pgvault-{kind}-{me().token()}-"


def private_folder(kind: str) -> str:
    """A new 0700 folder in TMPDIR that the next run removes once this process is dead."""
    return tempfile.mkdtemp(prefix=folder_prefix(kind))


def database_name(prefix: str) -> str:
    """A scratch database's name that says which process of which host made it."""
    owner = me()
    return f"{prefix}{owner.pid}_{owner.start}_{owner.host}_{secrets.token_hex(2)}"


def write_marker(root: Path, **details: str | bool) -> None:
    """Record in a cluster folder that this process owns it (and what to stop)."""
    owner = me()
    record = {"pid": owner.pid, "start": owner.start, "host": owner.host, **details}
    part = root / (OWNER_FILE + ".part")
    part.write_text(json.dumps(record))
    part.replace(root / OWNER_FILE)


def mark_kept(root: Path) -> None:
    """A cluster left running on purpose: no later run may stop or remove it."""
    path = root / OWNER_FILE
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(path.read_text())
        record["kept"] = True
        part = root / (OWNER_FILE + ".part")
        part.write_text(json.dumps(record))
        part.replace(path)


def sweep(*folders: str | Path | None) -> list[str]:
    """Remove what dead pgvault processes left in TMPDIR (and ``folders``); report it.

    Never raises: a leftover that cannot be removed is a warning, not a reason to fail the
    run that found it.
    """
    removed: list[str] = []
    bases = {Path(tempfile.gettempdir()).resolve()}
    bases |= {Path(folder).resolve() for folder in folders if folder}
    for base in bases:
        try:
            entries = list(base.iterdir())
        except OSError:
            continue
        # Clusters first: a server may run on a data folder inside another private folder.
        entries.sort(key=lambda entry: not entry.name.startswith("pgvault-pg-"))
        for entry in entries:
            try:
                what = _sweep_one(entry)
            except OSError as exc:
                log.warning("could not remove %s, left by a dead pgvault process: %s",
                            entry, exc)
                continue
            if what:
                removed.append(what)
    _report(removed)
    return removed


class Admin(Protocol):
    """A session that runs SQL on the server (pg/psql.py's PsqlSession)."""

    def run(self, sql: str) -> list[list[str]]: ...


def drop_dead_databases(admin: Admin) -> list[str]:
    """Drop the scratch databases of dead pgvault processes of this host on ``admin``'s server.

    Only names ``database_name`` made, whose process is provably gone; any other database
    (an older pgvault's random names, another host's, a live run's) is left alone.
    """
    from pgvault.errors import DatabaseError

    try:
        rows = admin.run("SELECT datname FROM pg_database WHERE datname ~ "
                         "'^pgvault_(tmp|verify)_[0-9]+_[0-9]+_[0-9a-f]{8}_'")
    except DatabaseError as exc:
        log.debug("leftovers: cannot list databases: %s", exc)
        return []
    dropped = []
    for (name, *_) in rows:
        match = _DATABASE.fullmatch(name)
        if match is None:
            continue
        owner = Owner(int(match[2]), int(match[3]), match[4])
        if not owner.dead():
            continue
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            admin.run(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        except DatabaseError as exc:
            log.warning("could not drop database %s, left by a dead pgvault process "
                        "(pid %d): %s", name, owner.pid, exc)
            continue
        dropped.append(f"database {name} (pid {owner.pid})")
    _report(dropped)
    return dropped


# -- the kinds of leftovers ---------------------------------------------------------------


def _sweep_one(entry: Path) -> str | None:
    name = entry.name
    if not name.startswith("pgvault-") or entry.is_symlink() or not entry.is_dir():
        return None
    if name.startswith("pgvault-pg-"):
        return _sweep_cluster(entry)
    match = _FOLDER.match(name)
    if match is not None:
        owner = Owner(int(match[2]), int(match[3]), match[4])
        if not owner.dead():
            return None
        shutil.rmtree(entry)
        return f"{_KINDS.get(match[1], match[1] + ' folder')} {entry} (pid {owner.pid})"
    legacy = _LEGACY_FOLDER.fullmatch(name)
    if legacy is not None and _untouched_for(entry, LEGACY_AGE) and not _held_open(entry):
        shutil.rmtree(entry)
        return f"{_KINDS[legacy[1]]} {entry} (an older pgvault's)"
    return None


_KINDS = {"pass": "password folder", "restore": "restore spool folder"}


def _sweep_cluster(root: Path) -> str | None:
    try:
        record = json.loads((root / OWNER_FILE).read_text())
        owner = Owner(int(record["pid"]), int(record["start"]), str(record["host"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an older pgvault's, or one being set up this instant
    if record.get("kept") or not owner.dead():
        return None
    data_dir = Path(str(record.get("data_dir") or root / "data"))
    stopped = _stop_postmaster(data_dir)
    socket_dir = record.get("socket_dir")
    if socket_dir and Path(socket_dir) != root and Path(socket_dir).name.startswith("pgv-"):
        shutil.rmtree(socket_dir, ignore_errors=True)
    shutil.rmtree(root)
    server = f", its server (pid {stopped}) stopped" if stopped else ""
    return f"scratch cluster {root} (pid {owner.pid}){server}"


def _stop_postmaster(data_dir: Path) -> int | None:
    """Stop the postmaster serving ``data_dir`` at once (immediate shutdown); its pid."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    # postmaster.pid may be stale and its pid reused: it is the server only if that process
    # works in this data folder (the postmaster's working directory is its PGDATA).
    try:
        if Path(os.readlink(f"/proc/{pid}/cwd")).resolve() != data_dir.resolve():
            return None
    except OSError:
        return None
    for sig, wait in ((signal.SIGQUIT, STOP_WAIT), (signal.SIGKILL, STOP_WAIT)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            found = _stat(pid)
            if found is None or found[0] in "ZX":
                return pid
            time.sleep(0.05)
    raise OSError(f"PostgreSQL (pid {pid}) in {data_dir} would not stop")


def _report(removed: Iterable[str]) -> None:
    items = list(removed)
    if items:
        noun = "leftover" if len(items) == 1 else "leftovers"
        log.warning("removed %d %s of dead pgvault processes: %s", len(items), noun,
                    "; ".join(items))


# -- facts about processes and this host --------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process from /proc; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


_TAG: str | None = None


def _host_tag() -> str:
    """8 hex digits naming this boot of this host and this pid namespace."""
    global _TAG
    if _TAG is None:
        parts = [socket.gethostname()]
        for path in ("/proc/sys/kernel/random/boot_id",):
            with contextlib.suppress(OSError):
                parts.append(Path(path).read_text().strip())
        with contextlib.suppress(OSError):
            parts.append(os.readlink("/proc/self/ns/pid"))
        _TAG = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]
    return _TAG


def _untouched_for(folder: Path, seconds: float) -> bool:
    now = time.time()
    try:
        times = [folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()]
    except OSError:
        return False
    return now - max(times) > seconds


def _held_open(folder: Path) -> bool:
    """Whether any process we can see has a file in ``folder`` open."""
    prefix = str(folder.resolve()) + "/"
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(prefix):
                        return True
    return False
