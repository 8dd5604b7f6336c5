"""WAL archiving: push one WAL file durably, fetch it back, check the archive, prune it.

Each archived file is stored under a key named by the sha256 of its raw bytes, so:
- a push appears atomically (storage.put) and a killed push leaves nothing under that key;
- pushing the same bytes again finds its own key and succeeds without writing (idempotent);
- different bytes under a name already archived are refused (two servers writing the same
  timeline: split brain), and a fetch that finds two versions refuses to choose;
- a fetch checks the decoded bytes against the sha256 in the key.
A cluster name is bound to one system identifier (``identity.json``, created by the first
push); segments from any other system are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgvault import pipeline
from pgvault.artifacts import store_artifact
from pgvault.catalog import ArchivedFile, Catalog, wal_object_key
from pgvault.errors import (
    AlreadyExists,
    BackupFailed,
    ConfigError,
    IntegrityError,
    NotFound,
    UsageError,
)
from pgvault.health import ArchiveStatus, TimelineRange
from pgvault.model import Identity, Manifest, PushFailures, StageSpec
from pgvault.pg import wal
from pgvault.pg.conninfo import ConnInfo
from pgvault.pipeline.stream import CHUNK
from pgvault.storage.base import Storage

if TYPE_CHECKING:
    import psycopg

    from pgvault.pipeline.age import Keyring


WAL_FORMAT = "wal"
"""The format of an archived WAL file: the server's own bytes (no manifest records it)."""


@dataclass(frozen=True)
class PushResult:
    """What one push did: stored the file, or found the very same bytes already there."""

    walfile: str
    key: str
    raw_size: int
    stored_size: int
    already_archived: bool
    seconds: float


def stages_of_suffix(suffix: str) -> list[StageSpec]:
    """The stages a suffix such as '.zst.age' names, first applied first."""
    by_extension = {ext.lstrip("."): name for name, ext in pipeline.SUFFIXES.items()}
    names = [by_extension.get(part, part) for part in suffix.split(".") if part]
    # No manifest records how a WAL file was encrypted, so any configured key may try it.
    return [StageSpec(name=n, passphrase=True if n == "age" else None) for n in names]


def read_identity(storage: Storage, cluster: str) -> Identity | None:
    """The identity a cluster name is bound to; None before its first push."""
    return Catalog(storage).wal_identity(cluster)


def check_identity(storage: Storage, cluster: str, system_identifier: str,
                   segment_size: int, *, bind: bool) -> Identity:
    """Refuse a foreign system; with ``bind``, the first caller binds the name to its system."""
    identity = read_identity(storage, cluster)
    if identity is None:
        if not bind:
            return Identity(system_identifier, segment_size)
        ours = Identity(system_identifier, segment_size)
        try:
            Catalog(storage).bind_wal_identity(cluster, ours, bound_at=datetime.now(UTC),
                                               host=socket.gethostname())
            return ours
        except AlreadyExists:
            identity = read_identity(storage, cluster)
            assert identity is not None
    if identity.system_identifier != system_identifier:
        raise ConfigError(
            f"REFUSED: this server is database system {system_identifier}, but cluster "
            f"{cluster!r} in {storage.url} holds the WAL of system "
            f"{identity.system_identifier}; give this server its own --cluster name"
        )
    if identity.wal_segment_size != segment_size:
        raise ConfigError(
            f"REFUSED: WAL segment size {segment_size} differs from the "
            f"{identity.wal_segment_size} bytes recorded for cluster {cluster!r}"
        )
    return identity


def versions(storage: Storage, cluster: str, walfile: str) -> list[ArchivedFile]:
    """Every stored version of one WAL file name (more than one only after a split brain)."""
    return Catalog(storage).wal_versions(cluster, walfile)


def archived(storage: Storage, cluster: str) -> list[ArchivedFile]:
    """Every archived WAL object of a cluster, in key order."""
    return Catalog(storage).wal_files(cluster)


