"""Monitoring without the daemon: notifiers, run history, status/check, metrics, JSON logs.

Real parts: the real CLI against a throwaway cluster, an HTTP server on loopback that
records webhooks, pings and Pushgateway pushes (a stand-in for Slack, healthchecks.io and
a Pushgateway, which cannot run here), an SMTP server (aiosmtpd) on loopback.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from cli_runner import one_line_error, pgvault
from dbcompare import assert_databases_equal
from fixtures_pg import NewName
from http_recorder import Recorder
from pgvault.catalog import Catalog, lock_key
from pgvault.events import Event, Fanout
from pgvault.lock import hold
from pgvault.model import VerifyCheck, VerifyReport
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage
from sampledb import fill_sized_database


@pytest.fixture
def small_db(pg_cluster: EphemeralCluster, new_name: NewName) -> str:
    name = new_name()
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    fill_sized_database(pg_cluster.url(name), 2000)
    return pg_cluster.url(name)


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[int, Mailbox]]:
    """An SMTP server on 127.0.0.1 (aiosmtpd) and the mails it received."""
    from aiosmtpd.controller import Controller

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, box
    controller.stop()


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pgvault.toml"
    path.write_text(text)
    path.chmod(0o600)  # it holds webhook URLs: secrets
    return str(path)


def metrics_of(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus text file, parsed by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text())
            for s in family.samples}


def restore_and_compare(source_url: str, repo: str, pg_cluster: EphemeralCluster,
                        new_name: NewName, *extra: str) -> None:
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
            *extra)
    assert_databases_equal(source_url, pg_cluster.url(target))


def test_fanout_gives_up_on_slow_and_failing_sinks_within_its_timeout() -> None:
    class Sink:
        def __init__(self, name: str, behaviour: Callable[[], None]) -> None:
            self.name = name
            self.behaviour = behaviour
            self.got: list[Event] = []

        def wants(self, event: Event) -> bool:
            return True

        def send(self, event: Event, timeout: float) -> None:
            self.behaviour()
            self.got.append(event)

    def boom() -> None:
        raise RuntimeError("HTTP 500 Internal Server Error")

    release = threading.Event()

    def hang() -> None:
        release.wait(30)

    good = Sink("good", lambda: None)
    sinks = [Sink("hangs", hang), Sink("fails", boom), good]
    failures: list[tuple[str, str]] = []
    fanout = Fanout(sinks, timeout=0.5,
                    on_failure=lambda sink, event, why: failures.append((sink.name, why)))
    started = time.monotonic()
    failed = fanout.emit(Event("backup.failed", "app", datetime.now(UTC), error="x"))
    took = time.monotonic() - started
    release.set()
    assert 0.4 < took < 1.5
    assert sorted(failed) == ["fails", "hangs"]
    assert dict(failures) == {"hangs": "no answer within 0.5s",
                              "fails": "HTTP 500 Internal Server Error"}
    assert len(good.got) == 1


def test_notifiers_that_fail_or_hang_never_break_a_backup(
    small_db: str, recorder: Recorder, tmp_path: Path, pg_cluster: EphemeralCluster,
    new_name: NewName
) -> None:
    repo = f"file://{tmp_path / 'repo'}"
    token = "T0KEN-" + uuid.uuid4().hex
    cfg = write_config(tmp_path, f"""
