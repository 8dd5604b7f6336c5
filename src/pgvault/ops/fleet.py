"""The shard loop: one worker of the fleet backs up its shard's databases once this window.

Each database is taken under its lease (lease.py) and two cap slots (one of its server's,
one of the repository's), then backed up through ``jobs.run`` like any other backup, so
history, events and metrics are the same as `pgvault backup`'s. The sharding only spreads
the work: correctness comes from the leases, so two workers with overlapping shards (a
restarted pod beside a paused one, a run with another shard count, a stray CronJob)
still give each database one backup per window. The worker returns once every database
of its shard has its backup for the window, or the window ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import msgspec

from pgvault import catalog, config, fleet, lease, logs, schedule
from pgvault.catalog import Catalog
from pgvault.config import Settings, Target
from pgvault.errors import ConfigError, Conflict, NotFound, PgvaultError, StorageError
from pgvault.fleet import Decision, LeaseRecord, Shard, Timing, Window
from pgvault.lease import Keeper, Lease
from pgvault.model import Manifest, VerifyReport
from pgvault.ops import jobs
from pgvault.pg.conninfo import ConnInfo
from pgvault.storage.base import ObjectInfo, Storage
from pgvault.vault import Vault, open_repository

log = logs.get("fleet")

Clock = Callable[[], datetime]
DrillFor = Callable[[Vault], "jobs.Drill | None"]


@dataclass
class ShardReport:
    """What one worker did in one window."""

    shard: Shard
    window: Window
    databases: int = 0
    backed_up: dict[str, str] = field(default_factory=dict)
    """database -> backup id this worker made."""
    found: dict[str, str] = field(default_factory=dict)
    """database -> backup of this window someone else made (done before, or adopted)."""
    abandoned: list[str] = field(default_factory=list)
    """Backups this worker made after losing the lease, then removed as duplicates."""
    failures: dict[str, str] = field(default_factory=dict)
    """database -> the last error of an attempt (it may have succeeded later)."""
    missed: list[str] = field(default_factory=list)
    """Databases without a backup in this window when the window ended."""
    jobs: dict[str, dict[str, str]] = field(default_factory=dict)
    """database -> what followed its backup under the lease (drill, copy:<repo>, prune)."""
    lost: dict[str, str] = field(default_factory=dict)
    """database -> who took its lease over while this worker ran a job there."""


def timing_of(settings: Settings) -> Timing:
    f = settings.fleet
    return Timing(window=timedelta(hours=f.window_hours),
                  jitter=timedelta(minutes=f.jitter_minutes),
                  lease=timedelta(seconds=f.lease_seconds),
                  backoff=timedelta(seconds=f.backoff_seconds),
                  backoff_max=timedelta(seconds=f.backoff_max_seconds))


def fleet_targets(settings: Settings) -> list[Target]:
    """The fleet: every [[databases]] entry (fleet mode needs them named)."""
    if not settings.databases:
        raise ConfigError("fleet mode backs up the [[databases]] entries of the config "
                          "file, and it has none")
    return config.targets(settings)


def server_of(conn: ConnInfo) -> str:
    """The server a cap counts against: host and port as libpq would resolve them."""
    environ = conn.environ if conn.environ is not None else os.environ
    host = conn.params.get("host") or environ.get("PGHOST") or "localhost"
    port = conn.params.get("port") or environ.get("PGPORT") or "5432"
    return f"{host}:{port}"


def run_shard(settings: Settings, shard: Shard, *, drill_for: DrillFor | None = None,
              clock: Clock | None = None, sleep: Callable[[float], None] | None = None,
              stop: threading.Event | None = None, storage: Storage | None = None
              ) -> ShardReport:
    """Back up every database of ``shard`` due in the current window; see the module."""
    clock = clock or (lambda: datetime.now(UTC))
    sleep = sleep or time.sleep
    storage = storage if storage is not None else open_repository(settings)
    timing = timing_of(settings)
    worker = _Worker(settings, storage, timing, clock, drill_for, str(shard))
    window = fleet.window_at(clock(), timing.window)
    mine = {t.name: t for t in fleet_targets(settings)
            if t.name is not None and fleet.in_shard(t.name, shard)}
    report = ShardReport(shard, window, databases=len(mine))
    log.info("shard %s: %d of %d databases, window %d (%s to %s)", shard, len(mine),
             len(settings.databases), window.index, window.start.isoformat(),
             window.end.isoformat())
    # How soon to look again at databases waiting for a slot or another worker.
    poll = min(max(timing.lease.total_seconds() / 10, 0.05), 1.0)
    pending = dict(mine)
    while pending and not (stop is not None and stop.is_set()):
        now = clock()
        if now >= window.end:
            break
        wake = now + timedelta(seconds=poll)
        for name in sorted(pending, key=lambda n: fleet.start_offset(n, window, timing.jitter)):
            if stop is not None and stop.is_set():
                break
            outcome = worker.step(name, pending[name], report)
            if outcome == "finished":
                del pending[name]
            elif isinstance(outcome, datetime):
                wake = min(wake, outcome)
        if pending:
            pause = (wake - clock()).total_seconds()
            if pause > 0:
                sleep(min(pause, poll))
    report.missed = sorted(pending)
    return report


class _Worker:
    def __init__(self, settings: Settings, storage: Storage, timing: Timing, clock: Clock,
                 drill_for: DrillFor | None, shard: str = "") -> None:
        self.shard = shard
        self.settings = settings
        self.storage = storage
        self.catalog = Catalog(storage)
        self.timing = timing
        self.clock = clock
        self.drill_for = drill_for
        self.holder = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(4)}"
        f = settings.fleet
        self.repository_slots = [catalog.fleet_slot_key("repository", n)
                                 for n in range(f.max_per_repository)]
        self.max_per_server = f.max_per_server

    def step(self, name: str, target: Target, report: ShardReport) -> str | datetime | None:
        """One look at ``name``: "finished" (it has this window's backup), a time to look
        again, or None (try again at the next round)."""
        key = catalog.fleet_lease_key(name)
        try:
            record, etag = lease.read(self.storage, key)
        except StorageError as exc:
            log.warning("cannot read the lease of %s: %s", name, exc)
            return None
        now = self.clock()
        decision = fleet.decide(name, record, now, self.timing)
        if decision.action == "done":
            if name not in report.backed_up:
                report.found[name] = record.backup_id or "?" if record else "?"
            return "finished"
        if decision.action == "wait":
            return decision.at
        try:
            return self._take(name, target, record, etag, decision, report)
        except StorageError as exc:
            log.warning("fleet: %s: %s", name, exc)
            report.failures[name] = str(exc)
            return None

    def _take(self, name: str, target: Target, record: LeaseRecord | None, etag: str | None,
              decision: Decision, report: ShardReport) -> str | None:
        conn = config.target_connection(target)
        server = server_of(conn)
        now = self.clock()
        # A different first slot per database, so workers do not all queue on slot 0.
        first = fleet.owner(name, self.max_per_server)
        server_slots = [catalog.fleet_slot_key(f"server/{server}",
                                               (first + n) % self.max_per_server)
                        for n in range(self.max_per_server)]
        server_slot = lease.take_slot(self.storage, server_slots, self.holder, now,
                                      self.timing.lease)
        if server_slot is None:
            return None
        repository_slot = lease.take_slot(self.storage, self.repository_slots, self.holder,
                                          now, self.timing.lease)
        try:
            if repository_slot is None:
                return None
            window = fleet.window_at(now, self.timing.window)
            claimed = fleet.running(self.holder, window, now, self.timing, record, self.shard)
            try:
                held = Lease.claim(self.storage, catalog.fleet_lease_key(name), claimed, etag)
            except Conflict:
                return None  # another worker claimed it first: look again next round
            if record is not None and record.state == "running":
                # Worth a warning: a worker died, hung or was paused past its lease.
                log.warning("fleet: %s taken over (%s)", name, decision.reason)
                self._break_lock(name, record.holder)
            else:
                log.info("fleet: %s taken (%s)", name, decision.reason)
            return self._backup(name, target, conn, held, window,
                                [held, server_slot, repository_slot], report)
        finally:
            for slot in (repository_slot, server_slot):
                if slot is not None:
                    slot.release(self.clock())

    def _break_lock(self, name: str, previous: str) -> None:
        """The expired lease's holder stopped renewing: its backup lock (if it still holds
        one) must not keep the taker out until lock_stale_after. Only that holder's lock
        is removed, never anyone else's."""
        key = catalog.lock_key(name)
        try:
            held = json.loads(self.storage.read_bytes(key))
        except (NotFound, ValueError):
            return
        host, _, rest = previous.partition(" ")
        pid = rest.split(" ", 1)[0]
        if isinstance(held, dict) and held.get("host") == host and str(held.get("pid")) == pid:
            log.warning("fleet: removing the backup lock of %s left by %s (its lease expired)",
                        name, previous)
            self.storage.delete([key])

    def _in_window(self, name: str, window: Window) -> Manifest | None:
        """A backup of ``name`` this window already has (a worker that lost its lease
        after committing, a manual backup): it counts, rather than taking another."""
        for manifest in self.catalog.list(name):
            if manifest.kind == "logical" and window.start <= manifest.started_at < window.end:
                return manifest
        return None

    def _taker(self, held: Lease) -> str:
        """Who holds ``held``'s key now (the worker that took it over), for the log line."""
        with contextlib.suppress(StorageError):
            record, _ = lease.read(self.storage, held.key)
            if record is not None:
                return record.holder + (f" (shard {record.shard})" if record.shard else "")
        return "another worker"

    def _backup(self, name: str, target: Target, conn: ConnInfo, held: Lease, window: Window,
                leases: list[Lease], report: ShardReport) -> str | None:
        cancel = _Cancel()
        lost: list[Lease] = []

        def on_lost(gone: Lease) -> None:
            what = "its lease" if gone is held else f"its cap slot {gone.key}"
            cancel.reason = f"{what} was taken over by {self._taker(gone)}"
            lost.append(gone)
            cancel.set()

        tracked = _Tracked(self.storage)
        vault = Vault.open(target.settings, storage=tracked, cancel=cancel)
        with Keeper(leases, self.timing.lease, self.clock, on_lost=on_lost):
            existing = self._in_window(name, window)
            drill_outcome: dict[str, str] = {}
            if existing is not None:
                manifest, made = existing, False
                with contextlib.suppress(Conflict):
                    held.write(msgspec.structs.replace(held.record, backup_id=existing.id))
            else:
                done = self._run_backup(name, conn, vault, held, window, cancel, lost,
                                        tracked, report)
                if done is None:
                    return None
                manifest, made, drill_outcome = done.manifest, True, done.drill_outcome
                if not self._keep(name, manifest, held, cancel, report):
                    return None
            jobs_done = self._follow_ups(name, vault, manifest, held, cancel, drill_outcome)
        report.jobs[name] = jobs_done
        try:
            held.write(fleet.finished(held.record, self.clock(), manifest.id, jobs_done))
        except Conflict:
            # Taken over after the backup was claimed (lease record names it): the taker
            # adopts it and runs what is left; the window still has one backup.
            log.warning("fleet: %s: lease taken over by %s after backup %s was recorded; "
                        "the taker finishes its jobs", name, self._taker(held), manifest.id)
        (report.backed_up if made else report.found)[name] = manifest.id
        return "finished"

    def _run_backup(self, name: str, conn: ConnInfo, vault: Vault, held: Lease,
                    window: Window, cancel: threading.Event, lost: list[Lease],
                    tracked: _Tracked, report: ShardReport) -> _Done | None:
        """The window's backup through jobs.run; None when it failed or was aborted."""
        after_backup, _ = _drill_policy(vault.settings)
        drill = (self.drill_for(vault) if self.drill_for is not None and after_backup
                 else None)
        retry = fleet.backoff(held.record.attempts + 1, self.timing.backoff,
                              self.timing.backoff_max)
        request = jobs.BackupRequest(
            conn, drill=drill,
            # Only a failure that will not be retried in this window is announced.
            notify_failure=self.clock() + retry >= window.end)
        try:
            run = jobs.run(vault, request)
        except PgvaultError as exc:
            report.failures[name] = str(exc)
            if lost:
                self._aborted(name, lost[0], held, tracked, report)
            if not held.lost.is_set():
                # Aborted for a lost slot: not the database's fault, so no backoff.
                again = (msgspec.structs.replace(held.record, state="failed", expires=None,
                                                 updated=self.clock())
                         if cancel.is_set() else
                         fleet.failed(held.record, self.clock(), str(exc), self.timing))
                with contextlib.suppress(Conflict):
                    held.write(again)
            if not lost:
                log.warning("fleet: backup of %s failed: %s", name, exc)
            return None
        outcome = {}
        if drill is not None:
            outcome["drill"] = ("ok" if not run.drill_failed else
                                f"failed: {run.drill_error or _drill_failures(run.drill)}")
        if vault.settings.prune_after_backup and not run.drill_failed:
            outcome["prune"] = "ok" if run.prune_error is None else f"failed: {run.prune_error}"
        return _Done(run.manifest, outcome)

    def _aborted(self, name: str, gone: Lease, held: Lease, tracked: _Tracked,
                 report: ShardReport) -> None:
        """The one line of a job aborted for a lost lease, once what it wrote is gone.

        The backup removes its own objects when it fails; what is still there (a delete
        refused, a put that completed as the abort came) is removed here, so the taker's
        backup stays the window's only one.
        """
        left = tracked.still_there()
        with contextlib.suppress(StorageError):
            self.storage.delete(left)
        remaining = tracked.still_there()
        taker = self._taker(gone)
        what = "its lease" if gone is held else f"its cap slot {gone.key}"
        report.lost[name] = taker
        log.warning("fleet: backup of %s aborted: %s was taken over by %s; its partial "
                    "backup is removed (%d object(s) written, %s)", name, what, taker,
                    len(tracked.written),
                    "none left" if not remaining else f"{len(remaining)} left for prune")

    def _keep(self, name: str, manifest: Manifest, held: Lease, cancel: threading.Event,
              report: ShardReport) -> bool:
        """Claim ``manifest`` as the window's backup in the lease record; False when it
        must not be kept (removed as a duplicate)."""
        if cancel.is_set() and not held.lost.is_set():
            # A slot was taken over while we ran (we were paused past its lease): this
            # backup ran beside the cap's new holder, so it is not kept; the lease stays
            # ours and the database is retried at once.
            log.warning("fleet: %s: a cap slot was taken over during backup %s; removing "
                        "it (it ran beside the slot's new holder)", name, manifest.id)
            self.catalog.delete(manifest)
            report.abandoned.append(manifest.id)
            with contextlib.suppress(Conflict):
                held.write(msgspec.structs.replace(held.record, state="failed",
                                                   expires=None, updated=self.clock()))
            return False
        try:
            held.write(msgspec.structs.replace(held.record, backup_id=manifest.id,
                                               updated=self.clock()))
            return True
        except Conflict:
            pass
        current, _ = lease.read(self.storage, catalog.fleet_lease_key(name))
        if current is not None and current.backup_id == manifest.id:
            return True  # the taker adopted ours (it found it in the window)
        log.warning("fleet: backup of %s aborted: its lease was taken over by %s while "
                    "backup %s was being committed; that backup is removed so the window "
                    "keeps one", name, self._taker(held), manifest.id)
        report.lost[name] = self._taker(held)
        self.catalog.delete(manifest)
        report.abandoned.append(manifest.id)
        return False

    def _follow_ups(self, name: str, vault: Vault, manifest: Manifest, held: Lease,
                    cancel: threading.Event, drill_outcome: dict[str, str] | None
                    ) -> dict[str, str]:
        """The window's other due jobs, under the same lease and cap slots: a restore
        drill (after each backup, or when [schedule] verify says one is due), a copy to
        each `[[repos]]` copy (then its prune, by its own policy), as `pgvault verify`,
        `copy` and `prune` would run them. A failure is recorded, not retried: the next
        window's copy brings what this one missed."""
        outcomes: dict[str, str] = dict(drill_outcome or {})
        after_backup, scheduled = _drill_policy(vault.settings)
        steps: list[tuple[str, Callable[[], str]]] = []
        if self.drill_for is not None and "drill" not in outcomes and (
                (after_backup and not self.catalog.drills(name, manifest.id))
                or (scheduled is not None and self._drill_due(name, vault, scheduled))):
            steps.append(("drill", lambda: self._drill(vault, manifest)))
        for repo in vault.copies:
            steps.append((f"copy:{repo}", functools.partial(self._copy, vault, repo, name)))
        for job, step in steps:
            if held.lost.is_set() or cancel.is_set():
                outcomes[job] = "skipped: the lease or a cap slot was taken over"
                continue
            try:
                outcomes[job] = step()
            except PgvaultError as exc:
                outcomes[job] = f"failed: {exc}"
                log.warning("fleet: %s of %s failed: %s", job, name, exc)
        return outcomes

    def _drill_due(self, name: str, vault: Vault, expr: str) -> bool:
        s = vault.settings.schedule
        last = max((r.started_at for (db, _), r in self.catalog.last_drills(name).items()
                    if db == name), default=None)
        return schedule.due(expr, s.timezone, last, self.clock())

    def _drill(self, vault: Vault, manifest: Manifest) -> str:
        assert self.drill_for is not None
        drill = self.drill_for(vault)
        if drill is None:
            return "skipped: no restore drill available"
        report = jobs.run(vault, jobs.VerifyRequest(manifest, drill))
        return "ok" if report.passed else f"failed: {_drill_failures(report)}"

    def _copy(self, vault: Vault, repo: str, name: str) -> str:
        from pgvault.ops.copy import copy
        from pgvault.ops.prune import prune_after_backup

        target = vault.repository(repo)
        done = copy(self.storage, target.storage, name=repo, policy=target.policy,
                    now=self.clock(), database=name, jobs=2,
                    lock_stale_after=target.lock_stale_after)
        if done.failed:
            first = next(iter(done.failed.items()))
            return f"failed: {len(done.failed)} backup(s) not copied; {first[0]}: {first[1]}"
        outcome = f"ok ({len(done.copied)} copied)"
        if target.settings.prune_after_backup:
            pruned = prune_after_backup(target.storage, target.policy, database=name,
                                        lock_stale_after=target.lock_stale_after)
            plan = pruned.databases.get(name)
            outcome += f", pruned {len(plan.remove) if plan else 0}"
        return outcome


