"""Benchmark pgvault backup/restore against pg_dump baselines on a throwaway cluster.

Run: .venv/bin/python bench/run.py --size-mb 300 --runs 3   (see bench/README.md)
Each ratio is checked against the target of issue 7 and printed with PASS or MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import _dataset as ds
import psycopg
from _cluster import BENCH_SETTINGS, BUILD_SETTINGS, PG_BIN, Cluster, initdb, stop_stale
from _measure import CommandFailed, Sample, measure
from _profile import format_profile, profile
from _s3 import BUCKET, MotoServer, find_aws, upload_command
from psycopg import sql

BENCH_DIR = Path(__file__).resolve().parent
RESTORE_PREFIX = "bench_r_"
MB = 1024 * 1024
T0 = time.monotonic()

# Operation ids, in the order they run and print.
FLOOR, STRAT_B, VAULT_B = "backup.floor", "backup.strategy", "backup.pgvault"
S3_BASE, VAULT_S3 = "s3.baseline", "s3.pgvault"
STRAT_R, PGR_J2 = "restore.strategy", "restore.pg_restore_j2"
VAULT_R, VAULT_RJ2 = "restore.pgvault", "restore.pgvault_j1"
# Not targets: the opt-in split backup (--streams 2) and the restore of that backup.
VAULT_BS, VAULT_RS = "backup.pgvault_streams2", "restore.pgvault_streams2"
LABELS = {
    FLOOR: "pg_dump -Fc -Z0 > /dev/null (floor)",
    STRAT_B: "pg_dump | gzip > file (strategy)",
    VAULT_B: "pgvault backup (local repo)",
    S3_BASE: "pg_dump -Z0 | zstd -1 -T2 | aws s3 cp",
    VAULT_S3: "pgvault backup (S3 repo)",
    STRAT_R: "gunzip -c | psql (strategy)",
    PGR_J2: "pg_restore -j 2 (-Fc -Z0 file)",
    VAULT_R: "pgvault restore latest",
    VAULT_RJ2: "pgvault restore latest -j 1 (streamed)",
    VAULT_BS: "pgvault backup --streams 2",
    VAULT_RS: "pgvault restore of that (split) backup",
}
PGVAULT_OPS = (VAULT_B, VAULT_S3, VAULT_R, VAULT_RJ2, VAULT_BS, VAULT_RS)
# --breakdown: the parts of a pgvault backup, each measured alone (compare with the floor).
BREAKDOWN = {
    "bd.zstd_cli": "pg_dump -Fc -Z0 | zstd -1 -T2 > file (pgvault's codec, stock CLI)",
    "bd.globals": "pg_dumpall --globals-only > /dev/null",
    "bd.facts": "count(*) of every table, one psql session",
    "bd.vault_noglobals": "pgvault backup --no-globals",
    "bd.vault_level3": "pgvault backup --no-globals --level 3",
    "bd.vault_none": "pgvault backup --no-globals --compression none",
}
S3_OPS = (S3_BASE, VAULT_S3)


@dataclass(frozen=True)
class Target:
    """One target of issue 7: wall(op) / wall(base) must be <= limit."""

    name: str
    op: str
    base: str
    limit: float


TARGETS = [
    Target("1a backup local / floor", VAULT_B, FLOOR, 1.2),
    Target("1b backup local / strategy backup", VAULT_B, STRAT_B, 0.35),
    Target("2  backup S3 / dump|zstd|aws s3 cp", VAULT_S3, S3_BASE, 1.2),
    Target("3a restore / pg_restore -j2", VAULT_R, PGR_J2, 1.1),
    Target("3b restore / strategy restore", VAULT_R, STRAT_R, 0.8),
]
MEMORY_LIMIT_BYTES = 100 * 1024 * 1024  # target 4: peak RSS of the pgvault process tree
STARTUP_LIMIT_S = 0.3  # target 5
# S3 baseline: the strategy's upload tool on the bytes pgvault would store (zstd, 2 threads).
S3_BASELINE = ('set -euo pipefail\npg_dump -Fc -Z0 "$DATABASE_URL" | zstd -1 -T2 -q -c | '
               "{upload}")
# The seed strategy's scripts (shared/STRATEGY.md), verbatim apart from the file path.
STRATEGY_BACKUP = 'set -euo pipefail\npg_dump "$DATABASE_URL" | gzip > "$DUMP_FILE"'
STRATEGY_RESTORE = 'gunzip -c "$DUMP_FILE" | psql $DATABASE_URL_RESTORE'


def log(msg: str) -> None:
    """Print a progress line to stderr with the elapsed time."""
    print(f"[bench {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class OpResult:
    """Every run of one operation on one dataset, and why it may be missing."""

    op: str
    command: str
    samples: list[Sample] = field(default_factory=list)
    # Runs with the memory sampler on: it costs pgvault's many-process tree ~0.4 s of CPU
    # at 300 MB (the floor's one process ~0.05 s), so wall and CPU come from the other runs.
    memory: list[Sample] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)
    # CPU seconds the server's processes spent on each run (shapes only; server_cpu_s()).
    server_cpu: list[float] = field(default_factory=list)
    status: str = "ok"  # ok | n/a | failed
    note: str = ""

    def median(self, attr: str) -> float | None:
        """Median of a Sample attribute over the runs, or None if there are none."""
        if self.status != "ok" or not self.samples:
            return None
        runs = self.memory if attr.startswith("peak_") and self.memory else self.samples
        return float(statistics.median(getattr(s, attr) for s in runs))

    def median_size(self) -> int | None:
        """Median output size in bytes, or None."""
        return int(statistics.median(self.sizes)) if self.sizes and self.status == "ok" else None


@dataclass
class DatasetInfo:
    """What was benchmarked: one database in the cluster."""

    name: str
    dbname: str
    target_mb: int
    db_size_bytes: int
    build_seconds: float
    cached: bool
    rows: dict[str, int]
    reference_dump_bytes: int = 0


class Bench:
    """Runs the six operations on one database and collects OpResults."""

    def __init__(self, cluster: Cluster, workdir: Path, pgvault: Path | None,
                 pgvault_note: str, restore_jobs: int, s3: MotoServer | None = None,
                 s3_note: str = "", aws: str | None = None) -> None:
        """Wire the running cluster, a scratch folder, the pgvault executable and S3 (if any)."""
        self.cluster = cluster
        self.workdir = workdir
        self.pgvault = pgvault
        self.pgvault_note = pgvault_note
        self.restore_jobs = restore_jobs
        self.s3 = s3
        self.s3_note = s3_note
        self.aws = aws
        self.base_pgvault: Path | None = None  # --shapes --baseline-rev

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for measured commands: PostgreSQL 15 client tools first on PATH.

        PYTHONDONTWRITEBYTECODE is dropped: with it, an editable install recompiles pgvault
        on every start, which no real installation does.
        """
        env = {k: v for k, v in os.environ.items()
               if (not k.startswith("PG") or k.startswith("PGVAULT_"))
               and k != "PYTHONDONTWRITEBYTECODE"}
        env["PATH"] = f"{PG_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(extra)
        return env

    def s3_env(self, **extra: str) -> dict[str, str]:
        """env() plus the moto endpoint, dummy credentials and pgvault's S3 settings."""
        assert self.s3 is not None
        env = {k: v for k, v in self.env().items()
               if not k.startswith(("AWS_", "PGVAULT_S3__"))}
        env.update(self.s3.env())
        env.update(PGVAULT_S3__ENDPOINT_URL=self.s3.url, PGVAULT_S3__PATH_STYLE="true",
                   PGVAULT_S3__REGION="us-east-1")
        env.update(extra)
        return env

    def run_dataset(self, info: DatasetInfo, runs: int) -> dict[str, OpResult]:
        """Measure every operation runs times on info.dbname; returns results by op id."""
        src = self.cluster.url(info.dbname)
        work = self.workdir / info.name
        work.mkdir(parents=True, exist_ok=True)
        ref = work / "floor.dump"
        gz = work / "strategy.sql.gz"
        repo = work / "pgvault-repo"
        restore_db = f"{RESTORE_PREFIX}{info.name}"

        log(f"[{info.name}] warm-up: pg_dump -Fc -Z0 -f {ref.name} (reference for pg_restore)")
        self._check(measure([str(PG_BIN / "pg_dump"), "-Fc", "-Z0", "-f", str(ref), src],
                            env=self.env()), "reference dump")
        info.reference_dump_bytes = ref.stat().st_size
        expected = info.rows

        vault = str(self.pgvault) if self.pgvault else "pgvault"
        repo_url = f"file://{repo}"
        vault_backup = [vault, "backup", "--dbname", src, "--repo", repo_url]
        vault_restore = [vault, "restore", "latest", "--to", restore_db, "--dbname", src,
                         "--repo", repo_url]
        vault_restore_j2 = [*vault_restore, "-j", "1"]
        split_repo = work / "pgvault-split-repo"
        vault_split = [vault, "backup", "--dbname", src, "--repo", f"file://{split_repo}",
                       "--streams", "2"]
        vault_split_restore = [vault, "restore", "latest", "--to", restore_db, "--dbname",
                               src, "--repo", f"file://{split_repo}"]
        vault_env = self.env(DATABASE_URL=src, PGVAULT_REPO=repo_url)
        s3_prefix = f"{info.name}/"
        s3_repo = f"s3://{BUCKET}/{s3_prefix}pgvault"
        s3_key = f"{s3_prefix}baseline/db.dump.zst"
        vault_s3 = [vault, "backup", "--dbname", src, "--repo", s3_repo]
        upload, tool = (upload_command(self.aws, self.s3.url, s3_key) if self.s3
                        else ("", "aws s3 cp -"))
        s3_baseline = S3_BASELINE.format(upload=upload)
        res = {
            FLOOR: OpResult(FLOOR, f"pg_dump -Fc -Z0 {src} > /dev/null"),
            STRAT_B: OpResult(STRAT_B, STRATEGY_BACKUP.replace("\n", "; ")),
            VAULT_B: OpResult(VAULT_B, " ".join(vault_backup)),
            S3_BASE: OpResult(S3_BASE, s3_baseline.replace("\n", "; ")),
            VAULT_S3: OpResult(VAULT_S3, " ".join(vault_s3)),
            STRAT_R: OpResult(STRAT_R, STRATEGY_RESTORE),
            PGR_J2: OpResult(PGR_J2, f"pg_restore -j {self.restore_jobs} -d <new db> {ref}"),
            VAULT_R: OpResult(VAULT_R, " ".join(vault_restore)),
            VAULT_RJ2: OpResult(VAULT_RJ2, " ".join(vault_restore_j2)),
            VAULT_BS: OpResult(VAULT_BS, " ".join(vault_split)),
            VAULT_RS: OpResult(VAULT_RS, " ".join(vault_split_restore)),
        }
        if tool != "aws s3 cp -":
            res[S3_BASE].note = f"upload by {tool} (aws CLI not found)"
        if self.pgvault is None:
            for op in PGVAULT_OPS:
                res[op].status, res[op].note = "n/a", self.pgvault_note
        if self.s3 is None:
            for op in S3_OPS:
                res[op].status, res[op].note = "n/a", self.s3_note

        for i in range(1, runs + 2):
            mem = i > runs  # the last run samples memory; the others are timed undisturbed
            log(f"[{info.name}] run {i}/{runs}: backups" if not mem else
                f"[{info.name}] memory run (sampled; not in the wall and CPU medians): backups")
            s = self._check(measure([str(PG_BIN / "pg_dump"), "-Fc", "-Z0", src],
                                    env=self.env(), sample=mem), LABELS[FLOOR])
            self._add(res[FLOOR], s, info.reference_dump_bytes, memory=mem)

            gz.unlink(missing_ok=True)
            s = self._check(measure(["bash", "-c", STRATEGY_BACKUP],
                                    env=self.env(DATABASE_URL=src, DUMP_FILE=str(gz)),
                                    sample=mem),
                            LABELS[STRAT_B])
            self._add(res[STRAT_B], s, gz.stat().st_size, memory=mem)

            for op, argv, into, restores in ((VAULT_B, vault_backup, repo, (VAULT_R, VAULT_RJ2)),
                                             (VAULT_BS, vault_split, split_repo, (VAULT_RS,))):
                if res[op].status != "ok":
                    continue
                shutil.rmtree(into, ignore_errors=True)
                into.mkdir()
                s = measure(argv, env=vault_env, sample=mem)
                if self._pgvault_ok(res[op], s):
                    self._add(res[op], s, _tree_size(into), memory=mem)
                else:
                    for restore in restores:
                        res[restore].status, res[restore].note = "n/a", f"{LABELS[op]} failed"

            if self.s3 is not None:
                log(f"[{info.name}] run {i}/{runs}: backups to S3 ({self.s3.url})")
                self.s3.clear(s3_prefix)
                s = self._check(measure(["bash", "-c", s3_baseline],
                                        env=self.s3_env(DATABASE_URL=src), sample=mem),
                                LABELS[S3_BASE])
                self._add(res[S3_BASE], s, self.s3.size(s3_prefix), memory=mem)
                self.s3.clear(s3_prefix)
                if res[VAULT_S3].status == "ok":
                    s = measure(vault_s3, env=self.s3_env(DATABASE_URL=src), sample=mem)
                    if self._pgvault_ok(res[VAULT_S3], s):
                        self._add(res[VAULT_S3], s, self.s3.size(s3_prefix), memory=mem)
                self.s3.clear(s3_prefix)

            log(f"[{info.name}] run {i}/{runs}: restores")
            self._create_db(restore_db)
            s = measure(["bash", "-c", STRATEGY_RESTORE], env=self.env(
                DUMP_FILE=str(gz), DATABASE_URL_RESTORE=self.cluster.url(restore_db)),
                sample=mem)
            self._check(s, LABELS[STRAT_R])
            self._add(res[STRAT_R], s, None, self._verify(restore_db, expected, s), memory=mem)

            self._create_db(restore_db)
            s = measure([str(PG_BIN / "pg_restore"), "-j", str(self.restore_jobs), "-d",
                         self.cluster.url(restore_db), str(ref)], env=self.env(), sample=mem)
            self._check(s, LABELS[PGR_J2])
            self._add(res[PGR_J2], s, None, self._verify(restore_db, expected, s), memory=mem)

            for op, argv in ((VAULT_R, vault_restore), (VAULT_RJ2, vault_restore_j2),
                             (VAULT_RS, vault_split_restore)):
                if res[op].status == "ok":
                    self._drop_db(restore_db)
                    s = measure(argv, env=vault_env, sample=mem)
                    if self._pgvault_ok(res[op], s):
                        self._add(res[op], s, None, self._verify(restore_db, expected, s),
                                  memory=mem)
            self._drop_db(restore_db)
        return res

    def run_breakdown(self, info: DatasetInfo, runs: int) -> dict[str, OpResult]:
        """The parts of a pgvault backup measured alone (--breakdown), runs times each."""
        src = self.cluster.url(info.dbname)
        work = self.workdir / info.name
        repo, out_file = work / "breakdown-repo", work / "breakdown.dump.zst"
        counts = work / "counts.sql"
        counts.write_text("".join(f"SELECT count(*) FROM {t};\n" for t in info.rows))
        vault = [str(self.pgvault), "backup", "--dbname", src, "--repo", f"file://{repo}",
                 "--no-globals"]
        shell = {
            "bd.zstd_cli": 'set -euo pipefail\npg_dump -Fc -Z0 "$DATABASE_URL" | '
                           'zstd -1 -T2 -q -c > "$OUT"',
            "bd.globals": 'pg_dumpall --globals-only -d "$DATABASE_URL" > /dev/null',
            "bd.facts": 'psql -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -f "$COUNTS" '
                        "> /dev/null",
        }
        argvs: dict[str, list[str]] = {op: ["bash", "-c", cmd] for op, cmd in shell.items()}
        if self.pgvault is not None:
            argvs.update({"bd.vault_noglobals": vault,
                          "bd.vault_level3": [*vault, "--level", "3"],
                          "bd.vault_none": [*vault, "--compression", "none"]})
        res = {op: OpResult(op, shell.get(op, " ".join(argv)).replace("\n", "; "))
               for op, argv in argvs.items()}
        env = self.env(DATABASE_URL=src, OUT=str(out_file), COUNTS=str(counts))
        for i in range(1, runs + 1):
            log(f"[{info.name}] breakdown run {i}/{runs}")
            for op, argv in argvs.items():
                r = res[op]
                if r.status != "ok":
                    continue
                shutil.rmtree(repo, ignore_errors=True)
                repo.mkdir(parents=True)
                out_file.unlink(missing_ok=True)
                s = measure(argv, env=env)
                if op.startswith("bd.vault"):
                    if self._pgvault_ok(r, s):
                        self._add(r, s, _tree_size(repo), label=BREAKDOWN[op])
                else:
                    self._check(s, BREAKDOWN[op])
                    size = out_file.stat().st_size if out_file.exists() else None
                    self._add(r, s, size, label=BREAKDOWN[op])
        shutil.rmtree(repo, ignore_errors=True)
        out_file.unlink(missing_ok=True)
        return res

    def run_memory(self, info: DatasetInfo, runs: int) -> dict[str, OpResult]:
        """pgvault backup and restores only, for their peak RSS at this database size."""
        src = self.cluster.url(info.dbname)
        repo = self.workdir / f"memory-{info.target_mb}mb" / "pgvault-repo"
        repo_url = f"file://{repo}"
        restore_db = f"{RESTORE_PREFIX}{info.name}_mem"
        assert self.pgvault is not None
        vault = str(self.pgvault)
        restore = [vault, "restore", "latest", "--to", restore_db, "--dbname", src,
                   "--repo", repo_url]
        s3_prefix = f"memory-{info.target_mb}mb/"
        argvs = {
            VAULT_B: [vault, "backup", "--dbname", src, "--repo", repo_url],
            VAULT_S3: [vault, "backup", "--dbname", src, "--repo",
                       f"s3://{BUCKET}/{s3_prefix}"],
            VAULT_R: restore,
            VAULT_RJ2: [*restore, "-j", "1"],
        }
        res = {op: OpResult(op, " ".join(argv)) for op, argv in argvs.items()}
        if self.s3 is None:
            res[VAULT_S3].status, res[VAULT_S3].note = "n/a", self.s3_note
        env = self.env(DATABASE_URL=src, PGVAULT_REPO=repo_url)
        try:
            for i in range(1, runs + 1):
                log(f"[memory {info.target_mb} MB] run {i}/{runs}")
                if self.s3 is not None and res[VAULT_S3].status == "ok":
                    self.s3.clear(s3_prefix)
                    s = measure(argvs[VAULT_S3], env=self.s3_env(DATABASE_URL=src))
                    if self._pgvault_ok(res[VAULT_S3], s):
                        self._add(res[VAULT_S3], s, self.s3.size(s3_prefix))
                    self.s3.clear(s3_prefix)
                shutil.rmtree(repo, ignore_errors=True)
                repo.mkdir(parents=True)
                s = measure(argvs[VAULT_B], env=env)
                if not self._pgvault_ok(res[VAULT_B], s):
                    for op in (VAULT_R, VAULT_RJ2):
                        res[op].status, res[op].note = "n/a", "pgvault backup failed"
                    break
                self._add(res[VAULT_B], s, _tree_size(repo))
                for op in (VAULT_R, VAULT_RJ2):
                    if res[op].status != "ok":
                        continue
                    self._drop_db(restore_db)
                    s = measure(argvs[op], env=env)
                    if self._pgvault_ok(res[op], s):
                        self._add(res[op], s, None, self._verify(restore_db, info.rows, s))
        finally:
            self._drop_db(restore_db)
            shutil.rmtree(repo.parent, ignore_errors=True)  # up to GBs: free it now
        return res

    def run_startup(self, runs: int) -> dict[str, OpResult]:
        """Wall time of `pgvault --version` and `pgvault list` on an empty local repository."""
        empty = self.workdir / "empty-repo"
        empty.mkdir(parents=True, exist_ok=True)
        vault = str(self.pgvault)
        argvs = {
            "startup.version": [vault, "--version"],
            "startup.list": [vault, "list", "--repo", f"file://{empty}"],
        }
        res: dict[str, OpResult] = {}
        env = self.env()
        for op, argv in argvs.items():
            r = res[op] = OpResult(op, " ".join(argv))
            warm = measure(argv, env=env, sample=False)  # page cache, .pyc files
            if not self._pgvault_ok(r, warm):
                continue
            for _ in range(runs):
                s = measure(argv, env=env, sample=False)
                if not self._pgvault_ok(r, s):
                    break
                r.samples.append(s)
                r.verified.append(True)
            if r.status == "ok":
                log(f"  {' '.join(argv[1:3])}: median {r.median('wall_s') or 0:.3f}s wall "
                    f"over {runs} runs (min {min(x.wall_s for x in r.samples):.3f}s)")
        return res

    def run_profile(self, info: DatasetInfo, out_dir: Path) -> dict[str, Any]:
        """Profile pgvault backup (local, S3) and restore (default, -j) once each."""
        src = self.cluster.url(info.dbname)
        repo = self.workdir / info.name / "profile-repo"
        repo_url = f"file://{repo}"
        restore_db = f"{RESTORE_PREFIX}{info.name}"
        vault = str(self.pgvault)
        restore = [vault, "restore", "latest", "--to", restore_db, "--dbname", src,
                   "--repo", repo_url]
        env = self.env(DATABASE_URL=src, PGVAULT_REPO=repo_url)
        py_spy = Path(sys.executable).parent / "py-spy"
        found = py_spy if py_spy.exists() else shutil.which("py-spy")

        def empty_repo() -> None:
            shutil.rmtree(repo, ignore_errors=True)
            repo.mkdir(parents=True)

        def drop_target() -> None:
            self._drop_db(restore_db)

        plan: list[tuple[str, list[str], dict[str, str], Callable[[], None]]] = [
            ("backup-local", [vault, "backup", "--dbname", src, "--repo", repo_url], env,
             empty_repo),
        ]
        if self.s3 is not None:
            s3 = self.s3
            prefix = f"{info.name}/profile/"
            plan.append(("backup-s3", [vault, "backup", "--dbname", src, "--repo",
                                       f"s3://{BUCKET}/{prefix}"],
                         self.s3_env(DATABASE_URL=src), lambda: s3.clear(prefix)))
        plan += [
            ("restore", restore, env, drop_target),
            ("restore-j1", [*restore, "-j", "1"], env, drop_target),
        ]
        out: dict[str, Any] = {}
        for name, argv, penv, before in plan:
            log(f"[{info.name}] profiling {name}")
            out[name] = profile(argv, penv, out_dir, f"{info.name}-{name}",
                                Path(found) if found else None, before)
        self._drop_db(restore_db)
        if self.s3 is not None:
            self.s3.clear(f"{info.name}/profile/")
        return out

    @staticmethod
    def _check(s: Sample, what: str) -> Sample:
        """Fail the whole benchmark if a baseline command failed: the harness is broken."""
        if s.returncode != 0:
            raise CommandFailed(s, [what])
        return s

    @staticmethod
    def _pgvault_ok(r: OpResult, s: Sample) -> bool:
        """Record a failed pgvault run (it then stops being measured); True if it worked."""
        if s.returncode == 0:
            return True
        last = (s.stderr_tail.strip().splitlines() or [""])[-1]
        r.status, r.note = "failed", f"exit {s.returncode}: {last[:160]}"
        log(f"pgvault failed ({r.op}): exit {s.returncode}\n{s.stderr_tail.strip()}")
        return False

    @staticmethod
    def _add(r: OpResult, s: Sample, size: int | None, verified: bool = True,
             label: str = "", memory: bool = False) -> None:
        """Append one run to r (a memory run to r.memory) and log its figures."""
        (r.memory if memory else r.samples).append(s)
        if size is not None and not memory:
            r.sizes.append(size)
        r.verified.append(verified)
        extra = f", {size / MB:.1f} MB" if size is not None else ""
        if s.procs.get("pg_restore", 0) > 1:
            extra += f", up to {s.procs['pg_restore']} pg_restore processes"
        log(f"  {label or LABELS[r.op]}: {s.wall_s:.2f}s wall, {s.cpu_s:.2f}s CPU, "
            f"{s.peak_rss_bytes / MB:.1f} MB RSS, {s.peak_pss_bytes / MB:.1f} MB PSS{extra}"
            f"{'' if verified else ', NOT VERIFIED'}")

    def _verify(self, dbname: str, expected: dict[str, int], s: Sample) -> bool:
        """Compare row counts of a restored database with the source (untimed)."""
        got = ds.table_counts(self.cluster.url(dbname))
        ok = got == expected
        if not ok:
            log(f"  restore into {dbname} differs from source: {got} != {expected}")
        if s.error_lines:
            log(f"  restore into {dbname} printed {s.error_lines} ERROR line(s): "
                f"{s.stderr_tail.strip()[-400:]}")
        return ok

    def _create_db(self, dbname: str) -> None:
        """(Re)create an empty database, untimed."""
        self._drop_db(dbname)
        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    def _drop_db(self, dbname: str) -> None:
        """Drop a database if present, then checkpoint so its writes don't leak into timings."""
        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(dbname)))
            conn.execute("CHECKPOINT")


