"""Retention planning for one database: restic's calendar-bucket rules as a pure function.

Each count rule walks the backups newest first and keeps the newest backup of each bucket
(position, calendar day, ISO week, calendar month, year) until its count is used up; rules
combine by union. No I/O and no clock: everything is relative to the newest good backup.

A backup known bad (``bad`` names why: its drill failed integrity, say) is not a backup for
retention: it fills no rule's slot, is never "the newest", and is removed unless pinned,
so a damaged newest backup can never push the last restorable one out. Only when no good
backup exists at all are the bad ones kept: they are all that is left to salvage from.

A backup may depend on another (``parent``: an incremental base backup patches its
parent's restore). Every backup a kept one depends on is kept ("parent of ..."), whatever
the rules say of it; a backup whose parent is known bad or missing is itself known bad.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Final, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pgvault.errors import ConfigError

__all__ = [
    "NO_RULE",
    "SALVAGE",
    "UNLIMITED",
    "BackupLike",
    "Caution",
    "Duration",
    "Plan",
    "Policy",
    "caution",
    "describe",
    "earliest_removal",
    "hold_after_write",
    "plan",
]

UNLIMITED: Final = -1
"""A rule count meaning "no limit" (restic's -1); configuration spells it "unlimited"."""

_COUNT_KEYS: Final = ("last", "daily", "weekly", "monthly", "yearly")
_CONFIG_KEYS: Final = (*(f"keep_{name}" for name in _COUNT_KEYS), "keep_within", "timezone")
_DURATION_RE: Final = re.compile(
    r"(?:([0-9]+)y)?(?:([0-9]+)m)?(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?"
)
_UNITS: Final = ("y", "m", "w", "d", "h")


class BackupLike(Protocol):
    """What the planner reads from a backup; `pinned` (bool), `bad` (why it cannot be
    trusted, or None) and `parent` (the id of the backup it depends on, or None) are
    optional and read with getattr."""

    @property
    def id(self) -> str: ...

    @property
    def time(self) -> datetime: ...


@dataclass(frozen=True)
class Candidate:
    """A backup as the planner sees it, for callers whose own records are not BackupLike
    (prune reads the drills beside the manifests, copy plans for another repository)."""

    id: str
    time: datetime
    pinned: bool = False
    bad: str | None = None
    parent: str | None = None


@dataclass(frozen=True)
class Duration:
    """A keep_within span: calendar years, months, weeks and days, then exact hours."""

    years: int = 0
    months: int = 0
    weeks: int = 0
    days: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Duration.{f.name} must be a non-negative int, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse "30d", "12h", "2w", "1y6m": units y, m (months), w, d, h, once each, in order."""
        match = _DURATION_RE.fullmatch(text.strip())
        if not text.strip() or match is None:
            raise ValueError(
                f"invalid duration {text!r}: expected e.g. 30d, 12h, 2w or 1y6m "
                "(units y=years, m=months, w=weeks, d=days, h=hours, in that order)"
            )
        return cls(*(int(group) if group else 0 for group in match.groups()))

    def is_zero(self) -> bool:
        """True when the span is empty."""
        return not any(getattr(self, f.name) for f in fields(self))

    def before(self, moment: datetime, zone: tzinfo) -> datetime:
        """The instant this span before `moment`, calendar units counted on `zone`'s wall clock."""
        local = moment.astimezone(zone)
        try:
            # Months are calendar months with the day clamped (Mar 31 - 1m = Feb 28), so "1m"
            # never reaches into a third month the way naive normalisation would.
            month_index = local.year * 12 + (local.month - 1) - (self.years * 12 + self.months)
            year, month = divmod(month_index, 12)
            day = min(local.day, calendar.monthrange(year, month + 1)[1])
            # Aware arithmetic within one tzinfo is wall-clock arithmetic: "1d" across a DST
            # change is 23 or 25 hours, keeping the cutoff at the same local time of day.
            shifted = local.replace(year=year, month=month + 1, day=day)
            shifted -= timedelta(weeks=self.weeks, days=self.days)
            return shifted.astimezone(UTC) - timedelta(hours=self.hours)
        except (OverflowError, ValueError):
            # A span longer than the calendar reaches before every representable backup.
            return datetime.min.replace(tzinfo=UTC)

    def after(self, moment: datetime, zone: tzinfo) -> datetime:
        """The instant this span after `moment`, counted as ``before`` counts it."""
        local = moment.astimezone(zone)
        try:
            month_index = local.year * 12 + (local.month - 1) + (self.years * 12 + self.months)
            year, month = divmod(month_index, 12)
            day = min(local.day, calendar.monthrange(year, month + 1)[1])
            shifted = local.replace(year=year, month=month + 1, day=day)
            shifted += timedelta(weeks=self.weeks, days=self.days)
            return shifted.astimezone(UTC) + timedelta(hours=self.hours)
        except (OverflowError, ValueError):
            return datetime.max.replace(tzinfo=UTC)

    def __str__(self) -> str:
        values = (self.years, self.months, self.weeks, self.days, self.hours)
        return "".join(f"{v}{u}" for v, u in zip(values, _UNITS, strict=True) if v) or "0h"


@dataclass(frozen=True)
class Policy:
    """Counts per rule (0 = off, UNLIMITED = no limit), keep_within span and calendar zone."""

    daily: int = 7
    weekly: int = 4
    monthly: int = 3
    last: int = 0
    yearly: int = 0
    within: Duration | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        for name in _COUNT_KEYS:
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < UNLIMITED:
                raise ConfigError(
                    f"keep_{name}: must be a non-negative integer or UNLIMITED, got {count!r}"
                )
        if self.within is not None:
            if not isinstance(self.within, Duration):
                raise ConfigError(f"keep_within: must be a Duration, got {self.within!r}")
            if self.within.is_zero():
                raise ConfigError("keep_within: must be longer than zero (omit it to switch off)")
        _zone(self.timezone)
        if self.within is None and all(getattr(self, name) == 0 for name in _COUNT_KEYS):
            raise ConfigError(
                "retention policy keeps nothing: set one of "
                + ", ".join(_CONFIG_KEYS[:-1])
                + " above zero"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> Policy:
        """Build a policy from config keys keep_last..keep_yearly, keep_within, timezone."""
        unknown = sorted(set(values) - set(_CONFIG_KEYS))
        if unknown:
            # A typo such as keep_dialy would otherwise silently fall back to the default.
            raise ConfigError(
                f"{unknown[0]}: unknown retention setting (known: {', '.join(_CONFIG_KEYS)})"
            )
        counts = {
            name: _parse_count(f"keep_{name}", values[f"keep_{name}"])
            for name in _COUNT_KEYS
            if f"keep_{name}" in values
        }
        within = values.get("keep_within")
        if within is not None:
            if not isinstance(within, str):
                raise ConfigError(
                    f"keep_within: must be a duration string like 30d, got {within!r}"
                )
            try:
                parsed: Duration | None = Duration.parse(within)
            except ValueError as exc:
                raise ConfigError(f"keep_within: {exc}") from None
        else:
            parsed = None
        timezone = values.get("timezone", "UTC")
        if not isinstance(timezone, str):
            raise ConfigError(f"timezone: must be an IANA time zone name, got {timezone!r}")
        return cls(**counts, within=parsed, timezone=timezone)


NO_RULE: Final = "no rule keeps it"
SALVAGE: Final = "no good backup left: kept for salvage"


@dataclass(frozen=True)
class Plan:
    """Ids to keep and to remove (newest first), why each kept one is kept (``reasons``,
    empty for a removed one) and why each removed one goes (``removed_because``)."""

    keep: list[str]
    remove: list[str]
    reasons: dict[str, list[str]]
    removed_because: dict[str, str] = field(default_factory=dict)

    def explain(self, backup_id: str) -> str:
        """One line: the rules that keep ``backup_id``, or why it is removed."""
        if self.reasons.get(backup_id):
            return ", ".join(self.reasons[backup_id])
        return self.removed_because.get(backup_id, NO_RULE)


_Bucket = Callable[[datetime, int], Hashable]
_BUCKETS: Final[dict[str, _Bucket]] = {
    # "last" gives every backup its own bucket, so it keeps the N newest.
    "last": lambda local, position: position,
    "daily": lambda local, position: local.date(),
    "weekly": lambda local, position: tuple(local.isocalendar())[:2],
    "monthly": lambda local, position: (local.year, local.month),
    "yearly": lambda local, position: local.year,
}


def plan(backups: Iterable[BackupLike], policy: Policy, now: datetime | None = None) -> Plan:
    """Split one database's complete backups into keep and remove under `policy`."""
    if now is not None:
        # Accepted for API stability only: retention is relative to the newest backup.
        _require_aware(now, "now")
    ordered = _newest_first(backups)
    if not ordered:
        return Plan(keep=[], remove=[], reasons={})
    bad = _bad_with_parents(ordered)
    good = [b for b in ordered if b.id not in bad]
    reasons: dict[str, list[str]] = {}
    removed_because: dict[str, str] = {}
    for backup in ordered:
        why_bad = bad.get(backup.id)
        if why_bad is None:
            continue
        reasons[backup.id] = ["pinned"] if bool(getattr(backup, "pinned", False)) else []
        if not good:
            reasons[backup.id].append(SALVAGE)
        removed_because[backup.id] = f"known bad: {why_bad}"
    reasons |= _rules(good, policy)
    # Newest first, so a parent kept for its child passes that on to its own parent.
    for backup in ordered:
        parent = _parent(backup)
        if reasons[backup.id] and parent is not None and parent in reasons:
            reasons[parent].append(f"parent of {backup.id}")
    keep = [b.id for b in ordered if reasons[b.id]]
    remove = [b.id for b in ordered if not reasons[b.id]]
    return Plan(keep=keep, remove=remove, reasons=reasons,
                removed_because={i: removed_because.get(i, NO_RULE) for i in remove})


def _rules(ordered: list[BackupLike], policy: Policy) -> dict[str, list[str]]:
    """Per good backup (newest first), the rules of `policy` that keep it; [] if none."""
    if not ordered:
        return {}
    zone = _zone(policy.timezone)
    within = policy.within
    cutoff = within.before(ordered[0].time, zone) if within is not None else None
    used = dict.fromkeys(_COUNT_KEYS, 0)
    previous: dict[str, Hashable] = {}
    oldest = len(ordered) - 1
    reasons: dict[str, list[str]] = {}
    for position, backup in enumerate(ordered):
        local = backup.time.astimezone(zone)
        why: list[str] = []
        for name in _COUNT_KEYS:
            limit = getattr(policy, name)
            if limit == 0 or (limit != UNLIMITED and used[name] >= limit):
                continue
            bucket = _BUCKETS[name](local, position)
            new_bucket = name not in previous or bucket != previous[name]
            # restic keeps the oldest backup while a rule has count left, even in a bucket
            # already kept, so the history reaches as far back as the counts allow.
            if new_bucket or position == oldest:
                previous[name] = bucket
                used[name] += 1
                shown = "unlimited" if limit == UNLIMITED else str(limit)
                why.append(f"{name} {used[name]}/{shown}" + ("" if new_bucket else " (oldest)"))
        if cutoff is not None and backup.time >= cutoff:
            why.append(f"within {within}")
        if position == 0:
            why.append("newest")
        if bool(getattr(backup, "pinned", False)):
            why.append("pinned")
        reasons[backup.id] = why
    return reasons


def hold_after_write(policy: Policy, written: datetime) -> datetime | None:
    """How long a backup written at `written` is surely kept, for an Object Lock date.

    A fresh backup is the newest, so it holds a slot of every rule, but a later backup of
    the same week or month takes that slot over; the day's slot lasts (one backup a day
    assumed) and so does keep_within. So: the longer of keep_daily days and keep_within,
    else the shortest coarser slot; None when only keep_last (a count) keeps anything.
    Prune extends the date of each backup that goes on to hold a longer slot.
    """
    _require_aware(written, "written")
    zone = _zone(policy.timezone)
    sure = [Duration(days=policy.daily).after(written, zone)] if policy.daily > 0 else []
    if policy.within is not None:
        sure.append(policy.within.after(written, zone))
    if sure:
        return max(sure)
    spans = [Duration(**{unit: count}) for unit, count in
             (("weeks", policy.weekly), ("months", policy.monthly), ("years", policy.yearly))
             if count > 0]
    return min((span.after(written, zone) for span in spans), default=None)


_SLOT_RE: Final = re.compile(r"(daily|weekly|monthly|yearly) ([0-9]+)/([0-9]+)")


def earliest_removal(backups: Iterable[BackupLike], policy: Policy, planned: Plan,
                     now: datetime) -> dict[str, datetime]:
    """Per kept backup of `planned`, the earliest instant a later plan may remove it.

    A backup goes only when every reason keeping it has lapsed, so its instant is the
    latest of its reasons': slot k of N of a calendar rule lapses no sooner than the start
    of the (N-k+1)th bucket after the newest good backup's (each newer bucket needs a
    backup before this one drops out), except slot 1, the newest bucket's, which a later
    backup of the same day, week or month takes at once; keep_within lapses its span
    after the backup; a pin renews the repository's write hold from `now` on each prune
    (a pin is lifted at will); a parent lasts as long as its child. "newest", keep_last
    and unlimited counts give no instant (the next backup may take the place; unlimited
    never lapses and no lock date says "forever"). A backup with no instant is absent
    from the result.
    """
    _require_aware(now, "now")
    ordered = _newest_first(backups)
    bad = _bad_with_parents(ordered)
    good = [b for b in ordered if b.id not in bad]
    if not good:
        return {}
    zone = _zone(policy.timezone)
    newest = good[0].time.astimezone(zone)
    kept = set(planned.keep)
    found: dict[str, datetime] = {}
    # Newest first: a child's instant is known before its parent's.
    for backup in ordered:
        if backup.id not in kept:
            continue
        bounds: list[datetime] = []
        for reason in planned.reasons.get(backup.id, []):
            slot = _SLOT_RE.match(reason)
            bound: datetime | None = None
            if slot is not None:
                rule, held, count = slot.group(1), int(slot.group(2)), int(slot.group(3))
                # Slot 1 is the newest bucket's: a later backup there takes it at once.
                if held > 1 or reason.endswith("(oldest)"):
                    bound = _bucket_start(newest, rule, count - held + 1, zone)
            elif reason.startswith("within ") and policy.within is not None:
                bound = policy.within.after(backup.time, zone)
            elif reason == "pinned":
                bound = hold_after_write(policy, now)
            elif reason.startswith("parent of "):
                bound = found.get(reason.removeprefix("parent of "))
            if bound is not None:
                bounds.append(bound)
        if bounds:
            found[backup.id] = max(bounds)
    return found


def _bucket_start(local: datetime, rule: str, ahead: int, zone: tzinfo) -> datetime:
    """The first instant of the `rule` bucket `ahead` buckets after the one of `local`."""
    day = local.date()
    if rule == "daily":
        start = day + timedelta(days=ahead)
    elif rule == "weekly":
        start = day - timedelta(days=day.weekday()) + timedelta(weeks=ahead)
    elif rule == "monthly":
        year, month = divmod(day.year * 12 + day.month - 1 + ahead, 12)
        start = date(year, month + 1, 1)
    else:
        start = date(day.year + ahead, 1, 1)
    return datetime.combine(start, time(), tzinfo=zone).astimezone(UTC)


def _bad(backup: BackupLike) -> str | None:
    """Why `backup` cannot be trusted (its `bad` attribute), or None for a good backup."""
    why = getattr(backup, "bad", None)
    return str(why) if why else None


def _parent(backup: BackupLike) -> str | None:
    parent = getattr(backup, "parent", None)
    return str(parent) if parent else None


def _bad_with_parents(ordered: list[BackupLike]) -> dict[str, str]:
    """Why each untrustworthy backup is so: its own `bad`, or a parent known bad or missing."""
    by_id = {b.id: b for b in ordered}
    bad: dict[str, str] = {}
    # Oldest first: a parent is older than its child, so its verdict is known first.
    for backup in reversed(ordered):
        why = _bad(backup)
        parent = _parent(backup)
        if why is None and parent is not None:
            if parent not in by_id:
                why = f"its parent {parent} is missing"
            elif parent in bad:
                why = f"its parent {parent} is known bad"
        if why is not None:
            bad[backup.id] = why
    return bad


@dataclass(frozen=True)
class Caution:
    """Why a plan must not simply be applied; ``forceable`` if prune --force may override."""

    reason: str
    forceable: bool


def caution(backups: Iterable[BackupLike], remove: Iterable[str]) -> Caution | None:
    """Whether removing ``remove`` from one database's ``backups`` needs a second look.

    Never forceable: leaving no good backup where there was one (the planner never plans
    it; this holds whatever trimmed the plan since). Forceable: removing more than half of
    the backups at once, the mark of a mistyped policy or a wrong clock, not of a routine
    prune (one or two per run); a first prune of a long history needs --force once.
    """
    items = list(backups)
    removing = set(remove) & {b.id for b in items}
    bad = _bad_with_parents(_newest_first(items))
    good = [b for b in items if b.id not in bad]
    if good and all(b.id in removing for b in good):
        return Caution(f"it would remove the last good backup ({len(good)} of "
                       f"{len(items)} backups are not known bad)", forceable=False)
    if len(removing) * 2 > len(items):
        return Caution(f"it would remove {len(removing)} of {len(items)} backups (more "
                       "than half)", forceable=True)
    return None


def describe(policy: Policy) -> str:
    """One human sentence or three saying what `policy` keeps."""
    parts: list[str] = []
    if policy.last == UNLIMITED:
        parts.append("every backup")
    elif policy.last:
        parts.append(_counted(policy.last, "the newest backup", "the {} newest backups"))
    units = (
        (policy.daily, "day", "days"),
        (policy.weekly, "ISO week", "ISO weeks"),
        (policy.monthly, "month", "months"),
        (policy.yearly, "year", "years"),
    )
    limited = [_counted(n, f"1 {one}", f"{{}} {many}") for n, one, many in units if n > 0]
    if limited:
        parts.append(f"the newest backup of each of the last {_listed(limited)} that have backups")
    unlimited = [one for n, one, _ in units if n == UNLIMITED]
    if unlimited:
        parts.append(f"the newest backup of every {_listed(unlimited, 'and every')}")
    if policy.within is not None:
        parts.append(f"every backup within {policy.within} of the newest one")
    return (
        "Keeps " + "; ".join(parts) + f". Calendar in {policy.timezone}."
        " The newest good backup and pinned backups are always kept; a backup known bad"
        " counts for nothing."
    )


def _newest_first(backups: Iterable[BackupLike]) -> list[BackupLike]:
    """Validate and sort newest first; equal times fall back to id so input order never matters."""
    items = list(backups)
    seen: set[str] = set()
    for backup in items:
        if backup.id in seen:
            raise ValueError(f"duplicate backup id {backup.id!r}")
        seen.add(backup.id)
        _require_aware(backup.time, f"backup {backup.id!r} time")
    # Sort on UTC: datetimes sharing one tzinfo compare by wall clock, which misorders the
    # repeated hour when clocks go back.
    return sorted(items, key=lambda b: (b.time.astimezone(UTC), b.id), reverse=True)


def _require_aware(moment: datetime, what: str) -> None:
    """Reject naive datetimes: a bucket needs a real instant, not a guess about the zone."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got naive {moment!r}")


def _zone(name: str) -> tzinfo:
    """Resolve an IANA zone name; UTC needs no tz database, so it works on any host."""
    if name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigError(f"timezone: unknown IANA time zone {name!r}") from None


def _parse_count(key: str, value: object) -> int:
    """A config count: a non-negative int (or its digits) or the word "unlimited"."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "unlimited":
            return UNLIMITED
        if text.isascii() and text.isdigit():
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigError(f"{key}: must be a non-negative integer or 'unlimited', got {value!r}")


def _listed(items: list[str], last_joiner: str = "and") -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last_joiner} {items[-1]}"


def _counted(count: int, one: str, many: str) -> str:
    """`one` for a count of 1, else `many` with the count filled in."""
    return one if count == 1 else many.format(count)
