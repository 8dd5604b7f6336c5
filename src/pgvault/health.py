"""What monitoring makes of a repository: each database's status and verdict, as values.

ops.status reads them from the repository; metrics, the CLI, the daemon and the console show
them. They sit at the bottom beside model.py, so every layer may hold and print them, and
apart from it, so a command that only reads manifests (list, wal-push) does not build them.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

from msgspec import UnsetType

from pgvault.model import Identity, Manifest, PushFailures, RunHistory, plural, to_dict

# What monitoring reports about a database, read from the repository (ops.status reads it,
# metrics and the CLI show it): values, so the layers below ops can hold and print them.

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
SNAPSHOT_DRILL_WHERE = "provider snapshot"
"""How a drill record of a provider snapshot's temporary instance begins its ``where``."""
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


@dataclasses.dataclass
class TimelineRange:
    """The archived segments of one timeline: first, last, and the holes between."""

    timeline: int
    first: str
    last: str
    segments: int
    # (first missing, last missing)
    gaps: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ArchiveStatus:
    """What the archive of one cluster holds and which points in time it can restore to."""

    cluster: str
    identity: Identity | None
    timelines: list[TimelineRange]
    files: int
    stored_bytes: int
    last_wal: str | None
    last_archived_at: datetime | None
    earliest_restore: datetime | None  # the oldest restorable base backup's end
    latest_restore: datetime | None  # when the newest segment of an unbroken chain was stored
    failures: PushFailures = dataclasses.field(default_factory=PushFailures)
    # [[repos]] name -> (WAL files it lacks that this repository holds, when the oldest
    # of them was left behind): wal-push's backlog, caught up by later pushes.
    backlog: dict[str, tuple[int, datetime | None]] = dataclasses.field(default_factory=dict)

    @property
    def failing(self) -> bool:
        """The last push failed, and no segment was archived since."""
        last = self.failures.last_at
        return last is not None and (self.last_archived_at is None
                                     or last > self.last_archived_at)

    @property
    def gaps(self) -> list[tuple[str, str]]:
        return [gap for line in self.timelines for gap in line.gaps]


@dataclasses.dataclass(frozen=True)
class Drill:
    """The newest restore drill of a database, as monitoring sees it."""

    backup_id: str
    level: str
    started_at: datetime
    finished_at: datetime
    passed: bool
    restore_seconds: float | None
    failures: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AutomatedBackups:
    """A managed database's own automated backups, as its provider's API reports them."""

    provider: str  # "rds" or "aurora"
    source_id: str  # the DB instance or DB cluster identifier
    status: str = ""  # the instance's or cluster's status: "available", "stopped", ...
    retention_days: int = 0  # 0: automated backups are off
    latest_restorable: datetime | None = None  # the provider's own recovery point
    expected_retention_days: int = 0  # what pgvault's retention policy asks of them
    error: str | None = None  # why the provider could not be asked (nothing else is known)

    def problems(self, now: datetime, rpo_hours: float) -> list[str]:
        """What is wrong with them, each as one warning line (none: all is well)."""
        what = f"{self.provider} {self.source_id}: automated backups"
        if self.error is not None:
            return [f"{what} could not be audited: {self.error}"]
        if self.retention_days <= 0:
            return [f"{what} are off (backup retention period 0 days)"]
        found = []
        if self.retention_days < self.expected_retention_days:
            found.append(f"{what} are kept {self.retention_days} days, shorter than the "
                         f"{self.expected_retention_days} days the policy asks")
        if self.status == "stopped":
            what_stops = "cluster" if self.provider == "aurora" else "instance"
            found.append(f"{what} do not run: the {what_stops} is stopped")
        if self.latest_restorable is None:
            found.append(f"{what}: no latest restorable time yet")
        elif now - self.latest_restorable > timedelta(hours=rpo_hours):
            found.append(f"{what}: latest restorable time is "
                         f"{_hours(now - self.latest_restorable)} old (RPO {rpo_hours:g}h)")
        return found

    def to_json(self, now: datetime) -> dict[str, Any]:
        latest = self.latest_restorable
        return {"provider": self.provider, "source_id": self.source_id, "status": self.status,
                "retention_days": self.retention_days,
                "expected_retention_days": self.expected_retention_days,
                "latest_restorable_time": latest.isoformat() if latest else None,
                "latest_restorable_age_seconds": None if latest is None
                else round((now - latest).total_seconds(), 3),
                "error": self.error}