def _tree_size(path: Path) -> int:
    """Total size in bytes of the files under path."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_revision(rev: str, dest: Path) -> tuple[Path, str]:
    """Export src/ of a git revision; return a `pgvault` script that runs it, and the commit.

    The script uses this venv's Python and dependencies; only pgvault's own code differs, so
    a revision can be measured while the working tree is being edited.
    """
    import subprocess

    repo = BENCH_DIR.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    script = dest / "pgvault"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(dest / 'src')!r})\n"
                      "from pgvault.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    log(f"measuring pgvault at {rev} ({commit[:12]}), exported to {dest}")
    return script, commit


def working_tree_commit() -> str:
    """HEAD of the checkout the venv's pgvault runs from, '+dirty' if src/ has changes."""
    import subprocess

    repo = str(BENCH_DIR.parent)
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "src"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def find_pgvault(explicit: str | None) -> tuple[Path | None, str]:
    """Locate a working pgvault CLI that has backup and restore; else (None, reason)."""
    path = Path(explicit) if explicit else Path(sys.executable).parent / "pgvault"
    if explicit and not path.exists():
        return None, f"pgvault CLI not found ({path})"
    if not path.exists():
        found = shutil.which("pgvault")
        if found is None:
            return None, f"pgvault CLI not found ({path})"
        path = Path(found)
    for sub in ("backup", "restore"):
        s = measure([str(path), sub, "--help"], timeout_s=60)
        if s.returncode != 0:
            last = (s.stderr_tail.strip().splitlines() or [""])[-1]
            return None, f"`pgvault {sub} --help` failed: {last[:120]}"
    return path, ""


