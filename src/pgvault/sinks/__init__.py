"""Event sinks, one module each; ``fanout_for`` wires the ones a [notify] section names."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pgvault.events import Event, Fanout, Sink

if TYPE_CHECKING:
    from pgvault.config import NotifySettings


def sinks_for(notify: NotifySettings) -> list[Sink]:
    """The log sink plus every notifier ``notify`` configures (URLs registered as secrets)."""
    from pgvault import redact
    from pgvault.sinks.log import LogSink

    # Each notifier is imported only when configured (smtplib and urllib cost start-up time).
    sinks: list[Sink] = [LogSink()]
    events = notify.events
    if notify.webhook_url is not None:
        from pgvault.sinks.webhook import WebhookSink

        sinks.append(WebhookSink(notify.webhook_url.get_secret_value(), events))
    if notify.slack_webhook_url is not None:
        from pgvault.sinks.chat import SlackSink

        sinks.append(SlackSink(notify.slack_webhook_url.get_secret_value(), events))
    if notify.discord_webhook_url is not None:
        from pgvault.sinks.chat import DiscordSink

        sinks.append(DiscordSink(notify.discord_webhook_url.get_secret_value(), events))
    if notify.ping_url is not None:
        from pgvault.sinks.ping import PingSink

        sinks.append(PingSink(notify.ping_url.get_secret_value()))
    if notify.email is not None:
        from pgvault.sinks.smtp import EmailSink

        sinks.append(EmailSink(notify.email, events))
        if notify.email.password is not None:
            redact.register(notify.email.password.get_secret_value())
    for secret in (notify.webhook_url, notify.slack_webhook_url, notify.discord_webhook_url,
                   notify.ping_url):
        if secret is not None:
            redact.register_url(secret.get_secret_value())
    return sinks


def fanout_for(notify: NotifySettings,
               on_failure: Callable[[Sink, Event, str], None] | None = None) -> Fanout:
    """A Fanout over ``sinks_for(notify)`` with the configured timeout."""
    return Fanout(sinks_for(notify), timeout=notify.timeout_seconds, on_failure=on_failure)
