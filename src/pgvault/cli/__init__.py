"""The `pgvault` command: parse argv, call one operation, print, map errors to exit codes.

Each module of this package adds its commands to the one click group in ``app``.
"""

from __future__ import annotations

import signal
import sys
import traceback
from typing import NoReturn

import click

from pgvault.cli import backup, retention  # noqa: F401  (registers the commands)
from pgvault.cli.app import cli, state
from pgvault.errors import Interrupted, PgvaultError


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
        if state["debug"]:
            traceback.print_exc()
        click.echo(f"pgvault: {exc}", err=True)
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except Exception as exc:
        if state["debug"]:
            traceback.print_exc()
        click.echo(f"pgvault: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
