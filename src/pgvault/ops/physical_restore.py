"""Point-in-time recovery: a base backup unpacked into an empty folder, WAL replayed to a target.

pgvault unpacks and configures (``recovery.signal``, ``restore_command`` running
``pgvault wal-fetch``, the recovery target); PostgreSQL itself replays the WAL, either
when the user starts it or, with ``start``, on a port pgvault picks, waiting until the
target is reached.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgvault import leftovers
from pgvault.catalog import Catalog
from pgvault.engines.physical import MANIFEST, needed_wal, unpack, verify_backup
from pgvault.errors import DatabaseError, IntegrityError, RestoreFailed, UsageError
from pgvault.model import Manifest, PhysicalFacts
from pgvault.ops import incremental
from pgvault.ops import wal as archive
from pgvault.ops.restore import open_artifact
from pgvault.pg import wal
from pgvault.pg.cluster import EphemeralCluster, server_owner
from pgvault.pipeline.stream import CHUNK
from pgvault.storage.base import Storage

if TYPE_CHECKING:
    from pgvault.pipeline.age import Keyring

TARGET_ACTIONS = ("promote", "pause", "shutdown")
_PAUSED = "pausing at the end of recovery"  # PostgreSQL's log line when the target is reached


@dataclass(frozen=True)
class RecoveryTarget:
    """Where replay stops (nothing set: the end of the archived WAL) and what happens then."""

    time: datetime | None = None
    lsn: str | None = None
    xid: str | None = None
    name: str | None = None
    immediate: bool = False
    action: str = "promote"
    timeline: str = "latest"
    inclusive: bool = True

    def __post_init__(self) -> None:
        given = [k for k in ("time", "lsn", "xid", "name") if getattr(self, k) is not None]
        given += ["immediate"] if self.immediate else []
        if len(given) > 1:
            raise UsageError(f"give one recovery target, not {' and '.join(given)}")
        if self.time is not None and self.time.tzinfo is None:
            raise UsageError("--target-time needs a time zone, e.g. 2026-11-25T09:14:00+00:00")
        if self.lsn is not None:
            wal.parse_lsn(self.lsn)
        if self.xid is not None and not self.xid.isdigit():
            raise UsageError(f"--target-xid {self.xid!r} is not a transaction id")
        if self.action not in TARGET_ACTIONS:
            raise UsageError(f"--target-action must be one of {', '.join(TARGET_ACTIONS)}")

    @property
    def kind(self) -> str | None:
        for name in ("time", "lsn", "xid", "name"):
            if getattr(self, name) is not None:
                return name
        return "immediate" if self.immediate else None

    @property
    def effective_action(self) -> str:
        """Without a target, replay runs to the end of the WAL and always promotes."""
        return self.action if self.kind else "promote"

    def settings(self) -> dict[str, str]:
        """The recovery_* settings for postgresql.auto.conf."""
        values: dict[str, str] = {}
        if self.time is not None:
            values["recovery_target_time"] = self.time.isoformat()
        elif self.lsn is not None:
            values["recovery_target_lsn"] = self.lsn
        elif self.xid is not None:
            values["recovery_target_xid"] = self.xid
        elif self.name is not None:
            values["recovery_target_name"] = self.name
        elif self.immediate:
            values["recovery_target"] = "immediate"
        if self.kind:
            values["recovery_target_action"] = self.action
            if self.kind in ("time", "lsn", "xid"):
                values["recovery_target_inclusive"] = "on" if self.inclusive else "off"
        values["recovery_target_timeline"] = self.timeline
        return values

    def describe(self) -> str:
        if self.time is not None:
            return f"time {self.time.isoformat()}"
        if self.lsn is not None:
            return f"LSN {self.lsn}"
        if self.xid is not None:
            return f"transaction {self.xid}"
        if self.name is not None:
            return f"restore point {self.name!r}"
        if self.immediate:
            return "the end of the base backup (consistency)"
        return "the end of the archived WAL"


def choose_backup(storage: Storage, cluster: str, ref: str, target: RecoveryTarget) -> Manifest:
    """The backup ``ref`` names, or for 'latest' the newest one that ends before the target."""
    catalog = Catalog(storage)
    backups = [m for m in catalog.list(cluster) if m.kind == "physical" and m.physical]
    if not backups:
        raise UsageError(f"no physical backups of cluster {cluster!r} in {storage.url} "
                         "(take one with pgvault basebackup)")
    if ref != "latest":
        chosen = catalog.get(ref, cluster)
        if chosen.kind != "physical" or chosen.physical is None:
            raise UsageError(f"backup {chosen.id} is a logical backup; restore it without "
                             "--physical")
        if not _ends_before(chosen, target):
            raise UsageError(f"backup {chosen.id} ends after the target {target.describe()}; "
                             "choose an older one (or 'latest')")
        return chosen
    # A backup whose drill failed integrity is never what 'latest' means (as for logical).
    bad = catalog.bad(cluster)
    usable = [m for m in backups if _ends_before(m, target) and (m.database, m.id) not in bad]
    if not usable:
        first = backups[0].physical
        assert first is not None
        raise UsageError(
            f"no base backup of {cluster!r} ends before {target.describe()}; the earliest "
            f"restorable point is {first.stop_time.isoformat()} (LSN {first.stop_lsn})"
        )
    return usable[-1]


def _ends_before(manifest: Manifest, target: RecoveryTarget) -> bool:
    facts = manifest.physical
    assert facts is not None
    if target.time is not None:
        return facts.stop_time <= target.time
    if target.lsn is not None:
        return wal.parse_lsn(facts.stop_lsn) <= wal.parse_lsn(target.lsn)
    return True  # xid, name: only replay can tell; the newest backup is the best guess


@dataclass
class PhysicalRestoreOptions:
    """Where to restore, to which point, how the server fetches WAL, and whether to start it."""

    pgdata: Path
    target: RecoveryTarget
    restore_command: str
    cluster: str
    start: bool = False
    port: int | None = None
    keep_archiving: bool = False
    timeout: float = 3600.0
    progress: Callable[[int], None] | None = None
    identities: Keyring | None = None


@dataclass
class PhysicalRestoreResult:
    """What a physical restore did; with ``start``, where the server runs and how it ended."""

    manifest: Manifest
    pgdata: Path
    unpack_seconds: float
    state: str  # "configured", "promoted", "paused", "shut down"
    recovery_seconds: float | None = None
    port: int | None = None
    pid: int | None = None
    log_path: Path | None = None


def restore_physical(storage: Storage, manifest: Manifest,
                     options: PhysicalRestoreOptions) -> PhysicalRestoreResult:
    """Unpack ``manifest`` into an empty folder, configure recovery, optionally replay."""
    facts = manifest.physical
    if manifest.kind != "physical" or facts is None:
        raise UsageError(f"backup {manifest.id} is not a physical backup")
    if not facts.wal_included:
        missing = [n for n in needed_wal(facts, None)
                   if not archive.versions(storage, options.cluster, n)]
        if missing:
            raise RestoreFailed(f"backup {manifest.id} needs WAL {', '.join(missing)}, which is "
                                f"not in the archive of cluster {options.cluster!r}")
    # An incremental backup's parents are found and checked before anything is written.
    members = incremental.chain(storage, manifest)
    pgdata = options.pgdata.absolute()
    created = _claim_empty(pgdata)
    owner = server_owner()
    started = time.monotonic()
    try:
        _unpack_chain(storage, members, pgdata, owner, options.progress, options.identities)
        _write_recovery(pgdata, manifest, options, owner)
    except BaseException:
        _wipe(pgdata, created)
        raise
    result = PhysicalRestoreResult(manifest, pgdata, time.monotonic() - started, "configured")
    if options.start:
        try:
            with _WalPrefetch(storage, options.cluster, facts, pgdata, owner,
                              options.identities) as prefetch:
                _start(result, options, prefetch.restore_command(options.restore_command))
        except RestoreFailed as exc:
            # Kept: after fixing the target in postgresql.auto.conf, replay can go on.
            raise RestoreFailed(f"{exc} ({pgdata} is kept, unpacked and not recovered: fix "
                                "the target and start it, or remove it)") from None
    return result


def _unpack_chain(storage: Storage, members: list[Manifest], pgdata: Path,
                  owner: tuple[int, int] | None, progress: Callable[[int], None] | None,
                  identities: Keyring | None) -> None:
    """The full backup unpacked, then each incremental of the chain applied in order."""
    first = members[0]
    unpack(open_artifact(storage, first, first.artifact("base.tar"), progress=progress,
                         identities=identities), pgdata, owner=owner)
    for member in members[1:]:
        incremental.apply(storage, member, pgdata, owner=owner, progress=progress,
                          identities=identities)


def _claim_empty(pgdata: Path) -> bool:
    """Make sure ``pgdata`` is an empty folder; True if we created it."""
    if pgdata.exists():
        if not pgdata.is_dir():
            raise RestoreFailed(f"{pgdata} exists and is not a folder")
        if any(pgdata.iterdir()):
            raise RestoreFailed(f"{pgdata} is not empty; restore into a new or empty folder")
        return False
    try:
        pgdata.mkdir(mode=0o700, parents=True)
    except OSError as exc:
        raise RestoreFailed(f"cannot create {pgdata}: {exc.strerror}") from None
    return True


def _wipe(pgdata: Path, created: bool) -> None:
    """Undo a failed restore: the folder was empty (or absent) before we began."""
    if created:
        shutil.rmtree(pgdata, ignore_errors=True)
        return
    for entry in list(pgdata.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _write_recovery(pgdata: Path, manifest: Manifest, options: PhysicalRestoreOptions,
                    owner: tuple[int, int] | None) -> None:
    settings = {"restore_command": options.restore_command, **options.target.settings()}
    if not options.keep_archiving:
        # A restored copy must not archive into the repository it restores from: its new
        # timeline would change what later restores of the original see.
        settings["archive_mode"] = "off"
    lines = [f"\n# pgvault restore of backup {manifest.id}, to {options.target.describe()}"]
    lines += [f"{key} = {_conf_quote(value)}" for key, value in settings.items()]
    auto_conf = pgdata / "postgresql.auto.conf"
    with open(auto_conf, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    signal_file = pgdata / "recovery.signal"
    signal_file.touch(mode=0o600)
    if owner is not None:
        for path in (auto_conf, signal_file):
            os.chown(path, *owner)


_SPOOL = "pgvault_wal_spool"


class _WalPrefetch:
    """The archived WAL replay will ask for, fetched ahead into ``PGDATA/pgvault_wal_spool``
    while the server replays (pgBackRest's archive-get queue does the same).

    Each ``wal-fetch`` is a process start (0.3-0.8 s, more than replaying a segment), and
    recovery asks for one segment at a time. The started server's restore_command first
    moves a spooled file into place, in its shell, and answers "absent" at once for what
    the archive listing showed missing (the next timeline's history file, the current one's
    when it has none, the segment after the newest archived one); anything else still goes
    to ``wal-fetch``. The command in postgresql.auto.conf stays the plain one, and the
    spool is removed when replay is over.
    """

    AHEAD = 8  # segments on disk at most, waiting for the server

    def __init__(self, storage: Storage, cluster: str, facts: PhysicalFacts, pgdata: Path,
                 owner: tuple[int, int] | None, identities: Keyring | None) -> None:
        self.folder = pgdata / _SPOOL
        self._storage, self._cluster, self._owner = storage, cluster, owner
        self._identities = identities
        self._stop = threading.Event()
        files = [f.wal for f in archive.archived(storage, cluster)]
        timelines = [w.timeline for w in files] or [facts.timeline]
        segments = sorted({w.name for w in files if w.kind == "segment"
                           and w.timeline == facts.timeline and w.name >= facts.start_wal})
        self._names = segments
        absent = [f"{max(timelines) + 1:08X}.history"]
        # Promotion asks for the old timeline's history file too (writeTimeLineHistory
        # copies the parent's); timeline 1 never has one: without this answer, every
        # promotion waited for a wal-fetch process to say so.
        own = f"{facts.timeline:08X}.history"
        if own not in {w.name for w in files}:
            absent.append(own)
        if segments:
            last = wal.parse_wal_name(segments[-1])
            size = facts.wal_segment_size
            if last is not None and not any(w.timeline > facts.timeline for w in files):
                absent.append(wal.segment_name(facts.timeline, last.segno(size) + 1, size))
        self._absent = absent
        self._thread = threading.Thread(target=self._run, name="pgvault-wal-prefetch",
                                        daemon=True)

    def __enter__(self) -> _WalPrefetch:
        self.folder.mkdir(mode=0o700)
        for name in self._absent:
            (self.folder / f"{name}.absent").touch()
        self._chown(self.folder)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)

    def restore_command(self, fallback: str) -> str:
        spool = shlex.quote(str(self.folder))
        return (f'f={spool}/"%f"; if [ -f "$f" ]; then mv -f "$f" "%p"; '
                f'elif [ -f "$f.absent" ]; then exit 1; else {fallback}; fi')

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, *self._owner)

    def _run(self) -> None:
        # Best effort: whatever is not spooled, the server's wal-fetch gets itself.
        with contextlib.suppress(Exception):
            for name in self._names:
                while not self._stop.is_set() and sum(
                        1 for p in self.folder.iterdir() if p.suffix != ".absent") >= self.AHEAD:
                    self._stop.wait(0.05)
                if self._stop.is_set():
                    return
                partial = self.folder / f".{name}.part"
                archive.fetch(self._storage, self._cluster, name, partial,
                              identities=self._identities)
                self._chown(partial)
                partial.rename(self.folder / name)


def _start(result: PhysicalRestoreResult, options: PhysicalRestoreOptions,
           restore_command: str) -> None:
    action = options.target.effective_action
    # Hot standby reports "ready" long before replay ends; pg_control says when it did.
    ready = () if action == "shutdown" else ("ready", "standby")
    server = EphemeralCluster.existing(result.pgdata, settings={
                                           "lc_messages": "C",
                                           "restore_command": restore_command,
                                           **_startup_sync(result.pgdata)},
                                       port=options.port, start_timeout=options.timeout,
                                       ready_states=ready)
    started = time.monotonic()
    try:
        server.start()
    except DatabaseError as exc:
        raise RestoreFailed(f"recovery failed: {_server_error(str(exc))}") from None
    try:
        if action == "shutdown":
            if server.wait_exit(options.timeout) != 0:
                raise RestoreFailed(f"recovery failed: {_server_error(_log(server))}")
        else:
            _wait_recovered(server, action, started + options.timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            server.stop()
        raise
    result.recovery_seconds = time.monotonic() - started
    result.state = {"promote": "promoted", "pause": "paused", "shutdown": "shut down"}[action]
    if action == "shutdown":
        server.stop()
        return
    result.port, result.pid, result.log_path = server.port, server.postmaster_pid, server.log_path
    server.detach()


def _startup_sync(pgdata: Path) -> dict[str, str]:
    """How the restored server makes the unpacked files durable before replay: one syncfs()
    per file system (PostgreSQL 14+ on Linux) instead of an fsync of every file, which is
    the default. Only on kernels from 5.8, which report a write-back error to syncfs(); the
    setting is for this start only (the command line), not kept in the folder's config."""
    if not sys.platform.startswith("linux") or not _kernel_at_least(5, 8):
        return {}
    try:
        major = int((pgdata / "PG_VERSION").read_text().strip())
    except (OSError, ValueError):
        return {}
    return {"recovery_init_sync_method": "syncfs"} if major >= 14 else {}


def _kernel_at_least(*wanted: int) -> bool:
    import re

    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return found is not None and tuple(int(g) for g in found.groups()) >= wanted


def _wait_recovered(server: EphemeralCluster, action: str, deadline: float) -> None:
    """Until replay reached the target: promoted (pg_control), or paused (the server log)."""
    while True:
        if not server.running:
            raise RestoreFailed(f"recovery failed: {_server_error(_log(server))}")
        if action == "pause" and _PAUSED in _log(server):
            return
        # The state is read from pg_control itself between looks, pg_controldata (the
        # checksummed truth) asked only once it says so: a look costs a read, not a process.
        if action == "promote" and _control_says_production(server) \
                and _control_state(server) == "in production":
            return
        if time.monotonic() > deadline:
            raise RestoreFailed(f"recovery did not reach its target in time; see {server.log_path}")
        time.sleep(RECOVERY_POLL)


RECOVERY_POLL = 0.02
"""Seconds between looks at a recovering server: the restore's end waits for the next one."""
# pg_control begins with system_identifier (8 bytes), pg_control_version and
# catalog_version_no (4 each), then the DBState enum, whose DB_IN_PRODUCTION is 6 in every
# release since 9.0 (src/include/catalog/pg_control.h), in the server's byte order.
_STATE_AT, _IN_PRODUCTION = 16, 6


def _control_says_production(server: EphemeralCluster) -> bool:
    """Whether pg_control's state field reads DB_IN_PRODUCTION; True when it cannot be
    read, so that pg_controldata decides."""
    try:
        with open(server.data_dir / "global" / "pg_control", "rb") as control:
            head = control.read(_STATE_AT + 4)
    except OSError:
        return True
    if len(head) < _STATE_AT + 4:
        return True
    return int.from_bytes(head[_STATE_AT:], sys.byteorder) == _IN_PRODUCTION


def _control_state(server: EphemeralCluster) -> str:
    """'Database cluster state' as pg_controldata reports it (in production, in archive ...)."""
    env = {**{k: v for k, v in server.environ.items() if not k.startswith("PG")},
           "LC_ALL": "C"}
    proc = subprocess.run([str(server.bindir / "pg_controldata"), "-D", str(server.data_dir)],
                          capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Database cluster state":
            return value.strip()
    return ""


def _log(server: EphemeralCluster) -> str:
    try:
        return server.log_path.read_text(errors="replace")
    except OSError:
        return "no server log"


def _server_error(text: str) -> str:
    """The telling line of a server log excerpt (FATAL/PANIC), else its first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker in ("PANIC:", "FATAL:"):
        for line in reversed(lines):
            if marker in line:
                return line[line.index(marker):]
    return lines[0] if lines else "no message"


@dataclass
class PhysicalVerification:
    """Integrity of a physical backup: every stream intact and pg_verifybackup satisfied."""

    manifest: Manifest
    seconds: float
    checks: list[str]


def verify_physical(storage: Storage, manifest: Manifest, cluster: str, *,
                    identities: Keyring | None = None) -> PhysicalVerification:
    """Unpack into a private temp folder, fetch the backup's WAL, run pg_verifybackup.

    Checks the size and sha256 of every stored stream, the codecs, the tar, the backup
    manifest stored beside the tar, then every file's checksum and the WAL range.
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=leftovers.folder_prefix("verify")) as folder:
        data_dir = Path(folder) / "data"
        data_dir.mkdir(mode=0o700)
        checks = _unpack_verified(storage, manifest, cluster, data_dir, identities, None)
    return PhysicalVerification(manifest, time.monotonic() - started, checks)


def _unpack_verified(storage: Storage, manifest: Manifest, cluster: str, data_dir: Path,
                     identities: Keyring | None, owner: tuple[int, int] | None) -> list[str]:
    """Unpack base.tar, put the backup's WAL into pg_wal, run pg_verifybackup on it all."""
    facts = manifest.physical
    if facts is None:
        raise UsageError(f"backup {manifest.id} is not a physical backup")
    checks = []
    members = incremental.chain(storage, manifest)
    _unpack_chain(storage, members, data_dir, owner, None, identities)
    if len(members) > 1:
        # pg_verifybackup knows only the full's manifest; replay, the page checksums (when
        # the cluster has them) and the drill's row counts check a chain.
        checks.append(f"base.tar of {len(members)} backups (a full and its incrementals): "
                      "size, sha256, compression and tar intact, every file at its listed "
                      "size")
    else:
        checks.append("base.tar: size, sha256, compression and tar intact")
    inside = data_dir / MANIFEST
    if any(a.name == MANIFEST for a in manifest.artifacts) and len(members) == 1:
        reader = open_artifact(storage, manifest, manifest.artifact(MANIFEST),
                               identities=identities)
        text = b"".join(iter(lambda: reader.read(CHUNK), b""))
        if not inside.is_file() or inside.read_bytes() != text:
            raise IntegrityError(f"backup {manifest.id}: the stored backup_manifest differs "
                                 "from the one inside base.tar")
        checks.append("backup_manifest: intact and identical to the one in base.tar")
    wal_dir = data_dir / "pg_wal"
    if not facts.wal_included:
        for name in needed_wal(facts, inside.read_bytes() if inside.exists() else None):
            archive.fetch(storage, cluster, name, wal_dir / name, identities=identities)
            if owner is not None:
                os.chown(wal_dir / name, *owner)
        checks.append(f"WAL {facts.start_wal}..{facts.stop_wal}: fetched from the archive "
                      "and intact")
    if inside.exists() and len(members) == 1:
        verify_backup(data_dir, major=manifest.facts.server_version_num // 10000,
                      wal_dir=wal_dir)
        checks.append("pg_verifybackup: every file's checksum and the WAL range verified")
    return checks


@dataclass
class PhysicalDrill:
    """A restore drill of a base backup: unpacked, verified, recovered, its rows counted."""

    seconds: float  # unpack, WAL and replay until the server accepts writes: the RTO
    integrity: list[str]
    databases: int
    tables: int
    rows: int


_USER_TABLES_SQL = """
SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1
"""


def drill_physical(storage: Storage, manifest: Manifest, cluster: str, *,
                   identities: Keyring | None = None) -> PhysicalDrill:
    """Restore a base backup into a temp folder, replay its WAL, start it, count every row.

    The server runs on a free port, reachable only through its private socket (with a
    trust pg_hba of its own), and is stopped and removed afterwards.
    """
    import psycopg
    from psycopg import sql

    facts = manifest.physical
    if facts is None:
        raise UsageError(f"backup {manifest.id} is not a physical backup")
    owner = server_owner()
    folder = Path(tempfile.mkdtemp(prefix=leftovers.folder_prefix("drill")))
    try:
        if owner is not None:
            os.chown(folder, *owner)
        data_dir = folder / "data"
        data_dir.mkdir(mode=0o700)
        started = time.monotonic()
        checks = _unpack_verified(storage, manifest, cluster, data_dir, identities, owner)
        hba = folder / "pg_hba.conf"
        hba.write_text("local all all trust\n")
        # No recovery.signal: crash recovery from backup_label replays the WAL in pg_wal to
        # the backup's end, with no restore_command (and so no repository settings) needed.
        server = EphemeralCluster.existing(
            data_dir, settings={"hba_file": str(hba), "archive_mode": "off",
                                "lc_messages": "C"})
        try:
            try:
                server.start()
            except DatabaseError as exc:
                raise RestoreFailed(f"the restored cluster did not start: "
                                    f"{_server_error(str(exc))}") from None
            seconds = time.monotonic() - started
            params: dict[str, Any] = {"host": str(server.socket_dir), "port": server.port,
                                      "user": facts.superuser}
            databases = tables = rows = 0
            with psycopg.connect(**params, dbname="postgres") as conn:
                names = [r[0] for r in conn.execute(
                    "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")]
            for name in names:
                with psycopg.connect(**params, dbname=name) as conn:
                    databases += 1
                    for (table,) in conn.execute(_USER_TABLES_SQL).fetchall():
                        query = sql.SQL("SELECT count(*) FROM ONLY {}").format(sql.SQL(table))
                        counted = conn.execute(query).fetchone()
                        rows += counted[0] if counted else 0
                        tables += 1
        finally:
            server.stop()
        return PhysicalDrill(seconds, checks, databases, tables, rows)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def restore_command(repo: str, cluster: str, *, program: str | None = None,
                    config_file: str | None = None, identity_file: str | None = None) -> str:
    """The restore_command a restored server runs: `pgvault wal-fetch %f %p` with this
    repository, cluster, config and identity, every path absolute (the server's working
    directory is its data folder, not ours)."""
    import shlex

    where = repo if "://" in repo else str(Path(repo).absolute())
    command = [program or archive.pgvault_executable(), "wal-fetch", "%f", "%p",
               "--repo", where, "--cluster", cluster]
    if config_file:
        command += ["--config", str(Path(config_file).absolute())]
    if identity_file:
        command += ["--identity-file", str(Path(identity_file).absolute())]
    return shlex.join(command)
