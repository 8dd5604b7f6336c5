"""Commands for taking, listing, showing and restoring backups, and the demo."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import click

from pgvault.cli.app import (
    CONNECTION_HELP,
    EXIT_CODES,
    cli,
    common,
    database_filter,
    dbname_option,
    settings_of,
    storage_of,
)
from pgvault.errors import PgvaultError


@cli.command(epilog=CONNECTION_HELP + "\n" + EXIT_CODES)
@common
@dbname_option
@click.option("--compression", type=click.Choice(["zstd", "gzip", "none"]), default=None,
              help="Compression (default zstd) [config compression.algorithm].")
@click.option("--level", type=int, default=None, help="Compression level (zstd 1-19, gzip 1-9).")
@click.option("--no-globals", is_flag=True, help="Skip roles and tablespaces (pg_dumpall -g).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def backup(ctx: click.Context, /, dbname: str | None, compression: str | None, level: int | None,
           no_globals: bool, as_json: bool, **_: Any) -> None:
    """Back up one database: pg_dump streamed through zstd into the repository.

    Nothing is written to local disk. The backup becomes visible only when every
    artifact is stored and checksummed and its manifest is written (last).

    \b
    Examples:
      pgvault backup -d postgresql://app@localhost/app --repo file:///srv/backups
      DATABASE_URL=postgresql://... pgvault backup --repo s3://bucket/app
      pgvault backup --compression gzip --level 6      # .gz artifacts
    """
    from pgvault import config, pipeline
    from pgvault.console import ProgressLine, human_bytes, human_seconds
    from pgvault.ops.backup import BackupOptions
    from pgvault.ops.backup import backup as run_backup
    from pgvault.ops.prune import Policy, prune_after_backup

    settings = settings_of(ctx)
    conn = config.connection(settings, dbname)
    stages = pipeline.configured_stages(settings, compression, level)
    progress = ProgressLine(f"backing up {conn.redacted()}")
    options = BackupOptions(stages=stages,
                            backup_globals=settings.backup_globals and not no_globals,
                            lock_stale_after=timedelta(hours=settings.lock_stale_after_hours),
                            progress=progress)
    storage = storage_of(settings)
    # Built before the backup, so a bad [retention] fails fast instead of after an hour's dump.
    policy = (Policy.from_mapping(settings.retention.model_dump())
              if settings.prune_after_backup else None)
    try:
        manifest = run_backup(conn, storage, options)
    finally:
        progress.finish()
    if policy is not None:
        try:
            report = prune_after_backup(storage, policy, database=manifest.database,
                                        lock_stale_after=options.lock_stale_after)
            click.echo(report.summary(), err=True)
        except PgvaultError as exc:  # the backup is stored; a failed prune must not hide that
            click.echo(f"warning: backup {manifest.id} is stored, but pruning failed: {exc}",
                       err=True)
    if as_json:
        click.echo(manifest.model_dump_json(indent=2))
        return
    seconds = (manifest.finished_at - manifest.started_at).total_seconds()
    ratio = manifest.raw_size / manifest.size if manifest.size else 0
    for warning in manifest.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"backup {manifest.id} of {manifest.database}: {human_bytes(manifest.raw_size)} "
               f"-> {human_bytes(manifest.size)} stored ({ratio:.1f}x), "
               f"{len(manifest.facts.tables)} tables, {human_seconds(seconds)}")


@cli.command("list")
@common
@dbname_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_(ctx: click.Context, /, dbname: str | None, as_json: bool, **_: Any) -> None:
    """List the complete backups in the repository, oldest first.

    \b
    Examples:
      pgvault list --repo file:///srv/backups
      pgvault list --json | jq '.[-1].id'
    """
    from pgvault.catalog import Catalog
    from pgvault.console import human_bytes, human_seconds
    from pgvault.ops.prune import Policy, roles

    settings = settings_of(ctx)
    manifests = Catalog(storage_of(settings)).list(database_filter(dbname))
    if as_json:
        click.echo(json.dumps([m.summary() for m in manifests], indent=2))
        return
    if not manifests:
        click.echo("no backups yet")
        return
    role = roles(manifests, Policy.from_mapping(settings.retention.model_dump()))
    click.echo(f"{'ID':<30} {'DATABASE':<20} {'STARTED (UTC)':<20} {'SIZE':>10} {'TOOK':>8}"
               "  ROLE")
    for m in manifests:
        took = human_seconds((m.finished_at - m.started_at).total_seconds())
        click.echo(f"{m.id:<30} {m.database:<20} {m.started_at:%Y-%m-%d %H:%M:%S} "
                   f"{human_bytes(m.size):>10} {took:>8}  {role[m.id]}")


@cli.command()
@common
@dbname_option
@click.argument("backup_id", default="latest", metavar="[ID|latest]")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def show(
    ctx: click.Context, /, backup_id: str, dbname: str | None, as_json: bool, **_: Any
) -> None:
    """Show one backup's manifest: artifacts, checksums, facts.

    \b
    Examples:
      pgvault show latest
      pgvault show 20261125T010000 --json
    """
    from pgvault.catalog import Catalog
    from pgvault.console import human_bytes

    settings = settings_of(ctx)
    m = Catalog(storage_of(settings)).get(backup_id, database_filter(dbname))
    if as_json:
        click.echo(m.model_dump_json(indent=2))
        return
    click.echo(f"backup    {m.id}\ndatabase  {m.database}\nstarted   {m.started_at}\n"
               f"finished  {m.finished_at}\nserver    PostgreSQL {m.facts.server_version}")
    for a in m.artifacts:
        stages = "+".join(s.name for s in a.stages) or "none"
        click.echo(f"artifact  {a.key}  {human_bytes(a.size)} ({stages}), "
                   f"raw {human_bytes(a.raw_size)}, sha256 {a.sha256[:16]}...")
    rows = sum(t.rows for t in m.facts.tables)
    click.echo(f"tables    {len(m.facts.tables)} ({rows} rows)")
    for warning in m.warnings:
        click.echo(f"warning   {warning}")


@cli.command(epilog=CONNECTION_HELP + "\n" + EXIT_CODES)
@common
@dbname_option
@click.argument("backup_id", default="latest", metavar="[ID|latest]")
@click.option("--to", "target", required=True, metavar="DB",
              help="New database name on the configured server, or a URL.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=1,
              help="Parallel pg_restore jobs (the archive is spooled to a private temp file).")
@click.option("--clean", is_flag=True, help="Replace the target if it exists and is not empty.")
@click.option("--schema", "schemas", multiple=True, help="Restore only this schema (repeatable).")
@click.option("--table", "tables", multiple=True, help="Restore only this table (repeatable).")
@click.option("--no-owner", is_flag=True, help="Do not restore ownership and privileges.")
@click.option("--from-database", "source_db", metavar="NAME",
              help="Which database's backups 'latest' means, when the repo holds several.")
@click.pass_context
def restore(ctx: click.Context, /, backup_id: str, dbname: str | None, target: str, jobs: int,
            clean: bool, schemas: tuple[str, ...], tables: tuple[str, ...], no_owner: bool,
            source_db: str | None, **_: Any) -> None:
    """Restore a backup into a NEW database (never over an existing one by accident).

    The stored bytes are checked against the manifest's size and sha256 while they
    are read. The restore runs into a temporary database that is renamed to the
    target only on success, so a failed restore leaves nothing that looks complete.

    \b
    Examples:
      pgvault restore latest --to app_restored
      pgvault restore 20261125T010000 --to postgresql://admin@other-host/app_copy -j 4
      pgvault restore latest --to app --clean          # replace an existing database
    """
    from pgvault import config
    from pgvault.console import ProgressLine, human_bytes, human_seconds
    from pgvault.ops.restore import RestoreOptions, resolve
    from pgvault.ops.restore import restore as run_restore

    settings = settings_of(ctx)
    conn = config.connection(settings, dbname)
    storage = storage_of(settings)
    manifest = resolve(storage, backup_id, source_db)
    progress = ProgressLine(f"restoring {manifest.id}", total=manifest.artifact("db.dump").size)
    options = RestoreOptions(target=target, jobs=jobs, clean=clean, schemas=schemas,
                             tables=tables, no_owner=no_owner, progress=progress)
    try:
        result = run_restore(conn, storage, manifest, options)
    finally:
        progress.finish()
    click.echo(f"restored {manifest.id} ({manifest.database}) into {result.target.redacted()}: "
               f"{human_bytes(result.bytes_read)} read and verified, "
               f"{human_seconds(result.seconds)}")


@cli.command()
@click.option("--repo", metavar="URL", help="Where to keep the demo repository "
              "(default: a temporary folder, removed afterwards).")
@click.option("--rows", type=int, default=20000, show_default=True,
              help="Orders in the sample database.")
def demo(repo: str | None, rows: int) -> None:
    """Try pgvault end to end on a throwaway cluster, with no setup.

    Starts a temporary PostgreSQL cluster, fills a sample shop database, backs it
    up into a local repository, lists it, restores it into a new database and
    shows that every table matches. Everything is removed afterwards.
    """
    from pgvault.ops.demo import run_demo

    ok = run_demo(repo=repo, rows=rows, echo=click.echo)
    if not ok:
        raise SystemExit(1)
