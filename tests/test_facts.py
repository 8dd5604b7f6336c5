"""The drill's comparisons (pgvault.facts): each test names one rule, with facts built by hand.

Recorded facts are what the backup's snapshot held (the manifest); restored facts are the same
read from the scratch database. A verdict is True, False, "warn" (only pg_dump's own limits
differ) or None (nothing to compare with, and why).
"""

from __future__ import annotations

from typing import Any

import pytest

from pgvault.facts import (
    DETAIL_OBJECTS,
    KNOWN_LIMITATIONS,
    Finding,
    compare,
    compare_entries,
    compare_extensions,
    compare_migrations,
    compare_rows,
    compare_schema,
    qualified,
    seal,
    unseal,
)
from pgvault.model import (
    Facts,
    MigrationTable,
    SchemaFingerprint,
    TableFacts,
    UnrecordedTable,
)
from pgvault.pg.fingerprint import MIGRATION_TABLES

PG15 = {"server_version": "15.8", "server_version_num": 150008}
PG16 = {"server_version": "16.4", "server_version_num": 160004}


def tables(*specs: str, materialized: tuple[str, ...] = ()) -> list[TableFacts]:
    """'public.orders=3' -> a table of 3 rows; names in ``materialized`` are views."""
    found = []
    for spec in specs:
        name, rows = spec.split("=")
        schema, table = split(name)
        found.append(TableFacts(schema, table, int(rows), materialized=True)
                     if name in materialized else TableFacts(schema, table, int(rows)))
    return found


def split(name: str) -> tuple[str, str]:
    schema, table = name.split(".")
    return schema, table


def facts(*specs: str, materialized: tuple[str, ...] = (),
          uncounted: dict[str, str] | None = None, **fields: Any) -> Facts:
    """Facts of tables given as 'schema.table=rows'; ``uncounted``: name -> why not counted."""
    unrecorded = [UnrecordedTable(*split(name), reason=reason)
                  for name, reason in (uncounted or {}).items()]
    made = Facts(tables=tables(*specs, materialized=materialized), **PG15)  # type: ignore[arg-type]
    if unrecorded:
        made.unrecorded = unrecorded
    for key, value in fields.items():
        setattr(made, key, value)
    return made


def fingerprint(sha: str = "a" * 64, sections: dict[str, str] | None = None,
                objects: dict[str, int] | None = None,
                **entries: dict[str, str]) -> SchemaFingerprint:
    """A fingerprint with per-object entries (a newer backup's), or none if none are given."""
    if not entries:
        return SchemaFingerprint(sha256=sha, sections=sections or {}, objects=objects or {})
    return SchemaFingerprint(sha256=sha, sections=sections or {}, objects=objects or {},
                             entries=entries)


def with_schema(fp: SchemaFingerprint | None, **version: Any) -> Facts:
    return facts(schema_fingerprint=fp, **version)


def migration(name: str, rows: int, sha: str = "s1", latest: str | None = None,
              failed: tuple[str, ...] = ()) -> MigrationTable:
    schema, table = split(name)
    return MigrationTable(schema, table, rows, sha, latest, list(failed))


# -- rows ------------------------------------------------------------------------------------


def test_rows_pass_when_every_recorded_table_has_its_recorded_count() -> None:
    recorded = facts("public.orders=3", "public.users=2")
    assert compare_rows(recorded, facts("public.orders=3", "public.users=2"), set()) == \
        Finding(True, "2 tables (5 rows), as recorded", [])


def test_a_table_with_another_count_fails_naming_both_counts() -> None:
    verdict, detail, _ = compare_rows(facts("public.orders=3"), facts("public.orders=2"), set())
    assert verdict is False
    assert detail == "public.orders has 2 rows, 3 recorded"


def test_a_missing_table_and_a_table_not_in_the_backup_each_fail_by_name() -> None:
    verdict, detail, _ = compare_rows(facts("public.a=1", "public.b=1"),
                                      facts("public.a=1", "public.c=0"), set())
    assert verdict is False
    assert detail == "public.b is missing; public.c was not recorded"


def test_a_restored_table_that_cannot_be_counted_fails_with_the_reason() -> None:
    restored = facts(uncounted={"public.a": "permission denied"})
    verdict, detail, _ = compare_rows(facts("public.a=1"), restored, set())
    assert verdict is False
    assert detail == "public.a could not be counted: permission denied"


