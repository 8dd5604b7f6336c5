"""The key layout of a repository and the manifests that make backups exist.

Layout (the only module that knows it):
    backups/<db>/<id>/<artifact><suffix>   data, written first
    manifests/<db>/<id>.json               commit record, written last, deleted first
    drills/<db>/<id>/<time>.json           restore drill records of that backup
    locks/<db>.lock                        who is writing to <db> now
    locks/snapshots/<db>.lock              who creates or prunes <db>'s provider snapshots now
    fleet/leases/<db>.json                 fleet mode: which window of <db> is done, or who runs it
    fleet/slots/<scope>/<n>.json           fleet mode: job slot n of a repository or server cap
    status/<db>/<name>.json                run history (last success, last failure), overwritten
    copies/<repo>.json                     the copies to [[repos]] <repo>: last run, last
                                           success, last error (overwritten; in the source)
    keys/passphrase-identity.age           passphrase mode: the age identity, scrypt-wrapped
    wal/<cluster>/identity.json            the system identifier whose WAL this cluster holds
    wal/<cluster>/push-failures.json       count and last error of failed pushes (overwritten)
    wal/<cluster>/backlog/<repo>/<walfile> empty: [[repos]] <repo> lacks this WAL file, which
                                           the repository holding this marker has (catch-up)
    wal/<cluster>/<tli>/<walfile>/<sha256 of the raw file><suffix>   one archived WAL file

Every record under these keys is read and written here (manifests, drills, status and WAL
records); the lock's protocol is ``pgvault.lock``, its key is ``lock_key``.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import msgspec

from pgvault.errors import IntegrityError, NotFound, StorageError, UsageError
from pgvault.model import (
    Identity,
    Manifest,
    PushFailures,
    VerifyReport,
    from_json,
    new_backup_id,
    to_json,
)
from pgvault.storage.base import ObjectInfo, Storage

if TYPE_CHECKING:
    from pgvault.pg.wal import WalName

MANIFESTS = "manifests/"
BACKUPS = "backups/"
LOCKS = "locks/"
STATUS = "status/"
DRILLS = "drills/"
PASSPHRASE_IDENTITY = "keys/passphrase-identity.age"
WAL = "wal/"
FLEET = "fleet/"


def db_segment(database: str) -> str:
    """A database name as one safe key segment (any name PostgreSQL allows)."""
    encoded = quote(database, safe="")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def manifest_key(database: str, backup_id: str) -> str:
    return f"{MANIFESTS}{db_segment(database)}/{backup_id}.json"


def artifact_key(database: str, backup_id: str, filename: str) -> str:
    return f"{BACKUPS}{db_segment(database)}/{backup_id}/{filename}"


def copy_record_key(repo: str) -> str:
    """The record of the copies from this repository to the `[[repos]]` entry ``repo``."""
    return f"copies/{db_segment(repo)}.json"


def lock_key(database: str) -> str:
    return f"{LOCKS}{db_segment(database)}.lock"


def fleet_lease_key(database: str) -> str:
    return f"{FLEET}leases/{db_segment(database)}.json"


def fleet_slot_key(scope: str, number: int) -> str:
    """Slot ``number`` of a cap: scope "repository", or "server/<host:port>"."""
    return f"{FLEET}slots/{'/'.join(db_segment(part) for part in scope.split('/'))}/{number}.json"


def snapshot_lock_key(database: str) -> str:
    """Apart from ``lock_key``: a provider snapshot never waits for a logical backup."""
    return f"{LOCKS}snapshots/{db_segment(database)}.lock"


def wal_prefix(cluster: str) -> str:
    """Everything archived for one cluster name."""
    return f"{WAL}{db_segment(cluster)}/"


def wal_identity_key(cluster: str) -> str:
    return wal_prefix(cluster) + "identity.json"


def wal_failures_key(cluster: str) -> str:
    """Failed pushes of a cluster: the archiver's exit status reaches no monitoring."""
    return wal_prefix(cluster) + "push-failures.json"


