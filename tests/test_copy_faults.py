"""3-2-1 copies under faults: restore falling back to a copy, copies SIGKILLed at random
moments, a repository down (connection refused, 503s, stalled) while backups go on.

Real parts: PostgreSQL, moto's S3 server over HTTP (behind tests/faultproxy.py where a
fault is needed), real `pgvault` processes killed with SIGKILL. The 503s come from a small
HTTP server in this file (moto cannot be told to answer 503), standing in for an S3
endpoint that is overloaded.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli_runner import pgvault
from dbcompare import assert_databases_equal
from fixtures_s3 import _free_port
from pgvault.catalog import Catalog
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage
from pgvault.storage.s3 import S3Options
from test_copy import fill, write_config

MakeDb = Callable[..., str]


def _name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_restore_latest_falls_back_to_an_intact_copy_and_says_which(
    make_db: MakeDb, pg_cluster: EphemeralCluster, s3_server: str, s3_bucket: str,
    s3_client: Any, s3_options: S3Options, tmp_path: Path, target_names: list[str],
) -> None:
    cold = tmp_path / "cold"

    def configure(endpoint: str) -> dict[str, str]:
        config = write_config(tmp_path / "pgvault.toml", [
            {"name": "main", "url": f"s3://{s3_bucket}/app", "primary": True,
             "s3": f'{{ endpoint_url = "{endpoint}" }}'},
            {"name": "cold", "url": f"file://{cold}"},
        ], f'io_timeout_seconds = 2\n[s3]\nendpoint_url = "{s3_server}"\npath_style = true\n')
        return {"PGVAULT_CONFIG": str(config)}

    env = configure(s3_server)
    source = make_db(prefix="fallback_src")
    db = _name(source)
    fill(source, 300, 0)
    pgvault("backup", "--dbname", source, env=env)
    pgvault("copy", env=env)
    state = make_db(source, prefix="fallback_state")
    fill(source, 50, 1)
    pgvault("backup", "--dbname", source, env=env)  # newer, only at the primary
    newest = make_db(source, prefix="fallback_newest")
    main = open_storage(f"s3://{s3_bucket}/app", s3_options)
    first, second = Catalog(main).list()

    def restore(*extra: str, expect: int = 0) -> Any:
        target = f"fallback_restored_{uuid.uuid4().hex[:10]}"
        target_names.append(target)
        done = pgvault("restore", "latest", "--to", target, "-d", pg_cluster.url(),
                       *extra, env=env, expect=expect)
        return done, target

    # All is well: the primary's newest.
    done, target = restore()
    assert f"restored {second.id} ({db}) from repository main" in done.stdout
    assert_databases_equal(newest, pg_cluster.url(target))

    # The primary's newest backup is damaged (same size, other bytes): its bytes fail
    # their sha256 while read, and the restore goes on from the copy's latest.
    key = second.artifact("db.dump").key
    body = main.read_bytes(key)
    s3_client.put_object(Bucket=s3_bucket, Key=f"app/{key}",
                         Body=bytes([body[0] ^ 0xFF]) + body[1:])
    done, target = restore()
    assert f"restored {first.id} ({db}) from repository cold" in done.stdout
    assert "repository main:" in done.stderr and "trying cold" in done.stderr
    assert_databases_equal(state, pg_cluster.url(target))

    # The primary is unreachable (connection refused: nothing listens on its port).
    env = configure(f"http://127.0.0.1:{_free_port()}")
    done, target = restore()
    assert f"restored {first.id} ({db}) from repository cold" in done.stdout
    assert "repository main:" in done.stderr
    assert_databases_equal(state, pg_cluster.url(target))
    # Named on purpose, a repository is not swapped for another: one line, its cause.
    refused, _ = restore("--repo", "main", expect=5)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to" in lines[0] and "cold" not in lines[0]

    # Nowhere intact: every repository's reason in one line.
    for info in [p for p in (cold / "backups").rglob("*") if p.is_file()]:
        info.write_bytes(b"x" * info.stat().st_size)
    failed, _ = restore(expect=6)
    assert "no repository holds an intact copy (main: " in failed.stderr
    assert "; cold: " in failed.stderr
