"""Physical rows (issue 21, targets 3, 5 and 6): pgvault basebackup against pgBackRest 2.45
and the pg_basebackup --compress=server-zstd floor, point-in-time restore to a queryable
server against pgBackRest's restore, an incremental base backup after 5% of the pages
changed, and peak PSS, all on one pgbench cluster per scale, in one run.

    .venv/bin/python bench/physical.py --quick        # scale 10, 2 runs (a few minutes)
    .venv/bin/python bench/physical.py                # scales 50 and 100, 3 runs each
    .venv/bin/python bench/physical.py --scales 100 --runs 5 --json out.json

Every run alternates the order of the tools; the tables show medians and the spread
(min-max). The cluster archives with `pgvault wal-push` and `pgbackrest archive-push` both,
so each tool's backup waits for its own archive and each restore replays its own WAL.
pgBackRest runs with compress-type=zst, process-max = CPUs, a local repository in the
same temporary folder, as the postgres OS user.
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from _cluster import (
    BENCH_SETTINGS,
    PG_BIN,
    Cluster,
    as_postgres,
    chown_postgres,
    free_port,
    initdb,
    run_as_postgres,
)
from _measure import Sample, measure

ROOT = Path(__file__).resolve().parents[1]
PGVAULT = str(ROOT / ".venv" / "bin" / "pgvault")
CPUS = os.cpu_count() or 1
TARGETS = {"backup_vs_pgbackrest": 1.0, "backup_vs_floor": 1.3, "restore_vs_pgbackrest": 1.0,
           "incremental_time": 0.25, "incremental_bytes": 0.15}
MEMORY_LIMIT = 100 << 20


def _check(sample: Sample, what: str) -> Sample:
    if sample.returncode != 0:
        raise RuntimeError(f"{what} failed ({sample.returncode}): {sample.stderr_tail}")
    return sample


def _peak_pss(proc: subprocess.Popen[bytes]) -> int:
    """Wait for ``proc``; the largest PSS it had (sampled every 20 ms; itself, no child)."""
    import psutil

    peak = 0
    with contextlib.suppress(psutil.Error):
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, watched.memory_full_info().pss)
            time.sleep(0.02)
    proc.wait()
    return peak


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Bench:
    """One scale: its cluster, both repositories, and the samples taken."""

    def __init__(self, work: Path, scale: int) -> None:
        self.work, self.scale = work, scale
        self.data = work / "data"
        self.repo = work / "pgvault-repo"
        self.pgbr = work / "pgbackrest"
        self.conf = self.pgbr / "pgbackrest.conf"
        self.results: dict[str, list[float]] = {}
        self.sizes: dict[str, list[int]] = {}
        self.pss: dict[str, list[int]] = {}
        self.changed: list[str] = []
        self.restore_notes: list[str] = []
        self.cluster: Cluster | None = None

    def add(self, name: str, seconds: float, size: int | None = None,
            sample: Sample | None = None) -> None:
        self.results.setdefault(name, []).append(seconds)
        if size is not None:
            self.sizes.setdefault(name, []).append(size)
        if sample is not None:
            self.pss.setdefault(name, []).append(sample.peak_pss_bytes)

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        for folder in (self.repo, self.pgbr, self.pgbr / "repo", self.pgbr / "lock",
                       self.pgbr / "spool", self.pgbr / "log"):
            folder.mkdir(parents=True, exist_ok=True)
            chown_postgres(folder)
        initdb(self.data)
        # No push-ahead: it marks later segments done, which pgBackRest would then miss.
        command = (f"PGVAULT_PHYSICAL__PUSH_AHEAD=0 {PGVAULT} wal-push %p --repo {self.repo} "
                   "&& pgbackrest "
                   f"--config={self.conf} --stanza=bench archive-push %p")
        # In the folder's own configuration: a command line setting could not carry it.
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.write(f"archive_command = '{command}'\n")
        self.cluster = Cluster(self.data, {**BENCH_SETTINGS, "wal_level": "replica",
                                           "archive_mode": "on", "max_wal_senders": "5"})
        self.cluster.start()
        assert self.cluster.socket_dir is not None
        self.conf.write_text(
            "[global]\n"
            f"repo1-path={self.pgbr / 'repo'}\nrepo1-retention-full=1000\n"
            f"compress-type=zst\nprocess-max={CPUS}\nstart-fast=y\n"
            f"lock-path={self.pgbr / 'lock'}\nspool-path={self.pgbr / 'spool'}\n"
            f"log-path={self.pgbr / 'log'}\nlog-level-console=error\nlog-level-file=off\n"
            "[bench]\n"
            f"pg1-path={self.data}\npg1-port={self.cluster.port}\n"
            f"pg1-socket-path={self.cluster.socket_dir}\npg1-user=postgres\n")
        chown_postgres(self.conf)
        # Fill factor 90 (pgbench's own option): an update stays on its page (HOT), so the
        # pages the incremental row changes are the ones its UPDATE touches.
        subprocess.run([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(self.scale),
                        "--fillfactor=90", self.cluster.url()],
                       check=True, capture_output=True)
        self._sql("CHECKPOINT")
        self._pgbackrest("stanza-create")

    def _sql(self, query: str) -> Any:
        assert self.cluster is not None
        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchone() if cur.description else None

    def settle(self) -> None:
        """Until the archiver has nothing left to push: a timed step waits only for its own
        WAL, not for what the steps before it left behind."""
        self._sql("SELECT pg_switch_wal()")
        status = self.data / "pg_wal" / "archive_status"
        deadline = time.monotonic() + 900
        while any(p.suffix == ".ready" for p in status.iterdir()):
            if time.monotonic() > deadline:
                raise RuntimeError("the archiver did not catch up within 900 s")
            time.sleep(0.1)

    def _pgbackrest(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_as_postgres(["pgbackrest", f"--config={self.conf}", "--stanza=bench", *args])

    # ------------------------------------------------------------ backups

    def backup_pgvault(self, name: str = "pgvault basebackup",
                       env: dict[str, str] | None = None) -> None:
        assert self.cluster is not None
        sample = _check(measure([PGVAULT, "basebackup", "-d", self.cluster.url(), "--repo",
                                 str(self.repo), "--fast-checkpoint", "--json"], env=env,
                                stdout=self.work / "last.json"), name)
        manifest = json.loads((self.work / "last.json").read_text())
        size = sum(a["size"] for a in manifest["artifacts"])
        if env is None:
            self.last_full = sample.wall_s, size
        self.add(name, sample.wall_s, size, sample)

    def incremental_pgvault(self) -> None:
        """5% of pgbench_accounts' pages change (one row each), then an incremental."""
        assert self.cluster is not None
        pages = int(self._sql("SELECT pg_relation_size('pgbench_accounts') / 8192")[0])
        # One live row of every 20th page (earlier runs moved the first rows away).
        self._sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE ctid IN ("
                  "SELECT min(ctid) FROM pgbench_accounts WHERE (ctid::text::point)[0]::int"
                  f" % 20 = {len(self.changed) % 20} AND (ctid::text::point)[0] < {pages}"
                  " GROUP BY (ctid::text::point)[0])")
        self.settle()
        sample = _check(measure([PGVAULT, "basebackup", "-d", self.cluster.url(), "--repo",
                                 str(self.repo), "--fast-checkpoint", "--incremental",
                                 "--json"], stdout=self.work / "inc.json"),
                        "pgvault basebackup --incremental")
        manifest = json.loads((self.work / "inc.json").read_text())
        assert manifest["physical"].get("parent"), "the incremental backup was a full one"
        size = sum(a["size"] for a in manifest["artifacts"])
        self.changed += manifest["warnings"]
        self.add("pgvault incremental", sample.wall_s, size, sample)
        self.add("incremental/full time", sample.wall_s / self.last_full[0])
        self.add("incremental/full bytes", size / self.last_full[1])

    def backup_pgbackrest(self) -> None:
        sample = _check(measure(as_postgres(["pgbackrest", f"--config={self.conf}",
                                             "--stanza=bench", "--type=full", "backup"])),
                        "pgbackrest backup")
        info = json.loads(self._pgbackrest("info", "--output=json").stdout)
        last = info[0]["backup"][-1]
        self.add("pgbackrest backup", sample.wall_s, int(last["info"]["repository"]["delta"]))

    def backup_floor(self) -> None:
        assert self.cluster is not None
        target = self.work / "floor"
        shutil.rmtree(target, ignore_errors=True)
        sample = _check(measure([str(PG_BIN / "pg_basebackup"), "-d", self.cluster.url(),
                                 "-D", str(target), "-Ft", "-X", "none", "--checkpoint=fast",
                                 "--compress=server-zstd"]), "pg_basebackup")
        self.add("pg_basebackup server-zstd", sample.wall_s, _du(target))
        shutil.rmtree(target, ignore_errors=True)

    # ------------------------------------------------------------ restores

    def prepare_target(self) -> None:
        """WAL after the backups, a restore point to stop at, more WAL, all archived."""
        assert self.cluster is not None
        subprocess.run([str(PG_BIN / "pgbench"), "-n", "-c", "2", "-t", "2000",
                        self.cluster.url()], check=True, capture_output=True)
        self._sql("SELECT pg_create_restore_point('bench_target')")
        subprocess.run([str(PG_BIN / "pgbench"), "-n", "-c", "2", "-t", "500",
                        self.cluster.url()], check=True, capture_output=True)
        self.expected = int(self._sql("SELECT count(*) FROM pgbench_accounts")[0])
        subprocess.run([PGVAULT, "check-archive", "-d", self.cluster.url(), "--repo",
                        str(self.repo)], check=True, capture_output=True)
        self._pgbackrest("check")

    def _count(self, port: int, deadline: float) -> int:
        while True:
            try:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                                     connect_timeout=2, autocommit=True) as conn:
                    if conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,):
                        row = conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone()
                        return int(row[0]) if row else -1
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the restored server on {port} did not answer")
            time.sleep(0.05)

    def _restored(self, name: str) -> Path:
        target = self.work / name
        if target.exists():
            run_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(target), "-m", "immediate",
                             "stop"], check=False)
            shutil.rmtree(target)
        return target

    def restore_pgvault(self, name: str = "pgvault PITR restore",
                        env: dict[str, str] | None = None) -> None:
        target = self._restored("restore-pgvault")
        port = free_port()
        started = time.perf_counter()
        # Not bench/_measure: it kills what the command leaves running, here the server.
        proc = subprocess.Popen([PGVAULT, "restore", "--physical", "latest", "--repo",
                                 str(self.repo), "--pgdata", str(target), "--target-name",
                                 "bench_target", "--start", "--port", str(port),
                                 "--pgvault-bin", PGVAULT], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        peak = _peak_pss(proc)
        if proc.stdout is not None:
            self.restore_notes.append(proc.stdout.read().decode(errors="replace").strip())
        if proc.returncode != 0:
            raise RuntimeError(f"pgvault restore failed: {proc.stderr.read()!r}"
                               if proc.stderr else "pgvault restore failed")
        self._count(port, time.monotonic() + 600)
        self.add(name, time.perf_counter() - started)
        self.pss.setdefault(name, []).append(peak)
        self._restored("restore-pgvault")

    def restore_pgbackrest(self) -> None:
        target = self._restored("restore-pgbackrest")
        target.mkdir(mode=0o700)
        chown_postgres(target)
        port = free_port()
        sock = Path(tempfile.mkdtemp(prefix="pgvault-bench-sock-"))
        chown_postgres(sock)
        started = time.perf_counter()
        self._pgbackrest(f"--pg1-path={target}", "--type=name", "--target=bench_target",
                         "--target-action=promote",
                         f"--recovery-option=restore_command=pgbackrest --config={self.conf} "
                         f"--pg1-path={target} "
                         "--stanza=bench archive-get %f \"%p\"", "restore")
        log = self.work / "pgbr-restore.log"
        started_server = run_as_postgres(
            [str(PG_BIN / "pg_ctl"), "-D", str(target), "-l", str(log), "-W", "-o",
             f"-c port={port} -c listen_addresses=127.0.0.1 -c archive_mode=off "
             f"-c unix_socket_directories={sock}", "start"], new_session=True, check=False)
        if started_server.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"the pgBackRest restore did not start: {started_server.stderr}"
                               f" {tail}")
        self._count(port, time.monotonic() + 600)
        self.add("pgbackrest PITR restore", time.perf_counter() - started)
        self._restored("restore-pgbackrest")
        shutil.rmtree(sock, ignore_errors=True)

    def stop(self) -> None:
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self._sql("ALTER SYSTEM SET archive_command = 'true'")
                self._sql("SELECT pg_reload_conf()")
            self.cluster.stop()


