"""The `verify` command: restore drills that prove backups restore, and time them."""

from __future__ import annotations

import dataclasses
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
from pgvault.cli.security import IDENTITY_HELP, identity_option
from pgvault.model import to_dict

LEVEL_NAMES = ["integrity", "restore", "facts", "assertions", "command"]

VERIFY_HELP = """\b
Levels (each includes the ones before):
  integrity   every artifact is there, its size, sha256 and compression are
              intact, and pg_restore --list reads the archive
  restore     restore into a scratch database (pgvault_verify_...) and time it:
              that time is the measured RTO, held to [objectives] rto_minutes
  facts       row counts, schema fingerprint, extension versions and migration
              tables (_prisma_migrations, alembic_version, django_migrations,
              schema_migrations, flyway_schema_history) as recorded at backup
              time; a failed Prisma migration fails the check
  assertions  [[verify.sql]] queries, each returning one boolean
  command     [verify] command run with DATABASE_URL and PG* set to the scratch
              database (a server's password only in PGPASSFILE); its exit
              status decides

\b
Config:
  [verify]
  server = "postgresql://drills@staging:5432/postgres"   # default: ephemeral cluster
  level = "command"                    # default: deepest the section allows
  command = "npx prisma migrate status && npm run smoke"
  command_timeout_seconds = 600
  [[verify.sql]]
  name = "orders exist"
  query = "SELECT count(*) > 0 FROM orders"

Exit codes 6 (integrity) and 10 (another check failed) come with one line
naming the first failure; every drill's report is stored beside its backup
(`pgvault show ID` lists them, `pgvault list` shows the last one). The
verdict is printed before the report is stored: when the repository refuses
it (read-only), the verdict stands, one more line says so, and the exit code
is 13 if the drill passed (else the drill's own 6 or 10).
"""


def verify_options(vault: Any, level: str | None = None, jobs: int = 0,
                   identity_file: str | None = None) -> Any:
    """VerifyOptions from the [verify] and [objectives] settings (a flag may set the level)."""
    from pgvault.ops.verify import VerifyOptions

    settings = vault.settings
    section = settings.verify
    return VerifyOptions(
        identities=vault.keyring_with(identity_file),
        level=level or section.default_level(),
        sql=[(check.name, check.query) for check in section.sql],
        command=section.command,
        command_timeout=section.command_timeout_seconds,
        rto_objective_seconds=settings.objectives.rto_minutes * 60,
        jobs=jobs,
    )


def scratch_servers(settings: Any, server: str | None = None, keep: bool = False) -> Any:
    """Where drills restore: --server, else [verify] server, else ephemeral clusters."""
    from pgvault import config
    from pgvault.ops.scratch import ScratchServers
    from pgvault.pg.conninfo import ConnInfo

    if server is not None:  # from the command line: a password there is refused
        return ScratchServers(config.command_line_connection(server, "--server"), keep=keep)
    if settings.verify.server is not None:
        server = settings.verify.server.get_secret_value()
    # The password comes from the URL, PGPASSWORD or ~/.pgpass, as for psql.
    return ScratchServers(ConnInfo.parse(server) if server else None, keep=keep)


def scratch_servers_given(server: str | None) -> None:
    """--server comes from the command line: refuse a password in it before any work."""
    if server is not None:
        from pgvault import config

        config.command_line_connection(server, "--server")


def print_check(check: Any, err: bool = False) -> None:
    """One line per check as it completes: PASS/FAIL/SKIP, its name, why."""
    click.echo(f"  {check.status.upper():<4}  {check.level:<10} {check.name:<20} {check.detail}",
               err=err)


def failure(reports: list[Any]) -> Exception | None:
    """The error a run of drills ends with: integrity first; None when every check passed."""
    from pgvault.errors import IntegrityError, VerifyFailed

    failed = [r for r in reports if not r.passed]
    if not failed:
        return None
    first = failed[0]
    check = first.failures[0]
    others = f" ({len(failed)} of {len(reports)} backups failed)" if len(reports) > 1 else ""
    if any(r.integrity_failed for r in failed):
        first = next(r for r in failed if r.integrity_failed)
        check = next(c for c in first.failures if c.level == "integrity")
        return IntegrityError(f"backup {first.backup_id} is damaged: {check.name}: "
                              f"{check.detail}{others}")
    return VerifyFailed(f"backup {first.backup_id} failed its restore drill: {check.name}: "
                        f"{check.detail}{others}")


def summary_line(report: Any) -> str:
    from pgvault.console import human_seconds

    verdict = "PASSED" if report.passed else "FAILED"
    text = f"{verdict} {report.level} drill of {report.backup_id}"
    if report.restore_seconds is not None:
        met = "met" if report.rto_met else "MISSED"
        text += (f": restore took {human_seconds(report.restore_seconds)}, RTO objective "
                 f"{human_seconds(report.rto_objective_seconds)} {met}")
    return text


