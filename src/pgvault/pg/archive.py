"""pg_dump custom-format archives: read the table of contents, record where data blocks start.

pg_dump writing to a pipe cannot seek back to fill in where each table's data begins, so every
``pg_restore --jobs`` worker would scan the archive from the front to find its table. Watching
the stream as it is spooled finds those offsets at memchr speed, and writing them into the
spooled copy's table of contents gives pg_restore the same archive a seekable ``pg_dump -f``
would have written. Layout: PostgreSQL's src/bin/pg_dump/pg_backup_archiver.c (ReadHead,
ReadToc) and pg_backup_custom.c (_ReadExtraToc, _StartData, _EndData).
"""

from __future__ import annotations

import difflib
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
    identity: bool = False  # a SEQUENCE made by ALTER TABLE ... ADD GENERATED ... AS IDENTITY
    owner: str = ""  # the role pg_restore makes the object's owner (ALTER ... OWNER TO)
    drop: str = ""  # its DROP statement, which names the object as ALTER ... OWNER TO does
    acl: str = ""  # an ACL or DEFAULT ACL entry's GRANT/REVOKE statements (others: "")
    defn: str = ""  # a POLICY's statement, or a COMMENT ON POLICY (see _kept_defn)


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


# Definitions engines/portable.py reads for the roles they name (a policy's TO list) or
# re-issues after a policy it rewrote (the policy's comment); others are not kept, so that
# a large schema's table of contents stays small in memory.
def _kept_defn(desc: str, defn: str) -> str:
    keep = desc == "POLICY" or (desc == "COMMENT" and defn.startswith("COMMENT ON POLICY "))
    return defn if keep else ""


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
        defn = cur.str() or ""
        drop = cur.str() or ""
        cur.str()  # copy
        namespace = cur.str() or ""
        cur.str(), cur.str()  # tablespace, table access method
        if version >= (1, 16):
            cur.int()  # relkind
        owner = cur.str() or ""
        cur.str()  # "with oids"
        deps = []
        while (dep := cur.str()) is not None:  # dependencies, ended by a null string
            deps.append(int(dep))
        offset_at = cur.pos
        state = cur.byte()
        cur.take(off_size)
        identity = desc == "SEQUENCE" and defn.startswith("ALTER TABLE")
        entries.append(TocEntry(dump_id, desc, offset_at, state == OFFSET_NOT_SET,
                                namespace, tag, tuple(deps), section, identity, owner, drop,
                                defn if desc in ("ACL", "DEFAULT ACL") else "",
                                _kept_defn(desc, defn)))
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


def after_loads(toc: Toc, loaded: frozenset[int] = frozenset()) -> AfterLoads:
    """Sort out the entries that depend, directly or through others, on a table apart.

    Such a table has a TABLE entry and no TABLE DATA one, or one in ``loaded`` (TABLE DATA
    entries whose rows are loaded by other means; never in the result). Other tables (a
    partition, an inheritance child) do not wait for it, nor their data. A table without
    data of its own (a partitioned one) counts as apart: its entries then only wait, which
    is always safe.
    """
    by_id = {e.dump_id: e for e in toc.entries}
    with_data = {(e.namespace, e.tag) for e in toc.entries
                 if e.desc == "TABLE DATA" and e.dump_id not in loaded}
    apart = {e.dump_id for e in toc.entries
             if e.desc == "TABLE" and (e.namespace, e.tag) not in with_data}
    last = {e.dump_id for e in toc.entries if e.desc == "MATERIALIZED VIEW DATA"}
    waiting = set(last) | loaded  # what needs the loaded rows waits for them too
    _spread(toc, waiting, lambda e, d: d in apart or d in waiting)

    def needs_more(entry: TocEntry, dep: int) -> bool:
        other = by_id.get(dep)
        return (dep in last or other is None
                or (dep not in apart and dep not in waiting
                    and other.section != SECTION_PRE_DATA))

    _spread(toc, last, needs_more, within=waiting)
    return AfterLoads(ready=frozenset(waiting - last - loaded), last=frozenset(last - loaded))


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


