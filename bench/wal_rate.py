"""WAL archiving under a write-heavy load: pgvault wal-push against pgBackRest's async
archive-push, local repository and S3 (moto over TLS), in the same run.

Each sample is a throwaway cluster (16 MB segments, fsync on, synchronous_commit off)
whose archive_command is one tool's: pgbench with many clients plus bulk inserts run
for --seconds, then the archive drains. The rate is the segments the server saw
archived from the load's start until nothing is left .ready, over that time; pg_wal's
size is sampled every 0.25 s and held against max_wal_size + the push-ahead window.
Then the capacity: a backlog of segments made while archive_command failed, pushed once
the real command is back (segments/s; the load generator's own speed is out of it).
pgBackRest: archive-async=y, process-max = CPUs, compress-type=zst, spool in the temp
folder. Both acknowledge a segment only once it is in the repository.

    .venv/bin/python bench/wal_rate.py --quick      # one sample each, 10 s of load
    .venv/bin/python bench/wal_rate.py              # 3 samples each, 25 s, alternated
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
from _cluster import (
    BENCH_SETTINGS,
    PG_BIN,
    Cluster,
    chown_postgres,
    free_port,
    initdb,
    run_as_postgres,
)

ROOT = Path(__file__).resolve().parents[1]
PGVAULT = str(ROOT / ".venv" / "bin" / "pgvault")
CPUS = os.cpu_count() or 2
SEGMENT = 16 << 20
MAX_WAL_MB = 512
PUSH_AHEAD = 4
KEY, SECRET = "pgvault-bench-key", "pgvault-bench-secret"


class Moto:
    """moto's S3 server behind a TLS front (pgBackRest speaks only HTTPS to S3; moto's own
    TLS ends connections without close_notify, which OpenSSL 3 refuses): socat holds a
    self-signed certificate and forwards to moto's plain HTTP. Both tools go through it."""

    def __init__(self, work: Path) -> None:
        self.work, self.port, self.plain = work, free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Moto:
        import ssl

        log = (self.work / "moto.log").open("wb")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.plain)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env))
        pem = self.work / "tls.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "2", "-subj", "/CN=127.0.0.1", "-keyout", str(pem), "-out",
                        str(self.work / "cert.pem")], check=True, capture_output=True)
        pem.write_text(pem.read_text() + (self.work / "cert.pem").read_text())
        self.procs.append(subprocess.Popen(
            ["socat", f"openssl-listen:{self.port},reuseaddr,fork,cert={pem},verify=0",
             f"tcp:127.0.0.1:{self.plain}"], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
        context = ssl._create_unverified_context()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1,
                                            context=context):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto did not start") from None
                time.sleep(0.2)
        return self

    def bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.url, verify=False, region_name="us-east-1",
                     aws_access_key_id=KEY, aws_secret_access_key=SECRET
                     ).create_bucket(Bucket=name)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)


