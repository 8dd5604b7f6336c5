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


# What monitoring reports about a database, read from the repository (ops.status reads it,
# metrics and the CLI show it): values, so the layers below ops can hold and print them.

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


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


@dataclasses.dataclass
class TimelineRange:
    """The archived segments of one timeline: first, last, and the holes between."""

    timeline: int
    first: str
    last: str
    segments: int
    # (first missing, last missing)
    gaps: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ArchiveStatus:
    """What the archive of one cluster holds and which points in time it can restore to."""

    cluster: str
    identity: Identity | None
    timelines: list[TimelineRange]
    files: int
    stored_bytes: int
    last_wal: str | None
    last_archived_at: datetime | None
    earliest_restore: datetime | None  # the oldest restorable base backup's end
    latest_restore: datetime | None  # when the newest segment of an unbroken chain was stored
    failures: PushFailures = dataclasses.field(default_factory=PushFailures)

    @property
    def failing(self) -> bool:
        """The last push failed, and no segment was archived since."""
        last = self.failures.last_at
        return last is not None and (self.last_archived_at is None
                                     or last > self.last_archived_at)

    @property
    def gaps(self) -> list[tuple[str, str]]:
        return [gap for line in self.timelines for gap in line.gaps]


@dataclasses.dataclass(frozen=True)
class Drill:
    """The newest restore drill of a database, as monitoring sees it."""

    backup_id: str
    level: str
    started_at: datetime
    finished_at: datetime
    passed: bool
    restore_seconds: float | None
    failures: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AutomatedBackups:
    """A managed database's own automated backups, as its provider's API reports them."""

    provider: str  # "rds" or "aurora"
    source_id: str  # the DB instance or DB cluster identifier
    status: str = ""  # the instance's or cluster's status: "available", "stopped", ...
    retention_days: int = 0  # 0: automated backups are off
    latest_restorable: datetime | None = None  # the provider's own recovery point
    expected_retention_days: int = 0  # what pgvault's retention policy asks of them
    error: str | None = None  # why the provider could not be asked (nothing else is known)

    def problems(self, now: datetime, rpo_hours: float) -> list[str]:
        """What is wrong with them, each as one warning line (none: all is well)."""
        what = f"{self.provider} {self.source_id}: automated backups"
        if self.error is not None:
            return [f"{what} could not be audited: {self.error}"]
        if self.retention_days <= 0:
            return [f"{what} are off (backup retention period 0 days)"]
        found = []
        if self.retention_days < self.expected_retention_days:
            found.append(f"{what} are kept {self.retention_days} days, shorter than the "
                         f"{self.expected_retention_days} days the policy asks")
        if self.status == "stopped":
            what_stops = "cluster" if self.provider == "aurora" else "instance"
            found.append(f"{what} do not run: the {what_stops} is stopped")
        if self.latest_restorable is None:
            found.append(f"{what}: no latest restorable time yet")
        elif now - self.latest_restorable > timedelta(hours=rpo_hours):
            found.append(f"{what}: latest restorable time is "
                         f"{_hours(now - self.latest_restorable)} old (RPO {rpo_hours:g}h)")
        return found

    def to_json(self, now: datetime) -> dict[str, Any]:
        latest = self.latest_restorable
        return {"provider": self.provider, "source_id": self.source_id, "status": self.status,
                "retention_days": self.retention_days,
                "expected_retention_days": self.expected_retention_days,
                "latest_restorable_time": latest.isoformat() if latest else None,
                "latest_restorable_age_seconds": None if latest is None
                else round((now - latest).total_seconds(), 3),
                "error": self.error}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """OK (0), WARNING (1), CRITICAL (2) or UNKNOWN (3), with the reasons for it."""

    state: int
    reasons: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return STATE_NAMES[self.state]


