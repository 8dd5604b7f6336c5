"""pg_dump custom-format archives: read the table of contents, record where data blocks start.

pg_dump writing to a pipe cannot seek back to fill in where each table's data begins, so every
``pg_restore --jobs`` worker would scan the archive from the front to find its table. Watching
the stream as it is spooled finds those offsets at memchr speed, and writing them into the
spooled copy's table of contents gives pg_restore the same archive a seekable ``pg_dump -f``
would have written. Layout: PostgreSQL's src/bin/pg_dump/pg_backup_archiver.c (ReadHead,
ReadToc) and pg_backup_custom.c (_ReadExtraToc, _StartData, _EndData).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

MAGIC = b"PGDMP"
ARCH_CUSTOM = 1
BLK_DATA, BLK_BLOBS = 1, 3
OFFSET_NOT_SET, OFFSET_SET = 1, 2
SECTION_NONE, SECTION_PRE_DATA, SECTION_DATA, SECTION_POST_DATA = 1, 2, 3, 4
# Archive versions 1.12 (PostgreSQL 9.6) to 1.16 (17); others are restored without offsets.
OLDEST, NEWEST = (1, 12), (1, 16)
MAX_TOC_BYTES = 256 << 20  # a table of contents larger than this is not worth holding


class Incomplete(Exception):
    """The bytes seen so far end inside the header or table of contents."""


@dataclass(frozen=True)
class TocEntry:
    """One entry of the table of contents, with where its data offset is stored."""

    dump_id: int
    desc: str
    offset_at: int  # file position of the offset's flag byte
    has_data: bool
    namespace: str = ""
    tag: str = ""
    deps: tuple[int, ...] = ()
    section: int = 0  # SECTION_*; entries without one (comments, grants) take the previous'


@dataclass(frozen=True)
class Toc:
    """An archive's header facts and table of contents; ``end`` is where data begins."""

    version: tuple[int, int]
    int_size: int
    off_size: int
    compressed: bool
    entries: list[TocEntry]
    end: int


class _Cursor:
    def __init__(self, buf: bytes | bytearray, int_size: int = 4) -> None:
        self.buf, self.pos, self.int_size = buf, 0, int_size

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise Incomplete
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def byte(self) -> int:
        return self.take(1)[0]

    def int(self) -> int:
        sign = self.byte()
        value = int.from_bytes(self.take(self.int_size), "little")
        return -value if sign else value

    def str(self) -> str | None:
        length = self.int()
        return None if length < 0 else self.take(length).decode("utf-8", "replace")


def read_toc(buf: bytes | bytearray) -> Toc:
    """Parse the header and table of contents at the start of ``buf``.

    Raises Incomplete when more bytes are needed, ValueError when this is no custom-format
    archive of a version this module knows.
    """
    cur = _Cursor(buf)
    if cur.take(5) != MAGIC:
        raise ValueError("not a pg_dump custom-format archive")
    version = (cur.byte(), cur.byte())
    cur.byte()  # revision
    if not OLDEST <= version <= NEWEST:
        raise ValueError(f"archive version {version[0]}.{version[1]} is not one this reads")
    cur.int_size = cur.byte()
    off_size = cur.byte()
    if cur.byte() != ARCH_CUSTOM:
        raise ValueError("not a custom-format archive")
    compressed = (cur.byte() if version >= (1, 15) else cur.int()) != 0
    for _ in range(7):  # creation time: sec, min, hour, mday, mon, year, isdst
        cur.int()
    for _ in range(3):  # database name, server version, pg_dump version
        cur.str()
    entries = []
    for _ in range(cur.int()):
        dump_id = cur.int()
        cur.int()  # had a data dumper
        cur.str(), cur.str()  # catalog table oid, oid
        tag = cur.str() or ""
        desc = cur.str() or ""
        section = cur.int()
        cur.str(), cur.str(), cur.str()  # defn, drop, copy
        namespace = cur.str() or ""
        cur.str(), cur.str()  # tablespace, table access method
        if version >= (1, 16):
            cur.int()  # relkind
        cur.str(), cur.str()  # owner, "with oids"
        deps = []
        while (dep := cur.str()) is not None:  # dependencies, ended by a null string
            deps.append(int(dep))
        offset_at = cur.pos
        state = cur.byte()
        cur.take(off_size)
        entries.append(TocEntry(dump_id, desc, offset_at, state == OFFSET_NOT_SET,
                                namespace, tag, tuple(deps), section))
    return Toc(version, cur.int_size, off_size, compressed, entries, cur.pos)


@dataclass(frozen=True)
class AfterLoads:
    """What of an archive must wait for the tables whose data was taken apart from it.

    ``ready``: what needs nothing else that is still to come (their indexes, their primary
    keys), so it may run as soon as their data is loaded; ``last``: what also needs the rest
    of the archive's data or post-data (a foreign key from them to another table), and every
    materialized view's refresh, which may read any table.
    """

    ready: frozenset[int]
    last: frozenset[int]

    @property
    def waiting(self) -> frozenset[int]:
        return self.ready | self.last


