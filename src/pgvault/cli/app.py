"""The `pgvault` click group and what every command shares: options, settings, storage."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import click

from pgvault import __version__

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
  10   verification failed (a restore drill check other than integrity)
  11   decryption error (no identity given, or it is not a recipient of the backup)
  12   status: a database is CRITICAL (see `pgvault status --help`)
  130  interrupted (Ctrl-C or SIGTERM)
"""

CONNECTION_HELP = """\b
Connection: --dbname (a name, a postgresql:// URL or key=value), else
PGVAULT_DATABASE, DIRECT_URL, DATABASE_URL (Prisma-style parameters such as
?schema= and ?pgbouncer= are accepted), the config file, then libpq's PG*
variables. Passwords come from the URL, PGPASSWORD(_FILE) or PGPASSFILE, never
from a flag.
"""

state: dict[str, Any] = {"debug": False, "log_format": "text"}


def settings_of(ctx: click.Context) -> Any:
    """Settings from flags of this command (and the group), environment and config file."""
    from pgvault import config

    params = ctx.find_root().params | ctx.params
    settings = config.load(params.get("config"), repo=params.get("repo"))
    config.export_file_secrets()
    return settings


def storage_of(settings: Any) -> Any:
    """The repository the settings name; a command asks for it once it is set up."""
    from pgvault import config
    from pgvault.storage import open_storage

    options = config.s3_options(settings) if settings.repo.startswith("s3://") else None
    storage = open_storage(settings.repo, options)
    startup_done()
    return storage


def startup_done() -> None:
    """Resume garbage collection (main() pauses it), sparing the start-up heap from now on."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


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
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              envvar="PGVAULT_LOG_FORMAT", show_default=True,
              help="Logs on stderr: human text, or one JSON object per line (also for errors) "
                   "[env PGVAULT_LOG_FORMAT].")
def cli(debug: bool, log_format: str) -> None:
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
    from pgvault import logs

    state["debug"] = debug
    state["log_format"] = log_format
    logs.configure(log_format, debug=debug)




def database_filter(dbname: str | None) -> str | None:
    """A --dbname given to list/show/restore selects backups by database name."""
    if not dbname:
        return None
    from pgvault.pg.conninfo import ConnInfo

    return ConnInfo.parse(dbname).dbname or dbname
