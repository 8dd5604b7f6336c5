"""Neon snapshots (or point-in-time branches) and drill branches through Neon's HTTP API v2.

The requests (https://neon.com/docs/reference/api, base https://console.neon.tech/api/v2,
``Authorization: Bearer <API key>``):

- ``POST /projects/{project}/branches/{branch}/snapshot?name=&expires_at=``: a snapshot
  (Beta), answered ``{"snapshot": {...}, "operations": [...]}``;
- ``GET /projects/{project}/snapshots`` (``{"snapshots": [...]}``),
  ``DELETE /projects/{project}/snapshots/{id}``;
- ``POST /projects/{project}/snapshots/{id}/restore`` with ``{"name", "finalize_restore":
  false}``: a new branch from the snapshot, the source branch untouched;
- where snapshots are unavailable (``mode = "branch"``): ``POST /projects/{project}/branches``
  with ``{"branch": {"parent_id", "name", "parent_timestamp"}}``, a branch at that moment;
- ``GET /projects/{project}/branches``, ``DELETE /projects/{project}/branches/{id}``;
- ``POST /projects/{project}/endpoints`` with ``{"endpoint": {"branch_id", "type":
  "read_write"}}`` and ``GET /projects/{project}/branches/{id}/endpoints``: the drill's
  compute;
- ``GET /projects/{project}``: ``history_retention_seconds``, Neon's restore window.

Neon has no tags: pgvault's marks live in the names it gives. A snapshot (or branch) is
``pgvault:<database>:<backup id>``; a drill branch is ``<drill name>;<owner>;<started>``.
Nothing else is ever deleted. Neon has no regions to copy to: ``copy_from`` refuses.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pgvault.engines.snapshots import (
    AVAILABLE,
    TAG_BACKUP_ID,
    TAG_DATABASE,
    TAG_DRILL,
    TAG_DRILL_STARTED,
    TAG_MANAGED,
    DrillInstance,
    DrillPlacement,
    ProviderSnapshot,
)
from pgvault.errors import SnapshotFailed
from pgvault.health import AutomatedBackups

API_URL = "https://console.neon.tech/api/v2"
_PREFIX = "pgvault:"
_DRILL_PREFIX = "pgvault-drill-"


def mark(tags: Mapping[str, str]) -> str:
    """The name that carries pgvault's tags: pgvault:<database>:<backup id>."""
    return f"{_PREFIX}{tags[TAG_DATABASE]}:{tags[TAG_BACKUP_ID]}"


def marks(name: str) -> dict[str, str]:
    """The tags a name carries (none for a name pgvault did not give)."""
    if not name.startswith(_PREFIX) or name.count(":") < 2:
        return {}
    database, backup_id = name[len(_PREFIX):].rsplit(":", 1)
    return {TAG_MANAGED: "true", TAG_DATABASE: database, TAG_BACKUP_ID: backup_id}


