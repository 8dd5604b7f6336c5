"""The physical engine: pg_basebackup's tar stream out, a tar stream unpacked into PGDATA in.

``pg_basebackup --format=tar --pgdata=-`` writes one tar to stdout (one tablespace only) and,
on PostgreSQL 13 and later, injects its ``backup_manifest`` into that tar; WAL is either
fetched into the tar (``-X fetch``: a self-contained backup) or left to the archive
(``-X none``: the server then waits until the backup's WAL is archived). ``-X stream`` needs
a second file, which stdout cannot carry, so pgvault does not use it.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgvault.bytestream import CHUNK, Readable, Reader
from pgvault.errors import BackupFailed, DatabaseError, IntegrityError, RestoreFailed
from pgvault.model import PhysicalFacts
from pgvault.pg import wal
from pgvault.pg.binaries import tool, tool_version
from pgvault.pg.conninfo import ConnInfo
from pgvault.pg.process import ChildOutput, run
from pgvault.pipeline.pump import Prefetch

if TYPE_CHECKING:
    import psycopg

BASE_FORMAT = "tar"
MANIFEST_FORMAT = "pg-backup-manifest"
LABEL = "backup_label"
MANIFEST = "backup_manifest"
CONTROL = "global/pg_control"
_BLOCK = 512
_WATCHED = {LABEL: 1 << 20, CONTROL: 1 << 20, MANIFEST: 1 << 30}
# tarfile reads a stream 10 KiB at a time and copies 16 KiB at a time, each read a pass
# through the decoding readers; a far larger stream buffer is sliced at every header.
TAR_STREAM = 1 << 16
TAR_READ = 1 << 20


@dataclass(frozen=True)
class ClusterInfo:
    """What preflight learned about the server to back up."""

    version: str
    version_num: int
    system_identifier: str
    wal_segment_size: int
    archive_mode: str
    archive_command: str | None  # None: not readable with this role
    in_recovery: bool
    superuser: str = "postgres"

    @property
    def major(self) -> int:
        return self.version_num // 10000

    @property
    def archives_with_pgvault(self) -> bool:
        """Whether the server's own archiver runs ``wal-push`` (a standby only with 'always')."""
        modes = ("always",) if self.in_recovery else ("on", "always")
        return self.archive_mode in modes and "wal-push" in (self.archive_command or "")


