"""The deploy kit is checked by the tools that will read it, where they exist here.

promtool (check rules, and the rule unit tests) comes from Debian's prometheus package
(scripts/bootstrap --test extracts just the binary into .venv/bin); systemd-analyze
verifies the units when systemd is installed. Without them, the structural checks below
still run. The recipes are run as pasted where they can be: deploy/README.md's systemd
block under a temporary root (its apt-get and systemctl lines aside), then pgvault as the
`pgvault` user it creates; the workflow's install step with a checkout of this repository.
No Docker engine or Kubernetes cluster runs here: the Dockerfile is checked against git
(COPY sources), Debian 12's package lists and pgvault's own initdb lookup, and built only
where `docker info` answers; the manifests are parsed and checked for the settings that
matter, and the config they embed is loaded by pgvault itself.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures_install import DEBIAN_PYTHON, PIP_ENV, REPO, copy_sources
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


def systemd_recipe() -> list[str]:
    """The install block of deploy/README.md's systemd section, one command a line."""
    section = (DEPLOY / "README.md").read_text().split("## systemd\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@contextlib.contextmanager
def pgvault_user() -> Iterator[None]:
    """Remove the `pgvault` OS user afterwards if the recipe created it."""
    existed = subprocess.run(["id", "pgvault"], capture_output=True, check=False).returncode == 0
    try:
        yield
    finally:
        if not existed:
            subprocess.run(["userdel", "pgvault"], capture_output=True, check=False)


@pytest.mark.skipif(os.geteuid() != 0 or not DEBIAN_PYTHON.exists(),
                    reason="the recipe needs root (install -o, useradd) and /usr/bin/python3")
def test_systemd_recipe_as_pasted_installs_what_the_units_run() -> None:
    """Every line but apt-get and systemctl, with /opt, /usr/local/bin and /etc under a
    temporary root (whose /etc/pgvault does not exist beforehand, as on a fresh machine)."""
    root = Path(tempfile.mkdtemp(prefix="pgvault-root-", dir="/tmp"))
    root.chmod(0o755)  # the pgvault user must pass, as through /
    try:
        checkout = copy_sources(root / "checkout")
        shutil.copytree(DEPLOY, checkout / "deploy")
        repo = root / "var/backups/pgvault"
        (checkout / "pgvault.toml").write_text(f'repo = "file://{repo}"\n')
        (checkout / "env").write_text("DATABASE_URL=postgresql://app@127.0.0.1/app\n")
        for folder in ("usr/local/bin", "etc/systemd/system"):
            (root / folder).mkdir(parents=True)
        lines, skipped = [], []
        for line in systemd_recipe():
            command = line.replace("sudo ", "")
            if command.split()[0] in ("apt-get", "systemctl"):
                skipped.append(command.split()[0])
                continue
            for prefix in ("/opt/pgvault", "/usr/local/bin/", "/etc/pgvault",
                           "/etc/systemd/system/"):
                command = command.replace(prefix, f"{root}{prefix}")
            lines.append(command)
        with pgvault_user():
            ran = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
                                 cwd=checkout, capture_output=True, text=True, timeout=600,
                                 check=False, env={**os.environ, **PIP_ENV})
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert skipped == ["apt-get", "systemctl"]
            program = root / "usr/local/bin/pgvault"
            assert os.path.realpath(program) == str(root / "opt/pgvault/bin/pgvault")
            assert os.path.realpath(root / "opt/pgvault/bin/python") == \
                os.path.realpath(DEBIAN_PYTHON)
            group = pwd.getpwnam("pgvault").pw_gid
            for path, mode, gid in ((root / "etc/pgvault", 0o750, group),
                                    (root / "etc/pgvault/pgvault.toml", 0o640, group),
                                    (root / "etc/pgvault/env", 0o600, 0)):
                st = path.stat()
                assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (mode, 0, gid), path
            # What the unit's ExecStart does, as its User=: run pgvault with that config.
            repo.mkdir(parents=True)
            shutil.chown(repo, "pgvault", "pgvault")
            listed = subprocess.run(
                [shutil.which("runuser") or "runuser", "-u", "pgvault", "--", str(program),
                 "list", "--config",
                 str(root / "etc/pgvault/pgvault.toml")],
                capture_output=True, text=True, timeout=60, check=False,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
            assert listed.returncode == 0, listed.stdout + listed.stderr
        if shutil.which("systemd-analyze") is None:
            pytest.skip("recipe ran; systemd-analyze not installed, so the installed units "
                        "were not verified")
        units = []
        for name in ("pgvault-backup.service", "pgvault-backup.timer"):
            unit = root / "etc/systemd/system" / name
            unit.write_text(unit.read_text().replace("/usr/local/bin/pgvault", str(program)))
            units.append(str(unit))
        verified = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                                  text=True, check=False)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
    settings = config.load({}, os.environ, str(toml))
    assert pod["terminationGracePeriodSeconds"] > settings.daemon.grace_seconds
    assert settings.daemon.listen.endswith(":9847")
    for expr in (settings.schedule.backup, settings.schedule.verify):
        assert expr is not None
        schedule.trigger(expr, settings.schedule.timezone)
    assert docs["Service"]["spec"]["ports"][0]["port"] == 9847


