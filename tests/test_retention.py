"""Retention planner: hand-computed tables for restic's calendar-bucket rules, then properties."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgvault.errors import ConfigError
from pgvault.retention import (
    NO_RULE,
    SALVAGE,
    UNLIMITED,
    Duration,
    Plan,
    Policy,
    caution,
    describe,
    earliest_removal,
    hold_after_write,
    plan,
)

BERLIN = ZoneInfo("Europe/Berlin")


@dataclass(frozen=True)
class B:
    """A backup as the planner sees it; ids are the UTC time, so expectations read as dates."""

    id: str
    time: datetime
    pinned: bool = False
    bad: str | None = None


def utc(text: str) -> datetime:
    """'2026-12-31T01:00' as an aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def backups_at(*texts: str, pinned: tuple[str, ...] = (), bad: tuple[str, ...] = ()) -> list[B]:
    """Backups named by their UTC time; those in ``bad`` failed their drill's integrity check."""
    return [B(t, utc(t), t in pinned, "sha256 mismatch" if t in bad else None) for t in texts]


def every_day(start: str, end: str, hour: str = "01:00", skip: tuple[str, ...] = ()) -> list[B]:
    """One backup a day at `hour` UTC from start to end inclusive, id = the date."""
    first, last = date.fromisoformat(start), date.fromisoformat(end)
    days = (first + timedelta(n) for n in range((last - first).days + 1))
    return [B(d.isoformat(), utc(f"{d}T{hour}")) for d in days if d.isoformat() not in skip]


def only(within: Duration | None = None, **counts: int) -> Policy:
    """A policy with every count rule off except those given."""
    counts = {"daily": 0, "weekly": 0, "monthly": 0, **counts}
    return Policy(
        daily=counts["daily"],
        weekly=counts["weekly"],
        monthly=counts["monthly"],
        last=counts.get("last", 0),
        yearly=counts.get("yearly", 0),
        within=within,
    )


# Daily backups through 2026 under the default 7 daily / 4 weekly / 3 monthly. 2026-12-31 is a
# Thursday in ISO week 53 (Mon 12-28 .. Sun 2027-01-03); the Sundays before are 12-27, 12-20,
# 12-13. The months before December end on 11-30 and 10-31.
YEAR_KEPT = {
    "2026-12-31": ["daily 1/7", "weekly 1/4", "monthly 1/3", "newest"],
    "2026-12-30": ["daily 2/7"],
    "2026-12-29": ["daily 3/7"],
    "2026-12-28": ["daily 4/7"],
    "2026-12-27": ["daily 5/7", "weekly 2/4"],
    "2026-12-26": ["daily 6/7"],
    "2026-12-25": ["daily 7/7"],
    "2026-12-20": ["weekly 3/4"],
    "2026-12-13": ["weekly 4/4"],
    "2026-11-30": ["monthly 2/3"],
    "2026-10-31": ["monthly 3/3"],
}


def test_daily_for_a_year_default_policy_keeps_exactly_these_dates() -> None:
    backups = every_day("2026-01-01", "2026-12-31")
    result = plan(backups, Policy())
    assert result.keep == list(YEAR_KEPT)
    assert {i: r for i, r in result.reasons.items() if r} == YEAR_KEPT
    assert len(result.remove) == 365 - len(YEAR_KEPT)
    # All counts are used up before 2026-01-01, so the oldest goes.
    assert result.remove[-1] == "2026-01-01"
    assert result.reasons["2026-01-01"] == []


def test_missed_sunday_promotes_the_saturday() -> None:
    backups = every_day("2026-01-01", "2026-12-31", skip=("2026-12-20",))
    result = plan(backups, Policy())
    expected = [d if d != "2026-12-20" else "2026-12-19" for d in YEAR_KEPT]
    assert result.keep == expected
    assert result.reasons["2026-12-19"] == ["weekly 3/4"]


def test_missed_month_reaches_a_month_further_back() -> None:
    november = tuple(f"2026-11-{d:02d}" for d in range(1, 31))
    result = plan(every_day("2026-01-01", "2026-12-31", skip=november), Policy())
    assert result.keep == [
        *(f"2026-12-{d}" for d in range(31, 24, -1)),
        "2026-12-20",
        "2026-12-13",
        "2026-10-31",
        "2026-09-30",
    ]
    assert result.reasons["2026-10-31"] == ["monthly 2/3"]
    assert result.reasons["2026-09-30"] == ["monthly 3/3"]


