"""`pgvault snapshot`: provider snapshots of managed databases (RDS, Aurora), and their
retention (`pgvault snapshot prune`)."""

from __future__ import annotations

import json
from typing import Any

import click

from pgvault.cli.app import EXIT_CODES, cli, common, database_filter, vault_of

SNAPSHOT_HELP = """\b
Config (per database, or top-level for a single one):
  [[databases]]
  name = "app"
  [databases.snapshot]
  provider = "rds"                 # or "aurora" with cluster = "..."
  instance = "app-prod"            # the DB instance identifier
  region = "eu-west-1"             # else AWS_REGION / AWS_DEFAULT_REGION
  quota = 100                      # manual snapshots AWS allows in the region
  wait_timeout_seconds = 3600
Credentials: the AWS_* chain (variables, profile, instance role), as for S3;
the IAM policy it needs is in docs/security.md.
"""


def _dbname_option(func: Any) -> Any:
    # Not named "dbname": no connection is made, so the password help does not apply.
    return click.option("-d", "--dbname", "only", metavar="DB",
                        help="Only this database (its [[databases]] name).")(func)


def snapshot_targets(settings: Any, dbname: str | None) -> list[tuple[str, Any]]:
    """(database name, its settings) for every database with a [snapshot] section."""
    from pgvault import config
    from pgvault.errors import ConfigError

    wanted = database_filter(dbname)
    found = []
    for target in config.targets(settings):
        if target.settings.snapshot is None:
            continue
        name = target.name or config.connection(target.settings).dbname
        if not name:
            raise ConfigError("[snapshot] needs a database name to record snapshots under: "
                              "set database (or PGVAULT_DATABASE), or use [[databases]]")
        if wanted is None or name == wanted:
            found.append((name, target.settings))
    if not found:
        where = f" for database {wanted!r}" if wanted else ""
        raise ConfigError(f"no [snapshot] section configured{where}: see pgvault snapshot "
                          "--help")
    return found


def provider_of(settings: Any, *, timeout: float = 60.0) -> Any:
    """The snapshot provider the settings' [snapshot] section names."""
    from pgvault.engines.rds import RdsProvider

    section = settings.snapshot
    return RdsProvider(section.provider, section.source_id, region=section.region,
                       endpoint_url=section.endpoint_url,
                       credentials=settings.secrets.aws_credentials(), timeout=timeout)


def audit(vault: Any) -> Any:
    """The provider's automated backups against the policy (None without [snapshot])."""
    from pgvault.errors import PgvaultError
    from pgvault.health import AutomatedBackups
    from pgvault.ops.snapshot import expected_retention_days

    section = vault.settings.snapshot
    if section is None:
        return None
    try:
        expected = expected_retention_days(vault.policy, section.automated_retention_days)
        return provider_of(vault.settings, timeout=10.0).automated_backups(expected)
    except PgvaultError as exc:
        return AutomatedBackups(section.provider, section.source_id, error=str(exc))


def _options(settings: Any, vault: Any) -> Any:
    from pgvault.ops.snapshot import SnapshotOptions

    section = settings.snapshot
    return SnapshotOptions(quota=section.quota, wait_timeout=section.wait_timeout_seconds,
                           poll=section.poll_seconds, lock_stale_after=vault.lock_stale_after)


@cli.group("snapshot", invoke_without_command=True, epilog=SNAPSHOT_HELP + "\n" + EXIT_CODES)
@common
@_dbname_option
@click.option("--prune", "then_prune", is_flag=True,
              help="Then apply the retention policy to the snapshots (as prune_after_backup "
                   "does).")
@click.option("--json", "as_json", is_flag=True, help="Print the recorded manifests as JSON.")
@click.pass_context
def snapshot(ctx: click.Context, /, only: str | None, then_prune: bool, as_json: bool,
             **_: Any) -> None:
    """Create a provider snapshot of each managed database and record it as a backup.

    A manual snapshot (RDS CreateDBSnapshot, Aurora CreateDBClusterSnapshot)
    tagged pgvault:managed=true, pgvault:database and pgvault:backup-id, waited
    for up to [snapshot] wait_timeout_seconds, then recorded in the repository as
    a backup of kind "snapshot": `pgvault list`, `status` and `check` show it
    beside the logical and physical backups. Before creating, the manual
    snapshots in the region are counted: at the quota nothing is created (exit
    14), from 80% of it a warning is printed.

    `pgvault restore` never restores a snapshot: restore it with the provider
    (aws rds restore-db-instance-from-db-snapshot). Retention of snapshots is
    `pgvault snapshot prune`.

    \b
    Examples:
      pgvault snapshot --config /etc/pgvault.toml           # every [snapshot] database
      pgvault snapshot -d app --prune                        # then apply [retention]
      pgvault snapshot prune --dry-run                       # KEEP/DELETE and why
      pgvault list -d app --json | jq '.[] | select(.kind == "snapshot")'
    """
    if ctx.invoked_subcommand is not None:
        return
    from pgvault.console import human_seconds
    from pgvault.model import to_dict
    from pgvault.ops.snapshot import take_snapshot

    settings_ = _settings(ctx)
    done = []
    for name, settings in snapshot_targets(settings_, only):
        vault = vault_of(ctx, settings)
        provider = provider_of(settings)
        manifest = take_snapshot(provider, vault.catalog, name, _options(settings, vault),
                                 clock=vault.clock)
        done.append(manifest)
        for warning in manifest.warnings:
            click.echo(f"pgvault: warning: {warning}", err=True)
        if not as_json:
            facts: Any = manifest.snapshot
            took = (manifest.finished_at - manifest.started_at).total_seconds()
            click.echo(f"snapshot {manifest.id} of {name}: {facts.provider} "
                       f"{facts.snapshot_id} of {facts.source_id} ({facts.region}), "
                       f"{facts.size_gb} GiB, {facts.engine} {facts.engine_version}, "
                       f"took {human_seconds(took)}")
        if then_prune or settings.prune_after_backup:
            _prune(vault, provider, name, dry_run=False, force=False,
                   as_json=as_json)
    if as_json:
        click.echo(json.dumps([to_dict(m) for m in done], indent=2, default=str))


