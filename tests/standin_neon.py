"""A STAND-IN for Neon's HTTP API v2 on 127.0.0.1: not Neon, only the requests pgvault makes.

It implements, with the paths, parameters and answers Neon documents (as read on
https://neon.com/docs/reference/api/..., the pages named below):

- ``POST /projects/{project_id}/branches/{branch_id}/snapshot`` (query ``name``,
  ``expires_at``, ``lsn``, ``timestamp``) -> ``{"snapshot": {id, name, source_branch_id,
  created_at, expires_at, manual}, "operations": [...]}``
  (reference/api/snapshots/create-snapshot);
- ``GET /projects/{project_id}/snapshots`` -> ``{"snapshots": [...]}`` and
  ``DELETE /projects/{project_id}/snapshots/{snapshot_id}`` (snapshots/list, delete);
- ``POST /projects/{project_id}/snapshots/{snapshot_id}/restore`` with a JSON body
  ``{"name", "target_branch_id", "finalize_restore"}`` -> a new branch
  (snapshots/restore-snapshot). The answer's schema is not shown in what was read; this
  stand-in answers ``{"operations": [...]}`` only, so pgvault must find the new branch by
  its name through the branch listing, as it does;
- ``POST /projects/{project_id}/branches`` with ``{"branch": {"parent_id", "name",
  "parent_timestamp" | "parent_lsn"}}`` -> ``{"branch": {...}, "operations": [...]}``,
  ``GET /projects/{project_id}/branches`` -> ``{"branches": [...]}``,
  ``DELETE /projects/{project_id}/branches/{branch_id}`` (branches; its endpoints go too);
- ``POST /projects/{project_id}/endpoints`` with ``{"endpoint": {"branch_id", "type"}}``
  and ``GET /projects/{project_id}/branches/{branch_id}/endpoints`` -> ``{"endpoints":
  [{id, host, branch_id, type, current_state}]}`` (endpoints);
- ``GET /projects/{project_id}`` -> ``{"project": {id, history_retention_seconds, ...}}``.

Every request needs ``Authorization: Bearer <key>`` (else 401 with ``{"message"}``, as
Neon's errors); an unknown object is 404. Operations finish at once, and a snapshot's
restore copies nothing: there is no database behind it. Every request is recorded
(method, path, query, headers, JSON body) for the contract test.
"""

from __future__ import annotations

import json
import secrets
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from http_recorder import LoopbackServer

API_KEY = "neon-standin-key-0123456789"


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Project:
    id: str
    history_retention_seconds: int = 86400
    branches: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)


