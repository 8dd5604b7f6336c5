"""What a drill concludes from facts: the backup's recorded snapshot against the restored database.

Pure: recorded ``Facts`` (from the manifest) and the same facts read from the restored
database in, ``Finding``s out. No connection, no clock, no files; ops/verify.py reads the
restored database and turns each finding into a report check.

A finding's verdict is True (as recorded), False (it differs: the restore is wrong), "warn"
(it matches except for what pg_dump itself cannot reproduce, named) or None (nothing to
compare with: said why, never counted as a pass or a failure). Every difference is named;
the text names the first DETAIL_OBJECTS, ``objects`` holds them all.

The rules, in the order a drill reports them:

- rows: every recorded table has its recorded row count, none is missing or new;
  materialized views are left out (the restore refreshes them), and so are tables whose
  count could not be read at backup time (each named in a check of its own, skipped);
- schema: object by object when the backup recorded per-object digests, by section for
  older backups; differences only pg_dump's limits explain are warnings (KNOWN_LIMITATIONS);
  on another PostgreSQL major, differences are not compared (definitions deparse differently);
- extensions: the recorded versions, no more, no fewer;
- migrations: each migration table's rows and digest as recorded, and none records a
  failed migration.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal, NamedTuple

import msgspec

from pgvault.model import ENTRY_DIGEST_CHARS, Facts, MigrationTable, SchemaFingerprint, plural
from pgvault.pg.fingerprint import MIGRATION_TABLES
from pgvault.pg.psql import identifier

Verdict = bool | Literal["warn"] | None

# What pg_dump itself cannot reproduce, by the fingerprint entry kind that holds it
# (pg/fingerprint.py): a drill names such differences as warnings, never as a failed restore.
KNOWN_LIMITATIONS = {
    "child_column_order": "pg_dump cannot keep an inheritance child's column order (it "
                          "creates the child with its parents' columns first, so a column "
                          "added to a parent after the child existed moves); columns "
                          "compared by name",
    "clone_constraint_names": "pg_dump recreates a partitioned table's foreign key, not its "
                              "copies on the partitions, and the server names the copies; "
                              "copies compared by definition",
}
# The fingerprint section whose digest a known limitation's differences also change.
_EXPLAINS = {"child_column_order": "columns", "clone_constraint_names": "constraints"}
# Entry kinds that describe other entries (not objects of their own), and how to name them.
_ENTRY_KINDS = {"column_order": "column order", "child_column_order": "column order",
                "clone_constraint_names": "foreign key copy name"}
DETAIL_OBJECTS = 200
"""Differing objects named in a finding's text; ``objects`` has them all."""
SUMMARY_PROBLEMS = 5
"""Problems named in the text of a rows, extensions or migrations finding."""


class Finding(NamedTuple):
    """One conclusion: the verdict, why, and every object found different."""

    verdict: Verdict
    detail: str
    objects: list[str]


def compare(recorded: Facts, restored: Facts, matviews: set[tuple[str, str]]
            ) -> list[tuple[str, Finding]]:
    """Every facts check of a drill, named as in its report.

    ``matviews``: (schema, name) of the restored database's materialized views (a backup
    recorded before views were marked counts them among its tables).
    """
    found = [("rows", compare_rows(recorded, restored, matviews))]
    # In the dump, but its count could not be read at backup time (see the backup's
    # warnings): nothing to compare it with, said by name.
    found += [(f"rows {qualified(table.schema_name, table.name)}",
               Finding(None, f"not counted when backed up ({table.reason}); restored, "
                             "not compared", []))
              for table in recorded.unrecorded_tables()]
    found += [("schema", compare_schema(recorded, restored)),
              ("extensions", compare_extensions(recorded, restored)),
              ("migrations", compare_migrations(recorded, restored))]
    return found


