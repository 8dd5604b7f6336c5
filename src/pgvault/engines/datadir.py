"""Incremental base backups: a data directory read under pg_backup_start/pg_backup_stop.

PostgreSQL 15's pg_basebackup has no incremental mode, so an incremental backup reads the
data directory itself (pgvault runs on the database host for physical backups: it is the
archive_command). What it stores is one plain tar (zstd anyone can unpack) with:

- every file that is not a relation's main fork, and every main fork the parent does not
  have, whole, at its own path (configuration, pg_control, pg_xact, FSM and VM forks: small);
- of each main fork the parent has, only the pages whose LSN is not older than the
  parent's start LSN (WAL-G's rule; see below), concatenated under ``pgvault_delta/<path>``;
- ``backup_label`` as pg_backup_stop returned it, and ``pgvault_incremental``, the listing:
  one line per file, ``whole|delta|same|removed SIZE RANGES PATH``; RANGES are the delta's
  ``first+count`` block runs (comma separated, ``-`` for none), in the order their pages
  are stored. The listing is also stored beside the tar, so a restore (and the next
  incremental) reads it without scanning the tar.

Why page LSNs, not file checksums or mtimes. Every WAL-logged change of a page stamps the
page with the LSN of its record, and from the parent's start on, any page whose on-disk
copy could differ from the parent's was changed by such a record (changes during the parent's
own fuzzy copy are after its start too). A page with an older LSN is the parent's page. mtime
cannot say that (a file rewritten within one second, or copied with its time); a per-file
checksum would need the whole file stored whenever one page of it changed: with 5% of a big
table's pages changed at random, every 1 GB segment would change. What does not carry
LSNs is copied whole: every non-relation file, the FSM (not WAL-logged) and the VM forks,
and a relation file the parent lacks (CREATE DATABASE ... FILE_COPY copies files with the
template's old LSNs, but always under a new path). A page with LSN 0 (new, or zeroed) or
beyond the parent's length is always included. Torn reads are what any base backup
reads: the WAL from this backup's start (full-page images) repairs them during replay.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pgvault.bytestream import Readable, Reader
from pgvault.errors import BackupFailed, IntegrityError, RestoreFailed

BLCKSZ = 8192
LISTING = "pgvault_incremental"
DELTA = "pgvault_delta/"
_READ = 1 << 20  # bytes read at once while scanning a file's page LSNs
_MAIN_FORK = re.compile(r"(?:base/[0-9]+|global)/([0-9]+)(?:\.[0-9]+)?")
_RELATION = re.compile(r"([0-9]+)(?:_(fsm|vm|init))?(?:\.[0-9]+)?")
_TEMP_RELATION = re.compile(r"t[0-9]+_[0-9]+(?:_(?:fsm|vm|init))?(?:\.[0-9]+)?")
# What pg_basebackup leaves out (src/backend/backup/basebackup.c): folders kept empty,
# files not sent at all.
_EMPTY_DIRS = frozenset({"pg_wal", "pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify",
                         "pg_serial", "pg_snapshots", "pg_subtrans"})
_SKIP_FILES = frozenset({"postmaster.pid", "postmaster.opts", "pg_internal.init",
                         "backup_label", "tablespace_map", "backup_manifest",
                         "current_logfiles", "recovery.signal", "standby.signal"})
_LAST = "global/pg_control"  # sent last, as pg_basebackup does


@dataclass(frozen=True)
class Entry:
    """One line of an incremental backup's listing."""

    op: str  # whole: in the tar at PATH; delta: pages under pgvault_delta/PATH; same; removed
    path: str
    size: int = 0
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def blocks(self) -> int:
        return sum(count for _, count in self.ranges)

    def run_bytes(self) -> list[int]:
        """Bytes each run holds in the delta (the last page of a file may be partial)."""
        return [max(0, min(count * BLCKSZ, self.size - first * BLCKSZ))
                for first, count in self.ranges]


def format_listing(entries: list[Entry], header: str) -> bytes:
    lines = [f"# {header}"]
    for entry in entries:
        ranges = ",".join(f"{first}+{count}" for first, count in entry.ranges) or "-"
        size = "-" if entry.op == "removed" else str(entry.size)
        lines.append(f"{entry.op} {size} {ranges} {entry.path}")
    return ("\n".join(lines) + "\n").encode()


