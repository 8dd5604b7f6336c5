"""Logical backups of managed servers as they really are, against a local PostgreSQL 15 made
to behave like one (fixtures_tls.py): TLS only, verified against the provider's CA; a master
role that is no superuser; a pooler in front (a real PgBouncer, fixtures_pgbouncer.py); a dump
naming the provider's roles and extensions, restored onto a plain PostgreSQL.

Every backup is restored and compared with its source (dbcompare); where the target cannot
take an item (a provider's extension or role), with a copy of the source that lacks it.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cli_runner import one_line_error, pgvault
from dbcompare import assert_databases_equal
from fixtures_pgbouncer import Bouncer, start_pgbouncer
from fixtures_tls import MASTER, MASTER_PASSWORD, SERVER_NAME, ManagedServer
from pgvault.model import VerifyReport, from_json
from pgvault.pg.cluster import EphemeralCluster
from standin_supabase import supabase_standin

MASTER_ENV = {"PGPASSWORD": MASTER_PASSWORD}

# An application as a managed server holds it: its objects owned by app_owner (the master
# role is a member), one table created by the provider's superuser-like role, a grant to a
# reading role, a sequence, a view.
APP_SQL = """
SET ROLE app_owner;
CREATE SCHEMA shop;
CREATE TABLE shop.orders (id serial PRIMARY KEY, customer text NOT NULL, total numeric(10, 2));
INSERT INTO shop.orders (customer, total)
    SELECT 'c' || g, g * 1.25 FROM generate_series(1, 300) g;
CREATE VIEW shop.big_orders AS SELECT * FROM shop.orders WHERE total > 100;
GRANT USAGE ON SCHEMA shop TO app_reader;
GRANT SELECT ON shop.orders, shop.big_orders TO app_reader;
RESET ROLE;
CREATE TABLE public.settings (key text PRIMARY KEY, value text);
INSERT INTO public.settings VALUES ('currency', 'EUR'), ('vat', '21');
"""


def _create_db(server: ManagedServer, owner: str = "app_owner") -> str:
    name = f"app_{uuid.uuid4().hex[:8]}"
    with server.admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(owner)))
    return name


def _drop_db(url: str, name: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture(scope="module")
def app_db(managed_server: ManagedServer) -> Iterator[str]:
    """The application's database on the managed server (its name)."""
    name = _create_db(managed_server)
    with managed_server.admin(name) as conn:
        conn.execute(APP_SQL)
    yield name
    _drop_db(managed_server.url(), name)


@pytest.fixture
def targets(managed_server: ManagedServer) -> Iterator[list[str]]:
    """Database names a test restores into on the managed server, dropped afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        _drop_db(managed_server.url(), name)


@pytest.fixture(scope="module")
def master_repo(managed_server: ManagedServer, app_db: str,
                tmp_path_factory: pytest.TempPathFactory) -> str:
    """One backup of ``app_db`` taken as the master role over ``sslmode=require``."""
    repo = f"file://{tmp_path_factory.mktemp('managed') / 'repo'}"
    url = managed_server.url(app_db, user=MASTER, sslmode="require")
    pgvault("backup", "--dbname", url, "--repo", repo, env=MASTER_ENV)
    return repo


def _copy(server: ManagedServer, source: str, targets: list[str], change: str) -> str:
    """A copy of database ``source`` with ``change`` made: what a restore should give when
    it cannot take everything (the copy is dropped with ``targets``)."""
    name = f"expected_{uuid.uuid4().hex[:8]}"
    targets.append(name)
    with server.admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(source)))
    with server.admin(name) as conn:
        conn.execute(change)
    return server.url(name)


def _owners(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute(
            "SELECT n.nspname || '.' || c.relname, pg_get_userbyid(c.relowner) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('shop', "
            "'public') AND c.relkind IN ('r', 'v', 'S')").fetchall())


# -- TLS --------------------------------------------------------------------------------


def test_tls_verify_full_through_every_child_process(
        managed_server: ManagedServer, app_db: str, tmp_path: Path,
        targets: list[str]) -> None:
    """pg_dump, pg_dumpall, psql and psycopg (the backup), psql and pg_restore (the
    restore) and the drill's server all verify the server against the test CA."""
    repo = f"file://{tmp_path / 'repo'}"
    source = managed_server.url(app_db)
    pgvault("backup", "--dbname", source, "--repo", repo)
    targets.append(f"copy_{uuid.uuid4().hex[:8]}")
    pgvault("restore", "latest", "--dbname", managed_server.url(), "--repo", repo,
            "--to", targets[0])
    assert_databases_equal(source, managed_server.url(targets[0]))
    report = from_json(VerifyReport, pgvault("verify", "latest", "--server",
                                             managed_server.url(), "--repo", repo,
                                             "--json").stdout)
    assert report.passed, report.checks
    assert {c.status for c in report.checks} <= {"pass", "skip"}, report.checks


