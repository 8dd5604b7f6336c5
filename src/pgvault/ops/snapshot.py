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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pgvault import __version__, retention
from pgvault.catalog import Catalog, manifest_key, snapshot_lock_key
from pgvault.engines.snapshots import (
    AVAILABLE,
    TAG_BACKUP_ID,
    TAG_DATABASE,
    TAG_MANAGED,
    ProviderSnapshot,
    SnapshotProvider,
    snapshot_name,
    wait_available,
)
from pgvault.errors import IntegrityError, NotFound, SnapshotFailed
from pgvault.lock import hold
from pgvault.model import Manifest, SnapshotFacts, backup_id_time, new_backup_id
from pgvault.retention import Candidate, Policy

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
                  clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Manifest:
    """Create a tagged manual snapshot, wait for it, and commit its manifest."""
    with hold(catalog.storage, snapshot_lock_key(database), "snapshot",
              stale_after=options.lock_stale_after, name=database):
        _, warning = quota_check(provider, options.quota)
        started = clock()
        backup_id = new_backup_id(started)
        name = snapshot_name(provider.source_id, backup_id)
        found = provider.create(name, {TAG_MANAGED: "true", TAG_DATABASE: database,
                                       TAG_BACKUP_ID: backup_id})
        if found.status != AVAILABLE:
            found = wait_available(provider, name, timeout=options.wait_timeout,
                                   poll=options.poll, sleep=options.sleep)
        manifest = Manifest(
            id=backup_id, kind="snapshot", database=database, started_at=started,
            finished_at=max(clock(), started), pgvault_version=__version__,
            tool_versions={found.engine or provider.kind: found.engine_version},
            artifacts=[], warnings=[warning] if warning else [],
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
