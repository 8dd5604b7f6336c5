"""The base backup use case: pg_basebackup streamed to storage, its WAL secured, manifest last."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pgvault import __version__, pipeline
from pgvault.catalog import Catalog, artifact_key
from pgvault.engines.physical import (
    BASE_FORMAT,
    MANIFEST,
    MANIFEST_FORMAT,
    PhysicalEngine,
    TarWatcher,
    needed_wal,
)
from pgvault.errors import BackupFailed
from pgvault.lock import hold
from pgvault.model import Artifact, Facts, Manifest, StageSpec, new_backup_id
from pgvault.ops import wal as archive
from pgvault.pg.conninfo import ConnInfo
from pgvault.pipeline.digest import HashingReader
from pgvault.pipeline.stream import CountingReader, Progress, Readable
from pgvault.storage.base import Storage

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


def basebackup(conn: ConnInfo, storage: Storage, options: BasebackupOptions) -> Manifest:
    """Take one base backup of the server ``conn`` reaches; the manifest is written last."""
    engine = PhysicalEngine(conn)
    info = engine.preflight()
    archive.check_identity(storage, options.cluster, info.system_identifier,
                           info.wal_segment_size, bind=False)
    include_wal = _include_wal(options.wal_method, info.archives_with_pgvault)
    with hold(storage, options.cluster, "basebackup", stale_after=options.lock_stale_after):
        started = options.clock()
        backup_id = new_backup_id(started)
        written: list[str] = []
        try:
            child = engine.basebackup(include_wal=include_wal,
                                      fast_checkpoint=options.fast_checkpoint,
                                      label=f"pgvault {backup_id}")
            watcher = TarWatcher(child)
            try:
                base = _store(CountingReader(watcher, options.progress), "base.tar",
                              BASE_FORMAT, storage, options, backup_id, written)
            finally:
                child.close()
            facts = engine.facts(watcher.members, stop_time=options.clock(),
                                 include_wal=include_wal)
            manifest_bytes = watcher.members.get(MANIFEST)
            if not include_wal:
                missing = archive.wait_for(storage, options.cluster,
                                           needed_wal(facts, manifest_bytes),
                                           timeout=options.archive_wait)
                if missing:
                    raise BackupFailed(
                        f"the backup needs WAL {', '.join(missing)}, which did not arrive in "
                        f"{storage.url} (cluster {options.cluster!r}) within "
                        f"{options.archive_wait:.0f}s; check archive_command, or back up "
                        "with --wal-method fetch"
                    )
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
            )
            Catalog(storage).commit(manifest)
            return manifest
        except BaseException:
            # Best effort: a writer without delete rights leaves orphans for prune.
            with contextlib.suppress(Exception):
                storage.delete(written)
            raise


def _include_wal(method: str, archives_with_pgvault: bool) -> bool:
    if method not in WAL_METHODS:
        raise BackupFailed(f"unknown WAL method {method!r} (choose {', '.join(WAL_METHODS)})")
    if method == "auto":
        return not archives_with_pgvault
    return method == "fetch"


def _store(source: Readable, name: str, fmt: str, storage: Storage,
           options: BasebackupOptions, backup_id: str, written: list[str]) -> Artifact:
    key = artifact_key(options.cluster, backup_id, name + pipeline.suffix(options.stages))
    raw = source if isinstance(source, CountingReader) else CountingReader(source, None)
    stored = HashingReader(pipeline.encode(raw, options.stages))
    written.append(key)
    storage.put(key, stored)  # type: ignore[arg-type]
    return Artifact(name=name, key=key, size=stored.size, sha256=stored.sha256,
                    raw_size=raw.size, stages=options.stages, format=fmt)
