"""The console's HTTP side: routes, the token check, the security headers, rendering.

``Console.respond(handler, method)`` answers one request on a ``BaseHTTPRequestHandler``,
so the daemon mounts it on its own server (beside /metrics, /healthz, /status) and
``pgvault console`` on one of its own (``serve``). Read-only: GET pages, and POST only to
/login, which sets a session cookie once the token matches.

Beyond loopback every page needs the token (``Authorization: Bearer <token>``, or the
cookie /login sets: an HMAC of the token, never the token itself), compared in constant
time; a console beyond loopback without a token refuses every page. Every answer carries
a Content-Security-Policy that allows nothing but this server's own style sheet: no
script runs on these pages, and none can be injected. Every page passes through the
redactor, so no registered secret (a password, a webhook URL) can be rendered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote

from pgvault import __version__, logs, redact
from pgvault.catalog import Catalog
from pgvault.config import Settings
from pgvault.errors import ConfigError, PgvaultError
from pgvault.health import DatabaseStatus
from pgvault.ops import jobs
from pgvault.vault import Vault
from pgvault.web import actions, reads, views
from pgvault.web.actions import Actions

log = logs.get("console")

CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
COOKIE = "pgvault_console"
CSRF_COOKIE = "pgvault_csrf"
HTML = "text/html; charset=utf-8"
MAX_FORM = 4096
"""A form (/login, an action) holds a few short fields: anything longer is refused unread."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as the server binds it) is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def console_token(settings: Settings) -> str | None:
    """The console's token: PGVAULT_CONSOLE_TOKEN (or its _FILE), else [console] token_file.

    Registered with the redactor, so no page, log line or error can show it.
    """
    token = settings.secrets.get("PGVAULT_CONSOLE_TOKEN")
    path = settings.console.token_file
    if not token and path:
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read console.token_file ({path}): "
                              f"{exc.strerror or exc}") from None
    if token is not None and token and len(token) < 16:
        raise ConfigError("the console token is shorter than 16 characters: make one with "
                          "`openssl rand -hex 32`")
    redact.register(token)
    return token or None


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = HTML
    headers: list[tuple[str, str]] = field(default_factory=list)

    def send(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(self.status)
        handler.send_header("Content-Type", self.content_type)
        handler.send_header("Content-Length", str(len(self.body)))
        for name, value in (*SECURITY_HEADERS, *self.headers):
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(self.body)


class Console:
    """The read-only console over some databases (``sources``, asked on every request)."""

    def __init__(self, sources: views.Sources, *, host: str, token: str | None,
                 next_runs: views.NextRuns | None = None,
                 clock: Callable[[], datetime] | None = None, daemon: bool = False,
                 actions: Actions | None = None) -> None:
        self.sources = sources
        self.actions = actions
        """None: read-only (the default: [console] actions = true turns them on)."""
        self._csrf_key = secrets.token_bytes(32)
        self.host = host
        self.token = token
        self.next_runs = next_runs
        self.clock = clock or (lambda: datetime.now(UTC))
        self.daemon = daemon
        self.needs_token = token is not None or not is_loopback(host)
        self._reads: dict[int, reads.Reads] = {}
        self._statuses: dict[tuple[int, int, str], tuple[Any, DatabaseStatus]] = {}
        self._copies: dict[tuple[int, str], Vault] = {}
        self._request = threading.local()
        self._reads_lock = threading.Lock()

    @cached_property
    def _templates(self) -> Any:
        import jinja2

        env = jinja2.Environment(loader=jinja2.PackageLoader("pgvault.web", "templates"),
                                 autoescape=True, undefined=jinja2.StrictUndefined,
                                 trim_blocks=True, lstrip_blocks=True)
        env.globals["version"] = __version__
        env.filters["dbhref"] = views.database_href
        return env

    @cached_property
    def _css(self) -> bytes:
        return resources.files("pgvault.web").joinpath("static/console.css").read_bytes()

    def viewed(self) -> list[tuple[str, Vault]]:
        """The sources for one request, each vault reading through this request's view of
        its storage (``reads``: each record folder listed once, unchanged records reused)."""
        views_of: dict[int, reads.View] = {}
        self._request.views = views_of
        return [(name, self._through(vault, views_of)) for name, vault in self.sources()]

    def _through(self, vault: Vault, views_of: dict[int, reads.View]) -> Vault:
        key = id(vault.storage)
        view = views_of.get(key)
        if view is None:
            with self._reads_lock:
                cache = self._reads.get(key)
                if cache is None or cache.storage is not vault.storage:
                    cache = self._reads[key] = reads.Reads(vault.storage)
            view = views_of[key] = cache.view()
        return dataclasses.replace(vault, storage=view, catalog=Catalog(view))

    def _open_copy(self, vault: Vault, repo: str) -> Vault:
        """The vault of a [[repos]] copy, opened once, read through this request's view."""
        key = (id(vault.settings), repo)
        with self._reads_lock:
            opened = self._copies.get(key)
        if opened is None:
            opened = vault.repository(repo)
            with self._reads_lock:
                opened = self._copies.setdefault(key, opened)
        views_of = getattr(self._request, "views", None)
        return opened if views_of is None else self._through(opened, views_of)

    def _status_of(self, vault: Vault, name: str) -> DatabaseStatus:
        """``ops.jobs.status_of``, reused from an earlier request while this request's
        listing shows every record of the database unchanged (same keys and versions)."""
        view = vault.storage
        signature = view.signature(name) if isinstance(view, reads.View) else None
        key = (id(view.base) if isinstance(view, reads.View) else id(view),
               id(vault.settings), name)
        if signature is not None:
            with self._reads_lock:
                found = self._statuses.get(key)
            if found is not None and found[0] == signature:
                return found[1]
        status = jobs.status_of(vault, name)
        if signature is not None and status.archive is None:  # WAL is not in the signature
            with self._reads_lock:
                self._statuses[key] = (signature, status)
        return status

    # -- the token ----------------------------------------------------------------------

    def _session(self) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), b"pgvault console session",
                        hashlib.sha256).hexdigest()

    def authorized(self, headers: Any) -> bool:
        """Whether the request may see pages: on loopback without a token, always; else
        with the token (bearer) or the session cookie, compared in constant time."""
        if not self.needs_token:
            return True
        if self.token is None:
            return False
        given = headers.get("Authorization") or ""
        if given.startswith("Bearer ") and hmac.compare_digest(
                given[7:].strip().encode(), self.token.encode()):
            return True
        for part in (headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self._session().encode()):
                return True
        return False

    def refusal(self, headers: Any) -> Response | None:
        """The answer to a request without the token (None: it may go on)."""
        if self.authorized(headers):
            return None
        if self.token is None:
            return self._page("message.html", 403, title="Console locked",
                              message=f"This console listens on {self.host}, beyond loopback, "
                                      "and has no token, so it shows nothing. Set [console] "
                                      "token_file or PGVAULT_CONSOLE_TOKEN_FILE.")
        response = self._page("login.html", 401, failed=False)
        response.headers.append(("WWW-Authenticate", 'Bearer realm="pgvault console"'))
        return response

    # -- answering ----------------------------------------------------------------------

    def respond(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        """Answer the request ``handler`` holds (its path, headers and body)."""
        try:
            response = self.answer(method, handler.path, handler.headers, handler.rfile,
                                   client=str(handler.client_address[0]))
        except Exception as exc:  # a page must never take the server down, nor leak a trace
            log.warning("console: %s %s failed: %s", method, handler.path.split("?")[0],
                        redact.scrub(f"{type(exc).__name__}: {exc}"))
            response = self._page("message.html", 500, title="Internal error",
                                  message="The page could not be built; the log says why.")
        response.send(handler)

    def answer(self, method: str, target: str, headers: Any,
               body: Any = None, client: str = "") -> Response:
        """The response to one request (``body``: a readable for POST; ``client``: the
        peer's address, which an action's event names)."""
        raw, _, query = target.partition("?")
        path = unquote(raw)
        if path == "/static/console.css":
            return Response(200, self._css, "text/css; charset=utf-8",
                            [("Cache-Control", "max-age=300")])
        if path == "/login":
            return self._login(method, headers, body)
        if method not in ("GET", "HEAD", "POST"):
            return self._page("message.html", 405, title="Not allowed",
                              message=f"{method} is not a method of this console.")
        if method == "POST" and self.actions is None:
            return self._page("message.html", 405, title="Read-only",
                              message="This console is read-only: it changes nothing. "
                                      "[console] actions = true enables its actions.")
        refused = self.refusal(headers)
        if refused is not None:
            return refused
        if method == "POST":
            return self._action(raw, headers, body, client)
        now = self.clock()
        runs = self.next_runs() if self.next_runs is not None else {}
        if path == "/":
            started = time.perf_counter()
            rows = views.overview(self.viewed(), now, runs, self._status_of, self._open_copy)
            return self._page("overview.html", 200, rows=rows, now=now,
                              counts=_counts(rows), took=time.perf_counter() - started)
        if path.startswith("/jobs/") and self.actions is not None:
            job = self.actions.job(path[6:])
            if job is None:
                return self._page("message.html", 404, title="No such job",
                                  message="This console does not know that job (jobs are "
                                          "kept while it runs, the last 100).")
            return self._page("job.html", 200, job=job)
        if raw.startswith("/db/"):
            name, _, sub = raw[4:].partition("/")
            name = unquote(name)
            vault = next((v for n, v in self.viewed() if n == name), None)
            if vault is None:
                return self._page("message.html", 404, title="No such database",
                                  message=f"No database {name!r} is configured here.")
            if sub == "restore" and self.actions is not None:
                backup = (parse_qs(query).get("backup") or ["latest"])[0]
                token, cookie = self._csrf(headers)
                response = self._page("restore.html", 200, database=name, backup=backup,
                                      csrf=token, command=actions.command_for(
                                          "restore", name, vault, {"backup": backup}))
                response.headers += cookie
                return response
            if sub:
                return self._page("message.html", 404, title="Not found",
                                  message="Nothing here: the overview is at /.")
            try:
                page = views.database_page(name, vault, now, runs, self._open_copy)
            except PgvaultError as exc:
                return self._page("message.html", 503, title=f"{name}: repository unreadable",
                                  message=str(exc))
            token, cookie = self._csrf(headers)
            response = self._page("database.html", 200, page=page, row=page.row, now=now,
                                  csrf=token)
            response.headers += cookie
            return response
        if path == "/fleet":  # fleet mode: every database against its window (ops/fleet.py)
            from pgvault.ops.fleet import console_view

            return self._page("fleet.html", 200, now=now, **console_view(self.sources(), now))
        return self._page("message.html", 404, title="Not found",
                          message="Nothing here: the overview is at /.")

    # -- actions ------------------------------------------------------------------------

    def _csrf(self, headers: Any) -> tuple[str, list[tuple[str, str]]]:
        """The form token of this browser (an HMAC of its CSRF cookie under a key of this
        process), and the Set-Cookie header when it has no such cookie yet."""
        nonce = _cookie(headers, CSRF_COOKIE)
        set_cookie = []
        if not nonce or len(nonce) > 64:
            nonce = secrets.token_urlsafe(24)
            set_cookie = [("Set-Cookie", f"{CSRF_COOKIE}={nonce}; Path=/; HttpOnly; "
                                         "SameSite=Strict")]
        return self._csrf_token(nonce), set_cookie

    def _csrf_token(self, nonce: str) -> str:
        return hmac.new(self._csrf_key, b"pgvault csrf " + nonce.encode(),
                        hashlib.sha256).hexdigest()

    def principal(self, headers: Any, client: str = "") -> str:
        """Who asks: "loopback" where no token is needed, else how the token was given."""
        if not self.needs_token:
            who = "loopback"
        elif (headers.get("Authorization") or "").startswith("Bearer "):
            who = "token (bearer)"
        else:
            who = "token (session)"
        return f"{who} from {client}" if client else who

    def _action(self, raw: str, headers: Any, body: Any, client: str) -> Response:
        assert self.actions is not None
        parts = raw.split("/")
        if len(parts) != 4 or parts[1] != "db":
            return self._page("message.html", 404, title="No such action",
                              message="Actions are POSTs to /db/NAME/ACTION.")
        name, action = unquote(parts[2]), parts[3]
        posted = _form(headers, body)
        if posted is None:
            return self._page("message.html", 413, title="Too large",
                              message="An action's form is small; this one is not.")
        form = actions.form_values(posted)
        nonce = _cookie(headers, CSRF_COOKIE)
        given = form.pop("csrf", "")
        if not nonce or not hmac.compare_digest(given.encode(),
                                                self._csrf_token(nonce).encode()):
            log.warning("console: %s refused: no valid CSRF token (from %s)", raw,
                        client or "?")
            return self._page("message.html", 403, title="Refused",
                              message="This form did not come from this console's own page "
                                      "(its CSRF token is missing or wrong): reload the "
                                      "page and try again.")
        vault = next((v for n, v in self.sources() if n == name), None)
        if vault is None:
            return self._page("message.html", 404, title="No such database",
                              message=f"No database {name!r} is configured here.")
        try:
            job = self.actions.start(action, name, vault, form, self.principal(headers, client))
        except actions.Refused as exc:
            log.warning("console: %s of %s refused: %s", action, name, exc)
            return self._page("message.html", exc.status, title="Refused",
                              message=str(exc), command=actions.command_for(
                                  action, name, vault, form) if action in actions.KINDS
                              else None, back=views.database_href(name))
        return Response(303, b"", "text/plain; charset=utf-8",
                        [("Location", f"/jobs/{job.id}")])

    def _login(self, method: str, headers: Any, body: Any) -> Response:
        if self.token is None:
            return self._page("message.html", 404 if not self.needs_token else 403,
                              title="No login", message="This console has no token to log "
                              "in with." if not self.needs_token else
                              "This console listens beyond loopback without a token: set "
                              "[console] token_file or PGVAULT_CONSOLE_TOKEN_FILE.")
        if method != "POST":
            return self._page("login.html", 200, failed=False)
        form = _form(headers, body)
        if form is None:
            return self._page("message.html", 413, title="Too large",
                              message="A login form holds one token.")
        given = (form.get("token") or [""])[0].strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return self._page("login.html", 401, failed=True)
        return Response(303, b"", "text/plain; charset=utf-8", [
            ("Location", "/"),
            ("Set-Cookie", f"{COOKIE}={self._session()}; Path=/; HttpOnly; SameSite=Strict"),
        ])

    def _page(self, template: str, status: int, **values: Any) -> Response:
        values.setdefault("command", None)
        values.setdefault("back", "/")
        html = self._templates.get_template(template).render(
            daemon=self.daemon, needs_token=self.needs_token,
            actions=self.actions is not None, **values)
        return Response(status, redact.scrub(html).encode())


def _form(headers: Any, body: Any) -> dict[str, list[str]] | None:
    """A posted form's fields, or None when it is missing or larger than MAX_FORM."""
    try:
        length = int(headers.get("Content-Length") or 0)
    except ValueError:
        return None
    if not 0 <= length <= MAX_FORM or body is None:
        return None
    return parse_qs(body.read(length).decode("utf-8", "replace"))


def _cookie(headers: Any, name: str) -> str:
    for part in (headers.get("Cookie") or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def _counts(rows: list[views.Row]) -> dict[str, int]:
    counts = {"CRITICAL": 0, "WARNING": 0, "OK": 0, "UNKNOWN": 0}
    for r in rows:
        counts[r.state_name] += 1
    return counts


def handler_class(console: Console) -> type[BaseHTTPRequestHandler]:
    """A request handler serving only the console (and /healthz), for `pgvault console`."""

    class Handler(BaseHTTPRequestHandler):
        server_version = f"pgvault/{__version__}"

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/healthz":
                Response(200, b"ok\n", "text/plain; charset=utf-8").send(self)
            else:
                console.respond(self, "GET")

        def do_HEAD(self) -> None:
            console.respond(self, "HEAD")

        def do_POST(self) -> None:
            console.respond(self, "POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # pages are read often; errors are logged by the console itself

    return Handler


def serve(console: Console, listen: tuple[str, int]) -> ThreadingHTTPServer:
    """Start serving ``console`` on ``listen`` in a thread; the caller shuts it down."""
    try:
        server = ThreadingHTTPServer(listen, handler_class(console))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen[0]}:{listen[1]}: "
                          f"{exc.strerror or exc}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pgvault-console", daemon=True).start()
    return server
