"""The `pgvault` command: parse argv, call one operation, print, map errors to exit codes."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import click

from pgvault import __version__
from pgvault.errors import Interrupted, PgvaultError

EXIT_CODES = """\b
Exit codes:
  0    success
  1    unexpected internal error
  2    usage error (bad flags or arguments)
  3    configuration error
  4    database connection or authentication error
  5    storage (repository) error
  6    integrity error (a stored backup is damaged or incomplete)
  7    lock held by another pgvault process
  8    backup failed (pg_dump / pg_dumpall)
  9    restore failed (pg_restore)
  130  interrupted (Ctrl-C or SIGTERM)
"""

CONNECTION_HELP = """\b
Connection: --dbname (a name, a postgresql:// URL or key=value), else
PGVAULT_DATABASE, DIRECT_URL, DATABASE_URL (Prisma-style parameters such as
?schema= and ?pgbouncer= are accepted), the config file, then libpq's PG*
variables. Passwords come from the URL, PGPASSWORD(_FILE) or PGPASSFILE, never
from a flag.
"""

_debug = False


def _settings(ctx: click.Context) -> Any:
    from pgvault import config

    params = ctx.find_root().params | ctx.params
    settings = config.load(params.get("config"), repo=params.get("repo"))
    config.export_file_secrets()
    return settings


def _storage(settings: Any) -> Any:
    from pgvault import config
    from pgvault.storage import open_storage

    options = config.s3_options(settings) if settings.repo.startswith("s3://") else None
    return open_storage(settings.repo, options)


def common(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command takes."""
    func = click.option("--repo", metavar="URL", help="Repository: file:///path or "
                        "s3://bucket/prefix [env PGVAULT_REPO].")(func)
    func = click.option("--config", "config", metavar="FILE", type=click.Path(dir_okay=False),
                        help="TOML config file [env PGVAULT_CONFIG].")(func)
    return func


def dbname_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-d", "--dbname", metavar="DB", help="Database name, URL or "
                        "key=value conninfo (never put a password here; see below).")(func)


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgvault")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug: bool) -> None:
    """pgvault: PostgreSQL backups that are proven to restore.

    \b
    Quick start:
      pgvault demo                                   # try it on a throwaway cluster
      export DATABASE_URL=postgresql://app@db:5432/app
      export PGVAULT_REPO=s3://backups/app           # or file:///var/backups/pgvault
      pgvault backup                                 # stream pg_dump -> zstd -> repo
      pgvault list
      pgvault restore latest --to app_restored       # into a NEW database
    """
    global _debug
    _debug = debug


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

    settings = _settings(ctx)
    conn = config.connection(settings, dbname)
    comp = settings.compression
    stages = pipeline.compression_spec(compression or comp.algorithm,
                                       level if level is not None else comp.level, comp.threads)
    progress = ProgressLine(f"backing up {conn.redacted()}")
    options = BackupOptions(stages=stages,
                            backup_globals=settings.backup_globals and not no_globals,
                            lock_stale_after=timedelta(hours=settings.lock_stale_after_hours),
                            progress=progress)
    try:
        manifest = run_backup(conn, _storage(settings), options)
    finally:
        progress.finish()
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

    settings = _settings(ctx)
    manifests = Catalog(_storage(settings)).list(_database_filter(dbname))
    if as_json:
        click.echo(json.dumps([m.summary() for m in manifests], indent=2))
        return
    if not manifests:
        click.echo("no backups yet")
        return
    click.echo(f"{'ID':<30} {'DATABASE':<20} {'STARTED (UTC)':<20} {'SIZE':>10} {'TOOK':>8}")
    for m in manifests:
        took = human_seconds((m.finished_at - m.started_at).total_seconds())
        click.echo(f"{m.id:<30} {m.database:<20} {m.started_at:%Y-%m-%d %H:%M:%S} "
                   f"{human_bytes(m.size):>10} {took:>8}" + ("  pinned" if m.pinned else ""))


