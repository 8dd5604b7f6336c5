"""The readable-stream shape every stage consumes and produces."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Protocol

CHUNK = 1 << 20  # 1 MiB: large enough that per-chunk Python overhead vanishes


class Readable(Protocol):
    """Anything with ``read(n) -> bytes`` that returns b"" only at the end."""

    def read(self, size: int = -1, /) -> bytes: ...


class Reader(io.RawIOBase):
    """Base for pipeline readers: subclasses implement ``read_chunk``; b"" means EOF."""

    def readable(self) -> bool:
        return True

    def read_chunk(self, size: int) -> bytes:
        raise NotImplementedError

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read_chunk(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        return self.read_chunk(size) if size else b""

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read_chunk(len(buffer))
        buffer[: len(data)] = data
        return len(data)


Progress = Callable[[int], None]


class CountingReader(Reader):
    """Counts raw bytes on their way into the pipeline and reports progress."""

    def __init__(self, source: Readable, progress: Progress | None) -> None:
        super().__init__()
        self._source = source
        self._progress = progress
        self.size = 0

    def read_chunk(self, size: int) -> bytes:
        data = self._source.read(size)
        self.size += len(data)
        if self._progress is not None and data:
            self._progress(len(data))
        return data