# ---------------------------------------------------------------- cluster and dataset cache


@dataclass
class Prepared:
    """A data dir ready to start, and what it holds."""

    data_dir: Path
    meta: dict[str, Any]
    built_now: set[str]


def prepare(args: argparse.Namespace, stack: contextlib.ExitStack, scratch: Path,
            size_mb: int, pgbench: bool) -> Prepared:
    """Return a data dir holding the dataset(s): from the cache, or built now (and cached)."""
    if args.no_cache:
        base = scratch / f"cluster-{size_mb}mb"
    else:
        base = Path(args.cache_dir) / f"pg15-shop-v{ds.DATASET_VERSION}-{size_mb}mb"
        _lock(base.with_suffix(".lock"), stack)
    data_dir, meta_path = base / "pgdata", base / "dataset.json"
    if args.rebuild and base.exists():
        stop_stale(data_dir)
        shutil.rmtree(base)
    meta: dict[str, Any] | None = None
    if meta_path.exists() and data_dir.exists():
        meta = json.loads(meta_path.read_text())
    need_pgbench = pgbench and not (meta or {}).get("pgbench")
    if meta is not None and not need_pgbench:
        log(f"using cached dataset {base}")
        return Prepared(data_dir, meta, set())

    build_dir = data_dir
    if meta is None:
        if base.exists():
            stop_stale(base / "pgdata.partial")
            shutil.rmtree(base)
        base.mkdir(parents=True)
        base.chmod(0o755)
        build_dir = base / "pgdata.partial"
        log(f"initdb {build_dir}")
        initdb(build_dir)
        meta = {"version": ds.DATASET_VERSION, "size_mb": size_mb}
    built: set[str] = set()
    cluster = Cluster(build_dir, BUILD_SETTINGS)
    stack.callback(cluster.stop)
    cluster.start()
    if "shop" not in meta:
        log(f"building shop dataset of ~{size_mb} MB")
        t = time.monotonic()
        plan = ds.build_shop(cluster.url(), cluster.url(ds.SHOP_DB), size_mb, log)
        meta["shop"] = {"build_seconds": round(time.monotonic() - t, 2), "plan": asdict(plan),
                        "rows": ds.table_counts(cluster.url(ds.SHOP_DB))}
        built.add("shop")
        log(f"shop dataset built in {meta['shop']['build_seconds']}s, "
            f"{ds.database_size(cluster.url(ds.SHOP_DB)) / MB:.1f} MB")
    if need_pgbench:
        log("building pgbench dataset (pgbench -i)")
        t = time.monotonic()
        scale = ds.build_pgbench(cluster.url(), cluster.url(ds.PGBENCH_DB), size_mb)
        meta["pgbench"] = {"build_seconds": round(time.monotonic() - t, 2), "scale": scale,
                           "rows": ds.table_counts(cluster.url(ds.PGBENCH_DB))}
        built.add("pgbench")
        log(f"pgbench dataset (scale {scale}) built in {meta['pgbench']['build_seconds']}s")
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    cluster.stop()
    os.sync()  # the build ran with fsync=off
    if build_dir != data_dir:
        build_dir.rename(data_dir)
    meta_path.write_text(json.dumps(meta, indent=2))
    return Prepared(data_dir, meta, built)


