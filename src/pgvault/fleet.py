"""Fleet mode's decisions, pure: which shard owns a database, which window it is, when a
database is due, what to do with the lease found, how long to back off.

Everything here is a function of (now, the lease record found, the [fleet] settings), as
``retention.py`` is of (backups, policy): the shard loop (ops/fleet.py) reads the
repository, asks, and writes what it was told. No clock is read and nothing is stored.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------- shards

@dataclass(frozen=True)
class Shard:
    """Worker ``index`` of ``count`` (0-based, as a Kubernetes Indexed Job numbers them)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: the index must be in "
                             f"0..{self.count - 1}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``I/N`` (e.g. 0/4); ValueError names what is wrong."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"shard {text!r}: expected I/N, e.g. 0/4 (worker 0 of 4)")
    return Shard(int(match[1]), int(match[2]))


def shard_from_environ(environ: Mapping[str, str]) -> Shard | None:
    """The shard of a Kubernetes Indexed Job's pod: JOB_COMPLETION_INDEX of JOB_COMPLETIONS
    (the Job's ``completions``, which the chart passes down); None outside such a pod."""
    index = environ.get("JOB_COMPLETION_INDEX")
    if index is None:
        return None
    count = environ.get("JOB_COMPLETIONS")
    if count is None:
        raise ValueError("JOB_COMPLETION_INDEX is set but JOB_COMPLETIONS is not: set it to "
                         "the Job's completions (the chart does)")
    return parse_shard(f"{index}/{count}")


