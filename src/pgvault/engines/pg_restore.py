"""Running pg_restore: streamed with one job, or spooled for ``--jobs``.

``pg_restore --jobs`` needs a seekable archive, and pgvault's archives arrive as a stream. The
spool gets the data offsets pg_dump could not write into a pipe (pg/archive.py), so workers
seek to their table and pg_restore can schedule the largest tables first. A thread fills
the spool from the moment the restore starts (the target database is created meanwhile), and
the schema (pre-data) is created while the data is still being spooled.

Measured and dropped: loading each table from its own pg_restore as soon as its data was
whole in the spool, then the rest with --jobs. On the bench's shop database that was 4-8%
slower than one pg_restore --jobs after the spool: it ran more loads than CPUs, and indexes
of still-loading tables held --jobs workers waiting on their locks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from pgvault.errors import RestoreFailed
from pgvault.pg.archive import OffsetFinder
from pgvault.pg.process import StderrTail, describe_exit, feed
from pgvault.pipeline.pump import Prefetch
from pgvault.pipeline.stream import CHUNK, Readable


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


def restore_streamed(source: Readable, argv: list[Any], env: dict[str, str]) -> None:
    """One pg_restore reading the archive from a pipe: no temporary copy."""
    restore = PgRestore.start(argv, env, stdin=subprocess.PIPE)
    with contextlib.closing(Prefetch(source)) as ahead:
        feed(restore.proc, ahead)
    restore.finish()


class Spool:
    """The archive copied by a thread into a private temporary file, data offsets patched in.

    It starts reading at once, so a restore can create its database meanwhile. ``wait_toc``
    returns once pg_restore can read the schema from the file, ``wait`` once it is whole.
    """

    def __init__(self, source: Readable) -> None:
        self.folder = tempfile.mkdtemp(prefix="pgvault-restore-")
        self.path = os.path.join(self.folder, "db.dump")
        self.finder = OffsetFinder()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._source = source
        self._toc = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pgvault-spool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with os.fdopen(self._fd, "wb") as spool, \
                    contextlib.closing(Prefetch(self._source)) as ahead:
                while not self._stop.is_set() and (data := ahead.read(CHUNK)):
                    spool.write(data)
                    self.finder.feed(data)
                    if not self._toc.is_set() and self.finder.toc is not None:
                        spool.flush()
                        self._toc.set()
                spool.flush()
                if not self._stop.is_set():
                    self.finder.patch(spool.fileno())
        except BaseException as exc:  # raised again by wait(), in the caller's thread
            self._error = exc
        finally:
            self._toc.set()

    def wait_toc(self) -> bool:
        """Whether the file now holds a table of contents this module could read."""
        self._toc.wait()
        if self._error is not None:
            raise self._error
        return self.finder.toc is not None

    def wait(self) -> str:
        """The path of the whole, patched archive; the source's error if reading failed."""
        while self._thread.is_alive():
            self._thread.join(0.2)  # a timed join keeps Ctrl-C deliverable
        if self._error is not None:
            raise self._error
        return self.path

    def close(self) -> None:
        """Stop reading (if still at it) and remove the file."""
        self._stop.set()
        while self._thread.is_alive():
            self._thread.join(0.2)
        shutil.rmtree(self.folder, ignore_errors=True)


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