def test_wrong_host_and_plain_connections_are_refused_in_one_line(
        managed_server: ManagedServer, app_db: str, tmp_path: Path) -> None:
    repo = f"file://{tmp_path / 'repo'}"
    # The certificate names db.managed.test and 127.0.0.1: another name is refused.
    wrong = managed_server.url(app_db, host="db.other.test", hostaddr="127.0.0.1")
    wrong = wrong.replace("@127.0.0.1:", "@db.other.test:")
    line = one_line_error(pgvault("backup", "--dbname", wrong, "--repo", repo, expect=4))
    assert "does not match host name" in line and "db.other.test" in line, line
    # Without TLS the server has no pg_hba.conf line for the connection.
    plain = managed_server.url(app_db, sslmode="disable")
    line = one_line_error(pgvault("backup", "--dbname", plain, "--repo", repo, expect=4))
    assert "no encryption" in line, line
    assert SERVER_NAME  # the name the server's certificate holds


# -- no superuser -----------------------------------------------------------------------


def test_master_role_backup_keeps_globals_without_passwords(
        master_repo: str, tmp_path: Path) -> None:
    restored = tmp_path / "globals"
    listed = json.loads(pgvault("list", "--repo", master_repo, "--json").stdout)
    backup_id = listed[0]["id"]
    (globals_file,) = Path(master_repo.removeprefix("file://")).rglob("globals.sql*")
    assert globals_file.stat().st_size > 0
    shown = pgvault("show", backup_id, "--repo", master_repo, "--json").stdout
    assert "globals.sql" in shown
    # The roles are there, their passwords (pg_authid, which the master may not read) not.
    text = _artifact_text(master_repo, backup_id, "globals.sql", restored)
    assert "CREATE ROLE app_owner;" in text and f"CREATE ROLE {MASTER};" in text
    assert "PASSWORD" not in text and "SCRAM-SHA-256" not in text


def _artifact_text(repo: str, backup_id: str, name: str, folder: Path) -> str:
    from pgvault import config
    from pgvault.ops.restore import open_artifact
    from pgvault.vault import Vault

    vault = Vault.open(config.load({"repo": repo}, {}))
    manifest = vault.catalog.get(backup_id, None)
    stream = open_artifact(vault.storage, manifest, manifest.artifact(name))
    data = b""
    while chunk := stream.read(1 << 16):
        data += chunk
    folder.mkdir(exist_ok=True)
    return data.decode()


def test_master_role_restore_names_the_owner_it_cannot_set_then_maps_it(
        managed_server: ManagedServer, app_db: str, master_repo: str,
        targets: list[str]) -> None:
    """Before: pg_restore failed half-way with 'must be member of role "postgres"'. Now the
    restore refuses before it creates anything, naming the object and the options; with
    --role-map (or --no-owner) it restores, owners the master may use kept."""
    master = managed_server.url("postgres", user=MASTER)
    targets += [f"copy_{uuid.uuid4().hex[:8]}" for _ in range(3)]
    refused = pgvault("restore", "latest", "--dbname", master, "--repo", master_repo,
                      "--to", targets[0], env=MASTER_ENV, expect=9)
    line = one_line_error(refused)
    assert "table public.settings is owned by role 'postgres'" in line, line
    assert "--role-map postgres=ROLE" in line and "--no-owner" in line, line
    assert "must be member" not in line
    with managed_server.admin() as conn:
        assert not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (targets[0],)).fetchall()

    pgvault("restore", "latest", "--dbname", master, "--repo", master_repo, "--to",
            targets[1], "--role-map", "postgres=master", env=MASTER_ENV)
    source = managed_server.url(app_db)
    assert_databases_equal(source, managed_server.url(targets[1]))
    owners = _owners(managed_server.url(targets[1]))
    assert owners["shop.orders"] == owners["shop.big_orders"] == "app_owner"
    assert owners["shop.orders_id_seq"] == "app_owner"
    assert owners["public.settings"] == MASTER
    with psycopg.connect(managed_server.url(targets[1])) as conn:
        grants = conn.execute("SELECT grantee, privilege_type FROM "
                              "information_schema.role_table_grants WHERE table_schema = "
                              "'shop' AND grantee = 'app_reader'").fetchall()
    assert sorted(grants) == [("app_reader", "SELECT")] * 2

    pgvault("restore", "latest", "--dbname", master, "--repo", master_repo, "--to",
            targets[2], "--no-owner", "-j", "2", env=MASTER_ENV)
    # --no-owner restores no grants either: the source without them.
    expected = _copy(managed_server, app_db, targets, "REVOKE ALL ON SCHEMA shop FROM "
                     "app_reader; REVOKE ALL ON ALL TABLES IN SCHEMA shop FROM app_reader")
    assert_databases_equal(expected, managed_server.url(targets[2]))
    assert set(_owners(managed_server.url(targets[2])).values()) == {MASTER}