def _score(name: str, index: int) -> int:
    digest = hashlib.blake2b(f"{index}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(name: str, count: int) -> int:
    """The shard of ``name`` among ``count``: rendezvous hashing, so going from N to N+1
    shards moves only the databases the new shard wins (about 1/(N+1) of them)."""
    return max(range(count), key=lambda index: _score(name, index))


def in_shard(name: str, shard: Shard) -> bool:
    return owner(name, shard.count) == shard.index


# ---------------------------------------------------------------- windows

@dataclass(frozen=True)
class Window:
    """One backup window: every database is backed up once in [start, end)."""

    index: int
    start: datetime
    end: datetime


def window_at(now: datetime, length: timedelta) -> Window:
    """The window ``now`` falls in; windows are aligned on the epoch (24 h: UTC days)."""
    index = int((now - EPOCH) // length)
    start = EPOCH + index * length
    return Window(index, start, start + length)


def start_offset(name: str, window: Window, jitter: timedelta) -> timedelta:
    """How far into ``window`` the database starts: spread evenly over [0, jitter), a new
    draw each window, the same in every worker (no worker has to agree with another)."""
    if jitter <= timedelta(0):
        return timedelta(0)
    digest = hashlib.blake2b(f"{window.index}\0{name}".encode(), digest_size=8).digest()
    return jitter * (int.from_bytes(digest, "big") / 2**64)


def backoff(attempts: int, base: timedelta, cap: timedelta) -> timedelta:
    """The wait after the ``attempts``-th failure in a row: base, doubled each time, capped."""
    if attempts <= 0:
        return timedelta(0)
    wait: timedelta = min(cap, base * 2 ** min(attempts - 1, 32))
    return wait


# ---------------------------------------------------------------- leases

State = Literal["running", "done", "failed", "free"]


class LeaseRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """What a lease object says: the database's latest window and who works on it."""

    state: State
    window: int = -1
    holder: str = ""
    """Who wrote it: "host pid token"."""
    expires: datetime | None = None
    """A running lease not renewed by then is taken over."""
    attempts: int = 0
    """Failures in a row (kept across windows, so a broken database is not hammered)."""
    retry_after: datetime | None = None
    backup_id: str | None = None
    error: str | None = None
    updated: datetime | None = None
    shard: str = ""
    """The shard (I/N) of the worker that wrote it: fleet status groups by its N."""
    done_window: int = -1
    """The latest window with a backup (kept while later windows run or fail), so status
    can tell a database that missed a window from one whose next backup is under way."""
    jobs: dict[str, str] = msgspec.field(default_factory=dict)
    """What followed the window's backup under the lease: "drill", "copy:<repo>",
    "prune" -> "ok" or the error line."""

    def last_done(self) -> int:
        """``done_window``, or for a record older than that field, its done window."""
        if self.done_window >= 0:
            return self.done_window
        return self.window if self.state == "done" else -1


def encode(record: LeaseRecord) -> bytes:
    return msgspec.json.encode(record)


def decode(data: bytes) -> LeaseRecord | None:
    """A lease object's record; None for one that cannot be read (it is overwritten)."""
    try:
        return msgspec.json.decode(data, type=LeaseRecord)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def expired(record: LeaseRecord, now: datetime) -> bool:
    return record.expires is None or now >= record.expires


@dataclass(frozen=True)
class Decision:
    """What to do with one database now.

    ``take``: claim its lease (``reason`` says why) and back it up; else wait until ``at``
    ("wait"), or leave it ("done": this window has its backup).
    """

    action: Literal["take", "wait", "done"]
    reason: str
    at: datetime | None = None


@dataclass(frozen=True)
class Timing:
    """The [fleet] settings that decide when, as durations."""

    window: timedelta
    jitter: timedelta = timedelta(0)
    lease: timedelta = timedelta(minutes=2)
    backoff: timedelta = timedelta(minutes=1)
    backoff_max: timedelta = timedelta(hours=1)


def decide(name: str, record: LeaseRecord | None, now: datetime, timing: Timing) -> Decision:
    """Whether this worker backs ``name`` up now, given the lease record it just read.

    One backup per window follows from the record alone: a window marked done is never
    taken again, and a running lease is taken only once it expired. A database that
    missed windows (an outage) is simply due in the current one: one catch-up run, not one
    per missed window.
    """
    window = window_at(now, timing.window)
    due = window.start + start_offset(name, window, timing.jitter)
    if record is not None and record.state == "running" and not expired(record, now):
        return Decision("wait", "held by " + record.holder, record.expires)
    if record is not None and record.window >= window.index and record.state == "done":
        return Decision("done", f"window {window.index} done: {record.backup_id}")
    if now < due:
        return Decision("wait", "jitter", due)
    if record is None:
        return Decision("take", "first backup")
    if record.retry_after is not None and now < record.retry_after:
        return Decision("wait", f"backing off after {record.attempts} failure(s)",
                        record.retry_after)
    if record.state == "running":
        return Decision("take", f"lease of {record.holder} expired")
    if record.state == "failed":
        return Decision("take", f"retry after {record.attempts} failure(s)")
    return Decision("take", "due")


def running(holder: str, window: Window, now: datetime, timing: Timing,
            before: LeaseRecord | None, shard: str = "") -> LeaseRecord:
    """The record a worker claims a database's lease with."""
    return LeaseRecord(state="running", window=window.index, holder=holder,
                       expires=now + timing.lease,
                       attempts=before.attempts if before else 0, updated=now, shard=shard,
                       done_window=before.last_done() if before else -1,
                       backup_id=before.backup_id if before else None)


def finished(claimed: LeaseRecord, now: datetime, backup_id: str,
             jobs: Mapping[str, str] | None = None) -> LeaseRecord:
    return msgspec.structs.replace(claimed, state="done", expires=None, attempts=0,
                                   retry_after=None, backup_id=backup_id, error=None,
                                   updated=now, done_window=claimed.window,
                                   jobs=dict(jobs or {}))


def failed(claimed: LeaseRecord, now: datetime, error: str, timing: Timing) -> LeaseRecord:
    attempts = claimed.attempts + 1
    return msgspec.structs.replace(
        claimed, state="failed", expires=None, attempts=attempts,
        retry_after=now + backoff(attempts, timing.backoff, timing.backoff_max),
        backup_id=None, error=error[:500], updated=now)


def slot_free(record: LeaseRecord | None, now: datetime) -> bool:
    """A cap's slot is free when nobody holds it, or its holder stopped renewing it."""
    return record is None or record.state != "running" or expired(record, now)


# ---------------------------------------------------------------- fleet status

Standing = Literal["done", "due", "failing", "running", "missed"]


@dataclass(frozen=True)
class WindowState:
    """Where one database stands in the current window, judged from its lease record.

    ``done``: it has the current window's backup. ``due``, ``running``, ``failing``: not
    yet, but the previous window had one (its start is still to come, a worker has it, or
    its last attempt failed and is retried). ``missed``: the last complete window ended
    without a backup; ``reason`` says why (never started, failed with its last error, its
    lease lost by a worker that stopped renewing, or still running).
    """

    database: str
    shard: int
    standing: Standing
    reason: str
    backup_id: str | None = None
    problems: tuple[str, ...] = ()
    """Follow-up jobs of its latest window that failed ("copy:offsite: ...")."""


def standing(name: str, record: LeaseRecord | None, now: datetime, timing: Timing,
             shards: int) -> WindowState:
    """The ``WindowState`` of ``name`` at ``now`` (see there); ``shards`` is the N whose
    owner is reported."""
    window = window_at(now, timing.window)
    shard = owner(name, shards)
    if record is None:
        return WindowState(name, shard, "missed", "never started: no worker has taken it yet")
    done = record.last_done()
    problems = tuple(f"{job}: {outcome}" for job, outcome in sorted(record.jobs.items())
                     if outcome != "ok")
    live = record.state == "running" and not expired(record, now)
    if done >= window.index:
        return WindowState(name, shard, "done", f"backup {record.backup_id}",
                           record.backup_id, problems)
    since = record.updated.isoformat(timespec="seconds") if record.updated else "?"
    if live:
        reason = f"still running: {record.holder} (shard {record.shard or '?'}) since {since}"
    elif record.state == "running":
        reason = (f"lease lost: {record.holder} (shard {record.shard or '?'}) stopped "
                  f"renewing it at {since}, and no worker has taken it over since")
    elif record.state == "failed":
        reason = f"failed {record.attempts} time(s), last at {since}: {record.error}"
    else:
        reason = ("never started in the window" + (f" (last backup {record.backup_id}, "
                                                    f"window {done})" if done >= 0 else ""))
    if done == window.index - 1:
        due = window.start + start_offset(name, window, timing.jitter)
        if live:
            return WindowState(name, shard, "running", reason, record.backup_id, problems)
        if record.state == "failed" and record.window == window.index:
            return WindowState(name, shard, "failing", reason, record.backup_id, problems)
        when = "due at " + due.isoformat(timespec="seconds") if now < due else "due now"
        return WindowState(name, shard, "due", when, record.backup_id, problems)
    return WindowState(name, shard, "missed", reason, record.backup_id, problems)
