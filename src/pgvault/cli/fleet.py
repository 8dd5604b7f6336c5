"""`pgvault run --shard I/N`: one worker of a fleet of [[databases]]."""

from __future__ import annotations

import json
from typing import Any

import click

from pgvault.cli.app import EXIT_CODES, cli, common, invocation, settings_of, startup_done
from pgvault.errors import BackupFailed, UsageError

FLEET_HELP = """\b
Fleet settings ([fleet] in the config file, or PGVAULT_FLEET__<KEY>):
  window_hours = 24          one backup per database per window (aligned on UTC)
  jitter_minutes = 0         starts spread over the first minutes of the window
  max_per_repository = 4     backups at once in the repository, across all workers
  max_per_server = 1         backups at once per database server (host:port)
  lease_seconds = 120        a worker that stops renewing loses its databases after this
  backoff_seconds = 60       wait after a failure, doubled each time ...
  backoff_max_seconds = 3600 ... up to this
"""


@cli.command("run", epilog=FLEET_HELP + "\n" + EXIT_CODES)
@common
@click.option("--shard", metavar="I/N", default=None,
              help="This worker's shard: worker I (0-based) of N. Default: a Kubernetes "
                   "Indexed Job's JOB_COMPLETION_INDEX / JOB_COMPLETIONS, else 0/1.")
@click.option("--json", "as_json", is_flag=True, help="Print the window's report as JSON.")
@click.pass_context
def run(ctx: click.Context, /, shard: str | None, as_json: bool, **_: Any) -> None:
    """Back up this shard of the fleet's [[databases]] once in the current window.

    Each database belongs to one shard (rendezvous hashing of its name: changing N
    moves about 1/N of them). It is backed up under a lease in the repository
    (fleet/leases/<db>.json, a conditional write renewed while the backup runs), so a
    database gets one backup per window even when workers overlap, restart, or disagree
    on N; a lease not renewed for lease_seconds is taken over. The run returns once
    every database of the shard has this window's backup (exit 0), or the window ends
    without one for some (exit 8, naming them). Missed windows (an outage) give one
    catch-up backup in the current window, not one per window missed.

    Under the same lease and cap slots each database's other due jobs follow its
    backup: its restore drill (verify_after_backup, or when [schedule] verify is
    due), the prune (prune_after_backup), and a copy to each [[repos]] copy (then
    pruned by that copy's own policy). A worker whose lease is taken over (it was
    paused past lease_seconds) aborts the job, says who took it over, and removes
    what it wrote. `pgvault fleet status` shows every database's window.

    \b
    Examples:
      pgvault run --shard 0/1 --config fleet.toml     # the whole fleet, one worker
      pgvault run --shard 2/4 --config fleet.toml     # worker 2 of 4 (0-based)
      JOB_COMPLETION_INDEX=1 JOB_COMPLETIONS=4 pgvault run --config fleet.toml
    """
    from pgvault import fleet
    from pgvault.ops.fleet import run_shard

    environ = invocation(ctx).environ
    try:
        chosen = (fleet.parse_shard(shard) if shard is not None
                  else fleet.shard_from_environ(environ) or fleet.Shard(0, 1))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = settings_of(ctx)
    startup_done()
    # Drills after each backup, or on [schedule] verify's schedule (ops.fleet decides
    # per database which is due).
    drill_for = (_drill_for if settings.verify_after_backup or settings.schedule.verify
                 or any(t.settings.verify_after_backup for t in _targets(settings))
                 else None)
    report = run_shard(settings, chosen, drill_for=drill_for)
    if as_json:
        click.echo(json.dumps({
            "shard": str(report.shard), "window": report.window.index,
            "window_start": report.window.start.isoformat(), "databases": report.databases,
            "backed_up": report.backed_up, "found": report.found,
            "abandoned": report.abandoned, "failures": report.failures,
            "missed": report.missed, "jobs": report.jobs, "lost": report.lost},
            indent=2, sort_keys=True))
    else:
        click.echo(f"shard {report.shard}, window {report.window.index}: "
                   f"{len(report.backed_up)} backed up, {len(report.found)} already had "
                   f"this window's backup, {len(report.missed)} missed "
                   f"(of {report.databases})", err=True)
    if report.missed:
        first = report.missed[0]
        reason = report.failures.get(first, "not reached")
        raise BackupFailed(f"{len(report.missed)} of {report.databases} databases of shard "
                           f"{report.shard} have no backup in window {report.window.index}: "
                           f"{', '.join(report.missed[:10])}; {first}: {reason}")


