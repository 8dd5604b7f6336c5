"""age encryption end to end: real clusters, the real CLI, stock `age -d`, key rotation, canary.

Every backup taken here is restored and compared with its source.
"""

from __future__ import annotations

import gc
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import psycopg
import pytest
from psycopg import sql

from cli_runner import one_line_error, pgvault
from dbcompare import assert_databases_equal
from fixtures_pg import NewName
from pgvault.catalog import PASSPHRASE_IDENTITY
from pgvault.errors import DecryptionError, IntegrityError
from pgvault.model import StageSpec
from pgvault.pg.cluster import EphemeralCluster
from pgvault.pipeline import decode, encode
from pgvault.pipeline.age import AgeDecoder, AgeEncoder, Keyring, new_identity, parse_identities
from pgvault.pipeline.stream import Reader
from pgvault.storage.memory import MemoryStorage

CANARY = f"canary{uuid.uuid4().hex}"




def keygen(path: Path) -> str:
    """A new identity file written by the real CLI; returns its recipient."""
    out = pgvault("keygen", "--output", str(path))
    recipient = out.stdout.strip()
    assert recipient.startswith("age1") and "AGE-SECRET-KEY" not in out.stdout + out.stderr
    return recipient


def small_db(make_db: Callable[..., str], label: str = "x") -> str:
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, label text)")
        conn.execute("INSERT INTO t SELECT g, %s || g FROM generate_series(1, 200) g", (label,))
    return url


def databases(cluster: EphemeralCluster) -> set[str]:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def backup_id(repo: str, env: dict[str, str] | None = None) -> str:
    listed = json.loads(pgvault("list", "--json", "--repo", repo, env=env).stdout)
    return str(listed[-1]["id"])


# ---------------------------------------------------------------- end to end


def test_encrypted_round_trip_and_stock_age_restore(
    rich_db: str, tmp_path: Path, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    key = tmp_path / "key.txt"
    recipient = keygen(key)
    repo = f"file://{tmp_path / 'repo'}"
    pgvault("backup", "--dbname", rich_db, "--repo", repo,
            env={"PGVAULT_AGE_RECIPIENTS": recipient})

    shown = json.loads(pgvault("show", "latest", "--json", "--repo", repo).stdout)
    for artifact in shown["artifacts"]:
        assert artifact["key"].endswith(".zst.age"), artifact["key"]
        assert [s["name"] for s in artifact["stages"]] == ["zstd", "age"]
        assert artifact["stages"][1]["recipients"] == [recipient]
    (manifest,) = (tmp_path / "repo").rglob("manifests/**/*.json")
    secret = key.read_text().split("\n")[2]
    assert secret.startswith("AGE-SECRET-KEY-1")
    assert secret not in manifest.read_text() and "AGE-SECRET-KEY" not in manifest.read_text()

    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
            "--identity-file", str(key))
    assert_databases_equal(rich_db, pg_cluster.url(target))

    # The README's recipe with stock tools only: age -d -i key FILE | zstd -d | pg_restore.
    (dump,) = (tmp_path / "repo").rglob("db.dump.zst.age")
    stock = new_name()
    subprocess.run(["createdb", "-h", "127.0.0.1", "-p", str(pg_cluster.port), "-U", "postgres",
                    stock], check=True)
    pg_restore = pg_cluster.bindir / "pg_restore"
    subprocess.run(f"set -o pipefail; age -d -i '{key}' '{dump}' | zstd -d | '{pg_restore}' "
                   f"--exit-on-error -d '{pg_cluster.url(stock)}'",
                   shell=True, executable="/bin/bash", check=True)
    assert_databases_equal(rich_db, pg_cluster.url(stock))


