"""`pgvault daemon`: run the jobs of every configured database on their schedules.

Per database: backup (retried with backoff, pruned after when configured), verify
(after each backup or on its own schedule) and a freshness check that raises
backup.stale even when no backup ran at all. APScheduler 3 runs them; a job never runs
twice at once; a run missed while the daemon was down runs once at start (the repository
says when each job last ran, so no local state file is needed). HTTP on 127.0.0.1 serves
/metrics, /healthz and /status. SIGTERM or SIGINT: no new work, a running backup gets
``grace_seconds`` to finish and is then aborted cleanly; the exit status is 0.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pgvault import __version__, config, logs, schedule
from pgvault.errors import ConfigError, Interrupted, PgvaultError
from pgvault.events import Event
from pgvault.metrics import Metrics
from pgvault.ops import jobs
from pgvault.storage.base import Storage
from pgvault.vault import Vault, open_repository

log = logs.get("daemon")

ABORT_WAIT = 30.0
"""Seconds an aborted backup gets to clean up (abort uploads, drop its lock)."""


@dataclass
class Database:
    """One scheduled database: its name in the repository, target, wired parts, state."""

    name: str
    target: config.Target
    vault: Vault
    stale: bool = False

    @property
    def settings(self) -> config.Settings:
        return self.target.settings

    @property
    def storage(self) -> Storage:
        return self.vault.storage


Drill = Callable[[Vault, Any], Any]
"""(vault, manifest) -> VerifyReport: one restore drill."""


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT', '[::1]:PORT' or ':PORT' (127.0.0.1) as (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {listen!r}: write HOST:PORT, e.g. 127.0.0.1:9847")
    return host.strip("[]") or "127.0.0.1", int(port)


class Daemon:
    """The scheduler, the HTTP endpoint and the shutdown sequence of `pgvault daemon`."""

    def __init__(self, settings: config.Settings, *, listen: str | None = None,
                 drill: Drill | None = None) -> None:
        self.settings = settings
        self.listen = parse_listen(listen or settings.daemon.listen)
        self.drill = drill
        self.stopping = threading.Event()
        self.cancel = threading.Event()
        named = [(self._name(target), target) for target in config.targets(settings)]
        storages = [open_repository(target.settings) for _, target in named]
        self.metrics = Metrics(repository_label=len({s.url for s in storages}) > 1)
        self.databases = [
            Database(name, target, Vault.open(target.settings, storage=storage,
                                              metrics=self.metrics, cancel=self.cancel))
            for (name, target), storage in zip(named, storages, strict=True)]
        for db in self.databases:  # every schedule checked before anything starts
            s = db.settings.schedule
            for what, expr in (("backup", s.backup), ("freshness", s.freshness),
                               ("verify", s.verify)):
                if expr and expr != "after-backup":
                    schedule.trigger(expr, s.timezone, what=f"schedule.{what} of {db.name}")
            for entry in db.settings.repos:
                if entry.copy_schedule:
                    schedule.trigger(entry.copy_schedule, s.timezone,
                                     what=f"[[repos]] {entry.name} copy_schedule")
        self.metrics.next_runs = self.next_runs
        self.started_at = datetime.now(UTC)
        self._active: dict[str, float] = {}
        self._active_changed = threading.Condition()
        self._scheduler: Any = None
        self._server: ThreadingHTTPServer | None = None
        self.stuck = False
        """True when a job did not end after the grace period and the abort."""
        self.console = self._console() if settings.console.enabled else None
        """The read-only web console (pgvault.web), served beside /metrics and /status."""

    def _console(self) -> Any:
        from pgvault.web.actions import Actions
        from pgvault.web.app import Console, console_token

        actions = None
        if self.settings.console.actions:
            targets = {db.name: db.target for db in self.databases}
            actions = Actions(connect=lambda name: config.target_connection(targets[name]),
                              drill=self.drill, track=self._running)
        return Console(lambda: [(db.name, db.vault) for db in self.databases],
                       host=self.listen[0], token=console_token(self.settings),
                       next_runs=self.next_runs, daemon=True, actions=actions)

    @staticmethod
    def _name(target: config.Target) -> str:
        name = target.name or config.connection(target.settings).dbname
        if not name:
            raise ConfigError("the daemon needs each database's name: give the connection a "
                              "database (DATABASE_URL=postgresql://host/NAME) or list "
                              "[[databases]] entries")
        return name

    # -- running ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; returns the exit status (0)."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        for name in ("apscheduler", "apscheduler.scheduler", "apscheduler.executors.default"):
            aps = logging.getLogger(name)
            aps.handlers = logging.getLogger(logs.LOGGER).handlers[:]
            aps.setLevel(logging.WARNING)
            aps.propagate = False
        self._serve_http()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(self.settings.daemon.max_concurrency),
                       "checks": ThreadPoolExecutor(2),
                       "copies": ThreadPoolExecutor(self.settings.daemon.max_copies)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        for db in self.databases:
            self._schedule(db)
        self._scheduler.start()
        host, port = self._server.server_address[:2] if self._server else self.listen
        log.info("pgvault %s daemon started: %s; http://%s:%s/metrics", __version__,
                 ", ".join(f"{db.name} (backup {db.settings.schedule.backup!r} "
                           f"{db.settings.schedule.timezone})" for db in self.databases),
                 host, port)
        for (name, job), when in sorted(self.next_runs().items()):
            log.info("next %s of %s at %s", job, name, when.isoformat())
        while not self.stopping.wait(0.5):
            pass
        return self._shutdown()

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.stopping.is_set():
            log.info("%s received: taking no new work", signal.Signals(signum).name)
        self.stopping.set()

    def _schedule(self, db: Database) -> None:
        s = db.settings.schedule
        now = datetime.now(UTC)
        try:
            status = jobs.status_of(db.vault, db.name)
            self.metrics.update(status)
            history = status.history
            runs = [status.newest.started_at if status.newest else None,
                    history.last_success.at if history.last_success else None,
                    history.last_failure.at if history.last_failure else None]
            last_backup = max((t for t in runs if t is not None), default=None)
            last_drill = status.drill.started_at if status.drill else None
        except PgvaultError as exc:
            log.warning("cannot read the repository state of %s (%s); its jobs run now",
                        db.name, exc)
            last_backup = last_drill = None
        catch_up = schedule.due(s.backup, s.timezone, last_backup, now)
        if catch_up:
            log.info("backup of %s missed its last scheduled run (last run: %s): running it "
                     "now", db.name, last_backup.isoformat() if last_backup else "never")
        self._add(db, "backup", self._backup, s.backup, jitter=s.jitter_seconds,
                  first=now if catch_up or s.run_on_start else None)
        if s.verify and s.verify != "after-backup":
            due = self.drill is not None and schedule.due(s.verify, s.timezone, last_drill, now)
            self._add(db, "verify", self._verify, s.verify, jitter=s.jitter_seconds,
                      first=now if due and last_drill is not None else None)
        self._add(db, "freshness", self._freshness, s.freshness, executor="checks",
                  first=now + timedelta(seconds=1))
        for entry in db.settings.repos:
            if entry.copy_schedule and entry.name in db.vault.copies:
                self._add(db, f"copy-{entry.name}", functools.partial(self._copy,
                          repo=entry.name), entry.copy_schedule, executor="copies")

    def _add(self, db: Database, job: str, func: Callable[[Database], None], expr: str, *,
             jitter: int = 0, first: datetime | None = None, executor: str = "default") -> None:
        s = db.settings.schedule
        trigger = schedule.trigger(expr, s.timezone, jitter=jitter,
                                   what=f"schedule.{job} of {db.name}")
        extra = {"next_run_time": first} if first is not None else {}
        self._scheduler.add_job(func, trigger, args=[db], id=f"{job}:{db.name}",
                                name=f"{job} of {db.name}", executor=executor, **extra)

    def next_runs(self) -> dict[tuple[str, str], datetime]:
        """(database, job) -> the next scheduled run, for /status and the metrics."""
        runs: dict[tuple[str, str], datetime] = {}
        scheduler = self._scheduler
        if scheduler is None:
            return runs
        for job in scheduler.get_jobs():
            kind, _, name = job.id.partition(":")
            when = getattr(job, "next_run_time", None)
            if when is not None:
                runs[(name, kind)] = when
        return runs

    @contextmanager
    def _running(self, key: str) -> Iterator[None]:
        with self._active_changed:
            self._active[key] = time.monotonic()
        try:
            yield
        finally:
            with self._active_changed:
                self._active.pop(key, None)
                self._active_changed.notify_all()

    # -- jobs -------------------------------------------------------------------------

    def _backup(self, db: Database) -> None:
        if self.stopping.is_set():
            return
        with self._running(f"backup:{db.name}"):
            manifest = self._backup_with_retries(db)
        for entry in db.settings.repos if manifest is not None else ():
            if entry.copy_after_backup and entry.name in db.vault.copies:
                # In the copies' own pool (max_copies at once), so the next database's
                # backup does not wait for an upload to another region.
                self._scheduler.add_job(self._copy, args=[db], kwargs={"repo": entry.name},
                                        id=f"copy-{entry.name}-after:{db.name}",
                                        executor="copies", replace_existing=True)

    def _copy(self, db: Database, repo: str) -> None:
        from pgvault.ops.jobs import copy_each

        if self.stopping.is_set():
            return
        with self._running(f"copy-{repo}:{db.name}"):
            try:
                copy_each(db.vault, [repo], database=db.name,
                          echo=lambda line: log.info("copy of %s: %s", db.name, line.strip()))
            except PgvaultError as exc:
                log.warning("copy of %s: %s", db.name, exc)
            except Exception:
                log.exception("copy of %s to %s: internal error", db.name, repo)

    def _backup_with_retries(self, db: Database) -> Any:
        s = db.settings
        retries = s.schedule.retries
        drill = None
        if self.drill is not None and (s.schedule.verify == "after-backup"
                                       or getattr(s, "verify_after_backup", False)):
            verify = self.drill

            def drill(manifest: Any) -> Any:
                return verify(db.vault, manifest)

        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                conn = config.target_connection(db.target)
                db.vault.stages  # noqa: B018 - a bad [encryption] is announced, not retried
            except PgvaultError as exc:
                now = datetime.now(UTC)
                db.vault.events.emit(Event("backup.failed", db.name, now, started_at=now,
                                           error=str(exc)))
                return None
            try:
                run = jobs.run(db.vault, jobs.BackupRequest(
                    conn, drill=drill, notify_failure=last, stale=db.stale))
            except Interrupted:
                log.warning("backup of %s aborted: the daemon is stopping", db.name)
                return None
            except PgvaultError:
                if last or self.stopping.is_set():
                    return None
                delay = s.schedule.retry_backoff_seconds * 2 ** attempt
                log.warning("backup of %s: attempt %d of %d failed; retrying in %.0fs",
                            db.name, attempt + 1, retries + 1, delay)
                if self.stopping.wait(delay):
                    return None
                continue
            except Exception:
                log.exception("backup of %s: internal error", db.name)
                return None
            db.stale = False
            return run.manifest
        return None

    def _verify(self, db: Database) -> None:
        if self.stopping.is_set() or self.drill is None:
            return
        with self._running(f"verify:{db.name}"):
            try:
                # Drills restore logical backups (physical ones are checked by pg_verifybackup).
                manifests = [m for m in db.vault.catalog.list(db.name) if m.kind == "logical"]
            except PgvaultError as exc:
                log.warning("verify of %s: cannot list backups: %s", db.name, exc)
                return
            if not manifests:
                log.info("verify of %s: no backup to verify yet", db.name)
                return
            self._drill(db, manifests[-1])

    def _drill(self, db: Database, manifest: Any) -> None:
        drill = self.drill
        if drill is None:
            log.warning("verify of %s skipped: this pgvault has no restore drills", db.name)
            return
        try:
            jobs.run(db.vault, jobs.VerifyRequest(manifest, lambda m: drill(db.vault, m)))
        except PgvaultError:
            pass  # reported as verify.failed by the job
        except Exception:
            log.exception("verify of %s: internal error", db.name)

    def _freshness(self, db: Database) -> None:
        if self.stopping.is_set():
            return
        try:
            db.stale = jobs.run_freshness_check(db.vault, db.name, was_stale=db.stale,
                                                up_since=self.started_at)
        except PgvaultError as exc:
            log.warning("freshness check of %s: cannot read the repository: %s", db.name, exc)

    # -- shutdown ---------------------------------------------------------------------

    def _shutdown(self) -> int:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        grace = self.settings.daemon.grace_seconds
        if not self._wait_idle(grace):
            log.warning("%s still running after the %.0fs grace period: aborting",
                        ", ".join(sorted(self._active)), grace)
            self.cancel.set()
            if not self._wait_idle(ABORT_WAIT):
                log.error("%s did not stop; exiting anyway", ", ".join(sorted(self._active)))
                self.stuck = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        log.info("pgvault daemon stopped")
        return 0

    def _wait_idle(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        with self._active_changed:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._active_changed.wait(min(left, 1.0))
        return True

    # -- HTTP ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The /status document: each database's state, objectives and next runs."""
        now = datetime.now(UTC)
        runs = self.next_runs()
        statuses = {(s.repository, s.database): s for s in self.metrics.statuses()}
        databases = []
        for db in self.databases:
            status = statuses.get((db.storage.url, db.name))
            entry: dict[str, Any] = (status.to_json(now) if status is not None else
                                     {"database": db.name, "repository": db.storage.url})
            if status is not None:
                verdict = status.verdict(
                    now, warn_age_hours=db.settings.check.warn_age_hours,
                    warn_drill_age_days=db.settings.check.warn_drill_age_days)
                entry["state"] = verdict.name
                entry["reasons"] = list(verdict.reasons)
            entry["stale"] = db.stale
            entry["next_runs"] = {job: when.isoformat() for (name, job), when in
                                  sorted(runs.items()) if name == db.name}
            databases.append(entry)
        return {"version": __version__, "started_at": self.started_at.isoformat(),
                "stopping": self.stopping.is_set(), "running": sorted(self._active),
                "databases": databases}

    def _serve_http(self) -> None:
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            server_version = f"pgvault/{__version__}"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    self._answer(200, CONTENT_TYPE_LATEST, daemon.metrics.render())
                elif path == "/healthz":
                    ok = not daemon.stopping.is_set()
                    self._answer(200 if ok else 503, "text/plain; charset=utf-8",
                                 b"ok\n" if ok else b"stopping\n")
                elif path == "/status" and daemon.console is not None and \
                        daemon.console.token is not None and \
                        not daemon.console.authorized(self.headers):
                    daemon.console.respond(self, "GET")  # with a token, /status needs it
                elif path == "/status":
                    body = json.dumps(daemon.status(), indent=2, default=str).encode()
                    self._answer(200, "application/json", body)
                elif daemon.console is not None:
                    daemon.console.respond(self, "GET")
                else:
                    self._answer(404, "text/plain; charset=utf-8",
                                 b"not found: try /metrics, /healthz or /status\n")

            def do_POST(self) -> None:
                if daemon.console is not None:
                    daemon.console.respond(self, "POST")  # /login; actions if enabled
                else:
                    self._answer(405, "text/plain; charset=utf-8", b"read-only\n")

            def _answer(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every 15 s would drown the job lines

        try:
            self._server = ThreadingHTTPServer(self.listen, Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.listen[0]}:{self.listen[1]}: "
                              f"{exc.strerror or exc}") from None
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="pgvault-http",
                         daemon=True).start()