@dataclasses.dataclass(frozen=True)
class DatabaseStatus:
    """Everything monitoring reports about one database, at the time it was read."""

    database: str
    repository: str
    rpo_hours: float
    rto_minutes: float
    backups: int = 0
    newest: Manifest | None = None
    oldest_time: datetime | None = None
    history: RunHistory = dataclasses.field(default_factory=RunHistory)
    drill: Drill | None = None
    drill_last_success: datetime | None = None
    """When the newest passing drill finished."""
    running: dict[str, object] | None = None
    """The lock holder when a backup or prune of this database runs now."""
    archive: ArchiveStatus | None = None
    """The WAL archive, for a physical cluster: the newest point it can restore to."""
    archive_stale_after: timedelta | None = None
    """WARNING when the newest archived WAL segment is older than this."""
    bad: tuple[tuple[str, str], ...] = ()
    """(backup id, why) of every backup that cannot be trusted: a damaged manifest, or a
    last drill that failed integrity. None of them is ``newest`` or counts in ``backups``."""
    damaged_records: tuple[str, ...] = ()
    """Drill and status records that cannot be read (what they said is lost)."""
    snapshots: int = 0
    """Provider snapshots (kind "snapshot") recorded for this database; not in ``backups``."""
    newest_snapshot: Manifest | None = None
    automated: AutomatedBackups | None = None
    """The provider's own automated backups, when [snapshot] names a managed database."""

    def age(self, now: datetime) -> timedelta | None:
        """How old the newest recovery point is: the newest backup's snapshot, or, with a
        gap-free WAL archive, the newest archived segment."""
        points = [m.started_at for m in (self.newest, self.newest_snapshot) if m is not None]
        if not points:
            return None
        point = max(points)
        if self.archive is not None and self.archive.latest_restore is not None:
            point = max(point, self.archive.latest_restore)
        return now - point

    def rto_met(self) -> bool | None:
        """Whether the last drill's restore fitted the RTO objective; None if unknown."""
        if self.drill is None or self.drill.restore_seconds is None:
            return None
        return self.drill.restore_seconds <= self.rto_minutes * 60

    def verdict(self, now: datetime, *, warn_age_hours: float = 0.0,
                warn_drill_age_days: float = 0.0) -> Verdict:
        """CRITICAL past the RPO or after a failed/slow drill; WARNING on softer signs."""
        critical: list[str] = []
        warning: list[str] = []
        age = self.age(now)
        rpo = timedelta(hours=self.rpo_hours)
        if age is None:
            critical.append("no complete backup" if not self.bad else
                            "no backup that can be trusted")
        elif age > rpo:
            text = f"newest backup is {_hours(age)} old (RPO {self.rpo_hours:g}h)"
            if self.catching_up(rpo):
                warning.append(text + ", a backup is running")
            else:
                critical.append(text)
        elif warn_age_hours and age > timedelta(hours=warn_age_hours):
            warning.append(f"newest backup is {_hours(age)} old (warning at "
                           f"{warn_age_hours:g}h)")
        archived = self.archive.last_archived_at if self.archive is not None else None
        if self.archive_stale_after and archived is not None and \
                now - archived > self.archive_stale_after:
            warning.append(f"WAL archive is stale: the newest segment was archived "
                           f"{_hours(now - archived)} ago")
        if self.archive is not None and self.archive.failing:
            failed = self.archive.failures
            warning.append(f"wal-push of {failed.last_wal} failed at "
                           f"{failed.last_at:%Y-%m-%d %H:%M}Z: {failed.last_error}")
        if self.archive is not None and self.archive.gaps:
            first, last = self.archive.gaps[0]
            warning.append(f"WAL archive has {len(self.archive.gaps)} gap(s), first "
                           f"{first}..{last}: point-in-time recovery cannot cross them")
        snapshot = self.newest_snapshot
        if snapshot is not None and now - snapshot.started_at > rpo and age is not None \
                and age <= rpo:
            warning.append(f"newest provider snapshot is {_hours(now - snapshot.started_at)} "
                           f"old (RPO {self.rpo_hours:g}h)")
        if self.automated is not None:
            warning += self.automated.problems(now, self.rpo_hours)
        if self.history.failing and self.history.last_failure is not None:
            failure = self.history.last_failure
            warning.append(f"last backup failed at {failure.at:%Y-%m-%d %H:%M}Z: "
                           f"{failure.error or 'unknown error'}")
        if self.drill is None:
            if warn_drill_age_days:
                warning.append("never restore-drilled (pgvault verify)")
        else:
            if not self.drill.passed:
                what = "; ".join(self.drill.failures) or "a check failed"
                critical.append(f"last restore drill failed: {what}")
            elif self.rto_met() is False:
                critical.append(f"last restore drill took {_minutes(self.drill.restore_seconds)}"
                                f" (RTO {self.rto_minutes:g}m)")
            drill_age = now - self.drill.finished_at
            if warn_drill_age_days and drill_age > timedelta(days=warn_drill_age_days):
                warning.append(f"last restore drill is {drill_age.days} days old")
        if self.bad:
            # The good ones still meet the objectives (else the age says CRITICAL above),
            # but a damaged backup is a sign that the repository is losing bytes.
            shown = "; ".join(f"{backup_id}: {why}" for backup_id, why in self.bad[:3])
            more = f" and {len(self.bad) - 3} more" if len(self.bad) > 3 else ""
            # First among the warnings: the one sign the repository itself is failing.
            warning[:0] = [f"{plural(len(self.bad), 'backup')} cannot be trusted "
                           f"({shown}{more})", *self.damaged_records]
        else:
            warning[:0] = self.damaged_records
        if critical:
            return Verdict(CRITICAL, tuple(critical + warning))
        return Verdict(WARNING, tuple(warning)) if warning else Verdict(OK)

    def catching_up(self, rpo: timedelta) -> bool:
        """A backup runs now that started before the objective was missed."""
        if self.running is None or self.running.get("operation") != "backup":
            return False
        try:
            since = datetime.fromisoformat(str(self.running.get("since")))
        except ValueError:
            return False
        return self.newest is not None and since <= self.newest.started_at + rpo

    def to_json(self, now: datetime) -> dict[str, Any]:
        """The form `pgvault status --json` and the daemon's /status print."""
        age = self.age(now)
        newest = self.newest
        drill = self.drill
        return {
            "database": self.database,
            "repository": self.repository,
            "objectives": {"rpo_hours": self.rpo_hours, "rto_minutes": self.rto_minutes},
            "backups": self.backups,
            "newest": None if newest is None else {
                "id": newest.id,
                "started_at": newest.started_at.isoformat(),
                "finished_at": newest.finished_at.isoformat(),
                "size": newest.size,
                "duration_seconds": (newest.finished_at - newest.started_at).total_seconds(),
            },
            "age_seconds": None if age is None else round(age.total_seconds(), 3),
            "rpo_met": None if age is None else age <= timedelta(hours=self.rpo_hours),
            "oldest_at": self.oldest_time.isoformat() if self.oldest_time else None,
            "last_failure": None if self.history.last_failure is None
            else to_dict(self.history.last_failure),
            "failing": self.history.failing,
            "failures_total": self.history.failures_total,
            "last_drill": None if drill is None else {
                "backup_id": drill.backup_id,
                "level": drill.level,
                "finished_at": drill.finished_at.isoformat(),
                "passed": drill.passed,
                "restore_seconds": drill.restore_seconds,
                "failures": list(drill.failures),
            },
            "rto_met": self.rto_met(),
            "running": self.running,
            "archive": None if self.archive is None else _archive_json(self.archive),
            "bad": [{"id": backup_id, "reason": why} for backup_id, why in self.bad],
            "damaged_records": list(self.damaged_records),
            **({"snapshots": self.snapshots, "newest_snapshot": _snapshot_json(
                self.newest_snapshot, now)} if self.newest_snapshot is not None else {}),
            **({"automated_backups": self.automated.to_json(now)}
               if self.automated is not None else {}),
        }


