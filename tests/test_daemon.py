"""`pgvault daemon` as a real process: fast schedules, /metrics, stale alerts, SIGTERM.

The daemon runs against a throwaway cluster with "@every 1s"-style schedules; webhooks
go to a recording HTTP server on loopback; /metrics is parsed with prometheus_client's
parser. Every backup that matters is restored and compared with its source.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from cli_runner import PGVAULT, pgvault
from dbcompare import assert_databases_equal
from fixtures_pg import NewName
from http_recorder import Recorder
from pgvault import schedule
from pgvault.errors import ConfigError
from pgvault.pg.cluster import EphemeralCluster
from sampledb import fill_sized_database

# -- schedules (pure) -------------------------------------------------------------------

def fires(expr: str, start: datetime, count: int = 3, timezone: str = "UTC") -> list[str]:
    trigger = schedule.trigger(expr, timezone)
    out = []
    when = start
    for _ in range(count):
        when = trigger.get_next_fire_time(None, when)
        out.append(when.strftime("%a %Y-%m-%d %H:%M %Z"))
        when = when.replace(second=when.second + 1) if when.second < 59 else when
    return out


@pytest.mark.parametrize("expr, expected", [
    ("0 1 * * *", ["Wed 2026-11-25 01:00 UTC", "Thu 2026-11-26 01:00 UTC",
                   "Fri 2026-11-27 01:00 UTC"]),
    # Cron's 0 and 7 are Sunday (APScheduler 3's own 0 is Monday).
    ("0 1 * * 0", ["Sun 2026-11-29 01:00 UTC", "Sun 2026-12-06 01:00 UTC",
                   "Sun 2026-12-13 01:00 UTC"]),
    ("0 1 * * 7", ["Sun 2026-11-29 01:00 UTC", "Sun 2026-12-06 01:00 UTC",
                   "Sun 2026-12-13 01:00 UTC"]),
    ("15 2 * * 1-5", ["Wed 2026-11-25 02:15 UTC", "Thu 2026-11-26 02:15 UTC",
                      "Fri 2026-11-27 02:15 UTC"]),
    ("0 0 * * */3", ["Wed 2026-11-25 00:00 UTC", "Sat 2026-11-28 00:00 UTC",
                     "Sun 2026-11-29 00:00 UTC"]),
    ("@weekly", ["Sun 2026-11-29 00:00 UTC", "Sun 2026-12-06 00:00 UTC",
                 "Sun 2026-12-13 00:00 UTC"]),
    ("@monthly", ["Tue 2026-12-01 00:00 UTC", "Fri 2027-01-01 00:00 UTC",
                  "Mon 2027-02-01 00:00 UTC"]),
])
def test_cron_expressions_mean_what_cron_means(expr: str, expected: list[str]) -> None:
    assert fires(expr, datetime(2026, 11, 25, tzinfo=UTC)) == expected


def test_timezone_moves_the_schedule() -> None:
    got = fires("0 1 * * *", datetime(2026, 11, 25, tzinfo=UTC), 1, "Europe/Berlin")
    assert got == ["Wed 2026-11-25 01:00 CET"]


@pytest.mark.parametrize("expr, message", [
    ("0 0 1 * * *", "has 6 fields; pgvault takes 5-field cron (minute hour day month weekday)"),
    ("0 1 * *", "has 4 fields"),
    ("61 1 * * *", "is not a valid cron expression"),
    ("0 1 1 * 1", "restricts both day of month and weekday"),
    ("@reboot", "set run_on_start = true"),
    ("@fortnightly", "unknown macro"),
    ("0 1 * * 8", "bad weekday field"),
])
def test_bad_schedules_are_refused_with_a_hint(expr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"schedule\.backup") as caught:
        schedule.trigger(expr, what="schedule.backup")
    assert message in str(caught.value)


def test_a_run_missed_while_down_is_due_once() -> None:
    now = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    assert schedule.due("0 1 * * *", "UTC", datetime(2026, 11, 24, 1, 0, tzinfo=UTC), now)
    assert not schedule.due("0 1 * * *", "UTC", datetime(2026, 11, 25, 1, 0, tzinfo=UTC), now)
    assert schedule.due("0 1 * * *", "UTC", None, now)  # never ran: due
    assert schedule.due("@every 6h", "UTC", datetime(2026, 11, 25, 2, 59, tzinfo=UTC), now)
    assert not schedule.due("@every 6h", "UTC", datetime(2026, 11, 25, 3, 1, tzinfo=UTC), now)


# -- the daemon process -----------------------------------------------------------------



def create_db(pg_cluster: EphemeralCluster, name: str, rows: int) -> str:
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    fill_sized_database(pg_cluster.url(name), rows)
    return pg_cluster.url(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DaemonProcess:
    """A running `pgvault daemon`, its HTTP address and its log file."""

    def __init__(self, tmp_path: Path, config: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log_path = tmp_path / f"daemon-{self.port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
        for name in ("DATABASE_URL", "DIRECT_URL", "PGDATABASE", "PGPASSWORD"):
            full_env.pop(name, None)
        full_env.update(env)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [PGVAULT, "--log-format", "json", "daemon", "--config", config,
                 "--listen", f"127.0.0.1:{self.port}"],
                env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, body = self.get("/metrics")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples}

    def wait_until(self, what: str, test: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited early:\n{self.log()}"
            try:
                if test():
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pgvault.toml"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def restore_and_compare(source_url: str, repo: str, pg_cluster: EphemeralCluster,
                        new_name: NewName, database: str, env: dict[str, str] | None = None,
                        ) -> None:
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
            "--from-database", database, env=env)
    assert_databases_equal(source_url, pg_cluster.url(target))


def test_daemon_backs_up_several_databases_serves_metrics_and_stops_on_sigterm(
    pg_cluster: EphemeralCluster, new_name: NewName, recorder: Recorder, tmp_path: Path,
    daemons: list[DaemonProcess]
) -> None:
    first, second = new_name(), new_name()
    urls = {first: create_db(pg_cluster, first, 1500), second: create_db(pg_cluster, second, 300)}
    repo = f"file://{tmp_path / 'repo'}"
    cfg = write_config(tmp_path, f"""