def _lock(path: Path, stack: contextlib.ExitStack) -> None:
    """Hold an exclusive lock on a cache entry for the rest of the run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = stack.enter_context(open(path, "w"))  # noqa: SIM115 - closed by the stack
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another benchmark is using {path.with_suffix('')}") from None


def drop_leftovers(cluster: Cluster) -> None:
    """Drop restore targets an interrupted earlier run may have left in a cached cluster."""
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            [RESTORE_PREFIX + "%"]).fetchall()]
        for n in names:
            log(f"dropping leftover database {n}")
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(n)))


# ---------------------------------------------------------------- report


def _fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """Format a number, or n/a."""
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b when both are known and b is non-zero."""
    return None if a is None or b is None or b == 0 else a / b


def _paired(a: OpResult, b: OpResult) -> float | None:
    """Median of run-by-run wall ratios: each run of a follows its run of b within a minute,
    so the machine's slow drifts (other tenants, CPU credits) cancel out of each pair."""
    pairs = [x.wall_s / y.wall_s for x, y in zip(a.samples, b.samples, strict=False)
             if y.wall_s > 0]
    ok = a.status == "ok" and b.status == "ok" and pairs
    return float(statistics.median(pairs)) if ok else None


def _verdict(ratio: float | None, limit: float) -> str:
    """PASS, MISS or n/a for a measured value against an upper limit."""
    return "n/a" if ratio is None else ("PASS" if ratio <= limit else "MISS")


def _op_note(op: str, r: OpResult) -> str:
    """The note column: failure, mismatch, and how many pg_restore processes ran at once."""
    if r.status != "ok":
        return f"{r.status}: {r.note}"
    notes = [r.note] if r.note else []
    if not all(r.verified):
        notes.append("RESTORE MISMATCH")
    if op.startswith("restore.") and (r.memory or r.samples):
        n = max(s.procs.get("pg_restore", 0) for s in r.memory or r.samples)
        if n:
            notes.append(f"pg_restore processes at once: {n}")
    return "; ".join(notes)


