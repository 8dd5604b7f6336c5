"""Supabase's own backups, as its management API lists them: monitored, never made here.

Supabase takes daily physical backups (and, with the PITR add-on, a continuous WAL
archive) of each project, and its management API lists them (``GET
/v1/projects/{ref}/database/backups``, Bearer access token) but can neither create nor
download one. So pgvault reports them beside its own backups (`check`, `status`: the newest
physical backup's age against the RPO, PITR on or off), and the logical backup it takes
itself stays the portable copy, restorable anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pgvault.errors import ConfigError, DatabaseError, PgvaultError
from pgvault.health import DatabaseStatus, ProviderBackups

if TYPE_CHECKING:
    from pgvault.config import Settings

API_URL = "https://api.supabase.com"


def backups_path(project: str) -> str:
    """The one request pgvault makes of the management API."""
    return f"/v1/projects/{quote(project, safe='')}/database/backups"


def _time(value: Any) -> datetime | None:
    if isinstance(value, int | float) and value > 0:
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str) and value:
        try:
            found = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return found if found.tzinfo else found.replace(tzinfo=UTC)
    return None


def parse_backups(project: str, body: Any) -> ProviderBackups:
    """The listing's facts: completed physical backups, the newest, PITR and its window."""
    if not isinstance(body, dict):
        raise DatabaseError("the backups listing is not a JSON object")
    listed = body.get("backups") or []
    done = [_time(b.get("inserted_at")) for b in listed if isinstance(b, dict)
            and str(b.get("status", "")).upper() == "COMPLETED"
            and b.get("is_physical_backup", True)]
    times = sorted(t for t in done if t is not None)
    window = body.get("physical_backup_data") or {}
    return ProviderBackups(
        provider="supabase", source_id=project, backups=len(times),
        newest=times[-1] if times else None, pitr_enabled=bool(body.get("pitr_enabled")),
        pitr_earliest=_time(window.get("earliest_physical_backup_date_unix")),
        pitr_latest=_time(window.get("latest_physical_backup_date_unix")),
        region=str(body.get("region") or ""))


def list_backups(project: str, token: str, *, api_url: str = API_URL,
                 timeout: float = 10.0) -> ProviderBackups:
    """Ask the management API; DatabaseError in one line (never showing the token)."""
    request = urllib.request.Request(
        api_url.rstrip("/") + backups_path(project), method="GET",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                 "User-Agent": "pgvault"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read(4 << 20))
    except urllib.error.HTTPError as exc:
        why = {401: "the access token was refused", 403: "the access token may not read "
               "this project", 404: "no such project"}.get(exc.code, exc.reason)
        raise DatabaseError(f"Supabase API: {why} (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatabaseError(f"Supabase API at {api_url} not reachable: {reason}") from None
    except ValueError:
        raise DatabaseError("Supabase API: the answer is not JSON") from None
    return parse_backups(project, body)


def with_provider_backups(status: DatabaseStatus, settings: Settings) -> DatabaseStatus:
    """``status`` with the Supabase project's own backups, when [supabase] names one; what
    keeps them from being listed becomes the listing's error (a warning), never a crash."""
    section = settings.supabase
    if section is None:
        return status
    try:
        token = settings.secrets.get("SUPABASE_ACCESS_TOKEN")
        if not token:
            raise ConfigError("[supabase] needs an access token: set SUPABASE_ACCESS_TOKEN "
                              "or SUPABASE_ACCESS_TOKEN_FILE")
        found = list_backups(section.project, token, api_url=section.api_url,
                             timeout=section.timeout_seconds)
    except PgvaultError as exc:
        found = ProviderBackups("supabase", section.project, error=str(exc))
    return dataclasses.replace(status, provider_backups=found)
