"""3-2-1 copies under faults: restore falling back to a copy, copies SIGKILLed at random
moments, a repository down (connection refused, 503s, stalled) while backups go on.

Real parts: PostgreSQL, moto's S3 server over HTTP (behind tests/faultproxy.py where a
fault is needed), real `pgvault` processes killed with SIGKILL. The 503s come from a small
HTTP server in this file (moto cannot be told to answer 503), standing in for an S3
endpoint that is overloaded.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import random
import shutil
import signal
import subprocess as sp
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from cli_runner import PGVAULT, clean_env, pgvault
from dbcompare import assert_databases_equal
from faultproxy import Faults, fault_proxy
from fixtures_s3 import _free_port
from http_recorder import LoopbackServer
from pgvault.catalog import Catalog
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage
from pgvault.storage.s3 import S3Options
from test_copy import assert_consistent, fill, snapshot, write_config

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


def test_copies_sigkilled_at_random_moments_end_exact_and_the_copy_alone_verifies(
    make_db: MakeDb, pg_cluster: EphemeralCluster, s3_server: str, s3_bucket: str,
    s3_options: S3Options, tmp_path: Path, target_names: list[str],
) -> None:
    primary = tmp_path / "primary"
    # The copy's uploads go through a proxy holding them to 40 kB/s (reads back are not
    # held), so that a copy lasts long enough for kills to land before, between and inside
    # its objects and before its manifests.
    with fault_proxy(s3_server, Faults(rate_up=4e4)) as proxy:
        config = write_config(tmp_path / "pgvault.toml", [
            {"name": "main", "url": f"file://{primary}", "primary": True},
            {"name": "offsite", "url": f"s3://{s3_bucket}/app",
             "retention": "{ keep_last = 10 }", "s3": f'{{ endpoint_url = "{proxy.url}" }}'},
        ], f'[s3]\nendpoint_url = "{s3_server}"\npath_style = true\n')
        env = {"PGVAULT_CONFIG": str(config)}
        source = make_db(prefix="killcopy_src")
        # Six backups of ~55 kB each (the table emptied in between): twelve objects that
        # a copy sends two at a time, each taking about a second through the proxy.
        for generation in range(6):
            with psycopg.connect(source, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS blob")
            fill(source, 400, generation)
            pgvault("backup", "--dbname", source, env=env)
        state = make_db(source, prefix="killcopy_state")
        src = open_storage(f"file://{primary}")
        dst = open_storage(f"s3://{s3_bucket}/app", s3_options)
        objects = {a.key for m in Catalog(src).list() for a in m.artifacts}

        rng = random.Random(20)  # seeded: a failure replays with the same kill moments
        full_env = clean_env() | env
        at_kill: list[tuple[int, int]] = []  # (objects, manifests) there at each kill
        for _ in range(10):
            before = proxy.faults.connections
            proc = sp.Popen([PGVAULT, "copy", "--jobs", "2", "--json"], env=full_env,
                            stdout=sp.PIPE, stderr=sp.PIPE, text=True)
            # A random moment counted from its first request (its start-up takes 0.3 s
            # here, and 1.5 s when the machine is busy).
            deadline = time.monotonic() + 30
            while proc.poll() is None and proxy.faults.connections == before and \
                    time.monotonic() < deadline:
                time.sleep(0.01)
            with contextlib.suppress(sp.TimeoutExpired):
                proc.wait(timeout=rng.uniform(0.0, 1.0))
            proc.send_signal(signal.SIGKILL)
            out, _err = proc.communicate()
            if out.strip():
                break  # it finished before its kill
            at_kill.append((sum(1 for i in dst.list("backups/") if i.key in objects),
                            sum(1 for _ in dst.list("manifests/"))))
            # Whatever the moment: only complete objects with the source's bytes, and no
            # manifest before every object of its backup.
            assert_consistent(dst, src)
        # The kills landed at many points of the copy, not all before or after it.
        print("(objects, manifests) at the target when killed:", at_kill)
        assert len(at_kill) >= 6 and len(set(at_kill)) >= 4, at_kill

        proxy.faults.rate_up = None
        done = json.loads(pgvault("copy", "--json", env=env).stdout)
        assert done["failed"] == {}
        assert snapshot(dst) == snapshot(src)  # exactly the source's manifests and sha256s
        assert Catalog(dst).orphans() == [] and not list(dst.list("locks/"))

        # The primary is gone: the copy alone verifies, and restore latest falls back to it.
        shutil.rmtree(primary)
        checked = json.loads(pgvault("verify", "all", "--repo", "offsite", "--level",
                                     "integrity", "--json", env=env).stdout)
        assert len(checked) == 6
        assert all(c["status"] == "pass" for r in checked for c in r["checks"])
        target = f"killcopy_restored_{uuid.uuid4().hex[:10]}"
        target_names.append(target)
        done_restore = pgvault("restore", "latest", "--to", target, "-d", pg_cluster.url(),
                               env=env)
        assert "from repository offsite" in done_restore.stdout
        assert_databases_equal(state, pg_cluster.url(target))


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 503 SlowDown-style (overloaded)."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable'
                b'</Code><Message>Please reduce your request rate.</Message></Error>')
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _metric(path: Path, name: str, target: str) -> float:
    for line in path.read_text().splitlines():
        if line.startswith(name + "{") and f'target="{target}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {target} not in {path}")


def test_a_copy_down_three_ways_while_backups_go_on_then_catches_up(
    make_db: MakeDb, pg_cluster: EphemeralCluster, s3_server: str, s3_bucket: str,
    s3_options: S3Options, tmp_path: Path, target_names: list[str],
) -> None:
    primary, cold, textfile = tmp_path / "primary", tmp_path / "cold", tmp_path / "pgvault.prom"

    def configure(endpoint: str) -> dict[str, str]:
        config = write_config(tmp_path / "pgvault.toml", [
            {"name": "main", "url": f"file://{primary}", "primary": True},
            {"name": "offsite", "url": f"s3://{s3_bucket}/app", "copy_lag_hours": 0.0001,
             "retention": "{ keep_last = 10 }", "s3": f'{{ endpoint_url = "{endpoint}" }}'},
            {"name": "cold", "url": f"file://{cold}", "retention": "{ keep_last = 10 }"},
        ], f'io_timeout_seconds = 0.5\n[s3]\nendpoint_url = "{s3_server}"\npath_style = true\n'
           f'[metrics]\ntextfile = "{textfile}"\n')
        return {"PGVAULT_CONFIG": str(config)}

    source = make_db(prefix="downcopy_src")
    db = _name(source)
    unavailable = LoopbackServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=unavailable.serve_forever, daemon=True).start()
    with contextlib.ExitStack() as stack, \
            fault_proxy(s3_server, Faults(stall_after_up=1)) as stalled:
        stack.callback(unavailable.server_close)
        stack.callback(unavailable.shutdown)
        outages = {
            "refused": (f"http://127.0.0.1:{_free_port()}", "cannot connect to"),
            "503": (f"http://127.0.0.1:{unavailable.server_address[1]}",
                    "ServiceUnavailable (HTTP 503)"),
            "stalled": (stalled.url, "no progress for 0.5 s"),
        }
        for generation, (kind, (endpoint, cause)) in enumerate(outages.items()):
            env = configure(endpoint)
            fill(source, 100, generation)
            pgvault("backup", "--dbname", source, env=env)  # the primary's backups go on
            failed = pgvault("copy", env=env, expect=None)
            assert failed.returncode == 5, (kind, failed.stderr)
            lines = failed.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("pgvault: copy to offsite failed: ")
            assert cause in lines[0], (kind, lines[0])
            assert "cold: 1 backup(s) copied" in failed.stdout  # the others stay current
            assert _metric(textfile, "pgvault_copy_behind_backups", "offsite") == \
                generation + 1
            assert _metric(textfile, "pgvault_copy_last_error_timestamp_seconds",
                           "offsite") > 0
            assert _metric(textfile, "pgvault_copy_up", "offsite") == 0
            assert _metric(textfile, "pgvault_copy_behind_backups", "cold") == 0
        status = pgvault("status", "-d", db, env=env, expect=None).stdout
        assert "copy offsite   unreadable, 3 backup(s) since its last successful copy" in status
        assert "last copy failed" in status
        assert "copy cold      up to date" in status

        env = configure(s3_server)  # back
        status = pgvault("status", "-d", db, env=env, expect=None).stdout
        assert "copy offsite   3 backup(s) behind" in status and "LATE" in status
        assert "last copy failed" in status and "no progress for 0.5 s" in status
        check = pgvault("check", "-d", db, env=env, expect=None).stdout
        assert "copy offsite is 3 backup(s) behind" in check
        assert "its last run failed: " in check
        report = json.loads(pgvault("status", "--json", "-d", db, env=env).stdout)[0]
        offsite = next(c for c in report["copies"] if c["name"] == "offsite")
        assert offsite["behind"] == 3 and "no progress" in offsite["last_error"]

        caught_up = pgvault("copy", env=env).stdout
        assert "offsite: 3 backup(s) copied" in caught_up
        main = open_storage(f"file://{primary}")
        offsite_storage = open_storage(f"s3://{s3_bucket}/app", s3_options)
        assert snapshot(offsite_storage) == snapshot(main) == snapshot(
            open_storage(f"file://{cold}"))  # nothing lost
        status = pgvault("status", "-d", db, env=env, expect=None).stdout
        assert "copy offsite   up to date" in status and "last copy failed" not in status
        assert _metric(textfile, "pgvault_copy_behind_backups", "offsite") == 0
        assert _metric(textfile, "pgvault_copy_last_error_timestamp_seconds", "offsite") == 0
        target = f"downcopy_restored_{uuid.uuid4().hex[:10]}"
        target_names.append(target)
        pgvault("restore", "latest", "--repo", "offsite", "--to", target, "-d",
                pg_cluster.url(), env=env)
        assert_databases_equal(source, pg_cluster.url(target))