def _settings(ctx: click.Context) -> Any:
    from pgvault.cli.app import settings_of

    return settings_of(ctx)


def _prune(vault: Any, provider: Any, name: str, *, dry_run: bool, force: bool,
           as_json: bool) -> Any:
    from datetime import UTC

    from pgvault.ops.snapshot import prune_snapshots

    report = prune_snapshots(provider, vault.catalog, name, vault.policy, now=vault.clock(),
                             dry_run=dry_run, force=force,
                             lock_stale_after=vault.lock_stale_after)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.summary())
        rows = [("KEEP", m, ", ".join(why)) for m, why in report.keep]
        rows += [("DELETE", m, why) for m, why in report.remove]
        for verdict, m, why in sorted(rows, key=lambda row: row[1].time, reverse=True):
            snap = getattr(m.snapshot, "snapshot_id", "")
            click.echo(f"  {verdict:<7} {m.id:<30} {m.time.astimezone(UTC):%Y-%m-%d %H:%M}  "
                       f"{snap}  {why}".rstrip())
        for snap in report.orphans:
            click.echo(f"  {'DELETE':<7} {snap}  tagged by pgvault, recorded by no manifest, "
                       "older than a day")
        for snap in report.orphans_left:
            click.echo(f"  {'LEFT':<7} {snap}  tagged by pgvault, not recorded (yet)")
    for error in report.errors:
        click.echo(f"pgvault: {error}", err=True)
    return report


@snapshot.command("prune", epilog=EXIT_CODES)
@common
@_dbname_option
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; change nothing.")
@click.option("--force", is_flag=True, help="Apply a plan that deletes more than half of the "
              "snapshots.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def snapshot_prune(ctx: click.Context, /, only: str | None, dry_run: bool, force: bool,
                   as_json: bool, **_: Any) -> None:
    """Delete the provider snapshots the retention policy no longer keeps.

    The [retention] policy (keep_daily, keep_weekly, ...) is applied to the
    snapshots pgvault created for each database (tagged pgvault:managed=true and
    pgvault:database=<name>), by the times their manifests record; a snapshot
    without those tags, such as one taken by hand or by AWS Backup, is never
    deleted. The provider's snapshot is deleted before its manifest. A recorded
    snapshot the provider no longer has counts for nothing, and its manifest is
    removed unless pinned. A pgvault snapshot that no manifest records (its
    wait ran out) is deleted once it is a day old. Like `pgvault prune`, a plan
    that deletes more than half of them needs --force; exit 2 when refused, 14
    when the provider refused a delete.

    \b
    Examples:
      pgvault snapshot prune --dry-run
      pgvault snapshot prune -d app
      pgvault snapshot prune --json | jq '.remove[].snapshot_id'
    """
    from pgvault.errors import SnapshotFailed, UsageError

    settings_ = _settings(ctx)
    reports = []
    for name, settings in snapshot_targets(settings_, only):
        vault = vault_of(ctx, settings)
        reports.append(_prune(vault, provider_of(settings), name, dry_run=dry_run,
                              force=force, as_json=as_json))
    refused = [r for r in reports if r.refused]
    if refused and not dry_run:
        raise UsageError(f"snapshot prune of {refused[0].database} refused: "
                         f"{refused[0].refused}")
    failed = [r for r in reports if r.errors]
    if failed:
        raise SnapshotFailed(f"snapshot prune of {failed[0].database}: {failed[0].errors[0]}")


def with_audit(status: Any, vault: Any) -> Any:
    """``status`` with the provider's automated backups, when [snapshot] names them."""
    import dataclasses

    found = audit(vault)
    return status if found is None else dataclasses.replace(status, automated=found)


def status_lines(status: Any, now: Any) -> list[str]:
    """`pgvault status` lines for the snapshots and the provider's automated backups."""
    from pgvault.console import human_seconds

    lines = []
    newest = status.newest_snapshot
    if newest is not None:
        facts = newest.snapshot
        age = (now - newest.started_at).total_seconds()
        met = "met" if age <= status.rpo_hours * 3600 else "MISSED"
        lines.append(f"  snapshots      {status.snapshots}, newest {newest.id} "
                     f"({facts.provider} {facts.snapshot_id}, {facts.size_gb} GiB), "
                     f"{human_seconds(age)} ago (RPO {status.rpo_hours:g}h {met})")
    found = status.automated
    if found is not None:
        what = f"{found.provider} {found.source_id}"
        if found.error is not None:
            lines.append(f"  automated      {what}: could not be audited: {found.error}")
        elif found.retention_days <= 0:
            lines.append(f"  automated      {what}: OFF (backup retention period 0 days)")
        else:
            latest = found.latest_restorable
            restorable = ("no latest restorable time" if latest is None else
                          f"latest restorable {human_seconds((now - latest).total_seconds())}"
                          " ago")
            lines.append(f"  automated      {what}: {found.status}, kept "
                         f"{found.retention_days} days (policy {found.expected_retention_days})"
                         f", {restorable}")
    return lines
