"""Compare two databases by content and schema, to prove a restore reproduced its source."""

from __future__ import annotations

import difflib
import re
import subprocess
from collections import Counter
from typing import Any

import psycopg
from psycopg import sql

from pgvault.pg import binaries

# Row text depends on these settings; pin them so two servers render rows identically.
_SESSION_SETTINGS = {
    "DateStyle": "ISO, YMD",
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "search_path": "pg_catalog",
}

_RELATIONS_SQL = """
SELECT format('%I.%I', n.nspname, c.relname), c.relkind, c.relispopulated
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm', 'S')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
ORDER BY n.nspname, c.relname
"""

# Lines that differ between two dumps of equal databases.
_VOLATILE_LINE = re.compile(
    r"^(\\restrict |\\unrestrict |-- Dumped from database version|-- Dumped by pg_dump version)"
)
_DIFF_LINES = 40
_ROW_SAMPLES = 5


def database_fingerprint(url: str) -> dict[str, Any]:
    """Row counts and hashes per table, sequence states, large objects and schema text."""
    tables: dict[str, dict[str, Any]] = {}
    sequences: dict[str, tuple[int, bool]] = {}
    with _connect(url) as conn:
        dbname = conn.info.dbname
        server_major = conn.info.server_version // 10000
        # Labels are quoted by the server (quote_ident), so they are both readable and usable SQL.
        for label, kind, populated in conn.execute(_RELATIONS_SQL).fetchall():
            ident = sql.SQL(label)
            if kind == "S":
                row = conn.execute(
                    sql.SQL("SELECT last_value, is_called FROM {}").format(ident)
                ).fetchone()
                assert row is not None
                sequences[label] = (int(row[0]), bool(row[1]))
            elif not populated:
                tables[label] = {"rows": None, "hash": "not populated"}
            else:
                count, digest = _table_hash(conn, ident)
                tables[label] = {"rows": count, "hash": digest}
        large_objects = {
            int(oid): {"size": size, "md5": digest, "comment": comment}
            for oid, size, digest, comment in conn.execute(
                "SELECT oid, length(lo_get(oid)), md5(lo_get(oid)),"
                " obj_description(oid, 'pg_largeobject')"
                " FROM pg_largeobject_metadata ORDER BY oid"
            ).fetchall()
        }
    return {
        "tables": tables,
        "sequences": sequences,
        "large_objects": large_objects,
        "schema": _schema_text(url, dbname, server_major),
    }


def assert_databases_equal(url_a: str, url_b: str) -> None:
    """Raise AssertionError naming each table, sequence, large object or schema bit that differs."""
    fp_a = database_fingerprint(url_a)
    fp_b = database_fingerprint(url_b)
    problems: list[str] = []
    for table in _sections_differ(problems, "table", fp_a["tables"], fp_b["tables"]):
        a, b = fp_a["tables"][table], fp_b["tables"][table]
        detail = f"table {table} differs: rows {a['rows']} vs {b['rows']}"
        if a["rows"] is not None and b["rows"] is not None:
            detail += "\n" + _row_diff(url_a, url_b, table)
        problems.append(detail)
    for seq in _sections_differ(problems, "sequence", fp_a["sequences"], fp_b["sequences"]):
        problems.append(
            f"sequence {seq} differs: (last_value, is_called) "
            f"{fp_a['sequences'][seq]} vs {fp_b['sequences'][seq]}"
        )
    for oid in _sections_differ(
        problems, "large object", fp_a["large_objects"], fp_b["large_objects"]
    ):
        problems.append(
            f"large object {oid} differs: {fp_a['large_objects'][oid]} "
            f"vs {fp_b['large_objects'][oid]}"
        )
    if fp_a["schema"] != fp_b["schema"]:
        diff = list(
            difflib.unified_diff(
                fp_a["schema"].splitlines(),
                fp_b["schema"].splitlines(),
                "a schema",
                "b schema",
                n=1,
                lineterm="",
            )
        )
        shown = "\n".join(diff[:_DIFF_LINES])
        more = f"\n... {len(diff) - _DIFF_LINES} more diff lines" if len(diff) > _DIFF_LINES else ""
        problems.append(f"schema (pg_dump --schema-only) differs:\n{shown}{more}")
    if problems:
        raise AssertionError(
            f"databases differ ({len(problems)} problem(s)):\n"
            f"  a = {url_a}\n  b = {url_b}\n" + "\n".join(problems)
        )