def test_wrong_or_missing_identity_is_one_clear_line_distinct_from_damage(
    make_db: Callable[..., str], tmp_path: Path, new_name: NewName,
    pg_cluster: EphemeralCluster
) -> None:
    url = small_db(make_db)
    good, other = tmp_path / "good.txt", tmp_path / "other.txt"
    recipient = keygen(good)
    keygen(other)
    repo = f"file://{tmp_path / 'repo'}"
    pgvault("backup", "--dbname", url, "--repo", repo, "--no-globals",
            env={"PGVAULT_AGE_RECIPIENTS": recipient})
    bid = backup_id(repo)
    before = databases(pg_cluster)
    restore = ["restore", "latest", "--to", new_name(), "--dbname", pg_cluster.url(),
               "--repo", repo]

    line = one_line_error(pgvault(*restore, "--identity-file", str(other), expect=11))
    assert line == (f"pgvault: backup {bid} is encrypted for recipients {recipient}; "
                    f"the identity in {other} matches none")
    line = one_line_error(pgvault(*restore, expect=11))
    assert f"backup {bid} is encrypted for recipients {recipient}; no identity was given" in line
    # verify tells which identity a backup needs in the same words; with it, the drill passes.
    proc = pgvault("verify", "latest", "--level", "integrity", "--repo", repo,
                   "--identity-file", str(other), expect=11)
    assert f"is encrypted for recipients {recipient}; the identity in {other} matches none" \
        in proc.stderr.splitlines()[-1]
    pgvault("verify", "latest", "--level", "integrity", "--repo", repo, "--identity-file",
            str(good))
    # The identity can come from the environment or the config file as well.
    line = one_line_error(pgvault(*restore, env={"PGVAULT_AGE_IDENTITY_FILE": str(other)},
                                  expect=11))
    assert f"the identity in {other} matches none" in line
    assert databases(pg_cluster) == before

    # Damage is an integrity error (6), never mistaken for a key problem.
    (dump,) = (tmp_path / "repo").rglob("db.dump.zst.age")
    original = dump.read_bytes()
    for offset in (40, len(original) // 2):  # inside the age header; inside the payload
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        dump.write_bytes(bytes(damaged))
        proc = pgvault(*restore, "--identity-file", str(good), expect=6)
        assert f"backup {bid}" in one_line_error(proc)
    assert databases(pg_cluster) == before

    dump.write_bytes(original)
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
            "--identity-file", str(good))
    assert_databases_equal(url, pg_cluster.url(target))


def test_key_rotation_old_backups_need_the_old_identity(
    make_db: Callable[..., str], tmp_path: Path, new_name: NewName,
    pg_cluster: EphemeralCluster
) -> None:
    """The documented rotation: add the new recipient, then retire the old one."""
    old_key, new_key = tmp_path / "old.txt", tmp_path / "new.txt"
    old, new = keygen(old_key), keygen(new_key)
    repo = f"file://{tmp_path / 'repo'}"
    config = tmp_path / "pgvault.toml"
    url = small_db(make_db, "before")
    sources: dict[str, str] = {}

    def backup_with(recipients: list[str], label: str) -> str:
        config.write_text(f"[encryption]\nrecipients = {json.dumps(recipients)}\n")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE t SET label = %s || id", (label,))
        snapshot = make_db(url)  # what this backup must restore to
        pgvault("backup", "--dbname", url, "--repo", repo, "--config", str(config),
                "--no-globals")
        sources[backup_id(repo)] = snapshot
        return backup_id(repo)

    first = backup_with([old], "old-only")
    both = backup_with([old, new], "transition")
    last = backup_with([new], "new-only")

    def restore(bid: str, key: Path, expect: int = 0) -> str:
        target = new_name()
        proc = pgvault("restore", bid, "--to", target, "--dbname", pg_cluster.url(),
                       "--repo", repo, "--identity-file", str(key), expect=expect)
        if expect == 0:
            assert_databases_equal(sources[bid], pg_cluster.url(target))
        return proc.stderr

    restore(first, old_key)
    restore(both, old_key)
    restore(both, new_key)
    restore(last, new_key)
    assert f"encrypted for recipients {old}; the identity in {new_key} matches none" in \
        restore(first, new_key, expect=11)
    assert f"encrypted for recipients {new}; the identity in {old_key} matches none" in \
        restore(last, old_key, expect=11)