def wal_backlog_prefix(cluster: str, repo: str | None = None) -> str:
    """The backlog markers of a cluster (of one `[[repos]]` name, or of all)."""
    return wal_prefix(cluster) + "backlog/" + (f"{db_segment(repo)}/" if repo else "")


def wal_backlog_key(cluster: str, repo: str, walfile: str) -> str:
    return wal_backlog_prefix(cluster, repo) + walfile


def parse_wal_backlog_key(key: str) -> tuple[str, str, str] | None:
    """(cluster, repository name, WAL file name) of a backlog marker; else None."""
    if not key.startswith(WAL):
        return None
    parts = key[len(WAL) :].split("/")
    if len(parts) != 4 or parts[1] != "backlog" or not parts[2] or not parts[3]:
        return None
    return unquote(parts[0]), unquote(parts[2]), parts[3]


def wal_file_prefix(cluster: str, walfile: str) -> str:
    """The folder of one WAL file name; it holds one object per distinct content pushed."""
    # The first 8 hex digits of every WAL file name are its timeline.
    return f"{wal_prefix(cluster)}{walfile[:8]}/{walfile}/"


def wal_object_key(cluster: str, walfile: str, raw_sha256: str, suffix: str) -> str:
    """Named by the raw file's sha256: the key itself says what a fetch must get back."""
    return wal_file_prefix(cluster, walfile) + raw_sha256 + suffix


def parse_wal_key(key: str) -> tuple[str, str, str, str] | None:
    """(cluster, WAL file name, raw sha256, suffix) of an archived WAL object; else None."""
    if not key.startswith(WAL):
        return None
    parts = key[len(WAL) :].split("/")
    if len(parts) != 4 or not all(parts) or parts[1] != parts[2][:8]:
        return None
    digest, dot, suffix = parts[3].partition(".")
    if len(digest) != 64:
        return None
    return unquote(parts[0]), parts[2], digest, dot + suffix


def status_key(database: str, name: str) -> str:
    """A small record about ``database`` that is overwritten (put, never deleted)."""
    return f"{STATUS}{db_segment(database)}/{name}.json"


def drill_prefix(database: str, backup_id: str | None = None) -> str:
    """Where the drill records of one backup (or of every backup of ``database``) live."""
    return f"{DRILLS}{db_segment(database)}/" + (f"{backup_id}/" if backup_id else "")


def drill_key(report: VerifyReport) -> str:
    # The name sorts in time order and is unique, like a backup id.
    name = new_backup_id(report.started_at) + ".json"
    return drill_prefix(report.database, report.backup_id) + name


def parse_drill_key(key: str) -> tuple[str, str, str] | None:
    """(database, backup id, filename) of a key under ``drills/``; None for any other key."""
    if not key.startswith(DRILLS):
        return None
    parts = key[len(DRILLS) :].split("/", 2)
    if len(parts) != 3 or not all(parts):
        return None
    return unquote(parts[0]), parts[1], parts[2]


def parse_artifact_key(key: str) -> tuple[str, str, str] | None:
    """(database, backup id, filename) of a key under ``backups/``; None for any other key."""
    if not key.startswith(BACKUPS):
        return None
    parts = key[len(BACKUPS) :].split("/", 2)
    if len(parts) != 3 or not all(parts):
        return None
    return unquote(parts[0]), parts[1], parts[2]


def parse_manifest_key(key: str) -> tuple[str, str] | None:
    """(database, backup id) of a manifest key; None for any other key."""
    if not key.startswith(MANIFESTS) or not key.endswith(".json"):
        return None
    parts = key[len(MANIFESTS) : -len(".json")].split("/")
    if len(parts) != 2 or not all(parts):
        return None
    return unquote(parts[0]), parts[1]


