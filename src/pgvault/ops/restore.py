"""The restore use case: verify while reading, restore into a new database, never over one."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pgvault import leftovers, pipeline
from pgvault.catalog import Catalog
from pgvault.console import human_bytes
from pgvault.engines.logical import DATA_FORMAT, LogicalEngine
from pgvault.engines.pg_restore import Selected, SelectingSpool, splits, spool_toc
from pgvault.engines.spool import Spool
from pgvault.errors import (
    DatabaseError,
    IntegrityError,
    RestoreFailed,
    StorageError,
    UsageError,
)
from pgvault.model import READABLE_FORMATS, Artifact, Manifest
from pgvault.pg.archive import select
from pgvault.pg.conninfo import ConnInfo
from pgvault.pg.psql import PsqlSession, ServerInfo, identifier, text_literal
from pgvault.pipeline.age import Keyring
from pgvault.pipeline.digest import VerifyingReader
from pgvault.pipeline.pump import Prefetch
from pgvault.pipeline.stream import CountingReader, Readable
from pgvault.storage.base import Storage

log = logging.getLogger(__name__)

MAX_AUTO_JOBS = 4  # a cap for big client hosts; measured only on 2 CPUs here
SPOOL_MARGIN = 256 << 20
# pgbench (one table, 100% of the data): -j 1 streamed took 3.72 s against 4.01 s for two
# jobs and a spool (means of 6 alternating runs); the bench's shop, 58% in one table, gains.
SOLO_SHARE = 0.8
ENCODING_NAME = re.compile(r"[A-Za-z0-9_]+")

USER_OBJECTS_SQL = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
"""


@dataclass
class RestoreOptions:
    """How to restore: where to, how parallel, what part."""

    target: str
    jobs: int = 0  # 0: restore_jobs() picks
    clean: bool = False
    schemas: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    no_owner: bool = False
    role_map: dict[str, str] = field(default_factory=dict)  # --role-map OLD=NEW
    progress: Callable[[int], None] | None = None
    identities: Keyring | None = None  # for age-encrypted backups


@dataclass
class RestoreResult:
    """What a finished restore did and how long it took (the measured RTO)."""

    manifest: Manifest
    target: ConnInfo
    seconds: float
    bytes_read: int
    skipped: list[str] = field(default_factory=list)
    """What the target could not take as it was (engines/portable.py), one line each."""


def target_connection(conn: ConnInfo, target: str) -> ConnInfo:
    """A URL or key=value string as given, or a database name on the configured server."""
    if target.startswith(("postgres://", "postgresql://")) or "=" in target:
        parsed = ConnInfo.parse(target)
        return parsed if parsed.password else ConnInfo(
            params=parsed.params, password=conn.password, schema=parsed.schema
        )
    return conn.with_dbname(target)


def _admin(target: ConnInfo) -> tuple[PsqlSession, ServerInfo]:
    """A psql session for CREATE/DROP/RENAME DATABASE on the target's server.

    psql, not psycopg: importing psycopg beside the spool thread cost a 300 MB restore's
    spool 0.13 s (0.49 vs 0.62 s, 4 runs each), and psql starts in milliseconds.
    """
    last: DatabaseError | None = None
    for maintenance in ("postgres", "template1"):
        session = PsqlSession(target.with_dbname(maintenance))
        try:
            return session, session.preflight()
        except DatabaseError as exc:
            session.close()
            last = exc
    assert last is not None
    raise last


