"""Fleet mode: the pure decisions (specification style, like test_retention.py), then the
fleet simulated on this machine: 60 databases on two local clusters, worker processes
running `pgvault run --shard I/N` against one repository (a folder, and S3 through moto over
HTTP), workers SIGKILLed and restarted, one SIGSTOPped past its lease while a replacement
and a worker with another shard count overlap it. Every database must get exactly one
backup in the window, concurrency must stay within both caps, and sampled backups must
restore to their source."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

from cli_runner import pgvault
from dbcompare import assert_databases_equal
from fixtures_fleet import (
    Fleet,
    backups,
    fleet_dbs,  # noqa: F401  (fixture)
    max_overlap,
    start_worker,
    wait_all,
    write_config,
)
from pgvault import catalog, config, fleet, lease
from pgvault.errors import Conflict
from pgvault.fleet import LeaseRecord, Shard, Timing
from pgvault.health import DatabaseStatus
from pgvault.ops.fleet import ShardReport, run_shard
from pgvault.storage import open_storage
from pgvault.storage.base import Storage
from pgvault.storage.memory import MemoryStorage

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)
NAMES = [f"db{n:03d}" for n in range(300)]


# ---------------------------------------------------------------- pure decisions

def test_every_database_has_exactly_one_shard() -> None:
    for count in (1, 2, 3, 7):
        owners = [fleet.owner(name, count) for name in NAMES]
        assert all(0 <= o < count for o in owners)
        for name, o in zip(NAMES, owners, strict=True):
            assert [fleet.in_shard(name, Shard(i, count)) for i in range(count)].count(True) == 1
            assert fleet.owner(name, count) == o  # stable: a pure function of the name
        # Spread evenly enough that no worker gets twice its share.
        assert max(Counter(owners).values()) < 2 * len(NAMES) / count


def test_adding_a_shard_moves_only_what_the_new_shard_takes() -> None:
    for count in (2, 4, 8):
        before = {name: fleet.owner(name, count) for name in NAMES}
        after = {name: fleet.owner(name, count + 1) for name in NAMES}
        moved = [name for name in NAMES if before[name] != after[name]]
        assert all(after[name] == count for name in moved)  # only to the new shard
        assert len(moved) < 2 * len(NAMES) / (count + 1)  # about 1/(N+1), not most


def test_shard_parsing_and_the_indexed_job_environment() -> None:
    assert fleet.parse_shard("2/4") == Shard(2, 4)
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ValueError):
            fleet.parse_shard(bad)
    env = {"JOB_COMPLETION_INDEX": "3", "JOB_COMPLETIONS": "5"}
    assert fleet.shard_from_environ(env) == Shard(3, 5)
    assert fleet.shard_from_environ({}) is None
    with pytest.raises(ValueError, match="JOB_COMPLETIONS"):
        fleet.shard_from_environ({"JOB_COMPLETION_INDEX": "0"})


def test_windows_are_aligned_and_jitter_spreads_starts_inside_them() -> None:
    w = fleet.window_at(T0 + timedelta(hours=5), DAY)
    assert (w.start, w.end) == (T0, T0 + DAY)
    assert fleet.window_at(T0 + DAY, DAY).index == w.index + 1
    jitter = timedelta(hours=2)
    offsets = [fleet.start_offset(n, w, jitter) for n in NAMES]
    assert all(timedelta(0) <= o < jitter for o in offsets)
    # Spread: every quarter of the jitter gets some starts, none gets most.
    quarters = Counter(int(o / (jitter / 4)) for o in offsets)
    assert set(quarters) == {0, 1, 2, 3} and max(quarters.values()) < len(NAMES) / 2
    nxt = fleet.window_at(T0 + DAY, DAY)
    assert [fleet.start_offset(n, nxt, jitter) for n in NAMES] != offsets  # a new draw
    assert fleet.start_offset("x", w, timedelta(0)) == timedelta(0)


def test_backoff_doubles_up_to_its_cap() -> None:
    base, cap = timedelta(minutes=1), timedelta(minutes=10)
    assert [fleet.backoff(n, base, cap).total_seconds() / 60 for n in range(6)] == \
        [0, 1, 2, 4, 8, 10]


TIMING = Timing(window=DAY, lease=timedelta(minutes=2), backoff=timedelta(minutes=1))
W = fleet.window_at(T0, DAY)


def rec(state: str, window: int = W.index, **kw: object) -> LeaseRecord:
    return LeaseRecord(state=state, window=window, holder="h 1 t", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("record", "at", "action", "reason"), [
    (None, T0, "take", "first backup"),
    (rec("done", backup_id="b1"), T0 + timedelta(hours=3), "done", "window"),
    (rec("done", W.index - 1), T0 + timedelta(hours=3), "take", "due"),
    # An outage of many windows: due once in the current one, never once per window.
    (rec("done", W.index - 30), T0 + timedelta(hours=3), "take", "due"),
    (rec("running", expires=T0 + timedelta(minutes=1)), T0, "wait", "held"),
    (rec("running", expires=T0 - timedelta(seconds=1)), T0, "take", "expired"),
    (rec("failed", attempts=2, retry_after=T0 + timedelta(minutes=2)), T0, "wait", "backing"),
    (rec("failed", attempts=2, retry_after=T0 - timedelta(minutes=2)), T0, "take", "retry"),
    # Backoff survives a new window: a broken database is not hammered at midnight.
    (rec("failed", W.index - 1, attempts=5, retry_after=T0 + timedelta(minutes=9)), T0,
     "wait", "backing"),
])
def test_decide(record: LeaseRecord | None, at: datetime, action: str, reason: str) -> None:
    decision = fleet.decide("app", record, at, TIMING)
    assert decision.action == action and reason in decision.reason


def test_decide_waits_for_the_jittered_start() -> None:
    timing = Timing(window=DAY, jitter=timedelta(hours=4))
    offset = fleet.start_offset("app", W, timing.jitter)
    assert offset > timedelta(0)
    early = fleet.decide("app", None, T0 + offset / 2, timing)
    assert early.action == "wait" and early.at == T0 + offset
    assert fleet.decide("app", None, T0 + offset, timing).action == "take"


# ---------------------------------------------------------------- fleet status

def _standing(record: LeaseRecord | None, at: datetime = T0 + timedelta(hours=3)) -> str:
    state = fleet.standing("app", record, at, TIMING, 4)
    assert state.shard == fleet.owner("app", 4)
    return f"{state.standing}: {state.reason}"


def test_standing_names_why_a_database_missed_its_window() -> None:
    at = T0 + timedelta(hours=3)
    assert _standing(None).startswith("missed: never started")
    done = fleet.finished(fleet.running("h 1 t", W, T0, TIMING, None, "1/4"), T0, "b1")
    assert _standing(done) == "done: backup b1"
    # The previous window had its backup: not missed, whatever the current one does.
    before = fleet.window_at(T0 - DAY, DAY)
    yesterday = fleet.finished(fleet.running("h 1 t", before, T0 - DAY, TIMING, None), T0 - DAY,
                               "b0")
    assert _standing(yesterday) == "due: due now"
    now_running = fleet.running("w 2 x", W, at, TIMING, yesterday, "2/4")
    assert _standing(now_running).startswith("running: still running: w 2 x (shard 2/4)")
    failing = fleet.failed(now_running, at, "connection refused", TIMING)
    assert _standing(failing).startswith("failing: failed 1 time(s)")
    # Two windows back: the last complete window was missed, and the record says why.
    old = fleet.window_at(T0 - 2 * DAY, DAY)
    stale = fleet.finished(fleet.running("h 1 t", old, T0 - 2 * DAY, TIMING, None), T0 - 2 * DAY,
                           "b9")
    assert _standing(stale).startswith("missed: never started in the window (last backup b9")
    failed = fleet.failed(fleet.running("w 2 x", W, T0, TIMING, stale, "2/4"), T0,
                          "FATAL: database \"app\" does not exist", TIMING)
    assert _standing(failed) == ("missed: failed 1 time(s), last at 2026-03-01T00:00:00+00:00: "
                                 "FATAL: database \"app\" does not exist")
    lost = fleet.running("w 3 y", W, T0, TIMING, stale, "3/4")
    assert _standing(lost).startswith("missed: lease lost: w 3 y (shard 3/4) stopped renewing")
    live = fleet.running("w 3 y", W, at, TIMING, stale, "3/4")
    assert _standing(live).startswith("missed: still running: w 3 y (shard 3/4)")
    copy_failed = fleet.finished(fleet.running("h 1 t", W, T0, TIMING, None), T0, "b2",
                                 {"copy:offsite": "failed: no such bucket", "drill": "ok"})
    state = fleet.standing("app", copy_failed, at, TIMING, 4)
    assert state.standing == "done" and state.problems == ("copy:offsite: failed: no such bucket",)


def test_fleet_status_check_and_metrics_say_which_databases_missed_and_why(
        tmp_path: Path) -> None:
    """Lease records as workers write them (fleet.running/finished/failed) in a folder
    repository; `pgvault fleet status`, `check` and `metrics` read them at the real time."""
    names = [f"db{n}" for n in range(8)]
    urls = {n: f"postgresql://pgvault@127.0.0.1:1/{n}" for n in names}
    repo = tmp_path / "repo"
    cfg = write_config(tmp_path / "fleet.toml", urls, fleet={"window_hours": 1})
    storage = open_storage(repo.as_uri())
    timing = Timing(window=timedelta(hours=1), lease=timedelta(minutes=2))
    now = datetime.now(UTC)
    w = fleet.window_at(now, timing.window)
    prev = fleet.Window(w.index - 1, w.start - timing.window, w.start)
    old = fleet.Window(w.index - 2, w.start - 2 * timing.window, w.start - timing.window)

    def put(name: str, record: LeaseRecord) -> None:
        lease.Lease.claim(storage, catalog.fleet_lease_key(name), record, None)

    def done(window: fleet.Window, backup: str, shard: str = "0/2") -> LeaseRecord:
        return fleet.finished(fleet.running("w 1 a", window, window.start, timing, None, shard),
                              window.start, backup)

    for n in names[:5]:
        put(n, done(w, f"b-{n}", f"{fleet.owner(n, 2)}/2"))
    put(names[5], done(prev, "b-prev"))  # due: the previous window had it
    put(names[6], fleet.failed(fleet.running("w 2 b", w, now, timing, done(old, "b-old"),
                                             "1/2"), now, "connection refused", timing))
    # names[7]: no record at all (never started)
    flags = ["--config", str(cfg), "--repo", repo.as_uri()]
    proc = pgvault("fleet", "status", "--json", *flags, expect=12)
    report = json.loads(proc.stdout)
    assert report["shards"] == 2 and report["window"] == w.index
    assert report["counts"] == {"done": 5, "due": 1, "running": 0, "failing": 0, "missed": 2}
    by_name = {d["database"]: d for d in report["databases"]}
    assert by_name["db6"]["standing"] == "missed" and "connection refused" in \
        by_name["db6"]["reason"]
    assert by_name["db7"]["reason"].startswith("never started")
    assert sum(sum(row.values()) for row in report["by_shard"].values()) == 8
    assert report["by_shard"][f"{fleet.owner('db7', 2)}/2"]["missed"] >= 1
    assert "2 of 8 databases missed their window" in proc.stderr
    text = pgvault("fleet", "status", "--missed", *flags, expect=12).stdout
    assert "shard 0/2" in text and "shard 1/2" in text
    assert [line.split()[0] for line in text.splitlines()[3:]] == ["db6", "db7"]
    check = pgvault("fleet", "check", *flags, expect=2).stdout
    assert check.startswith("PGVAULT FLEET CRITICAL - 2 of 8 missed their window: db6 (failed")
    # The console's /fleet page shows the same, from the same records.
    from pgvault.vault import Vault
    from pgvault.web.app import Console

    fleet_settings = config.load({"repo": repo.as_uri()}, {}, str(cfg))
    vaults = [(t.name or "", Vault.open(t.settings, storage=storage))
              for t in config.targets(fleet_settings)]
    page = Console(lambda: vaults, host="127.0.0.1", token=None).answer("GET", "/fleet", {})
    html = page.body.decode()
    assert page.status == 200 and "connection refused" in html and "never started" in html, \
        html[html.find("<main"):][:1500]
    missed_rows = html.split("Missed their window")[1].split("Every database")[0]
    assert missed_rows.count('<tr class="row-critical">') == 2
    assert check.rstrip().endswith("| done=5 due=1 running=0 failing=0 missed=2")
    metrics = pgvault("fleet", "metrics", *flags).stdout
    assert 'pgvault_fleet_window_missed{cause="failed",database="db6"} 1.0' in metrics
    assert 'pgvault_fleet_window_missed{cause="never_started",database="db7"} 1.0' in metrics
    assert 'pgvault_fleet_databases{standing="done"} 5.0' in metrics
    # Both back: db7 done in this window, db6's retry runs now (a worker holds it):
    # still CRITICAL for db6? No: it missed the last window and is still running: WARNING.
    put(names[7], done(w, "b-7"))
    record, etag = lease.read(storage, catalog.fleet_lease_key("db6"))
    assert record is not None
    lease.Lease.claim(storage, catalog.fleet_lease_key("db6"),
                      fleet.running("w 3 c", w, datetime.now(UTC), timing, record, "1/2"), etag)
    check = pgvault("fleet", "check", *flags, expect=1).stdout
    assert check.startswith("PGVAULT FLEET WARNING - 1 of 8 missed their window: db6 (still "
                            "running: w 3 c (shard 1/2)")
    record, etag = lease.read(storage, catalog.fleet_lease_key("db6"))
    assert record is not None
    lease.Lease.claim(storage, catalog.fleet_lease_key("db6"),
                      fleet.finished(record, datetime.now(UTC), "b-6"), etag)
    check = pgvault("fleet", "check", *flags, expect=0).stdout
    assert check.startswith("PGVAULT FLEET OK - 8 databases, 7 done this window")


# ---------------------------------------------------------------- in-process, fake clock

class FakeClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def sleep(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def _settings(path: Path, urls: dict[str, str], repo: Path, **kw: float) -> config.Settings:
    write_config(path, urls, fleet=kw)
    return config.load({"repo": repo.as_uri()}, {}, str(path))


def _restore_and_compare(repo: str, manifest_id: str, name: str, fleet_: Fleet,
                         env: dict[str, str] | None = None) -> None:
    server = fleet_.urls[name].rsplit("/", 1)[0]
    target = f"r_{name}_{random.randrange(10**6)}"
    pgvault("restore", manifest_id, "--to", target, "--dbname", f"{server}/postgres",
            "--repo", repo, "-j", "1", env=env)
    try:
        assert_databases_equal(fleet_.urls[name], f"{server}/{target}")
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')


def test_an_outage_gives_one_catch_up_each(tmp_path: Path, fleet_dbs: Fleet) -> None:  # noqa: F811
    urls = dict(list(fleet_dbs.urls.items())[:3] + list(fleet_dbs.urls.items())[-3:])
    repo = tmp_path / "repo"
    settings = _settings(tmp_path / "fleet.toml", urls, repo, window_hours=1)
    now = datetime.now(UTC)
    clock = FakeClock(now)
    first = run_shard(settings, Shard(0, 1), clock=clock, sleep=clock.sleep)
    assert sorted(first.backed_up) == sorted(urls) and not first.missed
    again = run_shard(settings, Shard(0, 1), clock=clock, sleep=clock.sleep)
    assert again.backed_up == {} and sorted(again.found) == sorted(urls)
    # 24 windows pass with no worker at all, then one comes back: one backup each.
    clock.at = now + timedelta(hours=24, minutes=1)
    catch_up = run_shard(settings, Shard(0, 1), clock=clock, sleep=clock.sleep)
    assert sorted(catch_up.backed_up) == sorted(urls)
    assert run_shard(settings, Shard(0, 1), clock=clock, sleep=clock.sleep).backed_up == {}
    found = backups(open_storage(repo.as_uri()))
    assert {name: len(found[name]) for name in urls} == dict.fromkeys(urls, 2)
    name = next(iter(urls))
    _restore_and_compare(repo.as_uri(), catch_up.backed_up[name], name, fleet_dbs)


def test_a_failing_database_backs_off_and_the_rest_go_on(tmp_path: Path,
                                                         fleet_dbs: Fleet) -> None:  # noqa: F811
    good = next(iter(fleet_dbs.urls))
    urls = {good: fleet_dbs.urls[good],
            "nosuchdb": fleet_dbs.urls[good].rsplit("/", 1)[0] + "/nosuchdb"}
    repo = tmp_path / "repo"
    settings = _settings(tmp_path / "fleet.toml", urls, repo, window_hours=1,
                         backoff_seconds=60, backoff_max_seconds=600)
    start = fleet.window_at(datetime.now(UTC), timedelta(hours=1)).start
    clock = FakeClock(start)
    report = run_shard(settings, Shard(0, 1), clock=clock, sleep=clock.sleep)
    assert list(report.backed_up) == [good] and report.missed == ["nosuchdb"]
    record, _ = lease.read(open_storage(repo.as_uri()), catalog.fleet_lease_key("nosuchdb"))
    # Attempts at 0, 1, 3, 7, 15, 25, 35, 45, 55 min: backoff doubles to its 10 min cap.
    assert record is not None and record.state == "failed" and record.attempts == 9
    assert "nosuchdb" in (record.error or "")
    _restore_and_compare(repo.as_uri(), report.backed_up[good], good, fleet_dbs)


def _capture(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """pgvault's logger stops propagating once the CLI configured it: listen on it."""
    logger = logging.getLogger("pgvault")
    added = not logger.propagate  # else the root's handler sees every record already
    if added:
        logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    try:
        yield caplog
    finally:
        if added:
            logger.removeHandler(caplog.handler)


