"""Commands for running unattended and watching: status, check (Nagios), daemon."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import click

from pgvault.cli.app import (
    EXIT_CODES,
    cli,
    common,
    database_filter,
    dbname_option,
    invocation,
    settings_of,
    startup_done,
)

CHECK_CODES = """\b
Exit codes (monitoring-plugin convention):
  0  OK        every database meets its objectives
  1  WARNING   e.g. the last backup run failed but the newest good one is within
               the RPO, no restore drill for [check] warn_drill_age_days (8), a
               backup that cannot be trusted (damaged manifest, failed integrity)
               or a damaged drill or status record
  2  CRITICAL  newest good backup older than the RPO objective (or none), or the
               last restore drill failed or missed the RTO objective
  3  UNKNOWN   the configuration or the repository could not be read, or the
               repository does not exist (no such folder or bucket)
"""

STATUS_CODES = """\b
Exit codes:
  0   every database shown is OK or WARNING
  12  a database shown is CRITICAL (the state line says why)
  5   the repository could not be read, or does not exist (no such folder or
      bucket: a typo in --repo is never "no backups yet")
  3   configuration error; the other codes as for every command (pgvault --help)
"""


def _monitored(settings: Any, dbname: str | None) -> list[tuple[str, Any]]:
    """(database name, its vault) for every database to report on.

    Configured databases ([[databases]], or the one the connection names); with none
    named anywhere, every database that has backups in the repository.
    """
    from pgvault import config
    from pgvault.vault import Vault

    storages: dict[str, Any] = {}

    def vault(target_settings: Any) -> Any:
        shared = storages.get(target_settings.repo)
        opened = Vault.open(target_settings, storage=shared)
        if shared is None:
            startup_done()
            # A mistyped repository must not read as an empty one.
            opened.catalog.require()
            storages[target_settings.repo] = opened.storage
        return opened

    targets = config.targets(settings)
    wanted = database_filter(dbname)
    if wanted:
        chosen = next((t for t in targets if t.name == wanted), targets[0])
        return [(wanted, vault(chosen.settings))]
    result = []
    for target in targets:
        name = target.name or config.connection(target.settings).dbname
        if name:
            result.append((name, vault(target.settings)))
        else:
            found = vault(target.settings)
            result += [(n, found) for n in found.catalog.databases()]
    return result


def _statuses(settings: Any, dbname: str | None) -> list[tuple[Any, Any]]:
    from pgvault.cli.snapshot import with_audit
    from pgvault.engines.supabase import with_provider_backups
    from pgvault.ops.jobs import status_of

    return [(with_provider_backups(with_audit(status_of(v, name), v), v.settings), v.settings)
            for name, v in _monitored(settings, dbname)]


@cli.command(epilog=STATUS_CODES)
@common
@dbname_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per "
              "database.")
@click.pass_context
def status(ctx: click.Context, /, dbname: str | None, as_json: bool, **_: Any) -> None:
    """Show each database's newest backup, its age against the RPO, failures and drills.

    Everything comes from the repository (manifests, the run history pgvault
    records there, drill records), so it is true for backups run by cron,
    systemd, Kubernetes or the daemon alike. "Newest backup" is the newest one
    that can be trusted: a damaged manifest or a last drill that failed integrity
    puts a backup under "cannot trust" instead. The state is that of `pgvault
    check`, and a CRITICAL one makes the exit code 12, so `pgvault status ||
    alert` works from cron.

    \b
    Examples:
      pgvault status
      pgvault status -d app --json | jq '.[0].age_seconds'
      pgvault status -d app || echo "app is CRITICAL" | mail -s pgvault ops
    """
    from pgvault.console import human_bytes, human_seconds
    from pgvault.errors import StatusCritical
    from pgvault.ops.status import CRITICAL

    settings = settings_of(ctx)
    now = datetime.now(UTC)
    rows = [(status, s, status.verdict(now, warn_age_hours=s.check.warn_age_hours,
                                       warn_drill_age_days=s.check.warn_drill_age_days))
            for status, s in _statuses(settings, dbname)]
    critical = [(status.database, verdict) for status, _, verdict in rows
                if verdict.state == CRITICAL]
    failed = StatusCritical("CRITICAL: " + "; ".join(
        f"{name}: {'; '.join(verdict.reasons)}" for name, verdict in critical))
    if as_json:
        out = []
        for status, _, verdict in rows:
            entry = status.to_json(now)
            entry["state"] = verdict.name
            entry["reasons"] = list(verdict.reasons)
            if settings.repos:
                from pgvault.cli.copy import copy_status

                entry["copies"] = copy_status(settings, status.database, now)[2]
            out.append(entry)
        click.echo(json.dumps(out, indent=2, default=str))
        if critical:
            raise failed
        return
    if not rows:
        click.echo("no databases configured and no backups in the repository")
        return
    for index, (status, _s, verdict) in enumerate(rows):
        if index:
            click.echo("")
        click.echo(f"{status.database}  ({status.repository})")
        newest = status.newest
        age = status.age(now)
        if newest is None or age is None:
            click.echo("  newest backup  none")
        else:
            met = "met" if age.total_seconds() <= status.rpo_hours * 3600 else "MISSED"
            took = (newest.finished_at - newest.started_at).total_seconds()
            click.echo(f"  newest backup  {newest.id}, {human_seconds(age.total_seconds())} "
                       f"ago (RPO {status.rpo_hours:g}h {met}), {human_bytes(newest.size)}, "
                       f"took {human_seconds(took)}")
            oldest = status.oldest_time
            click.echo(f"  backups        {status.backups}"
                       + (f", oldest {oldest:%Y-%m-%d %H:%M}Z" if oldest else ""))
        failure = status.history.last_failure
        click.echo("  last failure   " + ("none" if failure is None else
                   f"{failure.at:%Y-%m-%d %H:%M}Z: {failure.error}"
                   + ("" if status.history.failing else " (succeeded since)")))
        drill = status.drill
        if drill is None:
            click.echo("  last drill     none (pgvault verify)")
        else:
            restore = ("" if drill.restore_seconds is None else
                       f", restore {human_seconds(drill.restore_seconds)} (RTO "
                       f"{status.rto_minutes:g}m {'met' if status.rto_met() else 'MISSED'})")
            click.echo(f"  last drill     {'PASSED' if drill.passed else 'FAILED'} "
                       f"{drill.level} of {drill.backup_id} at "
                       f"{drill.finished_at:%Y-%m-%d %H:%M}Z{restore}")
        archive = status.archive
        if archive is not None:
            last = archive.last_archived_at
            lag = f"{human_seconds((now - last).total_seconds())} ago" if last else "never"
            start, end = archive.earliest_restore, archive.latest_restore
            window = (f"; recoverable {start:%Y-%m-%d %H:%M:%S}Z .. {end:%Y-%m-%d %H:%M:%S}Z"
                      if start and end else "; no recoverable window yet")
            click.echo(f"  WAL archive    {archive.last_wal or 'empty'} archived {lag}, "
                       f"{len(archive.gaps)} gap(s){window}")
        from pgvault.cli.snapshot import status_lines

        for line in status_lines(status, now):
            click.echo(line)
        listed = status.provider_backups
        if listed is not None:  # [supabase]: the provider's own backups, only listed
            what = f"{listed.provider} {listed.source_id}"
            newest = ("none completed" if listed.newest is None else
                      f"newest {human_seconds((now - listed.newest).total_seconds())} ago")
            pitr = "PITR on" + (f" (to {listed.pitr_latest:%Y-%m-%d %H:%M}Z)"
                                if listed.pitr_latest else "") if listed.pitr_enabled \
                else "PITR off"
            click.echo(f"  provider       {what}: could not be listed: {listed.error}"
                       if listed.error else
                       f"  provider       {what}: {listed.backups} physical backups, "
                       f"{newest}, {pitr} (listed only: the logical backups are the "
                       "portable copy)")
        copy_lines: list[str] = []
        copy_warnings: list[str] = []
        if settings.repos:
            from pgvault.cli.copy import copy_status

            copy_lines, copy_warnings, _copies = copy_status(settings, status.database, now)
        for line in copy_lines:
            click.echo(line)
        if status.running is not None:
            click.echo(f"  running now    {status.running.get('operation')} since "
                       f"{status.running.get('since')}")
        for backup_id, why in status.bad:
            click.echo(f"  cannot trust   {backup_id}: {why}")
        for problem in status.damaged_records:
            click.echo(f"  damaged        {problem}")
        state = "WARNING" if copy_warnings and verdict.name == "OK" else verdict.name
        reasons = [*verdict.reasons, *copy_warnings]
        click.echo(f"  state          {state}"
                   + (": " + "; ".join(reasons) if reasons else ""))
    if critical:
        raise failed


@cli.command(epilog=CHECK_CODES)
@common
@dbname_option
@click.option("--warn-age", "warn_age", type=float, metavar="HOURS",
              help="WARNING when the newest backup is older than this (below the RPO) "
                   "[config check.warn_age_hours].")
@click.option("--warn-drill-age", "warn_drill_age", type=float, metavar="DAYS",
              help="WARNING when the last restore drill is older than this, or missing; 0 "
                   "turns it off [config check.warn_drill_age_days, default 8].")
@click.pass_context
def check(ctx: click.Context, /, dbname: str | None, warn_age: float | None,
          warn_drill_age: float | None, **_: Any) -> None:
    """Monitoring-plugin check (Nagios, Icinga, Sensu): one status line plus perfdata.

    CRITICAL when the newest good backup is older than the RPO objective
    ([objectives] rpo_hours, 24 by default) or the last restore drill failed or
    missed the RTO objective. It reads the repository, never the exit status of
    the last command: a backup job that silently stopped running turns CRITICAL.

    \b
    Examples:
      pgvault check                      # PGVAULT OK - app: newest backup 3.1h old ...
      pgvault check -d app --warn-age 20
      # Nagios: command_line  /usr/local/bin/pgvault check --config /etc/pgvault.toml
    """
    from pgvault.ops.status import STATE_NAMES, UNKNOWN

    try:
        settings = settings_of(ctx)
        rows = _statuses(settings, dbname)
    except Exception as exc:  # UNKNOWN, never a traceback, whatever went wrong
        from pgvault.redact import scrub

        click.echo(f"PGVAULT UNKNOWN - {scrub(str(exc)) or type(exc).__name__}")
        sys.exit(UNKNOWN)
    if not rows:
        click.echo("PGVAULT UNKNOWN - no database configured and no backups in the repository")
        sys.exit(UNKNOWN)
    now = datetime.now(UTC)
    worst = 0
    parts: list[str] = []
    perfdata: list[str] = []
    for status, s in rows:
        verdict = status.verdict(
            now,
            warn_age_hours=s.check.warn_age_hours if warn_age is None else warn_age,
            warn_drill_age_days=(s.check.warn_drill_age_days if warn_drill_age is None
                                 else warn_drill_age))
        worst = max(worst, verdict.state)
        age = status.age(now)
        if verdict.reasons:
            parts.append(f"{status.database}: {'; '.join(verdict.reasons)}")
        elif age is not None:
            parts.append(f"{status.database}: newest backup {age.total_seconds() / 3600:.1f}h "
                         f"old (RPO {status.rpo_hours:g}h)")
        perfdata += _perfdata(status, s, now, warn_age)
        if s.repos:  # [[repos]]: each copy's lag against its objective
            from pgvault.cli.copy import copy_status

            copy_warnings = copy_status(s, status.database, now)[1]
            if copy_warnings:
                worst = max(worst, 1)
                parts += [f"{status.database}: {reason}" for reason in copy_warnings]
    click.echo(f"PGVAULT {STATE_NAMES[worst]} - {'; '.join(parts)} | {' '.join(perfdata)}")
    sys.exit(worst)


def _perfdata(status: Any, s: Any, now: datetime, warn_age: float | None) -> list[str]:
    """label=value[unit];warn;crit;min per database (age, count, size, restore time)."""
    label = status.database.replace("'", "_").replace("=", "_")
    age = status.age(now)
    warn_hours = s.check.warn_age_hours if warn_age is None else warn_age
    warn = f"{warn_hours * 3600:.0f}" if warn_hours else ""
    crit = f"{status.rpo_hours * 3600:.0f}"
    out = []
    if age is not None:
        out.append(f"'{label}_age'={age.total_seconds():.0f}s;{warn};{crit};0")
    out.append(f"'{label}_backups'={status.backups};;;0")
    if status.newest is not None:
        out.append(f"'{label}_size'={status.newest.size}B;;;0")
    if status.drill is not None and status.drill.restore_seconds is not None:
        out.append(f"'{label}_restore'={status.drill.restore_seconds:.0f}s;;"
                   f"{status.rto_minutes * 60:.0f};0")
    return out


@cli.command(epilog=EXIT_CODES)
@common
@click.option("--listen", metavar="HOST:PORT", default=None,
              help="Serve /metrics, /healthz and /status here [config daemon.listen, default "
                   "127.0.0.1:9847].")
@click.pass_context
def daemon(ctx: click.Context, /, listen: str | None, **_: Any) -> None:
    """Run every configured database's jobs on their schedules until SIGTERM.

    \b
    Per database: backup at [schedule] backup (default "0 1 * * *", UTC unless
    [schedule] timezone is set; 5-field cron, @daily-style macros, or
    "@every 6h"), prune after it when prune_after_backup is set, a restore drill
    after each backup (verify = "after-backup") or on its own schedule, and a
    freshness check (freshness = "@every 5m") that raises backup.stale once the
    newest good backup is older than the RPO objective, even if no backup ran.
    A run missed while the daemon was down runs once at start. A failed backup
    is retried (retries = 2, retry_backoff_seconds = 60, doubling).

    \b
    SIGTERM / SIGINT: no new work; a running backup may finish within
    [daemon] grace_seconds (300), then it is aborted cleanly (no manifest,
    uploads aborted); exit status 0.

    \b
    Examples:
      pgvault daemon --config /etc/pgvault.toml
      pgvault --log-format json daemon --listen 0.0.0.0:9847     # in a container
      curl -s localhost:9847/status | jq '.databases[] | {database, state}'

    \b
    Config:
      [schedule]
      backup = "0 1 * * *"
      verify = "after-backup"          # or "0 3 * * 0", or leave unset
      jitter_seconds = 300
      [notify]
      slack_webhook_url = "https://hooks.slack.com/services/..."
      ping_url = "https://hc-ping.com/<uuid>"
      [[databases]]                    # several databases, one process
      name = "app"
      [[databases]]
      name = "analytics"
      url_env = "ANALYTICS_DATABASE_URL"
      schedule = { backup = "0 */6 * * *" }
    """
    import os

    from pgvault import logs
    from pgvault.daemon import Daemon

    run = invocation(ctx)
    logs.configure(run.log_format, show_events=True, debug=run.debug)
    settings = settings_of(ctx)
    startup_done()  # the daemon runs for months: collect garbage from the start
    runner = Daemon(settings, listen=listen, drill=_drill)
    code = runner.run()
    if runner.stuck:
        # A job thread that ignored the abort would keep the interpreter alive at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _drill(vault: Any, manifest: Any) -> Any:
    """One restore drill as `pgvault verify` runs it, for the daemon's verify jobs."""
    from pgvault.cli.verify import scratch_servers, verify_options
    from pgvault.ops.verify import verify

    with scratch_servers(vault.settings) as servers:
        return verify(vault.storage, manifest, verify_options(vault), servers)
