"""The Prometheus view of pgvault: per-database state from the repository, process counters.

Values come from ``DatabaseStatus`` (read from the repository), so a textfile written
after a failed cron run still carries the last success, and the daemon's /metrics agrees
with `pgvault status`. No backup id is ever a label: one series per database.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from pgvault.health import DatabaseStatus

NextRuns = Callable[[], dict[tuple[str, str], datetime]]
"""(database, job) -> when the daemon runs that job next."""


class Metrics:
    """A prometheus_client collector over the latest status of each database."""

    def __init__(self, *, repository_label: bool = False) -> None:
        from prometheus_client import CollectorRegistry

        self.repository_label = repository_label
        self._lock = threading.Lock()
        self._statuses: dict[tuple[str, str], DatabaseStatus] = {}
        self._notification_failures: Counter[tuple[str, str]] = Counter()
        self.next_runs: NextRuns | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def update(self, status: DatabaseStatus) -> None:
        """Replace what is known about ``status.database`` (in ``status.repository``)."""
        with self._lock:
            self._statuses[(status.repository, status.database)] = status

    def statuses(self) -> list[DatabaseStatus]:
        with self._lock:
            return list(self._statuses.values())

    def notification_failed(self, database: str, sink: str) -> None:
        with self._lock:
            self._notification_failures[(database, sink)] += 1

    def describe(self) -> list[Any]:
        return []

    def collect(self, only: str | None = None) -> Iterator[Any]:
        """Every metric family; ``only`` limits the per-database ones to that database."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["database", "repository"] if self.repository_label else ["database"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        families = {
            "success": gauge("pgvault_backup_last_success_timestamp_seconds",
                             "When the newest complete backup finished (0: never)."),
            "failure": gauge("pgvault_backup_last_failure_timestamp_seconds",
                             "When the last failed backup run ended (0: never)."),
            "duration": gauge("pgvault_backup_last_duration_seconds",
                              "How long the newest complete backup took."),
            "size": gauge("pgvault_backup_last_size_bytes",
                          "Stored size of the newest complete backup."),
            "backups": gauge("pgvault_backups", "Complete backups in the repository."),
            "oldest": gauge("pgvault_oldest_backup_timestamp_seconds",
                            "Recovery point of the oldest complete backup."),
            "verify_success": gauge("pgvault_verify_last_success_timestamp_seconds",
                                    "When the newest passing restore drill finished."),
            "verify_status": gauge("pgvault_verify_last_status",
                                   "1 if the newest restore drill passed, 0 if it failed."),
            "restore": gauge("pgvault_restore_last_duration_seconds",
                             "Restore time of the newest drill: the measured RTO."),
            "rpo": gauge("pgvault_rpo_objective_seconds", "The RPO objective."),
            "rto": gauge("pgvault_rto_objective_seconds", "The RTO objective."),
            "wal_last": gauge("pgvault_wal_last_archived_timestamp_seconds",
                              "When the newest WAL segment was archived (physical clusters)."),
            "wal_gaps": gauge("pgvault_wal_archive_gaps",
                              "Holes in the archived WAL; point-in-time recovery cannot "
                              "cross them."),
            "recoverable_from": gauge("pgvault_recoverable_from_timestamp_seconds",
                                      "Earliest moment a point-in-time restore can reach."),
            "recoverable_to": gauge("pgvault_recoverable_to_timestamp_seconds",
                                    "Latest moment a point-in-time restore can reach."),
            "wal_failures": gauge("pgvault_wal_push_failures",
                                  "Failed wal-push runs recorded in the repository."),
            "wal_failure": gauge("pgvault_wal_push_last_failure_timestamp_seconds",
                                 "When the last wal-push failed (0: never)."),
            "snapshot_success": gauge("pgvault_snapshot_last_success_timestamp_seconds",
                                      "When the newest provider snapshot was taken."),
            "snapshots": gauge("pgvault_snapshots", "Provider snapshots recorded (every "
                               "region)."),
            "snapshot_failure": gauge("pgvault_snapshot_last_failure_timestamp_seconds",
                                      "When the last failed snapshot run ended (0: never)."),
            "snapshot_restore": gauge("pgvault_snapshot_restore_last_duration_seconds",
                                      "Time to a queryable copy in the newest snapshot drill: "
                                      "the snapshot path's RTO."),
        }
        failures = CounterMetricFamily("pgvault_backup_failures", "Failed backup runs.",
                                       labels=labels)
        backlog = GaugeMetricFamily("pgvault_wal_backlog_files", "WAL files a WAL repository "
                                    "([[repos]] target) lacks that this one holds.",
                                    labels=[*labels, "target"])
        behind = GaugeMetricFamily("pgvault_wal_backlog_oldest_age_seconds",
                                   "How long ago the oldest of them was left behind.",
                                   labels=[*labels, "target"])
        copies = {
            "behind": GaugeMetricFamily(
                "pgvault_copy_behind_backups", "Backups a [[repos]] copy's own policy keeps "
                "that it lacks (a copy that cannot be read: the backups since its last "
                "successful copy).", labels=[*labels, "target"]),
            "up": GaugeMetricFamily(
                "pgvault_copy_up", "1 if the copy could be read, 0 if not.",
                labels=[*labels, "target"]),
            "missing_age": GaugeMetricFamily(
                "pgvault_copy_newest_missing_age_seconds", "How old the newest backup the "
                "copy lacks is (0: none missing).", labels=[*labels, "target"]),
            "objective": GaugeMetricFamily(
                "pgvault_copy_lag_objective_seconds", "How old a missing backup may get.",
                labels=[*labels, "target"]),
            "newest": GaugeMetricFamily(
                "pgvault_copy_newest_backup_timestamp_seconds", "When the copy's newest "
                "backup started (0: none).", labels=[*labels, "target"]),
            "error": GaugeMetricFamily(
                "pgvault_copy_last_error_timestamp_seconds", "When the last copy run to "
                "it failed, unless a later one succeeded (0: none).",
                labels=[*labels, "target"]),
        }
        for status in self.statuses():
            if only is not None and status.database != only:
                continue
            values = [status.database, status.repository][: len(labels)]
            for state in status.copies:
                where = [*values, state.name]
                now = datetime.now(UTC)
                copies["behind"].add_metric(where, float(state.behind or 0))
                copies["up"].add_metric(where, 0.0 if state.unreadable else 1.0)
                copies["missing_age"].add_metric(where, 0.0 if state.newest_missing is None
                                                 else max(0.0, (now - state.newest_missing)
                                                          .total_seconds()))
                copies["objective"].add_metric(where, state.objective.total_seconds())
                copies["newest"].add_metric(where, state.newest.timestamp() if state.newest
                                            else 0.0)
                copies["error"].add_metric(where, state.last_error_at.timestamp()
                                           if state.last_error_at else 0.0)
            for key, value in _gauge_values(status):
                families[key].add_metric(values, value)
            failures.add_metric(values, status.history.failures_total)
            for target, (files, since) in (status.archive.backlog if status.archive
                                           else {}).items():
                backlog.add_metric([*values, target], float(files))
                behind.add_metric([*values, target], 0.0 if since is None else
                                  max(0.0, (datetime.now(since.tzinfo) - since)
                                      .total_seconds()))
        yield from families.values()
        yield failures
        yield backlog
        yield behind
        yield from copies.values()
        notified = CounterMetricFamily("pgvault_notification_failures",
                                       "Notifications that failed or timed out.",
                                       labels=["database", "sink"])
        with self._lock:
            counts = dict(self._notification_failures)
        for (database, sink), count in sorted(counts.items()):
            if only is None or database == only:
                notified.add_metric([database, sink], count)
        yield notified
        if self.next_runs is not None:
            runs = GaugeMetricFamily("pgvault_schedule_next_run_timestamp_seconds",
                                     "When the daemon runs each job next.",
                                     labels=["database", "job"])
            for (database, job), when in sorted(self.next_runs().items()):
                if only is None or database == only:
                    runs.add_metric([database, job], when.timestamp())
            yield runs

    def render(self) -> bytes:
        """The text exposition format, as /metrics serves it."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def only(self, database: str) -> Any:
        """A registry holding just ``database``'s series (a Pushgateway group per database)."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Only(self, database))
        return registry


