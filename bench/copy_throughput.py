"""Copy throughput: `pgvault copy` local->S3 and S3->S3 against a plain transfer of the same
objects in the same run.

    .venv/bin/python bench/copy_throughput.py [--size-mb 100] [--small 400] [--runs 3]

The repository holds one backup of --size-mb MB (one incompressible artifact, as a zstd
dump is) and one of --small objects of 16 KiB each (objects/s: many small objects). The
baseline is `aws s3 sync` when .venv/bin/aws exists; otherwise boto3's managed transfers
(s3transfer, the library `aws s3 sync` uses): upload_file per object for local->S3, and
both the server-side `copy` and a download+upload stream for S3->S3. Every transfer runs on
its own loopback moto server (bench/_s3.py), so figures compare tools, not networks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _s3 import BUCKET, MotoServer  # beside this script, as bench/run.py imports it

VENV = Path(sys.executable).parent


def fabricate(root: Path, size_mb: int, small: int) -> tuple[int, int]:
    """Two backups in a file repository; (bytes, objects) stored."""
    from pgvault.catalog import Catalog, artifact_key
    from pgvault.model import Artifact, Manifest, new_backup_id
    from pgvault.storage import open_storage

    storage = open_storage(f"file://{root}")
    total = objects = 0
    now = datetime.now(UTC)
    for index, parts in enumerate(([size_mb << 20], [16 << 10] * small)):
        when = now - timedelta(minutes=10 - index)
        backup_id = new_backup_id(when)
        artifacts = []
        for number, size in enumerate(parts):
            data = os.urandom(size)
            key = artifact_key("bench", backup_id, f"part-{number}.zst")
            storage.put_bytes(key, data)
            artifacts.append(Artifact(name=f"part-{number}", key=key, size=size, raw_size=size,
                                      sha256=hashlib.sha256(data).hexdigest()))
            total += size
            objects += 1
        Catalog(storage).commit(Manifest(id=backup_id, database="bench", started_at=when,
                                         finished_at=when, pgvault_version="bench",
                                         artifacts=artifacts))
    return total, objects


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def config(path: Path, primary: str, copy: str, endpoint: str) -> dict[str, str]:
    path.write_text(f'[s3]\nendpoint_url = "{endpoint}"\npath_style = true\n'
                    f'[[repos]]\nname = "main"\nurl = "{primary}"\nprimary = true\n'
                    f'[[repos]]\nname = "copy"\nurl = "{copy}"\n'
                    'retention = { keep_last = 100 }\n')
    path.chmod(0o600)
    return {"PGVAULT_CONFIG": str(path)}


def pgvault_copy(env: dict[str, str], jobs: int) -> None:
    subprocess.run([str(VENV / "pgvault"), "copy", "--jobs", str(jobs), "--json"],
                   env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--small", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pgvault-bench-copy-"))
    server = MotoServer(work / "s3")
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
        env |= server.env()
        os.environ.update(server.env())
        import boto3
        from boto3.s3.transfer import TransferConfig

        client = boto3.client("s3", endpoint_url=server.url)
        transfer = TransferConfig(max_concurrency=args.jobs)
        local = work / "primary"
        total, objects = fabricate(local, args.size_mb, args.small)
        files = [p for p in local.rglob("*") if p.is_file()]
        aws = VENV / "aws"
        rows: dict[str, list[float]] = {}

        pending: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = []

        def run(label: str, action: Callable[[], Any], reset: Callable[[], Any]) -> None:
            pending.append((label, action, reset))

        def alternate() -> None:
            """The transfers of one direction in turn, run after run: the machine's noise
            falls on each alike."""
            for _ in range(args.runs):
                for label, action, reset in pending:
                    reset()
                    rows.setdefault(label, []).append(timed(action))
            pending.clear()

        # local -> S3
        cfg = config(work / "l2s.toml", f"file://{local}", f"s3://{BUCKET}/copy", server.url)
        run("pgvault copy  local->S3", lambda: pgvault_copy(env | cfg, args.jobs),
            lambda: server.clear("copy/"))
        if aws.exists():
            run("aws s3 sync   local->S3", lambda: subprocess.run(
                [str(aws), "--endpoint-url", server.url, "s3", "sync", str(local),
                 f"s3://{BUCKET}/sync"], env=env, check=True, stdout=subprocess.DEVNULL),
                lambda: server.clear("sync/"))
        else:
            def upload_all() -> None:
                with ThreadPoolExecutor(args.jobs) as pool:
                    list(pool.map(lambda p: client.upload_file(
                        str(p), BUCKET, f"boto/{p.relative_to(local)}", Config=transfer),
                        files))
            run("boto3 upload  local->S3", upload_all, lambda: server.clear("boto/"))

        alternate()

        # S3 -> S3: the primary in S3 (one pgvault copy puts it there), copied to a prefix.
        server.clear("copy/")
        pgvault_copy(env | cfg, args.jobs)
        keys = [k for k, _ in server._keys("copy/")]
        cfg2 = config(work / "s2s.toml", f"s3://{BUCKET}/copy", f"s3://{BUCKET}/copy2",
                      server.url)
        run("pgvault copy  S3->S3", lambda: pgvault_copy(env | cfg2, args.jobs),
            lambda: server.clear("copy2/"))
        if aws.exists():
            run("aws s3 sync   S3->S3 (server-side)", lambda: subprocess.run(
                [str(aws), "--endpoint-url", server.url, "s3", "sync", f"s3://{BUCKET}/copy",
                 f"s3://{BUCKET}/sync2"], env=env, check=True, stdout=subprocess.DEVNULL),
                lambda: server.clear("sync2/"))
        else:
            def server_side() -> None:
                with ThreadPoolExecutor(args.jobs) as pool:
                    list(pool.map(lambda k: client.copy({"Bucket": BUCKET, "Key": k}, BUCKET,
                                                        "boto2/" + k, Config=transfer), keys))

            def streamed() -> None:
                def one(k: str) -> None:
                    body = client.get_object(Bucket=BUCKET, Key=k)["Body"]
                    client.upload_fileobj(body, BUCKET, "boto3/" + k, Config=transfer)
                with ThreadPoolExecutor(args.jobs) as pool:
                    list(pool.map(one, keys))
            run("boto3 copy    S3->S3 (server-side)", server_side, lambda: server.clear("boto2/"))
            run("boto3 get+put S3->S3 (streamed)", streamed, lambda: server.clear("boto3/"))

        alternate()
        print(f"{total / 1e6:.1f} MB in {objects} objects (one of {args.size_mb} MB, "
              f"{args.small} of 16 KiB), {args.jobs} at once, median of {args.runs} alternated "
              "runs; "
              f"baseline: {'aws s3 sync' if aws.exists() else 'boto3 (no .venv/bin/aws)'}")
        for label, seconds in rows.items():
            median = statistics.median(seconds)
            print(f"  {label:<38} {median:6.2f} s  {total / median / 1e6:7.1f} MB/s  "
                  f"{objects / median:7.0f} objects/s  (runs {min(seconds):.2f}-"
                  f"{max(seconds):.2f} s)")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