def restore(conn: ConnInfo, storage: Storage, manifest: Manifest,
            options: RestoreOptions) -> RestoreResult:
    """Restore ``manifest`` into a new database; a failure leaves no database behind."""
    leftovers.sweep()
    target = target_connection(conn, options.target)
    name = target.dbname
    if not name:
        raise UsageError("restore needs a target database name (--to NAME)")
    if manifest.format not in READABLE_FORMATS:
        raise RestoreFailed(f"backup {manifest.id} was written by a newer pgvault (manifest "
                            f"format {manifest.format}): upgrade pgvault to restore it")
    artifact = manifest.artifact("db.dump")
    parts = [a for a in manifest.artifacts if a.format == DATA_FORMAT]
    started = time.monotonic()
    # Tables taken apart are streamed beside the rest, never spooled: no one-table rule;
    # nor for a table big enough to load in several streams (engines/pg_restore.py).
    solo = not parts and not splits(largest_table_bytes(artifact))
    jobs = restore_jobs(options.jobs, artifact.raw_size,
                        largest_table_share(artifact) if solo else 0.0)

    def reader(item: Artifact, keep_zstd: bool = False,
               counted: bool = True) -> Callable[[], Readable]:
        progress = options.progress if counted else None
        return lambda: open_artifact(storage, manifest, item, progress=progress,
                                     identities=options.identities, keep_zstd=keep_zstd)

    # A parallel restore spools the archive first: start now, while the database is made.
    # An archive in zstd frames arrives still compressed, and the spool decompresses them.
    framed = jobs > 1 and bool(artifact.frames) and artifact.stages[0].name == "zstd"
    stream = reader(artifact, framed)()
    partial = bool(options.schemas or options.tables)
    # Selecting: a partial restore chooses its entries, and any restore may leave out what
    # the target cannot take (engines/portable.py).
    spool = (SelectingSpool(stream, artifact.frames if framed else (), artifact.raw_size)
             if jobs > 1 else None)
    try:
        source: Readable | Spool = spool or stream
        if partial:  # what to restore is chosen from the TOC, before anything is created
            source = _select(manifest, source, options)
        admin, server = _admin(target)
        try:
            leftovers.drop_dead_databases(admin)
            skipped = _create_scratch_and_restore(admin, server, target, manifest, options,
                                                  source, jobs,
                                                  [reader(part) for part in parts],
                                                  reader(artifact, counted=False))  # again
        finally:
            admin.close()
    finally:
        if spool is not None:
            spool.close()
    # Each stream was checked at its end: exactly its artifact's size was read.
    return RestoreResult(manifest=manifest, target=target, seconds=time.monotonic() - started,
                         bytes_read=artifact.size + sum(part.size for part in parts),
                         skipped=skipped)


def _create_scratch_and_restore(admin: PsqlSession, server: ServerInfo, target: ConnInfo,
                                manifest: Manifest, options: RestoreOptions,
                                source: Readable | Spool, jobs: int,
                                parts: list[Callable[[], Readable]],
                                again: Callable[[], Readable]) -> list[str]:
    """Restore into a new scratch database, then give it the target's name; what the
    target could not take as it was."""
    name = target.dbname
    assert name is not None  # restore() checked
    exists = admin.run(f"SELECT 1 FROM pg_database WHERE datname = {text_literal(name)}")
    if exists and _has_user_objects(target) and not options.clean:
        raise RestoreFailed(
            f"database {name!r} already exists and is not empty; restore into a new "
            "name, or pass --clean to replace it"
        )
    scratch = leftovers.database_name("pgvault_tmp_")
    create = f"CREATE DATABASE {identifier(scratch)} TEMPLATE template0"
    encoding = manifest.facts.encoding or "UTF8"
    try:
        if not ENCODING_NAME.fullmatch(encoding):
            raise DatabaseError(f"unexpected encoding name {encoding!r}")
        admin.run(f"{create} ENCODING '{encoding}'")
    except DatabaseError:
        admin.run(create)
    try:
        workers = index_build_workers(target, jobs)
        defaults = _session_defaults(admin, scratch, {
            **({} if workers is None else {"max_parallel_maintenance_workers": str(workers)}),
            # Each of pg_restore's commits (a table's rows, an index, a constraint) would
            # wait for its own WAL flush. The rename below commits synchronously, and that
            # flushes all the WAL before it: nothing is reported restored before it is
            # durable, and a crash before the rename loses only the scratch database.
            "synchronous_commit": "off"})
        engine = LogicalEngine(target.with_dbname(scratch), server)
        # A partial restore's source carries its selection (engines/pg_restore.py): not
        # pg_restore's -n/-t, which leave out the schema itself and owned sequences.
        skipped = engine.restore(source, target.with_dbname(scratch), jobs=jobs, parts=parts,
                                 again=again, no_owner=options.no_owner,
                                 role_map=options.role_map)
        for setting in defaults:
            admin.run(f"ALTER DATABASE {identifier(scratch)} RESET {setting}")
        if exists:
            admin.run(f"DROP DATABASE {identifier(name)} WITH (FORCE)")
        admin.run(f"ALTER DATABASE {identifier(scratch)} RENAME TO {identifier(name)}")
    except BaseException:
        with contextlib.suppress(Exception):
            admin.run(f"DROP DATABASE IF EXISTS {identifier(scratch)} WITH (FORCE)")
        raise
    return skipped