def test_passphrase_mode_round_trip_and_stock_age(
    make_db: Callable[..., str], tmp_path: Path, new_name: NewName,
    pg_cluster: EphemeralCluster
) -> None:
    url = small_db(make_db)
    root = tmp_path / "repo"
    repo = f"file://{root}"
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text("correct horse battery staple\n")
    env = {"PGVAULT_ENCRYPTION__PASSPHRASE": "true",
           "PGVAULT_AGE_PASSPHRASE_FILE": str(passphrase_file)}
    pgvault("backup", "--dbname", url, "--repo", repo, "--no-globals", env=env)
    wrapped = root / PASSPHRASE_IDENTITY
    assert wrapped.read_bytes().startswith(b"age-encryption.org/v1\n-> scrypt ")

    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
            env={"PGVAULT_AGE_PASSPHRASE": "correct horse battery staple"})
    assert_databases_equal(url, pg_cluster.url(target))

    # (A wrong passphrase is refused by backup and restore alike: see the test below; each
    # scrypt attempt costs seconds, so the CLI round trip is not repeated for it.)

    # Stock age opens the repository key with the passphrase typed at its terminal prompt.
    (dump,) = root.rglob("db.dump.zst.age")
    plain = tmp_path / "db.dump.zst"
    subprocess.run(["script", "-qec", f"age -d -i '{wrapped}' -o '{plain}' '{dump}'",
                    "/dev/null"], input=b"correct horse battery staple\n", check=True,
                   stdout=subprocess.DEVNULL, timeout=60)
    stock = new_name()
    subprocess.run(["createdb", "-h", "127.0.0.1", "-p", str(pg_cluster.port), "-U", "postgres",
                    stock], check=True)
    subprocess.run(f"set -o pipefail; zstd -d < '{plain}' | '{pg_cluster.bindir}/pg_restore' "
                   f"--exit-on-error -d '{pg_cluster.url(stock)}'",
                   shell=True, executable="/bin/bash", check=True)
    assert_databases_equal(url, pg_cluster.url(stock))


# ---------------------------------------------------------------- canary


def canary_db(make_db: Callable[..., str]) -> str:
    """A database whose data, a column name and a comment all hold the canary."""
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE notes (id int PRIMARY KEY, {} text)").format(
            sql.Identifier(f"col_{CANARY}")))
        conn.execute("INSERT INTO notes VALUES (1, %s), (2, 'plain')", (f"data {CANARY}",))
        conn.execute(sql.SQL("COMMENT ON TABLE notes IS {}").format(
            sql.Literal(f"comment {CANARY}")))
    return url


