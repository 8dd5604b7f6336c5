"""The prune use case: apply the retention policy per database and collect orphaned data.

A database whose lock is held (a backup is running) is skipped and named in
``PruneReport.skipped``; the other databases are still pruned, and the CLI exits 7.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pgvault import retention
from pgvault.catalog import Catalog, Orphan, manifest_key
from pgvault.errors import LockHeld, NotFound
from pgvault.lock import hold
from pgvault.model import Manifest, backup_id_time
from pgvault.retention import Duration, Policy
from pgvault.storage.base import Storage

__all__ = [
    "ORPHAN_DELAY",
    "DatabasePlan",
    "Decision",
    "Policy",
    "PruneReport",
    "prune",
    "prune_after_backup",
    "roles",
]

ORPHAN_DELAY = timedelta(hours=24)
"""How old orphaned data must be, by both clocks, before prune removes it."""


@dataclass(frozen=True)
class Decision:
    """One backup in a plan: its time and the rules that keep it (none when removed)."""

    id: str
    time: datetime
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time.isoformat(), "reasons": list(self.reasons)}


@dataclass
class DatabasePlan:
    """The backups of one database that are kept and removed, newest first."""

    keep: list[Decision] = field(default_factory=list)
    remove: list[Decision] = field(default_factory=list)


@dataclass
class PruneReport:
    """What prune removed (or would remove, in a dry run) and what it left alone."""

    dry_run: bool
    databases: dict[str, DatabasePlan] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)
    """Keys of orphaned data removed."""
    orphans_left: list[str] = field(default_factory=list)
    """Orphaned keys left alone: younger than the delay, or under an id pgvault never wrote."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Databases not pruned because their lock was held, with the holder named."""
    locked: dict[str, datetime] = field(default_factory=dict)
    """Backups due for removal but kept: S3 Object Lock retains them until this time."""
    wal: list[str] = field(default_factory=list)
    """Keys of archived WAL removed: older than the start of every kept base backup."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: databases -> keep/remove lists of {id, time, reasons}; orphans."""
        found: dict[str, Any] = {
            "databases": {
                name: {
                    "keep": [d.to_json() for d in plan.keep],
                    "remove": [d.to_json() for d in plan.remove],
                }
                for name, plan in self.databases.items()
            },
            "orphans": list(self.orphans),
        }
        if self.wal:  # only with physical backups
            found["wal"] = list(self.wal)
        if self.locked:  # only with S3 Object Lock
            found["locked"] = {bid: until.isoformat() for bid, until in self.locked.items()}
        return found

    def summary(self) -> str:
        """One line, e.g. "pruned app: 3 backups removed, 12 kept, 2 orphaned objects removed"."""
        verb = "would be removed" if self.dry_run else "removed"
        names = ", ".join(self.databases) or "nothing"
        removed = sum(len(plan.remove) for plan in self.databases.values())
        kept = sum(len(plan.keep) for plan in self.databases.values())
        line = (f"pruned {names}: {_count(removed, 'backup')} {verb}, {kept} kept, "
                f"{_count(len(self.orphans), 'orphaned object')} {verb}")
        if self.wal:
            line += f", {_count(len(self.wal), 'archived WAL file')} {verb}"
        if self.skipped:
            line += f"; skipped (locked): {', '.join(self.skipped)}"
        if self.locked:
            line += (f"; {_count(len(self.locked), 'backup')} kept under S3 Object Lock "
                     f"(until {max(self.locked.values()):%Y-%m-%d %H:%M} UTC at the latest)")
        return line


def prune(
    storage: Storage,
    policy: Policy,
    *,
    dry_run: bool,
    now: datetime,
    orphan_delay: timedelta = ORPHAN_DELAY,
    lock_stale_after: timedelta,
    database: str | None = None,
    recovery_window: Duration | None = None,
) -> PruneReport:
    """Apply ``policy`` to every database (or only ``database``) and collect old orphans.

    For physical backups, ``recovery_window`` also keeps what restoring to any moment of
    that span before ``now`` needs, and archived WAL older than the start of the oldest
    kept base backup is removed (never WAL a kept base backup needs).
    """
    catalog = Catalog(storage)
    report = PruneReport(dry_run=dry_run)
    if database is not None:
        names = {database}
    else:
        names = set(catalog.databases()) | {o.database for o in catalog.orphans()}
    for name in sorted(names):
        with contextlib.ExitStack() as stack:
            # A dry run changes nothing, so it takes no lock and works while a backup runs.
            if not dry_run:
                try:
                    stack.enter_context(
                        hold(storage, name, "prune", stale_after=lock_stale_after)
                    )
                except LockHeld as exc:
                    report.skipped[name] = str(exc)
                    continue
            # Listed under the lock, so no backup of this database commits halfway through.
            _prune_database(catalog, name, policy, report, now, orphan_delay, recovery_window)
    return report


def prune_after_backup(
    storage: Storage,
    policy: Policy,
    *,
    database: str,
    lock_stale_after: timedelta,
    now: datetime | None = None,
    recovery_window: Duration | None = None,
) -> PruneReport:
    """Prune the database just backed up, as the setting ``prune_after_backup`` asks."""
    return prune(storage, policy, dry_run=False, now=now or datetime.now(UTC),
                 lock_stale_after=lock_stale_after, database=database,
                 recovery_window=recovery_window)


