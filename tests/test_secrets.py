"""Secrets never leak: not in argv or child environments, not in any byte pgvault prints
or stores, on success and on failure; private files whatever the umask; warnings where due.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

import boto3
import psutil
import psycopg
import pytest
from psycopg import sql

from cli_runner import PGVAULT, one_line_error, pgvault
from dbcompare import assert_databases_equal
from fixtures_iam import IamS3
from fixtures_kill import every_file, files_holding, has_child, kill_when, start, wait_gone
from http_recorder import Recorder
from pgvault import redact
from pgvault.pg.cluster import EphemeralCluster
from pgvault.pipeline.age import new_identity

TAG = uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Planted:
    """Distinct secrets, with characters that URL encoding changes."""

    db_password: str = f"dbPw:{TAG}/@+ x%"
    wrong_password: str = f"wrongPw:{TAG}/@+ y"
    aws_secret: str = f"awsSecret+{TAG}/Zq="
    aws_token: str = f"sessToken/{TAG}+Qw=="
    passphrase: str = f"pass phrase {TAG}!"
    webhook_token: str = f"hookToken{TAG}abcdef0123456789"
    sse_c_key: str = base64.b64encode(f"sse-c-key-{TAG}-0123456789abcdef".encode()[:32]).decode()

    def all(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def forms(self) -> dict[str, str]:
        """Every secret in the forms it could be printed in."""
        found = {}
        for name, value in self.all().items():
            for form in {value, quote(value, safe=""), quote_plus(value), quote(value)}:
                found[form] = name
        return found


PLANTED = Planted()


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return sorted({name for form, name in PLANTED.forms().items() if form.encode() in data})


@pytest.fixture
def password_role(pg_cluster: EphemeralCluster, make_db: Callable[..., str]) -> Iterator[str]:
    """A database owned by a role that must log in with PLANTED.db_password (SCRAM over TCP)."""
    role = f"secret_{TAG}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(PLANTED.db_password)))
    hba = pg_cluster.data_dir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + original)
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    url = make_db()
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(dbname), sql.Identifier(role)))
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 3000) g")
    time.sleep(0.2)  # the reload is asynchronous
    try:
        yield f"postgresql://{role}:{quote(PLANTED.db_password, safe='')}@127.0.0.1:" \
              f"{pg_cluster.port}/{dbname}"
    finally:
        hba.write_text(original)
        with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")


def restore_target(pg_cluster: EphemeralCluster) -> str:
    return f"restored_{uuid.uuid4().hex[:10]}"


def drop(pg_cluster: EphemeralCluster, *names: str) -> None:
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def secret_env(tmp_path: Path, url: str, recorder: Recorder, s3_server: str,
               bucket: str) -> dict[str, str]:
    """Every secret pgvault takes, planted: URL, S3 keys, passphrase, webhook, SSE-C key."""
    config = tmp_path / "pgvault.toml"
    config.write_text(f'[notify]\nwebhook_url = "{recorder.url}/hook/{PLANTED.webhook_token}"\n'
                      'events = ["all"]\n')
    config.chmod(0o600)
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PLANTED.passphrase)
    return {
        "DATABASE_URL": url,
        "PGVAULT_CONFIG": str(config),
        "PGVAULT_REPO": f"s3://{bucket}/app",
        "PGVAULT_S3__ENDPOINT_URL": s3_server,
        "PGVAULT_S3__PATH_STYLE": "true",
        "PGVAULT_S3__SSE": "sse-c",
        "PGVAULT_S3_SSE_C_KEY": PLANTED.sse_c_key,
        "AWS_SECRET_ACCESS_KEY": PLANTED.aws_secret,
        "AWS_SESSION_TOKEN": PLANTED.aws_token,
        "PGVAULT_ENCRYPTION__PASSPHRASE": "true",
        "PGVAULT_AGE_PASSPHRASE_FILE": str(passphrase_file),
    }


def test_no_secret_in_any_output_or_stored_byte_on_success(
    password_role: str, tmp_path: Path, recorder: Recorder, s3_server: str, s3_bucket: str,
    pg_cluster: EphemeralCluster
) -> None:
    env = secret_env(tmp_path, password_role, recorder, s3_server, s3_bucket)
    target = restore_target(pg_cluster)
    runs = [
        ("backup", "--json"),
        ("list",),
        ("show", "latest", "--json"),
        ("restore", "latest", "--to", target),
        ("verify", "latest", "--level", "integrity", "--json"),
        ("prune", "--dry-run", "--json"),
        ("status",),
    ]
    try:
        for args in runs:
            proc = pgvault(*args, env=env)
            assert leaks(proc.stdout + proc.stderr) == [], args
        assert_databases_equal(password_role, pg_cluster.url(target))
    finally:
        drop(pg_cluster, target)
    # The webhook was really called (so its URL was in use), and nothing stored holds a secret.
    assert recorder.on(f"/hook/{PLANTED.webhook_token}")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any("/manifests/" in k for k in keys)
    for key in keys:
        body = client.get_object(Bucket=s3_bucket, Key=key, SSECustomerAlgorithm="AES256",
                                 SSECustomerKey=base64.b64decode(PLANTED.sse_c_key))
        assert leaks(body["Body"].read()) == [], key


def test_no_secret_in_any_output_on_failure(
    password_role: str, tmp_path: Path, recorder: Recorder, s3_server: str, s3_bucket: str,
    iam_s3: IamS3, pg_cluster: EphemeralCluster
) -> None:
    env = secret_env(tmp_path, password_role, recorder, s3_server, s3_bucket)
    wrong_url = password_role.replace(quote(PLANTED.db_password, safe=""),
                                      quote(PLANTED.wrong_password, safe=""))
    bucket = iam_s3.bucket()
    keys = iam_s3.user({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})
    bad_key = {**env, "PGVAULT_S3__ENDPOINT_URL": iam_s3.endpoint,
               "PGVAULT_REPO": f"s3://{bucket}/app",
               "AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"],
               "AWS_SESSION_TOKEN": ""}  # the planted secret is the wrong one for this key
    unreachable = {**env, "PGVAULT_S3__ENDPOINT_URL": "http://127.0.0.1:9",
                   "AWS_MAX_ATTEMPTS": "1"}
    failures = [
        (("backup",), {**env, "DATABASE_URL": wrong_url}, 4, "password authentication"),
        (("--debug", "backup"), {**env, "DATABASE_URL": wrong_url}, 4, "password"),
        (("backup",), {**env, "PGPASSWORD": PLANTED.wrong_password,
                       "DATABASE_URL": wrong_url.replace(
                           ":" + quote(PLANTED.wrong_password, safe=""), "")}, 4, "password"),
        (("backup",), bad_key, 5, "SignatureDoesNotMatch"),
        (("--debug", "list"), bad_key, 5, "SignatureDoesNotMatch"),
        (("backup",), unreachable, 5, "127.0.0.1:9"),
        (("restore", "latest", "--to", "nowhere"), unreachable, 5, "127.0.0.1:9"),
    ]
    for args, run_env, code, hint in failures:
        proc = pgvault(*args, env=run_env, expect=code)
        assert hint in proc.stderr, (args, proc.stderr)
        if "--debug" not in args:
            one_line_error(proc)
        assert leaks(proc.stdout + proc.stderr) == [], (args, proc.stderr)


def test_no_secret_in_argv_or_child_environment_and_no_passfile_left(
    password_role: str, tmp_path: Path, recorder: Recorder, s3_server: str, s3_bucket: str,
    pg_cluster: EphemeralCluster
) -> None:
    """Sample /proc of pgvault and all its descendants while backup and restore run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    env.pop("PGPASSWORD", None)
    env.update(secret_env(tmp_path, password_role, recorder, s3_server, s3_bucket))
    env["PGVAULT_S3__PART_SIZE_MB"] = "5"
    before = set(Path("/tmp").glob("pgvault-pass-*"))
    target = restore_target(pg_cluster)
    seen: dict[str, set[str]] = {}
    try:
        for args in (["backup"], ["restore", "latest", "--to", target, "-j", "2"]):
            seen.update(_sample(subprocess.Popen([PGVAULT, *args], env=env,
                                                 stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE)))
        assert_databases_equal(password_role, pg_cluster.url(target))
    finally:
        drop(pg_cluster, target)
    tools = {Path(cmd.split("\0")[0]).name for cmd in seen}
    assert {"pg_dump", "pg_restore"} <= tools, f"the sampler missed the children: {tools}"
    for cmdline, environs in seen.items():
        assert leaks(cmdline) == [], cmdline
        for environ in environs:
            assert leaks(environ) == [], f"{cmdline.split(chr(0))[0]} got a secret in its env"
    assert set(Path("/tmp").glob("pgvault-pass-*")) == before, "a PGPASSFILE was left behind"