def stored_bytes_local(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def stored_bytes_s3(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return found


def holders(objects: dict[str, bytes]) -> list[str]:
    return sorted(key for key, data in objects.items() if CANARY.encode() in data)


def test_canary_is_in_no_stored_byte_when_encrypted(
    make_db: Callable[..., str], tmp_path: Path, new_name: NewName,
    pg_cluster: EphemeralCluster, s3_server: str, s3_bucket: str
) -> None:
    """Compression off in both runs, so only encryption differs: the control proves the scan."""
    url = canary_db(make_db)
    key = tmp_path / "key.txt"
    env = {"PGVAULT_AGE_RECIPIENTS": keygen(key)}
    s3_env = {**env, "PGVAULT_S3__ENDPOINT_URL": s3_server, "PGVAULT_S3__PATH_STYLE": "true",
              "PGVAULT_REPO": f"s3://{s3_bucket}/enc"}
    local, control = tmp_path / "enc", tmp_path / "control"
    pgvault("backup", "--dbname", url, "--repo", f"file://{local}", "--compression", "none",
            env=env)
    pgvault("backup", "--dbname", url, "--compression", "none", env=s3_env)
    pgvault("backup", "--dbname", url, "--repo", f"file://{control}", "--compression", "none")

    assert holders(stored_bytes_local(local)) == []
    s3_objects = stored_bytes_s3(s3_server, s3_bucket)
    assert any(k.endswith("db.dump.age") for k in s3_objects)
    assert holders(s3_objects) == []
    assert [k for k in holders(stored_bytes_local(control)) if "db.dump" in k], \
        "the control run must show the scanner finds the canary"

    for repo, extra in ((f"file://{local}", {}), (None, s3_env), (f"file://{control}", {})):
        target = new_name()
        args = ["--repo", repo] if repo else []
        pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(),
                "--identity-file", str(key), *args, env=extra)
        assert_databases_equal(url, pg_cluster.url(target))


# ---------------------------------------------------------------- keygen and config


def test_keygen_writes_a_private_file_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "key.txt"
    proc = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.umask(0); from pgvault.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "keygen", "-o", str(path)],
        capture_output=True, text=True, check=True)
    assert (path.stat().st_mode & 0o777) == 0o600
    recipient = proc.stdout.strip()
    identities = parse_identities(path.read_bytes(), "key")
    assert identities.recipients == [recipient]
    check = subprocess.run(["age-keygen", "-y", str(path)], capture_output=True, text=True,
                           check=True)
    assert check.stdout.strip() == recipient  # a stock age key file
    before = path.read_bytes()
    line = one_line_error(pgvault("keygen", "-o", str(path), expect=3))
    assert "already exists" in line and path.read_bytes() == before

    proc = pgvault("keygen")
    assert proc.stdout.startswith("# created: ") and "AGE-SECRET-KEY-1" in proc.stdout
    assert proc.stderr.startswith("Public key: age1")


def test_bad_recipient_is_a_config_error_naming_it(tmp_path: Path) -> None:
    proc = pgvault("backup", "--repo", f"file://{tmp_path}", "--dbname", "nothing",
                   env={"PGVAULT_AGE_RECIPIENTS": "age1notakey"}, expect=3)
    assert "invalid age recipient 'age1notakey'" in one_line_error(proc)


def test_recipients_from_env_file_and_recipients_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pgvault import config
    from pgvault.vault import Vault

    a, b, c = (new_identity()[1] for _ in range(3))
    ssh_line = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq0zZl6LhW4nJkC1c5nX6Hq0KtL9XbqkR0wUu+"
                "y1f0Y backup@host")
    listing = tmp_path / "recipients.txt"
    listing.write_text(f"# team keys\n{b}\n\n{ssh_line}\n")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[encryption]\nrecipients = ["{c}"]\nrecipients_file = "{listing}"\n'
                    'identity_file = "/keys/restore.txt"\n')
    monkeypatch.setenv("PGVAULT_AGE_RECIPIENTS", f"{a}, {a}")
    settings = config.load({}, os.environ, str(toml))
    # The environment replaces the file's list; the file's other keys stay.
    assert settings.encryption.identity_file == "/keys/restore.txt"
    (stage,) = Vault.open(settings, storage=MemoryStorage()).stages_for("none")
    assert stage.name == "age"
    assert stage.recipients == (a, b, ssh_line.rsplit(" ", 1)[0])


# ---------------------------------------------------------------- the streaming stage


class Numbers(Reader):
    """``total`` bytes of a repeating pattern, produced lazily."""

    def __init__(self, total: int, fail_after: int | None = None) -> None:
        super().__init__()
        self.left = total
        self.sent = 0
        self.fail_after = fail_after
        self.block = bytes(range(256)) * 4096

    def read_chunk(self, size: int) -> bytes:
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise IntegrityError("source broke")
        n = min(size, self.left, len(self.block))
        self.left -= n
        self.sent += n
        return self.block[:n]


def identity() -> tuple[Keyring, str, Path]:
    text, recipient = new_identity()
    path = Path(f"/tmp/pgvault-test-key-{uuid.uuid4().hex}")
    path.write_text(text)
    return Keyring(identity_file=str(path)), recipient, path