class TarWatcher(Reader):
    """Passes a tar stream through unchanged and keeps the content of a few named members."""

    def __init__(self, source: Readable, limits: dict[str, int] | None = None) -> None:
        super().__init__()
        self._source = source
        self._limits = dict(_WATCHED if limits is None else limits)
        self.members: dict[str, bytes] = {}
        self._header = bytearray()
        self._skip = 0  # bytes of the current member's data and padding still to pass
        self._name = ""
        self._capture: bytearray | None = None
        self._capture_left = 0

    def read_chunk(self, size: int) -> bytes:
        data = self._source.read(size)
        if data:
            self._feed(memoryview(data))
        return data

    def _feed(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            if self._skip:
                step = min(self._skip, len(view) - pos)
                if self._capture is not None:
                    take = min(step, self._capture_left)
                    self._capture += view[pos : pos + take]
                    self._capture_left -= take
                    if not self._capture_left:
                        self._finish_capture()
                pos += step
                self._skip -= step
                continue
            take = min(_BLOCK - len(self._header), len(view) - pos)
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) == _BLOCK:
                self._on_header(bytes(self._header))
                self._header.clear()

    def _on_header(self, header: bytes) -> None:
        if not header.strip(b"\0"):
            return  # the end-of-archive blocks
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}" if prefix else name
        name = name.removeprefix("./")
        size = _tar_number(header[124:136])
        self._skip = -(-size // _BLOCK) * _BLOCK
        regular = header[156:157] in (b"0", b"\0")
        limit = self._limits.get(name)
        if regular and limit is not None and size <= limit:
            self._name, self._capture, self._capture_left = name, bytearray(), size
            if not size:
                self._finish_capture()

    def _finish_capture(self) -> None:
        assert self._capture is not None
        self.members[self._name] = bytes(self._capture)
        self._capture = None


def _tar_number(field: bytes) -> int:
    """A tar header number: octal text, or base-256 when the high bit is set (large files)."""
    if field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


class PhysicalEngine:
    """Produces the base backup of one cluster and consumes it on restore."""

    def __init__(self, conn: ConnInfo) -> None:
        self.conn = conn
        self._info: ClusterInfo | None = None

    @property
    def info(self) -> ClusterInfo:
        if self._info is None:
            self._info = self.preflight()
        return self._info

    def preflight(self) -> ClusterInfo:
        """Connect, learn version, system identifier and archiving; find pg_basebackup."""
        import psycopg

        with self.conn.connect(autocommit=True) as connection:
            version, version_num, archive_mode, in_recovery, superuser = connection.execute(
                "SELECT current_setting('server_version'),"
                " current_setting('server_version_num')::int,"
                " current_setting('archive_mode'), pg_is_in_recovery(),"
                " (SELECT rolname FROM pg_roles WHERE oid = 10)"
            ).fetchone()
            try:
                system_identifier, segment_size = system_identity(connection)
            except psycopg.Error as exc:
                raise DatabaseError(
                    f"cannot read the system identifier (pg_control_system()): {exc}"
                ) from None
            try:
                archive_command = connection.execute(
                    "SELECT current_setting('archive_command')"
                ).fetchone()[0]
            except psycopg.Error:
                archive_command = None
        self._info = ClusterInfo(
            version=version, version_num=version_num, system_identifier=system_identifier,
            wal_segment_size=int(segment_size), archive_mode=archive_mode,
            archive_command=archive_command, in_recovery=bool(in_recovery),
            superuser=superuser or "postgres",
        )
        tool("pg_basebackup", self._info.major)
        return self._info

    def tool_versions(self) -> dict[str, str]:
        path = tool("pg_basebackup", self.info.major)
        return {"pg_basebackup": ".".join(map(str, tool_version(path)))}

    def basebackup(self, *, include_wal: bool, fast_checkpoint: bool, label: str,
                   application_name: str | None = None) -> ChildOutput:
        """pg_basebackup's tar on stdout (uncompressed: the pipeline compresses).

        ``application_name`` (letters, digits, ``-_.``) names its walsender in
        pg_stat_activity, where the wait for the archive can be watched.
        """
        dsn = self.conn.dsn()
        if application_name is not None:
            dsn += f" application_name={application_name}"  # the last one given wins
        argv: list[Any] = [
            tool("pg_basebackup", self.info.major), "--format=tar", "--pgdata=-",
            f"--wal-method={'fetch' if include_wal else 'none'}",
            f"--checkpoint={'fast' if fast_checkpoint else 'spread'}",
            f"--label={label}", "--no-password", f"--dbname={dsn}",
        ]
        stack = ExitStack()
        env = stack.enter_context(self.conn.child_env())
        try:
            return ChildOutput(argv, env=env, error=BackupFailed, on_exit=stack.close)
        except OSError as exc:
            stack.close()
            raise DatabaseError(f"cannot start {argv[0]}: {exc.strerror}") from None

    def facts(self, members: dict[str, bytes], *, stop_time: datetime,
              include_wal: bool) -> PhysicalFacts:
        """Timeline, WAL range and system identifier from the members the tar carried."""
        if LABEL not in members or CONTROL not in members:
            raise BackupFailed("pg_basebackup's tar has no backup_label or global/pg_control")
        label = wal.parse_backup_label(members[LABEL].decode("utf-8", "replace"))
        try:
            start_lsn = wal.parse_lsn(label["START WAL LOCATION"].split(" ", 1)[0])
            timeline = int(label["START TIMELINE"])
        except (KeyError, ValueError) as exc:
            raise BackupFailed(f"cannot read backup_label: {exc}") from None
        system_identifier = str(wal.control_system_identifier(members[CONTROL]))
        if system_identifier != self.info.system_identifier:
            raise BackupFailed(
                f"the backup's pg_control names system {system_identifier}, but the server "
                f"reported {self.info.system_identifier}"
            )
        ranges = wal_ranges(members.get(MANIFEST))
        if ranges:
            stop_timeline, _, stop_lsn = ranges[-1]
        else:
            # Before PostgreSQL 13 there is no manifest; then replay to consistency decides.
            stop_timeline, stop_lsn = timeline, start_lsn
        size = self.info.wal_segment_size
        return PhysicalFacts(
            system_identifier=system_identifier,
            wal_segment_size=size,
            timeline=timeline,
            start_lsn=wal.format_lsn(start_lsn),
            stop_lsn=wal.format_lsn(stop_lsn),
            start_wal=wal.segment_name(timeline, wal.segment_of(start_lsn, size), size),
            stop_wal=wal.segment_name(stop_timeline, wal.last_segment_of(max(stop_lsn, 1), size),
                                      size),
            stop_timeline=stop_timeline,
            stop_time=stop_time,
            wal_included=include_wal,
            label=label.get("LABEL", ""),
            superuser=self.info.superuser,
        )


# The server's side of WAL archiving, asked here once for every use case (base backup,
# check-archive): each function raises psycopg.Error, which its caller words.

_SEGMENT_SIZE = "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
ARCHIVER_COLUMNS = ("archived_count", "last_archived_wal", "last_archived_time", "failed_count",
                    "last_failed_wal", "last_failed_time")


def _row(connection: psycopg.Connection[Any], query: str) -> tuple[Any, ...]:
    row = connection.execute(query).fetchone()
    assert row is not None, "these views and functions always return one row"
    return tuple(row)


def system_identity(connection: psycopg.Connection[Any]) -> tuple[str, int]:
    """The server's system identifier and WAL segment size (pg_control_system())."""
    system_identifier, segment_size = _row(
        connection, f"SELECT system_identifier::text, {_SEGMENT_SIZE} FROM pg_control_system()")
    return str(system_identifier), int(segment_size)


def switch_wal(connection: psycopg.Connection[Any]) -> str:
    """Finish the current WAL segment (so the archiver gets it); its file name."""
    return str(_row(connection, "SELECT pg_walfile_name(pg_switch_wal())")[0])


def archiver_stats(connection: psycopg.Connection[Any]) -> dict[str, Any]:
    """pg_stat_archiver: what the server's archiver did last, and how often it failed."""
    row = _row(connection, f"SELECT {', '.join(ARCHIVER_COLUMNS)} FROM pg_stat_archiver")
    return dict(zip(ARCHIVER_COLUMNS, row, strict=True))


@dataclass(frozen=True)
class ArchiveSettings:
    """How the server is told to archive (``library``: None before PostgreSQL 15)."""

    mode: str | None
    command: str | None
    library: str | None
    data_directory: str | None


def archive_settings(connection: psycopg.Connection[Any]) -> ArchiveSettings:
    row = connection.execute(
        "SELECT current_setting('archive_mode'), current_setting('archive_command'),"
        " current_setting('archive_library', true), current_setting('data_directory')"
    ).fetchone() or (None, None, None, None)
    return ArchiveSettings(*row)


def waiting_for_archive(connection: psycopg.Connection[Any], application_name: str
                        ) -> int | None:
    """The pid of the walsender ``application_name`` while it waits for the archive (the
    end of a base backup without WAL, PostgreSQL 13+); None while it does not."""
    row = connection.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                             " AND wait_event = 'BackupWaitWalArchive'",
                             (application_name,)).fetchone()
    return None if row is None else int(row[0])