def _sample(proc: subprocess.Popen[bytes]) -> dict[str, set[str]]:
    """cmdline -> environments seen, for ``proc`` (cmdline only) and every descendant."""
    seen: dict[str, set[str]] = {}
    own = ""
    while proc.poll() is None:
        family = _descendants(proc.pid)
        for pid in [proc.pid, *family]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
                if pid == proc.pid:
                    own = cmdline
                # pgvault itself was given the secrets by design, and so is a fork of it
                # caught before its exec; the programs it runs must not be.
                environ = "" if cmdline == own else Path(f"/proc/{pid}/environ").read_bytes() \
                    .decode("utf-8", "replace")
            except OSError:
                continue
            if cmdline:
                seen.setdefault(cmdline, set()).add(environ)
        time.sleep(0.002)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return seen


def _descendants(root: int) -> list[int]:
    """Every process below ``root``, from /proc/PID/task/TID/children (cheap to poll)."""
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            frontier += children
    return found


# ---------------------------------------------------------------- files and warnings


def test_local_repository_is_private_whatever_the_umask(
    make_db: Callable[..., str], tmp_path: Path, pg_cluster: EphemeralCluster
) -> None:
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g")
    root = tmp_path / "repo"
    key = tmp_path / "key.txt"
    text, recipient = new_identity()
    key.write_text(text)
    target = restore_target(pg_cluster)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    env["PGVAULT_AGE_RECIPIENTS"] = recipient
    try:
        for args in (["backup", "--dbname", url], ["restore", "latest", "--to", target,
                                                   "--dbname", pg_cluster.url(),
                                                   "--identity-file", str(key)]):
            subprocess.run(["sh", "-c", 'umask 000 && exec "$@"', "sh", PGVAULT, *args,
                            "--repo", f"file://{root}"], env=env, check=True,
                           capture_output=True)
        assert_databases_equal(url, pg_cluster.url(target))
    finally:
        drop(pg_cluster, target)
    paths = [root, *root.rglob("*")]
    assert any(p.name.endswith(".age") for p in paths)
    for path in paths:
        assert (path.stat().st_mode & 0o777) == (0o700 if path.is_dir() else 0o600), path


