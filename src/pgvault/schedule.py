"""Schedule expressions: 5-field cron, @daily-style macros, and ``@every 10m`` intervals.

Cron fields are minute, hour, day of month, month, day of week with the usual meaning
(0 and 7 are Sunday), translated for APScheduler 3, whose own weekday numbers start at
Monday. A sixth (seconds) field is refused with a message saying what to write instead.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from pgvault.errors import ConfigError

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_EVERY = re.compile(r"@every\s+((?:\d+[smhd])+)", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_APS_ORDER = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def every(expr: str) -> timedelta | None:
    """The interval of ``@every 1h30m``; None if ``expr`` is not an interval."""
    match = _EVERY.fullmatch(expr.strip())
    if match is None:
        return None
    seconds = sum(int(n) * _UNIT[u.lower()] for n, u in re.findall(r"(\d+)([smhd])",
                                                                       match[1], re.I))
    return timedelta(seconds=seconds)


def cron_fields(expr: str, what: str = "schedule") -> list[str]:
    """The five fields of a cron expression or macro; ConfigError explains what is wrong."""
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() == "@reboot":
            raise ConfigError(f"{what}: @reboot is not a schedule; set run_on_start = true")
        if text.lower() not in MACROS:
            raise ConfigError(f"{what}: unknown macro {text!r} (use {', '.join(MACROS)} "
                              "or '@every 30m')")
        text = MACROS[text.lower()]
    fields = text.split()
    if len(fields) == 6:
        raise ConfigError(
            f"{what}: {expr!r} has 6 fields; pgvault takes 5-field cron (minute hour day "
            "month weekday), e.g. '0 1 * * *' for 01:00 daily. Drop the seconds field, or "
            "use '@every 30s' for a sub-minute interval")
    if len(fields) != 5:
        raise ConfigError(f"{what}: {expr!r} has {len(fields)} fields; write 5 (minute hour "
                          "day month weekday), e.g. '0 1 * * *', or a macro such as @daily")
    if fields[2] != "*" and fields[4] != "*":
        # Vixie cron ORs these two fields, APScheduler ANDs them: refuse rather than surprise.
        raise ConfigError(f"{what}: {expr!r} restricts both day of month and weekday; "
                          "restrict only one of them")
    return fields


def _weekday(field: str, what: str) -> str:
    """A cron weekday field (0/7 = Sunday, names, ranges, steps) as APScheduler day names."""
    if field == "*":
        return "*"
    chosen: set[int] = set()
    for item in field.lower().split(","):
        spec, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if spec == "*":
                low, high = 0, 6
            elif "-" in spec:
                low, high = (_day_number(part) for part in spec.split("-", 1))
            else:
                low = _day_number(spec)
                high = 7 if step_text else low
        except ValueError:
            raise ConfigError(f"{what}: bad weekday field {field!r} (0-7 or sun-sat, "
                              "ranges, lists and steps)") from None
        if step < 1 or high < low:
            raise ConfigError(f"{what}: bad weekday field {field!r}")
        chosen.update(day % 7 for day in range(low, high + 1, step))
    return ",".join(day for day in _APS_ORDER if _DAYS.index(day) in chosen)


def _day_number(text: str) -> int:
    if text in _DAYS:
        return _DAYS.index(text)
    number = int(text)
    if not 0 <= number <= 7:
        raise ValueError(text)
    return number


def trigger(expr: str, timezone: str = "UTC", *, jitter: int = 0,
            what: str = "schedule") -> Any:
    """An APScheduler 3 trigger for ``expr``; ConfigError names ``what`` on any mistake."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"schedule.timezone: unknown time zone {timezone!r} (an IANA "
                          "name such as 'UTC' or 'Europe/Berlin')") from None
    interval = every(expr)
    if interval is not None:
        if interval <= timedelta(0):
            raise ConfigError(f"{what}: {expr!r} is not a positive interval")
        return IntervalTrigger(seconds=int(interval.total_seconds()), timezone=zone,
                               jitter=jitter or None)
    minute, hour, day, month, weekday = cron_fields(expr, what)
    try:
        return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_weekday(weekday, what), timezone=zone,
                           jitter=jitter or None)
    except ValueError as exc:
        raise ConfigError(f"{what}: {expr!r} is not a valid cron expression: {exc}") from None


def due(expr: str, timezone: str, last: datetime | None, now: datetime) -> bool:
    """Whether a run fell due after ``last`` and by ``now`` (a run missed while down)."""
    if last is None:
        return True
    interval = every(expr)
    if interval is not None:
        return last + interval <= now
    # From just after ``last``: a run that started on the dot must not count as missed.
    following = trigger(expr, timezone).get_next_fire_time(None, last + timedelta(seconds=1))
    return following is not None and following <= now