def test_missed_days_use_up_nothing() -> None:
    backups = every_day("2026-12-01", "2026-12-31")[::-2]  # 31, 29, ..., 1
    result = plan(backups, only(daily=7))
    assert result.keep == [f"2026-12-{d:02d}" for d in range(31, 18, -2)]
    assert result.remove == [f"2026-12-{d:02d}" for d in range(17, 0, -2)]


def test_several_backups_a_day_keep_the_newest_of_each_day() -> None:
    backups = every_day("2026-03-01", "2026-03-10", "01:00") + [
        B(f"{b.id} late", b.time.replace(hour=13)) for b in every_day("2026-03-01", "2026-03-10")
    ]
    result = plan(backups, only(daily=3))
    assert result.keep == ["2026-03-10 late", "2026-03-09 late", "2026-03-08 late"]
    assert len(result.remove) == 17
    assert result.remove[:4] == ["2026-03-10", "2026-03-09", "2026-03-08", "2026-03-07 late"]


def test_iso_week_53_spans_the_year_boundary() -> None:
    assert date(2026, 12, 28).isocalendar()[:2] == (2026, 53)
    assert date(2027, 1, 3).isocalendar()[:2] == (2026, 53)
    result = plan(every_day("2026-12-19", "2027-01-05"), only(weekly=4))
    # 2027-W01 (Jan 4-5), 2026-W53 (Dec 28 - Jan 3), W52 (Dec 21-27), W51 (.. Dec 20).
    assert result.keep == ["2027-01-05", "2027-01-03", "2026-12-27", "2026-12-20"]
    assert result.reasons["2027-01-03"] == ["weekly 2/4"]
    assert "2026-12-28" in result.remove


def test_monthly_and_yearly_across_the_year_boundary() -> None:
    backups = backups_at(
        "2027-02-15T01:00",
        "2027-01-01T00:30",
        "2026-12-31T23:30",
        "2026-12-15T01:00",
        "2025-12-31T01:00",
        "2025-06-30T01:00",
        "2024-03-01T01:00",
        "2023-03-01T01:00",
    )
    assert plan(backups, only(monthly=3)).keep == [
        "2027-02-15T01:00",
        "2027-01-01T00:30",
        "2026-12-31T23:30",
    ]
    yearly = plan(backups, only(yearly=3))
    assert yearly.keep == ["2027-02-15T01:00", "2026-12-31T23:30", "2025-12-31T01:00"]
    assert yearly.reasons["2025-12-31T01:00"] == ["yearly 3/3"]


def test_new_york_day_starts_five_hours_after_utc() -> None:
    # 2026-06-10 03:00 UTC is 23:00 on June 9 in New York (EDT, UTC-4).
    backups = backups_at("2026-06-10T03:00", "2026-06-09T20:00", "2026-06-08T12:00")
    in_utc = plan(backups, only(daily=2))
    assert in_utc.keep == ["2026-06-10T03:00", "2026-06-09T20:00"]
    in_ny = plan(backups, Policy(daily=2, weekly=0, monthly=0, timezone="America/New_York"))
    assert in_ny.keep == ["2026-06-10T03:00", "2026-06-08T12:00"]
    assert in_ny.remove == ["2026-06-09T20:00"]


def test_berlin_spring_forward() -> None:
    # Clocks go 02:00 CET -> 03:00 CEST on Sunday 2026-03-29: local midnight is 23:00 UTC
    # before and 22:00 UTC after, so 22:30 UTC on the 29th is already Monday the 30th (W14).
    backups = backups_at(
        "2026-03-29T22:30",  # Mon 30th 00:30 CEST
        "2026-03-29T21:30",  # Sun 29th 23:30 CEST
        "2026-03-28T23:30",  # Sun 29th 00:30 CET
        "2026-03-28T22:30",  # Sat 28th 23:30 CET
    )
    berlin = plan(backups, Policy(daily=3, weekly=2, monthly=0, timezone="Europe/Berlin"))
    assert berlin.keep == ["2026-03-29T22:30", "2026-03-29T21:30", "2026-03-28T22:30"]
    assert berlin.remove == ["2026-03-28T23:30"]
    assert berlin.reasons == {
        "2026-03-29T22:30": ["daily 1/3", "weekly 1/2", "newest"],
        "2026-03-29T21:30": ["daily 2/3", "weekly 2/2"],
        "2026-03-28T23:30": [],
        "2026-03-28T22:30": ["daily 3/3"],
    }
    # The same backups bucketed in UTC: one ISO week, two days, and the oldest kept.
    assert plan(backups, only(daily=3, weekly=2)).reasons == {
        "2026-03-29T22:30": ["daily 1/3", "weekly 1/2", "newest"],
        "2026-03-29T21:30": [],
        "2026-03-28T23:30": ["daily 2/3"],
        "2026-03-28T22:30": ["daily 3/3 (oldest)", "weekly 2/2 (oldest)"],
    }


