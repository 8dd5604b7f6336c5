"""Every event as one log line (the run's final line, with outcome, duration and size)."""

from __future__ import annotations

import logging

from pgvault.events import Event

log = logging.getLogger("pgvault.events")

_LEVELS = {"failure": logging.ERROR, "start": logging.INFO, "success": logging.INFO}


class LogSink:
    """Logs each event; structured fields go to JSON logs as ``event``."""

    name = "log"

    def wants(self, event: Event) -> bool:
        return True

    def send(self, event: Event, timeout: float) -> None:
        level = logging.WARNING if event.kind == "backup.stale" else _LEVELS.get(
            event.status, logging.INFO)
        log.log(level, event.summary(), extra={"event": event.to_json()})
