"""A local PostgreSQL that behaves like a managed one: TLS only, and a master role that is
no superuser.

``managed_server`` starts one throwaway cluster per test module (about 1 s) with
``ssl = on`` and a pg_hba.conf of ``hostssl`` lines only, as RDS with ``rds.force_ssl``
and Supabase are: a connection without TLS is refused. Its server certificate is signed by
a test CA the fixture generates (``cryptography``); the certificate names ``db.managed.test``
and 127.0.0.1, so ``sslmode=verify-full`` holds for 127.0.0.1 and fails for any other name.

Its ``master`` role is what RDS gives its master user (and Supabase its ``postgres`` role):
LOGIN, CREATEDB, CREATEROLE, a password (scram-sha-256), a member of ``pg_read_all_data``
and of the roles that own the application's objects (``app_owner``), and of the provider's
own role (``rds_superuser``, NOLOGIN); no superuser, so no ``pg_authid``. The provider's
administrator (``supabase_admin``) owns a schema the master cannot take over.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pgvault.pg.cluster import EphemeralCluster, server_owner

SERVER_NAME = "db.managed.test"
MASTER = "master"
MASTER_PASSWORD = "m4ster-Secret-pw"


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate it signed (PEM files)."""

    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_tls_files(folder: Path, hosts: tuple[str, ...] = (SERVER_NAME, "127.0.0.1")) -> TlsFiles:
    """A CA and a server certificate for ``hosts`` (DNS names and IP addresses)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("pgvault test CA"))
          .issuer_name(_name("pgvault test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(folder, folder / "ca.crt", folder / "server.crt", folder / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(files.server_key, 0o600)
    os.chmod(folder, 0o755)
    owner = server_owner()
    if owner is not None:  # the server (the postgres OS user) must read its key, and only it
        for path in (files.server_cert, files.server_key, files.ca_cert):
            os.chown(path, *owner)
    return files


# hostssl only: a connection without TLS matches no line and is refused, as on RDS with
# rds.force_ssl = 1. The fixture's own superuser needs no password (as the provider's
# administrator would not); every other role gives its password.
_HBA = """\
local   all  all                      trust
hostssl all  postgres  127.0.0.1/32   trust
hostssl all  all       127.0.0.1/32   scram-sha-256
"""

_ROLES = f"""
CREATE ROLE rds_superuser NOLOGIN;
CREATE ROLE supabase_admin NOLOGIN;
CREATE ROLE app_owner NOLOGIN;
CREATE ROLE app_reader NOLOGIN;
CREATE ROLE {MASTER} LOGIN CREATEDB CREATEROLE PASSWORD '{MASTER_PASSWORD}';
GRANT pg_read_all_data, rds_superuser, app_owner, app_reader TO {MASTER};
"""


@dataclass
class ManagedServer:
    """The running managed-like cluster and how to reach it."""

    cluster: EphemeralCluster
    tls: TlsFiles

    @property
    def port(self) -> int:
        return self.cluster.port

    def url(self, dbname: str = "postgres", *, user: str = "postgres",
            sslmode: str = "verify-full", **params: str) -> str:
        """A URL over TLS that verifies the server against the test CA (no password)."""
        query = {"sslmode": sslmode, "sslrootcert": str(self.tls.ca_cert), **params}
        return (f"postgresql://{user}@127.0.0.1:{self.port}/{quote(dbname, safe='')}?"
                + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items()))

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(dbname), autocommit=True)


@pytest.fixture(scope="module")
def managed_server() -> Iterator[ManagedServer]:
    """A TLS-only cluster with an RDS-like master role, for one test module."""
    folder = Path(tempfile.mkdtemp(prefix="pgvault-tls-"))
    try:
        tls = make_tls_files(folder)
        hba = folder / "pg_hba.conf"
        hba.write_text(_HBA)
        os.chmod(hba, 0o644)
        settings = {"ssl": True, "ssl_cert_file": str(tls.server_cert),
                    "ssl_key_file": str(tls.server_key), "hba_file": str(hba),
                    "password_encryption": "scram-sha-256", "fsync": False,
                    "synchronous_commit": False, "full_page_writes": False}
        with EphemeralCluster(settings=settings) as cluster:
            server = ManagedServer(cluster, tls)
            with server.admin() as conn:
                conn.execute(_ROLES)
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)
