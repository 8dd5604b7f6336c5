"""The logical engine: pg_dump / pg_dumpall out, pg_restore in, facts from one snapshot."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgvault.errors import BackupFailed, ConfigError, DatabaseError, RestoreFailed
from pgvault.model import Facts, TableFacts, UnrecordedTable
from pgvault.pg.archive import MAX_TOC_BYTES, Incomplete, Selection, Toc, read_toc
from pgvault.pg.binaries import tool, tool_version
from pgvault.pg.conninfo import ConnInfo
from pgvault.pg.process import ChildOutput
from pgvault.pg.psql import PsqlSession, ServerInfo, identifier, text_literal
from pgvault.pipeline.stream import CHUNK, Readable, Reader

if TYPE_CHECKING:
    # A backup never restores: these are imported by the restore methods that use them
    # (with pg/fingerprint, read by the facts beside the dump), not on a backup's way to
    # starting pg_dump.
    from pgvault.engines.portable import Fit
    from pgvault.engines.spool import Spool

log = logging.getLogger(__name__)

DUMP_FORMAT = "pg_dump-custom"
# A custom-format archive of some tables' data only, taken beside the main archive (which
# then leaves that data out) under the same snapshot; restored between its pre-data and
# its data sections.
DATA_FORMAT = "pg_dump-custom-data"
DUMP_FORMATS = (DUMP_FORMAT, DATA_FORMAT)
GLOBALS_FORMAT = "sql"
# A table of at least this much gets a pg_dump of its own when the rest holds as much too.
# The bench's 300 MB shop (events 58% of it), backed up on 2 CPUs: 3.39 s in one stream,
# 2.90 s in two (medians of 5).
SPLIT_MIN_BYTES = 64 << 20
MAX_STREAMS = 4

# The tables whose rows pg_dump writes, as the snapshot's catalog lists them: pg_dump reads
# the same catalog in the same snapshot (a table created later is in neither, one dropped
# later is in both: pg_dump's lock, and ours, made the DROP wait).
TABLES_SQL = """
SELECT n.nspname, c.relname, c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE (c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated))
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
  AND (%(schema)s::text IS NULL OR n.nspname = %(schema)s::text)
ORDER BY 1, 2
"""


LARGEST_TABLES_SQL = """
SELECT encode(convert_to(n.nspname, 'UTF8'), 'hex'), encode(convert_to(c.relname, 'UTF8'), 'hex'),
       pg_table_size(c.oid), sum(pg_table_size(c.oid)) OVER ()
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
  {schema}
ORDER BY 3 DESC NULLS LAST LIMIT {limit}
"""


@dataclass(frozen=True)
class Table:
    """A table by schema and name, with its size on disk when it was chosen."""

    schema: str
    name: str
    size: int = 0

    def pattern(self) -> str:
        """A pg_dump --table pattern matching exactly this table (quoted: no wildcards)."""
        return identifier(self.schema) + "." + identifier(self.name)


def dump_streams(asked: int) -> int:
    """How many pg_dump streams a backup may run at once: as asked, or one per CPU."""
    return asked if asked > 0 else min(os.cpu_count() or 1, MAX_STREAMS)


def split_tables(sizes: list[Table], total: int, streams: int,
                 min_bytes: int = SPLIT_MIN_BYTES) -> list[Table]:
    """The tables to dump apart, one stream each, largest first; the rest stays together.

    A table goes apart if it holds ``min_bytes`` and what stays in the main archive still
    does: splitting a database that is one big table would only add a process.
    """
    chosen: list[Table] = []
    rest = total
    for table in sizes[:max(streams - 1, 0)]:
        if table.size < min_bytes or rest - table.size < min_bytes:
            break
        chosen.append(table)
        rest -= table.size
    return chosen


@dataclass
class Snapshot:
    """A snapshot pg_dump imports; ``facts`` reads in it on a connection of its own.

    The exporting transaction stays open in psql (``PsqlSession``) until the dump is done.
    """

    snapshot_id: str | None
    connection: Any = None  # the facts connection, once ``facts`` has made it
    aborted: threading.Event = field(default_factory=threading.Event)
    # Set by the backup once every pg_dump has ended: a count that timed out waiting for a
    # lock is tried once more then (pg_dump had that lock, so its holder let go meanwhile).
    # None: try again at once.
    dumped: threading.Event | None = None
    warnings: list[str] = field(default_factory=list)
    """What the facts could not record, for the backup's output and manifest."""

    def interrupt(self, worker: threading.Thread, timeout: float = 10.0) -> None:
        """Stop the facts being read in ``worker``: no new statement, cancel the current one.

        Without this, a count waiting on a table lock would keep the connection busy and
        the snapshot's rollback would wait for it forever.
        """
        self.aborted.set()
        deadline = time.monotonic() + timeout
        while worker.is_alive() and time.monotonic() < deadline:
            if self.connection is not None:
                with contextlib.suppress(Exception):
                    self.connection.cancel_safe(timeout=2)
            worker.join(0.1)

    def check(self) -> None:
        if self.aborted.is_set():
            raise BackupFailed("backup stopped while recording facts")


