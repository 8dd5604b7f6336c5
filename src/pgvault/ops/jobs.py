"""Jobs: one run of a use case plus what running it unattended needs (events, history,
metrics), for every kind of run: ``run(vault, request)``.

The CLI commands and the daemon both call these, so a backup run from cron and one run
by `pgvault daemon`, a logical backup and a physical one, notify, record and publish
exactly alike. A job never lets a notifier, the run history or a metrics target fail
it: those are logged and counted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, overload

from pgvault import config, logs
from pgvault.errors import Interrupted, PgvaultError
from pgvault.events import Event
from pgvault.health import DatabaseStatus
from pgvault.model import RunRecord
from pgvault.ops.status import database_status, record_run
from pgvault.storage.base import Storage
from pgvault.vault import Vault

if TYPE_CHECKING:
    from pgvault.config import Settings
    from pgvault.engines.snapshots import SnapshotProvider
    from pgvault.model import Facts, Manifest, VerifyReport
    from pgvault.ops.prune import Policy, PruneReport
    from pgvault.ops.snapshot import CopyTarget, SnapshotOptions, SnapshotRun
    from pgvault.pg.conninfo import ConnInfo
    from pgvault.pipeline.stream import Progress

log = logs.get("jobs")

Drill = Callable[["Manifest"], "VerifyReport"]


# ---------------------------------------------------------------- requests

@dataclass(frozen=True)
class BackupRequest:
    """A logical backup of the database ``conn`` names; ``None`` fields: the settings'."""

    conn: ConnInfo
    compression: str | None = None
    level: int | None = None
    backup_globals: bool = True
    """False (--no-globals) skips roles and tablespaces even when the settings want them."""
    streams: int | None = None
    progress: Progress | None = None
    drill: Drill | None = None
    """Restore-drills the new backup (verify_after_backup); a failed drill stops the prune."""
    notify_failure: bool = True
    """False records a failure without telling anyone (an attempt that will be retried)."""
    stale: bool = False
    """A stale alert is open, so success means recovered."""


@dataclass(frozen=True)
class BaseBackupRequest:
    """A physical base backup of the server ``conn`` reaches; ``None`` fields: the settings'."""

    conn: ConnInfo
    cluster: str | None = None
    compression: str | None = None
    wal_method: str | None = None
    fast_checkpoint: bool | None = None
    progress: Progress | None = None
    notify_failure: bool = True
    stale: bool = False
    incremental: bool = False


@dataclass(frozen=True)
class VerifyRequest:
    """One restore drill of ``manifest``, run by ``drill``."""

    manifest: Manifest
    drill: Drill


@dataclass(frozen=True)
class PruneRequest:
    """Apply the vault's retention policy (to one database, or all)."""

    dry_run: bool = False
    force: bool = False
    database: str | None = None
    now: datetime | None = None


@dataclass(frozen=True)
class SnapshotRequest:
    """A provider snapshot of ``database`` (ops/snapshot.py): drill leftovers swept, the
    snapshot taken and recorded, copied to each target, then pruned if ``policy``."""

    database: str
    provider: SnapshotProvider
    options: SnapshotOptions
    copies: tuple[CopyTarget, ...] = ()
    policy: Policy | None = None
    facts: Callable[[], Facts] | None = None


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


@overload
def run(vault: Vault, request: BackupRequest | BaseBackupRequest) -> BackupRun: ...
@overload
def run(vault: Vault, request: VerifyRequest) -> VerifyReport: ...
@overload
def run(vault: Vault, request: PruneRequest) -> PruneReport: ...
@overload
def run(vault: Vault, request: SnapshotRequest) -> SnapshotRun: ...


def run(vault: Vault, request: Any) -> Any:
    """Run ``request`` with the parts ``vault`` wires; raises what the run raised, after
    recording and reporting it."""
    if isinstance(request, BackupRequest):
        return _logical(vault, request)
    if isinstance(request, BaseBackupRequest):
        return _physical(vault, request)
    if isinstance(request, VerifyRequest):
        return _verify(vault, request)
    if isinstance(request, PruneRequest):
        return _prune(vault, request)
    if isinstance(request, SnapshotRequest):
        return _snapshot(vault, request)
    raise TypeError(f"no job runs a {type(request).__name__}")