repo = "{repo}"
[notify]
events = ["all"]
timeout_seconds = 1
webhook_url = "{recorder.url}/hook/{token}"
slack_webhook_url = "{recorder.url}/fail/slack/{token}"
discord_webhook_url = "{recorder.url}/hang/discord/{token}"
ping_url = "{recorder.url}/ping/{token}"
""")
    started = time.monotonic()
    proc = pgvault("--log-format", "json", "backup", "--config", cfg, "--dbname", small_db)
    took = time.monotonic() - started
    # Two events (started, succeeded) wait at most 1 s each for the hanging notifier.
    assert took < 20
    logs = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    final = [entry for entry in logs if entry.get("event") == "backup.succeeded"]
    assert len(final) == 1 and final[0]["duration_seconds"] > 0 and final[0]["size_bytes"] > 0
    failures = {entry["message"] for entry in logs if entry["level"] == "warning"}
    assert any("via slack failed: HTTP 500" in m for m in failures), failures
    # The hang is a read timeout; on a saturated machine the recorder may not even accept
    # within the second, which is a connect timeout: either way a bounded, named failure.
    assert any("via discord failed: no answer within 1s" in m
               or "via discord failed: cannot reach the server: timed out" in m
               for m in failures), failures
    assert token not in proc.stdout + proc.stderr, "a webhook URL was printed"

    hooks = [r.json() for r in recorder.on("/hook/")]
    assert [h["event"] for h in hooks] == ["backup.started", "backup.succeeded"]
    done = hooks[1]
    backup_id = json.loads(pgvault("list", "--json", "--repo", repo).stdout)[0]["id"]
    assert done["backup_id"] == backup_id and done["status"] == "success"
    assert done["database"] == small_db.rsplit("/", 1)[-1] and done["size_bytes"] > 0
    assert [r.path for r in recorder.on("/ping/")] == [f"/ping/{token}/start", f"/ping/{token}"]
    restore_and_compare(small_db, repo, pg_cluster, new_name)


def test_failure_is_recorded_announced_and_cleared_by_the_next_success(
    recorder: Recorder, smtp: tuple[int, Mailbox], tmp_path: Path,
    pg_cluster: EphemeralCluster, new_name: NewName
) -> None:
    port, mailbox = smtp
    repo = f"file://{tmp_path / 'repo'}"
    prom = tmp_path / "pgvault.prom"
    cfg = write_config(tmp_path, f"""
repo = "{repo}"
[notify]
webhook_url = "{recorder.url}/hook"
ping_url = "{recorder.url}/ping/check-1"
[notify.email]
smtp_host = "127.0.0.1"
smtp_port = {port}
security = "none"
sender = "pgvault@example.com"
to = ["oncall@example.com"]
[metrics]
textfile = "{prom}"
pushgateway_url = "{recorder.url}/gateway"
""")
    name = new_name()  # not created yet: the first backup fails to connect
    url = pg_cluster.url(name)
    proc = pgvault("backup", "--config", cfg, "--dbname", url, expect=4)
    assert name in one_line_error(proc)

    (hook,) = recorder.wait_for("/hook", 1)
    failed = hook.json()
    assert failed["event"] == "backup.failed" and failed["status"] == "failure"
    assert name in failed["error"] and failed["duration_seconds"] is not None
    assert [r.path for r in recorder.on("/ping/")] == ["/ping/check-1/start",
                                                       "/ping/check-1/fail"]
    assert name in recorder.on("/ping/check-1/fail")[0].body.decode()
    (mail,) = mailbox.messages
    assert mail["Subject"] == f"pgvault: backup of {name} failed"
    assert name in mail.get_payload()
    samples = metrics_of(prom)
    labels = (("database", name),)
    assert samples[("pgvault_backup_failures_total", labels)] == 1
    assert samples[("pgvault_backup_last_success_timestamp_seconds", labels)] == 0
    assert samples[("pgvault_backup_last_failure_timestamp_seconds", labels)] > 0
    (push,) = recorder.on("/gateway")
    assert push.method == "POST"  # push-add: never replaces the group's other series
    assert push.path == f"/gateway/metrics/job/pgvault/database/{name}"
    pushed = {s.name for f in text_string_to_metric_families(push.body.decode())
              for s in f.samples}
    assert "pgvault_backup_last_success_timestamp_seconds" in pushed

    check = pgvault("check", "--config", cfg, "--dbname", name, expect=2)
    assert check.stdout.startswith("PGVAULT CRITICAL - ")
    assert "no complete backup" in check.stdout and "last backup failed" in check.stdout

    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    fill_sized_database(url, 500)
    pgvault("backup", "--config", cfg, "--dbname", url)
    events = [r.json()["event"] for r in recorder.wait_for("/hook", 2)]
    assert events == ["backup.failed", "backup.recovered"]
    assert [m["Subject"] for m in mailbox.messages][-1] == f"pgvault: backup of {name} recovered"
    samples = metrics_of(prom)
    assert samples[("pgvault_backup_failures_total", labels)] == 1
    assert samples[("pgvault_backup_last_success_timestamp_seconds", labels)] > 0
    assert samples[("pgvault_backups", labels)] == 1
    assert samples[("pgvault_backup_last_size_bytes", labels)] > 0

    ok = pgvault("check", "--config", cfg, "--dbname", name, "--warn-drill-age", "0")
    line = ok.stdout.strip()
    assert line.startswith(f"PGVAULT OK - {name}: newest backup 0.0h old (RPO 24h) | "), line
    perf = dict(item.split("=", 1) for item in line.split(" | ", 1)[1].split())
    assert perf[f"'{name}_backups'"] == "1;;;0"
    assert perf[f"'{name}_age'"].endswith("s;;86400;0")
    # Without --warn-drill-age 0, a database never restore-drilled is a WARNING.
    warn = pgvault("check", "--config", cfg, "--dbname", name, expect=1)
    assert "never restore-drilled" in warn.stdout
    restore_and_compare(url, repo, pg_cluster, new_name)


def test_check_turns_critical_when_backups_stop_and_follows_drills(
    small_db: str, tmp_path: Path, pg_cluster: EphemeralCluster, new_name: NewName
) -> None:
    """A good last run is not enough: time passing alone makes the check CRITICAL."""
    repo_dir = tmp_path / "repo"
    repo = f"file://{repo_dir}"
    cfg = write_config(tmp_path, f"""