def test_config_file_with_secrets_readable_by_others_draws_a_warning(tmp_path: Path) -> None:
    config = tmp_path / "pgvault.toml"
    config.write_text(f'database = "postgresql://app:{quote(PLANTED.db_password, safe="")}'
                      '@db.internal/app"\n')
    (tmp_path / "repo").mkdir()
    repo = f"file://{tmp_path / 'repo'}"
    config.chmod(0o644)
    proc = pgvault("list", "--repo", repo, "--config", str(config))
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "holds secrets (database)" in warning[0], proc.stderr
    assert f"chmod 600 {config}" in warning[0] and leaks(proc.stderr) == []
    config.chmod(0o600)
    assert "warning" not in pgvault("list", "--repo", repo, "--config", str(config)).stderr
    # Without secrets in it, a readable config file is fine.
    config.write_text("backup_globals = false\n")
    config.chmod(0o644)
    assert "warning" not in pgvault("list", "--repo", repo, "--config", str(config)).stderr


def test_tls_verification_off_needs_a_setting_and_warns(s3_server: str, s3_bucket: str) -> None:
    env = {"PGVAULT_S3__ENDPOINT_URL": s3_server, "PGVAULT_S3__PATH_STYLE": "true",
           "PGVAULT_REPO": f"s3://{s3_bucket}/app"}
    assert "TLS" not in pgvault("list", env=env).stderr
    proc = pgvault("list", env={**env, "PGVAULT_S3__VERIFY_TLS": "false"})
    assert proc.stderr.startswith("warning: TLS certificate verification for the S3 endpoint "
                                  "is off")