def _median(values: list[float]) -> float:
    return statistics.median(values)


def run_scale(scale: int, runs: int, keep: bool, backup_runs: int | None = None,
              baseline: Path | None = None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"pgvault-bench-physical-{scale}-", dir="/tmp"))
    chown_postgres(work)
    bench = Bench(work, scale)
    try:
        t0 = time.perf_counter()
        bench.setup()
        print(f"scale {scale}: cluster built in {time.perf_counter() - t0:.0f}s, "
              f"{_du(bench.data) / 1e6:.0f} MB with pg_wal", flush=True)
        # The other tree's package comes before this venv's editable one on sys.path.
        env = None if baseline is None else {**os.environ,
                                             "PYTHONPATH": str(baseline.resolve() / "src")}
        backups: list[Callable[[], None]] = [bench.backup_pgvault, bench.backup_pgbackrest,
                                             bench.backup_floor]
        for number in range(runs if backup_runs is None else backup_runs):
            order = backups[number % 3:] + backups[:number % 3]
            for step in order:
                steps = [step]
                if step == bench.backup_pgvault and env is not None:
                    # Beside this tree's, the two in turn; the incremental comes after both,
                    # on the newer full (either tree's: their format is the same).
                    steps = [lambda: bench.backup_pgvault("pgvault baseline basebackup", env),
                             step][::1 if number % 2 == 0 else -1]
                for one in steps:
                    bench.settle()
                    one()
                if step == bench.backup_pgvault:
                    bench.incremental_pgvault()
            print(f"  backups run {number + 1} done", flush=True)
        bench.prepare_target()
        restores: list[Callable[[], None]] = [bench.restore_pgvault, bench.restore_pgbackrest]
        if env is not None:
            restores.insert(1, lambda: bench.restore_pgvault("pgvault baseline PITR restore",
                                                             env))
        for number in range(runs):
            for step in (restores if number % 2 == 0 else restores[::-1]):
                bench.settle()
                step()
            print(f"  restores run {number + 1}/{runs} done", flush=True)
        return {"scale": scale, "data_bytes": _du(bench.data), "seconds": bench.results,
                "stored_bytes": bench.sizes, "peak_pss": bench.pss,
                "incremental_notes": bench.changed, "restore_notes": bench.restore_notes}
    finally:
        bench.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def report(result: dict[str, Any]) -> list[str]:
    sec, size, pss = result["seconds"], result["stored_bytes"], result["peak_pss"]
    lines = [f"\n## pgbench scale {result['scale']} ({result['data_bytes'] / 1e6:.0f} MB data "
             f"directory), {len(sec['pgvault basebackup'])} runs, medians (min-max)", "",
             "| | seconds | stored MB | peak PSS MB |", "|---|---|---|---|"]
    for name, values in sec.items():
        if "/" in name:
            continue
        stored = f"{_median(size[name]) / 1e6:.1f}" if name in size else ""
        memory = f"{max(pss[name]) / 2**20:.0f}" if pss.get(name) else ""
        lines.append(f"| {name} | {_median(values):.2f} ({min(values):.2f}-{max(values):.2f}) "
                     f"| {stored} | {memory} |")
    ratios = {
        "backup_vs_pgbackrest": _median(sec["pgvault basebackup"])
        / _median(sec["pgbackrest backup"]),
        "backup_vs_floor": _median(sec["pgvault basebackup"])
        / _median(sec["pg_basebackup server-zstd"]),
        "restore_vs_pgbackrest": _median(sec["pgvault PITR restore"])
        / _median(sec["pgbackrest PITR restore"]),
        "incremental_time": _median(sec["incremental/full time"]),
        "incremental_bytes": _median(sec["incremental/full bytes"]),
    }
    if "pgvault baseline basebackup" in sec:
        ratios["backup_vs_baseline"] = _median(sec["pgvault basebackup"]) \
            / _median(sec["pgvault baseline basebackup"])
        ratios["baseline_backup_vs_floor"] = _median(sec["pgvault baseline basebackup"]) \
            / _median(sec["pg_basebackup server-zstd"])
    if "pgvault baseline PITR restore" in sec:
        ratios["restore_vs_baseline"] = _median(sec["pgvault PITR restore"]) \
            / _median(sec["pgvault baseline PITR restore"])
        ratios["baseline_restore_vs_pgbackrest"] = \
            _median(sec["pgvault baseline PITR restore"]) / _median(sec["pgbackrest PITR restore"])
    lines += ["", "| target | ratio | limit | |", "|---|---|---|---|"]
    for name, ratio in ratios.items():
        if name not in TARGETS:
            lines.append(f"| {name} | {ratio:.2f}x | | |")
            continue
        verdict = "PASS" if ratio <= TARGETS[name] else "MISS"
        lines.append(f"| {name} | {ratio:.2f}x | <= {TARGETS[name]}x | {verdict} |")
    for name, values in pss.items():
        worst = max(values)
        lines.append(f"| peak PSS {name} | {worst / 2**20:.0f} MB | <= 100 MB | "
                     f"{'PASS' if worst <= MEMORY_LIMIT else 'MISS'} |")
    for note in result["incremental_notes"][-1:]:
        lines.append(f"\nincremental: {note}")
    for note in result["restore_notes"][-1:]:
        lines.append(f"pgvault restore: {' '.join(note.split())}")
    result["ratios"] = ratios
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scale 10, 2 runs")
    parser.add_argument("--scales", default="50,100", help="pgbench scales (default 50,100)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--backup-runs", type=int,
                        help="runs of the backup rows (default --runs; 1 when only restores "
                             "are compared)")
    parser.add_argument("--baseline", type=Path, metavar="TREE",
                        help="also time pgvault's basebackup and PITR restore from this source "
                             "tree, alternated with this tree's, e.g. a `git archive` "
                             "of the previous commit (TREE/src is put on PYTHONPATH)")
    args = parser.parse_args(argv)
    scales = [10] if args.quick else [int(s) for s in args.scales.split(",")]
    runs = 2 if args.quick and args.runs == 3 else args.runs
    if shutil.which("pgbackrest") is None:
        print("pgbackrest is not installed (scripts/bench installs it)", file=sys.stderr)
        return 2
    results = []
    for scale in scales:
        result = run_scale(scale, runs, args.keep, args.backup_runs, args.baseline)
        print("\n".join(report(result)), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