class Sample:
    """One tool, one repository kind: a cluster archiving under load."""

    def __init__(self, work: Path, tool: str, repo: str, moto: Moto | None, seconds: float,
                 clients: int) -> None:
        self.work, self.tool, self.repo, self.moto = work, tool, repo, moto
        self.seconds, self.clients = seconds, clients
        self.data = work / "data"
        self.cluster: Cluster | None = None

    def _archive_command(self) -> str:
        aws = f"AWS_ACCESS_KEY_ID={KEY} AWS_SECRET_ACCESS_KEY={SECRET} "
        if self.tool == "pgvault":
            config = self.work / "pgvault.toml"
            if self.repo == "local":
                text = f'repo = "file://{self.work / "repo"}"\n'
            else:
                assert self.moto is not None
                bucket = f"pgvault-{self.work.name}".lower().replace("_", "-")
                self.moto.bucket(bucket)
                text = (f'repo = "s3://{bucket}/wal"\n[s3]\nendpoint_url = "{self.moto.url}"\n'
                        'path_style = true\nverify_tls = false\nregion = "us-east-1"\n')
            config.write_text(text + f"[physical]\npush_ahead = {PUSH_AHEAD}\n")
            chown_postgres(config)
            # The server's archiver gets compiled bytecode, as an installed pgvault has.
            env = f"PYTHONPYCACHEPREFIX={self.work / 'pyc'} "
            return f"{aws if self.repo == 's3' else ''}{env}{PGVAULT} wal-push %p --config {config}"
        conf = self.work / "pgbackrest.conf"
        for sub in ("spool", "lock", "log", "pgbr-repo"):
            (self.work / sub).mkdir()
            chown_postgres(self.work / sub)
        repo = f"repo1-path={self.work / 'pgbr-repo'}\n"
        if self.repo == "s3":
            assert self.moto is not None
            bucket = f"pgbr-{self.work.name}".lower().replace("_", "-")
            self.moto.bucket(bucket)
            repo = ("repo1-type=s3\nrepo1-path=/pgbr\n"
                    f"repo1-s3-bucket={bucket}\nrepo1-s3-endpoint=127.0.0.1\n"
                    f"repo1-storage-port={self.moto.port}\nrepo1-s3-region=us-east-1\n"
                    f"repo1-s3-key={KEY}\nrepo1-s3-key-secret={SECRET}\n"
                    "repo1-s3-uri-style=path\nrepo1-storage-verify-tls=n\n")
        conf.write_text(
            f"[global]\n{repo}compress-type=zst\nprocess-max={CPUS}\narchive-async=y\n"
            f"spool-path={self.work / 'spool'}\nlock-path={self.work / 'lock'}\n"
            f"log-path={self.work / 'log'}\nlog-level-console=error\nlog-level-file=off\n"
            f"[bench]\npg1-path={self.data}\n")
        chown_postgres(conf)
        return f"pgbackrest --config={conf} --stanza=bench archive-push %p"

    def setup(self) -> None:
        self.work.mkdir(parents=True)
        chown_postgres(self.work)
        for sub in ("repo", "pyc"):
            (self.work / sub).mkdir()
            chown_postgres(self.work / sub)
        initdb(self.data)
        command = self.command = self._archive_command()
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.write(f"archive_command = '{command}'\n")
        self.cluster = Cluster(self.data, {
            **BENCH_SETTINGS, "wal_level": "replica", "archive_mode": "on",
            "max_wal_size": f"{MAX_WAL_MB}MB", "synchronous_commit": "off",
            "max_connections": "60", "checkpoint_timeout": "5min"})
        self.cluster.start()
        if self.tool == "pgbackrest":
            assert self.cluster.socket_dir is not None
            conf = self.work / "pgbackrest.conf"
            conf.write_text(conf.read_text() + f"pg1-port={self.cluster.port}\n"
                            f"pg1-socket-path={self.cluster.socket_dir}\n")
            made = run_as_postgres(["pgbackrest", f"--config={conf}", "--stanza=bench",
                                    "stanza-create"], check=False)
            if made.returncode:
                raise RuntimeError(f"pgbackrest stanza-create: {made.stdout} {made.stderr}")
        subprocess.run([str(PG_BIN / "pgbench"), "-i", "-q", "-s", "10", self.cluster.url()],
                       check=True, capture_output=True)
        self._sql("CREATE TABLE bulk (id int, body text)")
        self._sql("CHECKPOINT")
        self._drain(deadline=120)

    def _sql(self, query: str) -> Any:
        assert self.cluster is not None
        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchone() if cur.description else None

    def _ready(self) -> int:
        return sum(1 for n in os.listdir(self.data / "pg_wal" / "archive_status")
                   if n.endswith(".ready"))

    def _pg_wal_bytes(self) -> int:
        total = 0
        with os.scandir(self.data / "pg_wal") as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_file():
                        total += entry.stat().st_size
        return total

    def _drain(self, deadline: float) -> float:
        self._sql("SELECT pg_switch_wal()")
        time.sleep(0.05)  # the archiver is woken; its .ready appears
        end = time.monotonic() + deadline
        while self._ready() and time.monotonic() < end:
            time.sleep(0.05)
        if self._ready():
            raise RuntimeError(f"{self.tool}/{self.repo}: archive did not drain")
        return time.monotonic()

    def run(self) -> dict[str, Any]:
        assert self.cluster is not None
        start_count = int(self._sql("SELECT archived_count FROM pg_stat_archiver")[0])
        self.started_seg: str = self._sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0]
        stop = threading.Event()
        peak = [0, 0]

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], self._pg_wal_bytes())
                peak[1] = max(peak[1], self._ready())
                time.sleep(0.25)

        def bulk() -> None:
            with psycopg.connect(self.cluster.url(), autocommit=True) as conn:  # type: ignore[union-attr]
                while not loading.is_set():
                    conn.execute("INSERT INTO bulk SELECT g, repeat(md5(g::text), 6) "
                                 "FROM generate_series(1, 100000) g")

        loading = threading.Event()
        watcher = threading.Thread(target=watch, daemon=True)
        inserter = threading.Thread(target=bulk, daemon=True)
        started = time.monotonic()
        watcher.start()
        inserter.start()
        subprocess.run([str(PG_BIN / "pgbench"), "-n", "-N", "-c", str(self.clients),
                        "-j", str(CPUS), "-T", str(int(self.seconds)), self.cluster.url()],
                       check=True, capture_output=True)
        loading.set()
        inserter.join()
        load_end = time.monotonic()
        drained = self._drain(deadline=600)
        stop.set()
        watcher.join()
        # Every segment from the start to the switch is archived now (none left .ready);
        # archived_count would miss those pgvault pushed ahead (PostgreSQL skips them).
        start_seg = self.started_seg
        now_seg = self._sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0]
        archived = int(now_seg[8:24], 16) - int(start_seg[8:24], 16)
        archived_count = int(self._sql("SELECT archived_count FROM pg_stat_archiver")[0])
        return {"tool": self.tool, "repo": self.repo, "archived": archived,
                "archive_commands": archived_count - start_count,
                "load_s": round(load_end - started, 2), "drain_s": round(drained - load_end, 2),
                "rate": archived / (drained - started),
                "pg_wal_peak_mb": round(peak[0] / 2**20, 1), "ready_peak": peak[1]}

    def capacity(self, segments: int) -> float:
        """Segments/s the tool pushes from a backlog: ``segments`` made while archive_command
        failed, then the real one back; the load generator's speed is out of the figure."""
        quoted = self.command.replace("'", "''")
        self._sql("ALTER SYSTEM SET archive_command = 'false'")
        self._sql("SELECT pg_reload_conf()")
        time.sleep(0.5)
        while self._ready() < segments:
            self._sql("INSERT INTO bulk SELECT g, repeat(md5(g::text), 6) "
                      "FROM generate_series(1, 50000) g")
            self._sql("SELECT pg_switch_wal()")
        made = self._ready()
        started = time.monotonic()
        self._sql(f"ALTER SYSTEM SET archive_command = '{quoted}'")
        self._sql("SELECT pg_reload_conf()")
        end = time.monotonic() + 600
        while self._ready() and time.monotonic() < end:
            time.sleep(0.02)
        return made / (time.monotonic() - started)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one sample each, 10 s of load")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--repos", default="local,s3")
    parser.add_argument("--json", metavar="FILE", help="also write the samples as JSON")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    seconds = args.seconds or (10.0 if args.quick else 25.0)
    backlog = 16 if args.quick else 32
    if shutil.which("pgbackrest") is None:
        print("pgbackrest is not installed (scripts/bench installs it)", file=sys.stderr)
        return 2
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    base = Path(tempfile.mkdtemp(prefix="pgvault-walrate-", dir="/tmp"))
    chown_postgres(base)
    base.chmod(0o755)
    samples: list[dict[str, Any]] = []
    try:
        with Moto(base) as moto:
            for repo in args.repos.split(","):
                for run in range(runs):
                    # Alternate which tool goes first: the machine's drift hits both alike.
                    tools = ["pgvault", "pgbackrest"][:: 1 if run % 2 == 0 else -1]
                    for tool in tools:
                        sample = Sample(base / f"{tool}_{repo}_{run}", tool, repo,
                                        moto if repo == "s3" else None, seconds, args.clients)
                        try:
                            sample.setup()
                            found = sample.run()
                            found["capacity"] = sample.capacity(backlog)
                        finally:
                            sample.close()
                        samples.append(found)
                        print(json.dumps(found), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(samples, indent=2))
    return report(samples)


