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
import subprocess
from dataclasses import dataclass
from typing import Any

from pgvault.engines.spool import Spool
from pgvault.errors import RestoreFailed
from pgvault.pg.process import StderrTail, describe_exit, feed
from pgvault.pipeline.pump import Prefetch
from pgvault.pipeline.stream import Readable


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