@dataclass(frozen=True)
class Orphan:
    """Stored data of a backup id that has no manifest: failed, in progress, or half deleted."""

    database: str
    backup_id: str
    objects: tuple[ObjectInfo, ...]


@dataclass(frozen=True)
class Damaged:
    """A stored record that cannot be read (a manifest or a drill record), and why."""

    key: str
    database: str
    backup_id: str
    reason: str


@dataclass(frozen=True)
class ArchivedFile:
    """One stored WAL object: which file, which content (sha256 of the raw bytes), which
    encoding (the suffix names the stages)."""

    wal: WalName
    sha256: str
    suffix: str
    info: ObjectInfo

    @property
    def key(self) -> str:
        return self.info.key


def _archived(infos: Iterable[ObjectInfo]) -> builtins.list[ArchivedFile]:
    from pgvault.pg.wal import parse_wal_name  # only WAL commands need it: `list` starts faster

    found = []
    for info in infos:
        parsed = parse_wal_key(info.key)
        name = parse_wal_name(parsed[1]) if parsed else None
        if parsed is not None and name is not None:
            found.append(ArchivedFile(name, parsed[2], parsed[3], info))
    return found


@dataclass(frozen=True)
class BacklogMarker:
    """`[[repos]]` ``repo`` lacks ``walfile``; the marker was written at ``info.modified``."""

    repo: str
    walfile: str
    info: ObjectInfo


def backlog_markers(infos: Iterable[ObjectInfo]) -> builtins.list[BacklogMarker]:
    """The backlog markers among listed objects (a cluster's WAL listing holds them too)."""
    found = []
    for info in infos:
        parsed = parse_wal_backlog_key(info.key)
        if parsed is not None:
            found.append(BacklogMarker(parsed[1], parsed[2], info))
    return found


@dataclass
class Listing:
    """The backups of a repository (or of one database) as found, damage included."""

    manifests: list[Manifest] = field(default_factory=list)
    """Every readable manifest, oldest first."""
    damaged: list[Damaged] = field(default_factory=list)
    """Manifests that exist but cannot be read: their backups are unusable, not absent."""

    def databases(self) -> set[str]:
        return {m.database for m in self.manifests} | {d.database for d in self.damaged}


@dataclass
class DrillRecords:
    """The newest readable drill record of each backup, and the records that are damaged."""

    newest: dict[tuple[str, str], VerifyReport] = field(default_factory=dict)
    damaged: list[Damaged] = field(default_factory=list)


def known_bad(report: VerifyReport | None) -> str | None:
    """Why a backup whose newest drill is ``report`` cannot be trusted; None if it can."""
    if report is None or not report.integrity_failed:
        # A failed restore or facts check may be the scratch server's fault; only an
        # integrity failure proves the stored bytes are not what the backup wrote.
        return None
    what = "; ".join(f"{c.name}: {c.detail}".rstrip(": ") for c in report.failures
                     if c.level == "integrity")
    return f"integrity check failed in the drill of {report.finished_at:%Y-%m-%d %H:%M}Z: {what}"


def _reason(exc: Exception, what: str, key: str) -> str:
    """'manifest is damaged: ...' from 'manifest <key> is damaged: ...' (the key is kept apart)."""
    return what + " " + str(exc).removeprefix(f"{what} {key} ")


