"""The base backup use case: pg_basebackup streamed to storage, its WAL secured, manifest last."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pgvault import __version__, pipeline
from pgvault.artifacts import store_artifact
from pgvault.catalog import Catalog, artifact_key, lock_key
from pgvault.engines.physical import (
    BASE_FORMAT,
    MANIFEST,
    MANIFEST_FORMAT,
    PhysicalEngine,
    TarWatcher,
    archiver_stats,
    cancel_backend,
    needed_wal,
    waiting_for_archive,
)
from pgvault.errors import BackupFailed
from pgvault.lock import hold
from pgvault.model import Artifact, Facts, Manifest, StageSpec, new_backup_id
from pgvault.ops import incremental
from pgvault.ops import wal as archive
from pgvault.pg.conninfo import ConnInfo
from pgvault.pipeline.stream import Progress, Readable
from pgvault.storage.base import Storage

if TYPE_CHECKING:
    from pgvault.pipeline.age import Keyring

WAL_METHODS = ("auto", "fetch", "archive")


@dataclass
class BasebackupOptions:
    """What a base backup needs beyond the connection and the storage."""

    cluster: str
    stages: list[StageSpec]
    wal_method: str = "auto"  # fetch: WAL inside base.tar; archive: WAL from wal-push
    fast_checkpoint: bool = False
    archive_wait: float = 60.0
    lock_stale_after: timedelta = timedelta(hours=12)
    progress: Progress | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # On top of the newest base backup when there is one (ops.incremental); else a full one.
    incremental: bool = False
    identities: Keyring | None = None  # to read the parent's file list when it is encrypted


def basebackup(conn: ConnInfo, storage: Storage, options: BasebackupOptions) -> Manifest:
    """Take one base backup of the server ``conn`` reaches; the manifest is written last."""
    engine = PhysicalEngine(conn)
    info = engine.preflight()
    archive.check_identity(storage, options.cluster, info.system_identifier,
                           info.wal_segment_size, bind=False)
    include_wal = _include_wal(options.wal_method, info.archives_with_pgvault)
    if options.incremental and include_wal:
        raise BackupFailed("an incremental base backup takes its WAL from the archive: the "
                           "server must archive with pgvault wal-push (and --wal-method not "
                           "be fetch)")
    with hold(storage, lock_key(options.cluster), "basebackup",
              stale_after=options.lock_stale_after, name=options.cluster):
        started = options.clock()
        backup_id = new_backup_id(started)
        written: list[str] = []
        notes: list[str] = []
        try:
            if options.incremental:
                parent, why = incremental.choose_parent(
                    storage, options.cluster, info, incremental.current_timeline(conn))
                if parent is not None:
                    return incremental.take(
                        conn, storage, options, info, parent, backup_id, started, written,
                        lambda source, name, fmt, progress=None: _store(
                            source, name, fmt, storage, options, backup_id, written,
                            progress=progress))
                notes.append(why)
            app_name = "pgvault-" + backup_id.replace(".", "-")
            child = engine.basebackup(include_wal=include_wal,
                                      fast_checkpoint=options.fast_checkpoint,
                                      label=f"pgvault {backup_id}", application_name=app_name)
            watcher = TarWatcher(child)
            # Without WAL in the tar the server itself waits, inside pg_basebackup, until
            # the backup's WAL is archived, with no end: the bound is kept here.
            server_wait = None if include_wal else _ServerArchiveWait(
                conn, app_name, options.archive_wait)
            try:
                base = _store(watcher, "base.tar", BASE_FORMAT, storage, options, backup_id,
                              written, progress=options.progress)
            except Exception:
                if server_wait is not None and server_wait.stop():
                    raise BackupFailed(_not_archived(
                        f"within {options.archive_wait:g}s (archive_wait_seconds)",
                        server_wait.archiver, storage, options.cluster)) from None
                raise
            finally:
                child.close()
                if server_wait is not None:
                    server_wait.stop()
            waited = server_wait.waited if server_wait is not None else 0.0
            facts = engine.facts(watcher.members, stop_time=options.clock(),
                                 include_wal=include_wal)
            manifest_bytes = watcher.members.get(MANIFEST)
            if not include_wal:
                missing = archive.wait_for(storage, options.cluster,
                                           needed_wal(facts, manifest_bytes),
                                           timeout=max(options.archive_wait - waited, 0.0))
                if missing:
                    raise BackupFailed(_not_archived(
                        f"({', '.join(missing)}) in {storage.url} (cluster "
                        f"{options.cluster!r}) within {options.archive_wait:g}s "
                        "(archive_wait_seconds)", None, storage, options.cluster))
            artifacts = [base]
            if manifest_bytes is not None:
                artifacts.append(_store(io.BytesIO(manifest_bytes), MANIFEST, MANIFEST_FORMAT,
                                        storage, options, backup_id, written))
            manifest = Manifest(
                id=backup_id,
                kind="physical",
                database=options.cluster,
                started_at=started,
                finished_at=options.clock(),
                pgvault_version=__version__,
                tool_versions={**engine.tool_versions(), "server": info.version},
                artifacts=artifacts,
                facts=Facts(server_version=info.version, server_version_num=info.version_num),
                physical=facts,
                warnings=notes,
            )
            Catalog(storage).commit(manifest)
            return manifest
        except BaseException:
            # Best effort: a writer without delete rights leaves orphans for prune.
            with contextlib.suppress(Exception):
                storage.delete(written)
            raise


class _ServerArchiveWait:
    """Watches pg_basebackup's walsender: once it has waited ``limit`` seconds for the
    archive (wait event BackupWaitWalArchive, PostgreSQL 13+), records why and cancels it."""

    def __init__(self, conn: ConnInfo, app_name: str, limit: float) -> None:
        self.fired = False
        self.waited = 0.0
        self.archiver: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(conn, app_name, limit),
                                        name="pgvault-archive-wait", daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Stop watching; whether the bound was reached (and the backup cancelled)."""
        self._done.set()
        self._thread.join(timeout=10)
        return self.fired

    def _watch(self, conn: ConnInfo, app_name: str, limit: float) -> None:
        # Best effort: without this connection the server's wait is merely unbounded again.
        with contextlib.suppress(Exception), conn.connect(autocommit=True) as db:
            since: float | None = None
            while not self._done.wait(0.25):
                pid = waiting_for_archive(db, app_name)
                now = time.monotonic()
                if pid is None:
                    continue
                since = now if since is None else since
                self.waited = now - since
                if self.waited >= limit:
                    self.archiver = _archiver_state(db)
                    self.fired = True
                    cancel_backend(db, pid)
                    return


