"""Benchmark pgvault backup/restore against pg_dump baselines on a throwaway cluster.

Run: .venv/bin/python bench/run.py --size-mb 300 --runs 3   (see bench/README.md)
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
from psycopg import sql

BENCH_DIR = Path(__file__).resolve().parent
RESTORE_PREFIX = "bench_r_"
MB = 1024 * 1024
T0 = time.monotonic()

# Operation ids, in the order they run and print.
FLOOR, STRAT_B, VAULT_B = "backup.floor", "backup.strategy", "backup.pgvault"
STRAT_R, PGR_J2, VAULT_R = "restore.strategy", "restore.pg_restore_j2", "restore.pgvault"
LABELS = {
    FLOOR: "pg_dump -Fc -Z0 > /dev/null (floor)",
    STRAT_B: "pg_dump | gzip > file (strategy)",
    VAULT_B: "pgvault backup",
    STRAT_R: "gunzip -c | psql (strategy)",
    PGR_J2: "pg_restore -j 2 (-Fc -Z0 file)",
    VAULT_R: "pgvault restore latest",
}
RATIOS = [
    ("pgvault backup / floor", VAULT_B, FLOOR),
    ("pgvault backup / strategy backup", VAULT_B, STRAT_B),
    ("pgvault restore / pg_restore -j2", VAULT_R, PGR_J2),
    ("pgvault restore / strategy restore", VAULT_R, STRAT_R),
]
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
    sizes: list[int] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)
    status: str = "ok"  # ok | n/a | failed
    note: str = ""

    def median(self, attr: str) -> float | None:
        """Median of a Sample attribute over the runs, or None if there are none."""
        if self.status != "ok" or not self.samples:
            return None
        return float(statistics.median(getattr(s, attr) for s in self.samples))

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
                 pgvault_note: str, restore_jobs: int) -> None:
        """Wire the running cluster, a scratch folder and the pgvault executable (if any)."""
        self.cluster = cluster
        self.workdir = workdir
        self.pgvault = pgvault
        self.pgvault_note = pgvault_note
        self.restore_jobs = restore_jobs

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for measured commands: PostgreSQL 15 client tools first on PATH."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PG") or k.startswith("PGVAULT_")}
        env["PATH"] = f"{PG_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
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
        vault_env = self.env(DATABASE_URL=src, PGVAULT_REPO=repo_url)
        res = {
            FLOOR: OpResult(FLOOR, f"pg_dump -Fc -Z0 {src} > /dev/null"),
            STRAT_B: OpResult(STRAT_B, STRATEGY_BACKUP.replace("\n", "; ")),
            VAULT_B: OpResult(VAULT_B, " ".join(vault_backup)),
            STRAT_R: OpResult(STRAT_R, STRATEGY_RESTORE),
            PGR_J2: OpResult(PGR_J2, f"pg_restore -j {self.restore_jobs} -d <new db> {ref}"),
            VAULT_R: OpResult(VAULT_R, " ".join(vault_restore)),
        }
        if self.pgvault is None:
            for op in (VAULT_B, VAULT_R):
                res[op].status, res[op].note = "n/a", self.pgvault_note

        for i in range(1, runs + 1):
            log(f"[{info.name}] run {i}/{runs}: backups")
            s = self._check(measure([str(PG_BIN / "pg_dump"), "-Fc", "-Z0", src],
                                    env=self.env()), LABELS[FLOOR])
            self._add(res[FLOOR], s, info.reference_dump_bytes)

            gz.unlink(missing_ok=True)
            s = self._check(measure(["bash", "-c", STRATEGY_BACKUP],
                                    env=self.env(DATABASE_URL=src, DUMP_FILE=str(gz))),
                            LABELS[STRAT_B])
            self._add(res[STRAT_B], s, gz.stat().st_size)

            if res[VAULT_B].status == "ok":
                shutil.rmtree(repo, ignore_errors=True)
                repo.mkdir()
                s = measure(vault_backup, env=vault_env)
                if self._pgvault_ok(res[VAULT_B], s):
                    self._add(res[VAULT_B], s, _tree_size(repo))
                else:
                    res[VAULT_R].status, res[VAULT_R].note = "n/a", "pgvault backup failed"

            log(f"[{info.name}] run {i}/{runs}: restores")
            self._create_db(restore_db)
            s = measure(["bash", "-c", STRATEGY_RESTORE], env=self.env(
                DUMP_FILE=str(gz), DATABASE_URL_RESTORE=self.cluster.url(restore_db)))
            self._check(s, LABELS[STRAT_R])
            self._add(res[STRAT_R], s, None, self._verify(restore_db, expected, s))

            self._create_db(restore_db)
            s = measure([str(PG_BIN / "pg_restore"), "-j", str(self.restore_jobs), "-d",
                         self.cluster.url(restore_db), str(ref)], env=self.env())
            self._check(s, LABELS[PGR_J2])
            self._add(res[PGR_J2], s, None, self._verify(restore_db, expected, s))

            if res[VAULT_R].status == "ok":
                self._drop_db(restore_db)
                s = measure(vault_restore, env=vault_env)
                if self._pgvault_ok(res[VAULT_R], s):
                    self._add(res[VAULT_R], s, None, self._verify(restore_db, expected, s))
            self._drop_db(restore_db)
        return res

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
    def _add(r: OpResult, s: Sample, size: int | None, verified: bool = True) -> None:
        """Append one run to r and log its figures."""
        r.samples.append(s)
        if size is not None:
            r.sizes.append(size)
        r.verified.append(verified)
        extra = f", {size / MB:.1f} MB" if size is not None else ""
        log(f"  {LABELS[r.op]}: {s.wall_s:.2f}s wall, {s.cpu_s:.2f}s CPU, "
            f"{s.peak_rss_bytes / MB:.1f} MB RSS{extra}{'' if verified else ', NOT VERIFIED'}")

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


def prepare(args: argparse.Namespace, stack: contextlib.ExitStack, scratch: Path) -> Prepared:
    """Return a data dir holding the dataset(s): from the cache, or built now (and cached)."""
    if args.no_cache:
        base = scratch / "cluster"
    else:
        base = Path(args.cache_dir) / f"pg15-shop-v{ds.DATASET_VERSION}-{args.size_mb}mb"
        _lock(base.with_suffix(".lock"), stack)
    data_dir, meta_path = base / "pgdata", base / "dataset.json"
    if args.rebuild and base.exists():
        stop_stale(data_dir)
        shutil.rmtree(base)
    meta: dict[str, Any] | None = None
    if meta_path.exists() and data_dir.exists():
        meta = json.loads(meta_path.read_text())
    need_pgbench = args.pgbench and not (meta or {}).get("pgbench")
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
        meta = {"version": ds.DATASET_VERSION, "size_mb": args.size_mb}
    built: set[str] = set()
    cluster = Cluster(build_dir, BUILD_SETTINGS)
    stack.callback(cluster.stop)
    cluster.start()
    if "shop" not in meta:
        log(f"building shop dataset of ~{args.size_mb} MB")
        t = time.monotonic()
        plan = ds.build_shop(cluster.url(), cluster.url(ds.SHOP_DB), args.size_mb, log)
        meta["shop"] = {"build_seconds": round(time.monotonic() - t, 2), "plan": asdict(plan),
                        "rows": ds.table_counts(cluster.url(ds.SHOP_DB))}
        built.add("shop")
        log(f"shop dataset built in {meta['shop']['build_seconds']}s, "
            f"{ds.database_size(cluster.url(ds.SHOP_DB)) / MB:.1f} MB")
    if need_pgbench:
        log("building pgbench dataset (pgbench -i)")
        t = time.monotonic()
        scale = ds.build_pgbench(cluster.url(), cluster.url(ds.PGBENCH_DB), args.size_mb)
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


def report(info: DatasetInfo, res: dict[str, OpResult], runs: int) -> dict[str, Any]:
    """Print the table for one dataset and return the same as a JSON-ready dict."""
    ref = info.reference_dump_bytes
    print()
    print(f"== dataset {info.name} ({info.dbname}): {info.db_size_bytes / MB:.1f} MB on disk "
          f"(target {info.target_mb} MB), {sum(info.rows.values()):,} rows; built in "
          f"{info.build_seconds:.1f}s{' (cached)' if info.cached else ''}; "
          f"uncompressed -Fc -Z0 dump {ref / MB:.1f} MB; median of {runs} run(s)")
    head = (f"{'operation':<38} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12} "
            f"{'output MB':>10} {'compression':>12}  note")
    print(head)
    print("-" * len(head))
    ops_json: dict[str, Any] = {}
    for op, r in res.items():
        size = r.median_size()
        comp = _ratio(ref, size) if size else None
        is_backup = op.startswith("backup.")
        wall, cpu, rss = r.median("wall_s"), r.median("cpu_s"), r.median("peak_rss_bytes")
        note = r.note if r.status != "ok" else ("" if all(r.verified) else "RESTORE MISMATCH")
        if r.status != "ok":
            note = f"{r.status}: {note}"
        line = (f"{LABELS[op]:<38} {_fmt(wall):>8} {_fmt(cpu):>8} "
                f"{_fmt(None if rss is None else rss / MB, '.1f'):>12} "
                f"{_fmt(None if size is None else size / MB, '.1f') if is_backup else '-':>10} "
                f"{_fmt(comp, '.2f', 'x') if is_backup else '-':>12}  {note}")
        print(line.rstrip())
        ops_json[op] = {
            "label": LABELS[op], "command": r.command, "status": r.status, "note": r.note,
            "median": {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": rss,
                       "output_bytes": size},
            "compression_ratio_vs_fc_z0": comp,
            "restore_verified": r.verified,
            "runs": [{**asdict(s), "output_bytes": r.sizes[i] if i < len(r.sizes) else None}
                     for i, s in enumerate(r.samples)],
        }
    print()
    print(f"{'ratio (lower is better for pgvault)':<38} {'wall':>8} {'CPU':>8} {'peak RSS':>12}")
    ratios_json: dict[str, Any] = {}
    for name, a, b in RATIOS:
        vals = {k: _ratio(res[a].median(k), res[b].median(k))
                for k in ("wall_s", "cpu_s", "peak_rss_bytes")}
        ratios_json[name] = vals
        w, c, m = (_fmt(vals[k], ".2f", "x") for k in ("wall_s", "cpu_s", "peak_rss_bytes"))
        print(f"{name:<38} {w:>8} {c:>8} {m:>12}")
    return {"dataset": asdict(info), "operations": ops_json, "ratios": ratios_json}


# ---------------------------------------------------------------- main


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
    p.add_argument("--restore-jobs", type=int, default=2, help="pg_restore -j (default 2)")
    p.add_argument("--cache-dir", default=str(BENCH_DIR / ".cache"),
                   help="where built clusters are kept, keyed by size (default bench/.cache)")
    p.add_argument("--no-cache", action="store_true",
                   help="build the dataset in a temp folder and delete it afterwards")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached dataset")
    p.add_argument("--workdir", help="parent folder for dump files and repos (default: /tmp)")
    p.add_argument("--results-dir", default=str(BENCH_DIR / "results"),
                   help="where the JSON results go (default bench/results)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.size_mb < 1:
        p.error("--runs and --size-mb must be positive")
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


def main(argv: list[str] | None = None) -> int:
    """Prepare the cluster, run the benchmark, print and save the results."""
    args = parse_args(argv)
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        print("runuser is needed to run PostgreSQL as the postgres user", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    with signals_raise(), contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pgvault-bench-", dir=args.workdir))
        scratch.chmod(0o755)
        stack.callback(shutil.rmtree, scratch, True)
        try:
            prepared = prepare(args, stack, scratch)
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
            else:
                pgvault, note = find_pgvault(args.pgvault)
            log(f"pgvault: {pgvault or note}")
            bench = Bench(cluster, scratch / "work", pgvault, note, args.restore_jobs)

            datasets = [("shop", ds.SHOP_DB)] + ([("pgbench", ds.PGBENCH_DB)]
                                                 if args.pgbench else [])
            out: list[dict[str, Any]] = []
            for name, db in datasets:
                m = prepared.meta[name]
                info = DatasetInfo(
                    name=name, dbname=db, target_mb=args.size_mb,
                    db_size_bytes=ds.database_size(cluster.url(db)),
                    build_seconds=float(m["build_seconds"]),
                    cached=name not in prepared.built_now, rows=m["rows"])
                res = bench.run_dataset(info, args.runs)
                out.append(report(info, res, args.runs))
        except KeyboardInterrupt as e:
            log(f"interrupted ({str(e) or 'SIGINT'}); stopping the cluster and cleaning up")
            return 130
        except CommandFailed as e:
            log(f"a baseline command failed, the harness cannot go on: {e}")
            return 1
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # let the cleanup below finish
        log("stopping the cluster")

    results = {
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "args": vars(args),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": sys.version,
                 "platform": platform.platform()},
        "postgres": {"version": server_version, "bin": str(PG_BIN), "settings": BENCH_SETTINGS},
        "pgvault": str(pgvault) if pgvault else note,
        "datasets": out,
    }
    res_dir = Path(args.results_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