class _Only:
    def __init__(self, metrics: Metrics, database: str) -> None:
        self._metrics = metrics
        self._database = database

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        return self._metrics.collect(only=self._database)


def _gauge_values(status: DatabaseStatus) -> Iterator[tuple[str, float]]:
    newest = status.newest
    history = status.history
    yield "success", newest.finished_at.timestamp() if newest else 0.0
    failure = history.last_failure
    yield "failure", failure.finished_at.timestamp() if failure else 0.0
    if newest is not None:
        yield "duration", (newest.finished_at - newest.started_at).total_seconds()
        yield "size", float(newest.size)
    yield "backups", float(status.backups)
    if status.oldest_time is not None:
        yield "oldest", status.oldest_time.timestamp()
    drill = status.drill
    if drill is not None:
        yield "verify_status", 1.0 if drill.passed else 0.0
        if drill.restore_seconds is not None:
            yield "restore", drill.restore_seconds
    if status.drill_last_success is not None:
        yield "verify_success", status.drill_last_success.timestamp()
    yield "rpo", status.rpo_hours * 3600
    yield "rto", status.rto_minutes * 60
    if status.newest_snapshot is not None or status.snapshot_history.last_failure is not None:
        snapshot = status.newest_snapshot
        yield "snapshots", float(status.snapshots)
        yield "snapshot_success", snapshot.started_at.timestamp() if snapshot else 0.0
        failed = status.snapshot_history.last_failure
        yield "snapshot_failure", failed.finished_at.timestamp() if failed else 0.0
    snap_drill = status.snapshot_drill
    if snap_drill is not None and snap_drill.restore_seconds is not None:
        yield "snapshot_restore", snap_drill.restore_seconds
    archive = status.archive
    if archive is not None:
        yield "wal_gaps", float(len(archive.gaps))
        yield "wal_failures", float(archive.failures.total)
        last = archive.failures.last_at
        yield "wal_failure", last.timestamp() if last else 0.0
        if archive.last_archived_at is not None:
            yield "wal_last", archive.last_archived_at.timestamp()
        if archive.earliest_restore is not None:
            yield "recoverable_from", archive.earliest_restore.timestamp()
        if archive.latest_restore is not None:
            yield "recoverable_to", archive.latest_restore.timestamp()
