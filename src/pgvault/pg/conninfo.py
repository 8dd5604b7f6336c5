"""Connection settings: parse names, URLs (Prisma-style too), keep the password out of argv."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from pgvault.errors import ConfigError

# Parameters Prisma and ORMs put in DATABASE_URL that libpq rejects.
ORM_PARAMS = {
    "schema",
    "pgbouncer",
    "connection_limit",
    "pool_timeout",
    "socket_timeout",
    "statement_cache_size",
    "sslaccept",
    "sslidentity",
    "connect_timeout_ms",
}


# libpq's keywords as of PostgreSQL 17. A URL using only these (and ORM_PARAMS) is parsed
# here without importing psycopg (~0.15 s); anything else goes to libpq's own parser.
COMMON_KEYWORDS = frozenset({
    "application_name", "channel_binding", "client_encoding", "connect_timeout", "dbname",
    "fallback_application_name", "gssdelegation", "gssencmode", "gsslib", "host", "hostaddr",
    "keepalives", "keepalives_count", "keepalives_idle", "keepalives_interval", "krbsrvname",
    "load_balance_hosts", "options", "passfile", "password", "port", "replication",
    "require_auth", "requirepeer", "service", "ssl_max_protocol_version",
    "ssl_min_protocol_version", "sslcert", "sslcertmode", "sslcompression", "sslcrl",
    "sslcrldir", "sslkey", "sslmode", "sslnegotiation", "sslpassword", "sslrootcert", "sslsni",
    "target_session_attrs", "tcp_user_timeout", "user",
})


def _libpq_keywords() -> set[str]:
    from psycopg import pq

    return {opt.keyword.decode() for opt in pq.Conninfo.get_defaults()}


def _simple_url(text: str) -> dict[str, str] | None:
    """libpq's reading of a one-host URL with common parameters; None for any other URL."""
    if any(c.isspace() for c in text) or _BAD_PERCENT.search(text):
        return None  # libpq refuses these: its parser says where
    try:
        parts = urlsplit(text)
    except ValueError:  # an unbalanced '[': libpq's parser names it
        return None
    if "," in parts.netloc or "[" in parts.netloc or parts.fragment:
        return None
    items = [item for item in parts.query.split("&") if item]
    if any("=" not in item for item in items):
        return None
    query = dict(item.split("=", 1) for item in items)
    if len(query) != len(items) or not set(query) <= COMMON_KEYWORDS | ORM_PARAMS:
        return None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    host, _, port = hostport.partition(":")
    if port and not port.isdigit():
        raise ConfigError(f"malformed connection URL {_masked(text)}: port {port!r} is not a "
                          "number")
    found = {"user": user, "password": password, "dbname": parts.path[1:], "host": host,
             "port": port} | query
    return {key: unquote(value) for key, value in found.items() if value}


URL_FORM = "postgresql://user@host:port/dbname"
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# "user:pw@host/db", "app@db:5432/app": a URL that lost its scheme, not a database name.
_SCHEMELESS = re.compile(r"[^\s/@=]+@[^\s/@=]+[:/]")


def _forbid_malformed_url(text: str) -> None:
    """ConfigError for a URL that libpq would take for a database name.

    libpq reads anything without "postgres(ql)://" or "=" as a name, so "postgres//h/db" or
    "mysql://..." used to be backed up as a database of that name (and, failing, filed
    in the repository under it). The message never shows a password.
    """
    if text.startswith(("postgres://", "postgresql://")):
        return
    equals, url = text.find("="), text.find("://")
    if equals != -1 and (url == -1 or equals < url):
        return  # key=value conninfo: libpq's parser judges it
    scheme = _SCHEME.match(text)
    after = text[scheme.end():] if scheme else ""
    problem = None
    if scheme and scheme[1].lower() in ("postgres", "postgresql") and after.startswith("//"):
        problem = f"write its scheme in lower case ({scheme[1].lower()}://)"
    elif "://" in text:
        problem = f"{text.partition('://')[0]!r} is not a PostgreSQL URL scheme; write {URL_FORM}"
    elif re.match(r"postgres(ql)?[:/]", text, re.IGNORECASE) or after.startswith("/"):
        problem = f"it lacks the '://' of {URL_FORM}"
    elif _SCHEMELESS.match(text):
        problem = f"it lacks its scheme: {URL_FORM}"
    if problem is not None:
        raise ConfigError(f"malformed connection URL {_masked(text)}: {problem}")


def _userinfo_secret(text: str) -> str | None:
    """What may be a password in ``text``: from the ':' after the user to the last '@'.

    Taken generously (a malformed URL has no reliable parse): it is only ever masked.
    """
    _, sep, rest = text.partition("://")
    userinfo, at, _ = (rest if sep else text).rpartition("@")
    if not at or ":" not in userinfo:
        return None
    return userinfo.partition(":")[2] or None


