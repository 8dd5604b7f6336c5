"""Restore drills: prove a backup restores, check what came back, and time it (the real RTO).

Levels, each including the ones before: integrity (every artifact present, its sha256
and compression intact, the archive's table of contents readable), restore (into a
scratch database, timed), facts (row counts, schema and migration fingerprints, extension
versions as recorded in the backup's snapshot), assertions (user SQL), command (a user
command against the restored database). The scratch database, or the ephemeral cluster
holding it, is removed afterwards, on failure and on Ctrl-C too, unless asked to keep it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import msgspec

from pgvault import __version__, leftovers
from pgvault.catalog import Catalog, manifest_key
from pgvault.engines.logical import DUMP_FORMATS, GLOBALS_FORMAT, LogicalEngine
from pgvault.engines.pg_restore import list_entries
from pgvault.engines.portable import left_out
from pgvault.errors import (
    DatabaseError,
    IntegrityError,
    NotFound,
    RestoreFailed,
    UsageError,
)
from pgvault.facts import Finding, Verdict, compare, unseal
from pgvault.facts import compare_entries as compare_entries  # tests/test_facts_truth.py
from pgvault.model import (
    LEVELS,
    Artifact,
    Facts,
    Manifest,
    VerifyCheck,
    VerifyReport,
)
from pgvault.ops.restore import RestoreOptions, open_artifact, restore
from pgvault.ops.scratch import Place, ScratchServers
from pgvault.ops.shell import run_command
from pgvault.pg.archive import show_name
from pgvault.pg.conninfo import ConnInfo
from pgvault.pg.psql import PsqlSession, identifier
from pgvault.pipeline import open_sealed
from pgvault.pipeline.stream import CHUNK, Readable
from pgvault.storage.base import Storage

if TYPE_CHECKING:
    from pgvault.pipeline.age import Keyring

SCRATCH_PREFIX = "pgvault_verify_"
OUTPUT_TAIL = 100_000
"""Bytes of the command's output kept in the report (the end, where failures show)."""

_CREATE_ROLE = re.compile(rb"^CREATE ROLE [^;]+;$")

_MATVIEWS_SQL = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm'
"""


@dataclass
class VerifyOptions:
    """How deep to verify, where to restore, what to run, and the objective to meet."""

    level: str = "facts"
    sql: Sequence[tuple[str, str]] = ()
    """(name, query) assertions; each query returns one boolean."""
    command: str | None = None
    command_timeout: float = 600.0
    rto_objective_seconds: float = 3600.0
    jobs: int = 0  # pg_restore jobs of the drill's restore; 0: auto, as `pgvault restore`
    identities: Keyring | None = None
    """For age-encrypted backups."""
    record: bool = True
    """Store the report in the repository beside the backup."""
    on_check: Callable[[VerifyCheck], None] | None = None
    progress: Callable[[int], None] | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise UsageError(f"unknown verify level {self.level!r} (choose {', '.join(LEVELS)})")
        if self.level == "command" and not self.command:
            raise UsageError("level 'command' needs a command: set [verify] command")

    def includes(self, level: str) -> bool:
        return LEVELS.index(self.level) >= LEVELS.index(level)


def verify(storage: Storage, manifest: Manifest, options: VerifyOptions,
           servers: ScratchServers) -> VerifyReport:
    """Run one restore drill of ``manifest`` and return (and, by default, record) its report.

    A physical backup is unpacked into a temp folder, checked by pg_verifybackup and, from
    level 'restore' on, started on a free port after replaying its WAL (see ``physical``).
    """
    leftovers.sweep(servers.base_dir)
    report = VerifyReport(
        backup_id=manifest.id, database=manifest.database, level=options.level,
        started_at=options.clock(), finished_at=options.clock(),
        rto_objective_seconds=options.rto_objective_seconds, pgvault_version=__version__,
    )
    _Drill(storage, manifest, options, servers, report).run()
    report.finished_at = options.clock()
    if options.record:
        Catalog(storage).record_drill(report)
    return report


def check_restored(storage: Storage, manifest: Manifest, target: ConnInfo,
                   options: VerifyOptions, report: VerifyReport) -> None:
    """The checks from level 'facts' on (facts, [[verify.sql]], the command) against a copy
    restored elsewhere: a provider snapshot's temporary instance (ops/snapshot.py)."""
    drill = _Drill(storage, manifest, options, ScratchServers(None), report)
    if options.includes("facts"):
        if manifest.facts == Facts():
            drill.check("facts", "facts", None, "no facts were recorded with this snapshot "
                        "(the database has no connection URL)")
        else:
            drill.facts(target)
    if options.includes("assertions"):
        drill.assertions(target)
    if options.includes("command"):
        drill.command(target)


