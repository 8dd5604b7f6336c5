"""Run a user's shell command to its end or its deadline, and leave nothing of it running.

The command (a drill's ``[verify] command``) runs in a process group of its own, so a
timeout, an interrupt or the end of the shell kills everything it started, background
jobs too. Only the end of its output is kept: that is where failures show.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import cast

from pgvault.pipeline.stream import CHUNK

TERM_GRACE = 5.0
"""Seconds a timed-out command has between SIGTERM and SIGKILL."""


@dataclass
class CommandResult:
    """How a command ended, and the end of its output."""

    returncode: int
    seconds: float
    output: str
    timed_out: bool


def run_command(command: str, env: dict[str, str], timeout: float, *,
                tail: int) -> CommandResult:
    """Run ``command`` with ``sh -c`` in its own process group, stdin closed, stdout and
    stderr together; kill the group on timeout or interrupt. ``tail``: output bytes kept."""
    started = time.monotonic()
    proc = subprocess.Popen(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    buffer = bytearray()

    stdout = cast(io.BufferedReader, proc.stdout)

    def collect() -> None:
        while data := stdout.read1(CHUNK):
            buffer.extend(data)
            if len(buffer) > 2 * tail:
                del buffer[:-tail]

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    timed_out = False
    try:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(TERM_GRACE)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
    except BaseException:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        # Whatever the shell left running in the background goes too: nothing outlives it.
        _kill_group(proc.pid, signal.SIGKILL)
        reader.join(10)
        proc.stdout.close()
    output = bytes(buffer[-tail:]).decode("utf-8", "replace")
    return CommandResult(proc.returncode, time.monotonic() - started, output, timed_out)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
