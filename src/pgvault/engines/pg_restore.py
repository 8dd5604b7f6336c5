"""Running pg_restore: streamed with one job, or spooled and parallel without waiting for it.

``pg_restore --jobs`` needs a seekable archive, and pgvault's archives arrive as a stream.
The spooled path hides most of the spooling: the schema (pre-data) is created as soon as the
table of contents is on disk, and each table whose data block is complete in the spool starts
loading in its own pg_restore while the rest is still being decompressed. The remaining
tables, indexes and constraints then go to one ``pg_restore --jobs``; an index of a table
still loading waits for that COPY's lock, as pg_restore's own scheduler would have it wait.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

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

    def running(self) -> bool:
        return self.proc.poll() is None

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


def restore_spooled(source: Readable, argv: list[Any], env: dict[str, str], jobs: int,
                    selection: list[str]) -> None:
    """Spool the archive privately and restore it with ``jobs`` at once; remove the spool.

    ``argv`` is pg_restore with its connection and options; ``selection`` the options that
    choose what to restore (--schema, --table), which listing the archive needs too.
    """
    folder = tempfile.mkdtemp(prefix="pgvault-restore-")
    path = os.path.join(folder, "db.dump")
    plan: _Plan | None = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        finder = OffsetFinder()
        with os.fdopen(fd, "wb") as spool, contextlib.closing(Prefetch(source)) as ahead:
            while data := ahead.read(CHUNK):
                spool.write(data)
                finder.feed(data)
                if finder.toc is None:
                    continue
                if plan is None:
                    spool.flush()
                    plan = _Plan(argv, env, jobs, selection, folder, path, finder)
                plan.start_complete_tables(spool)
            spool.flush()
            finder.patch(spool.fileno())
        if plan is None:  # an archive this cannot read: pg_restore scans for its data
            PgRestore.start([*argv, f"--jobs={jobs}", path], env).finish()
        else:
            plan.finish()
    finally:
        if plan is not None:
            plan.kill()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class _Plan:
    """The pg_restore processes of one spooled restore, started as the spool allows."""

    argv: list[Any]
    env: dict[str, str]
    jobs: int
    selection: list[str]
    folder: str
    path: str
    finder: OffsetFinder
    schema: PgRestore = field(init=False)
    listing: list[str] | None = field(init=False)  # None: pg_restore --list failed
    early: dict[int, PgRestore] = field(default_factory=dict)
    final: PgRestore | None = None

    def __post_init__(self) -> None:
        self.schema = PgRestore.start([*self.argv, "--section=pre-data", self.path], self.env)
        listed = subprocess.run([str(self.argv[0]), "--list", *self.selection, self.path],
                                capture_output=True, env=self.env, check=False)
        self.listing = listed.stdout.decode().splitlines() if listed.returncode == 0 else None
        assert self.finder.toc is not None
        tables = {e.dump_id for e in self.finder.toc.entries if e.desc == "TABLE DATA"}
        self._loadable = tables & {_dump_id(line) for line in self.listing or []}

    def start_complete_tables(self, spool: IO[bytes]) -> None:
        """Start loading each selected table whose data is whole in the spool, ``jobs`` at most."""
        if self.schema.running():
            return
        if self.schema.proc.returncode != 0:
            self.schema.finish()  # raises, naming the cause
        for dump_id in self.finder.complete():
            if sum(p.running() for p in self.early.values()) >= self.jobs:
                return
            if dump_id not in self._loadable or dump_id in self.early:
                continue
            spool.flush()
            self.finder.patch(spool.fileno(), [dump_id])
            self.early[dump_id] = PgRestore.start(
                [*self.argv, "--section=data", f"--use-list={self._list_file([f'{dump_id};'])}",
                 self.path], self.env)

    def finish(self) -> None:
        """Restore everything not started yet with --jobs, then wait for every process."""
        self.schema.finish()
        argv = [*self.argv, "--section=data", "--section=post-data", f"--jobs={self.jobs}"]
        if self.listing is not None:
            rest = [line for line in self.listing if _dump_id(line) not in self.early]
            argv.append(f"--use-list={self._list_file(rest)}")
        self.final = PgRestore.start([*argv, self.path], self.env)
        for restore in [*self.early.values(), self.final]:
            restore.finish()

    def kill(self) -> None:
        for restore in [self.schema, *self.early.values(), *filter(None, [self.final])]:
            restore.kill()

    def _list_file(self, lines: list[str]) -> str:
        fd, path = tempfile.mkstemp(suffix=".list", dir=self.folder)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path


def _dump_id(line: str) -> int | None:
    """The dump id of a ``pg_restore --list`` line; None for comments and blank lines."""
    head = line.split(";", 1)[0].strip()
    return int(head) if head.isdigit() else None