def cancel_backend(connection: psycopg.Connection[Any], pid: int) -> None:
    connection.execute("SELECT pg_cancel_backend(%s)", (pid,))


def wal_ranges(manifest: bytes | None) -> list[tuple[int, int, int]]:
    """(timeline, start LSN, end LSN) of each WAL range a backup_manifest lists, in order."""
    if not manifest:
        return []
    try:
        ranges = json.loads(manifest)["WAL-Ranges"]
        return [(int(r["Timeline"]), wal.parse_lsn(r["Start-LSN"]), wal.parse_lsn(r["End-LSN"]))
                for r in ranges]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupFailed(f"cannot read backup_manifest: {exc}") from None


def needed_wal(facts: PhysicalFacts, manifest: bytes | None) -> list[str]:
    """The WAL file names replay needs to make this backup consistent."""
    size = facts.wal_segment_size
    ranges = wal_ranges(manifest) or [
        (facts.timeline, wal.parse_lsn(facts.start_lsn), wal.parse_lsn(facts.stop_lsn))
    ]
    names = []
    for timeline, start, end in ranges:
        first = wal.segment_of(start, size)
        last = max(first, wal.last_segment_of(end, size))
        names += [wal.segment_name(timeline, segno, size) for segno in range(first, last + 1)]
    return names