def report(info: DatasetInfo, res: dict[str, OpResult], runs: int) -> dict[str, Any]:
    """Print the table for one dataset and return the same as a JSON-ready dict."""
    ref = info.reference_dump_bytes
    print()
    print(f"== dataset {info.name} ({info.dbname}): {info.db_size_bytes / MB:.1f} MB on disk "
          f"(target {info.target_mb} MB), {sum(info.rows.values()):,} rows; built in "
          f"{info.build_seconds:.1f}s{' (cached)' if info.cached else ''}; "
          f"uncompressed -Fc -Z0 dump {ref / MB:.1f} MB; median of {runs} run(s)")
    head = (f"{'operation':<38} {'wall s':>8} {'CPU s':>8} {'RSS MB':>7} {'PSS MB':>7} "
            f"{'output MB':>10} {'compression':>12}  note")
    print(head)
    print("-" * len(head))
    ops_json: dict[str, Any] = {}
    for op, r in res.items():
        size = r.median_size()
        comp = _ratio(ref, size) if size else None
        is_backup = not op.startswith("restore.")
        wall, cpu, rss = r.median("wall_s"), r.median("cpu_s"), r.median("peak_rss_bytes")
        pss = r.median("peak_pss_bytes")
        line = (f"{LABELS[op]:<38} {_fmt(wall):>8} {_fmt(cpu):>8} "
                f"{_fmt(None if rss is None else rss / MB, '.1f'):>7} "
                f"{_fmt(None if pss is None else pss / MB, '.1f'):>7} "
                f"{_fmt(None if size is None else size / MB, '.1f') if is_backup else '-':>10} "
                f"{_fmt(comp, '.2f', 'x') if is_backup else '-':>12}  {_op_note(op, r)}")
        print(line.rstrip())
        ops_json[op] = {
            "label": LABELS[op], "command": r.command, "status": r.status, "note": r.note,
            "median": {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": rss,
                       "peak_pss_bytes": pss, "output_bytes": size},
            "compression_ratio_vs_fc_z0": comp,
            "restore_verified": r.verified,
            "runs": [{**asdict(s), "output_bytes": r.sizes[i] if i < len(r.sizes) else None}
                     for i, s in enumerate(r.samples)],
            "memory_runs": [asdict(s) for s in r.memory],
        }
    print()
    head = (f"{'target: wall ratio (lower is better)':<38} {'ratio':>7} {'target':>8} "
            f"{'result':>6} {'CPU ratio':>10} {'RSS ratio':>10} {'paired':>7}")
    print(head)
    print("-" * len(head))
    targets_json: list[dict[str, Any]] = []
    for t in TARGETS:
        vals = {k: _ratio(res[t.op].median(k), res[t.base].median(k))
                for k in ("wall_s", "cpu_s", "peak_rss_bytes")}
        verdict = _verdict(vals["wall_s"], t.limit)
        paired = _paired(res[t.op], res[t.base])
        targets_json.append({"target": t.name, "op": t.op, "base": t.base, "limit": t.limit,
                             "ratio": vals["wall_s"], "result": verdict,
                             "cpu_ratio": vals["cpu_s"], "rss_ratio": vals["peak_rss_bytes"],
                             "paired_ratio": paired})
        print(f"{t.name:<38} {_fmt(vals['wall_s'], '.2f', 'x'):>7} {f'<={t.limit:.2f}x':>8} "
              f"{verdict:>6} {_fmt(vals['cpu_s'], '.2f', 'x'):>10} "
              f"{_fmt(vals['peak_rss_bytes'], '.2f', 'x'):>10} {_fmt(paired, '.2f', 'x'):>7}")
    # 1b's limit in units of the floor moves with the host's gzip speed against its COPY
    # speed; where the strategy is fast, no single pg_dump stream can pass it.
    strategy = _ratio(res[STRAT_B].median("wall_s"), res[FLOOR].median("wall_s"))
    limit = next(t.limit for t in TARGETS if (t.op, t.base) == (VAULT_B, STRAT_B))
    if strategy is not None:
        print(f"the strategy backup took {strategy:.2f}x the floor (the issue measured ~3.7x): "
              f"1b asks for a backup within {limit * strategy:.2f}x the floor")
    split = {"backup_over_floor": _ratio(res[VAULT_BS].median("wall_s"),
                                         res[FLOOR].median("wall_s")),
             "backup_over_strategy": _ratio(res[VAULT_BS].median("wall_s"),
                                            res[STRAT_B].median("wall_s")),
             "restore_over_pg_restore": _ratio(res[VAULT_RS].median("wall_s"),
                                               res[PGR_J2].median("wall_s"))}
    if None not in split.values():
        print(f"--streams 2 (opt-in, not a target): backup {split['backup_over_floor']:.2f}x "
              f"the floor, {split['backup_over_strategy']:.2f}x the strategy; its restore "
              f"{split['restore_over_pg_restore']:.2f}x pg_restore -j2")
    return {"dataset": asdict(info), "operations": ops_json, "targets": targets_json,
            "strategy_over_floor": strategy, "split_streams2": split}


def report_breakdown(res: dict[str, OpResult], main: dict[str, OpResult]) -> dict[str, Any]:
    """Print the parts of a pgvault backup next to the floor and return them as JSON."""
    floor = main[FLOOR].median("wall_s")
    print()
    head = (f"{'breakdown: parts of a pgvault backup':<66} {'wall s':>7} {'CPU s':>7} "
            f"{'RSS MB':>7} {'/ floor':>8}")
    print(head)
    print("-" * len(head))
    rows = [(FLOOR, main[FLOOR], LABELS[FLOOR]), (VAULT_B, main[VAULT_B], LABELS[VAULT_B])]
    rows += [(op, r, BREAKDOWN[op]) for op, r in res.items()]
    out: dict[str, Any] = {}
    for op, r, label in rows:
        wall, cpu, rss = r.median("wall_s"), r.median("cpu_s"), r.median("peak_rss_bytes")
        print(f"{label:<66} {_fmt(wall):>7} {_fmt(cpu):>7} "
              f"{_fmt(None if rss is None else rss / MB, '.1f'):>7} "
              f"{_fmt(_ratio(wall, floor), '.2f', 'x'):>8}"
              f"  {'' if r.status == 'ok' else r.status + ': ' + r.note}".rstrip())
        if op in res:
            out[op] = {"label": label, "command": r.command, "status": r.status,
                       "median": {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": rss,
                                  "output_bytes": r.median_size()},
                       "runs": [asdict(s) for s in r.samples]}
    return out


def report_memory(points: list[tuple[DatasetInfo, dict[str, OpResult]]]) -> dict[str, Any]:
    """Print pgvault's peak memory per database size (target 4) and return it as JSON."""
    ops = (VAULT_B, VAULT_S3, VAULT_R, VAULT_RJ2)
    limit = MEMORY_LIMIT_BYTES / MB
    print()
    print(f"== memory: peak of the pgvault process tree (children included, server excluded), "
          f"PSS MB (RSS MB); target 4: <= {limit:.0f} MB at every size, flat")
    head = f"{'database':<16}" + "".join(f"{LABELS[op]:>30}" for op in ops)
    print(head)
    print("-" * len(head))
    rows: list[dict[str, Any]] = []
    for info, res in points:
        cells: list[str] = []
        row: dict[str, Any] = {"target_mb": info.target_mb,
                               "db_size_bytes": info.db_size_bytes, "operations": {}}
        for op in ops:
            r = res.get(op)
            ok = r is not None and r.status == "ok" and bool(r.samples)
            sampled = (r.memory or r.samples) if r is not None else []
            pss = max(s.peak_pss_bytes for s in sampled) if ok else None
            rss = max(s.peak_rss_bytes for s in sampled) if ok else None
            verdict = _verdict(None if pss is None else pss / MB, limit)
            cells.append(f"{pss / MB:.1f} ({rss / MB:.1f}) {verdict}"
                         if pss is not None and rss is not None
                         else (r.status if r is not None else "n/a"))
            row["operations"][op] = {
                "peak_pss_bytes": pss, "peak_rss_bytes": rss, "result": verdict,
                "wall_s": r.median("wall_s") if r is not None else None,
                "runs": [asdict(s) for s in r.samples] if r is not None else [],
                "note": r.note if r is not None else ""}
        rows.append(row)
        print(f"{f'{info.db_size_bytes / MB:,.0f} MB':<16}" + "".join(f"{c:>30}" for c in cells))
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        growth = []
        for op in ops:
            a = first["operations"][op]["peak_pss_bytes"]
            b = last["operations"][op]["peak_pss_bytes"]
            growth.append(_fmt(_ratio(b, a), ".2f", "x"))
        scale = last["db_size_bytes"] / first["db_size_bytes"]
        print(f"{f'x{scale:.1f} data':<16}" + "".join(f"{g:>30}" for g in growth))
    return {"limit_bytes": MEMORY_LIMIT_BYTES, "metric": "peak tree PSS", "sizes": rows}


def report_startup(res: dict[str, OpResult], runs: int) -> dict[str, Any]:
    """Print median start-up wall times (target 5) and return them as JSON."""
    print()
    print(f"== start-up: median wall of {runs} runs; target 5: <= {STARTUP_LIMIT_S:.2f} s")
    out: dict[str, Any] = {"limit_s": STARTUP_LIMIT_S}
    for op, r in res.items():
        wall = r.median("wall_s")
        verdict = _verdict(wall, STARTUP_LIMIT_S)
        low = min((s.wall_s for s in r.samples), default=None)
        print(f"{r.command.split(' ', 1)[1]:<60} {_fmt(wall, '.3f')} s  (min {_fmt(low, '.3f')})"
              f"  {verdict}  {'' if r.status == 'ok' else r.status + ': ' + r.note}".rstrip())
        out[op] = {"command": r.command, "median_wall_s": wall, "min_wall_s": low,
                   "result": verdict, "status": r.status, "note": r.note,
                   "walls_s": [s.wall_s for s in r.samples]}
    return out


