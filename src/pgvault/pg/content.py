"""Per-table row counts and content digests, to show two databases hold the same data."""

from __future__ import annotations

from typing import Any

TABLES_SQL = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY 1, 2
"""


def table_digests(connection: Any) -> dict[str, tuple[int, str]]:
    """'schema.table' -> (rows, md5 of every row's text in sorted order)."""
    from psycopg import sql

    result = {}
    for schema, name in connection.execute(TABLES_SQL).fetchall():
        table = sql.Identifier(schema, name)
        query = sql.SQL(
            "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '')"
            " FROM ONLY {} t"
        ).format(table)
        rows, digest = connection.execute(query).fetchone()
        result[f"{schema}.{name}"] = (rows, digest)
    return result