def _snapshot_json(manifest: Manifest, now: datetime) -> dict[str, Any]:
    facts = manifest.snapshot
    return {"id": manifest.id, "started_at": manifest.started_at.isoformat(),
            "finished_at": manifest.finished_at.isoformat(),
            "age_seconds": round((now - manifest.started_at).total_seconds(), 3),
            **({} if isinstance(facts, UnsetType) else
               {"provider": facts.provider, "region": facts.region,
                "snapshot_id": facts.snapshot_id, "source_id": facts.source_id,
                "engine_version": facts.engine_version, "size_gb": facts.size_gb})}


def _archive_json(archive: ArchiveStatus) -> dict[str, Any]:
    def when(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment else None

    return {"last_wal": archive.last_wal, "last_archived_at": when(archive.last_archived_at),
            "files": archive.files, "stored_bytes": archive.stored_bytes,
            "gaps": [list(gap) for gap in archive.gaps],
            "recoverable_from": when(archive.earliest_restore),
            "recoverable_to": when(archive.latest_restore),
            "push_failures_total": archive.failures.total,
            "last_push_failure": None if archive.failures.last_at is None else {
                "at": when(archive.failures.last_at), "wal": archive.failures.last_wal,
                "error": archive.failures.last_error},
            "failing": archive.failing}


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f}h"


def _minutes(seconds: float | None) -> str:
    return f"{(seconds or 0) / 60:.1f}m"
