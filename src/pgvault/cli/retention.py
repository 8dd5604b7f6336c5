"""Commands for retention: prune, pin, unpin."""

from __future__ import annotations

import json
from typing import Any

import click

from pgvault.cli.app import (
    EXIT_CODES,
    cli,
    common,
    database_filter,
    dbname_option,
    vault_of,
)


@cli.command("prune", epilog=EXIT_CODES)
@common
@dbname_option
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@click.option("--force", is_flag=True, help="Apply a plan that removes more than half of a "
              "database's backups, or prune a database that has a damaged manifest (the "
              "damaged backup is left alone).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def prune_(ctx: click.Context, /, dbname: str | None, dry_run: bool, force: bool,
           as_json: bool, **_: Any) -> None:
    """Remove the backups the retention policy no longer keeps.

    \b
    keep_daily/weekly/monthly/yearly = N keep the newest backup of each of the last
    N days/ISO weeks/months/years that have backups; keep_last = N the N newest;
    keep_within = 30d all within 30 days of the newest. A backup any rule keeps is
    kept; the newest good and pinned ones always are. Default: 7 daily, 4 weekly,
    3 monthly.

    A backup known bad (its last restore drill failed integrity) counts for nothing:
    it fills no rule, is never the newest, and is removed unless pinned; only while a
    database has no good backup at all are its bad ones kept, to salvage from.

    Prune applies its plan at once (it runs from cron), but refuses, per database,
    what a careful operator would stop: removing more than half of its backups
    (apply with --force once you have read the --dry-run), and any database with a
    damaged manifest (--force prunes the others and leaves the damaged one alone).
    Leaving a database without a good backup is refused even with --force.

    With [[repos]] and no --repo, every repository is pruned by its own policy
    (its retention keys over [retention]); --repo NAME prunes one.

    Manifests are deleted before data. Data without a manifest (a failed backup or an
    interrupted prune) is removed once its id and its files are both 24 hours old.
    A database locked by a running backup is skipped, and the exit code is then 7;
    a refused plan exits 2, one refused for a damaged manifest 6 (a --dry-run shows
    the refusal and exits 0).

    \b
    Examples:
      pgvault prune --dry-run                   # KEEP/REMOVE per backup and why
      pgvault prune                             # apply [retention] from the config
      pgvault prune --force -d app              # after reading its --dry-run
      PGVAULT_RETENTION__KEEP_DAILY=14 pgvault prune -d app
      pgvault prune --dry-run --json | jq '.databases[].remove[].id'
      pgvault pin 20261125T010000 --reason "before migration 42"
    """
    from datetime import UTC

    from pgvault.cli.copy import prune_each_repository
    from pgvault.errors import LockHeld
    from pgvault.ops.jobs import PruneRequest, run
    from pgvault.retention import describe

    if prune_each_repository(ctx):  # [[repos]]: each by its own policy
        return
    vault = vault_of(ctx)
    policy = vault.policy  # a bad [retention] fails before the repository is read
    vault.catalog.require()
    report = run(vault, PruneRequest(dry_run=dry_run, force=force,
                                     database=database_filter(dbname)))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(describe(policy))
        for name, plan in report.databases.items():
            if plan.refused:
                click.echo(f"\n{name}: REFUSED, nothing removed; the plan would keep "
                           f"{len(plan.keep)} and remove {len(plan.remove)}\n"
                           f"  refused: {plan.refused}")
            else:
                click.echo(f"\n{name}: {len(plan.keep)} kept, {len(plan.remove)} "
                           + ("to remove (dry run)" if dry_run else "removed"))
            decisions = [("KEEP", d, ", ".join(d.reasons)) for d in plan.keep]
            decisions += [("REMOVE", d, d.because) for d in plan.remove]
            for verdict, d, why in sorted(decisions, key=lambda vd: vd[1].time, reverse=True):
                click.echo(f"  {verdict:<7} {d.id:<30} {d.time.astimezone(UTC):%Y-%m-%d %H:%M}  "
                           f"{why}".rstrip())
            for backup_id in plan.damaged:
                click.echo(f"  {'LEFT':<7} {backup_id:<30} {'':16}  damaged manifest: "
                           "not planned, not touched")
        if report.orphans or report.orphans_left:
            click.echo(f"\norphaned objects: {len(report.orphans)} "
                       + ("to remove" if dry_run else "removed")
                       + f", {len(report.orphans_left)} left (younger than 24 hours"
                       " or not written by pgvault)")
        if report.wal:
            click.echo(f"\narchived WAL older than every kept base backup: {len(report.wal)} "
                       + ("files to remove" if dry_run else "files removed"))
        if not report.databases and not report.skipped:
            click.echo("no backups yet")
    for name, why in report.skipped.items():
        click.echo(f"pgvault: skipped {name}: {why}", err=True)
    # A dry run changes nothing: it shows the refusal above and succeeds.
    refusal = None if dry_run else report.refusal()
    if refusal is not None:
        if len(report.refused) > 1 or report.skipped:
            for name, why in report.refused.items():
                click.echo(f"pgvault: refused {name}: {why}", err=True)
        raise refusal
    if report.skipped:
        raise LockHeld(f"{len(report.skipped)} database(s) not pruned: locked; run again later")


@cli.command(epilog=EXIT_CODES)
@common
@dbname_option
@click.argument("backup_id", metavar="ID|latest")
@click.option("--reason", required=True, help="Why this backup must be kept (stored with it).")
@click.pass_context
def pin(ctx: click.Context, /, backup_id: str, dbname: str | None, reason: str,
        **_: Any) -> None:
    """Keep one backup until it is unpinned: prune never removes a pinned backup.

    \b
    Examples:
      pgvault pin 20261125T010000 --reason "before migration 42"
      pgvault pin latest -d app --reason "end of quarter"
    """
    from datetime import UTC, datetime

    from pgvault.ops.pin import pin as run_pin

    m = run_pin(vault_of(ctx).storage, backup_id, reason=reason, now=datetime.now(UTC),
                database=database_filter(dbname))
    click.echo(f"pinned {m.id} ({m.database}): {reason.strip()}")


@cli.command(epilog=EXIT_CODES)
@common
@dbname_option
@click.argument("backup_id", metavar="ID|latest")
@click.pass_context
def unpin(ctx: click.Context, /, backup_id: str, dbname: str | None, **_: Any) -> None:
    """Let prune remove a backup again once the retention policy no longer keeps it.

    \b
    Examples:
      pgvault unpin 20261125T010000
      pgvault prune --dry-run            # see whether it would now be removed
    """
    from pgvault.ops.pin import unpin as run_unpin

    m, old = run_unpin(vault_of(ctx).storage, backup_id, database=database_filter(dbname))
    click.echo(f"unpinned {m.id} ({m.database}); it was pinned for: {old.reason}" if old
               else f"{m.id} ({m.database}) was not pinned")