def test_a_role_map_to_a_role_the_master_cannot_use_is_refused(
        managed_server: ManagedServer, master_repo: str) -> None:
    master = managed_server.url("postgres", user=MASTER)
    line = one_line_error(pgvault("restore", "latest", "--dbname", master, "--repo",
                                  master_repo, "--to", "never_made", "--role-map",
                                  "postgres=nobody_here", env=MASTER_ENV, expect=9))
    assert "--role-map: role 'nobody_here' does not exist on the target" in line
    line = one_line_error(pgvault("restore", "latest", "--dbname", master, "--repo",
                                  master_repo, "--to", "never_made", "--role-map", "postgres",
                                  env=MASTER_ENV, expect=2))
    assert "OLD=NEW" in line


# -- a provider's extensions and roles, restored onto a plain PostgreSQL ----------------

SHAREDIR = Path("/usr/share/postgresql/15/extension")

PROVIDER_SQL = """
CREATE EXTENSION pg_stat_statements;
CREATE SCHEMA graphql AUTHORIZATION supabase_admin;
CREATE TABLE graphql.cache (id int PRIMARY KEY, body text);
ALTER TABLE graphql.cache OWNER TO supabase_admin;
INSERT INTO graphql.cache VALUES (1, 'a'), (2, 'b');
CREATE TABLE public.accounts (id int PRIMARY KEY, name text);
INSERT INTO public.accounts SELECT g, 'a' || g FROM generate_series(1, 50) g;
GRANT SELECT ON public.accounts TO rds_superuser;
"""


@contextlib.contextmanager
def _vanishing_extension() -> Iterator[str]:
    """An extension whose files exist only inside the block, like a provider's own
    (pg_graphql, supabase_vault) on a server that never had them installed."""
    name = f"pgvault_provider_{uuid.uuid4().hex[:8]}"
    files = [SHAREDIR / f"{name}.control", SHAREDIR / f"{name}--1.0.sql"]
    files[0].write_text("default_version = '1.0'\nrelocatable = true\n")
    files[1].write_text(f"CREATE FUNCTION {name}_version() RETURNS int LANGUAGE sql "
                        "AS 'SELECT 1';\n")
    try:
        yield name
    finally:
        for path in files:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def provider_db(managed_server: ManagedServer) -> Iterator[tuple[str, str]]:
    """A database holding a provider's extensions, roles and grants; its extension
    ``gone`` has no files on this host any more. (its name, the extension's)"""
    name = _create_db(managed_server, owner="postgres")
    with managed_server.admin(name) as conn:
        conn.execute(PROVIDER_SQL)
        with _vanishing_extension() as gone:
            conn.execute(f"CREATE EXTENSION {gone}")
            conn.execute(f"CREATE VIEW public.uses_{gone} AS SELECT {gone}_version() AS v")
    yield name, gone
    _drop_db(managed_server.url(), name)


