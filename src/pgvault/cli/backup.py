"""Commands for taking, listing, showing and restoring backups, and the demo."""

from __future__ import annotations

import json
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
    startup_done,
    vault_of,
)
from pgvault.cli.physical import PHYSICAL_HELP, physical_restore_options, restore_physical
from pgvault.cli.security import IDENTITY_HELP, identity_option
from pgvault.errors import PgvaultError
from pgvault.model import Manifest, to_json


@cli.command(epilog=CONNECTION_HELP + "\n" + EXIT_CODES)
@common
@dbname_option
@click.option("--compression", type=click.Choice(["zstd", "gzip", "none"]), default=None,
              help="Compression (default zstd) [config compression.algorithm].")
@click.option("--level", type=int, default=None,
              help="Compression level (zstd 1-19, default 1; gzip 1-9, default 6). Higher "
                   "stores less and costs more CPU while the dump runs (docs/performance.md).")
@click.option("--no-globals", is_flag=True, help="Skip roles and tablespaces (pg_dumpall -g).")
@click.option("--streams", type=click.IntRange(0, 16), default=None, metavar="N",
              help="pg_dumps at once under one snapshot, each of the N-1 largest tables "
                   "(64 MiB and more) in an archive of its own; 0 is one per CPU, up to 4. "
                   "Default 1, a single archive: more streams back up faster where CPUs are free, "
                   "restore no faster and use more memory (docs/performance.md) "
                   "[config backup_streams].")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def backup(ctx: click.Context, /, dbname: str | None, compression: str | None, level: int | None,
           no_globals: bool, streams: int | None, as_json: bool, **_: Any) -> None:
    """Back up one database: pg_dump streamed through zstd into the repository.

    Nothing is written to local disk. The backup becomes visible only when every
    artifact is stored and checksummed and its manifest is written (last). With
    [[databases]] in the config, every listed database in turn (-d picks one).
    The run is recorded in the repository (for `pgvault status` and `check`),
    announced to [notify] sinks, and published to [metrics] when configured.

    \b
    Examples:
      pgvault backup -d postgresql://app@localhost/app --repo file:///srv/backups
      DATABASE_URL=postgresql://... pgvault backup --repo s3://bucket/app
      pgvault backup --compression gzip --level 6      # .gz artifacts
      pgvault backup --streams 0       # big tables dumped beside the rest, one per CPU
    """
    from pgvault.console import ProgressLine
    from pgvault.ops.jobs import BackupRequest, backup_databases

    def request(vault: Any, conn: Any) -> BackupRequest:
        startup_done()
        return BackupRequest(
            conn, compression=compression, level=level, backup_globals=not no_globals,
            streams=streams, progress=ProgressLine(f"backing up {conn.redacted()}"),
            drill=_drill_reporting(vault) if vault.settings.verify_after_backup else None)

    def failed(name: str | None, exc: PgvaultError) -> None:
        click.echo(f"pgvault: backup of {name} failed: {exc}", err=True)

    backup_databases(settings_of(ctx), dbname, request,
                     finished=lambda run: _report_backup(run, as_json), failed=failed)


def _drill_reporting(vault: Any) -> Any:
    """verify_after_backup: a restore drill of the new backup, reporting each check on stderr."""
    import dataclasses

    from pgvault.cli.verify import print_check, scratch_servers, summary_line, verify_options
    from pgvault.ops.verify import verify

    def drill(manifest: Any) -> Any:
        options = dataclasses.replace(verify_options(vault),
                                      on_check=lambda check: print_check(check, err=True))
        click.echo(f"verifying {manifest.id} ({manifest.database}), level {options.level}",
                   err=True)
        with scratch_servers(vault.settings) as servers:
            report = verify(vault.storage, manifest, options, servers)
        click.echo(summary_line(report), err=True)
        return report

    return drill


def _report_backup(run: Any, as_json: bool) -> Exception | None:
    """Print a finished backup job; the error the command must end with, if any."""
    from pgvault.cli.verify import failure
    from pgvault.console import human_bytes, human_seconds

    manifest = run.manifest
    drill_error: Exception | None = None
    if run.drill_error is not None:  # the backup is stored: say so, and still fail the run
        drill_error = type(run.drill_error)(f"backup {manifest.id} is stored, but its restore "
                                            f"drill could not run: {run.drill_error}")
    elif run.drill is not None:
        drill_error = failure([run.drill])
    if run.prune is not None:
        click.echo(run.prune.summary(), err=True)
    if as_json:
        click.echo(to_json(manifest).decode())
        return drill_error
    seconds = (manifest.finished_at - manifest.started_at).total_seconds()
    ratio = manifest.raw_size / manifest.size if manifest.size else 0
    click.echo(f"backup {manifest.id} of {manifest.database}: {human_bytes(manifest.raw_size)} "
               f"-> {human_bytes(manifest.size)} stored ({ratio:.1f}x), "
               f"{manifest.facts.describe()}, {human_seconds(seconds)}")
    return drill_error


