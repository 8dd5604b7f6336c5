"""Run one command and measure wall time, CPU of its process tree and peak tree RSS."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    # Most processes of each name alive at one sample, e.g. {"pg_restore": 3} for -j 2.
    procs: dict[str, int] = field(default_factory=dict)
    # Like peak_rss_bytes, but each page counts once however many processes share it
    # (libraries, and a forked child's copy-on-write pages before it execs).
    peak_pss_bytes: int = 0


class CommandFailed(RuntimeError):
    """A measured command exited non-zero."""

    def __init__(self, sample: Sample, argv: Sequence[str]) -> None:
        """Keep the sample so the caller can report the failure."""
        super().__init__(f"exit {sample.returncode}: {' '.join(argv)}\n{sample.stderr_tail}")
        self.sample = sample


class _TreeSampler(threading.Thread):
    """Samples the RSS sum and the process names of a live process tree every interval."""

    def __init__(self, root: psutil.Process, interval_s: float) -> None:
        """Watch root and its descendants until stop() is called."""
        super().__init__(daemon=True)
        self.root = root
        self.interval_s = interval_s
        self.seen: dict[int, psutil.Process] = {}
        self.peak = 0
        self.peak_pss = 0
        self.procs: Counter[str] = Counter()
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until stopped; the first sample is taken at once."""
        while True:
            self._sample()
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop_event.set()
        self.join()

    def _sample(self) -> None:
        """Sum the RSS of root and all its live descendants; count them by name."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = pss = 0
        names: Counter[str] = Counter()
        for p in procs:
            self.seen.setdefault(p.pid, p)
            with contextlib.suppress(psutil.Error):
                mem = p.memory_full_info()  # /proc/PID/smaps_rollup: ~0.2 ms
                total += mem.rss
                # smaps_rollup and statm are read at different instants, and smaps_rollup can
                # over-report (psutil says so); a process's PSS never exceeds its RSS.
                pss += min(getattr(mem, "pss", mem.rss), mem.rss)
                names[p.name()] += 1
        self.peak = max(self.peak, total)
        self.peak_pss = max(self.peak_pss, pss)
        for name, n in names.items():
            self.procs[name] = max(self.procs[name], n)


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
    sample: bool = True,
) -> Sample:
    """Run argv to completion and measure it; stdout goes to a file or /dev/null.

    CPU time is the rusage of the reaped child, which on Linux includes every descendant it
    waited for. Peak RSS is the max over ~20 ms samples of the summed RSS of the live tree,
    taken by a thread while this one blocks in wait4, so wall time is exact. With
    sample=False (start-up timings) nothing competes for the CPU and peak RSS is ru_maxrss:
    the largest single process of the tree.
    """
    out = open(stdout or os.devnull, "wb")  # noqa: SIM115 - closed in finally
    err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally
    proc: subprocess.Popen[bytes] | None = None
    sampler: _TreeSampler | None = None
    reaped = False
    timer: threading.Timer | None = None
    timed_out = threading.Event()
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            env=dict(env) if env is not None else None, start_new_session=True,
        )
        if sample:
            sampler = _TreeSampler(psutil.Process(proc.pid), SAMPLE_INTERVAL_S)
            sampler.start()

        def on_timeout(pid: int = proc.pid) -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, on_timeout)
        timer.daemon = True
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        reaped = True
        timer.cancel()
        if sampler is not None:
            sampler.stop()
        if timed_out.is_set():
            raise TimeoutError(f"timed out after {timeout_s}s: {' '.join(argv)}")
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
        tail = stderr[-4000:].decode(errors="replace")
        errors = sum(1 for line in stderr.splitlines() if b"ERROR:" in line)
        seen = sampler.seen if sampler is not None else {}
        leftovers = [p for p in seen.values() if _alive(p)]
        _kill_tree(proc.pid, seen)
        if leftovers:
            tail += f"\n[bench] killed {len(leftovers)} process(es) left running by the command"
        return Sample(
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            user_s=usage.ru_utime,
            sys_s=usage.ru_stime,
            peak_rss_bytes=sampler.peak if sampler is not None else usage.ru_maxrss * 1024,
            returncode=proc.returncode,
            stderr_tail=tail,
            error_lines=errors,
            procs=dict(sampler.procs) if sampler is not None else {},
            peak_pss_bytes=sampler.peak_pss if sampler is not None else 0,
        )
    finally:
        if timer is not None:
            timer.cancel()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if proc is not None and not reaped:
            _kill_tree(proc.pid, sampler.seen if sampler is not None else {})
            proc.wait()
        out.close()
        err.close()


def _alive(p: psutil.Process) -> bool:
    """Tell whether p still runs (zombies do not count)."""
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
