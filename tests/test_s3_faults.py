"""S3 through a fault proxy: stalls end in bounded time, signals end any wait, resets resume.

Real parts only: a real cluster, moto's S3 server behind tests/faultproxy.py (a TCP proxy
that stalls or resets connections), the real `pgvault` CLI in a child process, real signals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest

from cli_runner import PGVAULT, clean_env, one_line_error, pgvault
from dbcompare import assert_databases_equal
from faultproxy import FaultProxy, fault_proxy
from fixtures_pg import NewName
from pgvault.errors import StorageError
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage.s3 import S3Options, S3Storage

MiB = 1 << 20

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client


def noisy_db(make_db: Callable[..., str], rows: int) -> str:
    url = make_db()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE noise (id int PRIMARY KEY, hex text NOT NULL)")
        # md5 hex of random: zstd only halves it, so the dump stays big without a slow fill.
        conn.execute("INSERT INTO noise SELECT i, md5(random()::text) || md5(random()::text) "
                     "FROM generate_series(1, %s) AS i", (rows,))
        conn.execute("CREATE TABLE small (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO small SELECT i, 'row ' || i FROM generate_series(1, 100) i")
    return url


@pytest.fixture
def big_db(make_db: Callable[..., str]) -> str:
    """A database whose dump stays about 12 MiB after zstd: a multipart upload of 2+ parts."""
    return noisy_db(make_db, 380_000)


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    with fault_proxy(s3_server) as p:
        yield p


def s3_env(endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    env = clean_env()
    env.update({"PGVAULT_S3__ENDPOINT_URL": endpoint, "PGVAULT_S3__PATH_STYLE": "true",
                "PGVAULT_REPO": f"s3://{bucket}/app"})
    env.update(extra)
    return env


def keys(client: S3Client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def uploads(client: S3Client, bucket: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def assert_left_clean(client: S3Client, bucket: str) -> None:
    """No lock, no backup data, no multipart upload: only the run history may remain."""
    left = keys(client, bucket)
    assert all(k.startswith("app/status/") for k in left), left
    assert uploads(client, bucket) == []


def error_line(stderr: str) -> str:
    """The one error line of a failed run (progress lines such as restore's choice aside)."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("pgvault: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def start_backup(url: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([PGVAULT, "backup", "--dbname", url], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def wait_for_stall(proxy: FaultProxy, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while proxy.faults.stalled == 0:
        assert proc.poll() is None, f"backup ended before the stall: {proc.communicate()}"
        assert time.monotonic() < deadline, "the upload never reached the stall"
        time.sleep(0.05)


def test_stalled_upload_times_out_cleanly(
    big_db: str, proxy: FaultProxy, s3_client: S3Client, s3_bucket: str,
    new_name: NewName, pg_cluster: EphemeralCluster,
) -> None:
    # Every connection that has carried 1 MiB towards S3 goes silent: each part's upload,
    # and each retry of it, stalls; small requests (lock, abort, delete) still pass.
    proxy.faults.stall_after_up = MiB
    env = s3_env(proxy.url, s3_bucket, PGVAULT_IO_TIMEOUT_SECONDS="2")
    proc = start_backup(big_db, env)
    wait_for_stall(proxy, proc)
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    took = time.monotonic() - started
    assert proc.returncode == 5, err
    line = one_line_error(subprocess.CompletedProcess([], 5, "", err))
    print(f"stall to exit: {took:.1f} s; {line}")
    assert "no progress for 2 s" in line, line
    assert took < 30, f"took {took:.1f} s after the stall"
    assert_left_clean(s3_client, s3_bucket)
    # The same repository still works once the network does.
    proxy.faults.stall_after_up = None
    pgvault("backup", "--dbname", big_db, env=env)
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), env=env)
    assert_databases_equal(big_db, pg_cluster.url(target))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_ends_a_stalled_upload(
    sig: signal.Signals, code: int, big_db: str, proxy: FaultProxy, s3_client: S3Client,
    s3_bucket: str, new_name: NewName, pg_cluster: EphemeralCluster,
) -> None:
    proxy.faults.stall_after_up = MiB
    env = s3_env(proxy.url, s3_bucket, PGVAULT_IO_TIMEOUT_SECONDS="600")
    proc = start_backup(big_db, env)
    wait_for_stall(proxy, proc)
    time.sleep(1)  # let it settle into its wait
    proc.send_signal(sig)
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    took = time.monotonic() - started
    assert proc.returncode == code, err
    assert "interrupted" in err
    print(f"{sig.name} to exit: {took:.2f} s")
    assert took < 5, f"took {took:.1f} s after the signal"
    assert_left_clean(s3_client, s3_bucket)
    proxy.faults.stall_after_up = None
    pgvault("backup", "--dbname", big_db, env=env)
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), env=env)
    assert_databases_equal(big_db, pg_cluster.url(target))