def push(storage: Storage, cluster: str, path: Path, stages: list[StageSpec]) -> PushResult:
    """Store one WAL file; returns only once it is durably stored (or already was)."""
    started = time.monotonic()
    name = wal.parse_wal_name(path.name)
    if name is None:
        raise UsageError(f"{path.name!r} is not a WAL file name PostgreSQL archives")
    try:
        # One segment (16 MB by default) in memory: hashed, checked, then encoded from it.
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if name.has_header:
        _check_segment(storage, cluster, name, data)

    existing = versions(storage, cluster, name.name)
    _refuse_conflicts(storage, name.name, digest, existing)
    if existing:
        return PushResult(name.name, existing[0].key, len(data), existing[0].info.size, True,
                          time.monotonic() - started)

    key = wal_object_key(cluster, name.name, digest, pipeline.suffix(stages))
    stored = store_artifact(storage, key, io.BytesIO(data), stages, name=name.name,
                            format=WAL_FORMAT)
    # A second writer racing us with other bytes shows up now; both then fail loudly.
    _refuse_conflicts(storage, name.name, digest, versions(storage, cluster, name.name))
    return PushResult(name.name, key, len(data), stored.size, False, time.monotonic() - started)


@dataclass(frozen=True)
class PushAhead:
    """A push of the file PostgreSQL asked for, and of the ready files pushed alongside it."""

    result: PushResult
    ahead: list[PushResult]  # stored and marked .done: PostgreSQL will not ask for them
    failed: dict[str, str]  # left .ready: PostgreSQL asks again, and that push reports


def push_ahead(storage: Storage, cluster: str, path: Path, stages: list[StageSpec], *,
               ahead: int) -> PushAhead:
    """Push ``path`` and, in parallel, up to ``ahead`` other files the server marked ready.

    One process then archives several segments, instead of paying its start-up for each.
    A file pushed ahead is marked done (archive_status/X.ready renamed to X.done) only once
    it is durably stored; PostgreSQL (15+) skips files marked done by an archive_command.
    Only ``path``'s outcome decides the exit status.
    """
    from concurrent.futures import ThreadPoolExecutor

    # Each push holds its segment in memory: with huge segments, one at a time.
    others = ready_files(path, ahead) if _size(path) <= AHEAD_MAX_SEGMENT else []
    if not others:
        return PushAhead(push(storage, cluster, path, stages), [], {})
    with ThreadPoolExecutor(max_workers=1 + len(others)) as pool:
        asked = pool.submit(push, storage, cluster, path, stages)
        extra = {other: pool.submit(push, storage, cluster, other, stages) for other in others}
        pushed, failed = [], {}
        for other, future in extra.items():
            try:
                pushed.append(future.result())
            except Exception as exc:  # reported when PostgreSQL asks for this file itself
                failed[other.name] = str(exc)
                continue
            with contextlib.suppress(FileNotFoundError):
                status = other.parent / "archive_status"
                os.rename(status / f"{other.name}.ready", status / f"{other.name}.done")
        return PushAhead(asked.result(), pushed, failed)


AHEAD_MAX_SEGMENT = 64 << 20


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def ready_files(path: Path, limit: int) -> list[Path]:
    """Up to ``limit`` WAL files besides ``path`` waiting in its folder's archive_status,
    in the archiver's order (timeline history files first, then by name)."""
    if limit <= 0:
        return []
    try:
        entries = os.listdir(path.parent / "archive_status")
    except OSError:
        return []  # not a server's pg_wal (a copy, a test): nothing to look ahead at
    names = sorted((n[: -len(".ready")] for n in entries if n.endswith(".ready")),
                   key=lambda n: (not n.endswith(".history"), n))
    return [path.parent / n for n in names
            if n != path.name and wal.parse_wal_name(n) is not None][:limit]


def _check_segment(storage: Storage, cluster: str, name: wal.WalName, data: bytes) -> None:
    header = wal.read_segment_header(data)
    if header is None:
        raise IntegrityError(f"REFUSED: {name.name} does not start with a WAL segment header")
    size = header.segment_size
    if len(data) != size or header.page_address != name.segno(size) * size:
        raise IntegrityError(
            f"REFUSED: {name.name} is {len(data)} bytes and starts at "
            f"{wal.format_lsn(header.page_address)}, which is not the segment its name says"
        )
    check_identity(storage, cluster, str(header.system_identifier), size, bind=True)