def after_loads(toc: Toc) -> AfterLoads:
    """Sort out the entries that depend, directly or through others, on a table apart.

    Such a table has a TABLE entry and no TABLE DATA one. Other tables (a partition, an
    inheritance child) do not wait for it, nor their data. A table without data of its own
    (a partitioned one) counts as apart: its entries then only wait, which is always safe.
    """
    by_id = {e.dump_id: e for e in toc.entries}
    with_data = {(e.namespace, e.tag) for e in toc.entries if e.desc == "TABLE DATA"}
    apart = {e.dump_id for e in toc.entries
             if e.desc == "TABLE" and (e.namespace, e.tag) not in with_data}
    last = {e.dump_id for e in toc.entries if e.desc == "MATERIALIZED VIEW DATA"}
    waiting = set(last)
    _spread(toc, waiting, lambda e, d: d in apart or d in waiting)

    def needs_more(entry: TocEntry, dep: int) -> bool:
        other = by_id.get(dep)
        return (dep in last or other is None
                or (dep not in apart and dep not in waiting
                    and other.section != SECTION_PRE_DATA))

    _spread(toc, last, needs_more, within=waiting)
    return AfterLoads(ready=frozenset(waiting - last), last=frozenset(last))


def _spread(toc: Toc, marked: set[int], reaches: Callable[[TocEntry, int], bool],
            within: set[int] | None = None) -> None:
    """Mark every entry (never a TABLE; only those ``within``) with a dependency that
    ``reaches`` says leads to a marked one, until nothing changes."""
    changed = True
    while changed:  # dependencies may point either way in dump id order
        changed = False
        for entry in toc.entries:
            if (entry.dump_id not in marked and entry.desc != "TABLE"
                    and (within is None or entry.dump_id in within)
                    and any(reaches(entry, d) for d in entry.deps)):
                marked.add(entry.dump_id)
                changed = True


@dataclass
class OffsetFinder:
    """Fed an archive stream in order, finds the offset of each data block.

    Blocks follow the table of contents' order. Each starts with its type and dump id and
    follows the previous block's end-of-data marker, a zero length; uncompressed COPY text has
    no zero bytes, so that marker plus the next expected id is unambiguous. Large-object data
    is binary, so the search stops at the first BLOBS block; pg_restore finds later ones itself.
    """

    toc: Toc | None = None
    offsets: dict[int, int] = field(default_factory=dict)
    _head: bytearray = field(default_factory=bytearray)
    _pending: list[tuple[int, int]] = field(default_factory=list)
    _pos: int = 0  # stream position of the start of the next chunk fed
    _tail: bytes = b""
    _done: bool = False
    _retry_at: int = 0  # parse the head again once it has grown to this size

    def feed(self, data: bytes | memoryview) -> None:
        """Look at the next chunk of the stream."""
        if self._done:
            return
        if self.toc is None:
            self._head += data
            if len(self._head) < self._retry_at:
                return
            try:
                toc = read_toc(self._head)
            except Incomplete:
                if len(self._head) > MAX_TOC_BYTES:
                    self._give_up()
                self._retry_at = 2 * len(self._head)
                return
            except ValueError:
                self._give_up()
                return
            if toc.compressed:
                self._give_up()
                return
            self.toc = toc
            self._pending = [(e.dump_id, BLK_BLOBS if e.desc == "BLOBS" else BLK_DATA)
                             for e in toc.entries if e.has_data]
            head, self._head = bytes(self._head), bytearray()
            self._pos = toc.end
            self._tail = b"\x00" * (1 + toc.int_size)  # the first block follows the TOC
            self._search(head[toc.end:])
            return
        self._search(data if isinstance(data, bytes) else bytes(data))

    def _search(self, data: bytes) -> None:
        assert self.toc is not None
        marker_len = 1 + self.toc.int_size
        start = 0  # where in ``data`` the next search begins
        while self._pending:
            dump_id, kind = self._pending[0]
            pattern = (b"\x00" * marker_len + bytes([kind]) + b"\x00"
                       + dump_id.to_bytes(self.toc.int_size, "little"))
            found: int | None = data.find(pattern, start)
            if found == -1:
                found = None
            if start == 0 and self._tail:
                # A match may straddle the previous chunk and this one.
                seam = self._tail + data[:len(pattern) - 1]
                at = seam.find(pattern)
                if 0 <= at < len(self._tail):
                    found = at - len(self._tail)
            if found is None:
                break
            self.offsets[dump_id] = self._pos + found + marker_len
            self._pending.pop(0)
            start = found + len(pattern)
            if kind == BLK_BLOBS:
                self._done = True
                return
        keep = 2 * marker_len  # a pattern's length, less one byte
        if start == 0:  # nothing matched: the seam may span more than one short chunk
            self._tail = (self._tail + data[-keep:])[-keep:]
        else:
            self._tail = data[max(start, len(data) - keep):]
        self._pos += len(data)

    def _give_up(self) -> None:
        self._done, self._head = True, bytearray()

    def patch(self, fd: int) -> int:
        """Write the offsets found into the table of contents of the spooled archive ``fd``."""
        if self.toc is None:
            return 0
        written = 0
        for entry in self.toc.entries:
            offset = self.offsets.get(entry.dump_id)
            if offset is not None and entry.has_data:
                value = bytes([OFFSET_SET]) + offset.to_bytes(self.toc.off_size, "little")
                os.pwrite(fd, value, entry.offset_at)
                written += 1
        return written
