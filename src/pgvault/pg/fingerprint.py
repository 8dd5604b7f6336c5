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

# One row per object: (section, canonical text, kind, name, definition). The first two make
# the section digests, unchanged since the first fingerprints so older backups still compare;
# the last three name each object for a drill that must say which ones differ (a NULL
# section: an entry only). Only what pg_restore reproduces exactly: names, positions rather
# than attnums (dropped columns leave gaps), definitions as the server deparses them; no
# oids, owners, privileges, statistics or sequence values. What pg_dump itself cannot
# reproduce has a kind of its own, so a drill reports it as that limitation:
# - child_column_order: an inheritance child's columns; pg_dump creates the child with its
#   parents' columns first, so a column added to a parent after the child existed moves;
# - clone_constraint_names: a foreign key a partition (or a table referencing a partitioned
#   one) got from a partitioned table's foreign key; pg_dump recreates only the parent's,
#   and the server names the copies. Such a copy is named by what it copies and references.
SCHEMA_SQL = f"""
WITH RECURSIVE rel AS (
    SELECT c.oid, c.relkind, c.reltype, format('%%I.%%I', n.nspname, c.relname) AS name,
           c.relpersistence, c.relrowsecurity, c.relforcerowsecurity, c.reloptions,
           c.relpartbound, c.relispartition,
           NOT c.relispartition
               AND EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid) AS inherits
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c')
      AND {_USER_NAMESPACE.format(ns="n")}
      AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_class", oid="c.oid")}
      AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_type", oid="c.reltype")}
),
copied AS (  -- each copied constraint and the one it ultimately copies (which pg_dump dumps)
    SELECT co.oid, co.conparentid AS root FROM pg_constraint co WHERE co.conparentid <> 0
    UNION ALL
    SELECT copied.oid, p.conparentid FROM copied JOIN pg_constraint p ON p.oid = copied.root
    WHERE p.conparentid <> 0
),
origin AS (
    SELECT copied.oid, format('%%I.%%I', n.nspname, c.relname) || '.'
           || quote_ident(rc.conname) AS name
    FROM copied JOIN pg_constraint rc ON rc.oid = copied.root AND rc.conparentid = 0
    JOIN pg_class c ON c.oid = rc.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
),
con AS (
    SELECT co.oid, co.conname, coalesce(r.name, format_type(co.contypid, NULL)) AS owner,
           pg_get_constraintdef(co.oid) AS def,
           CASE WHEN co.contype = 'f' THEN o.name || ' to ' || co.confrelid::regclass::text
           END AS origin
    FROM pg_constraint co
    LEFT JOIN rel r ON r.oid = co.conrelid
    LEFT JOIN pg_type ty ON ty.oid = co.contypid
    LEFT JOIN pg_namespace tn ON tn.oid = ty.typnamespace
    LEFT JOIN origin o ON o.oid = co.oid
    WHERE (r.oid IS NOT NULL AND r.relkind IN ('r', 'p', 'f'))
       OR (ty.oid IS NOT NULL AND {_USER_NAMESPACE.format(ns="tn")}
           AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_type", oid="ty.oid")})
),
line AS (
    SELECT 'relations' AS section, concat_ws(' ', r.relkind, r.name, r.relpersistence,
           r.relrowsecurity, r.relforcerowsecurity, array_to_string(r.reloptions, ','),
           CASE WHEN r.relkind = 'p' THEN pg_get_partkeydef(r.oid) END,
           pg_get_expr(r.relpartbound, r.oid)) AS text, r.name AS key
    FROM rel r
    UNION ALL
    SELECT 'indexes', concat_ws(' ', pg_get_indexdef(i.indexrelid), i.indisclustered,
           i.indisreplident), i.indexrelid::regclass::text
    FROM pg_index i JOIN rel r ON r.oid = i.indrelid
    WHERE i.indisvalid
    UNION ALL
    SELECT 'views', concat_ws(' ', r.name, md5(pg_get_viewdef(r.oid))), r.name
    FROM rel r WHERE r.relkind IN ('v', 'm')
    UNION ALL
    SELECT 'sequences', concat_ws(' ', r.name, format_type(s.seqtypid, NULL), s.seqstart,
           s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle), r.name
    FROM rel r JOIN pg_sequence s ON s.seqrelid = r.oid
    UNION ALL
    SELECT 'triggers', concat_ws(' ', pg_get_triggerdef(tg.oid), tg.tgenabled),
           r.name || ' ' || quote_ident(tg.tgname)
    FROM pg_trigger tg JOIN rel r ON r.oid = tg.tgrelid
    WHERE NOT tg.tgisinternal
    UNION ALL
    SELECT 'policies', concat_ws(' ', r.name, quote_ident(p.polname), p.polcmd,
           p.polpermissive,
           (SELECT string_agg(CASE WHEN ro = 0 THEN 'public' ELSE quote_ident(ro::regrole::text)
                              END, ',' ORDER BY 1) FROM unnest(p.polroles) AS ro),
           pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)),
           r.name || ' ' || quote_ident(p.polname)
    FROM pg_policy p JOIN rel r ON r.oid = p.polrelid
    UNION ALL
    SELECT 'rules', pg_get_ruledef(rw.oid), r.name || ' ' || quote_ident(rw.rulename)
    FROM pg_rewrite rw JOIN rel r ON r.oid = rw.ev_class
    WHERE rw.rulename <> '_RETURN'
    UNION ALL
    SELECT 'functions', concat_ws(' ', format('%%I.%%I', n.nspname, p.proname),
           '(' || pg_get_function_identity_arguments(p.oid) || ')', p.prokind,
           CASE WHEN p.prokind = 'a' THEN pg_get_function_result(p.oid)
                ELSE md5(pg_get_functiondef(p.oid)) END),
           format('%%I.%%I', n.nspname, p.proname)
           || '(' || pg_get_function_identity_arguments(p.oid) || ')'
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE {_USER_NAMESPACE.format(ns="n")}
      AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_proc", oid="p.oid")}
    UNION ALL
    SELECT 'types', concat_ws(' ', format('%%I.%%I', n.nspname, t.typname), t.typtype,
           CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END,
           CASE WHEN t.typtype = 'd' THEN t.typnotnull END, t.typdefault,
           (SELECT string_agg(quote_literal(e.enumlabel), ',' ORDER BY e.enumsortorder)
            FROM pg_enum e WHERE e.enumtypid = t.oid),
           (SELECT format_type(rg.rngsubtype, NULL) FROM pg_range rg
            WHERE rg.rngtypid = t.oid)),
           format('%%I.%%I', n.nspname, t.typname)
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE t.typtype IN ('e', 'd', 'r', 'b')
      AND {_USER_NAMESPACE.format(ns="n")}
      AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_type", oid="t.oid")}
      AND NOT (t.typtype = 'b' AND t.typcategory = 'A')
)
SELECT section, text, section, key, text FROM line
UNION ALL
SELECT 'columns', concat_ws(' ', r.name,
       row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum), quote_ident(a.attname),
       format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity, a.attgenerated,
       CASE WHEN a.attcollation <> t.typcollation THEN a.attcollation::regcollation::text END,
       pg_get_expr(ad.adbin, ad.adrelid)),
       'columns', r.name || '.' || quote_ident(a.attname),
       concat_ws(' ', format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
       a.attgenerated,
       CASE WHEN a.attcollation <> t.typcollation THEN a.attcollation::regcollation::text END,
       pg_get_expr(ad.adbin, ad.adrelid))
FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
UNION ALL
SELECT NULL, NULL,
       CASE WHEN r.inherits THEN 'child_column_order' ELSE 'column_order' END, r.name,
       string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
GROUP BY r.name, r.inherits
UNION ALL
SELECT 'constraints', concat_ws(' ', co.owner, quote_ident(co.conname), co.def),
       'constraints',
       CASE WHEN co.origin IS NULL THEN co.owner || ' ' || quote_ident(co.conname)
            ELSE co.owner || ' copy of ' || co.origin END,
       co.def
FROM con co
UNION ALL
SELECT NULL, NULL, 'clone_constraint_names', co.owner || ' copy of ' || co.origin,
       quote_ident(co.conname)
FROM con co WHERE co.origin IS NOT NULL
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


def schema_fingerprint(cur: Any, schema: str | None,
                       problems: list[str] | None = None) -> SchemaFingerprint | None:
    """The user schema's fingerprint; None if the catalog could not be read (and why, in
    ``problems``: e.g. an object dropped since the snapshot that no lock protected)."""
    import psycopg

    sections: dict[str, list[str]] = {}
    entries: dict[str, list[tuple[str, str]]] = {}
    try:
        with _savepoint(cur, "pgvault_schema"):
            _pin_settings(cur)
            for section, line, kind, key, text in cur.execute(
                    SCHEMA_SQL, {"schema": schema}).fetchall():
                if section is not None:
                    sections.setdefault(section, []).append(line)
                entries.setdefault(kind, []).append((key, text or ""))
    except psycopg.Error as exc:
        if problems is not None:
            problems.append(f"schema fingerprint not recorded: {_first_line(exc)}; "
                            "drills skip the schema check")
        return None
    return SchemaFingerprint.from_sections(sections, entries)


def migration_tables(cur: Any, schema: str | None,
                     problems: list[str] | None = None) -> list[MigrationTable] | None:
    """Fingerprints of the known migration tables in any schema; None if they were unreadable
    (and why, in ``problems``)."""
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
    except psycopg.Error as exc:
        if problems is not None:
            problems.append(f"migration tables not recorded: {_first_line(exc)}; "
                            "drills skip the migrations check")
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