def parse_listing(data: bytes) -> list[Entry]:
    """The entries of a listing; IntegrityError if it is not one."""
    entries = []
    for number, line in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        try:
            op, size, ranges, path = line.split(" ", 3)
            if op not in ("whole", "delta", "same", "removed") or not path:
                raise ValueError(op)
            runs = tuple((int(a), int(b)) for a, b in
                         (run.split("+") for run in ranges.split(",") if run != "-"))
            entries.append(Entry(op, path, 0 if size == "-" else int(size), runs))
        except ValueError:
            raise IntegrityError(f"incremental listing line {number} is not "
                                 f"'OP SIZE RANGES PATH': {line[:80]!r}") from None
    return entries


def files_after(entries: list[Entry]) -> dict[str, int]:
    """The files (path -> size) a data directory has once this listing is applied."""
    return {e.path: e.size for e in entries if e.op != "removed"}


def manifest_files(backup_manifest: bytes) -> dict[str, int]:
    """The files (path -> size) of a pg_basebackup backup, from its backup_manifest."""
    try:
        files = json.loads(backup_manifest)["Files"]
        return {(f["Path"] if "Path" in f else bytes.fromhex(f["Encoded-Path"])
                 .decode("utf-8", "surrogateescape")): int(f["Size"]) for f in files}
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"cannot read the parent's backup_manifest: {exc}") from None


def _unlogged(names: list[str]) -> set[str]:
    """Relation file nodes in one folder that have an init fork: unlogged, reset on start."""
    return {m.group(1) for name in names if (m := _RELATION.fullmatch(name)) and m.group(2)
            == "init"}


