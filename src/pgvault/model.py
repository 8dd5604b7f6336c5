"""Plain data shared by every layer: backup ids, artifacts, facts and manifests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType, field

MANIFEST_FORMAT = 1
# A logical backup whose dump is split in several archives (db.dump and db.data-N.dump):
# format 1 readers would restore db.dump alone, so such a manifest says it needs more.
SPLIT_MANIFEST_FORMAT = 2
READABLE_FORMATS = (MANIFEST_FORMAT, SPLIT_MANIFEST_FORMAT)

T = TypeVar("T")


def new_backup_id(now: datetime) -> str:
    """An id that sorts in time order (to the millisecond) and is unique within it."""
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


_ID_TIME = re.compile(r"([0-9]{8}T[0-9]{6})\.([0-9]{3})Z-")


def backup_id_time(backup_id: str) -> datetime | None:
    """The UTC instant ``new_backup_id`` encoded in ``backup_id``; None if it has none."""
    match = _ID_TIME.match(backup_id)
    if match is None:
        return None
    try:
        stamp = datetime.strptime(match[1], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return stamp + timedelta(milliseconds=int(match[2]))


class StageSpec:
    """One encoding applied to an artifact, recorded so restore never depends on config.

    Keys it does not know (written by a newer pgvault) are kept in ``extra`` and written
    back when the manifest is rewritten (pin, unpin).
    """

    __slots__ = ("extra", "level", "name", "passphrase", "recipients", "threads")

    name: str
    level: int | None
    threads: int | None
    # age: the public recipients (age1... or SSH public keys), never a secret key.
    recipients: tuple[str, ...] | None
    # age: the repository's passphrase-wrapped identity is among the recipients.
    passphrase: bool | None
    extra: dict[str, Any]

    def __init__(self, *, name: str, level: int | None = None, threads: int | None = None,
                 recipients: tuple[str, ...] | None = None, passphrase: bool | None = None,
                 **extra: Any) -> None:
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "level", level)
        set_(self, "threads", threads)
        set_(self, "recipients", recipients)
        set_(self, "passphrase", passphrase)
        set_(self, "extra", extra)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"StageSpec is frozen: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StageSpec):
            return NotImplemented
        return (self.name, self.level, self.threads, self.recipients, self.passphrase,
                self.extra) == (other.name, other.level, other.threads, other.recipients,
                                other.passphrase, other.extra)

    def __hash__(self) -> int:
        return hash((self.name, self.level, self.threads, self.recipients, self.passphrase))

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in self.to_dict().items())
        return f"StageSpec({fields})"

    def to_dict(self) -> dict[str, Any]:
        """The stored form: the known keys in order, then any unknown ones."""
        return {"name": self.name, "level": self.level, "threads": self.threads,
                "recipients": None if self.recipients is None else list(self.recipients),
                "passphrase": self.passphrase, **self.extra}


class _StageFields(msgspec.Struct):
    """The keys of a stored StageSpec that this version knows (others are ignored)."""

    name: str
    level: int | None = None
    threads: int | None = None
    recipients: tuple[str, ...] | None = None
    passphrase: bool | None = None


_STAGE_KEYS = frozenset(_StageFields.__struct_fields__)


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is StageSpec:
        try:
            known = msgspec.convert(value, _StageFields)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None
        extra = {key: item for key, item in value.items() if key not in _STAGE_KEYS}
        return StageSpec(name=known.name, level=known.level, threads=known.threads,
                         recipients=known.recipients, passphrase=known.passphrase, **extra)
    raise NotImplementedError(f"cannot decode {kind!r}")


def _enc_hook(value: Any) -> Any:
    if isinstance(value, StageSpec):
        return value.to_dict()
    raise NotImplementedError(f"cannot encode {type(value)!r}")


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)
_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {}


def to_json(value: Any) -> bytes:
    """``value`` (a model) as indented JSON, the form stored in the repository."""
    return msgspec.json.format(_ENCODER.encode(value), indent=2)


def from_json(kind: type[T], data: bytes | str) -> T:
    """Parse and validate JSON as ``kind``; msgspec.ValidationError or DecodeError if bad."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind, dec_hook=_dec_hook)
    return decoder.decode(data)  # type: ignore[no-any-return]