def unpack(source: Readable, target: Path, *, owner: tuple[int, int] | None) -> None:
    """Extract a base backup tar stream into ``target`` and read ``source`` to its end.

    Reading to the end matters: the digest and codec checks run when the stream ends.
    Members that would land outside ``target`` (absolute, ``..``, links out) are refused.
    """
    # Decoding (zstd, age) runs in a thread a few chunks ahead of the tar parsing and the
    # writes, which hold the GIL between their system calls: on two CPUs the stream no
    # longer waits for one or the other (fetching and hashing are a stage before already).
    ahead = Prefetch(source)
    try:
        with tarfile.open(fileobj=ahead, mode="r|", bufsize=TAR_STREAM,  # type: ignore[call-overload]
                          copybufsize=TAR_READ) as archive:
            _extract_safely(archive, target, owner)
        while ahead.read(CHUNK):
            pass
    except (tarfile.TarError, EOFError) as exc:
        raise IntegrityError(f"base backup tar is damaged: {exc}") from None
    except OSError as exc:
        raise RestoreFailed(f"cannot unpack into {target}: {exc.strerror or exc}") from None
    finally:
        ahead.close()
    os.chmod(target, 0o700)
    if owner is not None:
        # Every member was given ``owner`` as it was extracted; only the folders tarfile
        # made on its own (a member's parents that the tar does not list) are left.
        for folder, _, _ in os.walk(target):
            os.chown(folder, *owner)