class _Cancel(threading.Event):
    """The job's cancel flag, with the reason jobs.run's abort names."""

    reason = ""


@dataclass
class _Done:
    manifest: Manifest
    drill_outcome: dict[str, str]


def _drill_policy(settings: Settings) -> tuple[bool, str | None]:
    """(drill each new backup, the schedule of drills otherwise) for a target."""
    verify = settings.schedule.verify
    after = settings.verify_after_backup or verify == "after-backup"
    return after, (verify if verify not in (None, "after-backup") else None)


def _drill_failures(report: VerifyReport | None) -> str:
    if report is None:
        return "no report"
    return "; ".join(f"{c.name}: {c.detail}" for c in report.failures[:3]) or "failed"


class _Tracked:
    """The repository as one job sees it, remembering the backup objects it writes, so a
    job aborted for a lost lease can check that none of them is left."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.written: list[str] = []
        self._lock = threading.Lock()

    def _note(self, key: str) -> None:
        if key.startswith((catalog.BACKUPS, catalog.MANIFESTS)):
            with self._lock:
                self.written.append(key)

    def still_there(self) -> list[str]:
        left = []
        for key in dict.fromkeys(self.written):
            with contextlib.suppress(NotFound):
                self._storage.stat(key)
                left.append(key)
        return left

    @property
    def url(self) -> str:
        return self._storage.url

    def put(self, key: str, stream: BinaryIO) -> ObjectInfo:
        self._note(key)
        return self._storage.put(key, stream)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        self._note(key)
        return self._storage.put_bytes(key, data)

    def create(self, key: str, data: bytes) -> ObjectInfo:
        self._note(key)
        return self._storage.create(key, data)

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        return self._storage.read_versioned(key)

    def replace_if(self, key: str, data: bytes, etag: str | None) -> ObjectInfo:
        return self._storage.replace_if(key, data, etag)

    def open(self, key: str) -> BinaryIO:
        return self._storage.open(key)

    def read_bytes(self, key: str) -> bytes:
        return self._storage.read_bytes(key)

    def stat(self, key: str) -> ObjectInfo:
        return self._storage.stat(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._storage.list(prefix)

    def delete(self, keys: Iterable[str]) -> None:
        self._storage.delete(keys)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)  # what a backend offers beyond the protocol


# ---------------------------------------------------------------- the fleet's status

@dataclass
class FleetStatus:
    """Where every database of the fleet stands in the current window, from the lease
    records in the repository (what `pgvault fleet status`, `fleet check`, the metrics
    and the console's /fleet page show)."""

    window: Window
    shards: int
    databases: list[fleet.WindowState]
    unreadable: dict[str, str] = field(default_factory=dict)
    """database -> why its lease record could not be read."""

    @property
    def missed(self) -> list[fleet.WindowState]:
        return [d for d in self.databases if d.standing == "missed"]

    def counts(self) -> dict[str, int]:
        found = dict.fromkeys(("done", "due", "running", "failing", "missed"), 0)
        for state in self.databases:
            found[state.standing] += 1
        return found

    def by_shard(self) -> dict[int, dict[str, int]]:
        """shard -> standing -> databases, for every shard of ``shards``."""
        table = {n: dict.fromkeys(("done", "due", "running", "failing", "missed"), 0)
                 for n in range(self.shards)}
        for state in self.databases:
            table[state.shard][state.standing] += 1
        return table


def fleet_status(settings: Settings, *, storage: Storage | None = None,
                 now: datetime | None = None, shards: int | None = None,
                 names: list[str] | None = None) -> FleetStatus:
    """Read each configured database's lease record (in parallel: one small read each)
    and judge it (``fleet.standing``). ``shards`` None: the N the latest workers ran
    with (their records say it), else 1. ``names``: these databases instead of the
    configured [[databases]]."""
    storage = storage if storage is not None else open_repository(settings)
    now = now or datetime.now(UTC)
    timing = timing_of(settings)
    if names is None:
        names = [t.name for t in fleet_targets(settings) if t.name is not None]
    window = fleet.window_at(now, timing.window)
    records: dict[str, LeaseRecord | None] = {}
    unreadable: dict[str, str] = {}

    def read(name: str) -> None:
        try:
            records[name] = lease.read(storage, catalog.fleet_lease_key(name))[0]
        except StorageError as exc:
            unreadable[name] = str(exc)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="fleet-status") as pool:
        list(pool.map(read, names))
    if shards is None:
        seen = [r.shard for r in records.values()
                if r is not None and r.shard and r.window >= window.index - 1]
        counts = {int(s.split("/")[1]) for s in seen if "/" in s}
        shards = max(counts, default=1)
    states = [fleet.standing(name, records.get(name), now, timing, shards)
              for name in names if name not in unreadable]
    for name in unreadable:
        states.append(fleet.WindowState(name, fleet.owner(name, shards), "missed",
                                        f"its lease record cannot be read: {unreadable[name]}"))
    return FleetStatus(window, shards, sorted(states, key=lambda s: s.database), unreadable)