@dataclasses.dataclass(frozen=True)
class CopyState:
    """One `[[repos]]` copy of a database, as the source sees it (ops.copy.copy_states)."""

    name: str
    behind: int = 0
    """Backups the copy's own policy keeps that it lacks (one that cannot be read: the
    source's backups since its last successful copy)."""
    newest_missing: datetime | None = None
    newest: datetime | None = None
    """When the copy's newest backup of the database started."""
    objective: timedelta = timedelta(hours=24)
    last_error: str | None = None
    """The last copy run's error, unless a later run succeeded."""
    last_error_at: datetime | None = None
    unreadable: str | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """OK (0), WARNING (1), CRITICAL (2) or UNKNOWN (3), with the reasons for it."""

    state: int
    reasons: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return STATE_NAMES[self.state]


@dataclasses.dataclass(frozen=True)
class DatabaseStatus:
    """Everything monitoring reports about one database, at the time it was read."""

    database: str
    repository: str
    rpo_hours: float
    rto_minutes: float
    backups: int = 0
    newest: Manifest | None = None
    oldest_time: datetime | None = None
    history: RunHistory = dataclasses.field(default_factory=RunHistory)
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
    snapshots: int = 0
    """Provider snapshots (kind "snapshot") recorded for this database; not in ``backups``."""
    newest_snapshot: Manifest | None = None
    automated: AutomatedBackups | None = None
    """The provider's own automated backups, when [snapshot] names a managed database."""
    provider_backups: ProviderBackups | None = None
    """Backups a provider takes and only lists ([supabase]), beside pgvault's own."""
    snapshot_drill: Drill | None = None
    """The newest drill of a provider snapshot (``drill`` is the repository's backups')."""
    snapshot_history: RunHistory = dataclasses.field(default_factory=RunHistory)
    """The `pgvault snapshot` runs (status/<db>/snapshot.json)."""
    copies: tuple[CopyState, ...] = ()
    """Each `[[repos]]` copy of this database (its lag and last error)."""

    def age(self, now: datetime) -> timedelta | None:
        """How old the newest recovery point is: the newest backup's snapshot, or, with a
        gap-free WAL archive, the newest archived segment."""
        points = [m.started_at for m in (self.newest, self.newest_snapshot) if m is not None]
        if not points:
            return None
        point = max(points)
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
        for repo, (files, since) in (self.archive.backlog if self.archive else {}).items():
            if files:
                ago = f", the oldest left behind {_hours(now - since)} ago" if since else ""
                warning.append(f"WAL repository {repo} is behind by {files} file(s){ago}: "
                               "later pushes catch it up once it answers")
        if self.archive is not None and self.archive.gaps:
            first, last = self.archive.gaps[0]
            warning.append(f"WAL archive has {len(self.archive.gaps)} gap(s), first "
                           f"{first}..{last}: point-in-time recovery cannot cross them")
        snapshot = self.newest_snapshot
        if snapshot is not None and now - snapshot.started_at > rpo and age is not None \
                and age <= rpo:
            warning.append(f"newest provider snapshot is {_hours(now - snapshot.started_at)} "
                           f"old (RPO {self.rpo_hours:g}h)")
        if self.automated is not None:
            warning += self.automated.problems(now, self.rpo_hours)
        if self.provider_backups is not None:
            warning += self.provider_backups.problems(now, self.rpo_hours)
        if self.snapshot_history.failing and self.snapshot_history.last_failure is not None:
            failure = self.snapshot_history.last_failure
            warning.append(f"last snapshot failed at {failure.at:%Y-%m-%d %H:%M}Z: "
                           f"{failure.error or 'unknown error'}")
        snap_drill = self.snapshot_drill
        if snap_drill is not None and not snap_drill.passed:
            what = "; ".join(snap_drill.failures) or "a check failed"
            critical.append(f"last snapshot drill failed: {what}")
        elif snap_drill is not None and snap_drill.restore_seconds is not None and \
                snap_drill.restore_seconds > self.rto_minutes * 60:
            critical.append(f"last snapshot drill took {_minutes(snap_drill.restore_seconds)} "
                            f"to a queryable copy (RTO {self.rto_minutes:g}m)")
        if self.history.failing and self.history.last_failure is not None:
            failure = self.history.last_failure
            warning.append(f"last backup failed at {failure.at:%Y-%m-%d %H:%M}Z: "
                           f"{failure.error or 'unknown error'}")
        if self.drill is None:
            # A database with only provider snapshots is drilled through them.
            if warn_drill_age_days and (self.snapshot_drill is None or self.newest is not None):
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
            warning[:0] = [f"{plural(len(self.bad), 'backup')} cannot be trusted "
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
            **({"snapshots": self.snapshots, "newest_snapshot": _snapshot_json(
                self.newest_snapshot, now), "snapshot_rpo_met": now
                - self.newest_snapshot.started_at <= timedelta(hours=self.rpo_hours)}
               if self.newest_snapshot is not None else {}),
            **({"snapshot_last_drill": _drill_json(self.snapshot_drill, self.rto_minutes)}
               if self.snapshot_drill is not None else {}),
            **({"automated_backups": self.automated.to_json(now)}
               if self.automated is not None else {}),
            **({"provider_backups": self.provider_backups.to_json(now)}
               if self.provider_backups is not None else {}),
        }


