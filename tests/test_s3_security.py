"""Least privilege and hardened storage: the S3 calls each command makes (as docs/security.md
lists them, logical and physical), its IAM policies enforced by an S3 server, Object Lock, SSE-C.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pwd
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from botocore.exceptions import ClientError
from psycopg import sql

import test_physical as physical
from cli_runner import one_line_error, pgvault
from dbcompare import assert_databases_equal
from fixtures_iam import IamS3
from pgvault.catalog import Catalog
from pgvault.ops.prune import Policy, prune
from pgvault.ops.wal import archived
from pgvault.pg.cluster import EphemeralCluster
from pgvault.pipeline.age import new_identity
from pgvault.storage import open_storage
from pgvault.storage.s3 import S3Options, S3Storage
from sampledb import fill_sized_database

# Archiving clusters as tests/test_physical.py sets them up: its fixtures, requested by name.
from test_physical import archiving, pitr_dir, repo_dir, server_pgvault  # noqa: F401

DOC = Path(__file__).parent.parent / "docs" / "security.md"
ROLE_OF = {"backup": "writer", "list": "reader", "show": "reader", "status": "reader",
           "restore": "reader", "verify": "reader", "prune": "pruner", "pin": "pruner",
           "unpin": "pruner", "basebackup": "writer", "wal-push": "archiver",
           "wal-fetch": "reader", "check-archive": "reader", "restore --physical": "reader"}
ROLES = ("writer", "reader", "pruner", "archiver")
PHYSICAL = ("basebackup", "wal-push", "wal-fetch", "check-archive", "restore --physical")
IAM_ACTION = {"PutObject": "s3:PutObject", "CreateMultipartUpload": "s3:PutObject",
              "UploadPart": "s3:PutObject", "CompleteMultipartUpload": "s3:PutObject",
              "AbortMultipartUpload": "s3:AbortMultipartUpload", "GetObject": "s3:GetObject",
              "HeadObject": "s3:GetObject", "ListObjectsV2": "s3:ListBucket",
              "DeleteObject": "s3:DeleteObject", "DeleteObjects": "s3:DeleteObject"}
Calls = set[tuple[str, str]]


# ---------------------------------------------------------------- what the docs say


def documented_calls() -> dict[str, Calls]:
    """command -> {(operation, key area)} from the table in docs/security.md."""
    table = DOC.read_text().split("### The exact S3 calls", 1)[1].split("\n### ", 1)[0]
    found: dict[str, Calls] = {}
    rows = re.findall(r"^\| ([\w-]+(?: --[\w-]+)?) \| ([\w, ]+) \| (.+) \|$", table, re.MULTILINE)
    for command, operations, areas in rows:
        for op in operations.split(", "):
            for key_area in re.findall(r"`([^`]+)`", areas):
                found.setdefault(command, set()).add((op, key_area))
    return found


def assert_documented(seen: dict[str, Calls]) -> dict[str, Calls]:
    """Fail on any call a command made that the docs' table does not list; return the table."""
    documented = documented_calls()
    for command, calls in seen.items():
        undocumented = calls - documented[command]
        assert not undocumented, f"{command} makes S3 calls docs/security.md does not list: " \
                                 f"{sorted(undocumented)}"
    return documented


