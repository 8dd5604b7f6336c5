"""`pgvault snapshot`: provider snapshots of managed databases (RDS, Aurora), their copies
to other regions, their retention (`pgvault snapshot prune`) and, for `pgvault verify`,
their drills."""

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
  max_concurrent_copies = 5        # copies into one region at a time (AWS: 5)
  drill_subnet_group = "drills"    # pgvault verify SNAPSHOT-ID restores here
  drill_security_groups = ["sg-0123"]
  [[databases.snapshot.copies]]
  region = "eu-central-1"
  kms_key_id = "arn:aws:kms:eu-central-1:111122223333:key/..."
  retention = { keep_daily = 3, keep_weekly = 4, keep_monthly = 0 }
Credentials: the AWS_* chain (variables, profile, instance role), as for S3;
the least-privilege IAM policy is in docs/managed.md.

\b
Neon (API key from NEON_API_KEY or NEON_API_KEY_FILE):
  [databases.snapshot]
  provider = "neon"
  project = "aged-wildflower-12345678"
  branch = "br-young-forest-a5b6c7d8"
  quota = 10                       # Neon's manual snapshot limit
  expire_days = 400                # expires_at, a safety net behind retention
  # mode = "branch"                # a branch at the moment, without snapshots
"""


def _dbname_option(func: Any) -> Any:
    # Not named "dbname": no connection is made, so the password help does not apply.
    return click.option("-d", "--dbname", "only", metavar="DB",
                        help="Only this database (its [[databases]] name).")(func)


def snapshot_targets(settings: Any, dbname: str | None) -> list[tuple[str, Any]]:
    """(database name, its settings) for every database with a [snapshot] section."""
    return [(name, target.settings) for name, target in _targets(settings, dbname)]


def _targets(settings: Any, dbname: str | None) -> list[tuple[str, Any]]:
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
            found.append((name, target))
    if not found:
        where = f" for database {wanted!r}" if wanted else ""
        raise ConfigError(f"no [snapshot] section configured{where}: see pgvault snapshot "
                          "--help")
    return found


def provider_of(settings: Any, *, timeout: float = 60.0, region: str | None = None) -> Any:
    """The snapshot provider the settings' [snapshot] section names (in ``region``: a copy
    target's)."""
    section = settings.snapshot
    if section.provider == "neon":
        from datetime import timedelta

        from pgvault.engines.neon import NeonProvider
        from pgvault.errors import ConfigError

        key = settings.secrets.get("NEON_API_KEY")
        if not key:
            raise ConfigError("[snapshot] provider 'neon' needs an API key: set NEON_API_KEY "
                              "or NEON_API_KEY_FILE")
        expiry = None if section.expire_days is None else timedelta(days=section.expire_days)
        return NeonProvider(section.project, section.branch, key, api_url=section.api_url,
                            mode=section.mode, expire_after=expiry, timeout=timeout)
    from pgvault.engines.rds import RdsProvider

    return RdsProvider(section.provider, section.source_id, region=region or section.region,
                       endpoint_url=section.endpoint_url,
                       credentials=settings.secrets.aws_credentials(), timeout=timeout)


def copy_targets(settings: Any, vault: Any) -> tuple[Any, ...]:
    """The [[snapshot.copies]] targets: each region's provider, KMS key and policy (its own
    retention keys over [retention]'s)."""
    import msgspec

    from pgvault.errors import ConfigError
    from pgvault.ops.snapshot import CopyTarget
    from pgvault.retention import Policy

    found = []
    for target in settings.snapshot.copies:
        keys = {**msgspec.structs.asdict(settings.retention), **(target.retention or {})}
        try:
            policy = Policy.from_mapping(keys)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"[snapshot] copies to {target.region}: retention: {exc}") \
                from None
        found.append(CopyTarget(provider_of(settings, region=target.region),
                                target.kms_key_id, policy))
    return tuple(found)


