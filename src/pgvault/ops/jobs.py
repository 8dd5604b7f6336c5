"""Jobs: one operation plus what running it unattended needs (events, history, metrics).

The CLI commands and the daemon both call these, so a backup run from cron and one run
by `pgvault daemon` notify, record and publish exactly alike. A job never lets a
notifier, the run history or a metrics target fail it: those are logged and counted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec

from pgvault import logs
from pgvault.errors import Interrupted, PgvaultError
from pgvault.events import Event, Fanout, Sink
from pgvault.ops.backup import BackupOptions, backup
from pgvault.ops.status import DatabaseStatus, RunRecord, database_status, record_run
from pgvault.storage.base import Storage

if TYPE_CHECKING:
    from pgvault.config import Settings
    from pgvault.metrics import Metrics
    from pgvault.model import Manifest, VerifyReport
    from pgvault.ops.prune import Policy, PruneReport
    from pgvault.pg.conninfo import ConnInfo

log = logs.get("jobs")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobContext:
    """What jobs share in one process: metrics, a stop signal, the clock."""

    metrics: Metrics | None = None
    cancel: threading.Event | None = None
    """Set to abort a running backup cleanly (no manifest, uploads aborted)."""
    clock: Callable[[], datetime] = field(default=_utcnow)

    def fanout(self, settings: Settings, database: str) -> Fanout:
        """The sinks ``settings`` configures; failures are logged and counted."""
        from pgvault.sinks import fanout_for

        def failed(sink: Sink, event: Event, reason: str) -> None:
            log.warning("notification %s of %s via %s failed: %s", event.kind, database,
                        sink.name, reason)
            if self.metrics is not None:
                self.metrics.notification_failed(database, sink.name)

        return fanout_for(settings.notify, on_failure=failed)


@dataclass
class BackupRun:
    """A finished backup job: the backup, and what followed it."""

    manifest: Manifest
    recovered: bool = False
    drill: VerifyReport | None = None
    drill_error: PgvaultError | None = None
    """The restore drill after the backup could not run (the backup is still stored)."""
    prune: PruneReport | None = None
    prune_error: str | None = None

    @property
    def drill_failed(self) -> bool:
        return self.drill_error is not None or (self.drill is not None and not self.drill.passed)


def database_of(conn: ConnInfo) -> str:
    """The database name a connection names, as the repository will file it."""
    return conn.dbname or conn.redacted().rsplit("/", 1)[-1]


def run_backup_job(settings: Settings, conn: ConnInfo, storage: Storage,
                   options: BackupOptions, *, context: JobContext | None = None,
                   drill: Callable[[Manifest], VerifyReport] | None = None,
                   notify_failure: bool = True, stale: bool = False) -> BackupRun:
    """Back up, record the run, emit events, drill and prune if asked, publish metrics.

    ``drill`` restore-drills the new backup (verify_after_backup); if the drill fails,
    nothing is pruned, since retention keeps the newest backups and the newest is bad.
    ``notify_failure=False`` records a failure without telling anyone (an attempt that
    will be retried); ``stale`` says a stale alert is open, so success means recovered.
    Raises what the backup raised, after recording and reporting it.
    """
    context = context or JobContext()
    database = database_of(conn)
    # Built before the backup, so a bad [retention] fails fast instead of after an hour's dump.
    policy = _policy(settings) if settings.prune_after_backup else None
    fanout = context.fanout(settings, database)
    options = replace(options, progress=_abortable(options.progress, context.cancel))
    started = context.clock()
    with logs.tail() as tail:
        fanout.emit(Event("backup.started", database, started, started_at=started))
        try:
            manifest = backup(conn, storage, options)
        except BaseException as exc:
            finished = context.clock()
            error = str(exc) or type(exc).__name__
            duration = (finished - started).total_seconds()
            run = RunRecord(at=started, finished_at=finished, duration=duration, error=error,
                            notified=notify_failure)
            _record(storage, database, run, failed=True)
            # An abort because the daemon stops is logged, not announced; the next start
            # runs the missed backup.
            if notify_failure and not (context.cancel is not None and context.cancel.is_set()):
                fanout.emit(Event("backup.failed", database, finished, started_at=started,
                                  finished_at=finished, duration=duration, error=error,
                                  log_tail=tuple(tail)))
            else:
                log.warning("backup attempt of %s failed after %.1fs: %s", database,
                            duration, error)
            publish(settings, storage, database, context)
            raise
        database = manifest.database
        for warning in manifest.warnings:
            log.warning("backup %s of %s: %s", manifest.id, database, warning)
        duration = (manifest.finished_at - manifest.started_at).total_seconds()
        before = _record(storage, database, RunRecord(
            at=manifest.started_at, finished_at=manifest.finished_at, duration=duration,
            backup_id=manifest.id, size=manifest.size), failed=False)
        fanout.emit(Event("backup.succeeded", database, manifest.finished_at,
                          backup_id=manifest.id, started_at=manifest.started_at,
                          finished_at=manifest.finished_at, size=manifest.size,
                          duration=duration, details={"raw_size": manifest.raw_size}))
        result = BackupRun(manifest)
        # Recovered: the first success after a failure someone was told about (or a stale alert).
        failure = before.last_failure if before is not None and before.failing else None
        if stale or (failure is not None and failure.notified):
            result.recovered = True
            fanout.emit(Event("backup.recovered", database, manifest.finished_at,
                              backup_id=manifest.id, size=manifest.size, duration=duration,
                              details={"failed_at": failure.at.isoformat()} if failure else {}))
        if drill is not None:
            try:
                result.drill = run_verify_job(settings, storage, manifest, drill,
                                              context=context)
            except PgvaultError as exc:
                result.drill_error = exc
            if result.drill_failed and policy is not None:
                log.warning("not pruning %s: backup %s failed its restore drill", database,
                            manifest.id)
                policy = None
        if policy is not None:
            from pgvault.ops.prune import prune_after_backup

            try:
                result.prune = prune_after_backup(storage, policy, database=database,
                                                  lock_stale_after=options.lock_stale_after)
                plan = result.prune.databases.get(database)
                fanout.emit(Event("prune.finished", database, context.clock(), details={
                    "removed": len(plan.remove) if plan else 0,
                    "kept": len(plan.keep) if plan else 0,
                    "orphans_removed": len(result.prune.orphans)}))
            except PgvaultError as exc:  # the backup is stored; a failed prune must not hide it
                result.prune_error = str(exc)
                log.warning("backup %s is stored, but pruning %s failed: %s", manifest.id,
                            database, exc)
    publish(settings, storage, database, context)
    return result


def _policy(settings: Settings) -> Policy:
    """The retention policy of ``settings`` (the planner is imported only when pruning)."""
    from pgvault.ops.prune import Policy

    return Policy.from_mapping(msgspec.structs.asdict(settings.retention))


def _abortable(progress: Callable[[int], None] | None,
               cancel: threading.Event | None) -> Callable[[int], None] | None:
    """A progress callback that raises Interrupted once ``cancel`` is set."""
    if cancel is None:
        return progress

    def step(n: int) -> None:
        if cancel.is_set():
            raise Interrupted("backup aborted: pgvault is shutting down")
        if progress is not None:
            progress(n)

    return step


def _record(storage: Storage, database: str, run: RunRecord, *, failed: bool) -> Any:
    """Add a run to the history; a storage that refuses it is logged, never fatal."""
    try:
        return record_run(storage, database, run, failed=failed)
    except Exception as exc:
        # After a failed run the storage is often the cause, and the run's own error line
        # already says so: this is then only worth an info line.
        log.log(logging.INFO if failed else logging.WARNING,
                "could not record the backup run of %s in the repository: %s", database, exc)
        return None


def status_of(settings: Settings, storage: Storage, database: str) -> DatabaseStatus:
    """The monitoring status of ``database`` against this target's objectives."""
    return database_status(storage, database, rpo_hours=settings.objectives.rpo_hours,
                           rto_minutes=settings.objectives.rto_minutes,
                           lock_stale_after=timedelta(hours=settings.lock_stale_after_hours),
                           archive_stale_after=timedelta(
                               minutes=settings.check.warn_archive_minutes) or None)