repo = "{repo}"
[schedule]
backup = "@every 2s"
freshness = "@every 1s"
[daemon]
max_concurrency = 1
[notify]
events = ["backup.started", "backup.succeeded", "backup.failed"]
webhook_url = "{recorder.url}/hook"
[[databases]]
name = "{first}"
[[databases]]
name = "{second}"
retention = {{ keep_last = 1, keep_daily = 0, keep_weekly = 0, keep_monthly = 0 }}
prune_after_backup = true
""")
    # One server for both entries: each takes DATABASE_URL with its own database name.
    daemon = DaemonProcess(tmp_path, cfg, {"DATABASE_URL": pg_cluster.url()})
    daemons.append(daemon)

    def backups(name: str) -> float:
        return daemon.metrics().get(("pgvault_backups", (("database", name),)), 0)

    def succeeded(name: str) -> int:
        return len([r for r in recorder.on("/hook") if r.json()["event"] == "backup.succeeded"
                    and r.json()["database"] == name])

    daemon.wait_until("two backups of each database",
                      lambda: succeeded(first) >= 2 and succeeded(second) >= 2)
    samples = daemon.metrics()
    one = (("database", first),)
    assert samples[("pgvault_backups", one)] >= 2
    assert samples[("pgvault_backup_last_size_bytes", one)] > 0
    assert samples[("pgvault_backup_last_success_timestamp_seconds", one)] > time.time() - 60
    assert samples[("pgvault_backup_failures_total", one)] == 0
    assert samples[("pgvault_rpo_objective_seconds", one)] == 86400
    # keep_last = 1 with prune after each backup: the second database keeps one backup.
    assert samples[("pgvault_backups", (("database", second),))] == 1
    for job in ("backup", "freshness"):
        when = samples[("pgvault_schedule_next_run_timestamp_seconds",
                        (("database", first), ("job", job)))]
        assert time.time() - 5 < when < time.time() + 5
    assert not any("backup_id" in dict(labels) for _, labels in samples)

    assert daemon.get("/healthz") == (200, b"ok\n")
    code, body = daemon.get("/status")
    status = json.loads(body)
    assert code == 200 and [d["database"] for d in status["databases"]] == [first, second]
    entry = status["databases"][0]
    assert entry["rpo_met"] is True and entry["newest"]["id"] and "backup" in entry["next_runs"]

    # max_concurrency = 1: a backup starts only after the previous one ended.
    events = [r.json() for r in recorder.on("/hook")]
    running = 0
    for event in events:
        running += {"backup.started": 1}.get(event["event"], -1)
        assert running in (0, 1), [e["event"] for e in events]

    assert daemon.stop() == 0
    logs = daemon.log_entries()
    assert logs[-1]["message"] == "pgvault daemon stopped"
    finals = [e for e in logs if e.get("event") == "backup.succeeded"]
    assert finals and all(e["duration_seconds"] > 0 and e["size_bytes"] > 0 for e in finals)
    for name, url in urls.items():
        restore_and_compare(url, repo, pg_cluster, new_name, name)


def test_stale_alert_fires_when_backups_stop(
    pg_cluster: EphemeralCluster, new_name: NewName, recorder: Recorder, tmp_path: Path,
    daemons: list[DaemonProcess]
) -> None:
    name = new_name()
    url = create_db(pg_cluster, name, 300)
    repo = f"file://{tmp_path / 'repo'}"
    pgvault("backup", "--dbname", url, "--repo", repo)
    cfg = write_config(tmp_path, f"""