def test_names_are_quoted_only_where_sql_needs_it() -> None:
    _, detail, _ = compare_rows(facts('Sales.order"s=1', "public.x$1=1"), facts(), set())
    assert detail == '"Sales"."order""s" is missing; public.x$1 is missing'
    assert qualified("public", "Ünits") == 'public."Ünits"'


def test_only_the_first_five_row_problems_are_named_and_the_rest_counted() -> None:
    recorded = facts(*(f"public.t{i}=1" for i in range(8)))
    _, detail, _ = compare_rows(recorded, facts(), set())
    assert detail.count("is missing") == 5 and detail.endswith(" (and 3 more)")


def test_materialized_views_are_not_compared_because_the_restore_refreshes_them() -> None:
    # Marked in the manifest, or (a backup from before views were marked) found restored.
    recorded = facts("public.t=1", "public.mv=5", "public.old_mv=7",
                     materialized=("public.mv",))
    restored = facts("public.t=1", "public.mv=6", "public.old_mv=0")
    assert compare_rows(recorded, restored, {("public", "old_mv")}) == Finding(
        True, "1 table (1 row), as recorded; 2 materialized views refreshed by the restore, "
              "not compared", [])


def test_a_table_not_counted_at_backup_is_skipped_by_name_never_a_gap() -> None:
    recorded = facts("public.t=1", uncounted={"public.busy": "lock timeout"})
    restored = facts("public.t=1", "public.busy=40")
    assert compare_rows(recorded, restored, set()).verdict is True
    checks = dict(compare(recorded, restored, set()))
    assert checks["rows public.busy"] == Finding(
        None, "not counted when backed up (lock timeout); restored, not compared", [])


# -- schema ----------------------------------------------------------------------------------


def test_no_recorded_fingerprint_is_skipped_with_the_reason() -> None:
    verdict, detail, _ = compare_schema(with_schema(None), with_schema(fingerprint()))
    assert verdict is None and "no schema fingerprint recorded" in detail


def test_an_unreadable_restored_catalog_fails() -> None:
    assert compare_schema(with_schema(fingerprint()), with_schema(None)) == Finding(
        False, "could not read the restored database's catalog", [])


def test_matching_objects_pass_with_the_fingerprint_and_the_object_count() -> None:
    fp = fingerprint("0123456789abcdef" + "0" * 48, tables={"public.t": "d1"},
                     columns={"public.t.a": "c1", "public.t.b": "c2"},
                     column_order={"public.t": "a, b"})
    # column_order describes the columns, it is not an object of its own
    assert compare_schema(with_schema(fp), with_schema(fp)) == Finding(
        True, "fingerprint 0123456789abcdef: 3 objects match", [])


def test_every_differing_missing_or_new_object_fails_by_name() -> None:
    want = fingerprint(tables={"public.t": "d1", "public.gone": "d2"},
                       columns={"public.t.a": "int4"})
    got = fingerprint(tables={"public.t": "d1", "public.new": "d3"},
                      columns={"public.t.a": "int8"})
    verdict, detail, objects = compare_entries(want, got)
    assert verdict is False
    assert objects == ["column public.t.a differs", "table public.gone is missing",
                       "table public.new was not recorded"]
    assert detail == "differs: " + ", ".join(objects)


@pytest.mark.parametrize("kind", sorted(KNOWN_LIMITATIONS))
def test_what_only_pg_dump_cannot_reproduce_is_a_warning_naming_the_limitation(
        kind: str) -> None:
    section = {"child_column_order": "columns", "clone_constraint_names": "constraints"}[kind]
    want_entries: dict[str, Any] = {"tables": {"public.t": "d"}, kind: {"o": "1"}}
    got_entries: dict[str, Any] = {"tables": {"public.t": "d"}, kind: {"o": "2"}}
    want = fingerprint(sections={section: "x"}, **want_entries)
    got = fingerprint(sections={section: "y"}, **got_entries)
    verdict, detail, objects = compare_entries(want, got)
    assert verdict == "warn"
    assert detail.startswith(KNOWN_LIMITATIONS[kind])
    assert detail.endswith("; everything else matches (1 objects)")
    assert len(objects) == 1 and objects[0].endswith(" o differs")


