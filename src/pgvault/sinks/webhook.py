"""Generic JSON webhook: POST every wanted event as a JSON object (and the HTTP transport)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from pgvault import __version__
from pgvault.events import Event, wanted


class SinkError(Exception):
    """A notifier could not deliver; the message never holds the (secret) URL."""


def post(url: str, body: bytes, *, content_type: str, timeout: float) -> int:
    """POST ``body`` to ``url``; the HTTP status, or SinkError naming why it failed."""
    import urllib.error
    import urllib.request

    if urlsplit(url).scheme not in ("http", "https"):
        raise SinkError("notification URLs must be http:// or https://")
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": content_type, "User-Agent": f"pgvault/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1 << 16)
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        raise SinkError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise SinkError(f"cannot reach the server: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise SinkError(f"cannot reach the server: {exc.strerror or exc}") from None


class JsonSink:
    """Base of the sinks that POST one JSON document per wanted event to a secret URL."""

    name = "json"

    def __init__(self, url: str, events: Sequence[str]) -> None:
        self._url = url
        self._events = tuple(events)

    def wants(self, event: Event) -> bool:
        return wanted(self._events, event)

    def document(self, event: Event) -> dict[str, Any]:
        raise NotImplementedError

    def send(self, event: Event, timeout: float) -> None:
        body = json.dumps(self.document(event)).encode()
        post(self._url, body, content_type="application/json", timeout=timeout)


class WebhookSink(JsonSink):
    """POSTs ``Event.to_json()``: event, database, backup id, status, times, size, error, tail."""

    name = "webhook"

    def document(self, event: Event) -> dict[str, Any]:
        return event.to_json()
