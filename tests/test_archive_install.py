"""WAL archiving with pgvault installed where the server's OS user can (or cannot) run it.

PostgreSQL runs archive_command and restore_command as its own OS user (postgres). The
supported install (README "Where to install pgvault for WAL archiving") is a venv on
/usr/bin/python3 in a folder every user may pass, named by its absolute path, with a config
postgres may read: a real cluster archives through it into a local repository and the
segment comes back byte for byte through wal-fetch run as postgres. A pgvault whose
interpreter (or itself, or its config) sits where postgres cannot reach, as a venv on a
Python under /root (pyenv) does, makes `check-archive` name that path in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cli_runner import one_line_error, pgvault
from fixtures_install import installed_pgvault  # noqa: F401  (a fixture)
from pgvault.ops import archive_access
from pgvault.ops.wal import archived
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the server runs as the "
                                "postgres OS user only when the tests start it as root")


def as_postgres(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder under /tmp that postgres may pass (0755), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pgvault-install-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def postgres_repo(parent: Path) -> Path:
    repo = parent / "repo"
    repo.mkdir()
    owner = pwd.getpwnam("postgres")
    os.chown(repo, owner.pw_uid, owner.pw_gid)
    return repo


@contextlib.contextmanager
def archiving_cluster(archive_command: str) -> Iterator[EphemeralCluster]:
    cluster = EphemeralCluster(
        settings={"archive_mode": True, "archive_command": archive_command, "fsync": False,
                  "wal_level": "replica"},
        initdb_args=["--wal-segsize=1"]).start()
    try:
        yield cluster
    finally:
        # A failing archive_command would hold up the shutdown's last archiving round.
        with contextlib.suppress(psycopg.Error), \
                psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET archive_command = 'true'")
            conn.execute("SELECT pg_reload_conf()")
        cluster.stop()


def test_the_supported_install_archives_and_fetches_as_the_postgres_user(
    installed_pgvault: Path, shared_dir: Path  # noqa: F811
) -> None:
    program = str(installed_pgvault)
    ran = as_postgres(program, "--version")
    assert ran.returncode == 0 and "pgvault" in ran.stdout, ran.stderr
    repo = postgres_repo(shared_dir)
    config = shared_dir / "pgvault.toml"
    config.write_text(f'repo = "file://{repo}"\n')
    # As README says: root owns it, the server's group reads it.
    os.chown(config, 0, pwd.getpwnam("postgres").pw_gid)
    config.chmod(0o640)

    with archiving_cluster(f"{program} wal-push %p --config {config}") as cluster:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
        checked = pgvault("check-archive", "-d", cluster.url(), "--config", str(config),
                          "--timeout", "60", "--json")
        assert '"walfile"' in checked.stdout
        storage = open_storage(f"file://{repo}")
        segments = [f for f in archived(storage, "main") if f.wal.kind == "segment"]
        assert segments, "no WAL file arrived in the repository"
        # restore_command's side: wal-fetch run by postgres gives back the server's own bytes.
        newest = max(segments, key=lambda f: f.wal.name).wal.name
        original = cluster.data_dir / "pg_wal" / newest
        fetched = shared_dir / "fetched"
        fetched.mkdir()
        shutil.chown(fetched, "postgres", "postgres")
        got = as_postgres(program, "wal-fetch", newest, str(fetched / newest),
                          "--config", str(config))
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256((fetched / newest).read_bytes()).hexdigest() == \
            hashlib.sha256(original.read_bytes()).hexdigest()


def _launcher(path: Path, python: str) -> None:
    """A console script as pip writes one: the interpreter named by its #! line."""
    path.write_text(f"#!{python}\nimport sys\nfrom pgvault.cli import main\nsys.exit(main())\n")
    path.chmod(0o755)