def _refuse_conflicts(storage: Storage, walfile: str, digest: str,
                      existing: list[ArchivedFile]) -> None:
    other = [v for v in existing if v.sha256 != digest]
    if other:
        raise IntegrityError(
            f"REFUSED: {walfile} is already archived in {storage.url} with different content "
            f"(sha256 {other[0].sha256[:12]}..., this one {digest[:12]}...): two servers are "
            "writing the same timeline (split brain?); this segment was not archived"
        )


def fetch(storage: Storage, cluster: str, walfile: str, target: Path, *,
          identities: Keyring | None = None) -> int:
    """Write the archived ``walfile`` to ``target``; NotFound if it was never archived.

    The decoded bytes must hash to the sha256 the key names; otherwise ``target`` is
    removed and IntegrityError raised.
    """
    found = versions(storage, cluster, walfile)
    if not found:
        raise NotFound(f"{walfile} is not in the archive of cluster {cluster!r}")
    if len({v.sha256 for v in found}) > 1:
        raise IntegrityError(f"{walfile} has {len(found)} different archived versions "
                             "(split brain); restore it by hand from the one you trust")
    version = found[0]
    digest = hashlib.sha256()
    size = 0
    try:
        with storage.open(version.key) as stored, open(target, "wb") as out:
            decoded = pipeline.decode(stored, stages_of_suffix(version.suffix),
                                      identities=identities,
                                      what=f"archived {walfile}")
            while chunk := decoded.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if digest.hexdigest() != version.sha256:
            raise IntegrityError(f"archived {walfile} is damaged: sha256 does not match its key "
                                 f"{version.key}")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return size