def _archiver_state(db: Any) -> str:
    stats = archiver_stats(db)
    failed, last_wal, last_at = (stats["failed_count"], stats["last_failed_wal"],
                                 stats["last_failed_time"])
    archived = stats["last_archived_wal"]
    if failed:
        return (f"the server's archive_command has failed {failed} times, last for {last_wal} "
                f"at {last_at:%Y-%m-%d %H:%M:%S%z}")
    return f"the server's archive_command has not failed (last archived: {archived or 'none'})"


def _not_archived(what: str, archiver: str | None, storage: Storage, cluster: str) -> str:
    """One line: the backup's WAL did not reach the archive, and what is known of why."""
    why = [archiver] if archiver else []
    with contextlib.suppress(Exception):  # this role may not read the failure record
        failures = archive.push_failures(storage, cluster)
        if failures.total and failures.last_error:
            why.append(f"last wal-push failure ({failures.last_wal}): {failures.last_error}")
    reason = f" ({'; '.join(why)})" if why else ""
    return (f"the backup's WAL did not reach the archive {what}{reason}; check "
            "archive_command (pgvault check-archive), or back up with --wal-method fetch")


def _include_wal(method: str, archives_with_pgvault: bool) -> bool:
    if method not in WAL_METHODS:
        raise BackupFailed(f"unknown WAL method {method!r} (choose {', '.join(WAL_METHODS)})")
    if method == "auto":
        return not archives_with_pgvault
    return method == "fetch"


def _store(source: Readable, name: str, fmt: str, storage: Storage,
           options: BasebackupOptions, backup_id: str, written: list[str], *,
           progress: Progress | None = None) -> Artifact:
    key = artifact_key(options.cluster, backup_id, name + pipeline.suffix(options.stages))
    return store_artifact(storage, key, source, options.stages, name=name, format=fmt,
                          progress=progress, written=written)