def _targets(settings: Any) -> list[Any]:
    from pgvault.ops.fleet import fleet_targets

    return fleet_targets(settings)


def _drill_for(vault: Any) -> Any:
    """verify_after_backup: a restore drill of each new backup."""
    from pgvault.cli.verify import scratch_servers, summary_line, verify_options
    from pgvault.ops.verify import verify

    def drill(manifest: Any) -> Any:
        with scratch_servers(vault.settings) as servers:
            report = verify(vault.storage, manifest, verify_options(vault), servers)
        click.echo(summary_line(report), err=True)
        return report

    return drill


FLEET_CHECK_CODES = """\b
Exit codes (monitoring-plugin convention, as pgvault check):
  0  OK        every database had a backup in the last complete window
  1  WARNING   a database missed it but a worker is still running it, a
               database's current attempt failed (it is retried), or a job
               after a backup (drill, copy, prune) failed
  2  CRITICAL  a database missed its window: never started, failed (its last
               error), or its lease was lost (a worker stopped renewing it)
  3  UNKNOWN   the configuration or the repository could not be read
"""


@cli.group("fleet", epilog=EXIT_CODES)
def fleet_group() -> None:
    """The whole fleet's state, from the lease records in the repository.

    Every database is judged against the current window (`[fleet] window_hours`):
    done (it has this window's backup), due, running or failing (not yet, but the
    previous window had one), or missed (the last complete window ended without
    one), with the reason: never started, failed (its last error), lease lost (a
    worker stopped renewing it), or still running.

    \b
    Examples:
      pgvault fleet status --config fleet.toml          # one line per database
      pgvault fleet status --missed --config fleet.toml # only what needs a look
      pgvault fleet check --config fleet.toml           # Nagios: OK/WARNING/CRITICAL
      pgvault fleet metrics --config fleet.toml > /var/lib/node-exporter/fleet.prom
    """


def _shards_option(func: Any) -> Any:
    return click.option("--shards", type=click.IntRange(1, 10000), default=None,
                        metavar="N", help="Group by N shards (default: the N the workers "
                                          "of the latest windows ran with).")(func)


def _status(ctx: click.Context, shards: int | None) -> Any:
    from pgvault.ops.fleet import fleet_status

    settings = settings_of(ctx)
    startup_done()
    return fleet_status(settings, shards=shards)


@fleet_group.command("status", epilog=EXIT_CODES)
@common
@_shards_option
@click.option("--missed", "only_missed", is_flag=True,
              help="Only the databases that missed their window.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def fleet_status_command(ctx: click.Context, /, shards: int | None, only_missed: bool,
                         as_json: bool, **_: Any) -> None:
    """Every database's standing in the current window, and a summary per shard.

    Exit 12 when a database missed its window (as `pgvault status` for CRITICAL).

    \b
    Example output:
      window 20429 (2025-12-07T00:00:00+00:00), 4 shards: 298 done, 1 due, 1 missed
      shard 0/4  75 databases: 75 done
      shard 1/4  76 databases: 74 done, 1 due, 1 missed
      orders  missed  failed 3 time(s), last at 2025-12-07T02:10:00+00:00: ...
    """
    from pgvault.errors import StatusCritical

    status = _status(ctx, shards)
    shown = status.missed if only_missed else status.databases
    if as_json:
        click.echo(json.dumps({
            "window": status.window.index, "window_start": status.window.start.isoformat(),
            "window_end": status.window.end.isoformat(), "shards": status.shards,
            "counts": status.counts(),
            "by_shard": {f"{n}/{status.shards}": row for n, row in status.by_shard().items()},
            "databases": [{"database": s.database, "shard": s.shard, "standing": s.standing,
                           "reason": s.reason, "backup_id": s.backup_id,
                           "problems": list(s.problems)} for s in shown]},
            indent=2, sort_keys=True))
    else:
        click.echo(f"window {status.window.index} ({status.window.start.isoformat()}), "
                   f"{status.shards} shard(s): {_counts(status.counts())}")
        for number, row in status.by_shard().items():
            click.echo(f"shard {number}/{status.shards}  {sum(row.values())} databases: "
                       f"{_counts(row)}")
        width = max((len(s.database) for s in shown), default=0)
        for s in shown:
            line = f"{s.database:<{width}}  {s.standing:<7}  {s.reason}"
            if s.problems:
                line += "; " + "; ".join(s.problems)
            click.echo(line)
    if status.missed:
        first = status.missed[0]
        raise StatusCritical(f"{len(status.missed)} of {len(status.databases)} databases "
                             f"missed their window; {first.database}: {first.reason}")


