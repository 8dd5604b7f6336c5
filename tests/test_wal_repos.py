"""wal-push to every WAL repository of [[repos]]: one down gets a backlog that catches up.

The down repository is a real moto S3 server behind tests/faultproxy.py (stalled), a
closed port (connection refused), or a tiny HTTP server answering 503 to everything;
the primary is a local folder. The last test runs a real archiving cluster (archive_command
= pgvault wal-push) under pgbench load while the copy is stalled, and restores from each
repository alone afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cli_runner import pgvault
from dbcompare import assert_databases_equal
from faultproxy import Faults, fault_proxy
from http_recorder import LoopbackServer
from pgvault.catalog import Catalog, wal_object_key
from pgvault.ops.wal import archived
from pgvault.pg.binaries import tool
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage
from pgvault.storage.s3 import S3Options
from test_physical import (  # noqa: F401 (server_pgvault: a fixture)
    _as_root,
    _postgres_owned_dir,
    _stop_server,
    restore_pitr,
    server_pgvault,
    sql,
)

CLUSTER = "main"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there: connection refused


@contextlib.contextmanager
def _always_503() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = LoopbackServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _config(path: Path, primary: Path, bucket: str, endpoint: str, *, retry: float = 0,
            io_timeout: float = 0.5) -> Path:
    path.write_text(
        f'io_timeout_seconds = {io_timeout}\n'
        f'[physical]\nwal_retry_seconds = {retry}\npush_ahead = 4\n'
        'archive_wait_seconds = 20\n'
        f'[[repos]]\nname = "main"\nurl = "file://{primary}"\nprimary = true\n'
        f'[[repos]]\nname = "offsite"\nurl = "s3://{bucket}/pg"\nwal = true\n'
        f'[repos.s3]\nendpoint_url = "{endpoint}"\npath_style = true\n')
    if _as_root():
        owner = pwd.getpwnam("postgres")
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


def _s3(bucket: str, endpoint: str) -> object:
    return open_storage(f"s3://{bucket}/pg", S3Options(endpoint_url=endpoint,
                                                       region="us-east-1", path_style=True))


def _walfiles(storage: object) -> set[str]:
    return {f.wal.name for f in archived(storage, CLUSTER)}  # type: ignore[arg-type]


def _segments(cluster: EphemeralCluster, folder: Path, count: int) -> list[Path]:
    """Copies of ``count`` WAL segments the server has just finished."""
    folder.mkdir(parents=True, exist_ok=True)
    found = []
    url = cluster.url()
    for _ in range(count):
        sql(url, "CREATE TABLE IF NOT EXISTS filler (x text)",
            "INSERT INTO filler SELECT repeat('x', 100) FROM generate_series(1, 500)")
        name = sql(url, "SELECT pg_walfile_name(pg_switch_wal())")
        shutil.copyfile(cluster.data_dir / "pg_wal" / name, folder / name)
        found.append(folder / name)
    return found


@pytest.mark.parametrize("fault", ["refused", "503", "stalled"])
def test_a_repository_that_is_down_gets_a_backlog_that_later_pushes_catch_up(
    fault: str, pg_cluster: EphemeralCluster, s3_server: str, s3_bucket: str, tmp_path: Path
) -> None:
    primary = tmp_path / "repo"
    first, second, third = _segments(pg_cluster, tmp_path / "pg_wal", 3)
    env = {"TMPDIR": str(tmp_path)}  # where wal-push keeps its "down since" hints
    with contextlib.ExitStack() as stack:
        if fault == "refused":
            endpoint = f"http://127.0.0.1:{_closed_port()}"
        elif fault == "503":
            endpoint = stack.enter_context(_always_503())
        else:
            faults = Faults(stall_after_up=0)
            endpoint = stack.enter_context(fault_proxy(s3_server, faults)).url
        down = _config(tmp_path / "down.toml", primary, s3_bucket, endpoint, retry=30)
        started = time.monotonic()
        pushed = pgvault("wal-push", str(first), "--config", str(down), env=env)
        # Every network wait is bounded by io_timeout_seconds (1 s here, 3 tries).
        assert time.monotonic() - started < 15
        assert f"{first.name} is archived in main; offsite is behind" in pushed.stderr
        # Within wal_retry_seconds the down repository is not even tried: no wait at all.
        tried = faults.connections if fault == "stalled" else 0
        skipped = pgvault("wal-push", str(second), "--config", str(down), env=env)
        assert "skipped: its last push failed" in skipped.stderr
        assert (faults.connections if fault == "stalled" else 0) == tried
        local = open_storage(f"file://{primary}")
        assert _walfiles(local) == {first.name, second.name}
        report = json.loads(pgvault("check-archive", "--no-switch", "--json", "--config",
                                    str(down), env=env).stdout)
        assert report["backlog"]["offsite"]["files"] == 2
        if fault == "stalled":
            faults.stall_after_up = None  # new connections pass again

    up = _config(tmp_path / "up.toml", primary, s3_bucket, s3_server)
    caught = pgvault("wal-push", str(third), "--config", str(up), env=env)
    assert "caught up 2 backlog file(s) to offsite" in caught.stderr
    offsite = _s3(s3_bucket, s3_server)
    assert _walfiles(offsite) == _walfiles(local) == {first.name, second.name, third.name}
    assert Catalog(local).wal_backlog(CLUSTER) == []
    report = json.loads(pgvault("check-archive", "--no-switch", "--json", "--config", str(up),
                                env=env).stdout)
    assert report["backlog"]["offsite"]["files"] == 0
    # wal-fetch reads from whichever repository has the file.
    for item in archived(local, CLUSTER):
        if item.wal.name == first.name:
            local.delete([item.key])
    pgvault("wal-fetch", first.name, str(tmp_path / "fetched"), "--config", str(up), env=env)
    assert (tmp_path / "fetched").read_bytes() == first.read_bytes()

    if fault == "refused":
        # Reaching no repository is never success: PostgreSQL keeps the segment and retries.
        closed = f"http://127.0.0.1:{_closed_port()}"
        nowhere = tmp_path / "nowhere.toml"
        nowhere.write_text(
            'io_timeout_seconds = 1\n[physical]\nwal_retry_seconds = 0\n'
            f'[[repos]]\nname = "a"\nurl = "s3://{s3_bucket}/a"\nprimary = true\n'
            f'[repos.s3]\nendpoint_url = "{closed}"\npath_style = true\n'
            f'[[repos]]\nname = "b"\nurl = "s3://{s3_bucket}/b"\nwal = true\n'
            f'[repos.s3]\nendpoint_url = "{closed}"\npath_style = true\n')
        failed = pgvault("wal-push", str(third), "--config", str(nowhere), env=env, expect=None)
        assert 0 < failed.returncode <= 125, failed.stderr


PGBENCH = tool("pgbench", 15)


def test_a_stalled_copy_during_real_archiving_catches_up_and_each_repository_restores(
    server_pgvault: str, s3_server: str, s3_bucket: str, tmp_path: Path  # noqa: F811
) -> None:
    primary = _postgres_owned_dir("pgvault-walrepos-")
    pitr = _postgres_owned_dir("pgvault-walrepos-pitr-")
    home = _postgres_owned_dir("pgvault-walrepos-home-")  # config and TMPDIR of the server
    faults = Faults()
    cluster = None
    try:
        with fault_proxy(s3_server, faults) as proxy:
            config = _config(home / "pgvault.toml", primary, s3_bucket, proxy.url, retry=2)
            credentials = " ".join(f"{k}={os.environ[k]}" for k in
                                   ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                    "AWS_DEFAULT_REGION"))
            command = (f"{credentials} TMPDIR={home} {server_pgvault} wal-push %p "
                       f"--config {config}")
            cluster = EphemeralCluster(
                settings={"archive_mode": True, "archive_command": command, "fsync": False,
                          "wal_level": "replica", "max_wal_size": "32MB"},
                initdb_args=["--wal-segsize=1"]).start()
            admin = cluster.url()
            sql(admin, "CREATE DATABASE app STRATEGY FILE_COPY")
            app = cluster.url("app")
            subprocess.run([PGBENCH, "-i", "-s", "2", "-q", app], check=True,
                           capture_output=True)
            for repo in ("main", "offsite"):
                pgvault("basebackup", "-d", admin, "--config", str(config), "--repo", repo,
                        "--fast-checkpoint")

            faults.stall_after_up = 0  # the copy stalls: every new connection hangs
            subprocess.run([PGBENCH, "-c", "4", "-T", "3", "-n", app], check=True,
                           capture_output=True)
            # The primary stays current meanwhile: check-archive's segment arrives there.
            checked = json.loads(pgvault("check-archive", "-d", admin, "--config", str(config),
                                         "--timeout", "30", "--json").stdout)
            assert checked["timelines"][0]["gaps"] == []
            behind = checked["backlog"]["offsite"]["files"]
            assert behind > 5, checked
            status = json.loads(pgvault("status", "--json", "--config", str(config)).stdout)
            archive = next(s for s in status if s["database"] == "main")["archive"]
            assert archive["backlog"]["offsite"]["files"] >= behind - 2, archive
            pg_wal = cluster.data_dir / "pg_wal"
            ready = list((pg_wal / "archive_status").glob("*.ready"))
            assert len(ready) <= 10, ready  # the stall does not hold segments back

            faults.stall_after_up = None  # back
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                sql(app, "UPDATE pgbench_branches SET bbalance = bbalance + 1",
                    "SELECT pg_switch_wal()")
                report = json.loads(pgvault("check-archive", "--no-switch", "--json",
                                            "--config", str(config)).stdout)
                if report["backlog"]["offsite"]["files"] == 0:
                    break
                time.sleep(0.3)
            else:
                raise AssertionError(f"offsite never caught up: {report['backlog']}")
            # Quiet now: the last segment archived everywhere, then restore from each alone.
            sql(admin, "SELECT pg_switch_wal()")
            pgvault("check-archive", "-d", admin, "--config", str(config), "--timeout", "30")
            local = open_storage(f"file://{primary}")
            deadline = time.monotonic() + 20
            while _walfiles(local) - _walfiles(_s3(s3_bucket, s3_server)) and \
                    time.monotonic() < deadline:
                sql(admin, "SELECT pg_switch_wal()")
                time.sleep(0.5)
            assert _walfiles(local) <= _walfiles(_s3(s3_bucket, s3_server))

        sql(admin, "ALTER SYSTEM SET archive_command = 'true'", "SELECT pg_reload_conf()")
        alone = {
            "main": f'repo = "file://{primary}"\n',
            "offsite": (f'repo = "s3://{s3_bucket}/pg"\n[s3]\nendpoint_url = "{s3_server}"\n'
                        'path_style = true\n'),
        }
        for repo, text in alone.items():
            only = home / f"{repo}-only.toml"
            only.write_text(text)
            if _as_root():
                owner = pwd.getpwnam("postgres")
                os.chown(only, owner.pw_uid, owner.pw_gid)
            pgdata = pitr / repo
            server, _ = restore_pitr(pgdata, server_pgvault, "--config", str(only))
            assert_databases_equal(app, server + "app")
            _stop_server(pgdata)
    finally:
        if cluster is not None:
            with contextlib.suppress(psycopg.Error):
                sql(cluster.url(), "ALTER SYSTEM SET archive_command = 'true'",
                    "SELECT pg_reload_conf()")
            cluster.stop()
        for folder in (primary, pitr, home):
            for pid_file in folder.glob("*/postmaster.pid"):
                _stop_server(pid_file.parent)
            shutil.rmtree(folder, ignore_errors=True)


class _Counting:
    """A storage that counts what wal-push asks of it; ``racer`` runs after each put (a
    second writer acting between our put and our check)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.lists: list[str] = []
        self.puts: list[str] = []
        self.racer: object = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def list(self, prefix: str) -> Iterator[object]:
        with self._lock:
            self.lists.append(prefix)
        return self.inner.list(prefix)  # type: ignore[attr-defined, no-any-return]

    def put(self, key: str, stream: object) -> object:
        info = self.inner.put(key, stream)  # type: ignore[attr-defined]
        with self._lock:
            self.puts.append(key)
        if callable(self.racer):
            self.racer(key)
        return info