def _select(manifest: Manifest, source: Readable | Spool,
            options: RestoreOptions) -> Selected | SelectingSpool:
    """``source`` with the entries ``--schema``/``--table`` choose from its table of
    contents; UsageError naming each that matches nothing (pg/archive.py's select)."""
    if isinstance(source, SelectingSpool):
        chosen: Selected | SelectingSpool = source
        toc = spool_toc(source)
    elif isinstance(source, Spool):
        raise TypeError("a partial restore spools into a SelectingSpool")
    else:
        try:
            chosen = Selected(source)
        except BaseException:
            _close(source)
            raise
        toc = chosen.toc
    try:
        selection = select(toc, options.schemas, options.tables)
    except ValueError as exc:
        _close(chosen)
        raise UsageError(f"backup {manifest.id}: {exc}") from None
    for line in selection.left_out:
        log.warning("restore: not restored: %s", line)
    chosen.selection = selection
    return chosen


def _close(source: object) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _session_defaults(admin: PsqlSession, database: str, settings: dict[str, str]
                      ) -> list[str]:
    """Give the sessions pg_restore opens in ``database`` these settings (ALTER DATABASE:
    unlike PGOPTIONS, it passes every connection pooler); the names of those set."""
    done = []
    for name, value in settings.items():
        try:
            admin.run(f"ALTER DATABASE {identifier(database)} SET {name} = {value}")
        except DatabaseError as exc:  # a speed-up, never a reason to fail
            log.debug("restore: %s left to the server: %s", name, exc)
            continue
        done.append(name)
    return done