@cli.command("list")
@common
@dbname_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_(ctx: click.Context, /, dbname: str | None, as_json: bool, **_: Any) -> None:
    """List the backups in the repository, oldest first.

    A backup whose manifest is damaged is listed as INVALID with the reason, and one
    whose last restore drill failed integrity as BAD: neither is what 'latest' means,
    and neither counts for retention. The others stay usable. A repository that does
    not exist (no such folder or bucket) is an error (exit 5), not "no backups yet".

    \b
    Examples:
      pgvault list --repo file:///srv/backups
      pgvault list --json | jq '.[-1].id'
      pgvault list --json | jq '.[] | select(.valid == false)'
    """
    from datetime import UTC, datetime

    from pgvault.console import human_bytes, human_seconds
    from pgvault.model import backup_id_time
    from pgvault.ops.prune import roles

    vault = vault_of(ctx)
    catalog = vault.catalog
    catalog.require()
    listing = catalog.scan(database_filter(dbname))
    records = catalog.drill_records(database_filter(dbname))
    drills = records.newest
    bad = catalog.bad(database_filter(dbname), records)
    rows: list[tuple[str, Any]] = [(m.id, m) for m in listing.manifests]
    rows += [(d.backup_id, d) for d in listing.damaged]
    # Damaged manifests sort by the time in their id, among the others.
    never = datetime.min.replace(tzinfo=UTC)
    rows.sort(key=lambda row: (row[1].started_at if isinstance(row[1], Manifest)
                               else backup_id_time(row[0]) or never, row[0]))
    for d in listing.damaged + records.damaged:
        click.echo(f"warning: {d.reason} ({d.key})", err=True)
    if as_json:
        out = []
        for _key, item in rows:
            if isinstance(item, Manifest):
                why = bad.get((item.database, item.id))
                out.append({**item.summary(), "valid": why is None, "error": why,
                            "last_drill": _drill_summary(drills.get((item.database, item.id)))})
            else:
                out.append({"id": item.backup_id, "database": item.database, "valid": False,
                            "error": item.reason, "manifest": item.key})
        click.echo(json.dumps(out, indent=2))
        return
    if not rows:
        click.echo("no backups yet")
        return
    role = roles(listing.manifests, vault.policy, bad)
    click.echo(f"{'ID':<30} {'DATABASE':<20} {'STARTED (UTC)':<20} {'SIZE':>10} {'TOOK':>8}"
               f"  {'LAST DRILL':<18}  ROLE")
    for backup_id, item in rows:
        if not isinstance(item, Manifest):
            click.echo(f"{backup_id:<30} {item.database:<20} INVALID: {item.reason}")
            continue
        m = item
        took = human_seconds((m.finished_at - m.started_at).total_seconds())
        drill = drills.get((m.database, m.id))
        last = f"{'PASS' if drill.passed else 'FAIL'} {drill.level}" if drill else "never"
        why = bad.get((m.database, m.id))
        click.echo(f"{m.id:<30} {m.database:<20} {m.started_at:%Y-%m-%d %H:%M:%S} "
                   f"{human_bytes(m.size) if m.kind != 'snapshot' else 'snapshot':>10} "
                   f"{took:>8}  {last:<18}  "
                   + (f"BAD: {why}" if why else role[m.id]))


