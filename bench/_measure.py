"""Run one command and measure wall time, CPU of its process tree and peak tree RSS."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

SAMPLE_INTERVAL_S = 0.02


@dataclass(frozen=True)
class Sample:
    """One measured run of a command."""

    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_bytes: int
    returncode: int
    stderr_tail: str
    error_lines: int


class CommandFailed(RuntimeError):
    """A measured command exited non-zero."""

    def __init__(self, sample: Sample, argv: Sequence[str]) -> None:
        """Keep the sample so the caller can report the failure."""
        super().__init__(f"exit {sample.returncode}: {' '.join(argv)}\n{sample.stderr_tail}")
        self.sample = sample


def _tree_rss(root: psutil.Process, seen: dict[int, psutil.Process]) -> int:
    """Sum the RSS of root and all its live descendants; remember every process seen."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        seen.setdefault(p.pid, p)
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def _kill_tree(pgid: int, seen: Mapping[int, psutil.Process]) -> None:
    """Kill the command's process group and any descendant that escaped it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for p in seen.values():
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                p.kill()


def measure(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: Path | None = None,
    timeout_s: float = 3600.0,
) -> Sample:
    """Run argv to completion and measure it; stdout goes to a file or /dev/null.

    CPU time is the rusage of the reaped child, which on Linux includes every descendant it
    waited for. Peak RSS is the max over ~20 ms samples of the summed RSS of the live tree.
    """
    out = open(stdout or os.devnull, "wb")  # noqa: SIM115 - closed in finally
    err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally
    seen: dict[int, psutil.Process] = {}
    proc: subprocess.Popen[bytes] | None = None
    reaped = False
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            env=dict(env) if env is not None else None, start_new_session=True,
        )
        root = psutil.Process(proc.pid)
        peak = 0
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - t0
                reaped = True
                break
            peak = max(peak, _tree_rss(root, seen))
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s}s: {' '.join(argv)}")
            time.sleep(SAMPLE_INTERVAL_S)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
        tail = stderr[-4000:].decode(errors="replace")
        errors = sum(1 for line in stderr.splitlines() if b"ERROR:" in line)
        leftovers = [p for p in seen.values() if _alive(p)]
        _kill_tree(proc.pid, seen)
        if leftovers:
            tail += f"\n[bench] killed {len(leftovers)} process(es) left running by the command"
        return Sample(
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            user_s=usage.ru_utime,
            sys_s=usage.ru_stime,
            peak_rss_bytes=peak,
            returncode=proc.returncode,
            stderr_tail=tail,
            error_lines=errors,
        )
    finally:
        if proc is not None and not reaped:
            _kill_tree(proc.pid, seen)
            proc.wait()
        out.close()
        err.close()


def _alive(p: psutil.Process) -> bool:
    """Tell whether p still runs (zombies do not count)."""
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
