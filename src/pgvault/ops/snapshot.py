"""Provider snapshots as backups: create and record, prune by the retention policy, audit.

A snapshot is recorded in the repository's catalog like any other backup: a manifest of
kind "snapshot" (no artifacts: the bytes stay with the provider) whose ``snapshot`` names
the provider's ids, engine version, size and times, so `list`, `status` and `check` see
it beside the logical and physical backups. Retention is ``retention.plan`` over the
snapshots pgvault created for this database (tagged ``pgvault:managed`` and
``pgvault:database``); a snapshot without those tags is never deleted, whatever its name.

The quota is the provider's: AWS allows 100 manual snapshots per region, counting every
one in the region. ``take_snapshot`` counts them first and refuses at the limit (a GFS
cycle that fails halfway through keeps neither the old nor the new set), and warns from
80% of it.

A copy into another region (``copy_snapshot``) is a backup of its own: a manifest whose
``snapshot`` names the destination region and the copy's id, at the source's time, so each
region's copies are pruned by that target's own policy exactly like the source region's
snapshots. AWS runs at most 5 copies into one region at a time: a copy waits, bounded, for
a slot instead of being refused halfway through a run.

A drill (``drill_snapshot``) restores the snapshot to a temporary instance tagged
``pgvault:drill`` with its owner (``leftovers.Owner``) and start time, times it until a
query answers (the snapshot path's RTO), runs a logical drill's checks against it and
deletes it whatever happens. A drill that was killed leaves its instance tagged: the next
snapshot or drill of that source deletes drill instances whose owner is provably dead or
that are older than ``drill_max_age``.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from pgvault import __version__, leftovers, logs, retention
from pgvault.catalog import Catalog, manifest_key, snapshot_lock_key
from pgvault.engines.snapshots import (
    AVAILABLE,
    TAG_BACKUP_ID,
    TAG_COPY_OF,
    TAG_DATABASE,
    TAG_DRILL,
    TAG_DRILL_STARTED,
    TAG_MANAGED,
    DrillInstance,
    DrillPlacement,
    ProviderSnapshot,
    SnapshotProvider,
    snapshot_name,
    wait_available,
    wait_for,
)
from pgvault.errors import DatabaseError, IntegrityError, NotFound, SnapshotFailed
from pgvault.health import SNAPSHOT_DRILL_WHERE
from pgvault.lock import hold
from pgvault.model import (
    Facts,
    Manifest,
    SnapshotFacts,
    VerifyCheck,
    VerifyReport,
    backup_id_time,
    new_backup_id,
)
from pgvault.retention import Candidate, Policy

if TYPE_CHECKING:
    from pgvault.ops.verify import VerifyOptions
    from pgvault.pg.conninfo import ConnInfo
    from pgvault.storage.base import Storage

log = logs.get("snapshot")

QUOTA_WARNING = 0.8
"""A snapshot that brings the region to this share of the quota is taken with a warning."""
ORPHAN_DELAY = timedelta(hours=24)
"""How old an unrecorded pgvault snapshot (its wait ran out) must be before prune deletes it."""


@dataclass(frozen=True)
class SnapshotOptions:
    """How long to wait for a snapshot, and the quota of manual snapshots in its region."""

    quota: int = 100
    wait_timeout: float = 3600.0
    poll: float = 15.0
    lock_stale_after: timedelta = timedelta(hours=12)
    sleep: Callable[[float], None] = time.sleep
    max_concurrent_copies: int = 5
    """Copies into one destination region at a time (AWS's default limit is 5)."""
    drill_max_age: timedelta = timedelta(hours=6)
    """A drill instance older than this is removed whoever owns it."""
    monotonic: Callable[[], float] = time.monotonic


def _describe(provider: SnapshotProvider) -> str:
    what = "cluster" if provider.kind == "aurora" else "instance"
    return f"{provider.kind} {what} {provider.source_id} ({provider.region})"


def quota_check(provider: SnapshotProvider, quota: int) -> tuple[int, str | None]:
    """The manual snapshots in the region now, and a warning if one more reaches 80% of
    ``quota``; SnapshotFailed when one more would exceed it."""
    count = provider.count_manual()
    if count >= quota:
        raise SnapshotFailed(
            f"refused: {count} manual {provider.kind} snapshots in {provider.region} reach "
            f"the quota of {quota}; nothing was created (prune with `pgvault snapshot "
            "prune`, delete snapshots pgvault did not make, or raise [snapshot] quota once "
            "AWS has raised it)")
    if count + 1 >= QUOTA_WARNING * quota:
        return count, (f"{count + 1} of {quota} manual {provider.kind} snapshots in "
                       f"{provider.region} are taken with this one (warning at "
                       f"{QUOTA_WARNING:.0%})")
    return count, None


def take_snapshot(provider: SnapshotProvider, catalog: Catalog, database: str,
                  options: SnapshotOptions, *,
                  clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                  facts: Callable[[], Facts] | None = None) -> Manifest:
    """Create a tagged manual snapshot, wait for it, and commit its manifest.

    ``facts`` reads the source's facts (row counts, schema, extensions, migrations) just
    before the snapshot is asked for, for its drills to compare; a failure to read them is
    a warning, never a lost snapshot.
    """
    with hold(catalog.storage, snapshot_lock_key(database), "snapshot",
              stale_after=options.lock_stale_after, name=database):
        _, warning = quota_check(provider, options.quota)
        warnings = [warning] if warning else []
        recorded = Facts()
        if facts is not None:
            try:
                recorded = facts()
            except Exception as exc:
                warnings.append(f"facts of the source not recorded for drills: {exc}")
        started = clock()
        backup_id = new_backup_id(started)
        name = snapshot_name(provider.source_id, backup_id)
        found = provider.create(name, {TAG_MANAGED: "true", TAG_DATABASE: database,
                                       TAG_BACKUP_ID: backup_id})
        if found.status != AVAILABLE:  # Neon names its snapshots itself: its id, not ours
            found = wait_available(provider, found.snapshot_id, timeout=options.wait_timeout,
                                   poll=options.poll, sleep=options.sleep)
        manifest = Manifest(
            id=backup_id, kind="snapshot", database=database, started_at=started,
            finished_at=max(clock(), started), pgvault_version=__version__,
            tool_versions={found.engine or provider.kind: found.engine_version},
            artifacts=[], facts=recorded, warnings=warnings,
            snapshot=_facts(provider, found))
        catalog.commit(manifest)
        return manifest


def _facts(provider: SnapshotProvider, found: ProviderSnapshot) -> SnapshotFacts:
    return SnapshotFacts(provider=provider.kind, region=provider.region,
                         snapshot_id=found.snapshot_id, arn=found.arn,
                         source_id=found.source_id or provider.source_id, engine=found.engine,
                         engine_version=found.engine_version, size_gb=found.size_gb,
                         encrypted=found.encrypted, created_at=found.created_at,
                         kms_key_id=found.kms_key_id)


@dataclass
class SnapshotPruneReport:
    """What snapshot prune deleted (or would, in a dry run) and what it kept, and why."""

    database: str
    provider: str
    dry_run: bool
    keep: list[tuple[Manifest, tuple[str, ...]]] = field(default_factory=list)
    remove: list[tuple[Manifest, str]] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    """pgvault-tagged snapshots that no manifest records, deleted (a wait that ran out)."""
    orphans_left: list[str] = field(default_factory=list)
    refused: str | None = None
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verb = "would be deleted" if self.dry_run else "deleted"
        line = (f"snapshots of {self.database} ({self.provider}): {len(self.remove)} {verb}, "
                f"{len(self.keep)} kept")
        if self.orphans:
            line += f", {len(self.orphans)} unrecorded pgvault snapshot(s) {verb}"
        if self.refused:
            line += f"; refused: {self.refused}"
        return line

    def to_json(self) -> dict[str, Any]:
        def snap(m: Manifest) -> str | None:
            return None if not isinstance(m.snapshot, SnapshotFacts) else m.snapshot.snapshot_id

        return {"database": self.database, "provider": self.provider, "dry_run": self.dry_run,
                "keep": [{"id": m.id, "time": m.time.isoformat(), "snapshot_id": snap(m),
                          "reasons": list(why)} for m, why in self.keep],
                "remove": [{"id": m.id, "time": m.time.isoformat(), "snapshot_id": snap(m),
                            "because": why} for m, why in self.remove],
                "orphans": list(self.orphans), "orphans_left": list(self.orphans_left),
                "refused": self.refused, "errors": list(self.errors)}


def ours(manifest: Manifest, provider: SnapshotProvider) -> bool:
    """A snapshot manifest of this provider's source."""
    facts = manifest.snapshot
    return (manifest.kind == "snapshot" and isinstance(facts, SnapshotFacts)
            and facts.provider == provider.kind and facts.source_id == provider.source_id
            and facts.region == provider.region)


def prune_snapshots(provider: SnapshotProvider, catalog: Catalog, database: str,
                    policy: Policy, *, now: datetime, dry_run: bool = False,
                    force: bool = False, lock_stale_after: timedelta = timedelta(hours=12),
                    orphan_delay: timedelta = ORPHAN_DELAY) -> SnapshotPruneReport:
    """Apply ``policy`` to the snapshots pgvault created of this source for ``database``.

    The plan is made over their manifests (their times are the backups' times); a manifest
    whose snapshot the provider no longer has counts for nothing (it is removed unless
    pinned). Only snapshots tagged as pgvault's for ``database`` are ever deleted.
    """
    report = SnapshotPruneReport(database, _describe(provider), dry_run)
    with contextlib.ExitStack() as stack:
        if not dry_run:
            stack.enter_context(hold(catalog.storage, snapshot_lock_key(database),
                                     "snapshot-prune", stale_after=lock_stale_after,
                                     name=database))
        tagged = {s.snapshot_id: s for s in provider.list_ours(database)}
        manifests = {m.id: m for m in catalog.list(database) if ours(m, provider)}
        candidates = []
        for m in manifests.values():
            assert isinstance(m.snapshot, SnapshotFacts)
            gone = None if m.snapshot.snapshot_id in tagged else (
                f"{provider.kind} no longer has snapshot {m.snapshot.snapshot_id}")
            candidates.append(Candidate(m.id, m.time, m.pinned, gone))
        planned = retention.plan(candidates, policy, now)
        caution = retention.caution(candidates, planned.remove)
        if caution is not None and (not caution.forceable or not force):
            report.refused = caution.reason + ("" if not caution.forceable else
                                               "; check it with --dry-run, then --force")
        for backup_id in planned.keep:
            report.keep.append((manifests[backup_id], tuple(planned.reasons[backup_id])))
        for backup_id in planned.remove:
            manifest = manifests[backup_id]
            if report.refused or dry_run:
                report.remove.append((manifest, planned.explain(backup_id)))
                continue
            try:  # a pin written since the listing must win
                manifest = catalog.read(manifest_key(database, backup_id))
            except NotFound:
                continue
            except IntegrityError:
                report.errors.append(f"{backup_id}: manifest damaged since the listing: kept")
                continue
            if manifest.pinned:
                report.keep.append((manifest, ("pinned",)))
                continue
            assert isinstance(manifest.snapshot, SnapshotFacts)
            snapshot = tagged.get(manifest.snapshot.snapshot_id)
            try:
                # Deleted at the provider first: a manifest never outlives a snapshot it
                # still names, so a failure leaves both, and the next prune tries again.
                if snapshot is not None and snapshot.ours(database):
                    provider.delete(snapshot.snapshot_id)
            except SnapshotFailed as exc:
                report.errors.append(str(exc))
                continue
            catalog.delete(manifest)
            report.remove.append((manifest, planned.explain(backup_id)))
        recorded = {m.snapshot.snapshot_id for m in manifests.values()
                    if isinstance(m.snapshot, SnapshotFacts)}
        for snapshot in tagged.values():
            if snapshot.snapshot_id in recorded or report.refused or not snapshot.ours(database):
                continue
            made = backup_id_time(snapshot.backup_id or "")
            if made is None or now - made < orphan_delay:
                report.orphans_left.append(snapshot.snapshot_id)
                continue
            if not dry_run:
                try:
                    provider.delete(snapshot.snapshot_id)
                except SnapshotFailed as exc:
                    report.errors.append(str(exc))
                    continue
            report.orphans.append(snapshot.snapshot_id)
    report.keep.sort(key=lambda item: item[0].time, reverse=True)
    report.remove.sort(key=lambda item: item[0].time, reverse=True)
    return report


def expected_retention_days(policy: Policy, configured: int | None) -> int:
    """The automated backups' retention the policy asks: its daily count, at most 35."""
    if configured is not None:
        return configured
    daily = policy.daily
    return 35 if daily == retention.UNLIMITED else min(35, max(daily, 1))


def source_facts(conn: ConnInfo) -> Facts:
    """The source's facts as a logical backup records them, read in one snapshot."""
    from pgvault.engines.logical import LogicalEngine

    engine = LogicalEngine(conn)
    with engine.snapshot() as snapshot:
        return engine.facts(snapshot)


# -- copies into other regions ------------------------------------------------------------

@dataclass(frozen=True)
class CopyTarget:
    """A destination region: its provider, its KMS key and its own retention policy."""

    provider: SnapshotProvider
    kms_key_id: str | None
    policy: Policy


def wait_copy_slot(provider: SnapshotProvider, options: SnapshotOptions) -> int:
    """Wait until fewer than ``max_concurrent_copies`` snapshots are being made in the
    destination region; the count seen last. SnapshotFailed past ``wait_timeout``."""
    deadline = options.monotonic() + options.wait_timeout
    while True:
        busy = provider.in_progress()
        if busy < options.max_concurrent_copies:
            return busy
        left = deadline - options.monotonic()
        if left <= 0:
            raise SnapshotFailed(
                f"no copy slot in {provider.region} after {options.wait_timeout:g} s: "
                f"{busy} snapshots are being made there (limit {options.max_concurrent_copies},"
                " [snapshot] max_concurrent_copies)")
        options.sleep(min(options.poll, left))


def copy_snapshot(source: Manifest, target: CopyTarget, catalog: Catalog,
                  options: SnapshotOptions, *,
                  clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Manifest:
    """Copy the snapshot ``source`` records into the target's region and commit the copy's
    manifest (the source's time and facts, the destination's ids)."""
    facts = source.snapshot
    assert isinstance(facts, SnapshotFacts)
    dest = target.provider
    database = source.database
    with hold(catalog.storage, snapshot_lock_key(database), "snapshot-copy",
              stale_after=options.lock_stale_after, name=database):
        _, warning = quota_check(dest, options.quota)
        wait_copy_slot(dest, options)
        backup_id = new_backup_id(source.started_at)
        name = snapshot_name(dest.source_id, backup_id)
        origin = ProviderSnapshot(facts.snapshot_id, facts.arn, facts.source_id, AVAILABLE,
                                  kms_key_id=facts.kms_key_id)
        found = dest.copy_from(origin, name, {TAG_MANAGED: "true", TAG_DATABASE: database,
                                              TAG_BACKUP_ID: backup_id, TAG_COPY_OF: facts.arn},
                               target.kms_key_id)
        if found.status != AVAILABLE:
            found = wait_available(dest, found.snapshot_id, timeout=options.wait_timeout,
                                   poll=options.poll, sleep=options.sleep)
        manifest = Manifest(
            id=backup_id, kind="snapshot", database=database, started_at=source.started_at,
            finished_at=max(clock(), source.started_at), pgvault_version=__version__,
            tool_versions=dict(source.tool_versions), artifacts=[], facts=source.facts,
            warnings=[warning] if warning else [],
            snapshot=msgspec.structs.replace(_facts(dest, found), copy_of=source.id))
        catalog.commit(manifest)
        return manifest


# -- one run: sweep, snapshot, copies, prune ---------------------------------------------

@dataclass
class SnapshotRun:
    """What one `pgvault snapshot` run of a database did."""

    manifest: Manifest
    copies: list[Manifest] = field(default_factory=list)
    copy_errors: list[str] = field(default_factory=list)
    prunes: list[SnapshotPruneReport] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)


def snapshot_run(provider: SnapshotProvider, catalog: Catalog, database: str,
                 options: SnapshotOptions, *, copies: tuple[CopyTarget, ...] = (),
                 policy: Policy | None = None,
                 facts: Callable[[], Facts] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> SnapshotRun:
    """Remove dead drills' instances, snapshot, copy to each target, then (with a policy)
    prune the source region and each target by its own policy.

    A copy that fails is reported, not raised: the snapshot is taken and recorded, and the
    other targets still get theirs.
    """
    swept = sweep_drills(provider, now=clock(), max_age=options.drill_max_age)
    manifest = take_snapshot(provider, catalog, database, options, clock=clock, facts=facts)
    run = SnapshotRun(manifest, swept=swept)
    for target in copies:
        try:
            run.copies.append(copy_snapshot(manifest, target, catalog, options, clock=clock))
        except SnapshotFailed as exc:
            run.copy_errors.append(f"copy to {target.provider.region}: {exc}")
    if policy is not None:
        now = clock()
        run.prunes.append(prune_snapshots(provider, catalog, database, policy, now=now,
                                          lock_stale_after=options.lock_stale_after))
        for target in copies:
            run.prunes.append(prune_snapshots(target.provider, catalog, database,
                                              target.policy, now=now,
                                              lock_stale_after=options.lock_stale_after))
    return run


# -- drills -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DrillOptions:
    """How a snapshot drill places, waits for and reaches its temporary instance."""

    verify: VerifyOptions
    connect: Callable[[DrillInstance], ConnInfo]
    """The connection the checks use for the restored instance (the database's own URL
    with the instance's endpoint; tests point it at a local server: moto's is fake)."""
    placement: DrillPlacement = field(default_factory=DrillPlacement)
    wait_timeout: float = 3600.0
    poll: float = 15.0
    max_age: timedelta = timedelta(hours=6)
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic


def drill_name(source_id: str) -> str:
    """A temporary instance's identifier: letters, digits, single hyphens, at most 60
    (Aurora's instance adds "-1" to the cluster's 63)."""
    name = f"pgvault-drill-{source_id.lower()}"[:50].rstrip("-")
    name = "".join(c if c.isalnum() else "-" for c in name)
    while "--" in name:
        name = name.replace("--", "-")
    return f"{name}-{secrets.token_hex(3)}"


def _owner(token: str | None) -> leftovers.Owner | None:
    try:
        pid, start, host = (token or "").split(".", 2)
        return leftovers.Owner(int(pid), int(start), host)
    except ValueError:
        return None


def sweep_drills(provider: SnapshotProvider, *, now: datetime,
                 max_age: timedelta) -> list[str]:
    """Delete drill instances of this region whose owner is provably dead (a killed drill
    of this host) or that are older than ``max_age``; their names. Never raises: a
    provider that refuses leaves them for the next run."""
    removed = []
    try:
        found = provider.list_drills()
    except SnapshotFailed as exc:
        log.warning("could not list drill instances: %s", exc)
        return []
    for drill in found:
        if drill.status == "deleting":
            continue
        owner = _owner(drill.tags.get(TAG_DRILL))
        try:
            started: datetime | None = datetime.fromisoformat(drill.tags[TAG_DRILL_STARTED])
        except (KeyError, ValueError):
            started = None
        dead = owner is not None and owner.dead()
        old = started is None or now - started > max_age
        if not (dead or old):
            continue
        try:
            provider.delete_drill(drill.name)
        except SnapshotFailed as exc:
            log.warning("could not delete drill instance %s: %s", drill.name, exc)
            continue
        why = "its drill died" if dead else f"older than {max_age}"
        log.warning("deleted the drill instance %s (%s)", drill.name, why)
        removed.append(drill.name)
    return removed


def wait_drill(provider: SnapshotProvider, name: str, options: DrillOptions) -> DrillInstance:
    """Poll until the temporary instance is available; SnapshotFailed past the bound."""
    return wait_for(lambda: provider.describe_drill(name), f"drill instance {name}",
                    timeout=options.wait_timeout, poll=options.poll, sleep=options.sleep,
                    monotonic=options.monotonic)


def wait_queryable(target: ConnInfo, options: DrillOptions, deadline: float) -> None:
    """Until ``SELECT 1`` answers on the restored copy (DNS and the first connection can lag
    the "available" status); DatabaseError with the last reason past ``deadline``."""
    while True:
        try:
            with target.connect(connect_timeout=10) as conn:
                conn.execute("SELECT 1")
            return
        except DatabaseError as exc:
            left = deadline - options.monotonic()
            if left <= 0:
                raise DatabaseError(f"the restored copy never answered a query: {exc}") \
                    from None
            options.sleep(min(options.poll, left))


def drill_snapshot(provider: SnapshotProvider, storage: Storage, manifest: Manifest,
                   options: DrillOptions) -> VerifyReport:
    """Restore ``manifest``'s snapshot to a temporary instance, time it to a queryable copy
    (the RTO), check it as a logical drill would, and delete the instance in any case."""
    from pgvault.ops.verify import check_restored

    verify = options.verify
    facts = manifest.snapshot
    assert isinstance(facts, SnapshotFacts)
    report = VerifyReport(backup_id=manifest.id, database=manifest.database, level=verify.level,
                          started_at=verify.clock(), finished_at=verify.clock(),
                          rto_objective_seconds=verify.rto_objective_seconds,
                          pgvault_version=__version__,
                          where=f"{SNAPSHOT_DRILL_WHERE} {facts.snapshot_id} ({provider.region})")

    def check(level: str, name: str, ok: bool | None, detail: str) -> None:
        status: Literal["pass", "fail", "skip"] = (
            "skip" if ok is None else "pass" if ok else "fail")
        found = VerifyCheck(level=level, name=name, status=status, detail=detail)
        report.checks.append(found)
        if verify.on_check is not None:
            verify.on_check(found)

    sweep_drills(provider, now=report.started_at, max_age=options.max_age)
    try:
        found = provider.describe(facts.snapshot_id)
    except SnapshotFailed as exc:
        found = None
        check("integrity", "snapshot", False, str(exc))
    if found is None and not report.checks:
        check("integrity", "snapshot", False, f"{provider.kind} has no snapshot "
              f"{facts.snapshot_id} in {provider.region} any more")
    elif found is not None:
        check("integrity", "snapshot", found.status == AVAILABLE,
              f"{found.snapshot_id} is {found.status}, {found.size_gb} GiB, "
              f"{found.engine} {found.engine_version}")
    if report.passed and verify.includes("restore"):
        _restore_and_check(provider, storage, manifest, facts, options, report, check,
                           check_restored)
    report.finished_at = verify.clock()
    if verify.record:
        Catalog(storage).record_drill(report)
    return report


def _restore_and_check(provider: SnapshotProvider, storage: Storage, manifest: Manifest,
                       facts: SnapshotFacts, options: DrillOptions, report: VerifyReport,
                       check: Callable[[str, str, bool | None, str], None],
                       check_restored: Callable[..., None]) -> None:
    verify = options.verify
    name = drill_name(provider.source_id)
    what = "cluster" if provider.kind == "aurora" else "instance"
    tags = {TAG_MANAGED: "true", TAG_DATABASE: manifest.database, TAG_BACKUP_ID: manifest.id,
            TAG_DRILL: leftovers.me().token(),
            TAG_DRILL_STARTED: report.started_at.astimezone(UTC).isoformat()}
    begun = options.monotonic()
    try:
        try:
            provider.restore_drill(facts.snapshot_id, name, tags, options.placement)
            instance = wait_drill(provider, name, options)
            target = options.connect(instance)
            wait_queryable(target, options, begun + options.wait_timeout)
        except (SnapshotFailed, DatabaseError) as exc:
            check("restore", "restore", False, str(exc))
            return
        seconds = options.monotonic() - begun
        report.restore_seconds = round(seconds, 3)
        report.where = (f"{SNAPSHOT_DRILL_WHERE} {facts.snapshot_id} restored to temporary "
                        f"{provider.kind} {what} {name} ({provider.region})")
        check("restore", "restore", True, f"restored to {provider.kind} {what} {name} and "
              f"answering queries in {_seconds(seconds)}")
        objective = verify.rto_objective_seconds
        report.rto_met = seconds <= objective
        check("restore", "rto", report.rto_met, f"time to a queryable copy "
              f"{_seconds(seconds)}, objective {_seconds(objective)}")
        check_restored(storage, manifest, target, verify, report)
    finally:
        # Whatever happened (a failed check, an error, Ctrl-C): the instance costs money.
        try:
            gone = provider.delete_drill(name)
            check("restore", "cleanup", True, f"temporary {what} {name} "
                  + ("deleted" if gone else "was already gone"))
        except SnapshotFailed as exc:
            check("restore", "cleanup", False, f"temporary {what} {name} left (tagged "
                  f"{TAG_DRILL}; the next run deletes it): {exc}")


def _seconds(seconds: float) -> str:
    from pgvault.console import human_seconds

    return human_seconds(seconds)
