"""A real PgBouncer (/usr/sbin/pgbouncer, the Debian package) in front of a test server.

``start_pgbouncer`` writes a config into a folder of its own and runs PgBouncer as the
postgres OS user (it refuses root) on a free port of 127.0.0.1, with one database entry per
pool mode asked for. It talks TLS on both sides, as Supabase's pooler does: to the server
(verify-ca against the test CA) and to its clients with the server's own certificate, so a
client's ``sslmode=verify-full`` holds through it. ``options`` is among the ignored startup
parameters, as Neon's proxy consumes its ``endpoint=`` option. Clients log in without a
password (auth_type trust; the user must be in auth_file).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pgvault.pg.cluster import server_owner

PGBOUNCER = "/usr/sbin/pgbouncer"


@dataclass(frozen=True)
class Bouncer:
    """A running PgBouncer: its port, and the alias of each pooled database."""

    port: int
    aliases: Mapping[str, str]  # pool mode -> the database name clients use for it
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def start_pgbouncer(server_port: int, dbname: str, modes: tuple[str, ...], *, ca_cert: Path,
                    cert: Path, key: Path, user: str = "postgres") -> Iterator[Bouncer]:
    """PgBouncer on 127.0.0.1 pooling ``dbname`` once per pool mode in ``modes``."""
    folder = Path(tempfile.mkdtemp(prefix="pgvault-bouncer-"))
    port = _free_port()
    aliases = {mode: f"{dbname}_{mode}" for mode in modes}
    lines = [f"{alias} = host=127.0.0.1 port={server_port} dbname={dbname} pool_mode={mode}"
             for mode, alias in aliases.items()]
    (folder / "userlist.txt").write_text(f'"{user}" ""\n')
    (folder / "pgbouncer.ini").write_text("\n".join([
        "[databases]", *lines, "", "[pgbouncer]",
        "listen_addr = 127.0.0.1", f"listen_port = {port}", "unix_socket_dir =",
        "auth_type = trust", f"auth_file = {folder / 'userlist.txt'}",
        f"logfile = {folder / 'pgbouncer.log'}",
        "ignore_startup_parameters = extra_float_digits, options",
        "server_tls_sslmode = verify-ca", f"server_tls_ca_file = {ca_cert}",
        "client_tls_sslmode = allow", f"client_tls_cert_file = {cert}",
        f"client_tls_key_file = {key}", "default_pool_size = 5", "max_client_conn = 50",
        "server_reset_query = DISCARD ALL", "",
    ]))
    owner = server_owner()
    as_owner: dict[str, object] = {}
    if owner is not None:
        for path in (folder, *folder.iterdir()):
            os.chown(path, *owner)
        as_owner = {"user": owner[0], "group": owner[1], "extra_groups": []}
    proc = subprocess.Popen([PGBOUNCER, str(folder / "pgbouncer.ini")], cwd=folder,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, **as_owner)  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log = folder / "pgbouncer.log"
                raise RuntimeError(f"pgbouncer did not start: "
                                   f"{log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        yield Bouncer(port, aliases, folder / "pgbouncer.log")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
