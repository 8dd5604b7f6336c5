"""Human output: sizes, durations, a progress line on terminals, one-line errors."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class ProgressLine:
    """A self-overwriting status line (bytes, rate, elapsed) on a terminal; silent elsewhere."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None,
                 interval: float = 0.5) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        text = f"{self.label}: {human_bytes(self.done)}"
        if self.total:
            text += f" of {human_bytes(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {human_bytes(self.done / elapsed)}/s, {human_seconds(elapsed)}"
        self.stream.write("\r\033[K" + text)
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