def _drill_summary(drill: Any) -> dict[str, Any] | None:
    """The last restore drill of a backup, as `list --json` shows it."""
    if drill is None:
        return None
    return {"passed": drill.passed, "level": drill.level,
            "at": drill.finished_at.isoformat(), "restore_seconds": drill.restore_seconds,
            "rto_met": drill.rto_met}


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

    'latest' is the newest backup that can be trusted (not a damaged manifest, not a
    last drill that failed integrity). An id whose manifest is damaged exits 6 with why.

    \b
    Examples:
      pgvault show latest
      pgvault show 20261125T010000 --json
    """
    from pgvault.catalog import Damaged
    from pgvault.console import human_bytes, human_seconds

    catalog = vault_of(ctx).catalog
    m = catalog.get(backup_id, database_filter(dbname))
    if as_json:
        click.echo(to_json(m).decode())
        return
    click.echo(f"backup    {m.id}\ndatabase  {m.database}\nstarted   {m.started_at}\n"
               f"finished  {m.finished_at}\nserver    PostgreSQL {m.facts.server_version}")
    for a in m.artifacts:
        stages = "+".join(s.name for s in a.stages) or "none"
        click.echo(f"artifact  {a.key}  {human_bytes(a.size)} ({stages}), "
                   f"raw {human_bytes(a.raw_size)}, sha256 {a.sha256[:16]}...")
    if m.physical is not None:
        p = m.physical
        click.echo(f"physical  system {p.system_identifier}, timeline {p.timeline}, LSN "
                   f"{p.start_lsn}..{p.stop_lsn}, WAL {p.start_wal}..{p.stop_wal} "
                   + ("inside base.tar" if p.wal_included else "in the archive"))
    else:
        click.echo(f"tables    {m.facts.describe()}")
    for warning in m.warnings:
        click.echo(f"warning   {warning}")
    for drill in catalog.drills(m.database, m.id):
        if isinstance(drill, Damaged):
            click.echo(f"drill     {drill.reason} ({drill.key})")
            continue
        verdict = "PASS" if drill.passed else "FAIL: " + "; ".join(
            f"{c.name}: {c.detail}" for c in drill.failures)
        took = "" if drill.restore_seconds is None else \
            f", restore {human_seconds(drill.restore_seconds)}"
        click.echo(f"drill     {drill.finished_at:%Y-%m-%d %H:%M:%S} {drill.level}{took} "
                   f"{verdict}")


@cli.command(epilog=CONNECTION_HELP + "\n" + IDENTITY_HELP + "\n" + PHYSICAL_HELP + "\n"
             + EXIT_CODES)
@common
@dbname_option
@identity_option
@click.argument("backup_id", default="latest", metavar="[ID|latest]")
@click.option("--to", "target", metavar="DB",
              help="New database name on the configured server, or a URL (no password in "
                   "it; never postgres, template0 or template1).")
@click.option("-j", "--jobs", type=click.IntRange(0, 64), default=0, show_default="0: auto",
              help="Parallel pg_restore jobs; 0 means one per CPU, up to 4. More than one "
                   "spools the archive to a private file in TMPDIR (its uncompressed size); "
                   "1 streams it with no temporary copy.")
@click.option("--clean", is_flag=True, help="Replace the target if it exists and is not empty.")
@click.option("--schema", "schemas", multiple=True, metavar="NAME",
              help="Restore only this schema, with the schema itself (repeatable): "
                   "--schema sales. With --table, only says where unqualified tables are.")
@click.option("--table", "tables", multiple=True, metavar="[SCHEMA.]TABLE",
              help="Restore only this table (or view, materialized view, sequence; "
                   "repeatable), with its rows, sequences and their values, defaults, "
                   "indexes, constraints, triggers, comments, grants and partitions: "
                   "--table sales.orders --table '\"Odd.Schema\".\"Table x\"'. Foreign keys "
                   "to tables not restored are left out, each named in a warning; a name "
                   "that matches nothing is an error (exit 2) before anything is created.")
@click.option("--no-owner", is_flag=True, help="Do not restore ownership and privileges.")
@click.option("--role-map", "role_map", multiple=True, metavar="OLD=NEW",
              help="Give what role OLD owned (and was granted) in the backup to role NEW of "
                   "the target (repeatable): --role-map postgres=master. Without it, an "
                   "owner the restoring role may not use stops the restore before it starts, "
                   "naming the object; a provider's own roles (rds_superuser, "
                   "supabase_admin, ...) are left out with a warning each.")
@click.option("--from-database", "source_db", metavar="NAME",
              help="Which database's backups 'latest' means, when the repo holds several.")
@physical_restore_options  # --physical, --pgdata, --target-*, --start (cli/physical.py)
@click.pass_context
def restore(ctx: click.Context, /, backup_id: str, dbname: str | None, target: str | None,
            jobs: int,
            clean: bool, schemas: tuple[str, ...], tables: tuple[str, ...], no_owner: bool,
            role_map: tuple[str, ...], source_db: str | None, identity_file: str | None,
            **_: Any) -> None:
    """Restore a backup into a NEW database (never over an existing one by accident).

    The stored bytes are checked against the manifest's size and sha256 while they
    are read. The restore runs into a temporary database that is renamed to the
    target only on success, so a failed restore leaves nothing that looks complete.

    \b
    Examples:
      pgvault restore latest --to app_restored
      pgvault restore 20261125T010000 --to postgresql://admin@other-host/app_copy -j 4
      pgvault restore latest --to app --clean          # replace an existing database
      pgvault restore latest --to app_copy -j 1        # streamed: no temporary file
      pgvault restore latest --to sales_copy --schema sales        # one schema
      pgvault restore latest --to orders_copy --table sales.orders --table customers
      pgvault restore latest --to app_copy --identity-file restore-key.txt   # encrypted
      pgvault restore latest --to app_copy --role-map postgres=master   # as RDS's master
      pgvault restore --physical latest --pgdata /srv/pg-pitr \\
          --target-time '2026-11-25 09:14:00+00' --start --port 5499
    """
    from pgvault import config
    from pgvault.cli.copy import restore_sources
    from pgvault.console import ProgressLine, human_bytes, human_seconds
    from pgvault.engines.portable import parse_role_map
    from pgvault.errors import UsageError
    from pgvault.ops.restore import RestoreOptions, first_intact, resolve
    from pgvault.ops.restore import restore as run_restore

    if ctx.params.get("physical"):
        restore_physical(ctx, backup_id, ctx.params)
        return
    if not target:
        raise UsageError("restore needs --to DB (or --physical --pgdata DIR for a base backup)")
    _check_restore_target(target)
    settings = settings_of(ctx)
    conn = config.connection(settings, dbname)
    vault = vault_of(ctx, settings)

    def attempt(chosen: Any) -> Any:
        storage = chosen.storage
        wanted = source_db
        if wanted is None and backup_id == "latest":
            wanted = _source_database(storage, dbname)
        if backup_id == "latest":
            manifest = _latest(storage, wanted)
        else:
            manifest = resolve(storage, backup_id, wanted)
        if manifest.kind == "physical":
            raise UsageError(f"backup {manifest.id} is a physical backup: restore it with "
                             "--physical --pgdata DIR")
        if manifest.kind == "snapshot":
            raise UsageError(f"backup {manifest.id} is a provider snapshot: restore it with "
                             "the provider (aws rds restore-db-instance-from-db-snapshot)")
        progress = ProgressLine(f"restoring {manifest.id}", total=sum(
            a.size for a in manifest.artifacts if a.name.startswith("db.")))
        options = RestoreOptions(target=target, jobs=jobs, clean=clean, schemas=schemas,
                                 tables=tables, no_owner=no_owner, progress=progress,
                                 role_map=parse_role_map(role_map),
                                 identities=chosen.keyring_with(identity_file))
        try:
            return run_restore(conn, storage, manifest, options)
        finally:
            progress.finish()

    found = first_intact(restore_sources(ctx, vault), attempt,
                         tell=lambda line: click.echo(f"pgvault: {line}", err=True))
    result = found.result
    where = f" from repository {found.repository}" if found.repository else ""
    click.echo(f"restored {result.manifest.id} ({result.manifest.database}){where} into "
               f"{result.target.redacted()}: {human_bytes(result.bytes_read)} read and "
               f"verified, {human_seconds(result.seconds)}")


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


def _latest(storage: Any, database: str | None) -> Manifest:
    """The backup 'latest' means, named with the newer ones passed over (and why)."""
    from pgvault.catalog import Catalog

    manifest, passed = Catalog(storage).latest(database)
    click.echo(f"latest backup of {manifest.database} is {manifest.id}"
               + "".join(f"; passed over {d.backup_id}: {d.reason}" for d in passed), err=True)
    return manifest


# The server's own databases: a restore over one breaks every later CREATE DATABASE
# (templates) or the default connection of the tools, pgvault's included (postgres).
SYSTEM_DATABASES = ("postgres", "template0", "template1")


def _check_restore_target(target: str) -> None:
    """Refuse a --to that holds a password or names a system database, before connecting."""
    from pgvault import config
    from pgvault.errors import UsageError

    name = config.command_line_connection(target, "--to").dbname
    if target.startswith(("postgres://", "postgresql://")) or "=" in target:
        shown = f"--to names database {name!r}, which"
    else:
        name, shown = target, f"--to {target}"
    if name in SYSTEM_DATABASES:
        raise UsageError(f"{shown} is a system database ({', '.join(SYSTEM_DATABASES)} "
                         "belong to the server); restore into a new name, e.g. "
                         "--to app_restored")


def _source_database(storage: Any, dbname: str | None) -> str | None:
    """--dbname names the backups' database too, if the repository holds backups of it."""
    from pgvault.catalog import Catalog

    wanted = database_filter(dbname)
    return wanted if wanted and wanted in Catalog(storage).databases() else None
