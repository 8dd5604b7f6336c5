"""The deploy kit is checked by the tools that will read it, where they exist here.

promtool (check rules, and the rule unit tests) comes from Debian's prometheus package
(scripts/bootstrap --test extracts just the binary into .venv/bin); systemd-analyze
verifies the units when systemd is installed. Without them, the structural checks below
still run. Docker and Kubernetes cannot run here: their files are parsed and checked for
the settings that matter, and the config they embed is loaded by pgvault itself.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgvault import config, schedule
from pgvault.metrics import Metrics
from pgvault.model import Manifest
from pgvault.ops.status import DatabaseStatus, Drill

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in [Path(sys.executable).with_name(name)] if p.exists()), None)


def emitted_metric_names() -> set[str]:
    """Every metric family name pgvault exposes, from the real collector."""
    now = datetime.now(UTC)
    manifest = Manifest(id="x", database="app", started_at=now, finished_at=now,
                        pgvault_version="0", artifacts=[])
    metrics = Metrics()
    metrics.update(DatabaseStatus(
        database="app", repository="file:///r", rpo_hours=24, rto_minutes=60, backups=1,
        newest=manifest, oldest_time=now, drill_last_success=now,
        drill=Drill(backup_id="x", level="facts", started_at=now, finished_at=now, passed=True,
                    restore_seconds=1.0)))
    metrics.notification_failed("app", "slack")
    metrics.next_runs = lambda: {("app", "backup"): now}
    names = set()
    for family in metrics.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_alert_rules_name_only_metrics_pgvault_emits() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/pgvault-rules.yml").read_text())
    emitted = emitted_metric_names()
    alerts = {}
    for rule in rules["groups"][0]["rules"]:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        alerts[rule["alert"]] = rule
        used = set(re.findall(r"\bpgvault_[a-z_]+", rule["expr"]))
        assert used and used <= emitted, (rule["alert"], used - emitted)
    assert {"PgvaultBackupStale", "PgvaultBackupNeverSucceeded", "PgvaultMetricsAbsent",
            "PgvaultBackupFailing", "PgvaultBackupSizeDropped", "PgvaultDrillFailed",
            "PgvaultDrillStale"} <= set(alerts)


def test_issue_metric_names_are_emitted() -> None:
    assert {
        "pgvault_backup_last_success_timestamp_seconds",
        "pgvault_backup_last_failure_timestamp_seconds",
        "pgvault_backup_last_duration_seconds", "pgvault_backup_last_size_bytes",
        "pgvault_backup_failures_total", "pgvault_backups",
        "pgvault_oldest_backup_timestamp_seconds",
        "pgvault_verify_last_success_timestamp_seconds", "pgvault_verify_last_status",
        "pgvault_restore_last_duration_seconds", "pgvault_schedule_next_run_timestamp_seconds",
        "pgvault_notification_failures_total",
    } <= emitted_metric_names()


@pytest.mark.skipif(tool("promtool") is None, reason="promtool not installed (scripts/bootstrap "
                    "--test fetches it); the structural rule checks above still ran")
def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool = tool("promtool")
    assert promtool is not None
    folder = DEPLOY / "prometheus"
    check = subprocess.run([promtool, "check", "rules", "pgvault-rules.yml"], cwd=folder,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", "pgvault-rules.test.yml"], cwd=folder,
                          capture_output=True, text=True, check=False)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def unit_file(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def test_systemd_units_structure() -> None:
    timer = unit_file("pgvault-backup.timer")["Timer"]
    assert timer["Persistent"] == "true" and timer["RandomizedDelaySec"]
    assert timer["OnCalendar"] == "*-*-* 01:00:00 UTC"
    service = unit_file("pgvault-backup.service")["Service"]
    assert service["Type"] == "oneshot" and " backup " in service["ExecStart"]
    daemon = unit_file("pgvault-daemon.service")["Service"]
    assert " daemon " in daemon["ExecStart"]
    # systemd must wait longer than the daemon's grace period before it kills.
    assert int(daemon["TimeoutStopSec"]) > config.DaemonSettings().grace_seconds


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    pgvault = str(Path(sys.executable).with_name("pgvault"))
    for name in ("pgvault-backup.service", "pgvault-backup.timer", "pgvault-daemon.service"):
        text = (DEPLOY / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/pgvault", pgvault))
    files = [str(tmp_path / n) for n in ("pgvault-backup.timer", "pgvault-backup.service",
                                         "pgvault-daemon.service")]
    proc = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calendar = subprocess.run(["systemd-analyze", "calendar", "*-*-* 01:00:00 UTC"],
                              capture_output=True, text=True, check=False)
    assert calendar.returncode == 0 and "01:00:00 UTC" in calendar.stdout


def k8s(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if doc]


def test_kubernetes_cronjob_forbids_overlap_and_runs_a_backup() -> None:
    (job,) = k8s("cronjob.yaml")
    assert job["kind"] == "CronJob" and job["spec"]["concurrencyPolicy"] == "Forbid"
    schedule.trigger(job["spec"]["schedule"], job["spec"]["timeZone"])
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert "backup" in container["args"]


def test_kubernetes_daemon_deployment_and_its_config(tmp_path: Path) -> None:
    docs = {doc["kind"]: doc for doc in k8s("daemon.yaml")}
    deployment = docs["Deployment"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][-3:] == ["daemon", "--config", "/etc/pgvault/pgvault.toml"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The embedded config is one pgvault accepts, and its grace fits the pod's.
    toml = tmp_path / "pgvault.toml"
    toml.write_text(docs["ConfigMap"]["data"]["pgvault.toml"])
    settings = config.load(str(toml))
    assert pod["terminationGracePeriodSeconds"] > settings.daemon.grace_seconds
    assert settings.daemon.listen.endswith(":9847")
    for expr in (settings.schedule.backup, settings.schedule.verify):
        assert expr is not None
        schedule.trigger(expr, settings.schedule.timezone)
    assert docs["Service"]["spec"]["ports"][0]["port"] == 9847


def test_github_actions_workflow() -> None:
    workflow = yaml.safe_load((DEPLOY / "github-actions/pgvault-backup.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    for entry in triggers["schedule"]:
        schedule.trigger(entry["cron"])
    assert workflow["concurrency"]["cancel-in-progress"] is False
    steps = [step.get("run", "") for step in workflow["jobs"]["backup"]["steps"]]
    assert any("pgvault --log-format json backup" in run for run in steps)
    assert any(run.startswith("pgvault check") for run in steps)


def test_crontab_lines_are_valid_schedules() -> None:
    lines = [line for line in (DEPLOY / "cron/pgvault.cron").read_text().splitlines()
             if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    assert len(lines) == 2
    for line in lines:
        fields = line.split()
        schedule.trigger(" ".join(fields[:5]))
        assert fields[5] == "pgvault" and "pgvault --log-format json" in line
    assert "0 1 * * *" in lines[0] and " backup " in lines[0]


def test_dockerfile_runs_pgvault_as_a_non_root_user() -> None:
    text = (DEPLOY / "docker/Dockerfile").read_text()
    assert re.search(r"^FROM \S+bookworm", text, re.M)
    assert re.search(r"apt-get install .*postgresql-client zstd age", text)
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["pgvault"]' in text and "/healthz" in text