def test_scrub_masks_registered_secrets_in_every_form() -> None:
    secret = f"s3cr:t/{TAG} @x"
    redact.register(secret)
    try:
        for form in (secret, quote(secret, safe=""), quote_plus(secret)):
            assert redact.scrub(f"before {form} after") == "before *** after"
        # Passwords in URLs and conninfo are masked even when nobody registered them.
        assert redact.scrub("postgresql://app:unregistered@db/app") == \
            "postgresql://app:***@db/app"
        assert redact.scrub("host=db password='a b' user=x") == "host=db password=*** user=x"
        assert redact.scrub("https://x/?X-Amz-Signature=abcd&a=1") == \
            "https://x/?X-Amz-Signature=***&a=1"
        assert redact.contains_secret(json.dumps({"k": secret}))
    finally:
        redact.forget_all()


def test_credentials_rotate_by_changing_only_their_files(
    password_role: str, tmp_path: Path, iam_s3: IamS3, pg_cluster: EphemeralCluster
) -> None:
    """The database password and the S3 key pair live in *_FILE files: replace the files,
    and the next run uses the new credentials with no other change."""
    role, rest = password_role.split("://", 1)[1].split(":", 1)
    url_without_password = password_role.replace(":" + rest.split("@", 1)[0], "")
    bucket = iam_s3.bucket()
    admin = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    old_keys = iam_s3.user(admin)
    files = {name: tmp_path / name for name in ("pgpassword", "aws_key_id", "aws_secret")}

    def write_credentials(password: str, keys: dict[str, str]) -> None:
        files["pgpassword"].write_text(password)
        files["aws_key_id"].write_text(keys["AWS_ACCESS_KEY_ID"])
        files["aws_secret"].write_text(keys["AWS_SECRET_ACCESS_KEY"])

    env = {"DATABASE_URL": url_without_password, "PGPASSWORD_FILE": str(files["pgpassword"]),
           "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
           "AWS_ACCESS_KEY_ID_FILE": str(files["aws_key_id"]),
           "AWS_SECRET_ACCESS_KEY_FILE": str(files["aws_secret"]),
           "PGVAULT_REPO": f"s3://{bucket}/app", "PGVAULT_S3__ENDPOINT_URL": iam_s3.endpoint,
           "PGVAULT_S3__PATH_STYLE": "true"}
    write_credentials(PLANTED.db_password, old_keys)
    pgvault("backup", "--no-globals", env=env)

    new_password = f"rotated-{uuid.uuid4().hex}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role),
                                                                 sql.Literal(new_password)))
    new_keys = iam_s3.rotate(old_keys)
    # The old credentials stop working; replacing the files is all it takes.
    assert "password authentication failed" in pgvault("backup", env=env, expect=4).stderr
    write_credentials(new_password, old_keys)
    assert "InvalidAccessKeyId" in pgvault("backup", env=env, expect=5).stderr
    write_credentials(new_password, new_keys)
    pgvault("backup", "--no-globals", env=env)
    listed = json.loads(pgvault("list", "--json", env=env).stdout)
    assert len(listed) == 2
    targets = []
    try:
        for backup in (listed[0], listed[-1]):
            targets.append(restore_target(pg_cluster))
            pgvault("restore", backup["id"], "--to", targets[-1], "--dbname", pg_cluster.url(),
                    env={**env, "PGPASSWORD_FILE": ""})
            assert_databases_equal(pg_cluster.url(password_role.rsplit("/", 1)[1]),
                                   pg_cluster.url(targets[-1]))
    finally:
        drop(pg_cluster, *targets)


# ---------------------------------------------------------------- SIGKILL leaves no secret


