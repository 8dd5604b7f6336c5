"""What monitoring needs to know about each database, read from the repository alone.

The newest good backup comes from the catalog (a manifest exists only for a complete
backup), the last failure from a small run-history record the jobs write beside it, and
the last restore drill from the drill records. ``DatabaseStatus.verdict`` (in
``pgvault.model``) turns that into OK / WARNING / CRITICAL against the objectives, never
from "the last command succeeded".
"""

from __future__ import annotations

from datetime import UTC, timedelta

import msgspec

from pgvault.catalog import Catalog, lock_key
from pgvault.health import (
    CRITICAL,
    OK,
    SNAPSHOT_DRILL_WHERE,
    STATE_NAMES,
    UNKNOWN,
    WARNING,
    DatabaseStatus,
    Drill,
    Verdict,
)
from pgvault.lock import holder
from pgvault.model import RunHistory, RunRecord, VerifyReport, from_dict, to_dict
from pgvault.ops.wal import archive_status
from pgvault.storage.base import Storage

# The values moved to pgvault.model (below metrics, which shows them); they stay importable
# from here for the callers not moved yet.
__all__ = ["CRITICAL", "HISTORY", "OK", "STATE_NAMES", "UNKNOWN", "WARNING", "DatabaseStatus",
           "Drill", "RunHistory", "RunRecord", "Verdict", "database_status", "last_drill",
           "read_history", "record_run"]

HISTORY = "backup"
"""Name of the run-history status record (status/<db>/backup.json)."""
SNAPSHOT_HISTORY = "snapshot"
"""Name of the provider snapshot runs' history (status/<db>/snapshot.json)."""


def read_history(storage: Storage, database: str, name: str = HISTORY) -> RunHistory:
    """The run history of ``database``; empty if none was written (or it is unreadable)."""
    return _history(storage, database, name)[0]


def _history(storage: Storage, database: str,
             name: str = HISTORY) -> tuple[RunHistory, str | None]:
    """The run history of ``database``, and why it could not be read (None if it could)."""
    record, problem = Catalog(storage).status_record(database, name)
    if record is None:
        return RunHistory(), problem
    try:
        return from_dict(RunHistory, record), None
    except msgspec.ValidationError as exc:
        return RunHistory(), f"run history of {database!r} is damaged: {exc}"


def record_run(storage: Storage, database: str, run: RunRecord, *, failed: bool,
               name: str = HISTORY) -> RunHistory:
    """Add ``run`` to the history ``name`` of ``database``; returns it as it was before."""
    before = read_history(storage, database, name)
    if failed:
        after = msgspec.structs.replace(before, last_failure=run,
                                        failures_total=before.failures_total + 1)
    else:
        after = msgspec.structs.replace(before, last_success=run)
    Catalog(storage).write_status(database, name, to_dict(after))
    return before


def database_status(storage: Storage, database: str, *, rpo_hours: float, rto_minutes: float,
                    lock_stale_after: timedelta = timedelta(hours=12),
                    archive_stale_after: timedelta | None = None) -> DatabaseStatus:
    """Read the status of ``database`` from the repository (manifests, history, drills, lock)."""
    catalog = Catalog(storage)
    listing = catalog.scan(database)
    drills = catalog.drill_records(database)
    known = catalog.bad(database, drills)
    bad = [(d.backup_id, d.reason) for d in listing.damaged]
    bad += [(m.id, known[(m.database, m.id)]) for m in listing.manifests
            if (m.database, m.id) in known]
    manifests = [m for m in listing.manifests if (m.database, m.id) not in known]
    # The provider holds a snapshot's bytes: shown beside the repository's own backups.
    snapshots = [m for m in manifests if m.kind == "snapshot"]
    manifests = [m for m in manifests if m.kind != "snapshot"]
    physical = [m for m in manifests if m.kind == "physical"]
    every = list(drills.newest.values())
    # A provider snapshot's drills are its own recovery path's, shown beside the others.
    snapshot_drills = [r for r in every if r.where.startswith(SNAPSHOT_DRILL_WHERE)]
    reports = [r for r in every if not r.where.startswith(SNAPSHOT_DRILL_WHERE)]
    drill = last_drill(reports)
    history, history_problem = _history(storage, database)
    damaged_records = [f"{d.reason} ({d.key})" for d in drills.damaged]
    if history_problem is not None:
        damaged_records.append(history_problem)
    return DatabaseStatus(
        database=database,
        repository=storage.url,
        rpo_hours=rpo_hours,
        rto_minutes=rto_minutes,
        backups=len(manifests),
        newest=manifests[-1] if manifests else None,
        oldest_time=manifests[0].started_at if manifests else None,
        history=history,
        drill=drill,
        drill_last_success=max((r.finished_at for r in reports if r.passed), default=None),
        running=holder(storage, lock_key(database), stale_after=lock_stale_after),
        archive=archive_status(storage, database, physical) if physical else None,
        archive_stale_after=archive_stale_after,
        bad=tuple(sorted(bad, reverse=True)),
        damaged_records=tuple(damaged_records),
        snapshots=len(snapshots),
        newest_snapshot=snapshots[-1] if snapshots else None,
        snapshot_drill=last_drill(snapshot_drills),
        snapshot_history=read_history(storage, database, SNAPSHOT_HISTORY),
    )


def last_drill(reports: list[VerifyReport]) -> Drill | None:
    """The newest of these restore drill records (of any backup)."""
    if not reports:
        return None
    report = max(reports, key=lambda r: r.started_at.astimezone(UTC))
    return Drill(
        backup_id=report.backup_id,
        level=report.level,
        started_at=report.started_at,
        finished_at=report.finished_at,
        passed=report.passed,
        restore_seconds=report.restore_seconds,
        failures=tuple(f"{c.name}: {c.detail}".rstrip(": ") for c in report.failures),
    )
