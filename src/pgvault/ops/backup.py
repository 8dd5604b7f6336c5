"""The backup use case: preflight, lock, stream every artifact, commit the manifest last."""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from pgvault import __version__, leftovers, pipeline
from pgvault.artifacts import store_artifact
from pgvault.catalog import Catalog, artifact_key, lock_key
from pgvault.engines.logical import (
    DATA_FORMAT,
    DUMP_FORMAT,
    DUMP_FORMATS,
    GLOBALS_FORMAT,
    SPLIT_MIN_BYTES,
    LogicalEngine,
    Snapshot,
    Table,
    dump_streams,
    split_tables,
)
from pgvault.errors import BackupFailed
from pgvault.facts import seal
from pgvault.lock import Lock, acquire, release
from pgvault.model import (
    MANIFEST_FORMAT,
    SPLIT_MANIFEST_FORMAT,
    Artifact,
    Facts,
    Manifest,
    StageSpec,
    new_backup_id,
)
from pgvault.pg.archive import OffsetFinder
from pgvault.pg.conninfo import ConnInfo
from pgvault.pg.process import ChildOutput
from pgvault.pg.psql import ServerInfo
from pgvault.pipeline.stream import Progress
from pgvault.storage.base import Storage


@dataclass
class BackupOptions:
    """What a backup run needs beyond the connection and the storage."""

    stages: list[StageSpec]
    backup_globals: bool = True
    lock_stale_after: timedelta = timedelta(hours=12)
    progress: Progress | None = None
    # pg_dump streams at once under one snapshot, the largest tables' data apart; 0: one per
    # CPU (engines.logical.dump_streams). Tables below ``split_min_bytes`` stay together.
    # One by default: on 2 CPUs a split backup was ~15% faster, its restore no faster (see
    # docs/performance.md), and it took 14 MB more memory locally, 32 MB more to S3 (PSS).
    streams: int = 1
    split_min_bytes: int = SPLIT_MIN_BYTES
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


def backup(conn: ConnInfo, storage: Storage, options: BackupOptions) -> Manifest:
    """Take one logical backup; the manifest is written only when every artifact is stored."""
    leftovers.sweep()
    engine = LogicalEngine(conn)
    with _preflight_and_lock(engine, storage, options.lock_stale_after) as (session, server):
        database = server.database
        started = options.clock()
        backup_id = new_backup_id(started)
        written: list[str] = []
        warnings: list[str] = []
        side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgvault-globals")
        try:
            artifacts: list[Artifact] = []
            with engine.snapshot(session) as snapshot:
                snapshot.dumped = threading.Event()
                facts_box: list[Facts] = []
                errors: list[BaseException] = []
                apart = _tables_apart(engine, session, snapshot.snapshot_id, options)
                dumps = _start_dumps(engine, snapshot.snapshot_id, apart)
                counter = threading.Thread(
                    target=_collect, args=(engine, snapshot, facts_box, errors), daemon=True
                )
                counter.start()
                # Roles and tool versions are small work: done beside the dump, once it runs.
                extras = side.submit(_globals_and_versions, engine, storage, database,
                                     backup_id, options, written)
                try:
                    artifacts[:0] = _store_dumps(dumps, storage, database, backup_id, options,
                                                 written)
                except BaseException:
                    snapshot.interrupt(counter)
                    raise
                snapshot.dumped.set()
                counter.join()
                if errors:
                    raise BackupFailed(f"could not record facts: {errors[0]}")
                # What the facts could not record is said, in the output and the manifest.
                warnings += snapshot.warnings
            globals_artifact, versions, globals_warning = extras.result()
            if globals_artifact is not None:
                artifacts.append(globals_artifact)
            if globals_warning:
                warnings.append(globals_warning)
            manifest = Manifest(
                format=SPLIT_MANIFEST_FORMAT if apart else MANIFEST_FORMAT,
                id=backup_id,
                database=database,
                started_at=started,
                finished_at=options.clock(),
                pgvault_version=__version__,
                tool_versions={**versions, "server": server.version},
                artifacts=artifacts,
                facts=_sealed(facts_box[0], options.stages),
                warnings=warnings,
            )
            Catalog(storage).commit(manifest)
            return manifest
        except BaseException:
            side.shutdown(wait=True, cancel_futures=True)  # it may still be writing
            # Best effort: a writer without delete rights leaves orphans for prune.
            with contextlib.suppress(Exception):
                storage.delete(written)
            raise
        finally:
            side.shutdown(wait=False)


def _sealed(facts: Facts, stages: list[StageSpec]) -> Facts:
    """An encrypted backup's manifest names no schema object: its names are keyed digests
    (facts.seal), the key age-encrypted to the backup's own recipients."""
    age = next((stage for stage in stages if stage.name == "age"), None)
    fingerprint = facts.schema_fingerprint
    if age is None or fingerprint is None or not isinstance(fingerprint.entries, dict):
        return facts
    key = secrets.token_bytes(32)
    sealed = msgspec.structs.replace(seal(fingerprint, key),
                                     sealed_key=pipeline.seal_value(key, age))
    return msgspec.structs.replace(facts, schema_fingerprint=sealed)