def fleet_metrics(status: FleetStatus) -> bytes:
    """The fleet's Prometheus families (text exposition), for a scrape or a textfile."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    class _Collector:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            per_state = GaugeMetricFamily(
                "pgvault_fleet_databases", "Databases of the fleet by where they stand in "
                "the current window.", labels=["standing"])
            for standing_, count in status.counts().items():
                per_state.add_metric([standing_], count)
            yield per_state
            missed = GaugeMetricFamily(
                "pgvault_fleet_window_missed", "1 for each database whose last complete "
                "window ended without a backup.", labels=["database", "cause"])
            for state in status.missed:
                missed.add_metric([state.database, _cause(state.reason)], 1)
            yield missed
            shard = GaugeMetricFamily("pgvault_fleet_shard_databases",
                                      "Databases of each shard by standing.",
                                      labels=["shard", "standing"])
            for number, row in status.by_shard().items():
                for standing_, count in row.items():
                    shard.add_metric([f"{number}/{status.shards}", standing_], count)
            yield shard
            start = GaugeMetricFamily("pgvault_fleet_window_start_timestamp_seconds",
                                      "When the current window began.")
            start.add_metric([], status.window.start.timestamp())
            yield start

        def describe(self) -> list[Any]:
            return []

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    data: bytes = generate_latest(registry)
    return data


def _cause(reason: str) -> str:
    """A missed window's reason as a label value (a small fixed set)."""
    for prefix, cause in (("never started", "never_started"), ("failed", "failed"),
                          ("lease lost", "lease_lost"), ("still running", "running")):
        if reason.startswith(prefix):
            return cause
    return "unreadable"


def console_view(sources: Iterable[tuple[str, Vault]], now: datetime) -> dict[str, Any]:
    """What the console's /fleet page (web/templates/fleet.html) shows: the fleet status
    of the repository the console's databases share, or why it cannot be read."""
    sources = list(sources)
    if not sources:
        return {"fleet": None, "error": "no database is configured here"}
    vault = sources[0][1]
    try:
        # The console's databases are the fleet's (each vault holds one target's
        # settings, without the [[databases]] list).
        return {"fleet": fleet_status(vault.settings, storage=vault.storage, now=now,
                                      names=[name for name, _ in sources]),
                "error": None}
    except PgvaultError as exc:
        return {"fleet": None, "error": str(exc)}