class NeonStandIn:
    """The stand-in's state and its URL (``api_url``, as [snapshot] api_url takes it)."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        host, port = server.server_address[:2]
        self.api_url = f"http://{host}:{port}/api/v2"
        self.api_key = API_KEY
        self.calls: list[Call] = []
        self.projects: dict[str, Project] = {}
        self.lock = threading.Lock()
        self.now = lambda: datetime.now(UTC)

    def project(self, branch_name: str = "main") -> tuple[str, str]:
        """A new project with one root branch: (project id, branch id)."""
        pid = f"standin-{secrets.token_hex(4)}"
        project = Project(pid)
        bid = f"br-{secrets.token_hex(4)}"
        project.branches[bid] = self._branch(bid, branch_name, None)
        self.projects[pid] = project
        return pid, bid

    def _branch(self, bid: str, name: str, parent: str | None) -> dict[str, Any]:
        return {"id": bid, "name": name, "parent_id": parent, "current_state": "ready",
                "created_at": _iso(self.now())}

    @staticmethod
    def _operation(pid: str, action: str, **extra: str) -> dict[str, Any]:
        return {"id": secrets.token_hex(8), "project_id": pid, "action": action,
                "status": "finished", **extra}

    def handle(self, method: str, path: str, query: dict[str, str],
               body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if parts[:3] != ["api", "v2", "projects"] or len(parts) < 4:
            return 404, {"message": "not found"}
        project = self.projects.get(parts[3])
        if project is None:
            return 404, {"message": f"project {parts[3]} not found"}
        rest = parts[4:]
        pid = project.id
        if method == "GET" and rest == []:
            return 200, {"project": {"id": pid, "history_retention_seconds":
                                     project.history_retention_seconds}}
        if method == "POST" and len(rest) == 3 and rest[0] == "branches" \
                and rest[2] == "snapshot":
            if rest[1] not in project.branches:
                return 404, {"message": "branch not found"}
            sid = f"snap-{secrets.token_hex(4)}"
            snap = {"id": sid, "name": query.get("name", sid), "source_branch_id": rest[1],
                    "created_at": _iso(self.now()), "manual": True,
                    **({"expires_at": query["expires_at"]} if "expires_at" in query else {})}
            project.snapshots[sid] = snap
            return 200, {"snapshot": snap, "operations": [
                self._operation(pid, "create_snapshot", branch_id=rest[1])]}
        if method == "GET" and rest == ["snapshots"]:
            return 200, {"snapshots": list(project.snapshots.values())}
        if method == "DELETE" and len(rest) == 2 and rest[0] == "snapshots":
            if project.snapshots.pop(rest[1], None) is None:
                return 404, {"message": "snapshot not found"}
            return 200, {"operations": []}
        if method == "POST" and len(rest) == 3 and rest[0] == "snapshots" \
                and rest[2] == "restore":
            snap = project.snapshots.get(rest[1])
            if snap is None:
                return 404, {"message": "snapshot not found"}
            bid = f"br-{secrets.token_hex(4)}"
            name = (body or {}).get("name") or f"restore-{bid}"
            project.branches[bid] = self._branch(bid, name, snap["source_branch_id"])
            return 200, {"operations": [self._operation(pid, "restore_snapshot",
                                                        branch_id=bid)]}
        if method == "POST" and rest == ["branches"]:
            spec = (body or {}).get("branch", {})
            parent = spec.get("parent_id")
            if parent not in project.branches:
                return 404, {"message": "parent branch not found"}
            bid = f"br-{secrets.token_hex(4)}"
            branch = self._branch(bid, spec.get("name") or bid, parent)
            project.branches[bid] = branch
            return 201, {"branch": branch, "operations": [
                self._operation(pid, "create_branch", branch_id=bid)]}
        if method == "GET" and rest == ["branches"]:
            return 200, {"branches": list(project.branches.values())}
        if method == "DELETE" and len(rest) == 2 and rest[0] == "branches":
            if project.branches.pop(rest[1], None) is None:
                return 404, {"message": "branch not found"}
            for eid in [e for e, v in project.endpoints.items() if v["branch_id"] == rest[1]]:
                del project.endpoints[eid]
            return 200, {"operations": []}
        if method == "POST" and rest == ["endpoints"]:
            spec = (body or {}).get("endpoint", {})
            if spec.get("branch_id") not in project.branches:
                return 404, {"message": "branch not found"}
            eid = f"ep-{secrets.token_hex(4)}"
            endpoint = {"id": eid, "host": f"{eid}.standin.neon.invalid",
                        "branch_id": spec["branch_id"], "type": spec.get("type", "read_write"),
                        "current_state": "active"}
            project.endpoints[eid] = endpoint
            return 201, {"endpoint": endpoint, "operations": []}
        if method == "GET" and len(rest) == 3 and rest[0] == "branches" \
                and rest[2] == "endpoints":
            if rest[1] not in project.branches:
                return 404, {"message": "branch not found"}
            return 200, {"endpoints": [e for e in project.endpoints.values()
                                       if e["branch_id"] == rest[1]]}
        return 404, {"message": f"no such request: {method} {path}"}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def neon() -> Iterator[NeonStandIn]:
    """A running stand-in; stopped afterwards."""
    box: list[NeonStandIn] = []

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            standin = box[0]
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            with standin.lock:
                standin.calls.append(Call(self.command, url.path, query, dict(self.headers),
                                          body))
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    code, answer = 401, {"message": "authentication required"}
                else:
                    code, answer = standin.handle(self.command, url.path, query, body)
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = LoopbackServer(("127.0.0.1", 0), Handler)
    box.append(NeonStandIn(server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()