def test_berlin_fall_back() -> None:
    # Clocks go 03:00 CEST -> 02:00 CET on 2026-10-25, so 02:30 happens twice that day.
    backups = backups_at(
        "2026-10-25T23:30",  # Mon 26th 00:30 CET
        "2026-10-25T22:30",  # Sun 25th 23:30 CET
        "2026-10-25T01:30",  # Sun 25th 02:30 CET (second time)
        "2026-10-25T00:30",  # Sun 25th 02:30 CEST (first time)
        "2026-10-24T22:30",  # Sun 25th 00:30 CEST
        "2026-10-24T21:30",  # Sat 24th 23:30 CEST
    )
    result = plan(backups, Policy(daily=3, weekly=0, monthly=0, timezone="Europe/Berlin"))
    assert result.keep == ["2026-10-25T23:30", "2026-10-25T22:30", "2026-10-24T21:30"]
    assert result.remove == ["2026-10-25T01:30", "2026-10-25T00:30", "2026-10-24T22:30"]


def test_repeated_hour_given_in_local_time_is_ordered_by_instant() -> None:
    # Same-tzinfo datetimes compare by wall clock; 02:15 (second pass, CET) is the newest.
    first = B("02:30 CEST", datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN))
    second = B("02:45 CEST", datetime(2026, 10, 25, 2, 45, tzinfo=BERLIN))
    third = B("02:15 CET", datetime(2026, 10, 25, 2, 15, tzinfo=BERLIN, fold=1))
    result = plan([first, second, third], only(last=1))
    assert result.keep == ["02:15 CET"]
    assert result.remove == ["02:45 CEST", "02:30 CEST"]


def test_keep_within_is_relative_to_the_newest_backup_not_now() -> None:
    start = utc("2026-06-01T00:00")
    backups = [
        B((start + timedelta(hours=12 * n)).strftime("%m-%dT%H"), start + timedelta(hours=12 * n))
        for n in range(60)
    ]
    policy = only(within=Duration(days=10))
    result = plan(backups, policy, now=utc("2031-01-01T00:00"))
    # Newest is 06-30T12; the cutoff 06-20T12 itself is kept.
    assert result.keep[0] == "06-30T12"
    assert result.keep[-1] == "06-20T12"
    assert len(result.keep) == 21
    assert result.remove[0] == "06-20T00"
    assert result.reasons["06-25T00"] == ["within 10d"]
    assert result == plan(backups, policy)


def test_keep_within_months_clamp_to_the_end_of_the_month() -> None:
    backups = backups_at("2026-03-31T10:00", "2026-02-28T10:00", "2026-02-28T09:59")
    result = plan(backups, only(within=Duration.parse("1m")))
    assert result.keep == ["2026-03-31T10:00", "2026-02-28T10:00"]
    assert result.reasons["2026-02-28T10:00"] == ["within 1m"]


@pytest.mark.parametrize(
    ("newest", "span", "zone", "cutoff"),
    [
        ("2026-03-31T10:00", "1m", "UTC", "2026-02-28T10:00"),
        ("2028-02-29T10:00", "1y", "UTC", "2027-02-28T10:00"),
        ("2026-05-15T10:00", "1y6m", "UTC", "2024-11-15T10:00"),
        ("2026-05-15T10:00", "2w", "UTC", "2026-05-01T10:00"),
        ("2026-05-15T10:00", "1d12h", "UTC", "2026-05-13T22:00"),
        # A calendar day across spring-forward in Berlin is 23 hours; 24h stays 24 hours.
        ("2026-03-29T12:00", "1d", "Europe/Berlin", "2026-03-28T13:00"),
        ("2026-03-29T12:00", "24h", "Europe/Berlin", "2026-03-28T12:00"),
        ("2026-05-15T10:00", "9999y", "UTC", "0001-01-01T00:00"),
    ],
)
def test_duration_before(newest: str, span: str, zone: str, cutoff: str) -> None:
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    assert Duration.parse(span).before(utc(newest), tz) == utc(cutoff)


