"""A lock object in the repository, so two writers of one database never collide.

The lock knows its protocol (create, take over a stale one, release only our own), not
where it lives: callers pass the key (``catalog.lock_key``), and the name their messages
give it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pgvault.errors import AlreadyExists, LockHeld, NotFound
from pgvault.storage.base import Storage


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(holder: dict[str, object], stale_after: timedelta, now: datetime) -> bool:
    """Dead process on this host, or older than ``stale_after`` anywhere."""
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if isinstance(pid, int) and not _pid_alive(pid):
            return True
    try:
        since = datetime.fromisoformat(str(holder.get("since")))
    except ValueError:
        return True
    return now - since > stale_after


def holder(storage: Storage, key: str, *, stale_after: timedelta) -> dict[str, object] | None:
    """Who holds the lock at ``key`` now (host, pid, operation, since); None if nobody."""
    try:
        current = json.loads(storage.read_bytes(key))
    except (NotFound, ValueError):
        return None
    if not isinstance(current, dict) or _is_stale(current, stale_after, datetime.now(UTC)):
        return None
    return current


@dataclass(frozen=True)
class Lock:
    """A lock this process took: its key and the token that proves it is ours."""

    key: str
    token: str


def acquire(
    storage: Storage, key: str, operation: str, *, stale_after: timedelta,
    name: str | None = None,
) -> Lock:
    """Take the lock at ``key`` (a stale one is taken over); LockHeld names the holder.

    ``name``: the database (or cluster) the lock guards, as its messages say it.
    """
    what = f"database {name!r}" if name is not None else key
    token = secrets.token_hex(8)
    now = datetime.now(UTC)
    body = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "operation": operation,
        "since": now.isoformat(),
        "token": token,
    }
    data = json.dumps(body).encode()
    for attempt in range(2):
        try:
            storage.create(key, data)
            return Lock(key, token)
        except AlreadyExists:
            try:
                holder = json.loads(storage.read_bytes(key))
            except NotFound:
                continue
            except ValueError:
                holder = {}
            if attempt == 0 and _is_stale(holder, stale_after, now):
                storage.delete([key])
                continue
            raise LockHeld(
                f"{what} is locked by {holder.get('operation', '?')} "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"since {holder.get('since', '?')}); if that process is gone, "
                f"remove {storage.url}/{key}"
            ) from None
    raise LockHeld(f"{what}: its lock keeps changing hands; try again")


def release(storage: Storage, lock: Lock) -> None:
    """Remove the lock if it is still ours (best effort: a stale lock is taken over anyway)."""
    with contextlib.suppress(Exception):
        current = json.loads(storage.read_bytes(lock.key))
        if current.get("token") == lock.token:
            storage.delete([lock.key])


@contextlib.contextmanager
def hold(
    storage: Storage, key: str, operation: str, *, stale_after: timedelta,
    name: str | None = None,
) -> Iterator[None]:
    """Hold the lock at ``key`` for the block; LockHeld names the holder (see ``acquire``)."""
    lock = acquire(storage, key, operation, stale_after=stale_after, name=name)
    try:
        yield
    finally:
        release(storage, lock)