def test_provider_extensions_and_roles_are_left_out_by_name(
        managed_server: ManagedServer, provider_db: tuple[str, str],
        pg_cluster: EphemeralCluster, tmp_path: Path, targets: list[str],
        target_names: list[str]) -> None:
    """Onto a plain PostgreSQL (the session's cluster: no rds_superuser, no supabase_admin,
    no files for the provider's extension) and as the master role (no superuser, so no
    pg_stat_statements): each item the target cannot take is named, the rest restored; and
    a drill says WARN, not FAIL. Before, pg_restore stopped at the first of them (exit 9)
    and the drill failed."""
    name, gone = provider_db
    repo = f"file://{tmp_path / 'repo'}"
    pgvault("backup", "--dbname", managed_server.url(name), "--repo", repo)

    target_names.append(f"plain_{uuid.uuid4().hex[:8]}")
    plain = pgvault("restore", "latest", "--dbname", pg_cluster.url(), "--repo", repo,
                    "--to", target_names[0])
    warned = plain.stderr
    assert f"extension {gone} not restored: its files are not installed" in warned
    assert f"view public.uses_{gone} not restored: it needs extension {gone}" in warned
    assert "owner supabase_admin not restored (does not exist on the target server): " \
           "schema graphql, table graphql.cache owned by postgres instead" in warned
    assert "grant on table public.accounts not restored (role rds_superuser does not exist" \
           in warned
    expected = _copy(managed_server, name, targets, f"""
        DROP VIEW public.uses_{gone}; DROP EXTENSION {gone};
        REVOKE ALL ON public.accounts FROM rds_superuser""")
    assert_databases_equal(expected, pg_cluster.url(target_names[0]))
    with psycopg.connect(pg_cluster.url(target_names[0])) as conn:
        assert conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace "
                            "WHERE nspname = 'graphql'").fetchone() == ("postgres",)

    targets.append(f"master_{uuid.uuid4().hex[:8]}")
    master = pgvault("restore", "latest", "--dbname", managed_server.url(user=MASTER),
                     "--repo", repo, "--to", targets[-1], "--role-map", "postgres=master",
                     env=MASTER_ENV)
    assert "extension pg_stat_statements not restored: only a superuser may create it, " \
           "and master is none" in master.stderr
    assert "owner supabase_admin not restored (master is not a member of it)" in master.stderr
    expected = _copy(managed_server, name, targets, f"""
        DROP VIEW public.uses_{gone}; DROP EXTENSION {gone};
        DROP EXTENSION pg_stat_statements""")
    assert_databases_equal(expected, managed_server.url(targets[-1]))

    # The drill on the plain server too (an ephemeral cluster would take as long again).
    report = from_json(VerifyReport, pgvault("verify", "latest", "--repo", repo, "--server",
                                             pg_cluster.url(), "--json").stdout)
    statuses = {c.name: c.status for c in report.checks}
    assert report.passed, report.checks
    assert statuses["restore"] == "warn", report.checks
    assert "fail" not in statuses.values(), report.checks
    restore_check = next(c for c in report.checks if c.name == "restore")
    assert f"extension {gone} not restored" in restore_check.detail



RLS_SQL = """
CREATE TABLE public.notes (id int PRIMARY KEY, tenant text NOT NULL, body text);
INSERT INTO public.notes SELECT g, 't' || (g % 3), 'note ' || g FROM generate_series(1, 60) g;
ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON public.notes FOR SELECT TO authenticated USING (tenant = 't1');
CREATE POLICY tenant_notes ON public.notes TO {tenant} USING (tenant = 't2');
COMMENT ON POLICY tenant_notes ON public.notes IS 'the tenant application';
CREATE POLICY all_read ON public.notes FOR SELECT USING (tenant = 't0');
"""


def test_policies_of_missing_roles_are_refused_or_left_out_before_pg_restore(
        managed_server: ManagedServer, pg_cluster: EphemeralCluster, tmp_path: Path,
        targets: list[str], target_names: list[str]) -> None:
    """A Supabase-like source (row level security, policies TO authenticated and TO the
    application's own role) restored as the master role onto a server that has neither
    role. Before, pg_restore failed half-way (role "..." does not exist) after creating the
    tables; now the custom role's policy stops it before anything is created, and with
    --role-map for that role the provider role's policy is left out by name."""
    tenant, mapped = f"tenant_{uuid.uuid4().hex[:6]}", f"app_{uuid.uuid4().hex[:6]}"
    source_name = f"rls_{uuid.uuid4().hex[:8]}"
    target_names.append(source_name)
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {tenant} NOLOGIN; CREATE ROLE {mapped} NOLOGIN")
        conn.execute("CREATE ROLE authenticated NOLOGIN")
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(source_name)))
    with managed_server.admin() as conn:
        conn.execute(f"CREATE ROLE {mapped} NOLOGIN; GRANT {mapped} TO {MASTER}")
    try:
        source = pg_cluster.url(source_name)
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(RLS_SQL.format(tenant=tenant))
        repo = f"file://{tmp_path / 'repo'}"
        pgvault("backup", "--dbname", source, "--repo", repo)
        master = managed_server.url("postgres", user=MASTER)
        targets += [f"rls_{uuid.uuid4().hex[:8]}" for _ in range(2)]

        line = one_line_error(pgvault(
            "restore", "latest", "--dbname", master, "--repo", repo, "--to", targets[0],
            "--role-map", "postgres=master", env=MASTER_ENV, expect=9))
        assert f"policy tenant_notes on table public.notes applies to role '{tenant}', " \
               "which does not exist on the target server" in line, line
        assert f"--role-map {tenant}=ROLE" in line, line
        with managed_server.admin() as conn:
            assert not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                    (targets[0],)).fetchall()

        done = pgvault("restore", "latest", "--dbname", master, "--repo", repo, "--to",
                       targets[1], "--role-map", "postgres=master", "--role-map",
                       f"{tenant}={mapped}", env=MASTER_ENV)
        assert "policy own_notes on table public.notes not restored: its role " \
               "authenticated does not exist on the target server" in done.stderr
        restored = managed_server.url(targets[1])
        with psycopg.connect(restored) as conn:
            policies = conn.execute("SELECT policyname, roles::text[] FROM pg_policies "
                                    "WHERE tablename = 'notes' ORDER BY 1").fetchall()
            assert policies == [("all_read", ["public"]), ("tenant_notes", [mapped])]
            assert conn.execute("SELECT relrowsecurity FROM pg_class WHERE oid = "
                                "'public.notes'::regclass").fetchone() == (True,)
            assert conn.execute("SELECT obj_description(oid, 'pg_policy') FROM pg_policy "
                                "WHERE polname = 'tenant_notes'").fetchone() == (
                                    "the tenant application",)
        # The source as the target should hold it: the provider's policy gone, the
        # tenant's applying to the mapped role.
        expected = pg_cluster.url(source_name)
        with psycopg.connect(expected, autocommit=True) as conn:
            conn.execute(f"DROP POLICY own_notes ON public.notes; "
                         f"ALTER POLICY tenant_notes ON public.notes TO {mapped}")
        assert_databases_equal(expected, restored)
    finally:
        with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(source_name)))
            conn.execute(f"DROP ROLE IF EXISTS {tenant}, {mapped}, authenticated")
        for name in targets:
            _drop_db(managed_server.url(), name)
        targets.clear()
        with managed_server.admin() as conn:
            conn.execute(f"DROP ROLE IF EXISTS {mapped}")