def test_kubernetes_daemon_drills_have_somewhere_to_run(tmp_path: Path) -> None:
    """The daemon schedules drills: on the scratch cluster the image carries (PostgreSQL
    server installed, /tmp a writable volume with room) or on a named verification server."""
    docs = {doc["kind"]: doc for doc in k8s("daemon.yaml")}
    toml = tmp_path / "pgvault.toml"
    toml.write_text(docs["ConfigMap"]["data"]["pgvault.toml"])
    settings = config.load({}, os.environ, str(toml))
    assert settings.schedule.verify is not None
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env_names = {e["name"] for e in container.get("env", [])}
    if settings.verify.server is None and "PGVAULT_VERIFY__SERVER" not in env_names:
        text, args = dockerfile()
        assert f"postgresql-{args['PG_MAJOR']}" in text.split("apt-get install", 1)[1]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        scratch = volumes[mounts[tempfile.gettempdir()]]
        assert scratch["emptyDir"]["sizeLimit"], "the scratch cluster needs a sized volume"
        limit = container["resources"]["limits"]["memory"]
        assert limit.endswith("Gi") and float(limit[:-2]) >= 1, limit
    # The image both manifests run is the one this repository builds.
    (job,) = k8s("cronjob.yaml")
    image = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == container["image"] and image.endswith(":" + project_version())


