"""Running pg_restore: streamed with one job, or spooled for ``--jobs``.

``pg_restore --jobs`` needs a seekable archive, and pgvault's archives arrive as a stream:
the spool (engines/spool.py) makes the seekable copy, with data offsets, so workers seek to
their table and pg_restore can schedule the largest tables first. The target database is
created while it fills, and the schema (pre-data) while the data is still being spooled.

Measured and dropped: loading each table from its own pg_restore as soon as its data was
whole in the spool, then the rest with --jobs. On the bench's shop database that was 4-8%
slower than one pg_restore --jobs after the spool: it ran more loads than CPUs, and indexes
of still-loading tables held --jobs workers waiting on their locks. So was a full schedule
of one pg_restore per load and per index, loads fed from the arriving frames (5-7% slower:
15 processes instead of 3, decompression competing with the loads on 2 CPUs).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pgvault.engines.spool import Spool
from pgvault.errors import RestoreFailed
from pgvault.pg.archive import after_loads
from pgvault.pg.process import StderrTail, describe_exit, feed
from pgvault.pipeline.pump import Prefetch
from pgvault.pipeline.stream import Readable, Reader


@dataclass
class PgRestore:
    """A running pg_restore and the tail of its stderr."""

    proc: subprocess.Popen[bytes]
    tail: StderrTail

    @classmethod
    def start(cls, argv: list[Any], env: dict[str, str],
              stdin: int = subprocess.DEVNULL) -> PgRestore:
        proc = subprocess.Popen([str(a) for a in argv], stdin=stdin,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        assert proc.stderr is not None
        return cls(proc, StderrTail(proc.stderr))

    def finish(self) -> None:
        """Wait; kill it if the wait is interrupted; one clear line if it failed."""
        try:
            returncode = self.proc.wait()
        except BaseException:
            self.kill()
            raise
        self.tail.join()
        if returncode != 0:
            raise RestoreFailed(describe_exit("pg_restore", returncode, self.tail))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class _Stopped(Reader):
    """A stream that ends in an error once ``stop`` is set: its consumer then gives up."""

    def __init__(self, source: Readable, stop: threading.Event) -> None:
        super().__init__()
        self._source = source
        self._stop = stop

    def read_chunk(self, size: int) -> bytes:
        if self._stop.is_set():
            raise RestoreFailed("restore stopped")
        return self._source.read(size)


class _Load:
    """A data-only archive streamed into a pg_restore of its own, on a thread."""

    def __init__(self, source: Callable[[], Readable], argv: list[Any],
                 env: dict[str, str]) -> None:
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._restore: PgRestore | None = None
        self._thread = threading.Thread(target=self._run, args=(source, argv, env),
                                        name="pgvault-load", daemon=True)
        self._thread.start()

    def _run(self, source: Callable[[], Readable], argv: list[Any],
             env: dict[str, str]) -> None:
        try:
            restore_streamed(_Stopped(source(), self._stop), argv, env, started=self._started)
        except BaseException as exc:  # raised again by check() or join(), in the caller
            self._error = exc

    def _started(self, restore: PgRestore) -> None:
        self._restore = restore
        if self._stop.is_set():
            restore.proc.kill()

    def check(self) -> None:
        """Raise the load's error if it failed."""
        if self._error is not None and not self._stop.is_set():
            raise self._error

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait(self, seconds: float) -> None:
        self._thread.join(seconds)

    def join(self) -> None:
        while self._thread.is_alive():
            self._thread.join(0.2)  # a timed join keeps Ctrl-C deliverable
        self.check()

    def stop(self) -> None:
        """Kill the load's pg_restore, make its next read fail, and wait for it."""
        self._stop.set()
        if self._restore is not None:
            with contextlib.suppress(OSError):
                self._restore.proc.kill()
        while self._thread.is_alive():
            self._thread.join(0.2)


def restore_streamed(source: Readable, argv: list[Any], env: dict[str, str],
                     started: Callable[[PgRestore], None] | None = None) -> None:
    """One pg_restore reading the archive from a pipe: no temporary copy."""
    restore = PgRestore.start(argv, env, stdin=subprocess.PIPE)
    if started is not None:
        started(restore)
    with contextlib.closing(Prefetch(source)) as ahead:
        feed(restore.proc, ahead)
    restore.finish()


