"""Physical backups: basebackup, wal-push, wal-fetch, check-archive, and restore --physical.

wal-push and wal-fetch run once per WAL file (archive_command / restore_command), so this
module imports nothing heavy at load time, and they never exit above 125: PostgreSQL treats
such a status as fatal (the archiver restarts; recovery aborts) — except wal-fetch on a
damaged archive, where aborting recovery is exactly what must happen.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from pgvault.cli.app import (
    CONNECTION_HELP,
    EXIT_CODES,
    cli,
    common,
    dbname_option,
    settings_of,
    vault_of,
)
from pgvault.model import to_json

FETCH_FATAL = 126
"""wal-fetch's status for a damaged or unreadable archive: PostgreSQL aborts recovery
(any status above 125), instead of taking the failure for the end of the WAL and
promoting a cluster that silently lacks everything after it."""

ARCHIVE_HELP = """\b
Set up continuous archiving (postgresql.conf):
  archive_mode = on
  archive_command = '/opt/pgvault/bin/pgvault wal-push %p --config /etc/pgvault.toml'
  archive_timeout = 60      # an idle server still archives at least every minute
The server runs the command as its own OS user (postgres): install pgvault where that
user can execute it and its Python (a venv on /usr/bin/python3 in /opt/pgvault, not
one on a Python under /root), name its absolute path, and let postgres read the config
(README: Where to install pgvault for WAL archiving). Keep repository settings in the
config file (or the server's environment): the archiver does not see your shell's
variables.
"""


def cluster_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--cluster", metavar="NAME", help="Name of the PostgreSQL cluster in "
                        "the repository (default main) [env PGVAULT_PHYSICAL__CLUSTER, config "
                        "physical.cluster].")(func)


def _cluster(settings: Any, flag: str | None) -> str:
    return flag or str(settings.physical.cluster)


@contextlib.contextmanager
def _archiver_status(*, quiet_missing: bool) -> Iterator[None]:
    """Map failures to one line and a status PostgreSQL's archiver/recovery reads correctly."""
    from pgvault.cli.app import invocation
    from pgvault.errors import Interrupted, NotFound, PgvaultError

    try:
        yield
    except NotFound as exc:
        if not quiet_missing:
            click.echo(f"pgvault: {exc}", err=True)
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt):
        if quiet_missing:
            # Recovery must see a SIGTERM death (server shutdown), never "file missing".
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        click.echo("pgvault: interrupted", err=True)
        sys.exit(1)
    except PgvaultError as exc:
        if invocation().debug:
            raise
        click.echo(f"pgvault: {exc}", err=True)
        sys.exit(FETCH_FATAL if quiet_missing else min(exc.exit_code, 125))
    except Exception as exc:
        if invocation().debug:
            raise
        click.echo(f"pgvault: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(FETCH_FATAL if quiet_missing else 1)


@cli.command("wal-push", epilog=ARCHIVE_HELP)
@common
@cluster_option
@click.argument("path", metavar="%p", type=click.Path(dir_okay=False))
@click.pass_context
def wal_push(ctx: click.Context, /, path: str, cluster: str | None, **_: Any) -> None:
    """Archive one WAL file (archive_command); exit 0 only once it is durably stored.

    Compressed (and encrypted, when configured) like every artifact, stored under the
    sha256 of its raw bytes. Pushing the same file again succeeds without writing;
    a different file under a name already archived is refused (split brain), and so
    is a segment from another database system than the one the cluster name holds.
    Up to [physical] push_ahead (4) more segments the server marked ready are pushed in
    parallel and marked done once stored, and as each one ends the next ready one
    starts (up to push_budget files a call), so a busy server's archive keeps up.

    \b
    Examples:
      archive_command = 'pgvault wal-push %p --config /etc/pgvault.toml'
      archive_command = '/opt/pgvault/bin/pgvault wal-push %p --repo s3://bk/app --cluster app'
    """
    with _archiver_status(quiet_missing=False):
        from datetime import UTC, datetime

        from pgvault.errors import PgvaultError
        from pgvault.ops.wal import push_ahead, record_push_failure

        vault = vault_of(ctx)
        storage = vault.storage
        name = _cluster(vault.settings, cluster)
        if len(vault.settings.wal_repositories) > 1:
            _push_everywhere(vault, name, Path(path))
            return
        try:
            physical = vault.settings.physical
            done = push_ahead(storage, name, Path(path), vault.stages,
                              ahead=physical.push_ahead, budget=physical.push_budget or None)
        except PgvaultError as exc:
            # PostgreSQL only logs the failure; monitoring reads this record instead.
            record_push_failure(storage, name, Path(path).name, str(exc), datetime.now(UTC))
            raise
        if done.result.already_archived:
            click.echo(f"pgvault: {done.result.walfile} was already archived with the same "
                       "content", err=True)


def _wal_repos(vault: Any) -> list[Any]:
    """The WAL repositories of [[repos]] (wal = true), the selected one first."""
    from pgvault.ops.wal import WalRepo

    names = vault.settings.wal_repositories
    return [WalRepo(names[0], vault.storage)] + [
        WalRepo(other, vault.repository(other).storage) for other in names[1:]]


def _push_everywhere(vault: Any, cluster: str, path: Path) -> None:
    from datetime import UTC, datetime

    from pgvault.errors import PgvaultError
    from pgvault.ops.wal import push_everywhere, record_push_failure, unreachable

    repos = _wal_repos(vault)
    physical = vault.settings.physical
    try:
        done = push_everywhere(repos, cluster, path, vault.stages, ahead=physical.push_ahead,
                               retry_seconds=physical.wal_retry_seconds,
                               hints=Path(vault.settings.environ.get("TMPDIR") or "/tmp"))
    except PgvaultError as exc:
        if not unreachable(exc):  # refused: every repository answered, so it is recorded
            record_push_failure(vault.storage, cluster, path.name, str(exc), datetime.now(UTC))
        raise
    for spread in [done.asked, *done.ahead]:
        for repo, why in spread.behind.items():
            click.echo(f"pgvault: {spread.walfile} is archived in {', '.join(spread.stored_in)}"
                       f"; {repo} is behind (its backlog): {why}", err=True)
    for repo, count in done.caught_up.items():
        click.echo(f"pgvault: caught up {count} backlog file(s) to {repo}", err=True)
    for repo, error in done.catch_up_errors.items():
        click.echo(f"pgvault: catching up {repo} failed: {error}", err=True)


@cli.command("wal-fetch")
@common
@cluster_option
@click.option("--identity-file", "identity_file", metavar="FILE",
              type=click.Path(dir_okay=False),
              help="age identity for an encrypted archive [env PGVAULT_AGE_IDENTITY_FILE].")
@click.argument("walfile", metavar="%f")
@click.argument("path", metavar="%p", type=click.Path(dir_okay=False))
@click.pass_context
def wal_fetch(ctx: click.Context, /, walfile: str, path: str, cluster: str | None,
              identity_file: str | None, **_: Any) -> None:
    """Fetch one archived WAL file (restore_command) to %p.

    Exits 1 without a word when the file was never archived: PostgreSQL asks for
    files past the end of the archive (and for .history files that may not exist)
    to find where recovery ends. A damaged or unreadable archive exits 126, which
    makes PostgreSQL stop recovery rather than end it early. `pgvault restore
    --physical` writes this command for you.

    \b
    Examples:
      restore_command = 'pgvault wal-fetch %f %p --config /etc/pgvault.toml'
    """
    with _archiver_status(quiet_missing=True):
        from pgvault.ops.wal import fetch

        vault = vault_of(ctx)
        keyring = vault.keyring_with(identity_file)
        if len(vault.settings.wal_repositories) > 1:
            from pgvault.ops.wal import fetch_any

            # Whichever WAL repository has it: one that is behind is caught up later.
            fetch_any(_wal_repos(vault), _cluster(vault.settings, cluster), walfile,
                      Path(path), identities=keyring)
            return
        fetch(vault.storage, _cluster(vault.settings, cluster), walfile, Path(path),
              identities=keyring)


@cli.command(epilog=CONNECTION_HELP + "\n" + ARCHIVE_HELP + "\n" + EXIT_CODES)
@common
@dbname_option
@cluster_option
@click.option("--wal-method", type=click.Choice(["auto", "fetch", "archive"]), default=None,
              help="fetch: WAL inside the backup (self-contained); archive: WAL from wal-push "
                   "(the server must archive with it); auto (default): archive when the server "
                   "archives with wal-push [config physical.wal_method].")
@click.option("--fast-checkpoint", is_flag=True, default=None,
              help="Start with an immediate checkpoint instead of a spread one "
                   "[config physical.fast_checkpoint].")
@click.option("--compression", type=click.Choice(["zstd", "gzip", "none"]), default=None,
              help="Compression (default zstd) [config compression.algorithm].")
@click.option("--incremental", is_flag=True,
              help="Store only what changed since the newest base backup (a full one when "
                   "there is none): run on the database host, as a user that can read the "
                   "data directory; WAL from the archive.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def basebackup(ctx: click.Context, /, dbname: str | None, cluster: str | None,
               wal_method: str | None, fast_checkpoint: bool | None, compression: str | None,
               incremental: bool, as_json: bool, **_: Any) -> None:
    """Back up a whole PostgreSQL cluster: pg_basebackup streamed into the repository.

    pg_basebackup's tar (with its backup_manifest) goes through zstd (and age) into
    the repository without touching local disk. Timeline, start and stop LSN, WAL file
    names and the system identifier are recorded; the manifest is written last. With
    WAL archiving (wal-push) this is the base for point-in-time recovery. The role
    needs the REPLICATION attribute and a replication line in pg_hba.conf. Clusters
    with extra tablespaces are not supported (pg_basebackup cannot stream them).

    \b
    Examples:
      pgvault basebackup -d postgresql://postgres@db/postgres --repo s3://bk/app
      pgvault basebackup --cluster app --fast-checkpoint
      pgvault basebackup --incremental   # on the database host, e.g. hourly between fulls
      pgvault restore --physical latest --pgdata /srv/pg-restore --target-time '2026-11-25 09:14'
    """
    from pgvault import config
    from pgvault.console import ProgressLine, human_bytes, human_seconds
    from pgvault.ops.jobs import BaseBackupRequest, run

    settings = settings_of(ctx)
    conn = config.connection(settings, dbname)
    vault = vault_of(ctx, settings)
    progress = ProgressLine(f"base backup of {conn.redacted()}")
    try:
        done = run(vault, BaseBackupRequest(
            conn, cluster=cluster, compression=compression, wal_method=wal_method,
            fast_checkpoint=fast_checkpoint, progress=progress, incremental=incremental))
    finally:
        progress.finish()
    manifest = done.manifest
    if done.prune is not None:
        click.echo(done.prune.summary(), err=True)
    if as_json:
        click.echo(to_json(manifest).decode())
        return
    facts = manifest.physical
    assert facts is not None
    seconds = (manifest.finished_at - manifest.started_at).total_seconds()
    where = "in the backup" if facts.wal_included else "in the archive"
    if isinstance(facts.parent, str):
        where += f"; incremental on {facts.parent}"
    for warning in manifest.warnings:
        click.echo(f"note: {warning}", err=True)
    click.echo(f"base backup {manifest.id} of cluster {manifest.database} (system "
               f"{facts.system_identifier}): {human_bytes(manifest.raw_size)} -> "
               f"{human_bytes(manifest.size)} stored, {human_seconds(seconds)}; "
               f"WAL {facts.start_wal}..{facts.stop_wal} (LSN {facts.start_lsn}.."
               f"{facts.stop_lsn}, timeline {facts.timeline}) {where}")


@cli.command("check-archive", epilog=CONNECTION_HELP + "\n" + ARCHIVE_HELP + "\n" + EXIT_CODES)
@common
@dbname_option
@cluster_option
@click.option("--timeout", type=float, default=None, metavar="SECONDS",
              help="How long to wait for the segment (default 60) "
                   "[config physical.archive_wait_seconds].")
@click.option("--no-switch", is_flag=True,
              help="Only report what the archive holds; do not connect to the server.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def check_archive(ctx: click.Context, /, dbname: str | None, cluster: str | None,
                  timeout: float | None, no_switch: bool, as_json: bool, **_: Any) -> None:
    """Prove WAL archiving works, and show what the archive can restore.

    Forces a WAL switch on the server (pg_switch_wal) and waits until the finished
    segment arrives in the repository; then lists the archived range of each
    timeline, its gaps, and the recoverable window (from the end of the oldest base
    backup to the newest archived segment). Exits 8 when the segment does not
    arrive or the archive has gaps. When it does not arrive and the server runs on
    this machine, the error names what the server's OS user cannot do: execute
    archive_command's program or the interpreter of its #! line (or a folder on the
    way to either), read its --config, or write its local --repo.

    \b
    Examples:
      pgvault check-archive -d postgresql://postgres@db/postgres --config /etc/pgvault.toml
      pgvault check-archive --no-switch --json
    """
    from pgvault import config
    from pgvault.errors import BackupFailed
    from pgvault.ops.wal import archive_status
    from pgvault.ops.wal import check_archive as run_check

    vault = vault_of(ctx)
    settings, storage = vault.settings, vault.storage
    name = _cluster(settings, cluster)
    checked = None
    if not no_switch:
        conn = config.connection(settings, dbname)
        checked = run_check(conn, storage, name,
                            timeout=timeout or settings.physical.archive_wait_seconds)
    backups = [m for m in vault.catalog.list(name) if m.kind == "physical"]
    status = archive_status(storage, name, backups)
    if len(settings.wal_repositories) > 1:
        from pgvault.ops.wal import backlog

        # Every WAL repository's markers: a repository's own backlog is held by the others.
        status.backlog = {b.repo: (len(b.walfiles), b.oldest_at)
                          for b in backlog(_wal_repos(vault), name)}
    report = _archive_report(status, checked, len(backups))
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_archive(report)
    if status.gaps:
        raise BackupFailed(f"the archive of cluster {name!r} has {len(status.gaps)} gap(s); "
                           "point-in-time recovery cannot cross them")


def _archive_report(status: Any, checked: Any, backups: int) -> dict[str, Any]:
    return {
        "cluster": status.cluster,
        "system_identifier": status.identity.system_identifier if status.identity else None,
        "checked": None if checked is None else {
            "walfile": checked.walfile, "seconds": round(checked.seconds, 3),
            "archiver": checked.archiver},
        "timelines": [{"timeline": t.timeline, "first": t.first, "last": t.last,
                       "segments": t.segments, "gaps": [list(g) for g in t.gaps]}
                      for t in status.timelines],
        "files": status.files,
        "stored_bytes": status.stored_bytes,
        "last_wal": status.last_wal,
        "last_archived_at": status.last_archived_at,
        "base_backups": backups,
        "recoverable_from": status.earliest_restore,
        "recoverable_to": status.latest_restore,
        "backlog": {repo: {"files": files, "oldest_at": since}
                    for repo, (files, since) in status.backlog.items()},
    }


def _print_archive(report: dict[str, Any]) -> None:
    from pgvault.console import human_bytes

    checked = report["checked"]
    if checked:
        click.echo(f"archived {checked['walfile']} into the repository in "
                   f"{checked['seconds']:.1f}s (server archiver: "
                   f"{checked['archiver']['archived_count']} archived, "
                   f"{checked['archiver']['failed_count']} failed)")
    click.echo(f"cluster {report['cluster']} (system {report['system_identifier']}): "
               f"{report['files']} WAL files, {human_bytes(report['stored_bytes'])}, "
               f"{report['base_backups']} base backups")
    for line in report["timelines"]:
        gaps = ", ".join(f"{a}..{b}" for a, b in line["gaps"]) or "none"
        click.echo(f"  timeline {line['timeline']}: {line['first']} .. {line['last']} "
                   f"({line['segments']} segments), gaps: {gaps}")
    for repo, behind in report["backlog"].items():
        since = behind["oldest_at"]
        click.echo(f"  WAL repository {repo}: " + (
            f"behind by {behind['files']} file(s) since {since:%Y-%m-%d %H:%M:%S} UTC (later "
            "pushes catch it up)" if behind["files"] else "current"))
    start, end = report["recoverable_from"], report["recoverable_to"]
    if start and end:
        click.echo(f"recoverable to any moment from {start:%Y-%m-%d %H:%M:%S} to "
                   f"{end:%Y-%m-%d %H:%M:%S} UTC")
    else:
        click.echo("recoverable window: none yet (needs a base backup and gap-free WAL)")


# ---------------------------------------------------------------- restore --physical

PHYSICAL_HELP = """\b
Physical restore (--physical): a base backup into an empty --pgdata folder, then
point-in-time recovery. Without a target, replay runs to the end of the archived
WAL. Targets: --target-time, --target-lsn, --target-xid, --target-name (a restore
point), --target immediate (end of the base backup). 'latest' picks the newest base
backup that ends before the target. The restored server does not archive (its new
timeline would confuse later restores) unless --keep-archiving is given.
"""


def physical_restore_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options `restore --physical` adds to `restore`."""
    options: list[Callable[[Any], Any]] = [
        click.option("--physical", is_flag=True,
                     help="Restore a base backup (point-in-time recovery) into --pgdata."),
        click.option("--pgdata", metavar="DIR", type=click.Path(file_okay=False),
                     help="[--physical] New or empty folder for the restored cluster."),
        click.option("--target-time", metavar="TIME",
                     help="[--physical] Replay up to this moment (ISO 8601; no zone: local)."),
        click.option("--target-lsn", metavar="LSN", help="[--physical] Replay up to this LSN."),
        click.option("--target-xid", metavar="XID",
                     help="[--physical] Replay up to this transaction's commit."),
        click.option("--target-name", metavar="NAME",
                     help="[--physical] Replay up to this restore point "
                          "(pg_create_restore_point)."),
        click.option("--target", "recovery_target", type=click.Choice(["immediate"]),
                     help="[--physical] immediate: stop once the backup is consistent."),
        click.option("--target-action", type=click.Choice(["promote", "pause", "shutdown"]),
                     default="promote", show_default=True,
                     help="[--physical] What the server does at the target."),
        click.option("--target-exclusive", is_flag=True,
                     help="[--physical] Stop just before the target instead of just after."),
        click.option("--target-timeline", default="latest", show_default=True,
                     help="[--physical] Timeline to follow: latest, current or a number."),
        click.option("--cluster", metavar="NAME",
                     help="[--physical] The cluster's name in the repository (default main) "
                          "[config physical.cluster]."),
        click.option("--start", is_flag=True,
                     help="[--physical] Start the server and wait until it reaches the target."),
        click.option("--port", type=click.IntRange(1, 65535),
                     help="[--physical] Port for --start (default: a free one)."),
        click.option("--keep-archiving", is_flag=True,
                     help="[--physical] Keep the backup's archive_mode (for a new primary)."),
        click.option("--recovery-timeout", type=float, default=3600.0, show_default=True,
                     metavar="SECONDS", help="[--physical] How long --start waits."),
        click.option("--pgvault-bin", metavar="PATH",
                     help="[--physical] pgvault program the server runs as restore_command "
                          "(default: this one)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def restore_physical(ctx: click.Context, backup_id: str, params: dict[str, Any]) -> None:
    """`restore --physical`: pick, unpack, configure recovery, optionally start."""
    from datetime import datetime

    from pgvault.console import ProgressLine, human_bytes, human_seconds
    from pgvault.errors import UsageError
    from pgvault.ops.physical_restore import (
        PhysicalRestoreOptions,
        RecoveryTarget,
        choose_backup,
        restore_command,
    )
    from pgvault.ops.physical_restore import restore_physical as run_restore

    if not params.get("pgdata"):
        raise UsageError("restore --physical needs --pgdata DIR (a new or empty folder)")
    vault = vault_of(ctx)
    settings, storage = vault.settings, vault.storage
    name = _cluster(settings, params.get("cluster"))
    target_time = None
    if params.get("target_time"):
        try:
            target_time = datetime.fromisoformat(params["target_time"]).astimezone()
        except ValueError:
            raise UsageError(f"--target-time {params['target_time']!r} is not an ISO 8601 "
                             "time, e.g. 2026-11-25T09:14:00+00:00") from None
    target = RecoveryTarget(
        time=target_time, lsn=params.get("target_lsn"), xid=params.get("target_xid"),
        name=params.get("target_name"), immediate=params.get("recovery_target") == "immediate",
        action=params.get("target_action") or "promote",
        timeline=params.get("target_timeline") or "latest",
        inclusive=not params.get("target_exclusive"),
    )
    manifest = choose_backup(storage, name, backup_id, target)
    identity_file = params.get("identity_file")
    command = restore_command(settings.repo, name, program=params.get("pgvault_bin"),
                              config_file=settings.config_file,
                              identity_file=identity_file)
    progress = ProgressLine(f"unpacking {manifest.id}", total=manifest.artifact("base.tar").size)
    options = PhysicalRestoreOptions(
        pgdata=Path(params["pgdata"]), target=target, restore_command=command,
        cluster=name, start=bool(params.get("start")), port=params.get("port"),
        keep_archiving=bool(params.get("keep_archiving")),
        timeout=params.get("recovery_timeout") or 3600.0, progress=progress,
        identities=vault.keyring_with(identity_file),
    )
    try:
        result = run_restore(storage, manifest, options)
    finally:
        progress.finish()
    facts = manifest.physical
    assert facts is not None
    click.echo(f"restored base backup {manifest.id} (ended {facts.stop_time:%Y-%m-%d %H:%M:%S}"
               f" UTC) into {result.pgdata}: {human_bytes(manifest.artifact('base.tar').size)}"
               f" read and verified, {human_seconds(result.unpack_seconds)}; recovery target: "
               f"{target.describe()}")
    if result.state == "configured":
        user = "sudo -u postgres " if os.geteuid() == 0 else ""
        click.echo(f"start it to replay the WAL: {user}pg_ctl -D {result.pgdata} -o '-p PORT' "
                   f"-l {result.pgdata}.log start")
    elif result.state == "shut down":
        click.echo(f"recovery reached the target in {human_seconds(result.recovery_seconds or 0)}"
                   " and the server shut down, as asked")
    else:
        click.echo(f"recovery {result.state} after {human_seconds(result.recovery_seconds or 0)};"
                   f" the server runs on 127.0.0.1:{result.port} (pid {result.pid}, log "
                   f"{result.log_path}); stop it with: pg_ctl -D {result.pgdata} stop")
