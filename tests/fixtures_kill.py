"""Killing a real pgvault at a chosen moment, and looking at what it left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from cli_runner import PGVAULT, clean_env


def start(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    full = clean_env()
    full.update(env)
    return subprocess.Popen([PGVAULT, *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen[str], ready: Callable[[psutil.Process], bool],
              timeout: float = 120) -> list[psutil.Process]:
    """SIGKILL ``proc`` (pgvault alone, as `kill -9 PID` does) once ``ready`` says so;
    the descendants it had at that moment."""
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"pgvault ended before the moment to kill it: "
                                 f"{proc.communicate()}")
        if ready(me):
            break
        assert time.monotonic() < deadline, "the moment to kill pgvault never came"
        time.sleep(0.005)
    family = me.children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return family


def has_child(name: str) -> Callable[[psutil.Process], bool]:
    def ready(me: psutil.Process) -> bool:
        try:
            return any(child.name() == name for child in me.children(recursive=True))
        except psutil.Error:
            return False
    return ready


def wait_gone(processes: list[psutil.Process], timeout: float = 60) -> None:
    """Until the orphans of a killed pgvault have ended by themselves."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"still running after pgvault was killed: {alive}"


def files_holding(root: Path, needle: bytes) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


def every_file(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if not path.is_dir()]