# -- poolers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bouncer(managed_server: ManagedServer, app_db: str) -> Iterator[Bouncer]:
    """A real PgBouncer in front of the managed server: ``app_db`` pooled per session and
    per transaction, TLS on both sides."""
    tls = managed_server.tls
    with start_pgbouncer(managed_server.port, app_db, ("session", "transaction"),
                         ca_cert=tls.ca_cert, cert=tls.server_cert, key=tls.server_key) as found:
        yield found


def _through(bouncer: Bouncer, server: ManagedServer, mode: str, **params: str) -> str:
    url = server.url(bouncer.aliases[mode], **params)
    return url.replace(f"@127.0.0.1:{server.port}/", f"@127.0.0.1:{bouncer.port}/")


def test_a_transaction_pooler_is_refused_naming_the_direct_url(
        managed_server: ManagedServer, app_db: str, bouncer: Bouncer, tmp_path: Path,
        targets: list[str]) -> None:
    """Through PgBouncer in transaction mode pg_dump's session is not held for it: the
    backup stops before pg_dump starts, in one line. Before, it ran (and could be wrong)."""
    repo = f"file://{tmp_path / 'repo'}"
    pooled = _through(bouncer, managed_server, "transaction")
    line = one_line_error(pgvault("backup", "--dbname", pooled, "--repo", repo, expect=3))
    assert "a pooler in transaction mode" in line and "DIRECT_URL" in line, line
    # Prisma's mark is named with what the server showed.
    line = one_line_error(pgvault("backup", "--dbname", pooled + "&pgbouncer=true", "--repo",
                                  repo, expect=3))
    assert "in transaction mode, as its pgbouncer=true says" in line, line
    assert not list(tmp_path.glob("repo/manifests/**/*.json"))
    # The application's pooled DATABASE_URL beside its DIRECT_URL: the direct one is used.
    env = {"DATABASE_URL": pooled + "&pgbouncer=true&connection_limit=1",
           "DIRECT_URL": managed_server.url(app_db)}
    pgvault("backup", "--repo", repo, env=env)
    targets.append(f"copy_{uuid.uuid4().hex[:8]}")
    pgvault("restore", "latest", "--dbname", managed_server.url(), "--repo", repo, "--to",
            targets[-1])
    assert_databases_equal(managed_server.url(app_db), managed_server.url(targets[-1]))


def test_a_session_pooler_with_neon_style_options_backs_up(
        managed_server: ManagedServer, app_db: str, bouncer: Bouncer, tmp_path: Path,
        targets: list[str]) -> None:
    """PgBouncer in session mode (Supabase's port 5432 pooler) holds one server session per
    client: the backup runs through it, TLS verified through the pooler, with Neon's
    ``options=endpoint=...`` passed on to it (which, like Neon's proxy, takes it)."""
    repo = f"file://{tmp_path / 'repo'}"
    pooled = _through(bouncer, managed_server, "session", options="endpoint=ep-test-123456")
    assert "options=endpoint%3Dep-test-123456" in pooled
    pgvault("backup", "--dbname", pooled, "--repo", repo)
    targets.append(f"copy_{uuid.uuid4().hex[:8]}")
    pgvault("restore", "latest", "--dbname", managed_server.url(), "--repo", repo, "--to",
            targets[-1])
    assert_databases_equal(managed_server.url(app_db), managed_server.url(targets[-1]))