repo = "{repo}"
database = "{url}"
[objectives]
rpo_hours = 0.001  # 3.6 s
[schedule]
backup = "0 1 1 1 *"  # not due for months, and the backup above is recent: no catch-up
freshness = "@every 1s"
[notify]
webhook_url = "{recorder.url}/hook"
""")
    daemon = DaemonProcess(tmp_path, cfg, {})
    daemons.append(daemon)
    stale = recorder.wait_for("/hook", 1, timeout=30)
    assert stale, daemon.log()
    alert = stale[0].json()
    assert alert["event"] == "backup.stale" and alert["database"] == name
    assert "RPO objective 0.001h" in alert["error"]
    status = json.loads(daemon.get("/status")[1])["databases"][0]
    assert status["stale"] is True and status["state"] == "CRITICAL"
    time.sleep(1.5)
    assert len(recorder.on("/hook")) == 1, "one alert per stale episode"
    assert daemon.stop() == 0
    assert json.loads(pgvault("list", "--json", "--repo", repo).stdout).__len__() == 1
    restore_and_compare(url, repo, pg_cluster, new_name, name)


def test_sigterm_during_a_backup_aborts_it_cleanly_and_exits_0(
    pg_cluster: EphemeralCluster, new_name: NewName, recorder: Recorder, tmp_path: Path,
    daemons: list[DaemonProcess], s3_server: str, s3_bucket: str, s3_client: Any
) -> None:
    name = new_name()
    url = create_db(pg_cluster, name, 100)
    with psycopg.connect(url) as conn:  # 16 MB of random bytes: 32 MB of dump, 17 MB stored
        conn.execute("CREATE TABLE blobs (id int PRIMARY KEY, data bytea)")
        conn.execute("INSERT INTO blobs SELECT i, (SELECT decode(string_agg(md5(random()::text"
                     " || i || j), ''), 'hex') FROM generate_series(1, 6250) j) "
                     "FROM generate_series(1, 160) i")
    repo = f"s3://{s3_bucket}/vault"
    s3_env = {"PGVAULT_S3__ENDPOINT_URL": s3_server, "PGVAULT_S3__PATH_STYLE": "true"}
    # zstd level 12 on one thread takes ~6 s here: slow enough to be caught mid-upload.
    cfg = write_config(tmp_path, f"""