def wait_for(storage: Storage, cluster: str, names: list[str], *, timeout: float,
             sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Wait until every WAL file in ``names`` is archived; the ones still missing at timeout."""
    deadline = time.monotonic() + timeout
    missing = list(names)
    delay = 0.1
    while True:
        missing = [n for n in missing if not versions(storage, cluster, n)]
        if not missing or time.monotonic() >= deadline:
            return missing
        sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 2, 2.0)


def archive_status(storage: Storage, cluster: str, backups: list[Manifest]) -> ArchiveStatus:
    """Timelines, gaps and the recoverable window of ``cluster`` (``backups``: its manifests)."""
    identity = read_identity(storage, cluster)
    files = archived(storage, cluster)
    segments = [f for f in files if f.wal.kind == "segment"]
    size = identity.wal_segment_size if identity else 16 << 20
    by_timeline: dict[int, list[ArchivedFile]] = {}
    for item in segments:
        by_timeline.setdefault(item.wal.timeline, []).append(item)
    timelines = []
    for timeline, items in sorted(by_timeline.items()):
        numbers = sorted({i.wal.segno(size) for i in items})
        gaps = [(wal.segment_name(timeline, a + 1, size), wal.segment_name(timeline, b - 1, size))
                for a, b in itertools.pairwise(numbers) if b - a > 1]
        timelines.append(TimelineRange(timeline, wal.segment_name(timeline, numbers[0], size),
                                       wal.segment_name(timeline, numbers[-1], size),
                                       len(numbers), gaps))
    newest = max(segments, key=lambda f: (f.wal.segno(size), f.wal.timeline), default=None)
    physical = [m for m in backups if m.physical is not None]
    earliest = min((m.physical.stop_time for m in physical if m.physical), default=None)
    latest = None
    if newest is not None and physical and not any(t.gaps for t in timelines):
        latest = newest.info.modified
    return ArchiveStatus(
        cluster=cluster, identity=identity, timelines=timelines, files=len(files),
        stored_bytes=sum(f.info.size for f in files),
        last_wal=newest.wal.name if newest else None,
        last_archived_at=max((f.info.modified for f in segments), default=None),
        earliest_restore=earliest, latest_restore=latest,
        failures=push_failures(storage, cluster),
    )


def prunable(storage: Storage, cluster: str, keep_from: str) -> list[ArchivedFile]:
    """WAL objects older than the segment ``keep_from`` (on any timeline); history files stay."""
    identity = read_identity(storage, cluster)
    if identity is None:
        return []
    size = identity.wal_segment_size
    first = wal.parse_wal_name(keep_from)
    if first is None:
        raise ValueError(f"not a WAL segment name: {keep_from!r}")
    limit = first.segno(size)
    return [f for f in archived(storage, cluster)
            if f.wal.kind != "history" and f.wal.segno(size) < limit]


def record_push_failure(storage: Storage, cluster: str, walfile: str, error: str,
                        now: datetime) -> None:
    """Count a failed push where monitoring reads it; best effort (storage may be the cause)."""
    from pgvault.redact import scrub

    with contextlib.suppress(Exception):
        Catalog(storage).record_wal_push_failure(cluster, walfile, scrub(error)[:500], now)


def push_failures(storage: Storage, cluster: str) -> PushFailures:
    return Catalog(storage).wal_push_failures(cluster)


@dataclass(frozen=True)
class ArchiveCheck:
    """The result of ``check-archive``: the segment switched to and how long it took to arrive."""

    walfile: str
    seconds: float
    archiver: dict[str, object]


def check_archive(conn: ConnInfo, storage: Storage, cluster: str, *,
                  timeout: float) -> ArchiveCheck:
    """Force a WAL switch and wait until the finished segment is in the repository."""
    import psycopg

    # Lazily: wal-push, which imports this module, never needs the engine.
    from pgvault.engines.physical import archiver_stats, switch_wal, system_identity

    with conn.connect(autocommit=True) as connection:
        try:
            system_identifier, segment_size = system_identity(connection)
            walfile = switch_wal(connection)
        except psycopg.Error as exc:
            raise BackupFailed(f"cannot switch WAL on {conn.redacted()}: "
                               f"{str(exc).strip().splitlines()[0]}") from None
        check_identity(storage, cluster, system_identifier, segment_size, bind=False)
        started = time.monotonic()
        missing = wait_for(storage, cluster, [walfile], timeout=timeout)
        archiver = archiver_stats(connection)
        cause = _archive_command_problem(connection, system_identifier) if missing else None
    if missing:
        failure = ""
        if archiver["last_failed_wal"]:
            failure = (f"; the server's last archive failure was {archiver['last_failed_wal']} "
                       f"at {archiver['last_failed_time']}")
        raise BackupFailed(
            f"WAL archiving is not working: {walfile} did not arrive in {storage.url} "
            f"within {timeout:.0f}s{failure}; "
            + (cause or "check archive_mode and archive_command (and the server's log)")
        )
    return ArchiveCheck(walfile, time.monotonic() - started, archiver)


def _archive_command_problem(connection: psycopg.Connection[Any],
                             system_identifier: str) -> str | None:
    """Why the server's OS user cannot run its archive_command, when the server is local.

    Best effort: settings a role may not read, or a server on another machine, give None
    (the generic advice stands).
    """
    import psycopg

    from pgvault.engines.physical import archive_settings
    from pgvault.ops import archive_access

    try:
        settings = archive_settings(connection)
    except psycopg.Error:
        return None
    mode, command, library = settings.mode, settings.command, settings.library
    if mode == "off":
        return "archive_mode is off on the server (set it on and restart the server)"
    if library:
        return f"the server archives with archive_library {library!r}, not archive_command"
    if not command or not command.strip():
        return "archive_command is empty on the server"
    host = connection.info.host
    loopback = host.startswith("/") or host in ("localhost", "::1") or host.startswith("127.")
    server = archive_access.local_server(
        str(settings.data_directory), system_identifier,
        backend_pid=connection.info.backend_pid if loopback else None)
    return archive_access.diagnose(command, server) if server is not None else None


def pgvault_executable() -> str:
    """The pgvault program to write into archive_command and restore_command."""
    import sys

    sibling = Path(sys.executable).with_name("pgvault")
    return str(sibling) if os.access(sibling, os.X_OK) else "pgvault"