def test_keep_last() -> None:
    backups = backups_at(*(f"2026-05-01T{h:02d}:00" for h in range(5)))
    result = plan(backups, only(last=3))
    assert result.keep == ["2026-05-01T04:00", "2026-05-01T03:00", "2026-05-01T02:00"]
    assert result.reasons["2026-05-01T02:00"] == ["last 3/3"]
    few = plan(backups[:3], only(last=5))
    assert few.keep == ["2026-05-01T02:00", "2026-05-01T01:00", "2026-05-01T00:00"]
    assert few.reasons["2026-05-01T00:00"] == ["last 3/5"]


def test_rule_with_count_left_keeps_the_oldest_backup() -> None:
    # June 1-3 2026 are Monday to Wednesday of one ISO week.
    backups = backups_at(
        "2026-06-03T10:00", "2026-06-02T10:00", "2026-06-01T12:00", "2026-06-01T08:00"
    )
    result = plan(backups, Policy())
    assert result.remove == []
    assert result.reasons == {
        "2026-06-03T10:00": ["daily 1/7", "weekly 1/4", "monthly 1/3", "newest"],
        "2026-06-02T10:00": ["daily 2/7"],
        "2026-06-01T12:00": ["daily 3/7"],
        "2026-06-01T08:00": ["daily 4/7 (oldest)", "weekly 2/4 (oldest)", "monthly 2/3 (oldest)"],
    }


def test_unlimited_counts() -> None:
    backups = every_day("2026-05-01", "2026-05-03")
    result = plan(backups, only(daily=UNLIMITED))
    assert result.keep == ["2026-05-03", "2026-05-02", "2026-05-01"]
    assert result.reasons["2026-05-01"] == ["daily 3/unlimited"]


def test_pinned_backups_are_kept_and_still_count() -> None:
    backups = [
        B(b.id, b.time, pinned=b.id in {"2026-03-15", "2026-12-30", "2026-12-31"})
        for b in every_day("2026-01-01", "2026-12-31")
    ]
    result = plan(backups, Policy())
    assert result.keep == [*YEAR_KEPT, "2026-03-15"]
    assert result.reasons["2026-03-15"] == ["pinned"]
    assert result.reasons["2026-12-30"] == ["daily 2/7", "pinned"]
    assert result.reasons["2026-12-31"] == [
        "daily 1/7",
        "weekly 1/4",
        "monthly 1/3",
        "newest",
        "pinned",
    ]


def test_newest_is_kept_even_if_only_within_applies() -> None:
    result = plan(
        backups_at("2026-01-02T00:00", "2026-01-01T00:00"), only(within=Duration(hours=1))
    )
    assert result.keep == ["2026-01-02T00:00"]
    assert result.reasons["2026-01-02T00:00"] == ["within 1h", "newest"]


def test_equal_times_fall_back_to_id() -> None:
    t = utc("2026-01-01T00:00")
    result = plan([B("a", t), B("c", t), B("b", t)], only(last=1))
    assert result.keep == ["c"]
    assert result.remove == ["b", "a"]


def test_empty_input_plans_nothing() -> None:
    assert plan([], Policy()) == Plan(keep=[], remove=[], reasons={})


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        plan([B("x", datetime(2026, 1, 1))], Policy())
    with pytest.raises(ValueError, match="now"):
        plan([], Policy(), now=datetime(2026, 1, 1))


def test_duplicate_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        plan(backups_at("2026-01-01T00:00") * 2, Policy())


def test_a_policy_that_keeps_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="keeps nothing"):
        Policy(daily=0, weekly=0, monthly=0)
    with pytest.raises(ConfigError, match="keeps nothing"):
        Policy.from_mapping({"keep_daily": 0, "keep_weekly": "0", "keep_monthly": 0})
    assert only(within=Duration(days=1)).within == Duration(days=1)


