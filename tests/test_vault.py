"""The composition root and the jobs: every kind of run is wired, recorded and announced alike.

Real parts: a throwaway cluster (1 MB WAL segments) backed up by the real CLI with
pg_basebackup, an HTTP server on loopback standing in for a webhook receiver, the
Prometheus textfile read by prometheus_client's own parser, and the restored base backup
started by the real PostgreSQL server (as postgres) and compared with its source.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from cli_runner import one_line_error, pgvault
from dbcompare import assert_databases_equal
from http_recorder import Recorder
from pgvault.catalog import PASSPHRASE_IDENTITY
from pgvault.pg.cluster import EphemeralCluster
from test_monitoring import metrics_of, write_config
from test_physical import CREATE_APP, insert, pitr_dir, repo_dir, restore_pitr, server_pgvault, sql

__all__ = ["pitr_dir", "repo_dir", "server_pgvault"]  # fixtures, used by name

SRC = Path(__file__).resolve().parent.parent / "src" / "pgvault"


def test_a_base_backup_is_recorded_announced_and_published_like_a_logical_one(
    recorder: Recorder, repo_dir: Path, pitr_dir: Path, server_pgvault: str, tmp_path: Path
) -> None:
    prom = tmp_path / "pgvault.prom"
    cfg = write_config(tmp_path, f"""
repo = "{repo_dir}"
[notify]
webhook_url = "{recorder.url}/hook"
events = ["all"]
[metrics]
textfile = "{prom}"
""")
    with EphemeralCluster(initdb_args=["--wal-segsize=1"], settings={"fsync": False}) as source:
        sql(source.url(), CREATE_APP, "CREATE ROLE reader LOGIN")
        app = source.url("app")
        sql(app, "CREATE TABLE orders (id int PRIMARY KEY, note text)", insert(1, 300))

        # A refused pg_basebackup: a failed run of cluster main, told and counted.
        failed = pgvault("basebackup", "--config", cfg, "-d",
                         source.url().replace("postgres@", "reader@"), expect=8)
        assert "replication" in one_line_error(failed)
        hooks = [r.json() for r in recorder.wait_for("/hook", 2)]
        assert [(h["event"], h["database"]) for h in hooks] == [
            ("backup.started", "main"), ("backup.failed", "main")]
        assert "replication" in hooks[1]["error"]
        labels = (("database", "main"),)
        assert metrics_of(prom)[("pgvault_backup_failures_total", labels)] == 1

        out = pgvault("basebackup", "--config", cfg, "-d", source.url(), "--wal-method",
                      "fetch", "--fast-checkpoint", "--json")
        manifest = json.loads(out.stdout)
        size = sum(a["size"] for a in manifest["artifacts"])
        events = [r.json() for r in recorder.wait_for("/hook", 5)]
        assert [e["event"] for e in events][2:] == [
            "backup.started", "backup.succeeded", "backup.recovered"]
        succeeded = events[3]
        assert succeeded["backup_id"] == manifest["id"] and succeeded["database"] == "main"
        assert succeeded["size_bytes"] == size

        status = json.loads(pgvault("status", "--config", cfg, "-d", "main", "--json").stdout)
        (main,) = status
        assert main["newest"]["id"] == manifest["id"] and main["backups"] == 1
        assert main["failures_total"] == 1 and main["failing"] is False
        assert "replication" in main["last_failure"]["error"]
        samples = metrics_of(prom)
        assert samples[("pgvault_backup_failures_total", labels)] == 1
        assert samples[("pgvault_backup_last_success_timestamp_seconds", labels)] > 0
        assert samples[("pgvault_backups", labels)] == 1
        assert samples[("pgvault_backup_last_size_bytes", labels)] == size

        # The server runs wal-fetch as postgres, who cannot read this test's config.
        server, _ = restore_pitr(pitr_dir / "restored", server_pgvault, "--repo", str(repo_dir),
                                 "--target", "immediate")
        assert_databases_equal(app, server + "app")


def test_opening_a_vault_in_passphrase_mode_writes_nothing_until_a_backup_needs_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgvault import config
    from pgvault.storage.memory import MemoryStorage
    from pgvault.vault import Vault

    monkeypatch.setenv("PGVAULT_ENCRYPTION__PASSPHRASE", "true")
    monkeypatch.setenv("PGVAULT_AGE_PASSPHRASE", "correct horse battery staple")
    toml = tmp_path / "c.toml"
    toml.write_text("[compression]\nalgorithm = \"gzip\"\n")
    settings = config.load({}, os.environ, str(toml))
    storage = MemoryStorage()
    vault = Vault.open(settings, storage=storage)
    assert vault.keyring.passphrase and vault.lock_stale_after.total_seconds() == 12 * 3600
    assert list(storage.list("")) == [], "setting up wrote into the repository"

    gzip, age = vault.stages
    assert (gzip.name, gzip.level) == ("gzip", 6)  # the level is explicit in the manifest
    assert age.name == "age" and age.passphrase is True and len(age.recipients or ()) == 1
    assert [info.key for info in storage.list("")] == [PASSPHRASE_IDENTITY]
    # Another host (another vault) opens the same key instead of making a second one.
    again = Vault.open(settings, storage=storage).stages_for("zstd", 3)
    assert [(s.name, s.level) for s in again] == [("zstd", 3), ("age", None)]
    assert again[1].recipients == age.recipients
    # The keyring opens that key only when an artifact asks for it.
    opened = Vault.open(settings, storage=storage).keyring.for_stage(age)
    assert opened.recipients == list(age.recipients or ())


def test_the_pipeline_is_pure_and_decides_each_default_level_once() -> None:
    from pgvault import pipeline

    assert [(s.name, s.level) for s in pipeline.configured_stages("zstd", threads=2)] == [
        ("zstd", pipeline.DEFAULT_LEVELS["zstd"])]
    assert [(s.name, s.level) for s in pipeline.configured_stages("gzip")] == [
        ("gzip", pipeline.DEFAULT_LEVELS["gzip"])]
    (zstd, age) = pipeline.configured_stages("zstd", 5, recipients=["age1x", "age1x"])
    assert zstd.level == 5 and age.recipients == ("age1x",) and age.passphrase is None
    # Nothing in the stage modules reaches up to the settings, the catalog or a storage.
    for module in ("__init__.py", "age.py"):
        tree = ast.parse((SRC / "pipeline" / module).read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module
                     for alias in node.names}
        assert not imported & {"pgvault.config", "pgvault.catalog", "pgvault.storage.base",
                               "pgvault.vault"}, module
    # The --level help states the same defaults.
    text = pgvault("backup", "--help").stdout
    assert (f"zstd 1-19, default {pipeline.DEFAULT_LEVELS['zstd']}; gzip 1-9, default "
            f"{pipeline.DEFAULT_LEVELS['gzip']}") in " ".join(text.split())