def documented_policy(role: str, bucket: str = "acme-backups", prefix: str = "app") -> Any:
    """The JSON policy of ``role`` in docs/security.md, for ``bucket`` and ``prefix``."""
    match = re.search(rf"\*\*{role}\*\*.*?```json\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, f"no {role} policy in {DOC}"
    text = match[1].replace("acme-backups", bucket).replace('"app/', f'"{prefix}/') \
        .replace("/app/", f"/{prefix}/")
    return json.loads(text)


def allows(policy: Any, action: str, resource: str, prefix: str | None = None) -> bool:
    """A plain reading of Allow statements: actions, resources and s3:prefix conditions.

    ``prefix`` is what a list asks for; S3 also judges a read of a missing key by the
    right to list that key (404 if the caller may, else 403).
    """
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [
            statement["Action"]]
        condition = statement.get("Condition", {})
        assert set(condition) <= {"StringLike"}, condition
        prefixes = condition.get("StringLike", {}).get("s3:prefix")
        listed = prefixes is None or (
            prefix is not None and any(fnmatch.fnmatch(prefix, p) for p in prefixes))
        if statement["Effect"] == "Allow" and any(fnmatch.fnmatch(action, a) for a in actions) \
                and any(fnmatch.fnmatch(resource, r) for r in statement["Resource"]) and listed:
            return True
    return False


def example_key(key_area: str) -> str:
    """A key in ``key_area`` of repository ``app``, for cluster ``main``."""
    return "app/" + key_area.replace("*", "main") + ("x" if key_area.endswith("/") else "")


def test_documented_policies_grant_exactly_what_each_role_needs() -> None:
    calls = documented_calls()
    assert set(calls) == set(ROLE_OF), "every command has rows in the table"
    for command, needed in calls.items():
        policy = documented_policy(ROLE_OF[command])
        for op, key_area in needed:
            key = example_key(key_area)
            allowed = (allows(policy, "s3:ListBucket", "arn:aws:s3:::acme-backups", key)
                       if op == "ListObjectsV2"
                       else allows(policy, IAM_ACTION[op], f"arn:aws:s3:::acme-backups/{key}"))
            assert allowed, (command, op, key_area)
    bucket, obj = "arn:aws:s3:::acme-backups", "arn:aws:s3:::acme-backups/app/{}".format
    writer, reader, pruner, archiver = (documented_policy(role) for role in ROLES)
    for key_area in ("backups/", "manifests/", "drills/"):
        assert not allows(writer, "s3:DeleteObject", obj(key_area + "x")), key_area
        assert not allows(writer, "s3:GetObject", obj(key_area + "x")), key_area
        assert not allows(writer, "s3:ListBucket", bucket, f"app/{key_area}"), key_area
    assert not allows(writer, "s3:ListBucket", bucket)
    assert not allows(reader, "s3:DeleteObject", obj("backups/x"))
    assert not allows(pruner, "s3:PutObject", obj("backups/x"))
    segment = "wal/main/00000001/000000010000000000000003/" + "0" * 64 + ".zst.age"
    # Only the archiver writes WAL; it writes nothing else, and reads no WAL back.
    for role in (writer, reader, pruner):
        assert not allows(role, "s3:PutObject", obj(segment))
    for key_area in ("backups/", "manifests/", "locks/", "status/", "drills/", "keys/"):
        for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject"):
            assert not allows(archiver, action, obj(key_area + "x")), (action, key_area)
        assert not allows(archiver, "s3:ListBucket", bucket, f"app/{key_area}")
    assert not allows(archiver, "s3:GetObject", obj(segment))
    assert not allows(archiver, "s3:DeleteObject", obj(segment))
    # Records read before they may exist: the role may list their key, so S3 says 404.
    for role, record in ((writer, "identity.json"), (pruner, "identity.json"),
                         (archiver, "identity.json"), (archiver, "push-failures.json")):
        assert allows(role, "s3:ListBucket", bucket, f"app/wal/main/{record}"), record
    for role in (writer, reader, pruner, archiver):  # nothing outside the repository prefix
        assert not allows(role, "s3:GetObject", "arn:aws:s3:::acme-backups/other/manifests/x")
        assert not allows(role, "s3:PutObject", "arn:aws:s3:::acme-backups/other/wal/x")
        assert not allows(role, "s3:ListBucket", bucket, "other/wal/")


# ---------------------------------------------------------------- what pgvault does


def area(key: str) -> str:
    """The top-level folder of a repository key ("backups/", "locks/", ...); the WAL
    archive's two records by name ("wal/*/identity.json"), as policies grant them."""
    head, slash, rest = key.partition("/")
    if head == "wal" and rest.count("/") == 1 and rest.endswith(".json"):
        return "wal/*/" + rest.partition("/")[2]
    return head + slash if slash else key


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Calls]]:
    """Run pgvault in this process; return the S3 operations it made, by key area.

    boto3 and the S3 server are real; a botocore event handler registered on each
    S3Storage's client only observes the calls.
    """
    calls: Calls = set()
    original = S3Storage.__init__

    def init(self: S3Storage, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        root = self._root

        def observe(params: dict[str, Any], model: Any, **_: Any) -> None:
            keys = [params.get("Key") or params.get("Prefix") or ""]
            if model.name == "DeleteObjects":
                keys = [o["Key"] for o in params["Delete"]["Objects"]]
            for key in keys:
                calls.add((model.name, area(key[len(root):])))

        self._client.meta.events.register("provide-client-params.s3", observe)

    monkeypatch.setattr(S3Storage, "__init__", init)

    def run(*args: str, env: dict[str, str], exit_code: int = 0) -> Calls:
        from pgvault.cli.app import cli

        calls.clear()
        with monkeypatch.context() as mp:
            for name in [n for n in os.environ if n.startswith("PGVAULT_")]:
                mp.delenv(name)
            for name, value in env.items():
                mp.setenv(name, value)
            try:  # wal-push and wal-fetch report failures by exit status, as the server reads it
                cli.main(args=list(args), prog_name="pgvault", standalone_mode=False)
                code: object = 0
            except SystemExit as exc:
                code = exc.code
        assert code == exit_code, f"pgvault {' '.join(args)} exited {code}, not {exit_code}"
        return set(calls)

    yield run


@pytest.fixture(scope="module")
def _sized_template(pg_cluster: EphemeralCluster) -> Iterator[str]:
    name = f"sized_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    fill_sized_database(pg_cluster.url(name), 60000)
    yield pg_cluster.url(name)
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def sized_db(make_db: Callable[..., str], _sized_template: str) -> str:
    """About 9 MB of dump: above the 5 MiB part size, so uploads go multipart."""
    return make_db(_sized_template)




def encrypted_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    text, recipient = new_identity()
    key = tmp_path / f"key-{uuid.uuid4().hex[:6]}.txt"
    key.write_text(text)
    return {"PGVAULT_AGE_RECIPIENTS": recipient, "PGVAULT_AGE_IDENTITY_FILE": str(key)}, key


def test_every_s3_call_of_every_command_is_documented(
    record: Callable[..., Calls], sized_db: str, s3_server: str, s3_bucket: str,
    pg_cluster: EphemeralCluster, new_name: Callable[[], str], tmp_path: Path
) -> None:
    age, _ = encrypted_env(tmp_path)
    env = {"PGVAULT_S3__ENDPOINT_URL": s3_server, "PGVAULT_S3__PATH_STYLE": "true",
           "PGVAULT_S3__PART_SIZE_MB": "5", "PGVAULT_REPO": f"s3://{s3_bucket}/app", **age}
    keep_one = {**env, "PGVAULT_RETENTION__KEEP_LAST": "1", "PGVAULT_RETENTION__KEEP_DAILY": "0",
                "PGVAULT_RETENTION__KEEP_WEEKLY": "0", "PGVAULT_RETENTION__KEEP_MONTHLY": "0"}
    seen: dict[str, Calls] = {}

    def run(command: str, *args: str, run_env: dict[str, str] = env) -> None:
        seen.setdefault(command, set()).update(record(command, *args, env=run_env))

    first = new_name()
    run("backup", "--dbname", sized_db, "--compression", "none")
    run("restore", "latest", "--to", first, "--dbname", pg_cluster.url())
    assert_databases_equal(sized_db, pg_cluster.url(first))
    run("backup", "--dbname", sized_db, "--compression", "none")
    for command in ("list", "show", "status"):
        run(command)
    run("verify", "latest", "--level", "facts")
    run("prune", run_env=keep_one)
    run("pin", "latest", "--reason", "audit")
    run("unpin", "latest")
    last = new_name()
    run("restore", "latest", "--to", last, "--dbname", pg_cluster.url())
    assert_databases_equal(sized_db, pg_cluster.url(last))

    assert ("UploadPart", "backups/") in seen["backup"], "the multipart path was exercised"
    assert ("DeleteObjects", "backups/") in seen["prune"], "prune removed a backup"
    assert_documented(seen)
    deletes = {a for op, a in seen["backup"] if op.startswith("Delete")}
    assert deletes == {"locks/"}, "a backup deletes nothing but its lock"


def physical_config(folder: Path, endpoint: str, repo: str, recipient: str) -> Path:
    """The config file an archiving server's wal-push reads (it sees no test environment)."""
    config = folder / "pgvault.toml"
    config.write_text(f'repo = "{repo}"\n[s3]\nendpoint_url = "{endpoint}"\npath_style = true\n'
                      f'[encryption]\nrecipients = ["{recipient}"]\n')
    return config


def postgres_owned_keys(folder: Path) -> tuple[Path, str]:
    """An age identity file in ``folder`` the postgres OS user can read; its recipient."""
    text, recipient = new_identity()
    identity = folder / "identity.txt"
    identity.write_text(text)
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(identity, owner.pw_uid, owner.pw_gid)
    return identity, recipient


def test_every_s3_call_of_the_physical_commands_is_documented(
    record: Callable[..., Calls], request: pytest.FixtureRequest, s3_server: str,
    s3_bucket: str, pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    """basebackup, wal-push (new, repeated, refused, multipart), wal-fetch, check-archive,
    restore --physical; and status, verify, prune once the repository holds base backups."""
    start_archiving = request.getfixturevalue("archiving")
    keys = physical._postgres_owned_dir("pgvault-keys-")
    request.addfinalizer(lambda: shutil.rmtree(keys, ignore_errors=True))
    identity, recipient = postgres_owned_keys(keys)
    repo = f"s3://{s3_bucket}/app"
    config = physical_config(keys, s3_server, repo, recipient)
    env = {"PGVAULT_S3__ENDPOINT_URL": s3_server, "PGVAULT_S3__PATH_STYLE": "true",
           "PGVAULT_REPO": repo, "PGVAULT_AGE_RECIPIENTS": recipient,
           "PGVAULT_AGE_IDENTITY_FILE": str(identity)}
    seen: dict[str, Calls] = {}

    def run(command: str, *args: str, run_env: dict[str, str] = env, exit_code: int = 0,
            label: str | None = None) -> None:
        calls = record(command, *args, env=run_env, exit_code=exit_code)
        seen.setdefault(label or command, set()).update(calls)

    cluster = start_archiving(f"--config {config}")  # the server's own wal-push: not recorded
    admin = cluster.url()
    physical.sql(admin, physical.CREATE_APP)
    physical.sql(cluster.url("app"), "CREATE TABLE orders (id int PRIMARY KEY, note text)",
                 physical.insert(1, 500))
    # Uncompressed, base.tar is above the 5 MiB part size: the multipart path.
    run("basebackup", "-d", admin, "--fast-checkpoint", "--compression", "none")
    physical.sql(cluster.url("app"), physical.insert(501, 1000))
    run("check-archive", "-d", admin)

    storage = open_storage(repo, S3Options(endpoint_url=s3_server, path_style=True))
    walfile = max(f.wal.name for f in archived(storage, "main") if f.wal.kind == "segment")
    fetched = tmp_path / "fetched" / walfile
    fetched.parent.mkdir()
    run("wal-fetch", walfile, str(fetched))
    run("wal-fetch", "0000000100000000000000FF", str(tmp_path / "missing"), exit_code=1)
    run("wal-push", str(fetched))  # already archived: found, not written
    damaged = tmp_path / "damaged" / walfile
    damaged.parent.mkdir()
    data = bytearray(fetched.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    run("wal-push", str(damaged), exit_code=6)  # split brain: refused, and recorded
    run("wal-push", str(fetched), "--cluster", "copy")  # first push: binds the name
    big = physical._completed_segment(pg_cluster, tmp_path / "big")  # 16 MB: a multipart upload
    run("wal-push", str(big), "--cluster", "big",
        run_env={**env, "PGVAULT_COMPRESSION__ALGORITHM": "none"})
    run("restore", "--physical", "latest", "--pgdata", str(tmp_path / "restored"),
        label="restore --physical")

    run("basebackup", "-d", admin, "--fast-checkpoint")
    run("status")
    run("verify", "latest", "--level", "integrity")
    run("prune", run_env={**env, "PGVAULT_RETENTION__KEEP_LAST": "1",
                          "PGVAULT_RETENTION__KEEP_DAILY": "0",
                          "PGVAULT_RETENTION__KEEP_WEEKLY": "0",
                          "PGVAULT_RETENTION__KEEP_MONTHLY": "0"})
    assert ("UploadPart", "backups/") in seen["basebackup"], "multipart base.tar"
    assert ("UploadPart", "wal/") in seen["wal-push"], "multipart WAL"
    assert ("PutObject", "wal/*/push-failures.json") in seen["wal-push"], "a failure recorded"
    assert ("DeleteObjects", "wal/") in seen["prune"], "prune removed archived WAL"
    documented = assert_documented(seen)
    # The other way too: a row no physical call needs any more would be a grant too many.
    for command in (*PHYSICAL, "status", "verify", "prune"):
        rows = {(op, a) for op, a in documented[command] - seen[command]
                if op != "AbortMultipartUpload" and (command in PHYSICAL or a.startswith("wal/"))}
        assert not rows, f"{command} no longer makes these documented calls: {sorted(rows)}"
    assert {a for op, a in seen["basebackup"] if op.startswith("Delete")} == {"locks/"}
    assert not [op for op, _ in seen["wal-push"] if op.startswith("Delete")]
    assert ("GetObject", "wal/") not in seen["wal-push"], "wal-push reads no WAL back"


def test_each_role_can_do_its_job_and_nothing_else(
    iam_s3: IamS3, sized_db: str, pg_cluster: EphemeralCluster,
    new_name: Callable[[], str], tmp_path: Path
) -> None:
    """docs/security.md's policies on an S3 server that enforces IAM (moto: by action and
    resource ARN; it does not check DeleteObjects per key, which the test above covers)."""
    bucket = iam_s3.bucket()
    age, _ = encrypted_env(tmp_path)
    base = {"PGVAULT_S3__ENDPOINT_URL": iam_s3.endpoint, "PGVAULT_S3__PATH_STYLE": "true",
            "PGVAULT_S3__PART_SIZE_MB": "5", "PGVAULT_REPO": f"s3://{bucket}/app", **age}
    policies = {name: documented_policy(name, bucket) for name in ("writer", "reader", "pruner")}
    # moto judges DeleteObjects (several keys in one request) by the bucket's ARN, where AWS
    # judges each key; this statement, meaningless on AWS, lets prune's batches through.
    policies["pruner"]["Statement"].append({"Effect": "Allow", "Action": "s3:DeleteObject",
                                            "Resource": f"arn:aws:s3:::{bucket}"})
    role = {name: {**base, **iam_s3.user(policy)} for name, policy in policies.items()}
    at = ["--dbname", pg_cluster.url()]

    pgvault("backup", "--dbname", sized_db, "--compression", "none", env=role["writer"])
    first = new_name()
    pgvault("restore", "latest", "--to", first, *at, env=role["reader"])
    assert_databases_equal(sized_db, pg_cluster.url(first))
    pgvault("backup", "--dbname", sized_db, env=role["writer"])
    pgvault("verify", "latest", "--level", "integrity", env=role["reader"])
    assert len(json.loads(pgvault("list", "--json", env=role["reader"]).stdout)) == 2

    # The writer can neither read backups nor prune; the reader cannot write backups.
    for args in (["list"], ["restore", "latest", "--to", new_name(), *at], ["prune"]):
        line = one_line_error(pgvault(*args, env=role["writer"], expect=5))
        assert "AccessDenied" in line, line
    # (A warning that the run could not be recorded in status/ may come first.)
    line = pgvault("backup", "--dbname", sized_db, env=role["reader"], expect=5).stderr
    assert "AccessDenied" in line.splitlines()[-1] and "locks/" in line.splitlines()[-1]
    line = pgvault("backup", "--dbname", sized_db, env=role["pruner"], expect=5).stderr
    assert "AccessDenied" in line.splitlines()[-1] and "backups/" in line.splitlines()[-1]

    keep_one = {**role["pruner"], "PGVAULT_RETENTION__KEEP_LAST": "1",
                "PGVAULT_RETENTION__KEEP_DAILY": "0", "PGVAULT_RETENTION__KEEP_WEEKLY": "0",
                "PGVAULT_RETENTION__KEEP_MONTHLY": "0"}
    pgvault("pin", "latest", "--reason", "audit", env=role["pruner"])
    pgvault("unpin", "latest", env=role["pruner"])
    report = json.loads(pgvault("prune", "--json", env=keep_one).stdout)
    assert sum(len(db["remove"]) for db in report["databases"].values()) == 1
    last = new_name()
    pgvault("restore", "latest", "--to", last, *at, env=role["reader"])
    assert_databases_equal(sized_db, pg_cluster.url(last))


def test_physical_roles_archive_back_up_restore_and_prune_under_iam(
    iam_s3: IamS3, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The server archives as the archiver, basebackup runs as the writer, check-archive,
    wal-fetch and restore --physical (and the restored server's restore_command) as the
    reader, prune as the pruner: each under its policy from docs/security.md."""
    start_archiving = request.getfixturevalue("archiving")
    restores: Path = request.getfixturevalue("pitr_dir")
    server_bin: str = request.getfixturevalue("server_pgvault")
    keys = physical._postgres_owned_dir("pgvault-keys-")
    request.addfinalizer(lambda: shutil.rmtree(keys, ignore_errors=True))
    identity, recipient = postgres_owned_keys(keys)
    bucket = iam_s3.bucket()
    config = physical_config(keys, iam_s3.endpoint, f"s3://{bucket}/app", recipient)
    policies = {name: documented_policy(name, bucket) for name in ROLES}
    # As above: moto judges DeleteObjects by the bucket's ARN.
    policies["pruner"]["Statement"].append({"Effect": "Allow", "Action": "s3:DeleteObject",
                                            "Resource": f"arn:aws:s3:::{bucket}"})
    credentials = {name: iam_s3.user(policy) for name, policy in policies.items()}
    role = {name: {**creds, "PGVAULT_CONFIG": str(config),
                   "PGVAULT_AGE_IDENTITY_FILE": str(identity)}
            for name, creds in credentials.items()}

    archiver = " ".join(f"{k}={v}" for k, v in credentials["archiver"].items())
    cluster = start_archiving(f"--config {config}", prefix=f"{archiver} ")
    admin, app = cluster.url(), cluster.url("app")
    physical.sql(admin, physical.CREATE_APP)
    physical.sql(app, "CREATE TABLE orders (id int PRIMARY KEY, note text)",
                 physical.insert(1, 500))
    first = json.loads(pgvault("basebackup", "-d", admin, "--fast-checkpoint", "--json",
                               env=role["writer"]).stdout)
    assert first["physical"]["wal_included"] is False, "its WAL came through the archiver"
    physical.sql(app, physical.insert(501, 1000))
    checked = json.loads(pgvault("check-archive", "-d", admin, "--json",
                                 env=role["reader"]).stdout)
    walfile = checked["checked"]["walfile"]

    fetched = tmp_path / "fetched" / walfile
    fetched.parent.mkdir()
    pgvault("wal-fetch", walfile, str(fetched), env=role["reader"])
    # The archiver cannot read the archive back (126: recovery would stop, not end early).
    denied = pgvault("wal-fetch", walfile, str(tmp_path / "x"), env=role["archiver"],
                     expect=126)
    assert "AccessDenied" in one_line_error(denied)
    # A refused push is counted where monitoring reads it: the archiver reads and rewrites it.
    damaged = tmp_path / "damaged" / walfile
    damaged.parent.mkdir()
    data = bytearray(fetched.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    for _ in range(2):
        refused = pgvault("wal-push", str(damaged), env=role["archiver"], expect=6)
        assert "split brain" in refused.stderr
    (status,) = json.loads(pgvault("status", "--json", env=role["reader"]).stdout)
    assert status["archive"]["push_failures_total"] == 2
    # Only the archiver writes WAL; it cannot write backups.
    for name in ("writer", "reader", "pruner"):
        line = one_line_error(pgvault("wal-push", str(fetched), "--cluster", "other",
                                      env=role[name], expect=5))
        assert "AccessDenied" in line and "wal/other/" in line, (name, line)
    line = one_line_error(pgvault("basebackup", "-d", admin, env=role["archiver"], expect=5))
    assert "AccessDenied" in line and "locks/" in line, line

    pgdata, port = restores / "end", physical._free_port()
    pgvault("restore", "--physical", "latest", "--pgdata", str(pgdata), "--start", "--port",
            str(port), "--pgvault-bin", server_bin, env=role["reader"])
    try:
        restored = f"postgresql://postgres@127.0.0.1:{port}/app"
        assert physical.order_ids(restored) == list(range(1, 1001))
    finally:
        physical._stop_server(pgdata)

    pgvault("basebackup", "-d", admin, "--fast-checkpoint", env=role["writer"])
    keep_one = {**role["pruner"], "PGVAULT_RETENTION__KEEP_LAST": "1",
                "PGVAULT_RETENTION__KEEP_DAILY": "0", "PGVAULT_RETENTION__KEEP_WEEKLY": "0",
                "PGVAULT_RETENTION__KEEP_MONTHLY": "0"}
    report = json.loads(pgvault("prune", "--json", env=keep_one).stdout)
    assert [d["id"] for d in report["databases"]["main"]["remove"]] == [first["id"]]
    assert report["wal"], "archived WAL older than the kept base backup was removed"
    pgvault("check-archive", "--no-switch", env=role["reader"])  # and no gap was made


# ---------------------------------------------------------------- Object Lock


def test_object_lock_retains_every_object_and_prune_reports_locked_backups(
    make_db: Callable[..., str], s3_server: str, s3_client: Any, pg_cluster: EphemeralCluster,
    new_name: Callable[[], str], tmp_path: Path
) -> None:
    bucket = f"pgvault-lock-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v "
                     "FROM generate_series(1, 2000) g")
    age, _ = encrypted_env(tmp_path)
    env = {"PGVAULT_S3__ENDPOINT_URL": s3_server, "PGVAULT_S3__PATH_STYLE": "true",
           "PGVAULT_REPO": f"s3://{bucket}/app", "PGVAULT_S3__OBJECT_LOCK__MODE": "governance",
           "PGVAULT_S3__OBJECT_LOCK__DAYS": "1", **age}
    keep_one = {**env, "PGVAULT_RETENTION__KEEP_LAST": "1", "PGVAULT_RETENTION__KEEP_DAILY": "0",
                "PGVAULT_RETENTION__KEEP_WEEKLY": "0", "PGVAULT_RETENTION__KEEP_MONTHLY": "0"}
    pgvault("backup", "--dbname", url, env=env)
    first = new_name()
    pgvault("restore", "latest", "--to", first, "--dbname", pg_cluster.url(), env=env)
    assert_databases_equal(url, pg_cluster.url(first))
    pgvault("backup", "--dbname", url, env=env)

    soon = datetime.now(UTC) + timedelta(hours=23)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any("/manifests/" in k for k in keys) and any(".age" in k for k in keys)
    for key in keys:
        head = s3_client.head_object(Bucket=bucket, Key=key)
        assert head["ObjectLockMode"] == "GOVERNANCE", key
        assert head["ObjectLockRetainUntilDate"] > soon, key

    ids = [m["id"] for m in json.loads(pgvault("list", "--json", env=env).stdout)]
    proc = pgvault("prune", "--json", env=keep_one)
    report = json.loads(proc.stdout)
    assert list(report["locked"]) == [ids[0]]
    assert [m["id"] for m in json.loads(pgvault("list", "--json", env=env).stdout)] == ids
    assert "object lock until" in pgvault("prune", env=keep_one).stdout

    # Once retention has passed (simulated clock), prune removes the backup as usual...
    storage = S3Storage(bucket, "app", S3Options(endpoint_url=s3_server, path_style=True,
                                                 object_lock_mode="GOVERNANCE",
                                                 object_lock_days=1))
    later = prune(storage, Policy(last=1, daily=0, weekly=0, monthly=0), dry_run=False,
                  now=datetime.now(UTC) + timedelta(days=2), lock_stale_after=timedelta(hours=1))
    assert later.locked == {}
    assert [d.id for plan in later.databases.values() for d in plan.remove] == [ids[0]]
    assert [m.id for m in Catalog(storage).list()] == [ids[1]]
    # ...but the store still holds every locked version: no credential can destroy them yet.
    versions = s3_client.list_object_versions(Bucket=bucket, Prefix="app/manifests/")
    old = [v for v in versions["Versions"] if ids[0] in v["Key"]]
    assert old, "the removed backup's manifest version is retained"
    with pytest.raises(ClientError, match="AccessDenied"):
        s3_client.delete_object(Bucket=bucket, Key=old[0]["Key"], VersionId=old[0]["VersionId"])
    last = new_name()
    pgvault("restore", "latest", "--to", last, "--dbname", pg_cluster.url(), env=env)
    assert_databases_equal(url, pg_cluster.url(last))


# ---------------------------------------------------------------- SSE-C


def test_sse_c_key_goes_with_every_request_that_touches_object_data(
    s3_options: S3Options, s3_bucket: str
) -> None:
    key = os.urandom(32)
    storage = S3Storage(s3_bucket, "ssec", replace(s3_options, sse=None, sse_customer_key=key,
                                                    part_size=5 << 20))
    sent: list[tuple[str, bool]] = []
    storage._client.meta.events.register(
        "provide-client-params.s3",
        lambda params, model, **_: sent.append((model.name, params.get("SSECustomerKey") == key)))
    data = os.urandom(12 << 20)
    import io

    storage.put("big", io.BytesIO(data))
    storage.put_bytes("small", b"x" * 100)
    storage.create("new", b"y")
    assert storage.open("big").read() == data
    assert storage.stat("small").size == 100
    data_ops = {"PutObject", "CreateMultipartUpload", "UploadPart", "GetObject", "HeadObject"}
    assert {op for op, _ in sent} >= data_ops
    for op, with_key in sent:
        assert with_key == (op in data_ops), op
    with pytest.raises(Exception, match="SSE-C"):
        S3Options(sse="AES256", sse_customer_key=key)


# ---------------------------------------------------------------- the IAM server itself


def test_the_iam_server_judges_multipart_uploads_as_aws_does(iam_s3: IamS3) -> None:
    """On AWS, s3:PutObject covers CreateMultipartUpload, UploadPart and
    CompleteMultipartUpload. moto 5.2.6 judges them by their own names (no such IAM actions),
    denying the documented writer and archiver; constraints.txt pins a moto that does not.
    A role without s3:PutObject must still be refused, so a wrong policy still fails."""
    bucket = iam_s3.bucket()
    writer = iam_s3.client(iam_s3.user({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
         "Resource": [f"arn:aws:s3:::{bucket}/app/*"]}]}))
    reader = iam_s3.client(iam_s3.user({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"arn:aws:s3:::{bucket}/app/*"]}]}))
    try:
        upload = writer.create_multipart_upload(Bucket=bucket, Key="app/big")["UploadId"]
        part = writer.upload_part(Bucket=bucket, Key="app/big", UploadId=upload, PartNumber=1,
                                  Body=b"x" * 100)
        writer.complete_multipart_upload(
            Bucket=bucket, Key="app/big", UploadId=upload,
            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    except ClientError as exc:
        pytest.fail(f"the moto server refuses multipart uploads under s3:PutObject ({exc}); "
                    "it is not the moto constraints.txt pins (scripts/bootstrap --test)")
    assert iam_s3.admin.get_object(Bucket=bucket, Key="app/big")["Body"].read() == b"x" * 100
    for denied in (lambda: reader.create_multipart_upload(Bucket=bucket, Key="app/r"),
                   lambda: writer.create_multipart_upload(Bucket=bucket, Key="other/w")):
        with pytest.raises(ClientError, match="AccessDenied"):
            denied()