def index_build_workers(target: ConnInfo, jobs: int) -> int | None:
    """Parallel workers per index build: the CPUs per job beyond the first, and one at least
    on a host with two CPUs or more; None (the server's own setting) unless the server shares
    this host's CPUs.

    The one worker is for the tail of a restore, where one large index (a primary key over
    most of the rows, or the last of several on one table) builds alone and would otherwise
    leave the other CPU idle; while two builds overlap, their two workers only queue.
    Figures: docs/performance.md, "Restore on 2 CPUs". A database whose one big index
    builds alone is restored with one job (SOLO_SHARE), which gets CPUs - 1.
    """
    if not target.on_this_host():
        return None
    cpus = os.cpu_count() or 1
    return max(0 if cpus < 2 else 1, cpus // max(jobs, 1) - 1)


def restore_jobs(asked: int, spool_bytes: int, largest_share: float = 0.0) -> int:
    """How many pg_restore jobs to run: as asked, or (0) one per CPU up to MAX_AUTO_JOBS.

    More than one job needs the archive spooled to a temporary file; without room for it
    (plus SPOOL_MARGIN) the restore streams with one job instead. So does a default restore
    of a database whose largest table holds SOLO_SHARE of the data or more: there is little
    to load beside it, and streaming saves the spool.
    """
    if not asked and largest_share >= SOLO_SHARE:
        log.info("restore: one table holds %.0f%% of the data: restoring with one job, "
                 "streamed (-j N to run N jobs anyway)", largest_share * 100)
        return 1
    jobs = asked or min(os.cpu_count() or 1, MAX_AUTO_JOBS)
    if jobs > 1:
        free = shutil.disk_usage(tempfile.gettempdir()).free
        if free < spool_bytes + SPOOL_MARGIN:
            log.warning("restore: %s free in %s, the archive needs %s: restoring with one job, "
                        "streamed (set TMPDIR to a roomier place to restore in parallel)",
                        human_bytes(free), tempfile.gettempdir(), human_bytes(spool_bytes))
            return 1
    return jobs


def largest_table_share(artifact: Artifact) -> float:
    """The largest table's part of the archive's data, from its frame record; 0 without one."""
    starts = [raw for name, _, raw in artifact.frames if name]
    if not starts or artifact.raw_size <= starts[0]:
        return 0.0
    return largest_table_bytes(artifact) / (artifact.raw_size - starts[0])


def largest_table_bytes(artifact: Artifact) -> int:
    """The largest table's data in the archive, from its frame record; 0 without one."""
    starts = [raw for name, _, raw in artifact.frames if name]
    if not starts or artifact.raw_size <= starts[0]:
        return 0
    ends = [*starts[1:], artifact.raw_size]
    return max(end - start for start, end in zip(starts, ends, strict=True))


def open_artifact(storage: Storage, manifest: Manifest, artifact: Artifact, *,
                  progress: Callable[[int], None] | None = None,
                  identities: Keyring | None = None, keep_zstd: bool = False) -> Readable:
    """The decoded content of a stored artifact, checked against the manifest as it is read.

    Every reader of backup data goes through here: size and sha256 are verified at the end
    of the stream (IntegrityError naming the artifact), then each recorded stage is undone.
    An encrypted artifact needs ``identities``; DecryptionError names the recipients it needs.
    ``keep_zstd``: leave the first stage, zstd, undone (the spool of a framed archive does).
    """
    source = VerifyingReader(storage.open(artifact.key), size=artifact.size,
                             sha256=artifact.sha256,
                             what=f"backup {manifest.id} artifact {artifact.key}")
    # Reading and hashing run a stage ahead of decoding: a 300 MB restore's spool took
    # 0.47-0.55 s instead of 0.63-0.78 s with both in one thread.
    stages = artifact.stages[1:] if keep_zstd else artifact.stages
    return pipeline.decode(CountingReader(Prefetch(source), progress), stages,
                           identities=identities, what=f"backup {manifest.id}")


def _has_user_objects(target: ConnInfo) -> bool:
    session = PsqlSession(target)
    try:
        session.preflight()
        return session.run(USER_OBJECTS_SQL)[0][0] != "0"
    finally:
        session.close()


def resolve(storage: Storage, ref: str, database: str | None) -> Manifest:
    """The manifest a user means by ID, id prefix or 'latest'."""
    return Catalog(storage).get(ref, database)


T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Fallback(Generic[T]):
    """What ``first_intact`` got: the result, the repository it came from, and why each
    repository before it was passed over (name, reason)."""

    result: T
    repository: str
    passed_over: list[tuple[str, str]]


def first_intact(repositories: Sequence[tuple[str, Callable[[], R]]],
                 attempt: Callable[[R], T], *,
                 tell: Callable[[str], None] | None = None) -> Fallback[T]:
    """``attempt`` against each repository in turn (the primary first, then its copies)
    until one succeeds: the next is tried when a repository cannot be reached, holds no
    such backup, or its backup is damaged (a manifest, or bytes failing their sha256 as
    they are read). Any other failure (the target exists, a bad --table, the server) is
    the restore's own and ends it there: another copy would fail the same way.

    A failed attempt leaves nothing behind (a restore runs into a scratch database that is
    renamed only on success), so trying the next one is safe.
    """
    passed: list[tuple[str, str]] = []
    for index, (name, opening) in enumerate(repositories):
        try:
            return Fallback(attempt(opening()), name, passed)
        except (StorageError, IntegrityError) as exc:
            if index == len(repositories) - 1:
                if not passed:
                    raise
                tried = "; ".join(f"{n}: {why}" for n, why in [*passed, (name, str(exc))])
                raise type(exc)(f"no repository holds an intact copy ({tried})") from exc
            passed.append((name, str(exc)))
            if tell is not None:
                tell(f"repository {name}: {exc}; trying {repositories[index + 1][0]}")
    raise UsageError("no repository to restore from")