SUPABASE_POOLED = ("postgresql://postgres.abcdefghijklmnopqrst:s3cret@aws-0-eu-central-1.pooler."
                   "supabase.com:6543/postgres?pgbouncer=true&connection_limit=1&sslmode=require")
NEON = ("postgresql://alex:s3cret@ep-cool-darkness-123456.us-east-2.aws.neon.tech/neondb"
        "?sslmode=require&channel_binding=require&options=endpoint%3Dep-cool-darkness-123456")


def test_supabase_and_neon_url_forms_are_parsed_and_passed_on() -> None:
    from pgvault.pg.conninfo import ConnInfo

    pooled = ConnInfo.parse(SUPABASE_POOLED)
    assert dict(pooled.params) == {
        "user": "postgres.abcdefghijklmnopqrst", "host": "aws-0-eu-central-1.pooler.supabase.com",
        "port": "6543", "dbname": "postgres", "sslmode": "require"}
    assert pooled.password == "s3cret" and pooled.pgbouncer
    assert pooled.transaction_pooler() == "it is Supabase's transaction pooler (port 6543)"
    assert "s3cret" not in pooled.dsn() and "pgbouncer" not in pooled.dsn()
    session = ConnInfo.parse(SUPABASE_POOLED.replace(":6543/", ":5432/").replace(
        "pgbouncer=true&", ""))
    assert session.transaction_pooler() is None
    assert ConnInfo.parse(SUPABASE_POOLED.replace("pgbouncer=true&", "")).transaction_pooler() \
        == "it is Supabase's transaction pooler (port 6543)"
    direct = ConnInfo.parse("postgresql://postgres:s3cret@db.abcdefghijklmnopqrst.supabase.co"
                            ":5432/postgres?sslmode=verify-full&sslrootcert=/etc/ssl/prod-ca.crt")
    assert direct.transaction_pooler() is None
    assert "sslmode=verify-full sslrootcert=/etc/ssl/prod-ca.crt" in direct.dsn()

    neon = ConnInfo.parse(NEON)
    assert neon.params["options"] == "endpoint=ep-cool-darkness-123456"
    assert neon.params["sslmode"] == "require" and neon.params["channel_binding"] == "require"
    assert "options=endpoint=ep-cool-darkness-123456" in neon.dsn()
    assert "options=endpoint%3Dep-cool-darkness-123456" in neon.url()
    assert ConnInfo.parse(neon.url(), password="s3cret").params == neon.params
    assert neon.transaction_pooler() is None
    pooled_neon = ConnInfo.parse(NEON.replace("123456.us-east-2", "123456-pooler.us-east-2"))
    assert pooled_neon.transaction_pooler() == "its host is a Neon pooled endpoint (-pooler)"


# -- Supabase: its own backups, monitored -------------------------------------------------

SUPABASE_REF = "abcdefghijklmnopqrst"


