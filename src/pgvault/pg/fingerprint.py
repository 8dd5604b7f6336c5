"""Fingerprints of a database's user schema and migration tables, for restore drills.

Both are read inside the backup's snapshot and again in the restored database; a
restore that reproduced the source gives the same fingerprints. Every query runs in
a savepoint, so a failure never aborts the snapshot's transaction (pg_dump imports it).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

from pgvault.model import MigrationTable, SchemaFingerprint

# Text output of types and row values depends on these; pin them so two servers agree.
PINNED_SETTINGS = {
    "search_path": "pg_catalog",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}

# User objects: not in system schemas, not members of an extension (those are compared by
# extension version), and in the backed-up schema when the backup was limited to one.
_USER_NAMESPACE = """
    {ns}.nspname NOT IN ('pg_catalog', 'information_schema')
    AND {ns}.nspname NOT LIKE 'pg\\_toast%%' AND {ns}.nspname NOT LIKE 'pg\\_temp%%'
    AND (%(schema)s::text IS NULL OR {ns}.nspname = %(schema)s::text)
"""
_NOT_EXTENSION_MEMBER = """
    NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.deptype = 'e'
                AND d.classid = '{catalog}'::regclass AND d.objid = {oid})
"""

# One row per object: (section, canonical text). Only what pg_restore reproduces exactly:
# names, positions rather than attnums (dropped columns leave gaps), definitions as the
# server deparses them; no oids, owners, privileges, statistics or sequence values.
SCHEMA_SQL = f"""
WITH rel AS (
    SELECT c.oid, c.relkind, c.reltype, format('%%I.%%I', n.nspname, c.relname) AS name,
           c.relpersistence, c.relrowsecurity, c.relforcerowsecurity, c.reloptions,
           c.relpartbound, c.relispartition
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c')
      AND {_USER_NAMESPACE.format(ns="n")}
      AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_class", oid="c.oid")}
      AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_type", oid="c.reltype")}
)
SELECT 'relations', concat_ws(' ', r.relkind, r.name, r.relpersistence, r.relrowsecurity,
       r.relforcerowsecurity, array_to_string(r.reloptions, ','),
       CASE WHEN r.relkind = 'p' THEN pg_get_partkeydef(r.oid) END,
       pg_get_expr(r.relpartbound, r.oid))
FROM rel r
UNION ALL
SELECT 'columns', concat_ws(' ', r.name,
       row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum), quote_ident(a.attname),
       format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity, a.attgenerated,
       CASE WHEN a.attcollation <> t.typcollation THEN a.attcollation::regcollation::text END,
       pg_get_expr(ad.adbin, ad.adrelid))
FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
UNION ALL
SELECT 'constraints', concat_ws(' ', coalesce(r.name, format_type(co.contypid, NULL)),
       quote_ident(co.conname), pg_get_constraintdef(co.oid))
