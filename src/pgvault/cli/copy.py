"""`pgvault copy`: bring the `[[repos]]` copies up to date; prune and monitoring per copy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
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
    vault_of,
)

REPOS_HELP = """\b
Config (one primary, any number of copies, each with its own retention):
  [retention]                      # the primary's policy, and every copy's default
  keep_daily = 7
  keep_weekly = 4
  keep_monthly = 3
  [[repos]]
  name = "main"
  url = "s3://backups-eu/app"
  primary = true
  [[repos]]
  name = "offsite"
  url = "s3://backups-us/app"
  s3 = { region = "us-east-1" }    # [s3] keys this repository overrides
  retention = { keep_daily = 0, keep_weekly = 0, keep_monthly = 12 }
  copy_lag_hours = 26              # check warns past this (default: one backup interval)
  credentials_env = "OFFSITE"      # OFFSITE_AWS_ACCESS_KEY_ID(_FILE), ..._SECRET_ACCESS_KEY
  require_encrypted = true         # refuse backups that are not age-encrypted
  copy_after_backup = true         # pgvault daemon: copy each new backup at once
  # copy_schedule = "30 */6 * * *" # ... or on a schedule of its own
See docs/copies.md.
"""


@cli.command("copy", epilog=REPOS_HELP + "\n" + EXIT_CODES)
@common
@dbname_option
@click.argument("ref", metavar="[ID|latest|all]", default="all")
@click.option("--to", "to", metavar="NAME", multiple=True,
              help="The [[repos]] entry to copy to (repeatable); default: every repository "
                   "but the source.")
@click.option("--jobs", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Objects copied at once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per target.")
@click.pass_context
def copy_(ctx: click.Context, /, ref: str, to: tuple[str, ...], dbname: str | None,
          jobs: int, as_json: bool, **_: Any) -> None:
    """Copy backups from the primary repository (or --repo NAME) to the others.

    Each artifact's stored bytes go as they are (no re-encryption: no secret key is
    needed), checked against the size and sha256 in the manifest as they are
    written; the manifest is written last. A copy killed at any moment is
    invisible at the target, and the next run finishes it without sending again
    what is already there (kept when its size and a read-back sha256 match).
    With 'all' (the default), a copy gets the backups its own retention keeps and
    lacks; an ID (or 'latest') is copied whatever the target's policy says. A
    physical backup takes its cluster's archived WAL along. Drill records and
    pins stay per repository.

    \b
    Examples:
      pgvault copy                          # every copy, up to date
      pgvault copy --to offsite latest      # the newest backup, to one copy
      pgvault copy --to offsite -d app 20261125T010000
      pgvault status                        # "copy offsite  up to date" per database
      pgvault restore latest --repo offsite --to app_restored -d app
      pgvault restore latest --to app_restored -d app   # falls back to a copy
    """
    from pgvault.errors import UsageError
    from pgvault.ops.jobs import copy_each

    vault = vault_of(ctx)
    names = list(to) or vault.copies
    if not vault.settings.repos:
        raise UsageError("no [[repos]] configured: copy needs a repository to copy to "
                         "(see pgvault copy --help)")
    if not names:
        raise UsageError("no repository to copy to: every [[repos]] entry is the source")
    vault.catalog.require()
    copy_each(vault, names, ref=ref, database=database_filter(dbname), jobs=jobs,
              echo=click.echo, as_json=as_json)


def prune_each_repository(ctx: click.Context) -> bool:
    """With `[[repos]]` and no --repo: prune every repository by its own policy (True);
    False: prune only the repository the command names, as before."""
    from pgvault.errors import PgvaultError

    if ctx.params.get("repo") or invocation(ctx).environ.get("PGVAULT_REPO"):
        return False
    settings = settings_of(ctx)
    if not settings.repos:
        return False
    assert ctx.command is not None
    errors: list[PgvaultError] = []
    for entry in settings.repos:
        if not ctx.params.get("as_json"):
            click.echo(f"== repository {entry.name} ({entry.url})")
        try:
            ctx.invoke(ctx.command, **{**ctx.params, "repo": entry.name})
        except PgvaultError as exc:
            click.echo(f"pgvault: repository {entry.name}: {exc}", err=True)
            errors.append(exc)
        if not ctx.params.get("as_json"):
            click.echo("")
    if errors:
        raise errors[0]
    return True


def backup_interval(settings: Any) -> timedelta:
    """The time between two scheduled backups ([schedule] backup), 24 h if unknowable."""
    from pgvault.ops.copy import backup_interval as interval

    return interval(settings.schedule.backup, settings.schedule.timezone)


def copy_lags(vault: Any, database: str) -> list[tuple[str, Any]]:
    """(copy name, ops.copy.Lag or the error reading it) for each copy of ``vault``."""
    from pgvault.errors import PgvaultError
    from pgvault.ops.copy import lag

    found: list[tuple[str, Any]] = []
    now = datetime.now(UTC)
    for name in vault.copies:
        entry = next(e for e in vault.settings.repos if e.name == name)
        objective = (timedelta(hours=entry.copy_lag_hours) if entry.copy_lag_hours
                     else backup_interval(vault.settings))
        try:
            target = vault.repository(name)
            found.append((name, lag(vault.catalog, target.catalog, target.policy, now,
                                    name=name, objective=objective, database=database)))
        except PgvaultError as exc:
            found.append((name, exc))
    return found


def describe_lag(name: str, found: Any, now: datetime,
                 failed: tuple[str, datetime] | None = None) -> tuple[str, str | None]:
    """The status line of one copy, and the WARNING reason when it is late or unreadable;
    ``failed``: the last copy run's error (ops.copy.last_error), shown with either."""
    from pgvault.console import human_seconds
    from pgvault.ops.copy import Lag

    error = "" if failed is None else (
        f"; last copy failed {human_seconds((now - failed[1]).total_seconds())} ago: "
        f"{failed[0]}")
    if not isinstance(found, Lag):
        return f"unreadable: {found}{error}", f"copy {name} cannot be read: {found}"
    newest = "no backup" if found.newest is None else f"newest {found.newest:%Y-%m-%d %H:%M}"
    age = found.age(now)
    if found.behind == 0 or age is None:
        return f"up to date ({newest}){error}", None
    hours = found.objective.total_seconds() / 3600
    line = (f"{found.behind} backup(s) behind, newest missing {human_seconds(age.total_seconds())}"
            f" old (objective {hours:g}h; {newest})")
    if found.late(now):
        return line + " LATE" + error, (
            f"copy {name} is {found.behind} backup(s) behind, the newest missing one "
            f"{age.total_seconds() / 3600:.1f}h old (objective {hours:g}h): run pgvault copy"
            + ("" if failed is None else f" (its last run failed: {failed[0]})"))
    return line + error, None


