"""The console's actions, off unless ``[console] actions = true``: back up now, drill now,
pin and unpin, and restore into a NEW database.

Every action is checked here, on the server, whatever the page allowed: a restore names a
new database (not a URL, not the source, not postgres/template0/template1, not one that
exists on the server) and repeats that name as its confirmation. A backup and a drill run
through ``ops.jobs.run``, so their history, events and metrics are those of the CLI and
the daemon; a restore through ``ops.restore.restore``, a pin through ``ops.pin``. Each
action is announced as the events ``action.started`` and ``action.succeeded`` /
``action.failed`` (details: the action, who asked, the equivalent command), so [notify]
sees who did what from the console. Long actions run in a thread as a ``Job`` whose page
the browser polls (a meta refresh: no script).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shlex
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgvault import logs, redact
from pgvault.console import human_bytes, human_seconds
from pgvault.errors import PgvaultError
from pgvault.events import Event
from pgvault.model import Manifest, VerifyReport
from pgvault.pg.conninfo import ConnInfo
from pgvault.vault import Vault

log = logs.get("console")

SYSTEM_DATABASES = frozenset({"postgres", "template0", "template1"})
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}")
"""A new database's name as the console takes it: one plain word, never a URL or key=value
(which `pgvault restore --to` would read as another server)."""
KEEP_JOBS = 100
KINDS = ("backup", "drill", "pin", "unpin", "restore")

Connect = Callable[[str], ConnInfo]
"""The database's name -> how to reach it (its server, for a backup and a restore)."""
Drill = Callable[[Vault, Manifest], VerifyReport]
"""(vault, manifest) -> the drill's report, as `pgvault verify` runs it."""


class Refused(Exception):
    """An action the server will not run, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One action the console runs: what, by whom, the command it equals, how it went."""

    id: str
    action: str
    database: str
    who: str
    command: str
    started_at: datetime
    state: str = "running"  # running, succeeded, failed
    detail: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)
    """(label, href) of what the result is: the backup, its drill report, the database."""
    finished_at: datetime | None = None
    done_bytes: int = 0
    """Bytes read or stored so far (a backup, a restore), for the page while it runs."""
    total_bytes: int = 0

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def progress(self) -> str:
        if not self.done_bytes:
            return ""
        total = f" of {human_bytes(self.total_bytes)}" if self.total_bytes else ""
        return f"{human_bytes(self.done_bytes)}{total} so far"

    def count(self, n: int) -> None:
        self.done_bytes += n


def where_args(vault: Vault) -> list[str]:
    """The options that name this repository in a command (the config file, else --repo)."""
    settings = vault.settings
    return (["--config", settings.config_file] if settings.config_file else
            ["--repo", redact.scrub(vault.storage.url)])


def command_for(action: str, name: str, vault: Vault, form: Mapping[str, str]) -> str:
    """The `pgvault` command line that does what this action does."""
    backup = form.get("backup") or "latest"
    args: list[str]
    if action == "backup":
        args = ["backup", "-d", name]
    elif action == "drill":
        args = ["verify", backup, "-d", name]
    elif action == "pin":
        args = ["pin", backup, "-d", name, "--reason", form.get("reason") or "why"]
    elif action == "unpin":
        args = ["unpin", backup, "-d", name]
    else:
        args = ["restore", backup, "--from-database", name, "--to",
                form.get("target") or "NEW_NAME"]
    return shlex.join(["pgvault", *args, *where_args(vault)])


def check_restore_target(source: str, target: str, confirm: str) -> None:
    """Refuse a restore target that is not a new, plain, confirmed database name (the
    server's own check; ``database_exists`` asks the server about the last rule)."""
    if not target:
        raise Refused(400, "name the new database to restore into")
    if not NAME.fullmatch(target):
        raise Refused(400, f"{target!r} is not a plain database name (letters, digits, _ $ "
                           "-, at most 63, not starting with a digit): the console restores "
                           "into a new database on the same server only")
    if not confirm:
        raise Refused(400, "type the new database's name a second time to confirm")
    if confirm != target:
        raise Refused(400, f"the confirmation {confirm!r} is not the new database's name "
                           f"{target!r}")
    if target.casefold() == source.casefold():
        raise Refused(409, f"{target!r} is the source database itself: the console never "
                           "restores over a database, name a new one")
    if target.casefold() in SYSTEM_DATABASES:
        raise Refused(409, f"{target!r} is a system database: name a new one")