def roles(manifests: Iterable[Manifest], policy: Policy) -> dict[str, str]:
    """Per backup id, the rules that keep it ("daily,weekly", "pinned"), or "—" if pruned."""
    by_database: dict[str, list[Manifest]] = defaultdict(list)
    for manifest in manifests:
        by_database[manifest.database].append(manifest)
    result: dict[str, str] = {}
    for backups in by_database.values():
        for backup_id, why in retention.plan(backups, policy).reasons.items():
            # "daily 3/7" -> "daily"; dict.fromkeys drops repeats and keeps the order.
            names = dict.fromkeys(reason.split(" ", 1)[0] for reason in why)
            result[backup_id] = ",".join(names) or "—"
    return result


def _prune_database(
    catalog: Catalog,
    name: str,
    policy: Policy,
    report: PruneReport,
    now: datetime,
    orphan_delay: timedelta,
    recovery_window: Duration | None = None,
) -> None:
    manifests = {m.id: m for m in catalog.list(name)}
    result = report.databases.setdefault(name, DatabasePlan())
    remove = []
    # Logical and physical backups under one name are separate series, each with its newest.
    for kind in sorted({m.kind for m in manifests.values()}):
        series = [m for m in manifests.values() if m.kind == kind]
        planned = retention.plan(series, policy, now)
        window = (_window_keeps(series, recovery_window, now, policy.timezone)
                  if kind == "physical" and recovery_window is not None else set())
        result.keep += [_decision(manifests[i], planned.reasons[i]) for i in planned.keep]
        result.keep += [_decision(manifests[i], ["recovery window"]) for i in planned.remove
                        if i in window]
        remove += [i for i in planned.remove if i not in window]
    for backup_id in remove:
        current: Manifest | None = None
        if not report.dry_run:
            # Re-read just before deleting: a pin written since the listing must win.
            try:
                current = catalog.read(manifest_key(name, backup_id))
            except NotFound:
                current = None  # already gone; any data left is collected as an orphan
            if current is not None and current.pinned:
                result.keep.append(_decision(current, ["pinned"]))
                continue
        until = _locked_until(catalog, name, backup_id, now)
        if until is not None:
            # Deleting now would only hide it (a delete marker) while the data stays:
            # keep it listed, whole, until its retention ends.
            report.locked[backup_id] = until
            result.keep.append(_decision(manifests[backup_id],
                                         [f"object lock until {until:%Y-%m-%d %H:%M} UTC"]))
            continue
        if not report.dry_run and current is not None:
            catalog.delete(current)
        result.remove.append(_decision(manifests[backup_id], []))
    result.keep.sort(key=lambda d: (d.time.astimezone(UTC), d.id), reverse=True)
    _prune_wal(catalog, name, [manifests[d.id] for d in result.keep if d.id in manifests],
               report)

    cutoff = now - orphan_delay
    for orphan in catalog.orphans(name):
        keys = [info.key for info in orphan.objects]
        if _expired(orphan, cutoff) and (report.dry_run or catalog.delete_orphan(orphan)):
            report.orphans.extend(keys)
        else:
            report.orphans_left.extend(keys)


def _window_keeps(series: list[Manifest], window: Duration, now: datetime,
                  timezone: str) -> set[str]:
    """Base backups a restore to any moment of the window needs: the newest one that ended
    before the window opened, and every later one."""
    from zoneinfo import ZoneInfo

    opens = window.before(now, ZoneInfo(timezone))
    ended = sorted((m for m in series if m.physical is not None),
                   key=lambda m: m.physical.stop_time if m.physical else m.finished_at)
    before = [m for m in ended if m.physical and m.physical.stop_time <= opens]
    return {m.id for m in ended if m not in before} | ({before[-1].id} if before else set())


def _prune_wal(catalog: Catalog, name: str, kept: list[Manifest], report: PruneReport) -> None:
    """Remove archived WAL older than the start of the oldest kept base backup of ``name``."""
    from pgvault.ops import wal as archive
    from pgvault.pg.wal import parse_lsn

    physical = [m.physical for m in kept if m.physical is not None]
    if not physical:
        return  # no base backup yet: every archived segment may still be needed
    oldest = min(physical, key=lambda facts: parse_lsn(facts.start_lsn))
    keys = [f.key for f in archive.prunable(catalog.storage, name, oldest.start_wal)]
    if keys and not report.dry_run:
        catalog.storage.delete(keys)
    report.wal.extend(keys)


def _locked_until(catalog: Catalog, database: str, backup_id: str,
                  now: datetime) -> datetime | None:
    """When S3 Object Lock releases the backup's manifest (written last, so locked longest)."""
    try:
        info = catalog.storage.stat(manifest_key(database, backup_id))
    except NotFound:
        return None
    if info.locked_until is not None and info.locked_until > now:
        return info.locked_until
    return None


def _expired(orphan: Orphan, cutoff: datetime) -> bool:
    """Older than ``cutoff`` by the id's start time and by every object's write time.

    Both must be old: a long backup still running elsewhere has an old id but fresh data,
    and a clock-skewed host can write an id from the future but the store dates the data.
    """
    started = backup_id_time(orphan.backup_id)
    # Data under an id pgvault never wrote is not ours to judge, so it is left alone.
    return (
        started is not None
        and started < cutoff
        and all(info.modified < cutoff for info in orphan.objects)
    )


def _decision(manifest: Manifest, reasons: Iterable[str]) -> Decision:
    return Decision(manifest.id, manifest.time, tuple(reasons))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