def restore_spooled(source: Readable | Spool, argv: list[Any], env: dict[str, str],
                    jobs: int) -> None:
    """Restore a spooled archive with ``jobs`` at once, the schema while it still spools."""
    spool = source if isinstance(source, Spool) else Spool(source)
    schema: PgRestore | None = None
    try:
        if spool.wait_toc():
            schema = PgRestore.start([*argv, "--section=pre-data", spool.path], env)
        path = spool.wait()
        if schema is None:  # an archive this cannot read: pg_restore scans for its data
            PgRestore.start([*argv, f"--jobs={jobs}", path], env).finish()
            return
        schema.finish()
        PgRestore.start([*argv, "--section=data", "--section=post-data", f"--jobs={jobs}",
                         path], env).finish()
    finally:
        if schema is not None:
            schema.kill()
        spool.close()


@dataclass
class _Passes:
    """pg_restore options for the passes after pre-data: ``beside`` the loads, ``ready`` once
    they are done (None: nothing to run then), ``last`` after both (None: nothing left)."""

    beside: list[str]
    ready: list[str] | None
    last: list[str] | None


def _passes(spool: Spool) -> _Passes:
    """The passes, from the main archive's table of contents (pg/archive.py's after_loads).

    Indexes and constraints of the other tables are built while the big tables load, and
    theirs as soon as they are loaded, as one pg_restore --jobs would schedule them.
    Without a table of contents this can read, all of post-data waits for the loads.
    """
    toc = spool.finder.toc
    if toc is None:
        return _Passes(["--section=data"], None, ["--section=post-data"])
    after = after_loads(toc)

    def use_list(name: str, keep: Callable[[int], bool]) -> list[str]:
        """``-L FILE``: only the entries ``keep`` picks (of the sections also given), in the
        archive's order, since pg_restore takes the list's order and an entry without a
        section of its own (a comment, a grant) belongs to that of the one before it."""
        path = os.path.join(spool.folder, f"{name}.list")
        with open(path, "w", encoding="ascii") as out:
            out.writelines(f"{e.dump_id};\n" for e in toc.entries if keep(e.dump_id))
        return ["-L", path]

    beside = use_list("beside", lambda i: i not in after.waiting)
    ready = use_list("ready", after.ready.__contains__) if after.ready else None
    last = use_list("last", after.last.__contains__) if after.last else None
    return _Passes(["--section=data", "--section=post-data", *beside],
                   None if ready is None else ["--section=post-data", *ready],
                   None if last is None else ["--section=post-data", *last])


def restore_split(main: Readable | Spool, parts: Sequence[Callable[[], Readable]],
                  again: Callable[[], Readable], argv: list[Any], env: dict[str, str],
                  jobs: int) -> None:
    """Restore a main archive and the data-only archives taken apart from it.

    The tables come from the main archive's pre-data; then its data and every part load at
    once, and post-data follows in the passes of ``_passes``. A spooled main archive is read
    once; a streamed one (one job, no room to spool) twice: ``again`` reopens it.
    """
    if not isinstance(main, Spool):
        restore_streamed(main, [*argv, "--section=pre-data", "--section=data"], env)
        for part in parts:
            restore_streamed(part(), argv, env)
        restore_streamed(again(), [*argv, "--section=post-data"], env)
        return
    loads: list[_Load] = []
    running: list[PgRestore] = []
    try:
        path = main.path if main.wait_toc() else main.wait()
        PgRestore.start([*argv, "--section=pre-data", path], env).finish()
        loads = [_Load(part, argv, env) for part in parts]
        passes = _passes(main)
        path = main.wait()
        running.append(PgRestore.start(
            [*argv, *passes.beside, f"--jobs={max(1, jobs - len(parts))}", path], env))
        ready = passes.ready
        while running or ready is not None:
            for load in loads:
                load.check()
            for restore in [r for r in running if r.proc.poll() is not None]:
                running.remove(restore)
                restore.finish()
            if ready is not None and not any(load.alive() for load in loads):
                for load in loads:
                    load.join()
                running.append(PgRestore.start(
                    [*argv, *ready, f"--jobs={max(1, jobs - len(running))}", path], env))
                ready = None
            if running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    running[0].proc.wait(0.05)
            else:
                loads[0].wait(0.05)
        for load in loads:
            load.join()
        if passes.last is not None:
            PgRestore.start([*argv, *passes.last, f"--jobs={jobs}", path], env).finish()
    finally:
        for restore in running:
            restore.kill()
        for load in loads:
            load.stop()
        main.close()
