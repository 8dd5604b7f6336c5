"""Neon: snapshots (or branches at a moment) under pgvault's retention, drills on a
temporary branch, through Neon's documented HTTP API.

Neon itself cannot run here: tests/standin_neon.py is a local STAND-IN that implements
only the documented requests pgvault makes (see its docstring for the pages). The
contract test pins each request's method, path, query, headers (Bearer auth, JSON) and
body. A drill's branch endpoint from the stand-in has no database behind it, so the
drill's checks go to a copy of the source on the local test cluster through
[snapshot] drill_connect_override, the documented test-only seam.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from cli_runner import pgvault
from pgvault import retention
from pgvault.catalog import Catalog
from pgvault.engines.neon import NeonProvider
from pgvault.engines.snapshots import DrillPlacement
from pgvault.ops.snapshot import SnapshotOptions, snapshot_run
from pgvault.pg.cluster import EphemeralCluster
from pgvault.retention import Policy
from pgvault.storage.memory import MemoryStorage

if TYPE_CHECKING:
    from standin_neon import NeonStandIn

pytest_plugins = ["standin_neon"]


def test_the_requests_are_the_documented_ones(neon: NeonStandIn) -> None:
    pid, bid = neon.project()
    provider = NeonProvider(pid, bid, neon.api_key, api_url=neon.api_url,
                            expire_after=timedelta(days=30))
    made = provider.create("ignored", {"pgvault:managed": "true", "pgvault:database": "app",
                                       "pgvault:backup-id": "20260101T010000.000Z-abcdef"})
    assert made.status == "available" and made.ours("app")
    assert [s.snapshot_id for s in provider.list_ours("app")] == [made.snapshot_id]
    provider.restore_drill(made.snapshot_id, "pgvault-drill-br-x-1a2b3c",
                           {"pgvault:drill": "1.2.abcdef12", "pgvault:drill-started": "t"},
                           DrillPlacement())
    drill = provider.describe_drill("pgvault-drill-br-x-1a2b3c")
    assert drill is not None and drill.status == "available" and drill.host
    assert provider.delete_drill("pgvault-drill-br-x-1a2b3c")
    assert provider.delete(made.snapshot_id) and not provider.delete(made.snapshot_id)
    branch_mode = NeonProvider(pid, bid, neon.api_key, api_url=neon.api_url, mode="branch")
    branch_mode.create("ignored", {"pgvault:managed": "true", "pgvault:database": "app",
                                   "pgvault:backup-id": "20260101T010000.000Z-abcdef"})

    base = f"/api/v2/projects/{pid}"
    drill_branch = neon.calls[4].body["endpoint"]["branch_id"]
    calls = [(c.method, c.path) for c in neon.calls]
    assert calls == [
        ("POST", f"{base}/branches/{bid}/snapshot"),
        ("GET", f"{base}/snapshots"),
        ("POST", f"{base}/snapshots/{made.snapshot_id}/restore"),
        ("GET", f"{base}/branches"),
        ("POST", f"{base}/endpoints"),
        ("GET", f"{base}/branches"),
        ("GET", f"{base}/branches/{drill_branch}/endpoints"),
        ("GET", f"{base}/branches"),
        ("DELETE", f"{base}/branches/{drill_branch}"),
        ("DELETE", f"{base}/snapshots/{made.snapshot_id}"),
        ("DELETE", f"{base}/snapshots/{made.snapshot_id}"),
        ("POST", f"{base}/branches"),
    ]
    for call in neon.calls:
        assert call.headers["Authorization"] == f"Bearer {neon.api_key}"
        assert call.headers["Accept"] == "application/json"
        assert (call.headers.get("Content-Type") == "application/json") == (call.body is not None)
    create = neon.calls[0]
    assert create.body is None and create.query["name"] == \
        "pgvault:app:20260101T010000.000Z-abcdef"
    expires = datetime.fromisoformat(create.query["expires_at"].replace("Z", "+00:00"))
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)
    assert neon.calls[2].body == {"name": "pgvault-drill-br-x-1a2b3c;1.2.abcdef12;t",
                                  "finalize_restore": False}
    assert neon.calls[4].body["endpoint"]["type"] == "read_write"
    assert neon.calls[-1].body["branch"]["parent_id"] == bid
    assert neon.calls[-1].body["branch"]["name"] == "pgvault:app:20260101T010000.000Z-abcdef"
    assert "parent_timestamp" in neon.calls[-1].body["branch"]


def test_a_wrong_key_is_one_line_without_the_key(neon: NeonStandIn, tmp_path: Path) -> None:
    pid, bid = neon.project()
    key = tmp_path / "key"
    key.write_text("wrong-key-do-not-print")
    path = tmp_path / "pgvault.toml"
    path.write_text(f'repo = "{(tmp_path / "repo").as_uri()}"\ndatabase = "app"\n'
                    f'[snapshot]\nprovider = "neon"\nproject = "{pid}"\nbranch = "{bid}"\n'
                    f'api_url = "{neon.api_url}"\n')
    out = pgvault("snapshot", "--config", str(path), env={"NEON_API_KEY_FILE": str(key)},
                  expect=14)
    assert out.stderr.strip().splitlines()[-1] == (
        f"pgvault: neon {pid}: GET /snapshots refused: HTTP 401: authentication required")
    assert "wrong-key" not in out.stderr + out.stdout


def test_neon_snapshots_are_pruned_and_drilled_on_a_temporary_branch(
        neon: NeonStandIn, tmp_path: Path, make_db: object, new_name: object,
        pg_cluster: EphemeralCluster) -> None:
    url = make_db(prefix="neon")  # type: ignore[operator]
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 300)")
    copy = new_name()  # type: ignore[operator]
    pid, bid = neon.project()
    key = tmp_path / "key"
    key.write_text(neon.api_key)
    path = tmp_path / "pgvault.toml"
    path.write_text(
        f'repo = "{(tmp_path / "repo").as_uri()}"\ndatabase = "{url}"\n'
        '[retention]\nkeep_last = 2\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n'
        f'[verify]\nserver = "{pg_cluster.url()}"\nlevel = "assertions"\n'
        '[[verify.sql]]\nname = "t"\nquery = "SELECT count(*) = 300 FROM t"\n'
        f'[snapshot]\nprovider = "neon"\nproject = "{pid}"\nbranch = "{bid}"\n'
        f'api_url = "{neon.api_url}"\nexpire_days = 90\npoll_seconds = 0.05\nquota = 10\n'
        f'drill_connect_override = "{pg_cluster.url(copy)}"\n')
    env = {"NEON_API_KEY_FILE": str(key)}
    for _ in range(3):
        out = pgvault("snapshot", "--config", str(path), "--prune", env=env)
    assert "snapshot " in out.stdout and "1 deleted, 2 kept" in out.stdout, out.stdout
    assert len(neon.projects[pid].snapshots) == 2
    listed = json.loads(pgvault("list", "--config", str(path), "--json", env=env).stdout)
    assert [e["kind"] for e in listed] == ["snapshot", "snapshot"]
    with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{Path(url).name}"')
    drilled = pgvault("verify", listed[-1]["id"], "--config", str(path), env=env)
    assert "PASSED assertions drill" in drilled.stdout, drilled.stdout
    assert "PASS  facts" in drilled.stdout and "PASS  restore    cleanup" in drilled.stdout
    branches = neon.projects[pid].branches.values()
    assert [b["name"] for b in branches] == ["main"]  # the drill's branch is gone
    status = pgvault("status", "--config", str(path), env=env).stdout
    assert "automated      neon " in status and "    snapshot  " in status, status
    assert neon.api_key not in drilled.stdout + drilled.stderr + status


def test_sixty_days_on_neon_keep_the_gfs_set_under_a_quota_of_15(neon: NeonStandIn) -> None:
    """The 60-day simulation against the Neon stand-in: daily snapshot_run with a fake
    clock, exactly the GFS set remains each day, at most 15 snapshots in the project, a
    drill branch left by a dead drill (day 30) is gone after the next run."""
    pid, bid = neon.project()
    provider = NeonProvider(pid, bid, neon.api_key, api_url=neon.api_url)
    catalog = Catalog(MemoryStorage())
    policy = Policy(daily=7, weekly=4, monthly=2)
    options = SnapshotOptions(quota=15, poll=0.01)
    taken = []
    most = 0
    start = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    for day in range(60):
        now = start + timedelta(days=day)
        run = snapshot_run(provider, catalog, "app", options, policy=policy,
                           clock=lambda n=now: n)
        taken.append(run.manifest)
        snaps = neon.projects[pid].snapshots.values()
        most = max(most, len(snaps) + len(run.prunes[0].remove))
        expected = set(retention.plan(taken, policy, now).keep)
        assert {s["name"].rsplit(":", 1)[1] for s in snaps} == expected, f"day {day}"
        if day == 30:
            dead = subprocess.run([sys.executable, "-c", "from pgvault import leftovers; "
                                   "print(leftovers.me().token())"], check=True,
                                  capture_output=True, text=True).stdout.strip()
            provider.restore_drill(run.manifest.snapshot.snapshot_id,  # type: ignore[union-attr]
                                   "pgvault-drill-killed", {"pgvault:drill": dead,
                                                            "pgvault:drill-started":
                                                            now.isoformat()},
                                   DrillPlacement())
        if day == 31:
            assert run.swept == ["pgvault-drill-killed"]
            assert [b["name"] for b in neon.projects[pid].branches.values()] == ["main"]
    assert most <= 15
    print(f"neon 60 days: {len(neon.projects[pid].snapshots)} snapshots kept, at most {most}")