# What a partial restore (--schema, --table) takes, by TOC entry kind ("desc").
RELATIONS = frozenset({"TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE"})
NAMED = RELATIONS | {"SEQUENCE"}  # what --table names, as pg_restore -t
# Objects that exist to be used: restored when a selected object needs one (a column's type,
# a trigger's function, a default's sequence, the schema itself), with their comments and ACLs.
DEFINITIONS = frozenset({
    "SCHEMA", "EXTENSION", "TYPE", "SHELL TYPE", "DOMAIN", "FUNCTION", "PROCEDURE", "AGGREGATE",
    "COLLATION", "SEQUENCE", "OPERATOR", "OPERATOR CLASS", "OPERATOR FAMILY", "CONVERSION",
    "CAST", "TRANSFORM", "TEXT SEARCH PARSER", "TEXT SEARCH TEMPLATE", "TEXT SEARCH DICTIONARY",
    "TEXT SEARCH CONFIGURATION", "PROCEDURAL LANGUAGE", "FOREIGN DATA WRAPPER", "SERVER",
    "ACCESS METHOD"})
ABOUT = frozenset({"COMMENT", "ACL", "SECURITY LABEL"})  # say something about another entry
SPECIAL = frozenset({"ENCODING", "STDSTRINGS", "SEARCHPATH"})  # session settings, always
# Database-wide, never part of a partial restore (nor large objects: they have no schema).
IGNORED = frozenset({"DATABASE", "DATABASE PROPERTIES", "PUBLICATION TABLE",
                     "PUBLICATION TABLES IN SCHEMA"})
ROWS = frozenset({"TABLE DATA", "SEQUENCE SET"})  # matched by name in a split backup's parts
INDEXES = frozenset({"INDEX", "CONSTRAINT"})
TAGGED_BY_TABLE = frozenset({"CONSTRAINT", "FK CONSTRAINT", "CHECK CONSTRAINT", "TRIGGER",
                             "RULE", "POLICY", "DEFAULT"})


@dataclass(frozen=True)
class Selection:
    """The entries of an archive that a partial restore runs, and what it leaves out.

    ``entries``: dump id -> (desc, namespace, tag) in the main archive; ``rows``: the
    (namespace, name) of every selected table and sequence, whose rows a split backup's
    data-only parts (other dump ids) hold; ``left_out``: one line per object not restored.
    """

    entries: dict[int, tuple[str, str, str]]
    rows: frozenset[tuple[str, str]]
    left_out: tuple[str, ...] = ()

    def pick(self, toc: Toc) -> list[int]:
        """The dump ids of ``toc`` (the main archive or one of its parts) to restore."""
        return [e.dump_id for e in toc.entries
                if e.desc in SPECIAL or self.entries.get(e.dump_id) == (e.desc, e.namespace, e.tag)
                or (e.desc in ROWS and (e.namespace, e.tag) in self.rows)]


def parse_name(text: str) -> list[tuple[str, str]]:
    """The dot-separated parts of a possibly quoted SQL name, each as (folded, as typed).

    ``"Weird.Schema"."T x"`` -> [("Weird.Schema",) * 2, ("T x",) * 2]; unquoted parts fold
    to lower case as in SQL (``Sales.Orders`` -> ("sales", "Sales"), ...).
    """
    parts: list[tuple[str, str]] = []
    folded, typed, i, quoted = "", "", 0, False
    while i <= len(text):
        char = text[i] if i < len(text) else None
        if quoted:
            if char is None:
                raise ValueError(f"unterminated quote in {text!r}")
            if char == '"':
                if text[i + 1:i + 2] == '"':
                    folded, typed, i = folded + '"', typed + '"', i + 2
                    continue
                quoted = False
            else:
                folded, typed = folded + char, typed + char
        elif char is None or char == ".":
            if not typed:
                raise ValueError(f"empty name part in {text!r}")
            parts.append((folded, typed))
            folded, typed = "", ""
        elif char == '"':
            quoted = True
        else:
            folded, typed = folded + char.lower(), typed + char
        i += 1
    return parts


