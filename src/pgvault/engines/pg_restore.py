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
import logging
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pgvault.engines.spool import Spool
from pgvault.errors import IntegrityError, RestoreFailed
from pgvault.pg.archive import (
    MAX_TOC_BYTES,
    Incomplete,
    Selection,
    Toc,
    TocEntry,
    after_loads,
    read_toc,
)
from pgvault.pg.binaries import tool
from pgvault.pg.process import StderrTail, describe_exit, feed
from pgvault.pipeline.pump import Prefetch
from pgvault.pipeline.stream import CHUNK, Readable, Reader

log = logging.getLogger(__name__)


@dataclass
class PgRestore:
    """A running pg_restore and the tail of its stderr."""

    proc: subprocess.Popen[bytes]
    tail: StderrTail

    @classmethod
    def start(cls, argv: list[Any], env: dict[str, str],
              stdin: int = subprocess.DEVNULL, pass_fds: Sequence[int] = ()) -> PgRestore:
        proc = subprocess.Popen([str(a) for a in argv], stdin=stdin,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                pass_fds=pass_fds)
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


def list_entries(stream: Readable, major: int) -> int:
    """Feed a custom-format archive to PostgreSQL ``major``'s `pg_restore --list`; its
    entry count. Reads the stream to its end (so its digest is checked); IntegrityError
    if pg_restore cannot read the archive."""
    argv = [str(tool("pg_restore", major)), "--list"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    tail = StderrTail(proc.stderr)
    listing: list[bytes] = []
    stdout: IO[bytes] = proc.stdout
    lister = threading.Thread(target=lambda: listing.extend(stdout), daemon=True)
    lister.start()
    feed(proc, stream)  # pg_restore stops after the table of contents; feed reads on
    returncode = proc.wait()
    lister.join(10)
    tail.join()
    if returncode != 0:
        raise IntegrityError(describe_exit("pg_restore --list", returncode, tail))
    return sum(1 for line in listing if line.strip() and not line.startswith(b";"))


class Selected(Reader):
    """An archive stream whose table of contents has been read ahead (and is replayed), so
    that a partial restore can choose its entries before pg_restore starts reading."""

    def __init__(self, source: Readable, selection: Selection | None = None) -> None:
        super().__init__()
        self._source = source
        self.selection = selection
        head, retry_at = bytearray(), 0
        while True:
            chunk = source.read(CHUNK)
            head += chunk
            if len(head) >= retry_at or not chunk:  # parse again once the head has doubled
                retry_at = 2 * len(head)
                try:
                    self.toc = read_toc(head)
                    break
                except Incomplete:
                    if not chunk or len(head) > MAX_TOC_BYTES:
                        raise RestoreFailed("the archive ends inside its table of contents, or "
                                            "it is too large to select from") from None
                except ValueError as exc:
                    raise RestoreFailed(f"--schema/--table need the archive's table of "
                                        f"contents, which cannot be read: {exc}") from None
        self._head = memoryview(bytes(head))

    def read_chunk(self, size: int) -> bytes:
        if self._head:
            data, self._head = bytes(self._head[:size]), self._head[size:]
            return data
        return self._source.read(size)

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
        super().close()


class SelectingSpool(Spool):
    """A spool whose archive is restored through ``selection`` (set once its TOC is read)."""

    selection: Selection | None = None


def selection_of(source: object) -> Selection | None:
    """The selection an archive source is to be restored through, if any."""
    selection = getattr(source, "selection", None)
    return selection if isinstance(selection, Selection) else None


def spool_toc(spool: Spool) -> Toc:
    """The spooled archive's table of contents; read from the whole file if the spool could
    not read it as it arrived (an archive it does not search: it is still a valid one)."""
    if spool.wait_toc() and spool.finder.toc is not None:
        return spool.finder.toc
    with open(spool.wait(), "rb") as archive:
        head = bytearray()
        while chunk := archive.read(max(CHUNK, len(head))):
            head += chunk
            with contextlib.suppress(Incomplete):
                try:
                    return read_toc(head)
                except ValueError as exc:
                    raise RestoreFailed(f"--schema/--table need the archive's table of "
                                        f"contents, which cannot be read: {exc}") from None
    raise RestoreFailed("the archive ends inside its table of contents")


def _list_file(toc: Toc, keep: Collection[int]) -> int:
    """An unnamed file listing ``keep`` in the archive's order, for ``-L /dev/fd/N``.

    The archive's order, since pg_restore takes the list's, and one reading a pipe cannot
    go back for an entry listed after the one it has passed.
    """
    with tempfile.TemporaryFile() as handle:  # unlinked at once: nothing left by a SIGKILL
        handle.write("".join(f"{e.dump_id};\n" for e in toc.entries
                             if e.dump_id in keep).encode("ascii"))
        handle.flush()
        handle.seek(0)
        return os.dup(handle.fileno())


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


class _Background:
    """A load running on a thread of its own: its error is raised again in the caller."""

    _thread: threading.Thread
    _error: BaseException | None = None

    def check(self) -> None:
        """Raise the load's error if it failed."""
        if self._error is not None:
            raise self._error

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait(self, seconds: float) -> None:
        self._thread.join(seconds)

    def join(self) -> None:
        while self._thread.is_alive():
            self._thread.join(0.2)  # a timed join keeps Ctrl-C deliverable
        self.check()


class _Load(_Background):
    """A data-only archive streamed into a pg_restore of its own, on a thread."""

    def __init__(self, source: Callable[[], Readable], argv: list[Any],
                 env: dict[str, str], selection: Selection | None = None) -> None:
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._restore: PgRestore | None = None
        self._thread = threading.Thread(target=self._run, args=(source, argv, env, selection),
                                        name="pgvault-load", daemon=True)
        self._thread.start()

    def _run(self, source: Callable[[], Readable], argv: list[Any],
             env: dict[str, str], selection: Selection | None) -> None:
        try:
            restore_streamed(_Stopped(source(), self._stop), argv, env, started=self._started,
                             selection=selection)
        except BaseException as exc:  # raised again by check() or join(), in the caller
            self._error = exc

    def _started(self, restore: PgRestore) -> None:
        self._restore = restore
        if self._stop.is_set():
            restore.proc.kill()

    def check(self) -> None:
        if not self._stop.is_set():  # a load stopped on purpose failed on purpose
            super().check()

    def stop(self) -> None:
        """Kill the load's pg_restore, make its next read fail, and wait for it."""
        self._stop.set()
        if self._restore is not None:
            with contextlib.suppress(OSError):
                self._restore.proc.kill()
        while self._thread.is_alive():
            self._thread.join(0.2)


def restore_streamed(source: Readable, argv: list[Any], env: dict[str, str],
                     started: Callable[[PgRestore], None] | None = None,
                     selection: Selection | None = None) -> None:
    """One pg_restore reading the archive from a pipe: no temporary copy.

    With a ``selection`` (or a ``Selected`` source), only its entries of this archive run:
    none at all means this archive (a split backup's part) is not read past its TOC.
    """
    selection = selection or selection_of(source)
    listed: int | None = None
    if selection is not None:
        if not isinstance(source, Selected):
            source = Selected(source)
        keep = selection.pick(source.toc)
        if not any(i in keep for i in _restorable(source.toc)):
            source.close()
            return
        listed = _list_file(source.toc, keep)
        argv = [*argv, "-L", f"/dev/fd/{listed}"]
    try:
        restore = PgRestore.start(argv, env, stdin=subprocess.PIPE,
                                  pass_fds=() if listed is None else (listed,))
    finally:
        if listed is not None:
            os.close(listed)
    if started is not None:
        started(restore)
    with contextlib.closing(Prefetch(source)) as ahead:
        feed(restore.proc, ahead)
    restore.finish()


def _restorable(toc: Toc) -> list[int]:
    return [e.dump_id for e in toc.entries if e.desc not in ("ENCODING", "STDSTRINGS",
                                                           "SEARCHPATH")]


def restore_spooled(source: Readable | Spool, argv: list[Any], env: dict[str, str],
                    jobs: int) -> None:
    """Restore a spooled archive with ``jobs`` at once, the schema while it still spools."""
    spool = source if isinstance(source, Spool) else Spool(source)
    schema: PgRestore | None = None
    try:
        selection = selection_of(spool)
        if selection is not None:  # chosen from its table of contents: that one is whole
            argv = [*argv, "-L", _spool_list(spool, "selected", set(
                selection.pick(spool_toc(spool))))]
        if spool.wait_toc():
            schema = PgRestore.start([*argv, "--section=pre-data", spool.path], env)
        path = spool.wait()
        if schema is None:  # an archive this cannot read: pg_restore scans for its data
            PgRestore.start([*argv, f"--jobs={jobs}", path], env).finish()
            return
        schema.finish()
        big = [] if selection is not None else big_tables(spool, jobs)
        if not big:
            PgRestore.start([*argv, "--section=data", "--section=post-data", f"--jobs={jobs}",
                             path], env).finish()
            return
        load = _SplitLoad(path, big, argv, env, jobs, spool_toc(spool))
        _load_beside(path, [load], _passes(spool, frozenset(e.dump_id for e in big)),
                     argv, env, jobs, busy=jobs)
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


def _spool_list(spool: Spool, name: str, keep: Collection[int]) -> str:
    """``-L`` file in the spool's folder: ``keep``, in the archive's order."""
    path = os.path.join(spool.folder, f"{name}.list")
    with open(path, "w", encoding="ascii") as out:
        out.writelines(f"{e.dump_id};\n" for e in spool_toc(spool).entries
                       if e.dump_id in keep)
    return path


def _passes(spool: Spool, loaded: frozenset[int] = frozenset()) -> _Passes:
    """The passes, from the main archive's table of contents (pg/archive.py's after_loads).

    Indexes and constraints of the other tables are built while the big tables load, and
    theirs as soon as they are loaded, as one pg_restore --jobs would schedule them.
    Without a table of contents this can read, all of post-data waits for the loads.
    ``loaded``: TABLE DATA entries of the main archive loaded beside it (_SplitLoad).
    """
    toc = spool.finder.toc
    selection = selection_of(spool)
    if toc is None and selection is None:
        return _Passes(["--section=data"], None, ["--section=post-data"])
    toc = spool_toc(spool)
    after = after_loads(toc, loaded)
    chosen = set(selection.pick(toc) if selection is not None else
                 (e.dump_id for e in toc.entries)) - loaded

    def use_list(name: str, keep: Callable[[int], bool]) -> list[str]:
        """``-L FILE``: only the entries ``keep`` picks (of the sections also given), in the
        archive's order, since pg_restore takes the list's order and an entry without a
        section of its own (a comment, a grant) belongs to that of the one before it."""
        return ["-L", _spool_list(spool, name, {i for i in chosen if keep(i)})]

    ready_ids = after.ready & chosen
    last_ids = after.last & chosen
    beside = use_list("beside", lambda i: i not in after.waiting)
    ready = use_list("ready", ready_ids.__contains__) if ready_ids else None
    last = use_list("last", last_ids.__contains__) if last_ids else None
    # Rows of the main archive that wait (a loaded table's sequence value) come with them.
    data = ["--section=data"] if loaded else []
    return _Passes(["--section=data", "--section=post-data", *beside],
                   None if ready is None else [*data, "--section=post-data", *ready],
                   None if last is None else [*data, "--section=post-data", *last])


def restore_split(main: Readable | Spool, parts: Sequence[Callable[[], Readable]],
                  again: Callable[[], Readable], argv: list[Any], env: dict[str, str],
                  jobs: int) -> None:
    """Restore a main archive and the data-only archives taken apart from it.

    The tables come from the main archive's pre-data; then its data and every part load at
    once, and post-data follows in the passes of ``_passes``. A spooled main archive is read
    once; a streamed one (one job, no room to spool) twice: ``again`` reopens it.
    """
    selection = selection_of(main)
    if not isinstance(main, Spool):
        restore_streamed(main, [*argv, "--section=pre-data", "--section=data"], env)
        for part in parts:
            restore_streamed(part(), argv, env, selection=selection)
        restore_streamed(again(), [*argv, "--section=post-data"], env, selection=selection)
        return
    loads: list[_Load] = []
    try:
        path = main.path if main.wait_toc() else main.wait()
        pre = (["-L", _spool_list(main, "pre", set(selection.pick(spool_toc(main))))]
               if selection is not None else [])
        PgRestore.start([*argv, "--section=pre-data", *pre, path], env).finish()
        loads = [_Load(part, argv, env, selection) for part in parts]
        passes = _passes(main)
        _load_beside(main.wait(), loads, passes, argv, env, jobs, busy=len(parts))
    finally:
        for load in loads:
            load.stop()
        main.close()


def _load_beside(path: str, loads: Sequence[_Load | _SplitLoad], passes: _Passes,
                 argv: list[Any], env: dict[str, str], jobs: int, busy: int) -> None:
    """The main archive's data and post-data in ``passes`` while ``loads`` (keeping ``busy``
    sessions at work) fill the tables apart; the first failure stops everything."""
    running: list[PgRestore] = []
    started = time.monotonic()
    try:
        running.append(PgRestore.start(
            [*argv, *passes.beside, f"--jobs={max(1, jobs - busy)}", path], env))
        ready = passes.ready
        while running or ready is not None:
            for load in loads:
                load.check()
            for restore in [r for r in running if r.proc.poll() is not None]:
                running.remove(restore)
                restore.finish()
                log.debug("restore: a pass ended at %.2f s", time.monotonic() - started)
            if ready is not None and not any(load.alive() for load in loads):
                for load in loads:
                    load.join()
                log.debug("restore: loads done at %.2f s; their indexes and keys now",
                          time.monotonic() - started)
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
        log.debug("restore: all passes done at %.2f s", time.monotonic() - started)
    finally:
        for restore in running:
            restore.kill()
        for load in loads:
            load.stop()


SPLIT_MIN_BYTES = 32 << 20  # a table's data smaller than this loads in one COPY
PIECE = 1 << 20  # rows handed to one COPY session at a time
END_OF_ROWS = b"\\.\n"  # COPY text's end marker; a row never starts with it (\ is doubled)
F_SETPIPE_SZ = 1031  # Linux fcntl: a larger pipe means fewer, larger reads


def splits(table_bytes: int) -> bool:
    """Whether a table with this much COPY data is worth loading in several streams."""
    return table_bytes >= SPLIT_MIN_BYTES


def big_tables(spool: Spool, streams: int) -> list[TocEntry]:
    """The TABLE DATA entries of a whole spool worth loading in ``streams`` COPY sessions:
    at least SPLIT_MIN_BYTES of COPY data and a 1/(2 x streams) share of the archive's."""
    toc = spool.finder.toc
    if streams < 2 or toc is None or toc.compressed:
        return []
    offsets = spool.finder.offsets
    blocks = [e for e in toc.entries if e.has_data]
    end = os.stat(spool.path).st_size
    sizes: dict[int, int] = {}
    for i, entry in enumerate(blocks):  # data blocks follow the TOC's order
        start = offsets.get(entry.dump_id)
        stop = offsets.get(blocks[i + 1].dump_id) if i + 1 < len(blocks) else end
        if start is not None and stop is not None and entry.desc == "TABLE DATA":
            sizes[entry.dump_id] = stop - start
    total = end - toc.end
    return [e for e in blocks if sizes.get(e.dump_id, 0) >= max(SPLIT_MIN_BYTES,
                                                               total // (2 * streams))]


class _SplitLoad(_Background):
    """The rows of big tables, one table after another, each cut at row ends into PIECE-sized
    runs that ``streams`` concurrent COPY sessions (psql children) take as they are free.

    pg_restore extracts the table's COPY text from the spool (``-f -``: it undoes the
    archive's per-row framing in C); this thread only looks for line ends. Each session is
    one COPY, so one transaction; the tables were created by pre-data (committed), and their
    indexes and constraints wait for the load (_passes). The first session to fail stops
    them all, and the restore, whose scratch database is then dropped (ops/restore.py).
    """

    def __init__(self, path: str, entries: Sequence[TocEntry], argv: list[Any],
                 env: dict[str, str], streams: int, toc: Toc) -> None:
        self._path, self._toc, self._streams = path, toc, streams
        self._pg_restore = str(argv[0])
        dbname = next(str(a) for a in argv if str(a).startswith("--dbname="))
        self._psql = [str(Path(self._pg_restore).with_name("psql")), "-X", "-q", "-v",
                      "ON_ERROR_STOP=1", "--no-password", dbname]
        self._env = {**env, "PGAPPNAME": "pgvault-load"}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(list(entries),),
                                        name="pgvault-split", daemon=True)
        self._thread.start()

    def _run(self, entries: list[TocEntry]) -> None:
        try:
            for entry in entries:
                if self._stop.is_set():
                    return
                self._load(entry)
        except BaseException as exc:  # raised again by check() or join(), in the caller
            self._error = exc
            self._kill()

    def _spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._stop.is_set():
                raise RestoreFailed("restore stopped")
            proc = subprocess.Popen(argv, env=self._env, stderr=subprocess.PIPE, **kwargs)
            self._procs.append(proc)
            return proc

    def _load(self, entry: TocEntry) -> None:
        name = f"{entry.namespace}.{entry.tag}"
        log.info("restore: loading %s in %d streams", name, self._streams)
        started = time.monotonic()
        listed = _list_file(self._toc, {entry.dump_id})
        try:
            dump = self._spawn([self._pg_restore, "-f", "-", "-L", f"/dev/fd/{listed}",
                                self._path], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, pass_fds=(listed,))
        finally:
            os.close(listed)
        assert dump.stdout is not None and dump.stderr is not None
        dump_tail = StderrTail(dump.stderr)
        fd = dump.stdout.fileno()
        with contextlib.suppress(OSError):
            fcntl_setpipe(fd)
        preamble, rows = _copy_head(fd)
        if preamble is None:
            dump.wait()
            dump_tail.join()
            raise RestoreFailed(f"pg_restore gave no COPY for {name}: "
                                f"{describe_exit('pg_restore', dump.returncode, dump_tail)}")
        pieces: queue.Queue[bytes | None] = queue.Queue(maxsize=2 * self._streams)
        sessions = []
        for _ in range(self._streams):
            proc = self._spawn(self._psql, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            assert proc.stderr is not None
            sessions.append((proc, StderrTail(proc.stderr), threading.Thread(
                target=self._feed, args=(proc, preamble, pieces), daemon=True)))
        for _, _, writer in sessions:
            writer.start()
        try:
            self._dispatch(fd, rows, pieces)
            for _ in sessions:
                self._put(pieces, None)
        except BaseException:
            self._kill()  # no session may take the end of its input for the end of its rows
            raise
        finally:
            for _, _, writer in sessions:
                while writer.is_alive():
                    if self._stop.is_set():
                        self._kill()
                    writer.join(0.2)
            failures = []
            for proc, tail, _ in sessions:
                proc.wait()
                tail.join()
                if proc.returncode != 0:
                    failures.append(describe_exit("psql", proc.returncode, tail))
            dump.wait()
            dump_tail.join()
        if failures:  # the session that failed first says why; the others were stopped
            real = [f for f in failures if "killed by signal" not in f] or failures
            raise RestoreFailed(f"loading {name} in {self._streams} streams: {real[0]}")
        if dump.returncode != 0:
            raise RestoreFailed(describe_exit("pg_restore", dump.returncode, dump_tail))
        log.debug("restore: %s loaded in %.2f s", name, time.monotonic() - started)

    def _dispatch(self, fd: int, rows: bytes, pieces: queue.Queue[bytes | None]) -> None:
        cut_rows(lambda: os.read(fd, PIECE), rows, lambda piece: self._put(pieces, piece))

    def _put(self, pieces: queue.Queue[bytes | None], piece: bytes | None) -> None:
        while True:
            if self._stop.is_set():
                raise RestoreFailed("restore stopped")
            try:
                pieces.put(piece, timeout=0.2)
                return
            except queue.Full:
                continue

    def _feed(self, proc: subprocess.Popen[bytes], preamble: bytes,
              pieces: queue.Queue[bytes | None]) -> None:
        """One COPY session: the settings and COPY line, the pieces it takes, the end."""
        assert proc.stdin is not None
        try:
            with proc.stdin as out:
                out.write(preamble)
                while True:
                    try:
                        piece = pieces.get(timeout=0.2)
                    except queue.Empty:
                        piece = b""
                    if self._stop.is_set():
                        # Killed before its stdin closes: psql would take that end of
                        # input for the end of the rows and commit what it had.
                        self._kill()
                        return
                    if piece is None:
                        break
                    out.write(piece)
                out.write(END_OF_ROWS)
        except OSError:  # psql died: its exit status says why
            self._stop.set()

    def _kill(self) -> None:
        with self._lock:
            self._stop.set()
            for proc in self._procs:
                if proc.poll() is None:
                    with contextlib.suppress(OSError):
                        proc.kill()

    def stop(self) -> None:
        """Kill the load's processes and wait for its thread."""
        self._kill()
        while self._thread.is_alive():
            self._thread.join(0.2)
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.wait()


def cut_rows(read: Callable[[], bytes], rows: bytes, put: Callable[[bytes], None]) -> None:
    """Hand COPY text (``rows``, then what ``read`` returns) to ``put`` in whole lines of
    about PIECE bytes, up to its end marker; RestoreFailed if the text ends before it."""
    carry = bytearray(rows)
    scanned = 0  # the marker is not in carry[:scanned - 3], nor a line end in carry[:bare]
    bare = 0
    while True:
        if carry.startswith(END_OF_ROWS):
            return
        end = carry.find(b"\n" + END_OF_ROWS, max(0, scanned - len(END_OF_ROWS)))
        if end >= 0:
            put(bytes(carry[:end + 1]))
            return
        if len(carry) >= PIECE:
            cut = carry.rfind(b"\n", bare) + 1
            if cut:
                put(bytes(carry[:cut]))
                del carry[:cut]
                bare = 0
            else:  # a row longer than a piece: look only at what comes next
                bare = len(carry)
        scanned = len(carry)
        data = read()
        if not data:
            raise RestoreFailed("pg_restore's COPY text ended without its end marker")
        carry += data


def fcntl_setpipe(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, F_SETPIPE_SZ, PIECE)


def _copy_head(fd: int) -> tuple[bytes | None, bytes]:
    """pg_restore's script up to its COPY line: the session settings and that line (None if
    the script ends first), and the rows already read after it."""
    head = b""
    while (at := head.find(b" FROM stdin;\n")) < 0:
        data = os.read(fd, 1 << 16)
        if not data:
            return None, b""
        head += data
    line_end = at + len(b" FROM stdin;\n")
    lines = head[:line_end].split(b"\n")
    settings = [line for line in lines[:-2]
                if line.startswith((b"SET ", b"SELECT pg_catalog.set_config("))]
    copy = lines[-2]
    if not copy.startswith(b"COPY "):
        return None, b""
    preamble = b"\n".join([*settings, b"SET synchronous_commit = off;", copy]) + b"\n"
    return preamble, head[line_end:]
