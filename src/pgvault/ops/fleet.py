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
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from pgvault import catalog, config, fleet, lease, logs
from pgvault.catalog import Catalog
from pgvault.config import Settings, Target
from pgvault.errors import ConfigError, Conflict, NotFound, PgvaultError, StorageError
from pgvault.fleet import Decision, LeaseRecord, Shard, Timing, Window
from pgvault.lease import Keeper, Lease
from pgvault.model import Manifest
from pgvault.ops import jobs
from pgvault.pg.conninfo import ConnInfo
from pgvault.storage.base import Storage
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
    worker = _Worker(settings, storage, timing, clock, drill_for)
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
                 drill_for: DrillFor | None) -> None:
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
            claimed = fleet.running(self.holder, window, now, self.timing, record)
            try:
                held = Lease.claim(self.storage, catalog.fleet_lease_key(name), claimed, etag)
            except Conflict:
                return None  # another worker claimed it first: look again next round
            log.info("fleet: %s taken (%s)", name, decision.reason)
            if record is not None and record.state == "running":
                self._break_lock(name, record.holder)
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

    def _backup(self, name: str, target: Target, conn: ConnInfo, held: Lease, window: Window,
                leases: list[Lease], report: ShardReport) -> str | None:
        existing = self._in_window(name, window)
        if existing is not None:
            held.write(fleet.finished(held.record, self.clock(), existing.id))
            report.found[name] = existing.id
            return "finished"
        cancel = threading.Event()
        vault = Vault.open(target.settings, storage=self.storage, cancel=cancel)
        drill = self.drill_for(vault) if self.drill_for is not None else None
        retry = fleet.backoff(held.record.attempts + 1, self.timing.backoff,
                              self.timing.backoff_max)
        request = jobs.BackupRequest(
            conn, drill=drill,
            # Only a failure that will not be retried in this window is announced.
            notify_failure=self.clock() + retry >= window.end)
        with Keeper(leases, self.timing.lease, self.clock, on_lost=lambda _: cancel.set()):
            try:
                done = jobs.run(vault, request)
            except PgvaultError as exc:
                report.failures[name] = str(exc)
                if not held.lost.is_set():
                    # Aborted for a lost slot: not the database's fault, so no backoff.
                    again = (msgspec.structs.replace(held.record, state="failed", expires=None,
                                                     updated=self.clock())
                             if cancel.is_set() else
                             fleet.failed(held.record, self.clock(), str(exc), self.timing))
                    with contextlib.suppress(Conflict):
                        held.write(again)
                log.warning("fleet: backup of %s failed: %s", name, exc)
                return None
        manifest = done.manifest
        if cancel.is_set() and not held.lost.is_set():
            # A slot was taken over while we ran (we were paused past its lease): this
            # backup ran beside the cap's new holder, so it is not kept; the lease stays
            # ours and the database is retried at once.
            log.warning("fleet: %s: a cap slot was taken over during backup %s; removing it",
                        name, manifest.id)
            self.catalog.delete(manifest)
            report.abandoned.append(manifest.id)
            with contextlib.suppress(Conflict):
                held.write(msgspec.structs.replace(held.record, state="failed",
                                                   expires=None, updated=self.clock()))
            return None
        try:
            held.write(fleet.finished(held.record, self.clock(), manifest.id))
        except Conflict:
            current, _ = lease.read(self.storage, catalog.fleet_lease_key(name))
            if current is not None and current.state == "done" and \
                    current.backup_id == manifest.id:
                report.backed_up[name] = manifest.id  # the taker adopted ours
                return "finished"
            log.warning("fleet: %s: the lease was taken over during backup %s; removing it "
                        "so the window keeps one backup", name, manifest.id)
            self.catalog.delete(manifest)
            report.abandoned.append(manifest.id)
            return None
        report.backed_up[name] = manifest.id
        return "finished"