def test_supabase_backups_are_reported_beside_the_logical_backup(
        managed_server: ManagedServer, app_db: str, tmp_path: Path,
        targets: list[str]) -> None:
    """check and status list the project's physical backups (age against the RPO, PITR on
    or off) through a stand-in of the management API (tests/standin_supabase.py: the API
    cannot be reached from here); the logical backup beside them is restored and compared."""
    token = f"sbp_{uuid.uuid4().hex}"
    with supabase_standin(SUPABASE_REF, token) as api:
        config_file = tmp_path / "pgvault.toml"
        config_file.write_text(f"""
repo = "file://{tmp_path / 'repo'}"
[[databases]]
name = "{app_db}"
url = "{managed_server.url(app_db)}"
[databases.objectives]
rpo_hours = 24
[databases.supabase]
project = "{SUPABASE_REF}"
api_url = "{api.url}"
""")
        config_file.chmod(0o600)
        env = {"SUPABASE_ACCESS_TOKEN": token}
        cfg = ("--config", str(config_file))
        pgvault("backup", *cfg, env=env)
        targets.append(f"copy_{uuid.uuid4().hex[:8]}")
        pgvault("restore", "latest", "--repo", f"file://{tmp_path / 'repo'}", "--dbname",
                managed_server.url(), "--to", targets[-1])
        assert_databases_equal(managed_server.url(app_db), managed_server.url(targets[-1]))

        api.answer(backup_ages_hours=[2, 26], pitr=True)
        (found,) = json.loads(pgvault("status", *cfg, "--json", env=env).stdout)
        listed = found["provider_backups"]
        assert listed["provider"] == "supabase" and listed["source_id"] == SUPABASE_REF
        assert listed["backups"] == 2 and listed["pitr_enabled"] is True
        assert 7100 < listed["newest_backup_age_seconds"] < 7300
        shown = pgvault("status", *cfg, env=env).stdout
        assert f"supabase {SUPABASE_REF}: 2 physical backups, newest 2h0" in shown, shown
        assert "ago, PITR on (to " in shown, shown
        assert "logical backups are the portable copy" in shown
        check = pgvault("check", *cfg, env=env, expect=None).stdout
        assert "supabase" not in check, check

        api.answer(backup_ages_hours=[30, 54])
        check = pgvault("check", *cfg, env=env, expect=1).stdout
        assert f"supabase {SUPABASE_REF}: newest physical backup is 30.0h old (RPO 24h)" \
            in check, check
        assert "PITR off" in pgvault("status", *cfg, env=env).stdout

        wrong = pgvault("check", *cfg, env={"SUPABASE_ACCESS_TOKEN": "sbp_wrong"}, expect=1)
        assert "its backups could not be listed: Supabase API: the access token was " \
               "refused (HTTP 401)" in wrong.stdout
        # The contract: one GET of the documented path, the token as a Bearer header only.
        assert api.requests
        for request in api.requests:
            assert (request.method, request.path) == (
                "GET", f"/v1/projects/{SUPABASE_REF}/database/backups")
            assert request.headers["Authorization"].startswith("Bearer sbp_")
            assert request.headers["Accept"] == "application/json" and request.body == b""
        assert token not in shown + check + wrong.stdout + wrong.stderr


# -- the plan itself (pure) ------------------------------------------------------------------


def test_the_plan_maps_owners_and_grants_and_refuses_what_it_cannot_place() -> None:
    from pgvault.engines.portable import TargetFacts, plan
    from pgvault.errors import RestoreFailed
    from pgvault.pg.archive import Toc, TocEntry

    def entry(i: int, desc: str, tag: str, owner: str = "", drop: str = "", acl: str = "",
              deps: tuple[int, ...] = (), namespace: str = "public") -> TocEntry:
        return TocEntry(i, desc, 0, False, namespace, tag, deps, owner=owner, drop=drop,
                        acl=acl)

    toc = Toc((1, 14), 4, 8, False, [
        entry(1, "FUNCTION", "f(integer)", "postgres", "DROP FUNCTION public.f(integer);\n"),
        entry(2, "TABLE", "Odd Table", "app_owner", 'DROP TABLE public."Odd Table";\n'),
        entry(3, "ACL", "TABLE \"Odd Table\"", acl='GRANT SELECT ON TABLE public."Odd Table" '
              'TO "Read Only";\nGRANT ALL ON TABLE public."Odd Table" TO rds_superuser;\n',
              deps=(2,)),
        entry(4, "EXTENSION", "pg_graphql", namespace=""),
        entry(5, "VIEW", "gql", "app_owner", "DROP VIEW public.gql;\n", deps=(4,)),
    ], 0)
    target = TargetFacts("master", False, {"master": True, "app_owner": True,
                                            "reader": True, "postgres": False}, {})
    fit = plan(toc, target, role_map={"postgres": "master", "Read Only": "reader"})
    assert fit.skip == {3, 4, 5} and fit.no_owner
    assert fit.after == ['GRANT SELECT ON TABLE public."Odd Table" TO "reader";',
                         'ALTER TABLE public."Odd Table" OWNER TO "app_owner"']
    assert "extension pg_graphql not restored: its files are not installed on the target " \
           "server" in fit.warnings
    assert "view public.gql not restored: it needs extension pg_graphql" in fit.warnings
    assert any(w.startswith('grant on table public."Odd Table" not restored (role '
                            "rds_superuser does not exist") for w in fit.warnings)
    with pytest.raises(RestoreFailed, match=re.escape(
            "function public.f(integer) is owned by role 'postgres', which master is not a "
            "member of")):
        plan(toc, target, role_map={"Read Only": "reader"})
    with pytest.raises(RestoreFailed, match="granted to role 'Read Only', which does not "
                                            "exist on the target server"):
        plan(toc, target, role_map={"postgres": "master"})
    assert plan(toc, target, no_owner=True).after == []


