"""The tests' loopback HTTP server keeps its request errors out of a captured stderr.

An in-process ``pgvault(...)`` run captures ``sys.stderr`` for its duration; a stand-in's
request thread that fails then (a client that timed out long before, whose answer meets a
closed socket) must not print into that capture, or an unrelated run shows two error lines.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler

from http_recorder import LoopbackServer


def test_a_hung_up_client_prints_nothing_into_a_captured_stderr() -> None:
    answered = threading.Event()
    hung_up = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hung_up.wait(10)
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 20))
                self.end_headers()
                for _ in range(64):  # enough to meet the reset of the closed socket
                    self.wfile.write(b"x" * (1 << 14))
            finally:
                answered.set()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = LoopbackServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            client = socket.create_connection(server.server_address[:2])
            client.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            client.close()  # a reset: the answer's writes fail with a ConnectionError
            hung_up.set()
            assert answered.wait(10)
            server.shutdown()  # the request thread has returned through handle_error
    finally:
        server.server_close()
    assert captured.getvalue() == ""