def test_a_known_limitation_does_not_hide_a_real_difference() -> None:
    want = fingerprint(child_column_order={"public.c": "a, x"}, columns={"public.c.a": "int4"})
    got = fingerprint(child_column_order={"public.c": "x, a"}, columns={"public.c.a": "text"})
    verdict, _, objects = compare_entries(want, got)
    assert verdict is False and objects == ["column public.c.a differs"]


def test_a_section_digest_differing_beyond_every_entry_is_an_inconsistent_record() -> None:
    # The entries all match, yet the functions section's digest does not: something the
    # entries missed, so a failure, not a pass.
    want = fingerprint(sections={"functions": "x", "columns": "c"}, tables={"public.t": "d"},
                       child_column_order={"public.c": "1"})
    got = fingerprint(sections={"functions": "y", "columns": "d"}, tables={"public.t": "d"},
                      child_column_order={"public.c": "2"})
    verdict, detail, objects = compare_entries(want, got)
    assert verdict is False and objects == ["functions"]
    assert "the recorded fingerprint is inconsistent" in detail


def test_more_differences_than_a_line_can_hold_are_all_in_objects() -> None:
    want = fingerprint(columns={f"public.t.c{i:03}": "int4" for i in range(DETAIL_OBJECTS + 50)})
    verdict, detail, objects = compare_entries(want, fingerprint(columns={}))
    assert verdict is False and len(objects) == DETAIL_OBJECTS + 50
    assert detail.endswith(" (and 50 more: every one in --json)")
    assert detail.count("is missing") == DETAIL_OBJECTS


def test_on_another_major_a_difference_is_not_compared_but_a_match_still_passes() -> None:
    want = fingerprint(views={"public.v": "d1"})
    verdict, detail, objects = compare_schema(
        with_schema(want), with_schema(fingerprint(views={"public.v": "d2"}), **PG16))
    assert verdict is None
    assert detail == ("differs: view public.v differs; not compared: restored on PostgreSQL "
                      "16.4, backed up from 15.8")
    assert objects == ["view public.v differs"]
    assert compare_schema(with_schema(want), with_schema(want, **PG16)).verdict is True


def test_an_older_backup_without_entries_compares_the_whole_digest() -> None:
    old = fingerprint("b" * 64, sections={"tables": "1"}, objects={"tables": 4})
    assert compare_schema(with_schema(old), with_schema(old)) == Finding(
        True, f"fingerprint {'b' * 16}: 4 objects match", [])


def test_an_older_backup_names_the_sections_that_differ_with_their_counts() -> None:
    old = fingerprint("b" * 64, sections={"tables": "1", "views": "1"},
                      objects={"tables": 4, "views": 1})
    new = fingerprint("c" * 64, sections={"tables": "2", "views": "1"}, objects={"tables": 3})
    assert compare_schema(with_schema(old), with_schema(new)) == Finding(
        False, "differs in tables (3 objects, 4 recorded) (the backup, taken by an older "
               "pgvault, recorded no per-object names)", [])


# -- extensions ------------------------------------------------------------------------------


def test_extensions_pass_at_their_recorded_versions() -> None:
    recorded = facts(extensions={"plpgsql": "1.0", "citext": "1.6"})
    assert compare_extensions(recorded, recorded) == Finding(True, "citext 1.6, plpgsql 1.0", [])
    assert compare_extensions(facts(), facts()) == Finding(True, "none", [])


def test_an_extension_at_another_version_missing_or_new_fails_by_name() -> None:
    recorded = facts(extensions={"citext": "1.6", "hstore": "1.8"})
    restored = facts(extensions={"citext": "1.5", "pgcrypto": "1.3"})
    assert compare_extensions(recorded, restored) == Finding(
        False, "citext 1.5, 1.6 recorded; hstore missing, 1.8 recorded; "
               "pgcrypto 1.3 was not recorded", [])


# -- migrations ------------------------------------------------------------------------------


def test_migrations_not_recorded_are_skipped_unreadable_ones_fail() -> None:
    assert compare_migrations(facts(), facts(migrations=[])).verdict is None
    assert compare_migrations(facts(migrations=[]), facts()) == Finding(
        False, "could not read the restored migration tables", [])