def to_dict(value: Any) -> Any:
    """``value`` as JSON-ready builtins (datetimes as ISO 8601 text)."""
    return msgspec.to_builtins(value, enc_hook=_enc_hook)


def from_dict(kind: type[T], value: Any) -> T:
    """Validate already-parsed JSON (dicts, lists, text) as ``kind``."""
    return msgspec.convert(value, kind, dec_hook=_dec_hook)


class Artifact(msgspec.Struct, frozen=True):
    """One stored object of a backup: its key, stored size and sha256, and how it was encoded."""

    name: str
    key: str
    size: int
    sha256: str
    raw_size: int
    stages: list[StageSpec] = field(default_factory=list)
    format: str = ""
    # Where each zstd frame after the first begins: (pg_dump dump id of the table data that
    # starts there, or 0; offset in the zstd stream; offset in the archive). A restore
    # decompresses frames in parallel and knows where each table's data is without looking.
    frames: list[tuple[int, int, int]] = field(default_factory=list)


class TableFacts(msgspec.Struct, frozen=True):
    """What was true of one table (or populated materialized view) in the backup's snapshot."""

    schema_name: str
    name: str
    rows: int
    # True for a materialized view. Fields that older manifests lack are UNSET, so they are
    # left out of the JSON and a manifest read and written again keeps its bytes.
    materialized: bool | UnsetType = UNSET


class UnrecordedTable(msgspec.Struct, frozen=True):
    """A table whose data is in the dump but whose row count could not be read, and why."""

    schema_name: str
    name: str
    reason: str


ENTRY_DIGEST_CHARS = 16
"""Hex digits of sha256 kept per object: enough to tell any two definitions apart."""


class SchemaFingerprint(msgspec.Struct, frozen=True):
    """sha256 of a canonical listing of the user schema, whole and per kind of object.

    ``entries`` (newer backups): per kind of object, each object's name and a digest of its
    definition, so a drill can name every object that differs; known pg_dump limitations
    have kinds of their own (see ops.verify.KNOWN_LIMITATIONS).
    """

    sha256: str
    sections: dict[str, str] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)
    entries: dict[str, dict[str, str]] | UnsetType = UNSET
    sealed_key: str | UnsetType = UNSET
    """Set when the backup is encrypted: ``entries`` then hold keyed digests of the names
    and definitions (facts.seal), and this is their key, age-encrypted (base64) to the
    backup's own recipients, so the manifest names no object a reader could not see."""

    @classmethod
    def from_sections(cls, sections: dict[str, list[str]],
                      entries: dict[str, list[tuple[str, str]]] | None = None
                      ) -> SchemaFingerprint:
        """Hash each section's lines in byte order (never a server collation's order).

        ``entries``: per kind, (object name, definition) pairs; a name seen twice in one
        kind gets a ``#2``, ``#3`` suffix in its definitions' byte order.
        """
        digests = {name: hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
                   for name, lines in sorted(sections.items())}
        whole = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
        fingerprint = cls(sha256=whole, sections=digests,
                          objects={name: len(lines) for name, lines in sorted(sections.items())})
        if entries is None:
            return fingerprint
        kept: dict[str, dict[str, str]] = {}
        for kind, pairs in sorted(entries.items()):
            named: dict[str, str] = {}
            for key, text in sorted(pairs, key=lambda pair: (pair[0].encode(), pair[1].encode())):
                unique, n = key, 1
                while unique in named:
                    n += 1
                    unique = f"{key} #{n}"
                named[unique] = hashlib.sha256(text.encode()).hexdigest()[:ENTRY_DIGEST_CHARS]
            kept[kind] = named
        return msgspec.structs.replace(fingerprint, entries=kept)