def _sections_differ(
    problems: list[str], kind: str, a: dict[Any, Any], b: dict[Any, Any]
) -> list[Any]:
    """Record objects present on one side only; return the shared keys whose values differ."""
    problems.extend(f"{kind} {key} exists only in a" for key in a.keys() - b.keys())
    problems.extend(f"{kind} {key} exists only in b" for key in b.keys() - a.keys())
    return [key for key in a if key in b and a[key] != b[key]]


def _connect(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True)
    for name, value in _SESSION_SETTINGS.items():
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    return conn


def _table_hash(conn: psycopg.Connection[Any], ident: sql.Composable) -> tuple[int, str]:
    # Per-row md5s keep memory small and make the order independent of collations;
    # ONLY excludes inheritance children, which are compared on their own.
    # (alias.*) is used because a bare alias would resolve to a column of the same name.
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), md5(coalesce(string_agg(h, '' ORDER BY h), ''))"
            " FROM (SELECT md5((x.*)::text) AS h FROM ONLY {} AS x) AS hashes"
        ).format(ident)
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def _table_rows(url: str, table: str) -> Counter[str]:
    with _connect(url) as conn:
        query = sql.SQL("SELECT (x.*)::text FROM ONLY {} AS x").format(sql.SQL(table))
        return Counter(str(r[0]) for r in conn.execute(query))


def _row_diff(url_a: str, url_b: str, table: str) -> str:
    """A few rows found on only one side, clipped around where they first differ."""
    rows_a, rows_b = _table_rows(url_a, table), _table_rows(url_b, table)
    only_a = sorted((rows_a - rows_b).elements())
    only_b = sorted((rows_b - rows_a).elements())
    lines: list[str] = []
    for i in range(min(_ROW_SAMPLES, max(len(only_a), len(only_b)))):
        row_a = only_a[i] if i < len(only_a) else None
        row_b = only_b[i] if i < len(only_b) else None
        # Rows at the same rank are usually the changed row; start both where they diverge.
        start = 0
        if row_a is not None and row_b is not None:
            start = max(0, _common_prefix(row_a, row_b) - 60)
        if row_a is not None:
            lines.append(f"  - a: {_clip(row_a, start)}")
        if row_b is not None:
            lines.append(f"  + b: {_clip(row_b, start)}")
    hidden = len(only_a) + len(only_b) - len(lines)
    if hidden > 0:
        lines.append(f"  ... {hidden} more differing rows")
    return "\n".join(lines)


def _common_prefix(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _clip(text: str, start: int = 0, limit: int = 200) -> str:
    head = f"[{start} chars]..." if start else ""
    tail = f"...({len(text)} chars)" if len(text) > start + limit else ""
    return head + text[start : start + limit] + tail


def _schema_text(url: str, dbname: str, server_major: int) -> str:
    pg_dump = binaries.tool("pg_dump", server_major)
    proc = subprocess.run(
        [str(pg_dump), "--schema-only", "--no-owner", f"--dbname={url}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pg_dump --schema-only failed for {url}: {proc.stderr.strip()}")
    own_name = re.compile(rf"(?<![\w$]){re.escape(dbname)}(?![\w$])")
    kept = []
    for line in proc.stdout.splitlines():
        if _VOLATILE_LINE.match(line):
            continue
        # The database's own name appears only in database-level statements.
        if line.startswith("\\connect") or " DATABASE " in line:
            line = own_name.sub("<dbname>", line)
        kept.append(line)
    return "\n".join(kept)