repo = "{repo}"
database = "{url}"
[s3]
part_size_mb = 5
[compression]
level = 12
threads = 1
[schedule]
backup = "0 1 * * *"  # an empty repository is due at start
[daemon]
grace_seconds = 0
[notify]
events = ["all"]
webhook_url = "{recorder.url}/hook"
""")
    daemon = DaemonProcess(tmp_path, cfg, s3_env)
    daemons.append(daemon)
    started = recorder.wait_for("/hook", 1, timeout=30)
    assert started and started[0].json()["event"] == "backup.started", daemon.log()
    daemon.wait_until("data flowing to S3", lambda: bool(
        s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")), timeout=30)
    assert daemon.stop() == 0
    events = [r.json()["event"] for r in recorder.on("/hook")]
    assert events == ["backup.started"], "an abort on shutdown is logged, not announced"
    assert any("aborted" in e["message"] for e in daemon.log_entries()), daemon.log()
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert [k for k in keys if not k.startswith("vault/status/")] == [], keys
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    # Nothing half-done blocks the next run: it succeeds and restores.
    pgvault("backup", "--dbname", url, "--repo", repo, "--level", "1", env=s3_env)
    restore_and_compare(url, repo, pg_cluster, new_name, name, env=s3_env)


def test_daemon_drills_each_backup_after_taking_it(
    pg_cluster: EphemeralCluster, new_name: NewName, recorder: Recorder, tmp_path: Path,
    daemons: list[DaemonProcess]
) -> None:
    name = new_name()
    url = create_db(pg_cluster, name, 500)
    repo = f"file://{tmp_path / 'repo'}"
    cfg = write_config(tmp_path, f"""
repo = "{repo}"
database = "{url}"
[schedule]
backup = "0 1 1 1 *"    # an empty repository is due at start
verify = "after-backup"
[verify]
server = "{pg_cluster.url()}"
level = "facts"
[notify]
events = ["backup.succeeded", "verify.succeeded", "verify.failed"]
webhook_url = "{recorder.url}/hook"
""")
    daemon = DaemonProcess(tmp_path, cfg, {})
    daemons.append(daemon)
    hooks = recorder.wait_for("/hook", 2, timeout=60)
    assert [h.json()["event"] for h in hooks] == ["backup.succeeded", "verify.succeeded"], (
        daemon.log())
    drilled = hooks[1].json()
    assert drilled["backup_id"] == hooks[0].json()["backup_id"]
    assert drilled["details"]["level"] == "facts" and drilled["details"]["restore_seconds"] > 0
    one = (("database", name),)
    daemon.wait_until("drill metrics", lambda: daemon.metrics().get(
        ("pgvault_verify_last_status", one)) == 1)
    samples = daemon.metrics()
    assert samples[("pgvault_restore_last_duration_seconds", one)] > 0
    assert samples[("pgvault_verify_last_success_timestamp_seconds", one)] > time.time() - 60
    assert daemon.stop() == 0
    status = json.loads(pgvault("status", "--repo", repo, "-d", name, "--json").stdout)[0]
    assert status["last_drill"]["passed"] is True and status["rto_met"] is True
    restore_and_compare(url, repo, pg_cluster, new_name, name)


def test_a_failed_backup_is_retried_with_backoff_and_only_a_final_failure_is_announced(
    pg_cluster: EphemeralCluster, new_name: NewName, recorder: Recorder, tmp_path: Path,
    daemons: list[DaemonProcess]
) -> None:
    template, name = new_name(), new_name()
    create_db(pg_cluster, template, 300)
    url = pg_cluster.url(name)  # does not exist yet: the first attempts fail to connect
    repo = f"file://{tmp_path / 'repo'}"
    cfg = write_config(tmp_path, f"""
repo = "{repo}"
database = "{url}"
[schedule]
backup = "0 1 1 1 *"      # an empty repository is due at start
retries = 3
retry_backoff_seconds = 1  # attempts at 0 s, 1 s, 3 s, 7 s
[notify]
events = ["all"]
webhook_url = "{recorder.url}/hook"
""")
    daemon = DaemonProcess(tmp_path, cfg, {})
    daemons.append(daemon)
    daemon.wait_until("a failed first attempt", lambda: "attempt 1 of 4 failed" in daemon.log())
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:  # appears complete at once
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)))
    done = recorder.wait_for("/hook", match=lambda r: r.json()["event"] == "backup.succeeded")
    assert done, daemon.log()
    events = [r.json()["event"] for r in recorder.on("/hook")]
    assert "backup.failed" not in events and "backup.recovered" not in events, events
    assert events.count("backup.started") >= 2
    history = json.loads(pgvault("status", "--repo", repo, "-d", name, "--json").stdout)[0]
    assert history["failures_total"] == events.count("backup.started") - 1
    assert history["failing"] is False
    assert daemon.stop() == 0
    restore_and_compare(pg_cluster.url(template), repo, pg_cluster, new_name, name)