class MigrationTable(msgspec.Struct, frozen=True):
    """A migration tool's table (_prisma_migrations, alembic_version, ...) in the snapshot."""

    schema_name: str
    name: str
    rows: int
    sha256: str
    latest: str | None = None
    failed: list[str] = field(default_factory=list)


class Facts(msgspec.Struct):
    """Facts captured in the same snapshot as the dump, for later verification."""

    server_version: str = ""
    server_version_num: int = 0
    database_size: int = 0
    encoding: str = ""
    extensions: dict[str, str] = field(default_factory=dict)
    tables: list[TableFacts] = field(default_factory=list)
    snapshot: str | None = None
    # None: not recorded (older pgvault, or the catalog could not be read).
    schema_filter: str | None = None
    schema_fingerprint: SchemaFingerprint | None = None
    migrations: list[MigrationTable] | None = None
    # Tables in the dump whose rows could not be counted (a lock timeout...): drills skip them.
    unrecorded: list[UnrecordedTable] | UnsetType = UNSET

    def unrecorded_tables(self) -> list[UnrecordedTable]:
        return [] if isinstance(self.unrecorded, UnsetType) else self.unrecorded

    def describe(self) -> str:
        """What the facts hold, in the words every command uses: tables apart from views.

        "11 tables, 1 materialized view (8878 rows)"; a backup recorded before materialized
        views were marked counts them as tables.
        """
        views = sum(1 for t in self.tables if t.materialized is True)
        tables = len(self.tables) - views
        rows = sum(t.rows for t in self.tables)
        text = plural(tables, "table")
        if views:
            text += ", " + plural(views, "materialized view")
        text += f" ({plural(rows, 'row')})"
        if self.unrecorded_tables():
            text += f", {plural(len(self.unrecorded_tables()), 'table')} not counted"
        return text


def plural(count: int, noun: str) -> str:
    """"1 table", "2 tables"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class PhysicalFacts(msgspec.Struct):
    """What a base backup needs for a restore: its cluster, WAL range and where the WAL is."""

    system_identifier: str  # a uint64, kept as text so JSON tools keep every digit
    wal_segment_size: int
    timeline: int
    start_lsn: str
    stop_lsn: str
    start_wal: str
    stop_wal: str
    stop_timeline: int
    stop_time: datetime
    wal_included: bool  # True: pg_basebackup -X fetch put the WAL in base.tar
    label: str = ""
    superuser: str = "postgres"  # the bootstrap superuser (oid 10), for restore drills
    # An incremental backup: the backup (full or incremental) whose restore it patches.
    # UNSET (left out of the JSON) for a full one, so older manifests keep their bytes.
    parent: str | UnsetType = UNSET


class SnapshotFacts(msgspec.Struct):
    """A provider's snapshot that a backup of kind "snapshot" records (no artifacts: the
    bytes stay with the provider; restore it with the provider's own restore)."""

    provider: str  # "rds" or "aurora"
    region: str
    snapshot_id: str  # DBSnapshotIdentifier / DBClusterSnapshotIdentifier
    arn: str
    source_id: str  # the DB instance or DB cluster identifier
    engine: str
    engine_version: str
    size_gb: int  # allocated storage the snapshot holds, in GiB
    encrypted: bool
    created_at: datetime | None = None  # the provider's SnapshotCreateTime
    kms_key_id: str | None = None
    copy_of: str | None = None  # a cross-region copy: the backup id of the snapshot it copies


class Pin(msgspec.Struct):
    """Why a backup must never be pruned."""

    reason: str
    at: datetime