@pytest.fixture
def own_tmp() -> Iterator[Path]:
    """TMPDIR of this test's pgvault runs, so what they leave shows apart from others'."""
    path = Path(tempfile.mkdtemp(prefix="leftovers-test-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# The password as a pgpass line holds it (":" escaped): the part after the colon is in both.
PASSWORD_BYTES = PLANTED.db_password.split(":", 1)[1].encode()


@pytest.mark.parametrize("moment", ["psql", "pg_dump"])
def test_a_backup_killed_by_sigkill_leaves_no_password_on_disk(
    moment: str, password_role: str, tmp_path: Path, own_tmp: Path,
    pg_cluster: EphemeralCluster
) -> None:
    """kill -9 once the preflight's psql, or pg_dump (waiting on a lock), has started: no
    file under TMPDIR holds the password, then or after the next run."""
    env = {"DATABASE_URL": password_role, "PGVAULT_REPO": f"file://{tmp_path / 'repo'}",
           "TMPDIR": str(own_tmp)}
    with psycopg.connect(password_role) as blocker:
        blocker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # pg_dump waits on it
        proc = start("backup", env=env)
        family = kill_when(proc, has_child(moment))
    assert any(p.name() == moment for p in family if p.is_running())
    wait_gone(family)
    assert files_holding(own_tmp, PASSWORD_BYTES) == [], "the password is on disk"
    assert every_file(own_tmp) == [], every_file(own_tmp)
    # The next backup works, and what it took restores equal to its source.
    pgvault("backup", env=env)
    target = restore_target(pg_cluster)
    try:
        pgvault("restore", "latest", "--to", target, env=env)
        assert_databases_equal(password_role, pg_cluster.url(target))
    finally:
        drop(pg_cluster, target)
    assert files_holding(own_tmp, PASSWORD_BYTES) == []


def _spool_filling(own_tmp: Path) -> Callable[[psutil.Process], bool]:
    """pg_restore has started and pgvault's spool (named or not) holds over 1 MiB."""
    def ready(me: psutil.Process) -> bool:
        if not has_child("pg_restore")(me):
            return False
        sizes = [p.stat().st_size for p in own_tmp.rglob("*.dump")]
        for fd in Path(f"/proc/{me.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(str(own_tmp)):
                    sizes.append(fd.stat().st_size)
        return max(sizes, default=0) > 1 << 20
    return ready


def test_an_encrypted_restore_killed_while_spooling_leaves_no_decrypted_data(
    password_role: str, tmp_path: Path, own_tmp: Path, pg_cluster: EphemeralCluster
) -> None:
    """kill -9 of `restore -j 2` of an age-encrypted backup while its spool fills: no
    decrypted byte stays on disk, and the next restore drops the scratch database the
    killed one made (and says so), then restores equal to the source."""
    marker = f"plain-{TAG}"
    with psycopg.connect(password_role, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE big AS SELECT g AS id, md5(g::text) || repeat(md5((g * 7)"
                     f"::text), 12) || '{marker}' AS v FROM generate_series(1, 100000) g")
    identity, recipient = new_identity()
    key = tmp_path / "key.txt"
    key.write_text(identity)
    env = {"DATABASE_URL": password_role, "PGVAULT_REPO": f"file://{tmp_path / 'repo'}",
           "TMPDIR": str(own_tmp), "PGVAULT_AGE_RECIPIENTS": recipient}
    pgvault("backup", env=env)
    assert files_holding(tmp_path / "repo", marker.encode()) == []  # it is encrypted
    target = restore_target(pg_cluster)
    restore = ("restore", "latest", "--to", target, "-j", "2", "--identity-file", str(key))
    proc = start(*restore, env=env)
    family = kill_when(proc, _spool_filling(own_tmp))
    wait_gone(family)
    try:
        assert files_holding(own_tmp, marker.encode()) == [], "decrypted data left on disk"
        left = [name for name in _databases(pg_cluster) if name.startswith("pgvault_tmp_")
                and f"_{proc.pid}_" in name]
        assert len(left) == 1, left  # the killed restore's scratch database, named for it
        again = pgvault(*restore, env=env)
        assert f"removed 1 leftover of dead pgvault processes: database {left[0]} " \
               f"(pid {proc.pid})" in again.stderr, again.stderr
        assert left[0] not in _databases(pg_cluster)
        assert_databases_equal(password_role, pg_cluster.url(target))
    finally:
        drop(pg_cluster, target)
    assert files_holding(own_tmp, marker.encode()) == []


def _databases(cluster: EphemeralCluster) -> set[str]:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