def machine() -> dict[str, Any]:
    """What the figures came from: CPUs, memory, OS, Python."""
    import psutil

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {"node": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu_model,
            "memory_bytes": psutil.virtual_memory().total, "python": sys.version,
            "platform": platform.platform(), "load_avg_at_start": os.getloadavg()}


def cpu_times() -> dict[str, float]:
    """The machine's CPU seconds so far by kind (/proc/stat's first line); empty elsewhere."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    return {name: int(value) / ticks for name, value in zip(names, fields, strict=False)}


def stolen_share(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Share of the machine's CPU time the hypervisor gave to others between two samples."""
    if not before or not after:
        return None
    total = sum(after.values()) - sum(before.values())
    return (after.get("steal", 0) - before.get("steal", 0)) / total if total > 0 else None


# ---------------------------------------------------------------- main


def _sizes(text: str) -> list[int]:
    """'1024,4096' -> [1024, 4096]."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes in MB: {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=300,
                   help="approximate on-disk size of the shop dataset (default 300)")
    p.add_argument("--runs", type=int, default=3, help="runs per operation; medians (default 3)")
    p.add_argument("--pgbench", action="store_true",
                   help="also benchmark a pgbench -i database of about the same size")
    p.add_argument("--no-pgvault", action="store_true", help="measure the baselines only")
    p.add_argument("--pgvault", metavar="PATH", help="pgvault executable (default: the venv's)")
    p.add_argument("--pgvault-rev", metavar="REV",
                   help="measure pgvault's code at this git revision (e.g. HEAD, a commit) "
                        "instead of the working tree; same venv and dependencies")
    p.add_argument("--restore-jobs", type=int, default=2, help="pg_restore -j (default 2)")
    p.add_argument("--no-s3", action="store_true",
                   help="skip the S3 comparison (no moto server)")
    p.add_argument("--memory-sizes", type=_sizes, default=[], metavar="MB,MB",
                   help="also measure pgvault's peak RSS on shop databases of these sizes, "
                        "e.g. 1024,4096 (built once and cached; 4 GB takes minutes)")
    p.add_argument("--memory-runs", type=int, default=1,
                   help="runs per operation in the memory part (default 1)")
    p.add_argument("--startup-runs", type=int, default=10,
                   help="runs of pgvault --version and pgvault list (default 10; 0 skips)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of a pgvault backup alone: stock zstd -1 -T2, "
                        "pg_dumpall -g, count(*) of every table, pgvault without globals, "
                        "at level 3, without compression")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, profile pgvault backup and restore once each (py-spy, "
                        "perf) on the shop dataset")
    p.add_argument("--cache-dir", default=str(BENCH_DIR / ".cache"),
                   help="where built clusters are kept, keyed by size (default bench/.cache)")
    p.add_argument("--no-cache", action="store_true",
                   help="build the dataset in a temp folder and delete it afterwards")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached dataset")
    p.add_argument("--workdir", help="parent folder for dump files and repos (default: /tmp)")
    p.add_argument("--results-dir", default=str(BENCH_DIR / "results"),
                   help="where the JSON results go (default bench/results)")
    p.add_argument("--shapes", metavar="LIST",
                   help="restore/backup speed on database shapes instead (issue 21): a "
                        f"comma-separated list of {','.join(ds.SHAPES)}, each built once and "
                        "cached; runs alternate the order of the measured commands")
    p.add_argument("--baseline-rev", metavar="REV",
                   help="with --shapes: also time pgvault restore at this git revision, "
                        "alternated with the others (before/after in one run)")
    p.add_argument("--baseline-pgvault", metavar="PATH",
                   help="like --baseline-rev, for a pgvault executable (e.g. a tree with one "
                        "change taken out)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: --shapes at 60 MB (unless --size-mb), 2 runs "
                        "(unless --runs)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes or ",".join(ds.SHAPES)
        if "--size-mb" not in (argv if argv is not None else sys.argv):
            args.size_mb = 60
        if "--runs" not in (argv if argv is not None else sys.argv):
            args.runs = 2
    if args.runs < 1 or args.size_mb < 1 or args.memory_runs < 1 or args.startup_runs < 0:
        p.error("--runs, --size-mb and --memory-runs must be positive")
    return args


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so the cleanup code runs."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    sigs = (signal.SIGTERM, signal.SIGHUP)
    old: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {
        s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def start_s3(args: argparse.Namespace, stack: contextlib.ExitStack, scratch: Path
             ) -> tuple[MotoServer | None, str, str | None]:
    """Start the loopback S3 server unless --no-s3; returns (server, why not, aws CLI)."""
    if args.no_s3:
        return None, "skipped (--no-s3)", None
    try:
        import moto  # noqa: F401 - only to tell whether moto's server can run
    except ImportError:
        return None, "moto not installed (pip install -e '.[test]')", None
    server = MotoServer(scratch / "s3")
    stack.callback(server.stop)
    log("starting the loopback S3 server (moto)")
    server.start()
    aws = find_aws()
    log(f"S3 at {server.url}; upload baseline uses {aws or 'boto3 upload_fileobj (no aws CLI)'}")
    return server, "", aws


# ---------------------------------------------------------------- restore shapes (issue 21)

# (name, op, base, limit): wall(op) / wall(base) medians, on every shape.
SHAPE_TARGETS = [
    ("21.1a restore / pg_restore -j N", "restore.pgvault", "restore.pg_restore", 0.8),
    ("21.1b restore / gunzip | psql", "restore.pgvault", "restore.strategy", 0.6),
    ("21.2  backup / pg_dump -Fc -Z0", "backup.pgvault", "backup.floor", 1.1),
]
SHAPE_LABELS = {
    "backup.floor": "pg_dump -Fc -Z0 > /dev/null (floor)",
    "backup.pgvault": "pgvault backup (local repo)",
    "restore.strategy": "gunzip -c | psql (strategy)",
    "restore.pg_restore": "pg_restore -j N (-Fc -Z0 file)",
    "restore.pgvault": "pgvault restore latest",
    "restore.pgvault_base": "pgvault restore latest (--baseline-rev)",
}
BASE_RESTORE = "restore.pgvault_base"


def prepare_shapes(args: argparse.Namespace, stack: contextlib.ExitStack, size_mb: int,
                   shapes: list[str]) -> Prepared:
    """A data dir holding every asked-for shape's database, each built once and cached."""
    base = Path(args.cache_dir) / f"pg15-shapes-v{ds.SHAPES_VERSION}-{size_mb}mb"
    _lock(base.with_suffix(".lock"), stack)
    data_dir, meta_path = base / "pgdata", base / "dataset.json"
    if args.rebuild and base.exists():
        stop_stale(data_dir)
        shutil.rmtree(base)
    if not data_dir.exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        base.chmod(0o755)
        log(f"initdb {data_dir}")
        initdb(data_dir)
        meta_path.unlink(missing_ok=True)
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    missing = [s for s in shapes if s not in meta]
    if not missing:
        log(f"using cached shapes {base}")
        return Prepared(data_dir, meta, set())
    cluster = Cluster(data_dir, BUILD_SETTINGS)
    stack.callback(cluster.stop)
    cluster.start()
    for shape in missing:
        log(f"building shape {shape} of ~{size_mb} MB")
        t = time.monotonic()
        db = ds.SHAPE_DBS[shape]
        ds.build_shape(shape, cluster.url(), cluster.url(db), size_mb)
        meta[shape] = {"build_seconds": round(time.monotonic() - t, 2),
                       "rows": ds.table_counts(cluster.url(db))}
        log(f"shape {shape} built in {meta[shape]['build_seconds']}s, "
            f"{ds.database_size(cluster.url(db)) / MB:.1f} MB")
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        meta_path.write_text(json.dumps(meta, indent=2))  # only after the shape is whole
    cluster.stop()
    os.sync()  # the build ran with fsync=off
    return Prepared(data_dir, meta, set(missing))


