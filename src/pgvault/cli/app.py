"""The `pgvault` click group and what every command shares: options, settings, storage."""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import click

from pgvault import __version__


def _exit_code_table() -> str:
    """The exit codes, from the error classes themselves: the table cannot fall behind."""
    import textwrap

    from pgvault import errors

    rows = {0: "Success", 1: "Unexpected internal error (a bug: please report it, with --debug)"}
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.PgvaultError) and (
                value is not errors.PgvaultError and value.__doc__):
            # The first class with a code describes it (subclasses refine, e.g. NotFound).
            rows.setdefault(value.exit_code, value.__doc__.strip().splitlines()[0].rstrip("."))
    lines = ["\b", "Exit codes:"]
    for code in sorted(rows):
        lines += textwrap.wrap(rows[code], 68, initial_indent=f"  {code:<4} ",
                               subsequent_indent=" " * 7)
    return "\n".join(lines) + "\n"


EXIT_CODES = _exit_code_table()

CONNECTION_HELP = """\b
Connection: --dbname (a name, a postgresql:// URL or key=value), else
PGVAULT_DATABASE, DIRECT_URL, DATABASE_URL (Prisma-style parameters such as
?schema= and ?pgbouncer= are accepted), the config file's database, then
libpq's PG* variables (PGDATABASE, PGHOST, ...). With none of them naming a
database, backup refuses to guess. Passwords: see below.
"""

PASSWORD_HELP = """\b
Passwords: never on the command line, where every user of this host can read
them (ps): a password in --dbname, --to or --server is refused. Give it as
PGPASSWORD, or PGPASSWORD_FILE (a file holding only the password), in
~/.pgpass or the file PGPASSFILE names, or inside a URL that is not an
argument: DATABASE_URL(_FILE), DIRECT_URL(_FILE), PGVAULT_DATABASE, the
config file's database (or [verify] server). For example:
  export PGPASSWORD_FILE=/run/secrets/pg-password      # mode 0600
  pgvault backup --dbname postgresql://app@db.internal:5432/app
pgvault hands it to pg_dump and pg_restore in a private PGPASSFILE.
"""

@dataclass
class Invocation:
    """One run of the command (``cli.main``'s ``obj``): its environment, and what the
    group's options chose. Nothing of a run outlives it in module state."""

    environ: Mapping[str, str]
    debug: bool = False
    log_format: str = "text"


def invocation(ctx: click.Context | None = None) -> Invocation:
    """The run ``ctx`` (else the current click context) belongs to."""
    root = (ctx or click.get_current_context()).find_root()
    if not isinstance(root.obj, Invocation):  # cli invoked by click directly (CliRunner)
        import os

        root.obj = Invocation(os.environ)
    return root.obj


def settings_of(ctx: click.Context) -> Any:
    """Settings from flags of this command (and the group), environment and config file.

    The composition edge: the secrets the settings hold are registered with the redactor
    here, so nothing this run prints shows them.
    """
    from pgvault import config

    params = ctx.find_root().params | ctx.params
    settings = config.load({"repo": params.get("repo")}, invocation(ctx).environ,
                           params.get("config"))
    config.register_secrets(settings)
    return settings


def startup_done() -> None:
    """Resume garbage collection (main() pauses it), sparing the start-up heap from now on."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def common(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command takes."""
    func = click.option("--repo", metavar="URL", help="Repository: file:///path or "
                        "s3://bucket/prefix, or a [[repos]] name [env PGVAULT_REPO].")(func)
    func = click.option("--config", "config", metavar="FILE", type=click.Path(dir_okay=False),
                        help="TOML config file [env PGVAULT_CONFIG].")(func)
    return func


def _no_password(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a password (or a malformed URL) in --dbname while parsing, before any work."""
    if value:
        from pgvault import config

        config.command_line_connection(value, "--dbname")
    return value


def dbname_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-d", "--dbname", metavar="DB", callback=_no_password,
                        help="Database name, URL or key=value conninfo (never put a password "
                             "here; see below).")(func)


# The module of pgvault.cli that defines each command. A run imports only the one it asks
# for (the server runs wal-push once per WAL segment); --help imports them all.
COMMANDS = {
    "backup": "backup", "list": "backup", "show": "backup", "restore": "backup",
    "demo": "backup", "basebackup": "physical", "wal-push": "physical", "wal-fetch": "physical",
    "check-archive": "physical", "status": "monitor", "check": "monitor", "daemon": "monitor",
    "prune": "retention", "pin": "retention", "unpin": "retention", "verify": "verify",
    "keygen": "security", "copy": "copy", "snapshot": "snapshot", "run": "fleet",
    "fleet": "fleet",
    "console": "web",
}


class _Group(click.Group):
    """The pgvault group: commands are imported when asked for, and every command that
    takes --dbname explains where passwords go."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            import importlib

            importlib.import_module(f"pgvault.cli.{COMMANDS[cmd_name]}")  # registers it
        return self.commands.get(cmd_name)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        takes_connection = any(param.name in ("dbname", "server") for param in cmd.params)
        epilog = cmd.epilog or ""
        if takes_connection and PASSWORD_HELP not in epilog:
            if CONNECTION_HELP in epilog:
                epilog = epilog.replace(CONNECTION_HELP, CONNECTION_HELP + "\n" + PASSWORD_HELP)
            else:
                epilog = PASSWORD_HELP + ("\n" + epilog if epilog else "")
            cmd.epilog = epilog
        super().add_command(cmd, name)


class _EnvOption(click.Option):
    """An option whose variable comes from the run's environment, not this process's."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        if not isinstance(self.envvar, str):
            return None
        return invocation(ctx).environ.get(self.envvar) or None


@click.group(cls=_Group, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgvault")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              envvar="PGVAULT_LOG_FORMAT", show_default=True, cls=_EnvOption,
              help="Logs on stderr: human text, or one JSON object per line (also for errors) "
                   "[env PGVAULT_LOG_FORMAT].")
@click.pass_context
def cli(ctx: click.Context, debug: bool, log_format: str) -> None:
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

    run = invocation(ctx)
    run.debug = debug
    run.log_format = log_format
    logs.configure(log_format, debug=debug)




def database_filter(dbname: str | None) -> str | None:
    """A --dbname given to list/show/restore selects backups by database name."""
    if not dbname:
        return None
    from pgvault import config

    return config.command_line_connection(dbname).dbname or dbname


def vault_of(ctx: click.Context, settings: Any = None) -> Any:
    """The wired parts (pgvault.vault.Vault) for this command's settings and repository."""
    from pgvault.vault import Vault

    vault = Vault.open(settings if settings is not None else settings_of(ctx))
    startup_done()
    return vault
