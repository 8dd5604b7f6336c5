"""What monitoring needs to know about each database, read from the repository alone.

The newest good backup comes from the catalog (a manifest exists only for a complete
backup), the last failure from a small run-history record the jobs write beside it, and
the last restore drill from the drill records. ``DatabaseStatus.verdict`` turns that into
OK / WARNING / CRITICAL against the objectives, never from "the last command succeeded".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from pgvault.catalog import Catalog, lock_key
from pgvault.lock import holder
from pgvault.model import Manifest, VerifyReport, from_dict, to_dict
from pgvault.ops.wal import ArchiveStatus, archive_status
from pgvault.storage.base import Storage

HISTORY = "backup"
"""Name of the run-history status record (status/<db>/backup.json)."""

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


class RunRecord(msgspec.Struct):
    """One backup run as the history keeps it."""

    at: datetime
    finished_at: datetime
    duration: float
    backup_id: str | None = None
    size: int | None = None
    error: str | None = None
    notified: bool = True
    """False when nobody was told (a failed attempt that was retried, a shutdown)."""


class RunHistory(msgspec.Struct):
    """Status record of one database: last success, last failure, failures so far."""

    last_success: RunRecord | None = None
    last_failure: RunRecord | None = None
    failures_total: int = 0

    @property
    def failing(self) -> bool:
        """The last run failed (and nobody has succeeded since)."""
        failure, success = self.last_failure, self.last_success
        return failure is not None and (success is None or failure.at > success.at)


def read_history(storage: Storage, database: str) -> RunHistory:
    """The run history of ``database``; empty if none was written (or it is unreadable)."""
    return _history(storage, database)[0]


def _history(storage: Storage, database: str) -> tuple[RunHistory, str | None]:
    """The run history of ``database``, and why it could not be read (None if it could)."""
    record, problem = Catalog(storage).status_record(database, HISTORY)
    if record is None:
        return RunHistory(), problem
    try:
        return from_dict(RunHistory, record), None
    except msgspec.ValidationError as exc:
        return RunHistory(), f"run history of {database!r} is damaged: {exc}"


def record_run(storage: Storage, database: str, run: RunRecord, *, failed: bool) -> RunHistory:
    """Add ``run`` to the history of ``database``; returns the history as it was before."""
    before = read_history(storage, database)
    if failed:
        after = msgspec.structs.replace(before, last_failure=run,
                                        failures_total=before.failures_total + 1)
    else:
        after = msgspec.structs.replace(before, last_success=run)
    Catalog(storage).write_status(database, HISTORY, to_dict(after))
    return before


@dataclass(frozen=True)
class Drill:
    """The newest restore drill of a database, as monitoring sees it."""

    backup_id: str
    level: str
    started_at: datetime
    finished_at: datetime
    passed: bool
    restore_seconds: float | None
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """OK (0), WARNING (1), CRITICAL (2) or UNKNOWN (3), with the reasons for it."""

    state: int
    reasons: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return STATE_NAMES[self.state]


@dataclass(frozen=True)
class DatabaseStatus:
    """Everything monitoring reports about one database, at the time it was read."""

    database: str
    repository: str
    rpo_hours: float
    rto_minutes: float
    backups: int = 0
    newest: Manifest | None = None
    oldest_time: datetime | None = None
    history: RunHistory = field(default_factory=RunHistory)
    drill: Drill | None = None
    drill_last_success: datetime | None = None
    """When the newest passing drill finished."""
    running: dict[str, object] | None = None
    """The lock holder when a backup or prune of this database runs now."""
    archive: ArchiveStatus | None = None
    """The WAL archive, for a physical cluster: the newest point it can restore to."""
    archive_stale_after: timedelta | None = None
    """WARNING when the newest archived WAL segment is older than this."""
    bad: tuple[tuple[str, str], ...] = ()
    """(backup id, why) of every backup that cannot be trusted: a damaged manifest, or a
    last drill that failed integrity. None of them is ``newest`` or counts in ``backups``."""
    damaged_records: tuple[str, ...] = ()
    """Drill and status records that cannot be read (what they said is lost)."""

    def age(self, now: datetime) -> timedelta | None:
        """How old the newest recovery point is: the newest backup's snapshot, or, with a
        gap-free WAL archive, the newest archived segment."""
        if self.newest is None:
            return None
        point = self.newest.started_at
        if self.archive is not None and self.archive.latest_restore is not None:
            point = max(point, self.archive.latest_restore)
        return now - point

    def rto_met(self) -> bool | None:
        """Whether the last drill's restore fitted the RTO objective; None if unknown."""
        if self.drill is None or self.drill.restore_seconds is None:
            return None
        return self.drill.restore_seconds <= self.rto_minutes * 60

    def verdict(self, now: datetime, *, warn_age_hours: float = 0.0,
                warn_drill_age_days: float = 0.0) -> Verdict:
        """CRITICAL past the RPO or after a failed/slow drill; WARNING on softer signs."""
        critical: list[str] = []
        warning: list[str] = []
        age = self.age(now)
        rpo = timedelta(hours=self.rpo_hours)
        if age is None:
            critical.append("no complete backup" if not self.bad else
                            "no backup that can be trusted")
        elif age > rpo:
            text = f"newest backup is {_hours(age)} old (RPO {self.rpo_hours:g}h)"
            if self.catching_up(rpo):
                warning.append(text + ", a backup is running")
            else:
                critical.append(text)
        elif warn_age_hours and age > timedelta(hours=warn_age_hours):
            warning.append(f"newest backup is {_hours(age)} old (warning at "
                           f"{warn_age_hours:g}h)")
        archived = self.archive.last_archived_at if self.archive is not None else None
        if self.archive_stale_after and archived is not None and \
                now - archived > self.archive_stale_after:
            warning.append(f"WAL archive is stale: the newest segment was archived "
                           f"{_hours(now - archived)} ago")
        if self.archive is not None and self.archive.failing:
            failed = self.archive.failures
            warning.append(f"wal-push of {failed.last_wal} failed at "
                           f"{failed.last_at:%Y-%m-%d %H:%M}Z: {failed.last_error}")
        if self.archive is not None and self.archive.gaps:
            first, last = self.archive.gaps[0]
            warning.append(f"WAL archive has {len(self.archive.gaps)} gap(s), first "
                           f"{first}..{last}: point-in-time recovery cannot cross them")
        if self.history.failing and self.history.last_failure is not None:
            failure = self.history.last_failure
            warning.append(f"last backup failed at {failure.at:%Y-%m-%d %H:%M}Z: "
                           f"{failure.error or 'unknown error'}")
        if self.drill is None:
            if warn_drill_age_days:
                warning.append("never restore-drilled (pgvault verify)")
        else:
            if not self.drill.passed:
                what = "; ".join(self.drill.failures) or "a check failed"
                critical.append(f"last restore drill failed: {what}")
            elif self.rto_met() is False:
                critical.append(f"last restore drill took {_minutes(self.drill.restore_seconds)}"
                                f" (RTO {self.rto_minutes:g}m)")
            drill_age = now - self.drill.finished_at
            if warn_drill_age_days and drill_age > timedelta(days=warn_drill_age_days):
                warning.append(f"last restore drill is {drill_age.days} days old")
        if self.bad:
            # The good ones still meet the objectives (else the age says CRITICAL above),
            # but a damaged backup is a sign that the repository is losing bytes.
            shown = "; ".join(f"{backup_id}: {why}" for backup_id, why in self.bad[:3])
            more = f" and {len(self.bad) - 3} more" if len(self.bad) > 3 else ""
            # First among the warnings: the one sign the repository itself is failing.
            warning[:0] = [f"{_plural(len(self.bad), 'backup')} cannot be trusted "
                           f"({shown}{more})", *self.damaged_records]
        else:
            warning[:0] = self.damaged_records
        if critical:
            return Verdict(CRITICAL, tuple(critical + warning))
        return Verdict(WARNING, tuple(warning)) if warning else Verdict(OK)

    def catching_up(self, rpo: timedelta) -> bool:
        """A backup runs now that started before the objective was missed."""
        if self.running is None or self.running.get("operation") != "backup":
            return False
        try:
            since = datetime.fromisoformat(str(self.running.get("since")))
        except ValueError:
            return False
        return self.newest is not None and since <= self.newest.started_at + rpo

    def to_json(self, now: datetime) -> dict[str, Any]:
        """The form `pgvault status --json` and the daemon's /status print."""
        age = self.age(now)
        newest = self.newest
        drill = self.drill
        return {
            "database": self.database,
            "repository": self.repository,
            "objectives": {"rpo_hours": self.rpo_hours, "rto_minutes": self.rto_minutes},
            "backups": self.backups,
            "newest": None if newest is None else {
                "id": newest.id,
                "started_at": newest.started_at.isoformat(),
                "finished_at": newest.finished_at.isoformat(),
                "size": newest.size,
                "duration_seconds": (newest.finished_at - newest.started_at).total_seconds(),
            },
            "age_seconds": None if age is None else round(age.total_seconds(), 3),
            "rpo_met": None if age is None else age <= timedelta(hours=self.rpo_hours),
            "oldest_at": self.oldest_time.isoformat() if self.oldest_time else None,
            "last_failure": None if self.history.last_failure is None
            else to_dict(self.history.last_failure),
            "failing": self.history.failing,
            "failures_total": self.history.failures_total,
            "last_drill": None if drill is None else {
                "backup_id": drill.backup_id,
                "level": drill.level,
                "finished_at": drill.finished_at.isoformat(),
                "passed": drill.passed,
                "restore_seconds": drill.restore_seconds,
                "failures": list(drill.failures),
            },
            "rto_met": self.rto_met(),
            "running": self.running,
            "archive": None if self.archive is None else _archive_json(self.archive),
            "bad": [{"id": backup_id, "reason": why} for backup_id, why in self.bad],
            "damaged_records": list(self.damaged_records),
        }


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
    physical = [m for m in manifests if m.kind == "physical"]
    reports = list(drills.newest.values())
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
    )


def _archive_json(archive: ArchiveStatus) -> dict[str, Any]:
    def when(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment else None

    return {"last_wal": archive.last_wal, "last_archived_at": when(archive.last_archived_at),
            "files": archive.files, "stored_bytes": archive.stored_bytes,
            "gaps": [list(gap) for gap in archive.gaps],
            "recoverable_from": when(archive.earliest_restore),
            "recoverable_to": when(archive.latest_restore),
            "push_failures_total": archive.failures.total,
            "last_push_failure": None if archive.failures.last_at is None else {
                "at": when(archive.failures.last_at), "wal": archive.failures.last_wal,
                "error": archive.failures.last_error},
            "failing": archive.failing}


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


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f}h"


def _minutes(seconds: float | None) -> str:
    return f"{(seconds or 0) / 60:.1f}m"
