"""A psql child holding the transaction whose snapshot a backup exports.

psql starts and connects in a few milliseconds, where importing psycopg and connecting take
~0.15 s. With the snapshot held by psql, pg_dump starts first, and the facts connection
(psycopg) imports the same snapshot beside the dump.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pgvault.errors import DatabaseError
from pgvault.pg.binaries import PG_LIB_DIR, installed_majors
from pgvault.pg.conninfo import ConnInfo
from pgvault.pg.process import StderrTail

SEPARATOR = "\x1f"  # never in a version string or a hex-encoded name
READY = "pgvault-ready"
DONE = "pgvault-done"
_SNAPSHOT_ID = re.compile(r"^[0-9A-F]+-[0-9A-F]+(-[0-9]+)?$")
_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")

# The name travels hex-encoded: a database name may hold any character but NUL.
PREFLIGHT_SQL = (
    "SELECT encode(convert_to(current_database(), 'UTF8'), 'hex'),"
    " current_setting('server_version'), current_setting('server_version_num'),"
    " coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false),"
    " pg_backend_pid();\n"
)
# Some poolers and old standbys refuse to export; pg_dump then takes its own snapshot.
EXPORT_SQL = (
    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;\n"
    "\\set ON_ERROR_STOP 0\n"
    "SELECT pg_export_snapshot();\n"
    f"\\echo {READY}\n"
)


def identifier(name: str, *, as_needed: bool = False) -> str:
    """``name`` as a quoted SQL identifier.

    ``as_needed``: a plain lower-case name stays bare, as quote_ident writes it (keywords
    aside, so for what a message shows, never for SQL that is sent).
    """
    if as_needed and _PLAIN.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def text_literal(value: str) -> str:
    """``value`` as a SQL expression that reads the same whatever the quoting settings."""
    return f"convert_from(decode('{value.encode().hex()}', 'hex'), 'UTF8')"


@dataclass(frozen=True)
class ServerInfo:
    """What preflight learned about the server and the database."""

    database: str
    version: str
    version_num: int
    is_superuser: bool
    backend_pid: int = 0
    """The server process that answered: another one later means a pooler in between."""

    @property
    def major(self) -> int:
        return self.version_num // 10000


def psql_path() -> Path:
    """The newest psql here: these statements run on any server version pgvault supports."""
    majors = installed_majors()
    if majors:
        candidate = PG_LIB_DIR / str(majors[-1]) / "bin" / "psql"
        if candidate.is_file():
            return candidate
    found = shutil.which("psql")
    if found is None:
        raise DatabaseError("psql not found; install postgresql-client")
    return Path(found)


class PsqlSession:
    """One psql connection, started at once; ``preflight`` waits for its first answer."""

    def __init__(self, conn: ConnInfo) -> None:
        self.conn = conn
        self._stack = ExitStack()
        env = dict(self._stack.enter_context(conn.child_env()))
        env.setdefault("PGCONNECT_TIMEOUT", "15")
        env["PGCLIENTENCODING"] = "UTF8"  # names in statements are sent as UTF-8
        argv = [str(psql_path()), "--no-psqlrc", "--no-align", "--tuples-only", "--quiet",
                "--no-password", "--set=ON_ERROR_STOP=1", f"--field-separator={SEPARATOR}",
                f"--dbname={conn.dsn()}"]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env)
        except OSError as exc:
            self._stack.close()
            raise DatabaseError(f"cannot start psql: {exc.strerror}") from None
        assert self.proc.stderr is not None
        self._tail = StderrTail(self.proc.stderr)
        self._send(PREFLIGHT_SQL)

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # psql has exited: _line() says why
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        raw = self.proc.stdout.readline()
        if not raw:
            self.proc.wait()
            self._tail.join()
            message = self._tail.last_error().removeprefix("psql: error: ").strip()
            raise DatabaseError(f"cannot connect to {self.conn.redacted()}: {message}")
        return raw.decode("utf-8", "replace").rstrip("\n")

    def preflight(self) -> ServerInfo:
        fields = self._line().split(SEPARATOR)
        if len(fields) != 5:
            raise DatabaseError(f"unexpected preflight answer from psql: {fields!r}")
        name, version, version_num, superuser, pid = fields
        return ServerInfo(database=bytes.fromhex(name).decode("utf-8", "replace"),
                         version=version, version_num=int(version_num),
                         is_superuser=superuser == "t", backend_pid=int(pid))

    def run(self, statement: str) -> list[list[str]]:
        """Run one statement after ``preflight``; its rows as text fields.

        A failed statement raises DatabaseError with the server's message and leaves the
        session usable (psql's ERROR and LAST_ERROR_MESSAGE variables, psql 11 and later).
        """
        self._send(f"\\set ON_ERROR_STOP 0\n{statement};\n\\echo {READY} :ERROR\n"
                   f"\\echo :LAST_ERROR_MESSAGE\n\\echo {DONE}\n")
        rows = []
        while not (line := self._line()).startswith(READY + " "):
            rows.append(line.split(SEPARATOR))
        failed = line.removeprefix(READY + " ")
        message = []  # a message may span lines (it can quote a name holding a newline)
        while (line := self._line()) != DONE:
            message.append(line)
        if failed == "true":
            raise DatabaseError(" ".join(message).strip() or "statement failed")
        if failed != "false":
            raise DatabaseError(f"{psql_path()} is too old to report errors (psql 11 or later)")
        return rows

    def export_snapshot(self) -> str | None:
        """Begin a repeatable-read transaction and export its snapshot; None if refused."""
        self._send(EXPORT_SQL)
        snapshot = None
        while (line := self._line()) != READY:
            if _SNAPSHOT_ID.match(line):
                snapshot = line
        if snapshot is None:
            self._send("ROLLBACK;\n")
        return snapshot

    def close(self) -> None:
        """End the transaction (psql rolls back as it disconnects) and reap psql."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            self._tail.join()
            self._stack.close()
