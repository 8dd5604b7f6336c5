"""Healthchecks-style pings: <url>/start when a backup starts, <url> on success, <url>/fail.

Any checker with that URL scheme works (healthchecks.io, a self-hosted Healthchecks at
https://hc.example.com/ping/<uuid>, ...). Failure pings carry the error and log tail as body.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pgvault.events import Event
from pgvault.sinks.webhook import post

SUFFIXES = {"backup.started": "/start", "backup.succeeded": "", "backup.failed": "/fail"}


def ping_url(base: str, suffix: str) -> str:
    """``base`` with ``suffix`` appended to its path (a query string stays at the end)."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix))


class PingSink:
    """Pings a healthchecks-style check at the start, success and failure of each backup."""

    name = "ping"

    def __init__(self, url: str) -> None:
        self._url = url

    def wants(self, event: Event) -> bool:
        return event.kind in SUFFIXES

    def send(self, event: Event, timeout: float) -> None:
        body = event.summary()
        if event.log_tail:
            body += "\n\n" + "\n".join(event.log_tail)
        post(ping_url(self._url, SUFFIXES[event.kind]), body.encode()[-100_000:],
             content_type="text/plain; charset=utf-8", timeout=timeout)
