"""Logging: human text lines, or one JSON object per line for machines; secrets scrubbed.

Everything pgvault logs goes through the "pgvault" logger to stderr. Event lines (one
per started/finished run, from ``sinks.log``) are shown by the daemon and in JSON mode;
one-shot commands in text mode print their own result line instead, so they are hidden
there and a failure still ends in exactly one line.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

LOGGER = "pgvault"


def _scrub(text: str) -> str:
    from pgvault import redact

    return redact.scrub(text)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (the CLI may wrap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class TextFormatter(logging.Formatter):
    """``2026-11-25T01:00:03Z INFO message``."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = f"{when} {record.levelname} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return _scrub(text)


class LineFormatter(logging.Formatter):
    """``warning: message``: what one-shot commands print beside their own output."""

    def format(self, record: logging.LogRecord) -> str:
        return _scrub(f"{record.levelname.lower()}: {record.getMessage()}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and an event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            entry.update({k: v for k, v in event.items() if k not in entry})
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return _scrub(json.dumps(entry, default=str))


class _HideEvents(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not hasattr(record, "event")


def configure(fmt: str = "text", *, show_events: bool = False, debug: bool = False) -> None:
    """Send pgvault's log to stderr as ``fmt`` (text or json); replaces earlier set-ups.

    Text without ``show_events`` (one-shot commands) prints only warnings and errors as
    ``warning: ...``; the daemon shows events with a timestamp on every line.
    """
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    # Replaces any stream handler set up earlier (by an earlier call, or the CLI's default).
    for old in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]:
        logger.removeHandler(old)
    handler = _Stderr()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif show_events:
        handler.setFormatter(TextFormatter())
    else:
        handler.setFormatter(LineFormatter())
        handler.setLevel(logging.WARNING)
        handler.addFilter(_HideEvents())
    logger.addHandler(handler)


def get(name: str) -> logging.Logger:
    """A child of the pgvault logger, e.g. ``logs.get("daemon")``."""
    return logging.getLogger(f"{LOGGER}.{name}")


class _Tail(logging.Handler):
    def __init__(self, thread: int, keep: int) -> None:
        super().__init__(logging.INFO)
        self.thread = thread
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.setFormatter(TextFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(self.format(record))


@contextlib.contextmanager
def tail(keep: int = 30) -> Iterator[collections.deque[str]]:
    """The last ``keep`` log lines this thread writes while the block runs (event log tails)."""
    logger = logging.getLogger(LOGGER)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    handler = _Tail(threading.get_ident(), keep)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