def run_shape(bench: Bench, info: DatasetInfo, runs: int, jobs: int) -> dict[str, OpResult]:
    """Each measured command once per run, the order reversed every other run (ABBA...), so
    a slow drift of the shared machine weighs on each side alike."""
    src = bench.cluster.url(info.dbname)
    work = bench.workdir / info.name
    work.mkdir(parents=True, exist_ok=True)
    ref, gz = work / "floor.dump", work / "strategy.sql.gz"
    repo, scratch_repo = work / "repo", work / "scratch-repo"
    restore_db = f"{RESTORE_PREFIX}{info.name}"
    vault = str(bench.pgvault)
    env = bench.env(DATABASE_URL=src)
    log(f"[{info.name}] untimed: reference -Z0 dump, strategy dump, a pgvault backup")
    bench._check(measure([str(PG_BIN / "pg_dump"), "-Fc", "-Z0", "-f", str(ref), src],
                         env=env, sample=False), "reference dump")
    info.reference_dump_bytes = ref.stat().st_size
    bench._check(measure(["bash", "-c", STRATEGY_BACKUP], env=bench.env(
        DATABASE_URL=src, DUMP_FILE=str(gz)), sample=False), "strategy backup")
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    bench._check(measure([vault, "backup", "--dbname", src, "--repo", f"file://{repo}"],
                         env=env, sample=False), "pgvault backup (for the restores)")
    res = {op: OpResult(op, label) for op, label in SHAPE_LABELS.items()
           if op != BASE_RESTORE or bench.base_pgvault is not None}

    def floor() -> Sample:
        return measure([str(PG_BIN / "pg_dump"), "-Fc", "-Z0", src], env=env, sample=False)

    def vault_backup() -> Sample:
        shutil.rmtree(scratch_repo, ignore_errors=True)
        scratch_repo.mkdir()
        return measure([vault, "backup", "--dbname", src, "--repo", f"file://{scratch_repo}"],
                       env=env, sample=False)

    def strategy() -> Sample:
        bench._create_db(restore_db)
        return measure(["bash", "-c", STRATEGY_RESTORE], env=bench.env(
            DUMP_FILE=str(gz), DATABASE_URL_RESTORE=bench.cluster.url(restore_db)),
            sample=False)

    def pg_restore() -> Sample:
        bench._create_db(restore_db)
        return measure([str(PG_BIN / "pg_restore"), "-j", str(jobs), "-d",
                        bench.cluster.url(restore_db), str(ref)], env=env, sample=False)

    def vault_restore() -> Sample:
        bench._drop_db(restore_db)
        return measure([vault, "restore", "latest", "--to", restore_db, "--dbname", src,
                        "--repo", f"file://{repo}"], env=env, sample=False)

    def base_restore() -> Sample:
        bench._drop_db(restore_db)
        return measure([str(bench.base_pgvault), "restore", "latest", "--to", restore_db,
                        "--dbname", src, "--repo", f"file://{repo}"], env=env, sample=False)

    commands: list[tuple[str, Callable[[], Sample]]] = [
        ("backup.floor", floor), ("backup.pgvault", vault_backup),
        ("restore.strategy", strategy), ("restore.pg_restore", pg_restore),
        ("restore.pgvault", vault_restore)]
    if BASE_RESTORE in res:
        commands.append((BASE_RESTORE, base_restore))
    for i in range(runs):
        order = commands if i % 2 == 0 else commands[::-1]
        log(f"[{info.name}] run {i + 1}/{runs}")
        for op, command in order:
            r = res[op]
            if r.status != "ok":
                continue
            before, settled = server_cpu_s(bench.cluster)
            s = command()
            server = server_cpu_s(bench.cluster, settled)[0] - before
            if op.startswith("restore.pgvault") or op == "backup.pgvault":
                if not bench._pgvault_ok(r, s):
                    continue
            else:
                bench._check(s, r.command)
            verified = (bench._verify(restore_db, info.rows, s) if op.startswith("restore.")
                        else True)
            r.server_cpu.append(server)
            bench._add(r, s, None, verified, label=SHAPE_LABELS[op])
            bench._drop_db(restore_db)
    return res


def server_cpu_s(cluster: Cluster, settled: frozenset[int] = frozenset()
                 ) -> tuple[float, frozenset[int]]:
    """CPU seconds of every server process that has ended so far (backends, parallel
    workers: the postmaster's reaped children), and the server processes alive now.

    A command's server work is the difference around it, once every process that was not
    alive before it (``settled``) is gone: a client's exit does not wait for its backend's.
    It is what the command asked of the server, which no client-side schedule makes smaller.
    """
    import psutil

    try:
        pid = int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        postmaster = psutil.Process(pid)
        deadline = time.monotonic() + 2.0
        while settled and time.monotonic() < deadline and \
                {c.pid for c in postmaster.children()} - settled:
            time.sleep(0.02)
        times = postmaster.cpu_times()
        alive = frozenset(c.pid for c in postmaster.children())
        return float(times.children_user + times.children_system), alive
    except (OSError, ValueError, psutil.Error):
        return 0.0, frozenset()


def cpu_bound(r: OpResult, jobs: int) -> float | None:
    """The shortest wall time r's median work allows on ``jobs`` CPUs: its server and its
    client CPU seconds spread over every CPU with none idle."""
    cpu = r.median("cpu_s")
    if cpu is None or not r.server_cpu:
        return None
    return (cpu + statistics.median(r.server_cpu)) / max(jobs, 1)


def report_shape(info: DatasetInfo, res: dict[str, OpResult], runs: int, jobs: int
                 ) -> dict[str, Any]:
    """Print one shape's table and its targets; the same as JSON."""
    print(f"\n== shape {info.name}: {info.db_size_bytes / MB:.1f} MB on disk, "
          f"{sum(info.rows.values()):,} rows in {len(info.rows)} tables, -Z0 dump "
          f"{info.reference_dump_bytes / MB:.1f} MB; medians of {runs} alternated runs; "
          f"N = {jobs}")
    head = (f"{'operation':<38} {'wall s':>8} {'min':>7} {'max':>7} {'CPU s':>8} "
            f"{'server':>7}  note")
    print(head)
    print("-" * len(head))
    ops: dict[str, Any] = {}
    for op, r in res.items():
        walls = [s.wall_s for s in r.samples]
        note = _op_note(op, r)
        server = statistics.median(r.server_cpu) if r.server_cpu else None
        print(f"{SHAPE_LABELS[op]:<38} {_fmt(r.median('wall_s')):>8} "
              f"{_fmt(min(walls) if walls else None):>7} "
              f"{_fmt(max(walls) if walls else None):>7} {_fmt(r.median('cpu_s')):>8} "
              f"{_fmt(server):>7}  {note}".rstrip())
        ops[op] = {"label": SHAPE_LABELS[op], "status": r.status, "note": r.note,
                   "median_wall_s": r.median("wall_s"), "median_cpu_s": r.median("cpu_s"),
                   "median_server_cpu_s": server, "walls": walls, "verified": r.verified}
    targets = []
    if BASE_RESTORE in res:
        now, then = res["restore.pgvault"], res[BASE_RESTORE]
        ratio = _ratio(now.median("wall_s"), then.median("wall_s"))
        print(f"  {'restore / the same at --baseline-rev':<36} {_fmt(ratio, '.2f', 'x'):>7}"
              f"{'':>16}paired {_fmt(_paired(now, then), '.2f', 'x')}")
    for name, op, base, limit in SHAPE_TARGETS:
        ratio = _ratio(res[op].median("wall_s"), res[base].median("wall_s"))
        paired = _paired(res[op], res[base])
        verdict = _verdict(ratio, limit)
        if not all(res[op].verified):
            verdict = "MISS (restore mismatch)"
        bound = cpu_bound(res[op], jobs)
        reach = _ratio(bound, res[base].median("wall_s"))
        # Below `reach`, the ratio needs less CPU work than this run's, not a better schedule.
        print(f"  {name:<36} {_fmt(ratio, '.2f', 'x'):>7} {f'<={limit:.2f}x':>8} "
              f"{verdict:>6}  paired {_fmt(paired, '.2f', 'x')}  "
              f"CPU bound {_fmt(reach, '.2f', 'x')}")
        targets.append({"target": name, "ratio": ratio, "limit": limit, "result": verdict,
                        "paired_ratio": paired, "cpu_bound_ratio": reach})
    return {"shape": info.name, "db_size_bytes": info.db_size_bytes,
            "reference_dump_bytes": info.reference_dump_bytes, "rows": info.rows,
            "operations": ops, "targets": targets}


