"""The `pgvault` command: parse argv, call one operation, print, map errors to exit codes.

Each module of this package adds its commands to the one click group in ``app``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from types import FrameType

import click

from pgvault import redact
from pgvault.cli.app import Invocation, cli
from pgvault.errors import Interrupted, PgvaultError, Terminated
from pgvault.redact import ScrubbingWriter, scrub

CLEANUP_SECONDS = 15.0
"""After SIGTERM or SIGINT, how long the cleanup (abort uploads, delete partial data, release
the lock) may take before pgvault exits without it: a repository that stopped answering must
not keep a stopped pgvault alive."""
EXIT_SECONDS = 3.0
"""How long exiting may wait for threads still blocked in a network wait whose result no
longer matters (an abandoned upload part); then the process ends at once."""

_signalled: list[int] = []


def _exit_code(signum: int) -> int:
    """The shell's convention, 128 + the signal: Interrupted's 130, Terminated's 143."""
    return 128 + signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The first signal unwinds the command (its cleanup runs); later ones wait for that."""
    if _signalled:
        return  # a second Ctrl-C must not cut the cleanup short: the watchdog bounds it
    _signalled.append(signum)
    # Threads other than this one (parallel dumps' uploads) stop waiting too. Imported here:
    # a run that never reaches the storage (--version) does not pay for it.
    from pgvault.storage.base import STOPPING

    STOPPING.set()
    name = signal.Signals(signum).name
    _exit_later(CLEANUP_SECONDS, _exit_code(signum),
                f"pgvault: interrupted by {name}; cleanup did not finish within "
                f"{CLEANUP_SECONDS:g} s, exiting without it (a lock left behind is taken "
                "over once stale)\n")
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(f"stopped by {name}")


def _exit_later(seconds: float, code: int, message: str = "") -> None:
    """End the process in ``seconds`` unless it has ended by then, whatever blocks it."""
    def fire() -> None:
        if message:
            os.write(2, message.encode())  # not sys.stderr: its lock may be held right now
        os._exit(code)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


class _WarningLine(logging.Formatter):
    """'warning: <message>', scrubbed, like every other line pgvault prints."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {scrub(record.getMessage())}"


@contextlib.contextmanager
def _scrubbed_output() -> Iterator[None]:
    """For this run, stdout and stderr go through the redactor, so no secret is printed;
    the streams, the pgvault logger and the redactor's secrets are put back after it, so
    one in-process run leaves nothing to the next."""
    streams = sys.stdout, sys.stderr
    logger = logging.getLogger("pgvault")
    saved = list(logger.handlers), logger.level, logger.propagate
    with redact.scope():
        if not isinstance(sys.stdout, ScrubbingWriter):
            sys.stdout = ScrubbingWriter(sys.stdout)
        if not isinstance(sys.stderr, ScrubbingWriter):
            sys.stderr = ScrubbingWriter(sys.stderr)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_WarningLine())
            logger.addHandler(handler)
            logger.propagate = False
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            sys.stdout, sys.stderr = streams
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])
            logger.propagate = saved[2]


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one pgvault command; its exit code (one line per error on stderr).

    ``argv`` (without the program name) and ``env`` default to this process's own. Called
    with neither, main() is the process's entry point (the console script's ``sys.exit(
    main())``): it installs the signal handlers and may end lingering threads at exit.
    Called with either, it runs in-process (tests, embedding) and touches no process-wide
    state beyond the run: no signal handlers, no watchdog, streams and logging put back.
    """
    if argv is not None or env is not None:
        with _scrubbed_output():
            return _run(argv, os.environ if env is None else env)
    # Start-up creates many objects that live until exit (click, psycopg, boto3); the
    # collector walking them while they are created is a measurable share of every
    # command's start (docs/performance.md). It resumes once a command has what it needs
    # (app.startup_done).
    gc.disable()
    try:
        signal.signal(signal.SIGTERM, _on_signal)
        # Left alone when ignored: a shell starts background jobs with SIGINT ignored on
        # purpose.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_signal)
        with _scrubbed_output():
            code = _run(None, os.environ)
        # Interpreter exit joins every worker thread: one still stalled in the network
        # (its work abandoned by the cleanup) would hold the process for its whole timeout.
        main_thread = threading.main_thread()
        if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
            _exit_later(EXIT_SECONDS, code)
        return code
    finally:
        # What is alive now dies with the process: keep the collector from walking it again
        # at interpreter exit, which cost every command time at its end.
        gc.freeze()


def _run(argv: list[str] | None, environ: Mapping[str, str]) -> int:
    run = Invocation(environ)
    try:
        code = cli.main(args=argv, prog_name="pgvault", standalone_mode=False, obj=run)
        return code if isinstance(code, int) else 0
    except SystemExit as exc:  # a command's own sys.exit(code)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click.exceptions.Abort:
        return _interrupted(run)
    except click.ClickException as exc:
        exc.show()
        return 2 if exc.exit_code == 2 else exc.exit_code or 2
    except KeyboardInterrupt:
        return _interrupted(run)
    except PgvaultError as exc:
        redact.register(*getattr(exc, "secrets", ()))
        if run.debug:
            traceback.print_exc()
        if _signalled or isinstance(exc, Interrupted):
            # Whatever failed once a signal came is the signal's doing: report that.
            return _interrupted(run)
        return _fail(run, str(exc), exc.exit_code)
    except Exception as exc:
        if run.debug:
            traceback.print_exc()
        if _signalled:
            return _interrupted(run)
        return _fail(run, f"internal error: {type(exc).__name__}: {exc}", 1)


def _interrupted(run: Invocation) -> int:
    """The one line and exit code of a run stopped by a signal (SIGINT also when unknown)."""
    signum = _signalled[0] if _signalled else signal.SIGINT
    return _fail(run, "interrupted" if signum == signal.SIGINT else f"interrupted by "
                 f"{signal.Signals(signum).name}", _exit_code(signum))


def _fail(run: Invocation, message: str, code: int) -> int:
    """The one error line, scrubbed: plain text, or a JSON object with --log-format json."""
    if run.log_format == "json":
        import json

        click.echo(json.dumps({"level": "error", "message": scrub(message),
                               "exit_code": code}), err=True)
    else:
        click.echo(f"pgvault: {scrub(message)}", err=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
