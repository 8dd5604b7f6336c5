"""Provider snapshots of a managed database: what pgvault asks of any provider.

A provider (``engines.rds`` for RDS and Aurora) creates a manual snapshot with pgvault's
tags, describes one, lists the ones pgvault made of its source, counts the manual snapshots
of the region (the provider's quota counts every one, not only pgvault's), deletes one,
and reports its own automated backups. Opened for another region it copies a snapshot
there with that region's KMS key; for a drill it restores a snapshot to a temporary
instance (or cluster) tagged as pgvault's drill, describes its endpoint, lists the drill
instances of the region and deletes one. The use case (``ops.snapshot``) decides the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

from pgvault.errors import SnapshotFailed
from pgvault.health import AutomatedBackups

TAG_MANAGED = "pgvault:managed"
"""Every snapshot pgvault creates carries it ("true"); retention touches no other."""
TAG_DATABASE = "pgvault:database"
"""The database name the snapshot is recorded under in the repository."""
TAG_BACKUP_ID = "pgvault:backup-id"
"""The id of the manifest that records it."""
TAG_COPY_OF = "pgvault:copy-of"
"""On a cross-region copy: the ARN of the snapshot it copies."""
TAG_DRILL = "pgvault:drill"
"""On a drill's temporary instance or cluster: its owner (leftovers.Owner token)."""
TAG_DRILL_STARTED = "pgvault:drill-started"
"""When the drill that made it started (ISO 8601, UTC)."""

AVAILABLE = "available"
FAILED = ("failed", "incompatible-restore", "incompatible-parameters", "deleting")
IN_PROGRESS = ("creating", "copying", "pending")
"""A snapshot in one of these states still counts against the region's copy limit."""


@dataclass(frozen=True)
class ProviderSnapshot:
    """One snapshot as the provider describes it."""

    snapshot_id: str
    arn: str
    source_id: str
    status: str
    engine: str = ""
    engine_version: str = ""
    size_gb: int = 0
    encrypted: bool = False
    kms_key_id: str | None = None
    created_at: datetime | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def ours(self, database: str) -> bool:
        """Created by pgvault for ``database``: the only snapshots retention may delete."""
        return (self.tags.get(TAG_MANAGED) == "true"
                and self.tags.get(TAG_DATABASE) == database)

    @property
    def backup_id(self) -> str | None:
        return self.tags.get(TAG_BACKUP_ID)


@dataclass(frozen=True)
class DrillPlacement:
    """Where a drill's temporary instance runs: small, private, in the configured network."""

    instance_class: str | None = None  # None: the provider's smallest
    subnet_group: str | None = None
    security_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class DrillInstance:
    """A drill's temporary instance (or cluster) as the provider describes it."""

    name: str
    status: str
    host: str | None = None
    port: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


class SnapshotProvider(Protocol):
    """The calls pgvault makes of a snapshot provider (RDS, Aurora)."""

    @property
    def kind(self) -> str: ...

    @property
    def region(self) -> str: ...

    @property
    def source_id(self) -> str: ...

    def create(self, snapshot_id: str, tags: Mapping[str, str]) -> ProviderSnapshot: ...

    def describe(self, snapshot_id: str) -> ProviderSnapshot | None:
        """The snapshot, or None when it does not exist."""
        ...

    def list_ours(self, database: str) -> list[ProviderSnapshot]:
        """Manual snapshots of the source that pgvault created for ``database``."""
        ...

    def count_manual(self) -> int:
        """Every manual snapshot of this kind in the region, whoever made it."""
        ...

    def delete(self, snapshot_id: str) -> bool:
        """Delete one; False if it was already gone."""
        ...

    def automated_backups(self, expected_retention_days: int) -> AutomatedBackups: ...

    def in_progress(self) -> int:
        """Manual snapshots of this kind in the region still being created or copied."""
        ...

    def copy_from(self, source: ProviderSnapshot, snapshot_id: str, tags: Mapping[str, str],
                  kms_key_id: str | None) -> ProviderSnapshot:
        """Copy ``source`` (of another region) into this provider's region."""
        ...

    def restore_drill(self, snapshot_id: str, name: str, tags: Mapping[str, str],
                      placement: DrillPlacement) -> None:
        """Restore a snapshot to a temporary instance (Aurora: cluster plus one instance)."""
        ...

    def describe_drill(self, name: str) -> DrillInstance | None: ...

    def list_drills(self) -> list[DrillInstance]:
        """Every drill instance (or cluster) tagged as pgvault's in the region."""
        ...

    def delete_drill(self, name: str) -> bool:
        """Delete a drill's temporary instance (and cluster), no final snapshot; False if
        it was already gone."""
        ...


def snapshot_name(source_id: str, backup_id: str) -> str:
    """A snapshot identifier RDS accepts (a letter first, letters, digits and single
    hyphens, at most 255), unique per backup id: pgvault-<source>-<id>."""
    tail = "".join(c if c.isalnum() else "-" for c in backup_id.lower())
    name = f"pgvault-{source_id.lower()}-{tail}"
    while "--" in name:
        name = name.replace("--", "-")
    return name.strip("-")[:255].rstrip("-")


class _Status(Protocol):
    @property
    def status(self) -> str: ...


S = TypeVar("S", bound=_Status)


def wait_for(describe: Callable[[], S | None], what: str, *, timeout: float, poll: float,
             sleep: Callable[[float], None] = time.sleep,
             monotonic: Callable[[], float] = time.monotonic, late: str = "") -> S:
    """Poll ``describe`` until what it finds is available; SnapshotFailed when it is gone,
    has failed, or is still not available after ``timeout`` s (``late`` says what then)."""
    deadline = monotonic() + timeout
    while True:
        found = describe()
        if found is None:
            raise SnapshotFailed(f"{what} disappeared while pgvault waited for it")
        if found.status == AVAILABLE:
            return found
        if found.status in FAILED:
            raise SnapshotFailed(f"{what} failed (status {found.status!r})")
        left = deadline - monotonic()
        if left <= 0:
            raise SnapshotFailed(f"{what} was not available after {timeout:g} s (status "
                                 f"{found.status!r}){late}")
        sleep(min(poll, left))


def wait_available(provider: SnapshotProvider, snapshot_id: str, *, timeout: float,
                   poll: float, sleep: Callable[[float], None] = time.sleep,
                   monotonic: Callable[[], float] = time.monotonic) -> ProviderSnapshot:
    """Poll until the snapshot is available; SnapshotFailed past ``timeout`` seconds or
    when the provider says it failed."""
    return wait_for(lambda: provider.describe(snapshot_id),
                    f"{provider.kind} snapshot {snapshot_id}", timeout=timeout, poll=poll,
                    sleep=sleep, monotonic=monotonic,
                    late="; it is not recorded, and `pgvault snapshot prune` deletes it once "
                         "it is a day old ([snapshot] wait_timeout_seconds)")