def _race_once(storage: _Counting, victim: Path) -> None:
    """Once, right after our put of ``victim``'s name: a second writer puts other bytes
    (another server's segment of the same name) beside it."""

    def racer(key: str) -> None:
        if f"/{victim.name}/" in key and storage.racer is not None:
            storage.racer = None
            other = victim.read_bytes()[:-1] + b"\x01"
            storage.inner.put(  # type: ignore[attr-defined]
                wal_object_key(CLUSTER, victim.name, hashlib.sha256(other).hexdigest(), ""),
                io.BytesIO(other))

    storage.racer = racer


def _ready(segments: list[Path]) -> Path:
    status = segments[0].parent / "archive_status"
    status.mkdir(exist_ok=True)
    for segment in segments:
        (status / f"{segment.name}.ready").touch()
    return status


def test_one_push_lists_once_for_all_its_segments_and_checks_once_after(
    pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    from pgvault.ops.wal import CONFIRM_EVERY, push_ahead

    segments = _segments(pg_cluster, tmp_path / "pg_wal", 6)
    status = _ready(segments)
    storage = _Counting(open_storage(f"file://{tmp_path / 'repo'}"))
    done = push_ahead(storage, CLUSTER, segments[0], [], ahead=4)  # type: ignore[arg-type]
    assert not done.failed and len(done.ahead) == 5
    assert _walfiles(storage.inner) == {s.name for s in segments}
    assert sorted(p.name for p in status.iterdir()) == sorted(
        [f"{segments[0].name}.ready"] + [f"{s.name}.done" for s in segments[1:]])
    wal_lists = [p for p in storage.lists if p.startswith(f"wal/{CLUSTER}/0")]
    groups = {s.name[:22] for s in segments}  # 256 names share one listing
    # Before: a listing before and after each put (12 here). Now: one before, one after,
    # and one for every CONFIRM_EVERY files confirmed while others are still being pushed.
    assert 2 * len(groups) <= len(wal_lists) <= (
        2 * len(groups) + (len(segments) - 1) // CONFIRM_EVERY) < 2 * len(segments), storage.lists
    assert len([k for k in storage.puts if k.startswith(f"wal/{CLUSTER}/0")]) == 6

    # Pushed again (PostgreSQL asks after a crash): one listing answers every file, no put.
    for segment in segments[1:]:
        (status / f"{segment.name}.done").rename(status / f"{segment.name}.ready")
    storage.lists.clear()
    storage.puts.clear()
    again = push_ahead(storage, CLUSTER, segments[0], [], ahead=4)  # type: ignore[arg-type]
    assert again.result.already_archived and all(r.already_archived for r in again.ahead)
    assert len([p for p in storage.lists if p.startswith(f"wal/{CLUSTER}/0")]) == len(groups)
    assert storage.puts == []


def test_a_long_push_ahead_marks_its_files_done_as_it_goes_not_only_at_its_end(
    pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    """A call that streams many segments lets PostgreSQL drop the first ones from pg_wal
    while it still pushes the last: each .ready file keeps its segment there (on S3 a
    whole call's 40 files were held, and pg_wal outgrew max_wal_size)."""
    from pgvault.ops.wal import CONFIRM_EVERY, push_ahead

    segments = _segments(pg_cluster, tmp_path / "pg_wal", 8)
    status = _ready(segments)
    storage = _Counting(open_storage(f"file://{tmp_path / 'repo'}"))
    last = segments[-1]
    seen_done: list[set[str]] = []

    def racer(key: str) -> None:
        if f"/{last.name}/" in key:
            seen_done.append({p.name for p in status.glob("*.done")})

    storage.racer = racer
    done = push_ahead(storage, CLUSTER, segments[0], [], ahead=2)  # type: ignore[arg-type]
    assert not done.failed and len(done.ahead) == 7
    (when_last_stored,) = seen_done
    assert {f"{s.name}.done" for s in segments[1:1 + CONFIRM_EVERY]} <= when_last_stored
    assert sorted(p.name for p in status.iterdir()) == sorted(
        [f"{segments[0].name}.ready"] + [f"{s.name}.done" for s in segments[1:]])
    wal_lists = [p for p in storage.lists if p.startswith(f"wal/{CLUSTER}/0")]
    # One listing before, then one per CONFIRM_EVERY files: still under one per file.
    assert len(wal_lists) < len(segments), storage.lists


def test_a_second_writer_racing_a_push_ahead_is_refused_and_its_file_stays_ready(
    pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:

    from pgvault.errors import IntegrityError
    from pgvault.ops.wal import push, push_ahead

    segments = _segments(pg_cluster, tmp_path / "pg_wal", 4)
    status = _ready(segments)
    storage = _Counting(open_storage(f"file://{tmp_path / 'repo'}"))
    victim = segments[2]
    _race_once(storage, victim)  # another server's bytes for that name, right after our put
    done = push_ahead(storage, CLUSTER, segments[0], [], ahead=4)  # type: ignore[arg-type]
    assert "split brain" in done.failed[victim.name]
    assert (status / f"{victim.name}.ready").exists()  # PostgreSQL asks for it again
    assert {r.walfile for r in done.ahead} == {segments[1].name, segments[3].name}
    for segment in (segments[1], segments[3]):
        assert (status / f"{segment.name}.done").exists()
    # Asked for it, the push now refuses before writing anything.
    storage.puts.clear()
    with pytest.raises(IntegrityError, match="split brain"):
        push(storage, CLUSTER, victim, [])  # type: ignore[arg-type]
    assert storage.puts == []


def test_a_push_to_every_repository_lists_each_once_before_and_once_after(
    pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    from pgvault.ops.wal import WalRepo, push_everywhere

    segments = _segments(pg_cluster, tmp_path / "pg_wal", 5)
    status = _ready(segments)
    stores = [_Counting(open_storage(f"file://{tmp_path / name}")) for name in ("a", "b")]
    repos = [WalRepo(name, s) for name, s in zip(("a", "b"), stores, strict=True)]  # type: ignore[arg-type]
    done = push_everywhere(repos, CLUSTER, segments[0], [], ahead=4, retry_seconds=0)
    assert done.asked.stored_in == ["a", "b"] and len(done.ahead) == 4
    assert all((status / f"{s.name}.done").exists() for s in segments[1:])
    groups = {s.name[:22] for s in segments}
    for storage in stores:
        assert _walfiles(storage.inner) == {s.name for s in segments}
        wal_lists = [p for p in storage.lists if p.startswith(f"wal/{CLUSTER}/0")]
        assert len(wal_lists) == 2 * len(groups) < len(segments), storage.lists


def test_catching_up_a_backlog_lists_once_per_name_group_and_once_after_its_copies(
    pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    """A repository's backlog of 6 segments is caught up by the next push with the push's
    own listings and one listing after the copies (it was a listing per backlog file at
    the source and one at the target); a second writer's other bytes landing under a
    copied name keep that file's marker and are reported."""

    from pgvault.ops.wal import WalRepo, push, push_everywhere

    segments = _segments(pg_cluster, tmp_path / "pg_wal", 8)
    backlog, asked = segments[:7], segments[7]
    stores = [_Counting(open_storage(f"file://{tmp_path / name}")) for name in ("a", "b")]
    a, b = stores
    for segment in backlog:  # b was down: a holds them and a marker for b each
        push(a.inner, CLUSTER, segment, [])  # type: ignore[arg-type]
        Catalog(a.inner).add_wal_backlog(CLUSTER, "b", segment.name)  # type: ignore[arg-type]
    victim = backlog[3]
    _race_once(b, victim)  # another server's bytes for a copied name, right after the copy
    repos = [WalRepo(name, s) for name, s in zip(("a", "b"), stores, strict=True)]  # type: ignore[arg-type]
    done = push_everywhere(repos, CLUSTER, asked, [], ahead=0, retry_seconds=0, catch_up=10)
    assert done.asked.stored_in == ["a", "b"]
    assert done.caught_up == {"b": 6}
    assert "split brain" in done.catch_up_errors["b"]
    assert [m.walfile for m in Catalog(a.inner).wal_backlog(CLUSTER)] == [victim.name]  # type: ignore[arg-type]
    assert _walfiles(b.inner) == {s.name for s in segments}
    pushed = {asked.name[:22]}
    groups = {s.name[:22] for s in backlog}
    lists = {s: [p for p in s.lists if p.startswith(f"wal/{CLUSTER}/0")] for s in stores}
    # The push: one listing before and one after in each; then the catch-up lists at the
    # source (a) the groups the push did not, and at the target (b) once after its copies.
    assert len(lists[a]) == 2 * len(pushed) + len(groups - pushed), a.lists
    assert len(lists[b]) == 2 * len(pushed) + len(groups) < len(backlog), b.lists


def test_a_push_of_bytes_read_by_the_caller_lists_once_before_and_once_after(
    pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    """push_read (an incremental base backup's own push of its WAL): one listing per name
    group before and one after, no listing per file; a file already archived is not read
    again, one its reader leaves out (None) is not stored."""
    from pgvault.ops.wal import push, push_read

    segments = _segments(pg_cluster, tmp_path / "pg_wal", 4)
    storage = _Counting(open_storage(f"file://{tmp_path / 'repo'}"))
    push(storage.inner, CLUSTER, segments[0], [])  # type: ignore[arg-type]
    read: list[str] = []

    def reader(name: str) -> bytes | None:
        read.append(name)
        return None if name == segments[3].name else (tmp_path / "pg_wal" / name).read_bytes()

    done = push_read(storage, CLUSTER, [s.name for s in segments], reader, [])  # type: ignore[arg-type]
    assert [r.walfile for r in done] == [s.name for s in segments[1:3]]
    assert read == [s.name for s in segments[1:]]
    assert _walfiles(storage.inner) == {s.name for s in segments[:3]}
    groups = {s.name[:22] for s in segments}
    wal_lists = [p for p in storage.lists if p.startswith(f"wal/{CLUSTER}/0")]
    assert len(wal_lists) == 2 * len(groups), storage.lists  # was 3 per file
