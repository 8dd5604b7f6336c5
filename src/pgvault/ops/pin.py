"""Pin and unpin: mark a backup that prune must never remove, with the reason why."""

from __future__ import annotations

from datetime import datetime

import msgspec

from pgvault.catalog import Catalog
from pgvault.errors import UsageError
from pgvault.model import Manifest, Pin
from pgvault.storage.base import Storage


def pin(
    storage: Storage, ref: str, *, reason: str, now: datetime, database: str | None = None
) -> Manifest:
    """Pin the backup ``ref`` names (id, id prefix or 'latest'); returns the updated manifest."""
    if not reason.strip():
        raise UsageError("a pin needs a reason, e.g. --reason 'before migration 42'")
    catalog = Catalog(storage)
    manifest = catalog.get(ref, database)
    pinned = msgspec.structs.replace(manifest, pin=Pin(reason=reason.strip(), at=now))
    catalog.update(pinned)
    return pinned


def unpin(
    storage: Storage, ref: str, *, database: str | None = None
) -> tuple[Manifest, Pin | None]:
    """Clear the pin of ``ref``; returns the updated manifest and the pin removed (or None)."""
    catalog = Catalog(storage)
    manifest = catalog.get(ref, database)
    if manifest.pin is None:
        return manifest, None
    unpinned = msgspec.structs.replace(manifest, pin=None)
    catalog.update(unpinned)
    return unpinned, manifest.pin