repo = "{repo}"
[objectives]
rpo_hours = 0.001   # 3.6 seconds
rto_minutes = 1
[check]
warn_drill_age_days = 0
""")
    pgvault("backup", "--config", cfg, "--dbname", small_db)
    name = small_db.rsplit("/", 1)[-1]
    assert pgvault("check", "--config", cfg, "-d", name).stdout.startswith("PGVAULT OK")
    status = json.loads(pgvault("status", "--config", cfg, "-d", name, "--json").stdout)[0]
    assert status["rpo_met"] is True and status["backups"] == 1 and status["state"] == "OK"
    # A backup that started within the RPO and still runs: WARNING, not CRITICAL, meanwhile.
    with hold(open_storage(repo), lock_key(name), "backup", stale_after=timedelta(hours=1)):
        time.sleep(3.8)
        running = pgvault("check", "--config", cfg, "-d", name, expect=1)
        assert "a backup is running" in running.stdout
    crit = pgvault("check", "--config", cfg, "-d", name, expect=2)
    assert crit.stdout.startswith(f"PGVAULT CRITICAL - {name}: newest backup is ")
    assert "(RPO 0.001h)" in crit.stdout
    shown = pgvault("status", "--config", cfg, "-d", name, expect=12)
    text = shown.stdout
    assert "RPO 0.001h MISSED" in text and "state          CRITICAL" in text
    assert one_line_error(shown).startswith(f"pgvault: CRITICAL: {name}: newest backup is ")
    as_json = pgvault("status", "--config", cfg, "-d", name, "--json", expect=12)
    assert json.loads(as_json.stdout)[0]["state"] == "CRITICAL"

    # Drill records decide the rest: a failed drill, then a passing one that was too slow.
    catalog = Catalog(open_storage(repo))
    manifest = catalog.get("latest", name)
    relaxed = write_config(tmp_path, cfg_text(repo, rpo_hours=24, rto_minutes=1))

    def drill(passed: bool, restore_seconds: float) -> None:
        now = datetime.now(UTC)
        catalog.record_drill(VerifyReport(
            backup_id=manifest.id, database=name, level="facts",
            started_at=now, finished_at=now + timedelta(seconds=restore_seconds + 1),
            checks=[VerifyCheck(level="facts", name="row counts",
                                status="pass" if passed else "fail",
                                detail="" if passed else "orders: 10 rows, expected 12")],
            restore_seconds=restore_seconds, rto_objective_seconds=60,
            rto_met=restore_seconds <= 60))

    drill(False, 5)
    failed = pgvault("check", "--config", relaxed, "-d", name, expect=2)
    assert "last restore drill failed: row counts: orders: 10 rows, expected 12" in failed.stdout
    time.sleep(0.01)
    drill(True, 90)
    slow = pgvault("check", "--config", relaxed, "-d", name, expect=2)
    assert "last restore drill took 1.5m (RTO 1m)" in slow.stdout
    assert f"'{name}_restore'=90s;;60;0" in slow.stdout
    restore_and_compare(small_db, repo, pg_cluster, new_name)


def cfg_text(repo: str, *, rpo_hours: float, rto_minutes: float) -> str:
    return (f'repo = "{repo}"\n[objectives]\nrpo_hours = {rpo_hours}\n'
            f"rto_minutes = {rto_minutes}\n[check]\nwarn_drill_age_days = 0\n")


def test_check_is_unknown_when_it_cannot_look(tmp_path: Path) -> None:
    proc = pgvault("check", "--config", str(tmp_path / "missing.toml"), expect=3)
    assert proc.stdout.startswith("PGVAULT UNKNOWN - config file ")
    (tmp_path / "empty").mkdir()
    empty = pgvault("check", "--repo", f"file://{tmp_path / 'empty'}", expect=3)
    assert "no database configured and no backups" in empty.stdout


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_repository_that_does_not_exist_is_an_error_never_no_backups_yet(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A typo in --repo (a missing folder, a missing bucket) must not look like an empty one."""
    if backend == "s3":
        env = {"PGVAULT_S3__ENDPOINT_URL": request.getfixturevalue("s3_server"),
               "PGVAULT_S3__PATH_STYLE": "true",
               "PGVAULT_REPO": f"s3://pgvault-no-such-bucket-{uuid.uuid4().hex[:8]}/app"}
        missing = "no bucket pgvault-no-such-bucket-"
    else:
        env = {"PGVAULT_REPO": f"file://{tmp_path / 'typo'}"}
        missing = f"no folder {tmp_path / 'typo'}"
    for command in (["list"], ["list", "--json"], ["status"], ["status", "-d", "app"],
                    ["status", "--json"], ["prune"], ["prune", "--dry-run"]):
        line = one_line_error(pgvault(*command, env=env, expect=5))
        assert "does not exist" in line and missing in line, (command, line)
        assert "no backups yet" not in line
    for command in (["check"], ["check", "-d", "app"]):
        check = pgvault(*command, env=env, expect=3)
        assert check.stdout.startswith("PGVAULT UNKNOWN - repository ")
        assert "does not exist" in check.stdout and missing in check.stdout
    assert "repository does not exist" in pgvault("check", "--help").stdout
    if backend == "file":
        assert not (tmp_path / "typo").exists()  # reading never creates it


def test_status_exit_code_follows_what_it_shows(tmp_path: Path) -> None:
    """An existing repository without a backup of a configured database is CRITICAL: exit 12."""
    (tmp_path / "repo").mkdir()
    env = {"PGVAULT_REPO": f"file://{tmp_path / 'repo'}"}
    proc = pgvault("status", "-d", "app", env=env, expect=12)
    assert "state          CRITICAL: no complete backup" in proc.stdout
    assert one_line_error(proc).startswith("pgvault: CRITICAL: app: no complete backup")
    assert pgvault("check", "-d", "app", env=env, expect=2).stdout.startswith(
        "PGVAULT CRITICAL - app: no complete backup")
    # With nothing configured and nothing stored there is nothing to judge: exit 0.
    assert "no backups in the repository" in pgvault("status", env=env).stdout
    assert pgvault("list", env=env).stdout == "no backups yet\n"
    text = pgvault("status", "--help").stdout
    assert "12  a database shown is CRITICAL" in text and "5   the repository" in text
