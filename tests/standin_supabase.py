"""A STAND-IN for Supabase's management API (not Supabase): a local HTTP server that
implements only the one documented request pgvault makes.

    GET /v1/projects/{ref}/database/backups      Authorization: Bearer <access token>

"List all backups" (https://supabase.com/docs/reference/api/v1-list-all-backups; the
backups themselves: https://supabase.com/docs/guides/platform/backups). Its answer, as the
API documents it and public clients read it: ``region``, ``walg_enabled`` (physical
backups), ``pitr_enabled``, ``backups`` (each ``is_physical_backup``, ``status`` such as
"COMPLETED", ``inserted_at``) and ``physical_backup_data`` (``earliest_`` and
``latest_physical_backup_date_unix``, the PITR window). A wrong token gets 401, an unknown
project 404, anything else 404 too. Every request is recorded, for the contract test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

from http_recorder import LoopbackServer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    """The stand-in's state: the project it knows, its token, what it answers."""

    project: str
    token: str
    url: str = ""
    listing: dict[str, Any] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)

    def answer(self, *, backup_ages_hours: list[float], pitr: bool = False,
               now: datetime | None = None) -> None:
        """Answer with completed physical backups of these ages (and PITR on or off)."""
        now = now or datetime.now(UTC)
        times = sorted(now - timedelta(hours=age) for age in backup_ages_hours)
        self.listing = {
            "region": "eu-central-1", "walg_enabled": True, "pitr_enabled": pitr,
            "backups": [{"is_physical_backup": True, "status": "COMPLETED",
                         "inserted_at": t.strftime("%Y-%m-%dT%H:%M:%S.000Z")}
                        for t in reversed(times)],
            "physical_backup_data": ({
                "earliest_physical_backup_date_unix": int(times[0].timestamp()),
                "latest_physical_backup_date_unix": int((now - timedelta(minutes=2))
                                                        .timestamp())}
                if pitr and times else {}),
        }


def _handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            state.requests.append(Recorded("GET", self.path, dict(self.headers.items()),
                                           self.rfile.read(length) if length else b""))
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                self._send(401, {"message": "Unauthorized"})
            elif self.path != f"/v1/projects/{state.project}/database/backups":
                self._send(404, {"message": "Not found"})
            else:
                self._send(200, state.listing)

    return Handler


@contextmanager
def supabase_standin(project: str, token: str) -> Iterator[StandIn]:
    """The stand-in on a free port of 127.0.0.1, for the block."""
    state = StandIn(project, token)
    state.answer(backup_ages_hours=[1, 25, 49])
    server = LoopbackServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