def test_the_plan_reads_policies_roles_and_leaves_out_only_what_denies_more() -> None:
    """Policies as pg_dump writes them (dumpPolicy): quoted names, several roles, none for
    PUBLIC, AS RESTRICTIVE; and default privileges naming a missing role."""
    from pgvault.engines.portable import Policy, TargetFacts, plan, provider_role
    from pgvault.errors import RestoreFailed
    from pgvault.pg.archive import Selection, Toc, TocEntry

    def policy(i: int, defn: str) -> TocEntry:
        return TocEntry(i, "POLICY", 0, False, "public", f"t p{i}", (1,), defn=defn)

    parsed = Policy.parse('CREATE POLICY "Own rows" ON "My App"."Notes" FOR SELECT TO '
                          'authenticated, "Tenant ""A""" USING ((owner = auth.uid()));\n')
    assert parsed is not None and parsed.label() == 'policy "Own rows" on table "My App"."Notes"'
    assert [r for _, _, r in parsed.roles] == ["authenticated", 'Tenant "A"']
    assert parsed.with_roles(["app"]).startswith('CREATE POLICY "Own rows" ON "My App"."Notes" '
                                                 'FOR SELECT TO "app" USING (')
    assert Policy.parse("CREATE POLICY p ON public.t USING (true);\n").roles == ()  # PUBLIC

    toc = Toc((1, 14), 4, 8, False, [
        TocEntry(1, "TABLE", 0, False, "public", "t", owner="master"),
        policy(2, "CREATE POLICY p2 ON public.t TO authenticated USING (true);\n"),
        policy(3, "CREATE POLICY p3 ON public.t FOR UPDATE TO anon, CURRENT_USER, app "
                  "USING (true) WITH CHECK (true);\n"),
        policy(4, "CREATE POLICY p4 ON public.t USING (true);\n"),
        TocEntry(5, "COMMENT", 0, False, "public", "POLICY p3", (3,),
                 defn="COMMENT ON POLICY p3 ON public.t IS 'edits';\n"),
    ], 0)
    target = TargetFacts("master", False, {"master": True, "app": True}, {})
    fit = plan(toc, target)
    assert fit.skip == {2, 3, 5}
    assert fit.after == ["CREATE POLICY p3 ON public.t FOR UPDATE TO current_user, \"app\" "
                         "USING (true) WITH CHECK (true);",
                         "COMMENT ON POLICY p3 ON public.t IS 'edits';"]
    assert fit.warnings[0].startswith("policy p2 on table public.t not restored: its role "
                                      "authenticated does not exist on the target server")
    assert fit.warnings[1] == "policy p3 on table public.t not restored: for role anon, " \
                              "which does not exist on the target server (restored for " \
                              "current_user, app only)"
    assert plan(toc, target, no_owner=True).skip == {2, 3, 5}  # --no-owner keeps policies
    # A partial restore without the policies: nothing is made for them, nor refused.
    alone = Selection(entries={1: ("TABLE", "public", "t")}, rows=frozenset())
    assert plan(toc, target, only=alone).after == []
    assert provider_role("supabase_storage_v2") and provider_role("neon_superuser")
    assert not provider_role("app") and not provider_role("tenant")

    toc.entries.append(policy(6, "CREATE POLICY p6 ON public.t AS RESTRICTIVE TO anon "
                                 "USING (false);\n"))
    with pytest.raises(RestoreFailed, match="restrictive policy left out would change"):
        plan(toc, target)
    toc.entries[-1] = policy(6, 'CREATE POLICY p6 ON public.t TO "Billing" USING (true);\n')
    with pytest.raises(RestoreFailed, match=re.escape(
            "policy p6 on table public.t applies to role 'Billing', which does not exist on "
            "the target server: create it first (the backup's globals hold it) or map it "
            "with --role-map Billing=ROLE")):
        plan(toc, target)
    mapped = plan(toc, target, role_map={"Billing": "app", "authenticated": "app"})
    assert 'CREATE POLICY p6 ON public.t TO "app" USING (true);' in mapped.after
    assert 'CREATE POLICY p2 ON public.t TO "app" USING (true);' in mapped.after

    defaults = Toc((1, 14), 4, 8, False, [TocEntry(
        1, "DEFAULT ACL", 0, False, "public", "DEFAULT PRIVILEGES FOR TABLES", owner="master",
        acl="ALTER DEFAULT PRIVILEGES FOR ROLE master IN SCHEMA public GRANT SELECT ON TABLES"
            " TO auditor;\n")], 0)
    with pytest.raises(RestoreFailed, match="default privileges for tables in schema public "
                                            "of role master is granted to role 'auditor'"):
        plan(defaults, target)
    assert plan(defaults, target, role_map={"auditor": "app"}).after == [
        'ALTER DEFAULT PRIVILEGES FOR ROLE master IN SCHEMA public GRANT SELECT ON TABLES TO '
        '"app";']