def test_from_mapping() -> None:
    assert Policy.from_mapping({}) == Policy()
    # The shape config.RetentionSettings dumps, with counts from the environment as strings.
    dumped = {"keep_last": "0", "keep_daily": 7, "keep_within": None, "timezone": "UTC"}
    assert Policy.from_mapping(dumped) == Policy()
    policy = Policy.from_mapping(
        {
            "keep_last": 2,
            "keep_daily": "14",
            "keep_weekly": "unlimited",
            "keep_yearly": 1,
            "keep_within": "1y6m",
            "timezone": "Europe/Berlin",
        }
    )
    assert policy == Policy(
        last=2,
        daily=14,
        weekly=UNLIMITED,
        monthly=3,
        yearly=1,
        within=Duration(years=1, months=6),
        timezone="Europe/Berlin",
    )


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"keep_daily": -1}, "keep_daily"),
        ({"keep_daily": "lots"}, "keep_daily"),
        ({"keep_weekly": True}, "keep_weekly"),
        ({"keep_monthly": 2.5}, "keep_monthly"),
        ({"keep_last": None}, "keep_last"),
        ({"keep_within": "30x"}, "keep_within"),
        ({"keep_within": "0d"}, "keep_within"),
        ({"keep_within": 30}, "keep_within"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"timezone": "../etc/passwd"}, "timezone"),
        ({"timezone": 1}, "timezone"),
        ({"keep_dialy": 7}, "keep_dialy"),
    ],
)
def test_from_mapping_errors_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Policy.from_mapping(values)
    assert str(caught.value).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", Duration(days=30)),
        ("12h", Duration(hours=12)),
        ("2w", Duration(weeks=2)),
        ("1y6m", Duration(years=1, months=6)),
        ("1y2m3w4d5h", Duration(1, 2, 3, 4, 5)),
        (" 7d ", Duration(days=7)),
    ],
)
def test_duration_parse(text: str, expected: Duration) -> None:
    assert Duration.parse(text) == expected
    assert Duration.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "d", "30", "6m1y", "30D", "1.5d", "-1d", "30 d", "1d1d", "5s"]
)
def test_duration_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        Duration.parse(text)


def test_describe() -> None:
    assert describe(Policy()) == (
        "Keeps the newest backup of each of the last 7 days, 4 ISO weeks and 3 months that have"
        " backups. Calendar in UTC. The newest good backup and pinned backups are always kept; a"
        " backup known bad counts for nothing."
    )
    assert describe(Policy(last=1, daily=UNLIMITED, within=Duration(days=30))) == (
        "Keeps the newest backup; the newest backup of each of the last 4 ISO weeks and 3 months"
        " that have backups; the newest backup of every day; every backup within 30d of the"
        " newest one. Calendar in UTC. The newest good backup and pinned backups are always kept;"
        " a backup known bad counts for nothing."
    )


# Backups known bad (a drill failed their integrity check) count for nothing.


def test_a_damaged_newest_backup_never_pushes_out_the_only_good_one() -> None:
    # The case: two backups, the newest damaged, keep_last = 1.
    backups = backups_at("2026-03-01T01:00", "2026-03-02T01:00", bad=("2026-03-02T01:00",))
    result = plan(backups, only(last=1))
    assert result.keep == ["2026-03-01T01:00"]
    assert result.reasons["2026-03-01T01:00"] == ["last 1/1", "newest"]
    assert result.remove == ["2026-03-02T01:00"]
    assert result.explain("2026-03-02T01:00") == "known bad: sha256 mismatch"


def test_a_bad_backup_fills_no_daily_slot_so_the_good_one_that_day_is_kept() -> None:
    backups = backups_at("2026-03-01T01:00", "2026-03-01T13:00", "2026-03-02T01:00",
                         bad=("2026-03-01T13:00",))
    result = plan(backups, only(daily=2))
    assert result.reasons["2026-03-01T01:00"] == ["daily 2/2"]
    assert result.remove == ["2026-03-01T13:00"]