class _Drill:
    """The steps of one drill; each appends its checks to the report."""

    def __init__(self, storage: Storage, manifest: Manifest, options: VerifyOptions,
                 servers: ScratchServers, report: VerifyReport) -> None:
        self.storage = storage
        self.manifest = manifest
        self.options = options
        self.servers = servers
        self.report = report

    def check(self, level: str, name: str, ok: Verdict, detail: str,
              objects: list[str] | None = None) -> bool:
        """Record one check (None: skipped; "warn": passed with something named); True
        unless it failed. ``objects``: every object the check found different."""
        status: Literal["pass", "fail", "skip", "warn"] = (
            "skip" if ok is None else "warn" if ok == "warn" else "pass" if ok else "fail")
        check = VerifyCheck(level=level, name=name, status=status, detail=detail)
        if objects:
            check.objects = objects
        self.report.checks.append(check)
        if self.options.on_check is not None:
            self.options.on_check(check)
        return ok is not False

    def run(self) -> None:
        if self.manifest.kind == "physical":
            self.physical()
            return
        if not self.integrity():
            return
        if not self.options.includes("restore"):
            return
        place = self.servers.place(self.major())
        roles = self.roles(place)
        scratch = leftovers.database_name(SCRATCH_PREFIX)
        target = place.conn.with_dbname(scratch)
        try:
            if self.restore(place, scratch, roles):
                if self.options.includes("facts"):
                    self.facts(target)
                if self.options.includes("assertions"):
                    self.assertions(target)
                if self.options.includes("command"):
                    self.command(target)
        except BaseException:
            _drop(place.conn, scratch)  # an error or Ctrl-C: nothing is kept
            raise
        if self.servers.keep:
            self.servers.kept.append(f"scratch database kept: psql {target.url()!r}")
        else:
            _drop(place.conn, scratch)

    # -- physical backups (ops/physical_restore.py does the work) -------------------------

    def physical(self) -> None:
        """A base backup: unpacked and checked by pg_verifybackup; from 'restore' on, also
        recovered to its end, started and every row read (that time is the measured RTO)."""
        from pgvault.ops.physical_restore import drill_physical, verify_physical

        cluster, keys = self.manifest.database, self.options.identities
        try:
            if not self.options.includes("restore"):
                checked = verify_physical(self.storage, self.manifest, cluster, identities=keys)
                self.check("integrity", "base.tar", True, "; ".join(checked.checks))
                return
            drill = drill_physical(self.storage, self.manifest, cluster, identities=keys)
        except NotFound as exc:
            self.still_exists()
            self.check("integrity", "base.tar", False, str(exc))
            return
        except IntegrityError as exc:
            self.check("integrity", "base.tar", False, str(exc))
            return
        except (RestoreFailed, DatabaseError) as exc:
            self.check("restore", "restore", False, str(exc))
            return
        self.check("integrity", "base.tar", True, "; ".join(drill.integrity))
        self.report.restore_seconds = round(drill.seconds, 3)
        self.report.where = f"ephemeral PostgreSQL {self.major()} cluster (physical restore)"
        facts = self.manifest.physical
        end = facts.stop_lsn if facts else "?"
        self.check("restore", "restore", True, f"unpacked, WAL replayed to the backup's end "
                   f"(LSN {end}) and started in {_seconds(drill.seconds)}")
        objective = self.options.rto_objective_seconds
        self.report.rto_met = drill.seconds <= objective
        self.check("restore", "rto", self.report.rto_met,
                   f"restore took {_seconds(drill.seconds)}, objective {_seconds(objective)}")
        if self.options.includes("facts"):
            self.check("facts", "rows", True, f"{drill.databases} databases, {drill.tables} "
                       f"tables, {drill.rows} rows read back")
        for level in ("assertions", "command"):
            if self.options.includes(level):
                self.check(level, level, None, "not run on physical backups")

    # -- integrity ----------------------------------------------------------------------

    def integrity(self) -> bool:
        """Every artifact exists with its recorded size; at this level, read them in full."""
        ok = True
        for artifact in self.manifest.artifacts:
            problem = self.stored(artifact)
            if problem is not None:
                ok = self.check("integrity", artifact.name, False, problem)
            elif not self.options.includes("restore") or artifact.format not in DUMP_FORMATS:
                # Deeper levels read the dump while restoring it: one download, not two.
                ok = self.read_through(artifact) and ok
        return ok

    def stored(self, artifact: Artifact) -> str | None:
        """Why the stored object cannot be the artifact; None if size and presence agree."""
        try:
            info = self.storage.stat(artifact.key)
        except NotFound:
            self.still_exists()
            return f"{artifact.key} is missing from the repository"
        if info.size != artifact.size:
            return (f"{artifact.key}: {info.size} bytes stored, {artifact.size} recorded "
                    "(truncated or damaged)")
        return None

    def still_exists(self) -> None:
        """A manifest deleted meanwhile (prune) means no verdict on damage: stop the drill."""
        try:
            self.storage.stat(manifest_key(self.manifest.database, self.manifest.id))
        except NotFound:
            raise NotFound(f"backup {self.manifest.id} was deleted while being verified") \
                from None

    def read_through(self, artifact: Artifact) -> bool:
        """Stream one artifact through digest and decoders; the dump also through pg_restore -l."""
        try:
            stream = open_artifact(self.storage, self.manifest, artifact,
                                   identities=self.options.identities)
            detail = f"{artifact.size} bytes, sha256 and decoding verified"
            if artifact.format in DUMP_FORMATS:
                entries = list_entries(stream, self.major())
                detail += f", {entries} archive entries listed by pg_restore"
            elif artifact.format == GLOBALS_FORMAT and self.options.includes("restore"):
                self.globals_sql = _drain(stream, keep=_CREATE_ROLE)
            else:
                _drain(stream)
        except NotFound:
            self.still_exists()
            return self.check("integrity", artifact.name, False,
                              f"{artifact.key} is missing from the repository")
        except (IntegrityError, RestoreFailed) as exc:
            return self.check("integrity", artifact.name, False, f"{artifact.key}: {exc}")
        return self.check("integrity", artifact.name, True, detail)

    def major(self) -> int:
        """The backed-up server's major version: which cluster to start, which pg_restore."""
        if self.manifest.facts.server_version_num:
            return self.manifest.facts.server_version_num // 10000
        return int(self.manifest.tool_versions.get("pg_restore", "10").split(".")[0])

    # -- restore ------------------------------------------------------------------------

    globals_sql: list[bytes] | None = None
    skipped: list[str] = []  # noqa: RUF012 (replaced, never changed in place)

    def roles(self, place: Place) -> bool:
        """In an ephemeral cluster, create the backup's roles so owners and policies restore."""
        if not place.ephemeral or self.globals_sql is None:
            return False
        with place.conn.connect(autocommit=True) as admin:
            for statement in self.globals_sql:
                with contextlib.suppress(Exception):  # e.g. the role exists already
                    admin.execute(statement)
        return True

    def dumps_read(self, dumps: list[Artifact]) -> None:
        """Each dump archive was read whole, its digest checked, by a restore that ran."""
        for dump in dumps:
            self.check("integrity", dump.name, True,
                       f"{dump.size} bytes, sha256 and decoding verified while restoring")

    def restore(self, place: Place, scratch: str, roles: bool) -> bool:
        dumps = [a for a in self.manifest.artifacts if a.format in DUMP_FORMATS]
        dump = dumps[0]
        options = RestoreOptions(target=scratch, jobs=self.options.jobs, no_owner=not roles,
                                 progress=self.options.progress,
                                 identities=self.options.identities)
        try:
            result = restore(place.conn, self.storage, self.manifest, options)
        except NotFound:
            self.still_exists()
            return self.check("integrity", dump.name, False,
                              f"{dump.key} is missing from the repository")
        except IntegrityError as exc:
            return self.check("integrity", dump.name, False, f"{dump.key}: {exc}")
        except RestoreFailed as exc:
            self.dumps_read(dumps)
            return self.check("restore", "restore", False, f"{exc} (into {place.where})")
        self.dumps_read(dumps)
        seconds = result.seconds
        self.report.restore_seconds = round(seconds, 3)
        self.report.bytes_read = result.bytes_read
        self.report.where = place.where
        how = "with owners and privileges" if roles else "without owners and privileges"
        self.skipped = result.skipped
        # What the restore left out because the target cannot take it (a provider's
        # extension or role, engines/portable.py) is named, and is no failed restore.
        left = (f"; not as in the backup: {'; '.join(result.skipped[:5])}"
                + (f" and {len(result.skipped) - 5} more" if len(result.skipped) > 5 else "")
                if result.skipped else "")
        self.check("restore", "restore", "warn" if result.skipped else True,
                   f"restored into {place.where} {how} in {_seconds(seconds)}{left}",
                   result.skipped or None)
        objective = self.options.rto_objective_seconds
        self.report.rto_met = seconds <= objective
        return self.check("restore", "rto", self.report.rto_met,
                          f"restore took {_seconds(seconds)}, objective {_seconds(objective)}")

    # -- facts --------------------------------------------------------------------------

    def facts(self, target: ConnInfo) -> None:
        recorded = self.manifest.facts
        conn = ConnInfo(params=target.params, password=target.password,
                        schema=recorded.schema_filter)
        engine = LogicalEngine(conn)
        with engine.snapshot() as snapshot:
            restored = engine.facts(snapshot)
            matviews = {tuple(r) for r in snapshot.connection.execute(_MATVIEWS_SQL).fetchall()}
        recorded, restored = self.unsealed(recorded, restored)
        left = left_out(self.skipped)
        if left:  # not restored, and said so by the restore check: not missing either
            recorded = msgspec.structs.replace(
                recorded,
                extensions={n: v for n, v in recorded.extensions.items()
                            if f"extension {n}" not in left},
                tables=[t for t in recorded.tables
                        if f"table {show_name(t.schema_name, t.name)}" not in left])
        for name, finding in compare(recorded, restored, matviews):
            if finding.verdict is False and left and finding.objects and all(
                    any(re.search(rf"(?<![\w.]){re.escape(item.rsplit(' ', 1)[-1])}(?!\w)",
                                  shown) for item in left) for shown in finding.objects):
                finding = Finding("warn", f"{finding.detail} (not restored: the target "
                                  "cannot take them; see the restore check)", finding.objects)
            self.check("facts", name, *finding)

    def unsealed(self, recorded: Facts, restored: Facts) -> tuple[Facts, Facts]:
        """An encrypted backup's schema entries, named again from the restored database."""
        want, got = recorded.schema_fingerprint, restored.schema_fingerprint
        if want is None or got is None or not isinstance(want.sealed_key, str):
            return recorded, restored
        age = next(stage for artifact in self.manifest.artifacts for stage in artifact.stages
                   if stage.name == "age")
        key = open_sealed(want.sealed_key, age, self.options.identities,
                          f"the schema fingerprint of {self.manifest.id}")
        want, got = unseal(want, got, key)
        return (msgspec.structs.replace(recorded, schema_fingerprint=want),
                msgspec.structs.replace(restored, schema_fingerprint=got))

    # -- assertions ---------------------------------------------------------------------

    def assertions(self, target: ConnInfo) -> None:
        import psycopg

        if not self.options.sql:
            self.check("assertions", "sql", None, "no [[verify.sql]] assertions configured")
            return
        timeout_ms = int(self.options.command_timeout * 1000)
        with target.connect(options=f"-c statement_timeout={timeout_ms}") as connection:
            for name, query in self.options.sql:
                try:
                    rows = connection.execute(query).fetchall()
                except psycopg.Error as exc:
                    self.check("assertions", f"sql {name}", False, f"error: {_first_line(exc)}")
                    continue
                finally:
                    connection.rollback()  # one assertion never sees another's changes
                value = rows[0][0] if len(rows) == 1 and len(rows[0]) == 1 else ...
                if value is True:
                    self.check("assertions", f"sql {name}", True, "returned true")
                elif value is False or value is None:
                    shown = "false" if value is False else "NULL"
                    self.check("assertions", f"sql {name}", False, f"returned {shown}")
                else:
                    self.check("assertions", f"sql {name}", False,
                               f"returned {_clip(repr(rows))}; a check must return one boolean")

    # -- command ------------------------------------------------------------------------

    def command(self, target: ConnInfo) -> None:
        assert self.options.command is not None
        with target.child_env() as env:
            env = {k: v for k, v in env.items() if not k.startswith("PG") or k == "PGPASSFILE"}
            env.update(_pg_env(target))
            result = run_command(self.options.command, env, self.options.command_timeout,
                                 tail=OUTPUT_TAIL)
        self.report.command_output = result.output
        last = result.output.strip().splitlines()[-1:] or [""]
        if result.timed_out:
            self.check("command", "command", False,
                       f"did not finish within {_seconds(self.options.command_timeout)}; "
                       "its process group was killed")
        elif result.returncode == 0:
            self.check("command", "command", True, f"exit 0 after {_seconds(result.seconds)}")
        else:
            how = (f"killed by signal {-result.returncode}" if result.returncode < 0
                   else f"exit {result.returncode}")
            self.check("command", "command", False,
                       f"{how} after {_seconds(result.seconds)}: {_clip(last[0])}")