def database_of(conn: ConnInfo) -> str:
    """The database name a connection names, as the repository will file it."""
    return conn.dbname or conn.redacted().rsplit("/", 1)[-1]


# ---------------------------------------------------------------- backups

def _logical(vault: Vault, request: BackupRequest) -> BackupRun:
    from pgvault.ops.backup import BackupOptions, backup

    settings = vault.settings
    options = BackupOptions(
        stages=vault.stages_for(request.compression, request.level),
        backup_globals=settings.backup_globals and request.backup_globals,
        streams=settings.backup_streams if request.streams is None else request.streams,
        lock_stale_after=vault.lock_stale_after,
        progress=_abortable(request.progress, vault.cancel))
    return _backup_run(vault, database_of(request.conn), lambda: backup(request.conn,
                       vault.storage, options), drill=request.drill,
                       notify_failure=request.notify_failure, stale=request.stale,
                       kind="backup")


def _physical(vault: Vault, request: BaseBackupRequest) -> BackupRun:
    from pgvault.ops.basebackup import BasebackupOptions, basebackup

    settings = vault.settings
    physical = settings.physical
    options = BasebackupOptions(
        cluster=request.cluster or str(physical.cluster),
        stages=vault.stages_for(request.compression),
        wal_method=request.wal_method or physical.wal_method,
        fast_checkpoint=(physical.fast_checkpoint if request.fast_checkpoint is None
                         else request.fast_checkpoint),
        archive_wait=physical.archive_wait_seconds,
        lock_stale_after=vault.lock_stale_after,
        progress=_abortable(request.progress, vault.cancel),
        incremental=request.incremental,
        identities=vault.keyring if request.incremental else None)
    return _backup_run(vault, options.cluster, lambda: basebackup(request.conn, vault.storage,
                       options), drill=None, notify_failure=request.notify_failure,
                       stale=request.stale, kind="base backup")