def test_the_newest_rule_and_keep_within_follow_the_newest_good_backup() -> None:
    backups = backups_at("2026-02-01T01:00", "2026-02-20T01:00", "2026-03-01T01:00",
                         bad=("2026-03-01T01:00",))
    # Within 10 days of the newest GOOD backup (02-20), not of the bad one (03-01).
    result = plan(backups, only(within=Duration(days=10)))
    assert result.keep == ["2026-02-20T01:00"]
    assert result.reasons["2026-02-20T01:00"] == ["within 10d", "newest"]
    assert result.explain("2026-02-01T01:00") == NO_RULE


def test_a_pinned_bad_backup_is_kept_for_its_pin_alone() -> None:
    backups = backups_at("2026-03-01T01:00", "2026-03-02T01:00", bad=("2026-03-02T01:00",),
                         pinned=("2026-03-02T01:00",))
    result = plan(backups, only(last=1))
    assert result.reasons == {"2026-03-02T01:00": ["pinned"],
                              "2026-03-01T01:00": ["last 1/1", "newest"]}


def test_with_no_good_backup_left_every_bad_one_is_kept_to_salvage_from() -> None:
    backups = backups_at("2026-03-01T01:00", "2026-03-02T01:00",
                         bad=("2026-03-01T01:00", "2026-03-02T01:00"))
    result = plan(backups, only(last=1))
    assert result.remove == []
    assert all(result.reasons[b.id] == [SALVAGE] for b in backups)


def test_every_removed_backup_has_its_reason() -> None:
    backups = backups_at("2026-03-01T01:00", "2026-03-02T01:00", "2026-03-03T01:00",
                         bad=("2026-03-02T01:00",))
    result = plan(backups, only(last=1))
    assert result.removed_because == {"2026-03-02T01:00": "known bad: sha256 mismatch",
                                      "2026-03-01T01:00": NO_RULE}


def test_caution_lets_a_routine_prune_through() -> None:
    backups = backups_at("2026-03-01T01:00", "2026-03-02T01:00", "2026-03-03T01:00")
    assert caution(backups, ["2026-03-01T01:00"]) is None
    # Exactly half is still routine (keep_last 1 over two backups).
    assert caution(backups[:2], ["2026-03-01T01:00"]) is None


def test_caution_stops_removing_more_than_half_unless_forced() -> None:
    backups = backups_at("2026-03-01T01:00", "2026-03-02T01:00", "2026-03-03T01:00")
    found = caution(backups, ["2026-03-01T01:00", "2026-03-02T01:00"])
    assert found is not None and found.forceable
    assert found.reason == "it would remove 2 of 3 backups (more than half)"


def test_caution_never_lets_the_last_good_backup_go() -> None:
    backups = backups_at("2026-03-01T01:00", "2026-03-02T01:00", bad=("2026-03-02T01:00",))
    found = caution(backups, ["2026-03-01T01:00"])
    assert found is not None and not found.forceable
    assert "last good backup" in found.reason
    # Removing bad ones only leaves the good one: nothing to fear.
    assert caution(backups, ["2026-03-02T01:00"]) is None


# Properties. Times sit on a 30-minute grid so equal times and same-day backups both occur.

ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kathmandu"]
COUNTS = st.sampled_from([0, 0, 1, 2, 3, 7, UNLIMITED])


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    counts = {name: draw(COUNTS) for name in ("last", "daily", "weekly", "monthly", "yearly")}
    within = draw(
        st.none()
        | st.builds(
            Duration,
            months=st.integers(0, 2),
            weeks=st.integers(0, 2),
            days=st.integers(0, 10),
            hours=st.integers(0, 36),
        ).filter(lambda d: not d.is_zero())
    )
    if within is None and not any(counts.values()):
        counts["last"] = 1
    return Policy(
        last=counts["last"],
        daily=counts["daily"],
        weekly=counts["weekly"],
        monthly=counts["monthly"],
        yearly=counts["yearly"],
        within=within,
        timezone=draw(st.sampled_from(ZONES)),
    )


@st.composite
def backup_lists(draw: st.DrawFn) -> list[B]:
    span = draw(st.sampled_from([2, 40, 800]))  # days
    base = utc("2026-01-01T00:00")
    slots = st.integers(0, span * 48)
    entries = draw(st.lists(st.tuples(slots, st.booleans(), st.sampled_from(ZONES),
                                      st.sampled_from([False, False, False, True])),
                            max_size=40))
    result = []
    for n, (slot, pinned, zone, bad) in enumerate(entries):
        moment = base + timedelta(minutes=30 * slot)
        # Times arrive in assorted zones: the planner must rely on instants only.
        local = moment if zone == "UTC" else moment.astimezone(ZoneInfo(zone))
        result.append(B(f"b{n:02d}", local, pinned and n % 3 == 0, "damaged" if bad else None))
    return result