def test_github_actions_workflow() -> None:
    workflow = yaml.safe_load((DEPLOY / "github-actions/pgvault-backup.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    for entry in triggers["schedule"]:
        schedule.trigger(entry["cron"])
    assert workflow["concurrency"]["cancel-in-progress"] is False
    steps = [step.get("run", "") for step in workflow["jobs"]["backup"]["steps"]]
    assert any("pgvault --log-format json backup" in run for run in steps)
    assert any(run.startswith("pgvault check") for run in steps)


def test_github_actions_installs_pgvault_from_a_pinned_checkout(tmp_path: Path) -> None:
    """The install step, as written, on this machine: a venv on /usr/bin/python3 holding
    pgvault from the checkout, on GITHUB_PATH; never a registry's `pgvault`."""
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 (Debian's Python) here")
    steps = yaml.safe_load((DEPLOY / "github-actions/pgvault-backup.yml").read_text()
                           )["jobs"]["backup"]["steps"]
    (checkout,) = [s for s in steps if str(s.get("uses", "")).startswith("actions/checkout@")]
    pinned = str(checkout["with"]["ref"])
    assert re.fullmatch(r"v\d+\.\d+\.\d+|[0-9a-f]{40}", pinned), pinned
    assert checkout["with"]["repository"]
    source = checkout["with"]["path"]
    (install,) = [s["run"] for s in steps if "pip" in s.get("run", "")]
    for line in install.splitlines():
        if re.search(r"\bpipx? install\b", line):
            targets = [w for w in shlex.split(line.split("install", 1)[1])
                       if not w.startswith("-") and "constraints" not in w]
            assert targets and all(t.startswith(("./", "/", "git+")) for t in targets), line
    # What the checkout step leaves: this repository's sources at `path`.
    copy_sources(tmp_path / source)
    runner_temp, github_path = tmp_path / "runner", tmp_path / "github_path"
    runner_temp.mkdir()
    script = "\n".join(line for line in install.splitlines()
                       if not line.strip().startswith("sudo apt-get"))
    env = {**os.environ, **PIP_ENV, "RUNNER_TEMP": str(runner_temp),
           "GITHUB_PATH": str(github_path)}
    # GitHub's default shell for run steps.
    ran = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (bindir,) = github_path.read_text().split()
    version = subprocess.run([str(Path(bindir) / "pgvault"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.split()[-1] == project_version()
    assert os.path.realpath(Path(bindir) / "python") == os.path.realpath(DEBIAN_PYTHON)


def project_version() -> str:
    version: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return version


def test_crontab_lines_are_valid_schedules() -> None:
    lines = [line for line in (DEPLOY / "cron/pgvault.cron").read_text().splitlines()
             if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    assert len(lines) == 2
    for line in lines:
        fields = line.split()
        schedule.trigger(" ".join(fields[:5]))
        assert fields[5] == "pgvault" and "pgvault --log-format json" in line
    assert "0 1 * * *" in lines[0] and " backup " in lines[0]


def dockerfile() -> tuple[str, dict[str, str]]:
    """The Dockerfile with its continuation lines joined, and its ARG defaults."""
    text = (DEPLOY / "docker/Dockerfile").read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    for name, value in args.items():
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    return text, args


def test_dockerfile_runs_pgvault_as_a_non_root_user() -> None:
    text, _ = dockerfile()
    assert re.search(r"^FROM \S+bookworm", text, re.M)
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["pgvault"]' in text and "/healthz" in text


def test_dockerfile_installs_from_the_checkout_with_a_postgresql_server_for_drills() -> None:
    text, args = dockerfile()
    major = args["PG_MAJOR"]
    # Debian's own Python, as the suite runs on; pgvault from the copied sources, pinned.
    assert re.search(r"^FROM debian:bookworm", text, re.M)
    assert re.search(r"/usr/bin/python3 -m venv /opt/pgvault", text)
    assert re.search(r"/opt/pgvault/bin/pip install .*-c /src/constraints.txt /src\b", text)
    assert "ln -s /opt/pgvault/bin/pgvault /usr/local/bin/pgvault" in text
    assert "/opt/pgvault/bin/python" in text.split("HEALTHCHECK", 1)[1]
    packages = set(re.search(r"apt-get install -y --no-install-recommends ([^&]+)",
                             text).group(1).split())  # type: ignore[union-attr]
    assert {"python3", "python3-venv", f"postgresql-{major}", f"postgresql-client-{major}",
            "zstd", "age"} <= packages
    # Every COPY source is in the repository (a build from a clean checkout finds it).
    for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in sources.split():
            tracked = subprocess.run(["git", "ls-files", "--error-unmatch", source], cwd=REPO,
                                     capture_output=True, check=False)
            assert tracked.returncode == 0, f"COPY {source}: not tracked in git"
    # Debian 12 ships each package (apt lists present: this is a Debian 12 machine).
    if shutil.which("apt-cache") and list(Path("/var/lib/apt/lists").glob("*bookworm*Packages*")):
        shown = subprocess.run(["apt-cache", "show", "--no-all-versions", *sorted(packages)],
                               capture_output=True, text=True, check=False).stdout
        known = set(re.findall(r"^Package: (\S+)$", shown, re.M))
        assert packages <= known, f"Debian 12 has no package {packages - known}"
    # The server package holds the initdb pgvault's lookup starts drills with.
    initdb = Path(f"/usr/lib/postgresql/{major}/bin/initdb")
    if initdb.exists() and shutil.which("dpkg"):
        owner = subprocess.run(["dpkg", "-S", str(initdb)], capture_output=True, text=True,
                               check=True).stdout.split(":")[0]
        assert owner == f"postgresql-{major}"
        from pgvault.pg.cluster import EphemeralCluster
        assert EphemeralCluster(major=int(major)).bindir == initdb.parent


def docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30,
                          check=False).returncode == 0


@pytest.mark.skipif(not docker_engine(), reason="no Docker engine answers `docker info` here "
                    "(the Dockerfile's sources, packages and initdb were checked above)")
def test_docker_image_builds_and_has_pgvault_and_initdb() -> None:
    tag = "pgvault-test:deploy"
    subprocess.run(["docker", "build", "-f", "deploy/docker/Dockerfile", "-t", tag, "."],
                   cwd=REPO, check=True, capture_output=True, timeout=1800)
    version = subprocess.run(["docker", "run", "--rm", tag, "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.split()[-1] == project_version()
    _, args = dockerfile()
    subprocess.run(["docker", "run", "--rm", "--entrypoint",
                    f"/usr/lib/postgresql/{args['PG_MAJOR']}/bin/initdb", tag, "--version"],
                   check=True, capture_output=True)
