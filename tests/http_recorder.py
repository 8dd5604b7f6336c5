"""A local HTTP server on 127.0.0.1 that records webhooks, pings and Pushgateway pushes.

Paths decide the answer: /fail/... answers 500, /hang/... answers after 30 s (longer than
any notifier timeout) or when the fixture stops, anything else 200. Every request is
recorded with its body.

``LoopbackServer`` is the HTTP server every stand-in in these tests runs on: its request
threads never print into ``sys.stderr``, which an in-process ``pgvault(...)`` run captures
as its own (cli_runner): a client that hung up is what a timeout test is for, and any other
error goes to the real stderr of the test process.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


class LoopbackServer(ThreadingHTTPServer):
    """A threading HTTP server whose request errors stay out of the captured sys.stderr."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            return  # the client gave up first (its timeout): expected, not a fault
        import traceback

        traceback.print_exc(file=sys.__stderr__)


@dataclass
class Request:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


class Recorder:
    """Where the server is and what it has received so far."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def on(self, prefix: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 30.0,
                 match: Any = None) -> list[Request]:
        """The requests under ``prefix`` once there are ``count`` (matching ``match``)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.on(prefix) if match is None or match(r)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    """A running recorder; stopped (and its hanging answers abandoned) afterwards."""
    box: list[Recorder] = []
    stopping = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            rec = box[0]
            with rec.lock:
                rec.requests.append(Request(self.command, self.path, body, dict(self.headers)))
            if self.path.startswith("/hang"):
                stopping.wait(30)
            code = 500 if self.path.startswith("/fail") else 200
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_PUT = do_POST
        do_GET = do_POST

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = LoopbackServer(("127.0.0.1", 0), Handler)
    box.append(Recorder(server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield box[0]
    stopping.set()
    server.shutdown()
    server.server_close()