def _drill_json(drill: Drill, rto_minutes: float) -> dict[str, Any]:
    seconds = drill.restore_seconds
    return {"backup_id": drill.backup_id, "level": drill.level,
            "finished_at": drill.finished_at.isoformat(), "passed": drill.passed,
            "restore_seconds": seconds, "failures": list(drill.failures),
            "rto_met": None if seconds is None else seconds <= rto_minutes * 60}


def _snapshot_json(manifest: Manifest, now: datetime) -> dict[str, Any]:
    facts = manifest.snapshot
    return {"id": manifest.id, "started_at": manifest.started_at.isoformat(),
            "finished_at": manifest.finished_at.isoformat(),
            "age_seconds": round((now - manifest.started_at).total_seconds(), 3),
            **({} if isinstance(facts, UnsetType) else
               {"provider": facts.provider, "region": facts.region,
                "snapshot_id": facts.snapshot_id, "source_id": facts.source_id,
                "copy_of": facts.copy_of,
                "engine_version": facts.engine_version, "size_gb": facts.size_gb})}


def _archive_json(archive: ArchiveStatus) -> dict[str, Any]:
    def when(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment else None

    return {"last_wal": archive.last_wal, "last_archived_at": when(archive.last_archived_at),
            "files": archive.files, "stored_bytes": archive.stored_bytes,
            "gaps": [list(gap) for gap in archive.gaps],
            "recoverable_from": when(archive.earliest_restore),
            "recoverable_to": when(archive.latest_restore),
            "backlog": {repo: {"files": files, "oldest_at": when(since)}
                        for repo, (files, since) in archive.backlog.items()},
            "push_failures_total": archive.failures.total,
            "last_push_failure": None if archive.failures.last_at is None else {
                "at": when(archive.failures.last_at), "wal": archive.failures.last_wal,
                "error": archive.failures.last_error},
            "failing": archive.failing}


@dataclasses.dataclass(frozen=True)
class ProviderBackups:
    """Physical backups a provider takes and lists but will not hand out (Supabase's):
    monitored beside pgvault's own, which stay the portable copy."""

    provider: str  # "supabase"
    source_id: str  # the project ref
    backups: int = 0  # completed physical backups listed
    newest: datetime | None = None
    pitr_enabled: bool = False
    pitr_earliest: datetime | None = None
    pitr_latest: datetime | None = None
    region: str = ""
    error: str | None = None  # why the provider could not be asked

    def problems(self, now: datetime, rpo_hours: float) -> list[str]:
        """What is wrong with them, one warning line each (none: all is well)."""
        what = f"{self.provider} {self.source_id}"
        if self.error is not None:
            return [f"{what}: its backups could not be listed: {self.error}"]
        if self.newest is None:
            return [f"{what}: no completed physical backup listed"]
        point = max(p for p in (self.newest, self.pitr_latest if self.pitr_enabled else None)
                    if p is not None)
        if now - point > timedelta(hours=rpo_hours):
            return [f"{what}: newest physical backup is {_hours(now - point)} old "
                    f"(RPO {rpo_hours:g}h)"]
        return []

    def to_json(self, now: datetime) -> dict[str, Any]:
        def when(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        return {"provider": self.provider, "source_id": self.source_id,
                "region": self.region, "backups": self.backups,
                "newest_backup_at": when(self.newest),
                "newest_backup_age_seconds": None if self.newest is None
                else round((now - self.newest).total_seconds(), 3),
                "pitr_enabled": self.pitr_enabled, "pitr_from": when(self.pitr_earliest),
                "pitr_to": when(self.pitr_latest), "error": self.error}


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f}h"


def _minutes(seconds: float | None) -> str:
    return f"{(seconds or 0) / 60:.1f}m"