def copy_status(settings: Any, database: str, now: datetime
                ) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """For `status` and `check`: each copy's line, the WARNING reasons, the JSON entries."""
    if not settings.repos:
        return [], [], []
    from pgvault.console import human_seconds
    from pgvault.errors import StorageError
    from pgvault.ops.copy import Lag, last_error, unconfirmed
    from pgvault.vault import Vault

    lines: list[str] = []
    reasons: list[str] = []
    entries: list[dict[str, Any]] = []
    vault = Vault.open(settings)
    for name, found in copy_lags(vault, database):
        try:
            record = vault.catalog.copy_record(name)
        except StorageError:
            record = None
        failed = last_error(record)
        line, reason = describe_lag(name, found, now, failed)
        since = [] if isinstance(found, Lag) else unconfirmed(vault.catalog, record, database)
        if since:
            newest = max(m.started_at for m in since)
            line = (f"unreadable, {len(since)} backup(s) since its last successful copy, "
                    f"the newest {human_seconds((now - newest).total_seconds())} old: "
                    + line.removeprefix("unreadable: "))
        lines.append(f"  copy {name:<9} {line}")
        if reason:
            reasons.append(reason)
        entry: dict[str, Any] = {"name": name}
        if isinstance(found, Lag):
            age = found.age(now)
            entry |= {"behind": found.behind, "newest": found.newest,
                      "newest_missing": found.newest_missing,
                      "newest_missing_age_seconds": age and age.total_seconds(),
                      "objective_seconds": found.objective.total_seconds(),
                      "late": found.late(now)}
        else:
            entry |= {"error": str(found), "unconfirmed": len(since)}
        entry |= {"last_error": failed and failed[0], "last_error_at": failed and failed[1]}
        entries.append(entry)
    return lines, reasons, entries


def restore_sources(ctx: click.Context, vault: Any) -> list[tuple[str, Any]]:
    """The repositories a restore may read from, in order, each as (name, vault opener):
    the one the command names; with `[[repos]]` and none named, the primary and then each
    copy (``ops.restore.first_intact`` falls back along them)."""
    named = ctx.params.get("repo") or invocation(ctx).environ.get("PGVAULT_REPO")
    name = vault.settings.repository_name or ""
    if named or not vault.settings.repos:
        return [(name, lambda: vault)]
    return [(name, lambda: vault)] + [
        (copy, lambda copy=copy: vault.repository(copy)) for copy in vault.copies]