class Catalog:
    """Lists, reads, commits and deletes manifests in one storage."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest: from now on the backup exists."""
        self.storage.put_bytes(
            manifest_key(manifest.database, manifest.id),
            to_json(manifest),
        )

    def _manifest_keys(self, database: str | None) -> Iterator[ObjectInfo]:
        prefix = MANIFESTS + (db_segment(database) + "/" if database is not None else "")
        for info in self.storage.list(prefix):
            if info.key.endswith(".json"):
                yield info

    def read(self, key: str) -> Manifest:
        """Parse one manifest; a damaged one is an IntegrityError naming the key."""
        data = self.storage.read_bytes(key)
        try:
            manifest = from_json(Manifest, data)
        except (ValueError, msgspec.MsgspecError) as exc:
            raise IntegrityError(f"manifest {key} is damaged: {exc}") from None
        # A flipped bit can leave valid JSON that names another backup: the key is the truth.
        if parse_manifest_key(key) not in (None, (manifest.database, manifest.id)):
            raise IntegrityError(f"manifest {key} is damaged: it names backup {manifest.id} "
                                 f"of {manifest.database!r}")
        return manifest

    def scan(self, database: str | None = None) -> Listing:
        """Every committed backup, oldest first, with the manifests that cannot be read.

        One damaged manifest makes one backup unusable; it must not hide the others.
        """
        listing = Listing()
        for info in self._manifest_keys(database):
            try:
                listing.manifests.append(self.read(info.key))
            except IntegrityError as exc:
                parsed = parse_manifest_key(info.key)
                if parsed is None:
                    continue
                listing.damaged.append(Damaged(info.key, parsed[0], parsed[1],
                                               _reason(exc, "manifest", info.key)))
        listing.manifests.sort(key=lambda m: (m.started_at, m.id))
        return listing

    def list(self, database: str | None = None) -> builtins.list[Manifest]:
        """Every committed backup whose manifest can be read, oldest first."""
        return self.scan(database).manifests

    def databases(self) -> builtins.list[str]:
        """Names of the databases that have at least one manifest."""
        names = {unquote(info.key[len(MANIFESTS) :].split("/", 1)[0]) for info in
                 self._manifest_keys(None)}
        return sorted(names)

    def require(self) -> None:
        """Raise NotFound unless the repository itself exists (the folder, the bucket).

        Reading an empty prefix of a missing repository looks like "no backups yet", which
        is what a typo in --repo must never look like. Writers create it; readers ask here.
        """
        parts = urlsplit(self.storage.url)
        if parts.scheme == "file":
            root = Path(unquote(parts.path))
            if not root.is_dir():
                raise NotFound(f"repository {self.storage.url} does not exist (no folder "
                               f"{root}): check --repo, or run a backup to create it")
            return
        try:
            next(iter(self.storage.list(MANIFESTS)), None)
        except StorageError as exc:
            if "NoSuchBucket" in str(exc):
                raise NotFound(f"repository {self.storage.url} does not exist (no bucket "
                               f"{parts.netloc}): check --repo") from None
            raise

    def bad(self, database: str | None = None,
            drills: DrillRecords | None = None) -> dict[tuple[str, str], str]:
        """Backups known bad by their newest readable drill: (database, id) -> why."""
        records = drills if drills is not None else self.drill_records(database)
        return {ref: why for ref, report in records.newest.items()
                if (why := known_bad(report)) is not None}

    def latest(self, database: str | None = None,
               listing: Listing | None = None) -> tuple[Manifest, builtins.list[Damaged]]:
        """The newest complete backup not known bad, and the newer ones passed over (why)."""
        listing = listing if listing is not None else self.scan(database)
        names = listing.databases()
        if not names:
            where = f" of database {database!r}" if database else ""
            raise NotFound(f"no backups{where} in {self.storage.url}")
        if database is None and len(names) > 1:
            raise UsageError(f"'latest' is ambiguous: the repository holds "
                             f"{', '.join(sorted(names))}; name one with --dbname")
        bad = self.bad(database)
        passed: list[tuple[str, Damaged]] = [(d.backup_id, d) for d in listing.damaged]
        for m in reversed(listing.manifests):
            if m.kind == "snapshot":
                continue  # the provider restores a snapshot, pgvault does not
            why = bad.get((m.database, m.id))
            if why is None:
                newer = [d for bid, d in passed if bid > m.id]
                return m, sorted(newer, key=lambda d: d.backup_id, reverse=True)
            passed.append((m.id, Damaged(manifest_key(m.database, m.id), m.database, m.id, why)))
        if not passed:
            raise NotFound(f"no backup of {next(iter(names))!r} that pgvault restores in "
                           f"{self.storage.url}: only provider snapshots (restore those "
                           "with the provider)")
        every = "; ".join(f"{d.backup_id}: {d.reason}" for _, d in
                          sorted(passed, key=lambda p: p[0], reverse=True))
        raise IntegrityError(f"no backup of {next(iter(names))!r} can be trusted: {every}")

    def get(self, ref: str, database: str | None = None) -> Manifest:
        """A backup by id, unique id prefix, or 'latest' (of ``database`` if given).

        'latest' is the newest complete backup not known bad (see ``latest``); an id whose
        manifest is damaged is an IntegrityError that says why.
        """
        listing = self.scan(database)
        if ref == "latest":
            return self.latest(database, listing)[0]
        if not listing.manifests and not listing.damaged:
            where = f" of database {database!r}" if database else ""
            raise NotFound(f"no backups{where} in {self.storage.url}")
        ids: list[tuple[str, Manifest | Damaged]] = [(m.id, m) for m in listing.manifests]
        ids += [(d.backup_id, d) for d in listing.damaged]
        matches = [item for bid, item in ids if bid == ref] or [
            item for bid, item in ids if bid.startswith(ref)
        ]
        if not matches:
            raise NotFound(f"no backup {ref!r} in {self.storage.url}")
        if len(matches) > 1:
            raise UsageError(f"backup id {ref!r} is ambiguous: {len(matches)} backups match")
        found = matches[0]
        if isinstance(found, Damaged):
            raise IntegrityError(f"backup {found.backup_id} of {found.database!r} is unusable: "
                                 f"{found.reason} ({found.key})")
        return found

    def update(self, manifest: Manifest) -> None:
        """Rewrite an existing manifest (pin, unpin)."""
        self.commit(manifest)

    def read_status(self, database: str, name: str) -> dict[str, Any] | None:
        """The status record ``name`` of ``database``; None if never written or unreadable."""
        return self.status_record(database, name)[0]

    def status_record(self, database: str, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """The status record ``name`` of ``database`` and, if it is damaged, why (else None).

        A damaged record reads as absent, so writers start afresh; readers that report
        (status, check) say it was damaged instead of showing an empty history as the truth.
        """
        key = status_key(database, name)
        try:
            record = json.loads(self.storage.read_bytes(key))
        except NotFound:
            return None, None
        except ValueError as exc:  # UnicodeDecodeError is one too
            return None, f"status record {key} is damaged: {exc}"
        if not isinstance(record, dict):
            return None, f"status record {key} is damaged: not a JSON object"
        return record, None

    def write_status(self, database: str, name: str, record: dict[str, Any]) -> None:
        """Replace the status record ``name`` of ``database`` (a writer-only role can: a put)."""
        self.storage.put_bytes(status_key(database, name),
                               json.dumps(record, indent=2, default=str).encode())

    def copy_record(self, repo: str) -> dict[str, Any] | None:
        """The record of the copies to ``repo`` (None: never written, or unreadable)."""
        try:
            record = json.loads(self.storage.read_bytes(copy_record_key(repo)))
        except (NotFound, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def write_copy_record(self, repo: str, record: dict[str, Any]) -> None:
        """Replace the record of the copies to ``repo``."""
        self.storage.put_bytes(copy_record_key(repo),
                               json.dumps(record, indent=2, default=str).encode())

    def delete(self, manifest: Manifest) -> None:
        """Remove a backup: manifest first, so a half-deleted backup is never listed."""
        self.storage.delete([manifest_key(manifest.database, manifest.id)])
        self.storage.delete([a.key for a in manifest.artifacts])
        self.storage.delete([info.key for info in
                             self.storage.list(drill_prefix(manifest.database, manifest.id))])

    def record_drill(self, report: VerifyReport) -> str:
        """Store a restore drill's report beside its backup; returns the key."""
        key = drill_key(report)
        self.storage.put_bytes(key, to_json(report))
        return key

    def drills(self, database: str, backup_id: str
               ) -> builtins.list[VerifyReport | Damaged]:
        """Every drill record of one backup, oldest first; a damaged one as ``Damaged``."""
        keys = [info.key for info in self.storage.list(drill_prefix(database, backup_id))
                if info.key.endswith(".json")]
        found: list[VerifyReport | Damaged] = []
        for key in sorted(keys):
            try:
                found.append(self._read_drill(key))
            except IntegrityError as exc:
                found.append(Damaged(key, database, backup_id,
                                     _reason(exc, "drill record", key)))
        return found

    def drill_records(self, database: str | None = None) -> DrillRecords:
        """The newest readable drill record of each backup, and every damaged record.

        A damaged record says nothing about its backup, so the one before it speaks.
        """
        prefix = DRILLS + (db_segment(database) + "/" if database is not None else "")
        keys: dict[tuple[str, str], list[str]] = {}
        for info in self.storage.list(prefix):
            parsed = parse_drill_key(info.key)
            if parsed is not None and info.key.endswith(".json"):
                keys.setdefault(parsed[:2], []).append(info.key)
        records = DrillRecords()
        for ref, names in keys.items():
            for key in sorted(names, reverse=True):
                try:
                    records.newest[ref] = self._read_drill(key)
                    break
                except IntegrityError as exc:
                    records.damaged.append(Damaged(key, ref[0], ref[1],
                                                   _reason(exc, "drill record", key)))
        return records

    def last_drills(self, database: str | None = None) -> dict[tuple[str, str], VerifyReport]:
        """The newest readable drill record of each backup, by (database, backup id)."""
        return self.drill_records(database).newest

    def _read_drill(self, key: str) -> VerifyReport:
        data = self.storage.read_bytes(key)
        try:
            report = from_json(VerifyReport, data)
        except (ValueError, msgspec.MsgspecError) as exc:
            raise IntegrityError(f"drill record {key} is damaged: {exc}") from None
        parsed = parse_drill_key(key)
        if parsed is not None and parsed[:2] != (report.database, report.backup_id):
            raise IntegrityError(f"drill record {key} is damaged: it names backup "
                                 f"{report.backup_id} of {report.database!r}")
        return report

    def orphans(self, database: str | None = None) -> builtins.list[Orphan]:
        """Data under ``backups/`` whose backup id has no manifest, grouped by backup."""
        prefix = BACKUPS + (db_segment(database) + "/" if database is not None else "")
        # Data is listed before manifests: a backup that commits between the two listings
        # then shows up with its manifest instead of looking like an orphan.
        groups: dict[tuple[str, str], list[ObjectInfo]] = {}
        for info in self.storage.list(prefix):
            parsed = parse_artifact_key(info.key)
            if parsed is not None:
                groups.setdefault(parsed[:2], []).append(info)
        # Drill records left by an interrupted delete (or a drill that raced prune).
        drills = DRILLS + (db_segment(database) + "/" if database is not None else "")
        for info in self.storage.list(drills):
            parsed = parse_drill_key(info.key)
            if parsed is not None:
                groups.setdefault(parsed[:2], []).append(info)
        committed = {parse_manifest_key(info.key) for info in self._manifest_keys(database)}
        return [
            Orphan(db, backup_id, tuple(objects))
            for (db, backup_id), objects in sorted(groups.items())
            if (db, backup_id) not in committed
        ]

    # The WAL archive of a cluster (see ops.wal for what pushes and fetches promise).

    def wal_identity(self, cluster: str) -> Identity | None:
        """The system a cluster name is bound to; None before its first push."""
        key = wal_identity_key(cluster)
        try:
            record = json.loads(self.storage.read_bytes(key))
            return Identity(str(record["system_identifier"]), int(record["wal_segment_size"]))
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{self.storage.url}/{key} is damaged: {exc}") from None

    def bind_wal_identity(self, cluster: str, identity: Identity, *, bound_at: datetime,
                          host: str) -> None:
        """Bind a cluster name to a system, once: AlreadyExists if it is bound already."""
        record = {"system_identifier": identity.system_identifier,
                  "wal_segment_size": identity.wal_segment_size,
                  "bound_at": bound_at.isoformat(), "host": host}
        self.storage.create(wal_identity_key(cluster), json.dumps(record, indent=2).encode())

    def wal_versions(self, cluster: str, walfile: str) -> builtins.list[ArchivedFile]:
        """Every stored version of one WAL file name (more than one only after a split brain)."""
        return _archived(self.storage.list(wal_file_prefix(cluster, walfile)))

    def wal_versions_named(self, cluster: str, name_start: str) -> builtins.list[ArchivedFile]:
        """Every stored version of every WAL file whose name starts with ``name_start`` (its
        timeline at least), in one listing: one question answers a push of many neighbours."""
        if len(name_start) < 8:
            raise ValueError(f"{name_start!r} does not name a timeline")
        return _archived(self.storage.list(f"{wal_prefix(cluster)}{name_start[:8]}/{name_start}"))

    def wal_files(self, cluster: str) -> builtins.list[ArchivedFile]:
        """Every archived WAL object of a cluster, in key order."""
        return _archived(self.storage.list(wal_prefix(cluster)))

    def wal_listing(self, cluster: str
                    ) -> tuple[builtins.list[ArchivedFile], builtins.list[BacklogMarker]]:
        """Every archived WAL object and every backlog marker of a cluster, in one listing."""
        infos = builtins.list(self.storage.list(wal_prefix(cluster)))
        return _archived(infos), backlog_markers(infos)

    def wal_backlog(self, cluster: str, repo: str | None = None) -> builtins.list[BacklogMarker]:
        """The backlog markers this repository holds (for ``repo``, or for every name)."""
        return backlog_markers(self.storage.list(wal_backlog_prefix(cluster, repo)))

    def add_wal_backlog(self, cluster: str, repo: str, walfile: str) -> None:
        """Record that `[[repos]]` ``repo`` lacks ``walfile`` (which this repository holds)."""
        self.storage.put_bytes(wal_backlog_key(cluster, repo, walfile), b"")

    def clear_wal_backlog(self, cluster: str, repo: str, walfiles: Iterable[str]) -> None:
        self.storage.delete([wal_backlog_key(cluster, repo, w) for w in walfiles])

    def wal_push_failures(self, cluster: str) -> PushFailures:
        """Failed pushes so far; none if never recorded (or the record is unreadable)."""
        try:
            record = json.loads(self.storage.read_bytes(wal_failures_key(cluster)))
            return PushFailures(int(record["failures_total"]),
                                datetime.fromisoformat(record["last_failure_at"]),
                                record.get("last_failed_wal"), record.get("last_error"))
        except (NotFound, ValueError, KeyError, TypeError):
            return PushFailures()

    def record_wal_push_failure(self, cluster: str, walfile: str, error: str,
                                now: datetime) -> None:
        """Count one more failed push of ``walfile`` (a read and a put: a writer role can)."""
        key = wal_failures_key(cluster)
        try:
            total = int(json.loads(self.storage.read_bytes(key)).get("failures_total", 0))
        except (NotFound, ValueError, AttributeError):
            total = 0
        record = {"failures_total": total + 1, "last_failure_at": now.isoformat(),
                  "last_failed_wal": walfile, "last_error": error}
        self.storage.put_bytes(key, json.dumps(record, indent=2).encode())

    def delete_orphan(self, orphan: Orphan) -> bool:
        """Remove an orphan's objects unless its manifest has appeared since; True if removed."""
        try:
            self.storage.stat(manifest_key(orphan.database, orphan.backup_id))
        except NotFound:
            self.storage.delete([info.key for info in orphan.objects])
            return True
        return False