def _counts(row: dict[str, int]) -> str:
    return ", ".join(f"{count} {name}" for name, count in row.items() if count) or "none"


@fleet_group.command("check", epilog=FLEET_CHECK_CODES)
@common
@_shards_option
@click.pass_context
def fleet_check(ctx: click.Context, /, shards: int | None, **_: Any) -> None:
    """Monitoring-plugin check of the whole fleet: one status line plus perfdata.

    \b
    Examples:
      pgvault fleet check --config fleet.toml
      # PGVAULT FLEET CRITICAL - 1 of 300 missed their window: orders (failed ...) |
      #   done=298 due=1 running=0 failing=0 missed=1
    """
    import sys

    from pgvault.health import CRITICAL, OK, STATE_NAMES, UNKNOWN, WARNING

    try:
        status = _status(ctx, shards)
    except Exception as exc:  # UNKNOWN, never a traceback
        from pgvault.redact import scrub

        click.echo(f"PGVAULT FLEET UNKNOWN - {scrub(str(exc)) or type(exc).__name__}")
        sys.exit(UNKNOWN)
    counts = status.counts()
    perfdata = " ".join(f"{name}={count}" for name, count in counts.items())
    hard = [s for s in status.missed if not s.reason.startswith("still running")]
    soft = [s for s in status.databases if s.standing == "failing" or s.problems
            or (s.standing == "missed" and s.reason.startswith("still running"))]
    worst = CRITICAL if hard else WARNING if soft else OK
    if worst == OK:
        summary = f"{len(status.databases)} databases, {counts['done']} done this window"
    else:
        named = (hard or soft)[:5]
        summary = (f"{len(status.missed)} of {len(status.databases)} missed their window"
                   if status.missed else f"{len(soft)} of {len(status.databases)} need a look")
        summary += ": " + "; ".join(f"{s.database} ({s.reason}"
                                    + (f"; {'; '.join(s.problems)}" if s.problems else "")
                                    + ")" for s in named)
    click.echo(f"PGVAULT FLEET {STATE_NAMES[worst]} - {summary} | {perfdata}")
    sys.exit(worst)


@fleet_group.command("metrics", epilog=EXIT_CODES)
@common
@_shards_option
@click.option("--textfile", metavar="PATH", default=None,
              help="Write them (atomically) for node_exporter's textfile collector instead "
                   "of printing them.")
@click.pass_context
def fleet_metrics_command(ctx: click.Context, /, shards: int | None, textfile: str | None,
                          **_: Any) -> None:
    """The fleet's Prometheus metrics: databases per standing, each missed window with
    its cause, per shard.

    \b
    Examples:
      pgvault fleet metrics --config fleet.toml
      pgvault fleet metrics --textfile /var/lib/node-exporter/pgvault-fleet.prom
    Families: pgvault_fleet_databases{standing}, pgvault_fleet_window_missed{database,
    cause}, pgvault_fleet_shard_databases{shard,standing},
    pgvault_fleet_window_start_timestamp_seconds.
    """
    import os
    import tempfile

    from pgvault.ops.fleet import fleet_metrics

    data = fleet_metrics(_status(ctx, shards))
    if textfile is None:
        click.echo(data.decode(), nl=False)
        return
    folder = os.path.dirname(os.path.abspath(textfile))
    with tempfile.NamedTemporaryFile("wb", dir=folder, delete=False,
                                     prefix=".pgvault-fleet.") as out:
        out.write(data)
    os.chmod(out.name, 0o644)
    os.replace(out.name, textfile)