def test_a_database_without_migration_tables_is_skipped_naming_the_tables_looked_for() -> None:
    verdict, detail, _ = compare_migrations(facts(migrations=[]), facts(migrations=[]))
    assert verdict is None and all(name in detail for name in MIGRATION_TABLES)


def test_migration_tables_pass_with_their_rows_and_latest_migration() -> None:
    tables_ = [migration("public._prisma_migrations", 3, latest="20240101_init"),
               migration("public.alembic_version", 1)]
    assert compare_migrations(facts(migrations=tables_), facts(migrations=tables_)) == Finding(
        True, "public._prisma_migrations: 3 rows, latest 20240101_init; "
              "public.alembic_version: 1 row", [])


def test_a_migration_table_with_other_rows_or_content_missing_or_new_fails() -> None:
    recorded = [migration("public.a", 3), migration("public.b", 2, sha="s1"),
                migration("public.c", 1)]
    restored = [migration("public.a", 2), migration("public.b", 2, sha="s2"),
                migration("public.d", 1)]
    assert compare_migrations(facts(migrations=recorded), facts(migrations=restored)) == Finding(
        False, "public.c is missing; public.d was not recorded; public.a differs (2 rows, 3 "
               "recorded); public.b differs (2 rows, 2 recorded)", [])


def test_a_restored_table_recording_a_failed_migration_fails_naming_it() -> None:
    # The same rows as recorded: the backup itself held the failure, and the drill says so.
    failed = [migration("public._prisma_migrations", 2, failed=("20240202_add_index",))]
    assert compare_migrations(facts(migrations=failed), facts(migrations=failed)) == Finding(
        False, "public._prisma_migrations records failed migrations: 20240202_add_index", [])


# -- the whole set ---------------------------------------------------------------------------


def test_a_drill_reports_rows_then_each_uncounted_table_schema_extensions_migrations() -> None:
    recorded = facts("public.t=1", uncounted={"public.u": "lock timeout", "s.v": "canceled"},
                     schema_fingerprint=fingerprint(), migrations=[])
    names = [name for name, _ in compare(recorded, recorded, set())]
    assert names == ["rows", "rows public.u", "rows s.v", "schema", "extensions", "migrations"]


# -- sealed names (encrypted backups) ------------------------------------------------------

KEY = bytes(range(32))


def test_a_sealed_fingerprint_holds_no_name_and_no_definition_digest() -> None:
    fp = fingerprint(columns={"public.notes.secret_col": "d1", "public.notes.id": "d2"})
    sealed = seal(fp, KEY)
    assert isinstance(sealed.entries, dict)
    text = repr(sealed.entries)
    assert "secret_col" not in text and "d1" not in text and "d2" not in text
    assert len(sealed.entries["columns"]) == 2, "how many objects there are stays visible"
    assert sealed.sections == fp.sections and sealed.sha256 == fp.sha256
    assert seal(fp, bytes(32)).entries != sealed.entries, "the key decides the digests"


def test_unsealed_entries_compare_as_the_clear_ones_do_named_from_the_restore() -> None:
    recorded = fingerprint(columns={"public.t.a": "d1", "public.t.b": "d2"})
    restored = fingerprint(columns={"public.t.a": "d1", "public.t.b": "changed"})
    want, got = unseal(seal(recorded, KEY), restored, KEY)
    assert compare_entries(want, got) == compare_entries(recorded, restored)
    assert compare_entries(want, got).objects == ["column public.t.b differs"]


def test_a_sealed_object_the_restore_lacks_is_named_by_its_digest_only() -> None:
    recorded = fingerprint(columns={"public.t.a": "d1", "public.t.gone": "d2"})
    restored = fingerprint(columns={"public.t.a": "d1"})
    want, got = unseal(seal(recorded, KEY), restored, KEY)
    (missing,) = compare_entries(want, got).objects
    assert "gone" not in missing and missing.startswith("column (name sealed in the manifest: ")
    assert missing.endswith(" is missing")


def test_with_another_key_nothing_matches() -> None:
    recorded = fingerprint(columns={"public.t.a": "d1"})
    want, got = unseal(seal(recorded, bytes(32)), recorded, KEY)
    assert compare_entries(want, got).verdict is False
