"""Chat webhooks: Slack-compatible (also Mattermost, Rocket.Chat) and Discord-compatible."""

from __future__ import annotations

from typing import Any

from pgvault.events import Event
from pgvault.sinks.webhook import JsonSink

TAIL_LINES = 10


def message(event: Event, limit: int) -> str:
    """The event as chat text: a bold headline, the facts, and the log tail of failures."""
    icon = {"failure": ":red_circle:", "success": ":white_check_mark:"}.get(event.status, "")
    text = f"{icon} *{event.headline()}*\n{event.summary()[len(event.headline()) + 2:]}"
    if event.failed and event.log_tail:
        text += "\n```\n" + "\n".join(event.log_tail[-TAIL_LINES:]) + "\n```"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SlackSink(JsonSink):
    """Posts ``{"text": ...}`` to a Slack incoming webhook."""

    name = "slack"

    def document(self, event: Event) -> dict[str, Any]:
        return {"text": message(event, 3000)}


class DiscordSink(JsonSink):
    """Posts ``{"content": ...}`` to a Discord webhook (2000 characters, no mentions)."""

    name = "discord"

    def document(self, event: Event) -> dict[str, Any]:
        text = message(event, 2000).replace(":red_circle:", "🔴").replace(
            ":white_check_mark:", "✅")
        return {"content": text, "username": "pgvault", "allowed_mentions": {"parse": []}}