def _serial_scans(cur: Any) -> None:
    """No parallel workers for the counts: they only have to end before the dump does.

    Parallel workers would take CPU from pg_dump's own backend while it runs, for a count
    that is not needed sooner (measured in docs/performance.md).
    No statement timeout either: pg_dump turns it off for its COPY of the same table, so a
    role's ``statement_timeout`` would leave out only the count. A ``lock_timeout`` is kept:
    a count waiting on a lock taken after pg_dump read the table could wait for ever.
    """
    import psycopg

    for setting in ("max_parallel_workers_per_gather", "statement_timeout"):
        cur.execute("SAVEPOINT pgvault_serial")
        try:
            cur.execute("SELECT set_config(%s, '0', true)", (setting,))
        except psycopg.Error:  # a server without parallel query: nothing to turn off
            cur.execute("ROLLBACK TO SAVEPOINT pgvault_serial")
        cur.execute("RELEASE SAVEPOINT pgvault_serial")


def _reason(exc: BaseException) -> str:
    """The server's own words for why a statement failed, on one line."""
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)
    if primary:
        return str(primary)
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _in_savepoint(cur: Any, query: Any) -> tuple[Any, BaseException | None]:
    """Run one statement in a savepoint: (its first row, None) or (None, the error).

    A failure must not abort the transaction whose snapshot the dump shares; a success is
    released, not rolled back, so the lock the statement took is kept.
    """
    import psycopg

    cur.execute("SAVEPOINT pgvault_fact")
    try:
        row = cur.execute(query).fetchone()
    except psycopg.Error as exc:
        cur.execute("ROLLBACK TO SAVEPOINT pgvault_fact")
        return None, exc
    cur.execute("RELEASE SAVEPOINT pgvault_fact")
    return row, None