def _source_facts(target: Any) -> Any:
    """Reads the source's facts at snapshot time, when the database has a connection with
    a host (a URL); None for a bare name, which reaches no managed server."""
    conn = _connection(target)
    if conn is None or not target.settings.snapshot.facts:
        return None
    from pgvault.ops.snapshot import source_facts

    return lambda: source_facts(conn)


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
    from datetime import timedelta

    return SnapshotOptions(quota=section.quota, wait_timeout=section.wait_timeout_seconds,
                           poll=section.poll_seconds, lock_stale_after=vault.lock_stale_after,
                           max_concurrent_copies=section.max_concurrent_copies,
                           drill_max_age=timedelta(hours=section.drill_max_hours))


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

    A manual snapshot (RDS CreateDBSnapshot, Aurora CreateDBClusterSnapshot, Neon
    POST .../branches/{branch}/snapshot named pgvault:<database>:<id>)
    tagged pgvault:managed=true, pgvault:database and pgvault:backup-id, waited
    for up to [snapshot] wait_timeout_seconds, then recorded in the repository as
    a backup of kind "snapshot": `pgvault list`, `status` and `check` show it
    beside the logical and physical backups. Before creating, the manual
    snapshots in the region are counted: at the quota nothing is created (exit
    14), from 80% of it a warning is printed. When the database has a URL, its
    facts (row counts, schema, migrations) are recorded too, for drills.

    Each [[snapshot.copies]] target then gets a copy (CopyDBSnapshot with that
    region's KMS key), recorded as a backup of its own in that region, waiting
    for a slot when max_concurrent_copies copies run there already. A failed
    copy exits 14 after the others. With --prune (or prune_after_backup) every
    region is pruned by its own retention. Drill instances left by a killed
    `pgvault verify` (tagged pgvault:drill, owner dead or older than
    drill_max_hours) are deleted first.

    `pgvault restore` never restores a snapshot: restore it with the provider
    (aws rds restore-db-instance-from-db-snapshot); `pgvault verify ID` drills
    one on a temporary instance. Retention of snapshots is `pgvault snapshot
    prune`.

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
    from pgvault.errors import SnapshotFailed
    from pgvault.model import to_dict
    from pgvault.ops.jobs import SnapshotRequest, run

    settings_ = _settings(ctx)
    done = []
    copy_errors: list[str] = []
    for name, target in _targets(settings_, only):
        settings = target.settings
        vault = vault_of(ctx, settings)
        provider = provider_of(settings)
        prune = then_prune or settings.prune_after_backup
        # As a job: run history, snapshot.started/succeeded/failed events, metrics.
        result = run(vault, SnapshotRequest(
            name, provider, _options(settings, vault), copies=copy_targets(settings, vault),
            policy=vault.policy if prune else None, facts=_source_facts(target)))
        done += [result.manifest, *result.copies]
        for manifest in (result.manifest, *result.copies):
            for warning in manifest.warnings:
                click.echo(f"pgvault: warning: {warning}", err=True)
        for swept in result.swept:
            click.echo(f"pgvault: deleted the drill instance {swept} a dead or stale drill "
                       "left", err=True)
        for error in result.copy_errors:
            click.echo(f"pgvault: {error}", err=True)
        copy_errors += [f"{name}: {e}" for e in result.copy_errors]
        if not as_json:
            for manifest in (result.manifest, *result.copies):
                facts: Any = manifest.snapshot
                took = (manifest.finished_at - manifest.started_at).total_seconds()
                what = "copy" if facts.copy_of else "snapshot"
                click.echo(f"{what} {manifest.id} of {name}: {facts.provider} "
                           f"{facts.snapshot_id} of {facts.source_id} ({facts.region}), "
                           f"{facts.size_gb} GiB, {facts.engine} {facts.engine_version}, "
                           f"took {human_seconds(took)}")
            for report in result.prunes:
                _print_prune(report)
    if as_json:
        click.echo(json.dumps([to_dict(m) for m in done], indent=2, default=str))
    if copy_errors:
        raise SnapshotFailed(f"{len(copy_errors)} snapshot copies failed; first: "
                             f"{copy_errors[0]}")


def _settings(ctx: click.Context) -> Any:
    from pgvault.cli.app import settings_of

    return settings_of(ctx)


def _prune(vault: Any, provider: Any, name: str, *, dry_run: bool, force: bool,
           as_json: bool, policy: Any = None) -> Any:
    from pgvault.ops.snapshot import prune_snapshots

    report = prune_snapshots(provider, vault.catalog, name, policy or vault.policy,
                             now=vault.clock(), dry_run=dry_run, force=force,
                             lock_stale_after=vault.lock_stale_after)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_prune(report)
    return report


def _print_prune(report: Any) -> None:
    from datetime import UTC

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
        for target in copy_targets(settings, vault):  # each region by its own policy
            reports.append(_prune(vault, target.provider, name, dry_run=dry_run, force=force,
                                  as_json=as_json, policy=target.policy))
    refused = [r for r in reports if r.refused]
    if refused and not dry_run:
        raise UsageError(f"snapshot prune of {refused[0].database} refused: "
                         f"{refused[0].refused}")
    failed = [r for r in reports if r.errors]
    if failed:
        raise SnapshotFailed(f"snapshot prune of {failed[0].database}: {failed[0].errors[0]}")


def snapshot_drill(settings: Any, manifest: Any, options: Any) -> Any:
    """The drill `pgvault verify` runs for a provider snapshot: ``drill(manifest)`` restores
    it to a temporary instance and checks it (ops.snapshot.drill_snapshot)."""
    import dataclasses
    from datetime import timedelta

    from pgvault.engines.snapshots import DrillPlacement
    from pgvault.errors import ConfigError
    from pgvault.ops.snapshot import DrillOptions, drill_snapshot
    from pgvault.pg.conninfo import ConnInfo
    from pgvault.vault import Vault

    found = [t for name, t in _targets(settings, manifest.database)]
    target = found[0]
    section = target.settings.snapshot
    facts = manifest.snapshot
    # A copy is drilled in its own region.
    provider = provider_of(target.settings, region=facts.region)
    if facts.provider != section.provider or facts.source_id != section.source_id:
        raise ConfigError(f"snapshot {manifest.id} is of {facts.provider} {facts.source_id}"
                          f" ({facts.region}), not of the configured [snapshot] source")
    override = section.drill_connect_override
    source = _connection(target)

    def connect(instance: Any) -> Any:
        if override:  # the test-only seam: moto's endpoints are fake
            return ConnInfo.parse(override)
        if source is None or not instance.host:
            raise ConfigError(f"drill of {manifest.id}: no connection to check the restored "
                              "copy with: give the database a URL (its user and password "
                              "are the restored copy's too)")
        return dataclasses.replace(source, params={**source.params, "host": instance.host,
                                                   "port": str(instance.port or 5432)})

    drill_options = DrillOptions(
        verify=options, connect=connect,
        placement=DrillPlacement(section.drill_instance_class, section.drill_subnet_group,
                                 tuple(section.drill_security_groups)),
        wait_timeout=section.wait_timeout_seconds, poll=section.poll_seconds,
        max_age=timedelta(hours=section.drill_max_hours))
    storage = Vault.open(target.settings).storage

    def drill(m: Any) -> Any:
        return drill_snapshot(provider, storage, m, drill_options)

    return drill


def _connection(target: Any) -> Any:
    from pgvault import config
    from pgvault.errors import PgvaultError

    try:
        conn = config.target_connection(target)
    except PgvaultError:
        return None
    return conn if conn.params.get("host") else None


def with_audit(status: Any, vault: Any) -> Any:
    """``status`` with the provider's automated backups, when [snapshot] names them."""
    import dataclasses

    found = audit(vault)
    return status if found is None else dataclasses.replace(status, automated=found)


def _paths(status: Any, now: Any) -> list[str]:
    """The recovery paths side by side: each one's newest point against the RPO, and its
    last drill's time against the RTO."""
    from pgvault.console import human_seconds

    rpo, rto = status.rpo_hours * 3600, status.rto_minutes * 60
    lines = [f"  recovery paths (RPO {status.rpo_hours:g}h, RTO {status.rto_minutes:g}m)"]
    paths = [("logical" if status.newest is None or status.newest.kind != "physical"
              else "physical", status.newest, status.drill, "restore"),
             ("snapshot", status.newest_snapshot, status.snapshot_drill, "to queryable")]
    for kind, newest, drill, timed in paths:
        if newest is None:
            lines.append(f"    {kind:<9} none")
            continue
        age = (now - newest.started_at).total_seconds()
        text = (f"    {kind:<9} {newest.id}, {human_seconds(age)} ago, RPO "
                f"{'met' if age <= rpo else 'MISSED'}; ")
        if drill is None:
            text += "never drilled"
        else:
            text += f"last drill {'PASSED' if drill.passed else 'FAILED'}"
            if drill.restore_seconds is not None:
                text += (f", {timed} {human_seconds(drill.restore_seconds)}, RTO "
                         f"{'met' if drill.restore_seconds <= rto else 'MISSED'}")
        lines.append(text)
    return lines


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
    if newest is not None:
        lines += _paths(status, now)
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