def test_stage_round_trip_with_compression_and_edge_sizes() -> None:
    keyring, recipient, path = identity()
    try:
        stages = [StageSpec(name="zstd", level=3, threads=0),
                  StageSpec(name="age", recipients=(recipient,))]
        for size in (0, 1, 65535, 65536, 65537, 3 << 20):
            data = Numbers(size).read()
            encoded = encode(io.BytesIO(data), stages).read()
            assert encoded.startswith(b"age-encryption.org/v1\n")
            assert decode(io.BytesIO(encoded), stages, identities=keyring).read() == data
    finally:
        path.unlink()


def test_source_errors_pass_through_unchanged_and_threads_end() -> None:
    keyring, recipient, path = identity()
    try:
        before = threading.active_count()
        with pytest.raises(IntegrityError, match="source broke"):
            AgeEncoder(Numbers(10 << 20, fail_after=3 << 20), [recipient]).read()
        # A consumer that stops early (an upload failed) must not leave a thread blocked.
        for _ in range(5):
            stream = AgeEncoder(Numbers(100 << 20), [recipient])
            stream.read(1 << 20)
            stream.close()
        stream = AgeEncoder(Numbers(100 << 20), [recipient])
        stream.read(1 << 20)
        del stream  # dropped without close: garbage collection stops the thread too
        gc.collect()
        deadline = time.monotonic() + 10
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() == before

        encrypted = AgeEncoder(Numbers(2 << 20), [recipient]).read()
        stage = StageSpec(name="age", recipients=(recipient,))
        with pytest.raises(IntegrityError, match="truncated"):
            decode(io.BytesIO(encrypted[:-100]), [stage], identities=keyring).read()
        with pytest.raises(IntegrityError):
            decode(io.BytesIO(encrypted + b"tail"), [stage], identities=keyring).read()
        with pytest.raises(DecryptionError, match="no identity was given"):
            decode(io.BytesIO(encrypted), [stage])
        other, _, other_path = identity()
        try:
            with pytest.raises(DecryptionError, match="matches none"):
                decode(io.BytesIO(encrypted), [stage], identities=other)
            # Even without knowing the recipient beforehand, age's own check answers.
            with pytest.raises(DecryptionError, match="matches none"):
                AgeDecoder(io.BytesIO(encrypted), other.for_stage(stage).keys,
                           no_match=lambda: DecryptionError("matches none"), what="x")
        finally:
            other_path.unlink()
    finally:
        path.unlink()


def test_memory_stays_flat_while_500_mb_are_encrypted_and_decrypted(tmp_path: Path) -> None:
    """Peak RSS of a child that pushes 500 MiB through encrypt then decrypt."""
    script = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_encryption import Numbers
from pgvault.model import StageSpec
from pgvault.pipeline import decode, encode
from pgvault.pipeline.age import Keyring, new_identity
text, recipient = new_identity()
open({str(tmp_path / 'k')!r}, 'w').write(text)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stages = [StageSpec(name='age', recipients=(recipient,))]
total = 500 << 20
with open({str(tmp_path / 'big.age')!r}, 'wb') as out:
    stream = encode(Numbers(total), stages)
    while chunk := stream.read(1 << 20):
        out.write(chunk)
with open({str(tmp_path / 'big.age')!r}, 'rb') as source:
    stream = decode(source, stages, identities=Keyring(identity_file={str(tmp_path / 'k')!r}))
    n = 0
    while chunk := stream.read(1 << 20):
        n += len(chunk)
assert n == total, n
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ""})
    growth_mb = int(out.stdout.strip())
    assert growth_mb < 48, f"RSS grew by {growth_mb} MB for 500 MiB"


def test_passphrase_key_is_created_once_and_shared(tmp_path: Path) -> None:
    from pgvault.vault import passphrase_identity

    storage = MemoryStorage()
    passphrase_identity(storage, "pass phrase", create=True)
    # A typo in the passphrase fails the backup instead of making a backup nobody can read.
    with pytest.raises(DecryptionError, match="does not open"):
        passphrase_identity(storage, "other phrase", create=True)
    with pytest.raises(DecryptionError, match="no passphrase key"):
        passphrase_identity(MemoryStorage(), "pass phrase", create=False)