def show_name(*parts: str) -> str:
    """``parts`` as SQL would write them: quoted unless plain lower-case identifiers."""
    def one(part: str) -> str:
        plain = part and not part[0].isdigit() and all(
            c.islower() or c.isdigit() or c == "_" for c in part)
        return part if plain else '"' + part.replace('"', '""') + '"'
    return ".".join(one(p) for p in parts if p)


def _label(by_id: dict[int, TocEntry], entry: TocEntry) -> str:
    if entry.desc in NAMED or entry.desc in DEFINITIONS:
        return f"{entry.desc.lower()} {show_name(entry.namespace, entry.tag)}"
    owner = _owner(by_id, entry)
    if owner is not None:
        table = by_id[owner]
        return (f"{entry.desc.lower()} {entry.tag[len(table.tag) + 1:]} on "
                f"{show_name(table.namespace, table.tag)}")
    where = f" in schema {show_name(entry.namespace)}" if entry.namespace else ""
    return f"{entry.desc.lower()} {entry.tag}{where}"


def select(toc: Toc, schemas: tuple[str, ...] = (), tables: tuple[str, ...] = ()) -> Selection:
    """What ``--schema``/``--table`` restore, with what the selected objects need.

    ``--schema S``: every object in S, and S itself. ``--table T`` (``schema.table`` or a
    name in the ``--schema`` given, else in any one schema; tables, views, materialized views,
    sequences as pg_restore -t): T with its rows, owned and identity sequences with their
    values, defaults, indexes, constraints, triggers, rules, policies, comments and ACLs, the
    partitions of a partitioned table; and wherever needed the schema, types, functions,
    extensions and sequences that these use. What needs an object outside the selection (a
    foreign key to a table not restored, a view reading one) is left out and named in
    ``left_out``. Raises ValueError naming each schema or table that matches nothing.
    """
    by_id = {e.dump_id: e for e in toc.entries}
    problems: list[str] = []
    wanted: set[str] = set()
    namespaces = {e.namespace for e in toc.entries if e.namespace} | {
        e.tag for e in toc.entries if e.desc == "SCHEMA"}
    for given in schemas:
        name = _schema_named(given, namespaces)
        if name is None:
            problems.append(f"no schema {given}{_close(given, namespaces)}")
        else:
            wanted.add(name)
    named: dict[int, str] = {}
    for given in tables:
        try:
            found = _tables_named(toc, given, wanted)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        named.update((i, given) for i in found)
    if problems:
        raise ValueError("; ".join(problems))
    if tables:
        selected = set(named)
    else:
        selected = {e.dump_id for e in toc.entries
                    if e.desc not in IGNORED and (
                        e.namespace in wanted
                        or (e.desc == "SCHEMA" and e.tag in wanted)
                        or (e.desc in ABOUT and not e.namespace
                            and e.tag in {f"SCHEMA {s}" for s in wanted}))}
    roots = set(selected)
    pulled = _grow(toc, by_id, selected, roots)
    dropped = _prune(toc, by_id, selected)
    # Definitions pulled in only for what was then left out are not needed after all.
    kept = selected - pulled
    needed = _needs(by_id, {i for i in kept if i in roots or not all(
        d in pulled or d not in selected for d in by_id[i].deps)})
    selected &= kept | needed
    dropped.update(_prune(toc, by_id, selected))
    unmet = [f"--table {named[i]} needs {_label(by_id, by_id[_cause(dropped, i)])}, which is "
             "not restored" for i in named if i in dropped]
    if unmet:
        raise ValueError("; ".join(unmet) + ": add it with --table or --schema")
    left_out = tuple(f"{_label(by_id, by_id[i])} (needs "
                     f"{_label(by_id, by_id[_cause(dropped, i)])})" for i in sorted(dropped)
                     if by_id[i].desc not in ABOUT and by_id[i].desc not in ROWS
                     and (i in roots or i not in pulled))
    left_out += tuple(
        f"{_label(by_id, e)} (depends on {_label(by_id, by_id[dep])}; add --table "
        f"{show_name(e.namespace, e.tag)} to restore it)"
        for e in toc.entries if tables and e.desc in RELATIONS and e.dump_id not in selected
        and e.dump_id not in dropped
        for dep in [next((d for d in e.deps if d in selected
                          and by_id[d].desc in RELATIONS), None)] if dep is not None)
    return Selection(
        entries={i: (e.desc, e.namespace, e.tag) for i, e in by_id.items() if i in selected},
        rows=frozenset((e.namespace, e.tag) for i, e in by_id.items()
                       if i in selected and e.desc in ("TABLE", "SEQUENCE")),
        left_out=left_out)


