"""Chat webhooks: Slack-compatible (also Mattermost, Rocket.Chat) and Discord-compatible."""

from __future__ import annotations

import json
from collections.abc import Sequence

from pgvault.events import Event, wanted
from pgvault.sinks.webhook import post

TAIL_LINES = 10


def message(event: Event, limit: int) -> str:
    """The event as chat text: a bold headline, the facts, and the log tail of failures."""
    icon = {"failure": ":red_circle:", "success": ":white_check_mark:"}.get(event.status, "")
    text = f"{icon} *{event.headline()}*\n{event.summary()[len(event.headline()) + 2:]}"
    if event.failed and event.log_tail:
        text += "\n```\n" + "\n".join(event.log_tail[-TAIL_LINES:]) + "\n```"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SlackSink:
    """Posts ``{"text": ...}`` to a Slack incoming webhook."""

    name = "slack"

    def __init__(self, url: str, events: Sequence[str]) -> None:
        self._url = url
        self._events = tuple(events)

    def wants(self, event: Event) -> bool:
        return wanted(self._events, event)

    def send(self, event: Event, timeout: float) -> None:
        body = json.dumps({"text": message(event, 3000)}).encode()
        post(self._url, body, content_type="application/json", timeout=timeout)


class DiscordSink:
    """Posts ``{"content": ...}`` to a Discord webhook (2000 characters, no mentions)."""

    name = "discord"

    def __init__(self, url: str, events: Sequence[str]) -> None:
        self._url = url
        self._events = tuple(events)

    def wants(self, event: Event) -> bool:
        return wanted(self._events, event)

    def send(self, event: Event, timeout: float) -> None:
        text = message(event, 2000).replace(":red_circle:", "🔴").replace(
            ":white_check_mark:", "✅")
        body = json.dumps({"content": text, "username": "pgvault",
                           "allowed_mentions": {"parse": []}}).encode()
        post(self._url, body, content_type="application/json", timeout=timeout)