def compare_rows(recorded: Facts, restored: Facts,
                 matviews: set[tuple[str, str]]) -> Finding:
    matviews = matviews | {(t.schema_name, t.name) for t in recorded.tables
                           if t.materialized is True}
    # Not counted at backup time: reported by name apart, never a gap nor a failure.
    uncounted = {(t.schema_name, t.name) for t in recorded.unrecorded_tables()}

    def counts(facts: Facts) -> dict[tuple[str, str], int]:
        # A refresh during restore recomputes materialized views: stale ones legitimately differ.
        return {(t.schema_name, t.name): t.rows for t in facts.tables
                if (t.schema_name, t.name) not in matviews | uncounted}

    want, got = counts(recorded), counts(restored)
    unreadable = {(t.schema_name, t.name): t.reason for t in restored.unrecorded_tables()}
    problems = [f"{qualified(*k)} has {got[k]} rows, {want[k]} recorded"
                for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
    problems += [f"{qualified(*k)} could not be counted: {unreadable[k]}"
                 for k in sorted(want.keys() - got.keys()) if k in unreadable]
    problems += [f"{qualified(*k)} is missing" for k in sorted(want.keys() - got.keys())
                 if k not in unreadable]
    problems += [f"{qualified(*k)} was not recorded" for k in sorted(got.keys() - want.keys())]
    if problems:
        return Finding(False, _summary(problems), [])
    views = len({k for k in matviews if k not in uncounted})
    skipped = (f"; {plural(views, 'materialized view')} refreshed by the restore, not compared"
               if views else "")
    return Finding(True, f"{plural(len(want), 'table')} ({plural(sum(want.values()), 'row')}), "
                         f"as recorded{skipped}", [])


def compare_schema(recorded: Facts, restored: Facts) -> Finding:
    want, got = recorded.schema_fingerprint, restored.schema_fingerprint
    if want is None:
        return Finding(None, "no schema fingerprint recorded (an older pgvault, or the catalog "
                             "could not be read at backup time: see the backup's warnings)", [])
    if got is None:
        return Finding(False, "could not read the restored database's catalog", [])
    other_major = recorded.server_version_num // 10000 != restored.server_version_num // 10000
    if isinstance(want.entries, dict) and isinstance(got.entries, dict):
        verdict, detail, objects = compare_entries(want, got)
    elif want.sha256 == got.sha256:
        verdict, detail, objects = True, f"{sum(want.objects.values())} objects match", []
    else:
        verdict, objects = False, []
        detail = "differs in " + ", ".join(
            f"{name} ({got.objects.get(name, 0)} objects, {want.objects.get(name, 0)} recorded)"
            for name in _differing_sections(want, got)) + (
            " (the backup, taken by an older pgvault, recorded no per-object names)")
    if verdict is False and other_major:
        # Another major deparses definitions differently: not evidence of a bad restore.
        return Finding(None, f"{detail}; not compared: restored on PostgreSQL "
                             f"{restored.server_version}, backed up from "
                             f"{recorded.server_version}", objects)
    if verdict is True:
        detail = f"fingerprint {want.sha256[:16]}: {detail}"
    return Finding(verdict, detail, objects)


def compare_entries(want: SchemaFingerprint, got: SchemaFingerprint) -> Finding:
    """Object by object: every difference named; known pg_dump limitations as warnings."""
    assert isinstance(want.entries, dict) and isinstance(got.entries, dict)
    failures: list[str] = []
    known: dict[str, list[str]] = {}
    for kind in sorted(want.entries.keys() | got.entries.keys()):
        recorded, restored = want.entries.get(kind, {}), got.entries.get(kind, {})
        label = _ENTRY_KINDS.get(kind, kind.rstrip("s"))
        found = [f"{label} {name} differs" for name in sorted(recorded.keys() & restored.keys())
                 if recorded[name] != restored[name]]
        found += [f"{label} {name} is missing" for name in sorted(recorded.keys() - restored)]
        found += [f"{label} {name} was not recorded"
                  for name in sorted(restored.keys() - recorded)]
        if kind in KNOWN_LIMITATIONS:
            if found:
                known[kind] = found
        else:
            failures += found
    total = sum(len(entries) for kind, entries in want.entries.items()
                if kind not in _ENTRY_KINDS)
    if failures:
        return Finding(False, "differs: " + _named(failures), failures)
    # The section digests cover the same lines; where they differ beyond what a known
    # limitation explains, the entries missed something: still a failure.
    explained = {_EXPLAINS[kind] for kind in known}
    unexplained = [name for name in _differing_sections(want, got) if name not in explained]
    if unexplained:
        return Finding(False, f"differs in {', '.join(unexplained)} (each object's own digest "
                              "matches: the recorded fingerprint is inconsistent)", unexplained)
    if known:
        warned = [item for kind in sorted(known) for item in known[kind]]
        return Finding("warn", "; ".join(
            f"{KNOWN_LIMITATIONS[kind]}: {_named(items)}" for kind, items in sorted(known.items())
        ) + f"; everything else matches ({total} objects)", warned)
    return Finding(True, f"{total} objects match", [])


def compare_extensions(recorded: Facts, restored: Facts) -> Finding:
    want, got = recorded.extensions, restored.extensions
    problems = [f"{name} {got.get(name, 'missing')}, {version} recorded"
                for name, version in sorted(want.items()) if got.get(name) != version]
    problems += [f"{name} {got[name]} was not recorded" for name in sorted(got.keys() - want)]
    if problems:
        return Finding(False, _summary(problems), [])
    return Finding(True, ", ".join(f"{n} {v}" for n, v in sorted(want.items())) or "none", [])


def compare_migrations(recorded: Facts, restored: Facts) -> Finding:
    if recorded.migrations is None:
        return Finding(None, "no migration tables recorded (older pgvault, or they were "
                             "unreadable)", [])
    if restored.migrations is None:
        return Finding(False, "could not read the restored migration tables", [])

    def by_name(tables: list[MigrationTable]) -> dict[str, MigrationTable]:
        return {qualified(t.schema_name, t.name): t for t in tables}

    want, got = by_name(recorded.migrations), by_name(restored.migrations)
    problems = [f"{name} is missing" for name in sorted(want.keys() - got.keys())]
    problems += [f"{name} was not recorded" for name in sorted(got.keys() - want.keys())]
    for name in sorted(want.keys() & got.keys()):
        if (want[name].rows, want[name].sha256) != (got[name].rows, got[name].sha256):
            problems.append(f"{name} differs ({got[name].rows} rows, {want[name].rows} recorded)")
    for name, table in sorted(got.items()):
        if table.failed:
            problems.append(f"{name} records failed migrations: {', '.join(table.failed)}")
    if problems:
        return Finding(False, _summary(problems), [])
    if not want:
        return Finding(None, "no migration tables (" + ", ".join(MIGRATION_TABLES) + ")", [])
    return Finding(True, "; ".join(
        f"{name}: {plural(t.rows, 'row')}" + (f", latest {t.latest}" if t.latest else "")
        for name, t in sorted(want.items())), [])


def qualified(schema: str, name: str) -> str:
    """``schema.name`` as the user would write it (quoted only where SQL needs it)."""
    return f"{identifier(schema, as_needed=True)}.{identifier(name, as_needed=True)}"


def _differing_sections(want: SchemaFingerprint, got: SchemaFingerprint) -> list[str]:
    return sorted(name for name in want.sections.keys() | got.sections.keys()
                  if want.sections.get(name) != got.sections.get(name))


def _named(items: list[str]) -> str:
    """Every item, up to DETAIL_OBJECTS (the JSON report's ``objects`` has them all)."""
    shown = items[:DETAIL_OBJECTS]
    more = (f" (and {len(items) - len(shown)} more: every one in --json)"
            if len(items) > len(shown) else "")
    return ", ".join(shown) + more


def _summary(problems: list[str], shown: int = SUMMARY_PROBLEMS) -> str:
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


# -- sealed names (encrypted backups) -------------------------------------------------------


def _keyed(key: bytes, *parts: str) -> str:
    digest = hmac.new(key, "\0".join(parts).encode(), hashlib.sha256).hexdigest()
    return digest[:ENTRY_DIGEST_CHARS]


def seal(fingerprint: SchemaFingerprint, key: bytes) -> SchemaFingerprint:
    """The fingerprint with every object's name and digest replaced by keyed digests.

    An encrypted backup's manifest must name nothing that only its data shows (a column
    named after a customer, say): without ``key`` the entries reveal only how many objects
    of each kind there are. The section digests hash whole listings and stay as they are.
    """
    if not isinstance(fingerprint.entries, dict):
        return fingerprint
    entries = {kind: {_keyed(key, kind, name): _keyed(key, digest)
                      for name, digest in named.items()}
               for kind, named in fingerprint.entries.items()}
    return msgspec.structs.replace(fingerprint, entries=entries)


def unseal(recorded: SchemaFingerprint, restored: SchemaFingerprint, key: bytes
           ) -> tuple[SchemaFingerprint, SchemaFingerprint]:
    """Both sides comparable, named by the restored database's own names.

    The restored side is sealed with the same key, then both are relabelled: a recorded
    object the restore lacks can only be named by its keyed digest.
    """
    if not isinstance(recorded.entries, dict) or not isinstance(restored.entries, dict):
        return recorded, restored
    sealed = seal(restored, key)
    assert isinstance(sealed.entries, dict)
    names = {kind: {_keyed(key, kind, name): name for name in named}
             for kind, named in restored.entries.items()}

    def named(entries: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        return {kind: {names.get(kind, {}).get(k, f"(name sealed in the manifest: {k})"): v
                       for k, v in items.items()} for kind, items in entries.items()}

    return (msgspec.structs.replace(recorded, entries=named(recorded.entries)),
            msgspec.structs.replace(restored, entries=named(sealed.entries)))

