"""What the console's pages show, as plain rows built from what the repository says.

The state of a database is ``DatabaseStatus.verdict`` of ``ops.jobs.status_of``, with the
[check] thresholds of its settings: exactly what `pgvault check` and `pgvault status`
say, never judged a second way here. The retention column is the plan a dry-run prune
makes now (``ops.prune.prune``), so the page says what the next prune keeps and removes.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from urllib.parse import quote

from pgvault.console import human_bytes, human_seconds
from pgvault.errors import PgvaultError
from pgvault.health import CRITICAL, OK, STATE_NAMES, UNKNOWN, WARNING, DatabaseStatus, Verdict
from pgvault.model import Manifest, VerifyReport
from pgvault.ops import jobs
from pgvault.redact import scrub
from pgvault.vault import Vault

Sources = Callable[[], Iterable[tuple[str, Vault]]]
"""(database name, its vault) of every database the console shows, asked per request."""
NextRuns = Callable[[], Mapping[tuple[str, str], datetime]]
"""(database, job) -> the next scheduled run (the daemon's scheduler), or nothing."""

STATE_CLASS = {OK: "ok", WARNING: "warning", CRITICAL: "critical", UNKNOWN: "unknown"}


def database_href(name: str) -> str:
    return "/db/" + quote(name, safe="")


def ago(seconds: float) -> str:
    """'3.2s ago', '4m05s ago', '2h10m00s ago', or '3 days ago' past two days."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days ago"
    return f"{human_seconds(max(seconds, 0))} ago"


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"


@dataclass(frozen=True)
class Row:
    """One database on the overview."""

    database: str
    href: str
    state: int
    reasons: tuple[str, ...]
    newest: str = "none"
    age_seconds: float | None = None
    rpo: str = ""
    rpo_met: bool | None = None
    drill: str = "never drilled"
    drill_passed: bool | None = None
    rto: str = ""
    rto_met: bool | None = None
    archive: str = ""
    next_runs: str = ""
    last_error: str = ""
    running: str = ""
    untrusted: int = 0
    copies: str = ""
    """'n of m in sync' ([[repos]] copies), or empty without copies."""
    copies_ok: bool | None = None

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]

    @property
    def state_class(self) -> str:
        return STATE_CLASS[self.state]

    @property
    def age(self) -> str:
        return "" if self.age_seconds is None else ago(self.age_seconds)


def verdict_of(status: DatabaseStatus, vault: Vault, now: datetime) -> Verdict:
    """The verdict `pgvault check` gives this database, with its settings' thresholds."""
    check = vault.settings.check
    return status.verdict(now, warn_age_hours=check.warn_age_hours,
                          warn_drill_age_days=check.warn_drill_age_days)


def row(status: DatabaseStatus, verdict: Verdict, now: datetime,
        next_runs: Mapping[str, datetime] | None = None) -> Row:
    """The overview row of one database."""
    newest = status.newest
    age = status.age(now)
    rpo = timedelta(hours=status.rpo_hours)
    drill = status.drill
    history = status.history
    failure = history.last_failure
    last_error = ""
    if failure is not None:
        last_error = f"{_when(failure.at)}: {failure.error or 'unknown error'}"
        if not history.failing:
            last_error += " (succeeded since)"
    if drill is None:
        drill_text, rto_text = "never drilled", ""
    else:
        drill_text = (f"{'PASS' if drill.passed else 'FAIL'} {drill.level} of "
                      f"{drill.backup_id}, {ago((now - drill.finished_at).total_seconds())}")
        rto_text = ("" if drill.restore_seconds is None else
                    f"restore {human_seconds(drill.restore_seconds)} of RTO "
                    f"{status.rto_minutes:g}m")
    archive = ""
    if status.archive is not None:
        last = status.archive.last_archived_at
        archive = (f"{status.archive.last_wal or 'empty'}, "
                   + (ago((now - last).total_seconds()) if last else "never archived")
                   + f", {len(status.archive.gaps)} gap(s)")
    running = ""
    if status.running is not None:
        running = f"{status.running.get('operation')} since {status.running.get('since')}"
    return Row(
        database=status.database,
        href=database_href(status.database),
        state=verdict.state,
        reasons=tuple(scrub(r) for r in verdict.reasons),
        newest=newest.id if newest is not None else "none",
        age_seconds=None if age is None else age.total_seconds(),
        rpo=f"RPO {status.rpo_hours:g}h",
        rpo_met=None if age is None else age <= rpo,
        drill=drill_text,
        drill_passed=None if drill is None else drill.passed,
        rto=rto_text,
        rto_met=status.rto_met(),
        archive=archive,
        next_runs=", ".join(f"{job} {_when(when)}" for job, when in sorted(
            (next_runs or {}).items())),
        last_error=scrub(last_error),
        running=running,
        untrusted=len(status.bad),
    )


def unreadable(name: str, exc: Exception) -> Row:
    """A database whose repository could not be read: UNKNOWN, as `pgvault check` says."""
    return Row(database=name, href=database_href(name), state=UNKNOWN,
               reasons=(scrub(str(exc)) or type(exc).__name__,))


StatusOf = Callable[[Vault, str], DatabaseStatus]


def overview(sources: Iterable[tuple[str, Vault]], now: datetime,
             next_runs: Mapping[tuple[str, str], datetime] | None = None,
             status_of: StatusOf = jobs.status_of,
             open_copy: OpenCopy | None = None) -> list[Row]:
    """Every database's row, worst state first (UNKNOWN, CRITICAL, WARNING, OK), then by
    name; ``status_of`` is ``ops.jobs.status_of`` (the console's reuses unchanged ones)."""
    runs: dict[str, dict[str, datetime]] = {}
    for (name, job), when in (next_runs or {}).items():
        runs.setdefault(name, {})[job] = when
    rows = []
    for name, vault in sources:
        try:
            status = status_of(vault, name)
        except PgvaultError as exc:
            rows.append(unreadable(name, exc))
            continue
        found = row(status, verdict_of(status, vault, now), now, runs.get(name))
        if vault.copies:
            copies = copies_of(name, vault, now, open_copy)
            good = sum(1 for c in copies if c.in_sync)
            found = replace(found, copies=f"{good} of {len(copies)} in sync",
                            copies_ok=good == len(copies))
        rows.append(found)
    rows.sort(key=lambda r: (-r.state, r.database))
    return rows


# -- the database page ---------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    level: str
    name: str
    status: str  # PASS, FAIL, WARN, SKIP
    detail: str


@dataclass(frozen=True)
class DrillView:
    backup_id: str
    level: str
    finished: str
    passed: bool
    restore: str
    rto_met: bool | None
    where: str
    checks: list[Check]


@dataclass(frozen=True)
class BackupView:
    id: str
    kind: str
    started: str
    age: str
    size: str
    size_bytes: int
    duration: str
    compression: str
    pinned: str
    retention: str
    removed_next: bool
    trust: str
    """Empty when the backup can be trusted; else why not (damaged, failed integrity)."""
    drill: str


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    text: str
    x: float
    y: float
    width: float
    height: float
    bad: bool = False


@dataclass(frozen=True)
class Chart:
    """A bar chart drawn on the server as inline SVG, with its table as the fallback."""

    id: str
    title: str
    description: str
    unit: str
    bars: list[Bar]
    objective: float | None = None
    """The objective's line (its height in the drawing), when the chart has one."""
    objective_text: str = ""
    top_text: str = ""

    WIDTH = 600
    HEIGHT = 160


def chart(id: str, title: str, unit: str, points: list[tuple[str, float, str]], *,
          objective: tuple[float, str] | None = None, bad: Callable[[float], bool] | None = None
          ) -> Chart | None:
    """Bars for (label, value, value as text), oldest left; None without points."""
    if not points:
        return None
    top = max([v for _, v, _ in points] + ([objective[0]] if objective else [])) or 1.0
    top *= 1.1
    width, height, gap = Chart.WIDTH, Chart.HEIGHT, 4.0
    slot = width / len(points)
    bars = []
    bar = min(max(slot - gap, 1.0), 48.0)  # a few backups stay bars, not blocks
    for n, (label, value, text) in enumerate(points):
        h = max(height * value / top, 2.0 if value > 0 else 0.0)  # far below: still seen
        bars.append(Bar(label, value, text, x=n * slot + (slot - bar) / 2, y=height - h,
                        width=bar, height=h, bad=bool(bad and bad(value))))
    line = None if objective is None else height - height * objective[0] / top
    first, last = points[0][0], points[-1][0]
    description = (f"{len(points)} values from {first} to {last}; highest "
                   f"{max(points, key=lambda p: p[1])[2]}"
                   + (f"; objective {objective[1]}" if objective else "")
                   + ". The table below lists every value.")
    return Chart(id, title, description, unit, bars, line,
                 objective[1] if objective else "", human_value(top / 1.1, unit))


def human_value(value: float, unit: str) -> str:
    return human_bytes(int(value)) if unit == "bytes" else human_seconds(value)


@dataclass(frozen=True)
class CopyView:
    name: str
    state: str
    in_sync: bool | None


@dataclass
class DatabasePage:
    database: str
    repository: str
    row: Row
    backups: list[BackupView] = field(default_factory=list)
    drills: list[DrillView] = field(default_factory=list)
    plan_note: str = ""
    commands: list[tuple[str, str]] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    plan: list[tuple[str, str, str]] = field(default_factory=list)
    """(backup id, kept/removed, why) as the next prune decides."""
    copies: list[CopyView] = field(default_factory=list)
    snapshots: str = ""
    newest: str = ""

    @property
    def copies_in_sync(self) -> str:
        good = sum(1 for c in self.copies if c.in_sync)
        return f"{good} of {len(self.copies)} in sync"


def _compression(manifest: Manifest) -> str:
    names = []
    for artifact in manifest.artifacts[:1]:
        for stage in artifact.stages:
            level = getattr(stage, "level", None)
            if stage.name in ("sha256", "digest"):
                continue
            names.append(stage.name + (f" {level}" if level is not None else ""))
    return ", ".join(names) or "none"


def _drill_view(report: VerifyReport) -> DrillView:
    restore = ("" if report.restore_seconds is None else
               f"{human_seconds(report.restore_seconds)} of RTO "
               f"{human_seconds(report.rto_objective_seconds)}")
    return DrillView(
        backup_id=report.backup_id, level=report.level, finished=_when(report.finished_at),
        passed=report.passed, restore=restore, rto_met=report.rto_met,
        where=scrub(report.where),
        checks=[Check(c.level, c.name, c.status.upper(), scrub(c.detail)) for c in report.checks])


def commands(name: str, vault: Vault, newest: str | None) -> list[tuple[str, str]]:
    """(what, the exact command) for each thing a user does to this database."""
    from pgvault.web.actions import command_for, where_args

    backup_id = newest or "latest"

    def cmd(*args: str) -> str:
        return shlex.join(["pgvault", *args, *where_args(vault)])

    return [
        ("Back up now", command_for("backup", name, vault, {})),
        ("Restore drill of the newest backup",
         command_for("drill", name, vault, {"backup": backup_id})),
        ("Restore into a new database", command_for(
            "restore", name, vault, {"backup": backup_id, "target": f"{name}_restored"})),
        ("Pin (never pruned)",
         command_for("pin", name, vault, {"backup": backup_id, "reason": "why"})),
        ("Unpin", command_for("unpin", name, vault, {"backup": backup_id})),
        ("What the next prune removes", cmd("prune", "--dry-run", "-d", name)),
        ("Status as monitoring sees it", cmd("check", "-d", name)),
    ]


def database_page(name: str, vault: Vault, now: datetime,
                  next_runs: Mapping[tuple[str, str], datetime] | None = None,
                  open_copy: OpenCopy | None = None) -> DatabasePage:
    """The database page: its row, every backup (newest first) with its retention role and
    trust, every drill's checks, and the commands."""
    from pgvault.ops.prune import prune

    status = jobs.status_of(vault, name)
    runs = {job: when for (db, job), when in (next_runs or {}).items() if db == name}
    page = DatabasePage(database=name, repository=scrub(vault.storage.url),
                        row=row(status, verdict_of(status, vault, now), now, runs))
    catalog = vault.catalog
    listing = catalog.scan(name)
    drills = catalog.drill_records(name)
    bad = dict(status.bad)
    decisions: dict[str, tuple[str, bool]] = {}
    try:
        report = prune(vault.storage, vault.policy, dry_run=True, now=now,
                       lock_stale_after=vault.lock_stale_after, database=name,
                       recovery_window=vault.recovery_window)
        plan = report.databases.get(name)
        if plan is not None:
            for d in plan.keep:
                decisions[d.id] = ("kept: " + ", ".join(d.reasons), False)
                page.plan.append((d.id, "keep", ", ".join(d.reasons)))
            for d in plan.remove:
                decisions[d.id] = ("removed by the next prune: " + (d.because or "no rule "
                                                                     "keeps it"), True)
                page.plan.append((d.id, "remove", d.because or "no rule keeps it"))
            page.plan.sort(reverse=True)
            if plan.refused:
                page.plan_note = scrub(f"the next prune is refused: {plan.refused}")
    except PgvaultError as exc:
        page.plan_note = scrub(f"no retention plan: {exc}")
    for manifest in reversed(listing.manifests):
        took = (manifest.finished_at - manifest.started_at).total_seconds()
        role, removed = decisions.get(manifest.id, ("", False))
        drill = drills.newest.get((name, manifest.id))
        page.backups.append(BackupView(
            id=manifest.id, kind=manifest.kind, started=_when(manifest.started_at),
            age=ago((now - manifest.started_at).total_seconds()),
            size=human_bytes(manifest.size), size_bytes=manifest.size,
            duration=human_seconds(took), compression=_compression(manifest),
            pinned=scrub(manifest.pin.reason) if manifest.pin else "",
            retention=scrub(role), removed_next=removed, trust=scrub(bad.get(manifest.id, "")),
            drill="" if drill is None else ("PASS" if drill.passed else "FAIL")))
    for damaged in listing.damaged:
        page.backups.append(BackupView(
            id=damaged.backup_id, kind="?", started="", age="", size="", size_bytes=0,
            duration="", compression="", pinned="", retention="never touched by prune",
            removed_next=False, trust=scrub(damaged.reason), drill=""))
    page.backups.sort(key=lambda b: b.id, reverse=True)
    page.drills = [_drill_view(r) for r in sorted(
        drills.newest.values(), key=lambda r: r.finished_at, reverse=True)]
    page.commands = commands(name, vault, status.newest.id if status.newest else None)
    page.newest = status.newest.id if status.newest else ""
    page.charts = _charts(listing.manifests, list(drills.newest.values()),
                          status.rto_minutes * 60)
    page.copies = copies_of(name, vault, now, open_copy)
    if status.snapshots:
        newest_snapshot = status.newest_snapshot
        page.snapshots = f"{status.snapshots} provider snapshot(s)" + (
            f", newest {newest_snapshot.id}, "
            f"{ago((now - newest_snapshot.started_at).total_seconds())}"
            if newest_snapshot is not None else "")
    return page


def _charts(manifests: list[Manifest], reports: list[VerifyReport],
            rto_seconds: float) -> list[Chart]:
    """Size and duration of the last 60 backups, and the RTO each drill measured."""
    backups = [m for m in manifests if m.kind != "snapshot"][-60:]
    found = [
        chart("chart-size", "Backup size", "bytes",
              [(m.id, float(m.size), human_bytes(m.size)) for m in backups]),
        chart("chart-duration", "Backup duration", "seconds",
              [(m.id, d, human_seconds(d)) for m in backups
               if (d := (m.finished_at - m.started_at).total_seconds()) >= 0]),
        chart("chart-rto", "Restore time (RTO) per drill", "seconds",
              [(f"{r.backup_id} ({r.finished_at:%Y-%m-%d %H:%M}Z)", r.restore_seconds,
                human_seconds(r.restore_seconds))
               for r in sorted(reports, key=lambda r: r.finished_at)[-60:]
               if r.restore_seconds is not None],
              objective=(rto_seconds, human_seconds(rto_seconds)),
              bad=lambda v: v > rto_seconds),
    ]
    return [c for c in found if c is not None]


OpenCopy = Callable[[Vault, str], Vault]
"""(vault, [[repos]] name) -> the vault of that copy (the console's reads it through the
request's view of its storage)."""


def copies_of(name: str, vault: Vault, now: datetime,
              open_copy: OpenCopy | None = None) -> list[CopyView]:
    """Each [[repos]] copy of this repository: in sync, or how far behind (ops.copy.lag)."""
    if not vault.copies:
        return []
    from pgvault.ops.copy import lag

    found = []
    for repo in vault.copies:
        entry = next(e for e in vault.settings.repos if e.name == repo)
        objective = timedelta(hours=entry.copy_lag_hours or 24)
        try:
            target = (open_copy or Vault.repository)(vault, repo)
            behind = lag(vault.catalog, target.catalog, target.policy, now, name=repo,
                         objective=objective, database=name)
        except PgvaultError as exc:
            found.append(CopyView(repo, scrub(f"unreadable: {exc}"), None))
            continue
        if behind.behind == 0:
            found.append(CopyView(repo, "in sync", True))
            continue
        age = behind.age(now)
        found.append(CopyView(repo, f"{behind.behind} backup(s) behind" + (
            f", newest missing {ago(age.total_seconds())}" if age is not None else "")
            + (" — LATE" if behind.late(now) else ""), False))
    return found