def private_interpreter_install(base: Path) -> tuple[str, str]:
    """A venv whose bin/python points into a 0700 root folder, as a venv on pyenv's Python
    under /root does. Root can run it; postgres cannot. (program, the folder to name)."""
    home = base / "root-home"
    home.mkdir(mode=0o700)
    interpreter = home / f"python{sys.version_info.major}.{sys.version_info.minor}"
    interpreter.symlink_to(os.path.realpath("/usr/bin/python3"))
    venv = base / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(interpreter)
    # The test venv's packages (pgvault included), so that root really can run it.
    site = next(venv.glob("lib/python*/site-packages"))
    ours = next(Path(sys.prefix).glob("lib/python*/site-packages"))
    (site / "pgvault-tests.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
    program = venv / "bin" / "pgvault"
    _launcher(program, str(venv / "bin" / "python"))
    return str(program), str(home)


def private_program_install(base: Path) -> tuple[str, str]:
    """pgvault itself inside a 0700 root folder (e.g. /root/.local/bin/pgvault)."""
    home = base / "root-home"
    (home / "bin").mkdir(parents=True)
    home.chmod(0o700)
    program = home / "bin" / "pgvault"
    _launcher(program, str(Path(sys.prefix) / "bin" / "python"))
    return str(program), str(home)


@pytest.mark.parametrize("install", [private_interpreter_install, private_program_install],
                         ids=["interpreter-under-0700", "program-under-0700"])
def test_check_archive_names_the_path_the_server_user_cannot_execute(
    shared_dir: Path, install: object
) -> None:
    assert callable(install)
    program, refused = install(shared_dir)
    assert subprocess.run([program, "--version"], capture_output=True,
                          check=False).returncode == 0, "root must be able to run this install"
    assert as_postgres(program, "--version").returncode != 0
    repo = postgres_repo(shared_dir)

    with archiving_cluster(f"{program} wal-push %p --repo {repo}") as cluster:
        failed = pgvault("check-archive", "-d", cluster.url(), "--repo", str(repo),
                         "--timeout", "3", expect=8)
    line = one_line_error(failed)
    assert "did not arrive" in line
    assert f"OS user postgres, who cannot pass {refused} " in line, line
    assert "/usr/bin/python3" in line and "/opt/pgvault" in line


def test_check_archive_names_a_config_file_the_server_user_cannot_read(
    installed_pgvault: Path, shared_dir: Path  # noqa: F811
) -> None:
    repo = postgres_repo(shared_dir)
    config = shared_dir / "pgvault.toml"
    config.write_text(f'repo = "file://{repo}"\n')
    config.chmod(0o600)  # root's alone: what deploy/README.md used to install

    with archiving_cluster(f"{installed_pgvault} wal-push %p --config {config}") as cluster:
        failed = pgvault("check-archive", "-d", cluster.url(), "--config", str(config),
                         "--timeout", "3", expect=8)
    line = one_line_error(failed)
    assert f"who cannot read {config} (mode -rw-------, owner root), the config file" in line, \
        line


# The diagnosis on its own, across the shapes an archive_command takes (no server needed:
# the account judged is postgres, the files are this process's, so postgres is "other").

def _postgres_server(path: str = "/usr/bin:/bin") -> archive_access.Server:
    return archive_access.Server(archive_access.Account.of_uid(pwd.getpwnam("postgres").pw_uid),
                                 path)


@pytest.fixture
def layout(shared_dir: Path) -> Path:
    """shared/private (0700) holding a Python symlink; shared/venv whose bin/python goes
    there through a relative symlink with '..'; shared/venv/bin/pgvault a #! script."""
    private = shared_dir / "private"
    (private / "bin").mkdir(parents=True)
    (private / "bin" / "python3").symlink_to(os.path.realpath("/usr/bin/python3"))
    private.chmod(0o700)
    (shared_dir / "venv" / "bin").mkdir(parents=True)
    (shared_dir / "venv" / "bin" / "python").symlink_to("../../private/bin/python3")
    _launcher(shared_dir / "venv" / "bin" / "pgvault", str(shared_dir / "venv/bin/python"))
    return shared_dir


@pytest.mark.parametrize("prefix", ["", "AWS_PROFILE=archiver ", "env -i HOME=/x ",
                                    "exec /usr/bin/env A=1 "])
def test_diagnose_follows_relative_symlinks_and_skips_command_prefixes(
    layout: Path, prefix: str
) -> None:
    program = layout / "venv" / "bin" / "pgvault"
    said = archive_access.diagnose(f"{prefix}{program} wal-push %p --repo /x", _postgres_server())
    assert said is not None and f"cannot pass {layout}/private (mode drwx------" in said
    assert f"to reach {program.parent}/python, the interpreter of {program}" in said


def test_diagnose_resolves_env_shebangs_and_bare_names_on_the_server_path(
    layout: Path,
) -> None:
    script = layout / "venv" / "bin" / "pgvault-env"
    _launcher(script, "/usr/bin/env python3")
    server = _postgres_server(f"{layout}/private/bin:/usr/bin")
    said = archive_access.diagnose(f"{script} wal-push %p", server)
    assert said is not None and f"cannot pass {layout}/private " in said
    missing = archive_access.diagnose("pgvault wal-push %p", _postgres_server("/nonexistent"))
    assert missing is not None and "'pgvault', which is not on the server's PATH" in missing
    found = archive_access.diagnose("pgvault-env wal-push %p",
                                    _postgres_server(f"{layout}/venv/bin:{layout}/private/bin"))
    assert found is not None and f"the interpreter of {script}" in found


def test_diagnose_passes_what_postgres_may_use_and_names_a_repository_it_cannot_write(
    layout: Path,
) -> None:
    ok = layout / "ok"
    (ok / "bin").mkdir(parents=True)
    _launcher(ok / "bin" / "pgvault", "/usr/bin/python3")
    config = ok / "pgvault.toml"
    config.write_text("")
    os.chown(config, 0, pwd.getpwnam("postgres").pw_gid)
    config.chmod(0o640)  # the group reads it: allowed
    server = _postgres_server()
    command = f"{ok}/bin/pgvault wal-push %p --config {config}"
    assert archive_access.diagnose(command, server) is None
    script = ok / "bin" / "pgvault"
    script.chmod(0o711)  # runnable, but the interpreter cannot read the script
    said = archive_access.diagnose(command, server)
    assert said is not None and f"cannot read {script} (mode -rwx--x--x" in said
    script.chmod(0o755)
    said = archive_access.diagnose(f"{ok}/bin/pgvault wal-push %p --repo=file://{ok}/r/s",
                                   server)
    assert said is not None and f"cannot write {ok} (mode drwxr-xr-x" in said
    assert f"the folder of repository file://{ok}/r/s" in said
    # The repository may come from the environment the command sets, or from its config.
    said = archive_access.diagnose(f"PGVAULT_REPO={ok}/r {ok}/bin/pgvault wal-push %p", server)
    assert said is not None and f"cannot write {ok} " in said
    config.write_text(f'repo = "file://{ok}/from-config"\n')
    said = archive_access.diagnose(command, server)
    assert said is not None and f"the folder of repository file://{ok}/from-config" in said


def test_check_archive_by_an_os_user_that_cannot_read_pg_control_still_names_the_path(
    shared_dir: Path,
) -> None:
    """Run by neither root nor postgres (here `nobody`): pg_control is out of its reach, and
    the loopback connection vouches that the data folder's owner is the server's user."""
    from cli_runner import PGVAULT, clean_env

    program, refused = private_interpreter_install(shared_dir)
    repo = postgres_repo(shared_dir)
    with archiving_cluster(f"{program} wal-push %p --repo {repo}") as cluster:
        failed = subprocess.run(
            ["runuser", "-u", "nobody", "--", PGVAULT, "check-archive", "-d", cluster.url(),
             "--repo", str(repo), "--timeout", "3"],
            env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    assert failed.returncode == 8, failed.stderr
    line = one_line_error(failed)
    assert f"OS user postgres, who cannot pass {refused} (mode drwx------" in line, line