@contextlib.contextmanager
def _preflight_and_lock(
    engine: LogicalEngine, storage: Storage, stale_after: timedelta
) -> Iterator[tuple[Any, ServerInfo]]:
    """Preflight on the session the snapshot will use, while the repository lock is taken.

    Both mostly wait (on the server, on the repository), so they overlap when the connection
    names its database. A failed preflight still wins over a lock error and leaves no lock.
    """
    guess = engine.conn.dbname
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgvault-lock")
    locking = pool.submit(acquire, storage, lock_key(guess), "backup", stale_after=stale_after,
                          name=guess) if guess else None
    pool.shutdown(wait=False)
    session = None
    try:
        session = engine.session()
        server = engine.preflight(session)
        lock = _settle(locking, storage, server.database, guess)
        if lock is None:
            lock = acquire(storage, lock_key(server.database), "backup",
                           stale_after=stale_after, name=server.database)
    except BaseException:
        if session is not None:
            session.close()
        if locking is not None:
            _settle(locking, storage, None, guess)
        raise
    try:
        yield session, server
    finally:
        session.close()
        release(storage, lock)


def _settle(locking: Future[Lock] | None, storage: Storage, database: str | None,
            guess: str | None) -> Lock | None:
    """The lock taken for ``guess`` if it is the one for ``database``; else released, None.

    Raises the lock's own error (LockHeld, a storage error) only when it is the right one.
    """
    if locking is None:
        return None
    if database is not None and database == guess:
        return locking.result()
    with contextlib.suppress(Exception):
        release(storage, locking.result())
    return None


def _tables_apart(engine: LogicalEngine, session: Any, snapshot_id: str | None,
                  options: BackupOptions) -> list[Table]:
    """The tables whose data gets a pg_dump of its own; none without a shared snapshot."""
    streams = dump_streams(options.streams)
    if streams < 2 or not snapshot_id:
        return []
    sizes, total = engine.largest_tables(session, streams - 1)
    return split_tables(sizes, total, streams, options.split_min_bytes)


Dump = tuple[ChildOutput, str, str]  # the running pg_dump, the artifact's name and format


def _start_dumps(engine: LogicalEngine, snapshot_id: str | None, apart: list[Table]) -> list[Dump]:
    """The main archive (without the data of ``apart``), then one archive per table apart."""
    dumps: list[Dump] = []
    try:
        dumps.append((engine.dump(snapshot_id, without_data=tuple(apart)), "db.dump",
                      DUMP_FORMAT))
        for number, table in enumerate(apart, 1):
            dumps.append((engine.dump(snapshot_id, data_of=(table,)),
                          f"db.data-{number}.dump", DATA_FORMAT))
    except BaseException:
        for child, _, _ in dumps:
            child.close()
        raise
    return dumps


def _store_dumps(dumps: list[Dump], storage: Storage, database: str, backup_id: str,
                 options: BackupOptions, written: list[str]) -> list[Artifact]:
    """Store every dump, at once when there are several; the first failure stops them all."""
    if len(dumps) == 1:
        child, name, fmt = dumps[0]
        return [_store(child, name, fmt, storage, database, backup_id, options, written)]
    pool = ThreadPoolExecutor(len(dumps), thread_name_prefix="pgvault-dump")
    try:
        futures = [pool.submit(_store, child, name, fmt, storage, database, backup_id,
                               options, written) for child, name, fmt in dumps]
        pending: set[Future[Artifact]] = set(futures)
        while pending:  # a timed wait keeps Ctrl-C deliverable
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
        return [future.result() for future in futures]
    except BaseException:
        for child, _, _ in dumps:
            child.close()  # the other stores then fail at once, and their uploads abort
        raise
    finally:
        pool.shutdown(wait=True)


def _globals_and_versions(
    engine: LogicalEngine, storage: Storage, database: str, backup_id: str,
    options: BackupOptions, written: list[str],
) -> tuple[Artifact | None, dict[str, str], str | None]:
    """The globals artifact (or why there is none) and the client tools' versions."""
    versions = engine.tool_versions()
    if not options.backup_globals:
        return None, versions, None
    try:
        return _store(engine.dump_globals(), "globals.sql", GLOBALS_FORMAT, storage, database,
                      backup_id, options, written), versions, None
    except BackupFailed as exc:
        # Managed services often forbid reading roles; the dump itself still counts.
        return None, versions, f"globals not backed up: {exc}"


def _collect(engine: LogicalEngine, snapshot: Snapshot, box: list[Facts],
             errors: list[BaseException]) -> None:
    try:
        box.append(engine.facts(snapshot))
    except BaseException as exc:  # reported by the caller, in its thread
        errors.append(exc)


def _store(
    child: ChildOutput,
    name: str,
    fmt: str,
    storage: Storage,
    database: str,
    backup_id: str,
    options: BackupOptions,
    written: list[str],
) -> Artifact:
    key = artifact_key(database, backup_id, name + pipeline.suffix(options.stages))
    dump = fmt in DUMP_FORMATS
    try:
        # zstd frames that decompress alone, and where each table's data is: engines.spool.
        return store_artifact(storage, key, child, options.stages, name=name, format=fmt,
                              progress=options.progress if dump else None,
                              boundaries=OffsetFinder() if dump else None, written=written)
    finally:
        child.close()