def publish(settings: Settings, storage: Storage, database: str,
            context: JobContext) -> None:
    """Refresh ``database`` in the metrics, then write the textfile / push, as configured."""
    from pgvault.sinks import prometheus

    wanted = settings.metrics.textfile or settings.metrics.pushgateway_url
    if context.metrics is None and not wanted:
        return
    if context.metrics is None:
        from pgvault.metrics import Metrics

        metrics = Metrics()
    else:
        metrics = context.metrics
    try:
        metrics.update(status_of(settings, storage, database))
    except Exception as exc:
        log.warning("could not read the status of %s for metrics: %s", database, exc)
        return
    timeout = settings.notify.timeout_seconds
    with contextlib.suppress(prometheus.PublishError):
        prometheus.publish(metrics, settings.metrics, database, timeout=timeout)


def run_verify_job(settings: Settings, storage: Storage, manifest: Manifest,
                   drill: Callable[[Manifest], VerifyReport], *,
                   context: JobContext | None = None) -> VerifyReport:
    """Run one restore drill through ``drill``, emit verify.succeeded/failed, publish."""
    context = context or JobContext()
    database = manifest.database
    fanout = context.fanout(settings, database)
    started = context.clock()
    with logs.tail() as tail:
        try:
            report = drill(manifest)
        except BaseException as exc:
            finished = context.clock()
            fanout.emit(Event("verify.failed", database, finished, backup_id=manifest.id,
                              started_at=started, finished_at=finished,
                              duration=(finished - started).total_seconds(),
                              error=str(exc) or type(exc).__name__, log_tail=tuple(tail)))
            publish(settings, storage, database, context)
            raise
        failures = "; ".join(f"{c.name}: {c.detail}" for c in report.failures)
        fanout.emit(Event(
            "verify.succeeded" if report.passed else "verify.failed", database,
            report.finished_at, backup_id=manifest.id, started_at=report.started_at,
            finished_at=report.finished_at,
            duration=(report.finished_at - report.started_at).total_seconds(),
            error=failures or None, log_tail=tuple(tail),
            details={"level": report.level,
                     **({"restore_seconds": round(report.restore_seconds, 3)}
                        if report.restore_seconds is not None else {})}))
    publish(settings, storage, database, context)
    return report


