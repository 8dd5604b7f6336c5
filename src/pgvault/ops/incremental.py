"""Incremental base backups: what changed since a parent, and restoring a chain of them.

The data directory is read under pg_backup_start/pg_backup_stop (``engines.datadir`` says
what goes into the tar and why page LSNs decide it); the WAL comes from the archive, as for
a base backup with ``--wal-method archive``. A chain is a full base backup (pg_basebackup)
and the incrementals on top of it, each naming its parent in its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pgvault import __version__
from pgvault.catalog import Catalog
from pgvault.engines import datadir
from pgvault.engines.physical import CONTROL, LABEL, MANIFEST, ClusterInfo
from pgvault.errors import (
    BackupFailed,
    IntegrityError,
    NotFound,
    RestoreFailed,
    StorageError,
    UsageError,
)
from pgvault.model import Facts, Manifest, PhysicalFacts
from pgvault.pg import wal
from pgvault.pg.conninfo import ConnInfo
from pgvault.pipeline.stream import CHUNK
from pgvault.storage.base import Storage

if TYPE_CHECKING:
    from pgvault.model import StageSpec
    from pgvault.pipeline.age import Keyring
    from pgvault.pipeline.stream import Progress


class TakeOptions(Protocol):
    """What an incremental needs of a base backup's options (ops.basebackup's
    BasebackupOptions has them; basebackup calls down into this module, not back up)."""

    @property
    def cluster(self) -> str: ...
    @property
    def fast_checkpoint(self) -> bool: ...
    @property
    def archive_wait(self) -> float: ...
    @property
    def clock(self) -> Callable[[], datetime]: ...
    @property
    def progress(self) -> Progress | None: ...
    @property
    def identities(self) -> Keyring | None: ...
    @property
    def stages(self) -> list[StageSpec]: ...

log = logging.getLogger(__name__)

LIST = "incremental.list"
TAR_FORMAT = "tar-incremental"
LIST_FORMAT = "pgvault-incremental-listing"


def choose_parent(storage: Storage, cluster: str, info: ClusterInfo, timeline: int
                  ) -> tuple[Manifest | None, str]:
    """The newest good physical backup an incremental can build on; else None and why."""
    catalog = Catalog(storage)
    bad = catalog.bad(cluster)
    backups = [m for m in catalog.list(cluster) if m.kind == "physical" and m.physical
               and (m.database, m.id) not in bad]
    if not backups:
        return None, "no earlier base backup of this cluster: a full one is taken"
    parent = backups[-1]
    facts = parent.physical
    assert facts is not None
    if facts.system_identifier != info.system_identifier:
        return None, (f"the newest base backup {parent.id} is of another system "
                      f"({facts.system_identifier}): a full one is taken")
    if facts.stop_timeline != timeline:
        # Pages of another timeline's history may carry LSNs the parent never saw.
        return None, (f"the newest base backup {parent.id} is on timeline "
                      f"{facts.stop_timeline}, the server on {timeline}: a full one is taken")
    if not any(a.name in (LIST, MANIFEST) for a in parent.artifacts):
        return None, (f"the newest base backup {parent.id} has no file list "
                      "(backup_manifest): a full one is taken")
    return parent, ""


def current_timeline(conn: ConnInfo) -> int:
    """The timeline the server writes now (its last checkpoint's)."""
    with conn.connect(autocommit=True) as db:
        return int(_one(db, "SELECT timeline_id FROM pg_control_checkpoint()"))


def parent_files(storage: Storage, parent: Manifest, identities: Keyring | None
                 ) -> dict[str, int]:
    """The files (path -> size) a restore of ``parent`` has."""
    from pgvault.ops.restore import open_artifact

    name = LIST if any(a.name == LIST for a in parent.artifacts) else MANIFEST
    reader = open_artifact(storage, parent, parent.artifact(name), identities=identities)
    data = b"".join(iter(lambda: reader.read(CHUNK), b""))
    if name == LIST:
        return datadir.files_after(datadir.parse_listing(data))
    return datadir.manifest_files(data)


def take(conn: ConnInfo, storage: Storage, options: TakeOptions, info: ClusterInfo,
         parent: Manifest, backup_id: str, started: datetime, written: list[str],
         store: Callable[..., Any]) -> Manifest:
    """One incremental backup on top of ``parent``; the manifest is committed last."""
    parent_facts = parent.physical
    assert parent_facts is not None
    files = parent_files(storage, parent, options.identities)
    since = wal.parse_lsn(parent_facts.start_lsn)
    with conn.connect(autocommit=True) as db, contextlib.ExitStack() as later:
        data_dir = Path(_one(db, "SELECT current_setting('data_directory')"))
        _same_system(data_dir, info)
        # Started now, its start-up overlaps the checkpoint and the tar instead of adding
        # to the backup's end; killed on the way out if it was never given the names.
        owner_push = _OwnerPush.start(storage, data_dir)
        if owner_push is not None:
            later.callback(owner_push.close)
        label = f"pgvault {backup_id}"
        if info.version_num >= 150000:
            _one(db, "SELECT pg_backup_start(%s, %s)", (label, options.fast_checkpoint))
        else:
            _one(db, "SELECT pg_start_backup(%s, %s, false)", (label, options.fast_checkpoint))
        stopped: dict[str, Any] = {}

        def finish() -> bytes:
            stop = ("pg_backup_stop(false)" if info.version_num >= 150000
                    else "pg_stop_backup(false, false)")
            row = db.execute(f"SELECT lsn::text, labelfile FROM {stop}").fetchone()
            assert row is not None
            stopped["lsn"], stopped["label"] = row
            return str(row[1]).encode()

        tar = datadir.IncrementalTar(data_dir, files, since, finish,
                                     f"pgvault incremental backup {backup_id} on {parent.id}"
                                     f" (pages with LSN >= {parent_facts.start_lsn})")
        try:
            base = store(tar, "base.tar", TAR_FORMAT, progress=options.progress)
        except BaseException:
            if not stopped:
                with contextlib.suppress(Exception):
                    db.execute("SELECT pg_backup_stop(false)" if info.version_num >= 150000
                               else "SELECT pg_stop_backup(false, false)")
            raise
        facts = _facts(info, stopped["label"], stopped["lsn"], options, parent.id)
        from pgvault.engines.physical import needed_wal
        from pgvault.ops import wal as archive

        if _archiver_healthy(db):
            _push_completed(storage, options.cluster, data_dir, needed_wal(facts, None),
                            options.stages, options.archive_wait, owner_push)
        if not archive.versions(storage, options.cluster, facts.stop_wal):
            _await_archiver(db, data_dir, facts.stop_wal, options.archive_wait,
                            lambda: bool(archive.versions(storage, options.cluster,
                                                          facts.stop_wal)))
    listing = datadir.format_listing(tar.scan.entries, f"pgvault incremental backup "
                                     f"{backup_id} on {parent.id}")
    listed = store(io.BytesIO(listing), LIST, LIST_FORMAT)
    missing = archive.wait_for(storage, options.cluster, needed_wal(facts, None),
                               timeout=options.archive_wait)
    if missing:
        raise BackupFailed(f"the backup's WAL ({', '.join(missing)}) did not reach the "
                           f"archive of cluster {options.cluster!r} within "
                           f"{options.archive_wait:g}s (archive_wait_seconds); check "
                           "archive_command (pgvault check-archive)")
    scan = tar.scan
    share = scan.blocks_changed / scan.blocks_total if scan.blocks_total else 0.0
    manifest = Manifest(
        id=backup_id, kind="physical", database=options.cluster, started_at=started,
        finished_at=options.clock(), pgvault_version=__version__,
        tool_versions={"server": info.version}, artifacts=[base, listed],
        facts=Facts(server_version=info.version, server_version_num=info.version_num),
        physical=facts,
        warnings=[f"incremental on {parent.id}: {scan.blocks_changed} of "
                  f"{scan.blocks_total} relation pages changed ({share:.1%}), "
                  f"{scan.bytes_read} bytes of the data directory read"],
    )
    Catalog(storage).commit(manifest)
    return manifest


def _archiver_healthy(db: Any) -> bool:
    """Whether the server's archiver has not failed since it last succeeded. When it fails,
    the backup does not push around it: it waits, and its error says the archive is broken
    (as a full base backup's does), instead of succeeding while archiving is down."""
    return bool(_one(db, "SELECT last_failed_time IS NULL OR (last_archived_time IS NOT NULL"
                         " AND last_archived_time > last_failed_time) FROM pg_stat_archiver"))


def _push_completed(storage: Storage, cluster: str, data_dir: Path, names: list[str],
                    stages: list[StageSpec], timeout: float, owner_push: _OwnerPush | None
                    ) -> None:
    """Push the backup's WAL segments that PostgreSQL has completed (``.ready``) but the
    archive has not got yet, from this process, as wal-push would store them.

    Waiting for the archiver instead was half of a small incremental's time (0.47 of 1.0 s
    at pgbench scale 10): it starts a new ``archive_command`` process for the segment that
    pg_backup_stop just switched. A push of the same bytes is idempotent, so the archiver's
    own push of it later finds it stored (and still reaches every other WAL repository).
    In a local repository the objects must be the archiver's own (a folder made by root is
    one the archiver cannot list): run as root, the push runs in ``owner_push``, a process
    with the data directory owner's ids; as anyone else but the owner, or when that process
    could not start, it is left to the archiver."""
    from pgvault.storage.local import LocalStorage

    pg_wal = data_dir / "pg_wal"
    if not isinstance(storage, LocalStorage) or os.geteuid() == os.stat(pg_wal).st_uid:
        _push_segments(storage, cluster, pg_wal, names, stages)
    elif owner_push is not None:
        owner_push.push(storage, cluster, pg_wal, names, stages, timeout)


class _OwnerPush:
    """``_push_segments`` in a process of its own that runs with the data directory owner's
    ids, for a backup run as root into a local repository.

    Not a fork of this process: the backup has threads alive (the tar's readers, the
    storage's writers), and a forked child inherits any lock one of them held at the fork,
    never to be released. subprocess switches ids in C between fork and exec, where no
    Python lock is taken. The child is started early and waits on its standard input for
    the names, so its start-up (Python and pgvault's imports, about 0.1 s) runs while the
    data directory is read; nothing secret passes to it (a local path, the stages' public
    recipients), and it gets a bare environment.
    """

    CODE = "from pgvault.ops.incremental import _owner_push_main; _owner_push_main()"

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @classmethod
    def start(cls, storage: Storage, data_dir: Path) -> _OwnerPush | None:
        """The child, when this backup needs one and the owner can run it; else None."""
        from pgvault.storage.local import LocalStorage

        if not isinstance(storage, LocalStorage) or os.geteuid() != 0:
            return None
        owner = os.stat(data_dir / "pg_wal")
        if owner.st_uid == 0:
            return None
        source = Path(__file__).resolve().parents[2]  # the folder pgvault is imported from
        blocked = _blocked_for(owner.st_uid, owner.st_gid,
                               [(Path(sys.executable), os.X_OK),
                                (Path(os.path.realpath(sys.executable)), os.X_OK),
                                (source / "pgvault" / "ops", os.R_OK | os.X_OK)])
        if blocked is not None:
            log.debug("incremental: the WAL push is left to the archiver: user %d cannot "
                      "reach %s", owner.st_uid, blocked)
            return None
        env = {"PYTHONPATH": str(source), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", cls.CODE], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/", env=env,
                user=owner.st_uid, group=owner.st_gid, extra_groups=[])
        except OSError as exc:
            log.debug("incremental: the WAL push is left to the archiver: %s", exc)
            return None
        return cls(process)

    def push(self, storage: Storage, cluster: str, pg_wal: Path, names: list[str],
             stages: list[StageSpec], timeout: float) -> None:
        """Give the child its segments and wait for it, at most ``timeout`` seconds; a
        child still running then is killed (a put is a rename: a killed one leaves
        nothing). Whatever it did not push is left to the archiver and the waits after."""
        from pgvault.model import to_dict
        from pgvault.storage.local import LocalStorage

        assert isinstance(storage, LocalStorage)
        job = json.dumps({"root": str(storage.root), "cluster": cluster,
                          "pg_wal": str(pg_wal), "names": names,
                          "stages": to_dict(stages)}).encode()
        try:
            _, errors = self.process.communicate(job, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.debug("incremental: the WAL push as the owner took over %gs: killed", timeout)
            self.close()
            return
        if self.process.returncode != 0:
            lines = errors.decode(errors="replace").strip().splitlines()
            log.debug("incremental: the WAL push as the owner ended %d: %s",
                      self.process.returncode, lines[-1] if lines else "")

    def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        self.process.communicate()


def _blocked_for(uid: int, gid: int, paths: list[tuple[Path, int]]) -> Path | None:
    """The first of ``paths`` (or a folder on the way to it) that a process with ``uid`` and
    only the group ``gid`` cannot use as asked (os.X_OK, os.R_OK; folders on the way need
    X_OK): a Python under /root, say, is not the owner's to run. Mode bits only; an ACL
    that refuses shows up as the child's failure instead."""

    def allowed(path: Path, wanted: int) -> bool:
        try:
            found = os.stat(path)
        except OSError:
            return False
        if found.st_uid == uid:
            bits = (found.st_mode & stat.S_IRWXU) >> 6
        elif found.st_gid == gid:
            bits = (found.st_mode & stat.S_IRWXG) >> 3
        else:
            bits = found.st_mode & stat.S_IRWXO
        return bits & wanted == wanted

    for path, wanted in paths:
        for folder in reversed(path.parents):
            if not allowed(folder, os.X_OK):
                return folder
        if not allowed(path, wanted):
            return path
    return None


def _owner_push_main() -> None:  # pragma: no cover (run in _OwnerPush's child)
    """The child's side: one job on standard input (nothing if the backup did not get as
    far as its WAL), pushed as ``_push_segments`` does."""
    # What the push imports, imported while the backup reads the data directory.
    import pgvault.ops.wal  # noqa: F401
    from pgvault.model import StageSpec, from_dict
    from pgvault.storage.local import LocalStorage

    with contextlib.suppress(ImportError):
        import zstandard  # noqa: F401

    data = sys.stdin.buffer.read()
    if not data:
        return
    job = json.loads(data)
    _push_segments(LocalStorage(Path(job["root"])), job["cluster"], Path(job["pg_wal"]),
                   list(job["names"]), from_dict(list[StageSpec], job["stages"]))
    # Every put is durable on return; the interpreter's teardown (tens of ms at load)
    # would only delay the backup waiting for this exit.
    os._exit(0)


def _push_segments(storage: Storage, cluster: str, pg_wal: Path, names: list[str],
                   stages: list[StageSpec]) -> None:
    """The bytes are taken only if the file kept its name for the whole read: once archived,
    a checkpoint may recycle a segment (rename it to a future name and overwrite it), and a
    mix of two segments under one name would make the archiver's true push a conflict.
    Anything not pushed here is left to the archiver and the waits after it."""
    from pgvault.ops import wal as archive

    def kept(name: str) -> bytes | None:
        if not (pg_wal / "archive_status" / f"{name}.ready").exists():
            return None
        try:
            with open(pg_wal / name, "rb") as segment:
                data = segment.read()
                same = os.fstat(segment.fileno()).st_ino == os.stat(pg_wal / name).st_ino
        except OSError:
            return None
        return data if same else None

    # The archiver's push may still succeed where this one failed: the waits decide.
    with contextlib.suppress(OSError, UsageError, StorageError):
        archive.push_read(storage, cluster, names, kept, stages)


def _await_archiver(db: Any, data_dir: Path, walfile: str, timeout: float,
                    archived: Callable[[], bool]) -> None:
    """Until ``walfile`` is archived (or ``timeout``), looked at every 50 ms, so the wait
    ends with the archiver instead of at the next poll of the storage: the server's
    archiver reports it, or its ``.done`` status file appears (wal-push's push-ahead marks
    segments done that the archiver never reports), or, every 0.5 s, the storage has it.
    The storage is checked after it (``wait_for``), which is what counts."""
    deadline = time.monotonic() + timeout
    done = data_dir / "pg_wal" / "archive_status" / f"{walfile}.done"
    rounds = 0
    while time.monotonic() < deadline:
        last = _one(db, "SELECT last_archived_wal FROM pg_stat_archiver")
        if last and len(last) == len(walfile) and last[:8] == walfile[:8] and last >= walfile:
            return
        if done.exists() or (rounds % 10 == 9 and archived()):
            return
        rounds += 1
        time.sleep(0.05)


def _one(db: Any, query: str, params: tuple[Any, ...] | None = None) -> Any:
    import psycopg

    try:
        row = db.execute(query, params).fetchone()
    except psycopg.Error as exc:
        raise BackupFailed(f"incremental base backup: {str(exc).strip().splitlines()[0]} "
                           "(it needs a superuser, or pg_backup_start/pg_backup_stop and "
                           "pg_read_all_settings)") from None
    return row[0] if row else None


def _same_system(data_dir: Path, info: ClusterInfo) -> None:
    """The folder the server names must be this host's copy of that server's data."""
    try:
        control = (data_dir / CONTROL).read_bytes()
    except OSError as exc:
        raise BackupFailed(f"cannot read {data_dir / CONTROL} ({exc.strerror}): an "
                           "incremental base backup runs on the database host, as a user "
                           "that can read the data directory (postgres)") from None
    found = str(wal.control_system_identifier(control))
    if found != info.system_identifier:
        raise BackupFailed(f"{data_dir} belongs to system {found}, not to the server "
                           f"connected ({info.system_identifier}): run the incremental "
                           "backup on the database host")


def _facts(info: ClusterInfo, label_text: str, stop_text: str, options: TakeOptions,
           parent: str) -> PhysicalFacts:
    label = wal.parse_backup_label(label_text)
    start = wal.parse_lsn(label["START WAL LOCATION"].split(" ", 1)[0])
    timeline = int(label["START TIMELINE"])
    stop = wal.parse_lsn(stop_text)
    size = info.wal_segment_size
    return PhysicalFacts(
        system_identifier=info.system_identifier, wal_segment_size=size, timeline=timeline,
        start_lsn=wal.format_lsn(start), stop_lsn=wal.format_lsn(stop),
        start_wal=wal.segment_name(timeline, wal.segment_of(start, size), size),
        stop_wal=wal.segment_name(timeline, wal.last_segment_of(max(stop, 1), size), size),
        stop_timeline=timeline, stop_time=options.clock(), wal_included=False,
        label=label.get("LABEL", ""), superuser=info.superuser, parent=parent)


# ---------------------------------------------------------------- restoring a chain

def chain(storage: Storage, manifest: Manifest) -> list[Manifest]:
    """The full backup and every incremental up to ``manifest``, oldest first; each one's
    stored objects checked (size and sha256 of the stored bytes) before anything is written.
    RestoreFailed names the first missing or damaged member."""
    catalog = Catalog(storage)
    members = [manifest]
    while isinstance(members[-1].physical, PhysicalFacts) and \
            isinstance(parent := members[-1].physical.parent, str):
        try:
            members.append(catalog.get(parent, manifest.database))
        except (NotFound, IntegrityError, StorageError) as exc:
            raise RestoreFailed(f"backup {members[-1].id} is incremental on {parent}, which "
                                f"cannot be read ({exc}); the chain cannot be restored and "
                                "nothing was written") from None
        if len(members) > 10_000 or members[-1].id in {m.id for m in members[:-1]}:
            raise RestoreFailed(f"backup {manifest.id}: its chain of parents loops")
    members.reverse()
    if len(members) > 1:
        for member in members:
            for artifact in member.artifacts:
                _check_stored(storage, member, artifact.key, artifact.size, artifact.sha256)
    return members


def _check_stored(storage: Storage, member: Manifest, key: str, size: int, sha256: str) -> None:
    digest = hashlib.sha256()
    seen = 0
    try:
        with contextlib.closing(storage.open(key)) as reader:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                seen += len(chunk)
    except (NotFound, StorageError, OSError) as exc:
        raise RestoreFailed(f"backup {member.id} of the chain is missing {key} ({exc}); "
                            "nothing was written") from None
    if seen != size or digest.hexdigest() != sha256:
        raise RestoreFailed(f"backup {member.id} of the chain is damaged: {key} has {seen} "
                            f"bytes and sha256 {digest.hexdigest()[:12]}..., the manifest "
                            f"says {size} and {sha256[:12]}...; nothing was written")


def apply(storage: Storage, member: Manifest, pgdata: Path, *, owner: tuple[int, int] | None,
          progress: Callable[[int], None] | None, identities: Keyring | None) -> None:
    """Patch a restored parent in ``pgdata`` with one incremental backup of its chain."""
    import tarfile

    from pgvault.engines.physical import TAR_READ, TAR_STREAM, check_links, extract_member
    from pgvault.ops.restore import open_artifact

    reader = open_artifact(storage, member, member.artifact(LIST), identities=identities)
    entries = datadir.parse_listing(b"".join(iter(lambda: reader.read(CHUNK), b"")))
    deltas = {e.path: e for e in entries if e.op == "delta"}
    source = open_artifact(storage, member, member.artifact("base.tar"), progress=progress,
                           identities=identities)
    root = Path(os.path.realpath(pgdata))
    try:
        with tarfile.open(fileobj=source, mode="r|", bufsize=TAR_STREAM,  # type: ignore[call-overload]
                          copybufsize=TAR_READ) as archive:
            for item in archive:
                if item.name.startswith(datadir.DELTA):
                    path = item.name[len(datadir.DELTA):]
                    entry = deltas.get(path)
                    handle = archive.extractfile(item)
                    if entry is None or handle is None or ".." in path.split("/"):
                        raise IntegrityError(f"backup {member.id}: tar member {item.name!r} "
                                             "is not in its listing")
                    datadir.apply_delta(handle, root / path, entry)
                    del deltas[path]
                elif item.name == datadir.LISTING:
                    continue
                else:
                    extract_member(archive, item, str(root), pgdata)
    except (tarfile.TarError, EOFError) as exc:
        raise IntegrityError(f"backup {member.id}: the incremental tar is damaged: {exc}"
                             ) from None
    finally:
        check_links(str(root), pgdata)
    while source.read(CHUNK):
        pass
    for entry in deltas.values():  # size changes only: no page of theirs is stored
        try:
            os.truncate(root / entry.path, entry.size)
        except FileNotFoundError:
            raise RestoreFailed(f"incremental chain broken: {entry.path} is not in the "
                                f"backups before {member.id}") from None
    for entry in entries:
        if entry.op == "removed":
            (root / entry.path).unlink(missing_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # the full's: it does not describe the chain
    wrong = [e.path for e in entries if e.op in ("same", "delta")
             and not _has_size(root / e.path, e.size)]
    if wrong:
        raise IntegrityError(f"backup {member.id}: after applying it, {len(wrong)} files "
                             f"differ in size from its listing (first: {wrong[0]})")
    if owner is not None:
        for folder, dirs, names in os.walk(root):
            os.chown(folder, *owner)
            for name in dirs + names:
                os.chown(os.path.join(folder, name), *owner, follow_symlinks=False)
    if not (root / LABEL).is_file():
        raise IntegrityError(f"backup {member.id}: no backup_label in the incremental tar")


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False