# -- the user command's environment ----------------------------------------------------


def _pg_env(target: ConnInfo) -> dict[str, str]:
    """DATABASE_URL, DIRECT_URL and PG* naming the scratch database."""
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
             "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT"}
    env = {var: target.params[key] for key, var in names.items() if key in target.params}
    # Like every child of pgvault, the command gets no secret: a password reaches it only
    # through PGPASSFILE (the default ephemeral cluster needs none).
    env["DATABASE_URL"] = env["DIRECT_URL"] = target.url()
    return env


# -- small pieces -------------------------------------------------------------------------


def _drain(stream: Readable, keep: re.Pattern[bytes] | None = None) -> list[bytes]:
    """Read a stream to its end (so its digest is checked); the lines matching ``keep``."""
    kept: list[bytes] = []
    pending = b""
    while data := stream.read(CHUNK):
        if keep is None:
            continue
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        kept += [line for line in lines if keep.match(line)]
    if keep is not None and keep.match(pending):
        kept.append(pending)
    return kept


def _drop(server: ConnInfo, name: str) -> None:
    """Drop a scratch database as a restore drops one (through psql, ops/restore.py); never
    raises (the caller may be unwinding an error)."""
    with contextlib.suppress(Exception):
        admin = PsqlSession(server)
        try:
            admin.preflight()
            admin.run(f"DROP DATABASE IF EXISTS {identifier(name)} WITH (FORCE)")
        finally:
            admin.close()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _seconds(seconds: float) -> str:
    from pgvault.console import human_seconds

    return human_seconds(seconds)