# Debian 12's Python (3.11.2) has no extraction filters (3.11.4 added them), so every member
# is checked here; where filters exist, "fully_trusted" keeps what they would change (3.14
# defaults to "data") from making a restore differ between Python versions.
_NO_FILTER: dict[str, Any] = (
    {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
)
# PGDATA is private to the server's OS user (PostgreSQL allows group read at most): no
# setuid/setgid/sticky bits, no group write, nothing for others.
_MODE_MASK = 0o750


def _extract_safely(archive: tarfile.TarFile, target: Path,
                    owner: tuple[int, int] | None) -> None:
    """Extract member by member; refuse any that would write or point outside ``target``."""
    root = os.path.realpath(target)
    folders: set[str] = set()
    try:
        for member in archive:
            extract_member(archive, member, root, target, folders=folders, owner=owner)
    except BaseException:
        # A later member may repoint a link an earlier one resolved through: no link that
        # leads outside stays, also when a refusal stopped the extraction.
        _remove_links_out(root, lambda path: _inside(root, path))
        raise
    check_links(root, target)


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, root: str,
                   target: Path, *, folders: set[str] | None = None,
                   owner: tuple[int, int] | None = None) -> None:
    """Extract one member under ``root`` (``target``, resolved); IntegrityError for one
    that would write or point outside it. Call ``check_links`` after the last.

    ``folders``: the same set for every member of one extraction, to remember the folders
    found inside (os.path.realpath lstat()s every component of a path: a scale-10 restore
    made ~18,000 such calls for 1,000 members). ``owner``: the (uid, gid) the member gets
    (None: tarfile's own rule, the names in the tar when run as root).
    """
    name = member.name
    if member.isdir() and os.path.normpath(name) == ".":
        return  # "./", as tar(1) writes it: PGDATA itself, made already

    def refuse(why: str) -> IntegrityError:
        return IntegrityError(f"base backup tar member {name!r} {why}; refused, "
                              f"nothing is written outside {target}")

    def inside(path: str) -> bool:
        return _inside(root, path)

    def folder_inside(path: str) -> bool:
        if folders is None:
            return inside(path)
        if path not in folders:
            if not inside(path):
                return False
            folders.add(path)
        return True

    def dest_inside(path: str) -> bool:
        # Its folder resolves inside: so does the path, unless the path itself is a link.
        if folders is None:
            return inside(path)
        try:
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                return True
        except FileNotFoundError:
            return True
        except OSError:
            pass
        return inside(path)

    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise refuse("is a device, FIFO or other special file")
    if name.startswith("/") or ".." in name.split("/") or not name.strip("/."):
        raise refuse("has an absolute path, '..' or no name")
    dest = os.path.join(root, name)
    if not folder_inside(os.path.dirname(dest)) \
            or (not member.issym() and not dest_inside(dest)):
        raise refuse("would be written through a link that leads outside")
    if member.issym():
        link = os.path.join(os.path.dirname(dest), member.linkname)
        if os.path.isabs(member.linkname) or not inside(link):
            raise refuse(f"is a symbolic link to {member.linkname!r}, outside")
    elif member.islnk():
        link = os.path.join(root, member.linkname)
        if os.path.isabs(member.linkname) or ".." in member.linkname.split("/") \
                or not inside(link):
            raise refuse(f"is a hard link to {member.linkname!r}, outside")
    member.mode &= _MODE_MASK
    if member.isdir():
        member.mode |= 0o700  # the extraction itself must be able to fill it
    if owner is not None:
        # Numeric: no passwd and group file lookups for every member (tarfile's by name).
        member.uid, member.gid = owner
    archive.extract(member, root, numeric_owner=owner is not None, **_NO_FILTER)
    if folders is not None and (member.issym() or member.islnk()):
        # A new or replaced link may change where any folder remembered so far resolves.
        folders.clear()


def check_links(root: str, target: Path) -> None:
    """Remove every link under ``root`` that leads outside; IntegrityError if there was one."""
    escaped = _remove_links_out(root, lambda path: _inside(root, path))
    if escaped:
        path, points_to = escaped[0]
        raise IntegrityError(f"base backup tar leaves {path!r} a link to {points_to!r}, "
                             f"outside {target}; refused")


def _remove_links_out(root: str, inside: Callable[[str], bool]) -> list[tuple[str, str]]:
    # The entries' types come from the directory listing itself (d_type): no lstat() of
    # every file, which os.path.islink() made, only a resolution of each link.
    removed = []
    folders = [root]
    while folders:
        try:
            listing = os.scandir(folders.pop())
        except OSError:
            continue  # as os.walk: a folder that cannot be listed holds nothing to check
        with listing:
            for entry in listing:
                if entry.is_symlink():
                    if not inside(entry.path):
                        removed.append((os.path.relpath(entry.path, root),
                                        os.readlink(entry.path)))
                        os.unlink(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
    return removed


def verify_backup(data_dir: Path, *, major: int, wal_dir: Path | None,
                  environ: Mapping[str, str] | None = None) -> None:
    """Run pg_verifybackup on an unpacked backup (its own backup_manifest); IntegrityError.

    ``environ``: the environment the child's comes from (None: this process's)."""
    argv: list[Any] = [tool("pg_verifybackup", major), "--quiet"]
    if wal_dir is not None:
        argv.append(f"--wal-directory={wal_dir}")
    argv.append(str(data_dir))
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if not k.startswith("PG")}
    run(argv, env=env, error=IntegrityError)