def run_freshness_check(settings: Settings, storage: Storage, database: str, *,
                        was_stale: bool, up_since: datetime,
                        context: JobContext | None = None) -> bool:
    """Raise backup.stale when the newest good backup is older than the RPO objective.

    Returns whether the database is stale now. A database with no backup at all counts
    as stale only once the caller has been up longer than the objective.
    """
    context = context or JobContext()
    status = status_of(settings, storage, database)
    if context.metrics is not None:
        context.metrics.update(status)
    now = context.clock()
    rpo = timedelta(hours=settings.objectives.rpo_hours)
    age = status.age(now)
    # A database never backed up is stale once the caller has been up longer than the RPO.
    stale = now - up_since > rpo if age is None else age > rpo and not status.catching_up(rpo)
    if stale and not was_stale:
        newest = status.newest
        context.fanout(settings, database).emit(Event(
            "backup.stale", database, now,
            backup_id=newest.id if newest else None,
            started_at=newest.started_at if newest else None,
            error=(f"newest backup is {age.total_seconds() / 3600:.1f}h old"
                   if age is not None else "no complete backup")
            + f"; RPO objective {settings.objectives.rpo_hours:g}h",
            details={"age_hours": round(age.total_seconds() / 3600, 2) if age else None,
                     "rpo_hours": settings.objectives.rpo_hours}))
    return stale
