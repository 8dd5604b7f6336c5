"""The key layout of a repository and the manifests that make backups exist.

Layout (the only module that knows it):
    backups/<db>/<id>/<artifact><suffix>   data, written first
    manifests/<db>/<id>.json               commit record, written last, deleted first
    drills/<db>/<id>/<time>.json           restore drill records of that backup
    locks/<db>.lock                        who is writing to <db> now
    status/<db>/<name>.json                run history (last success, last failure), overwritten
    keys/passphrase-identity.age           passphrase mode: the age identity, scrypt-wrapped
    wal/<cluster>/identity.json            the system identifier whose WAL this cluster holds
    wal/<cluster>/push-failures.json       count and last error of failed pushes (overwritten)
    wal/<cluster>/<tli>/<walfile>/<sha256 of the raw file><suffix>   one archived WAL file
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import msgspec

from pgvault.errors import IntegrityError, NotFound, UsageError
from pgvault.model import Manifest, VerifyReport, from_json, new_backup_id, to_json
from pgvault.storage.base import ObjectInfo, Storage

MANIFESTS = "manifests/"
BACKUPS = "backups/"
LOCKS = "locks/"
STATUS = "status/"
DRILLS = "drills/"
PASSPHRASE_IDENTITY = "keys/passphrase-identity.age"
WAL = "wal/"


def db_segment(database: str) -> str:
    """A database name as one safe key segment (any name PostgreSQL allows)."""
    encoded = quote(database, safe="")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def manifest_key(database: str, backup_id: str) -> str:
    return f"{MANIFESTS}{db_segment(database)}/{backup_id}.json"


def artifact_key(database: str, backup_id: str, filename: str) -> str:
    return f"{BACKUPS}{db_segment(database)}/{backup_id}/{filename}"


def lock_key(database: str) -> str:
    return f"{LOCKS}{db_segment(database)}.lock"


def wal_prefix(cluster: str) -> str:
    """Everything archived for one cluster name."""
    return f"{WAL}{db_segment(cluster)}/"


def wal_identity_key(cluster: str) -> str:
    return wal_prefix(cluster) + "identity.json"


def wal_failures_key(cluster: str) -> str:
    """Failed pushes of a cluster: the archiver's exit status reaches no monitoring."""
    return wal_prefix(cluster) + "push-failures.json"


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
            return from_json(Manifest, data)
        except (ValueError, msgspec.MsgspecError) as exc:
            raise IntegrityError(f"manifest {key} is damaged: {exc}") from None

    def list(self, database: str | None = None) -> list[Manifest]:
        """Every committed backup, oldest first."""
        manifests = [self.read(info.key) for info in self._manifest_keys(database)]
        return sorted(manifests, key=lambda m: (m.started_at, m.id))

    def databases(self) -> builtins.list[str]:
        """Names of the databases that have at least one manifest."""
        names = {unquote(info.key[len(MANIFESTS) :].split("/", 1)[0]) for info in
                 self._manifest_keys(None)}
        return sorted(names)

    def get(self, ref: str, database: str | None = None) -> Manifest:
        """A backup by id, unique id prefix, or 'latest' (of ``database`` if given)."""
        manifests = self.list(database)
        if not manifests:
            where = f" of database {database!r}" if database else ""
            raise NotFound(f"no backups{where} in {self.storage.url}")
        if ref == "latest":
            if database is None and len({m.database for m in manifests}) > 1:
                names = ", ".join(sorted({m.database for m in manifests}))
                raise UsageError(
                    f"'latest' is ambiguous: the repository holds {names}; name one with --dbname"
                )
            return manifests[-1]
        matches = [m for m in manifests if m.id == ref] or [
            m for m in manifests if m.id.startswith(ref)
        ]
        if not matches:
            raise NotFound(f"no backup {ref!r} in {self.storage.url}")
        if len(matches) > 1:
            raise UsageError(f"backup id {ref!r} is ambiguous: {len(matches)} backups match")
        return matches[0]

    def update(self, manifest: Manifest) -> None:
        """Rewrite an existing manifest (pin, unpin)."""
        self.commit(manifest)

    def read_status(self, database: str, name: str) -> dict[str, Any] | None:
        """The status record ``name`` of ``database``; None if never written or unreadable."""
        try:
            record = json.loads(self.storage.read_bytes(status_key(database, name)))
        except (NotFound, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def write_status(self, database: str, name: str, record: dict[str, Any]) -> None:
        """Replace the status record ``name`` of ``database`` (a writer-only role can: a put)."""
        self.storage.put_bytes(status_key(database, name),
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

    def drills(self, database: str, backup_id: str) -> builtins.list[VerifyReport]:
        """Every drill record of one backup, oldest first."""
        keys = [info.key for info in self.storage.list(drill_prefix(database, backup_id))
                if info.key.endswith(".json")]
        return [self._read_drill(key) for key in sorted(keys)]

    def last_drills(self, database: str | None = None) -> dict[tuple[str, str], VerifyReport]:
        """The newest drill record of each backup, by (database, backup id)."""
        prefix = DRILLS + (db_segment(database) + "/" if database is not None else "")
        newest: dict[tuple[str, str], str] = {}
        for info in self.storage.list(prefix):
            parsed = parse_drill_key(info.key)
            if parsed is not None and info.key.endswith(".json"):
                newest[parsed[:2]] = max(newest.get(parsed[:2], ""), info.key)
        return {ref: self._read_drill(key) for ref, key in newest.items()}

    def _read_drill(self, key: str) -> VerifyReport:
        data = self.storage.read_bytes(key)
        try:
            return from_json(VerifyReport, data)
        except (ValueError, msgspec.MsgspecError) as exc:
            raise IntegrityError(f"drill record {key} is damaged: {exc}") from None

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

    def delete_orphan(self, orphan: Orphan) -> bool:
        """Remove an orphan's objects unless its manifest has appeared since; True if removed."""
        try:
            self.storage.stat(manifest_key(orphan.database, orphan.backup_id))
        except NotFound:
            self.storage.delete([info.key for info in orphan.objects])
            return True
        return False