def _shown(name: str) -> str:
    """A name as a reader expects it: quoted only where SQL would need it."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else identifier(name)


class _Peeked(Reader):
    """A stream whose table of contents was read ahead (None if it cannot be read) and is
    replayed; ``selection`` is set when the restore leaves entries out."""

    def __init__(self, source: Readable) -> None:
        super().__init__()
        self._source = source
        self.selection: Selection | None = None
        self.toc: Toc | None = None
        head = bytearray()
        while True:
            chunk = source.read(CHUNK)
            head += chunk
            try:
                self.toc = read_toc(head)
                break
            except Incomplete:
                if not chunk or len(head) > MAX_TOC_BYTES:
                    break
            except ValueError:
                break
        self._head = memoryview(bytes(head))

    def read_chunk(self, size: int) -> bytes:
        if self._head:
            data, self._head = bytes(self._head[:size]), self._head[size:]
            return data
        return self._source.read(size)

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
        super().close()


def _lock_timed_out(exc: BaseException | None) -> bool:
    return getattr(exc, "sqlstate", None) == "55P03"  # lock_not_available


class LogicalEngine:
    """Produces and consumes the artifacts of a logical backup of one database."""

    def __init__(self, conn: ConnInfo, server: ServerInfo | None = None) -> None:
        """``server``: what a preflight on another database of that server already learned."""
        self.conn = conn
        self._server = server

    @property
    def server(self) -> ServerInfo:
        if self._server is None:
            self._server = self.preflight()
        return self._server

    def session(self) -> PsqlSession:
        """A psql session for ``preflight`` and then ``snapshot``: it starts in milliseconds."""
        return PsqlSession(self.conn)

    def preflight(self, session: PsqlSession | None = None) -> ServerInfo:
        """Learn the server version and make sure a suitable pg_dump exists.

        Asks ``session`` (left open) when given, else a psql session of its own.
        """
        if session is None:
            own = self.session()
            try:
                return self.preflight(own)
            finally:
                own.close()
        info = session.preflight()
        self._server = info
        tool("pg_dump", info.major)
        self._refuse_transaction_pooler(session, info)
        return info

    def _refuse_transaction_pooler(self, session: PsqlSession, info: ServerInfo) -> None:
        """ConfigError when the connection goes through a pooler in transaction mode.

        pg_dump sets its session up (search_path, the snapshot it imports) and then reads in
        one long transaction; a transaction pooler may hand each transaction another server
        session, so a dump through it can be silently wrong. The host may say so (Neon's
        -pooler, Supabase's port 6543); else (Prisma's pgbouncer=true may mark a session
        pooler too) a second session holds a transaction while ours asks which server
        process answers it now: the same one, unless a pooler gave ours away in between.
        """
        why = self.conn.transaction_pooler()
        if why is None:
            with contextlib.suppress(DatabaseError):  # cannot tell (a connection limit)
                other = PsqlSession(self.conn)
                try:
                    other.preflight()
                    other.run("BEGIN")
                    pid = session.run("SELECT pg_backend_pid()")[0][0]
                finally:
                    other.close()
                if info.backend_pid and int(pid) != info.backend_pid:
                    marked = ", as its pgbouncer=true says" if self.conn.pgbouncer else ""
                    why = ("its server session changed between two transactions (a pooler "
                           f"in transaction mode{marked})")
        if why is not None:
            raise ConfigError(
                f"{self.conn.redacted()} cannot hold pg_dump's snapshot and transaction: "
                f"{why}; back up through the direct connection (DIRECT_URL, which pgvault "
                "prefers to DATABASE_URL, or --dbname): Supabase's db.<ref>.supabase.co:5432 "
                "or its session pooler on port 5432, Neon's host without -pooler")

    def tool_versions(self) -> dict[str, str]:
        major = self.server.major
        return {
            name: ".".join(map(str, tool_version(tool(name, major))))
            for name in ("pg_dump", "pg_restore")
        }

    @contextlib.contextmanager
    def snapshot(self, session: PsqlSession | None = None) -> Iterator[Snapshot]:
        """Export a repeatable-read snapshot for pg_dump, held open until the block ends.

        Runs on ``session`` (after its ``preflight``) when given, else on a new one; either is
        closed at the end, with the facts connection if one was made.
        """
        if session is None:
            session = self.session()
            try:
                session.preflight()
            except BaseException:
                session.close()
                raise
        snapshot = Snapshot(snapshot_id=None)
        try:
            snapshot.snapshot_id = session.export_snapshot()
            yield snapshot
        finally:
            if snapshot.connection is not None:
                with contextlib.suppress(Exception):
                    snapshot.connection.execute("ROLLBACK")
                snapshot.connection.close()
            session.close()

    def _facts_connection(self, snapshot: Snapshot) -> Any:
        """A connection in a repeatable-read transaction that sees ``snapshot``.

        Made beside the running dump, so importing psycopg and connecting cost no wall time.
        Where the snapshot cannot be imported, the facts are read in a snapshot of their own,
        as when it could not be exported.
        """
        import psycopg
        from psycopg import sql

        connection = self.conn.connect(autocommit=True)
        snapshot.connection = connection
        snapshot.check()
        connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        if snapshot.snapshot_id:
            try:
                connection.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                    sql.Literal(snapshot.snapshot_id)))
            except psycopg.Error:
                connection.execute("ROLLBACK")
                connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return connection

    def facts(self, snapshot: Snapshot) -> Facts:
        """Exact row counts and server facts, read in the dump's snapshot.

        Every table of the dump is counted or named in ``Facts.unrecorded`` with the reason
        (and a line in ``snapshot.warnings``): a fact is never silently missing.
        """
        from psycopg import sql

        connection = snapshot.connection or self._facts_connection(snapshot)
        cur = connection.cursor()
        version, version_num, size, encoding = cur.execute(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
            " pg_database_size(current_database()),"
            " pg_encoding_to_char(encoding) FROM pg_database"
            " WHERE datname = current_database()"
        ).fetchone()
        extensions = dict(cur.execute("SELECT extname, extversion FROM pg_extension").fetchall())
        _serial_scans(cur)
        listed = [(schema, name, kind == "m") for schema, name, kind in
                  cur.execute(TABLES_SQL, {"schema": self.conn.schema}).fetchall()]

        def ident(schema: str, name: str) -> Any:
            return sql.Identifier(schema, name)

        # Share-lock every table first, as pg_dump does, without waiting: each count may
        # take a while, and a table locked now can no longer be dropped before its count.
        # One that cannot be locked at once (a DROP queued behind pg_dump's lock, a long
        # ALTER) is counted last, so its wait never holds up the others.
        later: list[tuple[str, str]] = []
        for schema, name, _ in listed:
            snapshot.check()
            _, error = _in_savepoint(cur, sql.SQL(
                "LOCK TABLE ONLY {} IN ACCESS SHARE MODE NOWAIT").format(ident(schema, name)))
            if error is not None:
                later.append((schema, name))
        counted: dict[tuple[str, str], int] = {}
        failed: dict[tuple[str, str], BaseException] = {}

        def count(schema: str, name: str) -> None:
            snapshot.check()
            row, error = _in_savepoint(cur, sql.SQL("SELECT count(*) FROM ONLY {}").format(
                ident(schema, name)))
            snapshot.check()  # a cancel by ``interrupt`` is no fact about the table
            if error is None:
                counted[schema, name] = int(row[0])
                failed.pop((schema, name), None)
            else:
                failed[schema, name] = error

        for schema, name in [(s, n) for s, n, _ in listed if (s, n) not in later] + later:
            count(schema, name)
        waited = [key for key, error in failed.items() if _lock_timed_out(error)]
        if waited:
            while snapshot.dumped is not None and not snapshot.dumped.wait(0.2):
                snapshot.check()
            for schema, name in waited:
                count(schema, name)
        tables = [TableFacts(schema_name=schema, name=name, rows=counted[schema, name],
                             **({"materialized": True} if view else {}))
                  for schema, name, view in listed if (schema, name) in counted]
        unrecorded = [UnrecordedTable(schema_name=schema, name=name,
                                      reason=_reason(failed[schema, name]))
                      for schema, name, _ in listed if (schema, name) in failed]
        for table in unrecorded:
            snapshot.warnings.append(
                f"rows of {_shown(table.schema_name)}.{_shown(table.name)} not "
                f"counted ({table.reason}): the table is in the dump; drills skip its count")
        snapshot.check()
        from pgvault.pg import fingerprint

        problems: list[str] = []
        # Both run in savepoints of their own: a failure records None, never aborts.
        schema_fingerprint = fingerprint.schema_fingerprint(cur, self.conn.schema, problems)
        migrations = fingerprint.migration_tables(cur, self.conn.schema, problems)
        snapshot.warnings += problems
        facts = Facts(
            server_version=version,
            server_version_num=version_num,
            database_size=size,
            encoding=encoding,
            extensions=extensions,
            tables=tables,
            snapshot=snapshot.snapshot_id,
            schema_filter=self.conn.schema,
            schema_fingerprint=schema_fingerprint,
            migrations=migrations,
        )
        if unrecorded:
            facts.unrecorded = unrecorded
        # Done reading: the share locks go now, not when the dump ends, so DDL waits on the
        # dump alone.
        with contextlib.suppress(Exception):
            connection.execute("ROLLBACK")
        return facts

    def largest_tables(self, session: PsqlSession, count: int) -> tuple[list[Table], int]:
        """The ``count`` largest tables whose data a dump holds, and all such tables' size.

        A speed-up only: where the catalog cannot be read, no table (one stream).
        """
        schema = (f"AND n.nspname = {text_literal(self.conn.schema)}" if self.conn.schema
                  else "")
        try:
            rows = session.run(LARGEST_TABLES_SQL.format(
                schema=schema, limit=int(count)))
        except DatabaseError:
            return [], 0
        tables = [Table(bytes.fromhex(s).decode(), bytes.fromhex(n).decode(), int(size or 0))
                  for s, n, size, _ in rows]
        return tables, int(rows[0][3] or 0) if rows else 0

    def dump(self, snapshot_id: str | None, *, without_data: tuple[Table, ...] = (),
             data_of: tuple[Table, ...] = ()) -> ChildOutput:
        """pg_dump's custom-format archive as a stream (uncompressed: the pipeline compresses).

        ``without_data``: leave these tables' rows out; ``data_of``: only these tables' rows.
        """
        argv: list[Any] = [tool("pg_dump", self.server.major), "--format=custom",
                           "--compress=0", "--no-password"]
        if snapshot_id:
            argv.append(f"--snapshot={snapshot_id}")
        argv += [f"--exclude-table-data={t.pattern()}" for t in without_data]
        if data_of:
            argv += ["--data-only", "--strict-names"]
            argv += [f"--table={t.pattern()}" for t in data_of]
        elif self.conn.schema:
            argv.append(f"--schema={self.conn.schema}")
        argv.append(f"--dbname={self.conn.dsn()}")
        return self._child(argv, BackupFailed)

    def dump_globals(self) -> ChildOutput:
        """Roles and tablespaces; without passwords when we may not read pg_authid."""
        argv: list[Any] = [tool("pg_dumpall", self.server.major), "--globals-only",
                           "--no-password"]
        if not self.server.is_superuser:
            argv.append("--no-role-passwords")
        argv.append(f"--dbname={self.conn.dsn()}")
        return self._child(argv, BackupFailed)

    def _child(self, argv: list[Any], error: type[BackupFailed]) -> ChildOutput:
        stack = ExitStack()
        env = stack.enter_context(self.conn.child_env())
        try:
            return ChildOutput(argv, env=env, error=error, on_exit=stack.close)
        except OSError as exc:
            stack.close()
            raise DatabaseError(f"cannot start {argv[0]}: {exc.strerror}") from None

    def restore(
        self,
        source: Readable | Spool,
        target: ConnInfo,
        *,
        jobs: int = 1,
        parts: Sequence[Callable[[], Readable]] = (),
        again: Callable[[], Readable] | None = None,
        schemas: tuple[str, ...] = (),
        tables: tuple[str, ...] = (),
        no_owner: bool = False,
        role_map: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Feed a custom-format archive to pg_restore; reads ``source`` to its end.

        A ``Spool`` (already filling) means ``jobs`` > 1; a stream with one job is not spooled.
        ``parts``: the data-only archives taken apart from it, each opened when it is due;
        ``again`` reopens an unspooled ``source`` for its post-data (see restore_split).
        What the target cannot take as it is (engines/portable.py: owners, grants,
        extensions) is decided from the archive's table of contents before pg_restore
        starts; returns a line for each item not restored as it was.
        """
        from pgvault.engines.pg_restore import restore_split, restore_spooled, restore_streamed
        from pgvault.engines.spool import Spool

        argv: list[Any] = [tool("pg_restore", self.server.major), "--exit-on-error",
                           "--no-password", f"--dbname={target.dsn()}"]
        argv += [f"--schema={s}" for s in schemas] + [f"--table={t}" for t in tables]
        source, fit = self._fit(source, target, role_map or {}, no_owner)
        if no_owner:
            argv += ["--no-owner", "--no-acl"]
        elif fit.no_owner:
            argv.append("--no-owner")
        with target.child_env() as env:
            if parts:
                if again is None:
                    raise ValueError("a split archive restored without a spool needs `again`")
                restore_split(source, parts, again, argv, env, jobs)
            elif jobs > 1 or isinstance(source, Spool):
                restore_spooled(source, argv, env, max(jobs, 2))
            else:
                restore_streamed(source, argv, env)
        if fit.after:
            self._run_after(target, fit.after)
        for line in fit.warnings:
            log.warning("restore: %s", line)
        return fit.warnings

    def _fit(self, source: Readable | Spool, target: ConnInfo, role_map: Mapping[str, str],
             no_owner: bool) -> tuple[Readable | Spool, Fit]:
        """``source`` (its table of contents read) and what the target makes of it."""
        from pgvault.engines.pg_restore import Selected, SelectingSpool, selection_of, spool_toc
        from pgvault.engines.portable import Fit, TargetFacts, plan
        from pgvault.engines.spool import Spool

        # The target's psql connects while the table of contents arrives.
        session = PsqlSession(target)
        try:
            toc: Toc | None
            if isinstance(source, Spool):
                try:
                    toc = spool_toc(source)
                except RestoreFailed:  # an archive pg/archive.py cannot read: as it is
                    toc = None
            elif isinstance(source, Selected):
                toc = source.toc
            else:
                source = _Peeked(source)
                toc = source.toc
            if toc is None:
                return source, Fit()
            session.preflight()
            facts = TargetFacts.read(session)
        finally:
            session.close()
        fit = plan(toc, facts, role_map=role_map, no_owner=no_owner,
                   only=selection_of(source))
        chosen = fit.selection(toc, selection_of(source))
        if chosen is not selection_of(source):
            if isinstance(source, Spool) and not isinstance(source, SelectingSpool):
                raise TypeError("a restore that may leave entries out spools into a "
                                "SelectingSpool")
            source.selection = chosen
        return source, fit

    def _run_after(self, target: ConnInfo, statements: list[str]) -> None:
        """The grants and owners pgvault sets itself, in the restored database."""
        session = PsqlSession(target)
        try:
            session.preflight()
            for statement in statements:
                try:
                    session.run(statement.rstrip(";"))
                except DatabaseError as exc:
                    raise RestoreFailed(f"{statement.rstrip(';')}: {exc}") from None
        finally:
            session.close()
