"""What jobs tell the outside world, and the fan-out that hands it to sinks without waiting long.

A job emits small immutable ``Event``s; ``Fanout.emit`` gives each one to every sink that
wants it, each in its own thread, and waits at most ``timeout`` seconds for all of them
together. A sink that raises or is still busy then is reported through ``on_failure`` and
forgotten: a notifier can never fail an operation or hold it up for longer than that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

EVENT_KINDS = (
    "backup.started",
    "backup.succeeded",
    "backup.failed",
    "backup.recovered",
    "backup.stale",
    "verify.succeeded",
    "verify.failed",
    "prune.finished",
    "snapshot.started",
    "snapshot.succeeded",
    "snapshot.failed",
    "action.started",  # the web console's actions (backup, drill, pin, restore): who asked
    "action.succeeded",
    "action.failed",
)

_STATUS = {
    "started": "start",
    "succeeded": "success",
    "finished": "success",
    "failed": "failure",
    "stale": "failure",
    "recovered": "success",
}


@dataclass(frozen=True)
class Event:
    """One thing that happened to one database; plain values only, safe to serialise."""

    kind: str
    database: str
    at: datetime
    backup_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    size: int | None = None
    duration: float | None = None
    error: str | None = None
    log_tail: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """start, success or failure: what a pinger or a chat colour needs to know."""
        return _STATUS.get(self.kind.rsplit(".", 1)[-1], "info")

    @property
    def failed(self) -> bool:
        return self.status == "failure"

    def headline(self) -> str:
        """A short human title, e.g. "pgvault: backup of app failed"."""
        noun, verb = self.kind.split(".", 1)
        if self.kind == "backup.stale":
            return f"pgvault: backups of {self.database} are stale"
        if self.kind == "prune.finished":
            return f"pgvault: prune of {self.database} finished"
        if noun == "action":
            return (f"pgvault: {self.details.get('action', 'action')} of {self.database} "
                    f"{verb} (console, asked by {self.details.get('who', 'unknown')})")
        return f"pgvault: {noun} of {self.database} {verb}"

    def summary(self) -> str:
        """One line: headline plus the facts that matter (id, size, duration, error)."""
        from pgvault.console import human_bytes, human_seconds

        parts = []
        if self.backup_id:
            parts.append(f"backup {self.backup_id}")
        if self.size is not None:
            parts.append(human_bytes(self.size))
        if self.duration is not None:
            parts.append(f"took {human_seconds(self.duration)}")
        parts.extend(f"{key} {value}" for key, value in self.details.items()
                     if isinstance(value, str | int | float) and not isinstance(value, bool))
        if self.error:
            parts.append(f"error: {self.error}")
        return self.headline() + (": " + ", ".join(parts) if parts else "")

    def to_json(self) -> dict[str, Any]:
        """The generic webhook body: every field, times as ISO 8601."""
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "event": self.kind,
            "status": self.status,
            "database": self.database,
            "backup_id": self.backup_id,
            "at": iso(self.at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "size_bytes": self.size,
            "duration_seconds": self.duration,
            "error": self.error,
            "log_tail": list(self.log_tail),
            "details": dict(self.details),
        }


class Sink(Protocol):
    """Somewhere events go: a log, a webhook, a pinger, a mailbox."""

    name: str
    """A label for logs and metrics; never the secret URL."""

    def wants(self, event: Event) -> bool:
        """Whether this sink is interested in ``event``."""
        ...

    def send(self, event: Event, timeout: float) -> None:
        """Deliver ``event``, giving up after about ``timeout`` seconds; raise on failure."""
        ...


def wanted(kinds: Iterable[str], event: Event) -> bool:
    """True if ``event`` is among ``kinds`` (which may say "all")."""
    chosen = set(kinds)
    return "all" in chosen or event.kind in chosen


class Fanout:
    """Delivers each event to every interested sink, in parallel, within one deadline."""

    def __init__(self, sinks: Iterable[Sink], *, timeout: float = 5.0,
                 on_failure: Callable[[Sink, Event, str], None] | None = None) -> None:
        self.sinks = list(sinks)
        self.timeout = timeout
        self.on_failure = on_failure

    def emit(self, event: Event) -> list[str]:
        """Send ``event``; returns the names of the sinks that failed or timed out."""
        deliveries: list[_Delivery] = []
        failures: list[tuple[Sink, str]] = []
        for sink in self.sinks:
            try:
                if sink.wants(event):
                    deliveries.append(_Delivery(sink, event, self.timeout))
            except Exception as exc:
                failures.append((sink, _reason(exc)))
        # Daemon threads: a sink stuck past the deadline is abandoned, never waited for.
        deadline = time.monotonic() + self.timeout
        for delivery in deliveries:
            delivery.thread.join(max(0.0, deadline - time.monotonic()))
            if delivery.thread.is_alive():
                failures.append((delivery.sink, f"no answer within {self.timeout:g}s"))
            elif delivery.error is not None:
                failures.append((delivery.sink, delivery.error))
        for sink, reason in failures:
            if self.on_failure is not None:
                self.on_failure(sink, event, reason)
        return [sink.name for sink, _ in failures]


class _Delivery:
    """One event on its way to one sink, in a thread of its own."""

    def __init__(self, sink: Sink, event: Event, timeout: float) -> None:
        self.sink = sink
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, args=(event, timeout),
                                       name=f"pgvault-sink-{sink.name}", daemon=True)
        self.thread.start()

    def _run(self, event: Event, timeout: float) -> None:
        try:
            self.sink.send(event, timeout)
        except Exception as exc:
            self.error = _reason(exc)


def _reason(exc: Exception) -> str:
    """Why a sink failed, without anything a URL-bearing exception might carry."""
    return str(exc) or type(exc).__name__