class Manifest(msgspec.Struct, kw_only=True):
    """The commit record of one backup; its existence is what makes the backup exist."""

    format: int = MANIFEST_FORMAT
    id: str
    kind: str = "logical"
    database: str
    started_at: datetime
    finished_at: datetime
    pgvault_version: str
    tool_versions: dict[str, str] = field(default_factory=dict)
    artifacts: list[Artifact]
    facts: Facts = field(default_factory=Facts)
    warnings: list[str] = field(default_factory=list)
    pin: Pin | None = None
    physical: PhysicalFacts | None = None  # set when kind == "physical"
    # Set when kind == "snapshot"; UNSET (left out of the JSON) for every other kind, so
    # older manifests read and written again keep their bytes.
    snapshot: SnapshotFacts | UnsetType = UNSET

    @property
    def time(self) -> datetime:
        """The point in time the backup represents (its snapshot was taken at start)."""
        return self.started_at

    @property
    def pinned(self) -> bool:
        return self.pin is not None

    @property
    def size(self) -> int:
        return sum(a.size for a in self.artifacts)

    @property
    def raw_size(self) -> int:
        return sum(a.raw_size for a in self.artifacts)

    def artifact(self, name: str) -> Artifact:
        """The artifact called ``name``; KeyError if the backup has none."""
        for artifact in self.artifacts:
            if artifact.name == name:
                return artifact
        raise KeyError(name)

    def summary(self) -> dict[str, Any]:
        """The short form printed by ``pgvault list --json``."""
        return {
            "id": self.id,
            "database": self.database,
            "kind": self.kind,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "size": self.size,
            "raw_size": self.raw_size,
            "pinned": self.pinned,
        }


LEVELS = ("integrity", "restore", "facts", "assertions", "command")
"""Restore drill levels, shallowest first; each includes the ones before it."""


class VerifyCheck(msgspec.Struct):
    """One check of a restore drill: what was checked, at which level, the outcome and why.

    "warn": it passed, but something known to differ (a pg_dump limitation) is named.
    """

    level: str
    name: str
    status: Literal["pass", "fail", "skip", "warn"]
    detail: str = ""
    # Every object a check found different (the detail may name only the first ones).
    objects: list[str] | UnsetType = UNSET


class VerifyReport(msgspec.Struct, kw_only=True):
    """The result of one restore drill of one backup; stored beside the backup as its record."""

    format: int = 1
    backup_id: str
    database: str
    level: str
    started_at: datetime
    finished_at: datetime
    where: str = ""
    checks: list[VerifyCheck] = field(default_factory=list)
    restore_seconds: float | None = None
    bytes_read: int = 0
    rto_objective_seconds: float = 3600.0
    rto_met: bool | None = None
    command_output: str = ""
    pgvault_version: str = ""

    @property
    def passed(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    @property
    def failures(self) -> list[VerifyCheck]:
        return [check for check in self.checks if check.status == "fail"]

    @property
    def integrity_failed(self) -> bool:
        return any(check.level == "integrity" for check in self.failures)


# The run history a repository keeps per database (status/<db>/backup.json); what monitoring
# makes of it is in health.py.

class RunRecord(msgspec.Struct):
    """One backup run as the history keeps it."""

    at: datetime
    finished_at: datetime
    duration: float
    backup_id: str | None = None
    size: int | None = None
    error: str | None = None
    notified: bool = True
    """False when nobody was told (a failed attempt that was retried, a shutdown)."""


class RunHistory(msgspec.Struct):
    """Status record of one database: last success, last failure, failures so far."""

    last_success: RunRecord | None = None
    last_failure: RunRecord | None = None
    failures_total: int = 0

    @property
    def failing(self) -> bool:
        """The last run failed (and nobody has succeeded since)."""
        failure, success = self.last_failure, self.last_success
        return failure is not None and (success is None or failure.at > success.at)


# The records of an archived cluster (wal/<cluster>/identity.json, push-failures.json).


@dataclasses.dataclass(frozen=True)
class Identity:
    """The database system whose WAL a cluster name holds."""

    system_identifier: str
    wal_segment_size: int


@dataclasses.dataclass(frozen=True)
class PushFailures:
    """Failed pushes so far and the last one, as wal-push recorded them."""

    total: int = 0
    last_at: datetime | None = None
    last_wal: str | None = None
    last_error: str | None = None