def _backup_run(vault: Vault, database: str, take: Callable[[], Manifest], *,
                drill: Drill | None, notify_failure: bool, stale: bool,
                kind: str) -> BackupRun:
    """Take a backup, record the run, emit events, drill and prune if asked, publish.

    ``kind`` names it in log lines: "backup" (logical) or "base backup" (physical, whose
    prune also keeps what [physical] recovery_window needs).
    """
    settings = vault.settings
    # Built before the backup, so a bad [retention] fails fast instead of after an hour's dump.
    policy: Policy | None = vault.policy if settings.prune_after_backup else None
    window = vault.recovery_window if kind == "base backup" else None
    fanout = vault.events
    started = vault.clock()
    with logs.tail() as tail:
        fanout.emit(Event("backup.started", database, started, started_at=started))
        try:
            manifest = take()
        except BaseException as exc:
            finished = vault.clock()
            error = str(exc) or type(exc).__name__
            duration = (finished - started).total_seconds()
            record = RunRecord(at=started, finished_at=finished, duration=duration, error=error,
                               notified=notify_failure)
            _record(vault.storage, database, record, failed=True)
            # An abort because the daemon stops is logged, not announced; the next start
            # runs the missed backup.
            if notify_failure and not (vault.cancel is not None and vault.cancel.is_set()):
                fanout.emit(Event("backup.failed", database, finished, started_at=started,
                                  finished_at=finished, duration=duration, error=error,
                                  log_tail=tuple(tail)))
            else:
                log.warning("%s attempt of %s failed after %.1fs: %s", kind, database,
                            duration, error)
            publish(vault, database)
            raise
        database = manifest.database
        for warning in manifest.warnings:
            log.warning("%s %s of %s: %s", kind, manifest.id, database, warning)
        duration = (manifest.finished_at - manifest.started_at).total_seconds()
        before = _record(vault.storage, database, RunRecord(
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
                result.drill = run(vault, VerifyRequest(manifest, drill))
            except PgvaultError as exc:
                result.drill_error = exc
            if result.drill_failed and policy is not None:
                log.warning("not pruning %s: backup %s failed its restore drill", database,
                            manifest.id)
                policy = None
        if policy is not None:
            from pgvault.ops.prune import prune_after_backup

            try:
                result.prune = prune_after_backup(vault.storage, policy, database=database,
                                                  lock_stale_after=vault.lock_stale_after,
                                                  recovery_window=window)
                plan = result.prune.databases.get(database)
                fanout.emit(Event("prune.finished", database, vault.clock(), details={
                    "removed": len(plan.remove) if plan else 0,
                    "kept": len(plan.keep) if plan else 0,
                    "orphans_removed": len(result.prune.orphans)}))
            except PgvaultError as exc:  # the backup is stored; a failed prune must not hide it
                result.prune_error = str(exc)
                log.warning("%s %s is stored, but pruning %s failed: %s", kind, manifest.id,
                            database, exc)
    publish(vault, database)
    return result


def backup_databases(settings: Settings, dbname: str | None,
                     request: Callable[[Vault, ConnInfo], BackupRequest], *,
                     finished: Callable[[BackupRun], Exception | None],
                     failed: Callable[[str | None, PgvaultError], None],
                     ) -> list[BackupRun]:
    """Back up every configured database ([[databases]]; ``dbname`` picks one) in turn.

    One failure does not stop the others: each is handed to ``failed``, and the run then
    ends with the worst one's class naming how many failed. ``finished`` is handed each
    run once its progress is closed, and returns the error the run ends with (a failed
    drill). With one database its own error is raised as it is.
    """
    from pgvault.errors import UsageError

    targets = config.targets(settings)
    # [[databases]]: -d names one entry; without it, each entry in turn (one cron line).
    if settings.databases and dbname:
        name = config.command_line_connection(dbname).dbname or dbname
        targets = [t for t in targets if t.name == name]
        if not targets:
            names = ", ".join(e.name for e in settings.databases)
            raise UsageError(f"--dbname {dbname!r} is not among [[databases]] ({names})")
        dbname = None
    failures: list[Exception] = []
    runs: list[BackupRun] = []
    for target in targets:
        conn = config.target_connection(target, dbname)
        vault = Vault.open(target.settings)
        wanted = request(vault, conn)
        try:
            done = run(vault, wanted)
        except PgvaultError as exc:
            if len(targets) == 1:
                raise
            failed(target.name, exc)
            failures.append(exc)
            continue
        finally:
            _finish(wanted.progress)
        runs.append(done)
        error = finished(done)
        if error is not None:
            if len(targets) == 1:
                raise error
            failures.append(error)
    if failures:
        worst = max(failures, key=lambda e: getattr(e, "exit_code", 1))
        raise type(worst)(f"{len(failures)} of {len(targets)} databases failed; first: "
                          f"{failures[0]}")
    return runs


def _finish(progress: Any) -> None:
    finish = getattr(progress, "finish", None)
    if finish is not None:
        finish()


# ---------------------------------------------------------------- provider snapshots

def _snapshot(vault: Vault, request: SnapshotRequest) -> SnapshotRun:
    """One snapshot run: snapshot.started, then snapshot.succeeded or snapshot.failed, its
    own run history (status/<db>/snapshot.json), metrics published."""
    from pgvault.ops.snapshot import snapshot_run
    from pgvault.ops.status import SNAPSHOT_HISTORY

    database = request.database
    fanout = vault.events
    started = vault.clock()
    with logs.tail() as tail:
        fanout.emit(Event("snapshot.started", database, started, started_at=started))
        try:
            done = snapshot_run(request.provider, vault.catalog, database, request.options,
                                copies=request.copies, policy=request.policy,
                                facts=request.facts, clock=vault.clock)
        except BaseException as exc:
            finished = vault.clock()
            error = str(exc) or type(exc).__name__
            duration = (finished - started).total_seconds()
            _record(vault.storage, database, RunRecord(
                at=started, finished_at=finished, duration=duration, error=error),
                failed=True, name=SNAPSHOT_HISTORY)
            fanout.emit(Event("snapshot.failed", database, finished, started_at=started,
                              finished_at=finished, duration=duration, error=error,
                              log_tail=tuple(tail)))
            publish(vault, database)
            raise
        manifest = done.manifest
        for warning in manifest.warnings:
            log.warning("snapshot %s of %s: %s", manifest.id, database, warning)
        duration = (manifest.finished_at - manifest.started_at).total_seconds()
        _record(vault.storage, database, RunRecord(
            at=manifest.started_at, finished_at=manifest.finished_at, duration=duration,
            backup_id=manifest.id), failed=False, name=SNAPSHOT_HISTORY)
        facts: Any = manifest.snapshot
        fanout.emit(Event(
            "snapshot.succeeded", database, manifest.finished_at, backup_id=manifest.id,
            started_at=manifest.started_at, finished_at=manifest.finished_at,
            duration=duration, error="; ".join(done.copy_errors) or None,
            details={"provider": facts.provider, "region": facts.region,
                     "snapshot_id": facts.snapshot_id,
                     "copies": [c.snapshot.region for c in done.copies  # type: ignore[union-attr]
                                ],
                     "removed": sum(len(p.remove) + len(p.orphans) for p in done.prunes),
                     "drills_swept": len(done.swept)}))
    publish(vault, database)
    return done


# ---------------------------------------------------------------- prune

def _prune(vault: Vault, request: PruneRequest) -> PruneReport:
    from datetime import UTC

    from pgvault.ops.prune import prune

    return prune(vault.storage, vault.policy, dry_run=request.dry_run,
                 now=request.now or datetime.now(UTC), lock_stale_after=vault.lock_stale_after,
                 database=request.database, recovery_window=vault.recovery_window,
                 force=request.force)


def _abortable(progress: Callable[[int], None] | None,
               cancel: threading.Event | None) -> Callable[[int], None] | None:
    """A progress callback that raises Interrupted once ``cancel`` is set."""
    if cancel is None:
        return progress

    def step(n: int) -> None:
        if cancel.is_set():
            # The fleet's cancel says why (its lease was taken over); else a stop.
            why = getattr(cancel, "reason", None) or "pgvault is shutting down"
            raise Interrupted(f"backup aborted: {why}")
        if progress is not None:
            progress(n)

    return step


def _record(storage: Storage, database: str, run: RunRecord, *, failed: bool,
            name: str | None = None) -> Any:
    """Add a run to the history; a storage that refuses it is logged, never fatal."""
    try:
        if name is not None:
            return record_run(storage, database, run, failed=failed, name=name)
        return record_run(storage, database, run, failed=failed)
    except Exception as exc:
        # After a failed run the storage is often the cause, and the run's own error line
        # already says so: this is then only worth an info line.
        log.log(logging.INFO if failed else logging.WARNING,
                "could not record the backup run of %s in the repository: %s", database, exc)
        return None


def status_of(vault: Vault, database: str) -> DatabaseStatus:
    """The monitoring status of ``database`` against this target's objectives."""
    settings = vault.settings
    status = database_status(vault.storage, database, rpo_hours=settings.objectives.rpo_hours,
                             rto_minutes=settings.objectives.rto_minutes,
                             lock_stale_after=vault.lock_stale_after,
                             archive_stale_after=timedelta(
                                 minutes=settings.check.warn_archive_minutes) or None)
    if vault.copies:  # [[repos]]: each copy's lag and last error, for the metrics
        import dataclasses
        import functools

        from pgvault.ops.copy import backup_interval, copy_states

        interval = backup_interval(settings.schedule.backup, settings.schedule.timezone)
        targets = [(e.name, functools.partial(vault.repository, e.name),
                    timedelta(hours=e.copy_lag_hours) if e.copy_lag_hours else interval)
                   for e in settings.repos if e.name in vault.copies]
        status = dataclasses.replace(status, copies=copy_states(
            vault.catalog, targets, database, vault.clock()))
    return status


def publish(vault: Vault, database: str) -> None:
    """Refresh ``database`` in the metrics, then write the textfile / push, as configured."""
    from pgvault.sinks import prometheus

    settings = vault.settings
    wanted = settings.metrics.textfile or settings.metrics.pushgateway_url
    if vault.metrics is None and not wanted:
        return
    if vault.metrics is None:
        from pgvault.metrics import Metrics

        metrics = Metrics()
    else:
        metrics = vault.metrics
    try:
        metrics.update(status_of(vault, database))
    except Exception as exc:
        log.warning("could not read the status of %s for metrics: %s", database, exc)
        return
    timeout = settings.notify.timeout_seconds
    with contextlib.suppress(prometheus.PublishError):
        prometheus.publish(metrics, settings.metrics, database, timeout=timeout)


def _verify(vault: Vault, request: VerifyRequest) -> VerifyReport:
    """Run one restore drill through ``drill``, emit verify.succeeded/failed, publish."""
    manifest, drill = request.manifest, request.drill
    database = manifest.database
    fanout = vault.events
    started = vault.clock()
    with logs.tail() as tail:
        try:
            report = drill(manifest)
        except BaseException as exc:
            finished = vault.clock()
            fanout.emit(Event("verify.failed", database, finished, backup_id=manifest.id,
                              started_at=started, finished_at=finished,
                              duration=(finished - started).total_seconds(),
                              error=str(exc) or type(exc).__name__, log_tail=tuple(tail)))
            publish(vault, database)
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
    publish(vault, database)
    return report


def run_freshness_check(vault: Vault, database: str, *, was_stale: bool,
                        up_since: datetime) -> bool:
    """Raise backup.stale when the newest good backup is older than the RPO objective.

    Returns whether the database is stale now. A database with no backup at all counts
    as stale only once the caller has been up longer than the objective.
    """
    settings = vault.settings
    status = status_of(vault, database)
    if vault.metrics is not None:
        vault.metrics.update(status)
    now = vault.clock()
    rpo = timedelta(hours=settings.objectives.rpo_hours)
    age = status.age(now)
    # A database never backed up is stale once the caller has been up longer than the RPO.
    stale = now - up_since > rpo if age is None else age > rpo and not status.catching_up(rpo)
    if stale and not was_stale:
        newest = status.newest
        vault.events.emit(Event(
            "backup.stale", database, now,
            backup_id=newest.id if newest else None,
            started_at=newest.started_at if newest else None,
            error=(f"newest backup is {age.total_seconds() / 3600:.1f}h old"
                   if age is not None else "no complete backup")
            + f"; RPO objective {settings.objectives.rpo_hours:g}h",
            details={"age_hours": round(age.total_seconds() / 3600, 2) if age else None,
                     "rpo_hours": settings.objectives.rpo_hours}))
    return stale


def copy_each(vault: Vault, names: list[str], *, ref: str = "all",
              database: str | None = None, jobs: int = 4,
              echo: Callable[[str], None] | None = None, as_json: bool = False) -> None:
    """Copy from ``vault`` to each `[[repos]]` entry in ``names``; one that cannot be
    reached or written does not stop the others. Each run is recorded in the source
    (``ops.copy.record_run``). Raises once at the end, one line naming each failure."""
    import json
    from datetime import UTC

    from pgvault.errors import BackupFailed, UsageError
    from pgvault.ops.copy import copy, record_run

    say: Callable[[str], None] = echo or (lambda line: None)
    errors: list[tuple[str, PgvaultError]] = []
    for name in names:
        try:
            target = vault.repository(name)
            if target.settings.repo == vault.settings.repo:
                raise UsageError(f"repository {name!r} is the source itself")
            report = copy(vault.storage, target.storage, name=name, policy=target.policy,
                          now=datetime.now(UTC), ref=ref, database=database, jobs=jobs,
                          lock_stale_after=target.lock_stale_after,
                          progress=None if as_json else lambda line: say(f"  {line}"),
                          require_encrypted=target.requires_encryption)
        except PgvaultError as exc:
            record_run(vault.catalog, name, datetime.now(UTC), error=str(exc))
            errors.append((name, exc))
            if as_json:
                say(json.dumps({"target": name, "error": str(exc)}))
            continue
        record_run(vault.catalog, name, datetime.now(UTC), report=report)
        if report.failed:
            label, why = next(iter(report.failed.items()))
            errors.append((name, BackupFailed(
                f"{len(report.failed)} backup(s) could not be copied, {label}: {why}")))
        if as_json:
            say(json.dumps({
                "target": name, "url": target.storage.url, "copied": report.copied,
                "in_sync": report.in_sync, "not_kept": report.not_kept,
                "failed": report.failed, "objects_sent": report.objects_sent,
                "objects_kept": report.objects_kept, "bytes_sent": report.bytes_sent,
                "seconds": round(report.seconds, 3)}))
        else:
            say(report.summary())
    for name in vault.catalog.databases():  # the metrics show each copy's lag now
        publish(vault, name)
    if not errors:
        return
    line = "; ".join(f"copy to {name} failed: {exc}" for name, exc in errors) + \
        " (run pgvault copy again once the cause is fixed)"
    if len(errors) == 1 and not isinstance(errors[0][1], BackupFailed):
        raise type(errors[0][1])(line)
    raise BackupFailed(line)