def newest_id(backups: list[B]) -> str:
    return max(backups, key=lambda b: (b.time.astimezone(UTC), b.id)).id


def good(backups: list[B]) -> list[B]:
    return [b for b in backups if b.bad is None]


PROPERTY = settings(max_examples=150, deadline=None)


@PROPERTY
@given(backup_lists(), policies())
def test_keep_and_remove_partition_the_input(backups: list[B], policy: Policy) -> None:
    result = plan(backups, policy)
    ids = [b.id for b in backups]
    assert sorted(result.keep + result.remove) == sorted(ids)
    assert set(result.reasons) == set(ids)
    assert all(bool(result.reasons[i]) == (i in result.keep) for i in ids)
    order = {b.id: (b.time.astimezone(UTC), b.id) for b in backups}
    for listed in (result.keep, result.remove):
        assert listed == sorted(listed, key=order.__getitem__, reverse=True)


@PROPERTY
@given(backup_lists(), policies())
def test_newest_good_and_pinned_are_kept(backups: list[B], policy: Policy) -> None:
    result = plan(backups, policy)
    if good(backups):
        assert newest_id(good(backups)) in result.keep
        assert "newest" in result.reasons[newest_id(good(backups))]
    for b in backups:
        if b.pinned:
            assert "pinned" in result.reasons[b.id]
    for name in ("last", "daily", "weekly", "monthly", "yearly"):
        limit = getattr(policy, name)
        used = sum(r.startswith(f"{name} ") for rs in result.reasons.values() for r in rs)
        assert used <= limit or limit == UNLIMITED


@PROPERTY
@given(backup_lists(), policies())
def test_bad_backups_count_for_nothing(backups: list[B], policy: Policy) -> None:
    # The good backups are planned exactly as if the bad ones did not exist ...
    with_bad, without = plan(backups, policy), plan(good(backups), policy)
    assert {i: with_bad.reasons[i] for i in without.reasons} == without.reasons
    # ... a bad one is kept only for its pin or while no good backup exists ...
    for b in backups:
        if b.bad is not None and b.id in with_bad.keep:
            assert b.pinned or not good(backups)
    # ... and no plan removes every good backup.
    if good(backups):
        assert set(with_bad.keep) & {b.id for b in good(backups)}
        found = caution(backups, with_bad.remove)
        assert found is None or found.forceable
    assert set(with_bad.removed_because) == set(with_bad.remove)


@PROPERTY
@given(backup_lists(), policies())
def test_planning_the_kept_set_again_removes_nothing(backups: list[B], policy: Policy) -> None:
    result = plan(backups, policy)
    kept = [b for b in backups if b.id in set(result.keep)]
    again = plan(kept, policy)
    assert again.remove == []
    assert again.keep == result.keep


@PROPERTY
@given(
    backup_lists(),
    policies(),
    st.randoms(use_true_random=False),
    st.datetimes(timezones=st.just(UTC)),
)
def test_plan_ignores_input_order_and_now(
    backups: list[B], policy: Policy, rnd: random.Random, now: datetime
) -> None:
    result = plan(backups, policy)
    shuffled = list(backups)
    rnd.shuffle(shuffled)
    assert plan(iter(shuffled), policy) == result
    assert plan(backups, policy, now=now) == result


# -- Object Lock dates: how long the policy surely keeps a backup --------------------------


@pytest.mark.parametrize(("policy", "written", "until"), [
    (only(daily=7, weekly=4), "2026-12-07T01:30", "2026-12-14T01:30"),
    (only(daily=2, within=Duration(days=10)), "2026-12-07T01:30", "2026-12-17T01:30"),
    (only(daily=2, within=Duration(hours=12)), "2026-12-07T01:30", "2026-12-09T01:30"),
    (only(weekly=4, monthly=3), "2026-12-07T01:30", "2027-01-04T01:30"),
    # Calendar months, the day clamped: Nov 30 + 3 months is Feb 28.
    (only(monthly=3, yearly=1), "2026-11-30T01:30", "2027-02-28T01:30"),
    (only(last=5), "2026-12-07T01:30", None),
])
def test_a_written_backup_is_held_for_its_daily_slot_else_the_shortest_one(
    policy: Policy, written: str, until: str | None
) -> None:
    assert hold_after_write(policy, utc(written)) == (utc(until) if until else None)


