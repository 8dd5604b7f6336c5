"""Child processes (pg_dump, pg_restore, ...) whose exit status is always checked."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from pgvault.bytestream import CHUNK, Readable, Reader
from pgvault.errors import PgvaultError

PIPE_SIZE = 1 << 20  # fewer, larger reads from pg_dump's stdout
F_SETPIPE_SZ = 1031
# pg_dump writes 4 KiB at a time (stdio's buffer on a pipe). Read as it comes, a 200 MB dump
# took ~34,800 reads, each a wake-up and a trip through the pipeline; pausing after a short
# read lets the pipe fill: ~2,200 reads, and 6% less CPU in pgvault's process (1.99 vs 2.12
# s, medians of 6). The pipe holds 1 MiB, so pg_dump never waits on the pause below 500 MB/s.
SHORT_READ = 256 << 10
COALESCE_PAUSE = 0.002


# What pg_restore --jobs's leader says after a worker failed; the worker said why, earlier.
CONSEQUENCES = ("a worker process died unexpectedly",)


class StderrTail:
    """Collects a child's stderr lines in the background, keeping the last few."""

    def __init__(self, stream: IO[bytes], keep: int = 50) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip())
        stream.close()

    def join(self) -> None:
        self._thread.join(timeout=10)

    def last_error(self) -> str:
        """The most telling line: the last one mentioning an error (not merely the news that
        a parallel worker died of one), else the last one."""
        errors = [line for line in self.lines
                  if "error" in line.lower() or "fatal" in line.lower()]
        causes = [line for line in errors if not line.endswith(CONSEQUENCES)]
        return (causes or errors or list(self.lines) or ["no message"])[-1]


def describe_exit(tool: str, returncode: int, tail: StderrTail) -> str:
    if returncode < 0:
        return f"{tool} was killed by signal {-returncode}"
    return f"{tool} failed (exit {returncode}): {tail.last_error()}"


class ChildOutput(Reader):
    """A child's stdout as a stream that raises at EOF unless the child exited 0.

    A clean EOF is not success: the exit status decides, so a consumer (a storage
    upload) never completes on the output of a failed or killed pg_dump.
    """

    def __init__(
        self,
        argv: Sequence[str | Path],
        *,
        env: dict[str, str],
        error: type[PgvaultError],
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.tool = Path(argv[0]).name
        self._error = error
        self._on_exit = on_exit
        self.proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.proc.stdout.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        self._stdout = self.proc.stdout
        self.stderr = StderrTail(self.proc.stderr)
        self.finished = False

    def read_chunk(self, size: int) -> bytes:
        if self.finished:
            return b""
        data = self._stdout.read1(size) if hasattr(self._stdout, "read1") else b""
        if data:
            if len(data) < min(size, SHORT_READ):
                time.sleep(COALESCE_PAUSE)
            return data
        self._finish()
        return b""

    def _finish(self) -> None:
        returncode = self.proc.wait()
        self.stderr.join()
        self.finished = True
        self._cleanup()
        if returncode != 0:
            raise self._error(describe_exit(self.tool, returncode, self.stderr))

    def _cleanup(self) -> None:
        if self._on_exit is not None:
            callback, self._on_exit = self._on_exit, None
            callback()

    def close(self) -> None:
        """Stop the child if it is still running (on failure or interrupt)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stdout.close()
        self._cleanup()
        super().close()


def run(
    argv: Sequence[str | Path],
    *,
    env: dict[str, str],
    error: type[PgvaultError],
    stdin: IO[bytes] | None = None,
) -> str:
    """Run a tool to completion; its stdout on success, ``error`` with its stderr otherwise."""
    proc = subprocess.run(
        [str(a) for a in argv],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"]
        errors = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()]
        tool = Path(argv[0]).name
        if proc.returncode < 0:
            raise error(f"{tool} was killed by signal {-proc.returncode}")
        raise error(f"{tool} failed (exit {proc.returncode}): {(errors or lines)[-1]}")
    return proc.stdout.decode("utf-8", "replace")


def feed(proc: subprocess.Popen[bytes], source: Readable) -> None:
    """Write all of ``source`` to the child's stdin, then close it; kill the child on error.

    A child may stop reading early (pg_restore --list after the table of contents, or
    after a failure): the rest of ``source`` is still read, because its digest is only
    checked at its end.
    """
    assert proc.stdin is not None
    try:
        broken = False
        while data := source.read(CHUNK):
            if broken:
                continue
            try:
                proc.stdin.write(data)
            except BrokenPipeError:
                broken = True
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