def _masked(text: str) -> str:
    """``text`` quoted for a message, its password (if any) as ***, and registered as secret."""
    secret = _userinfo_secret(text)
    if secret:
        from pgvault import redact

        redact.register(secret, unquote(secret))
        at = text.rindex("@")
        text = text[:at - len(secret)] + "***" + text[at:]
    return repr(text)


def _without_secrets(reason: str, text: str) -> str:
    """A parser's message about ``text`` with the password masked (libpq quotes what it read)."""
    secret = _userinfo_secret(text)
    for value in (secret, unquote(secret)) if secret else ():
        reason = reason.replace(value, "***")
    if re.search(r"password\s*=", text, re.IGNORECASE):  # key=value: libpq quotes tokens
        reason = re.sub(r'"[^"]*"', '"..."', reason)
    return reason


@dataclass(frozen=True)
class ConnInfo:
    """libpq parameters with the password held apart, so it can be handed over safely."""

    params: Mapping[str, str] = field(default_factory=dict)
    password: str | None = field(default=None, repr=False)
    schema: str | None = None
    environ: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
    """The environment libpq's PG* defaults and child processes come from (the settings'
    snapshot); None: this process's own."""
    pgbouncer: bool = False
    """The URL said ``pgbouncer=true`` (Prisma's mark of a pooler, often one in
    transaction mode; the backup asks the server to be sure)."""

    @classmethod
    def parse(cls, spec: str | None, password: str | None = None,
              environ: Mapping[str, str] | None = None) -> ConnInfo:
        """Parse a database name, a postgres:// URL or a key=value string."""
        schema = None
        pooled = False
        text = (spec or "").strip()
        _forbid_malformed_url(text)
        simple = _simple_url(text) if text.startswith(("postgres://", "postgresql://")) else \
            ({"dbname": text} if text and "=" not in text else None if text else {})
        if simple is not None:
            schema = simple.get("schema")
            params = {k: v for k, v in simple.items() if k not in ORM_PARAMS}
            secret = params.pop("password", None) or password
            return cls(params=params, password=secret, schema=schema, environ=environ,
                       pgbouncer=_true(simple.get("pgbouncer")))
        from psycopg.conninfo import conninfo_to_dict

        if text.startswith(("postgres://", "postgresql://")):
            try:
                parts = urlsplit(text)
            except ValueError as exc:
                raise ConfigError(f"malformed connection URL {_masked(text)}: {exc}") from None
            query = parse_qsl(parts.query, keep_blank_values=True)
            known = _libpq_keywords()
            kept = []
            for key, value in query:
                if key == "schema":
                    schema = value
                if key == "pgbouncer":
                    pooled = _true(value)
                if key in known:
                    kept.append((key, value))
            text = urlunsplit(parts._replace(query=urlencode(kept)))
        elif text and "=" not in text:
            text = f"dbname='{_quote(text)}'"
        try:
            raw = conninfo_to_dict(text)
        except Exception as exc:
            what = (f"malformed connection URL {_masked(spec or '')}" if "://" in text
                    else "cannot parse the database connection")
            raise ConfigError(f"{what}: {_without_secrets(_scrub(exc), spec or '')}") from None
        params = {k: str(v) for k, v in raw.items() if v is not None and k not in ORM_PARAMS}
        secret = params.pop("password", None) or password
        return cls(params=params, password=secret, schema=schema, environ=environ,
                   pgbouncer=pooled)

    @property
    def dbname(self) -> str | None:
        return self.params.get("dbname")

    def transaction_pooler(self) -> str | None:
        """Why the URL's host is known to be a transaction pooler; None if it is not.

        pg_dump's exported snapshot and long transaction need one server session for the
        whole dump, which a pooler in transaction mode does not give (ops: the backup
        refuses; LogicalEngine.preflight also asks the server).
        """
        host = (self.params.get("host") or "").lower()
        port = self.params.get("port") or ""
        if any(name.split(".", 1)[0].endswith("-pooler") for name in host.split(",")):
            return "its host is a Neon pooled endpoint (-pooler)"
        if host.endswith(".pooler.supabase.com") and port == "6543":
            return "it is Supabase's transaction pooler (port 6543)"
        return None

    def with_dbname(self, dbname: str) -> ConnInfo:
        """The same server and credentials, another database."""
        return replace(self, params={**self.params, "dbname": dbname})

    def dsn(self) -> str:
        """A key=value string without the password, safe for argv and logs."""
        return " ".join(f"{key}={_param_escape(value)}" for key, value in self.params.items())

    def url(self) -> str:
        """A postgresql:// URL without the password (nor connect_timeout), for DATABASE_URL
        and what a user pastes into psql; a socket folder as ``host`` goes in the query."""
        params = dict(self.params)
        user = quote(params.pop("user", ""), safe="")
        host = params.pop("host", "")
        port = params.pop("port", "")
        dbname = quote(params.pop("dbname", ""), safe="")
        query: dict[str, str] = {}
        if host.startswith("/"):
            query["host"], host = host, ""
        query.update((k, v) for k, v in params.items() if k != "connect_timeout")
        netloc = (user + "@" if user else "") + host + (":" + port if port else "")
        return f"postgresql://{netloc}/{dbname}" + ("?" + urlencode(query) if query else "")

    def redacted(self) -> str:
        """A short human description: user@host:port/db."""
        p, env = self.params, self.env()
        host = p.get("host") or env.get("PGHOST") or "localhost"
        port = p.get("port") or env.get("PGPORT") or "5432"
        user = p.get("user") or env.get("PGUSER") or ""
        db = p.get("dbname") or env.get("PGDATABASE") or user
        return f"{user + '@' if user else ''}{host}:{port}/{db}"

    def env(self) -> Mapping[str, str]:
        """The environment this connection was given (this process's when none was)."""
        return os.environ if self.environ is None else self.environ

    def on_this_host(self) -> bool:
        """Whether the server is reached over a Unix socket or loopback, so shares our CPUs."""
        env = self.env()
        hosts = self.params.get("hostaddr") or self.params.get("host") \
            or env.get("PGHOSTADDR") or env.get("PGHOST") or ""
        return all(host.startswith(("/", "@")) or host in LOOPBACK or host.startswith("127.")
                   for host in hosts.split(","))

    def connect(self, **kwargs: Any) -> Any:
        """A psycopg connection; failures become one-line DatabaseErrors."""
        import psycopg

        from pgvault.errors import DatabaseError

        params: dict[str, Any] = {**self.params, **kwargs}
        if self.password is not None:
            params["password"] = self.password
        params.setdefault("connect_timeout", 15)
        try:
            return psycopg.connect(**params)
        except psycopg.Error as exc:
            raise DatabaseError(
                f"cannot connect to {self.redacted()}: {_scrub(exc)}"
            ) from None

    @contextlib.contextmanager
    def child_env(self) -> Iterator[dict[str, str]]:
        """Environment for pg_dump & co: the password in a private PGPASSFILE, never argv.

        The PGPASSFILE is an in-memory file (memfd) that children open by this process's
        /proc/PID/fd/N: it lives only as long as this process holds it, so not even SIGKILL
        leaves the password on disk. libpq accepts it: a regular file, mode 0600. Where
        there is no memfd (not Linux), a 0600 file in a folder the next run removes once
        this process is dead (leftovers.py).

        Secrets the PostgreSQL tools do not need (S3 keys, the age passphrase, any value
        holding a registered secret) are left out, so no child process can leak them.
        """
        from pgvault import redact

        env = {name: value for name, value in self.env().items()
               if name not in CHILD_HIDDEN and not redact.contains_secret(value)}
        if self.password is None:
            yield env
            return
        line = f"*:*:*:*:{_escape_pgpass(self.password)}\n".encode()
        proc_fds = f"/proc/{os.getpid()}/fd"
        if hasattr(os, "memfd_create") and os.path.isdir(proc_fds):
            fd = os.memfd_create("pgvault-pgpass", os.MFD_CLOEXEC)
            try:
                os.fchmod(fd, 0o600)  # a memfd starts 0777, which libpq refuses
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                env["PGPASSFILE"] = f"{proc_fds}/{fd}"
                yield env
            finally:
                os.close(fd)
            return
        from pgvault import leftovers

        folder = leftovers.private_folder("pass")
        path = os.path.join(folder, "pgpass")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(line)
            env["PGPASSFILE"] = path
            yield env
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(folder)


LOOPBACK = frozenset({"", "localhost", "::1"})

# Never handed to child processes (the password goes through PGPASSFILE instead).
CHILD_HIDDEN = frozenset({
    "PGPASSWORD", "DATABASE_URL", "DIRECT_URL", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN", "PGVAULT_AGE_PASSPHRASE", "PGVAULT_S3_SSE_C_KEY", "PGVAULT_DATABASE",
})


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes", "on")


def _param_escape(value: str) -> str:
    """A value as libpq reads it in key=value form (as psycopg's make_conninfo writes it)."""
    if not value:
        return "''"
    value = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{value}'" if any(c.isspace() for c in value) else value


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _escape_pgpass(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _scrub(exc: BaseException) -> str:
    """The first line of a libpq error, which never echoes the password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