FROM pg_constraint co
LEFT JOIN rel r ON r.oid = co.conrelid
LEFT JOIN pg_type ty ON ty.oid = co.contypid
LEFT JOIN pg_namespace tn ON tn.oid = ty.typnamespace
WHERE (r.oid IS NOT NULL AND r.relkind IN ('r', 'p', 'f'))
   OR (ty.oid IS NOT NULL AND {_USER_NAMESPACE.format(ns="tn")}
       AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_type", oid="ty.oid")})
UNION ALL
SELECT 'indexes', concat_ws(' ', pg_get_indexdef(i.indexrelid), i.indisclustered,
       i.indisreplident)
FROM pg_index i JOIN rel r ON r.oid = i.indrelid
WHERE i.indisvalid
UNION ALL
SELECT 'views', concat_ws(' ', r.name, md5(pg_get_viewdef(r.oid)))
FROM rel r WHERE r.relkind IN ('v', 'm')
UNION ALL
SELECT 'sequences', concat_ws(' ', r.name, format_type(s.seqtypid, NULL), s.seqstart,
       s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle)
FROM rel r JOIN pg_sequence s ON s.seqrelid = r.oid
UNION ALL
SELECT 'triggers', concat_ws(' ', pg_get_triggerdef(tg.oid), tg.tgenabled)
FROM pg_trigger tg JOIN rel r ON r.oid = tg.tgrelid
WHERE NOT tg.tgisinternal
UNION ALL
SELECT 'policies', concat_ws(' ', r.name, quote_ident(p.polname), p.polcmd, p.polpermissive,
       (SELECT string_agg(CASE WHEN ro = 0 THEN 'public' ELSE quote_ident(ro::regrole::text)
                          END, ',' ORDER BY 1) FROM unnest(p.polroles) AS ro),
       pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
FROM pg_policy p JOIN rel r ON r.oid = p.polrelid
UNION ALL
SELECT 'rules', pg_get_ruledef(rw.oid)
FROM pg_rewrite rw JOIN rel r ON r.oid = rw.ev_class
WHERE rw.rulename <> '_RETURN'
UNION ALL
SELECT 'functions', concat_ws(' ', format('%%I.%%I', n.nspname, p.proname),
       '(' || pg_get_function_identity_arguments(p.oid) || ')', p.prokind,
       CASE WHEN p.prokind = 'a' THEN pg_get_function_result(p.oid)
            ELSE md5(pg_get_functiondef(p.oid)) END)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE {_USER_NAMESPACE.format(ns="n")}
  AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_proc", oid="p.oid")}
UNION ALL
SELECT 'types', concat_ws(' ', format('%%I.%%I', n.nspname, t.typname), t.typtype,
       CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END,
       CASE WHEN t.typtype = 'd' THEN t.typnotnull END, t.typdefault,
       (SELECT string_agg(quote_literal(e.enumlabel), ',' ORDER BY e.enumsortorder)
        FROM pg_enum e WHERE e.enumtypid = t.oid),
       (SELECT format_type(rg.rngsubtype, NULL) FROM pg_range rg WHERE rg.rngtypid = t.oid))
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.typtype IN ('e', 'd', 'r', 'b')
  AND {_USER_NAMESPACE.format(ns="n")}
  AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_type", oid="t.oid")}
  AND NOT (t.typtype = 'b' AND t.typcategory = 'A')
"""

MIGRATION_TABLES = (
    "_prisma_migrations",
    "alembic_version",
    "django_migrations",
    "schema_migrations",
    "flyway_schema_history",
)

_MIGRATION_TABLES_SQL = f"""
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relname = ANY(%(names)s)
  AND {_USER_NAMESPACE.format(ns="n")}
ORDER BY 1, 2
"""

# Per tool: the newest applied migration, and migrations recorded as failed. A table of the
# same name written by another tool may lack these columns; its rows are still fingerprinted.
_LATEST = {
    "_prisma_migrations": "SELECT migration_name FROM {t} WHERE finished_at IS NOT NULL"
    " AND rolled_back_at IS NULL ORDER BY finished_at DESC, migration_name DESC LIMIT 1",
    "alembic_version": "SELECT string_agg(version_num::text, ',' ORDER BY version_num) FROM {t}",
    "django_migrations": "SELECT app || '.' || name FROM {t} ORDER BY id DESC LIMIT 1",
    "schema_migrations": "SELECT version::text FROM {t} ORDER BY version DESC LIMIT 1",
    "flyway_schema_history": "SELECT coalesce(version, description) FROM {t} WHERE success"
    " ORDER BY installed_rank DESC LIMIT 1",
}
_FAILED = {
    "_prisma_migrations": "SELECT migration_name FROM {t} WHERE finished_at IS NULL"
    " AND rolled_back_at IS NULL ORDER BY 1",
    "schema_migrations": "SELECT version::text FROM {t} WHERE dirty ORDER BY 1",  # golang-migrate
    "flyway_schema_history": "SELECT coalesce(version, description) FROM {t} WHERE NOT success"
    " ORDER BY installed_rank",
}


@contextlib.contextmanager
def _savepoint(cur: Any, name: str) -> Iterator[None]:
    """Run a block in a savepoint that is always rolled back: reads only, settings undone."""
    cur.execute(f"SAVEPOINT {name}")
    try:
        yield
    finally:
        cur.execute(f"ROLLBACK TO SAVEPOINT {name}")
        cur.execute(f"RELEASE SAVEPOINT {name}")


def _pin_settings(cur: Any) -> None:
    for setting, value in PINNED_SETTINGS.items():
        cur.execute("SELECT set_config(%s, %s, true)", (setting, value))


def schema_fingerprint(cur: Any, schema: str | None) -> SchemaFingerprint | None:
    """The user schema's fingerprint; None if the catalog could not be read."""
    import psycopg

    sections: dict[str, list[str]] = {}
    try:
        with _savepoint(cur, "pgvault_schema"):
            _pin_settings(cur)
            for section, line in cur.execute(SCHEMA_SQL, {"schema": schema}).fetchall():
                sections.setdefault(section, []).append(line)
    except psycopg.Error:
        return None
    return SchemaFingerprint.from_sections(sections)


def migration_tables(cur: Any, schema: str | None) -> list[MigrationTable] | None:
    """Fingerprints of the known migration tables in any schema; None if they were unreadable."""
    import psycopg
    from psycopg import sql

    found: list[MigrationTable] = []
    try:
        with _savepoint(cur, "pgvault_migrations"):
            _pin_settings(cur)
            tables = cur.execute(
                _MIGRATION_TABLES_SQL, {"names": list(MIGRATION_TABLES), "schema": schema}
            ).fetchall()
            for nspname, relname in tables:
                table = sql.Identifier(nspname, relname)
                rows = [r[0] for r in cur.execute(
                    sql.SQL("SELECT (t.*)::text FROM ONLY {} t").format(table)).fetchall()]
                digest = hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()
                latest = _optional(cur, _LATEST.get(relname), table)
                failed = _optional(cur, _FAILED.get(relname), table)
                found.append(MigrationTable(
                    schema_name=nspname, name=relname, rows=len(rows), sha256=digest,
                    latest=latest[0] if latest else None, failed=failed or [],
                ))
    except psycopg.Error:
        return None
    return found


def _optional(cur: Any, query: str | None, table: Any) -> list[str] | None:
    """The first column of a tool-specific query; None if the table lacks its columns."""
    import psycopg
    from psycopg import sql

    if query is None:
        return None
    cur.execute("SAVEPOINT pgvault_optional")
    try:
        values = [str(r[0]) for r in cur.execute(
            sql.SQL(query).format(t=table)).fetchall() if r[0] is not None]
    except psycopg.Error:
        cur.execute("ROLLBACK TO SAVEPOINT pgvault_optional")
        return None
    finally:
        cur.execute("RELEASE SAVEPOINT pgvault_optional")
    return values