def _close(given: str, names: set[str]) -> str:
    near = difflib.get_close_matches(given, sorted(names), n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _schema_named(given: str, namespaces: set[str]) -> str | None:
    """The archive's schema that ``given`` names: as SQL reads it, else exactly as typed."""
    try:
        parts = parse_name(given)
    except ValueError:
        parts = []
    for name in ([parts[0][0], parts[0][1]] if len(parts) == 1 else []) + [given]:
        if name in namespaces:
            return name
    return None


def _tables_named(toc: Toc, given: str, wanted: set[str]) -> list[int]:
    """The dump ids of the relation ``given`` names (one relation, or its namesakes in
    several ``wanted`` schemas); ValueError when none or an unqualified name is ambiguous."""
    try:
        parts = parse_name(given)
    except ValueError as exc:
        raise ValueError(f"--table {given}: {exc}") from None
    if len(parts) > 2:
        raise ValueError(f"--table {given}: expected table or schema.table")
    candidates = [e for e in toc.entries if e.desc in NAMED]
    for variant in (0, 1):  # as SQL reads the name, then exactly as typed
        name = parts[-1][variant]
        schema = parts[0][variant] if len(parts) == 2 else None
        found = [e for e in candidates if e.tag == name and (
            e.namespace == schema if schema is not None
            else not wanted or e.namespace in wanted)]
        spaces = sorted({e.namespace for e in found})
        if len(spaces) > 1 and schema is None and not wanted:
            raise ValueError(f"--table {given} is in schemas {', '.join(spaces)}: name one, "
                             f"e.g. --table {show_name(spaces[0], name)}")
        if found:
            return [e.dump_id for e in found]
    within = f" in schema {', '.join(sorted(wanted))}" if wanted and len(parts) == 1 else ""
    near = _close(given, {show_name(e.namespace, e.tag) for e in candidates})
    raise ValueError(f"no table {given}{within}{near}")


def _grow(toc: Toc, by_id: dict[int, TocEntry], selected: set[int],
          roots: set[int]) -> set[int]:
    """Add what belongs to the selected entries and the definitions they need; returns
    the definitions added only because something needed them."""
    pulled: set[int] = set()
    changed = True
    while changed:  # dependencies may point either way in dump id order
        changed = False
        for entry in toc.entries:
            i = entry.dump_id
            if i in selected:
                for dep in entry.deps:
                    other = by_id.get(dep)
                    if other is not None and other.desc in DEFINITIONS and dep not in selected:
                        selected.add(dep)
                        pulled.add(dep)
                        changed = True
                continue
            if entry.desc in IGNORED or entry.desc in SPECIAL or entry.desc in RELATIONS:
                continue
            if entry.desc == "TABLE ATTACH":
                child = _attached(by_id, entry)
                parent = [d for d in entry.deps if d != child and d in selected]
                if child is not None and parent and child not in selected:
                    selected.add(child)  # a partitioned table's partitions come along
                    changed = True
            if entry.desc in DEFINITIONS and entry.desc != "SEQUENCE":
                continue
            owner = _owner(by_id, entry)
            # Belongs to a selected object; being in a selected schema is not enough, nor
            # pointing at one (another table's foreign key to it).
            if (owner in selected if owner is not None else any(
                    d in selected and (by_id[d].desc != "SCHEMA" or entry.desc in ABOUT)
                    for d in entry.deps)):
                selected.add(i)
                pulled.discard(i)
                changed = True
    pulled -= roots
    return pulled


def _owner(by_id: dict[int, TocEntry], entry: TocEntry) -> int | None:
    """The relation a constraint, trigger, rule, policy or default is on: pg_dump tags them
    "table name"; None for other entries."""
    if entry.desc not in TAGGED_BY_TABLE:
        return None
    owners = [(len(other.tag), dep) for dep in entry.deps
              if (other := by_id.get(dep)) is not None and other.desc in RELATIONS
              and other.namespace == entry.namespace and entry.tag.startswith(other.tag + " ")]
    return max(owners)[1] if owners else None


def _attached(by_id: dict[int, TocEntry], attach: TocEntry) -> int | None:
    """The partition a TABLE ATTACH entry attaches (its own name and schema)."""
    for dep in attach.deps:
        other = by_id.get(dep)
        if other is not None and (other.namespace, other.tag) == (attach.namespace, attach.tag):
            return dep
    return None


def _needs(by_id: dict[int, TocEntry], kept: set[int]) -> set[int]:
    """The definitions ``kept`` entries need, directly or through one another."""
    needed: set[int] = set()
    stack = list(kept)
    while stack:
        for dep in by_id[stack.pop()].deps:
            other = by_id.get(dep)
            if other is not None and other.desc in DEFINITIONS and dep not in needed:
                needed.add(dep)
                stack.append(dep)
    return needed


def _prune(toc: Toc, by_id: dict[int, TocEntry], selected: set[int]) -> dict[int, int]:
    """Drop what needs an entry that is not selected, until nothing does; returns each
    dropped entry's first missing dependency."""
    partitions = {(child, d) for e in toc.entries if e.desc == "TABLE ATTACH"
                  if (child := _attached(by_id, e)) is not None for d in e.deps if d != child}
    dropped: dict[int, int] = {}
    changed = True
    while changed:
        changed = False
        for entry in toc.entries:
            if entry.dump_id not in selected:
                continue
            deps = list(entry.deps)
            if entry.desc == "SEQUENCE OWNED BY":  # needs the owning table, as its sequence
                deps += [d for s in entry.deps if s in by_id for d in by_id[s].deps]
            # An id outside the archive is an object every database has (schema public).
            missing = [d for d in deps if d not in selected and d in by_id
                       and not _soft(entry, by_id[d], partitions)]
            if missing:  # named by a table it needs where there is one: the likely fix
                missing.sort(key=lambda d: by_id[d].desc not in RELATIONS)
                selected.discard(entry.dump_id)
                dropped[entry.dump_id] = missing[0]
                changed = True
    return dropped


def _soft(entry: TocEntry, dep: TocEntry, partitions: set[tuple[int, int]]) -> bool:
    """Whether ``entry`` can be restored without ``dep``, which it depends on."""
    if entry.desc == "SEQUENCE" and dep.desc in RELATIONS:
        return not entry.identity  # a serial's sequence stands alone; OWNED BY needs the table
    if entry.desc == "TABLE" and (entry.dump_id, dep.dump_id) in partitions:
        return True  # a partition is created alone and attached by its TABLE ATTACH
    # A partition's index or key depends on its parent's, but is built without it.
    return entry.desc in INDEXES and dep.desc in INDEXES


def _cause(dropped: dict[int, int], i: int) -> int:
    """The first missing entry that left ``i`` out, through what was left out for it."""
    seen = set()
    while i in dropped and i not in seen:
        seen.add(i)
        i = dropped[i]
    return i


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
