"""Pytest plugin: a throwaway PostgreSQL cluster per session and fresh databases per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
from psycopg import sql

import sampledb
from pgvault.pg.cluster import EphemeralCluster

MakeDb = Callable[..., str]
NewName = Callable[[], str]

# Durability is pointless for test data and costs most of the runtime.
_FAST_SETTINGS = {"fsync": False, "synchronous_commit": False, "full_page_writes": False}


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[EphemeralCluster]:
    """A running EphemeralCluster (newest installed major, fsync off) shared by the session."""
    with EphemeralCluster(settings=_FAST_SETTINGS) as cluster:
        yield cluster


def _dbname(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/"))


def _create_db(cluster: EphemeralCluster, name: str, template: str) -> str:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return cluster.url(name)


def _drop_db(cluster: EphemeralCluster, name: str) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def make_db(pg_cluster: EphemeralCluster) -> Iterator[MakeDb]:
    """Factory `make_db(template_url=None, prefix="t") -> url` of a new database, dropped after."""
    created: list[str] = []

    def make(template_url: str | None = None, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        template = _dbname(template_url) if template_url else "template0"
        url = _create_db(pg_cluster, name, template)
        created.append(name)
        return url

    yield make
    for name in reversed(created):
        _drop_db(pg_cluster, name)


@pytest.fixture(scope="session")
def _rich_template(pg_cluster: EphemeralCluster) -> str:
    """Fill the rich database once; tests get cheap copies of it."""
    name = f"rich_template_{uuid.uuid4().hex[:8]}"
    url = _create_db(pg_cluster, name, "template0")
    sampledb.fill_rich_database(url)
    return url


@pytest.fixture
def rich_db(make_db: MakeDb, _rich_template: str) -> str:
    """URL of a new database filled by `sampledb.fill_rich_database` (a copy, safe to modify)."""
    return make_db(_rich_template, prefix="rich")


@pytest.fixture
def new_name(pg_cluster: EphemeralCluster) -> Iterator[NewName]:
    """Fresh database names (restore targets); whatever exists under them afterwards is dropped."""
    names: list[str] = []

    def make() -> str:
        names.append(f"target_{uuid.uuid4().hex[:10]}")
        return names[-1]

    yield make
    for name in names:
        _drop_db(pg_cluster, name)


@pytest.fixture
def target_names(pg_cluster: EphemeralCluster) -> Iterator[list[str]]:
    """Restore targets a test names here are dropped afterwards, whatever happened."""
    names: list[str] = []
    yield names
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
