"""The `pgvault` command: parse argv, call one operation, print, map errors to exit codes.

Each module of this package adds its commands to the one click group in ``app``.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import traceback
from typing import NoReturn

import click

from pgvault.cli import (  # noqa: F401  (registers the commands)
    backup,
    monitor,
    physical,
    retention,
    security,
    verify,
)
from pgvault.cli.app import cli, state
from pgvault.errors import Interrupted, PgvaultError
from pgvault.redact import ScrubbingWriter, scrub


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise Interrupted("stopped by SIGTERM")


class _WarningLine(logging.Formatter):
    """'warning: <message>', scrubbed, like every other line pgvault prints."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {scrub(record.getMessage())}"


def _scrub_output() -> None:
    """Route stdout and stderr through the redactor, so no secret is ever printed."""
    if not isinstance(sys.stdout, ScrubbingWriter):
        sys.stdout = ScrubbingWriter(sys.stdout)
    if not isinstance(sys.stderr, ScrubbingWriter):
        sys.stderr = ScrubbingWriter(sys.stderr)
    logger = logging.getLogger("pgvault")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_WarningLine())
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point: one line per error on stderr, exit code by error kind."""
    # Start-up creates many objects that live until exit (click, psycopg, boto3); the
    # collector walking them while they are created costs 15-30 ms of every command. It
    # resumes once a command has what it needs (app.startup_done).
    gc.disable()
    try:
        _run(argv)
    finally:
        # What is alive now dies with the process: keep the collector from walking it again
        # at interpreter exit (30-70 ms of every command when pydantic was still imported).
        gc.freeze()


def _run(argv: list[str] | None) -> NoReturn:
    signal.signal(signal.SIGTERM, _on_sigterm)
    _scrub_output()
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
        _fail(str(exc), exc.exit_code)
    except SystemExit:
        raise
    except Exception as exc:
        if state["debug"]:
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {exc}", 1)


def _fail(message: str, code: int) -> NoReturn:
    """The one error line, scrubbed: plain text, or a JSON object with --log-format json."""
    if state.get("log_format") == "json":
        import json

        click.echo(json.dumps({"level": "error", "message": scrub(message),
                               "exit_code": code}), err=True)
    else:
        click.echo(f"pgvault: {scrub(message)}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
