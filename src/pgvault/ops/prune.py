"""The prune use case: apply the retention policy per database and collect orphaned data.

A database whose lock is held (a backup is running) is skipped and named in
``PruneReport.skipped``; the other databases are still pruned, and the CLI exits 7.

Prune applies its plan at once (restic's ``forget --prune``, not WAL-G's dry run by
default): it runs from cron and after backups, where nobody is there to confirm. What a
careful operator would stop is refused instead, per database, in ``PruneReport.refused``,
unless ``force`` is given: a plan that removes more than half of a database's backups, and
any database with a damaged manifest (its backup's time and pin are unknown, so the plan
would be made on a listing that hides a backup; --force prunes the readable ones and leaves
the damaged one's objects alone). A plan that would leave no good backup is refused even
with ``force``. ``dry_run`` shows the plan, refusals included, and changes nothing.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pgvault import retention
from pgvault.catalog import Catalog, Orphan, lock_key, manifest_key
from pgvault.errors import IntegrityError, LockHeld, NotFound, UsageError
from pgvault.lock import hold
from pgvault.model import Manifest, backup_id_time
from pgvault.retention import Candidate, Duration, Policy
from pgvault.storage.base import Retaining, Storage

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
    """One backup in a plan: its time and the rules that keep it (none when removed), and
    for a removed one why it goes."""

    id: str
    time: datetime
    reasons: tuple[str, ...] = ()
    because: str = ""

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"id": self.id, "time": self.time.isoformat(),
                                 "reasons": list(self.reasons)}
        if self.because:
            found["because"] = self.because
        return found


@dataclass
class DatabasePlan:
    """The backups of one database that are kept and removed, newest first."""

    keep: list[Decision] = field(default_factory=list)
    remove: list[Decision] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    """Ids whose manifest cannot be read: never planned, never touched."""
    refused: str | None = None
    """Why nothing of this database was removed (the plan shows what would have been)."""


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
    extended: dict[str, datetime] = field(default_factory=dict)
    """Kept backups whose S3 Object Lock dates were extended, to the date their objects
    now have: when the slot keeping them may next let them go."""

    @property
    def refused(self) -> dict[str, str]:
        """Databases where nothing was removed, and why (``DatabasePlan.refused``)."""
        return {name: plan.refused for name, plan in self.databases.items() if plan.refused}

    def refusal(self) -> IntegrityError | UsageError | None:
        """The error a prune with refusals ends with: one line naming why and the flag."""
        refused = self.refused
        if not refused:
            return None
        damaged = any(self.databases[name].damaged for name in refused)
        kind = IntegrityError if damaged else UsageError
        if len(refused) == 1:
            ((name, why),) = refused.items()
            return kind(f"prune of {name} refused: {why}")
        return kind(f"prune refused for {len(refused)} databases ({', '.join(refused)}); "
                    "see above")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: databases -> keep/remove lists of {id, time, reasons}; orphans."""
        found: dict[str, Any] = {
            "databases": {
                name: {
                    "keep": [d.to_json() for d in plan.keep],
                    "remove": [d.to_json() for d in plan.remove],
                    **({"damaged": list(plan.damaged)} if plan.damaged else {}),
                    **({"refused": plan.refused} if plan.refused else {}),
                }
                for name, plan in self.databases.items()
            },
            "orphans": list(self.orphans),
        }
        if self.wal:  # only with physical backups
            found["wal"] = list(self.wal)
        if self.extended:  # only with S3 Object Lock
            found["extended"] = {bid: until.isoformat() for bid, until in self.extended.items()}
        if self.locked:  # only with S3 Object Lock
            found["locked"] = {bid: until.isoformat() for bid, until in self.locked.items()}
        return found

    def summary(self) -> str:
        """One line, e.g. "pruned app: 3 backups removed, 12 kept, 2 orphaned objects removed"."""
        verb = "would be removed" if self.dry_run else "removed"
        names = ", ".join(self.databases) or "nothing"
        done = [plan for plan in self.databases.values() if not plan.refused]
        removed = sum(len(plan.remove) for plan in done)
        kept = sum(len(plan.keep) for plan in done)
        line = (f"pruned {names}: {_count(removed, 'backup')} {verb}, {kept} kept, "
                f"{_count(len(self.orphans), 'orphaned object')} {verb}")
        if self.wal:
            line += f", {_count(len(self.wal), 'archived WAL file')} {verb}"
        if self.skipped:
            line += f"; skipped (locked): {', '.join(self.skipped)}"
        if self.refused:
            line += f"; refused: {', '.join(self.refused)}"
        if self.extended:
            line += f"; S3 Object Lock extended for {_count(len(self.extended), 'backup')}"
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
    force: bool = False,
) -> PruneReport:
    """Apply ``policy`` to every database (or only ``database``) and collect old orphans.

    For physical backups, ``recovery_window`` also keeps what restoring to any moment of
    that span before ``now`` needs, and archived WAL older than the start of the oldest
    kept base backup is removed (never WAL a kept base backup needs). ``force`` applies
    plans that would otherwise be refused (see the module's docstring).
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
                        hold(storage, lock_key(name), "prune", stale_after=lock_stale_after,
                             name=name)
                    )
                except LockHeld as exc:
                    report.skipped[name] = str(exc)
                    continue
            # Listed under the lock, so no backup of this database commits halfway through.
            _prune_database(catalog, name, policy, report, now, orphan_delay, recovery_window,
                            force)
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
    """Prune the database just backed up, as the setting ``prune_after_backup`` asks.

    Never forced: a refusal raises its error, which the backup job reports as a warning
    (the backup itself is stored).
    """
    report = prune(storage, policy, dry_run=False, now=now or datetime.now(UTC),
                   lock_stale_after=lock_stale_after, database=database,
                   recovery_window=recovery_window)
    refusal = report.refusal()
    if refusal is not None:
        raise refusal
    return report


def roles(manifests: Iterable[Manifest], policy: Policy,
          bad: Mapping[tuple[str, str], str] | None = None) -> dict[str, str]:
    """Per backup id, the rules that keep it ("daily,weekly", "pinned"), or "—" if pruned.

    ``bad`` (from ``Catalog.bad``) names backups known bad: they count for nothing.
    """
    by_database: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for manifest in manifests:
        # Each kind is its own series, as prune plans it (provider snapshots apart).
        by_database[manifest.database, manifest.kind].append(candidate(manifest, bad or {}))
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
    force: bool = False,
) -> None:
    listing = catalog.scan(name)
    bad = catalog.bad(name)
    # Provider snapshots are pruned by ops.snapshot, which deletes the provider's snapshot
    # before its manifest: deleting the manifest alone here would orphan a snapshot.
    manifests = {m.id: m for m in listing.manifests if m.kind != "snapshot"}
    result = report.databases.setdefault(name, DatabasePlan())
    result.damaged = [d.backup_id for d in listing.damaged]
    candidates = {i: candidate(m, bad) for i, m in manifests.items()}
    remove = []
    # Logical and physical backups under one name are separate series, each with its newest.
    for kind in sorted({m.kind for m in manifests.values()}):
        series = [m for m in manifests.values() if m.kind == kind]
        planned = retention.plan([candidates[m.id] for m in series], policy, now)
        window = (_window_keeps(series, recovery_window, now, policy.timezone)
                  if kind == "physical" and recovery_window is not None else set())
        if (not report.dry_run and isinstance(catalog.storage, Retaining)
                and catalog.storage.locking):
            _extend_locks(catalog.storage, [manifests[i] for i in planned.keep],
                          retention.earliest_removal([candidates[m.id] for m in series],
                                                     policy, planned, now), report)
        result.keep += [_decision(manifests[i], planned.reasons[i]) for i in planned.keep]
        result.keep += [_decision(manifests[i], ["recovery window"]) for i in planned.remove
                        if i in window]
        remove += [(i, planned.explain(i)) for i in planned.remove if i not in window]
    refusals = []
    if listing.damaged and not force:
        first = listing.damaged[0]
        refusals.append(f"{_count(len(listing.damaged), 'manifest')} damaged (backup "
                        f"{first.backup_id}: {first.reason}), so the plan would be made on "
                        f"a listing that hides a backup; repair or delete {first.key}, or "
                        "run prune --force to prune the others and leave it alone")
    caution = retention.caution(candidates.values(), [i for i, _ in remove])
    if caution is not None and not caution.forceable:
        refusals.append(caution.reason + "; nothing is removed")
    elif caution is not None and not force:
        refusals.append(caution.reason + "; check it with prune --dry-run, then apply it "
                        "with prune --force")
    result.refused = "; and ".join(refusals) or None
    if result.refused:
        result.remove = [_decision(manifests[i], [], because) for i, because in remove]
        _sort(result)
        return
    for backup_id, because in remove:
        current: Manifest | None = None
        if not report.dry_run:
            # Re-read just before deleting: a pin written since the listing must win.
            try:
                current = catalog.read(manifest_key(name, backup_id))
            except NotFound:
                current = None  # already gone; any data left is collected as an orphan
            except IntegrityError:
                # Damaged since the listing: what it holds is unknown now, so it stays.
                result.damaged.append(backup_id)
                continue
            if current is not None and current.pinned:
                result.keep.append(_decision(current, ["pinned"]))
                continue
        until = _locked_until(catalog, manifests[backup_id], now)
        if until is not None:
            # Deleting now would only hide it (a delete marker) while the data stays:
            # keep it listed, whole, until its retention ends.
            report.locked[backup_id] = until
            result.keep.append(_decision(manifests[backup_id],
                                         [f"object lock until {until:%Y-%m-%d %H:%M} UTC"]))
            continue
        if not report.dry_run and current is not None:
            catalog.delete(current)
        result.remove.append(_decision(manifests[backup_id], [], because))
    _sort(result)
    _prune_wal(catalog, name, [manifests[d.id] for d in result.keep if d.id in manifests],
               report)

    cutoff = now - orphan_delay
    for orphan in catalog.orphans(name):
        keys = [info.key for info in orphan.objects]
        if _expired(orphan, cutoff) and (report.dry_run or catalog.delete_orphan(orphan)):
            report.orphans.extend(keys)
        else:
            report.orphans_left.extend(keys)


def _sort(plan: DatabasePlan) -> None:
    plan.keep.sort(key=lambda d: (d.time.astimezone(UTC), d.id), reverse=True)
    plan.remove.sort(key=lambda d: (d.time.astimezone(UTC), d.id), reverse=True)


def candidate(manifest: Manifest, bad: Mapping[tuple[str, str], str]) -> Candidate:
    """The planner's view of a manifest: with its drill verdict and its parent (an
    incremental base backup's), so no plan keeps a backup without what it is built on."""
    parent = manifest.physical.parent if manifest.physical is not None else None
    return Candidate(manifest.id, manifest.time, manifest.pinned,
                      bad.get((manifest.database, manifest.id)),
                      parent if isinstance(parent, str) else None)


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