@pytest.fixture
def backed_up(big_db: str, proxy: FaultProxy, s3_bucket: str) -> dict[str, str]:
    """big_db backed up through the proxy while it does nothing; the environment to reach it."""
    env = s3_env(proxy.url, s3_bucket, PGVAULT_IO_TIMEOUT_SECONDS="5")
    pgvault("backup", "--dbname", big_db, env=env)
    return env


def test_restore_resumes_after_a_reset(
    big_db: str, backed_up: dict[str, str], proxy: FaultProxy, new_name: NewName,
    pg_cluster: EphemeralCluster,
) -> None:
    # The dump's GET is reset once, 1 MiB into its body; the reads after it resume there.
    proxy.faults.reset_after_down = MiB
    proxy.faults.resets = 1
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), env=backed_up)
    assert proxy.faults.reset == 1
    assert_databases_equal(big_db, pg_cluster.url(target))


def test_restore_gives_up_after_bounded_resumes(
    backed_up: dict[str, str], proxy: FaultProxy, new_name: NewName,
    pg_cluster: EphemeralCluster,
) -> None:
    proxy.faults.reset_after_down = MiB  # every GET of a big body, every time
    started = time.monotonic()
    proc = pgvault("restore", "latest", "--to", new_name(), "--dbname", pg_cluster.url(),
                   env=backed_up, expect=5, timeout=120)
    line = error_line(proc.stderr)
    assert "gave up after 5 resumed reads" in line, line
    assert proxy.faults.reset == 6  # the first read and its five resumptions
    assert time.monotonic() - started < 60


def test_resumed_read_refuses_a_changed_object(
    proxy: FaultProxy, s3_client: S3Client, s3_bucket: str, s3_options: S3Options,
) -> None:
    """Bytes of a new object are never spliced onto the old one's (If-Match on the ETag)."""
    old, new = os.urandom(3 * MiB), os.urandom(3 * MiB)
    storage = S3Storage(s3_bucket, "app", dataclasses.replace(s3_options, endpoint_url=proxy.url))
    storage.put_bytes("blob", old)
    # The reset comes 2 MiB in, past the first 1 MiB the reader buffers; at 2 MiB/s it comes
    # a second in, well after the object has been replaced.
    proxy.faults.reset_after_down = 2 * MiB
    proxy.faults.resets = 1
    proxy.faults.rate = 2 * MiB
    with storage.open("blob") as stream:
        head = stream.read(64 << 10)
        s3_client.put_object(Bucket=s3_bucket, Key="app/blob", Body=new)
        assert proxy.faults.reset == 0
        with pytest.raises(StorageError, match="changed while it was read"):
            stream.read()
    assert head == old[: len(head)]
    assert proxy.faults.reset == 1
    # Unchanged, the same fault is resumed over, and every byte is the object's.
    proxy.faults.reset, proxy.faults.resets, proxy.faults.rate = 0, 1, None
    with storage.open("blob") as stream:
        assert hashlib.sha256(stream.read()).digest() == hashlib.sha256(new).digest()
    assert proxy.faults.reset == 1


def test_sigterm_ends_parallel_dumps_stalled_in_other_threads(
    make_db: Callable[..., str], proxy: FaultProxy, s3_client: S3Client, s3_bucket: str,
    new_name: NewName, pg_cluster: EphemeralCluster,
) -> None:
    """With --streams 2 the big table's upload runs in a worker thread, not the signalled one."""
    url = noisy_db(make_db, 760_000)  # a table above the 64 MiB a dump of its own needs
    proxy.faults.stall_after_up = MiB
    # One part in flight: the worker then waits on it, not on pg_dump, which the signalled
    # thread's cleanup stops.
    env = s3_env(proxy.url, s3_bucket, PGVAULT_IO_TIMEOUT_SECONDS="600",
                 PGVAULT_S3__MAX_CONCURRENCY="1")
    proc = subprocess.Popen([PGVAULT, "backup", "--dbname", url, "--streams", "2"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    wait_for_stall(proxy, proc)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    took = time.monotonic() - started
    print(f"SIGTERM to exit with --streams 2: {took:.2f} s")
    assert proc.returncode == 143, err
    assert took < 5, f"took {took:.1f} s after the signal"
    assert_left_clean(s3_client, s3_bucket)
    proxy.faults.stall_after_up = None
    pgvault("backup", "--dbname", url, "--streams", "2", env=env)
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), env=env)
    assert_databases_equal(url, pg_cluster.url(target))