@cli.command(epilog=VERIFY_HELP + "\n" + IDENTITY_HELP + "\n" + EXIT_CODES)
@common
@dbname_option
@identity_option
@click.argument("backup_id", default="latest", metavar="[ID|latest|all]")
@click.option("--level", type=click.Choice(LEVEL_NAMES), default=None,
              help="How deep to check [config verify.level; default: the deepest configured].")
@click.option("--server", metavar="URL", help="Restore on this server (a role that may CREATE "
              "DATABASE) instead of an ephemeral local cluster [config verify.server].")
@click.option("--keep", is_flag=True, help="Leave the scratch database (and cluster) for "
              "debugging, and print how to connect and how to remove it.")
@click.option("-j", "--jobs", type=click.IntRange(0, 64), default=0, show_default="0: auto",
              help="Parallel pg_restore jobs, as the real restore would use (0: one per "
                   "CPU, up to 4).")
@click.option("--json", "as_json", is_flag=True, help="Print the report(s) as JSON.")
@click.pass_context
def verify(ctx: click.Context, /, backup_id: str, dbname: str | None, level: str | None,
           server: str | None, keep: bool, jobs: int, identity_file: str | None, as_json: bool,
           **_: Any) -> None:
    """Restore drill: prove a backup restores, check it, and measure the real RTO.

    Restores into a scratch database on an ephemeral PostgreSQL cluster of the
    backup's major version (started here and removed afterwards, also on failure
    and Ctrl-C), or on --server. Each drill's report is stored in the repository.

    \b
    Examples:
      pgvault verify                           # latest backup, deepest configured level
      pgvault verify latest --level integrity  # checksums and archive only, no restore
      pgvault verify all --level restore       # every backup restores, each timed
      pgvault verify 20261125T010000 --server postgresql://drills@staging/postgres
      pgvault verify --keep                    # inspect the restored copy afterwards
      pgvault verify SNAPSHOT-ID               # a provider snapshot: restored to a
                                               # temporary instance (docs/managed.md)
      pgvault verify --json | jq '.checks[] | select(.status == "fail")'
    """
    import functools

    from pgvault.console import ProgressLine
    from pgvault.errors import NotFound, PgvaultError, RecordFailed, UsageError
    from pgvault.ops.jobs import VerifyRequest, run
    from pgvault.ops.verify import verify as run_verify

    scratch_servers_given(server)
    vault = vault_of(ctx)
    settings, storage, catalog = vault.settings, vault.storage, vault.catalog
    database = database_filter(dbname)
    if backup_id == "all":
        # A provider snapshot's drill starts an instance that costs money: named only.
        manifests = [m for m in catalog.list(database) if m.kind != "snapshot"]
        if not manifests:
            raise NotFound(f"no backups in {storage.url}")
        if keep and len(manifests) > 1:
            raise UsageError("--keep keeps one drill's database: name one backup, not 'all'")
    else:
        manifests = [catalog.get(backup_id, database)]
    # The report is stored here, after its verdict is printed: a repository that refuses
    # it (read-only) must not swallow the verdict of a drill that ran.
    options = dataclasses.replace(verify_options(vault, level, jobs, identity_file),
                                  record=False)
    reports = []
    unrecorded: list[tuple[Any, Exception]] = []
    with scratch_servers(settings, server, keep) as servers:

        def drill_one(drill: Any, manifest: Any) -> Any:
            if manifest.kind == "snapshot":  # a temporary instance restored by the provider
                from pgvault.cli.snapshot import snapshot_drill

                return snapshot_drill(settings, manifest, drill)(manifest)
            return run_verify(storage, manifest, drill, servers)

        for manifest in manifests:
            progress = ProgressLine(f"restoring {manifest.id}", total=manifest.size)
            drill = dataclasses.replace(options, progress=progress,
                                        on_check=None if as_json else print_check)
            if not as_json:
                click.echo(f"verifying {manifest.id} ({manifest.database}), "
                           f"level {options.level}")
            try:
                # As a job: verify.succeeded/failed reach [notify], the result [metrics].
                report = run(vault, VerifyRequest(manifest, functools.partial(drill_one, drill)))
            finally:
                progress.finish()
            reports.append(report)
            if not as_json:
                click.echo(summary_line(report))
            try:
                catalog.record_drill(report)
            except (PgvaultError, OSError) as exc:
                unrecorded.append((report, exc))
    for line in servers.kept:
        click.echo(line, err=True)
    if as_json:
        data = [to_dict(r) for r in reports]
        click.echo(json.dumps(data if backup_id == "all" else data[0], indent=2))
    error = failure(reports)
    if unrecorded:
        first, why = unrecorded[0]
        others = f" ({len(unrecorded)} drill records in all)" if len(unrecorded) > 1 else ""
        problem = RecordFailed(
            f"the {'PASSED' if first.passed else 'FAILED'} drill of {first.backup_id} was "
            f"not recorded in {storage.url}{others}: {why}")
        if error is None:
            raise problem
        click.echo(f"pgvault: {problem}", err=True)  # the drill's own failure decides the code
    if error is not None:
        raise error