def _database_filter(dbname: str | None) -> str | None:
    """A --dbname given to list/show/restore selects backups by database name."""
    if not dbname:
        return None
    from pgvault.pg.conninfo import ConnInfo

    return ConnInfo.parse(dbname).dbname or dbname


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

    settings = _settings(ctx)
    m = Catalog(_storage(settings)).get(backup_id, _database_filter(dbname))
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

    settings = _settings(ctx)
    conn = config.connection(settings, dbname)
    storage = _storage(settings)
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


@cli.command("prune", epilog=EXIT_CODES)
@common
@dbname_option
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def prune_(ctx: click.Context, /, dbname: str | None, dry_run: bool, as_json: bool,
           **_: Any) -> None:
    """Remove the backups the retention policy no longer keeps.

    \b
    keep_daily/weekly/monthly/yearly = N keep the newest backup of each of the last
    N days/ISO weeks/months/years that have backups; keep_last = N the N newest;
    keep_within = 30d all within 30 days of the newest. A backup any rule keeps is
    kept; the newest and pinned ones always are. Default: 7 daily, 4 weekly, 3 monthly.

    Manifests are deleted before data. Data without a manifest (a failed backup or an
    interrupted prune) is removed once its id and its files are both 24 hours old.
    A database locked by a running backup is skipped, and the exit code is then 7.

    \b
    Examples:
      pgvault prune --dry-run                   # KEEP/REMOVE per backup and why
      pgvault prune                             # apply [retention] from the config
      PGVAULT_RETENTION__KEEP_DAILY=14 pgvault prune -d app
      pgvault prune --dry-run --json | jq '.databases[].remove[].id'
      pgvault pin 20261125T010000 --reason "before migration 42"
    """
    from datetime import UTC, datetime

    from pgvault.errors import LockHeld
    from pgvault.ops.prune import Policy, prune
    from pgvault.retention import describe

    settings = _settings(ctx)
    policy = Policy.from_mapping(settings.retention.model_dump())
    report = prune(_storage(settings), policy, dry_run=dry_run, now=datetime.now(UTC),
                   lock_stale_after=timedelta(hours=settings.lock_stale_after_hours),
                   database=_database_filter(dbname))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(describe(policy))
        for name, plan in report.databases.items():
            click.echo(f"\n{name}: {len(plan.keep)} kept, {len(plan.remove)} "
                       + ("to remove (dry run)" if dry_run else "removed"))
            decisions = [("KEEP", d) for d in plan.keep] + [("REMOVE", d) for d in plan.remove]
            for verdict, d in sorted(decisions, key=lambda vd: vd[1].time, reverse=True):
                click.echo(f"  {verdict:<7} {d.id:<30} {d.time.astimezone(UTC):%Y-%m-%d %H:%M}  "
                           f"{', '.join(d.reasons)}".rstrip())
        if report.orphans or report.orphans_left:
            click.echo(f"\norphaned objects: {len(report.orphans)} "
                       + ("to remove" if dry_run else "removed")
                       + f", {len(report.orphans_left)} left (younger than 24 hours"
                       " or not written by pgvault)")
        if not report.databases and not report.skipped:
            click.echo("no backups yet")
    for name, why in report.skipped.items():
        click.echo(f"pgvault: skipped {name}: {why}", err=True)
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

    settings = _settings(ctx)
    m = run_pin(_storage(settings), backup_id, reason=reason, now=datetime.now(UTC),
                database=_database_filter(dbname))
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

    settings = _settings(ctx)
    m, old = run_unpin(_storage(settings), backup_id, database=_database_filter(dbname))
    click.echo(f"unpinned {m.id} ({m.database}); it was pinned for: {old.reason}" if old
               else f"{m.id} ({m.database}) was not pinned")


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


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise Interrupted("stopped by SIGTERM")


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point: one line per error on stderr, exit code by error kind."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = cli.main(args=argv, prog_name="pgvault", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Abort:
        click.echo("pgvault: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if exc.exit_code == 2 else exc.exit_code or 2)
    except KeyboardInterrupt:
        click.echo("pgvault: interrupted", err=True)
        sys.exit(130)
    except PgvaultError as exc:
        if _debug:
            traceback.print_exc()
        click.echo(f"pgvault: {exc}", err=True)
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except Exception as exc:
        if _debug:
            traceback.print_exc()
        click.echo(f"pgvault: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