pgvault_logs = pytest.fixture(_capture)


def test_the_shard_loop_drills_copies_and_prunes_under_the_lease(
        tmp_path: Path, fleet_dbs: Fleet, pgvault_logs: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """Each database's window: backup, its restore drill, the copy to the [[repos]] copy
    (pruned by its own policy), the primary's prune; the lease record says how each went."""
    from pgvault.cli.fleet import _drill_for

    names = [*list(fleet_dbs.urls)[:2], list(fleet_dbs.urls)[-1]]
    urls = {n: fleet_dbs.urls[n] for n in names}
    main, offsite = tmp_path / "main", tmp_path / "offsite"
    server = fleet_dbs.urls[names[0]].rsplit("/", 1)[0]
    extra = "\n".join([
        "verify_after_backup = true", "prune_after_backup = true",
        "[verify]", f'server = "{server}/postgres"', 'level = "facts"',
        "[retention]", "keep_last = 1", "keep_daily = 0", "keep_weekly = 0",
        "keep_monthly = 0",
        "[[repos]]", 'name = "main"', f'url = "{main.as_uri()}"', "primary = true",
        "[[repos]]", 'name = "offsite"', f'url = "{offsite.as_uri()}"',
        "retention = { keep_last = 2, keep_daily = 0, keep_weekly = 0, keep_monthly = 0 }"])
    cfg = write_config(tmp_path / "fleet.toml", urls, extra=extra, fleet={"window_hours": 1})
    settings = config.load({}, {}, str(cfg))
    clock = FakeClock(fleet.window_at(datetime.now(UTC), timedelta(hours=1)).start)
    first = run_shard(settings, Shard(0, 1), drill_for=_drill_for, clock=clock,
                      sleep=clock.sleep)
    assert sorted(first.backed_up) == sorted(names) and not first.missed
    primary, copy = open_storage(main.as_uri()), open_storage(offsite.as_uri())
    for name in names:
        assert first.jobs[name] == {"drill": "ok", "prune": "ok",
                                    "copy:offsite": "ok (1 copied), pruned 0"}, first.jobs
        record, _ = lease.read(primary, catalog.fleet_lease_key(name))
        assert record is not None and record.jobs == first.jobs[name]
        assert record.shard == "0/1" and record.done_window == first.window.index
        (drill,) = catalog.Catalog(primary).drills(name, first.backed_up[name])
        assert not isinstance(drill, catalog.Damaged) and drill.passed
    assert {n: [m.id for m in ms] for n, ms in backups(copy).items()} == \
        {n: [first.backed_up[n]] for n in names}
    # The next window: the primary keeps 1 (keep_last = 1), the copy 2 (its own policy).
    clock.at = first.window.end
    second = run_shard(settings, Shard(0, 1), drill_for=_drill_for, clock=clock,
                       sleep=clock.sleep)
    assert sorted(second.backed_up) == sorted(names)
    assert {n: [m.id for m in ms] for n, ms in backups(primary).items()} == \
        {n: [second.backed_up[n]] for n in names}
    assert {n: sorted(m.id for m in ms) for n, ms in backups(copy).items()} == \
        {n: sorted([first.backed_up[n], second.backed_up[n]]) for n in names}
    assert all(second.jobs[n]["copy:offsite"] == "ok (1 copied), pruned 0" for n in names)
    # A copy restores to its source.
    _restore_and_compare(offsite.as_uri(), second.backed_up[names[-1]], names[-1], fleet_dbs)


def test_a_worker_that_loses_its_lease_mid_backup_aborts_it_and_leaves_nothing(
        tmp_path: Path, fleet_dbs: Fleet, pgvault_logs: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """Another worker takes the lease over while the backup waits on a lock (as after a
    pause): the backup is aborted with one line naming the database and the taker, none
    of its objects is left, and the database still gets its one backup."""
    name = list(fleet_dbs.urls)[3]
    repo = tmp_path / "repo"
    settings = _settings(tmp_path / "fleet.toml", {name: fleet_dbs.urls[name]}, repo,
                         window_hours=1, lease_seconds=1)
    storage = open_storage(repo.as_uri())
    key = catalog.fleet_lease_key(name)
    blocker = psycopg.connect(fleet_dbs.urls[name])
    blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    reports: list[ShardReport] = []
    worker = threading.Thread(target=lambda: reports.append(run_shard(settings, Shard(0, 1))))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while _lease_holder(storage, name) is None or not \
                list(storage.list(catalog.lock_key(name))):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)  # pg_dump waits on the lock, its upload has begun
        while True:  # between two of the worker's renewals
            record, etag = lease.read(storage, key)
            assert record is not None
            taker = msgspec.structs.replace(
                record, holder="intruder 99 t", shard="5/7",
                expires=datetime.now(UTC) + timedelta(seconds=1.5))
            with contextlib.suppress(Conflict):
                lease.Lease.claim(storage, key, taker, etag)
                break
        time.sleep(0.8)  # the worker's next renewal is refused
    finally:
        blocker.rollback()
        blocker.close()
        worker.join(30)
    (report,) = reports
    lines = [r.getMessage() for r in pgvault_logs.records
             if r.levelno >= logging.WARNING and name in r.getMessage()]
    aborted = [r.getMessage() for r in pgvault_logs.records if r.name == "pgvault.fleet"
               and r.levelno >= logging.WARNING and "aborted" in r.getMessage()]
    assert len(aborted) == 1, lines
    assert not any("shutting down" in line for line in lines), lines
    assert f"backup of {name} aborted: its lease was taken over by intruder 99 t " \
           "(shard 5/7); its partial backup is removed" in aborted[0]
    assert aborted[0].endswith("none left)")
    assert report.lost == {name: "intruder 99 t (shard 5/7)"}
    # The intruder never renewed: the worker took the lease back and made the one backup.
    (manifest,) = backups(storage)[name]
    assert report.backed_up == {name: manifest.id}
    prefixes = {info.key.split("/")[2] for info in storage.list("backups/")}
    assert prefixes == {manifest.id}  # nothing of the aborted attempt
    _restore_and_compare(repo.as_uri(), manifest.id, name, fleet_dbs)


# ---------------------------------------------------------------- worker processes

def _lease_holder(storage: Storage, name: str) -> str | None:
    record, _ = lease.read(storage, catalog.fleet_lease_key(name))
    return record.holder if record is not None and record.state == "running" else None


def _simulate(tmp_path: Path, fleet_: Fleet, repo: str, urls: dict[str, str],
              storage: Storage, *, extra: str = "", env: dict[str, str] | None = None) -> None:
    cfg = write_config(tmp_path / "fleet.toml", urls, extra=extra)
    logs = tmp_path / "workers.log"
    # The database worker 2 of 3 is dumping when it is paused: its pg_dump waits on a lock.
    slow = next(n for n in urls if fleet.owner(n, 3) == 2)
    blocker = psycopg.connect(fleet_.urls[slow])
    blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    workers = [start_worker(f"{i}/3", cfg, repo, logs) for i in range(3)]
    try:
        deadline = time.monotonic() + 60  # a loaded machine: moto answers slowly
        while _lease_holder(storage, slow) is None or not \
                list(storage.list(catalog.lock_key(slow))):
            assert time.monotonic() < deadline, logs.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(workers[2].pid, signal.SIGSTOP)  # paused mid-backup, past its lease
        blocker.rollback()
        blocker.close()
        # SIGKILL worker 1 once it is under way, and start it again (as a Job would).
        while len(backups(storage)) < 6:
            assert time.monotonic() < deadline, logs.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(workers[1].pid, signal.SIGKILL)
        workers[1].wait()
        workers[1] = start_worker("1/3", cfg, repo, logs)
        # A replacement for the paused one, and a worker that thinks there are 2 shards.
        workers.append(start_worker("2/3", cfg, repo, logs))
        workers.append(start_worker("0/2", cfg, repo, logs))
        time.sleep(2 * 2 + 1)  # well past the paused worker's 2 s leases
        os.kill(workers[0].pid, signal.SIGKILL)  # and one more killed, restarted
        workers[0].wait()
        workers[0] = start_worker("0/3", cfg, repo, logs)
        os.kill(workers[2].pid, signal.SIGCONT)
        wait_all(workers, 120, logs)
    finally:
        for proc in workers:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
    found = backups(storage)
    counts = {name: len(found.get(name, [])) for name in urls}
    # Half-made backups: only the two SIGKILLed workers may leave one each (a killed
    # process cleans nothing up; prune collects them), never the paused one that woke up.
    made = {(m.database, m.id) for ms in found.values() for m in ms}
    partial = {tuple(info.key.split("/")[1:3]) for info in storage.list("backups/")} - made
    assert len(partial) <= 2 and not any(db == slow for db, _ in partial), partial
    assert counts == dict.fromkeys(urls, 1), {n: c for n, c in counts.items() if c != 1}
    intervals = [(m.started_at, m.finished_at) for ms in found.values() for m in ms]
    assert max_overlap(intervals) <= 3  # max_per_repository
    for server in {fleet_.server_of(n) for n in urls}:
        on_server = [(m.started_at, m.finished_at) for name, ms in found.items()
                     for m in ms if fleet_.server_of(name) == server]
        assert max_overlap(on_server) <= 1  # max_per_server
    text = logs.read_text()
    # The pause did what it is here for: its leases were taken over while it slept (the
    # database's, with its backup lock, or at least its cap slots), and it gave its backup
    # up when it woke.
    assert f"backup of {slow} aborted: its lease was taken over by" in text or \
        "a cap slot was taken over during backup" in text or \
        f"backup of {slow} aborted: its cap slot" in text, text[-3000:]
    reports = [json.loads(chunk) for chunk in _json_reports(logs.read_text())]
    assert reports and all(not r["missed"] for r in reports)
    leases = {name: lease.read(storage, catalog.fleet_lease_key(name))[0] for name in urls}
    assert all(r is not None and r.state == "done" for r in leases.values())
    slow_lease = leases[slow]
    assert slow_lease is not None and slow_lease.backup_id == found[slow][0].id
    for name in [slow, *random.sample(sorted(urls), 2)]:
        _restore_and_compare(repo, found[name][0].id, name, fleet_, env)


def _json_reports(text: str) -> list[str]:
    chunks, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{" and (depth or text[max(i - 1, 0)] in "\n"):
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                chunks.append(text[start:i + 1])
    return [c for c in chunks if '"shard"' in c]


def test_fleet_on_a_folder_survives_kills_and_a_pause(tmp_path: Path,
                                                      fleet_dbs: Fleet) -> None:  # noqa: F811
    repo = tmp_path / "repo"
    _simulate(tmp_path, fleet_dbs, repo.as_uri(), fleet_dbs.urls, open_storage(repo.as_uri()))


def test_fleet_on_s3_survives_kills_and_a_pause(tmp_path: Path, fleet_dbs: Fleet,  # noqa: F811
                                                s3_bucket: str, s3_server: str) -> None:
    urls = dict(list(fleet_dbs.urls.items())[:15] + list(fleet_dbs.urls.items())[-15:])
    from pgvault.storage.s3 import S3Options, S3Storage

    storage = S3Storage(s3_bucket, "fleet", S3Options(endpoint_url=s3_server,
                                                      region="us-east-1", path_style=True))
    extra = (f'[s3]\nendpoint_url = "{s3_server}"\nregion = "us-east-1"\npath_style = true')
    env = {"PGVAULT_S3__ENDPOINT_URL": s3_server, "PGVAULT_S3__PATH_STYLE": "true",
           "PGVAULT_S3__REGION": "us-east-1"}
    _simulate(tmp_path, fleet_dbs, f"s3://{s3_bucket}/fleet", urls, storage, extra=extra,
              env=env)


def test_run_refuses_a_bad_shard_and_a_config_without_databases(tmp_path: Path) -> None:
    proc = pgvault("run", "--shard", "3/3", "--repo", (tmp_path / "r").as_uri(), expect=2)
    assert "0..2" in proc.stderr
    proc = pgvault("run", "--repo", (tmp_path / "r").as_uri(), expect=3)
    assert "[[databases]]" in proc.stderr
    proc = pgvault("run", "--repo", (tmp_path / "r").as_uri(), expect=2,
                   env={"JOB_COMPLETION_INDEX": "1"})
    assert "JOB_COMPLETIONS" in proc.stderr


def test_memory_storage_runs_the_same_protocol() -> None:
    """The lease's window logic over a store with no files at all (a unit-level check)."""
    storage = MemoryStorage()
    key = catalog.fleet_lease_key("app")
    now = T0
    record = fleet.running("a 1 t", W, now, TIMING, None)
    held = lease.Lease.claim(storage, key, record, None)
    held.write(fleet.finished(held.record, now, "b1"))
    got, _ = lease.read(storage, key)
    assert fleet.decide("app", got, now + timedelta(hours=1), TIMING).action == "done"
    assert fleet.decide("app", got, now + DAY, TIMING).action == "take"


# ---------------------------------------------------------------- the deploy kit

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KIT = DEPLOY / "kustomize" / "fleet"
CHART = DEPLOY / "helm" / "pgvault"


def _kinds(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {doc["kind"]: doc for doc in docs if doc}
    assert len(kinds) == len([d for d in docs if d]), "one object of each kind"
    return kinds


def _check_kit(kinds: dict[str, dict[str, Any]], secret_keys: set[str],
               tmp_path: Path) -> config.Settings:
    """What matters in a rendered kit: an Indexed Job of N workers whose N the pods know,
    Forbid, least privilege, and a config pgvault itself loads whose every database URL
    comes from a file of the Secret's mount."""
    assert {"ServiceAccount", "ConfigMap", "CronJob", "PrometheusRule"} <= set(kinds)
    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    job = cron["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["JOB_COMPLETIONS"] == str(job["completions"])  # shard count = workers
    assert container["args"][2:4] == ["run", "--config"] and "--shard" not in container["args"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert kinds["ServiceAccount"]["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert not any(k in kinds for k in ("Role", "ClusterRole", "RoleBinding"))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_path = Path(mounts["config"]) / "pgvault.toml"
    assert container["args"][4] == str(config_path)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert volumes["secrets"]["secret"]["defaultMode"] == 0o400
    assert not any(e.get("valueFrom") for e in container["env"])  # secrets only as files
    # The embedded config loads, and every url_env has its _FILE in the Secret's mount.
    toml = tmp_path / "pgvault.toml"
    toml.write_text(kinds["ConfigMap"]["data"]["pgvault.toml"])
    toml.chmod(0o600)
    settings = config.load({}, {}, str(toml))
    assert settings.fleet.max_per_server >= 1 and len(settings.databases) >= 2
    for entry in settings.databases:
        path = env[f"{entry.url_env}_FILE"]
        assert path.startswith(mounts["secrets"] + "/")
        assert path.rsplit("/", 1)[1] in secret_keys
    # The shard of a pod comes from what Kubernetes sets: index 1 of those completions.
    shard = fleet.shard_from_environ({"JOB_COMPLETION_INDEX": "1", **env})
    assert shard == Shard(1, job["completions"])
    # The alerts name only metrics pgvault emits (the fleet's and the per-database ones).
    emitted = _emitted_metric_names()
    for group in kinds["PrometheusRule"]["spec"]["groups"]:
        for rule in group["rules"]:
            used = set(re.findall(r"\bpgvault_[a-z_]+", rule["expr"]))
            assert used and used <= emitted, (rule["alert"], used - emitted)
    return settings


def _emitted_metric_names() -> set[str]:
    from pgvault.metrics import Metrics
    from pgvault.model import Manifest
    from pgvault.ops.fleet import FleetStatus, fleet_metrics

    now = datetime.now(UTC)
    metrics = Metrics()
    metrics.update(DatabaseStatus(
        database="app", repository="file:///r", rpo_hours=24, rto_minutes=60, backups=1,
        newest=Manifest(id="x", database="app", started_at=now, finished_at=now,
                        pgvault_version="0", artifacts=[]), oldest_time=now))
    names = {family.name for family in metrics.collect()}
    status = FleetStatus(fleet.window_at(now, DAY), 2, [
        fleet.WindowState("app", 0, "missed", "never started")])
    names |= set(re.findall(r"^(pgvault_[a-z_]+)[{ ]", fleet_metrics(status).decode(), re.M))
    return names


def test_the_kustomize_base_is_an_indexed_job_of_n_workers_with_its_config(
        tmp_path: Path) -> None:
    """Rendered by kustomize (kubectl's) where it is installed, else the files as listed."""
    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        rendered = subprocess.run([kubectl, "kustomize", str(KIT)], capture_output=True,
                                  text=True, check=True).stdout
        docs = list(yaml.safe_load_all(rendered))
        assert all(d["metadata"].get("namespace") == "pgvault" for d in docs)
    else:
        kustomization = yaml.safe_load((KIT / "kustomization.yaml").read_text())
        docs = [yaml.safe_load((KIT / path).read_text()) for path in kustomization["resources"]]
    kinds = _kinds(docs)
    assert "Secret" not in kinds  # created out of band; the example only shows its keys
    example = yaml.safe_load((KIT / "secret.example.yaml").read_text())
    _check_kit(kinds, set(example["stringData"]), tmp_path)


def _helm(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    # scripts/bootstrap --test puts helm beside the venv's python when none is on PATH.
    venv_helm = Path(sys.executable).with_name("helm")
    helm = shutil.which("helm") or (str(venv_helm) if venv_helm.exists() else None)
    if helm is None:
        pytest.skip("helm is not installed (scripts/bootstrap should install it: see "
                    "deploy/README.md); the kustomize base's checks still ran")
    proc = subprocess.run([helm, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


def test_the_helm_chart_renders_the_same_kit_for_any_fleet(tmp_path: Path) -> None:
    """`helm lint --strict`, then `helm template` with the defaults and with a fleet of
    its own (3 workers, names helm must turn into variables); values.schema.json refuses
    what pgvault would refuse."""
    import yaml

    _helm("lint", "--strict", str(CHART))
    defaults = _kinds(list(yaml.safe_load_all(
        _helm("template", "fleet", str(CHART), "-n", "pgvault").stdout)))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    keys = {d["secretKey"] for d in values["databases"]} | set(values["secret"]["files"].values())
    settings = _check_kit(defaults, keys, tmp_path)
    assert [e.name for e in settings.databases] == [d["name"] for d in values["databases"]]
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({
        "workers": 3, "repo": "s3://acme-backups/fleet",
        "fleet": {"window_hours": 12, "max_per_server": 1, "max_per_repository": 6},
        "databases": [{"name": "orders-eu", "secretKey": "orders-eu-url"},
                      {"name": "billing.v2", "secretKey": "billing-url"},
                      {"name": "app", "secretKey": "app-url"}],
        "secret": {"name": "acme-fleet", "files": {}},
        "prometheusRule": {"enabled": True, "staleAfterWindows": 2}}))
    kinds = _kinds(list(yaml.safe_load_all(_helm(
        "template", "acme", str(CHART), "-n", "backups", "-f", str(mine)).stdout)))
    settings = _check_kit(kinds, {"orders-eu-url", "billing-url", "app-url"}, tmp_path)
    job = kinds["CronJob"]["spec"]["jobTemplate"]["spec"]
    assert job["completions"] == 3 and settings.fleet.window_hours == 12
    assert [e.url_env for e in settings.databases] == [
        "PGVAULT_DB_ORDERS_EU_URL", "PGVAULT_DB_BILLING_V2_URL", "PGVAULT_DB_APP_URL"]
    assert settings.repo == "s3://acme-backups/fleet"
    pod = job["template"]["spec"]
    assert pod["volumes"][1]["secret"]["secretName"] == "acme-fleet"
    stale = kinds["PrometheusRule"]["spec"]["groups"][0]["rules"][1]["expr"]
    assert stale.endswith("> 2 * 12 * 3600")
    # No Prometheus Operator: no PrometheusRule; no ServiceAccount made: the named one.
    off = _kinds(list(yaml.safe_load_all(_helm(
        "template", "x", str(CHART), "--set", "prometheusRule.enabled=false",
        "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=backup").stdout)))
    assert set(off) == {"ConfigMap", "CronJob"}
    assert off["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "serviceAccountName"] == "backup"
    for bad in ("workers=0", "databases[0].name=-bad", "fleet.lease_secs=5"):
        refused = _helm("template", "x", str(CHART), "--set", bad, expect=1)
        assert "values don't meet the specifications of the schema" in refused.stderr
