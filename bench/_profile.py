"""Profile one pgvault command: py-spy for Python frames, perf for the native split by library."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# One py-spy raw record: 'process PID:"cmdline";frame;frame;... COUNT' (cmdline may span lines).
_PYSPY_RECORD = re.compile(r'^process \d+:".*?";(.*?) (\d+)$', re.MULTILINE | re.DOTALL)
_FRAME_LINE = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")
# One perf report line with --sort comm,dso: '  12.34%  comm  dso'.
_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+(\S+)\s*$")

# Processes pgvault starts; every other command name in its tree is pgvault itself (its
# Python threads and zstd's worker threads share its name).
CHILD_TOOLS = ("pg_dump", "pg_dumpall", "pg_restore", "psql", "zstd", "gzip", "age")
# Which native library does what, for the summary: every other library counts as "other".
DSO_ROLES = [
    ("zstd", ("zstandard", "libzstd", "backend_c")),
    ("sha256 (libcrypto)", ("libcrypto",)),
    ("gzip (libz)", ("libz.so",)),
    ("kernel (pipes, sockets, page cache, copies)", ("[kernel",)),
    ("libc (memcpy, malloc)", ("libc.so", "libc-")),
    ("Python interpreter", ("python3", "libpython")),
    ("libpq / PostgreSQL client", ("libpq", "pg_dump", "pg_restore", "pg_dumpall", "psycopg")),
]


def _short(frame: str) -> str:
    """'read (/x/y/site-packages/pgvault/pipeline/stream.py:42)' -> 'read (pipeline/stream.py)'."""
    m = _FRAME_LINE.match(frame)
    if not m:
        return frame
    func, path = m.groups()
    parts = path.split("/")
    return f"{func} ({'/'.join(parts[-2:])})"


def summarize_pyspy(raw: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per Python function from py-spy's raw output."""
    self_time: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for frames_txt, count_txt in _PYSPY_RECORD.findall(raw):
        count = int(count_txt)
        frames = [_short(f) for f in frames_txt.split(";") if not f.startswith("thread (")]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    share = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "self_pct": [(f, share(n)) for f, n in self_time.most_common(top)],
        "inclusive_pct": [(f, share(n)) for f, n in incl.most_common(top)],
    }


def summarize_perf(report: str) -> dict[str, Any]:
    """CPU samples per (command, library), and per role, from `perf report --sort comm,dso`."""
    rows: list[tuple[str, str, float]] = []
    for line in report.splitlines():
        m = _PERF_LINE.match(line)
        if m:
            rows.append((m.group(2), m.group(3), float(m.group(1))))
    roles: dict[str, float] = defaultdict(float)
    for comm, dso, pct in rows:
        if comm in CHILD_TOOLS:
            roles[f"child process {comm}"] += pct
            continue
        role = next((name for name, keys in DSO_ROLES if any(k in dso for k in keys)), "other")
        roles[f"pgvault: {role}"] += pct
    return {
        "by_comm_dso_pct": rows[:25],
        "by_role_pct": [(r, round(p, 1))
                        for r, p in sorted(roles.items(), key=lambda kv: -kv[1])],
    }


def profile(argv: Sequence[str], env: Mapping[str, str], out_dir: Path, name: str,
            py_spy: Path | None, prepare: Any = None) -> dict[str, Any]:
    """Run argv once under perf and once under py-spy (whichever exist); return summaries.

    prepare, if given, is called before each run (e.g. to empty the repository or drop the
    restore target). Outputs (raw stacks, perf data) are kept in out_dir.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": " ".join(argv)}
    perf = shutil.which("perf")
    if perf is not None:
        if prepare:
            prepare()
        data = out_dir / f"{name}.perf.data"
        proc = subprocess.run([perf, "record", "-q", "-F", "499", "-o", str(data), "--", *argv],
                              env=dict(env), capture_output=True, text=True)
        if proc.returncode != 0:
            # The command itself failed: a profile of it would mislead.
            result["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            return result
        rep = subprocess.run(
            [perf, "report", "-i", str(data), "--no-children", "--sort", "comm,dso",
             "--stdio"], capture_output=True, text=True)
        result["perf"] = summarize_perf(rep.stdout)
        result["perf"]["data"] = str(data)
    else:
        result["perf_error"] = "perf not installed (Debian: linux-perf)"
    if py_spy is not None:
        if prepare:
            prepare()
        raw_path = out_dir / f"{name}.pyspy.txt"
        proc = subprocess.run(
            [str(py_spy), "record", "--format", "raw", "--rate", "250", "--subprocesses",
             "--nonblocking", "-o", str(raw_path), "--", *argv],
            env=dict(env), capture_output=True, text=True)
        if proc.returncode == 0 and raw_path.exists():
            result["py_spy"] = summarize_pyspy(raw_path.read_text(errors="replace"))
            result["py_spy"]["raw"] = str(raw_path)
        else:
            result["py_spy_error"] = proc.stderr.strip()[-500:]
    return result


def format_profile(name: str, prof: dict[str, Any]) -> str:
    """The human summary of one profile, for the report."""
    lines = [f"-- profile: {name}: {prof['command']}"]
    if "error" in prof:
        return "\n".join([*lines, f"   the command failed: {prof['error']}"])
    if "perf" in prof:
        lines.append("   CPU by process / library (perf, all threads of the pgvault tree):")
        lines += [f"     {pct:5.1f}%  {role}" for role, pct in prof["perf"]["by_role_pct"]]
    elif "perf_error" in prof:
        lines.append(f"   perf: {prof['perf_error']}")
    if "py_spy" in prof:
        ps = prof["py_spy"]
        lines.append(f"   Python frames (py-spy, {ps['samples']} samples of active Python "
                     "threads), self time:")
        lines += [f"     {pct:5.1f}%  {f}" for f, pct in ps["self_pct"][:10]]
        lines.append("   inclusive:")
        lines += [f"     {pct:5.1f}%  {f}" for f, pct in ps["inclusive_pct"][:12]]
    elif "py_spy_error" in prof:
        lines.append(f"   py-spy: {prof['py_spy_error']}")
    return "\n".join(lines)
