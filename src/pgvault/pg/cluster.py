"""A throwaway PostgreSQL cluster in a temp folder, for tests, demos and restore drills."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psycopg

from pgvault import leftovers
from pgvault.errors import DatabaseError
from pgvault.pg.binaries import PG_LIB_DIR, installed_majors, tool_version

Setting = str | int | float | bool

_PORT_ATTEMPTS = 5
# A unix socket path must fit in sun_path (108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 100
_BIND_FAILURES = ("could not bind", "Address already in use", "could not create any TCP/IP")


class EphemeralCluster:
    """A private PostgreSQL cluster on 127.0.0.1 and a free port, removed on `stop()`.

    Its folder names its owner (leftovers.OWNER_FILE), so when this process is killed the
    next pgvault run stops the orphaned server and removes the folder; ``dies_with_owner``
    also has the kernel stop the server (immediate shutdown) the moment this process dies.
    """

    superuser = "postgres"
    host = "127.0.0.1"

    def __init__(
        self,
        major: int | None = None,
        base_dir: str | Path | None = None,
        settings: Mapping[str, Setting] | None = None,
        start_timeout: float = 60.0,
        initdb_args: Sequence[str] = (),
        dies_with_owner: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        """The environment the server's and its tools' come from (default: this process's)."""
        self.major, self.bindir = _server_bindir(major)
        self._dies_with_owner = dies_with_owner
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._settings = dict(settings or {})
        self._start_timeout = start_timeout
        self._initdb_args = list(initdb_args)
        self._existing: Path | None = None
        self._ready_states: tuple[str, ...] = ("ready",)
        self._fixed_port: int | None = None
        self._root: Path | None = None
        self._socket_dir: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()

    # -- public surface -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """TCP port the server listens on (127.0.0.1)."""
        if self._port is None:
            raise RuntimeError("the cluster is not started")
        return self._port

    @property
    def root(self) -> Path:
        """The temp folder holding data, log and socket; deleted by `stop()`."""
        if self._root is None:
            raise RuntimeError("the cluster is not started")
        return self._root

    @property
    def data_dir(self) -> Path:
        """The PGDATA folder."""
        return self._existing if self._existing is not None else self.root / "data"

    @classmethod
    def existing(
        cls,
        data_dir: str | Path,
        settings: Mapping[str, Setting] | None = None,
        start_timeout: float = 3600.0,
        ready_states: Sequence[str] = ("ready",),
        port: int | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> EphemeralCluster:
        """A server for a data folder made elsewhere (a restore): no initdb, never deleted.

        ``settings`` go on the command line, so the folder's own config stays as it is.
        ``ready_states``: postmaster.pid statuses that count as started ("standby": hot
        standby during recovery); empty: do not wait (a server that will stop by itself).
        ``port``: listen there (default: a free port).
        """
        folder = Path(data_dir).absolute()
        try:
            major = int((folder / "PG_VERSION").read_text().strip())
        except (OSError, ValueError):
            raise DatabaseError(f"{folder} is not a PostgreSQL data folder (no PG_VERSION)") \
                from None
        cluster = cls(major=major, settings=settings, start_timeout=start_timeout,
                      environ=environ)
        cluster._existing = folder
        cluster._ready_states = tuple(ready_states)
        cluster._fixed_port = port
        return cluster

    def wait_exit(self, timeout: float) -> int:
        """Wait until a server that stops by itself has exited; its exit status."""
        if self._proc is None:
            raise RuntimeError("the cluster is not started")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DatabaseError(f"PostgreSQL in {self.data_dir} did not stop within "
                                f"{timeout:.0f}s") from None

    @property
    def log_path(self) -> Path:
        """The server log file."""
        return self.root / "server.log"

    @property
    def socket_dir(self) -> Path:
        """Folder of the unix socket (inside `root` unless that path is too long)."""
        if self._socket_dir is None:
            raise RuntimeError("the cluster is not started")
        return self._socket_dir

    @property
    def postmaster_pid(self) -> int | None:
        """Process id of the running postmaster, or None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the postmaster is alive."""
        return self._proc is not None and self._proc.poll() is None

    def url(self, dbname: str = "postgres") -> str:
        """Connection URL for `dbname` as the superuser over TCP."""
        return f"postgresql://{self.superuser}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def start(self) -> EphemeralCluster:
        """Create the cluster, start it and wait until it accepts connections."""
        if self._root is not None:
            raise RuntimeError("the cluster is already started")
        atexit.register(self._atexit_stop)
        try:
            self._create_folders()
            if self._existing is None:
                self._initdb()
                self._write_config()
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Fast shutdown, then delete the folder; safe to call twice or after a failed start."""
        atexit.unregister(self._atexit_stop)
        try:
            self._shutdown()
        finally:
            for folder in (self._socket_dir, self._root):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
            self._root = None
            self._socket_dir = None
            self._port = None
            self._proc = None

    def detach(self) -> None:
        """Leave the cluster running after this process exits (for `verify --keep`).

        Not for a cluster started ``dies_with_owner``: the kernel stops that one anyway.
        """
        atexit.unregister(self._atexit_stop)
        if self._root is not None:
            leftovers.mark_kept(self._root)

    def __enter__(self) -> EphemeralCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port else "stopped"
        return f"EphemeralCluster(major={self.major}, {where})"

    # -- steps ----------------------------------------------------------------------------

    def _create_folders(self) -> None:
        base = self._base_dir if self._base_dir is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        owner = _server_user()
        if owner is not None:
            _check_reachable(base, owner)
            if self._existing is not None:
                _check_reachable(self._existing.parent, owner)
        self._root = Path(tempfile.mkdtemp(prefix="pgvault-pg-", dir=base))
        socket_dir = self._root
        if len(str(socket_dir / ".s.PGSQL.65535")) > _MAX_SOCKET_PATH:
            socket_dir = Path(tempfile.mkdtemp(prefix="pgv-", dir="/tmp"))
        self._socket_dir = socket_dir
        leftovers.write_marker(self._root, data_dir=str(self.data_dir),
                               socket_dir=str(socket_dir))
        if owner is not None:
            for folder in {self._root, socket_dir}:
                os.chown(folder, owner.pw_uid, owner.pw_gid)

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--auth=trust",
                f"--username={self.superuser}",
                "--encoding=UTF8",
                f"--locale={_pick_locale()}",
                # Durability of a throwaway cluster is worthless; skipping fsync saves seconds.
                "--no-sync",
                *self._initdb_args,
            ],
            what="initdb",
        )

    def _server_settings(self) -> dict[str, Setting]:
        settings: dict[str, Setting] = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "logging_collector": False,
        }
        if self._existing is None:
            # Fixed zones keep timestamptz text identical across clusters built here.
            settings.update(timezone="UTC", log_timezone="UTC")
        settings.update(self._settings)
        return settings

    def _write_config(self) -> None:
        settings = self._server_settings()
        lines = [f"{key} = {_conf_value(value)}" for key, value in settings.items()]
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# pgvault ephemeral cluster\n" + "\n".join(lines) + "\n")

    def _start_server(self) -> None:
        attempts = 1 if self._fixed_port else _PORT_ATTEMPTS
        for attempt in range(attempts):
            port = self._fixed_port or _free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(port)]
            if self._existing is not None:
                # On the command line, so the restored folder's config files stay untouched.
                argv += [f"-c{key}={_arg_value(value)}"
                         for key, value in self._server_settings().items()]
            with open(self.log_path, "ab") as log:
                # The postmaster is our direct child, so we know its pid and reap it on stop;
                # a new session keeps a terminal's Ctrl-C from killing it before we clean up.
                self._proc = self._popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         **_death_signal(self._dies_with_owner))
            self._port = port
            error = self._wait_ready()
            if error is None:
                return
            self._shutdown()
            self._port = None
            collided = any(m in _read_from(self.log_path, log_offset) for m in _BIND_FAILURES)
            if not collided or attempt == attempts - 1:
                raise DatabaseError(
                    f"PostgreSQL {self.major} did not start in {self.root}: {error}\n"
                    f"--- server log tail ---\n{self._log_tail()}"
                )

    def _wait_ready(self) -> str | None:
        """None once a connection works, else why the server is not coming up."""
        assert self._proc is not None
        if not self._ready_states:
            return None
        deadline = time.monotonic() + self._start_timeout
        while True:
            exit_code = self._proc.poll()
            if exit_code is not None:
                return f"postgres exited with status {exit_code}"
            # Like pg_ctl, trust postmaster.pid's status line before connecting: a probe of a
            # port someone else holds could hang for the whole connect timeout.
            if self._pid_file_status() in self._ready_states:
                if self._existing is not None:
                    # Our own postmaster wrote the status; a restored folder's pg_hba.conf
                    # may well refuse a password-less probe.
                    return None
                try:
                    with psycopg.connect(self.url(), connect_timeout=10) as conn:
                        conn.execute("SELECT 1")
                    return None
                except psycopg.OperationalError as exc:
                    if time.monotonic() > deadline:
                        return f"no connection after {self._start_timeout:.0f}s: {exc}"
            elif time.monotonic() > deadline:
                return f"not ready after {self._start_timeout:.0f}s"
            time.sleep(0.05)

    def _pid_file_status(self) -> str:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return ""
        # Line 8 holds the postmaster status (PostgreSQL 10+): starting, ready, stopping...
        return lines[7].strip() if len(lines) >= 8 else ""

    def _shutdown(self) -> None:
        proc = self._proc
        if proc is None:
            return
        # SIGINT is PostgreSQL's fast shutdown, SIGQUIT its immediate one.
        for sig, timeout in ((signal.SIGINT, 60.0), (signal.SIGQUIT, 20.0), (signal.SIGKILL, 20.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        if proc.poll() is None:
            raise DatabaseError(f"PostgreSQL in {self._root} (pid {proc.pid}) would not stop")
        self._proc = None

    def _atexit_stop(self) -> None:
        # A forked child inherits atexit hooks; only the process that started the cluster stops it.
        if os.getpid() == self._owner_pid:
            self.stop()

    # -- helpers --------------------------------------------------------------------------

    def _popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        owner = _server_user()
        # initdb and postgres refuse to run as root; drop to the postgres account in the child.
        as_owner: dict[str, Any] = (
            {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner else {}
        )
        # libpq's PG* variables must not steer the server; pgvault's own (restore_command) may.
        env = {k: v for k, v in self.environ.items()
               if not k.startswith("PG") or k.startswith("PGVAULT_")}
        if owner is not None:
            env["HOME"] = owner.pw_dir
        try:
            return subprocess.Popen(
                argv,
                env=env,
                cwd=self._root,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **as_owner,
                **kwargs,
            )
        except OSError as exc:
            raise DatabaseError(f"could not run {argv[0]}: {exc}") from exc

    def _run(self, argv: list[str], *, what: str, timeout: float = 300) -> None:
        proc = self._popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except BaseException as exc:
            proc.kill()
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise DatabaseError(f"{what} did not finish within {timeout:.0f}s") from None
            raise
        if proc.returncode != 0:
            text = output.decode(errors="replace").strip()
            raise DatabaseError(f"{what} failed (exit {proc.returncode}): {text[-2000:]}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])


PR_SET_PDEATHSIG = 1


def _death_signal(wanted: bool) -> dict[str, Any]:
    """Popen arguments that have the kernel send the child SIGQUIT when we die (Linux).

    The kernel sends it when the *thread* that started the child ends, so only a child
    started by the main thread (whose end is the process's) gets it. Popen switches to
    the postgres OS user before preexec_fn runs, and a change of user would clear it.
    """
    if not wanted or threading.current_thread() is not threading.main_thread():
        return {}
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return {}
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGQUIT), 0, 0, 0)
        if os.getppid() != parent:  # we died before the signal was armed
            os.kill(os.getpid(), signal.SIGQUIT)

    return {"preexec_fn": set_death_signal}


def _server_bindir(major: int | None) -> tuple[int, Path]:
    """The exact major's server bindir (newest installed if None)."""
    majors = installed_majors()
    if major is None and majors:
        major = majors[-1]
    if major is not None:
        bindir = PG_LIB_DIR / str(major) / "bin"
        if (bindir / "initdb").is_file():
            return major, bindir
    on_path = shutil.which("initdb")
    if on_path is not None:
        path_major = tool_version(Path(on_path))[0]
        if major is None or path_major == major:
            return path_major, Path(on_path).parent
    wanted = f"PostgreSQL {major}" if major is not None else "PostgreSQL"
    package = f"postgresql-{major}" if major is not None else "postgresql"
    raise DatabaseError(f"no {wanted} server binaries (initdb) found; install {package}")


def _server_user() -> pwd.struct_passwd | None:
    """The OS account to run server programs as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise DatabaseError(
            "running as root needs a 'postgres' OS user to run initdb; create it or run as non-root"
        ) from None


def _check_reachable(base: Path, owner: pwd.struct_passwd) -> None:
    """Fail early if the server account cannot traverse to `base` (e.g. a 0700 root folder)."""
    for folder in [base.resolve(), *base.resolve().parents]:
        st = folder.stat()
        if st.st_uid == owner.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == owner.pw_gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise DatabaseError(
                f"the postgres OS user cannot reach {base} ({folder} is not searchable); "
                "choose a base_dir under /tmp"
            )


def _pick_locale() -> str:
    """C.UTF-8 when the system has it (UTF-8 ctype, byte-order collation), else C."""
    try:
        out = subprocess.run(
            ["locale", "-a"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "C"
    names = {line.strip().lower().replace("-", "") for line in out.splitlines()}
    return "C.UTF-8" if "c.utf8" in names else "C"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_value(value: Setting) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _arg_value(value: Setting) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def server_owner() -> tuple[int, int] | None:
    """(uid, gid) that server programs and their data folders must have when we are root."""
    owner = _server_user()
    return (owner.pw_uid, owner.pw_gid) if owner is not None else None


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            handle.seek(offset)
            return handle.read()
    except OSError:
        return ""