def report(samples: list[dict[str, Any]]) -> int:
    limit = MAX_WAL_MB + (1 + PUSH_AHEAD) * SEGMENT / 2**20
    missed = 0
    print(f"\n{'repository':10} {'pgvault seg/s':>14} {'pgBackRest seg/s':>17} {'ratio':>6} "
          f"{'pg_wal peak MB (pgvault/pgBackRest)':>36}  target")
    for repo in dict.fromkeys(s["repo"] for s in samples):
        ours = [s for s in samples if s["repo"] == repo and s["tool"] == "pgvault"]
        theirs = [s for s in samples if s["repo"] == repo and s["tool"] == "pgbackrest"]
        a = statistics.median(s["rate"] for s in ours)
        b = statistics.median(s["rate"] for s in theirs)
        peak_a = max(s["pg_wal_peak_mb"] for s in ours)
        peak_b = max(s["pg_wal_peak_mb"] for s in theirs)
        spread = f"{min(s['rate'] for s in ours):.2f}-{max(s['rate'] for s in ours):.2f}"
        drain_a = statistics.median(s["drain_s"] for s in ours)
        drain_b = statistics.median(s["drain_s"] for s in theirs)
        cap_a = statistics.median(s["capacity"] for s in ours)
        cap_b = statistics.median(s["capacity"] for s in theirs)
        ok = a >= b and peak_a <= limit
        missed += not ok
        print(f"{repo:10} {a:>8.2f} ({spread}) {b:>10.2f} {a / b:>9.2f} "
              f"{peak_a:>20.0f} / {peak_b:<10.0f} >= 1.00, pg_wal <= {limit:.0f} MB: "
              f"{'PASS' if ok else 'MISS'}; drained {drain_a:.1f} s / {drain_b:.1f} s "
              "after the load")
        print(f"{'':10} backlog drain (capacity): pgvault {cap_a:.2f} seg/s, pgBackRest "
              f"{cap_b:.2f} seg/s, ratio {cap_a / cap_b:.2f}")
    # A benchmark fails only when it cannot measure (as bench/run.py): a MISS is a figure.
    if missed:
        print(f"{missed} row(s) MISS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