def run_shapes(args: argparse.Namespace) -> int:
    """--shapes: restore and backup speed on several database shapes (issue 21, 1-2)."""
    started = dt.datetime.now(dt.UTC)
    cpu_at_start = cpu_times()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in ds.SHAPES]
    if unknown:
        print(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(ds.SHAPES)}",
              file=sys.stderr)
        return 2
    jobs = args.restore_jobs or os.cpu_count() or 2
    out: list[dict[str, Any]] = []
    with signals_raise(), contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pgvault-bench-", dir=args.workdir))
        scratch.chmod(0o755)
        stack.callback(shutil.rmtree, scratch, True)
        prepared = prepare_shapes(args, stack, args.size_mb, shapes)
        cluster = Cluster(prepared.data_dir, BENCH_SETTINGS)
        stack.callback(cluster.stop)
        cluster.start()
        drop_leftovers(cluster)
        pgvault_commit = ""
        if args.pgvault_rev:
            script, pgvault_commit = export_revision(args.pgvault_rev, scratch / "pgvault-rev")
            pgvault, note = find_pgvault(str(script))
        else:
            pgvault, note = find_pgvault(args.pgvault)
            pgvault_commit = working_tree_commit()
        if pgvault is None:
            print(f"pgvault: {note}", file=sys.stderr)
            return 2
        bench = Bench(cluster, scratch / "work", pgvault, note, jobs)
        if args.baseline_rev:
            script, _ = export_revision(args.baseline_rev, scratch / "pgvault-base")
            bench.base_pgvault = script
        elif args.baseline_pgvault:
            bench.base_pgvault = Path(args.baseline_pgvault)
        for shape in shapes:
            m = prepared.meta[shape]
            db = ds.SHAPE_DBS[shape]
            info = DatasetInfo(name=shape, dbname=db, target_mb=args.size_mb,
                               db_size_bytes=ds.database_size(cluster.url(db)),
                               build_seconds=float(m["build_seconds"]),
                               cached=shape not in prepared.built_now, rows=m["rows"])
            out.append(report_shape(info, run_shape(bench, info, args.runs, jobs), args.runs,
                                    jobs))
            sys.stdout.flush()
        cluster.stop()
    steal = stolen_share(cpu_at_start, cpu_times())
    if steal is not None:
        print(f"\nCPU time stolen by the hypervisor during the run: {100 * steal:.1f}%")
    elapsed = (dt.datetime.now(dt.UTC) - started).total_seconds()
    print(f"shapes run took {elapsed:.0f} s")
    res_dir = Path(args.results_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}-shapes.json"
    path.write_text(json.dumps({"started_at": started.isoformat(), "seconds": elapsed,
                                "args": vars(args), "host": machine(),
                                "pgvault_commit": pgvault_commit, "shapes": out},
                               indent=2, default=str))
    print(f"results written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Prepare the cluster, run the benchmark, print and save the results."""
    args = parse_args(argv)
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        print("runuser is needed to run PostgreSQL as the postgres user", file=sys.stderr)
        return 2
    if args.shapes:
        return run_shapes(args)
    started = dt.datetime.now(dt.UTC)
    host = machine()
    cpu_at_start = cpu_times()
    res_dir = Path(args.results_dir)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    server_version = "?"
    out: list[dict[str, Any]] = []
    memory_json: dict[str, Any] | None = None
    startup_json: dict[str, Any] | None = None
    profiles: dict[str, Any] = {}
    pgvault: Path | None = None
    note = s3_note = "not started"
    aws: str | None = None
    startup: dict[str, OpResult] = {}
    pgvault_commit = ""
    with signals_raise(), contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pgvault-bench-", dir=args.workdir))
        scratch.chmod(0o755)
        stack.callback(shutil.rmtree, scratch, True)
        try:
            prepared = prepare(args, stack, scratch, args.size_mb, args.pgbench)
            cluster = Cluster(prepared.data_dir, BENCH_SETTINGS)
            stack.callback(cluster.stop)
            log("starting PostgreSQL with benchmark settings")
            cluster.start()
            log(f"cluster up at {cluster.url()}")
            drop_leftovers(cluster)
            with psycopg.connect(cluster.url()) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                server_version = str(row[0]) if row else "?"

            if args.no_pgvault:
                pgvault, note = None, "skipped (--no-pgvault)"
            elif args.pgvault_rev:
                script, pgvault_commit = export_revision(args.pgvault_rev,
                                                         scratch / "pgvault-rev")
                pgvault, note = find_pgvault(str(script))
            else:
                pgvault, note = find_pgvault(args.pgvault)
                if args.pgvault is None:
                    pgvault_commit = working_tree_commit()
            log(f"pgvault: {pgvault or note}")
            s3, s3_note, aws = start_s3(args, stack, scratch)
            bench = Bench(cluster, scratch / "work", pgvault, note, args.restore_jobs,
                          s3, s3_note, aws)

            if pgvault is not None and args.startup_runs:
                log(f"start-up: {args.startup_runs} runs each")
                startup = bench.run_startup(args.startup_runs)
            datasets = [("shop", ds.SHOP_DB)] + ([("pgbench", ds.PGBENCH_DB)]
                                                 if args.pgbench else [])
            shop: tuple[DatasetInfo, dict[str, OpResult]] | None = None
            for name, db in datasets:
                m = prepared.meta[name]
                info = DatasetInfo(
                    name=name, dbname=db, target_mb=args.size_mb,
                    db_size_bytes=ds.database_size(cluster.url(db)),
                    build_seconds=float(m["build_seconds"]),
                    cached=name not in prepared.built_now, rows=m["rows"])
                res = bench.run_dataset(info, args.runs)
                out.append(report(info, res, args.runs))
                if args.breakdown:
                    out[-1]["breakdown"] = report_breakdown(
                        bench.run_breakdown(info, args.runs), res)
                if name == "shop":
                    shop = (info, res)
            if pgvault is not None and args.startup_runs:
                startup_json = report_startup(startup, args.startup_runs)
            if args.profile and pgvault is not None and shop is not None:
                prof_dir = res_dir / f"{stamp}-profile"
                profiles = bench.run_profile(shop[0], prof_dir)
                print()
                for pname, prof in profiles.items():
                    print(format_profile(pname, prof))
            cluster.stop()

            points = [shop] if shop is not None else []
            if args.memory_sizes and pgvault is not None:
                for size in args.memory_sizes:
                    if size == args.size_mb:
                        continue  # the shop dataset above is that point already
                    prep = prepare(args, stack, scratch, size, False)
                    mcluster = Cluster(prep.data_dir, BENCH_SETTINGS)
                    stack.callback(mcluster.stop)
                    log(f"[memory {size} MB] starting PostgreSQL")
                    mcluster.start()
                    drop_leftovers(mcluster)
                    m = prep.meta["shop"]
                    info = DatasetInfo(
                        name="shop", dbname=ds.SHOP_DB, target_mb=size,
                        db_size_bytes=ds.database_size(mcluster.url(ds.SHOP_DB)),
                        build_seconds=float(m["build_seconds"]),
                        cached="shop" not in prep.built_now, rows=m["rows"])
                    mbench = Bench(mcluster, scratch / "work", pgvault, note, args.restore_jobs,
                                   s3, s3_note, aws)
                    points.append((info, mbench.run_memory(info, args.memory_runs)))
                    mcluster.stop()
                memory_json = report_memory(sorted(points, key=lambda p: p[0].db_size_bytes))
        except KeyboardInterrupt as e:
            log(f"interrupted ({str(e) or 'SIGINT'}); stopping the cluster and cleaning up")
            return 130
        except CommandFailed as e:
            log(f"a baseline command failed, the harness cannot go on: {e}")
            return 1
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # let the cleanup below finish
        log("stopping the servers")

    steal = stolen_share(cpu_at_start, cpu_times())
    host["cpu_stolen_share"] = steal
    if steal is not None:
        # Steal makes wall times noisy: a figure from a run with much of it is weak evidence.
        print(f"\nCPU time stolen by the hypervisor during the run: {100 * steal:.1f}%")
    results = {
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "args": vars(args),
        "host": host,
        "postgres": {"version": server_version, "bin": str(PG_BIN), "settings": BENCH_SETTINGS},
        "pgvault": str(pgvault) if pgvault else note,
        "pgvault_rev": args.pgvault_rev,
        "pgvault_commit": pgvault_commit,
        "s3": {"server": "moto (loopback)", "upload_tool": aws or "boto3 upload_fileobj",
               "note": s3_note},
        "datasets": out,
        "memory": memory_json,
        "startup": startup_json,
        "profile": profiles,
    }
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