def test_a_written_backup_is_held_by_the_wall_clock_of_the_policys_zone() -> None:
    # Berlin leaves summer time on 2026-10-25: 7 days from 10-20 12:00 local is 169 hours.
    policy = Policy(daily=7, weekly=0, monthly=0, timezone="Europe/Berlin")
    written = datetime(2026, 10, 20, 12, 0, tzinfo=BERLIN)
    assert hold_after_write(policy, written) == datetime(2026, 10, 27, 12, 0, tzinfo=BERLIN)


def test_each_kept_backup_may_go_once_its_latest_reason_lapses() -> None:
    # Daily backups Tue 12-01 .. Wed 12-09 under 2 daily / 2 weekly, one pinned, kept 12-01
    # only for the pin. A daily slot k of N lapses at the start of day newest + (N-k+1); a
    # weekly one at the Monday (N-k+1) weeks after the newest backup's week's Monday. Slot 1
    # gives no date: a later backup of the same day or week takes it.
    backups = every_day("2026-12-01", "2026-12-09")
    backups[0] = B("2026-12-01", backups[0].time, pinned=True)
    policy = only(daily=2, weekly=2)
    planned = plan(backups, policy)
    assert planned.keep == ["2026-12-09", "2026-12-08", "2026-12-06", "2026-12-01"]
    now = utc("2026-12-09T02:00")
    assert earliest_removal(backups, policy, planned, now) == {
        "2026-12-08": utc("2026-12-10T00:00"),  # daily 2/2
        "2026-12-06": utc("2026-12-14T00:00"),  # weekly 2/2
        "2026-12-01": utc("2026-12-11T02:00"),  # pinned: the write hold again, from now
    }


def test_a_parent_lasts_as_long_as_its_child_and_counts_give_no_date() -> None:
    @dataclass(frozen=True)
    class P:
        id: str
        time: datetime
        parent: str | None = None

    backups = [P("full", utc("2026-11-02T01:00")), P("incr", utc("2026-12-09T01:00"), "full"),
               P("other", utc("2026-12-08T01:00"))]
    policy = only(last=1, monthly=2)
    planned = plan(backups, policy)
    assert planned.reasons["full"] == ["monthly 2/2", "parent of incr"]
    assert earliest_removal(backups, policy, planned, utc("2026-12-09T02:00")) == {
        "full": utc("2027-01-01T00:00"),  # monthly 2/2: one new month after December
    }
    # Once the child holds a past month's slot, the parent lasts as long as it does.
    backups.append(P("january", utc("2027-01-03T01:00")))
    planned = plan(backups, policy)
    assert planned.reasons["full"] == ["parent of incr"]
    assert earliest_removal(backups, policy, planned, utc("2027-01-03T02:00")) == {
        "incr": utc("2027-02-01T00:00"), "full": utc("2027-02-01T00:00")}
    # keep_last and "newest" give no date: the next backup may take the place at once.
    alone = only(last=2)
    assert earliest_removal(backups, alone, plan(backups, alone), utc("2026-12-09T02:00")) == {}


@settings(max_examples=60, deadline=None)
@given(backup_lists(), policies(),
       st.lists(st.integers(1, 72), min_size=1, max_size=30))
def test_no_later_plan_removes_a_backup_before_its_earliest_removal(
    backups: list[B], policy: Policy, gaps: list[int]
) -> None:
    """The lock date is safe: backups taken later (hours apart) never make a plan remove a
    kept backup before the instant earliest_removal gave it."""
    if not good(backups):
        return
    planned = plan(backups, policy)
    newest = max(b.time.astimezone(UTC) for b in good(backups))
    bounds = earliest_removal(backups, policy, planned, newest)
    later = list(backups)
    moment = newest
    for n, hours in enumerate(gaps):
        moment += timedelta(hours=hours)
        later.append(B(f"new{n:02d}", moment))
        again = plan(later, policy)
        for backup_id, bound in bounds.items():
            if backup_id in again.remove:
                assert moment >= bound, (backup_id, bound, moment)