class NeonProvider:
    """Snapshots of one Neon branch (``mode`` "snapshot"), or branches at a moment
    (``mode`` "branch", where the plan has no snapshots)."""

    kind = "neon"

    def __init__(self, project_id: str, branch_id: str, api_key: str, *,
                 api_url: str = API_URL, mode: str = "snapshot",
                 expire_after: timedelta | None = None, timeout: float = 60.0) -> None:
        if mode not in ("snapshot", "branch"):
            raise ValueError(f"unknown neon mode {mode!r}")
        self._project = project_id
        self._branch = branch_id
        self._key = api_key
        self._url = api_url.rstrip("/")
        self._mode = mode
        self._expire_after = expire_after
        self._timeout = timeout

    @property
    def region(self) -> str:
        """The project: Neon's unit of snapshots and quota."""
        return self._project

    @property
    def source_id(self) -> str:
        return self._branch

    def __repr__(self) -> str:
        return f"NeonProvider({self._project}, {self._branch}, {self._mode})"

    # -- HTTP -----------------------------------------------------------------------------

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One API call; a refusal is a SnapshotFailed naming the call and Neon's message
        (never the key)."""
        url = f"{self._url}/projects/{urllib.parse.quote(self._project)}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        what = f"neon {self._project}: {method} {path}"
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read() or b"{}").get("message", "")
            except ValueError:
                message = ""
            if exc.code == 404:
                raise _Gone(what) from None
            raise SnapshotFailed(f"{what} refused: HTTP {exc.code}"
                                 + (f": {message}" if message else "")) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SnapshotFailed(f"{what} failed: {reason}") from None
        try:
            found: dict[str, Any] = json.loads(raw or b"{}")
        except ValueError:
            raise SnapshotFailed(f"{what}: the answer is not JSON") from None
        return found

    # -- snapshots ------------------------------------------------------------------------

    def create(self, snapshot_id: str, tags: Mapping[str, str]) -> ProviderSnapshot:
        name = mark(tags)
        if self._mode == "branch":
            found = self.request("POST", "/branches", body={"branch": {
                "parent_id": self._branch, "name": name,
                "parent_timestamp": _iso(datetime.now(UTC))}})
            return self._from_branch(found["branch"], found.get("operations", []))
        query = {"name": name}
        if self._expire_after is not None:
            query["expires_at"] = _iso(datetime.now(UTC) + self._expire_after)
        found = self.request("POST", f"/branches/{urllib.parse.quote(self._branch)}/snapshot",
                             query=query)
        return self._from_snapshot(found["snapshot"], found.get("operations", []))

    def _all(self) -> list[ProviderSnapshot]:
        if self._mode == "branch":
            branches = self.request("GET", "/branches").get("branches", [])
            return [self._from_branch(b, []) for b in branches
                    if str(b.get("name", "")).startswith(_PREFIX)]
        return [self._from_snapshot(s, [])
                for s in self.request("GET", "/snapshots").get("snapshots", [])]

    def describe(self, snapshot_id: str) -> ProviderSnapshot | None:
        return next((s for s in self._all() if s.snapshot_id == snapshot_id), None)

    def list_ours(self, database: str) -> list[ProviderSnapshot]:
        return [s for s in self._all() if s.source_id == self._branch and s.ours(database)]

    def count_manual(self) -> int:
        """Neon's limit counts the project's manual snapshots (10 on paid plans)."""
        return sum(1 for s in self._all() if s.tags.get("manual", "true") == "true")

    def delete(self, snapshot_id: str) -> bool:
        kind = "branches" if self._mode == "branch" else "snapshots"
        try:
            self.request("DELETE", f"/{kind}/{urllib.parse.quote(snapshot_id)}")
        except _Gone:
            return False
        return True

    def in_progress(self) -> int:
        return 0

    def copy_from(self, source: ProviderSnapshot, snapshot_id: str, tags: Mapping[str, str],
                  kms_key_id: str | None) -> ProviderSnapshot:
        raise SnapshotFailed("neon has no cross-region snapshot copies: remove "
                             "[snapshot] copies")

    def automated_backups(self, expected_retention_days: int) -> AutomatedBackups:
        """Neon's restore window (history retention) as its automated backups."""
        try:
            project = self.request("GET", "").get("project", {})
        except (SnapshotFailed, _Gone) as exc:
            return AutomatedBackups("neon", self._branch, error=str(exc),
                                    expected_retention_days=expected_retention_days)
        seconds = int(project.get("history_retention_seconds") or 0)
        return AutomatedBackups(
            "neon", self._branch, status="available", retention_days=-(-seconds // 86400),
            # Any moment inside the window can be restored: the window ends now.
            latest_restorable=datetime.now(UTC) if seconds else None,
            expected_retention_days=expected_retention_days)

    # -- drills ---------------------------------------------------------------------------

    def restore_drill(self, snapshot_id: str, name: str, tags: Mapping[str, str],
                      placement: DrillPlacement) -> None:
        # The owner and start time ride in the branch's name (Neon has no tags).
        branch_name = f"{name};{tags.get(TAG_DRILL, '')};{tags.get(TAG_DRILL_STARTED, '')}"
        if self._mode == "branch":
            found = self.request("POST", "/branches", body={"branch": {
                "parent_id": snapshot_id, "name": branch_name}})
        else:
            found = self.request("POST", f"/snapshots/{urllib.parse.quote(snapshot_id)}/restore",
                                 body={"name": branch_name, "finalize_restore": False})
        # Found again by its name, which the branch listing documents, whatever the
        # restore's own answer holds.
        branch = found.get("branch") or self._drill_branch(name)
        if branch is None:
            raise SnapshotFailed(f"neon {self._project}: the restored branch {name} is not "
                                 "listed")
        branch_id = str(branch["id"])
        self.request("POST", "/endpoints", body={"endpoint": {"branch_id": branch_id,
                                                              "type": "read_write"}})

    def _drill_branches(self) -> list[dict[str, Any]]:
        return [b for b in self.request("GET", "/branches").get("branches", [])
                if str(b.get("name", "")).startswith(_DRILL_PREFIX)]

    def _drill_branch(self, name: str) -> dict[str, Any] | None:
        return next((b for b in self._drill_branches()
                     if str(b["name"]).split(";", 1)[0] == name), None)

    def describe_drill(self, name: str) -> DrillInstance | None:
        branch = self._drill_branch(name)
        if branch is None:
            return None
        try:
            endpoints = self.request("GET", f"/branches/{urllib.parse.quote(branch['id'])}"
                                     "/endpoints").get("endpoints", [])
        except _Gone:
            return None
        ready = str(branch.get("current_state", "ready")) == "ready"
        endpoint = next((e for e in endpoints if e.get("host")), None)
        status = AVAILABLE if ready and endpoint is not None else "creating"
        return DrillInstance(name, status, endpoint.get("host") if endpoint else None, 5432,
                             _drill_tags(str(branch["name"])))

    def list_drills(self) -> list[DrillInstance]:
        return [DrillInstance(str(b["name"]).split(";", 1)[0],
                              str(b.get("current_state", "")), tags=_drill_tags(str(b["name"])))
                for b in self._drill_branches()]

    def delete_drill(self, name: str) -> bool:
        branch = self._drill_branch(name)
        if branch is None:
            return False
        try:  # its endpoint goes with it
            self.request("DELETE", f"/branches/{urllib.parse.quote(branch['id'])}")
        except _Gone:
            return False
        return True

    # -- values ---------------------------------------------------------------------------

    def _from_snapshot(self, item: Mapping[str, Any],
                       operations: list[Mapping[str, Any]]) -> ProviderSnapshot:
        tags = marks(str(item.get("name", "")))
        tags["manual"] = "true" if item.get("manual", True) else "false"
        return ProviderSnapshot(
            snapshot_id=str(item["id"]), arn=f"neon:{self._project}:{item['id']}",
            source_id=str(item.get("source_branch_id", "")), status=_status(operations),
            engine="neon", created_at=_time(item.get("created_at")), tags=tags)

    def _from_branch(self, item: Mapping[str, Any],
                     operations: list[Mapping[str, Any]]) -> ProviderSnapshot:
        return ProviderSnapshot(
            snapshot_id=str(item["id"]), arn=f"neon:{self._project}:{item['id']}",
            source_id=str(item.get("parent_id", "")), status=_status(operations),
            engine="neon", created_at=_time(item.get("created_at")),
            tags=marks(str(item.get("name", ""))))


def _drill_tags(name: str) -> dict[str, str]:
    parts = name.split(";")
    if len(parts) != 3:
        return {TAG_DRILL: ""}
    return {TAG_DRILL: parts[1], TAG_DRILL_STARTED: parts[2]}


def _status(operations: list[Mapping[str, Any]]) -> str:
    """Available once every operation the call started has finished."""
    states = {str(op.get("status", "finished")) for op in operations}
    if states & {"failed", "error"}:
        return "failed"
    return AVAILABLE if states <= {"finished", "skipped"} else "creating"


def _time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Gone(Exception):
    """HTTP 404: the snapshot, branch or project named does not exist."""