def database_exists(conn: ConnInfo, name: str) -> bool:
    """Whether the server ``conn`` reaches has a database ``name`` (asked through psql)."""
    from pgvault.pg.psql import PsqlSession, text_literal

    for maintenance in ("postgres", "template1"):
        session = PsqlSession(conn.with_dbname(maintenance))
        try:
            session.preflight()
        except PgvaultError:
            session.close()
            continue
        try:
            return bool(session.run(
                f"SELECT 1 FROM pg_database WHERE datname = {text_literal(name)}"))
        finally:
            session.close()
    raise Refused(503, f"cannot reach the server of {conn.redacted()} to check that "
                       f"{name!r} does not exist yet")


class Actions:
    """The actions of one console: their checks, their threads, the jobs they leave."""

    def __init__(self, *, connect: Connect, drill: Drill | None = None,
                 clock: Callable[[], datetime] | None = None,
                 track: Callable[[str], AbstractContextManager[None]] | None = None) -> None:
        self.connect = connect
        self.drill = drill
        self.track = track or (lambda what: contextlib.nullcontext())
        """The daemon's: its shutdown waits for (and then aborts) an action like a job."""
        self.clock = clock or (lambda: datetime.now(UTC))
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def start(self, action: str, name: str, vault: Vault, form: Mapping[str, str],
              who: str) -> Job:
        """Check the action and start it; Refused says why it will not run."""
        if action not in KINDS:
            raise Refused(404, f"no action {action!r} (the console knows {', '.join(KINDS)})")
        form = {k: v.strip() for k, v in form.items()}
        work = self._prepare(action, name, vault, form)
        job = Job(id=secrets.token_hex(8), action=action, database=name, who=who,
                  command=command_for(action, name, vault, form), started_at=self.clock())
        with self._lock:
            running = [j for j in self._jobs.values() if j.running and j.database == name]
            if running and action in ("backup", "drill", "restore"):
                raise Refused(409, f"{running[0].action} of {name} is still running "
                                   f"(job {running[0].id}): wait for it")
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP_JOBS:
                self._jobs.popitem(last=False)
        log.info("console: %s asked %s of %s (job %s): %s", who, action, name, job.id,
                 job.command)
        self._emit(vault, job, "action.started")
        threading.Thread(target=self._run, args=(vault, job, work), daemon=True,
                         name=f"pgvault-console-{action}").start()
        return job

    # -- checking ---------------------------------------------------------------------

    def _manifest(self, vault: Vault, name: str, ref: str) -> Manifest:
        try:
            manifest = vault.catalog.get(ref or "latest", name)
        except PgvaultError as exc:
            raise Refused(404, str(exc)) from None
        if manifest.kind != "logical":
            raise Refused(409, f"backup {manifest.id} is a {manifest.kind} backup: the "
                               "console restores and drills logical backups")
        return manifest

    def _prepare(self, action: str, name: str, vault: Vault,
                 form: Mapping[str, str]) -> Callable[[Job], None]:
        """The checked work of one action (raises Refused before anything starts)."""
        from pgvault.ops import jobs

        if action == "backup":
            conn = self._connection(name)

            def backup(job: Job) -> None:
                run = jobs.run(vault, jobs.BackupRequest(conn, progress=job.count))
                m = run.manifest
                job.detail = (f"backup {m.id}: {human_bytes(m.size)} stored in "
                              f"{human_seconds((m.finished_at - m.started_at).total_seconds())}")
                job.links.append((f"backup {m.id}", f"/db/{_quote(name)}#backup-{m.id}"))
            return backup
        if action in ("pin", "unpin"):
            reason = form.get("reason", "")
            if action == "pin" and not reason:
                raise Refused(400, "a pin needs a reason (why this backup must be kept)")
            manifest = self._manifest(vault, name, form.get("backup", ""))

            def pin(job: Job) -> None:
                from pgvault.ops.pin import pin, unpin

                if action == "pin":
                    pin(vault.storage, manifest.id, reason=reason, now=self.clock(),
                        database=name)
                    job.detail = f"backup {manifest.id} pinned: {reason}"
                else:
                    removed = unpin(vault.storage, manifest.id, database=name)[1]
                    job.detail = (f"backup {manifest.id} unpinned" if removed else
                                  f"backup {manifest.id} was not pinned")
                job.links.append((f"backup {manifest.id}",
                                  f"/db/{_quote(name)}#backup-{manifest.id}"))
            return pin
        manifest = self._manifest(vault, name, form.get("backup", ""))
        if action == "drill":
            drill = self.drill
            if drill is None:
                raise Refused(501, "this console runs no restore drills")

            def run_drill(job: Job) -> None:
                report = jobs.run(vault, jobs.VerifyRequest(manifest,
                                                            lambda m: drill(vault, m)))
                job.detail = (f"drill of {manifest.id}: {'PASS' if report.passed else 'FAIL'}"
                              f" at level {report.level}" + (
                                  f", restored in {human_seconds(report.restore_seconds)}"
                                  if report.restore_seconds is not None else ""))
                if not report.passed:
                    job.state = "failed"
                job.links.append((f"drill report of {manifest.id}",
                                  f"/db/{_quote(name)}#drill-{manifest.id}"))
            return run_drill
        target, confirm = form.get("target", ""), form.get("confirm", "")
        check_restore_target(name, target, confirm)
        conn = self._connection(name)
        if database_exists(conn, target):
            raise Refused(409, f"database {target!r} already exists on the server: the "
                               "console restores into a new database only")

        def restore(job: Job) -> None:
            from pgvault.ops.restore import RestoreOptions, restore

            job.total_bytes = sum(a.size for a in manifest.artifacts if a.name.startswith("db."))
            result = restore(conn, vault.storage, manifest, RestoreOptions(
                target=target, identities=vault.keyring_with(None), progress=job.count))
            job.detail = (f"restored {manifest.id} of {name} into {target}: "
                          f"{human_bytes(result.bytes_read)} read and verified in "
                          f"{human_seconds(result.seconds)}")
            job.links.append((f"backup {manifest.id}", f"/db/{_quote(name)}#backup-{manifest.id}"))
        return restore

    def _connection(self, name: str) -> ConnInfo:
        try:
            return self.connect(name)
        except PgvaultError as exc:
            raise Refused(409, f"cannot reach {name}: {exc}") from None

    # -- running ----------------------------------------------------------------------

    def _run(self, vault: Vault, job: Job, work: Callable[[Job], None]) -> None:
        try:
            with self.track(f"console {job.action}:{job.database}"):
                work(job)
            if job.state == "running":
                job.state = "succeeded"
        except Exception as exc:  # the job page says why; a thread must not die silently
            job.state = "failed"
            job.detail = redact.scrub(str(exc) or type(exc).__name__)
            if not isinstance(exc, PgvaultError):
                log.exception("console: %s of %s (job %s) failed", job.action, job.database,
                              job.id)
        job.finished_at = self.clock()
        job.detail = redact.scrub(job.detail)
        log.info("console: %s of %s (job %s, asked by %s) %s: %s", job.action, job.database,
                 job.id, job.who, job.state, job.detail)
        self._emit(vault, job, "action.succeeded" if job.state == "succeeded"
                   else "action.failed")

    def _emit(self, vault: Vault, job: Job, kind: str) -> None:
        try:
            vault.events.emit(Event(
                kind, job.database, self.clock(), started_at=job.started_at,
                finished_at=job.finished_at,
                duration=((job.finished_at - job.started_at).total_seconds()
                          if job.finished_at else None),
                error=job.detail if kind == "action.failed" else None,
                details={"action": job.action, "who": job.who, "job": job.id,
                         "command": job.command}))
        except Exception as exc:  # a notifier never fails an action
            log.warning("console: could not announce %s of %s: %s", kind, job.database, exc)


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def form_values(raw: Mapping[str, Any]) -> dict[str, str]:
    """parse_qs's lists as single values (the first of each)."""
    return {k: (v[0] if isinstance(v, list) and v else str(v)) for k, v in raw.items()}