def walk(data_dir: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of what a base backup holds, folders before their content."""
    def visit(folder: str) -> Iterator[tuple[str, os.stat_result]]:
        absolute = os.path.join(data_dir, folder)
        try:
            names = sorted(os.listdir(absolute))
        except FileNotFoundError:
            return  # removed while we walk (a dropped database): its removal is in the WAL
        unlogged = _unlogged(names) if folder.startswith("base/") else set()
        for name in names:
            path = f"{folder}/{name}" if folder else name
            if name in _SKIP_FILES or name.startswith("pgsql_tmp") \
                    or _TEMP_RELATION.fullmatch(name):
                continue
            match = _RELATION.fullmatch(name)
            if match and match.group(1) in unlogged and match.group(2) != "init":
                continue
            try:
                info = os.lstat(os.path.join(absolute, name))
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                yield path, info
                if path == "pg_wal":
                    yield "pg_wal/archive_status", info
                if path not in _EMPTY_DIRS:
                    yield from visit(path)
            elif stat.S_ISREG(info.st_mode):
                yield path, info
            elif stat.S_ISLNK(info.st_mode) and folder == "pg_tblspc":
                raise BackupFailed("the cluster has tablespaces (pg_tblspc); incremental "
                                   "base backups support only the data directory")
    last = None
    for path, info in visit(""):
        if path == _LAST:
            last = (path, info)
            continue
        yield path, info
    if last is not None:
        yield last


def changed_ranges(fd: int, since_lsn: int, parent_blocks: int
                   ) -> tuple[tuple[tuple[int, int], ...], int]:
    """Runs of blocks whose page LSN is >= ``since_lsn`` (or 0, or past the parent's
    ``parent_blocks``), and the bytes the file had as it was read."""
    runs: list[list[int]] = []
    buffer = bytearray(_READ)
    view = memoryview(buffer)
    offset = 0
    while True:
        got = os.preadv(fd, [view], offset)
        if not got:
            break
        first = offset // BLCKSZ
        whole = got // BLCKSZ
        # pd_lsn leads each page: {uint32 xlogid; uint32 xrecoff} in host order.
        words = view[: whole * BLCKSZ].cast("I")
        highs, lows = words[0::BLCKSZ // 4], words[1::BLCKSZ // 4]
        changed = [first + i for i, (high, low) in enumerate(zip(highs, lows, strict=True))
                   if (lsn := high << 32 | low) >= since_lsn or not lsn
                   or first + i >= parent_blocks]
        if got % BLCKSZ:
            changed.append(first + whole)  # a page being extended: sent as far as read
        for block in changed:
            if runs and runs[-1][0] + runs[-1][1] == block:
                runs[-1][1] += 1
            else:
                runs.append([block, 1])
        words.release()
        offset += got
        if got < _READ:
            break
    view.release()
    return tuple((a, b) for a, b in runs), offset


@dataclass
class Scan:
    """What an incremental tar held once it was read to its end."""

    entries: list[Entry] = field(default_factory=list)
    bytes_read: int = 0  # of the data directory, to find what changed
    blocks_changed: int = 0
    blocks_total: int = 0


class IncrementalTar(Reader):
    """The incremental backup's tar, produced as it is read, in constant memory.

    ``finish`` runs when every file is sent (pg_backup_stop) and returns the backup_label
    that goes last, with the listing.
    """

    def __init__(self, data_dir: Path, parent_files: dict[str, int], since_lsn: int,
                 finish: Callable[[], bytes], header: str) -> None:
        super().__init__()
        self.scan = Scan()
        self._chunks = self._produce(data_dir, parent_files, since_lsn, finish, header)
        self._pending = b""

    def read_chunk(self, size: int) -> bytes:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending = chunk
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def _produce(self, data_dir: Path, parent: dict[str, int], since: int,
                 finish: Callable[[], bytes], header: str) -> Iterator[bytes]:
        scan = self.scan
        seen: set[str] = set()
        for path, info in walk(data_dir):
            if stat.S_ISDIR(info.st_mode):
                yield _header(path, tarfile.DIRTYPE, 0, info.st_mtime)
                continue
            seen.add(path)
            full = os.path.join(data_dir, path)
            try:
                fd = os.open(full, os.O_RDONLY)
            except FileNotFoundError:
                continue  # dropped meanwhile: replay removes it too
            try:
                if path in parent and _MAIN_FORK.fullmatch(path):
                    ranges, size = changed_ranges(fd, since, -(-parent[path] // BLCKSZ))
                    scan.bytes_read += size
                    scan.blocks_total += -(-size // BLCKSZ)
                    scan.blocks_changed += sum(c for _, c in ranges)
                    if not ranges and size == parent[path]:
                        scan.entries.append(Entry("same", path, size))
                        continue
                    entry = Entry("delta", path, size, ranges)
                    length = sum(entry.run_bytes())
                    yield _header(DELTA + path, tarfile.REGTYPE, length, info.st_mtime)
                    yield from _pages(fd, entry)
                else:
                    size = os.fstat(fd).st_size
                    scan.bytes_read += size
                    entry = Entry("whole", path, size)
                    yield _header(path, tarfile.REGTYPE, size, info.st_mtime)
                    yield from _content(fd, size)
                scan.entries.append(entry)
            finally:
                os.close(fd)
        label = finish()
        scan.entries.append(Entry("whole", "backup_label", len(label)))
        yield _header("backup_label", tarfile.REGTYPE, len(label), time.time())
        yield label + _padding(len(label))
        scan.entries += [Entry("removed", path) for path in sorted(set(parent) - seen)
                         if path != "backup_label"]
        listing = format_listing(scan.entries, header)
        yield _header(LISTING, tarfile.REGTYPE, len(listing), time.time())
        yield listing + _padding(len(listing))
        yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _header(name: str, kind: bytes, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, size, int(mtime)
    info.mode = 0o700 if kind == tarfile.DIRTYPE else 0o600
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _content(fd: int, size: int) -> Iterator[bytes]:
    """``size`` bytes of the file (zeros for what it lost since its stat, as pg_basebackup)."""
    sent = 0
    while sent < size:
        data = os.pread(fd, min(_READ, size - sent), sent)
        if not data:
            break
        sent += len(data)
        yield data
    if sent < size:
        yield b"\0" * (size - sent)
    yield _padding(size)


def _pages(fd: int, entry: Entry) -> Iterator[bytes]:
    for (first, _), want in zip(entry.ranges, entry.run_bytes(), strict=True):
        got = 0
        while got < want:
            data = os.pread(fd, min(_READ, want - got), first * BLCKSZ + got)
            if not data:
                break
            got += len(data)
            yield data
        if got < want:
            yield b"\0" * (want - got)  # truncated meanwhile: the WAL truncates it too
    yield _padding(sum(entry.run_bytes()))


def apply_delta(member: Readable, target: Path, entry: Entry) -> None:
    """Write a delta member's pages into the file of the chain restored so far."""
    try:
        fd = os.open(target, os.O_WRONLY)
    except FileNotFoundError:
        raise RestoreFailed(f"incremental chain broken: {entry.path} has changed pages but no "
                            "earlier backup of the chain has the file") from None
    try:
        for (first, _), left in zip(entry.ranges, entry.run_bytes(), strict=True):
            offset = first * BLCKSZ
            while left:
                data = member.read(min(_READ, left))
                if not data:
                    break
                os.pwrite(fd, data, offset)
                offset += len(data)
                left -= len(data)
        os.ftruncate(fd, entry.size)
    finally:
        os.close(fd)
