"""Plain data shared by every layer: backup ids, artifacts, facts and manifests."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FORMAT = 1


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


class StageSpec(BaseModel):
    """One encoding applied to an artifact, recorded so restore never depends on config."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    level: int | None = None
    threads: int | None = None


class Artifact(BaseModel):
    """One stored object of a backup: its key, stored size and sha256, and how it was encoded."""

    model_config = ConfigDict(frozen=True)

    name: str
    key: str
    size: int
    sha256: str
    raw_size: int
    stages: list[StageSpec] = Field(default_factory=list)
    format: str = ""


class TableFacts(BaseModel):
    """What was true of one table in the backup's snapshot."""

    model_config = ConfigDict(frozen=True)

    schema_name: str
    name: str
    rows: int


class Facts(BaseModel):
    """Facts captured in the same snapshot as the dump, for later verification."""

    server_version: str = ""
    server_version_num: int = 0
    database_size: int = 0
    encoding: str = ""
    extensions: dict[str, str] = Field(default_factory=dict)
    tables: list[TableFacts] = Field(default_factory=list)
    snapshot: str | None = None


class Pin(BaseModel):
    """Why a backup must never be pruned."""

    reason: str
    at: datetime


class Manifest(BaseModel):
    """The commit record of one backup; its existence is what makes the backup exist."""

    format: int = MANIFEST_FORMAT
    id: str
    kind: str = "logical"
    database: str
    started_at: datetime
    finished_at: datetime
    pgvault_version: str
    tool_versions: dict[str, str] = Field(default_factory=dict)
    artifacts: list[Artifact]
    facts: Facts = Field(default_factory=Facts)
    warnings: list[str] = Field(default_factory=list)
    pin: Pin | None = None

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