def _extend_locks(storage: Retaining, kept: list[Manifest], until: Mapping[str, datetime],
                  report: PruneReport) -> None:
    """Retain each kept backup's objects until its slot may next let it go (never sooner
    than they are retained now); the manifest last, as it was written."""
    for manifest in kept:
        date = until.get(manifest.id)
        if date is None:
            continue
        keys = [a.key for a in manifest.artifacts] + [manifest_key(manifest.database,
                                                                   manifest.id)]
        dates = [d for d in (storage.extend_retention(key, date) for key in keys) if d]
        if dates:
            report.extended[manifest.id] = min(dates)


def _locked_until(catalog: Catalog, manifest: Manifest, now: datetime) -> datetime | None:
    """When S3 Object Lock releases the whole backup: the latest date of its objects where
    pgvault locks (an extension or a changed rule can leave any of them the latest), else
    its manifest's (written last, so locked longest)."""
    storage = catalog.storage
    key = manifest_key(manifest.database, manifest.id)
    if isinstance(storage, Retaining) and storage.locking:
        dates = []
        for each in [key, *(a.key for a in manifest.artifacts)]:
            with contextlib.suppress(NotFound):  # gone already: nothing left to hold
                dates.append(storage.retained_until(each))
        latest = max((d for d in dates if d is not None), default=None)
    else:
        try:
            latest = storage.stat(key).locked_until
        except NotFound:
            return None
    return latest if latest is not None and latest > now else None


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


def _decision(manifest: Manifest, reasons: Iterable[str], because: str = "") -> Decision:
    return Decision(manifest.id, manifest.time, tuple(reasons), because)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
